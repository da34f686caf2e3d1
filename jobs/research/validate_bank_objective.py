"""Which bank-level oracle-free figure ranks banks the way the oracle does? A validation set of
banks of the main domain (sweep-like trials over k, tau, t range, lr and seeds, deliberately
weak ones, the shipped bank, the words, random directions, pullback, a merged bank), each
measured with the oracle (alignment and coverage, with intervals) and without it, on the same
images for every bank; then the rank correlation of every candidate bank aggregate
(`evaluation.blind.AGGREGATES`) with the oracle's alignment and coverage, with bootstrap
intervals over banks.

    python jobs/research/validate_bank_objective.py --out out/bank-objective          # all stages
    python jobs/research/validate_bank_objective.py --out out/bank-objective --analyse-only

Stages resume: trained banks (OUT/banks/NAME) and measured ones (OUT/measured/NAME.json, with
the raw signed changes in NAME.npz, so new aggregates are computed without the model) are kept.

The test-retest study of banks of one k (what a sweep over tau and t range compares):

    python jobs/research/validate_bank_objective.py --same-k --out out/same-k --n 6

trains SAME_K's banks and measures each with both measurements on two disjoint image sets A and
B, bank by bank (a run cut short keeps whole banks): how reliably the oracle ranks them against
itself, and how each candidate ranks them against the other half's alignment (OUT/same-k.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from noiseclr.bank import DirectionBank, merge_banks
from noiseclr.domains import shapes
from noiseclr.evaluation import blind, evaluate
from noiseclr.evaluation.stats import bootstrap_interval, partial_spearman, spearman
from noiseclr.models.base import load_model

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs/shapes.yaml"
SHIPPED = ROOT / "platform/noiseclr/pretrained/banks/shapes"
FIXED = {"x": "center", "y": "middle"}
NOT_NOISECLR = ("words", "random-s0", "random-s1", "pullback")  # references, not discoveries
# Trials a sweep would try (flat job keys over jobs/shapes.yaml), and weak ones on purpose.
TRIALS: dict[str, dict] = {
    "k12-200": {"steps": 200},
    "k12-200-seed1": {"steps": 200, "seed": 1},
    "k8-200": {"steps": 200, "k": 8},
    "k16-tau0.15-t999": {"steps": 200, "k": 16, "tau": 0.15, "t_max": 999},
    "tau0.9-t200-800": {"steps": 200, "tau": 0.9, "t_min": 200, "t_max": 800},
    "tau0.3-t400": {"steps": 200, "tau": 0.3, "t_max": 400},
    "few-30": {"steps": 30},  # barely trained
    "lr5e-4": {"steps": 200, "lr": 5e-4},  # barely moves
    "no-strength": {"steps": 200, "strength_weight": 0.0},  # more dead directions
}


# Banks of one k (12) from the sweep's space (jobs/bench/benchmark_sweep.py: t range and tau),
# 200 steps each: what a sweep over tau and t compares, for the test-retest study (--same-k).
SAME_K: dict[str, dict] = {
    "t600-tau0.5": {"steps": 200},
    "t600-tau0.5-seed1": {"steps": 200, "seed": 1},
    "t600-tau0.15": {"steps": 200, "tau": 0.15},
    "t600-tau0.26": {"steps": 200, "tau": 0.26},
    "t600-tau1.0": {"steps": 200, "tau": 1.0},
    "t999-tau0.26": {"steps": 200, "t_max": 999, "tau": 0.26},
    "t999-tau0.68": {"steps": 200, "t_max": 999, "tau": 0.68},
    "t200-800-tau0.35": {"steps": 200, "t_min": 200, "t_max": 800, "tau": 0.35},
    "t200-800-tau0.9": {"steps": 200, "t_min": 200, "t_max": 800, "tau": 0.9},
    "t400-tau0.5": {"steps": 200, "t_max": 400},
}
HALVES = {"A": 0, "B": 100}  # seed offsets of two disjoint image sets


def train(out: Path, trials: dict[str, dict] | None = None) -> dict[str, Path]:
    """Each trial's bank (trained once; its folder kept)."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.workflows.discover import run_discovery

    folders = {}
    for name, values in (TRIALS if trials is None else trials).items():
        folder = out / "banks" / name
        if not (folder / "bank" / "bank.json").exists():
            t0 = time.perf_counter()
            cfg = DiscoveryConfig.from_yaml(JOB, evaluate=False, gallery=False, **values)
            run_discovery(cfg, folder)
            print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        folders[name] = folder / "bank"
    return folders


