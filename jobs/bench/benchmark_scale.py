"""How a discovery run's cost grows (figures, not a test): two tables for docs/benchmarks.md.

    python jobs/bench/benchmark_scale.py domain [--sizes 1000 5000 20000]  # large domains from S3
    python jobs/bench/benchmark_scale.py cost                               # directions, K, N, workers, nodes

`domain`: a shapes-world domain of N images in a bucket of a real S3-compatible server (moto on
127.0.0.1), streamed by Ray Data into discovery, the latent cache on and off. Per N it runs
  * a short discovery job (1 Ray Train worker): time to its first step, pairs/s, the driver's and
    the worker's peak RSS;
  * one full pass of the same pipeline (`latent_dataset`, the trainer's `_local_batches`) over all
    N files in a Ray actor: files decoded per second and that actor's peak RSS (with the cache on
    it keeps every latent, as a worker does);
and samples every Ray process's private memory (RSS less shared pages) during both, so the table
shows whether any process grows with N.

`cost`: pairs/s and peak memory against directions per step (anchor + negatives: 8, 21, 64), K
(12, 100, 1000), N (images held by the single process), and workers (1, 2) on nodes (1, 2) of a
multi-node Ray cluster on this host (`ray.cluster_utils.Cluster`).

Each configuration runs in its own process, so a peak is that configuration's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve()
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class ProcessPeaks:
    """Samples the private memory (RSS - shared) of this process and of every Ray worker process
    on this host, keeping each role's peak (`ray::RayTrainWorker`, the Ray Data stages...)."""

    def __init__(self, every: float = 0.5) -> None:
        self.peaks: dict[str, float] = defaultdict(float)
        self.every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = os.getpid()
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if proc.info["pid"] == me:
                        role = "driver"
                    elif cmd.startswith("ray::") and "IDLE" not in cmd:
                        # a process's title names what it runs now: `Actor.method`; keep the actor
                        role = cmd.split()[0].removeprefix("ray::").split(").")[0].split(".")[0]
                        role = role + ")" * (role.count("(") - role.count(")"))
                    else:
                        continue
                    mem = proc.memory_info()
                    self.peaks[role] = max(self.peaks[role], (mem.rss - mem.shared) / 2**20)
                except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                    continue
            self._stop.wait(self.every)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def in_subprocess(args: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run this script with `args`; it prints one JSON line last."""
    try:
        done = subprocess.run(
            [sys.executable, str(HERE), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    if done.returncode or not done.stdout.strip():
        return {"error": ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def discovery_metrics(cfg_kw: dict, workers_env: dict | None = None) -> dict:
    """One discovery run (no measurement, no gallery) -> the bank's cost metrics."""
    from noiseclr.bank import DirectionBank
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.workflows.discover import run_discovery

    base = dict(name="scale", evaluate=False, gallery=False, device="cpu", checkpoint_every=10_000)
    with tempfile.TemporaryDirectory() as out:
        result = run_discovery(DiscoveryConfig.of(**{**base, **cfg_kw}), out)
        m = DirectionBank.load(result.bank).metrics
    keys = ("pairs_per_s", "peak_rss_mib", "worker_peak_rss_mib", "first_step_s", "train_seconds", "nodes")
    return {k: m[k] for k in keys if k in m}


# --- large domains ---------------------------------------------------------------------------------


def one_domain(uri: str, endpoint: str, cache: bool, steps: int, batch: int) -> dict:
    """The two measurements of one N, cache on or off (this process is the driver)."""
    import ray
    import torch

    from noiseclr.data.ray_input import latent_dataset
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.training.distributed import _local_batches

    options = {"endpoint_url": endpoint, "key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}"}
    n = int(uri.rstrip("/").rsplit("d", 1)[1])
    row: dict = {"n": n, "cache": cache}
    with ProcessPeaks() as train_peaks:
        row["train"] = discovery_metrics(
            dict(
                data=uri,
                storage_options=options,
                n_images=n,
                steps=steps,
                batch=batch,
                k=12,
                negatives=7,
                workers=1,
                zero_stage=0,
                cache_latents=cache,
            )
        )
    row["train_process_peaks"] = dict(train_peaks.peaks)
    ray.shutdown()

    @ray.remote(num_cpus=1)
    class Pass:
        """A training worker's view: take every batch of the stream once (cache as configured)."""

        def run(self, shard, total: int, cache: bool) -> dict:
            from noiseclr.utils.memory import peak_rss_mib

            cfg = DiscoveryConfig.of(cache_latents=cache)
            started, first, seen, half = time.perf_counter(), None, 0, None
            stream = _local_batches(cfg, shard, batch)
            while seen < total:
                index, _ = next(stream)
                seen += len(index)
                first = first or time.perf_counter() - started
                if half is None and seen >= total // 2:
                    half = (seen, time.perf_counter() - started)
            seconds = time.perf_counter() - started
            # Files per second once the stream flows: the first batch carries the stages' start,
            # and whatever Ray Data read ahead while it waited. The second half's rate has neither.
            rate = (seen - batch) / (seconds - first) if seen > batch else float("nan")
            late = (seen - half[0]) / (seconds - half[1]) if half and seconds > half[1] else float("nan")
            return {
                "seconds": seconds,
                "first_batch_s": first,
                "rows": seen,
                "files_per_s": rate,
                "second_half_files_per_s": late,
                "peak_rss_mib": peak_rss_mib(),
            }

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)
    with ProcessPeaks() as pass_peaks:
        listed = time.perf_counter()
        ds, _, files = latent_dataset(uri, "shapes", 64, options, batch_size=16, run="scale", gpu=False)
        row["list_s"] = round(time.perf_counter() - listed, 2)
        (shard,) = ds.streaming_split(1)
        full = ray.get(Pass.remote().run.remote(shard, files // batch * batch, cache))
    row["pass"] = full
    row["pass_process_peaks"] = dict(pass_peaks.peaks)
    ray.shutdown()
    return row


def write_domains(sizes: list[int], endpoint: str) -> None:
    """Each N its own prefix (d1000/, d5000/...) of shapes-world PNGs, written by the world writer."""
    import boto3

    from noiseclr.domains.dataset import write_world

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="domain")
    for n in sizes:
        started = time.perf_counter()
        write_world(f"s3://domain/d{n}", n, seed=n, progress=False)
        print(f"wrote {n} images to s3://domain/d{n} in {time.perf_counter() - started:.0f} s", flush=True)


def domain_table(args) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)  # the world writer and the subprocesses
    try:
        write_domains(args.sizes, endpoint)
        rows = []
        for n in args.sizes:
            for cache in args.cache:
                one = ["_domain", f"s3://domain/d{n}", endpoint, str(int(cache))]
                one += [str(args.steps), str(args.batch)]
                rows.append(row := in_subprocess(one))
                print(json.dumps(row), flush=True)
    finally:
        server.stop()
    print()
    print(
        "| N | cache | list s | worker start to first step s | train pairs/s | driver MiB | train worker MiB "
        "| full pass: first batch s | files/s after it | files/s, second half | pass actor MiB (peak RSS) "
        "| largest Ray Data process MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| ? | ? | failed: {r['error']} |")
            continue
        t, p, tp = r["train"], r["pass"], r["train_process_peaks"]
        both = {
            k: max(tp.get(k, 0.0), r["pass_process_peaks"].get(k, 0.0))
            for k in {*tp, *r["pass_process_peaks"]}
        }
        data = {k: v for k, v in both.items() if "MapBatches" in k or "Read" in k}
        largest = max(data.items(), key=lambda kv: kv[1]) if data else ("-", 0.0)
        print(
            f"| {r['n']} | {'on' if r['cache'] else 'off'} | {r['list_s']:.1f} | {t['first_step_s']:.1f} | "
            f"{t['pairs_per_s']:.1f} | {tp['driver']:.0f} | {tp.get('RayTrainWorker', 0):.0f} | "
            f"{p['first_batch_s']:.1f} | {p['files_per_s']:.0f} | {p['second_half_files_per_s']:.0f} | "
            f"{p['peak_rss_mib']:.0f} | "
            f"{largest[1]:.0f} ({largest[0]}) |"
        )
    print("MiB: private memory (RSS less shared pages), sampled every 0.5 s, each process's peak; the pass")
    print("actor's is its own peak RSS (ru_maxrss), libraries included.")
    by = {(r["n"], r["cache"]): r for r in rows if "error" not in r}
    for n in args.sizes:
        if (n, True) in by and (n, False) in by:
            extra = by[(n, True)]["pass"]["peak_rss_mib"] - by[(n, False)]["pass"]["peak_rss_mib"]
            print(
                f"N={n}: the cache costs the worker {extra:.0f} MiB, {1024 * extra / n:.1f} KiB per image "
                "(peak RSS: tens of MiB of noise; trust the largest N)"
            )


