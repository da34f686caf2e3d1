"""One NoiseCLR micro-step, the same for the single process and every Ray Train worker.

A micro-step takes B images x0 (with their indices in the data set), draws one timestep t and
S = negatives + 1 directions (dirs[0] is the anchor) from the run's generator, noises every
image with noise keyed by (seed, micro-step, image index), evaluates the noise difference of
every (image, direction) pair in one batched UNet pass, and returns the configured loss.

Why keyed noise: a worker holds only its shard of the images, so the noise an image gets must
not depend on which worker holds it or where in a batch it sits. Every worker holds the same
generator (same seed, same draws), so t and the directions agree everywhere. With the same
images per step the single process and N workers compute the same loss and gradient.

The distributed worker adds only what distribution needs: the all-gather of deltas (`gather`)
and the DeepSpeed engine as `deltas_of`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from noiseclr.conditioning import as_encoders
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.initial import vocab_norm
from noiseclr.discovery.loss import delta_features, noiseclr_loss, strength_penalty, symmetric_noiseclr_loss
from noiseclr.errors import ConfigError
from noiseclr.utils.precision import resolve_dtype

log = logging.getLogger(__name__)

# deltas_of(x_t (B, C, h, w), t (B,), dirs (S,)) -> (B, S, C, h, w)
DeltasFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FixedNorm:
    """`direction_norm: vocab`: each encoder's part of a direction used at that encoder's mean
    token norm (SD: the whole direction; SDXL: each half of the pair at its own table's norm)."""

    widths: tuple[int, ...]
    norms: torch.Tensor  # (len(widths),)

    def __call__(self, directions: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize
        parts = directions.split(list(self.widths), dim=-1)
        return torch.cat([unit(p, dim=-1) * n.to(p) for p, n in zip(parts, self.norms, strict=True)], dim=-1)


def fixed_norm(cfg: DiscoveryConfig, text_encoder) -> FixedNorm | None:
    """The norms every direction is used at (`direction_norm: vocab`), or None (free)."""
    if cfg.method.direction_norm == "free":
        return None
    enc = as_encoders(text_encoder)
    return FixedNorm(enc.widths, torch.stack([vocab_norm(e) for e in enc.encoders]))


def shaped(directions: torch.Tensor, norm: FixedNorm | None) -> torch.Tensor:
    """The directions the model sees: as trained (norm None), or rescaled by `norm`."""
    return directions if norm is None else norm(directions)


def lr_factor(cfg: DiscoveryConfig, step: int) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then constant or cosine."""
    if step < cfg.optim.warmup:
        return (step + 1) / cfg.optim.warmup
    if cfg.optim.schedule == "cosine":
        progress = (step - cfg.optim.warmup) / max(1, cfg.optim.steps - cfg.optim.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def objective(cfg: DiscoveryConfig, deltas: torch.Tensor, dirs: torch.Tensor | None = None) -> torch.Tensor:
    """The configured NoiseCLR loss on (B, S, C, h, w) deltas of the sampled directions `dirs`
    (S,) (anchor: dirs[0]; needed only when `delta_energy` is one weight per direction)."""
    energy = cfg.method.delta_energy
    if isinstance(energy, list):
        if dirs is None:
            raise ValueError("delta_energy per direction needs the sampled directions")
        energy = torch.tensor(energy)[dirs.cpu()]
    feats = delta_features(deltas, cfg.method.delta_pool, cfg.method.delta_center, energy)
    if cfg.method.loss == "paper":
        loss = noiseclr_loss(feats, cfg.method.tau, anchor=0)
    else:
        loss = symmetric_noiseclr_loss(feats, cfg.method.tau)
    if cfg.method.strength_weight:
        loss = loss + cfg.method.strength_weight * strength_penalty(deltas, cfg.method.strength_target)
    return loss


def check_schedule(cfg: DiscoveryConfig, num_train_timesteps: int) -> None:
    """The timestep range must lie inside the model's noise schedule."""
    if cfg.method.t_max >= num_train_timesteps:
        raise ConfigError(
            f"method.t_max ({cfg.method.t_max}) is outside the model's noise schedule "
            f"(timesteps 0..{num_train_timesteps - 1}): lower method.t_max"
        )


def draw(cfg: DiscoveryConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The timestep (1,) and the directions (S,) of one micro-step, in this order."""
    t = torch.randint(cfg.method.t_min, cfg.method.t_max + 1, (1,), generator=gen)
    dirs = torch.randperm(cfg.method.k, generator=gen)[: cfg.method.directions_per_step]
    return t, dirs


def _key(seed: int, micro: int, salt: int) -> int:
    return ((seed * 1_000_003 + micro) * 1_000_033 + salt) % (2**63 - 1)


def select_images(cfg: DiscoveryConfig, micro: int, n_images: int) -> torch.Tensor:
    """The single process's choice of `batch` images for micro-step `micro` (keyed, so it does
    not consume the run generator; workers instead take their Ray Data shard in order)."""
    gen = torch.Generator().manual_seed(_key(cfg.optim.seed, micro, 2**40))
    return torch.randperm(n_images, generator=gen)[: cfg.method.batch]


def image_noise(seed: int, micro: int, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise for each image keyed by (seed, micro-step, image index): worker-independent."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(_key(seed, micro, int(i))))
            for i in index
        ]
    )


def micro_step_loss(
    cfg: DiscoveryConfig,
    deltas_of: DeltasFn,
    scheduler,
    x0: torch.Tensor,
    index: torch.Tensor,
    t: torch.Tensor,
    dirs: torch.Tensor,
    micro: int,
    device: torch.device,
    input_dtype: torch.dtype = torch.float32,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The NoiseCLR loss of one micro-step on images x0 (B, C, h, w) with data-set indices `index`.

    input_dtype: the dtype the UNet takes (bf16 when DeepSpeed converted it; else fp32 and
    autocast does the mixed precision). gather: joins the workers' deltas into the global batch.
    """
    noise = image_noise(cfg.optim.seed, micro, index, tuple(x0.shape[1:]))
    ts = t.expand(len(x0)).to(device)
    x_t = scheduler.add_noise(x0.float().to(device), noise.to(device), ts).to(input_dtype)
    dtype = resolve_dtype(cfg.optim.precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        deltas = deltas_of(x_t, ts, dirs.to(device))
    deltas = deltas.float()
    if gather is not None:
        deltas = gather(deltas)
    return objective(cfg, deltas, dirs)


def want_checkpointing(
    cfg: DiscoveryConfig,
    deltas_of: DeltasFn,
    latent_shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    input_dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether to turn on the UNet's gradient checkpointing: the config's true/false, or for
    "auto" whether the step would not fit the GPU's free memory.

    "auto" measures, it does not guess: a forward and backward of the real step on 2 images
    gives the activation bytes per image; times `batch` (this process's images per micro-step),
    with 10% headroom, against 90% of the free memory. On CPU, "auto" is off.
    """
    if cfg.run.gradient_checkpointing != "auto":
        return bool(cfg.run.gradient_checkpointing)
    if device.type != "cuda":
        return False
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn((2, *latent_shape), device=device, dtype=input_dtype, requires_grad=True)
    ts = torch.full((2,), (cfg.method.t_min + cfg.method.t_max) // 2, device=device)
    dirs = torch.arange(cfg.method.directions_per_step, device=device)
    dtype = resolve_dtype(cfg.optim.precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        deltas = deltas_of(x, ts, dirs)
    # Gradient to the input only: the same backward through the UNet, nothing accumulates
    # into the directions (or DeepSpeed's gradient buckets).
    (grad,) = torch.autograd.grad(objective(cfg, deltas.float(), dirs), x)
    del grad, deltas
    per_image = (torch.cuda.max_memory_allocated(device) - before) / 2
    free, _ = torch.cuda.mem_get_info(device)
    need = 1.1 * per_image * batch
    on = need > 0.9 * free
    log.info(
        "step needs ~%.1f GiB for %d images, %.1f GiB free: gradient checkpointing %s",
        need / 2**30,
        batch,
        free / 2**30,
        "on" if on else "off",
    )
    return on
