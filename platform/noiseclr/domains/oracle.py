"""The oracle: measures every factor of the shapes world back from pixels.

Deterministic and model-free. The object is the only saturated thing in this world (the
background is grey), so chroma (max - min of RGB) is the object's coverage times its own
chroma: dividing by the object's chroma gives a soft mask whose sum is the object's area.

Documented error on rendered ground truth (tests/test_oracle.py checks these bounds):
shape class >= 98% correct, hue within 10 degrees, position within 2 px, size within 10%.
On generated images the same code runs; blur only widens the soft mask's rim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from noiseclr.domains.shapes import HUES, LIGHTNESS, SHAPES, STRIPE_PERIOD

CHROMA_MASK = 0.25  # chroma above this is object (object chroma is ~0.85, background 0)
MIN_COMPONENT_FRACTION = 0.003  # of the image area; smaller blobs are noise, not objects
SHAPE_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # area / r^2
FILL_THRESHOLDS = (0.64, 0.9)  # fill ratio < 0.64 triangle (0.5), < 0.9 circle (0.785), else square
STRIPE_THRESHOLD = 0.06


@dataclass(frozen=True)
class Measurement:
    """Factors measured from one image. Positions and size in pixels of that image."""

    count: int  # number of objects found
    shape: str | None
    fill: float  # area / bbox area
    hue: float  # degrees, nan if no object
    size: float  # half-extent r, px
    x: float  # bbox centre, px
    y: float
    lightness: float  # background value
    stripes: float  # stripe contrast of the background
    pattern: str

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rgb (H, W, 3) float -> hue degrees, chroma, value."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 1e-6, chroma, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (h * 60.0) % 360.0, chroma, mx


def measure(image: np.ndarray) -> Measurement:
    """Measure one image: (H, W, 3) uint8 or float in [0, 1]."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    rgb = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    height, width = rgb.shape[:2]
    hue, chroma, value = _hsv(rgb)

    mask = chroma > CHROMA_MASK
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(np.ones_like(chroma), labels, index=np.arange(1, n + 1)) if n else []
    keep = [i + 1 for i, s in enumerate(sizes) if s >= MIN_COMPONENT_FRACTION * height * width]

    bg_mask = ~ndimage.binary_dilation(chroma > 0.08, iterations=2)
    bg_values = value[bg_mask] if bg_mask.any() else value.ravel()
    lightness = float(np.mean(bg_values))
    half = max(1, round(STRIPE_PERIOD * width / 2))
    both = bg_mask[:, half:] & bg_mask[:, :-half]
    diff = np.abs(value[:, half:] - value[:, :-half])[both]
    stripes = float(diff.mean()) if diff.size else 0.0
    pattern = "striped" if stripes > STRIPE_THRESHOLD else "plain"

    if not keep:
        nan = float("nan")
        return Measurement(0, None, nan, nan, nan, nan, nan, lightness, stripes, pattern)

    main = max(keep, key=lambda i: sizes[i - 1])
    region = ndimage.binary_dilation(labels == main, iterations=1)  # include the anti-aliased rim
    core = labels == main
    chroma_ref = float(np.percentile(chroma[core], 90))
    alpha = np.where(region, np.clip(chroma / max(chroma_ref, 1e-6), 0, 1), 0.0)
    area = float(alpha.sum())

    ys, xs = np.nonzero(alpha > 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    # Soft extents (sum of per-column / per-row max coverage) keep sub-pixel precision that
    # the thresholded bbox loses on small objects.
    fill = area / float(alpha.max(axis=0).sum() * alpha.max(axis=1).sum())
    shape = SHAPES[2] if fill < FILL_THRESHOLDS[0] else SHAPES[0] if fill < FILL_THRESHOLDS[1] else SHAPES[1]
    size = math.sqrt(area / SHAPE_AREA[shape])

    weights = alpha * chroma
    angles = np.deg2rad(hue)
    mean_hue = (
        math.degrees(math.atan2((weights * np.sin(angles)).sum(), (weights * np.cos(angles)).sum())) % 360
    )
    return Measurement(
        count=len(keep),
        shape=shape,
        fill=fill,
        hue=mean_hue,
        size=size,
        x=(x0 + x1) / 2.0,
        y=(y0 + y1) / 2.0,
        lightness=lightness,
        stripes=stripes,
        pattern=pattern,
    )


def measure_batch(images: np.ndarray) -> list[Measurement]:
    """(n, H, W, 3) images -> one Measurement each."""
    return [measure(img) for img in images]


def hue_distance(a: float, b: float) -> float:
    """Angular distance in degrees, in [0, 180]."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def nearest_word(factor: str, value: float) -> str:
    """Bin word nearest to a measured value (hue in degrees, lightness in [0, 1])."""
    if factor == "hue":
        return min(HUES, key=lambda w: hue_distance(HUES[w], value))
    if factor == "lightness":
        return min(LIGHTNESS, key=lambda w: abs(LIGHTNESS[w] - value))
    raise ValueError(f"nearest_word supports hue and lightness, not {factor!r}")
