"""Composition: do directions applied together keep their own effects and move nothing else?

NoiseCLR's claim is that its edits add: eps~ = eps~(x_t, c) + sum_i lambda_i (eps(x_t, d_i) -
eps(x_t, empty)). For a set of signed edits A, B (, C), each image is edited by each alone and
by all together (one batched sampler call), and the result is scored two ways:

- with the oracle (shapes world): for each edit its effect on its own dominant factor, alone and
  together; kept = together / alone (capped at 1), leak = the share of the joint effect on
  factors none of them moves alone. fidelity = min(kept) x (1 - leak): 1 when the joint edit
  is exactly the edits side by side.
- without it (any model): additivity = 1 - |D_all - sum_i D_i| / sum_i |D_i| per image (D: the
  pixel change), 1 when the image changes add exactly.

Intervals: 95% bootstrap over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noiseclr.editing.sampler import Edit, decode, sample
from noiseclr.evaluation.evaluate import Harness, _measure
from noiseclr.evaluation.metrics import FACTORS, Changes, changes, score_edit


@dataclass
class Part:
    """One signed edit of a composition: a direction of some bank at its calibrated scale."""

    name: str  # e.g. "shapes #6+"
    edit: Edit


def composed_images(harness: Harness, parts: list[Part]) -> dict[str, list[np.ndarray]]:
    """Per scored source: [each part alone..., all together], each (N, H, W, 3)."""
    m = len(parts)
    # rows 0..m-1: part i alone; row m: all of them
    rows = torch.cat([torch.eye(m), torch.ones(1, m)]) * torch.tensor([p.edit.scale for p in parts])
    out = {}
    top = harness.p.window[0]
    for name, src in harness.sources(top).items():
        if name.startswith("cal-"):
            continue
        n = len(src.x_top)
        x = src.x_top.repeat_interleave(m + 1, dim=0)
        scales = rows.repeat(n, 1)
        x0 = sample(
            harness.model,
            x,
            [p.edit for p in parts],
            scales,
            prompt=src.prompt,
            guidance_scale=src.guidance,
            steps=src.steps,
            start_t=src.top,
        )
        imgs = decode(harness.model, x0)
        imgs = imgs.reshape(n, m + 1, *imgs.shape[1:])
        out[name] = [imgs[:, j] for j in range(m + 1)]
    return out


def _fidelity(alone: list[np.ndarray], joint: np.ndarray, own: list[int]) -> tuple:
    """(fidelity, kept per part, leak) from effect vectors (F,) alone and together."""
    kept = [min(1.0, joint[f] / a[f]) if a[f] > 0 else 0.0 for a, f in zip(alone, own, strict=True)]
    others = [j for j in range(len(FACTORS)) if j not in own]
    total = float(joint.sum())
    leak = float(joint[others].sum() / total) if total > 0 else 1.0
    return min(kept) * (1 - leak), kept, leak


def additivity(before: np.ndarray, alone: list[np.ndarray], joint: np.ndarray) -> np.ndarray:
    """(N,) 1 - |D_all - sum D_i|_1 / sum |D_i|_1 per image (pixel changes D)."""
    parts = [a - before for a in alone]
    residual = np.abs((joint - before) - sum(parts)).sum(axis=(1, 2, 3))
    scale = sum(np.abs(p).sum(axis=(1, 2, 3)) for p in parts)
    return 1 - residual / np.maximum(scale, 1e-8)


def measure_composition(harness: Harness, parts: list[Part], n_boot: int = 200, seed: int = 0) -> dict:
    """Oracle fidelity and oracle-free additivity of `parts` applied together, with intervals."""
    images = composed_images(harness, parts)
    before = {name: harness.sources(harness.p.window[0])[name] for name in images}
    m = len(parts)
    # changes per row (alone i, joint), pooled over sources
    per_row = []
    for j in range(m + 1):
        chs = [changes(before[name].before, _measure(images[name][j]), harness.res) for name in images]
        per_row.append(chs)
    pooled = [Changes.concat(chs) for chs in per_row]
    add = np.concatenate(
        [additivity(before[name].images, images[name][:m], images[name][m]) for name in images]
    )

    def figures(idx: np.ndarray | None) -> tuple:
        rows = [p if idx is None else p.take(idx) for p in pooled]
        scores = [score_edit(r, harness.floor) for r in rows]
        own = [FACTORS.index(s.dominant) for s in scores[:m]]
        fid, kept, leak = _fidelity([s.effect for s in scores[:m]], scores[m].effect, own)
        return fid, kept, leak, [s.dominant for s in scores[:m]], [s.label for s in scores[:m]]

    fid, kept, leak, factors, labels = figures(None)
    n = len(pooled[0])
    rng = np.random.default_rng(seed)
    boot_f, boot_a = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        boot_f.append(figures(idx)[0])
        boot_a.append(float(add[idx].mean()))

    def ci(v: list[float]) -> list[float]:
        return [round(float(np.quantile(v, q)), 3) for q in (0.025, 0.975)]

    return {
        "parts": [p.name for p in parts],
        "labels": labels,
        "factors": factors,
        "distinct_factors": len(set(factors)) == len(factors),
        "kept": [round(k, 3) for k in kept],
        "leak": round(leak, 3),
        "fidelity": round(fid, 3),
        "fidelity_interval": ci(boot_f),
        "additivity": round(float(add.mean()), 3),
        "additivity_interval": ci(boot_a),
        "images": n,
    }