def banks(out: Path, model) -> dict[str, DirectionBank]:
    main = DirectionBank.load(SHIPPED, model)
    found = {"main-450": main}
    found.update({name: DirectionBank.load(f, model) for name, f in train(out).items()})
    found["words"] = evaluate.word_bank(model)
    found["random-s0"] = evaluate.random_bank(model, main, seed=0)
    found["random-s1"] = evaluate.random_bank(model, found["k8-200"], seed=1)
    found["merged"] = merge_banks([main, found["k12-200-seed1"]], "merged")
    if not (out / "measured" / "pullback.json").exists():
        from noiseclr.discovery.pullback import discover_pullback
        from noiseclr.editing.sampler import encode

        pixels = shapes.render(shapes.sample_scenes(16, seed=0, fixed=FIXED), model.resolution) * 2 - 1
        found["pullback"] = discover_pullback(model, encode(model, pixels), k=8, seed=0, progress=False)
    return found


def measure(out: Path, n: int) -> None:
    """Both measurements of every bank, on one set of images each (kept across banks)."""
    model = load_model("shapes", device="cpu")
    todo = {k: v for k, v in banks(out, model).items() if not (out / "measured" / f"{k}.json").exists()}
    if not todo:
        return
    (out / "measured").mkdir(parents=True, exist_ok=True)
    oracle, harness = harnesses(model, n, 0)
    for name, bank in todo.items():
        measure_one(oracle, harness, bank, out / "measured", name, name)


def harnesses(model, n: int, offset: int) -> tuple:
    """The oracle's and the oracle-free measurement's harnesses on one image set (seeds + offset)."""
    oracle = evaluate.Harness(
        model, evaluate.Protocol(fixed=FIXED, n_images=n, seed=1000 + offset), progress=False
    )
    scenes = shapes.sample_scenes(n + 4, seed=4242 + offset, fixed=FIXED)  # plain pixels for the blind side
    real = shapes.render(scenes, model.resolution) * 2 - 1
    protocol = blind.BlindProtocol(
        prompt="a shape at middle center", n_images=n, window=oracle.p.window, seed=2000 + offset
    )
    return oracle, blind.BlindHarness(model, protocol, real=real, progress=False)


def measure_one(oracle, harness, bank: DirectionBank, folder: Path, stem: str, name: str) -> dict:
    """Both measurements of one bank; its record and raw signed changes saved as folder/stem.*"""
    t0 = time.perf_counter()
    edits = harness.signed_edits(bank)
    ladder0 = harness.ladder(bank)[0]
    measured = blind.score_edits(edits, ladder0=ladder0)
    t1 = time.perf_counter()
    graded = oracle.evaluate(bank)
    np.savez_compressed(folder / f"{stem}.npz", **blind.pack_edits(edits), ladder0=ladder0)
    record = {
        "bank": name,
        "directions": len(bank),
        "alignment": graded["alignment"],
        "alignment_interval": graded["scores"]["all"]["intervals"]["alignment"],
        "coverage": graded["coverage"],
        "coverage_count": graded["coverage_count"],
        "coverage_interval": graded["scores"]["all"]["intervals"]["coverage"],
        "best_per_factor": graded["scores"]["all"].get("best_per_factor"),
        "blind": {k: v for k, v in measured.items() if k != "directions"},
        "seconds": {"blind": round(t1 - t0, 1), "oracle": round(time.perf_counter() - t1, 1)},
    }
    (folder / f"{stem}.json").write_text(json.dumps(record, indent=1))
    seconds = record["seconds"]
    print(
        f"{stem}: alignment {record['alignment']:.3f}, score {measured['score']:.3f} ({seconds})", flush=True
    )
    return record


