"""Plain text-to-image sampling from a loaded base model (seeded, batched)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from noiseclr.models.base import DiffusionModel


def latent_shape(
    model: DiffusionModel, height: int | None = None, width: int | None = None
) -> tuple[int, int, int]:
    """(C, h, w) of x_T for an image of height x width pixels (default: the model's resolution)."""
    pipe, size = model.pipe, model.resolution
    return (
        pipe.unet.config.in_channels,
        (height or size) // pipe.vae_scale_factor,
        (width or size) // pipe.vae_scale_factor,
    )


def initial_latents(model: DiffusionModel, raw_seeds: list[int]) -> torch.Tensor:
    """x_T (N, C, h, w) on the CPU, one torch.Generator per raw seed: the same on every device."""
    shape = latent_shape(model)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in raw_seeds])


def image_seed(seed: int, index: int = 0) -> int:
    """Raw generator seed of image `index` of a run with `seed` (so images are batch-independent)."""
    return seed * 100_003 + index


# diffusers' own defaults: StableDiffusionPipeline's 7.5, StableDiffusionXLPipeline's 5.0
PIPELINE_GUIDANCE = {"sd": 7.5, "sdxl": 5.0}


def default_guidance(model: DiffusionModel) -> float:
    """The guidance scale with a prompt: world.json's (embedded models), else diffusers' own."""
    return float((model.world or {}).get("guidance_scale", PIPELINE_GUIDANCE[model.family]))


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompt: str,
    n: int = 8,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """n images for one prompt as (n, H, W, 3) float in [0, 1]; image i depends only on
    (seed, i), so the same seed gives the same images whatever the batch size."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.check_prompt(prompt)
    guidance = default_guidance(model) if guidance_scale is None else guidance_scale
    pipe = model.pipe
    out = []
    for start in tqdm(range(0, n, batch_size), desc="generate", disable=not progress):
        idx = range(start, min(n, start + batch_size))
        latents = initial_latents(model, [image_seed(seed, i) for i in idx]).to(pipe.device, pipe.unet.dtype)
        images = pipe(
            prompt=[prompt] * len(idx),
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents,
            output_type="np",
        ).images
        out.append(images)
    return np.concatenate(out)