# --- how cost grows ----------------------------------------------------------------------------------


def cost_rows(args) -> list[tuple[str, list[str]]]:
    """(what varies, the subprocess arguments) of each row."""
    one = ["_single"]
    rows = [(f"directions/step {d}", [*one, f"k=100,negatives={d - 1},n_images=64"]) for d in (8, 21, 64)]
    rows += [(f"K {k}", [*one, f"k={k},negatives=7,n_images=64"]) for k in (12, 100, 1000)]
    rows += [(f"N {n}", [*one, f"k=12,negatives=7,n_images={n}"]) for n in args.images]
    rows += [
        ("workers 1, nodes 1", ["_ray", "1", "PACK"]),
        ("workers 2, nodes 1", ["_ray", "2", "STRICT_PACK"]),
        ("workers 2, nodes 2", ["_ray", "2", "STRICT_SPREAD"]),
    ]
    return [(what, sub) for what, sub in rows if not args.only or what.split()[0].split("/")[0] in args.only]


def parse_kv(text: str) -> dict:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def on_ray(workers: int, strategy: str, steps: int, batch: int) -> dict:
    """Ray Train + DeepSpeed ZeRO-2 on a head (no CPUs) and two worker nodes of 3 CPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["DS_ACCELERATOR"] = "cpu"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        nodes.add_node(num_cpus=3, object_store_memory=200 * 2**20)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}, log_to_driver=False)
    try:
        return discovery_metrics(
            dict(
                k=12,
                negatives=7,
                n_images=64,
                steps=steps,
                batch=batch,
                workers=workers,
                zero_stage=2,
                placement_strategy=strategy,
            )
        )
    finally:
        ray.shutdown()
        nodes.shutdown()


def cost_table(args) -> None:
    rows = []
    for what, sub in cost_rows(args):
        extra = [str(args.steps), str(args.batch)]
        rows.append((what, row := in_subprocess([*sub, *extra])))
        print(what, json.dumps(row), flush=True)
    print()
    print("| varies | pairs/s | peak RSS MiB (process; workers: the largest) | nodes |")
    print("|---|---|---|---|")
    for what, r in rows:
        if "error" in r:
            print(f"| {what} | failed: {r['error']} | | |")
            continue
        peak = r.get("worker_peak_rss_mib", r.get("peak_rss_mib"))
        print(f"| {what} | {r['pairs_per_s']:.1f} | {peak:.0f} | {r.get('nodes', 1)} |")
    got = {what: r for what, r in rows if "error" not in r}

    def ratio(a: str, b: str, key: str) -> str:
        if a in got and b in got and got[a].get(key) and got[b].get(key):
            return f"{got[b][key] / got[a][key]:.2f}x"
        return "n/a"

    d8, d64, w1, w2, n2 = (
        "directions/step 8",
        "directions/step 64",
        "workers 1, nodes 1",
        "workers 2, nodes 1",
        ("workers 2, nodes 2"),
    )
    small, large = f"N {args.images[0]}", f"N {args.images[-1]}"
    pairs, peak = "pairs_per_s", "peak_rss_mib"
    print()
    print(
        f"K 12 -> 1000: pairs/s {ratio('K 12', 'K 1000', pairs)}, peak memory {ratio('K 12', 'K 1000', peak)}"
    )
    print("  (should stay ~1x: a step touches 1 + negatives directions, never all K)")
    print(f"directions/step 8 -> 64: pairs/s {ratio(d8, d64, pairs)}, peak memory {ratio(d8, d64, peak)}")
    print("  (a step's work grows linearly with its directions, so pairs/s should stay ~flat)")
    print(
        f"{small} -> {large}: pairs/s {ratio(small, large, pairs)}, peak memory {ratio(small, large, peak)}"
    )
    print("  (the single process holds every latent: memory grows with N, pairs/s should not move)")
    print(
        f"workers 1 -> 2 on one node: pairs/s {ratio(w1, w2, pairs)}; "
        f"2 workers, 1 -> 2 nodes: {ratio(w2, n2, pairs)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="table", required=True)
    domain = sub.add_parser("domain", help="large domains streamed from S3")
    domain.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    domain.add_argument("--steps", type=int, default=6)
    domain.add_argument("--cache", nargs="+", choices=["off", "on"], default=["off", "on"])
    domain.add_argument("--batch", type=int, default=8)
    cost = sub.add_parser("cost", help="pairs/s and memory against directions, K, N, workers, nodes")
    cost.add_argument("--images", type=int, nargs="+", default=[100, 1000, 4000])
    cost.add_argument("--steps", type=int, default=6)
    cost.add_argument("--batch", type=int, default=4)
    groups = ("directions", "K", "N", "workers")
    cost.add_argument("--only", nargs="+", choices=groups, help="these groups of rows (default: all)")
    # What the tables run, one configuration per process.
    for name, nargs in (("_domain", 5), ("_single", 3), ("_ray", 4)):
        sub.add_parser(name).add_argument("values", nargs=nargs)
    args = ap.parse_args()
    if args.table == "domain":
        args.cache = [c == "on" for c in args.cache]
        domain_table(args)
    elif args.table == "cost":
        cost_table(args)
    elif args.table == "_domain":
        uri, endpoint, cache, steps, batch = args.values
        print(json.dumps(one_domain(uri, endpoint, cache == "1", int(steps), int(batch))))
    elif args.table == "_single":
        kv, steps, batch = args.values
        print(json.dumps(discovery_metrics({**parse_kv(kv), "steps": int(steps), "batch": int(batch)})))
    else:
        workers, strategy, steps, batch = args.values
        print(json.dumps(on_ray(int(workers), strategy, int(steps), int(batch))))


if __name__ == "__main__":
    main()
