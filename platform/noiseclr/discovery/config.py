"""The discovery config: one nested schema for the single-process and the distributed paths.

A job file declares what it is (`kind: discover`) and groups its keys by what they decide:

    kind: discover
    name: shapes
    model: shapes                    # "shapes", a diffusers folder, or a hub id
    data: {uri: null, n_images: 64, world_fixed: {}}
    method: {k: 12, negatives: 7, batch: 6, tau: 0.5, t_min: 0, t_max: 600, ...}
    optim: {steps: 450, lr: 6.0e-3, warmup: 20, seed: 0, precision: fp32, ...}
    run: {device: auto, checkpoint_every: 100, ...}
    distributed: {workers: 0, zero_stage: 2, ...}
    storage: {path: null, options: {}}
    tracking: {uri: null, experiment: noiseclr, ...}
    evaluation: {enabled: true, images: 8, edit_window: 600, ...}
    gallery: {enabled: true, prompt: null, scales: [...], ...}

The model, the data, the method and the optimisation define what is learnt
(`TRAINING_SECTIONS`): a checkpoint resumes only under the same ones (the step count may grow
under a constant learning rate). Everything else says how the run executes or what is made
from the bank, and may change between runs.

Validated once at the edge: unknown keys and impossible values fail in one line naming the
file and the key. A file without `kind` is the flat layout every job file had before the
sections: it is read through `FLAT` (each old key names one field) with a one-line notice,
because every old key maps to exactly one field and nothing is lost; `noiseclr config migrate`
prints it in sections. The same flat names are the short names of the command line's overrides
(`--steps`), of a sweep's space (`k`, `tau`) and of the record kept in bank.json and MLflow
params (`record`), so banks and runs before and after the sections compare key for key.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noiseclr.errors import ConfigError
from noiseclr.utils.configfile import (
    URI_PASSWORD,
    check_no_secrets,
    read_mapping,
    unknown_key,
    validation_message,
)

log = logging.getLogger(__name__)
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(BaseModel):
    """The images directions are learnt on."""

    model_config = STRICT
    uri: str | None = None  # image folder URI (fsspec); None: write `n_images` images of the shapes world
    n_images: int = Field(64, ge=2)  # images used (the paper's N)
    world_fixed: dict[str, str] = Field(default_factory=dict)  # factors held constant in that world


class MethodConfig(BaseModel):
    """NoiseCLR's objective and its directions."""

    model_config = STRICT
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
    # Initial directions (discovery/initial.py): random at the token table's mean norm; copies
    # of `init_tokens`; or copies of K distinct random rows of the token table (real tokens).
    init: Literal["random", "tokens", "vocab"] = "random"
    init_tokens: list[str] = Field(default_factory=list)
    # free: directions grow as the optimizer takes them (the paper). vocab: every direction is
    # used at the token table's mean norm (a reparametrisation, d / |d| * norm, the same on one
    # process and on DeepSpeed workers), so it stays at the scale the text encoder was trained on.
    direction_norm: Literal["free", "vocab"] = "free"

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be <= t_max ({self.t_max})")
        if self.negatives >= self.k:
            raise ValueError(
                f"negatives ({self.negatives}) must be < k ({self.k}): each step contrasts one "
                f"direction with {self.negatives} others, so k must be at least {self.negatives + 1}"
            )
        energies = self.delta_energy if isinstance(self.delta_energy, list) else [self.delta_energy]
        if any(not 0 <= w <= 1 for w in energies):
            raise ValueError(f"delta_energy weights must lie in [0, 1], got {self.delta_energy}")
        if isinstance(self.delta_energy, list) and len(self.delta_energy) != self.k:
            raise ValueError(
                f"delta_energy lists one weight per direction: {len(self.delta_energy)} given, k = {self.k}"
            )
        if self.init == "tokens" and not self.init_tokens:
            raise ValueError("init: tokens needs init_tokens")
        return self

    @property
    def directions_per_step(self) -> int:
        return self.negatives + 1


