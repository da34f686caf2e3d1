"""The typed parts of `bank.json`: the measured edit defaults and the oracle-free scores.

Both are written by the measurements (`evaluation/evaluate.py` with the shapes world's oracle,
`evaluation/blind.py` on any domain) and read through `DirectionBank`'s accessors. Unknown keys
are kept (a bank written by a newer version round-trips); fields added over time are optional,
so every bank written since the format began still loads (tests/test_bank.py holds copies).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

Calibration = Literal["oracle", "blind"]


class Record(BaseModel):
    """A part of bank.json: validated on load, written back with the same keys."""

    model_config = ConfigDict(extra="allow")
    KEEP_NONE: ClassVar[tuple[str, ...]] = ()  # declared fields written as null (others left out)

    def dump(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        skip = set(type(self).model_fields) - set(self.KEEP_NONE)
        return {k: v for k, v in out.items() if v is not None or k not in skip}


def _window(value: tuple[int, int]) -> tuple[int, int]:
    hi, lo = value
    if not 0 <= lo < hi <= 1000:
        raise ValueError(f"window {list(value)}: need 0 <= t_low < t_high <= 1000")
    return value


class EditDefaults(Record):
    """What `noiseclr edit` applies when the user gives only a direction and a scale.

    `scales[k] = [-s, +s]`: the raw scales of direction k that make the target change (a scale
    of 1 in measured units means +s, -1 means -s). `windows[k]`, where the measurement chose one
    per direction, overrides the bank's `window`. `calibration` says who set the scales."""

    window: tuple[int, int] | None = None
    windows: list[tuple[int, int]] | None = None
    scales: list[tuple[float, float]] | None = None
    calibration: Calibration | None = None
    target_effect: float | None = None  # the oracle's target (calibration "oracle")
    target_change: float | None = None  # the pixel change aimed at (calibration "blind")

    @field_validator("window")
    @classmethod
    def _one_window(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if v is None else _window(v)

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        return None if v is None else [_window(w) for w in v]

    @field_validator("scales")
    @classmethod
    def _finite(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is not None and not all(math.isfinite(x) for pair in v for x in pair):
            raise ValueError("scales must be finite")
        return v

    @model_validator(mode="after")
    def _who_calibrated(self) -> EditDefaults:
        # Banks calibrated by the oracle before `calibration` was recorded carry only its target.
        if self.calibration is None and self.scales and self.target_effect is not None:
            self.calibration = "oracle"
        return self


class SignFigures(Record):
    """One sign of one direction: the calibrated scale and what the edit did at it."""

    scale: float
    change: float
    consistency: float
    live: bool
    score: float
    reached: bool | None = None
    strength: float | None = None
    distinctness: float | None = None
    null_similarity: float | None = None
    area: float | None = None
    drift: float | None = None
    broken: bool | None = None


class DirectionScore(Record):
    """One direction's oracle-free figures; `duplicate_of` names the direction it repeats."""

    index: int
    score: float
    interval: tuple[float, float]
    rank: int
    dead: bool
    duplicate_of: int | None = None
    signs: dict[Literal["-", "+"], SignFigures]
    KEEP_NONE: ClassVar[tuple[str, ...]] = ("duplicate_of",)


class BankFigure(Record):
    """One bank-level figure of the oracle-free measurement, with its bootstrap interval."""

    value: float
    interval: tuple[float, float]


class Scores(Record):
    """The oracle-free measurement of a whole bank (evaluation/blind.py), with the protocol and
    the images it was measured on."""

    score: float
    interval: tuple[float, float]
    live: int
    dead: int
    distinct_live: int | None = None
    order: list[int]
    groups: list[list[int]]
    directions: list[DirectionScore]
    protocol: dict[str, Any] = {}
    # bank-level candidates (evaluation.blind.AGGREGATES); the sweeps' objective is one of them
    aggregates: dict[str, BankFigure] | None = None

    def dump(self) -> dict[str, Any]:
        out = super().dump()
        out["directions"] = [
            d.dump() | {"signs": {s: f.dump() for s, f in d.signs.items()}} for d in self.directions
        ]
        return out
