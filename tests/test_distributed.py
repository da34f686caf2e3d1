"""Distributed discovery on a real local Ray cluster: two CPU workers over gloo running DeepSpeed
(its CPU accelerator), Ray Data streaming, checkpoints, a killed worker, and an S3 bucket on a
real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from noiseclr.discovery.bank import DirectionBank  # noqa: E402
from noiseclr.discovery.config import DiscoveryConfig  # noqa: E402
from noiseclr.domains import shapes  # noqa: E402
from noiseclr.training.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    os.environ["DS_ACCELERATOR"] = "cpu"
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


def cfg(**kw) -> DiscoveryConfig:
    # N == global batch: every step sees every image, whichever worker holds it.
    base = dict(k=4, negatives=2, batch=4, n_images=4, steps=4, checkpoint_every=2, name="d", max_failures=1)
    return DiscoveryConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """One worker, no ZeRO: the single-process result."""
    out = tmp_path_factory.mktemp("ref")
    result = run_distributed(cfg(zero_stage=0), out, workers=1)
    return DirectionBank.load(result["bank"]), out / "data"


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_with_zero_match_one_process(reference, tmp_path, stage):
    ref, data = reference
    result = run_distributed(cfg(zero_stage=stage, data=str(data)), tmp_path, workers=2)
    bank = DirectionBank.load(result["bank"])
    assert result["steps"] == 4 and bank.metrics["world"] == 2
    torch.testing.assert_close(bank.directions, ref.directions, atol=2e-5, rtol=1e-4)
    assert not torch.equal(bank.directions, torch.zeros_like(bank.directions))


def test_killed_worker_resumes_from_the_last_checkpoint(reference, tmp_path):
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
    long = dict(zero_stage=2, data=str(data), steps=30, checkpoint_every=5)
    result = run_distributed(cfg(**long), tmp_path, workers=2, storage_path=str(storage))
    thread.join(timeout=5)
    assert "pid" in killed, "the test did not manage to kill a worker"
    assert result["steps"] == 30
    straight = run_distributed(cfg(**long), tmp_path / "straight", workers=2)
    # No step lost or repeated: the resumed run ends exactly where the uninterrupted one does.
    torch.testing.assert_close(
        DirectionBank.load(result["bank"]).directions,
        DirectionBank.load(straight["bank"]).directions,
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "endpoint_url": f"http://{host}:{port}",
        "key": "test",
        "secret": "test",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    server.stop()


def test_s3_bucket_with_corrupt_files_trains_end_to_end(cluster, s3_server, tmp_path):
    import boto3
    import s3fs

    boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket="shapes-bucket")
    fs = s3fs.S3FileSystem(**s3_server)
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(4, seed=9)))):
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        fs.pipe(f"shapes-bucket/imgs/{i}.png", buf.getvalue())
    fs.pipe("shapes-bucket/imgs/broken.png", b"\x89PNG\r\n\x1a\n garbage")
    fs.pipe("shapes-bucket/imgs/empty.jpg", b"")
    # Data and Ray Train checkpoints both on the S3 server, options from the job config.
    job = cfg(
        zero_stage=2,
        data="s3://shapes-bucket/imgs",
        n_images=6,
        steps=2,
        checkpoint_every=1,
        storage_path="s3://shapes-bucket/ray",
        storage_options=s3_server,
    )
    result = run_distributed(job, tmp_path, workers=2)
    assert result["corrupt_images"] == 2
    bank = DirectionBank.load(result["bank"])
    assert bank.metrics["corrupt_images"] == 2 and bank.metrics["files"] == 6 and bank.metrics["steps"] == 2
    fs.invalidate_cache()
    saved = fs.glob("shapes-bucket/ray/**/state.safetensors")
    assert saved, "no checkpoint reached the bucket"
    assert not (tmp_path / "ray").exists()
