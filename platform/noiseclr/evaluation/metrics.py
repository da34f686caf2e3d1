"""What an edit changed, factor by factor, judged against the noise floor. Pure numpy.

The unit of scoring is a *signed edit*: one direction applied at one calibrated scale (+s or
-s) to n images. The oracle measures every factor before and after; the change of factor f on
image i is expressed in bins of f (1.0 = one word's worth: 60 degrees of hue, a third of the
canvas in x, ...; for shape, 1 = the class changed).

- noise floor[f]: how much f moves when nothing was edited (the drift between a scene and the
  model's rendering of the same scene: a VAE round trip, an inversion round trip). A change
  counts only by how much it exceeds the floor, so measurement and rendering noise does not
  make a perfect edit look impure, nor a no-op look like an edit.
- effect[f] = mean_i |change_i[f]| * [|change_i[f]| > floor[f]]   (shape: the flip rate less
  the floor's): a change that the floor could explain counts as none, a larger one in full.
- purity = max_f effect / sum_f effect; the dominant factor is the argmax.
- consistency: among images whose dominant factor moved above the floor, the share that moved
  the majority way. Two ways count, whichever agrees more: the same sign (continuous factors:
  "hue+" rotates every hue the same way), or the same target word for each source word
  ("hue->red" moves magenta up and yellow down; for shape the only way: "circle -> square,
  square -> triangle, triangle -> circle" is as consistent as "anything -> circle"). A mover
  that stays in its word's bin does not count as reaching a target.
- label: "hue+", "x-", "shape->circle", or "none" when the dominant effect is below MIN_EFFECT.

An edit's quality is consistency x (2 purity - 1)+: 1 for a perfect edit, 0 for an edit whose
dominant factor carries no more than half of its effect (a two-factor edit, or noise spread
over factors), 0 when it is weak (< MIN_EFFECT bins). A bank is scored per factor of its
domain: the best quality among its signed edits dominated by that factor. `alignment` is the
mean of that over the domain's factors (the scalar sweeps maximise); `coverage` names the
factors with a strong edit of purity >= 0.7 and consistency >= 0.8. Every score has a
bootstrap interval over images (the calibrated scales are kept fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from noiseclr.domains import shapes
from noiseclr.domains.oracle import Measurement, nearest_word

FACTORS = ("shape", "hue", "size", "x", "y", "lightness", "pattern")
UNITS = {
    "shape": "changed",
    "hue": "deg",
    "size": "px",
    "x": "px",
    "y": "px",
    "lightness": "value",
    "pattern": "stripe contrast",
}
# One bin of each factor at 64 px, in natural units (see domains/shapes.py).
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
FLOOR_QUANTILE = 0.9  # a continuous factor's floor: this quantile of its no-edit drift
SHAPE = FACTORS.index("shape")


def _signed(before: Measurement, after: Measurement, factor: str) -> float:
    """after - before in natural units (nan where the object is lost or duplicated)."""
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


def word_of(m: Measurement, factor: str, resolution: int) -> str:
    """The world's word nearest to a measured factor ("" where there is no single object)."""
    if factor == "pattern":
        return m.pattern
    if factor == "lightness":
        return nearest_word("lightness", m.lightness)
    if m.count != 1:
        return ""
    if factor == "shape":
        return m.shape or ""
    if factor == "hue":
        return nearest_word("hue", m.hue)
    centres = {"size": shapes.SIZES, "x": shapes.XS, "y": shapes.YS}[factor]
    value = getattr(m, factor) / resolution
    return min(centres, key=lambda w: abs(centres[w] - value))


