"""The single process: `discovery.core`'s loop on its plain AdamW engine, with a progress bar,
checkpoints in OUT/checkpoints and the last finite bank kept when training diverges.

Randomness: timesteps and directions come from one CPU generator seeded by the config (its
state is checkpointed); images and noise are keyed by (seed, micro-step), so a resumed run gives
the same bank as an uninterrupted one, and the same images give the same bank as the Ray Train
workers (`training/distributed.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from noiseclr.conditioning import text_encoders
from noiseclr.discovery import checkpoint
from noiseclr.discovery import step as steps
from noiseclr.discovery.checkpoint import TrainState
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.core import AdamWEngine, TrainLoop
from noiseclr.discovery.initial import init_directions
from noiseclr.errors import ConfigError
from noiseclr.models.base import DiffusionModel, scheduler_like
from noiseclr.utils import preemption

log = logging.getLogger(__name__)


def initial_state(cfg: DiscoveryConfig, model: DiffusionModel) -> TrainState:
    """Step 0: initial directions drawn from the run generator, whose state follows them."""
    pipe = model.pipe
    gen = torch.Generator().manual_seed(cfg.optim.seed)
    init = init_directions(
        text_encoders(pipe),
        cfg.method.k,
        gen,
        pipe.tokenizer,
        cfg.method.init_tokens if cfg.method.init == "tokens" else None,
        from_vocab=cfg.method.init == "vocab",
    )
    return TrainState(
        step=0,
        micro=0,
        directions=init,
        rng=gen.get_state(),
        config=cfg.model_dump(),
        fingerprint=model.fingerprint,
    )


def start_state(cfg: DiscoveryConfig, model: DiffusionModel, out: Path) -> tuple[TrainState, Path | None]:
    """The state to train from: the newest readable checkpoint in OUT (a corrupt newer one is
    skipped, with a warning; checked against `cfg`), or step 0."""
    found = checkpoint.newest_readable(out)
    if found is None:
        return initial_state(cfg, model), None
    state, path = found
    state.check_resumable(cfg, model, path)
    return state, path


def final_loss(history: list[dict]) -> float | None:
    """Mean loss of the last tenth of the steps."""
    losses = [h["loss"] for h in history]
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) if tail else None


class DiscoveryTrainer:
    """Learns directions for `model` from `latents` (N, C, h, w), already scaled, from `state`:
    `core.TrainLoop` on an `AdamWEngine`, images picked per micro-step by `steps.select_images`."""

    def __init__(self, cfg: DiscoveryConfig, model: DiffusionModel, latents: torch.Tensor, state: TrainState):
        if len(latents) < cfg.method.batch:
            raise ConfigError(
                f"batch ({cfg.method.batch}) is larger than the number of images ({len(latents)})"
            )
        self.cfg, self.model = cfg, model
        self.device = model.device
        pipe = model.pipe
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder
        scheduler = scheduler_like(DDPMScheduler, pipe.scheduler.config)
        steps.check_schedule(cfg, scheduler.config.num_train_timesteps)
        encoders = text_encoders(pipe)
        for module in (self.unet, *encoders.encoders, pipe.vae):
            module.requires_grad_(False).eval()
        self.latents = latents.float().cpu()
        self.engine = AdamWEngine(cfg, self.unet, encoders, None, state, self.device)
        self.loop = TrainLoop(cfg, self.engine, scheduler, state, self._batch, self.device)
        self.on_step: Callable[[dict], None] | None = None  # e.g. live MLflow logging; must not block
        if steps.want_checkpointing(
            cfg, self.deltas, tuple(self.latents.shape[1:]), cfg.method.batch, self.device
        ):
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers checkpoints only in training mode; no dropout in SD's UNet

    def _batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = steps.select_images(self.cfg, micro, len(self.latents))
        return index, self.latents[index]

    # what tests and callers read
    directions = property(lambda self: self.engine.directions)
    opt = property(lambda self: self.engine.opt)
    step = property(lambda self: self.loop.step)
    micro = property(lambda self: self.loop.micro)
    history = property(lambda self: self.loop.history)

    def deltas(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        return self.engine.deltas(x_t, t, dirs)

    def train_step(self) -> float:
        """One optimizer step (grad_accum micro-steps). Returns the mean loss."""
        return self.loop.optimizer_step()["loss"]

    def state(self) -> TrainState:
        return self.loop.state()

    def fit(self, out: str | Path, stop_after: int | None = None) -> TrainState:
        """Train to cfg.optim.steps, checkpointing into OUT/checkpoints; return the final state.

        stop_after: end early after this many steps in this call (for tests of resume).
        """
        bar = tqdm(total=self.cfg.optim.steps, initial=self.step, desc="discover")

        def on_step(record: dict) -> None:
            if self.on_step is not None:
                self.on_step(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", pairs_s=f"{record['pairs_per_s']:.1f}")

        try:
            with preemption.notice():  # SIGTERM: finish the step, checkpoint, stop (Preempted)
                self.loop.run(
                    save=lambda state: checkpoint.write(out, state, self.cfg.run.keep_checkpoints),
                    on_step=on_step,
                    last_good=lambda: checkpoint.latest(out),
                    stop_after=stop_after,
                    stop_requested=preemption.requested,
                )
        finally:
            bar.close()
        return self.state()

    @property
    def pairs_per_s(self) -> float | None:
        return self.loop.pairs_per_s
