"""MLflow tracking of a discovery run: the one place the workflow talks to MLflow.

With no tracking URI (config `tracking.uri`, else $MLFLOW_TRACKING_URI) nothing is tracked and
mlflow need not be installed. Otherwise each run logs its full config as params; per step the
loss, step time and throughput (pairs/s, images/s); the data counts and the evaluation's scores;
the bank, gallery and evaluation page as artifacts; tags (base-model fingerprint, data URI and
content hash, git commit); and registers the bank as a model version (`registry.log_bank`). The
distributed path trains on Ray workers; the driver, which holds the result, is the only process
that logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.errors import StorageError, TrackingUnreachable
from noiseclr.utils.configfile import resolve_env

log = logging.getLogger(__name__)

# What MLflow's HTTP client says when nothing answers (as opposed to an answer that refuses).
UNREACHABLE = (
    "Max retries exceeded",
    "Connection refused",
    "Failed to establish a new connection",
    "timed out",
    "Name or service not known",
    "Temporary failure in name resolution",
)


def answer_wait_s() -> float:
    """How long a job waits for its tracking server to answer at all ($NOISECLR_TRACKING_WAIT_S,
    default 10 s) before it trains without it; 0: it does not ask first (MLflow's client then
    retries as it is set to)."""
    raw = os.environ.get("NOISECLR_TRACKING_WAIT_S", "10")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StorageError(f"NOISECLR_TRACKING_WAIT_S must be a number of seconds >= 0, got {raw!r}")
    return seconds


# What a proxy answers for a backend that is down; MLflow's client retries these through the same
# backoff as a server that does not answer, so they count as no answer.
PROXY_DOWN = (502, 503, 504)


def unanswered(uri: str, seconds: float) -> str | None:
    """Why the server at `uri` gave no answer within `seconds` (asked about once a second), or
    None when it answered: any status but a proxy's 502/503/504 (a refusal is MLflow's client's
    to explain), a redirect (not followed: a login gateway's page may be elsewhere) or a TLS
    handshake (certificates are MLflow's client's to check, with its settings). Asked through
    requests, as MLflow's client asks (the same proxy settings). Only http(s) URIs are servers.

    Why ask first: MLflow's client retries a server that does not answer for about four minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES' backoff) and a job asks at its start and at its end, so a
    wrong or down server held a job about eight minutes. (A resolver that hangs can hold one
    attempt past `seconds`.)"""
    import urllib.parse
    import warnings

    import requests

    if seconds <= 0 or not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no user:password@
    deadline, why = time.monotonic() + seconds, "no attempt"
    while True:
        timeout = max(0.5, min(5.0, deadline - time.monotonic()))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # verify=False: whether it answers, nothing more
                reply = requests.get(url, timeout=timeout, allow_redirects=False, verify=False)
            reply.close()
            if reply.status_code not in PROXY_DOWN:
                return None
            why = f"HTTP {reply.status_code}: a proxy answers for it"
        except requests.exceptions.SSLError:
            return None  # a TLS handshake: a server is there
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
            found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))  # urllib3 wraps the OS's reason
            why = found.group(0) if found else type(err).__name__
        except requests.exceptions.RequestException:
            return None  # a malformed URI (say its port): MLflow's client says what is wrong
        if time.monotonic() + 1 > deadline:
            return why
        time.sleep(1)


def tracking_uri(cfg: DiscoveryConfig) -> str | None:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


@contextmanager
def tracked_run(
    cfg: DiscoveryConfig,
    run_name: str,
    parent: str | None = None,
    run_id: str | None = None,
    defer: bool = False,
) -> Iterator[object | None]:
    """An active MLflow run for the job (a child of run `parent` when given; run `run_id` continued
    when given), or None without a tracking URI. With `defer`, a server that does not answer at
    the start is not an error: a warning, and None (the job trains untracked; the caller logs
    the run when the server answers)."""
    uri = tracking_uri(cfg)
    if not uri:
        yield None
        return
    try:
        import mlflow
    except ImportError:
        raise StorageError(
            "a tracking URI is set (tracking.uri or $MLFLOW_TRACKING_URI) but mlflow is not installed "
            "(pip install mlflow)"
        ) from None
    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in this process's environment: put
    # back what was there after the run, or a later untracked job in the same process (a
    # notebook, a test session) would be tracked to this run's server.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        with ExitStack() as stack:
            try:
                run = stack.enter_context(_run(cfg, uri, run_name, parent, run_id))
            except TrackingUnreachable as err:
                if not defer:
                    raise
                log.warning("%s: training without it; the run is logged at the end if it answers then", err)
                run = None
            yield run
    finally:
        mlflow.set_tracking_uri(before)


@contextmanager
def _run(cfg: DiscoveryConfig, uri: str, run_name: str, parent: str | None, run_id: str | None):
    import mlflow

    if uri.startswith(("http://", "https://")) and (why := unanswered(uri, wait := answer_wait_s())):
        raise TrackingUnreachable(f"MLflow at {uri} did not answer within {wait:g} s ({why})")
    try:
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
    except Exception as err:  # server down, wrong URI: say so before training, not after
        text = str(err)
        # Only a server that does not answer may be waited for (`defer`); a refusal (credentials,
        # permissions, a bad experiment) would otherwise surface after the whole run.
        unreachable = any(sign in text for sign in UNREACHABLE)
        raise (TrackingUnreachable if unreachable else StorageError)(
            f"MLflow at {uri} is not reachable or refused experiment {cfg.tracking.experiment!r}: {err}"
        ) from None
    if run_id:  # a sweep trial's next milestone: the same run goes on
        run = mlflow.start_run(run_id=run_id)
    else:
        exp = experiment.experiment_id
        run = mlflow.start_run(run_name=run_name, experiment_id=exp, parent_run_id=parent)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception as err:  # the server went away (end_run has let go of the run already)
            log.error("could not mark MLflow run %s %s (%s)", run.info.run_id, status, err)


def step_metrics(cfg: DiscoveryConfig, h: dict, now: int) -> list:
    """MLflow metrics of one training step: loss, step time, pairs/s and images/s."""
    from mlflow.entities import Metric

    step = int(h["step"])
    out = [Metric("loss", float(h["loss"]), now, step)]
    if h.get("seconds"):  # older checkpoints' history has no step times
        pairs = (
            cfg.method.batch * cfg.method.directions_per_step * cfg.optim.grad_accum
        )  # (image, direction) pairs a step
        seconds = float(h["seconds"])
        out.append(Metric("step_seconds", seconds, now, step))
        out.append(Metric("pairs_per_s", pairs / seconds, now, step))
        out.append(Metric("images_per_s", cfg.method.batch * cfg.optim.grad_accum / seconds, now, step))
    return out


class LiveMetrics:
    """Per-step metrics sent to the run while training goes on: buffered, sent in batches from a
    background thread every `interval` seconds, so a slow or absent tracking server never holds a
    step up. A batch that fails stays buffered and is sent when the server answers again;
    `sent_through` is the last step whose metrics all reached it (the end-of-run logging sends
    the rest)."""

    def __init__(self, cfg: DiscoveryConfig, run_id: str, interval: float = 2.0):
        import threading

        from mlflow import MlflowClient

        self.cfg, self.run_id, self.interval = cfg, run_id, interval
        self.client = MlflowClient()
        self.pending: list = []  # FIFO of Metric, in step order
        self.sent_through = 0
        self.failing = False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-live", daemon=True)
        self._thread.start()

    def step(self, h: dict) -> None:
        with self._lock:
            self.pending += step_metrics(self.cfg, h, int(time.time() * 1000))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; False (and kept) when the server does not take it."""
        while True:
            with self._lock:
                batch = self.pending[:1000]  # the batch limit of log_batch
            if not batch:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # down, restarting, unreachable: keep it for the next try
                if not self.failing:
                    log.warning("MLflow did not take the live metrics (%s); buffering them", err)
                self.failing = True
                return False
            with self._lock:
                del self.pending[: len(batch)]
                following = self.pending[0].step if self.pending else None
                last = batch[-1].step
                self.sent_through = last if following != last else last - 1
            if self.failing:
                log.warning("MLflow answers again: buffered metrics sent")
            self.failing = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and try once more; what is still unsent is left to the caller."""
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.flush()


def params(cfg: DiscoveryConfig) -> dict[str, str]:
    """The whole config as MLflow params (lists and mappings as JSON)."""
    out = {}
    for key, value in cfg.record().items():
        out[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    return out


def data_hash(uri: str, storage_options: dict | None = None) -> str:
    """sha256 over every image file's name, size and content checksum: a file's bytes where it
    is local, the store's own checksum (S3 ETag) where it is remote."""
    import fsspec

    from noiseclr.data.images import IMAGE_SUFFIXES

    fs, root = fsspec.core.url_to_fs(uri, **resolve_env(storage_options or {}))
    h = hashlib.sha256()
    for path, info in sorted(fs.find(root, detail=True).items()):
        if not path.lower().endswith(IMAGE_SUFFIXES):
            continue
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,))
        digest = hashlib.sha256(fs.cat_file(path)).hexdigest() if local else str(info.get("ETag", ""))
        h.update(f"{os.path.relpath(path, root)}\0{info.get('size')}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_discovery(
    cfg: DiscoveryConfig, result, history: list[dict], data: str, evaluation: dict | None, since: int = 0
) -> None:
    """Everything a finished discovery run records (the active run must be its run). `since`: the
    last step already logged (by the call this one resumed from, or live during training)."""
    import mlflow

    from noiseclr.bank import DirectionBank
    from noiseclr.tracking.registry import log_bank

    bank = DirectionBank.load(result.bank)
    run_id = mlflow.active_run().info.run_id
    if not mlflow.MlflowClient().get_run(run_id).data.params:  # a continued run keeps its first config
        mlflow.log_params(params(cfg))
    tags = {
        "base_model.source": str(bank.base_model.get("source")),
        "base_model.fingerprint": str(bank.base_model.get("fingerprint")),
        "data.uri": data,
        "data.sha256": data_hash(data, cfg.storage.options),
        "workers": str(result.workers),
    }
    if commit := git_commit():
        tags["git.commit"] = commit
    if result.resumed_from:
        tags["resumed_from"] = str(result.resumed_from)
    mlflow.set_tags(tags)
    now = int(time.time() * 1000)
    steps = [m for h in history if h["step"] > since for m in step_metrics(cfg, h, now)]
    for start in range(0, len(steps), 1000):  # the batch limit of log_batch
        mlflow.MlflowClient().log_batch(run_id, metrics=steps[start : start + 1000])
    figures = {
        "images": result.images,
        "corrupt_images": result.corrupt_images,
        "seconds": result.seconds,
        "steps": result.steps,
        **{k: bank.metrics[k] for k in ("final_loss", "param_mib") if bank.metrics.get(k) is not None},
        "run_pairs_per_s": bank.metrics.get("pairs_per_s"),  # the whole run's mean
    }
    if evaluation:
        figures.update(alignment=evaluation["alignment"], coverage=evaluation["coverage_count"])
        low, high = evaluation["scores"]["all"]["intervals"]["alignment"]
        figures.update(alignment_low=low, alignment_high=high)
        figures.update({f"alignment.{name}": s["alignment"] for name, s in evaluation["scores"].items()})
    if bank.scores is not None:  # the oracle-free measurement, on any domain
        from noiseclr.evaluation.blind import OBJECTIVE

        s = bank.scores
        figures.update(score=s.score, live_directions=s.live, dead_directions=s.dead)
        figures.update(distinct_live=s.distinct_live, score_low=s.interval[0], score_high=s.interval[1])
        figures.update({f"bank.{name}": f.value for name, f in (s.aggregates or {}).items()})
        if objective := (s.aggregates or {}).get(OBJECTIVE):  # what a sweep maximises off the oracle
            figures.update(objective=objective.value)
            figures.update(objective_low=objective.interval[0], objective_high=objective.interval[1])
        figures.update({f"direction_score.{d.index}": d.score for d in s.directions})
    mlflow.log_metrics({k: float(v) for k, v in figures.items() if v is not None}, step=result.steps)
    for folder in ("gallery", "evaluation"):
        path = Path(result.bank).parent / folder
        if path.exists():
            mlflow.log_artifacts(str(path), artifact_path=folder)
    if cfg.tracking.register_bank:  # the bank as a model, registered as a new version
        log_bank(result.bank, cfg.tracking.registered_model, cfg.tracking.alias)
    else:  # the files only (a sweep's trials: the best one is registered at the end)
        mlflow.log_artifacts(str(result.bank), artifact_path="bank")
