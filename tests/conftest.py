"""Shared fixtures. Tests run on CPU with the embedded model; nothing touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never wait on the network
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_model():
    from noiseclr.models.base import load_model

    return load_model("shapes", device="cpu")


@pytest.fixture(scope="session")
def tiny_model():
    """An untrained, very small pipeline of the same classes: fast for trainer mechanics."""
    from diffusers import DDIMScheduler

    from noiseclr.domains import shapes
    from noiseclr.models.base import DiffusionModel, fingerprint
    from noiseclr.models.shapes.architecture import ArchitectureConfig, build_pipeline

    torch.manual_seed(0)
    arch = ArchitectureConfig(
        unet_channels=(16, 16, 16),
        vae_channels=(16, 16, 16),
        text_layers=1,
        text_hidden=32,
        attention_heads=4,
    )
    pipe = build_pipeline(arch, shapes.vocabulary())
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    return DiffusionModel(pipe=pipe, source="tiny", fingerprint=fingerprint(pipe), world=None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, once per test session."""
    pytest.importorskip("moto")
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


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """make(name): create a bucket on the session's S3 server."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=s3_server["key"],
        aws_secret_access_key=s3_server["secret"],
        region_name="us-east-1",
    )
    return lambda name: client.create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store, local artifacts) on 127.0.0.1, once per session."""
    pytest.importorskip("mlflow")
    from noiseclr.tracking.server import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory):
    """A Stable Diffusion 1.5-structured folder (SD's files, classes and configs: CLIP BPE
    tokenizer, 77 tokens, PNDM, 8x VAE, safety checker), tiny random weights, written once."""
    from noiseclr.models.standin import write

    return write(tmp_path_factory.mktemp("sd15") / "sd15")


@pytest.fixture(scope="session")
def sd15_model(sd15_folder):
    from noiseclr.models.base import load_model

    return load_model(str(sd15_folder), device="cpu")
