"""Submit a job YAML to a Ray cluster through Ray's Jobs API, and follow, inspect or stop it.

    noiseclr submit jobs/sd15-faces-6gpu.yaml --address http://HEAD:8265

The YAML declares what runs (`kind: discover`, `kind: sweep` or `kind: serve`). It is validated
here, before anything is sent; then the working folder (default the current one, without .git,
.venv, out/ and what .gitignore names) travels as the job's `working_dir`, and the entry point is
the same `noiseclr` command one would type on a laptop, run on the cluster's image. The cluster
needs the platform installed (cluster/image).

Ray's token authentication: set RAY_AUTH_MODE=token and give the cluster's token in
$RAY_AUTH_TOKEN or ~/.ray/auth_token, as for `ray job submit`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from noiseclr.errors import ConfigError, UserError
from noiseclr.utils.configfile import read_mapping

Kind = Literal["discover", "sweep", "serve"]
# Never uploaded: repository metadata, environments, outputs and caches.
EXCLUDES = [".git", ".venv", "out", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
log = logging.getLogger(__name__)


class SubmitError(UserError, RuntimeError):
    """The cluster cannot be reached, refused the job, or does not know the job id."""


@dataclass(frozen=True)
class Job:
    """What `submit` sends: validated config, entry point and runtime_env."""

    kind: Kind
    name: str
    entrypoint: str
    runtime_env: dict
    submission_id: str
    # Ray Train workers that may use GPUs: the driver should have a GPU too (`--gpus 1`), or
    # on a cluster that scales GPU nodes from zero the workers find none and train on CPUs.
    driver_gpu_advised: bool = False


KINDS: tuple[Kind, ...] = get_args(Kind)


def job_kind(values: dict, path: Path) -> Kind:
    """The command a job YAML declares (`kind`), never guessed from its keys."""
    kind = values.get("kind")
    if kind in KINDS:
        return kind
    if kind is None:
        raise ConfigError(
            f"job {path} declares no kind: add `kind: discover`, `kind: sweep` or `kind: serve` at "
            "its top (`noiseclr config migrate` rewrites a flat discovery file in sections)"
        )
    raise ConfigError(f"job {path}: kind {kind!r} is unknown: use one of {', '.join(KINDS)}")


def validate(path: Path) -> tuple[Kind, object]:
    """Kind and config of the job at `path`, validated with its own schema."""
    kind = job_kind(read_mapping(path, "job"), path)
    if kind == "sweep":
        from noiseclr.workflows.sweep import SweepConfig

        return kind, SweepConfig.from_yaml(path)[0]
    if kind == "serve":
        from noiseclr.serving.config import ServeConfig

        return kind, ServeConfig.from_yaml(path)
    from noiseclr.discovery.config import DiscoveryConfig

    return kind, DiscoveryConfig.from_yaml(path)


def parse_env(items: list[str]) -> dict[str, str]:
    """--env KEY=VALUE, or --env KEY to pass this shell's value on (never sent unless named)."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in os.environ:
                raise ConfigError(f"--env {key}: not set in this shell")
            value = os.environ[key]
        env[key] = value
    return env


def make_job(
    config: Path,
    working_dir: Path,
    out: str | None = None,
    env: dict[str, str] | None = None,
    ship_code: bool = False,
    submission_id: str | None = None,
) -> Job:
    """Validate the YAML and build the entry point and runtime_env (nothing is sent)."""
    working_dir, config = working_dir.resolve(), config.resolve()
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir} is not a folder")
    try:
        relative = config.relative_to(working_dir).as_posix()
    except ValueError:
        raise ConfigError(
            f"{config} is outside the working folder {working_dir}: it travels with the job only "
            "from inside it (run from the project folder or pass --working-dir)"
        ) from None
    kind, cfg = validate(config)
    name = cfg.name
    command = ["noiseclr", kind, "--config", relative]
    if kind != "serve":
        command += ["--out", out or f"out/{name}"]
    # Ray Data's progress bars are terminal animations: noise in a job's log file. An endpoint's
    # driver gets time to shut Serve down on `job stop` (Ray's default is 3 s, then SIGKILL).
    defaults = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if kind == "serve":
        defaults["RAY_JOB_STOP_WAIT_TIME_S"] = "60"
    runtime_env: dict = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {**defaults, **(env or {})},
    }
    if ship_code:  # this checkout's package instead of the one in the cluster's image
        import noiseclr

        runtime_env["py_modules"] = [str(Path(noiseclr.__file__).parent)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submission_id = submission_id or f"noiseclr-{kind}-{name}-{stamp}"
    advised = kind == "discover" and cfg.distributed.workers > 0 and cfg.run.device != "cpu"
    return Job(kind, name, shlex.join(command), runtime_env, submission_id, advised)


def client(address: str | None):
    """A JobSubmissionClient for `address` or $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("give --address http://HEAD:8265 (the Ray dashboard) or set RAY_API_SERVER_ADDRESS")
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as err:  # connection refused, version mismatch, authentication
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None


def auth_headers() -> dict[str, str]:
    """Ray's bearer token when RAY_AUTH_MODE=token: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token (Ray's own places). Read per call: Ray's client caches the mode at import."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if not path.is_file():
            raise SubmitError(f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or write it to {path}")
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def submit(job: Job, address: str | None, cpus: float | None = None, gpus: float | None = None) -> str:
    """Send the job; returns its submission id."""
    jobs = client(address)
    deadline = time.monotonic() + 60
    while True:
        try:
            return jobs.submit_job(
                entrypoint=job.entrypoint,
                runtime_env=job.runtime_env,
                submission_id=job.submission_id,
                metadata={"noiseclr.kind": job.kind, "noiseclr.name": job.name},
                entrypoint_num_cpus=cpus,
                entrypoint_num_gpus=gpus,
            )
        except Exception as err:
            # A head that has just started has no job agent for a few seconds: retry that only.
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(f"the cluster refused the job: {_first_line(err)}") from None


def call(jobs, method: str, job_id: str, *args):
    """One call of a JobSubmissionClient's on `job_id`, with an unknown id as a one-line error."""
    try:
        return getattr(jobs, method)(job_id, *args)
    except Exception as err:
        raise SubmitError(f"{method.replace('_', ' ')} {job_id}: {_first_line(err)}") from None


def follow(address: str | None, job_id: str, write: Callable[[str], None], poll_s: float = 2.0) -> str:
    """Stream the job's logs to `write` until it ends; returns its final status.

    The log stream closes when the job ends, or early when the connection drops (a restarted
    dashboard, a broken port-forward): then the rest of the log is polled until the job ends."""
    jobs = client(address)
    call(jobs, "get_job_status", job_id)  # an unknown id is a one-line error, not a traceback
    written = 0

    async def tail() -> None:
        nonlocal written
        async for lines in jobs.tail_job_logs(job_id):
            write(lines)
            written += len(lines)

    try:
        asyncio.run(tail())
    except Exception as err:  # the stream broke: polling below takes over
        log.warning("log stream of %s ended: %s; polling", job_id, _first_line(err))
    while True:
        status = str(call(jobs, "get_job_status", job_id).value)
        text = call(jobs, "get_job_logs", job_id)
        write(text[written:])
        written = max(written, len(text))
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
