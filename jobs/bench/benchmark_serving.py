"""Benchmark: the edit endpoint under load, on loopback, bounded in time.

    python jobs/bench/benchmark_serving.py                      # jobs/serve-shapes.yaml, CPU
    python jobs/bench/benchmark_serving.py --clients 8 --seconds 40 --steps 10

Starts a local Ray and the Serve app (the real HTTP proxy on 127.0.0.1), then, in one run:
1. load: N concurrent clients for T seconds against one replica with batching (the config's
   max_batch_size) and again with max_batch_size 1: requests/s, p50/p99 latency, mean batch
   size, 5xx count, and the throughput ratio batched / unbatched;
2. autoscaling: num_replicas auto (1..2): replicas under load, then after the load stops;
3. fault: a replica process SIGKILLed while clients run; every client retries a failed request
   (up to 60 s); counts of failed tries, requests lost (none expected), time to a new replica.
Writes the figures to OUT/serving.json (default out/serve).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
from pathlib import Path

import httpx


async def load(url: str, clients: int, seconds: float, body: dict, retry: bool = False) -> dict:
    """`clients` loops posting `body` for `seconds`; latencies of successes, status counts."""
    latencies, statuses, batches, failed_tries = [], {}, [], 0
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failed_tries
        while time.monotonic() < stop:
            started = time.perf_counter()
            for _ in range(60 if retry else 1):
                try:
                    r = await http.post("/v1/edits", json=body)
                    code = r.status_code
                except httpx.TransportError:
                    code = 0  # connection refused/reset: the replica died under us
                if code == 200 or not retry:
                    break
                failed_tries += 1
                await asyncio.sleep(1)
            statuses[code] = statuses.get(code, 0) + 1
            if code == 200:
                latencies.append(time.perf_counter() - started)
                batches.append(json.loads(r.headers["x-edit-meta"])["batch"])

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    lat = sorted(latencies)
    return {
        "requests": sum(statuses.values()),
        "ok": len(lat),
        "status": {str(k): v for k, v in sorted(statuses.items())},
        "5xx": sum(v for k, v in statuses.items() if k >= 500),
        "rps": round(len(lat) / wall, 3),
        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "mean_batch": round(statistics.fmean(batches), 2) if batches else None,
        "failed_tries": failed_tries,
    }


def replicas(name: str) -> int:
    from ray import serve

    return serve.status().applications[name].deployments["EditServer"].replica_states.get("RUNNING", 0)


def deploy(cfg) -> str:
    from ray import serve

    from noiseclr.serving.app import build

    serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}"


def main() -> None:
    import ray
    from ray import serve

    from noiseclr.serving.config import ServeConfig
    from noiseclr.tracking.server import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="jobs/serve-shapes.yaml")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/serve")
    args = ap.parse_args()

    base = ServeConfig.from_yaml(
        args.config, port=free_port(), device=args.device, labels_dir=f"{args.out}/labels"
    )
    body = {
        "seed": 1,
        "steps": args.steps,
        "edits": [{"bank": next(iter(base.banks)), "direction": 0, "scale": 1}],
    }
    one = base.replicas.model_copy(update={"num_replicas": 1})
    figures: dict = {
        "clients": args.clients,
        "seconds": args.seconds,
        "steps": args.steps,
        "cpus": os.cpu_count(),
    }
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location=base.proxy_location, http_options={"host": base.host, "port": base.port})
    try:
        for label, size in (("batched", base.batching.max_batch_size), ("unbatched", 1)):
            cfg = base.model_copy(
                update={
                    "replicas": one,
                    "batching": base.batching.model_copy(update={"max_batch_size": size}),
                }
            )
            url = deploy(cfg)
            asyncio.run(load(url, 1, 3, body))  # warm-up: model loaded, first call done
            figures[label] = {
                "max_batch_size": size,
                **asyncio.run(load(url, args.clients, args.seconds, body)),
            }
            print(label, figures[label], flush=True)
        figures["batching_speedup"] = round(figures["batched"]["rps"] / figures["unbatched"]["rps"], 2)
        print("throughput batched / unbatched:", figures["batching_speedup"], flush=True)

        auto = base.replicas.model_copy(
            update={
                "num_replicas": "auto",
                "min_replicas": 1,
                "max_replicas": 2,
                "upscale_delay_s": 2,
                "downscale_delay_s": 10,
            }
        )
        url = deploy(base.model_copy(update={"replicas": auto}))
        timeline, start = [], time.monotonic()

        async def watch(until: float) -> None:
            while time.monotonic() < until:
                timeline.append((round(time.monotonic() - start, 1), replicas(base.name)))
                await asyncio.sleep(1)

        async def loaded() -> dict:
            until = time.monotonic() + args.seconds
            result, _ = await asyncio.gather(load(url, args.clients, args.seconds, body), watch(until))
            return result

        under = asyncio.run(loaded())
        peak = max(n for _, n in timeline)
        stop = time.monotonic()
        while time.monotonic() - stop < 120 and replicas(base.name) > 1:
            time.sleep(1)
        figures["autoscaling"] = {
            "load": under,
            "peak_replicas": peak,
            "first_at_2_s": next((t for t, n in timeline if n >= 2), None),
            "replicas_after": replicas(base.name),
            "down_after_s": round(time.monotonic() - stop, 1),
            "timeline": timeline,
        }
        print("autoscaling", {k: v for k, v in figures["autoscaling"].items() if k != "timeline"}, flush=True)

        url = deploy(base.model_copy(update={"replicas": one}))
        pid = httpx.get(url + "/v1/health", timeout=30).json()["pid"]

        async def faulted() -> dict:
            task = asyncio.create_task(load(url, args.clients, args.seconds, body, retry=True))
            await asyncio.sleep(args.seconds / 3)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            while time.monotonic() - killed < 120:  # bounded: a replica that never returns is a result
                try:
                    async with httpx.AsyncClient(timeout=10) as http:
                        if (await http.get(url + "/v1/health")).json()["pid"] != pid:
                            break
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                await asyncio.sleep(0.5)
            back = time.monotonic() - killed
            return {**(await task), "new_replica_after_s": round(back, 1)}

        figures["fault"] = asyncio.run(faulted())
        figures["fault"]["lost"] = figures["fault"]["requests"] - figures["fault"]["ok"]
        print("fault", figures["fault"], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "serving.json").write_text(json.dumps(figures, indent=1))
    print(f"wrote {args.out}/serving.json")


if __name__ == "__main__":
    main()
