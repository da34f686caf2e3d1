"""The comparison workflow: discover (or take) the banks, then measure every row with one
protocol: perfect edits (ceiling), known words, NoiseCLR, pullback, random directions (floor),
on the job's domain and on the full world (`evaluation/compare.py` does the measuring)."""

from __future__ import annotations

from pathlib import Path

from noiseclr.bank import DirectionBank
from noiseclr.card import save_bank
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.evaluation.evaluate import Protocol
from noiseclr.models.base import DiffusionModel


def run_comparison(
    cfg: DiscoveryConfig,
    model: DiffusionModel,
    out: str | Path,
    banks: dict[str, DirectionBank],
    protocol: Protocol,
    full_world: bool = True,
) -> Path:
    """Measure `banks` plus a NoiseCLR bank trained with `cfg` and a pullback bank on its domain
    (each unless `banks` already names one). Returns compare.md."""
    from noiseclr.discovery.pullback import discover_pullback
    from noiseclr.domains import shapes
    from noiseclr.editing.sampler import encode
    from noiseclr.evaluation.compare import compare
    from noiseclr.workflows.discover import run_discovery

    out = Path(out)
    if "noiseclr" not in banks:
        # The comparison measures every row itself; the job's own measurement would be a second one.
        job = cfg.model_copy(update={"evaluate": False})
        banks = {
            "noiseclr": DirectionBank.load(run_discovery(job, out / "noiseclr", model=model).bank, model),
            **banks,
        }
    if "pullback" not in banks:
        scenes = shapes.sample_scenes(16, seed=cfg.seed, fixed=cfg.world_fixed)
        pixels = shapes.render(scenes, model.resolution) * 2 - 1
        pb = discover_pullback(model, encode(model, pixels), k=min(cfg.k, 8), seed=cfg.seed)
        banks["pullback"] = DirectionBank.load(save_bank(pb, out / "pullback" / "bank"), model)
    compare(model, banks, protocol, out, full_world=full_world)
    return out / "compare.md"
