"""Benchmark: a CPU's cores as one torch call on all threads vs as threads of one torch thread each
(utils.parallel, what the measurements, the gallery and the single-process trainer use).

    python jobs/bench/benchmark_streams.py [--steps 10] [--skip-measure]

Prints, in one run on the embedded model:
- UNet inference images/s at the measurement's batch sizes, one call on torch's threads vs
  the same work as `streams` concurrent calls;
- seconds per training step of `jobs/shapes.yaml` (`DiscoveryTrainer.train_step`), the engine
  on one stream vs split over the cores, and how far the directions drift apart;
- the oracle measurement of the shipped bank at the main job's protocol (4 + 4 images),
  directions in turn vs concurrently, and whether scales and alignment agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from noiseclr.bank import DirectionBank
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.trainer import DiscoveryTrainer, initial_state
from noiseclr.evaluation import evaluate
from noiseclr.models.base import load_model
from noiseclr.utils import parallel

ROOT = Path(__file__).resolve().parents[2]


def unet_rate(model, batch: int, streams: int, calls: int) -> float:
    """Images/s of `calls` UNet calls of `batch` rows on each of `streams` threads."""
    unet = model.pipe.unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 16, 128, generator=g)
    t = torch.full((batch,), 500)

    def work(_: int) -> None:
        with torch.no_grad():
            for _ in range(calls):
                unet(x, t, ctx)

    work(0)
    started = time.perf_counter()
    parallel.map_ordered(work, range(streams), "cpu", progress=False, most=streams)
    return streams * calls * batch / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    ap.add_argument("--skip-measure", action="store_true", help="leave out the oracle measurement (~6 min)")
    args = ap.parse_args()
    model = load_model("shapes", device="cpu")
    n = parallel.streams("cpu", 8)
    print(f"torch threads {torch.get_num_threads()}, streams {n}")
    for batch in (8, 16, 24):
        one = unet_rate(model, batch, 1, 480 // batch)
        split = unet_rate(model, batch, n, 480 // batch // n)
        print(
            f"UNet, batch {batch}: one call {one:.0f} images/s, {n} streams {split:.0f} ({split / one:.2f}x)"
        )

    cfg = DiscoveryConfig.from_yaml(ROOT / "jobs/shapes.yaml")
    latents = torch.randn(cfg.data.n_images, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    per_step, final = {}, {}
    for streams in (1, n):
        tr = DiscoveryTrainer(cfg, model, latents, initial_state(cfg, model))
        tr.engine.streams = streams
        for _ in range(2):
            tr.train_step()
        started = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step()
        per_step[streams] = (time.perf_counter() - started) / args.steps
        final[streams] = tr.directions.detach().clone()
    drift = (final[1] - final[n]).abs().max().item()
    print(
        f"training step (jobs/shapes.yaml): one stream {per_step[1]:.3f} s, {n} streams {per_step[n]:.3f} s "
        f"({per_step[1] / per_step[n]:.2f}x); directions differ by {drift:.1e} after {args.steps + 2} steps"
    )
    if args.skip_measure:
        return
    bank = DirectionBank.load(ROOT / "platform/noiseclr/pretrained/banks/shapes")
    protocol = evaluate.Protocol(
        fixed=cfg.data.world_fixed, n_images=4, calibration_images=4, window=(600, 0)
    )
    results, seconds = {}, {}
    for streams in (1, n):
        harness = evaluate.Harness(model, protocol, progress=False, streams=streams)
        started = time.perf_counter()
        results[streams] = harness.evaluate(bank)
        seconds[streams] = time.perf_counter() - started
    same = results[1]["scales"] == results[n]["scales"] and results[1]["alignment"] == results[n]["alignment"]
    print(
        f"oracle measurement of the shipped bank (4 + 4 images): in turn {seconds[1]:.1f} s, "
        f"{n} streams {seconds[n]:.1f} s ({seconds[1] / seconds[n]:.2f}x); same scales and alignment: {same}"
    )


if __name__ == "__main__":
    main()
