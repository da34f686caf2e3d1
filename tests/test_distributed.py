"""Distributed discovery on a real multi-node Ray cluster on this host (a head and two worker nodes,
each its own raylet, object store and resources, as Ray's own tests run them): two CPU workers on
two nodes over gloo running DeepSpeed (its CPU accelerator), Ray Data streaming, checkpoints, a
node lost mid-run and replaced, and S3 buckets on a real S3-compatible server (moto, 127.0.0.1)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from noiseclr.bank import DirectionBank  # noqa: E402
from noiseclr.discovery.config import DiscoveryConfig  # noqa: E402
from noiseclr.domains import shapes  # noqa: E402
from noiseclr.errors import ConfigError  # noqa: E402
from noiseclr.workflows.discover import run_discovery  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "platform/noiseclr/pretrained/banks/shapes"


WORKER_NODE = {"num_cpus": 3, "object_store_memory": 100 * 2**20}  # a train worker + data tasks


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs to give (the driver's node) and two worker nodes of 2 CPUs each, so
    the two Ray Train workers (1 CPU each) of a STRICT_SPREAD job land on different nodes."""
    from ray.cluster_utils import Cluster

    # The S3 test server's credentials reach the workers as a cluster's would: in the environment.
    env = {"DS_ACCELERATOR": "cpu", "NOISECLR_TEST_S3_KEY": "test", "NOISECLR_TEST_S3_SECRET": "test"}
    env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"  # Ray Train's drain watcher (default 5 s)
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"  # how often it collects reports (default 2 s)
    os.environ.update(env)
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20, "include_dashboard": False},
    )
    for _ in range(2):
        nodes.add_node(**WORKER_NODE)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, runtime_env={"env_vars": env})
    joined: list[subprocess.Popen] = []

    def join() -> None:
        """A new worker node, as an autoscaler would start one: `ray start` joined to the head."""
        args = ["--address", nodes.address, "--num-cpus", str(WORKER_NODE["num_cpus"]), "--block"]
        args += ["--object-store-memory", str(WORKER_NODE["object_store_memory"]), "--disable-usage-stats"]
        joined.append(
            subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    nodes.join, nodes.joined = join, joined
    yield nodes
    ray.shutdown()
    for proc in joined:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    nodes.shutdown()


def node_running(cluster, marker: str):
    """The worker node that runs a process whose command line holds `marker`: (those processes,
    the node's raylet, the node's handle, its id), or None."""
    import psutil

    def raylet_of(proc: psutil.Process) -> psutil.Process | None:
        return next((p for p in proc.children(recursive=True) if p.name() == "raylet"), None)

    nodes = [(psutil.Process(n.all_processes["raylet"][0].process.pid), n) for n in cluster.worker_nodes]
    nodes += [(raylet_of(psutil.Process(p.pid)), p) for p in cluster.joined if p.poll() is None]
    for raylet, node in nodes:
        try:  # Ray starts and reaps worker processes while this looks
            if raylet is None:
                continue
            victims = [p for p in raylet.children(recursive=True) if marker in " ".join(p.cmdline())]
            node_id = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))
        except psutil.Error:
            continue
        if victims:
            return victims, raylet, node, node_id
    return None


def kill_node(cluster, found) -> list[int]:
    """Kill a node `node_running` found: its marked processes and its raylet by pid, then the rest
    of the node; a replacement node joins. Returns the killed pids."""
    import psutil

    victims, raylet, node, _ = found
    for proc in [*victims, raylet]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if isinstance(node, subprocess.Popen):  # a node that joined with `ray start`
        os.killpg(node.pid, signal.SIGKILL)
    else:
        cluster.remove_node(node, allow_graceful=False)  # the rest of its processes
    cluster.join()  # the replacement
    return [p.pid for p in victims]


def kill_a_node_running(cluster, marker: str) -> tuple[list[int], str | None]:
    """Kill a worker node that runs a process whose command line holds `marker` (see kill_node).
    Returns the killed pids and the node's id ([], None when no node runs such a process)."""
    found = node_running(cluster, marker)
    return (kill_node(cluster, found), found[3]) if found else ([], None)


