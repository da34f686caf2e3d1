"""Images for discovery: read a folder on any fsspec storage, decode, crop, encode to latents.

Corrupt or unreadable files are skipped, counted and named in a warning; the run goes on.
An empty folder, or one where nothing decodes, is an error.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from noiseclr.errors import DataError, ImageError
from noiseclr.utils.configfile import resolve_env

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data's decode actor and split
    import torch  # coordinator import this module and need none of it (1.4 s and 180 MB each here)

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Refuse to decode more pixels than this: a small file can declare a huge image (a
# decompression bomb). 64 MP is a 8000 x 8000 photo.
MAX_PIXELS = 64_000_000


@dataclass
class ImageSet:
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    files: list[str]
    bad_files: list[str] = field(default_factory=list)
    skipped: int = 0  # leading files passed over before these (blind.real_images' skip)


def list_images(uri: str, storage_options: dict | None = None) -> list[str]:
    """Image files under `uri` (recursive), sorted, as full URIs."""
    fs, root = fsspec.core.url_to_fs(uri, **resolve_env(storage_options or {}))
    if not fs.exists(root):
        raise DataError(f"image folder {uri!r} does not exist")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {uri!r}")
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in files]


def decode_image(
    data: bytes, resolution: int, max_pixels: int = MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> np.ndarray:
    """Bytes -> (resolution, resolution, 3) uint8: RGB, shorter side resized, centre crop.

    The size in the header is checked against max_pixels before any pixel is decoded; `formats`
    (PIL names) limits which decoders may open the bytes at all."""
    with warnings.catch_warnings():  # PIL warns from 89 MP; ours refuses from MAX_PIXELS, below that
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=formats)
    if img.width * img.height > max_pixels:
        raise Image.DecompressionBombError(
            f"{img.width} x {img.height} pixels is more than the {max_pixels / 1e6:g} MP limit"
        )
    img.load()  # raises on truncated data
    return square_image(img, resolution)


def square_image(img: Image.Image, resolution: int) -> np.ndarray:
    """A decoded PIL image -> (resolution, resolution, 3) uint8: upright (EXIF), RGB, centre
    square, resized. The one preparation every input image gets, file or in-memory."""
    img = ImageOps.exif_transpose(img)  # a camera's rotated JPEG, upright
    img = _rgb(img)
    side = min(img.size)  # centre square first: a 1 x 4M-pixel strip never becomes a huge resize
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img)


def _rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit and float greys scaled to 8 bits, transparency on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a.clip(0, top) * (255 / top)).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decoded(
    uri: str,
    resolution: int,
    limit: int | None,
    progress: bool,
    storage_options: dict | None,
    names: list[str],
    bad: list[str],
):
    """Yield up to `limit` good images under `uri` as (resolution, resolution, 3) uint8, one at a
    time; their paths go to `names`, the unreadable ones to `bad` (skipped, counted, warned)."""
    options = resolve_env(storage_options or {})
    for path in tqdm(list_images(uri, storage_options), desc="images", disable=not progress):
        if limit is not None and len(names) >= limit:
            break
        try:
            with fsspec.open(path, "rb", **options) as f:
                pixels = decode_image(f.read(), resolution)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            bad.append(path)
            log.warning("skipping unreadable image %s: %s", path, err)
            continue
        names.append(path)
        yield pixels
    if bad:
        log.warning("skipped %d unreadable image(s) under %s", len(bad), uri)
    if not names:
        raise DataError(f"none of the images under {uri!r} could be read ({len(bad)} corrupt)")


def _to_unit(good: list[np.ndarray]) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_images(
    uri: str,
    resolution: int,
    limit: int | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
) -> ImageSet:
    """Decode up to `limit` good images under `uri`; skip and count the bad ones. Every image's
    pixels are held at once: for a domain to train on, `load_latents` holds only latents."""
    names: list[str] = []
    bad: list[str] = []
    good = list(_decoded(uri, resolution, limit, progress, storage_options, names, bad))
    return ImageSet(pixels=_to_unit(good), files=names, bad_files=bad)


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w), scaled
    files: list[str]
    bad_files: list[str] = field(default_factory=list)


def load_latents(
    uri: str,
    resolution: int,
    vae,
    limit: int | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
    batch: int = 32,
) -> LatentSet:
    """Decode and encode up to `limit` good images under `uri`, `batch` at a time: the process
    holds the latents and one batch of pixels, not the domain's pixels (3 MiB an image at 512 px,
    64 KiB as a latent). The latents equal `encode_latents(vae, load_images(...).pixels)`."""
    import torch

    names: list[str] = []
    bad: list[str] = []
    chunk: list[np.ndarray] = []
    out: list[torch.Tensor] = []
    for pixels in _decoded(uri, resolution, limit, progress, storage_options, names, bad):
        chunk.append(pixels)
        if len(chunk) == batch:
            out.append(encode_latents(vae, _to_unit(chunk), batch))
            chunk = []
    if chunk:
        out.append(encode_latents(vae, _to_unit(chunk), batch))
    return LatentSet(latents=torch.cat(out), files=names, bad_files=bad)


def read_image_file(path: str | Path, resolution: int) -> torch.Tensor:
    """One image file -> (1, 3, resolution, resolution) in [-1, 1]; `ImageError` naming the file
    when it is missing, a folder, not an image, truncated, or too large."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path}: no such file")
    if path.is_dir():
        raise ImageError(f"image {path}: is a folder, give one image file")
    return image_tensor(path.read_bytes(), resolution, f"image {path}")


def image_tensor(
    data: bytes,
    resolution: int,
    what: str = "image",
    max_pixels: int = MAX_PIXELS,
    formats: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """Image bytes -> (1, 3, resolution, resolution) in [-1, 1]; `ImageError` starting with `what`
    when they are not an image (of `formats`, if given), truncated, or over max_pixels."""
    try:
        pixels = decode_image(data, resolution, max_pixels, formats)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what}: refused, {err}") from None
    except UnidentifiedImageError as err:
        if formats is None:
            raise ImageError(f"{what}: not a readable image ({err})") from None
        names = ", ".join(formats[:-1]) + f" or {formats[-1]}" if len(formats) > 1 else formats[0]
        raise ImageError(f"{what}: not a {names} image") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{what}: not a readable image ({type(err).__name__}: {err})") from None
    import torch

    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1


def encode_latents(vae, pixels: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, h, w); the posterior mean (deterministic)."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(pixels), batch):
            x = pixels[s : s + batch].to(vae.device, vae.dtype)
            out.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out).float()
