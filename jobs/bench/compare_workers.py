"""When do N Ray Train workers give the single-process bank? Measured on the SD 1.5 stand-in.

    python jobs/bench/compare_workers.py                  # 4 images (= batch) and 8 images (> batch)
    python jobs/bench/compare_workers.py --images 8 --steps 20 --repeats 2

For each image count: one single-process run, then `--repeats` runs on 2 local Ray Train workers
(DeepSpeed ZeRO-2, CPU), all with the same job; prints the largest difference of any direction
entry between the single process and the workers, and between repeated worker runs.
docs/laptop-to-cluster.md ("When workers give the single-process bank") quotes its figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image


def main() -> None:
    import ray

    from noiseclr.bank import DirectionBank
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.domains import shapes
    from noiseclr.models.standin import write
    from noiseclr.workflows.discover import run_discovery

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="worker runs per image count")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="compare-workers-"))
    model = write(root / "sd15")
    data = root / "images"
    data.mkdir()
    scenes = shapes.sample_scenes(max(args.images), seed=1)
    for i, px in enumerate(shapes.to_uint8(shapes.render(scenes, 64))):
        Image.fromarray(px).save(data / f"{i:03d}.png")

    def directions(path: Path):
        return DirectionBank.load(path).directions

    for n in args.images:
        job = dict(
            model=str(model), data=str(data), n_images=n, k=4, negatives=2, batch=args.batch,
            steps=args.steps, checkpoint_every=args.steps, device="cpu", evaluate=False, gallery=False,
            name="w",
        )  # fmt: skip
        single = directions(run_discovery(DiscoveryConfig.of(**job), root / f"single-{n}").bank)
        runs = []
        for rep in range(args.repeats):
            started = time.perf_counter()
            bank = run_discovery(DiscoveryConfig.of(**job, workers=2), root / f"ray-{n}-{rep}").bank
            runs.append(directions(bank))
            print(f"{n} images: worker run {rep + 1} took {time.perf_counter() - started:.0f} s", flush=True)
            ray.shutdown()
        apart = (single - runs[0]).abs().max().item()
        again = max((r - runs[0]).abs().max().item() for r in runs)
        print(
            f"{n} images, batch {args.batch}, {args.steps} steps: single process vs 2 workers {apart:.2g}; "
            f"worker runs vs each other {again:.2g}"
        )


if __name__ == "__main__":
    main()
