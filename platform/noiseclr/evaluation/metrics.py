"""What an edit changed, factor by factor, and the bank-level scores built on it. Pure numpy.

For every direction the evaluator measures the world's factors (oracle) on images before and
after an edit at a negative and a positive scale. From those pairs:

- effect matrix E[k, f]: mean |change| of factor f under direction k, in natural units
  (degrees, px, value) and normalised by one bin width of that factor (so 1.0 = one word's
  worth: 60 degrees of hue, a third of the canvas in x or y, ...);
- purity[k] = max_f E[k, f] / sum_f E[k, f] (share of the effect carried by the dominant factor);
- consistency[k]: share of images whose dominant factor moves the way most images move (sign
  for continuous factors, target class for shape);
- coverage: factors with at least one direction of purity >= 0.7, consistency >= 0.8 and a
  dominant effect of at least MIN_EFFECT bins (a direction that does nothing is not "pure");
- preservation[k]: mean normalised drift of the factors other than the dominant one;
- alignment score (the scalar the sweeps maximise): mean over factors of the best
  purity * consistency among directions whose dominant factor it is and whose effect clears
  MIN_EFFECT; 0 for a factor no direction controls. In [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from noiseclr.domains.oracle import Measurement

FACTORS = ("shape", "hue", "size", "x", "y", "lightness", "pattern")
# One bin of each factor at 64 px, in natural units (see domains/shapes.py).
UNITS = {
    "shape": "changed",
    "hue": "deg",
    "size": "px",
    "x": "px",
    "y": "px",
    "lightness": "value",
    "pattern": "stripe contrast",
}
BIN_WIDTH_64 = {
    "shape": 1.0,
    "hue": 60.0,
    "size": 3.0,
    "x": 16.0,
    "y": 16.0,
    "lightness": 0.3,
    "pattern": 0.1,
}
PIXEL_FACTORS = ("size", "x", "y")
PURITY_MIN, CONSISTENCY_MIN, MIN_EFFECT = 0.7, 0.8, 0.25


def signed_change(before: Measurement, after: Measurement, factor: str) -> float:
    """after - before for one factor (nan where the object is lost or duplicated)."""
    if factor == "lightness":
        return after.lightness - before.lightness
    if factor == "pattern":
        return after.stripes - before.stripes
    if before.count != 1 or after.count != 1:
        return float("nan")
    if factor == "shape":
        return float(after.shape != before.shape)
    if factor == "hue":
        d = (after.hue - before.hue) % 360.0
        return d - 360.0 if d > 180.0 else d
    return float(getattr(after, factor) - getattr(before, factor))


@dataclass
class DirectionEffects:
    """Changes of one direction: changes[f] is (n_scales, n_images) signed natural units."""

    changes: dict[str, np.ndarray]
    shape_targets: np.ndarray  # (n_scales, n_images) class after the edit, "" where lost
    broken: float  # share of edits after which the object is lost or duplicated


def direction_effects(
    before: list[Measurement], after: list[list[Measurement]], resolution: int
) -> DirectionEffects:
    """before: n images; after: per scale, the same n images edited."""
    changes = {
        f: np.array([[signed_change(b, a, f) for b, a in zip(before, row, strict=True)] for row in after])
        for f in FACTORS
    }
    for f in PIXEL_FACTORS:
        changes[f] = changes[f] * 64.0 / resolution  # report pixels at 64 px
    targets = np.array([[a.shape or "" if a.count == 1 else "" for a in row] for row in after])
    broken = float(
        np.mean([[b.count == 1 and a.count != 1 for b, a in zip(before, row, strict=True)] for row in after])
    )
    return DirectionEffects(changes, targets, broken)


@dataclass
class BankScores:
    effect: np.ndarray  # (K, F) natural units
    normalised: np.ndarray  # (K, F)
    purity: np.ndarray  # (K,)
    consistency: np.ndarray  # (K,)
    dominant: list[str]  # (K,)
    preservation: np.ndarray  # (K,)
    broken: np.ndarray  # (K,)
    labels: list[str]  # (K,) automatic labels like "hue+"
    coverage: list[str] = field(default_factory=list)
    alignment: float = 0.0

    def as_dict(self) -> dict:
        return {
            "factors": list(FACTORS),
            "units": UNITS,
            "effect": self.effect.round(4).tolist(),
            "normalised": self.normalised.round(4).tolist(),
            "purity": self.purity.round(4).tolist(),
            "consistency": self.consistency.round(4).tolist(),
            "dominant": self.dominant,
            "preservation": self.preservation.round(4).tolist(),
            "broken": self.broken.round(4).tolist(),
            "labels": self.labels,
            "coverage": self.coverage,
            "coverage_count": len(self.coverage),
            "alignment": round(float(self.alignment), 4),
            "best_purity_per_factor": best_per_factor(self),
        }


def _consistency(effects: DirectionEffects, factor: str, scales: np.ndarray) -> tuple[float, str]:
    """Share of images moving the majority way, and the label suffix for that way."""
    if factor == "shape":
        moved = effects.shape_targets[effects.changes["shape"] == 1.0]
        if moved.size == 0:
            return 0.0, ""
        values, counts = np.unique(moved, return_counts=True)
        return float(counts.max() / moved.size), f"->{values[counts.argmax()]}"
    # Sign of change per unit of scale: an image moving + at +s and - at -s moves "+".
    per_scale = effects.changes[factor] * np.sign(scales)[:, None]
    signs = np.sign(per_scale[np.isfinite(per_scale) & (per_scale != 0)])
    if signs.size == 0:
        return 0.0, ""
    plus = float((signs > 0).mean())
    return max(plus, 1 - plus), "+" if plus >= 0.5 else "-"


def score_bank(per_direction: list[DirectionEffects], scales: list[float]) -> BankScores:
    scales_arr = np.asarray(scales, dtype=float)
    k = len(per_direction)
    effect = np.zeros((k, len(FACTORS)))
    for i, eff in enumerate(per_direction):
        for j, f in enumerate(FACTORS):
            vals = np.abs(eff.changes[f])
            effect[i, j] = float(np.nanmean(vals)) if np.isfinite(vals).any() else 0.0
    normalised = effect / np.array([BIN_WIDTH_64[f] for f in FACTORS])
    totals = normalised.sum(1)
    purity = np.where(totals > 0, normalised.max(1) / np.maximum(totals, 1e-12), 0.0)
    dom_idx = normalised.argmax(1)
    dominant = [FACTORS[j] for j in dom_idx]
    consistency, labels = np.zeros(k), []
    for i, eff in enumerate(per_direction):
        c, suffix = _consistency(eff, dominant[i], scales_arr)
        consistency[i] = c
        labels.append(dominant[i] + suffix if normalised[i, dom_idx[i]] >= MIN_EFFECT else "none")
    others = normalised.copy()
    others[np.arange(k), dom_idx] = np.nan
    preservation = np.nanmean(others, axis=1) if len(FACTORS) > 1 else np.zeros(k)
    strong = normalised[np.arange(k), dom_idx] >= MIN_EFFECT
    good = strong & (purity >= PURITY_MIN) & (consistency >= CONSISTENCY_MIN)
    coverage = sorted({dominant[i] for i in range(k) if good[i]}, key=FACTORS.index)
    per_factor = []
    for f in FACTORS:
        cands = [purity[i] * consistency[i] for i in range(k) if dominant[i] == f and strong[i]]
        per_factor.append(max(cands) if cands else 0.0)
    return BankScores(
        effect,
        normalised,
        purity,
        consistency,
        dominant,
        preservation,
        np.array([e.broken for e in per_direction]),
        labels,
        coverage,
        float(np.mean(per_factor)),
    )


def best_per_factor(scores: BankScores) -> dict[str, float]:
    """Purity of the purest direction whose dominant factor is f and whose effect is strong."""
    out = {}
    for j, f in enumerate(FACTORS):
        cands = [
            scores.purity[i]
            for i in range(len(scores.purity))
            if scores.dominant[i] == f and scores.normalised[i, j] >= MIN_EFFECT
        ]
        out[f] = round(float(max(cands)), 4) if cands else 0.0
    return out
