"""Banks as textual-inversion files for the tools people edit images with.

`export_bank` writes one file per direction in the layout each tool loads, named so that the
tool's prompt syntax reaches it, plus one sidecar JSON per file and an index:

    tool        file (token <shapes-3>)       prompt                 tensors in the file
    diffusers   shapes-3.safetensors          "<shapes-3>"           {"<shapes-3>": (1, D)}
    a1111       shapes-3.safetensors          "shapes-3"             {"emb_params": (1, D)}
    comfyui     shapes-3.safetensors          "embedding:shapes-3"   {"emb_params": (1, D)}
    kohya       shapes-3.safetensors          "shapes-3"             {"emb_params": (1, D)}

What each tool reads (from its source; docs/export.md cites the files):

- diffusers `load_textual_inversion`: a dict with one key is {token: embedding}; a dict with
  "string_to_param" is A1111's, token = its "name". A folder loads `weight_name` from it.
- AUTOMATIC1111 `EmbeddingDatabase.load_from_file`: the token is the file stem. A .pt holds its
  own dict ("string_to_param": {"*": (n, D)}, "name", "step", ...); a .safetensors is a flat
  tensor file, which it accepts when it holds exactly one tensor. Embeddings whose width is not
  the loaded model's are skipped. `<stem>.json` beside the file is the card's user metadata
  ("description" is shown on the Textual Inversion card, and searched where the filter reads it).
- ComfyUI `sd1_clip.load_embed`: `embedding:NAME` finds NAME(.safetensors|.pt|.bin) in the
  embeddings folders; it takes "string_to_param" first, else the tensor keyed by the encoder's
  name, else the first tensor; .pt files go through `torch.load(weights_only=True)`.
- kohya sd-scripts: {"emb_params": (n, D)} (train_textual_inversion.py `save_weights`); its
  generation script takes the token from the file stem and n from the tensor's first dimension.

So a1111, comfyui and kohya share their .safetensors layout (one (1, D) tensor under kohya's
key); with `pt=True` a1111 and comfyui get A1111's dict and kohya its {"emb_params"} dict,
written with tensors, str, int and None only (loadable with `torch.load(weights_only=True)`), in
a zip whose entries A1111's safe loader accepts (`pt_bytes`).

Labels, scores and calibrated scales go into `<stem>.json` (A1111's user-metadata keys plus a
"noiseclr" block) and `bank-export.json`, so "hue->green" is findable beside the file; README.md
is the bank card for this format (`noiseclr.card`: each file, its prompt, how the tool loads it).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import struct
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from noiseclr.bank import META_FILE, DirectionBank
from noiseclr.conditioning import as_encoders, text_encoders
from noiseclr.errors import BankError, ConfigError
from noiseclr.formats import FORMATS, load_hint, prompt_syntax, trigger
from noiseclr.utils.images import atomic_write_bytes

INDEX_FILE = "bank-export.json"
KOHYA_KEY = "emb_params"  # kohya's key; A1111 and ComfyUI read a lone tensor under any key
A1111_TOKEN_ID = 265  # the placeholder id A1111 writes in "string_to_token" (it never reads it)

log = logging.getLogger(__name__)


def text_encoder_width(text_encoder) -> int:
    """A direction's width on this text side: SD's encoder's, or the sum of SDXL's two."""
    return sum(as_encoders(text_encoder).widths)


def sdxl_widths(bank: DirectionBank) -> tuple[int, int] | None:
    """(clip_l, clip_g) widths of an SDXL bank's pairs (recorded at discovery), else None."""
    widths = bank.base_model.get("widths")
    if bank.family != "sdxl":
        return None
    if not (isinstance(widths, list) and len(widths) == 2 and sum(widths) == bank.directions.shape[1]):
        raise BankError(f"SDXL bank {bank.name!r} records no encoder widths summing to its directions'")
    return int(widths[0]), int(widths[1])


