"""From an edit request to where sampling starts: the one resolver behind `noiseclr edit`, the
endpoint and `NoiseCLRPipeline` (seed or real image -> x_T, steps, prompt, guidance).

- A generated image starts from `seed`: x_T drawn by a CPU generator seeded with
  `image_seed(seed)` (the image `noiseclr generate --seed` makes first), and that generator goes
  on to draw a stochastic scheduler's noise, as diffusers' pipelines use one generator for both.
- Its prompt, when the request names none, is the domain prompt of the bank being edited (the
  prompt its gallery was drawn with, `gallery.prompt` of the discovery job): an edit shows a
  direction on an image of the bank's own domain. An explicit empty prompt is unconditional.
- A real image is DDIM-inverted under the empty prompt and edited without a prompt.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from noiseclr.bank import DirectionBank
from noiseclr.editing.defaults import INVERSION_STEPS, SEED_STEPS
from noiseclr.models.base import DiffusionModel
from noiseclr.models.generate import default_guidance, image_seed, latent_shape


def domain_prompt(banks: Iterable[DirectionBank]) -> str | None:
    """The gallery prompt of the first bank that records one (None: unconditional)."""
    for bank in banks:
        prompt = (bank.config or {}).get("gallery_prompt")
        if prompt:
            return str(prompt)
    return None


def prompt_banks(edits: list, banks: dict[str, DirectionBank]) -> list[DirectionBank]:
    """The banks whose domain a request without a prompt is drawn from: those its edits use (in
    edit order; never another bank's domain), or with no edit every loaded bank."""
    if not edits:
        return list(banks.values())
    used = dict.fromkeys(e.label.split(":", 1)[0] for e in edits)
    return [banks[name] for name in used if name in banks]


def prompt_and_guidance(
    model: DiffusionModel, prompt: str | None, guidance: float | None, banks: Iterable[DirectionBank]
) -> tuple[str | None, float]:
    """(prompt or None, guidance scale): no prompt -> the banks' domain prompt, "" -> none; the
    guidance defaults to the model's (world.json's, else diffusers' 7.5 for SD, 5 for SDXL) with
    a prompt and 1 without."""
    if prompt is None:
        prompt = domain_prompt(banks)
    prompt = prompt or None
    if prompt is not None:
        model.check_prompt(prompt)
    if guidance is None:
        guidance = default_guidance(model) if prompt else 1.0
    return prompt, float(guidance)


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded as `noiseclr generate --seed` seeds its first image."""
    return [torch.Generator().manual_seed(image_seed(s)) for s in seeds]


def image_generators(seed: int | list[int] | None, total: int) -> list[torch.Generator]:
    """Generators for `total` images: image i of seed s as `noiseclr generate --seed s` draws its
    image i (so image 0 is `noiseclr edit --seed s`'s), or one listed seed per image."""
    if seed is None or isinstance(seed, numbers.Integral):
        return [torch.Generator().manual_seed(image_seed(int(seed or 0), i)) for i in range(total)]
    if len(seed) != total:
        raise ValueError(f"seed= lists {len(seed)} seeds for {total} images; give one per image")
    return seed_generators([int(s) for s in seed])


@dataclass
class Start:
    """Where one request's sampling starts."""

    steps: int
    prompt: str | None = None
    guidance: float = 1.0
    x_T: torch.Tensor | None = None  # (N, C, h, w) on the CPU; None until `invert` for a real image
    start_t: int | None = None  # the timestep an inverted x_T sits at
    pixels: torch.Tensor | None = None  # (N, 3, R, R) in [-1, 1]: a real image to invert
    before: np.ndarray | None = None  # the real image's unedited round trip (N, H, W, 3)
    error: float | None = None  # its mean absolute pixel error
    noise: list[torch.Tensor] = field(default_factory=list)  # generator states after x_T

    def generators(self) -> list[torch.Generator] | None:
        """Fresh generators at the state x_T left them in (a stochastic scheduler's noise; the
        same for the before and the after of one request)."""
        if not self.noise:
            return None
        out = []
        for state in self.noise:
            g = torch.Generator()
            g.set_state(state)
            out.append(g)
        return out


def from_seeds(
    model: DiffusionModel,
    seeds: list[int],
    banks: Iterable[DirectionBank] = (),
    prompt: str | None = None,
    guidance: float | None = None,
    steps: int | None = None,
) -> Start:
    """A generated image per seed (see the module's docstring)."""
    prompt, guidance = prompt_and_guidance(model, prompt, guidance, banks)
    gens = seed_generators(seeds)
    x_T = torch.stack([torch.randn(latent_shape(model), generator=g) for g in gens])
    return Start(steps or SEED_STEPS, prompt, guidance, x_T, noise=[g.get_state() for g in gens])


def from_pixels(pixels: torch.Tensor, steps: int | None = None) -> Start:
    """A real image ((N, 3, R, R) in [-1, 1]) to be inverted: `invert` fills x_T."""
    return Start(steps or INVERSION_STEPS, pixels=pixels)


def invert(
    model: DiffusionModel, starts: list[Start], progress: bool = False, reconstruct: bool = False
) -> None:
    """DDIM-invert the real images of `starts` (all of one step count) in one batch; with
    `reconstruct`, also decode each unedited round trip and its error."""
    from noiseclr.editing import sampler

    if len({s.steps for s in starts}) > 1:
        raise ValueError("invert real images of one step count per call")
    pixels = torch.cat([s.pixels for s in starts])
    if reconstruct:
        x_t, t, recon, _ = sampler.invert_real(model, pixels, starts[0].steps, progress=progress)
        target = ((pixels.float() + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    else:
        x_t, t = sampler.invert(model, sampler.encode(model, pixels), starts[0].steps, progress=progress)
    first = 0
    for s in starts:
        n = len(s.pixels)
        s.x_T, s.start_t = x_t[first : first + n].cpu(), t
        if reconstruct:
            s.before = recon[first : first + n]
            s.error = float(np.abs(s.before - target[first : first + n]).mean())
        first += n
