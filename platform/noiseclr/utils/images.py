"""Image grids and atomic file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """(n, H, W, 3) uint8 or float [0, 1] images -> one PIL grid image (white padding)."""
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    out = Image.fromarray(grid)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(path: str | Path) -> None:
    """Give a file we wrote the usual permissions (0644 under the usual umask): mkstemp and
    some writers create 0600, which other users and containers sharing the folder cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | Path) -> str:
    """The PIL format an output path's suffix names; `StorageError` for any other suffix or a
    folder (callers check this before the work, `save_image` again when writing)."""
    from noiseclr.errors import StorageError

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise StorageError(f"--out {path}: unknown image type {path.suffix!r}; use one of {sorted(FORMATS)}")
    if path.is_dir():
        raise StorageError(f"--out {path}: is a folder; give a file name such as {path / 'out.png'}")
    return fmt


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write in the format the suffix names (.png, .jpg/.jpeg, .webp); refuse any other."""
    import io

    fmt = image_format(path)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    atomic_write_bytes(path, buf.getvalue())


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write a PNG (whatever the suffix says): for files the platform names itself."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
