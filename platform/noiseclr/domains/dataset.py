"""Write and read shapes-world data sets on any fsspec storage (file://, memory://, s3://...).

Layout under the root URI:  images/000000.png ...  and  factors.parquet  (one row per image:
file name, caption, every factor's word and exact value). The table is written last, under a
temporary name then renamed, so a reader never sees a half-written data set.
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from noiseclr.domains import shapes

TABLE = "factors.parquet"


def scenes_table(scenes: list[shapes.Scene], files: list[str]) -> pa.Table:
    rows = {
        "file": files,
        "caption": [shapes.caption(s.words) for s in scenes],
        **{f"{f}_word": [s.words[f] for s in scenes] for f in shapes.FACTORS},
        "hue": [s.hue for s in scenes],
        "size": [s.size for s in scenes],
        "x": [s.x for s in scenes],
        "y": [s.y for s in scenes],
        "lightness": [s.lightness for s in scenes],
    }
    return pa.table(rows)


def write_world(
    uri: str,
    n: int,
    seed: int = 0,
    resolution: int = 64,
    fixed: dict[str, str] | None = None,
    batch: int = 256,
    progress: bool = True,
) -> pa.Table:
    """Render n scenes to PNGs under `uri` with their factor table; returns the table."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/images", exist_ok=True)
    scenes = shapes.sample_scenes(n, seed, fixed=fixed)
    files = [f"images/{i:06d}.png" for i in range(n)]
    for start in tqdm(range(0, n, batch), desc="world", disable=not progress):
        chunk = scenes[start : start + batch]
        for i, pixels in enumerate(shapes.to_uint8(shapes.render(chunk, resolution))):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            fs.pipe_file(f"{root}/{files[start + i]}", buf.getvalue())
    table = scenes_table(scenes, files)
    table = table.replace_schema_metadata(
        {
            "world": "shapes",
            "seed": str(seed),
            "resolution": str(resolution),
            "n": str(n),
            "fixed": json.dumps(fixed or {}, sort_keys=True),
        }
    )
    tmp = f"{root}/{TABLE}.tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, f"{root}/{TABLE}")
    return table


def read_table(uri: str) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(uri)
    path = f"{root.rstrip('/')}/{TABLE}"
    if not fs.exists(path):
        raise FileNotFoundError(f"no {TABLE} under {uri!r}: not a shapes-world data set")
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def read_image(uri: str, file: str) -> np.ndarray:
    """One image of a data set as (H, W, 3) uint8."""
    fs, root = fsspec.core.url_to_fs(uri)
    with fs.open(f"{root.rstrip('/')}/{file}", "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))
