"""Beyond one machine, on a real local Ray cluster of two nodes (`ray start --head` on 127.0.0.1,
token auth on, and a worker node joined with `ray start --address`):
`noiseclr submit` through Ray's Jobs API (a discovery job followed to success, an edit endpoint
submitted then stopped, refusals), and the dashboards: every metric a panel queries is exported by
the cluster's metrics endpoints, and a real Prometheus running dashboards/prometheus.yml's scrape
job answers every panel's query with data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import typer.main
import yaml
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("deepspeed")
httpx = pytest.importorskip("httpx")

from noiseclr import submit as jobs  # noqa: E402
from noiseclr.bank import DirectionBank  # noqa: E402
from noiseclr.cli import app  # noqa: E402
from noiseclr.discovery.config import merge, nest  # noqa: E402
from noiseclr.domains import shapes  # noqa: E402
from noiseclr.errors import ConfigError  # noqa: E402
from noiseclr.models.base import load_model  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Ray's node GPU metrics exist only on nodes with GPUs; on CPU they are checked in Ray's source.
GPU_ONLY = {"ray_node_gram_used", "ray_node_gpus_utilization"}
GPU_SERIES = 'kind="gpu_allocated"'  # our worker-memory gauge's GPU series, set on GPU workers only
CORRUPT = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str, every: float = 1.0, fail: bool = True):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except (httpx.TransportError, OSError):
            pass
        time.sleep(every)
    if fail:
        pytest.fail(f"{what} not within {seconds} s")
    return None


def alive_nodes(address: str) -> list:
    """The cluster's live nodes, through Ray's state API (the dashboard, with the token)."""
    try:
        reply = httpx.get(f"{address}/api/v0/nodes", headers=jobs.auth_headers(), timeout=10).json()
        return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]
    except (ValueError, KeyError, TypeError):  # the dashboard is still starting: not an answer yet
        return []


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "noiseclr"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def head():
    """A Ray head with the dashboard (Jobs API) and metrics agent on 127.0.0.1, and a worker node
    joined to it (its own raylet, object store and metrics agent); both stopped at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="nclr"))  # short: Ray's socket paths live under it
    # Every port chosen free, so a Ray already running on this machine cannot collide with it.
    names = ("gcs", "dashboard", "metrics", "agent-listen", "agent-grpc", "runtime-env", "client")
    ports = {name: free_port() for name in names}
    (tmp / "auth_token").write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token")}
    env = {**os.environ, **auth, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env["RAY_metrics_report_interval_ms"] = "1000"  # processes push metrics every 1 s (default 10)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            *("start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "4"),
            *("--port", str(ports["gcs"]), "--temp-dir", str(tmp / "ray")),
            *("--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"])),
            *("--metrics-export-port", str(ports["metrics"])),
            *("--dashboard-agent-listen-port", str(ports["agent-listen"])),
            *("--dashboard-agent-grpc-port", str(ports["agent-grpc"])),
            *("--runtime-env-agent-port", str(ports["runtime-env"])),
            *("--ray-client-server-port", str(ports["client"])),
        ],
        env=env,
        stdout=open(tmp / "ray-start.log", "w"),  # noqa: SIM115 - the head outlives this block
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{ports['dashboard']}"
    os.environ.update(auth)  # this process's Jobs API clients, as for `ray job`
    procs = [proc]
    try:
        up = lambda: httpx.get(f"{address}/api/version", timeout=5).status_code < 500  # noqa: E731
        if not wait_for(up, 120, "Ray head", fail=False):
            pytest.fail(f"Ray head did not start: {(tmp / 'ray-start.log').read_text()[-2000:]}")
        worker = {name: free_port() for name in ("metrics", "agent-listen", "agent-grpc", "runtime-env")}
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "ray"),
                    *("start", "--address", f"127.0.0.1:{ports['gcs']}", "--block", "--disable-usage-stats"),
                    # Its own temp folder, as another machine has its own disk: sharing the head's,
                    # its runtime-env agent deletes the job's unpacked working_dir under the head's
                    # driver when its Train worker exits (the driver's cwd then no longer exists).
                    *("--temp-dir", str(tmp / "ray-node")),
                    *("--num-cpus", "2", "--metrics-export-port", str(worker["metrics"])),
                    *("--dashboard-agent-listen-port", str(worker["agent-listen"])),
                    *("--dashboard-agent-grpc-port", str(worker["agent-grpc"])),
                    *("--runtime-env-agent-port", str(worker["runtime-env"])),
                ],
                env=env,
                stdout=open(tmp / "ray-worker.log", "w"),  # noqa: SIM115 - as the head's
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        if not wait_for(lambda: len(alive_nodes(address)) == 2, 120, "the worker node", fail=False):
            pytest.fail(f"the worker node did not join: {(tmp / 'ray-worker.log').read_text()[-2000:]}")
        wait_for(lambda: jobs.client(address).list_jobs() is not None, 60, "Ray's Jobs API")
        yield {
            "address": address,
            "tmp": tmp,
            "metrics_port": ports["metrics"],
            "env": auth,
        }
    finally:
        for key in auth:
            os.environ.pop(key, None)
        for started in procs:  # `ray start --block` stops the processes it started; both at once
            started.send_signal(signal.SIGTERM)
        for started in procs:  # its graceful stop took 30 s here: what is left is killed at 10 s
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGKILL)  # anything left of this cluster, nothing else
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(head):
    """Debian's Prometheus running dashboards/prometheus.yml's `ray` job against this cluster: its
    service-discovery file is the one this head writes; targets scraped on 127.0.0.1, every second."""
    binary = shutil.which("prometheus")
    if not binary:
        yield None
        return
    config = yaml.safe_load((ROOT / "dashboards/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    job["file_sd_configs"][0]["files"] = [str(head["tmp"] / "ray/prom_metrics_service_discovery.json")]
    # Re-read the targets file every 2 s: file watching (inotify) is not available everywhere,
    # and the fallback is the default 5 min, longer than this test waits for a new target.
    job["file_sd_configs"][0]["refresh_interval"] = "2s"
    job["relabel_configs"] = [
        {
            "source_labels": ["__address__"],
            "regex": r"[^:]+:(\d+)",
            "target_label": "__address__",
            "replacement": "127.0.0.1:$1",
        }
    ]
    folder = head["tmp"] / "prometheus"
    folder.mkdir()
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=5).status_code == 200, 60, "Prometheus")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sd15_folder, mlflow_server):
    """What travels with the jobs (job YAMLs), and image data beside it (10 files, 2 corrupt).

    The jobs are a user's own: jobs/sd15-faces.yaml's settings on the SD 1.5-structured stand-in
    (sizes, device and precision made to fit this CPU; tracked and registered as
    models:/noiseclr-faces@champion in the session's MLflow server), then jobs/serve-sd15.yaml
    serving that registered bank at its fp16, on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("cluster")
    data = tmp / "data"
    data.mkdir()
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(8, seed=3)))):
        Image.fromarray(px).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "empty.jpg").write_bytes(b"")
    work = tmp / "work"
    work.mkdir()
    job = yaml.safe_load((ROOT / "jobs/sd15-faces.yaml").read_text())
    job = merge(job, nest(dict(  # the job's own sections, these keys replaced (by their flat names)
        model=str(sd15_folder), data=str(data), tracking_uri=mlflow_server.uri,
        n_images=10, k=4, negatives=2, batch=2, steps=30, grad_accum=1, checkpoint_every=15,
        workers=2, placement_strategy="STRICT_SPREAD", zero_stage=0, device="cpu", precision="fp32",
        evaluate_images=2, evaluate_steps=2, gallery_seeds=1, gallery_steps=2,
    )))  # fmt: skip
    (work / "faces.yaml").write_text(yaml.safe_dump(job))
    port = free_port()
    serve = yaml.safe_load((ROOT / "jobs/serve-sd15.yaml").read_text())
    assert serve["banks"]["faces"] == "models:/noiseclr-faces@champion" and serve["precision"] == "fp16"
    serve.update(
        model=str(sd15_folder), tracking_uri=mlflow_server.uri, banks={"faces": serve["banks"]["faces"]},
        host="127.0.0.1", port=port, device="cpu", labels_dir=str(tmp / "labels"),
        proxy_location="HeadOnly",  # the worker node is on this host too: one proxy binds the port
        default_steps=4, default_inversion_steps=4, thumbnail_steps=3,
        replicas={**serve["replicas"], "num_cpus": 1, "num_gpus": 0, "torch_threads": 1, "max_replicas": 1},
    )  # fmt: skip
    (work / "serve.yaml").write_text(yaml.safe_dump(serve))
    return {"work": work, "out": tmp / "out", "serve_url": f"http://127.0.0.1:{port}"}


def metric_ports(head) -> list[str]:
    """The metrics endpoints Ray lists in the file dashboards/prometheus.yml reads."""
    targets = json.loads((head["tmp"] / "ray/prom_metrics_service_discovery.json").read_text())
    return [t.rsplit(":", 1)[1] for group in targets for t in group["targets"]]


def exported(ports: list[str]) -> dict[str, list[str]]:
    """metric name -> its sample lines, over every metrics endpoint (scraped on 127.0.0.1)."""
    lines: dict[str, list[str]] = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line and not line.startswith("#"):
                lines.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
    return lines


def dashboard_queries(name: str) -> list[str]:
    """Every PromQL query of dashboards/NAME.json (panels and template variables), variables filled."""
    board = json.loads((ROOT / "dashboards" / f"{name}.json").read_text())
    out = []
    for panel in board["panels"]:
        assert panel["targets"], f"{name}: panel {panel['title']!r} queries nothing"
        out += [t["expr"] for t in panel["targets"]]
    for var in board["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric, label): that label must exist
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"]).groups()
            out.append(f"count by ({label}) (last_over_time({metric}[5m]))")  # series in the range
    # The variables as a user would pick them: this run, this app (so a missing label shows).
    fill = {"$__rate_interval": "30s", "$run": "faces", "$application": "noiseclr-edit"}
    return [re.sub(r"\$\w+", lambda m: fill[m.group(0)], q) for q in out]


def metric_names(queries: list[str]) -> set[str]:
    return {name for q in queries for name in re.findall(r"\bray_[a-z0-9_]+", q)}


@pytest.fixture(scope="module")
def discovery_job(head, prometheus, workdir):
    """`noiseclr submit` a discovery job (2 Ray Train workers, one per node), following its logs,
    while this scrapes the metrics endpoints: a run's gauges live only as long as its workers."""
    job_id = f"faces-{int(time.time())}"
    args = ("submit", str(workdir["work"] / "faces.yaml"), "--address", head["address"])
    args += ("--working-dir", str(workdir["work"]), "--out", str(workdir["out"]), "--submission-id", job_id)
    logs = workdir["work"].parent / "submit"
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:  # no pipe to fill
        proc = subprocess.Popen(
            [str(BIN / "noiseclr"), *args], stdout=stdout, stderr=stderr, env={**os.environ, **head["env"]}
        )
    wanted, seen, seen_at = metric_names(dashboard_queries("discovery")) - GPU_ONLY, {}, None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if seen_at is None:  # scraped until every wanted metric was seen (each scrape costs CPU)
            with contextlib.suppress(httpx.TransportError, OSError):
                now = exported(metric_ports(head))
                if wanted <= set(now):
                    seen, seen_at = now, time.time()
        time.sleep(1)
    try:
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        cli("job", "stop", job_id, "--address", head["address"], env=head["env"])
        pytest.fail(f"the discovery job {job_id} did not end within 600 s")
    done = subprocess.CompletedProcess(
        proc.args, proc.returncode, Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()
    )
    return {"id": job_id, "done": done, "seen": seen, "seen_at": seen_at, "wanted": wanted}