def cfg(**kw) -> DiscoveryConfig:
    # N == global batch: every step sees every image, whichever worker holds it.
    base = dict(
        k=4,
        negatives=2,
        batch=4,
        n_images=4,
        steps=4,
        checkpoint_every=2,
        name="d",
        max_failures=1,
        device="cpu",
        evaluate=False,
        gallery_seeds=1,
        gallery_steps=2,
        gallery_scales=[0.0, 1.0],
    )
    return DiscoveryConfig.of(**{**base, **kw})


def same_bank(a, b) -> None:
    torch.testing.assert_close(
        DirectionBank.load(a).directions, DirectionBank.load(b).directions, atol=2e-5, rtol=1e-4
    )


class Shard:
    """A stand-in for a worker's Ray Data shard: counts how often the stream is read."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def iter_torch_batches(self, batch_size: int, drop_last: bool, dtypes=None):
        self.reads += 1
        for i in range(0, self.n - batch_size + 1, batch_size):
            index = torch.arange(i, i + batch_size)
            yield {"index": index, "latent": index.float().view(-1, 1, 1, 1).expand(-1, 4, 2, 2)}


@pytest.mark.parametrize("cache", [False, True])
def test_a_worker_holds_the_domain_only_when_the_latent_cache_says_so(cache):
    """Cache off: every pass streams again and the worker keeps no latent; on: the shard is read
    once and the first pass's latents are what later passes replay (their memory, per image)."""
    from noiseclr.training.distributed import _local_batches

    shard = Shard(10)
    stream = _local_batches(cfg(cache_latents=cache), shard, 2)
    seen = [next(stream)[0].tolist() for _ in range(12)]  # 5 batches a pass: into the third pass
    assert seen[:5] == seen[5:10] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert shard.reads == (1 if cache else 3)
    held = stream.gi_frame.f_locals["cache"]
    assert len(held) == (5 if cache else 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single process: its bank and the world it wrote."""
    out = tmp_path_factory.mktemp("ref")
    result = run_discovery(cfg(), out)
    assert result.workers == 0
    return result.bank, str(out / "data")


def test_a_single_process_checkpoint_resumes_on_two_workers_on_two_nodes_with_the_same_bank(
    cluster, reference, tmp_path
):
    """A single process stops at step 2; a changed config is refused at its checkpoint; two Ray
    Train workers (ZeRO-2, one on each worker node) resume there and end on the single process's
    bank, with its outputs. (Workers from step 0 are the SIGTERM, node-lost and SDXL tests'; ZeRO-3
    with gradient accumulation is the SDXL test's: each two-worker run costs CI about a minute.)"""
    ref, data = reference
    run_discovery(cfg(steps=2, data=data), tmp_path)  # stops at step 2: OUT/checkpoints/step-0000002
    with pytest.raises(ConfigError, match=r"tau: 0\.5 -> 0\.4"):
        run_discovery(cfg(workers=2, tau=0.4, data=data), tmp_path)
    job = cfg(workers=2, zero_stage=2, data=data, placement_strategy="STRICT_SPREAD")
    result = run_discovery(job, tmp_path)
    assert result.resumed_from.name == "step-0000002"
    assert result.workers == 2 and result.steps == 4
    bank = DirectionBank.load(result.bank)
    assert bank.metrics["world"] == 2 and bank.metrics["attempt_start_step"] == 2
    assert bank.metrics["nodes"] == 2  # one worker on each worker node
    # What a run costs, for the benchmarks and a user's MLflow run: the largest worker's peak
    # memory, the driver's, and an attempt's start to its first step.
    assert bank.metrics["worker_peak_rss_mib"] > 100 and bank.metrics["peak_rss_mib"] > 100
    assert 0 < bank.metrics["first_step_s"] < bank.metrics["train_seconds"]
    same_bank(result.bank, ref)
    assert result.gallery.exists() and result.html.exists()  # the same outputs as the single process
    assert (tmp_path / "checkpoints" / "step-0000004" / "state.json").exists()


def s3_options(s3_server) -> dict:
    """The server's options with the credentials by name (a literal key in a job is refused)."""
    return {**s3_server, "key": "${NOISECLR_TEST_S3_KEY}", "secret": "${NOISECLR_TEST_S3_SECRET}"}


def test_a_node_lost_mid_run_is_replaced_and_the_run_loses_no_step(
    cluster, reference, s3_server, s3_bucket, tmp_path
):
    """Fault table, preemption of a worker's node: after a checkpoint reached the bucket, the node
    running a worker gets Ray's preemption notice (`ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION`, as an autoscaler or a spot handler sends it); the workers write a
    checkpoint at once, though none is due; then the node's processes are killed (its raylet and
    its workers, by pid) and a new node joins, as an autoscaler would bring one. The run resumes
    from the notice's checkpoint and ends with the uninterrupted run's bank."""
    import s3fs

    _, data = reference
    s3_bucket("nodes-bucket")
    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)  # not the run's (cached) instance
    lost: dict = {}

    def steps_in_bucket() -> list[int]:
        fs.invalidate_cache()
        return [json.loads(fs.cat(p))["step"] for p in fs.glob("nodes-bucket/ray/**/state.json")]

    def lose_a_node() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (
            steps_in_bucket() and (found := node_running(cluster, "RayTrainWorker"))
        ):
            time.sleep(0.2)
        drain = [
            "drain-node",
            "--address",
            cluster.address,
            "--node-id",
            found[3],
            "--deadline-remaining-seconds",
            "10",
        ]
        drain += [
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            "spot instance reclaimed (test)",
        ]
        subprocess.run([str(Path(sys.executable).parent / "ray"), *drain], check=True, capture_output=True)
        noticed = time.time()
        while time.time() < deadline:
            if unscheduled := [k for k in steps_in_bucket() if k % 10]:  # checkpoint_every is 10
                lost.update(notice_step=min(unscheduled), notice_s=round(time.time() - noticed, 1))
                time.sleep(1.5)  # Ray Train registers the report (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
                lost["newest"] = max(steps_in_bucket())  # the notice's, or a periodic one since
                lost["pids"] = kill_node(cluster, found)
                return
            time.sleep(0.2)

    def guarded() -> None:
        try:
            lose_a_node()
        except Exception as err:  # the test says what went wrong, not a hang
            lost["error"] = repr(err)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    long = dict(
        workers=2, zero_stage=2, data=data, steps=30, checkpoint_every=10, placement_strategy="STRICT_SPREAD"
    )
    result = run_discovery(
        cfg(**long, storage_path="s3://nodes-bucket/ray", storage_options=s3_options(s3_server)),
        tmp_path / "lost",
    )
    thread.join(timeout=5)
    assert lost.get("pids"), f"the test did not manage to kill a node running a worker: {lost}"
    print(f"notice to checkpoint: {lost['notice_s']} s (step {lost['notice_step']}, newest {lost['newest']})")
    assert result.steps == 30
    # the restarted workers began at the notice's checkpoint (or a later one registered before the
    # node went), not at the periodic one before the notice
    start = DirectionBank.load(result.bank).metrics["attempt_start_step"]
    assert lost["notice_step"] <= start <= lost["newest"], (start, lost)
    assert DirectionBank.load(result.bank).metrics["nodes"] == 2  # the last attempt ran on two nodes again
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    assert len(alive) == 2  # the lost node is gone from the cluster, its replacement in
    # No step lost or repeated: the resumed run ends exactly where an uninterrupted one does. The
    # uninterrupted run is the single process (the same-bank tests show it gives the workers' bank),
    # which saves CI a second two-node run.
    single = {key: long[key] for key in ("data", "steps", "checkpoint_every")}
    straight = run_discovery(cfg(**single), tmp_path / "straight")
    assert straight.workers == 0
    same_bank(result.bank, straight.bank)


def test_sigterm_to_the_driver_checkpoints_on_the_workers_at_once_and_the_rerun_loses_no_step(
    cluster, reference, tmp_path
):
    """Fault table, SIGTERM to the driver of a Ray Train job (a scheduler's or a spot instance's
    notice): the workers finish the step under way, checkpoint it though none is due, and return;
    the command stops with Preempted naming the checkpoint in OUT; the same job resumes there (in
    a single process here: it resumes either kind) and ends on the uninterrupted run's bank."""
    from noiseclr.errors import Preempted

    _, data = reference
    long = dict(data=data, steps=24, checkpoint_every=4)
    out, sent = tmp_path / "stopped", {}

    def stop_once_training() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if list((out / "ray").glob("*/checkpoint_*/state.json")):  # the workers' step 4
                sent["at"] = time.time()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    threading.Thread(target=stop_once_training, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)  # ray.init's own
    with pytest.raises(
        Preempted, match=r"SIGTERM after step \d+ of 24: checkpoint .*step-\d+ written"
    ) as err:
        run_discovery(cfg(workers=2, placement_strategy="STRICT_SPREAD", **long), out)
    stopped_s = time.time() - sent["at"]
    step = int(re.search(r"after step (\d+)", str(err.value)).group(1))
    print(f"SIGTERM to the command's end: {stopped_s:.1f} s, stopped after step {step}")
    assert 4 <= step < 24 and (out / "checkpoints" / f"step-{step:07d}" / "state.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler was for the run only
    resumed = run_discovery(cfg(**long), out)
    assert resumed.resumed_from.name == f"step-{step:07d}" and resumed.steps == 24
    same_bank(resumed.bank, run_discovery(cfg(**long), tmp_path / "straight").bank)


def test_s3_bucket_with_corrupt_files_trains_end_to_end(
    cluster, s3_server, s3_bucket, mlflow_server, tmp_path
):
    import s3fs

    s3_bucket("shapes-bucket")
    fs = s3fs.S3FileSystem(**s3_server)
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(4, seed=9)))):
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        fs.pipe(f"shapes-bucket/imgs/{i}.png", buf.getvalue())
    fs.pipe("shapes-bucket/imgs/broken.png", b"\x89PNG\r\n\x1a\n garbage")
    fs.pipe("shapes-bucket/imgs/empty.jpg", b"")
    # Data and Ray Train checkpoints both on the S3 server, options from the job config.
    job = cfg(
        workers=2,
        zero_stage=2,
        data="s3://shapes-bucket/imgs",
        n_images=6,
        steps=2,
        checkpoint_every=1,
        storage_path="s3://shapes-bucket/ray",
        # credentials by name only: a literal key/secret in a job is refused (it would be written)
        storage_options=s3_options(s3_server),
        tracking_uri=mlflow_server.uri,  # rank 0 logs the steps live, the driver the rest
        experiment="distributed",
        register_bank=False,
    )
    with pytest.raises(ValueError, match=r"storage\.options\.key looks like a credential"):
        cfg(data="s3://shapes-bucket/imgs", storage_options=s3_server)
    result = run_discovery(job, tmp_path)
    assert result.corrupt_images == 2 and result.images == 4
    bank = DirectionBank.load(result.bank)
    assert bank.metrics["corrupt_images"] == 2 and bank.metrics["files"] == 6 and bank.metrics["steps"] == 2
    fs.invalidate_cache()
    saved = fs.glob("shapes-bucket/ray/**/state.safetensors")
    assert saved, "no checkpoint reached the bucket"
    assert not (tmp_path / "ray").exists()
    written = (Path(result.bank) / "bank.json").read_text() + "".join(
        fs.cat(p).decode("latin-1") for p in fs.glob("shapes-bucket/ray/**/state.json")
    )
    assert "${NOISECLR_TEST_S3_SECRET}" in written and '"secret": "test"' not in written
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == [1, 2]  # each once
    assert "${NOISECLR_TEST_S3_SECRET}" in client.get_run(result.run_id).data.params["storage_options"]


