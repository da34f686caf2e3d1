"""The shapes world: a seeded procedural image world whose generative factors are known.

Every image holds two kinds of content: one coloured object (shape, hue, size, x, y) and a
grey background (lightness, pattern). Words in the captions name discrete bins of each
factor; the rendered value carries a small seeded jitter around the bin centre so that the
factors are continuous and an edit can move them by any amount.

Rendering is vectorised torch (analytic anti-aliasing from signed distances), so the same
function draws a batch of 4 test images on a CPU or 4096 training images on a GPU.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from noiseclr.errors import WorldError

# --- factor vocabulary: word -> bin centre -------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HUES: dict[str, float] = {  # degrees
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
SIZES: dict[str, float] = {"small": 6.0 / 64, "medium": 9.0 / 64, "large": 12.0 / 64}  # half-extent / W
XS: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}  # centre / W
YS: dict[str, float] = {"top": 0.25, "middle": 0.5, "bottom": 0.75}  # centre / H
LIGHTNESS: dict[str, float] = {"dark": 0.2, "gray": 0.5, "light": 0.8}  # background value
PATTERNS: tuple[str, ...] = ("plain", "striped")

FACTOR_WORDS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "hue": tuple(HUES),
    "size": tuple(SIZES),
    "y": tuple(YS),
    "x": tuple(XS),
    "lightness": tuple(LIGHTNESS),
    "pattern": PATTERNS,
}
FACTORS: tuple[str, ...] = tuple(FACTOR_WORDS)
FILLER_WORDS: tuple[str, ...] = ("a", "at", "on", "background", "shape")
OBJECT_SATURATION = 0.9
OBJECT_VALUE = 0.95
STRIPE_AMPLITUDE = 0.1
STRIPE_PERIOD = 8.0 / 64  # of W
# Jitter around bin centres (uniform, +-): keeps words meaningful, makes factors continuous.
JITTER = {"hue": 6.0, "size": 0.08, "pos": 2.0 / 64, "lightness": 0.04}


def vocabulary() -> list[str]:
    """Every word a caption of this world can use, in a fixed order."""
    words = list(FILLER_WORDS)
    for values in FACTOR_WORDS.values():
        words.extend(values)
    return words


@dataclass(frozen=True)
class Scene:
    """One image's factors: the words (bins) and the exact rendered values."""

    shape: str
    hue_word: str
    size_word: str
    y_word: str
    x_word: str
    lightness_word: str
    pattern: str
    hue: float  # degrees in [0, 360)
    size: float  # half-extent, fraction of width
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height
    lightness: float  # background value in [0, 1]

    @property
    def words(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "hue": self.hue_word,
            "size": self.size_word,
            "y": self.y_word,
            "x": self.x_word,
            "lightness": self.lightness_word,
            "pattern": self.pattern,
        }


def caption(words: dict[str, str | None]) -> str:
    """Caption from factor words; a factor set to None (or absent) is left unsaid.

    Full form: "a small red circle at top left on a dark striped background".
    """
    shape = words.get("shape") or "shape"
    obj = " ".join(w for w in (words.get("size"), words.get("hue"), shape) if w)
    parts = ["a " + obj]
    pos = " ".join(w for w in (words.get("y"), words.get("x")) if w)
    if pos:
        parts.append("at " + pos)
    bg = " ".join(w for w in (words.get("lightness"), words.get("pattern")) if w)
    if bg:
        parts.append(f"on a {bg} background")
    return " ".join(parts)


def parse_caption(text: str) -> dict[str, str]:
    """Factor words named in a caption of this world (inverse of :func:`caption`).

    Raises ValueError naming any word the world does not know.
    """
    known = set(vocabulary())
    unknown = [w for w in text.lower().split() if w not in known]
    if unknown:
        raise WorldError(
            f"prompt has words the shapes world does not know: {unknown}; allowed words: {sorted(known)}"
        )
    found: dict[str, str] = {}
    for word in text.lower().split():
        for factor, values in FACTOR_WORDS.items():
            if word in values:
                found[factor] = word
    return found


def all_combinations() -> list[tuple[str, ...]]:
    """Every combination of factor words, in FACTORS order."""
    return list(itertools.product(*FACTOR_WORDS.values()))


def held_out_combinations(fraction: float = 0.1, seed: int = 1234) -> set[tuple[str, ...]]:
    """A fixed subset of word combinations never shown to the base model in training.

    Generation quality is measured on these, so it tests composition, not memory.
    """
    combos = all_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    n = round(fraction * len(combos))
    return {combos[i] for i in order[:n]}


def check_word(factor: str, word: str) -> None:
    """Raises WorldError unless `word` is one of `factor`'s words."""
    if factor not in FACTOR_WORDS:
        raise WorldError(f"unknown factor {factor!r}; allowed: {list(FACTORS)}")
    if word not in FACTOR_WORDS[factor]:
        raise WorldError(f"unknown {factor} {word!r}; allowed: {list(FACTOR_WORDS[factor])}")