def measure_same_k(out: Path, n: int) -> None:
    """The test-retest study: each bank of SAME_K trained, then measured by both measurements on
    two disjoint image sets (halves A and B), bank by bank (a cut-short run keeps whole banks)."""
    model = load_model("shapes", device="cpu")
    sets = {half: harnesses(model, n, offset) for half, offset in HALVES.items()}
    (out / "measured").mkdir(parents=True, exist_ok=True)
    for name in SAME_K:
        folder = train(out, {name: SAME_K[name]})[name]
        for half, (oracle, harness) in sets.items():
            if not (out / "measured" / f"{name}.{half}.json").exists():
                measure_one(
                    oracle,
                    harness,
                    DirectionBank.load(folder, model),
                    out / "measured",
                    f"{name}.{half}",
                    name,
                )


def load_measured(out: Path, pattern: str) -> list[dict]:
    """The measured records matching `pattern` under OUT/measured, each with its bank figures
    (`aggregates`) recomputed from its saved signed changes (so new candidates need no model)."""
    records = []
    for p in sorted((out / "measured").glob(pattern)):
        record = json.loads(p.read_text())
        z = np.load(p.with_name(p.name.removesuffix(".json") + ".npz"))
        record["aggregates"] = blind.score_edits(blind.unpack_edits(z), ladder0=float(z["ladder0"]))[
            "aggregates"
        ]
        records.append(record)
    return records


def write_table(lines: list[str], path: Path) -> str:
    """The report's lines as one markdown text, written to `path` and returned."""
    text = "\n".join(lines)
    path.write_text(text + "\n")
    return text


def cell(stat, *cols: np.ndarray) -> str:
    """A correlation over banks and its bootstrap interval, as a table cell."""
    return f"{stat(*cols):.2f} {bootstrap_interval(stat, *cols)}"


