"""The discovery job, one workflow for one process and for Ray Train workers:

    model -> data -> train (single process or Ray Train + DeepSpeed) -> bank -> measure -> gallery
          -> the bank card (OUT/bank/README.md, showing OUT/gallery/gallery.png)

Both paths start from OUT/checkpoints (the same `TrainState` format), run the same micro-step
(`discovery.step`), and end in the same bank, measurement and gallery, so every config key means
the same with and without workers. Tracking and sweeps hook in here, once.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from noiseclr.bank import DirectionBank, EditDefaults
from noiseclr.bank.schema import BankFigure
from noiseclr.card import save_bank, write_card
from noiseclr.conditioning import text_encoders
from noiseclr.discovery import checkpoint
from noiseclr.discovery.checkpoint import TrainState
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.step import check_schedule, fixed_norm, shaped
from noiseclr.discovery.trainer import final_loss, start_state
from noiseclr.errors import Preempted, UserError
from noiseclr.evaluation.blind import OBJECTIVE
from noiseclr.models.base import DiffusionModel, load_model, resolve_device

log = logging.getLogger(__name__)

TRACKING_PENDING = "tracking-pending.json"  # in OUT: the run's record has not reached MLflow yet
TRIAL_RUN = "mlflow-run-id"  # in a sweep trial's OUT: its MLflow run, continued if the trial restarts


@dataclass
class DiscoveryResult:
    """What a discovery run made and a few figures, the same for both paths."""

    bank: Path
    steps: int
    workers: int  # 0: single process
    resumed_from: Path | None  # the checkpoint this call started from
    images: int  # images trained on
    corrupt_images: int  # unreadable files skipped
    final_loss: float | None
    seconds: float
    evaluation: Path | None  # the measurement's page (shapes world only)
    gallery: Path | None  # None with gallery.enabled: false
    html: Path | None
    alignment: float | None = None  # the measurement's summary (shapes world only)
    alignment_interval: tuple[float, float] | None = None  # its 95% bootstrap interval
    coverage: int | None = None  # factors some direction moves cleanly
    run_id: str | None = None  # the MLflow run, when tracked
    score: float | None = None  # the oracle-free measurement (any domain): the bank's score
    score_interval: tuple[float, float] | None = None  # its 95% bootstrap interval
    live: int | None = None  # directions that edit something (not dead)
    objective: BankFigure | None = None  # the sweeps' objective off the oracle (blind.OBJECTIVE)
    tracking_error: str | None = None  # the run's record did not reach MLflow (the bank is saved)
    card: Path | None = None  # the bank card, bank/README.md (None: a README.md of the user's is there)


def generated_data(cfg: DiscoveryConfig, out: Path, resolution: int) -> str:
    """OUT/data: `n_images` scenes of the shapes world (the config's `world_fixed`), rewritten when
    the world it holds was made with other settings."""
    from noiseclr.domains.dataset import read_table, write_world

    data = out / "data"
    want = {
        "seed": str(cfg.optim.seed),
        "resolution": str(resolution),
        "n": str(cfg.data.n_images),
        "fixed": json.dumps(cfg.data.world_fixed, sort_keys=True),
    }
    if (data / "factors.parquet").exists():
        meta = {k.decode(): v.decode() for k, v in (read_table(str(data)).schema.metadata or {}).items()}
        if all(meta.get(k) == v for k, v in want.items()):
            return str(data)
        shutil.rmtree(data)
    write_world(
        str(data), n=cfg.data.n_images, seed=cfg.optim.seed, resolution=resolution, fixed=cfg.data.world_fixed
    )
    return str(data)


def _train_single(
    cfg: DiscoveryConfig, model: DiffusionModel, data: str, out: Path, state: TrainState, live=None
):
    from noiseclr.data.images import load_latents
    from noiseclr.discovery.trainer import DiscoveryTrainer
    from noiseclr.utils.memory import peak_rss_mib

    images = load_latents(
        data, model.resolution, model.pixel_vae, limit=cfg.data.n_images, storage_options=cfg.storage.options
    )
    trainer = DiscoveryTrainer(cfg, model, images.latents, state)
    trainer.on_step = live.step if live is not None else None
    final = trainer.fit(out)
    return final, {
        "files": len(images.files) + len(images.bad_files),
        "corrupt_images": len(images.bad_files),
        "pairs_per_s": trainer.pairs_per_s,
        "peak_rss_mib": round(peak_rss_mib(), 1),  # this process: model, latents, training
    }


def _train_ray(
    cfg: DiscoveryConfig, model: DiffusionModel, data: str, out: Path, resume: Path | None, address, run=None
):
    from noiseclr.tracking.runs import tracking_uri
    from noiseclr.training.distributed import train_distributed

    mlflow_run = {"uri": tracking_uri(cfg), "run_id": run.info.run_id} if run is not None else None
    result, counts = train_distributed(cfg, out, data, model.resolution, resume, address, mlflow_run)
    with result.as_directory() as d:
        final = TrainState.load(d)
    # where the next run, of either kind, resumes
    written = checkpoint.write(out, final, cfg.run.keep_checkpoints)
    if counts.pop("stopped_on_sigterm"):
        raise Preempted(
            f"stopped on SIGTERM after step {final.step} of {cfg.optim.steps}: checkpoint {written} "
            "written; run the same command to resume from it"
        )
    return final, counts


def bank_from_state(
    cfg: DiscoveryConfig, model: DiffusionModel, state: TrainState, metrics: dict
) -> DirectionBank:
    norm = fixed_norm(cfg, text_encoders(model.pipe))  # the directions as the model saw them
    return DirectionBank(
        directions=shaped(state.directions.float(), norm),
        base_model=model.bank_record(),
        name=cfg.name,
        config=cfg.record(),  # the flat record every bank holds
        metrics={
            "steps": state.step,
            "final_loss": final_loss(state.history),
            "world": state.world,
            **metrics,
        },
        edit_defaults=EditDefaults(window=(cfg.evaluation.edit_window, 0)),
    )


FRESH_SEED = 5000  # a re-measurement's generated images start this many seeds after the first's


def blind_protocol(cfg: DiscoveryConfig, n: int | None = None, fresh: bool = False):
    """The job's oracle-free protocol on `n` scored images per source (default: the job's);
    `fresh`: other generated seeds than the first measurement's (a sweep's re-measurement)."""
    from noiseclr.evaluation import blind

    n = n or cfg.evaluation.images
    return blind.BlindProtocol(
        n_images=n,
        calibration_images=min(4, n),
        prompt=cfg.gallery.prompt,
        steps=cfg.evaluation.steps,
        inversion_steps=cfg.evaluation.inversion_steps or max(2, round(1.25 * cfg.evaluation.steps)),
        window=None,  # each direction in its own edit window (the oracle's choice, else edit_window)
        seed=cfg.optim.seed + 2000 + (FRESH_SEED if fresh else 0),
    )


def oracle_protocol(cfg: DiscoveryConfig, n: int | None = None, fresh: bool = False):
    """The job's oracle protocol (shapes world), as blind_protocol."""
    from noiseclr.evaluation import evaluate

    n = n or cfg.evaluation.images
    p = evaluate.Protocol(
        fixed=cfg.data.world_fixed,
        n_images=n,
        calibration_images=min(4, n),
        steps=cfg.evaluation.steps,
        window=(cfg.evaluation.edit_window, 0),
        windows=tuple(cfg.evaluation.windows),
        **({"inversion_steps": cfg.evaluation.inversion_steps} if cfg.evaluation.inversion_steps else {}),
    )
    return p.model_copy(update={"seed": p.seed + FRESH_SEED}) if fresh else p


