"""Distributed discovery on a real local Ray cluster: two CPU workers over gloo running DeepSpeed
(its CPU accelerator), Ray Data streaming, checkpoints, a killed worker, and an S3 bucket on a
real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from noiseclr.discovery.bank import DirectionBank  # noqa: E402
from noiseclr.discovery.config import DiscoveryConfig  # noqa: E402
from noiseclr.domains import shapes  # noqa: E402
from noiseclr.errors import ConfigError  # noqa: E402
from noiseclr.workflows.discover import run_discovery  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    # The S3 test server's credentials reach the workers as a cluster's would: in the environment.
    env = {"DS_ACCELERATOR": "cpu", "NOISECLR_TEST_S3_KEY": "test", "NOISECLR_TEST_S3_SECRET": "test"}
    os.environ.update(env)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


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
    return DiscoveryConfig(**{**base, **kw})


def same_bank(a, b) -> None:
    torch.testing.assert_close(
        DirectionBank.load(a).directions, DirectionBank.load(b).directions, atol=2e-5, rtol=1e-4
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single process: its bank and the world it wrote."""
    out = tmp_path_factory.mktemp("ref")
    result = run_discovery(cfg(), out)
    assert result.workers == 0
    return result.bank, str(out / "data")


@pytest.mark.parametrize("stage, accum", [(2, 1), (3, 2)])
def test_the_same_job_on_two_workers_gives_the_single_process_bank(
    cluster, reference, tmp_path, stage, accum
):
    ref, data = reference
    if accum != 1:  # the single process at this grad_accum, for the comparison
        ref = run_discovery(cfg(grad_accum=accum, data=data), tmp_path / "single").bank
    result = run_discovery(cfg(workers=2, zero_stage=stage, grad_accum=accum, data=data), tmp_path / "ray")
    assert result.workers == 2 and result.steps == 4
    bank = DirectionBank.load(result.bank)
    assert bank.metrics["world"] == 2 and bank.config["grad_accum"] == accum
    same_bank(result.bank, ref)
    assert result.gallery.exists() and result.html.exists()  # the same outputs as the single process
    assert (tmp_path / "ray" / "checkpoints" / "step-0000004" / "state.json").exists()


def test_a_single_process_checkpoint_resumes_on_workers_and_a_changed_config_is_refused(
    cluster, reference, tmp_path
):
    ref, data = reference
    run_discovery(cfg(steps=2, data=data), tmp_path)  # stops at step 2: OUT/checkpoints/step-0000002
    with pytest.raises(ConfigError, match=r"tau: 0\.5 -> 0\.4"):
        run_discovery(cfg(workers=2, tau=0.4, data=data), tmp_path)
    result = run_discovery(cfg(workers=2, data=data), tmp_path)
    assert result.resumed_from.name == "step-0000002" and result.steps == 4
    same_bank(result.bank, ref)


def test_killed_worker_resumes_from_the_last_checkpoint(cluster, reference, tmp_path):
    _, data = reference
    storage = tmp_path / "ray"
    killed = {}

    def kill_one_worker():
        import psutil

        deadline = time.time() + 300
        while time.time() < deadline:
            if any(storage.rglob("checkpoint_*")):
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed["pid"] = proc.info["pid"]
                        return
            time.sleep(0.2)

    thread = threading.Thread(target=kill_one_worker, daemon=True)
    thread.start()
    long = dict(workers=2, zero_stage=2, data=data, steps=30, checkpoint_every=5)
    result = run_discovery(cfg(**long, storage_path=str(storage)), tmp_path / "killed")
    thread.join(timeout=5)
    assert "pid" in killed, "the test did not manage to kill a worker"
    assert result.steps == 30
    straight = run_discovery(cfg(**long), tmp_path / "straight")
    # No step lost or repeated: the resumed run ends exactly where the uninterrupted one does.
    same_bank(result.bank, straight.bank)


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
        storage_options={
            **s3_server,
            "key": "${NOISECLR_TEST_S3_KEY}",
            "secret": "${NOISECLR_TEST_S3_SECRET}",
        },
        tracking_uri=mlflow_server.uri,  # rank 0 logs the steps live, the driver the rest
        experiment="distributed",
        register_bank=False,
    )
    with pytest.raises(ValueError, match=r"storage_options\.key looks like a credential"):
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
