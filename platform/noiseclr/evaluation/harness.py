"""What both measurements share: the images every direction is edited on, the edits, and the
calibration of each signed edit over a ladder of scales. The oracle's measurement
(`evaluate.Harness`, the shapes world) and the oracle-free one (`blind.BlindHarness`, any model)
are two scorers on it: each says what it reads of an image set (`view`) and, per probed scale,
whether an edit reached its target or broke the images (`judge`).

Image sets, named as both measurements record them: "generated" (seeds from the protocol's
seed, its prompt) and "real" (DDIM-inverted) are scored; "cal-generated" and "cal-real" (other
seeds and images) only choose the scales. Each set's trajectory above the edit window's top is
run once and shared by every edit of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from noiseclr.bank import DirectionBank
from noiseclr.editing.sampler import (
    decode,
    encode,
    invert,
    sample,
    scheduler_for,
    seed_latents,
    sweep_direction,
)
from noiseclr.models.base import DiffusionModel
from noiseclr.models.generate import default_guidance
from noiseclr.utils import parallel

LADDER = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # candidate |scale| of a signed edit
PULLBACK_LADDER = 2.5  # x_t directions move images less per unit: their ladder is longer
CALIBRATION_SEED_OFFSET = 10_000  # calibration images are drawn apart from the scored ones

Verdict = Literal["reached", "weak", "broken"]


class BaseProtocol(BaseModel):
    """The fields every measurement protocol has; every field is recorded with the result."""

    model_config = ConfigDict(extra="forbid")

    n_images: int = Field(8, ge=2)  # scored images per source (generated, real)
    calibration_images: int = Field(4, ge=1)  # per source, apart from the scored ones
    steps: int = Field(20, ge=2)  # DDIM steps of generated images
    inversion_steps: int = Field(25, ge=2)  # real images: inversion and editing steps
    ladder: tuple[float, ...] = LADDER
    seed: int = 2000
    n_boot: int = Field(200, ge=10)

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, ladder: tuple[float, ...]) -> tuple[float, ...]:
        if not ladder or any(not 0 < a < math.inf for a in ladder) or list(ladder) != sorted(ladder):
            raise ValueError(f"ladder must be increasing positive scales, got {ladder}")
        return ladder

    def generated_seeds(self) -> dict[str, list[int]]:
        """The seeds of the generated image sets: scored, then calibration."""
        cal = self.seed + CALIBRATION_SEED_OFFSET
        return {
            "generated": list(range(self.seed, self.seed + self.n_images)),
            "cal-generated": list(range(cal, cal + self.calibration_images)),
        }


@dataclass
class Source:
    """One image set to edit: x at the edit window's top, and the unedited rest of its run."""

    name: str
    x_top: torch.Tensor  # (N, C, h, w)
    images: np.ndarray  # (N, H, W, 3) the unedited images in [0, 1]
    prompt: str | None
    guidance: float
    steps: int
    top: int  # the window's top, or the inverted images' own start when that is lower
    before: Any = None  # what the scorer reads of `images` (its `view`)


