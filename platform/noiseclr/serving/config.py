"""The edit server's configuration (jobs/serve-shapes.yaml): validated, unknown keys refused."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noiseclr.errors import ConfigError
from noiseclr.utils.configfile import read_mapping, validation_message

BANK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no "/", no "..": a name, never a path


class Limits(BaseModel):
    """Caps on what one request may ask for; beyond them the request is a 4xx, not work."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_body_bytes: int = Field(8_000_000, ge=1024)
    max_pixels: int = Field(4_194_304, ge=64 * 64)  # an upload's width x height (header checked first)
    max_edits: int = Field(16, ge=1)  # directions in one request
    max_steps: int = Field(100, ge=2)
    max_scale: float = Field(8.0, gt=0)  # |scale| in the bank's units
    max_prompt_chars: int = Field(300, ge=1)
    max_label_chars: int = Field(80, ge=1)


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_batch_size: int = Field(8, ge=1)  # requests joined into one batched sampling call
    batch_wait_timeout_s: float = Field(0.05, ge=0)


class Replicas(BaseModel):
    """Ray Serve deployment settings; num_replicas "auto" autoscales between min and max."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_replicas: int | Literal["auto"] = "auto"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(32, ge=1)  # beyond it: 503 with Retry-After, not a longer queue
    retry_after_s: float = Field(2, ge=0)
    # A replica answers 503 at once to an edit it expects to finish later than this (its backlog
    # in UNet work, at its measured speed; serving/admission.py); None: no bound but the queue's.
    latency_bound_s: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(3, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # default: num_cpus (at least 1)

    @model_validator(mode="after")
    def _check(self) -> Replicas:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["serve"] = "serve"
    model: str = "shapes"  # the embedded model, or a diffusers folder / hub id
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # name -> bank folder or models:/NAME@ALIAS (a relative folder is relative to the config file)
    banks: dict[str, str]
    tracking_uri: str | None = None  # for models:/ banks; else $MLFLOW_TRACKING_URI
    host: str = "127.0.0.1"  # loopback unless configured
    port: int = Field(8000, ge=1, le=65535)
    # Where Serve runs its HTTP proxies: EveryNode (each node with a replica answers on host:port,
    # for a load balancer in front), HeadOnly (one entry point; also what several Ray nodes on one
    # host need, as they cannot all bind one port), Disabled (handles only, no HTTP).
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    route_prefix: str = "/"
    name: str = Field("noiseclr-edit", pattern=r"^[A-Za-z0-9_-]+$")
    # API keys: comma-separated in this environment variable. Unset or empty: no key needed.
    api_keys_env: str = "NOISECLR_API_KEYS"
    # Without keys the server only binds a loopback host, unless this says anonymous use is meant.
    allow_anonymous: bool = False
    # Human labels set through the API (an overlay: bank files are never rewritten).
    labels_dir: str = "out/serve/labels"
    default_steps: int = Field(20, ge=2)
    default_inversion_steps: int = Field(50, ge=2)
    # Banks given as models:/NAME@ALIAS are re-resolved this often; a moved alias (e.g. `noiseclr
    # banks promote`) reloads that bank on every replica without a restart. 0: never.
    alias_poll_s: float = Field(30, ge=0)
    # Leave out the directions the bank's oracle-free measurement found dead: not listed, and
    # an edit naming one is a 404. Off: they are listed last and the page folds them away.
    hide_dead: bool = False
    thumbnail_scales: list[float] = Field(default_factory=lambda: [-2.0, 0.0, 2.0])
    thumbnail_steps: int = Field(15, ge=2)
    # A bank's thumbnails render in chunks of directions: at most this many UNet rows per call
    # (a K = 100 bank is then many small calls, not one that holds hundreds of rows).
    thumbnail_max_rows: int = Field(48, ge=2)
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    replicas: Replicas = Field(default_factory=Replicas)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        import re

        if not self.banks:
            raise ValueError("banks must name at least one bank (name: folder or models:/...)")
        for name in self.banks:
            if not re.match(BANK_NAME, name):
                raise ValueError(f"bank name {name!r}: letters, digits, '_', '-', '.' only")
        from noiseclr.utils.configfile import URI_PASSWORD

        if self.tracking_uri and URI_PASSWORD.match(self.tracking_uri):
            raise ValueError(
                "tracking_uri carries a password (it would travel in the deployment's arguments); "
                "give it as $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD instead"
            )
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ServeConfig:
        """Read a serve config; relative bank folders resolve against its folder."""
        path = Path(path)
        values = read_mapping(path, "serve config")
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            cfg = cls(**values)
        except ValidationError as err:
            raise ConfigError(f"serve config {path}: {validation_message(err, cls)}") from None
        return cfg.resolved(path.parent)

    def resolved(self, base: Path) -> ServeConfig:
        def place(value: str) -> str:
            if "://" in value or value.startswith("models:/") or Path(value).is_absolute():
                return value
            return str((base / value).resolve())

        return self.model_copy(
            update={
                "banks": {name: place(src) for name, src in self.banks.items()},
                "labels_dir": str(Path(self.labels_dir).resolve()),  # like out/ elsewhere: from cwd
            }
        )
