"""Does the oracle-free score follow the oracle? Every direction of several banks measured both
ways on the shapes world's discovery domain; prints (and writes) the validation table.

    python jobs/research/validate_blind.py --out out/validate [--n 8] [--bank NAME=FOLDER ...]

Banks: the shipped main-job bank, the 8 known words, 12 random directions of its norm, 4 random
directions of tiny norm (dead by construction), a pullback bank (8 directions, trained here), and
any --bank given (sweep trials, other runs). Per direction: the oracle's quality (best signed
edit, `evaluation.evaluate`) and its dead flag (no signed edit with an effect; label "none" both
ways), and the blind score and dead flag (`evaluation.blind`) on other images (generated from the
domain's prompt, and world images handed over as plain pixels). Reported: Spearman's rank
correlation between the two scores and the agreement on dead vs live, per bank and pooled, with
95% bootstrap intervals over directions. Raw per-direction rows go to OUT/validation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from noiseclr.bank import DirectionBank
from noiseclr.domains import shapes
from noiseclr.evaluation import blind, evaluate
from noiseclr.evaluation.stats import bootstrap_interval as interval
from noiseclr.evaluation.stats import spearman
from noiseclr.models.base import load_model

FIXED = {"x": "center", "y": "middle"}
SHIPPED = Path(__file__).resolve().parents[2] / "platform/noiseclr/pretrained/banks/shapes"


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def balanced(a: np.ndarray, b: np.ndarray) -> float:
    """Balanced accuracy of b's dead flags against a's (mean of the recall on dead and on live),
    so a pool of directions dead both ways does not inflate the agreement; nan without both."""
    if a.all() or not a.any():
        return float("nan")
    return float(((b[a]).mean() + (~b[~a]).mean()) / 2)


def tiny_bank(like: DirectionBank, k: int = 4, norm: float = 0.01) -> DirectionBank:
    g = torch.Generator().manual_seed(7)
    v = torch.randn(k, like.directions.shape[1], generator=g)
    v = v / v.norm(dim=1, keepdim=True) * norm
    return DirectionBank(v, dict(like.base_model), name="tiny", config={"method": "noiseclr"})


def rows_of(name: str, bank: DirectionBank, oracle: dict, measured: dict) -> list[dict]:
    out = []
    for k in range(len(bank)):
        pair = oracle["scores"]["all"]["edits"][k]
        d = measured["directions"][k]
        out.append(
            {
                "bank": name,
                "direction": k,
                "oracle_quality": max(e["quality"] for e in pair),
                "oracle_effect": max(max(e["effect"]) for e in pair),
                "oracle_dead": all(e["label"] == "none" for e in pair),
                "oracle_label": oracle["labels"][k],
                "blind_score": d["score"],
                "blind_dead": d["dead"],
                "blind": d["signs"],
            }
        )
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| bank | directions | oracle dead | blind dead | dead/live agreement [95% CI] "
        "| balanced accuracy [95% CI] | Spearman rho [95% CI] | rho, live (oracle) only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [*dict.fromkeys(r["bank"] for r in rows), "pooled"]:
        rs = rows if name == "pooled" else [r for r in rows if r["bank"] == name]
        q = np.array([r["oracle_quality"] for r in rs])
        s = np.array([r["blind_score"] for r in rs])
        od = np.array([r["oracle_dead"] for r in rs])
        bd = np.array([r["blind_dead"] for r in rs])

        def txt(stat, *cols) -> str:
            v = stat(*cols) if len(cols[0]) > 1 else float("nan")
            return "-" if not np.isfinite(v) else f"{v:.2f} {interval(stat, *cols)}"

        live = ~od
        lines.append(
            f"| {'**pooled**' if name == 'pooled' else name} | {len(rs)} | {int(od.sum())} | {int(bd.sum())} "
            f"| {txt(agreement, od, bd)} | {txt(balanced, od, bd)} | {txt(spearman, q, s)} "
            f"| {txt(spearman, q[live], s[live])} (n={int(live.sum())}) |"
        )
    return "\n".join(lines)


def bank_table(summary: dict) -> str:
    lines = [
        "| bank | oracle-free bank score [95% CI] | live (oracle-free) | alignment [95% CI] | coverage |",
        "|---|---|---|---|---|",
    ]
    for name, b in sorted(summary.items(), key=lambda kv: -kv[1]["blind_score"]):
        lines.append(
            f"| {name} | {b['blind_score']:.3f} {b['blind_interval']} | {b['blind_live']} "
            f"| {b['alignment']:.3f} {b['alignment_interval']} | {', '.join(b['coverage']) or '-'} |"
        )
    names = list(summary)
    if len(names) > 2:
        rho = spearman(
            np.array([summary[n]["blind_score"] for n in names]),
            np.array([summary[n]["alignment"] for n in names]),
        )
        lines.append(f"\nSpearman rho between the two over {len(names)} banks: {rho:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/validate"))
    ap.add_argument("--n", type=int, default=8, help="images per source, both measurements")
    ap.add_argument("--bank", action="append", default=[], help="NAME=FOLDER (repeatable)")
    ap.add_argument("--only", nargs="*", help="measure only these banks")
    ap.add_argument("--append", action="store_true", help="keep OUT/validation.json's banks, add new ones")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model("shapes", device="cpu")
    main_bank = DirectionBank.load(SHIPPED, model)
    banks = {
        "main": main_bank,
        "words": evaluate.word_bank(model),
        "random": evaluate.random_bank(model, main_bank),
        "tiny": tiny_bank(main_bank),
    }
    for item in args.bank:
        name, _, folder = item.partition("=")
        banks[name] = DirectionBank.load(folder, model)
    if (
        "pullback" not in banks
        and (not args.only or "pullback" in args.only)
        and not (args.append and '"pullback"' in (args.out / "validation.json").read_text())
    ):
        from noiseclr.discovery.pullback import discover_pullback
        from noiseclr.editing.sampler import encode

        pixels = shapes.render(shapes.sample_scenes(16, seed=0, fixed=FIXED), model.resolution) * 2 - 1
        banks["pullback"] = discover_pullback(model, encode(model, pixels), k=8, seed=0)
    if args.only:
        banks = {k: v for k, v in banks.items() if k in args.only}
    oracle = evaluate.Harness(model, evaluate.Protocol(fixed=FIXED, n_images=args.n))
    # Plain pixels of other world scenes for the blind side: it never sees their factors.
    scenes = shapes.sample_scenes(args.n + 4, seed=4242, fixed=FIXED)
    real = shapes.render(scenes, model.resolution) * 2 - 1
    # the same edit window as the oracle's (banks without edit defaults would act from t = 1000)
    protocol = blind.BlindProtocol(prompt="a shape at middle center", n_images=args.n, window=oracle.p.window)
    harness = blind.BlindHarness(model, protocol, real=real)
    rows = json.loads((args.out / "validation.json").read_text()) if args.append else []
    done = {r["bank"] for r in rows}
    summary = json.loads((args.out / "banks.json").read_text()) if args.append else {}
    for name, bank in banks.items():
        if name in done:
            continue
        edits = harness.signed_edits(bank)
        measured = blind.score_edits(edits, ladder0=harness.ladder(bank)[0])
        graded = oracle.evaluate(bank)
        summary[name] = {  # the bank-level figures: does the bank score follow the alignment?
            "blind_score": measured["score"],
            "blind_interval": measured["interval"],
            "blind_live": measured["live"],
            "alignment": graded["alignment"],
            "alignment_interval": graded["scores"]["all"]["intervals"]["alignment"],
            "coverage": graded["coverage"],
        }
        (args.out / "banks.json").write_text(json.dumps(summary, indent=1))
        np.savez_compressed(  # raw changes, for studying other scores offline
            args.out / f"{name}.npz",
            deltas=np.array([[e.deltas for e in pair] for pair in edits], dtype=np.float16),
            scales=np.array([[e.scale for e in pair] for pair in edits]),
            reached=np.array([[e.reached for e in pair] for pair in edits]),
            drift=np.array([[e.drift for e in pair] for pair in edits]),
        )
        rows += rows_of(name, bank, graded, measured)
        (args.out / "validation.json").write_text(json.dumps(rows, indent=1))
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    text = table(rows) + "\n\n" + bank_table(summary)
    (args.out / "validation.md").write_text(text + "\n")
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
