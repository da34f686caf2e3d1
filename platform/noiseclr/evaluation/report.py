"""Evaluation reports: JSON, a Markdown table, a heatmap PNG and an HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from noiseclr.evaluation.metrics import FACTORS, MIN_EFFECT
from noiseclr.utils.images import atomic_write_bytes, save_png


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(result: dict) -> str:
    head = "| # | label | " + " | ".join(FACTORS) + " | purity | consistency | preservation |"
    sep = "|" + "---|" * (len(FACTORS) + 5)
    rows = []
    for k, row in enumerate(result["normalised"]):
        cells = " | ".join(f"{v:.2f}" for v in row)
        rows.append(
            f"| {k} | {result['labels'][k]} | {cells} | {result['purity'][k]:.2f} | "
            f"{result['consistency'][k]:.2f} | {result['preservation'][k]:.2f} |"
        )
    summary = (
        f"\ncoverage: {result['coverage_count']} ({', '.join(result['coverage']) or 'none'}); "
        f"alignment score: {result['alignment']:.3f}; fidelity (inversion MAE): "
        f"{_fmt(result['fidelity'])}\n"
    )
    return "\n".join([head, sep, *rows]) + "\n" + summary


def heatmap(result: dict, cell: int = 36) -> Image.Image:
    """Direction x factor grid of normalised effects (white 0 -> dark red >= 2 bins)."""
    values = np.asarray(result["normalised"])
    k, f = values.shape
    left, top = 110, 24
    img = Image.new("RGB", (left + f * cell + 10, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(FACTORS):
        draw.text((left + j * cell + 2, 6), name[:6], fill="black")
    for i in range(k):
        draw.text((4, top + i * cell + cell // 3), f"{i} {result['labels'][i]}"[:16], fill="black")
        for j in range(f):
            v = float(np.clip(values[i, j] / 2.0, 0, 1))
            color = (255, int(255 * (1 - v)), int(255 * (1 - v)))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
            draw.rectangle(box, fill=color, outline="black" if values[i, j] >= MIN_EFFECT else None)
            draw.text((box[0] + 3, box[1] + cell // 3), f"{values[i, j]:.1f}", fill="black")
    return img


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "evaluation.json",
        "markdown": out_dir / "evaluation.md",
        "heatmap": out_dir / "heatmap.png",
        "html": out_dir / "evaluation.html",
    }
    atomic_write_bytes(paths["json"], json.dumps(result, indent=2).encode())
    table = markdown_table(result)
    atomic_write_bytes(paths["markdown"], table.encode())
    save_png(heatmap(result), paths["heatmap"])
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Evaluation of {html.escape(result["bank"])}</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>Evaluation of bank <code>{html.escape(result["bank"])}</code> ({html.escape(result["method"])})</h1>
<p>Normalised effect of each direction on each factor (1.0 = one word's bin). Outlined cells
are effects of at least {MIN_EFFECT} bins. Coverage: <b>{result["coverage_count"]}</b>
({html.escape(", ".join(result["coverage"]) or "none")});
alignment score <b>{result["alignment"]:.3f}</b>.</p>
<img src="heatmap.png" alt="effect heatmap"><pre>{html.escape(table)}</pre></body></html>
"""
    atomic_write_bytes(paths["html"], page.encode())
    return paths


def comparison_table(results: dict[str, dict]) -> str:
    """One Markdown table, a row per method."""
    lines = [
        "| method | directions | coverage | covered factors | alignment | mean best purity | "
        "mean preservation | broken | fidelity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        best = [v for v in r["best_purity_per_factor"].values() if v > 0]
        lines.append(
            f"| {name} | {r['directions']} | {r['coverage_count']} | {', '.join(r['coverage']) or '-'} | "
            f"{r['alignment']:.3f} | {np.mean(best) if best else 0:.3f} | {np.mean(r['preservation']):.3f} | "
            f"{np.mean(r['broken']):.3f} | {_fmt(r['fidelity'])} |"
        )
    return "\n".join(lines) + "\n"