def test_an_endpoint_node_lost_under_load_loses_no_request(cluster, mlflow_server, tmp_path):
    """Two replicas spread over the worker nodes, the bank read from the MLflow server (shared
    storage, not a node's disk), Serve's proxy on the head. Clients that retry keep editing while
    the node of one replica is killed: every request gets its image, Serve brings the replica
    back on a live node, and the dead node answers nothing after."""
    import httpx
    import mlflow
    from ray import serve

    from noiseclr.serving.app import start
    from noiseclr.serving.config import ServeConfig
    from noiseclr.tracking.registry import log_bank
    from noiseclr.tracking.server import free_port

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("node-loss")
    with mlflow.start_run():
        log_bank(BANK, "node-loss-bank", "champion")
    cfg = ServeConfig.from_yaml(
        ROOT / "jobs/serve-shapes.yaml",
        port=free_port(),
        device="cpu",
        proxy_location="HeadOnly",  # several nodes on one host cannot all bind the port
        labels_dir=str(tmp_path / "labels"),
        default_steps=3,
        banks={"shapes": "models:/node-loss-bank@champion"},
        tracking_uri=mlflow_server.uri,
        replicas={"num_replicas": 2, "num_cpus": 1},
    )
    url = start(cfg)
    stop, answered, retries, errors = threading.Event(), [], [], []
    edit = {"edits": [{"bank": "shapes", "direction": 0, "scale": 1.0}]}

    def client(seed: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    for _ in range(60):  # one request, retried on a 5xx or a dropped connection
                        try:
                            r = c.post("/v1/edits", json={**edit, "seed": seed})
                            if r.status_code == 200:
                                node = json.loads(r.headers["X-Edit-Meta"])["node"]
                                answered.append((time.monotonic(), node))
                                break
                            assert r.status_code >= 500, r.text  # a 4xx would be this test's mistake
                        except httpx.TransportError:
                            pass
                        retries.append(seed)
                        time.sleep(0.5)
                    else:
                        answered.append((time.monotonic(), None))  # lost: 60 tries without an image
        except Exception as err:  # the test fails on it, not a silent thread
            errors.append(repr(err))

    def running() -> int:
        app = serve.status().applications.get(cfg.name)
        return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values()) if app else 0

    def nodes_since(at: float) -> set:
        return {node for t, node in answered if t > at and node}

    try:
        deadline = time.monotonic() + 240
        while running() < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert running() == 2
        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(4)]
        for t in threads:
            t.start()
        while len(nodes_since(0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # both replicas have answered: they are on two nodes
        assert len(nodes_since(0)) == 2, answered
        pids, dead = kill_a_node_running(cluster, "ServeReplica")
        assert pids, "no worker node ran a replica"
        assert dead in nodes_since(0)
        while running() == 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # Serve notices the lost replica
        lost_at = time.monotonic()
        while running() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # and starts another
        back_at = time.monotonic()
        while not nodes_since(back_at) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # a few more requests on the recovered deployment
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in threads), errors
        assert lost_at < back_at < deadline and running() == 2  # the lost replica is back
        assert answered and all(node for _, node in answered), f"requests lost: {answered}"
        assert nodes_since(back_at) and dead not in nodes_since(lost_at), (nodes_since(lost_at), dead)
    finally:
        stop.set()
        serve.shutdown()


@pytest.mark.parametrize(
    "module, heavy",
    [
        ("noiseclr.training.distributed", ("diffusers", "transformers")),
        ("noiseclr.data.ray_input", ("torch",)),
    ],
)
def test_what_rays_helper_processes_unpickle_imports_no_heavy_library(module, heavy):
    """Ray Train's controller actor unpickles `train_loop_per_worker` (training.distributed), and
    Ray Data's dataset manager, split coordinator and decode actor the pipeline's stages
    (data.ray_input): diffusers and transformers in the one, torch in the others, would cost each
    run's processes seconds of CPU (and torch 180 MB each) before any worker steps. The workers
    and the VAE actor import them where they use them."""
    code = f"import sys, {module}; print(sorted(set({heavy!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_a_cpu_worker_does_not_compile_deepspeeds_shared_memory_op(monkeypatch):
    """DeepSpeed's CPU comm backend would JIT-compile its shm all-reduce op (about 30 s of g++ on
    a machine's first run, and a toolchain on every CPU node) though training never calls it: the
    engine marks it unavailable first, and DeepSpeed's own builder then returns none."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from noiseclr.training.distributed import _without_shm_comm_op

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed builds the shm op only on its CPU accelerator")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)  # restored after
    _without_shm_comm_op()
    assert build_shm_op() is None


def test_a_result_without_its_checkpoint_resumes_from_the_newest_in_storage(tmp_path):
    """Ray Train's Result may name no checkpoint when the run ended before its controller
    registered the last one (seen on ray 2.60): the newest readable TrainState is taken."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from noiseclr.training.distributed import newest_checkpoint

    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 4), ("checkpoint_c", None)):
        (tmp_path / name).mkdir()
        if step is not None:  # checkpoint_c: cut short, no state.json
            (tmp_path / name / "state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint_d.json").write_text("{}")  # not a folder
    local = pafs.LocalFileSystem()
    found = newest_checkpoint(SimpleNamespace(filesystem=local, path=str(tmp_path)))
    assert Path(found.path).name == "checkpoint_b"
    with pytest.raises(RuntimeError, match="none is readable"):
        newest_checkpoint(SimpleNamespace(filesystem=local, path=str(tmp_path / "checkpoint_c")))


