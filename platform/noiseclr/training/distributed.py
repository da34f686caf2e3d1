"""Distributed discovery: Ray Train workers run the NoiseCLR step inside a DeepSpeed engine.

The maths is the single-process trainer's (noise.direction_deltas + loss); this file only
places it: the frozen UNet and text encoder and the (K, D) directions live in one module
that DeepSpeed wraps (ZeRO 0-3 from the config; stage 3 also partitions the frozen weights),
the only trainable tensor is the direction matrix, and DeepSpeed averages its gradient
across workers. Latents stream from Ray Data through `get_dataset_shard`.

The global batch is split across workers. The loss couples images (positives are pairs of
different images), so each worker all-gathers the deltas (differentiably) and evaluates the
loss on the whole global batch: the gradient equals the single-process one on the same
global batch. Every worker draws the same timestep and directions from one seeded
generator; each image's noise is drawn from a generator keyed by (seed, step, image index),
so the result does not depend on which worker holds which image.

Checkpoints (directions, AdamW moments and step counts, generator state, step and data
position) are safetensors + JSON reported to Ray Train, so a run restarted after a worker
dies resumes from the last one (FailureConfig) with no step lost or repeated.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from noiseclr.discovery.bank import DirectionBank, init_directions
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.noise import direction_deltas
from noiseclr.discovery.trainer import lr_factor, objective


class GatherBatch(torch.autograd.Function):
    """All-gather the per-worker deltas into the global batch (forward); in backward, keep
    this worker's slice of the gradient times the world size.

    Every worker computes the same loss on the same gathered batch, so its gradient for its
    own slice is exact; DeepSpeed then averages the direction gradients over the W workers,
    hence the factor W: the result equals the single-process gradient on the global batch.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.world, ctx.rank, ctx.n = world, rank, local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n] * ctx.world


class NoiseCLRModule(nn.Module):
    """What DeepSpeed wraps: frozen UNet + text encoder, trainable directions."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        directions: torch.Tensor,
        max_rows: int | None = None,
    ):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.directions = nn.Parameter(directions)
        self.max_rows = max_rows

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        return direction_deltas(
            self.unet, self.text_encoder, self.tokenizer, self.directions[dirs], x_t, t, self.max_rows
        )


def deepspeed_config(cfg: DiscoveryConfig, world: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Partition every parameter, the tiny ones too, so the frozen model is sharded.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    if cfg.offload and cfg.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch // world,
        "gradient_accumulation_steps": 1,  # accumulation is done by the loop (one contrastive batch)
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


def image_noise(seed: int, step: int, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise for each image, keyed by (seed, step, image index): worker-independent."""
    return torch.stack(
        [
            torch.randn(
                shape, generator=torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + int(i))
            )
            for i in index
        ]
    )


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _full_state(engine, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) fp32 value and AdamW moments of `param`, on every rank (a collective
    under ZeRO-3). ZeRO 1-3 keep them in partitions (DeepSpeed's safe_get_full_* assemble
    them); stage 0 keeps them on the parameter and in the plain optimizer."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param)
    if value is None:  # ZeRO stage 0
        state = _inner_optimizer(engine).state.get(param, {})
        found = {
            "directions": param.detach(),
            **{k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state},
        }
    else:
        found = {"directions": value}
        for key in ("exp_avg", "exp_avg_sq"):
            found[key] = safe_get_full_optimizer_state(param, key)
    return {k: v.detach().float().cpu().contiguous() for k, v in found.items() if v is not None}


