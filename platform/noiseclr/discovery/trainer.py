"""The single-process NoiseCLR loop (plain torch): `discovery.step` for the maths, AdamW on the
(K, D) direction matrix only, `discovery.checkpoint` for the state.

Randomness: timesteps and directions come from one CPU generator seeded by the config (its
state is checkpointed); images and noise are keyed by (seed, micro-step), so a resumed run gives
the same bank as an uninterrupted one, and the same images give the same bank as the Ray Train
workers (`training/distributed.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from noiseclr.conditioning import direction_deltas
from noiseclr.discovery import checkpoint, step
from noiseclr.discovery.bank import init_directions
from noiseclr.discovery.checkpoint import TrainState
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.errors import ConfigError, TrainingDiverged
from noiseclr.models.base import DiffusionModel

log = logging.getLogger(__name__)


def initial_state(cfg: DiscoveryConfig, model: DiffusionModel) -> TrainState:
    """Step 0: initial directions drawn from the run generator, whose state follows them."""
    pipe = model.pipe
    gen = torch.Generator().manual_seed(cfg.seed)
    init = init_directions(
        pipe.text_encoder,
        cfg.k,
        gen,
        pipe.tokenizer,
        cfg.init_tokens if cfg.init == "tokens" else None,
        from_vocab=cfg.init == "vocab",
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
    """The state to train from: the latest checkpoint in OUT (checked against `cfg`), or step 0."""
    path = checkpoint.latest(out)
    if path is None:
        return initial_state(cfg, model), None
    state = TrainState.load(path)
    state.check_resumable(cfg, model.fingerprint, path)
    return state, path


def final_loss(history: list[dict]) -> float | None:
    """Mean loss of the last tenth of the steps."""
    losses = [h["loss"] for h in history]
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) if tail else None


class DiscoveryTrainer:
    """Learns directions for `model` from `latents` (N, C, h, w), already scaled, from `state`."""

    def __init__(self, cfg: DiscoveryConfig, model: DiffusionModel, latents: torch.Tensor, state: TrainState):
        if len(latents) < cfg.batch:
            raise ConfigError(f"batch ({cfg.batch}) is larger than the number of images ({len(latents)})")
        self.cfg, self.model = cfg, model
        self.device = model.device
        pipe = model.pipe
        self.unet, self.text_encoder, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        step.check_schedule(cfg, self.scheduler.config.num_train_timesteps)
        for module in (self.unet, self.text_encoder, pipe.vae):
            module.requires_grad_(False).eval()
        self.latents = latents.float().cpu()
        self.gen = torch.Generator()
        self.gen.set_state(state.rng)
        self.directions = torch.nn.Parameter(state.directions.float().to(self.device))
        self.norm = step.fixed_norm(cfg, self.text_encoder)
        self.opt = torch.optim.AdamW([self.directions], lr=cfg.lr, weight_decay=cfg.weight_decay)
        if state.exp_avg is not None:
            self.opt.state[self.directions] = {
                "step": torch.tensor(state.optimizer_steps),
                "exp_avg": state.exp_avg.to(self.device),
                "exp_avg_sq": state.exp_avg_sq.to(self.device),
            }
        self.step, self.micro = state.step, state.micro
        self.pairs_per_s: float | None = None
        self.history = list(state.history)
        self.on_step: Callable[[dict], None] | None = None  # e.g. live MLflow logging; must not block
        if step.want_checkpointing(cfg, self.deltas, tuple(self.latents.shape[1:]), cfg.batch, self.device):
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers checkpoints only in training mode; no dropout in SD's UNet

    def deltas(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        return direction_deltas(
            self.unet,
            self.text_encoder,
            self.tokenizer,
            step.shaped(self.directions[dirs], self.norm),
            x_t,
            t,
            self.cfg.max_rows,
        )

    def train_step(self) -> float:
        """One optimizer step (grad_accum micro-steps). Returns the mean loss."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * step.lr_factor(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            index = step.select_images(cfg, self.micro, len(self.latents))
            t, dirs = step.draw(cfg, self.gen)
            loss = step.micro_step_loss(
                cfg, self.deltas, self.scheduler, self.latents[index], index, t, dirs, self.micro, self.device
            )
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at step {self.step}")
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            self.micro += 1
        self.opt.step()
        if not torch.isfinite(self.directions).all():
            raise TrainingDiverged(f"directions went non-finite at step {self.step}")
        self.step += 1
        return total

    def state(self) -> TrainState:
        opt = self.opt.state.get(self.directions, {})
        return TrainState(
            step=self.step,
            micro=self.micro,
            directions=self.directions.detach().float().cpu(),
            rng=self.gen.get_state(),
            config=self.cfg.model_dump(),
            fingerprint=self.model.fingerprint,
            exp_avg=opt["exp_avg"].float().cpu() if "exp_avg" in opt else None,
            exp_avg_sq=opt["exp_avg_sq"].float().cpu() if "exp_avg_sq" in opt else None,
            optimizer_steps=float(opt["step"]) if "step" in opt else 0.0,
            history=list(self.history),
        )

    def fit(self, out: str | Path, stop_after: int | None = None) -> TrainState:
        """Train to cfg.steps, checkpointing into OUT/checkpoints; return the final state.

        stop_after: end early after this many steps in this call (for tests of resume).
        """
        cfg = self.cfg
        pairs = cfg.batch * cfg.directions_per_step * cfg.grad_accum
        bar = tqdm(total=cfg.steps, initial=self.step, desc="discover")
        started, done_here = time.perf_counter(), 0
        while self.step < cfg.steps and (stop_after is None or done_here < stop_after):
            good = self.directions.detach().clone()
            step_started = time.perf_counter()
            try:
                loss = self.train_step()
            except TrainingDiverged as err:
                with torch.no_grad():
                    self.directions.copy_(good)  # in memory too, keep the last finite bank
                bar.close()
                raise TrainingDiverged(
                    f"{err}; stopped (lower lr or raise tau). Last good checkpoint: {checkpoint.latest(out)}"
                ) from err
            done_here += 1
            rate = self.pairs_per_s = done_here * pairs / (time.perf_counter() - started)
            seconds = time.perf_counter() - step_started
            self.history.append({"step": self.step, "loss": loss, "seconds": seconds})
            if self.on_step is not None:
                self.on_step(self.history[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rate:.1f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                checkpoint.write(out, self.state(), cfg.keep_checkpoints)
        bar.close()
        return self.state()