def sample_scenes(
    n: int,
    seed: int,
    *,
    fixed: dict[str, str] | None = None,
    exclude: set[tuple[str, ...]] | None = None,
    only: set[tuple[str, ...]] | None = None,
    jitter: bool = True,
) -> list[Scene]:
    """Draw n scenes, deterministic per seed.

    fixed: factor -> word held constant (e.g. {"pattern": "plain"} for a one-content domain).
    exclude / only: word combinations to avoid / to draw from exclusively.
    """
    fixed = dict(fixed or {})
    for factor, word in fixed.items():
        check_word(factor, word)
    rng = np.random.default_rng(seed)
    pool = None
    if only is not None:
        pool = sorted(c for c in only if all(c[FACTORS.index(f)] == w for f, w in fixed.items()))
        if not pool:
            raise WorldError("no allowed combination matches the fixed factors")
    scenes: list[Scene] = []
    while len(scenes) < n:
        if pool is not None:
            combo = pool[rng.integers(len(pool))]
        else:
            combo = tuple(
                fixed.get(f) or FACTOR_WORDS[f][rng.integers(len(FACTOR_WORDS[f]))] for f in FACTORS
            )
        j = rng.uniform(-1.0, 1.0, size=5) if jitter else np.zeros(5)
        if exclude is not None and combo in exclude:
            continue
        w = dict(zip(FACTORS, combo, strict=True))
        scenes.append(
            Scene(
                shape=w["shape"],
                hue_word=w["hue"],
                size_word=w["size"],
                y_word=w["y"],
                x_word=w["x"],
                lightness_word=w["lightness"],
                pattern=w["pattern"],
                hue=(HUES[w["hue"]] + JITTER["hue"] * j[0]) % 360.0,
                size=SIZES[w["size"]] * (1.0 + JITTER["size"] * j[1]),
                x=XS[w["x"]] + JITTER["pos"] * j[2],
                y=YS[w["y"]] + JITTER["pos"] * j[3],
                lightness=LIGHTNESS[w["lightness"]] + JITTER["lightness"] * j[4],
            )
        )
    return scenes


def with_word(scene: Scene, factor: str, word: str) -> Scene:
    """The same scene with one factor set to another word, its jitter kept.

    The rendered value moves with the bin: hue, x, y and lightness keep their offset from the
    bin centre, size its ratio, so only the named factor changes.
    """
    check_word(factor, word)
    if factor in ("shape", "pattern"):
        return replace(scene, **{factor: word})
    if factor == "hue":
        return replace(scene, hue_word=word, hue=(scene.hue - HUES[scene.hue_word] + HUES[word]) % 360.0)
    if factor == "size":
        return replace(scene, size_word=word, size=scene.size / SIZES[scene.size_word] * SIZES[word])
    if factor == "lightness":
        value = scene.lightness - LIGHTNESS[scene.lightness_word] + LIGHTNESS[word]
        return replace(scene, lightness_word=word, lightness=value)
    centres = XS if factor == "x" else YS
    old = scene.x_word if factor == "x" else scene.y_word
    value = (scene.x if factor == "x" else scene.y) - centres[old] + centres[word]
    return replace(scene, **{f"{factor}_word": word, factor: value})


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h in degrees, s and v in [0, 1]; returns (..., 3)."""
    k = torch.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], dim=-1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[..., None] - v[..., None] * s[..., None] * f


def render(scenes: list[Scene], resolution: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Render scenes to float RGB in [0, 1], shape (n, 3, H, W)."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    n, res = len(scenes), resolution

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(n, 1, 1)

    cx, cy = col([s.x * res for s in scenes]), col([s.y * res for s in scenes])
    r = col([s.size * res for s in scenes])
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device).view(n, 1, 1)
    grid = torch.arange(res, dtype=torch.float32, device=device) + 0.5  # pixel centres
    px, py = grid.view(1, 1, res), grid.view(1, res, 1)
    dx, dy = px - cx, py - cy

    # Signed distance (pixels, negative inside) of each shape.
    sd_circle = torch.sqrt(dx**2 + dy**2) - r
    sd_square = torch.maximum(dx.abs(), dy.abs()) - r
    # Isosceles triangle, apex (0, -r), base from (-r, r) to (r, r): bbox is 2r x 2r.
    edge = math.sqrt(5.0)  # normal length of the slanted edges (2, 1)
    sd_tri = torch.maximum(dy - r, (2 * dx.abs() - dy - r) / edge)
    sd = torch.where(kind == 0, sd_circle, torch.where(kind == 1, sd_square, sd_tri))
    alpha = torch.clamp(0.5 - sd, 0.0, 1.0)  # analytic pixel coverage

    obj = hsv_to_rgb(
        col([s.hue for s in scenes]),
        torch.full((n, 1, 1), OBJECT_SATURATION, device=device),
        torch.full((n, 1, 1), OBJECT_VALUE, device=device),
    ).permute(0, 3, 1, 2)  # (n, 3, 1, 1)

    light = col([s.lightness for s in scenes])
    striped = col([float(s.pattern == "striped") for s in scenes])
    phase = torch.sin(2 * math.pi * px / (STRIPE_PERIOD * res))
    stripe = torch.sign(phase) * STRIPE_AMPLITUDE * torch.clamp(phase.abs() * 4, 0, 1)
    bg = (light + striped * stripe).expand(n, res, res)[:, None].expand(n, 3, res, res)

    return (alpha[:, None] * obj + (1 - alpha[:, None]) * bg).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) float [0, 1] -> (n, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
