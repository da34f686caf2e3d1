"""Direction banks: K learned directions, what they were learnt on, and their files.

The bank owns every rule about its record: a direction's edit window, its label, its state
(live, dead, duplicate), its scales in measured units, who calibrated them. Other modules ask
it; none reads `edit_defaults` or `scores` as raw dicts. How the text encoder sees a direction
is `noiseclr.conditioning`; `install` adds real tokens to a tokenizer and encoder for tools that
expect them; `noiseclr.export` writes the files diffusers, AUTOMATIC1111, ComfyUI and kohya load.

On disk a bank is a folder: `directions.safetensors` (tensor "directions", (K, D)),
`bank.json` (base model identity, token names, training config, metrics, labels), and beside
them `README.md`, the bank card that `noiseclr.card` writes from them (loading never reads it).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from noiseclr.bank.schema import Calibration, DirectionScore, EditDefaults, Scores
from noiseclr.errors import BankError
from noiseclr.utils.images import atomic_write_bytes, readable

DIRECTIONS_FILE = "directions.safetensors"
META_FILE = "bank.json"
FORMAT_VERSION = 1


SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
SAFE_TOKEN = re.compile(r"^<[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}>$")


@dataclass
class DirectionBank:
    """K directions plus what they were learnt on and how."""

    directions: torch.Tensor  # (K, D) float32
    base_model: dict[str, Any]  # {"source", "fingerprint", "hidden_size"}
    name: str = "bank"
    tokens: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # token -> {"auto", "human"}
    # Measured editing defaults (window, per-direction windows, calibrated [-s, +s] scales);
    # a dict is read into the typed record.
    edit_defaults: EditDefaults = field(default_factory=EditDefaults)
    # The oracle-free measurement (evaluation/blind.py), None where never measured.
    scores: Scores | None = None

    def __post_init__(self) -> None:
        if self.directions.ndim != 2:
            raise BankError(f"directions must be (K, D), got shape {tuple(self.directions.shape)}")
        if not self.tokens:
            self.tokens = [f"<{self.name}-{i}>" for i in range(len(self.directions))]
        if len(self.tokens) != len(self.directions):
            raise BankError(f"{len(self.tokens)} token names for {len(self.directions)} directions")
        # Names and tokens become file names (export-ti, the registry, caches): a bank from
        # elsewhere whose token is "<../../x>" must not write outside the folder it is given.
        if not isinstance(self.name, str) or not SAFE_NAME.match(self.name):
            raise BankError(f"bank name {self.name!r}: letters, digits, '_', '-', '.' (not first) only")
        bad = [t for t in self.tokens if not isinstance(t, str) or not SAFE_TOKEN.match(t)]
        if bad:
            raise BankError(f"token {bad[0]!r}: a token is <name> with letters, digits, '_', '-', '.' only")
        if len(set(self.tokens)) != len(self.tokens):
            raise BankError("two directions share one token name")

    def __setattr__(self, name: str, value: Any) -> None:
        # The measured parts are typed wherever they are set: a dict (bank.json, a caller's
        # literal) is read into its record and checked against the bank's direction count.
        if name == "edit_defaults":
            value = self._read(EditDefaults, value or {}, name)
        elif name == "scores":
            value = self._read(Scores, value, name) if value else None
        super().__setattr__(name, value)

    def _read(self, record: type, value: Any, key: str) -> Any:
        """`value` as the typed `record`, per-direction lists one per direction (BankError)."""
        try:
            typed = value if isinstance(value, record) else record.model_validate(value)
        except ValidationError as err:
            where = ".".join([key, *(str(p) for p in err.errors()[0]["loc"])])
            raise BankError(f"{where}: {err.errors()[0]['msg']} (bank {self.name!r})") from None
        k = len(self.directions)
        for name in ("scales", "windows", "directions"):
            rows = getattr(typed, name, None)
            if rows is not None and len(rows) != k:
                raise BankError(
                    f"{key}.{name}: one per direction ({k}), got {len(rows)} (bank {self.name!r})"
                )
        return typed

    def __len__(self) -> int:
        return len(self.directions)

    @property
    def method(self) -> str:
        """ "noiseclr" (token-embedding directions) or "pullback" (x_t directions)."""
        return self.config.get("method", "noiseclr")

    # What the method means for every reader: how a direction is applied. A token bank's rows are
    # token embeddings, applied through the text encoder inside an edit window and scaled per
    # sign; an x_t bank's rows (pullback) are latent vectors added once, at its own timestep.
    @property
    def token_directions(self) -> bool:
        return self.method == "noiseclr"

    @property
    def family(self) -> str:
        """The family of the model it was learnt on: "sdxl" (pairs, one embedding per text
        encoder) or "sd" (banks from before SDXL record none)."""
        return str(self.base_model.get("family", "sd"))

    @property
    def shift_at(self) -> int | None:
        """The timestep an x_t bank's directions are added at (its t_edit); None for a token bank."""
        if self.token_directions:
            return None
        if "t_edit" not in self.config:
            raise BankError(f"bank {self.name!r}: a {self.method} bank's config needs t_edit")
        return int(self.config["t_edit"])

    def require_tokens(self, refusal: str) -> None:
        """BankError unless the directions are token embeddings: `refusal` says what cannot use
        them and what to do instead."""
        if not self.token_directions:
            at = f" at t = {self.config['t_edit']}" if "t_edit" in self.config else ""
            raise BankError(
                f"bank {self.name!r} holds {self.method} directions (x_t vectors added once{at}), "
                f"not token embeddings: {refusal}"
            )

    def index(self, key: str | int) -> int:
        """Direction index from an index, a token name ("<bank-3>"), or a label."""
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            i = int(key)
            if not 0 <= i < len(self):
                raise BankError(f"direction {i} does not exist: bank {self.name!r} has 0..{len(self) - 1}")
            return i
        if key in self.tokens:
            return self.tokens.index(key)
        for token, lab in self.labels.items():
            if key in lab.values():
                return self.tokens.index(token)
        raise BankError(
            f"direction {key!r} does not exist in bank {self.name!r}; known: indices 0..{len(self) - 1}, "
            f"tokens {self.tokens[:4]}{'...' if len(self) > 4 else ''}"
        )

    def ranked(self) -> list[int]:
        """Direction indices for display: best first by the oracle-free score, each duplicate
        right after the direction it repeats, dead ones last (bank order if unmeasured)."""
        if self.scores is None:
            return list(range(len(self)))
        order = list(self.scores.order)
        out = []
        for i in order:
            if self.state(i) == "live":
                out.append(i)
                out += [j for j in order if self.state(j) == "duplicate" and self.duplicate_of(j) == i]
        return out + [i for i in order if i not in out]

    def window(self, k: int | None = None) -> tuple[int, int]:
        """(t_high, t_low) of direction k's edits, as `noiseclr edit` applies them: its measured
        window where the measurement chose one per direction, else the bank's measured or
        configured one, else the whole schedule. k None: the bank's own."""
        d = self.edit_defaults
        if d.windows and k is not None:
            return d.windows[k]
        return d.window or (1000, 0)

    @property
    def has_own_windows(self) -> bool:
        """Whether the measurement chose a window per direction."""
        return bool(self.edit_defaults.windows)

    @property
    def measured(self) -> bool:
        """Whether edit scales were calibrated: `noiseclr edit` then reads 1 as the measured
        clean edit (+s) and -1 as -s, instead of raw scales."""
        return bool(self.edit_defaults.scales)

    @property
    def calibration(self) -> Calibration | None:
        """Who calibrated the scales: "oracle" (the shapes world's), "blind" (without), None."""
        return self.edit_defaults.calibration if self.measured else None

    def scales(self, k: int) -> tuple[float, float] | None:
        """Direction k's calibrated (-s, +s), None when the bank has no measured scales."""
        return self.edit_defaults.scales[k] if self.edit_defaults.scales else None

    def raw_scales(self, k: int, units: list[float]) -> list[float]:
        """Raw scales of direction k for scales in its measured units (+1: +s, -1: -s);
        unchanged when the bank has no measured scales."""
        scales = self.edit_defaults.scales
        if not scales:
            return list(units)
        return [u * abs(scales[k][1 if u > 0 else 0]) for u in units]

    def label(self, i: int) -> str | None:
        """Direction i's name: its human label, else its automatic one (None: unnamed)."""
        names = self.labels.get(self.tokens[i], {})
        return names.get("human") or names.get("auto") or None

    def duplicate_of(self, i: int) -> int | None:
        """The direction that direction i repeats, as the oracle-free measurement found it."""
        figures = self.direction_score(i)
        j = figures.duplicate_of if figures else None
        return j if j is not None and 0 <= j < len(self) and j != i else None

    def state(self, i: int) -> str:
        """ "unmeasured", "dead" (edits nothing measurable), "duplicate" (see `duplicate_of`) or
        "live", from the bank's oracle-free measurement."""
        figures = self.direction_score(i)
        if figures is None:
            return "unmeasured"
        if figures.dead:
            return "dead"
        return "duplicate" if self.duplicate_of(i) is not None else "live"

    def direction_score(self, i: int) -> DirectionScore | None:
        """The measured figures of direction i (None if unmeasured): score, interval, rank,
        dead, duplicate_of, and per sign scale, change, consistency..."""
        return self.scores.directions[i] if self.scores is not None else None

    def store_scores(self, scores: Scores | dict[str, Any]) -> None:
        """Keep an oracle-free measurement. Where the oracle has not set the edit scales (any
        domain but the shapes world), its calibration sets them, so that a scale of 1 means
        the target change of the image on any model."""
        self.scores = scores
        if not self.token_directions or self.calibration == "oracle":
            return
        protocol = self.scores.protocol
        windows = protocol.get("windows")  # where each direction was calibrated
        blind = {
            "window": protocol["window"],
            # per direction only where they differ (a scale holds in the window it was found in)
            "windows": windows if windows and any(w != windows[0] for w in windows) else None,
            "scales": [(d.signs["-"].scale, d.signs["+"].scale) for d in self.scores.directions],
            "calibration": "blind",
            "target_change": protocol["target"],
        }
        self.edit_defaults = self.edit_defaults.dump() | blind

    def store_oracle_calibration(
        self,
        window: tuple[int, int],
        scales: list[tuple[float, float]],
        target_effect: float,
        windows: list[tuple[int, int]] | None = None,
    ) -> None:
        """Keep the oracle's calibration (the shapes world): it wins over the blind one."""
        if not self.token_directions:  # x_t directions are added at t_edit, not scaled per sign
            return
        self.edit_defaults = {
            "window": window,
            "scales": scales,
            "windows": windows,
            "target_effect": target_effect,
            "calibration": "oracle",
        }

    def check_model(self, model) -> None:
        """Raise BankError if this bank was not learnt on `model` (a loader.DiffusionModel)."""
        if self.token_directions and self.family != model.family:
            raise BankError(
                f"bank {self.name!r} was learnt on an {self.family.upper()} model; {model.source!r} is "
                f"{model.family.upper()}: its directions are token embeddings of other text encoders"
            )
        if not self.token_directions:  # directions live in x_t, not in the token space
            pipe = model.pipe
            side = model.resolution // pipe.vae_scale_factor
            want, what = pipe.unet.config.in_channels * side * side, "latent"
        else:  # SDXL: a pair, one embedding per text encoder
            want, what = sum(model.token_widths), "token embedding"
        if want != self.directions.shape[1]:
            raise BankError(
                f"bank {self.name!r} has {self.directions.shape[1]}-dim directions but the model's "
                f"{what}s are {want}-dim"
            )
        recorded = self.base_model.get("fingerprint")
        if not model.identifies(recorded):
            raise BankError(
                f"bank {self.name!r} was learnt on base model {self.base_model.get('source')!r} "
                f"(fingerprint {recorded}), not on {model.source!r} (fingerprint {model.fingerprint})"
            )
        if recorded != model.fingerprint:
            # Written before the fingerprint covered the noise schedule: this is its model; the
            # record takes today's form (in memory; on disk when a command saves the bank).
            self.base_model = {**self.base_model, "fingerprint": model.fingerprint}

    def save(self, folder: str | Path) -> Path:
        """Write both files atomically (tensor first, then the JSON that names it). The bank card
        beside them is its readers' (`noiseclr.card.save_bank` saves and writes it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not torch.isfinite(self.directions).all():
            raise BankError("refusing to save a bank with non-finite directions")
        tmp = folder / f".{DIRECTIONS_FILE}.tmp"
        save_file({"directions": self.directions.detach().float().cpu().contiguous()}, str(tmp))
        readable(tmp)
        tmp.replace(folder / DIRECTIONS_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "name": self.name,
            "base_model": self.base_model,
            "tokens": self.tokens,
            "shape": list(self.directions.shape),
            "config": self.config,
            "metrics": self.metrics,
            "labels": self.labels,
            "edit_defaults": self.edit_defaults.dump(),
            "scores": self.scores.dump() if self.scores is not None else {},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_bytes(folder / META_FILE, json.dumps(meta, indent=2, default=_json_default).encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path, model=None) -> DirectionBank:
        """Read a bank folder; with `model`, also check it was learnt on that model."""
        folder = Path(folder)
        if not (folder / META_FILE).exists() or not (folder / DIRECTIONS_FILE).exists():
            raise BankError(
                f"{str(folder)!r} is not a direction bank (needs {DIRECTIONS_FILE} and {META_FILE})"
            )
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise BankError(f"{folder / META_FILE} is not valid JSON ({err}); the bank is damaged") from None
        try:
            directions = load_file(str(folder / DIRECTIONS_FILE))["directions"]
        except (SafetensorError, OSError, KeyError) as err:
            raise BankError(
                f"{folder / DIRECTIONS_FILE} is unreadable ({err}): the bank is damaged, re-train it"
            ) from None
        missing = [k for k in ("base_model", "tokens") if k not in meta]
        if missing:
            raise BankError(f"{folder / META_FILE} lacks {missing}; not a bank this version wrote")
        if list(directions.shape) != meta.get("shape"):
            shape = list(directions.shape)
            raise BankError(f"{folder}: directions have shape {shape}, bank.json says {meta.get('shape')}")
        bank = cls(
            directions=directions,
            base_model=meta["base_model"],
            name=meta.get("name", folder.name),
            tokens=meta["tokens"],
            config=meta.get("config", {}),
            metrics=meta.get("metrics", {}),
            labels=meta.get("labels", {}),
            edit_defaults=meta.get("edit_defaults") or {},
            scores=meta.get("scores") or None,
        )
        if model is not None:
            bank.check_model(model)
        return bank

    def install(self, tokenizer, text_encoder) -> list[int]:
        """Add this bank's tokens to a tokenizer and encoder (for plain-diffusers prompts)."""
        clash = [t for t in self.tokens if t in tokenizer.get_vocab()]
        if clash:
            raise BankError(f"tokens already in the tokenizer: {clash[:4]}")
        tokenizer.add_tokens(self.tokens)
        text_encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[ids] = self.directions.to(
                text_encoder.get_input_embeddings().weight.dtype
            )
        return ids


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
