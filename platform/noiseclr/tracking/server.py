"""A real MLflow tracking server on this machine: SQLite backend store, artifacts in a folder or
an S3-compatible bucket, bound to 127.0.0.1.

    noiseclr mlflow up --root out/mlflow            # http://127.0.0.1:5000, Ctrl-C stops it

`MlflowServer` is the same thing as a context manager, for tests and scripts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from noiseclr.errors import StorageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(root: Path, port: int, artifacts_destination: str | None, workers: int = 1) -> list[str]:
    """The `mlflow server` command line: SQLite store under root, proxied artifact storage."""
    root.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{(root / 'mlflow.db').resolve()}",
        "--artifacts-destination",
        artifacts_destination or str((root / "artifacts").resolve()),
        "--workers",
        str(workers),
    ]


class MlflowServer:
    """Start `mlflow server` in its own process group; wait until /health answers; stop it."""

    def __init__(
        self,
        root: str | Path,
        port: int | None = None,
        artifacts_destination: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
    ):
        if shutil.which("mlflow") is None and not _importable("mlflow"):
            raise StorageError("mlflow is not installed (pip install 'noiseclr[track]')")
        self.root, self.port = Path(root), port or free_port()
        self.artifacts_destination, self.timeout = artifacts_destination, timeout
        # MLflow 3's server also starts a job runner (a dozen worker processes for GenAI
        # evaluation jobs) that tracking does not use: off unless the caller asks for it.
        self.env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "server.log").open("ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                server_command(self.root, self.port, self.artifacts_destination),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its gunicorn/uvicorn workers stop with it
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StorageError(
                    f"mlflow server exited ({self.proc.returncode}); see {self.root / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise StorageError(f"mlflow server did not answer on {self.uri} in {self.timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
