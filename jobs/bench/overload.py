"""The endpoint overloaded: many more clients than one replica serves, with and without the
latency bound (`replicas.latency_bound_s`, shedding by expected wait), in one run.

    python jobs/bench/overload.py                          # 64 clients, 25-step edits, 20 s per row
    python jobs/bench/overload.py --clients 64 --steps 25 --bound 10 --seconds 20

Starts a local Ray and Serve's HTTP proxy on 127.0.0.1 with jobs/serve-shapes.yaml on one replica
(CPU), then loads POST /v1/edits with Debian's `hey` (CSV output: each answer's status and time;
its per-request timeout raised so that no request is cut off) twice: once with the queue bound
alone (`max_ongoing_requests`, `max_queued_requests`), once with the latency bound. Prints, per
row, the answers by status and the latencies of the 200s and of the 503s apart (hey's own summary
mixes them), and writes OUT/overload.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path


def hey_csv(
    url: str, body: dict, clients: int, seconds: float, qps: float = 0, timeout_s: int = 120
) -> list[tuple[int, float]]:
    """(status, seconds) of every request hey completed in `seconds` with `clients` clients, each
    sending at most `qps` requests a second (0: each sends its next request as soon as it has an
    answer, 503s included, as hey does by default)."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-t", str(timeout_s), "-o", "csv"]
    cmd += ["-q", str(qps)] if qps else []
    cmd += ["-m", "POST", "-T", "application/json", "-d", json.dumps(body), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 60, check=True)
    rows = [line.split(",") for line in out.stdout.splitlines()[1:] if line.strip()]
    return [(int(r[6]), float(r[0])) for r in rows]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summary(name: str, answers: list[tuple[int, float]], seconds: float) -> dict:
    ok = [t for s, t in answers if s == 200]
    shed = [t for s, t in answers if s == 503]
    return {
        "setting": name,
        "codes": {c: sum(s == c for s, _ in answers) for c in sorted({s for s, _ in answers})},
        "ok_per_s": round(len(ok) / seconds, 2),
        "ok_p50": pct(ok, 50),
        "ok_p99": pct(ok, 99),
        "ok_max": max(ok, default=None),
        "over_20s": sum(t > 20 for t in ok),
        "shed_p99": pct(shed, 99),
        "shed_mean": round(statistics.fmean(shed), 4) if shed else None,
    }


def main() -> None:
    import ray
    from ray import serve

    from noiseclr.serving.app import build
    from noiseclr.serving.config import ServeConfig
    from noiseclr.serving.proxy import proxy_env
    from noiseclr.tracking.server import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="jobs/serve-shapes.yaml")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--bound", type=float, default=10)
    ap.add_argument("--qps", type=float, nargs="+", default=[0, 1], help="per client; 0: no pause")
    ap.add_argument("--out", default="out/overload")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ServeConfig.from_yaml(args.config, port=free_port(), device="cpu", labels_dir=str(out / "labels"))
    bank = next(iter(base.banks))
    edit = {"bank": bank, "direction": 0, "scale": 1}
    body = {"seed": 1, "steps": args.steps, "prompt": "", "edits": [edit]}
    settings = {  # the queue bound as the serve configs had it before the latency bound
        "queue bound only": {"num_replicas": 1, "latency_bound_s": None, "max_ongoing_requests": 16},
        f"latency bound {args.bound:g} s": {"num_replicas": 1, "latency_bound_s": args.bound},
    }
    os.environ.update(
        proxy_env(base.limits.max_body_bytes)
    )  # the proxy's middlewares, as in `noiseclr serve`
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": base.host, "port": base.port})
    rows = []
    try:
        for name, replicas in settings.items():
            cfg = base.model_copy(update={"replicas": base.replicas.model_copy(update=replicas)})
            serve.run(build(cfg), name="overload", route_prefix="/")
            url = f"http://{cfg.host}:{cfg.port}/v1/edits"
            hey_csv(url, body, 1, 4)  # warm-up: the replica measures its speed
            for qps in args.qps:
                answers = hey_csv(url, body, args.clients, args.seconds, qps)
                rows.append(
                    summary(
                        f"{name}, {f'{qps:g} req/s per client' if qps else 'no pause'}", answers, args.seconds
                    )
                )
                print(rows[-1], flush=True)
                time.sleep(args.bound + 5)  # what was admitted drains
            serve.delete("overload")
            time.sleep(2)
    finally:
        serve.shutdown()
        ray.shutdown()
    lines = [
        f"{args.clients} clients, {args.steps}-step edits, {args.seconds:g} s per row, one replica",
        "",
        "| setting | answers | 200s per s | 200s p50 / p99 / max (s) | 200s over 20 s | 503s p99 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        codes = ", ".join(f"{c}: {n}" for c, n in r["codes"].items())
        lines.append(
            f"| {r['setting']} | {codes} | {r['ok_per_s']} | {r['ok_p50']} / {r['ok_p99']} / {r['ok_max']} "
            f"| {r['over_20s']} | {r['shed_p99']} |"
        )
    (out / "overload.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
