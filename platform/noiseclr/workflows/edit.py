"""The edit workflow behind `noiseclr edit`: banks by name, edits parsed in their units, an
image generated from a seed or a real one inverted, then the before/after pair or a sweep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noiseclr.bank import DirectionBank
from noiseclr.editing import request, sampler
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
    images: np.ndarray  # (N, H, W, 3) floats in [0, 1]: before and after, or one per sweep scale
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
    (`seed`, `prompt`: by default the edited bank's domain prompt, "" for none) or to `image`
    (DDIM-inverted, unconditional); with `sweep`, the first edit alone at each of those scales
    instead of the before/after pair. Requests resolve as the endpoint's (`editing.request`)."""
    from noiseclr.data.images import read_image_file

    parsed = [sampler.parse_edit(e, banks) for e in edits]
    scales = sweep_scales(edits[0], sweep, banks) if sweep else None
    if image is not None:
        start = request.from_pixels(read_image_file(image, model.resolution), steps)
        request.invert(model, [start], progress=True, reconstruct=True)
    else:
        start = request.from_seeds(model, [seed], request.prompt_banks(parsed, banks), prompt, steps=steps)
    if scales is not None:
        images = sampler.scale_sweep(
            model, start.x_T, parsed[0], scales, start.prompt, start.guidance, start.steps, start.start_t,
            progress=True, generator=start.generators(),
        )  # fmt: skip
        return Edited(images[0], parsed, start.error)

    def run(with_edits: list[sampler.Edit]) -> np.ndarray:
        latents = sampler.sample(
            model, start.x_T, with_edits, prompt=start.prompt, guidance_scale=start.guidance,
            steps=start.steps, start_t=start.start_t, progress=True, generator=start.generators(),
        )  # fmt: skip
        return sampler.decode(model, latents)

    before = start.before if start.before is not None else run([])
    return Edited(np.concatenate([before, run(parsed)]), parsed, start.error)


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
    prompt = (request.domain_prompt([bank]) if prompt is None else prompt) or None  # "": unconditional
    top = scale if scale is not None else 2.0 if bank.measured else 6.0
    scales = [round(float(s), 4) for s in np.linspace(-top, top, columns)]
    target = out or output_beside(ref, folder, "gallery")
    pages = write_gallery(model, bank, target, scales, list(range(seeds)), prompt, steps)
    if not is_registered(ref) and Path(target).resolve() == (folder.parent / "gallery").resolve():
        write_card(folder, bank)  # the card shows the gallery beside the bank
    return pages