@pytest.fixture(scope="module")
def serve_job(head, discovery_job, workdir):
    """`noiseclr submit` the edit endpoint without following; wait until it answers."""
    job_id = f"serve-{int(time.time())}"
    done = cli(
        *("submit", str(workdir["work"] / "serve.yaml"), "--address", head["address"], "--no-follow"),
        *("--working-dir", str(workdir["work"]), "--submission-id", job_id),
        env=head["env"],
    )
    assert done.returncode == 0, done.stderr
    url = workdir["serve_url"]
    wait_for(
        lambda: httpx.get(f"{url}/v1/health", timeout=5).status_code == 200, 300, "the submitted endpoint"
    )
    return job_id, url


# --- submission ----------------------------------------------------------------------------------


def test_a_submitted_discovery_job_is_followed_to_success(head, discovery_job, workdir, sd15_folder):
    job_id, done = discovery_job["id"], discovery_job["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"submitted {job_id}" in done.stderr and f"{job_id}: SUCCEEDED" in done.stderr
    assert "done: 30 steps on 8 images, 2 Ray Train workers" in done.stdout  # the followed logs
    assert "Failed to query Ray Train Controller" not in done.stdout + done.stderr  # Ray's noise kept out
    bank = DirectionBank.load(workdir["out"] / "bank", load_model(str(sd15_folder), device="cpu"))
    assert bank.directions.shape[0] == 4 and bank.metrics["corrupt_images"] == CORRUPT
    assert bank.scores is not None and bank.tokens[0] == "<faces-0>"  # measured without an oracle
    assert "MLflow did not take the run's record" not in done.stdout + done.stderr  # tracked, registered
    assert bank.metrics["nodes"] == 2  # the head and the worker node each ran a worker
    status = cli("job", "status", job_id, "--address", head["address"], env=head["env"])
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    assert "noiseclr discover --config faces.yaml" in status.stdout
    listed = cli("job", "list", "--address", head["address"], env=head["env"])
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = cli("job", "logs", job_id, "--address", head["address"], env=head["env"])
    assert "done: 30 steps" in logs.stdout


def test_a_submitted_endpoint_answers_then_stops(head, serve_job):
    url = serve_job[1]
    edit = {"seed": 3, "edits": [{"bank": "faces", "direction": 0, "scale": 2.0}], "steps": 4}
    reply = httpx.post(f"{url}/v1/edits", json=edit, timeout=300)
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(reply.content)).verify()
    assert httpx.post(f"{url}/v1/edits", json={**edit, "steps": -1}, timeout=60).status_code == 422
    # Prometheus needs a few scrapes after these requests (the dashboards test below reads them).
    time.sleep(5)


