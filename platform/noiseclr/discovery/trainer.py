"""Single-process NoiseCLR trainer (plain torch). The distributed layers wrap `step_loss`.

One step: draw B images, one timestep t in [t_min, t_max] and noise; draw an anchor direction
and `negatives` others; run the batched noise evaluation; contrastive loss; AdamW on the
(K, D) direction matrix only. All randomness comes from one CPU torch.Generator whose state is
checkpointed with the directions, the optimizer and the step, so a resumed run gives the same
bank as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from noiseclr.discovery.bank import DirectionBank, init_directions
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.loss import delta_features, noiseclr_loss, symmetric_noiseclr_loss
from noiseclr.discovery.noise import direction_deltas
from noiseclr.models.loader import BaseModel
from noiseclr.utils.images import atomic_write_bytes

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss went non-finite; the last good checkpoint was kept."""


def lr_factor(cfg: DiscoveryConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def objective(cfg: DiscoveryConfig, deltas: torch.Tensor) -> torch.Tensor:
    """The configured NoiseCLR loss on (B, S, C, h, w) deltas (anchor: direction 0). The
    single-process trainer and the Ray Train worker both call this."""
    feats = delta_features(deltas, cfg.delta_pool, cfg.delta_center)
    if cfg.loss == "paper":
        return noiseclr_loss(feats, cfg.tau, anchor=0)
    return symmetric_noiseclr_loss(feats, cfg.tau)


def sample_step(cfg: DiscoveryConfig, n_images: int, gen: torch.Generator, num_train_timesteps: int):
    """The random draws of one micro-step, in a fixed order: images, t, directions."""
    images = torch.randperm(n_images, generator=gen)[: cfg.batch]
    t = torch.randint(cfg.t_min, min(cfg.t_max, num_train_timesteps - 1) + 1, (1,), generator=gen)
    dirs = torch.randperm(cfg.k, generator=gen)[: cfg.directions_per_step]  # dirs[0] is the anchor
    return images, t, dirs


class DiscoveryTrainer:
    """Learns a DirectionBank for `model` from `latents` (N, C, h, w), already scaled."""

    def __init__(self, cfg: DiscoveryConfig, model: BaseModel, latents: torch.Tensor, out_dir: str | Path):
        if len(latents) < cfg.batch:
            raise ValueError(f"batch ({cfg.batch}) is larger than the number of images ({len(latents)})")
        self.cfg, self.model = cfg, model
        self.out_dir = Path(out_dir)
        self.device = model.device
        pipe = model.pipe
        self.unet, self.text_encoder, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
        self.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.unet, self.text_encoder, pipe.vae):
            module.requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers checkpoints only in training mode; no dropout in SD's UNet
        self.latents = latents.float().cpu()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        init = init_directions(
            self.text_encoder,
            cfg.k,
            self.gen,
            self.tokenizer,
            cfg.init_tokens if cfg.init == "tokens" else None,
        )
        self.directions = torch.nn.Parameter(init.to(self.device))
        self.opt = torch.optim.AdamW([self.directions], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: list[dict] = []

    # --- the maths of one step -------------------------------------------------------------
    def step_loss(self, images: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor, noise: torch.Tensor):
        """Loss for one micro-batch; images index self.latents, dirs[0] is the anchor."""
        x0 = self.latents[images].to(self.device)
        ts = t.expand(len(images)).to(self.device)
        x_t = self.noise_sched.add_noise(x0, noise.to(self.device), ts)
        dtype = DTYPES[self.cfg.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            deltas = direction_deltas(
                self.unet,
                self.text_encoder,
                self.tokenizer,
                self.directions[dirs.to(self.device)],
                x_t,
                ts,
                self.cfg.max_rows,
            )
        return objective(self.cfg, deltas)

    def train_step(self) -> float:
        """One optimizer step (grad_accum micro-steps). Returns the mean loss."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            images, t, dirs = sample_step(
                cfg, len(self.latents), self.gen, self.noise_sched.config.num_train_timesteps
            )
            noise = torch.randn((len(images), *self.latents.shape[1:]), generator=self.gen)
            loss = self.step_loss(images, t, dirs, noise)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at step {self.step}")
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        self.opt.step()
        if not torch.isfinite(self.directions).all():
            raise TrainingDiverged(f"directions went non-finite at step {self.step}")
        self.step += 1
        return total

    # --- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = True, stop_after: int | None = None) -> DirectionBank:
        """Train to cfg.steps (resuming from the latest checkpoint if any); return the bank.

        stop_after: end early after this many steps in this call (for tests of resume).
        """
        cfg = self.cfg
        if resume and self.latest_checkpoint() is not None:
            self.load_checkpoint(self.latest_checkpoint())
            log.info("resumed at step %d", self.step)
        pairs = cfg.batch * cfg.directions_per_step * cfg.grad_accum
        bar = tqdm(total=cfg.steps, initial=self.step, desc="discover")
        started, done_here = time.perf_counter(), 0
        while self.step < cfg.steps and (stop_after is None or done_here < stop_after):
            good = self.directions.detach().clone()
            try:
                loss = self.train_step()
            except TrainingDiverged as err:
                with torch.no_grad():
                    self.directions.copy_(good)  # in memory too, keep the last finite bank
                bar.close()
                latest = self.latest_checkpoint()
                raise TrainingDiverged(f"{err}; stopped. Last good checkpoint: {latest}") from err
            done_here += 1
            rate = done_here * pairs / (time.perf_counter() - started)
            self.history.append({"step": self.step, "loss": loss})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rate:.1f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        return self.bank()

    def bank(self) -> DirectionBank:
        losses = [h["loss"] for h in self.history]
        tail = losses[-max(1, len(losses) // 10) :] if losses else []
        return DirectionBank(
            directions=self.directions.detach().float().cpu().clone(),
            base_model={
                "source": self.model.source,
                "fingerprint": self.model.fingerprint,
                "hidden_size": int(self.directions.shape[1]),
            },
            name=self.cfg.name,
            config=self.cfg.model_dump(),
            metrics={"steps": self.step, "final_loss": sum(tail) / len(tail) if tail else None},
        )

    # --- checkpoints: safetensors + JSON, written to a temp folder then renamed -------------
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir().glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        found = [p for p in found if (p / "state.json").exists()]
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        tensors = {
            "directions": self.directions.detach().float().cpu().contiguous(),
            "rng": self.gen.get_state(),
        }
        opt_state = self.opt.state_dict()
        for pid, state in opt_state["state"].items():
            for key, value in state.items():
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
        meta = {
            "step": self.step,
            "param_groups": opt_state["param_groups"],
            "config": self.cfg.model_dump(),
            "fingerprint": self.model.fingerprint,
            "history": self.history,
        }
        final = self.checkpoint_dir() / f"step-{self.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_bytes(tmp / "state.json", json.dumps(meta).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(self.checkpoint_dir().glob("step-*"), key=lambda p: p.name)[
            : -self.cfg.keep_checkpoints
        ]:
            if not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        meta = json.loads((path / "state.json").read_text())
        if meta["fingerprint"] != self.model.fingerprint:
            raise ValueError(f"checkpoint {path} belongs to another base model ({meta['fingerprint']})")
        tensors = load_file(str(path / "state.safetensors"))
        if tensors["directions"].shape != self.directions.shape:
            raise ValueError(
                f"checkpoint {path} has directions {tuple(tensors['directions'].shape)}, "
                f"config asks for {tuple(self.directions.shape)}"
            )
        with torch.no_grad():
            self.directions.copy_(tensors["directions"].to(self.device))
        self.gen.set_state(tensors["rng"])
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value.to(self.device) if name != "step" else value
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step = meta["step"]
        self.history = meta.get("history", [])
