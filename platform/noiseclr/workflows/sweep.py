"""Hyperparameter sweeps: Ray Tune over K, the timestep range, tau (and lr, negatives), each trial a
discovery run, the objective a measurement of its bank (the loss is not a quality measure): the
oracle's alignment on the shapes world, the oracle-free bank objective (evaluation/blind.py,
OBJECTIVE: validated against the oracle across banks in docs/oracle-free.md) on any domain.

    noiseclr sweep --config jobs/sweep-shapes.yaml --out out/sweep

Each trial trains in steps (`milestones`), measuring and reporting after each with
`ray.tune.report`, so ASHA stops weak trials early; Optuna (through Ray Tune's integration)
proposes the next. A trial is one discovery workflow, resumed from its own checkpoints at every
milestone, and may itself use Ray Train workers (`workers` in the base job: Train runs inside the
Tune function). Every figure carries its bootstrap interval; before a bank is chosen the leading
trials are measured again on more images (`remeasure`), as one measurement on a few images is
noisy. With a tracking URI each trial is an MLflow child run under one parent sweep run (its
figures, intervals and re-measurement logged), and the chosen trial's bank is registered and
given an alias. `early_stopping: false` runs every trial to the end. Rerunning resumes an
interrupted sweep. Results: OUT/sweep.csv, OUT/sweep.md and OUT/sweep.png (objective against each
hyperparameter), logged to the parent run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.errors import ConfigError
from noiseclr.utils.configfile import read_mapping, validation_message
from noiseclr.utils.raycluster import init_ray

log = logging.getLogger(__name__)
SWEPT = ("k", "t_range", "tau", "lr", "negatives")  # what a space may name
# what a trial reports, besides the loss (and each metric's 95% interval, METRIC_low / METRIC_high)
FIGURES = ("alignment", "coverage", "objective", "score", "live", "steps")
MILESTONE = "milestone.json"  # in a trial's Tune checkpoint: how many milestones it has reported


class Dimension(BaseModel):
    """One search dimension: exactly one of these."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = None  # inclusive

    @model_validator(mode="after")
    def _one(self) -> Dimension:
        given = [k for k in ("choice", "uniform", "loguniform", "integer") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of choice, uniform, loguniform, integer (got {given or 'none'})"
            )
        return self

    def tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(self.integer[0], self.integer[1] + 1)