def test_every_dashboard_metric_is_exported_and_every_panel_query_has_data(
    head, prometheus, discovery_job, serve_job
):
    ports = metric_ports(head)
    assert str(head["metrics_port"]) in ports  # the scrape config's file lists the metrics agent
    # Discovery: all of its panels' metrics at one moment of the run (scraped while it trained).
    seen, wanted = discovery_job["seen"], discovery_job["wanted"]
    assert discovery_job["seen_at"], f"never all exported during the run: {sorted(wanted - set(seen))}"
    dropped = [ln for ln in seen["ray_noiseclr_data_files_dropped_total"] if 'run="faces"' in ln]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in dropped) == CORRUPT  # the corrupt files, counted
    # Serving: the endpoint is up and has answered an edit and a refusal.
    serving = dashboard_queries("serving")
    wanted = metric_names(serving) - GPU_ONLY
    deadline, now = time.monotonic() + 120, exported(ports)
    while not wanted <= set(now) and time.monotonic() < deadline:
        time.sleep(2)
        now = exported(ports)
    assert wanted <= set(now), f"not exported: {sorted(wanted - set(now))}"
    serving_seen_at = time.time()  # every serving metric exported at this moment
    reporter = Path(__import__("ray").__file__).parent / "dashboard/modules/reporter/reporter_agent.py"
    for name in GPU_ONLY:  # not on a CPU machine; Ray defines them for GPU nodes
        assert f'"{name.removeprefix("ray_")}"' in reporter.read_text(), name
    if prometheus is None:
        pytest.skip("no prometheus binary (make test installs Debian's): PromQL queries not run")
    checked = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "dashboards/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    def empty(queries: list[str], at: float | None) -> list[str]:
        missing = []
        for query in queries:
            if metric_names([query]) & GPU_ONLY or GPU_SERIES in query:
                continue
            params = {"query": query, **({"time": at} if at else {})}
            reply = httpx.get(f"{prometheus}/api/v1/query", params=params, timeout=10).json()
            assert reply["status"] == "success", (query, reply)
            if not reply["data"]["result"]:
                missing.append(query)
        return missing

    # Each board's panels evaluated a few scrapes after the moment all its metrics were exported
    # (a gauge Ray stops re-exporting later, as its Serve controller's may on a loaded machine,
    # is then no failure of the dashboards).
    # Prometheus scrapes every second, but on 2 loaded cores a scrape may land later than that:
    # the panels are read a few scrapes after, up to a minute after (still inside the run's data).
    for delay in (5, 15, 30, 60):
        if not (missing := empty(dashboard_queries("discovery"), discovery_job["seen_at"] + delay)):
            break
    assert not missing, f"discovery panel queries without data up to 60 s after export: {missing}"
    time.sleep(max(0.0, serving_seen_at + 5 - time.time()))
    deadline = time.monotonic() + 60
    while (missing := empty(serving, serving_seen_at + 5)) and time.monotonic() < deadline:
        time.sleep(3)
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    scrapes = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
    lines = {name: now.get(name) for name in metric_names(missing)}
    known = {
        name: httpx.get(f"{prometheus}/api/v1/series", params={"match[]": name}, timeout=10).json()
        for name in metric_names(missing)
    }
    assert not missing, (
        f"panel queries without data: {missing}; exported then: {lines}; targets: {scrapes}; "
        f"series Prometheus holds for them: {known}"
    )