def test_a_users_error_in_a_worker_reaches_the_command_as_its_own_one_line():
    """Ray Train raises a WorkerGroupError holding each failed worker's exception (Ray's task
    error wrapping the original): the workflow raises the original, which the CLI prints as one
    line, instead of Ray's traceback (a diverged run, found on a worker)."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from noiseclr.errors import TrainingDiverged
    from noiseclr.training.distributed import worker_user_error

    diverged = TrainingDiverged("loss is nan at step 4; stopped. Last good checkpoint: step 4")
    try:
        raise diverged
    except TrainingDiverged as err:
        wrapped = RayTaskError("train_fn", "Traceback ...", err).as_instanceof_cause()
    failed = WorkerGroupError("Training failed", {0: ValueError("rank 0 saw the peer go"), 1: wrapped})
    assert worker_user_error(failed) is diverged
    assert worker_user_error(WorkerGroupError("Training failed", {0: ValueError("a bug")})) is None


def test_placement_counts_what_each_node_can_hold_under_each_strategy():
    from noiseclr.training.distributed import placeable

    nodes = [{"CPU": 0.0}, {"CPU": 3.0}, {"CPU": 3.0, "GPU": 1.0}]
    assert placeable(nodes, {"CPU": 1.0}, 6, "PACK") and not placeable(nodes, {"CPU": 1.0}, 7, "PACK")
    assert placeable(nodes, {"CPU": 1.0}, 2, "STRICT_SPREAD")
    assert not placeable(nodes, {"CPU": 1.0}, 3, "STRICT_SPREAD")  # the head holds none
    assert placeable(nodes, {"CPU": 1.0}, 3, "STRICT_PACK") and not placeable(
        nodes, {"CPU": 1.0}, 4, "STRICT_PACK"
    )
    assert placeable(nodes, {"GPU": 1.0}, 1, "PACK") and not placeable(nodes, {"GPU": 1.0}, 2, "SPREAD")
    assert not placeable([{"CPU": 8.0}], {"GPU": 1.0}, 1, "PACK")  # GPUs on a CPU-only cluster


def test_workers_the_cluster_cannot_hold_stop_in_one_line_after_the_bounded_wait(cluster, tmp_path):
    """Fault table: Ray Train would wait without end for a worker group the cluster cannot
    place; the job waits distributed.resource_wait_s for nodes to join, then names what it asked
    and what the cluster has, before any worker starts or any data is read."""
    started = time.monotonic()
    job = cfg(workers=4, placement_strategy="STRICT_SPREAD", resource_wait_s=2)
    with pytest.raises(ConfigError, match=r"4 workers of CPU 1 each \(STRICT_SPREAD\) do not fit") as err:
        run_discovery(job, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and re.search(r"CPU \d+ in all, at most 3 on a node", message)
    assert "waited 2 s" in message and "distributed.resource_wait_s" in message
    assert time.monotonic() - started < 60
    assert not list((tmp_path / "out").glob("ray/*"))  # no Ray Train run was started


def test_a_worker_killed_for_memory_ends_in_one_line_naming_the_knobs():
    """Fault table: after Ray Train's restarts (distributed.max_failures) a worker that ran out of
    memory (Ray's memory monitor, the kernel's OOM killer as Ray reports it, or CUDA's
    allocator) ends the command with one line naming memory and what lowers it."""
    from ray.exceptions import OutOfMemoryError, RayTaskError
    from ray.train import WorkerGroupError

    from noiseclr.errors import OutOfMemory
    from noiseclr.training.distributed import worker_user_error

    ray_oom = OutOfMemoryError(
        "Task was killed due to the node running low on memory.\nMemory on the node ..."
    )
    try:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.cuda.OutOfMemoryError as err:
        cuda_oom = RayTaskError("train_fn", "Traceback ...", err).as_instanceof_cause()
    for failure in (ray_oom, cuda_oom):
        found = worker_user_error(
            WorkerGroupError("Training failed", {0: ValueError("peer gone"), 1: failure})
        )
        assert isinstance(found, OutOfMemory), failure
        message = str(found)
        assert (
            "\n" not in message and "ran out of memory" in message and "distributed.max_failures" in message
        )
        assert all(k in message for k in ("method.batch", "method.negatives", "run.gradient_checkpointing"))
    assert worker_user_error(WorkerGroupError("Training failed", {0: ValueError("a bug")})) is None
    died = RuntimeError(
        "The actor died unexpectedly before finishing this task. Some common causes include: (1) the "
        "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, "
        "or (3) the worker crashed unexpectedly due to SIGSEGV or other unexpected errors."
    )
    assert worker_user_error(WorkerGroupError("Training failed", {0: died})) is None  # not called memory


def test_a_storage_or_data_bucket_that_does_not_exist_stops_in_one_line_before_any_worker(
    cluster, s3_server, tmp_path
):
    """Fault table: the checkpoint storage and the data URI are checked on the driver, before a
    worker starts or a GPU is held: one line naming the URI and the cause."""
    from noiseclr.errors import DataError, StorageError

    options = s3_options(s3_server)
    job = cfg(workers=2, storage_path="s3://no-such-bucket/ray", storage_options=options)
    with pytest.raises(
        StorageError, match=r"storage\.path 's3://no-such-bucket/ray' cannot be written \(.*\)"
    ) as err:
        run_discovery(job, tmp_path / "a")
    assert "\n" not in str(err.value) and "bucket" in str(err.value).lower()
    assert not list((tmp_path / "a").glob("ray/*"))
    with pytest.raises(DataError, match=r"image folder 's3://no-such-bucket/imgs' does not exist"):
        run_discovery(
            cfg(workers=2, data="s3://no-such-bucket/imgs", storage_options=options), tmp_path / "b"
        )


def test_an_sdxl_job_on_two_workers_gives_the_single_process_bank(cluster, tmp_path):
    """SDXL's pairs on Ray Train + DeepSpeed ZeRO-3 workers with gradient accumulation, its latents
    streamed by Ray Data from a folder: the bank of the single process at the same grad_accum,
    both encoders' halves included."""
    from PIL import Image

    from noiseclr.models.standin import write_sdxl

    folder = write_sdxl(tmp_path / "sdxl")
    data = tmp_path / "images"
    data.mkdir()
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(4, seed=7), 64))):
        Image.fromarray(px).save(data / f"i{i}.png")
    job = dict(
        model=str(folder), data=str(data), steps=3, checkpoint_every=3, grad_accum=2, gallery_prompt="a shape"
    )
    single = run_discovery(cfg(**job), tmp_path / "single")
    ray_job = cfg(**job, workers=2, zero_stage=3, placement_strategy="STRICT_SPREAD")
    result = run_discovery(ray_job, tmp_path / "ray")
    bank = DirectionBank.load(result.bank)
    assert result.workers == 2 and bank.metrics["world"] == 2 and bank.base_model["family"] == "sdxl"
    assert bank.config["grad_accum"] == 2 and bank.metrics["nodes"] == 2
    assert bank.directions.shape[1] == 80
    same_bank(result.bank, single.bank)