def analyse_same_k(out: Path) -> str:
    """How well each half's figures rank the banks as the other half's alignment does."""

    a, b = ({r["bank"]: r for r in load_measured(out, f"*.{half}.json")} for half in "AB")
    names = [n for n in a if n in b]
    align = {h: np.array([r[n]["alignment"] for n in names]) for h, r in (("A", a), ("B", b))}
    cover = {h: np.array([r[n]["coverage_count"] for n in names], float) for h, r in (("A", a), ("B", b))}
    candidates = list(a[names[0]]["aggregates"])
    fig = {
        h: {c: np.array([r[n]["aggregates"][c]["value"] for n in names]) for c in candidates}
        for h, r in (("A", a), ("B", b))
    }

    def place(chooser: np.ndarray, judge: np.ndarray) -> int:
        """The place, by `judge`, of the bank `chooser` ranks first."""
        return int(1 + (judge > judge[int(np.argmax(chooser))]).sum())

    def crossed(va, vb, wa, wb) -> float:
        """rho of v on one half with w on the other, both ways averaged (no image in common)."""
        return (spearman(va, wb) + spearman(vb, wa)) / 2

    def mean(v: dict) -> np.ndarray:
        """The halves' mean: the figure on all 2n images."""
        return (v["A"] + v["B"]) / 2

    lines = [
        f"{len(names)} banks of k 12 (200 steps, the sweep's t ranges and tau), each measured with the "
        "oracle and without it on two disjoint image sets A and B.",
        "",
        "| bank | alignment A [95% CI] | alignment B [95% CI] | coverage A / B | "
        + " | ".join(f"{c} A / B" for c in candidates)
        + " |",
        "|---|---|---|---|" + "---|" * len(candidates),
    ]
    for i, n in sorted(enumerate(names), key=lambda t: -(align["A"][t[0]] + align["B"][t[0]])):
        cells = [f"{fig['A'][c][i]:.3g} / {fig['B'][c][i]:.3g}" for c in candidates]
        lines.append(
            f"| {n} | {a[n]['alignment']:.3f} {a[n]['alignment_interval']} | {b[n]['alignment']:.3f} "
            f"{b[n]['alignment_interval']} | {cover['A'][i]:.0f} / {cover['B'][i]:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    q = max(1, len(names) // 4)
    lines += [
        "",
        "| figure | test-retest rho (A with B) [95% CI] | rho with the other half's alignment [95% CI] "
        "| rho with the alignment, both on A + B [95% CI] "
        f"| place by alignment B of its first on A, and B on A (top quarter: 1..{q}) | rho with tau, A / B |",
        "|---|---|---|---|---|---|",
    ]
    tau = np.array([SAME_K[n].get("tau", 0.5) for n in names])  # the job's own: 0.5
    rows = {
        "alignment (the oracle itself)": align,
        "coverage (oracle)": cover,
        "tau (a setting)": {"A": tau, "B": tau},
    }
    rows.update({c: {h: fig[h][c] for h in "AB"} for c in candidates})
    for c, v in rows.items():
        halves = (v["A"], v["B"], align["A"], align["B"])
        lines.append(
            f"| {c} | {cell(spearman, v['A'], v['B'])} | {cell(crossed, *halves)} "
            f"| {cell(spearman, mean(v), mean(align))} "
            f"| {place(v['A'], align['B'])}, {place(v['B'], align['A'])} "
            f"| {spearman(v['A'], tau):.2f} / {spearman(v['B'], tau):.2f} |"
        )
    return write_table(lines, out / "same-k.md")


def analyse(out: Path) -> str:
    records = load_measured(out, "*.json")
    aggregates = {r["bank"]: r["aggregates"] for r in records}
    names = [r["bank"] for r in records]
    align = np.array([r["alignment"] for r in records])
    cover = np.array([r["coverage_count"] for r in records], dtype=float)
    candidates = list(next(iter(aggregates.values())))
    lines = [
        f"{len(records)} banks of the main domain, each measured with the oracle and without it.",
        "",
        "| bank | directions | alignment [95% CI] | coverage | "
        + " | ".join(f"{c} [95% CI]" if c == blind.OBJECTIVE else c for c in candidates)
        + " |",
        "|---|---|---|---|" + "---|" * len(candidates),
    ]
    for r in sorted(records, key=lambda r: -r["alignment"]):
        a = aggregates[r["bank"]]
        cells = [
            f"{a[c]['value']:.3f} {a[c]['interval']}" if c == blind.OBJECTIVE else f"{a[c]['value']:.3g}"
            for c in candidates
        ]
        lines.append(
            f"| {r['bank']} | {r['directions']} | {r['alignment']:.3f} {r['alignment_interval']} "
            f"| {', '.join(r['coverage']) or '-'} | " + " | ".join(cells) + " |"
        )
    ours = np.array([n not in NOT_NOISECLR for n in names])  # what a sweep over NoiseCLR compares
    size = np.array([r["directions"] for r in records], dtype=float)
    same_k = ours & (size == 12)  # banks of one k: what a sweep over tau, t and lr compares
    lines += [
        "",
        "| candidate | rho with alignment [95% CI over banks] | with coverage [95% CI] "
        f"| with alignment, NoiseCLR banks ({int(ours.sum())}) | with alignment, k held out "
        f"| with alignment, NoiseCLR banks of k 12 ({int(same_k.sum())}) |",
        "|---|---|---|---|---|---|",
    ]
    figures = {"directions (k), as a baseline": size}
    figures.update({c: np.array([aggregates[n][c]["value"] for n in names]) for c in candidates})

    for c, v in figures.items():
        lines.append(
            f"| {c} | {cell(spearman, v, align)} | {cell(spearman, v, cover)} "
            f"| {cell(spearman, v[ours], align[ours])} | {cell(partial_spearman, v, align, size)} "
            f"| {cell(spearman, v[same_k], align[same_k])} |"
        )
    return write_table(lines, out / "bank-objective.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/bank-objective"))
    ap.add_argument("--n", type=int, default=4, help="generated and real images per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument(
        "--same-k", action="store_true", help="the test-retest study of SAME_K's banks (OUT: its own folder)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.same_k:
        if not args.analyse_only:
            measure_same_k(args.out, args.n)
        print(analyse_same_k(args.out))
    else:
        if not args.analyse_only:
            measure(args.out, args.n)
        print(analyse(args.out))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
