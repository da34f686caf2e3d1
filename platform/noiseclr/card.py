"""Bank cards: a README.md in the Hugging Face model-card form beside every bank and export.

    ---
    base_model: shapes                 # the bank's base model (bank.json base_model.source)
    library_name: noiseclr             # diffusers for a diffusers export: it loads those files
    tags: [noiseclr, textual_inversion, diffusion-directions, shapes]
    noiseclr: {bank, base_model_fingerprint, hidden_size, directions, method, ...}
    ---
    # what the bank is; a table of its directions (label, oracle-free score, live / dead /
    # duplicate, calibrated scales, window); the gallery; how it was trained; its measurements;
    # how to load it with `noiseclr edit`, NoiseCLRPipeline and each export format.

`bank_card` is pure text from the bank's own record (no model is loaded). `write_card` writes
it as README.md, and only over a README.md that is a card this module wrote: a file of the
user's own is left as it is. `DirectionBank.save` and `export_bank` call it, so every bank
folder, registered version and export carries one (docs/bank-card.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from noiseclr.formats import FORMATS, load_hint, prompt_syntax, trigger
from noiseclr.utils.images import atomic_write_bytes

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
GALLERY_FILE = "gallery.png"
MARKER = "<!-- noiseclr bank card: rewritten whenever noiseclr saves this folder -->"
TRAINING_KEYS = (  # the config values a reader needs to judge or repeat the run, in this order
    "model",
    "k",
    "steps",
    "lr",
    "batch",
    "negatives",
    "loss",
    "tau",
    "strength_weight",
    "n_images",
    "seed",
    "workers",
)
TOOLS = {
    "diffusers": "diffusers",
    "a1111": "AUTOMATIC1111",
    "comfyui": "ComfyUI",
    "kohya": "kohya sd-scripts",
}


def cell(text: Any) -> str:
    """Any text as one markdown table cell: on one line, no '|' that splits the row, no HTML or
    emphasis a label could inject ('hue->green' shows as typed)."""
    text = " ".join(str(text).split())
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "|`*_[]#":
        text = text.replace(ch, "\\" + ch)
    return text or "&mdash;"


def code(text: Any) -> str:
    """`text` as inline code, or escaped plain text when it holds a backtick or a '|'."""
    text = " ".join(str(text).split())
    return f"`{text}`" if text and "`" not in text and "|" not in text else cell(text)


def number(value: Any, digits: int = 3) -> str:
    """A finite number to `digits` significant figures; anything else (None, NaN, "nan"): a dash."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "&mdash;"
    return f"{value:.{digits}g}"


def interval(pair: Any) -> str:
    if isinstance(pair, list | tuple) and len(pair) == 2:
        return f"[{number(pair[0])}, {number(pair[1])}]"
    return ""


def state(bank, i: int) -> str:
    """The card's words for the bank's `state`: a duplicate names the direction it repeats."""
    kind = bank.state(i)
    if kind == "dead":
        return "**dead**"
    if kind == "duplicate":
        j = bank.duplicate_of(i)
        return f"duplicate of {j} ({code(bank.tokens[j])})"
    return kind


def header(bank, export: dict | None) -> dict[str, Any]:
    """The card's YAML metadata: Hugging Face's keys, then a `noiseclr` block of our own."""
    fmt = export.get("format") if export else None
    tags = ["noiseclr"]
    if bank.method == "noiseclr":
        tags.append("textual_inversion")  # diffusers' own tag for textual-inversion embeddings
    tags += ["diffusion-directions", bank.name]
    if fmt:
        tags.append(fmt)
    ours: dict[str, Any] = {
        "bank": bank.name,
        "base_model_fingerprint": str(bank.base_model.get("fingerprint", "")),
        "hidden_size": int(bank.directions.shape[1]),
        "directions": len(bank),
        "method": bank.method,
    }
    scores = bank.scores
    if scores is not None and math.isfinite(scores.score):
        ours.update(score=scores.score, live=scores.live, dead=scores.dead)
    if bank.calibration:
        ours["calibration"] = bank.calibration
    if fmt:
        ours["export"] = {"format": fmt, "file_type": export.get("file_type", "safetensors")}
    return {
        "base_model": str(bank.base_model.get("source", "")),
        # A diffusers export loads with diffusers' own load_textual_inversion; a bank folder (one
        # (K, D) tensor plus bank.json) and the other tools' layouts only load through noiseclr.
        "library_name": "diffusers" if fmt == "diffusers" else "noiseclr",
        "tags": tags,
        "noiseclr": ours,
    }


