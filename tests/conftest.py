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
    from noiseclr.models.loader import load_model

    return load_model("shapes", device="cpu")
