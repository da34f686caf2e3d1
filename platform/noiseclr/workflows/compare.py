"""The comparison workflow: discover (or take) the banks, then measure every row with one
protocol: perfect edits (ceiling), known words, NoiseCLR, pullback, random directions (floor),
on the job's domain and on the full world (`evaluation/compare.py` does the measuring)."""

from __future__ import annotations

from pathlib import Path

from noiseclr.bank import DirectionBank
from noiseclr.card import save_bank
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.models.base import DiffusionModel


def run_comparison(
    cfg: DiscoveryConfig,
    model: DiffusionModel,
    out: str | Path,
    folders: dict[str, str | Path] | None = None,
    full_world: bool = True,
    **protocol,
) -> Path:
    """Measure the banks in `folders` (name -> folder) plus a NoiseCLR bank trained with `cfg`
    and a pullback bank on its domain (each unless `folders` already names one), with the
    oracle's protocol on the job's domain (`protocol`: its values). Returns compare.md."""
    from noiseclr.discovery.pullback import discover_pullback
    from noiseclr.domains import shapes
    from noiseclr.editing.sampler import encode
    from noiseclr.evaluation.compare import compare
    from noiseclr.evaluation.evaluate import require_oracle
    from noiseclr.workflows.discover import run_discovery
    from noiseclr.workflows.measure import oracle_protocol

    require_oracle(model)  # the comparison is the oracle's: refused before any discovery runs
    protocol = oracle_protocol(cfg.data.world_fixed, **protocol)
    banks = {name: DirectionBank.load(folder, model) for name, folder in (folders or {}).items()}
    out = Path(out)
    if "noiseclr" not in banks:
        # The comparison measures every row itself; the job's own measurement would be a second one.
        job = cfg.replace(evaluate=False)
        banks = {
            "noiseclr": DirectionBank.load(run_discovery(job, out / "noiseclr", model=model).bank, model),
            **banks,
        }
    if "pullback" not in banks:
        scenes = shapes.sample_scenes(16, seed=cfg.optim.seed, fixed=cfg.data.world_fixed)
        pixels = shapes.render(scenes, model.resolution) * 2 - 1
        pb = discover_pullback(model, encode(model, pixels), k=min(cfg.method.k, 8), seed=cfg.optim.seed)
        banks["pullback"] = DirectionBank.load(save_bank(pb, out / "pullback" / "bank"), model)
    compare(model, banks, protocol, out, full_world=full_world)
    return out / "compare.md"
