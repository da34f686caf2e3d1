"""MLflow tracking with the real parts: a local `mlflow server` (SQLite store, proxied artifacts)
started once per session, runs and registered banks read back with MlflowClient, the CLI by
alias, bad references, a tampered artifact, concurrent registration, an S3 artifact store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from noiseclr.bank import DirectionBank  # noqa: E402
from noiseclr.cli import app  # noqa: E402
from noiseclr.discovery.config import DiscoveryConfig  # noqa: E402
from noiseclr.errors import BankError  # noqa: E402
from noiseclr.tracking import registry  # noqa: E402
from noiseclr.tracking.server import MlflowServer, free_port  # noqa: E402
from noiseclr.workflows.discover import run_discovery  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """One tracked, measured, registered tiny discovery run (alias champion)."""
    out = tmp_path_factory.mktemp("tracked")
    cfg = DiscoveryConfig.of(
        name="trk",
        k=3,
        negatives=1,
        batch=2,
        n_images=4,
        steps=3,
        device="cpu",
        evaluate_images=2,
        evaluate_steps=4,
        inversion_steps=5,
        gallery_seeds=1,
        gallery_steps=2,
        gallery_scales=[0.0, 1.0],
        world_fixed={"x": "center", "y": "middle"},
        tracking_uri=mlflow_server.uri,
        experiment="tests",
        register_alias="champion",
    )
    before = os.environ.get("MLFLOW_TRACKING_URI")
    result = run_discovery(cfg, out)
    # the job's server is not left as the process's: a later untracked job stays untracked
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    return cfg, result


def test_a_tracked_run_logs_config_metrics_artifacts_tags_and_a_registered_version(tracked, mlflow_server):
    _, result = tracked
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.data.params["tau"] == "0.5" and run.data.params["k"] == "3"
    assert json.loads(run.data.params["world_fixed"]) == {"x": "center", "y": "middle"}
    losses = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert run.data.metrics["alignment"] == pytest.approx(result.alignment)
    assert run.data.metrics["images"] == 4 and run.data.metrics["run_pairs_per_s"] > 0
    scores = DirectionBank.load(result.bank).scores.dump()  # the oracle-free measurement, logged too
    assert run.data.metrics["score"] == pytest.approx(scores["score"]) == pytest.approx(result.score)
    assert run.data.metrics["live_directions"] + run.data.metrics["dead_directions"] == 3
    assert [run.data.metrics[f"direction_score.{i}"] for i in range(3)] == [
        pytest.approx(d["score"]) for d in scores["directions"]
    ]
    for name in ("pairs_per_s", "step_seconds", "images_per_s"):  # per step, like the loss
        history = client.get_metric_history(result.run_id, name)
        assert [m.step for m in history] == [1, 2, 3] and all(m.value > 0 for m in history), name
    seconds = {m.step: m.value for m in client.get_metric_history(result.run_id, "step_seconds")}
    pairs = {m.step: m.value for m in client.get_metric_history(result.run_id, "pairs_per_s")}
    assert pairs[2] == pytest.approx(2 * 2 / seconds[2])  # batch 2 x 2 directions a step
    tags = run.data.tags
    bank = DirectionBank.load(result.bank)
    assert tags["base_model.fingerprint"] == bank.base_model["fingerprint"]
    assert tags["data.uri"].endswith("data") and len(tags["data.sha256"]) == 16
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"gallery", "evaluation"} <= artifacts
    name = registry.model_name(bank)
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id == result.run_id
    assert version.tags["live"] == f"{scores['live']} of 3" and version.tags["score"].startswith(
        f"{scores['score']:.4f}"
    )
    assert (
        version.tags["sha256.directions.safetensors"]
        == registry.checksums(result.bank)["directions.safetensors"]
    )


def test_edit_and_evaluate_open_a_bank_by_alias_and_by_version(tracked, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(registry, "CACHE", tmp_path / "cache")
    name = registry.model_name(DirectionBank.load(tracked[1].bank))
    out = tmp_path / "edit.png"
    result = CliRunner().invoke(
        app, ["edit", "0=1", "--bank", f"models:/{name}@champion", "--out", str(out), "--steps", "3"]
    )
    assert result.exit_code == 0, result.output
    assert out.exists()
    folder = registry.download_bank(f"models:/{name}/1", tmp_path / "v1")
    same = DirectionBank.load(folder)
    assert (same.directions == DirectionBank.load(tracked[1].bank).directions).all()


@pytest.mark.parametrize(
    "ref, says",
    [
        ("models:/no-such-bank@champion", "no registered model 'no-such-bank'"),
        ("models:/{name}/99", "has no version 99"),
        ("models:/{name}@nobody", "has no alias 'nobody'"),
        ("models:/{name}", "is not a bank reference"),
    ],
)
def test_an_unknown_model_version_or_alias_is_one_line(
    tracked, mlflow_server, monkeypatch, ref, says, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    name = registry.model_name(DirectionBank.load(tracked[1].bank))
    result = CliRunner().invoke(
        app, ["edit", "0=1", "--bank", ref.format(name=name), "--out", str(tmp_path / "e.png")]
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and says in lines[0], result.stderr


def test_a_tampered_artifact_fails_its_checksum(tracked, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    name = registry.model_name(DirectionBank.load(tracked[1].bank))
    version = MlflowClient(mlflow_server.uri).get_model_version_by_alias(name, "champion")
    stored = [p for p in (mlflow_server.root / "artifacts").rglob("directions.safetensors")]
    assert stored, "the bank is not in the server's artifact store"
    originals = {p: p.read_bytes() for p in stored}
    try:
        for p, data in originals.items():
            p.write_bytes(data[:-4] + b"\0\0\0\0")
        with pytest.raises(BankError, match="fails its checksum"):
            registry.download_bank(f"models:/{name}/{version.version}", tmp_path / "x")
        assert not (tmp_path / "x").exists()
    finally:
        for p, data in originals.items():
            p.write_bytes(data)


def test_banks_download_never_deletes_what_the_user_owns(tracked, mlflow_server, tmp_path, monkeypatch):
    """`--out out` used to wipe out/; now a folder holding anything but a bank is refused untouched,
    a bank folder gets the bank's files and keeps the user's own, and replicas sharing the cache
    download it once and read a folder nobody replaces under them."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(registry, "CACHE", tmp_path / "cache")
    ref = f"models:/{registry.model_name(DirectionBank.load(tracked[1].bank))}/1"
    runs = tmp_path / "out"
    (runs / "discovery").mkdir(parents=True)
    (runs / "discovery" / "notes.txt").write_text("a week of GPU time")
    with pytest.raises(BankError, match="not empty and holds no bank"):
        registry.download_bank(ref, runs)
    assert (runs / "discovery" / "notes.txt").read_text() == "a week of GPU time"
    assert sorted(p.name for p in runs.iterdir()) == ["discovery"]
    mine = registry.download_bank(ref, tmp_path / "mine")
    (mine / "my-notes.md").write_text("keep me")
    (mine / "bank.json").write_text("{}")  # an older or damaged copy: replaced
    assert registry.download_bank(ref, mine) == mine
    assert (mine / "my-notes.md").read_text() == "keep me"
    assert (DirectionBank.load(mine).directions == DirectionBank.load(tracked[1].bank).directions).all()
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: registry.download_bank(ref), range(4)))
    assert len(set(folders)) == 1 and DirectionBank.load(folders[0]).name
    stamp = (folders[0] / "directions.safetensors").stat().st_mtime_ns
    assert registry.download_bank(ref) == folders[0]  # verified and reused, not replaced
    assert (folders[0] / "directions.safetensors").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in folders[0].parent.iterdir() if "partial" in p.name or "download" in p.name]
    assert not leftovers