def test_stopping_a_submitted_endpoint_shuts_it_down(head, serve_job):
    job_id, url = serve_job
    stopped = cli("job", "stop", job_id, "--address", head["address"], env=head["env"])
    assert stopped.returncode == 0 and f"{job_id}: STOPPED" in stopped.stdout, stopped.stderr

    def down() -> bool:
        try:
            httpx.get(f"{url}/v1/health", timeout=5)
        except httpx.TransportError:
            return True
        return False

    wait_for(down, 90, "the endpoint to go away (the driver shuts Serve down on SIGTERM)")


def test_an_sdxl_job_is_submitted_tracked_registered_and_edited_from_the_registry(
    head, workdir, mlflow_server, serve_job
):
    """jobs/sdxl-faces.yaml's settings (gradient checkpointing included) on the SDXL stand-in, in
    one process on the cluster (its 6 workers are `tests/test_distributed.py`'s SDXL case at 2):
    submitted, followed to success, tracked, registered as models:/noiseclr-sdxl-faces@champion,
    and that registered version edits an SDXL image through `noiseclr edit`."""
    from noiseclr.models.standin import write_sdxl

    tmp = workdir["work"].parent
    folder = write_sdxl(tmp / "sdxl")
    job = yaml.safe_load((ROOT / "jobs/sdxl-faces.yaml").read_text())
    job = merge(job, nest(dict(
        model=str(folder), data=str(tmp / "data"), tracking_uri=mlflow_server.uri,
        storage_path=str(tmp / "runs"), n_images=8, k=3, negatives=2, batch=2, steps=3, grad_accum=1,
        checkpoint_every=3, workers=0, device="cpu", precision="fp32",
        evaluate_images=2, evaluate_steps=2, gallery_seeds=1, gallery_steps=2,
    )))  # fmt: skip
    assert job["run"]["gradient_checkpointing"] is True
    (workdir["work"] / "sdxl-faces.yaml").write_text(yaml.safe_dump(job))
    job_id, out = f"sdxl-{int(time.time())}", tmp / "out-sdxl"
    done = cli(
        *("submit", str(workdir["work"] / "sdxl-faces.yaml"), "--address", head["address"]),
        *("--working-dir", str(workdir["work"]), "--out", str(out), "--submission-id", job_id),
        env=head["env"],
    )
    logs = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0 and f"{job_id}: SUCCEEDED" in done.stderr, logs
    assert "MLflow did not take the run's record" not in done.stdout + done.stderr
    bank = DirectionBank.load(out / "bank")
    assert bank.family == "sdxl" and bank.directions.shape == (3, 80) and bank.scores is not None
    edited = tmp / "sdxl-edit.png"
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    words = ("edit", "0=1", "--bank", "models:/noiseclr-sdxl-faces@champion", "--model", str(folder))
    ran = cli(*words, "--seed", "1", "--steps", "2", "--device", "cpu", "--out", str(edited), env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert Image.open(edited).size[1] > 64


# --- refusals ------------------------------------------------------------------------------------


def test_a_bad_job_is_refused_before_anything_is_sent(head, workdir):
    before = len(jobs.client(head["address"]).list_jobs())
    bad = workdir["work"] / "bad.yaml"
    bad.write_text("kind: discover\nmodel: shapes\noptim: {stesp: 10}\n")
    done = cli("submit", str(bad), "--address", head["address"], "--working-dir", str(workdir["work"]))
    assert done.returncode == 2 and "unknown key 'optim.stesp' (did you mean 'steps'?)" in done.stderr
    bad.write_text("model: shapes\nsteps: 10\n")  # a flat job file runs locally, with a notice
    done = cli("submit", str(bad), "--address", head["address"], "--working-dir", str(workdir["work"]))
    assert done.returncode == 2 and "declares no kind: add `kind: discover`" in done.stderr
    outside = cli("submit", str(ROOT / "jobs/shapes.yaml"), "--address", head["address"], "--working-dir",
                  str(workdir["work"]))  # fmt: skip
    assert outside.returncode == 2 and "outside the working folder" in outside.stderr
    assert len(jobs.client(head["address"]).list_jobs()) == before


def test_unknown_jobs_and_unreachable_clusters_are_one_line_errors(head):
    unknown = cli("job", "status", "no-such-job", "--address", head["address"], env=head["env"])
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: get job info no-such-job")
    assert len(unknown.stderr.strip().splitlines()) == 1
    nowhere = cli("job", "list", "--address", f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 2 and "cannot reach the Ray Jobs API" in nowhere.stderr


def test_the_job_kind_and_entry_point_come_from_the_yaml():
    made = {p: jobs.make_job(ROOT / p, ROOT) for p in ("jobs/shapes.yaml", "jobs/sweep-shapes.yaml")}
    assert (
        made["jobs/shapes.yaml"].entrypoint == "noiseclr discover --config jobs/shapes.yaml --out out/shapes"
    )
    sweep = made["jobs/sweep-shapes.yaml"]
    assert sweep.kind == "sweep" and sweep.entrypoint.startswith(
        "noiseclr sweep --config jobs/sweep-shapes.yaml"
    )
    served = jobs.make_job(ROOT / "jobs/serve-shapes.yaml", ROOT, env={"A": "1"})
    assert served.entrypoint == "noiseclr serve --config jobs/serve-shapes.yaml"
    assert served.runtime_env["env_vars"]["A"] == "1" and ".git" in served.runtime_env["excludes"]
    # A GPU job on workers is told to give its driver a GPU; a one-process CPU-or-GPU job is not.
    assert jobs.make_job(ROOT / "jobs/sd15-faces-6gpu.yaml", ROOT).driver_gpu_advised
    assert not made["jobs/shapes.yaml"].driver_gpu_advised
    commands = typer.main.get_command(app).commands  # every option of an entry point exists
    for job in (*made.values(), served):
        command, kind, *args = shlex.split(job.entrypoint)
        options = {o for param in commands[kind].params for o in param.opts}
        assert command == "noiseclr" and {a for a in args if a.startswith("--")} <= options, job.entrypoint
    with pytest.raises(ConfigError, match="--env '1A=2': expected KEY=VALUE"):
        jobs.parse_env(["1A=2"])
    with pytest.raises(ConfigError, match="not set in this shell"):
        jobs.parse_env(["NOISECLR_SURELY_UNSET_VARIABLE"])


def test_workers_take_gpus_when_the_cluster_has_them_whatever_the_driver_has(monkeypatch):
    import ray

    from noiseclr.training.distributed import workers_use_gpu

    # A driver on a CPU-only head (this machine) joining a cluster with GPU workers.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 8.0})
    assert workers_use_gpu("auto") and workers_use_gpu("cuda") and not workers_use_gpu("cpu")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert not workers_use_gpu("auto")
