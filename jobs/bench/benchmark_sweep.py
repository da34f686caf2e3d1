"""A sweep on a plain folder of world images, with and without early stopping, in one run; then
every trial's bank measured by the oracle the sweep never saw.

    python jobs/bench/benchmark_sweep.py --out out/bench-sweep [--samples 6] [--milestones 100,200]
    python jobs/bench/benchmark_sweep.py --out out/bench-sweep-k --sweeps fifo --k 8,12,16 ...
    python jobs/bench/benchmark_sweep.py --out out/bench-sweep-lr --sweeps fifo --k 8,12,16 --lr 1e-3,1.5e-2

1. `noiseclr world make` writes the discovery domain's images into OUT/world; its factor table is
   deleted, so the folder is plain data (the sweep reads pixels only either way: `data.uri` set
   means no oracle, `metric: auto` maximises the oracle-free bank objective).
2. The same sweep (same seed, so Optuna proposes the same trials) runs twice: with ASHA
   (`early_stopping: true`) and without (every trial trains to the last milestone). Each picks
   its bank by re-measuring its leaders (`remeasure`). `--sweeps` runs one of them alone (fifo:
   every trial fully trained, the cheaper check of the choice); `--k` sets the counts searched.
3. Every trial bank of both sweeps (identical banks once) is measured by the oracle protocol on
   one set of images: alignment [95% CI] and coverage [95% CI].

Prints the wall time of each sweep, its chosen bank, the table of every trial (objective,
interval, re-measured figure, oracle alignment, coverage), the chosen bank's place among its
sweep's trials by oracle alignment, and how every candidate bank figure (`blind.AGGREGATES`,
every bank re-measured on one image set) ranks the fully trained banks against the oracle.
Writes OUT/benchmark.json and OUT/benchmark.md (`--report-only` rewrites them from the json).
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
            "k": {"choice": args.k},
            "t_range": {"choice": [[0, 600], [0, 999], [200, 800]]},
            "tau": {"loguniform": [0.1, 1.0]},
            **({"lr": {"loguniform": args.lr}} if args.lr else {}),
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
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--milestones", type=ints, default=[100, 200])
    ap.add_argument("--images", type=int, default=4, help="scored images per source at each milestone")
    ap.add_argument("--remeasure-images", type=int, default=8)
    ap.add_argument("--oracle-images", type=int, default=8)
    ap.add_argument("--world", type=int, default=64, help="images in the plain folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=ints, default=[8, 12], help="the direction counts the sweep may pick")
    ap.add_argument(
        "--lr",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        metavar="LOW,HIGH",
        help="also sweep the learning rate, log-uniform between LOW and HIGH (the job's must lie inside)",
    )
    ap.add_argument(
        "--sweeps",
        type=lambda s: s.split(","),
        default=["asha", "fifo"],
        help="asha,fifo (the wall-time comparison) or one of them (fifo: every trial fully trained)",
    )
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from OUT/benchmark.json")
    ap.add_argument(
        "--remeasure-only",
        action="store_true",
        help="re-measure the banks of OUT/benchmark.json, then report",
    )
    ap.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="OUT",
        help="only: rank every candidate within each of these finished runs, and pooled over them",
    )
    args = ap.parse_args()
    if args.pool:
        print(pooled(args.pool))
        return
    out = args.out.resolve()
    if args.report_only or args.remeasure_only:
        report = json.loads((out / "benchmark.json").read_text())
        if args.remeasure_only:
            remeasure_all(report, out)
        write_report(report, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    world = write_world(out, args.world)
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "sweeps": {}}
    if not args.sweeps or set(args.sweeps) - {"asha", "fifo"}:
        raise SystemExit(f"--sweeps takes asha, fifo or both, not {args.sweeps}")
    for name in args.sweeps:
        early = name == "asha"
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
                    "coverage_interval": g["scores"]["all"]["intervals"].get("coverage"),
                }
            row["oracle"] = graded[key]
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))  # --report-only
    remeasure_all(report, out)
    write_report(report, out)


def remeasure_all(report: dict, out: Path) -> None:
    """Every bank measured again without the oracle as the sweep re-measures its leaders
    (`workflows.sweep._remeasure`: the same images for every bank, none the trials were measured
    on, `remeasure_images` per source), so every candidate figure compares on one image set (the
    trials' own measurement survives only as the objective and the score in the rows: the chosen
    bank's bank.json holds its re-measurement). The leaders' figures come out as the sweep's."""
    from noiseclr.workflows.sweep import SweepConfig, _remeasure

    done: dict[str, dict] = {}
    for name, sweep in report["sweeps"].items():
        config, job = SweepConfig.from_yaml(out / f"sweep-{name}.yaml")
        keys = [digest(Path(r["bank"])) for r in sweep["rows"]]
        todo = {key: r for key, r in zip(keys, sweep["rows"], strict=True) if key not in done}
        if todo:
            saved = job.model_dump(exclude_unset=True)
            folders = [Path(r["bank"]) for r in todo.values()]
            _, measured = _remeasure(
                saved, "objective", folders, config.remeasure.images, config.cpus_per_trial
            )
            for key, result in zip(todo, measured["scores"], strict=True):
                done[key] = {a: v["value"] for a, v in result["aggregates"].items()}
        for key, row in zip(keys, sweep["rows"], strict=True):
            row["remeasured_aggregates"] = done[key]
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))