@dataclass
class Changes:
    """What one signed edit did to n images."""

    bins: np.ndarray  # (F, n) signed change in bins; shape row is 0/1; nan where the object broke
    words_from: np.ndarray  # (F, n) nearest word before the edit ("" where there is no object)
    words_to: np.ndarray  # (F, n) nearest word after the edit
    broken: np.ndarray  # (n,) bool: one object before, not after

    def __len__(self) -> int:
        return self.bins.shape[1]

    def take(self, idx: np.ndarray) -> Changes:
        return Changes(self.bins[:, idx], self.words_from[:, idx], self.words_to[:, idx], self.broken[idx])

    @staticmethod
    def concat(parts: Sequence[Changes]) -> Changes:
        return Changes(
            np.concatenate([p.bins for p in parts], axis=1),
            np.concatenate([p.words_from for p in parts], axis=1),
            np.concatenate([p.words_to for p in parts], axis=1),
            np.concatenate([p.broken for p in parts]),
        )


def changes(before: Sequence[Measurement], after: Sequence[Measurement], resolution: int) -> Changes:
    """Per-image factor changes between two measured image lists of the same scenes."""
    if len(before) != len(after):
        raise ValueError(f"before and after differ in length: {len(before)} vs {len(after)}")
    bins = np.array(
        [[_signed(b, a, f) for b, a in zip(before, after, strict=True)] for f in FACTORS], dtype=float
    ).reshape(len(FACTORS), len(before))
    for j, f in enumerate(FACTORS):
        scale = 64.0 / resolution if f in PIXEL_FACTORS else 1.0
        bins[j] *= scale / BIN_WIDTH_64[f]

    def words(ms: Sequence[Measurement]) -> np.ndarray:
        return np.array([[word_of(m, f, resolution) for m in ms] for f in FACTORS]).reshape(len(FACTORS), -1)

    broken = np.array([b.count == 1 and a.count != 1 for b, a in zip(before, after, strict=True)])
    return Changes(bins, words(before), words(after), broken)


def noise_floor(drifts: Sequence[Changes]) -> np.ndarray:
    """(F,) floor from no-edit drifts: FLOOR_QUANTILE of |change| per continuous factor, the
    mean flip rate for shape."""
    if not drifts:
        return np.zeros(len(FACTORS))
    both = Changes.concat(drifts)
    floor = np.zeros(len(FACTORS))
    for j in range(len(FACTORS)):
        row = np.abs(both.bins[j][np.isfinite(both.bins[j])])
        if row.size:
            floor[j] = float(row.mean()) if j == SHAPE else float(np.quantile(row, FLOOR_QUANTILE))
    return floor


@dataclass
class EditScore:
    effect: np.ndarray  # (F,) bins above the floor
    purity: float
    consistency: float
    dominant: str
    label: str
    broken: float

    @property
    def strong(self) -> bool:
        return float(self.effect.max()) >= MIN_EFFECT

    @property
    def quality(self) -> float:
        """consistency x (2 purity - 1)+ when strong, else 0."""
        return self.consistency * max(0.0, 2 * self.purity - 1) if self.strong else 0.0

    @property
    def good(self) -> bool:
        return self.strong and self.purity >= PURITY_MIN and self.consistency >= CONSISTENCY_MIN


def score_edit(ch: Changes, floor: np.ndarray) -> EditScore:
    """Score one signed edit on the images of `ch` (see the module docstring)."""
    effect = np.zeros(len(FACTORS))
    size = np.abs(ch.bins)
    above = size > floor[:, None]  # (F, n); nan compares False
    for j in range(len(FACTORS)):
        finite = np.isfinite(size[j])
        if not finite.any():
            continue
        if j == SHAPE:
            effect[j] = max(0.0, float(size[j][finite].mean()) - floor[j])
        else:
            effect[j] = float(np.where(above[j], size[j], 0.0)[finite].mean())
    total = effect.sum()
    d = int(effect.argmax())
    purity = float(effect[d] / total) if total > 0 else 0.0
    dominant = FACTORS[d]
    movers = above[d]  # for shape: the flips (0/1 against a floor flip rate < 1)
    consistency, suffix = _target_consistency(ch.words_from[d][movers], ch.words_to[d][movers])
    if d != SHAPE and movers.any():
        plus = float((ch.bins[d][movers] > 0).mean())
        if max(plus, 1 - plus) >= consistency:
            consistency, suffix = max(plus, 1 - plus), "+" if plus >= 0.5 else "-"
    label = dominant + suffix if effect[d] >= MIN_EFFECT else "none"
    return EditScore(
        effect, purity, consistency, dominant, label, float(ch.broken.mean()) if len(ch) else 0.0
    )