def bank_card(bank, gallery: str | Path | None = None, export: dict | None = None) -> str:
    """The card of `bank` as markdown with a YAML header. `gallery`: the gallery image's link,
    relative to the card (shown when given). `export`: the export's index (bank-export.json's
    dict: format, file_type, directions with file and prompt) for the card of an export folder."""
    meta = yaml.safe_dump(header(bank, export), sort_keys=False, allow_unicode=True, width=1000)
    source = str(bank.base_model.get("source", ""))
    fingerprint = bank.base_model.get("fingerprint")
    lines = ["---", meta.rstrip(), "---", MARKER, ""]
    what = f"{len(bank)} NoiseCLR directions"
    if export:
        what += f" for {TOOLS.get(export.get('format'), export.get('format'))}"
    lines += [f"# {cell(bank.name)}: {what} on {code(source)}", ""]
    if bank.method == "pullback":
        lines.append(
            f"A bank of {len(bank)} global x_t directions found by the pullback method "
            f"({int(bank.directions.shape[1])}-dim latent vectors), learnt on base model {code(source)} "
            f"(fingerprint {code(fingerprint)}). They are applied once at the bank's t_edit; view them "
            "with `noiseclr gallery`."
        )
    else:
        lines.append(
            f"A direction bank found by NoiseCLR (unsupervised contrastive discovery, CVPR 2024): "
            f"{len(bank)} token embeddings ({int(bank.directions.shape[1])}-dim) in the input space of "
            f"the text encoder of base model {code(source)} (fingerprint {code(fingerprint)}). Each "
            "direction d is an edit: `eps(x_t, c) + lambda * (eps(x_t, d) - eps(x_t, empty))` over a "
            "timestep window, with lambda the direction's calibrated scale."
        )
    if source == "shapes":
        lines.append(
            "\n`shapes` is the small text-to-image model shipped inside the noiseclr package "
            "(`platform/noiseclr/pretrained/shapes`), not a Hugging Face Hub id; its directions load "
            "only into that model."
        )
    lines += ["", *_summary(bank), "", *_directions(bank, export)]
    if gallery:
        lines += [
            "",
            "## Gallery",
            "",
            f"![what each direction does]({Path(gallery).as_posix()})",
            "",
            "Rows: directions in the table's order, each over a few seeds; columns: edit scales "
            "(in units of the calibrated scale on a measured bank).",
        ]
    lines += ["", *_training(bank), *_evaluation(bank), "", *_usage(bank, export)]
    return "\n".join(lines).rstrip() + "\n"


def _summary(bank) -> list[str]:
    s = bank.scores
    if s is None:
        return [
            "Not measured yet: `noiseclr measure BANK` (any model) or `noiseclr evaluate BANK` "
            "(the shapes world's oracle) scores the directions and calibrates their scales."
        ]
    parts = [f"Oracle-free score {number(s.score)} {interval(s.interval)}".rstrip()]
    parts.append(f"{s.live} of {len(bank)} directions live, {s.dead} dead")
    if s.distinct_live is not None:
        parts.append(f"{s.distinct_live} distinct live")
    return [", ".join(parts) + " (`noiseclr measure`; docs/oracle-free.md)."]


