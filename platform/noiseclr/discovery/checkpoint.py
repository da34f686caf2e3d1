"""The one checkpoint format of a discovery run, written by the single process and by rank 0 of
the Ray Train workers alike, so either path resumes the other's run.

A checkpoint is a folder: `state.safetensors` (directions, AdamW moments, the run generator's
state) and `state.json` (step, data position, optimizer step count, loss history, the config,
the base model's fingerprint and the SHA-256 of `state.safetensors`, checked on load).
It is written into `step-N.tmp` and renamed only when complete, so a write that fails (disk
full, a storage error) leaves the previous checkpoints as they were and nothing half-written
under a name a resume reads; a resume whose newest checkpoint is corrupt (truncated, wrong
checksum) falls back to the previous one and says so. The single process keeps them in OUT/checkpoints/step-N;
the distributed path reports them to Ray Train and copies the last one there too.

Resuming with a config whose training sections (`config.TRAINING_SECTIONS`: the model, data,
method, optimisation) differ from the checkpoint's is refused, naming the keys: the bank would
otherwise be labelled with a config it was not trained with. A checkpoint written before the
sections holds the flat record; it is compared through the same mapping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.errors import CheckpointError, ConfigError
from noiseclr.utils.images import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_TENSORS, STATE_META = "state.safetensors", "state.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped."""

    step: int  # optimizer steps done
    micro: int  # micro-steps done = local batches consumed (the data position)
    directions: torch.Tensor  # (K, D) fp32
    rng: torch.Tensor  # the run generator's state (timesteps and directions)
    config: dict
    fingerprint: str
    exp_avg: torch.Tensor | None = None  # AdamW moments; None before the first step
    exp_avg_sq: torch.Tensor | None = None
    optimizer_steps: float = 0.0
    history: list[dict] = field(default_factory=list)  # [{"step", "loss", "seconds"}]
    world: int = 1  # processes that trained it

    def save(self, folder: str | Path) -> Path:
        """Write into `folder` (created), tensors first, then the JSON that names them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"directions": self.directions, "rng": self.rng}
        if self.exp_avg is not None:
            tensors.update(exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
        (folder / STATE_TENSORS).chmod(0o644)
        meta = {
            "step": self.step,
            "micro": self.micro,
            "optimizer_steps": self.optimizer_steps,
            "history": self.history,
            "world": self.world,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "tensors_sha256": _sha256(folder / STATE_TENSORS),
        }
        atomic_write_bytes(folder / STATE_META, json.dumps(meta).encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TrainState:
        folder = Path(folder)
        try:
            meta = json.loads((folder / STATE_META).read_text())
            expected = meta.get("tensors_sha256")  # absent in checkpoints written before 2026-12-06
            if expected is not None and _sha256(folder / STATE_TENSORS) != expected:
                raise ValueError(f"{STATE_TENSORS} does not match its checksum")
            tensors = load_file(str(folder / STATE_TENSORS))
        except (OSError, ValueError, SafetensorError) as err:
            raise CheckpointError(
                f"checkpoint {folder} is unreadable ({err}); use --fresh to start over"
            ) from err
        return cls(
            step=meta["step"],
            micro=meta["micro"],
            directions=tensors["directions"],
            rng=tensors["rng"],
            config=meta["config"],
            fingerprint=meta["fingerprint"],
            exp_avg=tensors.get("exp_avg"),
            exp_avg_sq=tensors.get("exp_avg_sq"),
            optimizer_steps=meta["optimizer_steps"],
            history=meta.get("history", []),
            world=meta.get("world", 1),
        )

    def check_resumable(self, cfg: DiscoveryConfig, model, where: Path) -> None:
        """Refuse to continue with another base model (a `DiffusionModel`) or changed training
        keys. A checkpoint of this model written with the earlier fingerprint continues under
        today's."""
        if not model.identifies(self.fingerprint):
            raise ConfigError(
                f"checkpoint {where} was trained on another base model (fingerprint {self.fingerprint}, "
                f"this one is {model.fingerprint}); use --fresh or another --out"
            )
        self.fingerprint = model.fingerprint
        if changed := cfg.training_changes(self.config):
            diff = ", ".join(changed)
            raise ConfigError(
                f"checkpoint {where} was trained with another config ({diff}); "
                "use --fresh to start over, or another --out"
            )
        if self.step > cfg.optim.steps:
            raise ConfigError(
                f"checkpoint {where} is at step {self.step}, past steps: {cfg.optim.steps}; "
                "raise steps, or use --fresh to start over"
            )


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def candidates(out: str | Path) -> list[Path]:
    """The complete checkpoints under OUT/checkpoints, newest first (never a `.tmp` one)."""
    found = [p for p in checkpoint_dir(out).glob("step-*") if (p / STATE_META).exists() and "." not in p.name]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest(out: str | Path) -> Path | None:
    """The newest complete checkpoint under OUT/checkpoints, or None."""
    found = candidates(out)
    return found[0] if found else None


def newest_readable(out: str | Path) -> tuple[TrainState, Path] | None:
    """The newest checkpoint that loads and matches its checksum, with its folder; a corrupt
    newer one is skipped with a warning that names it. None when there is none at all;
    CheckpointError when every one is corrupt (a silent start from step 0 would discard them)."""
    broken = []
    for path in candidates(out):
        try:
            state = TrainState.load(path)
        except CheckpointError as err:
            log.warning("%s: falling back to the previous checkpoint", str(err).split("; use --fresh")[0])
            broken.append(path.name)
            continue
        if broken:
            log.warning("resuming from %s instead of the corrupt %s", path, ", ".join(broken))
        return state, path
    if broken:
        raise CheckpointError(
            f"every checkpoint in {checkpoint_dir(out)} is corrupt ({', '.join(broken)}); "
            "use --fresh to start over"
        )
    return None


def write(out: str | Path, state: TrainState, keep: int) -> Path:
    """Save `state` as OUT/checkpoints/step-N (via a temporary folder, then a rename) and keep
    only the newest `keep`."""
    final = checkpoint_dir(out) / f"step-{state.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except (OSError, SafetensorError) as err:  # disk full, a storage error: the rest stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(out)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        raise CheckpointError(f"writing checkpoint {final} failed ({err}); {kept}") from err
    done = sorted(
        (p for p in checkpoint_dir(out).glob("step-*") if "." not in p.name), key=lambda p: int(p.name[5:])
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
