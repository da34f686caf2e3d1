"""The device check: one table of what a GPU buys, for `jobs/bench/gpu_check.sh`.

    python jobs/bench/benchmark_gpu.py  # CUDA: SD-1.5-shaped UNet + CLIP-L, random weights, 512 px
    python jobs/bench/benchmark_gpu.py --small  # the embedded model on this machine: checks the script
    python jobs/bench/benchmark_gpu.py --family sdxl --batch 1   # SDXL-shaped, random weights, 1024 px:
                      # one image x 21 directions, a worker's share of jobs/sdxl-*.yaml's step
    python jobs/bench/benchmark_gpu.py --family sdxl --small     # the SDXL stand-in: checks the script

Rows (the paper's micro-step: 6 images x 21 directions = 126 pairs, bf16 autocast):
- the single process (`DiscoveryTrainer.train_step`), checkpointing as `auto` chooses it;
  then what can make it faster: channels-last UNet memory, and `torch.compile` of the UNet
  (its compile time printed apart); each with the projected time of the paper's 4000
  micro-steps (1000 iterations x accumulation 4; the goal: under 1 hour);
- Ray Train + DeepSpeed, one worker, NCCL on CUDA (gloo on a CPU), ZeRO-2 and ZeRO-3, bf16:
  `noiseclr discover` on the same model saved to a folder, pairs/s over its last steps;
- edit latency p50 through the endpoint's engine (`EditEngine.run`): one request, and a batch
  of 8 requests in one call, one direction each, 20 steps.

Every row is measured in this one process run; a row that fails prints why and the rest go on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_discovery import PAPER_MICRO_STEPS, full_size_model, full_size_sdxl, timed

from noiseclr.bank import DirectionBank
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.trainer import DiscoveryTrainer, initial_state
from noiseclr.models.base import DiffusionModel, load_model

ROWS: list[tuple[str, str, str, str, str]] = []  # what, s/micro-step, pairs/s, peak GiB, 4000 steps (h)


def peak(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device == "cuda" else "-"


def reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def row(what: str, seconds: float | None, pairs: int, device: str, note: str = "") -> None:
    if seconds is None:
        ROWS.append((what, note or "failed", "-", "-", "-"))
    else:
        hours = seconds * PAPER_MICRO_STEPS / 3600
        ROWS.append((what + note, f"{seconds:.3f}", f"{pairs / seconds:.1f}", peak(device), f"{hours:.2f}"))
    print(" | ".join(ROWS[-1]), flush=True)


def guarded(what: str, fn, pairs: int, device: str) -> None:
    """One row; a failure (out of memory, a compile error) becomes the row's text."""
    reset(device)
    try:
        fn()
    except Exception as err:
        traceback.print_exc()
        row(what, None, pairs, device, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")


def single_process(model: DiffusionModel, cfg: DiscoveryConfig, args, pairs: int) -> DiscoveryTrainer:
    g = torch.Generator().manual_seed(0)
    latent = model.resolution // model.pipe.vae_scale_factor
    latents = torch.randn(cfg.method.batch, model.pipe.unet.config.in_channels, latent, latent, generator=g)
    trainer = DiscoveryTrainer(cfg, model, latents, initial_state(cfg, model))
    unet = model.pipe.unet
    chose = "on" if unet.is_gradient_checkpointing else "off"

    def base() -> None:
        row(
            f"single process, bf16, checkpointing {chose} (auto)",
            timed(trainer.train_step, args.repeats, args.device),
            pairs,
            args.device,
        )

    guarded("single process", base, pairs, args.device)

    def channels_last() -> None:
        unet.to(memory_format=torch.channels_last)
        try:
            sec = timed(trainer.train_step, args.repeats, args.device)
        finally:
            unet.to(memory_format=torch.contiguous_format)
        row(f"  + channels-last UNet (checkpointing {chose})", sec, pairs, args.device)

    guarded("  + channels-last", channels_last, pairs, args.device)

    if args.compile:

        def compiled() -> None:
            original = model.pipe.unet
            model.pipe.unet = torch.compile(original)
            try:
                t0 = time.perf_counter()
                trainer.train_step()  # compiles
                first = time.perf_counter() - t0
                sec = timed(trainer.train_step, args.repeats, args.device)
            finally:
                model.pipe.unet = original
            row(f"  + torch.compile(unet) (first step {first:.0f} s)", sec, pairs, args.device)

        guarded("  + torch.compile", compiled, pairs, args.device)
    return trainer


def ray_deepspeed(folder: Path, args, pairs: int, out: Path) -> None:
    from noiseclr.workflows.discover import run_discovery

    for stage in (2, 3):

        def one(stage: int = stage) -> None:
            cfg = DiscoveryConfig.of(
                model=str(folder),
                workers=1,
                zero_stage=stage,
                precision="bf16",
                device=args.device,
                k=args.directions,
                negatives=args.directions - 1,
                batch=args.batch,
                n_images=args.batch * 2,
                steps=args.ray_steps,
                checkpoint_every=args.ray_steps,
                loss="paper",
                warmup=0,
                name="gpucheck",
                evaluate=False,
                gallery=False,
            )
            result = run_discovery(cfg, out / f"zero{stage}", fresh=True)
            m = DirectionBank.load(result.bank).metrics
            sec = pairs / m["pairs_per_s"]
            row(
                f"Ray Train + DeepSpeed ZeRO-{stage}, 1 worker, bf16 ({result.seconds:.0f} s job)",
                sec,
                pairs,
                "-",
            )

        guarded(f"Ray Train + DeepSpeed ZeRO-{stage}", one, pairs, args.device)


def edit_latency(model: DiffusionModel, trainer: DiscoveryTrainer, args, folder: Path) -> list[str]:
    from noiseclr.serving.config import ServeConfig
    from noiseclr.serving.engine import EditEngine
    from noiseclr.serving.schema import EditItem, EditRequest

    dirs = trainer.directions.detach().float().cpu()[:8]
    bank = DirectionBank(dirs, model.bank_record(), name="gpucheck", edit_defaults={"window": [600, 0]})
    bank.save(folder / "bank")
    cfg = ServeConfig(
        model=str(folder), device=args.device, precision="bf16", banks={"b": str(folder / "bank")}
    )
    engine = EditEngine(cfg, model=model)
    lines = []
    for n in (1, 8):
        reqs = [
            EditRequest(seed=i, edits=[EditItem(bank="b", direction=i % len(dirs), scale=2.0)], steps=20)
            for i in range(n)
        ]

        def call(reqs=reqs) -> None:
            outs = engine.run([engine.prepare(r) for r in reqs])
            bad = [o for o in outs if isinstance(o, Exception)]
            if bad:
                raise bad[0]

        call()
        times = []
        for _ in range(args.edit_repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        p50 = statistics.median(times)
        lines.append(
            f"edit, {n} request(s) in one call, 20 steps: p50 {p50:.3f} s ({p50 / n:.3f} s per image)"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--small", action="store_true", help="the embedded model (a check of the script on any machine)"
    )
    ap.add_argument("--family", choices=["sd", "sdxl"], default="sd", help="SD 1.5 (512 px), SDXL (1024)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--directions", type=int, default=21, help="anchor + negatives per micro-step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray-steps", type=int, default=12)
    ap.add_argument("--edit-repeats", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-ray", dest="ray", action="store_false")
    ap.add_argument(
        "--out", default=None, help="folder for the saved model and the jobs (default: a temporary one)"
    )
    args = ap.parse_args()
    started = time.perf_counter()
    pairs = args.batch * args.directions
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        out = Path(tmp)
        sdxl = args.family == "sdxl"
        if args.small and sdxl:
            from noiseclr.models.standin import write_sdxl

            folder = write_sdxl(out / "model")
            model = load_model(str(folder), args.device)
        elif args.small:
            model, folder = load_model("shapes", args.device), None
        else:
            model = (full_size_sdxl if sdxl else full_size_model)(args.device, torch.float32)
            folder = out / "model"
            model.pipe.save_pretrained(folder, safe_serialization=True)  # the workers load it by path
            model = load_model(str(folder), args.device)  # the same weights, under the name the jobs use
        name = {
            (True, False): "the embedded model",
            (True, True): "the SDXL stand-in",
            (False, False): "an SD-1.5-shaped UNet + CLIP-L text encoder, random weights",
            (False, True): "an SDXL-shaped UNet + CLIP-L and bigG text encoders, random weights",
        }[(args.small, sdxl)]
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(
            f"{name}, {model.resolution} px, on {gpu}; "
            f"{args.batch} images x {args.directions} directions = {pairs} pairs per micro-step",
            flush=True,
        )
        model.pipe.unet.requires_grad_(False)
        for encoder in (model.pipe.text_encoder, getattr(model.pipe, "text_encoder_2", None)):
            if encoder is not None:
                encoder.requires_grad_(False)
        cfg = DiscoveryConfig.of(
            k=args.directions,
            negatives=args.directions - 1,
            batch=args.batch,
            n_images=args.batch,
            precision="bf16",
            loss="paper",
            warmup=0,
            device=args.device,
        )
        trainer = single_process(model, cfg, args, pairs)
        if args.ray:
            ray_deepspeed(folder or Path("shapes"), args, pairs, out)
        edits = []
        try:
            if folder is None:
                folder = out / "small"
            edits = edit_latency(model, trainer, args, folder)
        except Exception as err:
            traceback.print_exc()
            edits = [f"edit latency failed: {type(err).__name__}: {err}"]
    print()
    print(f"| what | s / micro-step | pairs/s | peak GPU GiB | {PAPER_MICRO_STEPS} micro-steps (h) |")
    print("|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    for line in edits:
        print(f"- {line}")
    print(f"- the whole check: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
