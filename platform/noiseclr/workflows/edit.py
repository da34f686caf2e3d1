"""The edit workflow behind `noiseclr edit`: banks by name, edits parsed in their units, an
image generated from a seed or a real one inverted, then the before/after pair or a sweep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noiseclr.bank import DirectionBank
from noiseclr.editing import sampler
from noiseclr.editing.defaults import INVERSION_STEPS, SEED_STEPS
from noiseclr.errors import BankError, EditError
from noiseclr.models.base import DiffusionModel


def open_banks(refs: list[str], model: DiffusionModel | None = None) -> dict[str, DirectionBank]:
    """Banks by the name in their bank.json, from folders or models:/ references (checked
    against `model`); two of one name are refused, as an edit addresses a bank by it."""
    from noiseclr.tracking.registry import open_bank  # imports mlflow only for models:/

    banks: dict[str, DirectionBank] = {}
    for ref in refs:
        bank = open_bank(ref, model)
        if bank.name in banks:
            raise BankError(f"two banks are named {bank.name!r} ({ref}); rename one in its bank.json")
        banks[bank.name] = bank
    return banks


def sweep_scales(edit: str, values: list[float], banks: dict[str, DirectionBank]) -> list[float]:
    """Raw scales of `edit`'s direction for `values` in the edit's own units (the measured
    strength, when its bank has one), its window kept."""
    target, _, value = edit.rpartition("=")
    window = value[value.index("@") :] if "@" in value else ""
    return [sampler.parse_edit(f"{target}={v}{window}", banks).scale for v in values]


@dataclass
class Edited:
    images: np.ndarray  # (N, H, W, 3) uint8: before and after, or one per sweep scale
    edits: list[sampler.Edit]
    inversion_error: float | None  # mean |pixel| error of the real image's reconstruction


def edit_image(
    model: DiffusionModel,
    banks: dict[str, DirectionBank],
    edits: list[str],
    image: Path | None = None,
    seed: int = 0,
    prompt: str | None = None,
    sweep: list[float] | None = None,
    steps: int | None = None,
) -> Edited:
    """`edits` (`[bank:]direction=scale[@t_high-t_low]`) applied together to a generated image
    (`seed`, `prompt`) or to `image` (DDIM-inverted, unconditional); with `sweep`, the first
    edit alone at each of those scales instead of the before/after pair."""
    from noiseclr.data.images import read_image_file
    from noiseclr.models.generate import default_guidance

    parsed = [sampler.parse_edit(e, banks) for e in edits]
    scales = sweep_scales(edits[0], sweep, banks) if sweep else None
    if steps is None:
        steps = INVERSION_STEPS if image is not None else SEED_STEPS
    error = None
    if image is not None:
        pixels = read_image_file(image, model.resolution)
        x_T, start_t, before, error = sampler.invert_real(model, pixels, steps, progress=True)
        prompt, guidance = None, 1.0
    else:
        x_T, start_t, before = sampler.seed_latents(model, [seed]), None, None
        guidance = default_guidance(model) if prompt else 1.0
    if scales is not None:
        images = sampler.scale_sweep(
            model, x_T, parsed[0], scales, prompt, guidance, steps, start_t, progress=True
        )
        return Edited(images[0], parsed, error)

    def run(with_edits: list[sampler.Edit], start: int | None) -> np.ndarray:
        latents = sampler.sample(
            model, x_T, with_edits, prompt=prompt, guidance_scale=guidance, steps=steps, start_t=start,
            progress=True,
        )  # fmt: skip
        return sampler.decode(model, latents)

    if before is None:
        before = run([], None)
    return Edited(np.concatenate([before, run(parsed, start_t)]), parsed, error)


def parse_sweep(text: str) -> list[float]:
    """`--sweep -2,-1,0,1,2` as numbers (EditError otherwise)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise EditError(f"--sweep takes comma-separated numbers, got {text!r}") from None


def draw_gallery(
    model: DiffusionModel,
    ref: str,
    out: Path | None = None,
    scale: float | None = None,
    columns: int = 5,
    seeds: int = 3,
    prompt: str | None = None,
    steps: int = 25,
) -> dict[str, Path]:
    """The gallery of bank `ref` (PNG grid and HTML page): columns from -scale to +scale, by
    default 2 units of the measured strength for a measured bank, else 6 raw units. Drawn beside
    a bank folder, it goes on the bank's card."""
    from noiseclr.card import write_card
    from noiseclr.editing.gallery import write_gallery
    from noiseclr.tracking.registry import bank_folder, is_registered, output_beside

    folder = bank_folder(ref)
    bank = DirectionBank.load(folder, model)
    top = scale if scale is not None else 2.0 if bank.measured else 6.0
    scales = [round(float(s), 4) for s in np.linspace(-top, top, columns)]
    target = out or output_beside(ref, folder, "gallery")
    pages = write_gallery(model, bank, target, scales, list(range(seeds)), prompt, steps)
    if not is_registered(ref) and Path(target).resolve() == (folder.parent / "gallery").resolve():
        write_card(folder, bank)  # the card shows the gallery beside the bank
    return pages