def check_width(bank: DirectionBank, text_encoder) -> None:
    """One-line BankError when the bank's directions are not token embeddings of this text
    encoder's width. The tools themselves skip such files silently (A1111, Forge), log a warning
    and ignore them (ComfyUI), or raise an unformatted error (diffusers, kohya)."""
    width, dim = text_encoder_width(text_encoder), int(bank.directions.shape[1])
    if width != dim:
        raise BankError(
            f"bank {bank.name!r} has {dim}-dim directions but the text encoder's token embeddings are "
            f"{width}-dim: export a bank learnt on this model's text encoder"
        )


def export_bank(
    bank: DirectionBank, out: str | Path, fmt: str, pt: bool = False, text_encoder=None
) -> list[Path]:
    """Write one embedding file per direction in `fmt`'s layout (safetensors; `.pt` if `pt`),
    a sidecar `<stem>.json` beside each, the card README.md and `bank-export.json`; return the
    embedding files in bank order. With `text_encoder`, first refuse a bank of another width.
    Everything is checked before anything is written; each file is written to a temporary name,
    then renamed. A README.md that is not a noiseclr card is left as it is (no card then)."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    bank.require_tokens("it has no textual-inversion form; view them with `noiseclr gallery`")
    if not torch.isfinite(bank.directions).all():
        raise BankError(f"bank {bank.name!r} has non-finite directions: refusing to export it")
    dim = int(bank.directions.shape[1])
    recorded = bank.base_model.get("hidden_size")
    if isinstance(recorded, int) and recorded != dim:
        raise BankError(
            f"bank {bank.name!r} has {dim}-dim directions but bank.json records a {recorded}-dim "
            "base model: the bank is damaged"
        )
    if text_encoder is not None:
        check_width(bank, text_encoder)
    widths = sdxl_widths(bank)  # SDXL: (clip_l, clip_g)
    if pt and widths:
        raise ConfigError(
            "an SDXL embedding is one safetensors file holding clip_l and clip_g, as every tool "
            "reads it; A1111's .pt dict holds one encoder's: export without --pt"
        )
    out = Path(out)
    if (out / META_FILE).exists():
        raise BankError(f"{out} holds a direction bank ({META_FILE}): export into another folder")
    if INDEX_FILE.removesuffix(".json") in {trigger(t) for t in bank.tokens}:
        raise BankError(f"a token of bank {bank.name!r} would name its sidecar {INDEX_FILE}: rename it")

    suffix = ".pt" if pt else ".safetensors"
    files: dict[Path, bytes] = {}
    entries = []
    for i, token in enumerate(bank.tokens):
        stem = trigger(token)
        path = out / f"{stem}{suffix}"
        vector = bank.directions[i : i + 1].detach().float().cpu().clone().contiguous()  # (1, D)
        files[path] = _embedding_bytes(bank, fmt, pt, token, vector, i, widths)
        entry = _entry(bank, fmt, i, path.name)
        files[out / f"{stem}.json"] = _json_bytes(_sidecar(bank, entry))
        entries.append(entry)
    index = {
        "bank": bank.name,
        "format": fmt,
        "file_type": suffix.lstrip("."),
        "width": dim,
        **({"widths": list(widths)} if widths else {}),
        "base_model": bank.base_model,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load": load_hint(fmt, bank.tokens[0], widths is not None),
        "directions": entries,
    }
    from noiseclr.card import CARD_FILE, bank_card, is_card

    card = out / CARD_FILE
    if card.exists() and not is_card(card):
        log.warning("%s is not a noiseclr bank card: left as it is, no card written", card)
    else:  # the bank card for this format: files, prompts, how the tool loads them
        files[card] = bank_card(bank, export=index).encode()
    for path, data in files.items():
        atomic_write_bytes(path, data)
    atomic_write_bytes(out / INDEX_FILE, _json_bytes(index))  # last: it names the files above
    return [out / e["file"] for e in entries]


def _embedding_bytes(
    bank: DirectionBank,
    fmt: str,
    pt: bool,
    token: str,
    vector: torch.Tensor,
    i: int,
    widths: tuple[int, int] | None,
) -> bytes:
    """The file's bytes: the tensor dict of `fmt` (A1111's full dict in a1111/comfyui .pt); for
    an SDXL pair (`widths`), in every format, SDXL's layout: clip_l (first encoder) and clip_g."""
    if widths:
        tensors = dict(zip(("clip_l", "clip_g"), vector.split(list(widths), dim=1), strict=True))
        tensors = {k: v.contiguous() for k, v in tensors.items()}
    else:
        tensors = {token: vector} if fmt == "diffusers" else {KOHYA_KEY: vector}
    if not pt:
        meta = {
            "noiseclr.bank": bank.name,
            "noiseclr.token": token,
            "noiseclr.index": str(i),
            "noiseclr.base_model": str(bank.base_model.get("source", "")),
            "noiseclr.fingerprint": str(bank.base_model.get("fingerprint", "")),
        }
        return safetensors_bytes(tensors, metadata=meta)
    if fmt in ("a1111", "comfyui"):
        steps = bank.metrics.get("steps", bank.config.get("steps", 0))
        payload: dict[str, Any] = {
            "string_to_token": {"*": A1111_TOKEN_ID},
            "string_to_param": {"*": vector},
            "name": trigger(token),
            "step": int(steps) if isinstance(steps, int | float) else 0,
            "sd_checkpoint": None,  # A1111's hash of a checkpoint file: ours is another hash
            "sd_checkpoint_name": str(bank.base_model.get("source", "")) or None,
        }
    else:
        payload = tensors
    return pt_bytes(payload)


