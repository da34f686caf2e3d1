"""Ray Tune sweeps with the real parts: a local Ray (started by the command), Optuna + ASHA, trials
as MLflow child runs on the session's MLflow server, the best bank registered and opened by
alias, and a sweep killed mid-way that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.tune")
pytest.importorskip("optuna")
mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from noiseclr.cli import app  # noqa: E402
from noiseclr.data.images import list_images  # noqa: E402
from noiseclr.evaluation.blind import AGGREGATES, OBJECTIVE  # noqa: E402
from noiseclr.workflows.sweep import SweepConfig, trial_config  # noqa: E402

pytestmark = pytest.mark.slow


def write_sweep(folder: Path, uri: str | None, name: str, samples: int) -> Path:
    (folder / "job.yaml").write_text(
        "name: swp\nk: 2\nnegatives: 1\nbatch: 2\nn_images: 4\ndevice: cpu\n"
        "evaluate_images: 2\nevaluate_steps: 4\ninversion_steps: 5\n"
        "world_fixed: {x: center, y: middle}\ngallery_seeds: 1\ngallery_steps: 2\ngallery_scales: [0, 1]\n"
        "checkpoint_every: 1\nexperiment: sweep-tests\n" + (f"tracking_uri: {uri}\n" if uri else "")
    )
    (folder / "sweep.yaml").write_text(
        "job: job.yaml\n"
        "space:\n  tau: {loguniform: [0.2, 1.0]}\n  t_range: {choice: [[0, 600], [0, 999]]}\n"
        f"milestones: [1, 2]\nnum_samples: {samples}\ncpus_per_trial: 1\nname: {name}\n"
        "max_concurrent: 2\n"  # two trials at once on CI's 2 cores: Tune's concurrency, and CI time
        "remeasure: {top: 2, images: 2}\n"
    )
    return folder / "sweep.yaml"


def sweep_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "noiseclr.cli", "sweep", "--config", str(config), "--out", str(out)]


def test_a_small_sweep_killed_mid_way_resumes_tracks_trials_registers_the_best_and_edits_by_alias(
    mlflow_server, tmp_path, monkeypatch
):
    """Killed (SIGKILL to its whole process group) once its first trial has reported a milestone,
    the sweep is run again: it resumes, the interrupted trial goes on in its own MLflow run (no
    second child run), and the finished sweep is tracked, registered and opened by alias."""
    config = write_sweep(tmp_path, mlflow_server.uri, "small", samples=2)
    # both trials to the last milestone (two at once): the kill at the first report lands while
    # both have a milestone left
    config.write_text(config.read_text() + "early_stopping: false\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(sweep_cmd(config, out), start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # kill once the first trial has reported a result
            if any(p.stat().st_size > 0 for p in (out / "tune" / "small").glob("*/result.json")):
                break
            time.sleep(1)
        else:
            pytest.fail("no trial reported within 10 minutes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    assert not (out / "best.json").exists()
    done = subprocess.run(sweep_cmd(config, out), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming the sweep" in done.stderr
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == 2
    rows = (out / "sweep.md").read_text().splitlines()
    assert rows[0].startswith("| tau | t_range | baseline | steps | alignment") and len(rows) == 2 + 2
    assert all(row.split(" | ")[3] == "2" for row in rows[2:])  # no trial stopped early
    # the first trial ran the job's own values (tau 0.5, t 0..999), marked and compared
    baseline = [row for row in rows[2:] if "| True |" in row]
    assert len(baseline) == 1 and baseline[0].startswith("| 0.5 | [0, 999] | True |")
    assert best["gain"] == pytest.approx(best["best"]["alignment"] - best["baseline"]["alignment"])
    assert (out / "sweep.png").stat().st_size > 1000
    client = MlflowClient(mlflow_server.uri)
    parent = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    experiment = client.get_experiment_by_name("sweep-tests")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert all("alignment" in r.data.metrics and r.data.params["k"] == "2" for r in children)
    assert client.get_run(parent).data.metrics["best_alignment"] == pytest.approx(best["best"]["alignment"])
    # both trials were measured again on the same images; the chosen bank is the higher re-measured
    leaders = best["choice"]["leaders"]
    assert len(leaders) == 2 and best["bank"] == max(leaders, key=lambda r: r["remeasured"])["bank"]
    again = {r.info.run_id: r.data.metrics for r in children}
    assert all("remeasured_alignment" in m and "alignment_low" in m for m in again.values())
    name, _, version = best["registered"].removeprefix("models:/").partition("/")
    assert client.get_model_version_by_alias(name, "champion").version == version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    edited = CliRunner().invoke(
        app,
        [
            "edit",
            "0=1",
            "--bank",
            f"models:/{name}@champion",
            "--out",
            str(tmp_path / "e.png"),
            "--steps",
            "3",
        ],
    )
    assert edited.exit_code == 0, edited.output


def test_a_sweep_over_a_plain_image_folder_maximises_the_oracle_free_score(mlflow_server, tmp_path):
    """No oracle: world images handed over as a plain folder (data: DIR), so `auto` picks the
    oracle-free score; the trials report it and the best bank is registered with its scores."""
    from noiseclr.domains.dataset import write_world

    write_world(str(tmp_path / "images"), n=12, seed=5, resolution=64, fixed={"x": "center", "y": "middle"})
    config = write_sweep(tmp_path, mlflow_server.uri, "folder", samples=2)
    job = (tmp_path / "job.yaml").read_text()
    (tmp_path / "job.yaml").write_text(job + f"data: {tmp_path / 'images'}\n")
    text = config.read_text().replace("milestones: [1, 2]", "milestones: [2]")
    config.write_text(text.replace("images: 2}", "images: 3}"))
    done = subprocess.run(sweep_cmd(config, tmp_path / "out"), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert best["metric"] == "objective" and best["trials"] == 2 and "alignment" not in best["best"]
    rows = (tmp_path / "out" / "sweep.md").read_text().splitlines()
    assert rows[0].startswith("| tau | t_range | baseline | steps | objective | score | live | loss")
    bank = json.loads((Path(best["bank"]) / "bank.json").read_text())
    # the chosen bank keeps its re-measurement (more images), which picked it
    leaders = best["choice"]["leaders"]
    chosen = next(r for r in leaders if r.get("chosen"))
    assert chosen["bank"] == best["bank"] and chosen["remeasured"] == max(r["remeasured"] for r in leaders)
    assert set(bank["scores"]["aggregates"]) == set(AGGREGATES)  # every candidate recorded
    assert bank["scores"]["aggregates"][OBJECTIVE]["value"] == pytest.approx(chosen["remeasured"], abs=1e-4)
    # measured again on 3 + 3 images, none of those the trials were measured on (2 + 2 scored and
    # calibration files first in the folder; seeds from 2000)
    protocol = bank["scores"]["protocol"]
    assert protocol["n_images"] == 3 and protocol["images"]["seeds"][0] != 2000
    first = set(list_images(str(tmp_path / "images"))[:4])
    assert len(protocol["images"]["real_files"]) == 3 and not first & set(protocol["images"]["real_files"])
    assert best["choice"]["same_real"] is False and "scores" not in best["choice"]  # those: in the bank
    assert bank["edit_defaults"]["calibration"] == "blind"  # no oracle: its own calibration
    client = MlflowClient(mlflow_server.uri)
    parent = json.loads((tmp_path / "out" / "sweep.json").read_text())["parent_run_id"]
    experiment = client.get_experiment_by_name("sweep-tests")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    for run in children:  # each trial's objective with its interval, and the re-measured figure
        m = run.data.metrics
        assert m["objective_low"] <= m["objective"] <= m["objective_high"]
        assert m["remeasured_objective_low"] <= m["remeasured_objective"] <= m["remeasured_objective_high"]
    name, _, version = best["registered"].removeprefix("models:/").partition("/")
    tags = client.get_model_version(name, version).tags
    assert tags["score"].startswith(f"{bank['scores']['score']:.4f}") and tags["live"].endswith("of 2")


def test_sweep_metric_alignment_needs_the_oracle(tmp_path):
    from noiseclr.errors import ConfigError
    from noiseclr.workflows.sweep import objective

    config = write_sweep(tmp_path, None, "x", samples=1)
    sweep, job = SweepConfig.from_yaml(config)
    assert objective(sweep, job) == "alignment"
    folder = job.replace(data=str(tmp_path))
    assert objective(sweep, folder) == "objective"
    with pytest.raises(ConfigError, match="metric alignment needs the shapes world's oracle"):
        objective(sweep.model_copy(update={"metric": "alignment"}), folder)


def test_a_sweep_over_tau_at_one_k_is_warned_off_the_objective(tmp_path, caplog):
    """Among banks of one k the objective falls as tau rises and the oracle's alignment rises
    (docs/oracle-free.md): a sweep that searches tau and not k, off the oracle, says so."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.workflows.sweep import objective

    job = DiscoveryConfig.of(data={"uri": str(tmp_path)})  # plain data: no oracle
    (tmp_path / "job.yaml").write_text("k: 8\n")
    for space, warned in (
        ("tau: {choice: [0.2, 0.5]}", True),
        ("k: {choice: [8, 12]}\n  tau: {choice: [0.5]}", False),
    ):
        caplog.clear()
        (tmp_path / "s.yaml").write_text(f"job: job.yaml\nbaseline: false\nspace:\n  {space}\n")
        assert objective(SweepConfig.from_yaml(tmp_path / "s.yaml")[0], job) == "objective"
        assert ("falls as tau rises" in caplog.text) is warned


