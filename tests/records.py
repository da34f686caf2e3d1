"""Helpers shared by test modules: complete oracle-free score records from the few figures a
test cares about (the measurement writes every field; a bank refuses a record that lacks one),
the shipped model's pipeline with the shipped bank, and the image `noiseclr edit` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def sign(scale: float, live: bool = True, **figures: Any) -> dict[str, Any]:
    return {"scale": scale, "change": 0.05, "consistency": 0.5, "live": live, "score": 0.0} | figures


def scores(rows: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """A bank's scores: each row's given figures, the rest filled in (rank by score, signs that
    match `dead`), the bank's counts derived from the rows unless given."""
    rank = sorted(range(len(rows)), key=lambda i: -rows[i].get("score", 0.0))
    full = []
    for i, row in enumerate(rows):
        dead = row.get("dead", False)
        base = {
            "index": i,
            "score": 0.0,
            "interval": [0.0, 0.0],
            "rank": rank.index(i) + 1,
            "dead": dead,
            "duplicate_of": None,
            "signs": {"-": sign(-1.0, not dead), "+": sign(1.0, not dead)},
        }
        full.append(base | row)
    live = sum(not r["dead"] for r in full)
    return {
        "score": 0.0,
        "interval": [0.0, 0.0],
        "live": live,
        "dead": len(full) - live,
        "order": rank,
        "groups": [],
        "directions": full,
        "protocol": {"window": [600, 0], "target": 0.02},
    } | top


def bank_pipeline():
    """A NoiseCLRPipeline of the shipped model with the shipped bank loaded, progress bars off."""
    from noiseclr.editing.pipeline import NoiseCLRPipeline
    from noiseclr.models.base import EMBEDDED, PRETRAINED_DIR

    pipe = NoiseCLRPipeline.from_pretrained(str(EMBEDDED["shapes"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_bank(PRETRAINED_DIR / "banks" / "shapes")
    return pipe


def cli_after(tmp_path: Path, bank: str | Path, *args: str) -> np.ndarray:
    """Run `noiseclr edit ARGS --bank BANK` (a 64 px model) and return the "after" half of
    edit.png as (H, W, 3) in [0, 1]."""
    from PIL import Image
    from typer.testing import CliRunner

    from noiseclr.cli import app

    out = tmp_path / "edit.png"
    words = ["edit", *args, "--bank", str(bank), "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, words)
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out).convert("RGB"))
    # make_grid: 2 images of 64 px, 2 px white padding, upscaled x2 (nearest) below 128 px.
    scale, pad, side = 2, 2, 64
    left, top = (pad + side + pad) * scale, pad * scale
    assert grid.shape == ((side + 2 * pad) * scale, (2 * side + 3 * pad) * scale, 3)
    after = grid[top : top + side * scale : scale, left : left + side * scale : scale]
    return after.astype(np.float32) / 255
