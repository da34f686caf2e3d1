"""The one NoiseCLR training loop, for the single process and every Ray Train worker.

`TrainLoop` owns what both paths share: the run generator (timesteps and directions), the
learning-rate schedule, the micro-steps of one optimizer step, the loss checks, the step and
data counters, the loss history, the `TrainState` a checkpoint holds, and (`run`) the cadence:
when to checkpoint, the training rate, and what a diverged run keeps and says. What differs is
the engine that holds the directions and their optimizer, behind a few methods (`Engine`):

- `AdamWEngine` (here): plain torch AdamW on the (K, D) direction matrix, one process;
- `training.distributed.DeepSpeedEngine`: the same AdamW inside a DeepSpeed engine (ZeRO
  0-3), its gradient averaged over the workers.

Where the images come from is the caller's (`batch_of(micro)`): the single process picks them
with a keyed generator, a worker reads its Ray Data shard in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from noiseclr.conditioning import direction_deltas, encode_directions, unet_rows
from noiseclr.discovery import step
from noiseclr.discovery.checkpoint import TrainState
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.errors import Preempted, TrainingDiverged
from noiseclr.utils import parallel


class Engine(Protocol):
    """Holds the directions and their optimizer."""

    def deltas(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """Noise differences (B, S, C, h, w) of directions `dirs` on x_t at t."""

    def set_lr(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate one micro-step's gradient (of grad_accum in an optimizer step)."""

    def step(self) -> None:
        """End one optimizer step: update the directions, clear the gradient."""

    def moments(self) -> dict:
        """The full fp32 directions and AdamW moments on the CPU, and the optimizer's step count:
        {"directions", "exp_avg", "exp_avg_sq" (absent before the first step), "optimizer_steps"}."""

    def snapshot(self) -> object:
        """What `restore` needs to bring back the directions of this moment (cheap: every step)."""

    def restore(self, snapshot: object) -> None:
        """Bring back the directions of `snapshot`, after a step that diverged."""