def test_sweep_config_errors_and_trial_values(tmp_path):
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.errors import ConfigError

    (tmp_path / "job.yaml").write_text("k: 4\nnegatives: 3\n")
    (tmp_path / "bad.yaml").write_text("job: job.yaml\nspace:\n  temperature: {choice: [0.1]}\n")
    with pytest.raises(ConfigError, match=r"space may name .* not \['temperature'\]"):
        SweepConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "two.yaml").write_text("job: job.yaml\nspace:\n  tau: {choice: [0.1], uniform: [0, 1]}\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        SweepConfig.from_yaml(tmp_path / "two.yaml")
    (tmp_path / "outside.yaml").write_text("job: job.yaml\nspace:\n  k: {choice: [8, 16]}\n")
    with pytest.raises(ConfigError, match=r"baseline: the job's k 4 is outside the space"):
        SweepConfig.from_yaml(tmp_path / "outside.yaml")
    (tmp_path / "nobase.yaml").write_text("job: job.yaml\nbaseline: false\nspace:\n  k: {choice: [8, 16]}\n")
    assert SweepConfig.from_yaml(tmp_path / "nobase.yaml")[0].baseline is False
    cfg = trial_config(DiscoveryConfig.of(k=8, negatives=7), {"k": 3, "t_range": [100, 700], "tau": 0.2})
    assert (cfg.method.k, cfg.method.negatives, cfg.method.t_min, cfg.method.t_max, cfg.method.tau) == (
        3,
        2,
        100,
        700,
        0.2,
    )


def test_the_sweep_picks_among_finished_leaders_by_the_re_measured_figure(monkeypatch):
    """Remeasure's rule: trials ASHA stopped early are not leaders; the top two by the trial's
    figure are measured again and the higher re-measured figure wins over the first measurement;
    a failed re-measurement leaves the first measurement's pick."""
    from types import SimpleNamespace

    from noiseclr.errors import ConfigError
    from noiseclr.workflows import sweep as sweep_mod

    def trial(bank, figure, steps):
        return SimpleNamespace(path=f"/t/{bank}", metrics={"objective": figure, "steps": steps, "bank": bank})

    results = [trial("a", 0.30, 2), trial("b", 0.20, 2), trial("stopped", 0.90, 1), trial("d", 0.10, 2)]
    asked = []

    def remeasure(job, metric, folders, sweep):
        asked.append(([f.name for f in folders], sweep.remeasure.images))
        return [(0.10, (0.05, 0.15)), (0.25, (0.20, 0.30))], {"generated": 8, "real": 8, "scores": []}

    monkeypatch.setattr(sweep_mod, "remeasure", remeasure)
    cfg = SweepConfig(
        job="j.yaml", space={"tau": {"uniform": [0.1, 1]}}, milestones=[1, 2], metric="objective"
    )
    best, choice = sweep_mod.choose(results, cfg, None)
    assert asked == [(["a", "b"], 8)] and best.metrics["bank"] == "b"
    assert [r.get("chosen", False) for r in choice["leaders"]] == [False, True]
    assert "on 8 generated and 8 real images the trials were not scored on" in choice["rule"]
    one = cfg.model_copy(update={"remeasure": sweep_mod.Remeasure(top=1)})
    assert sweep_mod.choose(results, one, None)[0].metrics["bank"] == "a" and len(asked) == 1

    def fails(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sweep_mod, "remeasure", fails)
    best, choice = sweep_mod.choose(results, cfg, None)
    assert best.metrics["bank"] == "a" and "out of memory" in choice["rule"]
    with pytest.raises(ConfigError, match="no trial of the sweep reported objective"):
        sweep_mod.choose([], cfg, None)