def test_a_registered_bank_is_model_code_not_a_pickle(tracked, mlflow_server, tmp_path, monkeypatch):
    """Loading a registry bank with mlflow.pyfunc runs our model file; no pickle is stored."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mlflow.set_tracking_uri(mlflow_server.uri)
    bank = DirectionBank.load(tracked[1].bank)
    uri = f"models:/{registry.model_name(bank)}/1"
    files = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "m")))
    stored = [p.name for p in files.rglob("*") if p.is_file()]
    assert not [n for n in stored if n.endswith((".pkl", ".pickle", ".cloudpickle"))], stored
    assert "bank_model_code.py" in stored
    vectors = mlflow.pyfunc.load_model(uri).predict(["2", bank.tokens[1]])
    torch.testing.assert_close(torch.tensor(vectors), bank.directions[[2, 1]])


def test_two_runs_registering_at_once_both_get_versions(tracked, mlflow_server, tmp_path):
    bank_dir = tracked[1].bank
    script = (
        "import mlflow, sys\n"
        "from noiseclr.tracking.registry import log_bank\n"
        f"mlflow.set_tracking_uri({mlflow_server.uri!r}); mlflow.set_experiment('tests')\n"
        "with mlflow.start_run():\n"
        f"    print('VERSION', log_bank({str(bank_dir)!r}, 'concurrent-bank').version)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    versions = sorted(
        int(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("VERSION")
    )
    assert all(p.returncode == 0 for p in procs)
    assert versions == [1, 2]
    listed = MlflowClient(mlflow_server.uri).search_model_versions("name='concurrent-bank'")
    assert sorted(int(v.version) for v in listed) == [1, 2]


def test_banks_commands_list_show_promote_download(tracked, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    name = registry.model_name(DirectionBank.load(tracked[1].bank))
    runner = CliRunner()
    listed = runner.invoke(app, ["banks", "list"])
    assert listed.exit_code == 0 and name in listed.output and "champion->1" in listed.output
    shown = runner.invoke(app, ["banks", "show", f"models:/{name}@champion"])
    assert shown.exit_code == 0 and "sha256.bank.json" in shown.output
    assert "| rank | # | token |" in shown.output and "oracle-free score" in shown.output  # ranked table
    promoted = runner.invoke(app, ["banks", "promote", f"models:/{name}/1", "--alias", "staging"])
    assert promoted.exit_code == 0
    assert MlflowClient(mlflow_server.uri).get_model_version_by_alias(name, "staging").version == "1"
    got = runner.invoke(app, ["banks", "download", f"models:/{name}@staging", "--out", str(tmp_path / "b")])
    assert got.exit_code == 0 and (tmp_path / "b" / "bank.json").exists()


def test_without_a_tracking_uri_nothing_is_tracked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = DiscoveryConfig.of(
        k=3,
        negatives=1,
        batch=2,
        n_images=2,
        steps=1,
        device="cpu",
        evaluate=False,
        gallery_seeds=1,
        gallery_steps=1,
        gallery_scales=[0.0],
    )
    assert run_discovery(cfg, tmp_path).run_id is None


def test_mlflow_up_serves_until_interrupted(tmp_path):
    import select

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "noiseclr.cli", "mlflow", "up", "--root", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    said = ""
    try:
        deadline = time.monotonic() + 120
        while "MLflow at" not in said and time.monotonic() < deadline:  # as a user waits for it
            if select.select([proc.stdout], [], [], 1)[0]:
                said += proc.stdout.readline()
            assert proc.poll() is None, said
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        assert (tmp_path / "mlflow.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        said += proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, said
    deadline, down = time.monotonic() + 30, False
    while time.monotonic() < deadline and not down:  # the server stops with the command
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            time.sleep(0.5)
        except OSError:
            down = True
    assert down, f"the server outlived `noiseclr mlflow up`: {said[-2000:]}"


def test_an_s3_artifact_store(s3_server, s3_bucket, tmp_path):
    s3_bucket("mlflow-artifacts")
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint_url"],
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with MlflowServer(tmp_path, artifacts_destination="s3://mlflow-artifacts/store", env=env) as server:
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("s3"))
        (tmp_path / "note.txt").write_text("in the bucket")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        back = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(back).read_text() == "in the bucket"
    import s3fs

    fs = s3fs.S3FileSystem(**{k: v for k, v in s3_server.items()})
    assert fs.glob("mlflow-artifacts/store/**/note.txt"), "the artifact did not reach the bucket"
    assert os.environ.get("MLFLOW_S3_ENDPOINT_URL") is None  # the server's env did not leak here


def test_metrics_are_live_and_survive_the_server_going_away_mid_run(tmp_path, monkeypatch, shapes_model):
    """A run's losses reach MLflow while it trains; the real server is then killed (SIGKILL) and
    brought back on the same store: training never waits for it, and at the end every step's
    loss is in the run exactly once and the bank is registered."""
    from noiseclr.discovery.core import TrainLoop

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while it is down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(tmp_path / "mlflow").start()
    seen: dict[str, object] = {}
    step = TrainLoop.optimizer_step

    def optimizer_step(self):
        record = step(self)
        if self.step == 4:  # wait (bounded) until the live logger has sent the first steps
            import mlflow

            run_id = seen["run"] = mlflow.active_run().info.run_id
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not seen.get("live"):
                seen["live"] = len(MlflowClient(server.uri).get_metric_history(run_id, "loss"))
                time.sleep(0.5)
            os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies mid-run
            server.proc.wait()
            server.proc = None
            seen["killed_at"] = time.monotonic()
        if self.step == 12:
            seen["steps_while_down"] = self.step - 4
            server.start()  # back, same port and store
        return record

    monkeypatch.setattr(TrainLoop, "optimizer_step", optimizer_step)
    cfg = DiscoveryConfig.of(
        name="live",
        k=3,
        negatives=1,
        batch=2,
        n_images=4,
        steps=16,
        device="cpu",
        evaluate=False,
        gallery=False,
        checkpoint_every=8,
        world_fixed={"x": "center", "y": "middle"},
        tracking_uri=server.uri,
        experiment="live",
    )
    try:
        result = run_discovery(cfg, tmp_path / "run", model=shapes_model)
        client = MlflowClient(server.uri)
        assert seen["live"] and result.run_id == seen["run"] and result.tracking_error is None
        steps = sorted(m.step for m in client.get_metric_history(result.run_id, "loss"))
        assert steps == list(range(1, 17))  # every step once: none lost while down, none twice
        assert client.get_run(result.run_id).info.status == "FINISHED"
        name = registry.model_name(DirectionBank.load(result.bank))
        assert client.search_model_versions(f"name = '{name}'")
    finally:
        server.stop()


def test_a_job_trains_when_mlflow_is_down_at_the_start_and_its_run_is_logged_later(
    tmp_path, monkeypatch, shapes_model
):
    """Fault table: MLflow does not answer when the job starts. The job trains anyway; a server
    that answers by the end gets the whole run (every step's loss, the bank registered); one
    still down at the end leaves the bank, a marker and one line saying to rerun, and the rerun
    (nothing to train) logs every step and registers the bank."""
    from noiseclr.discovery.core import TrainLoop
    from noiseclr.workflows.discover import TRACKING_PENDING

    # How long a job waits for the server to answer at all (default 10 s), at the start and at the
    # end; MLflow's own retries (about four minutes for a server that does not answer) are left as
    # a user has them.
    monkeypatch.setenv("NOISECLR_TRACKING_WAIT_S", "1")
    server = MlflowServer(tmp_path / "mlflow")  # its port is chosen; nothing listens there yet
    job = dict(k=3, negatives=1, batch=2, n_images=2, steps=3, device="cpu", evaluate=False)
    job |= dict(gallery=False, world_fixed={"x": "center", "y": "middle"}, tracking_uri=server.uri)
    client = MlflowClient(server.uri)

    def losses(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "loss"))

    def registered(bank) -> bool:
        return bool(client.search_model_versions(f"name = '{registry.model_name(DirectionBank.load(bank))}'"))

    step = TrainLoop.optimizer_step

    def comes_up_at_step_2(self):
        record = step(self)
        if self.step == 2 and server.proc is None:
            server.start()
        return record

    try:
        with monkeypatch.context() as m:  # down at the start, up before the end
            m.setattr(TrainLoop, "optimizer_step", comes_up_at_step_2)
            late = run_discovery(
                DiscoveryConfig.of(name="late", **job), tmp_path / "late", model=shapes_model
            )
        assert late.tracking_error is None and late.run_id and losses(late.run_id) == [1, 2, 3]
        assert registered(late.bank) and not (tmp_path / "late" / TRACKING_PENDING).exists()

        server.stop()  # down at the start and at the end
        with monkeypatch.context() as m, pytest.raises(RuntimeError, match="a crash at step 2"):

            def crashes_at_step_2(self):
                if self.step == 1:
                    raise RuntimeError("a crash at step 2")
                return step(self)

            m.setattr(TrainLoop, "optimizer_step", crashes_at_step_2)
            run_discovery(DiscoveryConfig.of(name="down", **job), tmp_path / "down", model=shapes_model)
        assert (tmp_path / "down" / TRACKING_PENDING).exists()  # marked from the start: step 1 unlogged
        down = run_discovery(DiscoveryConfig.of(name="down", **job), tmp_path / "down", model=shapes_model)
        assert down.bank.is_dir() and down.steps == 3 and down.run_id is None
        assert f"MLflow at {server.uri} did not answer within 1 s" in down.tracking_error
        assert (tmp_path / "down" / TRACKING_PENDING).exists()
        server.start()
        again = run_discovery(DiscoveryConfig.of(name="down", **job), tmp_path / "down", model=shapes_model)
        assert again.resumed_from is not None and again.tracking_error is None
        assert losses(again.run_id) == [1, 2, 3] and registered(again.bank)  # every step, not only new ones
        assert not (tmp_path / "down" / TRACKING_PENDING).exists()
    finally:
        server.stop()


def test_the_wait_for_a_tracking_server_is_bounded_and_its_knob_checked(monkeypatch):
    """An unknown host (a cluster's service name off the cluster) and a proxy whose backend is
    down (503) are not answered for within the wait, not MLflow's minutes of retries; any other
    status, a redirect to a login page the job cannot reach, or credentials in the URI are a
    server answering; a wait that is not a number of seconds >= 0 is refused."""
    import http.server
    import threading

    from noiseclr.errors import StorageError
    from noiseclr.tracking.runs import answer_wait_s, unanswered

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/down"):
                self.send_response(503)  # a proxy in front of a backend that is down
            elif self.path.startswith("/login"):
                self.send_response(302)  # a login gateway: its page is on a host not reachable here
                self.send_header("Location", "http://login.noiseclr.invalid/")
            else:
                self.send_response(404)  # not MLflow: a refusal, for MLflow's client to explain
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    started = time.monotonic()
    assert unanswered("http://mlflow.noiseclr.invalid:5000", 1.0)  # .invalid never resolves
    assert time.monotonic() - started < 15
    assert unanswered("sqlite:///mlflow.db", 1.0) is None  # a store, not a server: nothing to ask
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert unanswered(f"http://user:secret@{base.removeprefix('http://')}/no/such", 1.0) is None
        assert unanswered(f"{base}/login", 1.0) is None
        assert unanswered(f"{base}/down", 1.0) == "HTTP 503: a proxy answers for it"
    finally:
        httpd.shutdown()
    monkeypatch.setenv("NOISECLR_TRACKING_WAIT_S", "0")  # do not ask first
    assert answer_wait_s() == 0 and unanswered("http://mlflow.noiseclr.invalid:5000", 0) is None
    for bad in ("ten", "nan", "-3", "inf"):
        monkeypatch.setenv("NOISECLR_TRACKING_WAIT_S", bad)
        with pytest.raises(StorageError, match="NOISECLR_TRACKING_WAIT_S must be a number of seconds >= 0"):
            answer_wait_s()


def test_an_mlflow_server_that_answers_with_a_refusal_stops_the_job_before_it_trains(tmp_path, shapes_model):
    """Only a server that does not answer is waited for: one that answers with an error (here an
    HTTP server that is not MLflow: 404 for every API call) stops the job at once, as a wrong
    URI or refused credentials must, instead of surfacing after the whole run."""
    import http.server
    import threading

    from noiseclr.errors import StorageError, TrackingUnreachable

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
        job = DiscoveryConfig.of(name="refused", k=3, negatives=1, batch=2, n_images=2, steps=2, device="cpu",
                                 evaluate=False, gallery=False, tracking_uri=uri)  # fmt: skip
        with pytest.raises(StorageError) as err:
            run_discovery(job, tmp_path / "out", model=shapes_model)
        assert not isinstance(err.value, TrackingUnreachable) and uri in str(err.value)
        assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained
    finally:
        httpd.shutdown()
