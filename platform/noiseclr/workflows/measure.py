"""The oracle-free measurement of a bank (`noiseclr measure`) and merging banks (`noiseclr
merge`): the protocol, the real images to edit (the given data, else the bank's training
images, else its training scenes drawn again), the measurement, the bank saved with its card."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from noiseclr.bank import DirectionBank, merge_banks, subset
from noiseclr.card import save_bank
from noiseclr.errors import ConfigError, DataError
from noiseclr.evaluation import blind
from noiseclr.models.base import DiffusionModel
from noiseclr.utils.configfile import validation_message

log = logging.getLogger(__name__)


def blind_setup(
    model: DiffusionModel,
    bank: DirectionBank,
    data: str | None = None,
    prompt: str | None = None,
    generated: bool = True,
    n: int = 8,
    steps: int = 20,
    target: float = 0.02,
    window: int | None = None,
):
    """The oracle-free protocol for `bank` and its real images (an ImageSet, or None): `data`,
    else the bank's training images where readable here, else (a shapes-world bank) its
    training scenes drawn again."""
    try:
        protocol = blind.BlindProtocol(
            n_images=n,
            steps=steps,
            inversion_steps=max(2, round(1.25 * steps)),
            prompt=prompt if prompt is not None else bank.config.get("gallery_prompt"),
            generated=generated,
            target=target,
            window=(window, 0) if window else None,
        )
    except ValidationError as err:
        raise ConfigError(validation_message(err, blind.BlindProtocol)) from None
    source = data or bank.metrics.get("data")
    real = None
    if source:
        try:
            real = blind.real_images(source, model, protocol, bank.config.get("storage_options"))
        except DataError as err:
            if data:  # the user named these images: their error stands
                raise
            world = training_world(bank, model)
            if world is None and not generated:
                raise
            if world is None:
                log.warning(
                    "warning: the bank's training images are unreadable here (%s); generated only", err
                )
            else:
                log.warning("the training images are unreadable here (%s): drawn again from its world", err)
                real = blind.real_images(world, model, protocol)
    if real is None and not generated:
        raise ConfigError("--no-generated needs real images: give --data URI")
    return protocol, real


def training_world(bank: DirectionBank, model: DiffusionModel) -> str | None:
    """A bank trained on the generated shapes world: its training images drawn again (same seed,
    count and fixed factors, so the same scenes) into memory://, for measuring it on a machine
    that does not hold the training run's folder (the shipped bank). None for any other bank."""
    import fsspec

    from noiseclr.domains.dataset import TABLE, write_world

    cfg = bank.config
    while cfg.get("sources"):  # a merged bank: its first bank's, whose images metrics.data names
        cfg = cfg["sources"][0]["config"]
    if (
        cfg.get("data") is not None
        or cfg.get("model") != "shapes"
        or not cfg.get("n_images")
        or "seed" not in cfg
    ):
        return None
    n, seed, fixed = cfg["n_images"], cfg["seed"], cfg.get("world_fixed") or {}
    settings = json.dumps([n, seed, model.resolution, fixed], sort_keys=True)
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    uri = f"memory://noiseclr-world/{key}"
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{root}/{TABLE}"):
        write_world(uri, n=n, seed=seed, resolution=model.resolution, fixed=fixed, progress=False)
    return uri


def measure(model: DiffusionModel, ref: str, **setup) -> DirectionBank:
    """Measure the bank at `ref` (a folder or models:/ reference) and keep the result in its
    bank.json and card; a registered bank is measured, not rewritten (log a new version)."""
    from noiseclr.tracking.registry import bank_folder, is_registered

    folder = bank_folder(ref)
    bank = DirectionBank.load(folder, model)
    protocol, real = blind_setup(model, bank, **setup)
    blind.measure_into(model, bank, protocol, real and real.pixels, real_names=real and real.files)
    if not is_registered(ref):
        save_bank(bank, folder)
    return bank


def refuse_a_bank_in(out: Path) -> None:
    """ConfigError when `out` already holds a bank: a merge writes a new one, never over one."""
    if (Path(out) / "bank.json").exists():
        raise ConfigError(f"{out} already holds a bank; merge into a new folder")


@dataclass
class Merged:
    bank: DirectionBank  # the kept directions, measured
    merged: int  # directions put together
    kept: list[int]  # their indices in the merged order


def merge(
    model: DiffusionModel,
    refs: list[str],
    out: Path,
    name: str = "merged",
    keep_all: bool = False,
    data: str | None = None,
    n: int = 8,
    steps: int = 20,
) -> Merged:
    """Several banks' directions in one, measured without an oracle; the live directions kept,
    one per duplicate group (its best), unless `keep_all`. Saved in `out` (a new folder)."""
    from noiseclr.tracking.registry import open_bank

    refuse_a_bank_in(out)
    merged = merge_banks([open_bank(ref, model) for ref in refs], name, refs=refs)
    protocol, real = blind_setup(model, merged, data, n=n, steps=steps)
    harness = blind.BlindHarness(model, protocol, real=real and real.pixels, real_names=real and real.files)
    kept, result = harness.measure_distinct(merged, prune=not keep_all)
    bank = subset(merged, kept) if len(kept) < len(merged) else merged
    bank.store_scores(result)
    save_bank(bank, out)
    return Merged(bank, len(merged), kept)


def oracle_protocol(fixed: dict[str, str], **values):
    """The oracle's protocol on the domain `fixed` (None values: the protocol's defaults);
    ConfigError naming the field."""
    from noiseclr.evaluation.evaluate import Protocol

    try:
        return Protocol(fixed=dict(fixed), **{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(validation_message(err, Protocol)) from None


@dataclass
class Evaluated:
    result: dict
    report: Path  # the HTML report
    saved: Path | None  # the bank folder rewritten with labels and scales; None: not rewritten


def evaluate(
    model: DiffusionModel,
    ref: str,
    out: Path | None = None,
    label: bool = True,
    fixed: dict[str, str] | None = None,
    **protocol,
) -> Evaluated:
    """The oracle's measurement of bank `ref` on the domain it was trained on (or `fixed`); with
    `label`, its labels and calibrated scales kept in the bank folder. A registered bank is
    never rewritten (its report holds the labels: log a new version)."""
    from noiseclr.evaluation.evaluate import measure_bank, require_oracle
    from noiseclr.tracking.registry import bank_folder, is_registered, output_beside

    require_oracle(model)  # before the bank is opened: a refused command writes nothing
    folder = bank_folder(ref)
    bank = DirectionBank.load(folder, model)
    p = oracle_protocol(fixed if fixed else bank.config.get("world_fixed", {}), **protocol)
    result, paths = measure_bank(model, bank, p, out or output_beside(ref, folder, "evaluation"), label=label)
    saved = None
    if label and not is_registered(ref):
        save_bank(bank, folder)
        saved = folder
    return Evaluated(result, paths["html"], saved)