def fully_trained(report: dict) -> list[dict]:
    """The banks trained to the last milestone, best alignment first: the sweep without early
    stopping where it ran (the same trials), else those of the one sweep that reached it."""
    sweeps = report["sweeps"]
    last = str(report["settings"]["milestones"][-1])
    rows = (
        sweeps["fifo"]["rows"]
        if "fifo" in sweeps
        else [r for r in next(iter(sweeps.values()))["rows"] if r["steps"] == last]
    )
    return sorted(rows, key=lambda r: -r["oracle"]["alignment"])


def write_report(report: dict, out: Path) -> None:
    """The tables and the chosen banks' places by oracle alignment: among their own sweep's trials,
    and among the fully trained banks (the sweep without early stopping where it ran: the same
    trials, so a bank stopped early cannot make the place look better); then how each candidate
    bank figure (blind.AGGREGATES, as `remeasure_all` measured every bank) would have chosen among
    those banks."""
    sweeps = report["sweeps"]
    full = fully_trained(report)
    quarter = max(1, len(full) // 4)
    lines = []
    for name, sweep in sweeps.items():
        rows = sweep["rows"]
        lr = "lr" in rows[0]  # swept (--lr)
        ranked = sorted(rows, key=lambda r: -r["oracle"]["alignment"])
        chosen = next(r for r in rows if r["chosen"] == "True")
        place = ranked.index(chosen) + 1
        among_full = 1 + sum(r["oracle"]["alignment"] > chosen["oracle"]["alignment"] for r in full)
        sweep["chosen_place"], sweep["chosen_place_among_fully_trained"] = place, among_full
        sweep["top_quarter"] = among_full <= quarter
        lines += [
            f"### {name}: {sweep['seconds']:.0f} s, {len(rows)} trials; the chosen bank (k {chosen['k']}) is "
            f"{place} of {len(rows)} by oracle alignment, {among_full} of {len(full)} among the fully "
            f"trained banks (top quarter: 1..{quarter})",
            "",
            f"| k | t range | tau |{' lr |' * lr} steps | objective [95% CI] | re-measured [95% CI] "
            "| chosen | alignment [95% CI] | coverage [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * lr,
        ]
        for r in rows:
            o = r["oracle"]
            lr_cell = f" {float(r['lr']):.2g} |" if lr else ""
            lines.append(
                f"| {r['k']} | {r['t_range']} | {float(r['tau']):.3g} |{lr_cell} {r['steps']} "
                f"| {float(r['objective']):.3f} {r['objective_interval']} | {r['remeasured'] or '-'} "
                f"| {'yes' if r['chosen'] == 'True' else ''} | {o['alignment']:.3f} {o['interval']} "
                f"| {', '.join(o['coverage']) or '-'} {o.get('coverage_interval', '')} |"
            )
        lines.append("")
    lines += candidates(full, quarter)
    if {"asha", "fifo"} <= set(sweeps):
        a, f = sweeps["asha"]["seconds"], sweeps["fifo"]["seconds"]
        lines.append(f"wall time with early stopping / without: {a:.0f} s / {f:.0f} s = {a / f:.2f}")
    text = "\n".join(lines)
    (out / "benchmark.md").write_text(text + "\n")
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)


