"""Distributed discovery: Ray Train workers run the NoiseCLR micro-step inside a DeepSpeed engine.

The loop is `discovery.core.TrainLoop` and the maths `discovery.step`, the same the single
process runs; this file only places them. `DeepSpeedEngine` is the loop's engine: the frozen
UNet and text encoder and the (K, D) directions live in one module that DeepSpeed wraps (ZeRO
0-3 from the config; stage 3 also partitions the frozen weights), the only trainable tensor is
the direction matrix, and DeepSpeed averages its gradient across workers and accumulates
`grad_accum` micro-steps. Latents stream from Ray Data through
`get_dataset_shard`.

The global batch is split across workers. The loss couples images (positives are pairs of
different images), so each worker all-gathers the deltas (differentiably) and evaluates the
loss on the whole global batch: the gradient equals the single-process one on the same
global batch (`discovery.step` explains why the draws agree).

Checkpoints are `discovery.checkpoint.TrainState` folders reported to Ray Train, so a run
restarted after a worker dies resumes from the last one (FailureConfig) with no step lost or
repeated; the workflow copies the last one to OUT/checkpoints, where either path resumes it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from noiseclr.conditioning import as_encoders, direction_deltas, text_encoders
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.step import FixedNorm, shaped
from noiseclr.errors import ConfigError, OutOfMemory, Preempted, UserError
from noiseclr.utils.memory import peak_rss_mib
from noiseclr.utils.precision import resolve_dtype

# Steps between Ray Train reports (checkpoint steps and the last step always report). A report is
# a round trip through Ray Train's controller, measured at ~2 s on the 2-core CPU machine: once
# per step, a 40-step job of the embedded model took 107.6 s instead of 35.2 s. Per-step figures
# go out as Ray metrics instead (training/metrics.py).
REPORT_EVERY = 10


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
    """What DeepSpeed wraps: frozen UNet + text encoder(s), trainable directions."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder,
        tokenizer,
        directions: torch.Tensor,
        max_rows: int | None = None,
        norm: FixedNorm | None = None,
    ):
        super().__init__()
        self.unet, self.encoders = unet, as_encoders(text_encoder, tokenizer)  # SD's one, SDXL's two
        self.text_encoders = nn.ModuleList(self.encoders.encoders)  # registered: DeepSpeed places them
        self.unet.requires_grad_(False)
        self.text_encoders.requires_grad_(False)
        self.directions = nn.Parameter(directions)
        self.max_rows, self.norm = max_rows, norm

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        rows = shaped(self.directions[dirs], self.norm)
        return direction_deltas(self.unet, self.encoders, None, rows, x_t, t, self.max_rows)


