"""The discovery config: one schema for the single-process and the distributed paths.

Validated once at the edge: unknown keys and impossible values fail with the field's name
(`ConfigError`, one line naming the file and the key). Every key means the same with and
without workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noiseclr.errors import ConfigError
from noiseclr.utils.configfile import URI_PASSWORD, check_no_secrets, read_mapping, validation_message

# Keys that say how to distribute (used only when workers > 0).
DISTRIBUTED_KEYS = (
    "storage_path",
    "storage_options",
    "zero_stage",
    "offload",
    "max_failures",
    "cache_latents",
    "placement_strategy",
)


class DiscoveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # what
    model: str = "shapes"  # "shapes", a diffusers folder, or a hub id
    data: str | None = None  # image folder URI; None: write `n_images` images of the shapes world
    world_fixed: dict[str, str] = Field(default_factory=dict)  # factors held constant in that world
    n_images: int = Field(64, ge=2)  # images used (the paper's N)
    name: str = Field("bank", pattern=r"^[A-Za-z0-9_.-]+$")
    # the method
    k: int = Field(16, ge=2)  # directions to learn (K)
    negatives: int = Field(7, ge=1)  # other directions sampled per step (paper: 20)
    batch: int = Field(6, ge=2)  # images per step (paper: 6)
    tau: float = Field(0.5, gt=0)
    t_min: int = Field(0, ge=0)
    t_max: int = Field(999, ge=0)
    # symmetric: every sampled direction is the anchor once. Default because it measured
    # higher than the paper's form on the embedded world (docs/discovery-quality.md).
    loss: Literal["paper", "symmetric"] = "symmetric"
    # How noise differences are compared (discovery/loss.py, delta_features); 1 / false: the paper.
    delta_pool: int = Field(1, ge=1)  # average over pool x pool latent pixels before `sim`
    delta_center: bool = False  # subtract each image's mean over the sampled directions
    # weight of the change map (where the prediction moves) beside the signed difference in `sim`;
    # one weight for every direction, or a list of k (a bank learning both kinds of edit)
    delta_energy: float | list[float] = Field(0.0)
    # Keep each direction's effect from vanishing (loss.strength_penalty): weight of a hinge on
    # log rms(noise difference) below strength_target (a fraction of the unit-variance noise).
    # 0: the paper's loss alone.
    strength_weight: float = Field(0.0, ge=0)
    strength_target: float = Field(0.05, gt=0, le=1)
    # Initial directions (bank.init_directions): random at the token table's mean norm; copies
    # of `init_tokens`; or copies of K distinct random rows of the token table (real tokens).
    init: Literal["random", "tokens", "vocab"] = "random"
    init_tokens: list[str] = Field(default_factory=list)
    # free: directions grow as the optimizer takes them (the paper). vocab: every direction is
    # used at the token table's mean norm (a reparametrisation, d / |d| * norm, the same on one
    # process and on DeepSpeed workers), so it stays at the scale the text encoder was trained on.
    direction_norm: Literal["free", "vocab"] = "free"
    # optimisation
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    # execution
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # UNet gradient checkpointing; "auto": on when the step would not fit the GPU's free memory
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    max_rows: int | None = Field(None, ge=1)  # UNet rows per call (memory budget); None: one call
    checkpoint_every: int = Field(100, ge=1)
    workers: int = Field(0, ge=0)  # Ray Train workers (DeepSpeed); 0: one process (--workers overrides)
    # distributed execution (Ray Train + DeepSpeed); used only when workers > 0
    storage_path: str | None = None  # RunConfig.storage_path: local or s3://; None: OUT/ray
    # fsspec options for `data` and an s3:// storage_path (e.g. {endpoint_url: http://minio:9000});
    # credentials belong in the environment (AWS_ACCESS_KEY_ID, ...), not in job files.
    storage_options: dict[str, object] = Field(default_factory=dict)
    zero_stage: int = Field(2, ge=0, le=3)
    offload: bool = False  # ZeRO optimizer state on the CPU
    max_failures: int = Field(2, ge=0)  # worker restarts from the last checkpoint
    cache_latents: bool = True  # workers keep their shard's latents after the first pass
    # Ray Train's worker placement: PACK fills a node first; STRICT_SPREAD puts every worker on
    # its own node (bank metrics["nodes"] says how many nodes the workers ran on).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    keep_checkpoints: int = Field(2, ge=1)
    # tracking (MLflow): none unless a tracking URI is given here or in $MLFLOW_TRACKING_URI
    tracking_uri: str | None = None
    experiment: str = "noiseclr"
    register_bank: bool = True  # register the bank as a model version (tracked runs only)
    registered_model: str | None = None  # None: noiseclr-<name>-<base model fingerprint[:8]>
    register_alias: str | None = None  # e.g. champion: point this alias at the new version
    # editing defaults and the measurement of the bank
    edit_window: int = Field(600, ge=1, le=1000)  # edits (gallery, `noiseclr edit`) act for t <= this
    # Window tops the oracle measurement tries per direction (each keeps its best, recorded in
    # bank.json beside its scale); empty: every direction edits for t <= edit_window.
    evaluate_windows: list[int] = Field(default_factory=list)
    # Measure the bank after training, on any domain, without an oracle (evaluation/blind.py):
    # every direction's score, rank, dead flag and duplicate group, and its calibrated scales,
    # into bank.json. On the shapes world (data: null) the oracle measures it too (labels and
    # the calibrated scales then come from evaluation/evaluate.py).
    evaluate: bool = True
    evaluate_images: int = Field(8, ge=2)  # generated and real images of those measurements
    evaluate_steps: int = Field(20, ge=2)  # DDIM steps of their generated images
    # pictures (scales in units of each direction's measured strength once evaluated)
    gallery: bool = True  # draw the gallery after training
    gallery_scales: list[float] = Field(default_factory=lambda: [-6.0, -3.0, 0.0, 3.0, 6.0])
    gallery_seeds: int = Field(3, ge=1)
    gallery_steps: int = Field(25, ge=1)
    gallery_prompt: str | None = None  # None: unconditional samples (the paper's prompt-free form)

    @model_validator(mode="after")
    def _check(self) -> DiscoveryConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be <= t_max ({self.t_max})")
        if self.negatives >= self.k:
            raise ValueError(
                f"negatives ({self.negatives}) must be < k ({self.k}): each step contrasts one "
                f"direction with {self.negatives} others, so k must be at least {self.negatives + 1}"
            )
        if self.workers and self.batch % self.workers:
            raise ValueError(f"batch ({self.batch}) must be divisible by workers ({self.workers})")
        if not self.gallery_scales:
            raise ValueError("gallery_scales must name at least one scale")
        energies = self.delta_energy if isinstance(self.delta_energy, list) else [self.delta_energy]
        if any(not 0 <= w <= 1 for w in energies):
            raise ValueError(f"delta_energy weights must lie in [0, 1], got {self.delta_energy}")
        if isinstance(self.delta_energy, list) and len(self.delta_energy) != self.k:
            raise ValueError(
                f"delta_energy lists one weight per direction: {len(self.delta_energy)} given, k = {self.k}"
            )
        if self.init == "tokens" and not self.init_tokens:
            raise ValueError("init: tokens needs init_tokens")
        check_no_secrets(self.storage_options, "storage_options")
        if self.tracking_uri and URI_PASSWORD.match(self.tracking_uri):
            raise ValueError(
                "tracking_uri carries a password: it would be written into MLflow params, bank.json "
                "and checkpoints; give the user and password as $MLFLOW_TRACKING_USERNAME / "
                "$MLFLOW_TRACKING_PASSWORD instead"
            )
        return self

    @property
    def directions_per_step(self) -> int:
        return self.negatives + 1

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> DiscoveryConfig:
        """Read a job file; `overrides` (None: not given) replace its keys. Errors name the file."""
        values = read_mapping(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.parse(values, where=f"config {path}")

    @classmethod
    def parse(cls, values: dict, where: str = "config") -> DiscoveryConfig:
        try:
            return cls(**values)
        except ValidationError as err:
            raise ConfigError(f"{where}: {validation_message(err, cls)}") from None
