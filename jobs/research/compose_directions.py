"""The composition table: live directions applied in pairs and a triple, within a bank and across
banks of two domains, scored with the oracle (fidelity) and without it (additivity).

    python jobs/research/compose_directions.py --out out/compose [--other NAME=FOLDER] [--n 8]

Banks: the shipped main-job bank, the 8 known words (a reference), and with --other a bank
learnt on another domain of the world (e.g. circles: `world_fixed: {shape: circle, y: middle}`),
applied to the main domain's images together with the main bank's directions. Each bank is
measured with the oracle protocol first; its best live signed edit per factor (quality > 0)
enters the pairs, so every pair joins edits of two different factors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from noiseclr.bank import DirectionBank
from noiseclr.editing.sampler import Edit
from noiseclr.evaluation import evaluate
from noiseclr.evaluation.compose import Part, measure_composition
from noiseclr.models.base import load_model

FIXED = {"x": "center", "y": "middle"}
SHIPPED = Path(__file__).resolve().parents[2] / "platform/noiseclr/pretrained/banks/shapes"


def best_per_factor(name: str, bank: DirectionBank, result: dict, window: int) -> dict[str, Part]:
    """factor -> the bank's best live signed edit dominated by it (quality > 0)."""
    best: dict[str, tuple[float, Part]] = {}
    for k, pair in enumerate(result["scores"]["all"]["edits"]):
        for j, e in enumerate(pair):
            if e["quality"] <= 0:
                continue
            scale = result["scales"][k][j]
            part = Part(f"{name} #{k}{'-+'[j]}", Edit(bank.directions[k], scale, window, 0, label=e["label"]))
            if e["quality"] > best.get(e["dominant"], (0.0, None))[0]:
                best[e["dominant"]] = (e["quality"], part)
    return {f: p for f, (_, p) in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/compose"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--other", help="NAME=FOLDER of a bank learnt on another domain")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model("shapes", device="cpu")
    harness = evaluate.Harness(model, evaluate.Protocol(fixed=FIXED, n_images=args.n))
    window = harness.p.window[0]
    banks = {"shapes": DirectionBank.load(SHIPPED, model), "words": evaluate.word_bank(model)}
    if args.other:
        name, _, folder = args.other.partition("=")
        banks[name] = DirectionBank.load(folder, model)
    best = {name: best_per_factor(name, b, harness.evaluate(b), window) for name, b in banks.items()}
    print({name: {f: p.name for f, p in parts.items()} for name, parts in best.items()}, flush=True)
    sets: list[tuple[str, list[Part]]] = []
    for name in ("shapes", "words"):
        parts = best[name]
        for a, b in itertools.combinations(sorted(parts), 2):
            sets.append((f"{name}: pair", [parts[a], parts[b]]))
        if len(parts) >= 3:
            sets.append((f"{name}: triple", [parts[f] for f in sorted(parts)[:3]]))
    if args.other:
        other = best[name := args.other.partition("=")[0]]
        for fa, fb in itertools.product(sorted(best["shapes"]), sorted(other)):
            if fa != fb:
                sets.append((f"across: shapes + {name}", [best["shapes"][fa], other[fb]]))
    rows = []
    for kind, parts in sets:
        r = measure_composition(harness, parts)
        rows.append({"set": kind, **r})
        print(kind, r, flush=True)
    (args.out / "composition.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| set | edits | their labels | kept (each) | leak | fidelity [95% CI] | additivity [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {' + '.join(r['parts'])} | {', '.join(r['labels'])} | "
            f"{', '.join(f'{k:.2f}' for k in r['kept'])} | {r['leak']:.2f} | "
            f"{r['fidelity']:.2f} {r['fidelity_interval']} | "
            f"{r['additivity']:.2f} {r['additivity_interval']} |"
        )
    text = "\n".join(lines)
    (args.out / "composition.md").write_text(text + "\n")
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
