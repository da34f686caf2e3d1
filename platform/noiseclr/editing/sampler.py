"""The editing sampler: the platform's denoising loop around the one guided denoiser
(`editing/denoiser.py`), with the model folder's scheduler (DDIM from inverted latents).

    eps~ = eps(x_t, empty) + g * (eps(x_t, c) - eps(x_t, empty))          # CFG on the prompt
           + sum_i lambda_i * [t in window_i] * (eps(x_t, d_i) - eps(x_t, empty))

Real images are first inverted to x_T with DDIM inversion under the empty prompt and then
edited with no prompt (the paper's real-image form: eps~ = eps(x_t, empty) + sum ...).

Every trajectory (an image at one set of scales) and every prompt it needs (empty, prompt,
active directions) go through the UNet in one batched call per denoising step; the
unconditional pass is shared by the prompt and all directions.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, SchedulerMixin
from tqdm.auto import tqdm

from noiseclr.bank import DirectionBank
from noiseclr.conditioning import encode_directions, encode_prompts, text_encoders, unet_pairs, unet_rows
from noiseclr.editing.denoiser import DirectionTerms
from noiseclr.errors import BankError, EditError
from noiseclr.models.base import DiffusionModel, scheduler_like
from noiseclr.models.generate import default_guidance, image_seed, initial_latents

log = logging.getLogger(__name__)

# Beyond these an edit usually gives noise, not an edit: warned (units of a measured bank's
# calibrated strength; raw scales: the top of the evaluation's calibration ladder).
MAX_UNITS, MAX_RAW_SCALE = 4.0, 32.0


@dataclass(frozen=True)
class Edit:
    """One direction applied with a scale, only while t_low <= t <= t_high."""

    vector: torch.Tensor  # (D,)
    scale: float
    t_high: int = 1000
    t_low: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise EditError(f"edit {self.label or ''} scale must be a finite number, got {self.scale}")
        if not 0 <= self.t_low <= self.t_high <= 1000:
            raise EditError(
                f"edit {self.label or ''} window must satisfy 0 <= t_low <= t_high <= 1000, "
                f"got t_low={self.t_low}, t_high={self.t_high}"
            )
        if self.vector.ndim != 1:
            raise ValueError(f"edit vector must be 1-D, got shape {tuple(self.vector.shape)}")


def parse_edit(text: str, banks: dict[str, DirectionBank]) -> Edit:
    """`[bank:]direction=scale[@t_high-t_low]`, e.g. `shapes:3=4`, `hue+=-2.5@800-200`.

    The bank may be left out when only one is loaded; a direction is an index, token or label.
    When the bank records measured edit defaults (`noiseclr evaluate` writes them), the scale
    is in units of the direction's calibrated strength (1 = the measured clean edit, -1 = its
    measured opposite) and the window defaults to the measured one.
    """
    if "=" not in text:
        raise EditError(f"edit {text!r}: expected [bank:]direction=scale[@t_high-t_low]")
    target, value = text.rsplit("=", 1)
    window = None
    if "@" in value:
        value, win = value.split("@", 1)
        try:
            hi, lo = (int(v) for v in win.split("-"))
        except ValueError:
            raise EditError(
                f"edit {text!r}: window must be @t_high-t_low with integers, got @{win}"
            ) from None
        window = (hi, lo)
    try:
        scale = float(value)
    except ValueError:
        raise EditError(f"edit {text!r}: scale {value!r} is not a number") from None
    prefix, sep, rest = target.partition(":")
    if sep and prefix in banks:
        bank_name, direction = prefix, rest
    elif len(banks) == 1:  # labels may hold ":" themselves ("-:hue->cyan, +:lightness-")
        bank_name, direction = next(iter(banks)), target
    elif sep:
        raise BankError(f"edit {text!r}: no bank named {prefix!r}; loaded: {sorted(banks)}")
    else:
        raise BankError(f"edit {text!r}: name the bank (bank:direction) when {len(banks)} banks are loaded")
    bank = banks[bank_name]
    if not math.isfinite(scale):
        raise EditError(f"edit {text!r}: scale must be a finite number")
    if not bank.token_directions:
        raise EditError(
            f"edit {text!r}: bank {bank_name!r} holds {bank.method} directions (x_t vectors applied "
            "once at the bank's t_edit), which `edit` does not apply; view them with `noiseclr gallery`"
        )
    i = bank.index(direction)
    measured = bank.measured
    limit = MAX_UNITS if measured else MAX_RAW_SCALE
    if abs(scale) > limit:
        unit = "x the measured clean edit" if measured else " (raw scale)"
        log.warning(
            "edit %r: scale %g%s is beyond %g, where images usually turn to noise", text, scale, unit, limit
        )
    scale = bank.raw_scales(i, [scale])[0]
    hi, lo = window or bank.window(i)
    return Edit(bank.directions[i], scale, hi, lo, label=f"{bank_name}:{bank.tokens[i]}")


def repeat_generators(generators: list[torch.Generator] | None, times: int) -> list[torch.Generator] | None:
    """Each generator `times` times over (copies at its state), for trajectories repeated as
    `repeat_interleave` repeats them."""
    if generators is None:
        return None
    out = []
    for g in generators:
        for _ in range(times):
            copy = torch.Generator(device=g.device)
            copy.set_state(g.get_state())
            out.append(copy)
    return out


def seed_latents(model: DiffusionModel, seeds: list[int]) -> torch.Tensor:
    """x_T for each seed: the first image `noiseclr generate --seed s` makes."""
    return initial_latents(model, [image_seed(s) for s in seeds])


def _encode_prompt(model: DiffusionModel, prompt: str) -> torch.Tensor:
    return encode_prompts(text_encoders(model.pipe), [prompt], model.device)


def scheduler_for(model: DiffusionModel, ddim: bool = False) -> SchedulerMixin:
    """A fresh scheduler for one sampling call (schedulers hold per-loop state): the pipeline's
    own class, which a user swaps as in diffusers, or DDIM on its noise schedule: for latents DDIM
    inversion made (their trajectory is DDIM's; another solver from there would not reconstruct
    the image) and for the measurements, whose trajectories stop and resume at a timestep."""
    config = model.pipe.scheduler.config
    if ddim:
        return scheduler_like(DDIMScheduler, config)
    return type(model.pipe.scheduler).from_config(config)


@torch.no_grad()
def sample(
    model: DiffusionModel,
    x_T: torch.Tensor,  # (N, C, h, w)
    edits: list[Edit],
    scales: torch.Tensor | None = None,  # (N, M): per-trajectory scale of each edit; default edit.scale
    prompt: str | list[str | None] | None = None,  # one for all, or one (or None) per trajectory
    guidance_scale: float | list[float] = 1.0,
    steps: int = 25,
    max_rows: int | None = None,
    progress: bool = False,
    latent_shift: torch.Tensor | None = None,
    shift_at: int = 0,
    start_t: int | None = None,
    stop_t: int | None = None,
    scheduler: SchedulerMixin | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Denoise x_T with CFG on `prompt` (if any) plus the edits. Returns x_0 latents (N, C, h, w).

    scheduler: a fresh one for this loop; default `scheduler_for` (the pipeline's class; DDIM
    from a start_t). generator: the noise of stochastic schedulers (Euler ancestral, DDIM
    with eta > 0), one per trajectory so that an image does not depend on its batch.

    start_t: the timestep x_T sits at when it is not pure noise (what :func:`invert` returns);
    sampling steps above it are skipped.
    stop_t: stop before the first step with t <= stop_t and return x there; passing the same
    value as start_t continues the trajectory (so edits windowed below it can share the top).

    latent_shift (N, C, h, w) is added to x_t once, at the first step with t <= shift_at (the
    pullback method's edit in x_t).

    Each trajectory goes through the UNet only under the rows it needs at a step (empty, its
    prompt, the edits it scales non-zero whose window holds t), all trajectories in one batch
    (`denoiser.DirectionTerms`): so unrelated requests (the edit server's batches) share the
    calls without extra rows.
    """
    pipe, device = model.pipe, model.device
    n, m = x_T.shape[0], len(edits)
    if scales is None:
        scales = torch.tensor([[e.scale for e in edits]] * n, dtype=torch.float32).reshape(n, m)
    if scales.shape != (n, m):
        raise ValueError(f"scales must be (trajectories, edits) = {(n, m)}, got {tuple(scales.shape)}")
    dtype = pipe.unet.dtype
    terms = DirectionTerms.encode(text_encoders(pipe), None, edits, scales.to(device), device)
    prompts = prompt if isinstance(prompt, list) else [prompt] * n
    guidance = guidance_scale if isinstance(guidance_scale, list) else [guidance_scale] * n
    if len(prompts) != n or len(guidance) != n:
        raise ValueError(f"give one prompt and guidance scale per trajectory ({n})")
    unique = list(dict.fromkeys(p for p in prompts if p is not None))
    for text in unique:
        model.check_prompt(text)
    texts = torch.cat([_encode_prompt(model, text) for text in unique]) if unique else terms.empty[:0]
    every = torch.arange(n, device=device)
    has_prompt = torch.tensor([p is not None for p in prompts], device=device)
    prompt_row = torch.tensor(
        [unique.index(p) for p in prompts if p is not None], device=device, dtype=torch.long
    )
    weight = torch.tensor(guidance, dtype=torch.float32, device=device)[has_prompt].view(-1, 1, 1, 1)
    # The caller's rows of every step: each trajectory under the empty prompt, then under its prompt.
    source = torch.cat([every, every[has_prompt]])
    context = torch.cat([terms.empty.expand(n, -1, -1), texts[prompt_row]])
    callers = len(source)

    sched = scheduler if scheduler is not None else scheduler_for(model, ddim=start_t is not None)
    sched.set_timesteps(steps, device=device)
    step_kwargs = {}
    if generator is not None and "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = generator
    x = x_T.to(device, dtype) * sched.init_noise_sigma
    timesteps = sched.timesteps if start_t is None else sched.timesteps[sched.timesteps <= start_t]
    if stop_t is not None:
        timesteps = timesteps[timesteps > stop_t]
    for t in tqdm(timesteps, desc="denoise", disable=not progress):
        if latent_shift is not None and t <= shift_at:
            x = x + latent_shift.to(device, dtype)
            latent_shift = None
        plan = terms.plan(t, every, every, callers)
        rows = source if plan is None else torch.cat([source, plan.source])
        ctx = context if plan is None else torch.cat([context, plan.context])
        x_in = sched.scale_model_input(x, t)
        eps = unet_pairs(pipe.unet, x_in[rows], t.expand(len(rows)), ctx.to(dtype), max_rows).float()
        eps_u = eps[:n]
        guided = eps_u.clone()
        guided[has_prompt] += weight * (eps[n:callers] - eps_u[has_prompt])
        guided = guided + terms.delta(plan, eps)
        x = sched.step(guided.to(dtype), t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def decode(model: DiffusionModel, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (N, H, W, 3) float images in [0, 1]."""
    vae = model.pixel_vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode(model: DiffusionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents (posterior mean)."""
    vae = model.pixel_vae
    return vae.encode(pixels.to(model.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def invert(
    model: DiffusionModel,
    latents: torch.Tensor,
    steps: int = 50,
    max_rows: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """DDIM inversion under the empty prompt (diffusers' DDIMInverseScheduler).

    Returns (x_t, t): pass t to :func:`sample` as `start_t`. t is the top sampling timestep,
    except on a zero-terminal-SNR schedule, where a step into SNR 0 would erase the image
    (x_T = noise alone), so inversion stops one step short.
    """
    pipe, device = model.pipe, model.device
    inverse = scheduler_like(DDIMInverseScheduler, pipe.scheduler.config)
    inverse.set_timesteps(steps, device=device)
    empty = encode_directions(text_encoders(pipe), None, torch.zeros(0, 1, device=device))
    x = latents.to(device, pipe.unet.dtype)
    timesteps = [t for t in inverse.timesteps if inverse.alphas_cumprod[t] > 0]
    # Step i goes from the previous sampling timestep (what the UNet sees) up to timesteps[i].
    below = [max(0, int(t) - inverse.config.num_train_timesteps // steps) for t in timesteps]
    for t, t_in in tqdm(list(zip(timesteps, below, strict=True)), desc="invert", disable=not progress):
        out = unet_rows(pipe.unet, x, torch.full((len(x),), t_in, device=device), empty.to(x.dtype), max_rows)
        x = inverse.step(out[:, 0], t, x).prev_sample
    return x, int(timesteps[-1])


def edit_generated(
    model: DiffusionModel,
    prompt: str,
    seeds: list[int],
    edits: list[Edit],
    guidance_scale: float | None = None,
    steps: int = 25,
) -> np.ndarray:
    """Generate from `prompt` at each seed with the edits applied; (N, H, W, 3)."""
    g = default_guidance(model) if guidance_scale is None else guidance_scale
    x0 = sample(model, seed_latents(model, seeds), edits, prompt=prompt, guidance_scale=g, steps=steps)
    return decode(model, x0)


def edit_real(
    model: DiffusionModel, pixels: torch.Tensor, edits: list[Edit], steps: int = 50
) -> tuple[np.ndarray, float]:
    """Invert real images ((N, 3, H, W) in [-1, 1]) and edit them with no prompt.

    Returns the edited images and the inversion's reconstruction error (mean absolute pixel
    error in [0, 1] units of the unedited round trip).
    """
    x_t, t, recon, error = invert_real(model, pixels, steps)
    edited = decode(model, sample(model, x_t, edits, steps=steps, start_t=t)) if edits else recon
    return edited, error


def invert_real(
    model: DiffusionModel, pixels: torch.Tensor, steps: int = 50, progress: bool = False
) -> tuple[torch.Tensor, int, np.ndarray, float]:
    """Invert real images ((N, 3, H, W) in [-1, 1]) and decode their unedited round trip.

    Returns (x_t, t, reconstruction (N, H, W, 3) in [0, 1], its mean absolute pixel error).
    The reconstruction is the "before" of any edit from x_t without a prompt: reuse it.
    """
    x_t, t = invert(model, encode(model, pixels), steps, progress=progress)
    recon = decode(model, sample(model, x_t, [], steps=steps, start_t=t, progress=progress))
    target = ((pixels.float() + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return x_t, t, recon, float(np.abs(recon - target).mean())


def scale_sweep(
    model: DiffusionModel,
    x_T: torch.Tensor,  # (N, C, h, w)
    edit: Edit,
    scales: list[float],
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    steps: int = 25,
    start_t: int | None = None,
    progress: bool = False,
    generator: list[torch.Generator] | None = None,
) -> np.ndarray:
    """Interpolation: one direction at several scales, all in one batch. (N, S, H, W, 3).
    generator: one per image (its S columns draw the same noise)."""
    n, s = x_T.shape[0], len(scales)
    x = x_T.repeat_interleave(s, dim=0)
    sc = torch.tensor(scales, dtype=torch.float32).repeat(n)[:, None]
    x0 = sample(
        model,
        x,
        [edit],
        sc,
        prompt=prompt,
        guidance_scale=guidance_scale,
        steps=steps,
        start_t=start_t,
        progress=progress,
        generator=repeat_generators(generator, s),
    )
    out = decode(model, x0)
    return out.reshape(n, s, *out.shape[1:])


def sweep_direction(
    model: DiffusionModel,
    bank: DirectionBank,
    k: int,
    x_T: torch.Tensor,
    scales: list[float],
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    steps: int = 25,
    start_t: int | None = None,
    window: tuple[int, int] = (1000, 0),
    generator: list[torch.Generator] | None = None,
) -> np.ndarray:
    """Direction k of any bank (NoiseCLR or pullback) at several raw scales: (N, S, H, W, 3).

    window (t_high, t_low) limits a NoiseCLR direction's action; pullback edits x_t once, at
    the bank's own t_edit. generator: one per image (a stochastic scheduler's noise)."""
    if bank.shift_at is None:
        edit = Edit(bank.directions[k], 1.0, window[0], window[1], label=bank.tokens[k])
        return scale_sweep(
            model, x_T, edit, scales, prompt, guidance_scale, steps, start_t, generator=generator
        )
    n, s = x_T.shape[0], len(scales)
    v = bank.directions[k].view(1, *x_T.shape[1:])
    shift = torch.tensor(scales, dtype=torch.float32).repeat(n).view(-1, 1, 1, 1) * v
    x0 = sample(
        model,
        x_T.repeat_interleave(s, dim=0),
        [],
        prompt=prompt,
        guidance_scale=guidance_scale,
        steps=steps,
        latent_shift=shift,
        shift_at=bank.shift_at,
        start_t=start_t,
        generator=repeat_generators(generator, s),
    )
    out = decode(model, x0)
    return out.reshape(n, s, *out.shape[1:])