# The zip entries AUTOMATIC1111's safe loader accepts (modules/safe.py check_zip_filenames, v1.8.0):
# <dir>/data.pkl, <dir>/version and <dir>/data/<n>. torch.save also writes .format_version,
# .storage_alignment, byteorder and .data/serialization_id, which the loader takes as a sign of a
# malicious file (v1.10 accepts byteorder and .data/serialization_id; no version the other two).
_A1111_ENTRY = re.compile(r"[^/]+/(data\.pkl|version|data/\d+)")
_ALIGN = 64  # storage data starts at a multiple of this, as torch.save aligns it (for mmap loads)


def pt_bytes(payload: dict[str, Any]) -> bytes:
    """`payload` as a torch .pt zip that AUTOMATIC1111 loads with its default safe unpickler.

    torch.save writes it, then only the entries A1111 allows are copied into a new zip: the
    pickle (torch's own, naming only _rebuild_tensor_v2, FloatStorage and OrderedDict, which
    A1111's unpickler allows), the version record and the raw storages. torch.load reads such a
    file as one from before those records existed: without "byteorder" it takes the data as
    little-endian, hence the refusal on a big-endian machine. The entries carry fixed timestamps,
    so the same payload gives the same bytes."""
    if sys.byteorder != "little":
        raise ConfigError("a .pt export needs a little-endian machine: export safetensors instead")
    saved = io.BytesIO()
    torch.save(payload, saved)
    out = io.BytesIO()
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for entry in src.infolist():
            if not _A1111_ENTRY.fullmatch(entry.filename):
                continue
            info = zipfile.ZipInfo(entry.filename, date_time=(1980, 1, 1, 0, 0, 0))
            if "/data/" in entry.filename:  # pad the local header (an extra field) to align the data
                start = out.tell() + 30 + len(entry.filename.encode()) + 4
                info.extra = struct.pack("<HH", 0x4246, -start % _ALIGN) + b"Z" * (-start % _ALIGN)
            dst.writestr(info, src.read(entry))
    return out.getvalue()


def _entry(bank: DirectionBank, fmt: str, i: int, file: str) -> dict[str, Any]:
    """What is known about direction i, for its sidecar and the index."""
    token = bank.tokens[i]
    score = bank.direction_score(i)
    scales = bank.scales(i)
    duplicate = bank.duplicate_of(i)
    return {
        "index": i,
        "token": token,
        "trigger": trigger(token),
        "prompt": prompt_syntax(fmt, token),
        "file": file,
        "labels": dict(bank.labels.get(token, {})),
        "score": score.score if score else None,
        "interval": list(score.interval) if score else None,
        "rank": score.rank if score else None,
        "dead": None if bank.state(i) == "unmeasured" else bank.state(i) == "dead",
        "duplicate_of": bank.tokens[duplicate] if duplicate is not None else None,
        # noiseclr's calibrated edit strengths (lambda of the noise-difference edit, for
        # `noiseclr edit`), not prompt weights of the tool.
        "edit_scales": list(scales) if scales else None,
        "edit_window": list(bank.window(i)),
    }