def _target_consistency(src: np.ndarray, dst: np.ndarray) -> tuple[float, str]:
    """Share of movers that reach the majority target word of their source word (a word
    that did not change reaches nothing), and the label suffix: "->red" or ":a->b,c->d"."""
    if src.size == 0:
        return 0.0, ""
    agree, mapping = 0, {}
    for source in np.unique(src):
        values, counts = np.unique(dst[src == source], return_counts=True)
        moved = values != source
        if moved.any():
            best = int(np.argmax(np.where(moved, counts, -1)))
            agree += int(counts[best])
            mapping[str(source)] = str(values[best])
    targets = set(mapping.values())
    if len(targets) == 1:
        return agree / src.size, f"->{targets.pop()}"
    return agree / src.size, ":" + ",".join(f"{a}->{b}" for a, b in mapping.items())


@dataclass
class BankScore:
    """Scores of a bank's signed edits on one set of images."""

    edits: list[list[EditScore]]  # (K, 2): per direction, the -s and +s edits
    factors: tuple[str, ...]  # the domain's varying factors the summary is taken over

    def best_per_factor(self) -> dict[str, float]:
        out = dict.fromkeys(self.factors, 0.0)
        for pair in self.edits:
            for e in pair:
                if e.dominant in out:
                    out[e.dominant] = max(out[e.dominant], e.quality)
        return out

    @property
    def alignment(self) -> float:
        best = self.best_per_factor()
        return float(np.mean(list(best.values()))) if best else 0.0

    @property
    def coverage(self) -> list[str]:
        found = {e.dominant for pair in self.edits for e in pair if e.good}
        return [f for f in self.factors if f in found]


def score_bank(per_direction: Sequence[Sequence[Changes]], floor: np.ndarray, factors=FACTORS) -> BankScore:
    """per_direction[k] = [changes at -s, changes at +s] on the same images."""
    return BankScore([[score_edit(c, floor) for c in pair] for pair in per_direction], tuple(factors))


def bootstrap(
    per_direction: Sequence[Sequence[Changes]],
    floor: np.ndarray,
    factors=FACTORS,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, list[float]]:
    """95% intervals over images (resampled with replacement, the same draw for every edit):
    alignment, coverage count and each factor's best quality."""
    n = len(per_direction[0][0])
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {"alignment": [], "coverage": [], **{f: [] for f in factors}}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        s = score_bank([[c.take(idx) for c in pair] for pair in per_direction], floor, factors)
        rows["alignment"].append(s.alignment)
        rows["coverage"].append(len(s.coverage))
        for f, v in s.best_per_factor().items():
            rows[f].append(v)
    return {
        k: [round(float(np.quantile(v, 0.025)), 4), round(float(np.quantile(v, 0.975)), 4)]
        for k, v in rows.items()
    }


def summary(score: BankScore, intervals: dict[str, list[float]] | None = None) -> dict:
    """JSON-ready scores of one bank on one image set."""
    out = {
        "factors": list(score.factors),
        "alignment": round(score.alignment, 4),
        "coverage": score.coverage,
        "coverage_count": len(score.coverage),
        "best_per_factor": {f: round(v, 4) for f, v in score.best_per_factor().items()},
        "edits": [
            [
                {
                    "effect": e.effect.round(4).tolist(),
                    "purity": round(e.purity, 4),
                    "consistency": round(e.consistency, 4),
                    "dominant": e.dominant,
                    "label": e.label,
                    "quality": round(e.quality, 4),
                    "broken": round(e.broken, 4),
                }
                for e in pair
            ]
            for pair in score.edits
        ],
    }
    if intervals is not None:
        out["intervals"] = intervals
    return out
