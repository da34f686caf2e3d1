"""A sweep on a plain folder of world images, with and without early stopping, in one run; then
every trial's bank measured by the oracle the sweep never saw.

    python jobs/bench/benchmark_sweep.py --out out/bench-sweep [--samples 6] [--milestones 100,200]

1. `noiseclr world make` writes the discovery domain's images into OUT/world; its factor table is
   deleted, so the folder is plain data (the sweep reads pixels only either way: `data.uri` set
   means no oracle, `metric: auto` maximises the oracle-free bank objective).
2. The same sweep (same seed, so Optuna proposes the same trials) runs twice: with ASHA
   (`early_stopping: true`) and without (every trial trains to the last milestone). Each picks
   its bank by re-measuring its leaders (`remeasure`).
3. Every trial bank of both sweeps (identical banks once) is measured by the oracle protocol on
   one set of images: alignment [95% CI] and coverage.

Prints the wall time of each sweep, its chosen bank, the table of every trial (objective,
interval, re-measured figure, oracle alignment, coverage) and the chosen bank's place among its
sweep's trials by oracle alignment. Writes OUT/benchmark.json and OUT/benchmark.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_world(out: Path, n: int) -> Path:
    world = out / "world"
    if not world.exists():
        make = ["world", "make", "--out", str(world), "--n", str(n), "--seed", "0"]
        fix = ["--fix", "x=center", "--fix", "y=middle"]
        subprocess.run([sys.executable, "-m", "noiseclr.cli", *make, *fix], check=True)
        (world / "factors.parquet").unlink()  # plain data: pixels, no factors
    return world


def write_sweep(out: Path, world: Path, args, early: bool) -> Path:
    sweep = {
        "kind": "sweep",
        "job": str(ROOT / "jobs/shapes.yaml"),
        "overrides": {
            "data": {"uri": str(world)},
            "evaluation": {"images": args.images},
            "gallery": {"enabled": False},
            "run": {"checkpoint_every": 50},
        },
        "space": {
            "k": {"choice": [8, 12]},
            "t_range": {"choice": [[0, 600], [0, 999], [200, 800]]},
            "tau": {"loguniform": [0.1, 1.0]},
        },
        "milestones": args.milestones,
        "num_samples": args.samples,
        "max_concurrent": 1,
        "cpus_per_trial": 2,
        "metric": "auto",
        "early_stopping": early,
        "remeasure": {"top": 2, "images": args.remeasure_images},
        "name": "asha" if early else "fifo",
        "seed": args.seed,
    }
    path = out / f"sweep-{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_sweep(config: Path, out: Path) -> tuple[float, dict]:
    if out.exists():  # a sweep there would resume, and its wall time would mean nothing
        raise SystemExit(f"{out} exists: give a new --out")
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "noiseclr.cli", "sweep", "--config", str(config), "--out", str(out)]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started, json.loads((out / "best.json").read_text())


def trial_rows(out: Path) -> list[dict]:
    import csv

    with (out / "sweep.csv").open() as f:
        return list(csv.DictReader(f))


def digest(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "directions.safetensors").read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-sweep"))
    # at most Optuna's 10 random start-up trials: beyond, its proposals learn from results that
    # early stopping cut short, and the two sweeps would no longer try the same trials
    ap.add_argument("--samples", type=int, default=6, choices=range(2, 11), metavar="2..10")
    ap.add_argument("--milestones", type=lambda s: [int(x) for x in s.split(",")], default=[100, 200])
    ap.add_argument("--images", type=int, default=4, help="scored images per source at each milestone")
    ap.add_argument("--remeasure-images", type=int, default=8)
    ap.add_argument("--oracle-images", type=int, default=8)
    ap.add_argument("--world", type=int, default=64, help="images in the plain folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from OUT/benchmark.json")
    args = ap.parse_args()
    out = args.out.resolve()
    if args.report_only:
        write_report(json.loads((out / "benchmark.json").read_text()), out)
        return
    out.mkdir(parents=True, exist_ok=True)
    world = write_world(out, args.world)
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "sweeps": {}}
    for early in (True, False):
        name = "asha" if early else "fifo"
        config = write_sweep(out, world, args, early)
        seconds, best = run_sweep(config, out / name)
        report["sweeps"][name] = {"seconds": round(seconds, 1), "best": best, "rows": trial_rows(out / name)}
        print(f"{name}: {seconds:.0f} s, chose {best['bank']}", flush=True)
        (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))

    from noiseclr.bank import DirectionBank
    from noiseclr.evaluation import evaluate
    from noiseclr.models.base import load_model

    model = load_model("shapes", device="cpu")
    harness = evaluate.Harness(
        model,
        evaluate.Protocol(fixed={"x": "center", "y": "middle"}, n_images=args.oracle_images),
        progress=False,
    )
    graded: dict[str, dict] = {}
    for sweep in report["sweeps"].values():
        for row in sweep["rows"]:
            key = digest(Path(row["bank"]))
            if key not in graded:
                g = harness.evaluate(DirectionBank.load(row["bank"], model))
                graded[key] = {
                    "alignment": g["alignment"],
                    "interval": g["scores"]["all"]["intervals"]["alignment"],
                    "coverage": g["coverage"],
                }
            row["oracle"] = graded[key]
    write_report(report, out)


def write_report(report: dict, out: Path) -> None:
    """The tables and the chosen banks' places by oracle alignment: among their own sweep's trials,
    and among the fully trained banks of the sweep without early stopping (the same trials, so a
    bank stopped early cannot make the place look better)."""
    full = sorted(report["sweeps"]["fifo"]["rows"], key=lambda r: -r["oracle"]["alignment"])
    lines = []
    for name, sweep in report["sweeps"].items():
        rows = sweep["rows"]
        ranked = sorted(rows, key=lambda r: -r["oracle"]["alignment"])
        chosen = next(r for r in rows if r["chosen"] == "True")
        place = ranked.index(chosen) + 1
        among_full = 1 + sum(r["oracle"]["alignment"] > chosen["oracle"]["alignment"] for r in full)
        sweep["chosen_place"], sweep["chosen_place_among_fully_trained"] = place, among_full
        sweep["top_quarter"] = among_full <= max(1, len(full) // 4)
        lines += [
            f"### {name}: {sweep['seconds']:.0f} s, {len(rows)} trials; the chosen bank (k {chosen['k']}) is "
            f"{place} of {len(rows)} by oracle alignment, {among_full} of {len(full)} among the fully "
            "trained banks",
            "",
            "| k | t range | tau | steps | objective [95% CI] | re-measured [95% CI] | chosen "
            "| alignment [95% CI] | coverage |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            o = r["oracle"]
            lines.append(
                f"| {r['k']} | {r['t_range']} | {float(r['tau']):.3g} | {r['steps']} "
                f"| {float(r['objective']):.3f} {r['objective_interval']} | {r['remeasured'] or '-'} "
                f"| {'yes' if r['chosen'] == 'True' else ''} | {o['alignment']:.3f} {o['interval']} "
                f"| {', '.join(o['coverage']) or '-'} |"
            )
        lines.append("")
    a, f = report["sweeps"]["asha"]["seconds"], report["sweeps"]["fifo"]["seconds"]
    lines.append(f"wall time with early stopping / without: {a:.0f} s / {f:.0f} s = {a / f:.2f}")
    text = "\n".join(lines)
    (out / "benchmark.md").write_text(text + "\n")
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