class Remeasure(BaseModel):
    """How the sweep picks its bank: the `top` trials with the highest figure among those that
    trained to the last milestone are measured again on `images` images per source (the same
    images for each), and the highest re-measured figure wins (ties: the first measurement)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    top: int = Field(2, ge=0)  # 0 or 1: no re-measurement, the best figure wins
    images: int = Field(8, ge=2)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["sweep"] = "sweep"
    job: str  # the base discovery job (YAML), relative to the sweep file
    # job keys for short trials: in the job's sections ({evaluation: {images: 4}}) or by flat name
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dimension]  # k, t_range ([t_min, t_max] pairs), tau, lr, negatives
    milestones: list[int] = Field(default_factory=lambda: [100, 200])  # steps measured (ASHA rungs)
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(1, ge=1)
    cpus_per_trial: float = Field(2, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    # alignment: the shapes world's oracle (data.uri: null); objective: the oracle-free bank
    # objective validated against the oracle across banks (evaluation.blind.OBJECTIVE), on any
    # domain; score: the oracle-free mean direction score; auto: alignment where the oracle
    # exists, else objective.
    metric: Literal["auto", "alignment", "objective", "score"] = "auto"
    early_stopping: bool = True  # ASHA stops trials that trail at a milestone; false: every trial runs on
    reduction_factor: int = Field(2, ge=2)
    remeasure: Remeasure = Field(default_factory=Remeasure)
    seed: int = 0
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    register_alias: str = "champion"  # given to the best trial's registered bank
    # The first trial runs the base job's own values (the default the sweep must beat), so the
    # table says how much better the best region is under the same protocol.
    baseline: bool = True

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        unknown = sorted(set(self.space) - set(SWEPT))
        if unknown:
            raise ValueError(f"space may name {list(SWEPT)}, not {unknown}")
        if not self.milestones or self.milestones != sorted(set(self.milestones)) or self.milestones[0] < 1:
            raise ValueError(f"milestones must be increasing step counts >= 1, got {self.milestones}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> tuple[SweepConfig, DiscoveryConfig]:
        """The sweep and its base job (overrides applied; validated both)."""
        path = Path(path)
        values = read_mapping(path, "sweep config")
        try:
            sweep = cls(**values)
        except ValidationError as err:
            raise ConfigError(f"sweep config {path}: {validation_message(err, cls)}") from None
        try:
            job = DiscoveryConfig.from_yaml(path.parent / sweep.job, **sweep.overrides)
        except ConfigError as err:  # the job file's own error, or one of this file's overrides
            raise ConfigError(f"sweep config {path} (its job and overrides): {err}") from None
        if sweep.baseline:
            for key, value in job_values(job, sweep).items():
                dim = sweep.space[key]
                inside = (
                    value in dim.choice
                    if dim.choice is not None
                    else (dim.uniform or dim.loguniform or dim.integer)[0]
                    <= value
                    <= (dim.uniform or dim.loguniform or dim.integer)[1]
                )
                if not inside:
                    raise ConfigError(
                        f"sweep config {path}: baseline: the job's {key} {value} is outside the space "
                        f"{dim.model_dump(exclude_none=True)}; add it or set baseline: false"
                    )
        return sweep, job


def job_values(job: DiscoveryConfig, sweep: SweepConfig) -> dict[str, Any]:
    """The base job's values of the swept keys (the baseline trial)."""
    record = job.record()
    return {
        key: [record["t_min"], record["t_max"]] if key == "t_range" else record[key] for key in sweep.space
    }


def trial_config(job: DiscoveryConfig, sampled: dict[str, Any]) -> DiscoveryConfig:
    """The job with a trial's sampled values; negatives is kept below k (a sampled k may be small)."""
    values = dict(sampled)
    if "t_range" in values:
        values["t_min"], values["t_max"] = (int(v) for v in values.pop("t_range"))
    k = int(values.get("k", job.method.k))
    values["negatives"] = min(int(values.get("negatives", job.method.negatives)), k - 1)
    return job.replace(where="trial", **values)


def _trial(config: dict) -> None:
    """Ray Tune function trainable: train to each milestone (resuming), measure, report."""
    import torch
    from ray import tune

    from noiseclr.workflows.discover import run_discovery

    torch.set_num_threads(max(1, int(config["_cpus"])))
    job = DiscoveryConfig.from_saved(config["_job"])
    cfg = trial_config(job, {k: v for k, v in config.items() if not k.startswith("_")})
    out = Path(config["_out"]) / "trials" / tune.get_context().get_trial_id()
    run_id = None
    # A trial restarted by a resumed sweep goes on after the last milestone it reported (its Tune
    # checkpoint says which): its own checkpoints may be past the earlier ones, which it cannot
    # train back to, and ASHA's rungs count the reports.
    reported = 0
    if saved := tune.get_checkpoint():
        with saved.as_directory() as d:
            reported = json.loads((Path(d) / MILESTONE).read_text())["reported"]
    for i, steps in enumerate(config["_milestones"][reported:], start=reported):
        last = steps == config["_milestones"][-1]
        step_cfg = cfg.replace(steps=steps, register_bank=False, gallery=last and cfg.gallery.enabled)
        result = run_discovery(step_cfg, out, parent_run_id=config.get("_parent"), run_id=run_id)
        run_id = result.run_id
        intervals = {
            "alignment": result.alignment_interval or (0.0, 0.0),
            "objective": result.objective.interval if result.objective else (0.0, 0.0),
            "score": result.score_interval or (0.0, 0.0),
        }
        figures = {
            "alignment": result.alignment if result.alignment is not None else 0.0,
            "coverage": result.coverage or 0,
            "objective": result.objective.value if result.objective else 0.0,
            "score": result.score if result.score is not None else 0.0,
            **{
                f"{m}_{end}": float(v[j])
                for m, v in intervals.items()
                for j, end in enumerate(("low", "high"))
            },
            "live": result.live or 0,
            "loss": result.final_loss,
            "steps": steps,
            "bank": str(result.bank),
            "mlflow_run_id": run_id or "",
        }
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / MILESTONE).write_text(json.dumps({"reported": i + 1, "steps": steps}))
            tune.report(figures, checkpoint=tune.Checkpoint.from_directory(d))


