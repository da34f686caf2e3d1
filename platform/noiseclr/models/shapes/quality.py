"""Generation quality of a shapes-world model, measured by the oracle.

Prompts come from word combinations held out of the base model's training, so the score
measures composition, not memory. Targets are the bin centres the words name.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from noiseclr.domains import shapes
from noiseclr.domains.oracle import hue_distance, measure, nearest_word

POSITION_TOLERANCE_PX = 6.0  # at 64 px; scaled with resolution
HUE_TOLERANCE_DEG = 20.0
# The quality bar: share of images that must pass each check.
QUALITY_BAR = {"shape": 0.90, "hue": 0.85, "position": 0.85, "one_object": 0.95}


def score_images(images: np.ndarray, scenes: list[shapes.Scene]) -> dict[str, float]:
    """Share of images whose measured factors match what their captions asked for.

    images: (n, H, W, 3) uint8 or float in [0, 1].
    """
    res = images.shape[2]
    tol = POSITION_TOLERANCE_PX * res / 64
    checks: dict[str, list[bool]] = {
        k: [] for k in ("shape", "hue", "size", "x", "y", "position", "lightness", "pattern", "one_object")
    }
    for image, scene in zip(images, scenes, strict=True):
        m = measure(image)
        checks["one_object"].append(m.count == 1)
        checks["pattern"].append(m.pattern == scene.pattern)
        checks["lightness"].append(nearest_word("lightness", m.lightness) == scene.lightness_word)
        if m.count == 0:
            for k in ("shape", "hue", "size", "x", "y", "position"):
                checks[k].append(False)
            continue
        want_x, want_y = shapes.XS[scene.x_word] * res, shapes.YS[scene.y_word] * res
        checks["shape"].append(m.shape == scene.shape)
        checks["hue"].append(hue_distance(m.hue, shapes.HUES[scene.hue_word]) <= HUE_TOLERANCE_DEG)
        size_word = min(shapes.SIZES, key=lambda w: abs(shapes.SIZES[w] * res - m.size))
        checks["size"].append(size_word == scene.size_word)
        checks["x"].append(abs(m.x - want_x) <= tol)
        checks["y"].append(abs(m.y - want_y) <= tol)
        checks["position"].append(float(np.hypot(m.x - want_x, m.y - want_y)) <= tol)
    return {k: float(np.mean(v)) for k, v in checks.items()}


@torch.no_grad()
def evaluate_quality(
    pipe: StableDiffusionPipeline,
    n: int = 256,
    seed: int = 0,
    guidance_scale: float = 4.0,
    steps: int = 25,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Generate n images from held-out captions and score them with the oracle."""
    scenes = shapes.sample_scenes(n, seed, only=shapes.held_out_combinations(), jitter=False)
    images = []
    for start in tqdm(range(0, n, batch_size), desc="quality", disable=not progress):
        chunk = scenes[start : start + batch_size]
        generator = torch.Generator("cpu").manual_seed(seed + start)
        out = pipe(
            prompt=[shapes.caption(s.words) for s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="np",
        ).images
        images.append(out)
    return score_images(np.concatenate(images), scenes)


@torch.no_grad()
def vae_roundtrip_quality(pipe: StableDiffusionPipeline, n: int = 256, seed: int = 0) -> dict[str, float]:
    """Oracle scores of held-out renders after a VAE encode/decode: the ceiling generation can reach.

    A UNet that makes perfect latents still shows the decoder's losses (blurred corners turn
    small triangles into circles), so a figure near this one means the VAE limits quality.
    """
    vae = pipe.vae
    scenes = shapes.sample_scenes(n, seed, only=shapes.held_out_combinations(), jitter=False)
    res = vae.config.sample_size
    decoded = []
    for start in range(0, n, 64):
        x = shapes.render(scenes[start : start + 64], res, vae.device).to(vae.dtype) * 2 - 1
        decoded.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1).float())
    images = torch.cat(decoded).permute(0, 2, 3, 1).cpu().numpy()
    return score_images(images, scenes)


def meets_bar(scores: dict[str, float]) -> bool:
    return all(scores[k] >= v for k, v in QUALITY_BAR.items())