class OptimConfig(BaseModel):
    """How the directions are optimised (AdamW), and in which precision."""

    model_config = STRICT
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class RunConfig(BaseModel):
    """How this process runs the steps: none of it changes what is learnt."""

    model_config = STRICT
    device: str = "auto"
    # UNet gradient checkpointing; "auto": on when the step would not fit the GPU's free memory
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    max_rows: int | None = Field(None, ge=1)  # UNet rows per call (memory budget); None: one call
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class DistributedConfig(BaseModel):
    """Ray Train + DeepSpeed; every key but `workers` is used only when workers > 0."""

    model_config = STRICT
    workers: int = Field(0, ge=0)  # Ray Train workers (DeepSpeed); 0: one process (--workers overrides)
    zero_stage: int = Field(2, ge=0, le=3)
    offload: bool = False  # ZeRO optimizer state on the CPU
    max_failures: int = Field(2, ge=0)  # worker restarts from the last checkpoint
    cache_latents: bool = True  # workers keep their shard's latents after the first pass
    # Ray Train's worker placement: PACK fills a node first; STRICT_SPREAD puts every worker on
    # its own node (bank metrics["nodes"] says how many nodes the workers ran on).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # How long a job waits for the cluster to hold its workers' resources (an autoscaler, asked
    # for them, adding nodes) before it stops with one line naming what it asked and what the
    # cluster has. Raise it where a GPU node takes longer to start.
    resource_wait_s: float = Field(300.0, ge=0)


class StorageConfig(BaseModel):
    """Where a run reads and writes beyond OUT."""

    model_config = STRICT
    path: str | None = None  # Ray Train's RunConfig.storage_path: local or s3://; None: OUT/ray
    # fsspec options for the data URI and an s3:// storage path (e.g. {endpoint_url: http://minio:9000});
    # credentials belong in the environment (AWS_ACCESS_KEY_ID, ...), or as "${VAR}", never literal.
    options: dict[str, object] = Field(default_factory=dict)


class TrackingConfig(BaseModel):
    """MLflow: none unless a tracking URI is given here or in $MLFLOW_TRACKING_URI."""

    model_config = STRICT
    uri: str | None = None
    experiment: str = "noiseclr"
    register_bank: bool = True  # register the bank as a model version (tracked runs only)
    registered_model: str | None = None  # None: noiseclr-<name>-<base model fingerprint[:8]>
    alias: str | None = None  # e.g. champion: point this alias at the new version

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        if self.uri and URI_PASSWORD.match(self.uri):
            raise ValueError(
                "uri carries a password: it would be written into MLflow params, bank.json "
                "and checkpoints; give the user and password as $MLFLOW_TRACKING_USERNAME / "
                "$MLFLOW_TRACKING_PASSWORD instead"
            )
        return self


class EvaluationConfig(BaseModel):
    """The bank's editing window and its measurement after training."""

    model_config = STRICT
    edit_window: int = Field(600, ge=1, le=1000)  # edits (gallery, `noiseclr edit`) act for t <= this
    # Measure the bank after training, on any domain, without an oracle (evaluation/blind.py):
    # every direction's score, rank, dead flag and duplicate group, and its calibrated scales,
    # into bank.json. On the shapes world (data uri null) the oracle measures it too (labels and
    # the calibrated scales then come from evaluation/evaluate.py).
    enabled: bool = True
    # Window tops the oracle measurement tries per direction (each keeps its best, recorded in
    # bank.json beside its scale); empty: every direction edits for t <= edit_window.
    windows: list[int] = Field(default_factory=list)
    images: int = Field(8, ge=2)  # generated and real images of those measurements
    steps: int = Field(20, ge=2)  # DDIM steps of their generated images
    # DDIM steps of their real images' inversion and edits; null: the oracle's 50 and the
    # oracle-free measurement's 1.25 x steps (the figures in docs/ were measured so).
    inversion_steps: int | None = Field(None, ge=2)