def _sidecar(bank: DirectionBank, entry: dict[str, Any]) -> dict[str, Any]:
    """A1111's user-metadata keys ("description", "notes") plus everything in a "noiseclr" block."""
    labels = entry["labels"]
    words = [labels[k] for k in ("human", "auto") if labels.get(k)]
    parts = [entry["trigger"], *words]
    if entry["dead"]:
        parts.append("dead")
    if entry["duplicate_of"]:
        parts.append(f"duplicate of {trigger(entry['duplicate_of'])}")
    if entry["score"] is not None:
        parts.append(f"score {entry['score']:.3g}")
    if entry["edit_scales"]:
        low, high = entry["edit_scales"]
        parts.append(f"noiseclr scales {low:g}..{high:+g}")
    if entry["edit_window"]:
        parts.append("window {}-{}".format(*entry["edit_window"]))
    source = bank.base_model.get("source")
    notes = (
        f"NoiseCLR direction {entry['index']} of bank {bank.name!r}, learnt on base model {source!r} "
        f"(fingerprint {bank.base_model.get('fingerprint')}). Prompt: {entry['prompt']}. Edit scales "
        "and window are noiseclr's calibrated edit settings (`noiseclr edit`), not prompt weights."
    )
    return {
        "description": " | ".join(parts),
        "notes": notes,
        "noiseclr": {"bank": bank.name, "base_model": bank.base_model, **entry},
    }


def _json_bytes(obj: Any) -> bytes:
    """Strict JSON (a non-finite score becomes null): the tools' readers need not accept NaN."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=2, allow_nan=False).encode()


def read_index(folder: str | Path) -> dict[str, Any]:
    """The export's bank-export.json, or a one-line BankError."""
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise BankError(f"{folder} is not a noiseclr export (no {INDEX_FILE})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BankError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(index, dict) or not {"width", "directions", "format"} <= set(index):
        raise BankError(f"{path} lacks width, format or directions: not an export this version wrote")
    return index


def load_exported(pipe, folder: str | Path) -> list[str]:
    """Load every file of an export (any format) into a diffusers pipeline, each under the bank's
    token ("<shapes-3>"); refuse, in one line, an export of another width or tokens already
    present. Returns the tokens."""
    index = read_index(folder)
    encoders = text_encoders(pipe)
    width = text_encoder_width(encoders)
    if int(index["width"]) != width:
        raise BankError(
            f"{folder}: bank {index.get('bank')!r} has {index['width']}-dim directions but the "
            f"pipeline's text encoder takes {width}-dim token embeddings"
        )
    odd = [e.get("file") for e in index["directions"] if not _plain_name(e.get("file"))]
    if odd:
        raise BankError(f"{folder}/{INDEX_FILE} names {odd[0]!r}: not a file name of this folder")
    tokens = [e["token"] for e in index["directions"]]
    present = [t for t in tokens if t in pipe.tokenizer.get_vocab()]
    if present:
        raise BankError(f"tokens already in the pipeline's tokenizer: {present[:4]}")
    for entry in index["directions"]:
        if not encoders.sdxl:
            pipe.load_textual_inversion(str(folder), weight_name=entry["file"], token=entry["token"])
            continue
        halves = load_file(str(Path(folder) / entry["file"]))  # SDXL: each half into its encoder
        for key, encoder, tokenizer in zip(
            ("clip_l", "clip_g"), encoders.encoders, encoders.tokenizers, strict=True
        ):
            pipe.load_textual_inversion(
                halves[key], token=entry["token"], text_encoder=encoder, tokenizer=tokenizer
            )
    return tokens


def _plain_name(name: Any) -> bool:
    """A file directly in the export folder (an index from elsewhere must not point outside it)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\\" in name:
        return False
    return Path(name).name == name
