"""The one checkpoint format of a discovery run, written by the single process and by rank 0 of
the Ray Train workers alike, so either path resumes the other's run.

A checkpoint is a folder: `state.safetensors` (directions, AdamW moments, the run generator's
state) and `state.json` (step, data position, optimizer step count, loss history, the config
and the base model's fingerprint). The single process keeps them in OUT/checkpoints/step-N;
the distributed path reports them to Ray Train and copies the last one there too.

Resuming with a config whose training sections (`config.TRAINING_SECTIONS`: the model, data,
method, optimisation) differ from the checkpoint's is refused, naming the keys: the bank would
otherwise be labelled with a config it was not trained with. A checkpoint written before the
sections holds the flat record; it is compared through the same mapping.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.errors import ConfigError
from noiseclr.utils.images import atomic_write_bytes

STATE_TENSORS, STATE_META = "state.safetensors", "state.json"


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
        }
        atomic_write_bytes(folder / STATE_META, json.dumps(meta).encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TrainState:
        folder = Path(folder)
        try:
            meta = json.loads((folder / STATE_META).read_text())
            tensors = load_file(str(folder / STATE_TENSORS))
        except (OSError, ValueError, SafetensorError) as err:
            raise ConfigError(
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


def latest(out: str | Path) -> Path | None:
    """The newest complete checkpoint under OUT/checkpoints, or None."""
    found = [p for p in checkpoint_dir(out).glob("step-*") if (p / STATE_META).exists() and "." not in p.name]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def write(out: str | Path, state: TrainState, keep: int) -> Path:
    """Save `state` as OUT/checkpoints/step-N (via a temporary folder, then a rename) and keep
    only the newest `keep`."""
    final = checkpoint_dir(out) / f"step-{state.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted(
        (p for p in checkpoint_dir(out).glob("step-*") if "." not in p.name), key=lambda p: int(p.name[5:])
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
