"""The discovery job on one machine: images -> latents -> directions -> bank -> gallery.

    noiseclr discover --config jobs/shapes.yaml --out out/discovery

With no `data` in the config it first writes `n_images` images of the shapes world (the
embedded default), so the job runs from a clean clone with nothing to download.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.data import encode_latents, load_images
from noiseclr.discovery.trainer import DiscoveryTrainer
from noiseclr.models.loader import load_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_discovery(
    cfg: DiscoveryConfig, out: str | Path, resume: bool = True
) -> dict[str, Path | int | float]:
    """Run the whole job; returns where the bank, gallery and page are, and a few figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model(cfg.model, device=resolve_device(cfg.device))

    data = cfg.data
    if data is None:
        from noiseclr.domains.dataset import write_world

        data = str(out / "data")
        if not (out / "data" / "factors.parquet").exists():
            write_world(
                data, n=cfg.n_images, seed=cfg.seed, resolution=model.resolution, fixed=cfg.world_fixed
            )
    images = load_images(data, model.resolution, limit=cfg.n_images)
    latents = encode_latents(model.pipe.vae, images.pixels)

    trainer = DiscoveryTrainer(cfg, model, latents, out)
    bank = trainer.fit(resume=resume)
    bank.metrics.update(
        images=len(images.files),
        corrupt_images=len(images.bad_files),
        train_seconds=round(time.perf_counter() - started, 1),
        data=data,
    )
    bank.edit_defaults = {"window": [cfg.edit_window, 0]}
    report = None
    if cfg.evaluate and cfg.data is None and (model.world or {}).get("world") == "shapes":
        report = measure_bank(cfg, model, bank, out / "evaluation")
    bank_dir = bank.save(out / "bank")

    from noiseclr.editing.gallery import write_gallery

    seeds = list(range(cfg.gallery_seeds))
    pages = write_gallery(
        model, bank, out / "gallery", cfg.gallery_scales, seeds, cfg.gallery_prompt, cfg.gallery_steps
    )
    return {
        "bank": bank_dir,
        "evaluation": report,
        "gallery": pages["grid"],
        "html": pages["html"],
        "images": len(images.files),
        "corrupt_images": len(images.bad_files),
        "seconds": round(time.perf_counter() - started, 1),
    }


def measure_bank(cfg: DiscoveryConfig, model, bank, out: Path) -> Path:
    """The oracle's measurement of a shapes-world bank on its own domain: automatic labels and
    calibrated edit scales into the bank, the report into `out`. Returns the report page."""
    from noiseclr.evaluation import evaluate

    protocol = evaluate.Protocol(
        fixed=cfg.world_fixed, n_images=cfg.evaluate_images, window=(cfg.edit_window, 0)
    )
    result, paths = evaluate.measure_bank(model, bank, protocol, out)
    log.info("alignment %.3f, coverage %s", result["alignment"], result["coverage"])
    return paths["html"]