def _directions(bank, export: dict | None) -> list[str]:
    if bank.measured:
        how = {"oracle": "by the shapes world's oracle", "blind": "without an oracle"}.get(
            bank.calibration, ""
        )
        unit = (
            f"Scales `-s / +s` are the calibrated edit strengths{' ' + how if how else ''}: in "
            "`noiseclr edit` a scale of 1 means +s and -1 means -s."
        )
    else:
        unit = "The bank has no calibrated scales: `noiseclr edit` takes raw scales."
    order = (
        "Best first by the oracle-free score (rank), each duplicate after the direction it repeats, "
        "dead ones last."
        if bank.scores is not None
        else "In bank order (not measured)."
    )
    files = {e["index"]: e for e in (export or {}).get("directions", []) if isinstance(e, dict)}
    head = ["rank", "index", "token", "label", "score [interval]", "state", "scales -s / +s", "window"]
    if export:
        head += ["file", "prompt"]
    rows = [
        "## Directions",
        "",
        f"{order} {unit} Window: the timesteps `t_high-t_low` the edit acts in.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i in bank.ranked():
        figures = bank.direction_score(i)
        rank = figures.rank if figures else None
        score = f"{number(figures.score)} {interval(figures.interval)}" if figures else ""
        pair = bank.scales(i)
        scale = f"{number(pair[0])} / {'+' if pair[1] >= 0 else ''}{number(pair[1])}" if pair else "raw"
        span = bank.window(i)
        row = [
            str(rank) if isinstance(rank, int) else "&mdash;",
            str(i),
            code(bank.tokens[i]),
            cell(bank.label(i) or ""),
            score.strip() or "&mdash;",  # our own figures: digits, '[', ',' and ']' only
            state(bank, i),
            scale,
            f"{span[0]}-{span[1]}",
        ]
        if export:
            entry = files.get(i, {})
            row += [code(entry.get("file", "")), code(entry.get("prompt", ""))]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def _training(bank) -> list[str]:
    cfg, metrics = bank.config, bank.metrics
    rows: list[tuple[str, Any]] = []
    if cfg.get("data"):
        rows.append(("data", cfg["data"]))
    elif "world_fixed" in cfg:  # no data given: images of the shapes world
        fixed = ", ".join(f"{k}={v}" for k, v in (cfg.get("world_fixed") or {}).items())
        rows.append(("data", "the shapes world" + (f", fixed {fixed}" if fixed else "")))
    for key in TRAINING_KEYS:
        value = metrics.get(key) if key == "steps" and "steps" in metrics else cfg.get(key)
        if value is None or value == "":
            continue
        rows.append((key, value))
    if "t_min" in cfg or "t_max" in cfg:
        rows.append(("t_min-t_max", f"{cfg.get('t_min', 0)}-{cfg.get('t_max', 999)}"))
    for key in ("images", "train_seconds", "final_loss"):  # what the run did
        if metrics.get(key) is not None:
            rows.append((key, number(metrics[key], 4) if key == "final_loss" else metrics[key]))
    if not rows:
        return []
    out = ["## Training", "", "| setting | value |", "|---|---|"]
    out += [f"| {code(k)} | {cell(v)} |" for k, v in rows]
    out += ["", "`bank.json` holds the full discovery config (`config`) and the run's figures (`metrics`)."]
    return out


def _evaluation(bank) -> list[str]:
    ev = bank.metrics.get("evaluation")
    if not isinstance(ev, dict) or ev.get("alignment") is None:
        return []
    coverage = ev.get("coverage") or []
    protocol = ev.get("protocol") or {}
    line = (
        f"Alignment {number(ev['alignment'])} {interval(ev.get('interval'))}; factors some direction "
        f"moves cleanly: {cell(', '.join(map(str, coverage))) if coverage else 'none'}"
    )
    if ev.get("fidelity") is not None:
        line += f"; fidelity {number(ev['fidelity'])}"
    if protocol.get("n_images"):
        line += f" ({protocol['n_images']} images per direction"
        line += (
            f", window {protocol['window'][0]}-{protocol['window'][1]})" if protocol.get("window") else ")"
        )
    return ["", "## Evaluation (the shapes world's oracle)", "", line + ". Report: `noiseclr evaluate BANK`."]


def _example(bank) -> tuple[int, str]:
    """The best live direction (else the first) and a scale that visibly edits with it."""
    order = bank.ranked()
    live = [i for i in order if bank.state(i) != "dead"]
    i = (live or order or [0])[0]
    return i, "1" if bank.measured else "4"


def _usage(bank, export: dict | None) -> list[str]:
    source = str(bank.base_model.get("source", ""))
    i, scale = _example(bank)
    if export:
        return _export_usage(bank, export, i)
    out = ["## How to use it", ""]
    if bank.method == "pullback":
        gallery = ["```bash", f"noiseclr gallery BANK --model {source}", "```"]
        return [*out, *gallery, "", "BANK is this folder, or a registered version `models:/NAME@ALIAS`."]
    out += [
        "BANK is this folder, or a registered version `models:/NAME@ALIAS` (`noiseclr banks list`).",
        "",
        "**noiseclr** (edit a seed, or a real image by DDIM inversion; a direction is its index, token or "
        "label):",
        "",
        "```bash",
        f"noiseclr edit {i}={scale} --bank BANK --model {source} --seed 0 --out edit.png",
        f"noiseclr edit {i}={scale} --bank BANK --model {source} --image photo.png --out edit.png",
        f"noiseclr gallery BANK --model {source}",
        "```",
        "",
        "**diffusers** (`NoiseCLRPipeline`, a StableDiffusionPipeline, or StableDiffusionXLPipeline for "
        "an SDXL model, whose call is `noiseclr edit`; docs/pipeline.md):",
        "",
        "```python",
        "from noiseclr.editing.pipeline import NoiseCLRPipeline",
        "",
        f"pipe = NoiseCLRPipeline.from_pretrained({json.dumps(source)})",
        'pipe.load_bank("BANK")',
        f'image = pipe(edits={{"{i}": {float(scale)}}}, seed=0).images[0]',
        "```",
        "",
        "**Other tools**: `noiseclr export BANK --format FORMAT --out DIR` writes one textual-inversion "
        "file per direction (docs/export.md). The token goes into the prompt there, which is not "
        "noiseclr's scaled edit: a prompt weight is not the scale above.",
        "",
        "| tool | --format | prompt for direction " + str(i) + " | load |",
        "|---|---|---|---|",
    ]
    for fmt in FORMATS:
        prompt = code(prompt_syntax(fmt, bank.tokens[i]))
        hint = load_hint(fmt, bank.tokens[i], bank.family == "sdxl")
        out.append(f"| {TOOLS[fmt]} | `{fmt}` | {prompt} | {cell(hint)} |")
    out += [
        "",
        f"{_takes(bank)}: the base model above.",
    ]
    return out


def _takes(bank) -> str:
    """Which text encoders the files load into (SDXL: its two, clip_l and clip_g)."""
    widths = bank.base_model.get("widths")
    if bank.family == "sdxl" and isinstance(widths, list) and len(widths) == 2:
        return (
            f"The files load into an SDXL model whose two text encoders take {widths[0]}-dim (clip_l) "
            f"and {widths[1]}-dim (clip_g) token embeddings"
        )
    width = int(bank.directions.shape[1])
    return f"The files load into a model whose text encoder takes {width}-dim token embeddings"


def _export_usage(bank, export: dict, i: int) -> list[str]:
    fmt = export.get("format")
    token = bank.tokens[i]
    stem = trigger(token)
    sdxl = bank.family == "sdxl"
    suffix = "." + str(export.get("file_type", "safetensors"))
    out = [
        f"## How to load it in {TOOLS.get(fmt, fmt)}",
        "",
        f"Prompt syntax: {code(prompt_syntax(fmt, token))} for direction {i} (the table's `prompt` "
        f"column for the others). Load: {cell(load_hint(fmt, token, sdxl))}.",
        "",
    ]
    if fmt == "diffusers":
        out += [
            "```python",
            f'pipe.load_textual_inversion("EXPORT", weight_name="{stem}{suffix}")  # token {token}',
            "# or every file, with width and token checks:",
            "from noiseclr.export import load_exported",
            'load_exported(pipe, "EXPORT")',
            "```",
            "",
            "EXPORT is this folder.",
        ]
    out += [
        "",
        "The tokens go into the prompt (textual-inversion use); the scales and windows above are "
        "noiseclr's calibrated edit settings (`noiseclr edit` on the bank folder), not prompt weights. "
        f"{_takes(bank)}: the base model above. Each file's `.json` sidecar and `bank-export.json` "
        "hold the same labels, scores and scales (docs/export.md).",
    ]
    return out


def is_card(path: Path) -> bool:
    """Whether `path` is a card this module wrote (and may be rewritten)."""
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def write_card(
    folder: str | Path,
    bank,
    gallery: str | Path | None = None,
    find_gallery: bool = True,
    export: dict | None = None,
) -> Path | None:
    """Write `folder`/README.md; returns its path, or None when a README.md of someone else's is
    there (left untouched, with a warning). `gallery`: the gallery image's path; without it and
    with `find_gallery`, `folder/../gallery/gallery.png` when it exists (what `noiseclr discover`
    and `noiseclr gallery` write beside a bank). The link is relative to the card."""
    folder = Path(folder)
    path = folder / CARD_FILE
    if path.exists() and not is_card(path):
        log.warning("%s is not a noiseclr bank card: left as it is, no card written", path)
        return None
    if gallery is None and find_gallery:
        gallery = folder.parent / "gallery" / GALLERY_FILE
    link = None
    if gallery is not None and Path(gallery).is_file():
        link = Path(os.path.relpath(Path(gallery).resolve(), folder.resolve())).as_posix()
    atomic_write_bytes(path, bank_card(bank, gallery=link, export=export).encode())
    return path


def save_bank(bank, folder: str | Path) -> Path:
    """Save `bank` into `folder` and write its card beside it (the gallery beside the folder, if
    any): what every command that writes a bank folder does. A card that fails to render is a
    warning: the card is derived from bank.json, never worth losing a bank to."""
    folder = bank.save(folder)
    try:
        write_card(folder, bank)
    except Exception as err:
        log.warning("the bank is saved in %s but its card README.md is not (%s)", folder, err)
    return folder
