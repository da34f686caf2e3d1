"""Direction banks: K learned directions, what they were learnt on, and their files.

How the text encoder sees a direction is `noiseclr.conditioning`. `install` adds real tokens
to a tokenizer and encoder for tools that expect them; `noiseclr.export` writes the files
diffusers, AUTOMATIC1111, ComfyUI and kohya load.

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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from noiseclr.errors import BankError
from noiseclr.utils.images import atomic_write_bytes, readable

DIRECTIONS_FILE = "directions.safetensors"
META_FILE = "bank.json"
FORMAT_VERSION = 1


def vocab_norm(text_encoder: nn.Module) -> torch.Tensor:
    """The token table's mean row norm: the scale of the embeddings the encoder was trained on."""
    return text_encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean().cpu()


def init_directions(
    text_encoder: nn.Module,
    k: int,
    generator: torch.Generator,
    tokenizer=None,
    init_tokens: list[str] | None = None,
    from_vocab: bool = False,
) -> torch.Tensor:
    """(K, D) initial directions: random with the mean norm of the token table, copies of
    given tokens' embeddings (cycled if fewer than K), or (`from_vocab`) copies of K distinct
    rows of the table drawn from `generator`, the tokenizer's special tokens left out."""
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    if init_tokens:
        if tokenizer is None:
            raise ValueError("init_tokens needs the tokenizer")
        rows = []
        for tok in init_tokens:
            ids = tokenizer(tok, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise BankError(
                    f"init token {tok!r} is not a single token of this tokenizer ({len(ids)} tokens)"
                )
            rows.append(table[ids[0]])
        return torch.stack([rows[i % len(rows)] for i in range(k)]).clone()
    if from_vocab:
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        order = torch.randperm(len(table), generator=generator)
        ids = [int(i) for i in order if int(i) not in special][:k]
        if len(ids) < k:
            raise BankError(f"init: vocab needs {k} tokens, the table has {len(ids)} that are not special")
        return table[ids].clone()
    vectors = torch.randn(k, table.shape[1], generator=generator)
    return vectors / vectors.norm(dim=1, keepdim=True) * vocab_norm(text_encoder)


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
    # Measured editing defaults (written by `noiseclr evaluate`): {"window": [t_high, t_low],
    # "scales": [[-s, +s] per direction]}; `noiseclr edit` then reads a scale of 1 as +s.
    edit_defaults: dict[str, Any] = field(default_factory=dict)
    # The oracle-free measurement (evaluation/blind.py): per direction score, interval, rank,
    # dead flag, duplicate group and per-sign figures, with the images and settings measured on.
    scores: dict[str, Any] = field(default_factory=dict)

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
        self._check_edit_defaults()

    def _check_edit_defaults(self) -> None:
        """Per-direction scales and windows, where recorded, are one per direction and valid."""
        k = len(self.directions)
        for key, ok in (
            ("scales", lambda v: len(v) == 2 and all(math.isfinite(float(x)) for x in v)),
            ("windows", lambda v: len(v) == 2 and 0 <= int(v[1]) < int(v[0]) <= 1000),
        ):
            rows = self.edit_defaults.get(key)
            if rows is None:
                continue
            valid = isinstance(rows, list) and len(rows) == k
            if not valid or not all(isinstance(r, list | tuple) and ok(r) for r in rows):
                raise BankError(
                    f"edit_defaults.{key}: one valid [a, b] per direction ({k}), got {str(rows)[:80]}"
                )

    def __len__(self) -> int:
        return len(self.directions)

    @property
    def method(self) -> str:
        """ "noiseclr" (token-embedding directions) or "pullback" (x_t directions)."""
        return self.config.get("method", "noiseclr")

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
        rows = self.scores.get("directions")
        order = list(self.scores.get("order", range(len(self))))
        if not rows:
            return order
        out = []
        for i in order:
            if not rows[i]["dead"] and rows[i]["duplicate_of"] is None:
                out += [
                    i,
                    *(j for j in order if j != i and rows[j]["duplicate_of"] == i and not rows[j]["dead"]),
                ]
        return out + [i for i in order if i not in out]

    def window(self, k: int | None = None) -> tuple[int, int]:
        """(t_high, t_low) of direction k's edits, as `noiseclr edit` applies them: its measured
        window where the measurement chose one per direction, else the bank's measured or
        configured one, else the whole schedule. k None: the bank's own."""
        windows = self.edit_defaults.get("windows")
        hi, lo = windows[k] if windows and k is not None else self.edit_defaults.get("window", (1000, 0))
        return int(hi), int(lo)

    def label(self, i: int) -> str | None:
        """Direction i's name: its human label, else its automatic one (None: unnamed)."""
        names = self.labels.get(self.tokens[i], {})
        return names.get("human") or names.get("auto") or None

    def duplicate_of(self, i: int) -> int | None:
        """The direction that direction i repeats, as the oracle-free measurement found it."""
        j = self.direction_score(i).get("duplicate_of")
        return j if isinstance(j, int) and not isinstance(j, bool) and 0 <= j < len(self) else None

    def state(self, i: int) -> str:
        """ "unmeasured", "dead" (edits nothing measurable), "duplicate" (see `duplicate_of`) or
        "live", from the bank's oracle-free measurement."""
        figures = self.direction_score(i)
        if not figures:
            return "unmeasured"
        if figures.get("dead"):
            return "dead"
        return "duplicate" if self.duplicate_of(i) is not None else "live"

    def direction_score(self, i: int) -> dict[str, Any]:
        """The measured figures of direction i ({} if unmeasured): score, interval, rank, dead,
        duplicate_of, signs."""
        rows = self.scores.get("directions", [])
        return rows[i] if i < len(rows) else {}

    def check_model(self, model) -> None:
        """Raise BankError if this bank was not learnt on `model` (a loader.DiffusionModel)."""
        if self.method == "pullback":  # directions live in x_t, not in the token space
            pipe = model.pipe
            side = model.resolution // pipe.vae_scale_factor
            want, what = pipe.unet.config.in_channels * side * side, "latent"
        else:
            want, what = model.pipe.text_encoder.get_input_embeddings().weight.shape[1], "token embedding"
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
            "edit_defaults": self.edit_defaults,
            "scores": self.scores,
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
            edit_defaults=meta.get("edit_defaults", {}),
            scores=meta.get("scores", {}),
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


# Config keys a merged bank keeps where its banks agree: what editing and measuring read.
SHARED_KEYS = (
    "method",
    "t_edit",
    "model",
    "data",
    "world_fixed",
    "storage_options",
    "gallery_prompt",
    "edit_window",
)


def _merged_edit_defaults(banks: list[DirectionBank]) -> dict[str, Any]:
    """Each direction keeps its window; the calibrated scales are kept when every bank was
    calibrated the same way (same protocol keys), else dropped for the next measurement to set."""
    windows = [list(b.window(i)) for b in banks for i in range(len(b))]
    out: dict[str, Any] = {"window": windows[0]}
    if any(w != windows[0] for w in windows):
        out["windows"] = windows
    rest = [
        {k: v for k, v in b.edit_defaults.items() if k not in ("window", "windows", "scales")} for b in banks
    ]
    if all("scales" in b.edit_defaults for b in banks) and all(r == rest[0] for r in rest):
        out.update(rest[0])
        out["scales"] = [list(s) for b in banks for s in b.edit_defaults["scales"]]
    return out


def merge_banks(banks: list[DirectionBank], name: str, refs: list[str] | None = None) -> DirectionBank:
    """One bank of every direction of `banks`, in order: several seeds', sweep trials' or
    domains' discoveries on one base model put together. Tokens are renumbered <name-i>;
    each direction keeps its label, window and (where the banks agree on how) calibrated
    scales, and `config["origin"]` says which bank (`refs`: where it was read from, as banks of
    several runs often share a name) and token it was. The oracle-free scores
    are not carried: distinctness and rank are relative to the rest of a bank, so the merged
    bank is measured again (`noiseclr merge` does, and drops dead and duplicate directions)."""
    if len(banks) < 2:
        raise BankError(f"merging needs at least two banks, got {len(banks)}")
    first = banks[0]
    for b in banks[1:]:
        if b.method != first.method:
            raise BankError(
                f"bank {b.name!r} holds {b.method} directions, bank {first.name!r} {first.method}"
            )
        if b.base_model.get("fingerprint") != first.base_model.get("fingerprint"):
            raise BankError(
                f"bank {b.name!r} was learnt on base model {b.base_model.get('source')!r} "
                f"(fingerprint {b.base_model.get('fingerprint')}), bank {first.name!r} on "
                f"{first.base_model.get('source')!r} ({first.base_model.get('fingerprint')})"
            )
        if b.directions.shape[1] != first.directions.shape[1]:
            raise BankError(
                f"bank {b.name!r} has {b.directions.shape[1]}-dim directions, {first.name!r} "
                f"{first.directions.shape[1]}-dim"
            )
        if b.config.get("t_edit") != first.config.get("t_edit"):  # pullback: where x_t is moved
            t_b, t_first = b.config.get("t_edit"), first.config.get("t_edit")
            raise BankError(f"bank {b.name!r} edits at t {t_b}, bank {first.name!r} at t {t_first}")

    def same(key: str) -> bool:
        return all(b.config.get(key) == first.config.get(key) for b in banks)

    refs = refs or [None] * len(banks)
    if len(refs) != len(banks):
        raise BankError(f"{len(refs)} references for {len(banks)} banks")

    def own(b: DirectionBank, ref: str | None) -> list[dict]:
        return [{"bank": b.name, "token": t} | ({"ref": ref} if ref else {}) for t in b.tokens]

    origin = [o for b, ref in zip(banks, refs, strict=True) for o in b.config.get("origin") or own(b, ref)]
    labels_in_order = [b.labels.get(t) for b in banks for t in b.tokens]
    merged = DirectionBank(
        directions=torch.cat([b.directions.detach().float().cpu() for b in banks]),
        base_model=dict(first.base_model),
        name=name,
        config={
            **{k: first.config[k] for k in SHARED_KEYS if k in first.config and same(k)},
            "name": name,
            "k": len(origin),
            "origin": origin,
            "sources": [  # how each was trained
                {"name": b.name, "ref": ref, "config": b.config} for b, ref in zip(banks, refs, strict=True)
            ],
        },
        metrics={"data": first.metrics.get("data"), "merged_from": [b.name for b in banks]},
        edit_defaults=_merged_edit_defaults(banks),
    )
    merged.labels = {t: dict(lab) for t, lab in zip(merged.tokens, labels_in_order, strict=True) if lab}
    return merged


def subset(bank: DirectionBank, keep: list[int]) -> DirectionBank:
    """A new bank of directions `keep` of `bank` (in that order), tokens renumbered <name-j>;
    labels, windows, scales and `config["origin"]` follow their directions; scores are dropped
    (the caller measures or stores the subset's own)."""
    if not keep or any(not 0 <= k < len(bank) for k in keep) or len(set(keep)) != len(keep):
        raise BankError(f"keep {keep}: distinct indices of 0..{len(bank) - 1}, at least one")
    origin = bank.config.get("origin") or [{"bank": bank.name, "token": t} for t in bank.tokens]
    defaults = dict(bank.edit_defaults)
    for key in ("scales", "windows"):
        if key in defaults:
            defaults[key] = [defaults[key][k] for k in keep]
    out = DirectionBank(
        directions=bank.directions[keep].clone(),
        base_model=dict(bank.base_model),
        name=bank.name,
        config={**bank.config, "k": len(keep), "origin": [origin[k] for k in keep]},
        metrics={k: v for k, v in bank.metrics.items() if k != "evaluation"},  # of the whole bank
        edit_defaults=defaults,
    )
    out.labels = {
        out.tokens[j]: dict(bank.labels[bank.tokens[k]])
        for j, k in enumerate(keep)
        if bank.tokens[k] in bank.labels
    }
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