def _optimizer_steps(engine) -> float:
    steps = [float(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s]
    return max(steps) if steps else 0.0


def _restore(engine, param: nn.Parameter, tensors: dict[str, torch.Tensor], opt_steps: float) -> None:
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    inner = _inner_optimizer(engine)
    if safe_get_full_fp32_param(param) is None:  # ZeRO stage 0: plain parameter and optimizer
        with torch.no_grad():
            param.copy_(tensors["directions"].to(param.device, param.dtype))
        if "exp_avg" in tensors:
            inner.state[param] = {
                "step": torch.tensor(opt_steps),
                "exp_avg": tensors["exp_avg"].to(param.device),
                "exp_avg_sq": tensors["exp_avg_sq"].to(param.device),
            }
        return
    safe_set_full_fp32_param(param, tensors["directions"].to(param.device))
    for key in ("exp_avg", "exp_avg_sq"):
        if key in tensors:
            safe_set_full_optimizer_state(param, tensors[key].to(param.device), key)
    for s in inner.state.values():
        if "step" in s:
            s["step"] = (
                torch.as_tensor(opt_steps, dtype=s["step"].dtype) if torch.is_tensor(s["step"]) else opt_steps
            )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point. config: {"discovery": DiscoveryConfig dict, "fingerprint", ...}."""
    import deepspeed
    import ray.train
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file, save_file

    from noiseclr.models.loader import load_model

    cfg = DiscoveryConfig(**config["discovery"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model = load_model(cfg.model, device=device)
    pipe = model.pipe
    gen = torch.Generator().manual_seed(cfg.seed)
    init = init_directions(
        pipe.text_encoder, cfg.k, gen, pipe.tokenizer, cfg.init_tokens if cfg.init == "tokens" else None
    )
    module = NoiseCLRModule(pipe.unet, pipe.text_encoder, pipe.tokenizer, init.to(device), cfg.max_rows)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW([module.directions], lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=deepspeed_config(cfg, world))
    param = module.directions
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    param_mib = param_bytes_per_worker(engine) / 2**20
    step_times: list[float] = []

    step, consumed = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "state.json").read_text())
            tensors = load_file(str(Path(d) / "state.safetensors"))
        if meta["fingerprint"] != model.fingerprint:
            raise ValueError("checkpoint belongs to another base model")
        _restore(engine, param, tensors, meta["optimizer_steps"])
        gen.set_state(tensors["rng"])
        step, consumed = meta["step"], meta["rows_consumed"]

    local = cfg.batch // world
    shard = ray.train.get_dataset_shard("train")
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # this worker's latents after one pass

    def batches():
        """Local batches forever: first pass streams from Ray Data, later passes reuse it."""
        nonlocal cache
        for batch in shard.iter_torch_batches(batch_size=local, drop_last=True, dtypes=None):
            item = (batch["index"].cpu(), batch["latent"].float().cpu())
            if cfg.cache_latents:
                cache.append(item)
            yield item
        while True:
            if not cache:
                yield from (
                    (b["index"].cpu(), b["latent"].float().cpu())
                    for b in shard.iter_torch_batches(batch_size=local, drop_last=True)
                )
            yield from cache

    stream = batches()
    for _ in range(consumed):  # data position: skip the batches this run had consumed
        next(stream)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    while step < cfg.steps:
        started = time.perf_counter()
        index, x0 = next(stream)
        consumed += 1
        t = torch.randint(
            cfg.t_min, min(cfg.t_max, sched.config.num_train_timesteps - 1) + 1, (1,), generator=gen
        )
        dirs = torch.randperm(cfg.k, generator=gen)[: cfg.directions_per_step]
        noise = image_noise(cfg.seed, step, index, tuple(x0.shape[1:]))
        ts = t.expand(len(x0)).to(device)
        x_t = sched.add_noise(x0.to(device), noise.to(device), ts).to(dtype)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step)
        deltas = engine(x_t, ts, dirs.to(device)).float()
        if world > 1:
            deltas = GatherBatch.apply(deltas)
        loss = objective(cfg, deltas)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        engine.backward(loss)
        engine.step()
        step += 1
        step_times.append(time.perf_counter() - started)
        recent = step_times[1:] or step_times  # the first step includes warm-up
        metrics = {
            "step": step,
            "loss": float(loss),
            "param_mib": param_mib,
            "pairs_per_s": cfg.batch * cfg.directions_per_step * len(recent) / sum(recent),
        }
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = _full_state(engine, param)
            state["rng"] = gen.get_state()
            meta = {
                "step": step,
                "rows_consumed": consumed,
                "optimizer_steps": _optimizer_steps(engine),
                "fingerprint": model.fingerprint,
                "world": world,
                "config": cfg.model_dump(),
            }
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_file(state, str(Path(tmp) / "state.safetensors"))
                    (Path(tmp) / "state.json").write_text(json.dumps(meta))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)


def param_bytes_per_worker(engine) -> int:
    """Bytes of parameters this worker holds (its partitions under ZeRO-3)."""
    total = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", None)
        total += (local.numel() if local is not None else p.numel()) * p.element_size()
    return total


def run_distributed(
    cfg: DiscoveryConfig,
    out: str | Path,
    workers: int,
    address: str | None = None,
    storage_path: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Start (or join) Ray, stream latents with Ray Data, train with a TorchTrainer, save the bank.

    storage_path / storage_options default to the config's; the options reach fsspec for the
    data and, through the same fsspec filesystem, Ray Train's checkpoints.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from noiseclr.data.ray_input import latent_dataset, pyarrow_filesystem
    from noiseclr.models.loader import load_model

    storage_path = storage_path or cfg.storage_path
    storage_options = storage_options if storage_options is not None else cfg.storage_options
    fs = None
    if storage_path and storage_options:
        # The data's fsspec filesystem, options and all, serves the checkpoints too (Ray then
        # wants the path without its scheme); without options Ray resolves the path itself.
        fs, storage_path = pyarrow_filesystem(storage_path, storage_options)
    if cfg.batch % workers:
        raise ValueError(f"batch ({cfg.batch}) must be divisible by workers ({workers})")
    out = Path(out).resolve()
    use_gpu = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    if not ray.is_initialized():
        ray.init(
            address=address,
            runtime_env={"env_vars": env},
            include_dashboard=False,
            **({} if address else {"num_cpus": max(4, workers + 2)}),
        )
    model = load_model(cfg.model, device="cpu")
    data = cfg.data
    if data is None:
        from noiseclr.domains.dataset import write_world

        data = str(out / "data")
        if not (out / "data" / "factors.parquet").exists():
            write_world(
                data, n=cfg.n_images, seed=cfg.seed, resolution=model.resolution, fixed=cfg.world_fixed
            )
    ds, counter, n_files = latent_dataset(
        data, cfg.model, model.resolution, storage_options, limit=cfg.n_images
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"discovery": cfg.model_dump()},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path or str(out / "ray"),
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(d) / "state.safetensors"))
        meta = json.loads((Path(d) / "state.json").read_text())
    corrupt = ray.get(counter.get.remote())
    bank = DirectionBank(
        directions=tensors["directions"],
        base_model={
            "source": model.source,
            "fingerprint": model.fingerprint,
            "hidden_size": int(tensors["directions"].shape[1]),
        },
        name=cfg.name,
        config={**cfg.model_dump(), "workers": workers},
        metrics={
            "steps": meta["step"],
            "final_loss": result.metrics.get("loss"),
            "files": n_files,
            "corrupt_images": corrupt["corrupt"],
            "corrupt_examples": corrupt["examples"],
            "data": data,
            "world": meta["world"],
        },
        edit_defaults={"window": [cfg.edit_window, 0]},
    )
    return {
        "bank": bank.save(out / "bank"),
        "corrupt_images": corrupt["corrupt"],
        "steps": meta["step"],
        "result_path": result.path,
        "metrics": dict(result.metrics),
    }
