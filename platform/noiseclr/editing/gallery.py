"""Galleries: what each direction of a bank does, as a PNG grid and an HTML page.

Rows are (direction, seed) pairs, columns are scales from -s to +s; the middle column (scale 0)
is the unedited image. Each direction's strip is also saved alone for the page. Scales and the
window follow the bank's edit defaults where it has them (as `noiseclr edit` does): a column
of 1 is then the direction's measured clean edit.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from noiseclr.bank import DirectionBank
from noiseclr.editing import request
from noiseclr.editing.sampler import sweep_direction
from noiseclr.models.base import DiffusionModel
from noiseclr.utils import parallel
from noiseclr.utils.images import atomic_write_bytes, make_grid, save_png


def render_gallery(
    model: DiffusionModel,
    bank: DirectionBank,
    scales: list[float],
    seeds: list[int],
    prompt: str | None = None,
    steps: int = 25,
    progress: bool = True,
) -> np.ndarray:
    """(K, n_seeds, n_scales, H, W, 3) images: every direction swept over `scales` at each seed
    (directions drawn concurrently on a CPU's cores: utils.parallel)."""
    start = request.from_seeds(model, seeds, prompt=prompt or "", steps=steps)  # prompt None: unconditional

    def sweep(k: int) -> np.ndarray:
        raw = bank.raw_scales(k, scales)
        return sweep_direction(
            model, bank, k, start.x_T, raw, start.prompt, start.guidance, steps, window=bank.window(k),
            generator=start.generators(),
        )  # fmt: skip

    return np.stack(parallel.map_ordered(sweep, range(len(bank)), model.device, "gallery", progress))


def direction_label(bank: DirectionBank, i: int) -> str:
    """The bank's label, else the token."""
    return bank.label(i) or bank.tokens[i]


def state_mark(bank: DirectionBank, i: int) -> str:
    """ " [dead]", " [= #j]" (a duplicate of direction j) or "" from the bank's measurement."""
    kind = bank.state(i)
    if kind == "dead":
        return " [dead]"
    return f" [= #{bank.duplicate_of(i)}]" if kind == "duplicate" else ""


def measured_note(bank: DirectionBank) -> str:
    s = bank.scores
    if s is None:
        return "Not measured: directions in bank order (<code>noiseclr measure BANK</code> ranks them)."
    return (
        f"Directions best first by the oracle-free score (bank {s.score:.2f}, {s.live} live, "
        f"{s.dead} dead, greyed); a duplicate names the direction it repeats."
    )


def labelled(grid: Image.Image, rows: list[str], per_row: int, columns: list[str], cell: int) -> Image.Image:
    """The grid with a header of column labels (scales) and each direction's label at the left
    of its first row. Geometry follows `make_grid`: pad 2, then the whole grid scaled."""
    from PIL import ImageDraw

    scale = grid.height // (len(rows) * per_row * (cell + 2) + 2)
    step, pad = (cell + 2) * scale, 2 * scale
    left, top = 8 + 7 * max(len(r) for r in rows), 14
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(columns):
        draw.text((left + pad + j * step + step // 2 - 3 * len(text), 1), text, fill="black")
    for i, text in enumerate(rows):
        draw.text((4, top + pad + i * per_row * step + step // 2 - 6), text, fill="black")
    return out


def write_gallery(
    model: DiffusionModel,
    bank: DirectionBank,
    out_dir: str | Path,
    scales: list[float],
    seeds: list[int],
    prompt: str | None = None,
    steps: int = 25,
) -> dict[str, Path]:
    """Write gallery.png, one strip PNG per direction and index.html under out_dir."""
    out_dir = Path(out_dir)
    (out_dir / "directions").mkdir(parents=True, exist_ok=True)
    images = render_gallery(model, bank, scales, seeds, prompt, steps)  # (K, S, C, H, W, 3)
    k, n_seeds, n_scales = images.shape[:3]
    order = bank.ranked()  # best first by the oracle-free score; bank order if unmeasured
    scale_up = 2 if model.resolution < 128 else 1
    ranked = images[order]
    grid = make_grid(ranked.reshape(k * n_seeds * n_scales, *images.shape[3:]), cols=n_scales, scale=scale_up)
    names = [f"{i} {direction_label(bank, i)}{state_mark(bank, i)}" for i in order]
    save_png(
        labelled(grid, names, n_seeds, [f"{s:+g}" for s in scales], images.shape[3]), out_dir / "gallery.png"
    )
    rows = []
    for i in order:
        strip = make_grid(
            images[i].reshape(n_seeds * n_scales, *images.shape[3:]), cols=n_scales, scale=scale_up
        )
        save_png(strip, out_dir / "directions" / f"{i:03d}.png")
        labels = bank.labels.get(bank.tokens[i], {})
        label = " / ".join(html.escape(v) for v in labels.values() if v) or "&mdash;"
        d = bank.direction_score(i)
        score = f"{d.score:.2f} [{d.interval[0]:.2f}, {d.interval[1]:.2f}]" if d else "&mdash;"
        dead = ' class="dead"' if bank.state(i) == "dead" else ""
        state = state_mark(bank, i).strip(" []") or ("live" if d else "-")
        hi, lo = bank.window(i)
        rows.append(
            f"<tr{dead}><td>{i}</td><td><code>{html.escape(bank.tokens[i])}</code></td><td>{label}</td>"
            f"<td>{score}</td><td>{html.escape(state)}</td><td>{lo}&ndash;{hi}</td>"
            f'<td><img src="directions/{i:03d}.png" alt="direction {i}"></td></tr>'
        )
    window = bank.window()
    own = "each direction's measured window (column t)" if bank.has_own_windows else ""
    units = "; in units of each direction's measured strength" if bank.measured else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>NoiseCLR bank {html.escape(bank.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 8px;vertical-align:middle}}
img{{image-rendering:pixelated}} code{{background:#eee;padding:1px 4px}}
tr.dead{{opacity:.45}}</style></head><body>
<h1>Direction bank <code>{html.escape(bank.name)}</code></h1>
<p>{k} directions on base model <code>{html.escape(str(bank.base_model.get("source")))}</code>
(fingerprint {html.escape(str(bank.base_model.get("fingerprint")))}). Each strip: rows are seeds
{", ".join(map(str, seeds))}; columns are scales {", ".join(f"{s:+g}" for s in scales)}
(0 = unedited{units}), edits acting {own or f"for {window[1]} &le; t &le; {window[0]}"}.
Prompt: <code>{html.escape(prompt or "(none: unconditional)")}</code>.
{measured_note(bank)}</p>
<table><thead><tr><th>#</th><th>token</th><th>label</th><th>score</th><th>state</th><th>t</th>
<th>scales &rarr;</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Training</h2><pre>{html.escape(json.dumps(bank.metrics, indent=2, default=str))}</pre>
<pre>{html.escape(json.dumps(bank.config, indent=2, default=str))}</pre>
</body></html>
"""
    atomic_write_bytes(out_dir / "index.html", page.encode())
    return {"grid": out_dir / "gallery.png", "html": out_dir / "index.html"}