def search_ladder(
    n: int, judge: Callable[[dict[int, int]], dict[int, Verdict]]
) -> tuple[dict[int, int], dict[tuple[int, int], Verdict]]:
    """Per sign (-1, +1), the smallest step of a ladder of n whose edit reaches the target
    without breaking images: a binary search (changes grow with the scale), both signs probed
    together. Where no step reaches it, the boundary the probes met between steps too weak and
    steps that break: the last weak one or the first breaking one (its verdict then says so).
    `judge({sign: step})` gives each probe's verdict. Returns ({sign: step}, every verdict seen
    by (sign, step))."""
    lo, hi = {-1: 0, 1: 0}, {-1: n - 1, 1: n - 1}
    seen: dict[tuple[int, int], Verdict] = {}
    while any(lo[s] < hi[s] for s in lo):
        probes = {s: (lo[s] + hi[s]) // 2 for s in lo if lo[s] < hi[s]}
        for sign, verdict in judge(probes).items():
            i = probes[sign]
            seen[sign, i] = verdict
            if verdict == "broken":
                hi[sign] = max(lo[sign], i - 1)
            elif verdict == "reached":
                hi[sign] = i
            else:
                lo[sign] = i + 1
    return lo, seen


class MeasuringHarness:
    """The image sets of a protocol, made once; edits of any bank's directions on them; the
    calibration of each signed edit. Subclasses score (`view`, a judge per calibration)."""

    def __init__(
        self,
        model: DiffusionModel,
        protocol: BaseProtocol,
        prompt: str | None,
        real: dict[str, torch.Tensor] | None = None,  # "real", "cal-real" -> (M, 3, H, W) in [-1, 1]
        generated: bool = True,
        progress: bool = True,
        streams: int = parallel.MAX_STREAMS,  # directions measured at once on a CPU (1: in turn)
    ):
        self.model, self.p, self.prompt = model, protocol, prompt
        self.progress, self.streams = progress, streams
        self.starts: dict[str, tuple[torch.Tensor, int | None]] = {}
        if generated:
            for name, seeds in protocol.generated_seeds().items():
                self.starts[name] = (seed_latents(model, seeds), None)
        if real:
            inverted = parallel.map_ordered(
                lambda pixels: invert(model, encode(model, pixels), protocol.inversion_steps),
                list(real.values()),
                model.device,
                progress=False,
                most=streams,
            )
            self.starts.update(zip(real, inverted, strict=True))
        self._by_top: dict[int, dict[str, Source]] = {}

    def view(self, images: np.ndarray) -> Any:
        """What the scorer reads of a set of unedited images (`Source.before`)."""
        raise NotImplementedError

    def sources(self, top: int) -> dict[str, Source]:
        """Every image set run down to `top` (cached per top: directions edit in their own
        windows). Made before threads share them."""
        if top not in self._by_top:
            found = parallel.map_ordered(
                lambda name: self._trajectory(name, top), list(self.starts), self.model.device,
                progress=False, most=self.streams,
            )  # fmt: skip
            self._by_top[top] = {src.name: src for src in found}
        return self._by_top[top]

    def scored(self, top: int) -> list[Source]:
        return [s for name, s in self.sources(top).items() if not name.startswith("cal-")]

    def calibration(self, top: int) -> list[Source]:
        return [s for name, s in self.sources(top).items() if name.startswith("cal-")]

    def _trajectory(self, name: str, top: int) -> Source:
        x, start = self.starts[name]
        generated = not name.endswith("real")
        prompt = self.prompt if generated else None
        guidance = default_guidance(self.model) if prompt else 1.0
        steps = self.p.steps if generated else self.p.inversion_steps
        kw = {"prompt": prompt, "guidance_scale": guidance, "steps": steps}
        here = top if start is None else min(top, start)  # inverted images start below 1000
        # DDIM throughout, whatever the model folder's scheduler: the trajectory stops at `here`
        # and every edit resumes it from there (a multistep solver's history would be lost).
        ddim = scheduler_for(self.model, ddim=True)
        x_top = sample(self.model, x, [], start_t=start, stop_t=here, scheduler=ddim, **kw)  # no bars
        images = decode(self.model, sample(self.model, x_top, [], start_t=here, **kw))
        return Source(name, x_top, images, prompt, guidance, steps, here, self.view(images))

    def edited(
        self,
        bank: DirectionBank,
        k: int,
        src: Source,
        scales: list[float],
        window: tuple[int, int],
        n: int | None = None,
    ) -> np.ndarray:
        """src's (first n) images edited by direction k at each raw scale: (N, S, H, W, 3)."""
        return sweep_direction(
            self.model, bank, k, src.x_top[:n], scales, src.prompt, src.guidance, src.steps, src.top, window
        )

    def ladder(self, bank: DirectionBank) -> list[float]:
        """The protocol's ladder of |scale| for `bank`'s kind of direction."""
        return [a * (PULLBACK_LADDER if not bank.token_directions else 1.0) for a in self.p.ladder]

    def calibrate_with(
        self, bank: DirectionBank, judge: Callable[[list[float]], list[Verdict]], settle: bool = False
    ) -> tuple[list[float], list[bool]]:
        """([-s, +s], [reached-, reached+]): `search_ladder` over `bank`'s ladder, `judge(scales)`
        giving the verdict of each raw scale on the calibration images. With `settle`, a step
        the search chose without probing it (the ladder's top) is probed, so its verdict is
        known; otherwise such a step counts as not reached."""
        ladder = self.ladder(bank)

        def by_sign(probes: dict[int, int]) -> dict[int, Verdict]:
            verdicts = judge([s * ladder[i] for s, i in probes.items()])
            return dict(zip(probes, verdicts, strict=True))

        lo, seen = search_ladder(len(ladder), by_sign)
        unprobed = {s: lo[s] for s in lo if (s, lo[s]) not in seen}
        if settle and unprobed:
            seen.update({(s, unprobed[s]): v for s, v in by_sign(unprobed).items()})
        reached = [seen.get((s, lo[s])) == "reached" for s in (-1, 1)]
        return [-ladder[lo[-1]], ladder[lo[1]]], reached
