"""Publishing a bank for other tools: textual-inversion files for diffusers, AUTOMATIC1111,
ComfyUI or kohya (`export.py` writes them), from a folder or a registered version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from noiseclr.errors import ConfigError


@dataclass
class Exported:
    paths: list[Path]  # one embedding file per direction
    index: dict  # bank-export.json: how to load them, one entry per direction
    note: str | None  # a warning for the user (the bank was learnt on another model), else None


def export(ref: str, out: str | Path, fmt: str, pt: bool = False, model: str | None = None) -> Exported:
    """Write bank `ref` in `fmt`; with `model`, refuse a bank whose width is not its text
    encoder's, and note a bank learnt on another model (its tokens load but may mean else)."""
    from noiseclr.conditioning import text_encoders
    from noiseclr.export import FORMATS, export_bank, read_index
    from noiseclr.tracking.registry import open_bank

    if fmt not in FORMATS:  # before opening the bank or loading a model
        raise ConfigError(f"--format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    bank = open_bank(ref)
    encoder, note = None, None
    if model is not None:
        from noiseclr.models.base import load_model

        base = load_model(model, device="cpu")
        encoder = text_encoders(base.pipe)  # SDXL: both encoders
        if not base.identifies(bank.base_model.get("fingerprint")):
            note = (
                f"note: bank {bank.name!r} was learnt on {bank.base_model.get('source')!r}, not on "
                f"{model!r}: its tokens load there but may not mean the same"
            )
    paths = export_bank(bank, out, fmt, pt=pt, text_encoder=encoder)
    return Exported(paths, read_index(out), note)