class AdamWEngine:
    """One process: AdamW on the (K, D) direction matrix, nothing else trains.

    On a CPU with several torch threads the micro-step's images are split over `streams`
    threads, each running the UNet forward and backward of its images on its share of the
    threads (utils.parallel: small UNet batches use 2 cores ~1.2x better as two 1-thread
    streams than as one 2-thread call, docs/benchmarks.md). The text encoder runs once on the
    calling thread; each stream's context gradient is summed in stream order and sent through
    it, so the gradient is the one-call gradient up to float rounding, whatever the timing.
    """

    def __init__(self, cfg: DiscoveryConfig, unet, text_encoder, tokenizer, state: TrainState, device):
        self.cfg, self.unet, self.text_encoder, self.tokenizer = cfg, unet, text_encoder, tokenizer
        self.directions = torch.nn.Parameter(state.directions.float().to(device))
        self.norm = step.fixed_norm(cfg, text_encoder)
        self.opt = torch.optim.AdamW([self.directions], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        if state.exp_avg is not None:
            self.opt.state[self.directions] = {
                "step": torch.tensor(state.optimizer_steps),
                "exp_avg": state.exp_avg.to(device),
                "exp_avg_sq": state.exp_avg_sq.to(device),
            }
        self.streams = parallel.MAX_STREAMS  # 1: the UNet in one call on the calling thread
        self._pending: tuple | None = None  # the streams' graphs, until backward

    def deltas(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        rows = step.shaped(self.directions[dirs], self.norm)
        device = x_t.device
        plain = torch.is_autocast_enabled(device.type) or not torch.is_grad_enabled()  # thread-local modes
        n = 1 if plain else parallel.streams(device, x_t.shape[0], self.streams)
        self._pending = None
        if n == 1:
            return direction_deltas(
                self.unet, self.text_encoder, self.tokenizer, rows, x_t, t, self.cfg.run.max_rows
            )
        context = encode_directions(self.text_encoder, self.tokenizer, rows)  # (S + 1, L, H), last = empty

        def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ctx = context.detach().requires_grad_()  # this stream's own leaf
            return ctx, unet_rows(self.unet, x_t[images], t[images], ctx.to(x_t.dtype), self.cfg.run.max_rows)

        parts = parallel.map_ordered(forward, torch.arange(len(x_t)).chunk(n), device, progress=False, most=n)
        outs = [eps.detach().requires_grad_() for _, eps in parts]  # where the loss's gradient stops
        self._pending = (context, parts, outs)
        eps = torch.cat(outs)
        return eps[:, :-1] - eps[:, -1:]

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.optim.grad_accum).backward()
        if self._pending is None:
            return
        context, parts, outs = self._pending
        self._pending = None

        def back(i: int) -> torch.Tensor:
            ctx, eps = parts[i]
            grad = outs[i].grad if outs[i].grad is not None else torch.zeros_like(eps)
            return torch.autograd.grad(eps, ctx, grad)[0]

        grads = parallel.map_ordered(back, range(len(parts)), context.device, progress=False, most=len(parts))
        context.backward(sum(grads[1:], grads[0]))

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not torch.isfinite(self.directions).all():
            raise TrainingDiverged("directions went non-finite")

    def snapshot(self) -> torch.Tensor:
        return self.directions.detach().clone()

    def restore(self, snapshot: torch.Tensor) -> None:
        with torch.no_grad():
            self.directions.copy_(snapshot)

    def moments(self) -> dict:
        opt = self.opt.state.get(self.directions, {})
        found = {"directions": self.directions.detach()}
        found.update({k: opt[k] for k in ("exp_avg", "exp_avg_sq") if k in opt})
        out: dict = {k: v.detach().float().cpu().contiguous() for k, v in found.items()}
        out["optimizer_steps"] = float(opt["step"]) if "step" in opt else 0.0
        return out


class TrainLoop:
    """Optimizer steps of `engine` from `state`; `batch_of(micro)` gives (indices, latents) of a
    micro-step's images, `gather` joins the workers' deltas (None on one process)."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        engine: Engine,
        scheduler,
        state: TrainState,
        batch_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        input_dtype: torch.dtype = torch.float32,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world: int = 1,
    ):
        self.cfg, self.engine, self.scheduler, self.batch_of = cfg, engine, scheduler, batch_of
        self.device, self.input_dtype, self.gather, self.world = device, input_dtype, gather, world
        self.fingerprint = state.fingerprint
        self.gen = torch.Generator()
        self.gen.set_state(state.rng)
        self.step, self.micro, self.history = state.step, state.micro, list(state.history)
        self.started_at = len(self.history)  # this process's steps follow
        self.pairs = (
            cfg.method.batch * cfg.method.directions_per_step * cfg.optim.grad_accum
        )  # per optimizer step

    @property
    def pairs_per_s(self) -> float | None:
        """The training rate: image x direction pairs (all workers' images) per second over the
        optimizer steps this process ran, each timed from its first micro-step to its update.
        The first is left out once there are two: it holds the warm-up (kernel choice, caches,
        DeepSpeed's first step), which a longer run does not repeat. None before any step."""
        times = [h["seconds"] for h in self.history[self.started_at :]]
        times = times[1:] or times
        return self.pairs * len(times) / sum(times) if times else None

    def checkpoint_due(self) -> bool:
        """Whether the step just done is one to checkpoint: every checkpoint_every, and the last."""
        return self.step % self.cfg.run.checkpoint_every == 0 or self.step == self.cfg.optim.steps

    def run(
        self,
        save: Callable[[TrainState], None],
        on_step: Callable[[dict], None] | None = None,
        last_good: Callable[[], object] = lambda: None,
        stop_after: int | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        """Optimizer steps up to cfg.optim.steps (or `stop_after` more, for tests of resume).

        After each step `on_step(record)` (its history entry plus `pairs_per_s`), then
        `save(state)` where `checkpoint_due`. A non-finite loss or direction stops the run: the
        engine keeps the directions of the last finite step, and TrainingDiverged names
        `last_good()`, the checkpoint a resumed run starts from. When `stop_requested()` turns
        true (a preemption notice), the step under way finishes, a checkpoint is written and
        Preempted names it: the same command resumes there, no step lost or repeated."""
        done = 0
        while self.step < self.cfg.optim.steps and (stop_after is None or done < stop_after):
            good = self.engine.snapshot()
            try:
                record = self.optimizer_step()
            except TrainingDiverged as err:
                self.engine.restore(good)
                raise TrainingDiverged(
                    f"{err}; stopped (lower lr or raise tau). Last good checkpoint: {last_good()}"
                ) from err
            done += 1
            if on_step is not None:
                on_step({**record, "pairs_per_s": self.pairs_per_s})
            if self.checkpoint_due():
                save(self.state())
            if stop_requested():  # at the last step too: the measurement and logging are left
                if not self.checkpoint_due():
                    save(self.state())
                raise Preempted(
                    f"stopped on SIGTERM after step {self.step} of {self.cfg.optim.steps}: checkpoint "
                    f"{last_good()} written; run the same command to resume from it"
                )

    def optimizer_step(self) -> dict:
        """One optimizer step (grad_accum micro-steps); its history entry {"step", "loss", "seconds"}."""
        cfg, started = self.cfg, time.perf_counter()
        self.engine.set_lr(cfg.optim.lr * step.lr_factor(cfg, self.step))
        total = 0.0
        for _ in range(cfg.optim.grad_accum):
            index, x0 = self.batch_of(self.micro)
            t, dirs = step.draw(cfg, self.gen)
            loss = step.micro_step_loss(
                cfg, self.engine.deltas, self.scheduler, x0, index, t, dirs, self.micro, self.device,
                self.input_dtype, self.gather,
            )  # fmt: skip
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at step {self.step}")
            self.engine.backward(loss)
            total += loss.item() / cfg.optim.grad_accum
            self.micro += 1
        try:
            self.engine.step()
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err} at step {self.step}") from None
        self.step += 1
        self.history.append({"step": self.step, "loss": total, "seconds": time.perf_counter() - started})
        return self.history[-1]

    def state(self) -> TrainState:
        """The state to resume from (a collective under ZeRO-3: every worker calls it)."""
        m = self.engine.moments()
        return TrainState(
            step=self.step,
            micro=self.micro,
            directions=m["directions"],
            rng=self.gen.get_state(),
            config=self.cfg.model_dump(),
            fingerprint=self.fingerprint,
            exp_avg=m.get("exp_avg"),
            exp_avg_sq=m.get("exp_avg_sq"),
            optimizer_steps=m["optimizer_steps"],
            history=list(self.history),
            world=self.world,
        )