def candidates(rows: list[dict], quarter: int) -> list[str]:
    """Each candidate's rank correlation with the oracle's alignment over the fully trained banks
    (95% bootstrap interval over banks) and the place by alignment of the bank it puts first: a
    check on banks none of them was chosen on."""
    import numpy as np

    from noiseclr.evaluation.blind import AGGREGATES, OBJECTIVE
    from noiseclr.evaluation.stats import bootstrap_interval, spearman

    align = np.array([r["oracle"]["alignment"] for r in rows])
    figures = {
        "k (a setting)": [float(r["k"]) for r in rows],
        "tau (a setting)": [float(r["tau"]) for r in rows],
        **({"lr (a setting)": [float(r["lr"]) for r in rows]} if "lr" in rows[0] else {}),
    }
    title = f"### Each candidate over the {len(rows)} fully trained banks"
    # only on one image set for every bank: a bank.json holds the trial's measurement, or the
    # sweep's re-measurement where the bank was chosen
    if not all("remeasured_aggregates" in r for r in rows):
        return [title, "", "Not measured: run with --remeasure-only first.", ""]
    figures.update({name: [r["remeasured_aggregates"][name] for r in rows] for name in AGGREGATES})
    lines = [
        title,
        "",
        "Measured again on one image set for every bank (the sweep's re-measurement's images).",
        "",
        "| figure | rho with the oracle's alignment [95% CI] | place by alignment of its first |",
        "|---|---|---|",
    ]
    for name, values in figures.items():
        v = np.array(values)
        places = first_places(v, align)
        place = f"{places[0]}" if len(places) == 1 else f"{places[0]}..{places[-1]} (tied)"
        star = " (the objective)" if name == OBJECTIVE else ""
        lines.append(
            f"| {name}{star} | {spearman(v, align):.2f} {bootstrap_interval(spearman, v, align)} "
            f"| {place}{' (top quarter)' if places[-1] <= quarter else ''} |"
        )
    return [*lines, ""]


def first_places(values, align) -> list[int]:
    """The places by alignment of the banks a figure puts first (several where they tie: a
    setting such as k)."""
    import numpy as np

    values, align = np.asarray(values), np.asarray(align)
    return sorted(1 + int(np.sum(align > align[i])) for i in np.flatnonzero(values == values.max()))


def pooled(outs: list[Path]) -> str:
    """Each candidate over several finished runs (their fully trained banks, each re-measured on
    its run's one image set): its rank correlation with the alignment within each sweep, their
    mean weighted by banks (what a sweep needs: banks compared with the others of their own sweep,
    never across worlds of settings) with a 95% bootstrap interval over banks, and where its first
    lands in each sweep."""
    import numpy as np

    from noiseclr.evaluation.blind import AGGREGATES, OBJECTIVE
    from noiseclr.evaluation.stats import bootstrap_interval, spearman

    runs = [fully_trained(json.loads((o / "benchmark.json").read_text())) for o in outs]
    if not all("remeasured_aggregates" in r for rows in runs for r in rows):
        raise SystemExit("every run needs its banks re-measured: run each with --remeasure-only first")
    align = np.concatenate([[r["oracle"]["alignment"] for r in rows] for rows in runs])
    sweep = np.concatenate([[i] * len(rows) for i, rows in enumerate(runs)])

    def within(v: np.ndarray, a: np.ndarray, g: np.ndarray) -> float:
        rhos = [(spearman(v[g == i], a[g == i]), int((g == i).sum())) for i in np.unique(g)]
        rhos = [(r, n) for r, n in rhos if np.isfinite(r)]
        if not rhos:
            return float("nan")
        values, weights = zip(*rhos, strict=True)
        return float(np.average(values, weights=weights))

    names = [str(o) for o in outs]
    lines = [
        f"### Each candidate within each sweep ({', '.join(names)}: {len(align)} banks)",
        "",
        "| figure | rho with the alignment, each sweep | mean within sweeps [95% CI] "
        "| place of its first, each sweep (top quarter) |",
        "|---|---|---|---|",
    ]
    for name in ("k", *AGGREGATES):
        v = np.concatenate(
            [
                [float(r["k"]) if name == "k" else r["remeasured_aggregates"][name] for r in rows]
                for rows in runs
            ]
        )
        each, places = [], []
        for i, rows in enumerate(runs):
            vi, ai = v[sweep == i], align[sweep == i]
            each.append(f"{spearman(vi, ai):.2f}")
            firsts = first_places(vi, ai)
            quarter = max(1, len(rows) // 4)
            tied = f"{firsts[0]}" if len(firsts) == 1 else f"{firsts[0]}..{firsts[-1]}"
            places.append(f"{tied}/{len(rows)}{' *' if firsts[-1] <= quarter else ''}")
        star = " (the objective)" if name == OBJECTIVE else ""
        lines.append(
            f"| {name}{star} | {' / '.join(each)} | {within(v, align, sweep):.2f} "
            f"{bootstrap_interval(within, v, align, sweep)} | {' / '.join(places)} |"
        )
    return "\n".join([*lines, "", "\\* its first is in the top quarter of that sweep by alignment"])


if __name__ == "__main__":
    main()