def _without_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm)
    when its comm backend starts: about 30 s of g++ on each machine's first run, and a C++
    toolchain on every CPU worker node. Only `inference_all_reduce` (DeepSpeed's tensor-parallel
    inference) uses it; ZeRO training reduces through torch.distributed. So this process marks it
    unavailable, the state DeepSpeed itself takes on a machine where it cannot build."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # Not asked on other accelerators (CUDA has no such builder): reading the table makes
    # DeepSpeed probe every op's compatibility, compilers included.
    if get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """`discovery.core.Engine` on DeepSpeed: AdamW on the module's directions inside a DeepSpeed
    engine (ZeRO `zero_stage`), which averages the gradient over the workers, accumulates
    grad_accum micro-steps and steps at their boundary."""

    def __init__(self, cfg: DiscoveryConfig, module: NoiseCLRModule, world: int, state):
        import deepspeed

        _without_shm_comm_op()
        opt = torch.optim.AdamW([module.directions], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=module, optimizer=opt, config=deepspeed_config(cfg, world)
        )
        self.param = module.directions
        if state.exp_avg is not None:
            _restore(self.engine, self.param, state)

    def deltas(self, x_t: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        return self.engine(x_t, t, dirs)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by grad_accum itself
        self.engine.step()  # an update only at the accumulation boundary

    def step(self) -> None:
        pass  # DeepSpeed stepped at the boundary, in the last `backward`

    def snapshot(self) -> None:
        return None  # a worker's last finite state is its last checkpoint (gathering it each step costs)

    def restore(self, snapshot: None) -> None:
        pass  # the worker process ends with the error; a resumed run starts from the checkpoint

    def moments(self) -> dict:
        return {**_full_state(self.engine, self.param), "optimizer_steps": _optimizer_steps(self.engine)}


def deepspeed_config(cfg: DiscoveryConfig, world: int) -> dict:
    zero: dict = {"stage": cfg.distributed.zero_stage}
    if cfg.distributed.zero_stage == 3:
        # Partition every parameter, the tiny ones too, so the frozen model is sharded.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    if cfg.distributed.offload and cfg.distributed.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.method.batch // world,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # DeepSpeed clips gradients to norm 1.0 unless told otherwise (its default since 0.1x);
        # the single process does not clip, and the same config must train the same bank.
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.optim.precision == "bf16"},
        "fp16": {"enabled": cfg.optim.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


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


def _restore(engine, param: nn.Parameter, state) -> None:
    """Put a TrainState's AdamW moments and step count into the engine's optimizer (the
    directions were the module's initial value)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_optimizer_state

    inner = _inner_optimizer(engine)
    if safe_get_full_fp32_param(param) is None:  # ZeRO stage 0: plain parameter and optimizer
        inner.state[param] = {
            "step": torch.tensor(state.optimizer_steps),
            "exp_avg": state.exp_avg.to(param.device),
            "exp_avg_sq": state.exp_avg_sq.to(param.device),
        }
        return
    # DeepSpeed creates the ZeRO partitions' AdamW state at the first step; create it now (zeros,
    # then overwritten below) and link it, so the moments can be set before that step.
    zero = engine.optimizer
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(
        zero, "fp32_partitioned_groups_flat", []
    )
    for flat in flats:
        if "exp_avg" not in inner.state.get(flat, {}):
            inner.state[flat] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1-2: fragments -> that state
        zero._lazy_init_hp_params_optimizer_state()
    safe_set_full_optimizer_state(param, state.exp_avg.to(param.device), "exp_avg")
    safe_set_full_optimizer_state(param, state.exp_avg_sq.to(param.device), "exp_avg_sq")
    for s in inner.state.values():
        if "step" in s:
            steps = state.optimizer_steps
            s["step"] = torch.as_tensor(steps, dtype=s["step"].dtype) if torch.is_tensor(s["step"]) else steps


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point. config: {"discovery": DiscoveryConfig dict, "resume": the
    files of the checkpoint to start from, or None}; the workflow has checked it against the config."""
    if not config.get("use_gpu"):
        # Before DeepSpeed picks its accelerator: CPU workers on a machine that may have a GPU.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray
    import ray.train
    import torch.distributed as dist
    from diffusers import DDPMScheduler

    from noiseclr.discovery import step as steps
    from noiseclr.discovery.core import TrainLoop
    from noiseclr.models.base import load_model, scheduler_like
    from noiseclr.training.metrics import DiscoveryMetrics

    started = time.perf_counter()
    cfg = DiscoveryConfig(**config["discovery"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model = load_model(cfg.model, device=device)
    pipe = model.pipe
    sched = scheduler_like(DDPMScheduler, pipe.scheduler.config)
    steps.check_schedule(cfg, sched.config.num_train_timesteps)
    state = _start_state(cfg, model, config.get("resume"))
    module = NoiseCLRModule(
        pipe.unet, text_encoders(pipe), None, state.directions.to(device), cfg.run.max_rows,
        steps.fixed_norm(cfg, text_encoders(pipe)),
    )  # fmt: skip
    local = cfg.method.batch // world
    side = model.resolution // pipe.vae_scale_factor
    # Decided before DeepSpeed partitions anything; every rank takes the most cautious answer.
    wants = steps.want_checkpointing(
        cfg, module.forward, (pipe.unet.config.in_channels, side, side), local, device
    )
    flag = torch.tensor([int(wants)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()
    engine = DeepSpeedEngine(cfg, module, world, state)
    stream = _local_batches(cfg, ray.train.get_dataset_shard("train"), local)
    for _ in range(state.micro):  # data position: skip the batches this run had consumed
        next(stream)
    gather = GatherBatch.apply if world > 1 else None
    # Under DeepSpeed bf16/fp16 the module itself is converted: give it inputs of its dtype.
    dtype = resolve_dtype(cfg.optim.precision)
    loop = TrainLoop(cfg, engine, sched, state, lambda _: next(stream), device, dtype, gather, world)
    param_mib = param_bytes_per_worker(engine.engine) / 2**20
    nodes: list[str | None] = [None] * world  # the Ray nodes the workers run on (this attempt)
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    exported = DiscoveryMetrics(cfg.name, rank, device)
    live = None
    if rank == 0 and config.get("mlflow"):  # the run's per-step metrics, live, from rank 0
        from noiseclr.tracking.runs import LiveMetrics

        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow"]["uri"]
        live = LiveMetrics(cfg, config["mlflow"]["run_id"])
    # This attempt's worker function, from after its imports (model load, data, DeepSpeed set-up
    # included) to its first optimizer step done.
    first_step_s: float | None = None
    saved_at: list[int | None] = [state.step if config.get("resume") else None]
    attempt_start = state.step

    def metrics_of(record: dict) -> dict:
        return {
            "step": loop.step,
            "loss": record["loss"],
            "pairs_per_s": record["pairs_per_s"],
            "param_mib": param_mib,
            "nodes": len(set(nodes)),
            "attempt_start_step": attempt_start,
        }

    def on_step(record: dict) -> None:  # every rank, after each optimizer step
        nonlocal first_step_s
        first_step_s = first_step_s or time.perf_counter() - started
        exported.record_step(
            loop.step, record["loss"], record["pairs_per_s"], record["seconds"], local * cfg.optim.grad_accum
        )
        if live is not None:
            live.step(record)
        if not loop.checkpoint_due() and loop.step % REPORT_EVERY == 0:
            ray.train.report(metrics_of(record))  # Ray Train: metrics

    def save(saved) -> None:  # every rank (a collective under ZeRO-3), where a checkpoint is due
        if saved_at[0] == loop.step:  # a preemption notice and a stop at one step: one checkpoint
            return
        metrics = metrics_of({**loop.history[-1], "pairs_per_s": loop.pairs_per_s})
        if live is not None and loop.step == cfg.optim.steps:  # the driver logs what did not get through
            live.close()
            metrics["mlflow_sent_through"] = live.sent_through
        # The largest worker's peak memory so far (a collective: every rank is here).
        peak = torch.tensor([peak_rss_mib()], dtype=torch.float64, device=device)  # nccl: on the GPU
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        metrics.update(worker_peak_rss_mib=round(peak.item(), 1), first_step_s=round(first_step_s, 2))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = ray.train.Checkpoint.from_directory(saved.save(tmp)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)  # Ray Train: metrics and checkpoint
        saved_at[0] = loop.step

    def last_good() -> str:
        return "none yet" if saved_at[0] is None else f"step {saved_at[0]} in Ray Train's storage"

    stop_flag, noticed = config.get("stop"), [False]
    preemption_info = getattr(ray.train, "get_preemption_info", None)  # Ray Train v2

    def stop_requested() -> bool:  # every rank, after each step (and its checkpoint, if due)
        # A node of this run is being drained for preemption (a spot reclaim; `ray drain-node
        # --reason DRAIN_NODE_REASON_PREEMPTION`): checkpoint now and train on. When the node goes,
        # Ray Train restarts the workers from this checkpoint (FailureConfig.max_preemption_failures).
        if preemption_info is not None and preemption_info() is not None and not noticed[0]:
            noticed[0] = True  # the call above is a barrier: every rank agrees, every rank saves
            if saved_at[0] != loop.step:
                save(loop.state())
        # The driver got SIGTERM: every rank stops after this same step.
        asked = torch.tensor([int(rank == 0 and stop_flag is not None and _asked(stop_flag))])
        asked = asked.to(device)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        return bool(asked.item())

    try:
        loop.run(save, on_step, last_good=last_good, stop_requested=stop_requested)
    except Preempted:  # the checkpoint is reported; the driver says where it is
        if live is not None:
            live.close()


def _asked(flag) -> bool:
    """Whether the driver asked the workers to stop (a flag it cannot answer for did not ask)."""
    import ray

    try:
        return bool(ray.get(flag.get.remote(), timeout=30))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


class Relay:
    """What `relay_sigterm` yields: the flag actor for the workers, and afterwards whether a
    SIGTERM came while it was in force."""

    def __init__(self, flag) -> None:
        self.flag, self.stopped = flag, False


@contextmanager
def relay_sigterm() -> Iterator[Relay]:
    """A SIGTERM to the driver, relayed to the workers: yields a `Relay` whose flag actor (for
    the workers' config) a watcher thread sets when `preemption.notice` has seen the signal. The
    workers then finish the step under way, checkpoint it and return."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from noiseclr.utils import preemption

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    flag = (
        ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()
    )  # lives with the driver
    relay, done = Relay(flag), threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if preemption.requested():
                flag.set.remote()
                logging.getLogger(__name__).warning(
                    "SIGTERM: the workers stop after the step under way and checkpoint it"
                )
                return

    watcher = threading.Thread(target=watch, name="sigterm-relay", daemon=True)
    with preemption.notice():
        watcher.start()
        try:
            yield relay
        finally:
            relay.stopped = preemption.requested()  # read before `notice` forgets it
            done.set()
            watcher.join()
            ray.kill(flag)


class StopFlag:
    """Set once by the driver, read by rank 0 after each step (a Ray actor)."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value


def _start_state(cfg: DiscoveryConfig, model, resume: dict | None):
    """Where this worker starts: Ray Train's checkpoint after a restart, else the run's start
    checkpoint (its files, sent as bytes in the config), else step 0."""
    import ray.train

    from noiseclr.discovery.checkpoint import TrainState
    from noiseclr.discovery.trainer import initial_state

    checkpoint = ray.train.get_checkpoint()  # set when Ray Train restarts this run after a failure
    if checkpoint:
        with checkpoint.as_directory() as d:
            return TrainState.load(d)
    if resume:
        with tempfile.TemporaryDirectory() as d:
            for name, data in resume.items():
                (Path(d) / name).write_bytes(data)
            return TrainState.load(d)
    return initial_state(cfg, model)


def _local_batches(cfg: DiscoveryConfig, shard, local: int):
    """(indices, latents) of this worker's local batches forever: the first pass streams from
    Ray Data, later passes reuse it (cache_latents) or stream again."""
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in shard.iter_torch_batches(batch_size=local, drop_last=True, dtypes=None):
        item = (batch["index"].cpu(), batch["latent"].float().cpu())
        if cfg.distributed.cache_latents:
            cache.append(item)
        yield item
    while True:
        if not cache:
            yield from (
                (b["index"].cpu(), b["latent"].float().cpu())
                for b in shard.iter_torch_batches(batch_size=local, drop_last=True)
            )
        yield from cache


# What rank 0 reports that the bank's metrics keep.
REPORTED = (
    "pairs_per_s", "param_mib", "nodes", "mlflow_sent_through", "worker_peak_rss_mib", "first_step_s",
    "attempt_start_step",  # the step the last attempt (after a restart, its checkpoint's) began at
)  # fmt: skip


def param_bytes_per_worker(engine) -> int:
    """Bytes of parameters this worker holds (its partitions under ZeRO-3)."""
    total = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", None)
        total += (local.numel() if local is not None else p.numel()) * p.element_size()
    return total


def workers_use_gpu(device: str) -> bool:
    """Whether the workers take GPUs: as `device` says; for "auto", when the cluster has GPUs.
    Not when this driver has one: on a cluster the driver often runs on a CPU-only head."""
    if device == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.device(device).type == "cuda"


def placeable(
    nodes: list[dict[str, float]], per_worker: dict[str, float], workers: int, strategy: str
) -> bool:
    """Whether `workers` bundles of `per_worker` fit these nodes' resources under a Ray placement
    strategy. Totals, busy or not: a busy cluster frees up, one without the resource never does."""
    fits = [min(int(node.get(r, 0.0) // need) for r, need in per_worker.items()) for node in nodes]
    if strategy == "STRICT_SPREAD":
        return sum(f >= 1 for f in fits) >= workers
    if strategy == "STRICT_PACK":
        return max(fits, default=0) >= workers
    return sum(fits) >= workers


def wait_for_resources(
    per_worker: dict[str, float], workers: int, strategy: str, timeout_s: float, poll_s: float = 1.0
) -> float:
    """Wait (up to `timeout_s`, for nodes an autoscaler adds) until the Ray cluster can place the
    workers; ConfigError naming what was asked and what the nodes have otherwise. Returns the
    seconds waited. Ray Train itself retries its worker group's start without limit."""
    import ray
    from ray.autoscaler.sdk import request_resources

    started = time.monotonic()
    asked = False
    try:
        while True:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            if placeable(nodes, per_worker, workers, strategy):
                return time.monotonic() - started
            if not asked:  # an autoscaler, where the cluster has one, starts nodes for these
                asked = _request(request_resources, [dict(per_worker)] * workers)
            waited = time.monotonic() - started
            if waited >= timeout_s:
                wanted = ", ".join(f"{r} {v:g}" for r, v in per_worker.items())
                totals = {r: [n.get(r, 0.0) for n in nodes] or [0.0] for r in per_worker}
                has = "; ".join(
                    f"{r} {sum(v):g} in all, at most {max(v):g} on a node" for r, v in totals.items()
                )
                raise ConfigError(
                    f"distributed.workers: {workers} workers of {wanted} each ({strategy}) do not fit this "
                    f"Ray cluster of {len(nodes)} nodes ({has}); waited {waited:.0f} s for nodes to join "
                    "(distributed.resource_wait_s)"
                )
            time.sleep(min(poll_s, max(0.0, timeout_s - waited)))
    finally:
        if asked:  # Ray Train asks for its own from here; a standing request would keep nodes up
            _request(request_resources, [])


def _request(request_resources, bundles: list[dict]) -> bool:
    """Ask the autoscaler for `bundles` ([] withdraws); False where the cluster cannot take it."""
    try:
        request_resources(bundles=bundles)
        return True
    except Exception:  # no autoscaler state (a bare local cluster): nothing to ask
        return False


def train_distributed(
    cfg: DiscoveryConfig,
    out: Path,
    data: str,
    resolution: int,
    resume_from: Path | None = None,
    address: str | None = None,
    mlflow_run: dict | None = None,
) -> tuple[object, dict]:
    """Start (or join) Ray, stream latents with Ray Data, train with a TorchTrainer.

    Returns the final `ray.train.Checkpoint` (a TrainState folder in Ray Train's storage:
    `storage_path`, default OUT/ray) and the data counts. `resume_from` is a checkpoint folder to start from;
    storage_options reach fsspec for the data and, through the same filesystem, the checkpoints.
    mlflow_run ({"uri", "run_id"}): rank 0 sends each step's metrics to that run as it trains.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from noiseclr.data.ray_input import latent_dataset, probe_storage, pyarrow_filesystem
    from noiseclr.utils.raycluster import init_ray

    workers = cfg.distributed.workers
    storage_path, fs = cfg.storage.path, None
    if storage_path and cfg.storage.options:
        # The data's fsspec filesystem, options and all, serves the checkpoints too (Ray then
        # wants the path without its scheme); without options Ray resolves the path itself.
        fs, storage_path = pyarrow_filesystem(storage_path, cfg.storage.options)
    # The dashboard too: Ray Train's placement-group cleaner asks its State API whether the controller
    # lives, and without it logs a warning every second of the run into the user's terminal.
    init_ray(address, num_cpus=max(4, workers + 2))
    use_gpu = workers_use_gpu(cfg.run.device)
    per_worker = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    waited = wait_for_resources(
        per_worker, workers, cfg.distributed.placement_strategy, cfg.distributed.resource_wait_s
    )
    if cfg.storage.path:  # before any worker starts or any data is read
        probe_storage(cfg.storage.path, cfg.storage.options)
    if waited > 1:
        logging.getLogger(__name__).info("the cluster holds the workers' resources after %.0f s", waited)
    # SIGTERM from here on (a scheduler's or a spot instance's notice to the driver): the workers
    # checkpoint the step under way and return; the workflow then stops with Preempted.
    start = {p.name: p.read_bytes() for p in Path(resume_from).iterdir()} if resume_from else None
    with relay_sigterm() as relay:
        ds, counter, n_files = latent_dataset(
            data, cfg.model, resolution, cfg.storage.options,
            limit=cfg.data.n_images, run=cfg.name, gpu=use_gpu,
        )  # fmt: skip
        trainer = TorchTrainer(
            train_loop_per_worker,
            # The start checkpoint travels in the config (a few MB at most), so workers on other
            # nodes need no access to OUT; Ray Train's own checkpoints cover restarts.
            train_loop_config={
                "discovery": cfg.model_dump(),
                "use_gpu": use_gpu,
                "resume": start,
                "mlflow": mlflow_run,
                "stop": relay.flag,  # the driver's SIGTERM, relayed
            },
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=use_gpu,
                resources_per_worker=per_worker,
                placement_strategy=cfg.distributed.placement_strategy,
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                # A name per invocation: Ray Train restores a same-named run by itself, but resuming
                # across invocations is the workflow's (from OUT/checkpoints, config checked).
                name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage_path or str(out / "ray"),
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=cfg.distributed.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            ),
            datasets={"train": ds},
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        try:
            result = trainer.fit()
            if result.error:
                raise result.error
        except Exception as err:  # Ray Train raises the workers' errors wrapped
            found = worker_user_error(err)
            if found is None:
                raise
            raise found from None
    if fs is not None:  # the workers wrote the checkpoints: a listing cached here would miss them
        fs.handler.fs.invalidate_cache()
    corrupt = ray.get(counter.get.remote())
    reported = result.metrics or {}
    counts = {
        "peak_rss_mib": round(peak_rss_mib(), 1),  # the driver's (it never holds the images)
        "files": n_files,
        "corrupt_images": corrupt["corrupt"],
        "corrupt_examples": corrupt["examples"],
        **{k: reported[k] for k in REPORTED if k in reported},
        "stopped_on_sigterm": relay.stopped,
    }
    return result.checkpoint or newest_checkpoint(result), counts


# Unambiguous signs only: Ray's memory monitor ("running low on memory", OutOfMemoryError) and
# the CUDA allocator. Ray's text for any unexpected worker death lists the OOM killer among
# several causes (a segfault, `ray stop --force`), so it is not taken as one.
MEMORY_SIGNS = ("running low on memory", "cuda out of memory", "outofmemoryerror:")
MEMORY_KNOBS = (
    "lower what a step holds: method.batch (images per step), method.negatives (directions per "
    "step), run.gradient_checkpointing: true, run.max_rows (UNet rows per call); or give each "
    "worker more memory"
)


def worker_user_error(err: BaseException) -> UserError | None:
    """The error a user can act on (a diverged run, bad data, memory) that stopped a worker, out
    of Ray Train's wrapping (a WorkerGroupError holds each failed worker's exception, Ray's task
    error the original as `cause`), so the command prints its one line instead of a traceback.
    A worker killed for memory (Ray's OutOfMemoryError, the kernel's OOM killer as Ray reports
    it, CUDA's allocator) becomes OutOfMemory naming the knobs that lower a step's memory."""
    queue: list = [err]
    memory: BaseException | None = None
    for _ in range(64):  # a bounded walk: a chain that loops back ends here
        if not queue:
            break
        e = queue.pop(0)
        if isinstance(getattr(e, "cause", None), BaseException):
            queue.append(e.cause)
        if isinstance(e, UserError) and not hasattr(e, "cause"):
            return e
        text = f"{type(e).__name__}: {e}".lower()
        if memory is None and any(sign in text for sign in MEMORY_SIGNS):
            memory = e
        queue += [*getattr(e, "worker_failures", {}).values(), *filter(None, [e.__cause__])]
    if memory is not None:
        first = str(memory).strip().splitlines()[0] if str(memory).strip() else type(memory).__name__
        return OutOfMemory(
            f"a worker ran out of memory ({type(memory).__name__}: {first[:160]}) and the run stopped after "
            f"its restarts from the checkpoint (distributed.max_failures); {MEMORY_KNOBS}"
        )
    return None


def newest_checkpoint(result):
    """The run's newest checkpoint in its storage, for a Result that names none.

    Ray Train (2.60) can end a run before its controller has registered the last reported
    checkpoint (seen with checkpoints at two consecutive steps at the end of a run): the Result
    then holds neither checkpoint nor metrics, though the folder was written."""
    import json

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from noiseclr.discovery.checkpoint import STATE_META

    fs = result.filesystem
    found = []
    for info in fs.get_file_info(pafs.FileSelector(result.path)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_META}") as f:
                found.append((json.loads(f.read())["step"], info.path))
        except (OSError, ValueError, KeyError):  # a checkpoint cut short: not one to resume from
            continue
    if not found:
        raise RuntimeError(f"Ray Train reported no checkpoint and none is readable under {result.path}")
    return Checkpoint(max(found)[1], filesystem=fs)
