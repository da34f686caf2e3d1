"""Does a per-direction edit window show edits the fixed window hides?

    python jobs/research/measure_windows.py --bank platform/noiseclr/pretrained/banks/shapes --n 16
    python jobs/research/measure_windows.py --words --pairs --n 6 --windows 600,800,1000
    python jobs/research/measure_windows.py --model out/base/stage9 --words --pairs --n 6 --windows 600
    python jobs/research/measure_windows.py --bank BANK --n 16 --windows 600 --low 200  # stop at t = 200

Each bank (a bank folder, the known words, the word-pair reference) is measured by the oracle
protocol on its domain twice on the same images: every direction at the fixed window (t <= 600),
then with `Protocol.windows`, where each direction keeps the candidate window its calibrated
edits are best in on the calibration images. Prints one markdown row per (bank, windows) and
writes OUT/windows.json (every edit's scores, the chosen windows) and OUT/grid-*.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FIVE = ("shape", "hue", "size", "lightness", "pattern")  # the domain's varying factors


def main() -> None:
    import torch

    from noiseclr.bank import DirectionBank
    from noiseclr.evaluation.evaluate import Harness, Protocol, pair_bank, word_bank
    from noiseclr.models.base import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", action="append", default=[], help="bank folder (repeatable)")
    ap.add_argument("--words", action="store_true", help="also the known words")
    ap.add_argument("--pairs", action="store_true", help="also the word-pair reference e(b) - e(a)")
    ap.add_argument("--n", type=int, default=6, help="generated and real images")
    ap.add_argument("--windows", default="600,800", help="candidate window tops (600: the fixed window only)")
    ap.add_argument("--low", type=int, default=0, help="the window's bottom: edits act for low < t <= top")
    ap.add_argument("--out", default="out/windows")
    ap.add_argument("--model", default="shapes", help="base model: a name or a pipeline folder")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tops = tuple(int(t) for t in args.windows.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, device="cpu")
    banks = {
        Path(b).name if Path(b).name != "bank" else Path(b).parent.name: DirectionBank.load(b)
        for b in args.bank
    }
    if args.words:
        banks["words"] = word_bank(model)
    if args.pairs:
        banks["pairs"] = pair_bank(model)
    top = Protocol.model_fields["window"].default[0]  # the protocol's fixed window top (600)
    fixed = Protocol(fixed={"x": "center", "y": "middle"}, n_images=args.n, window=(top, args.low))
    harness = Harness(model, fixed, progress=False)
    results, rows = {}, []
    for name, bank in banks.items():
        runs = [(f"{args.low} < t <= {top}" if args.low else f"t <= {top}", fixed)]
        if tops != fixed.tops:  # --windows 600: the fixed window only
            runs.append((f"per direction of {tops}", fixed.model_copy(update={"windows": tops})))
        for label, protocol in runs:
            harness.p = protocol  # the images and the floor do not depend on the windows
            t0 = time.time()
            r = harness.evaluate(bank)
            r["seconds"] = round(time.time() - t0, 1)
            results[f"{name} | {label}"] = r
            harness.best_edits_grid(bank, r).save(
                out / f"grid-{name}-{'fixed' if protocol is fixed else 'windows'}.png"
            )
            rows.append(row(name, label, r))
            print(rows[-1], flush=True)
    (out / "windows.json").write_text(json.dumps(results, indent=1))
    head = " | ".join(("bank", "windows", "alignment [95% CI]", "coverage", *FIVE, "real", "tops", "s"))
    print(f"\n| {head} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def row(name: str, label: str, r: dict) -> str:
    best = r["scores"]["all"]
    lo, hi = best["intervals"]["alignment"]
    factors = " | ".join(f"{best['best_per_factor'][f]:.2f}" for f in FIVE)
    tops = [w[0] for w in r["windows"]]
    chosen = ", ".join(f"{t}: {tops.count(t)}" for t in sorted(set(tops)))
    real = r["scores"].get("real", {}).get("alignment")
    return (
        f"| {name} | {label} | {best['alignment']:.3f} [{lo:.3f}, {hi:.3f}] "
        f"| {', '.join(best['coverage']) or '-'} | {factors} | {real:.3f} | {chosen} | {r['seconds']} |"
    )


if __name__ == "__main__":
    main()
