"""Benchmark: the platform's NoiseCLR step vs the official code's loop, and edit latency.

    python jobs/bench/benchmark_discovery.py                      # embedded model, CPU
    python jobs/bench/benchmark_discovery.py --full-size --device cuda --precision bf16
                                     # SD-1.5-shaped UNet + text encoder, random weights, 512 px

Training step, same images, timesteps and directions, in the same process:
- ours: `DiscoveryTrainer.train_step`, the code discovery runs (batched noise evaluation,
  --precision autocast, gradient checkpointing as the config's "auto" chooses it);
- official: the official trainer's shape of work: fp32, one text-encoder and UNet call per
  direction plus one for the empty prompt, gradient checkpointing on (its base config);
- on CUDA, also ours with checkpointing forced off, to show what "auto" avoided (may OOM).
Prints seconds per micro-step, pairs/s, peak GPU memory, the ratio, and the projected time of
the paper's 4000 micro-steps (1000 iterations x 4 accumulation). Then edit latency (one
denoising trajectory with M directions) batched vs one UNet call per direction.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from noiseclr.conditioning import direction_deltas_sequential, encode_directions
from noiseclr.discovery.loss import noiseclr_loss
from noiseclr.editing.sampler import Edit, sample
from noiseclr.models.base import DiffusionModel, fingerprint, load_model
from noiseclr.models.shapes.architecture import SD_SCHEDULE
from noiseclr.models.shapes.tokenizer import build_tokenizer
from noiseclr.utils.precision import resolve_dtype


def full_size_model(device: str, dtype: torch.dtype) -> DiffusionModel:
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
    return DiffusionModel(pipe=pipe, source="sd15-shaped-random", fingerprint=fingerprint(pipe))


def full_size_sdxl(device: str, dtype: torch.dtype) -> DiffusionModel:
    """SDXL base 1.0 shapes with random weights at 1024 px: its UNet config (2.6B: blocks 320 /
    640 / 1280, transformer depths 1 / 2 / 10, cross-attention 2048 = 768 + 1280, "text_time"
    added embeddings), CLIP ViT-L (768, 12 layers) and OpenCLIP ViT-bigG (1280, 32 layers,
    projection 1280) text encoders, SD's VAE config with SDXL's scaling factor."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from noiseclr.domains.shapes import vocabulary
    from noiseclr.models.standin import SDXL_SCHEDULER

    tokenizer = build_tokenizer(vocabulary(), max_length=77)

    def clip(width: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
            hidden_act=act, projection_dim=width, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    unet = UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(clip(768, 12, 12, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu")),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )
    pipe.to(device, dtype)
    return DiffusionModel(pipe=pipe, source="sdxl-shaped-random", fingerprint=fingerprint(pipe))


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


PAPER_MICRO_STEPS = 4000  # the official config: 1000 iterations x gradient_accumulation_steps 4


def peak_gib(device: str) -> str:
    return f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""


def main() -> None:
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.trainer import DiscoveryTrainer, initial_state

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--full-size", action="store_true", help="SD-1.5-shaped random model at 512 px")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="ours (autocast)")
    ap.add_argument("--batch", type=int, default=6, help="images per step (paper: 6)")
    ap.add_argument("--directions", type=int, default=21, help="anchor + negatives per step (paper: 1 + 20)")
    ap.add_argument("--edit-directions", type=int, default=4)
    ap.add_argument("--edit-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--gradient-checkpointing", choices=["auto", "true", "false"], default="auto", help="ours"
    )
    ap.add_argument("--skip-official", action="store_true")
    args = ap.parse_args()
    model = (
        full_size_model(args.device, torch.float32) if args.full_size else load_model(args.model, args.device)
    )
    pipe = model.pipe
    unet, text, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    text.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    latent = model.resolution // pipe.vae_scale_factor
    latents = torch.randn(args.batch, unet.config.in_channels, latent, latent, generator=g)
    checkpointing = {"auto": "auto", "true": True, "false": False}[args.gradient_checkpointing]
    cfg = DiscoveryConfig.of(
        k=args.directions,
        negatives=args.directions - 1,
        batch=args.batch,
        n_images=args.batch,
        precision=args.precision,
        gradient_checkpointing=checkpointing,
        loss="paper",
        warmup=0,
    )
    pairs = args.batch * args.directions
    print(
        f"model: {model.source} on {args.device}, {model.resolution} px, "
        f"batch {args.batch} images x {args.directions} directions = {pairs} pairs per micro-step"
    )
    results = {}

    if not args.skip_official:
        # The official trainer: fp32, gradient checkpointing (UNet and text encoder), a call per direction.
        unet.enable_gradient_checkpointing()
        unet.train()
        dirs = torch.nn.Parameter(initial_state(cfg, model).directions.to(args.device))
        opt = torch.optim.AdamW([dirs], lr=1e-3)
        x_t = latents.to(args.device)
        t = torch.full((args.batch,), 500, device=args.device)

        def official():
            opt.zero_grad(set_to_none=True)
            deltas = direction_deltas_sequential(unet, text, tok, dirs, x_t, t)
            noiseclr_loss(deltas.float(), 0.5).backward()
            opt.step()

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results["official"] = timed(official, args.repeats, args.device)
        print(
            f"train micro-step, official loop (fp32, checkpointing, {args.directions + 1} UNet calls): "
            f"{results['official']:.3f} s ({pairs / results['official']:.1f} pairs/s{peak_gib(args.device)})"
        )
        unet.disable_gradient_checkpointing()
        unet.eval()
        del dirs, opt
        if args.device == "cuda":
            torch.cuda.empty_cache()

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = DiscoveryTrainer(cfg, model, latents, initial_state(cfg, model))
    chose = "on" if unet.is_gradient_checkpointing else "off"
    results["ours"] = timed(trainer.train_step, args.repeats, args.device)
    print(
        f"train micro-step, ours ({args.precision}, batched, "
        f"checkpointing {chose} [{args.gradient_checkpointing}]): "
        f"{results['ours']:.3f} s ({pairs / results['ours']:.1f} pairs/s{peak_gib(args.device)})"
    )
    for name, sec in results.items():
        hours = sec * PAPER_MICRO_STEPS / 3600
        print(f"projected {PAPER_MICRO_STEPS} micro-steps (the paper's run), {name}: {hours:.2f} h")
    if "official" in results:
        print(f"train step speed-up (official / ours): {results['official'] / results['ours']:.2f}x")

    if args.device == "cuda" and args.gradient_checkpointing == "auto" and chose == "on":
        # What "auto" avoided: the same step without checkpointing.
        unet.disable_gradient_checkpointing()
        unet.eval()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            sec = timed(trainer.train_step, 1, args.device)
            print(f"ours without checkpointing: {sec:.3f} s{peak_gib(args.device)}")
        except torch.cuda.OutOfMemoryError:
            print(f"ours without checkpointing: out of memory{peak_gib(args.device)} (what auto avoided)")
        torch.cuda.empty_cache()

    dirs = trainer.directions
    dtype = resolve_dtype(args.precision)
    if dtype != torch.float32:  # edits run in the model's dtype
        pipe.to(args.device, dtype)
    # Edit latency: one trajectory, M directions, batched call vs one call per direction.
    edits = [Edit(dirs[i].detach(), 2.0) for i in range(min(args.edit_directions, len(dirs)))]
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
        f"edit ({len(edits)} directions, {args.edit_steps} steps): batched {eb:.3f} s, "
        f"per-direction {es:.3f} s, speed-up {es / eb:.2f}x"
    )


if __name__ == "__main__":
    main()
