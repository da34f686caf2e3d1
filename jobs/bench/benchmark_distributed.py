"""Benchmark of the distributed path (figures, not a test).

    python jobs/bench/benchmark_distributed.py [--steps 12] [--model shapes]

Prints pairs/s of NoiseCLR training with 1 and with 2 Ray Train workers (DeepSpeed ZeRO-2) on
this machine, and the parameter memory each worker holds under ZeRO stage 0 and stage 3 with
2 workers (stage 3 partitions the frozen UNet and text encoder: about half per worker).
On a CUDA machine it uses one GPU per worker.
"""

from __future__ import annotations

import argparse
import tempfile

from noiseclr.bank import DirectionBank
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.workflows.discover import run_discovery


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()
    base = dict(
        model=args.model,
        k=12,
        negatives=7,
        batch=args.batch,
        n_images=24,
        steps=args.steps,
        checkpoint_every=args.steps,
        name="bench",
        evaluate=False,
        gallery_seeds=1,
        gallery_steps=2,
        gallery_scales=[0.0],
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers, stage in ((1, 2), (2, 2), (2, 0), (2, 3)):
            out = f"{tmp}/w{workers}z{stage}"
            r = run_discovery(DiscoveryConfig.of(**base, zero_stage=stage, workers=workers), out)
            m = rows[(workers, stage)] = DirectionBank.load(r.bank).metrics
            print(
                f"workers={workers} zero={stage}: {m['pairs_per_s']:.1f} pairs/s, "
                f"{m['param_mib']:.2f} MiB of parameters per worker"
            )
    one, two = rows[(1, 2)]["pairs_per_s"], rows[(2, 2)]["pairs_per_s"]
    z0, z3 = rows[(2, 0)]["param_mib"], rows[(2, 3)]["param_mib"]
    print(f"pairs/s 2 workers / 1 worker: {two / one:.2f}x")
    print(f"per-worker parameter memory ZeRO-3 / ZeRO-0 (2 workers): {z3 / z0:.2f}")


if __name__ == "__main__":
    main()
