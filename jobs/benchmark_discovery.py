"""Benchmark: batched noise evaluation vs the official code's one-UNet-call-per-direction loop.

    python jobs/benchmark_discovery.py                      # embedded model, CPU
    python jobs/benchmark_discovery.py --full-size --device cuda --precision bf16
                                     # SD-1.5-shaped UNet + text encoder, random weights, 512 px

Prints, for the same config in the same process: seconds per training step (forward, backward
and AdamW on the directions) of both paths and their ratio; edit latency (one denoising
trajectory with M directions) batched vs one UNet call per direction; peak GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from noiseclr.discovery.bank import encode_directions
from noiseclr.discovery.loss import noiseclr_loss
from noiseclr.discovery.noise import direction_deltas, direction_deltas_sequential
from noiseclr.editing.sampler import Edit, sample
from noiseclr.models.architecture import SD_SCHEDULE
from noiseclr.models.loader import BaseModel, fingerprint, load_model
from noiseclr.models.tokenizer import build_tokenizer


def full_size_model(device: str, dtype: torch.dtype) -> BaseModel:
    """SD-1.5 shapes with random weights: UNet 860M (diffusers' defaults are SD-1.5's), CLIP-L text."""
    from noiseclr.domains.shapes import vocabulary

    tokenizer = build_tokenizer(vocabulary(), max_length=77)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device, dtype)
    return BaseModel(pipe=pipe, source="sd15-shaped-random", fingerprint=fingerprint(pipe))


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--full-size", action="store_true", help="SD-1.5-shaped random model at 512 px")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--batch", type=int, default=6, help="images per step (paper: 6)")
    ap.add_argument("--directions", type=int, default=21, help="anchor + negatives per step (paper: 1 + 20)")
    ap.add_argument("--edit-directions", type=int, default=4)
    ap.add_argument("--edit-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = (
        full_size_model(args.device, dtype) if args.full_size else load_model(args.model, args.device, dtype)
    )
    pipe = model.pipe
    unet, text, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    text.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    g = torch.Generator().manual_seed(0)
    hidden = text.get_input_embeddings().weight.shape[1]
    dirs = torch.nn.Parameter(torch.randn(args.directions, hidden, generator=g).to(args.device))
    opt = torch.optim.AdamW([dirs], lr=1e-3)
    latent = model.resolution // pipe.vae_scale_factor
    x_t = torch.randn(args.batch, unet.config.in_channels, latent, latent, generator=g).to(args.device, dtype)
    t = torch.full((args.batch,), 500, device=args.device)

    def train_step(fn):
        def run():
            opt.zero_grad(set_to_none=True)
            deltas = fn(unet, text, tok, dirs, x_t, t)
            noiseclr_loss(deltas.float(), 0.5).backward()
            opt.step()

        return run

    print(
        f"model: {model.source} on {args.device} ({args.precision}), {model.resolution} px, "
        f"batch {args.batch} images x {args.directions} directions = {args.batch * args.directions} pairs"
    )
    results = {}
    for name, fn in (("batched", direction_deltas), ("sequential", direction_deltas_sequential)):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results[name] = timed(train_step(fn), args.repeats, args.device)
        mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if args.device == "cuda" else ""
        pairs = args.batch * args.directions / results[name]
        print(f"train step {name:>10}: {results[name]:.3f} s  ({pairs:.1f} pairs/s{mem})")
    print(f"train step speed-up (sequential / batched): {results['sequential'] / results['batched']:.2f}x")

    # Edit latency: one trajectory, M directions, batched call vs one call per direction.
    edits = [Edit(dirs[i].detach(), 2.0) for i in range(args.edit_directions)]
    x_T = torch.randn(1, unet.config.in_channels, latent, latent, generator=g)

    def edit_batched():
        with torch.no_grad():
            sample(model, x_T, edits, steps=args.edit_steps)

    def edit_per_direction():
        # The same sum, with the UNet called once for the empty prompt and once per direction.
        with torch.no_grad():
            sched = DDIMScheduler.from_config(pipe.scheduler.config)
            sched.set_timesteps(args.edit_steps, device=args.device)
            vecs = torch.stack([e.vector for e in edits])
            ctx = encode_directions(text, tok, vecs).to(dtype)
            x = x_T.to(args.device, dtype)
            for step_t in sched.timesteps:
                eps_u = unet(x, step_t, ctx[-1:]).sample
                guided = eps_u.clone()
                for i, e in enumerate(edits):
                    guided += e.scale * (unet(x, step_t, ctx[i : i + 1]).sample - eps_u)
                x = sched.step(guided, step_t, x).prev_sample

    eb = timed(edit_batched, args.repeats, args.device)
    es = timed(edit_per_direction, args.repeats, args.device)
    print(
        f"edit ({args.edit_directions} directions, {args.edit_steps} steps): batched {eb:.3f} s, "
        f"per-direction {es:.3f} s, speed-up {es / eb:.2f}x"
    )


if __name__ == "__main__":
    main()