def run_sweep(sweep: SweepConfig, job: DiscoveryConfig, out: str | Path) -> dict:
    """Run (or resume) the sweep into OUT; returns the best trial's figures and where things are."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from noiseclr.tracking.runs import tracking_uri

    metric = objective(sweep, job)
    sweep = sweep.model_copy(update={"metric": metric})
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    # what Tune keeps of the first invocation (its scheduler, metric and rungs): a resumed sweep
    # must ask the same
    kept = {"metric": metric, "early_stopping": sweep.early_stopping, "milestones": sweep.milestones}
    changed = {k: (state[k], v) for k, v in kept.items() if k in state and state[k] != v}
    if changed:
        raise ConfigError(
            f"{out} holds a sweep started with other settings ({changed}: was, now); "
            "rerun with those or use a new --out"
        )
    parent = state.get("parent_run_id") or _start_parent(job, sweep)
    state_file.write_text(json.dumps({"parent_run_id": parent, **kept}))
    init_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    trainable = tune.with_resources(_trial, {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    storage = out / "tune"
    experiment = storage / sweep.name
    if tune.Tuner.can_restore(str(experiment)):
        log.warning("resuming the sweep in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        space = {key: dim.tune() for key, dim in sweep.space.items()}
        space.update(
            _job=job.model_dump(exclude_unset=True),
            _out=str(out),
            _milestones=sweep.milestones,
            _parent=parent,
            _cpus=sweep.cpus_per_trial,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode="max",
                num_samples=sweep.num_samples,
                scheduler=ASHAScheduler(
                    max_t=len(sweep.milestones), grace_period=1, reduction_factor=sweep.reduction_factor
                )
                if sweep.early_stopping
                else None,  # FIFO: every trial trains to the last milestone
                search_alg=ConcurrencyLimiter(
                    OptunaSearch(
                        seed=sweep.seed,
                        points_to_evaluate=[job_values(job, sweep)] if sweep.baseline else None,
                    ),
                    max_concurrent=sweep.max_concurrent,
                ),
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(storage),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # a milestone count, no weights
            ),
        )
    results = tuner.fit()
    best, choice = choose(results, sweep, job)
    table = results_table(results, sweep, choice, best.metrics["bank"])
    summary = {
        "best": {
            **{k: best.config[k] for k in sweep.space},
            **{
                k: best.metrics.get(k)
                for k in FIGURES
                if has_oracle(job) or k not in ("alignment", "coverage")
            },
            f"{metric}_interval": [best.metrics.get(f"{metric}_low"), best.metrics.get(f"{metric}_high")],
            **{
                k: v
                for row in choice["leaders"]
                if row.get("chosen")
                for k, v in (("remeasured", row["remeasured"]), ("remeasured_interval", row["interval"]))
            },
        },
        "metric": metric,
        "bank": best.metrics["bank"],
        "choice": choice,
        "table": str(out / "sweep.md"),
        "figure": str(out / "sweep.png"),
        "trials": len(table),
    }
    base = next((row for row in table if row["baseline"]), None)
    if base is not None:  # the job's own values, same protocol: the gain is the sweep's answer
        summary["baseline"] = {k: base[k] for k in FIGURES if k in base}
        summary["gain"] = best.metrics[metric] - base[metric]
    write_results(table, sweep, out)
    if tracking_uri(job):
        summary["registered"] = _register_best(job, sweep, best, parent, out, choice)
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def has_oracle(job: DiscoveryConfig) -> bool:
    """The job trains on the shapes world it writes itself (model shapes, data uri null), where
    the oracle measures its banks."""
    return job.data.uri is None and job.model == "shapes"


def objective(sweep: SweepConfig, job: DiscoveryConfig) -> str:
    """The metric the sweep maximises ("alignment", "objective" or "score"); ConfigError where it
    cannot be had."""
    if not job.evaluation.enabled:
        raise ConfigError(
            "a sweep maximises a measurement of each trial's bank: its job needs evaluation.enabled: true"
        )
    oracle = has_oracle(job)
    if sweep.metric == "alignment" and not oracle:
        raise ConfigError(
            "metric alignment needs the shapes world's oracle (model: shapes, data.uri: null); "
            "on your own images use metric: objective (the oracle-free bank objective) or auto"
        )
    metric = sweep.metric if sweep.metric != "auto" else ("alignment" if oracle else "objective")
    if metric == "objective" and "tau" in sweep.space and "k" not in sweep.space:
        from noiseclr.evaluation.blind import OBJECTIVE

        log.warning(
            "the objective (%s) falls as tau rises among banks of one k, where the oracle's alignment "
            "rises (docs/oracle-free.md, 'Banks of one k'): search k too, keep tau fixed, or use "
            "metric: score",
            OBJECTIVE,
        )
    return metric


def choose(results, sweep: SweepConfig, job: DiscoveryConfig) -> tuple[Any, dict]:
    """The trial whose bank the sweep registers, and how it was chosen (Remeasure's rule).

    One measurement on a few images is noisy (alignment intervals 0.13 to 0.40 wide at 4 + 4
    images, docs/oracle-free.md), so the leaders are measured again, on more images that the first
    measurement did not see, before one is picked. A re-measurement that fails leaves the first
    measurement's pick. Where no trial reached the last milestone, every trial is a candidate."""
    metric = sweep.metric
    done = [r for r in results if r.metrics and metric in r.metrics and r.metrics.get("bank")]
    if not done:
        raise ConfigError(f"no trial of the sweep reported {metric}; see the trials' errors above")
    final = [r for r in done if r.metrics.get("steps") == sweep.milestones[-1]] or done
    leaders = sorted(final, key=lambda r: -r.metrics[metric])[: max(1, sweep.remeasure.top)]
    if len(leaders) < 2:
        return leaders[0], {"rule": f"the highest {metric} (no re-measurement)", "leaders": []}
    try:
        figures, measured = remeasure(job, metric, [Path(r.metrics["bank"]) for r in leaders], sweep)
    except Exception as err:  # the sweep's results stand; the pick falls back to the first figure
        log.warning("the leaders' re-measurement failed (%s): chosen by the first measurement", err)
        return leaders[0], {"rule": f"the highest {metric} (the re-measurement failed: {err})", "leaders": []}
    rows = []
    for r, (value, interval) in zip(leaders, figures, strict=True):
        rows.append(
            {
                "trial": r.metrics.get("trial_id") or (r.path and Path(r.path).name),
                "bank": r.metrics["bank"],
                metric: r.metrics[metric],
                "remeasured": value,
                "interval": list(interval),
            }
        )
        _log_remeasured(job, r.metrics.get("mlflow_run_id"), metric, value, interval)
    pick = max(range(len(leaders)), key=lambda i: (figures[i][0], leaders[i].metrics[metric]))
    rows[pick]["chosen"] = True
    if measured["scores"]:  # the oracle-free re-measurement goes with the bank that is registered
        from noiseclr.bank import DirectionBank
        from noiseclr.card import save_bank

        folder = Path(leaders[pick].metrics["bank"])
        bank = DirectionBank.load(folder)
        bank.store_scores(measured["scores"][pick])
        save_bank(bank, folder)
    images = f"{measured['generated']} generated and {measured['real']} real images"
    if measured.get("same_real"):
        images += " (the real ones those of the trials: the folder holds no others)"
    rule = (
        f"the {len(leaders)} best trials by {metric} among those that trained to the last milestone, "
        f"measured again on {images} the trials were not scored on; the highest re-measured "
        f"{metric} wins"
    )
    kept = {k: v for k, v in measured.items() if k != "scores"}  # those are in the chosen bank
    return leaders[pick], {"rule": rule, "images": sweep.remeasure.images, **kept, "leaders": rows}


def remeasure(
    job: DiscoveryConfig, metric: str, folders: list[Path], sweep: SweepConfig
) -> tuple[list[tuple[float, tuple[float, float]]], dict]:
    """(figure, 95% interval) of each bank on `sweep.remeasure.images` images per source, the
    same images for every bank and none the trials were measured on, and what was measured
    (image counts; the oracle-free scores of each bank); in one Ray task with a trial's resources
    (on a cluster the driver may have no GPU)."""
    import ray

    task = ray.remote(num_cpus=sweep.cpus_per_trial, num_gpus=sweep.gpus_per_trial)(_remeasure)
    saved = job.model_dump(exclude_unset=True)
    return ray.get(task.remote(saved, metric, folders, sweep.remeasure.images, sweep.cpus_per_trial))


def _remeasure(saved: dict, metric: str, folders: list[Path], images: int, cpus: float) -> tuple[list, dict]:
    import torch

    from noiseclr.bank import DirectionBank
    from noiseclr.evaluation import blind
    from noiseclr.models.base import load_model
    from noiseclr.workflows.discover import blind_protocol, oracle_protocol

    torch.set_num_threads(max(1, int(cpus)))
    job = DiscoveryConfig.from_saved(saved)
    model = load_model(job.model, device=job.run.device)
    banks = [DirectionBank.load(f, model) for f in folders]
    out = []
    if metric == "alignment":
        from noiseclr.evaluation import evaluate

        harness = evaluate.Harness(model, oracle_protocol(job, images, fresh=True), progress=False)
        for bank in banks:
            graded = harness.evaluate(bank)
            out.append((graded["alignment"], tuple(graded["scores"]["all"]["intervals"]["alignment"])))
        return out, {"generated": images, "real": images, "scores": []}
    protocol = blind_protocol(job, images, fresh=True)
    first = blind_protocol(job)  # the files the trials were measured on are skipped
    data = job.data.uri or banks[0].metrics["data"]  # the shapes world: the trials' generated folder
    skip = first.n_images + first.calibration_images
    real = blind.real_images(data, model, protocol, job.storage.options, skip=skip)
    harness = blind.BlindHarness(model, protocol, real=real.pixels, real_names=real.files, progress=False)
    results = [harness.measure(bank) for bank in banks]
    for result in results:
        figure = result["aggregates"][blind.OBJECTIVE] if metric == "objective" else result
        out.append((figure["value"] if metric == "objective" else figure["score"], tuple(figure["interval"])))
    measured = {
        "generated": protocol.n_images,
        "real": harness.n_real,
        "same_real": real.skipped == 0,  # too few files: measured on the trials' own again
        "scores": results,
    }
    return out, measured


def _log_remeasured(
    job: DiscoveryConfig, run_id: str | None, metric: str, value: float, interval: tuple[float, float]
) -> None:
    """The re-measured figure on the trial's MLflow run (nothing without tracking)."""
    if not run_id:
        return
    from mlflow import MlflowClient

    from noiseclr.tracking.runs import tracking_uri

    client = MlflowClient(tracking_uri(job))
    try:
        for name, v in (("", value), ("_low", interval[0]), ("_high", interval[1])):
            client.log_metric(run_id, f"remeasured_{metric}{name}", float(v))
    except Exception as err:  # the choice stands and is in best.json
        log.warning("MLflow did not take the re-measurement of run %s (%s)", run_id, err)


def _start_parent(job: DiscoveryConfig, sweep: SweepConfig) -> str | None:
    """The parent MLflow run of the sweep (None without tracking); its trials are children."""
    from noiseclr.tracking.runs import tracked_run

    with tracked_run(job, run_name=sweep.name) as run:
        if run is None:
            return None
        import mlflow

        mlflow.log_params({f"sweep.{k}": json.dumps(v, default=str) for k, v in sweep.model_dump().items()})
        return run.info.run_id


def results_table(results, sweep: SweepConfig, choice: dict | None = None, chosen: str = "") -> list[dict]:
    """One row per trial: its sampled values, its last measured step and figures, the sweep's
    figure's interval, its re-measured figure (leaders only) and which bank was chosen."""
    again = {row["bank"]: row for row in (choice or {}).get("leaders", [])}
    m = sweep.metric
    rows = []
    for r in results:
        if r.metrics is None or m not in r.metrics:
            continue
        row = {k: r.config[k] for k in sweep.space}
        job = DiscoveryConfig.from_saved(r.config["_job"])
        row["baseline"] = sweep.baseline and row == job_values(job, sweep)
        oracle = has_oracle(job)  # else no alignment was measured
        figures = (
            ("alignment", "coverage", "objective", "score", "live")
            if oracle
            else ("objective", "score", "live")
        )
        row.update({k: r.metrics.get(k) for k in ("steps", *figures, "loss")})
        row[f"{m}_interval"] = [round(r.metrics.get(f"{m}_{e}", 0.0), 4) for e in ("low", "high")]
        leader = again.get(r.metrics.get("bank"))
        row["remeasured"] = (
            f"{leader['remeasured']:.4g} {[round(v, 4) for v in leader['interval']]}" if leader else ""
        )
        row["chosen"] = r.metrics.get("bank") == chosen
        row["bank"] = r.metrics.get("bank")
        rows.append(row)
    return sorted(rows, key=lambda row: -(row[m] or 0))


def write_results(rows: list[dict], sweep: SweepConfig, out: Path) -> None:
    import csv

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows[0]) if rows else []
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |" for row in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    dims = list(sweep.space)
    steps = [r["steps"] for r in rows] or [0]
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3), squeeze=False)
    for ax, key in zip(axes[0], dims, strict=True):
        xs = [r[key] for r in rows]
        if key == "t_range":  # categories, in the order of their bounds
            cats = sorted({tuple(x) for x in xs})
            xs = [cats.index(tuple(x)) for x in xs]
            ax.set_xticks(range(len(cats)), [str(list(c)) for c in cats])
        ax.scatter(xs, [r[sweep.metric] for r in rows], c=[r["steps"] for r in rows], cmap="viridis")
        for r, x in zip(rows, xs, strict=True):
            if r["baseline"]:  # the job's own values, ringed
                ax.scatter([x], [r[sweep.metric]], s=160, facecolors="none", edgecolors="red")
        ax.set_xlabel(key)
        if key in ("lr",) or (sweep.space[key].loguniform is not None):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].set_ylabel(sweep.metric)
    fig.suptitle(
        f"{len(rows)} trials; colour: steps reached ({min(steps)} to {max(steps)}); "
        "red ring: the job's own values",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _register_best(
    job: DiscoveryConfig, sweep: SweepConfig, best, parent: str | None, out: Path, choice: dict
) -> str | None:
    """Register the best trial's bank (in its own MLflow run) and point the alias at it."""
    import mlflow

    from noiseclr.tracking.registry import log_bank
    from noiseclr.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(job))
    run_id = best.metrics.get("mlflow_run_id") or None
    with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(parent_run_id=parent):
        version = log_bank(best.metrics["bank"], job.tracking.registered_model, sweep.register_alias)
    if parent:
        with mlflow.start_run(run_id=parent):
            for name in ("sweep.csv", "sweep.md", "sweep.png"):
                mlflow.log_artifact(str(out / name))
            mlflow.log_metric(f"best_{sweep.metric}", float(best.metrics[sweep.metric]))
            chosen = next((row for row in choice["leaders"] if row.get("chosen")), None)
            if chosen:  # the figure that decided the pick
                mlflow.log_metric(f"best_remeasured_{sweep.metric}", float(chosen["remeasured"]))
                for end, v in zip(("low", "high"), chosen["interval"], strict=True):
                    mlflow.log_metric(f"best_remeasured_{sweep.metric}_{end}", float(v))
            for end in ("low", "high"):
                mlflow.log_metric(
                    f"best_{sweep.metric}_{end}", float(best.metrics.get(f"{sweep.metric}_{end}", 0))
                )
    return f"models:/{version.name}/{version.version}" if version else None