class GalleryConfig(BaseModel):
    """The pictures drawn after training (scales in units of each direction's measured strength
    once evaluated)."""

    model_config = STRICT
    enabled: bool = True
    scales: list[float] = Field(default_factory=lambda: [-6.0, -3.0, 0.0, 3.0, 6.0], min_length=1)
    seeds: int = Field(3, ge=1)
    steps: int = Field(25, ge=1)
    prompt: str | None = None  # None: unconditional samples (the paper's prompt-free form)


# The sections that define what is learnt: a resume must match them.
TRAINING_SECTIONS = ("model", "data", "method", "optim")
SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "distributed": DistributedConfig,
    "storage": StorageConfig,
    "tracking": TrackingConfig,
    "evaluation": EvaluationConfig,
    "gallery": GalleryConfig,
}
# Flat names whose field is not the only one of its name (or was renamed by the sections).
_RENAMED = {
    "data": "data.uri",
    "storage_path": "storage.path",
    "storage_options": "storage.options",
    "tracking_uri": "tracking.uri",
    "register_alias": "tracking.alias",
    "evaluate": "evaluation.enabled",
    "evaluate_windows": "evaluation.windows",
    "evaluate_images": "evaluation.images",
    "evaluate_steps": "evaluation.steps",
    "gallery": "gallery.enabled",
    "gallery_scales": "gallery.scales",
    "gallery_seeds": "gallery.seeds",
    "gallery_steps": "gallery.steps",
    "gallery_prompt": "gallery.prompt",
}


def _flat_names() -> dict[str, tuple[str, ...]]:
    paths = {"name": ("name",), "model": ("model",)}
    renamed = {tuple(p.split(".")): flat for flat, p in _RENAMED.items()}
    for section, schema in SECTIONS.items():
        for field in schema.model_fields:
            path = (section, field)
            paths[renamed.get(path, field)] = path
    return paths


# Every field's flat name (the layout before the sections; the command line's and sweeps' short
# names) -> its place in the sections. One name per field, one field per name (tested).
FLAT: dict[str, tuple[str, ...]] = _flat_names()


def _is_section(key: str, value: Any) -> bool:
    """A section written as a mapping (`data: {uri: ...}`), not a flat key of the same name
    (`data: s3://...`, `gallery: false`)."""
    return key in SECTIONS and isinstance(value, dict)