def measure_blind(cfg: DiscoveryConfig, model: DiffusionModel, bank: DirectionBank, data: str) -> None:
    """The oracle-free measurement of `bank`, stored in it: generated images (the gallery's
    prompt) and the first training images, inverted. Works on any model and domain."""
    from noiseclr.evaluation import blind

    protocol = blind_protocol(cfg)
    real = blind.real_images(data, model, protocol, cfg.storage.options)
    blind.measure_into(model, bank, protocol, real.pixels, real_names=real.files)
    log.info("%s", blind.summary_line(bank.scores))


def run_discovery(
    cfg: DiscoveryConfig,
    out: str | Path,
    fresh: bool = False,
    address: str | None = None,
    model: DiffusionModel | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> DiscoveryResult:
    """Run the whole job into OUT; resumes from OUT/checkpoints unless `fresh` (which deletes them).

    cfg.distributed.workers > 0 trains on Ray Train workers (a local Ray, or the cluster at `address`).
    With a tracking URI the run is an MLflow run (a child of `parent_run_id` when given; the
    existing run `run_id` continued when given, as a sweep's trial does at each milestone).
    """
    from noiseclr.tracking.runs import LiveMetrics, log_discovery, tracked_run, tracking_uri

    out = Path(out).resolve()
    started = time.perf_counter()
    if unused := cfg.unused_distributed():
        log.warning(
            "distributed.workers is 0 (one process): %s apply to Ray Train workers only", ", ".join(unused)
        )
    pending, trial_run = out / TRACKING_PENDING, out / TRIAL_RUN
    if fresh:
        shutil.rmtree(checkpoint.checkpoint_dir(out), ignore_errors=True)
        shutil.rmtree(out / "ray", ignore_errors=True)
        pending.unlink(missing_ok=True)
        trial_run.unlink(missing_ok=True)
    # A sweep's trial restarted from its first milestone (its sweep killed and resumed) goes on in
    # the run it started, rather than leaving that one RUNNING forever beside a second child run.
    if parent_run_id and run_id is None and trial_run.exists():
        run_id = trial_run.read_text().strip() or None
    model = model or load_model(cfg.model, device="cpu" if cfg.distributed.workers else cfg.run.device)
    state, resumed = start_state(cfg, model, out)  # refuses a changed config before anything is written
    if resumed is not None:
        log.warning("resuming from %s (step %d of %d)", resumed, state.step, cfg.optim.steps)
    check_schedule(cfg, model.pipe.scheduler.config.num_train_timesteps)
    run_name = f"{cfg.name}-{out.name}"
    # A plain job trains even when MLflow does not answer at the start, and logs the run at the
    # end (or at the next invocation, OUT/TRACKING_PENDING marking that no step was logged yet);
    # a sweep's trial needs its run to report to, so it still stops.
    defer = parent_run_id is None and run_id is None
    with tracked_run(cfg, run_name=run_name, parent=parent_run_id, run_id=run_id, defer=defer) as run:
        out.mkdir(parents=True, exist_ok=True)
        if run is not None and parent_run_id:
            trial_run.write_text(run.info.run_id)
        data = cfg.data.uri or generated_data(cfg, out, model.resolution)
        if run is None and defer and tracking_uri(cfg):  # marked now: a run stopped early keeps it
            pending.write_text(json.dumps({"tracking_uri": tracking_uri(cfg), "unlogged": "every step"}))
        # Steps an earlier invocation trained never reached MLflow: log every step once, at the end
        # (nothing live, which would send the new steps twice).
        unlogged = pending.exists()
        live = (
            LiveMetrics(cfg, run.info.run_id)
            if run is not None and not cfg.distributed.workers and not unlogged
            else None
        )
        try:
            if cfg.distributed.workers:  # rank 0 logs the steps live; the driver what did not get through
                final, counts = _train_ray(cfg, model, data, out, resumed, address, None if unlogged else run)
                model.pipe.to(resolve_device(cfg.run.device))  # the workers are done: measure and draw here
            else:
                final, counts = _train_single(cfg, model, data, out, state, live)
        finally:
            if live is not None:
                live.close()
        sent_by_workers = int(counts.pop("mlflow_sent_through", 0) or 0)  # rank 0's live metrics
        images = counts["files"] - counts["corrupt_images"]
        bank = bank_from_state(cfg, model, final, {**counts, "images": images, "data": data})
        bank.metrics["train_seconds"] = round(time.perf_counter() - started, 1)

        measured = report = None
        if cfg.evaluation.enabled and cfg.data.uri is None and (model.world or {}).get("world") == "shapes":
            from noiseclr.evaluation import evaluate

            measured, paths = evaluate.measure_bank(model, bank, oracle_protocol(cfg), out / "evaluation")
            log.info("alignment %.3f, coverage %s", measured["alignment"], measured["coverage"])
            report = paths["html"]
        bank_dir = save_bank(bank, out / "bank")  # kept whatever the measurement below does
        if cfg.evaluation.enabled:
            try:
                measure_blind(cfg, model, bank, data)
                bank.save(bank_dir)
            except UserError as err:  # e.g. too few readable images to measure on
                log.warning(
                    "the bank is saved unmeasured (%s); measure it with: noiseclr measure %s", err, bank_dir
                )

        pages = {"grid": None, "html": None}
        if cfg.gallery.enabled:
            from noiseclr.editing.gallery import write_gallery

            pages = write_gallery(
                model,
                bank,
                out / "gallery",
                cfg.gallery.scales,
                list(range(cfg.gallery.seeds)),
                cfg.gallery.prompt,
                cfg.gallery.steps,
            )
        card = write_card(bank_dir, bank, gallery=pages["grid"], find_gallery=False)  # this run's gallery
        result = DiscoveryResult(
            bank=bank_dir,
            steps=final.step,
            workers=cfg.distributed.workers,
            resumed_from=resumed,
            images=images,
            corrupt_images=counts["corrupt_images"],
            final_loss=bank.metrics["final_loss"],
            seconds=round(time.perf_counter() - started, 1),
            evaluation=report,
            gallery=pages["grid"],
            html=pages["html"],
            alignment=measured["alignment"] if measured else None,
            alignment_interval=measured and tuple(measured["scores"]["all"]["intervals"]["alignment"]),
            coverage=measured["coverage_count"] if measured else None,
            run_id=run.info.run_id if run else None,
            score=bank.scores.score if bank.scores else None,
            score_interval=tuple(bank.scores.interval) if bank.scores else None,
            objective=(bank.scores.aggregates or {}).get(OBJECTIVE) if bank.scores else None,
            live=bank.scores.live if bank.scores else None,
            card=card,
        )
        if run is not None:
            logged = 0 if unlogged else max(state.step, live.sent_through if live else sent_by_workers)
            try:
                log_discovery(cfg, result, final.history, data, measured, since=logged)
                pending.unlink(missing_ok=True)
            except Exception as err:  # the compute is done and the bank saved: do not lose them
                log.error(
                    "the bank is saved in %s but MLflow did not take the run's record (%s); run the "
                    "same command again when the server answers: it resumes at step %d (nothing "
                    "to train), measures and logs the run",
                    bank_dir,
                    err,
                    final.step,
                )
                result.tracking_error = str(err)
    if run is None and defer and tracking_uri(cfg):
        _log_late(cfg, result, final.history, data, measured, run_name, pending)
    return result


def _log_late(cfg, result, history, data, measured, run_name: str, pending: Path) -> None:
    """Log a run whose server did not answer at the start: now, with every step's metrics, or
    leave OUT/TRACKING_PENDING and say how to log it later."""
    from noiseclr.tracking.runs import log_discovery, tracked_run, tracking_uri

    try:
        with tracked_run(cfg, run_name=run_name) as late:
            log_discovery(cfg, result, history, data, measured, since=0)
            result.run_id = late.info.run_id
        pending.unlink(missing_ok=True)
        log.info("MLflow answered at the end: run %s logged with every step", result.run_id)
    except Exception as err:  # the bank is saved: say how to log it, lose nothing
        pending.write_text(json.dumps({"tracking_uri": tracking_uri(cfg), "error": str(err)}))
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not first.startswith("MLflow at "):
            first = f"MLflow at {tracking_uri(cfg)} did not answer ({first})"
        log.error(
            "the bank is saved in %s but %s; run the same command again when it answers: it resumes "
            "at step %d (nothing to train) and logs the run, every step's metrics included, and "
            "registers the bank",
            result.bank,
            first,
            result.steps,
        )
        result.tracking_error = str(err)
