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


def signed_rows(result: dict) -> list[tuple[str, str, float, dict]]:
    """(row name "k+" / "k-", label, scale, edit score) for every signed edit of the bank."""
    rows = []
    for k, (pair, scales) in enumerate(zip(result["scores"]["all"]["edits"], result["scales"], strict=True)):
        for sign, edit, scale in zip("-+", pair, scales, strict=True):
            rows.append((f"{k}{sign}", edit["label"], scale, edit))
    return rows


def markdown_table(result: dict) -> str:
    """Every signed edit: its calibrated scale, effect per factor (bins above the floor),
    purity, consistency and broken share; then the bank's summary with intervals."""
    head = "| edit | scale | label | " + " | ".join(FACTORS) + " | purity | consistency | broken |"
    sep = "|" + "---|" * (len(FACTORS) + 6)
    rows = [
        f"| {name} | {scale:g} | {label} | "
        + " | ".join(f"{v:.2f}" for v in e["effect"])
        + f" | {e['purity']:.2f} | {e['consistency']:.2f} | {e['broken']:.2f} |"
        for name, label, scale, e in signed_rows(result)
    ]
    pooled = result["scores"]["all"]
    ci = pooled["intervals"]
    summary = (
        f"\nalignment {pooled['alignment']:.3f} [95% CI {ci['alignment'][0]:.3f}, {ci['alignment'][1]:.3f}]"
        f" over {', '.join(pooled['factors'])}; coverage {pooled['coverage_count']} "
        f"({', '.join(pooled['coverage']) or 'none'}); noise floor (bins) "
        + ", ".join(f"{f} {v:.2f}" for f, v in result["floor"].items())
        + f"; fidelity (inversion MAE) {_fmt(result['fidelity'])}\n"
    )
    return "\n".join([head, sep, *rows]) + "\n" + summary


def heatmap(result: dict, cell: int = 36) -> Image.Image:
    """Signed edit x factor grid of effects above the floor (white 0 -> dark red >= 1 bin)."""
    rows = signed_rows(result)
    values = np.array([e["effect"] for *_, e in rows]).reshape(len(rows), len(FACTORS))
    k, f = values.shape
    left, top = 150, 24
    img = Image.new("RGB", (left + f * cell + 10, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(FACTORS):
        draw.text((left + j * cell + 2, 6), name[:6], fill="black")
    for i, (name, label, scale, _) in enumerate(rows):
        draw.text((4, top + i * cell + cell // 3), f"{name} x{scale:g} {label}"[:24], fill="black")
        for j in range(f):
            v = float(np.clip(values[i, j], 0, 1))
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
<p>Effect of each signed edit (direction k at its calibrated -s / +s) on each factor, in bins
above the noise floor (1.0 = one word's bin). Outlined cells are effects of at least
{MIN_EFFECT} bins. Coverage: <b>{result["coverage_count"]}</b>
({html.escape(", ".join(result["coverage"]) or "none")});
alignment score <b>{result["alignment"]:.3f}</b>.</p>
<img src="heatmap.png" alt="effect heatmap"><pre>{html.escape(table)}</pre></body></html>
"""
    atomic_write_bytes(paths["html"], page.encode())
    return paths


def _ci(value: float, interval: list[float], digits: int = 2) -> str:
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def comparison_table(results: dict[str, dict]) -> str:
    """One Markdown table, a row per bank: the pooled score with its 95% bootstrap interval,
    each factor's best quality (consistency x (2 purity - 1)+), and the generated / real split."""
    factors = next(iter(results.values()))["protocol"]["factors"]
    lines = [
        "| row | directions | alignment [95% CI] | coverage [95% CI] | covered | "
        + " | ".join(factors)
        + " | generated | real | broken |",
        "|---|---|---|---|---|" + "---|" * len(factors) + "---|---|---|",
    ]
    for name, r in results.items():
        pooled = r["scores"]["all"]
        ci = pooled["intervals"]
        best = pooled["best_per_factor"]
        split = [r["scores"].get(s, {}).get("alignment") for s in ("generated", "real")]
        broken = [e["broken"] for pair in pooled["edits"] for e in pair]
        lines.append(
            f"| {name} | {r['directions']} | {_ci(pooled['alignment'], ci['alignment'])} | "
            f"{pooled['coverage_count']} [{ci['coverage'][0]:.0f}, {ci['coverage'][1]:.0f}] | "
            f"{', '.join(pooled['coverage']) or '-'} | "
            + " | ".join(f"{best[f]:.2f}" for f in factors)
            + f" | {_fmt2(split[0])} | {_fmt2(split[1])} | {np.mean(broken):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _fmt2(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