def nest(values: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Flat keys -> the nested layout (a ConfigError naming an unknown key); a section given as a
    mapping stays as it is (`{"optim": {"steps": 9}}` and `{"steps": 9}` say the same)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "kind" or _is_section(key, value):
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
            continue
        path = FLAT.get(key)
        if path is None:
            raise ConfigError(f"{where}: {unknown_key(key, key, list(FLAT))}")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, section by section."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key in SECTIONS:
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


class DiscoveryConfig(BaseModel):
    model_config = STRICT

    kind: Literal["discover"] = "discover"
    name: str = Field("bank", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "shapes"  # "shapes", a diffusers folder, or a hub id
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)

    @model_validator(mode="after")
    def _check(self) -> DiscoveryConfig:
        workers, batch = self.distributed.workers, self.method.batch
        if workers and batch % workers:
            raise ValueError(f"method.batch ({batch}) must be divisible by distributed.workers ({workers})")
        check_no_secrets(self.storage.options, "storage.options")
        return self

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def of(cls, **flat: Any) -> DiscoveryConfig:
        """The default config with some keys set by their flat names (`of(k=4, tau=0.2)`)."""
        return cls.parse(nest(flat))

    def replace(self, where: str = "override", **flat: Any) -> DiscoveryConfig:
        """A validated copy with keys replaced by their flat names (None: kept)."""
        given = {k: v for k, v in flat.items() if v is not None}
        if not given:
            return self
        # only what was set stays set: keys left at their defaults still read as not given
        return self.parse(merge(self.model_dump(exclude_unset=True), nest(given, where)), where)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DiscoveryConfig:
        """Read a job file; `overrides` (flat names, None: not given) replace its keys. Errors
        name the file."""
        values = read_mapping(path)
        where = f"config {path}"
        if "kind" not in values:
            if sections := sorted(k for k, v in values.items() if _is_section(k, v)):
                raise ConfigError(
                    f"{where} has sections ({', '.join(sections)}) but declares no kind: "
                    "add `kind: discover` at its top"
                )
            values = nest(values, where)
            log.warning(
                "%s has the flat layout (no `kind`): read through the old key names; "
                "`noiseclr config migrate %s` prints it in sections",
                path,
                path,
            )
        else:
            cls._check_placement(values, where)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.parse(merge(values, nest(given, "override")), where=where)

    @classmethod
    def _check_placement(cls, values: dict[str, Any], where: str) -> None:
        """A flat key at the top of a file with sections: one line naming where it belongs."""
        wrong = [
            f"{key} -> {'.'.join(FLAT[key])}"
            for key, value in values.items()
            if key in FLAT and len(FLAT[key]) == 2 and not _is_section(key, value)
        ]
        if wrong:
            raise ConfigError(
                f"{where}: keys of a file with `kind` belong in their sections: {', '.join(wrong)}"
            )

    @classmethod
    def parse(cls, values: dict, where: str = "config") -> DiscoveryConfig:
        try:
            return cls(**values)
        except ValidationError as err:
            raise ConfigError(f"{where}: {validation_message(err, cls)}") from None

    # -- records -------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The flat record of bank.json and MLflow params (the names banks always had)."""
        dump = self.model_dump()
        out = {}
        for flat, path in FLAT.items():
            node = dump
            for part in path:
                node = node[part]
            out[flat] = node
        return out

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> DiscoveryConfig:
        """A config saved by a run (nested, or a flat record from before the sections)."""
        return cls.parse(cls.sections_of(saved), where="saved config")

    @classmethod
    def sections_of(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved config (nested, or a flat record from before the sections) as nested values,
        not validated: a checkpoint is compared with what it holds. Unknown flat keys are dropped."""
        if "kind" in saved or any(_is_section(k, v) for k, v in saved.items()):
            return saved
        return nest({k: v for k, v in saved.items() if k in FLAT})

    def training_changes(self, saved: dict[str, Any]) -> list[str]:
        """`section.key: old -> new` for every training key that differs from a saved config
        (a key the saved one predates counts at its default). The step count is free under a
        constant schedule: more steps continue the same run."""
        then, now = self.sections_of(saved), self.model_dump()
        changes = []
        for section in TRAINING_SECTIONS:
            if section not in SECTIONS:
                if then.get(section, now[section]) != now[section]:
                    changes.append(f"{section}: {then.get(section)!r} -> {now[section]!r}")
                continue
            defaults = SECTIONS[section]().model_dump()
            old = {**defaults, **then.get(section, {})}
            for key, value in now[section].items():
                if (section, key) == ("optim", "steps") and self.optim.schedule == "constant":
                    continue
                if old.get(key) != value:
                    changes.append(f"{section}.{key}: {old.get(key)!r} -> {value!r}")
        return changes

    def unused_distributed(self) -> list[str]:
        """Keys that only a Ray Train run reads, set while this one runs in one process."""
        if self.distributed.workers:
            return []
        unused = [f"distributed.{k}" for k in self.distributed.model_fields_set - {"workers"}]
        return sorted(unused + (["storage.path"] if "path" in self.storage.model_fields_set else []))


def migrate(path: str | Path) -> str:
    """A flat job file (no `kind`) as YAML in sections: the keys it sets, validated, in the
    schema's order. Comments are not carried over."""
    import yaml

    values = read_mapping(path)
    if "kind" in values:
        raise ConfigError(f"config {path} already declares kind: {values['kind']}; nothing to migrate")
    nested = nest(values, f"config {path}")
    DiscoveryConfig.parse(nested, where=f"config {path}")  # refuse to write what would not load

    def flow(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
        return text.removesuffix("\n").removesuffix("\n...")

    lines = ["kind: discover"] + [f"{k}: {flow(nested[k])}" for k in ("name", "model") if k in nested]
    for section in SECTIONS:
        if section in nested:
            lines += [f"{section}:"] + [f"  {k}: {flow(v)}" for k, v in nested[section].items()]
    return "\n".join(lines) + "\n"
