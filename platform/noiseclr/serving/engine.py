"""The edit server's model side, without Ray: named banks, requests resolved to trajectories, and
one batched sampling call for many requests.

Ray Serve (`serving.app`) owns the HTTP and batching; everything here is plain torch and can be
used (and tested) in one process.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import io
import json
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noiseclr.bank import DirectionBank
from noiseclr.editing import request, sampler
from noiseclr.editing.request import Start
from noiseclr.errors import BankError, EditError, ImageError
from noiseclr.models.base import DiffusionModel
from noiseclr.serving.config import ServeConfig
from noiseclr.serving.schema import EditRequest
from noiseclr.utils.images import atomic_write_bytes

log = logging.getLogger(__name__)


class NotFound(BankError):
    """An unknown bank or direction (HTTP 404)."""


@dataclass
class Job:
    """One request, resolved (`editing.request.Start`): where it starts, its edits, its record."""

    start: Start
    edits: list[sampler.Edit] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    units: int = 0  # its UNet work, rows x steps (EditEngine.units), for the replica's admission

    @property
    def x_T(self) -> torch.Tensor | None:  # (1, C, h, w); None until a real image is inverted
        return self.start.x_T

    @x_T.setter
    def x_T(self, value: torch.Tensor) -> None:
        self.start.x_T = value


def registered_version(ref: str) -> str | None:
    """The version a models:/ reference points at now (None for a folder)."""
    if not ref.startswith("models:/"):
        return None
    from noiseclr.tracking.registry import resolve_version

    return str(resolve_version(ref).version)


class BankStore:
    """Banks by name, loaded once per replica; human labels in an overlay (labels_dir/NAME.json)
    shared by replicas through the file system, so a bank's own files are never rewritten.

    A bank given as models:/NAME@ALIAS remembers the version it loaded; `moved()` names the banks
    whose alias points elsewhere now (someone promoted another version)."""

    def __init__(
        self, sources: dict[str, str], model: DiffusionModel, labels_dir: str | Path, hide_dead: bool = False
    ):
        self.model, self.hide_dead = model, hide_dead
        self.sources = dict(sources)
        self.labels_dir = Path(labels_dir)
        self.banks: dict[str, DirectionBank] = {}
        self._digests: dict[str, tuple[DirectionBank, str]] = {}  # name -> (bank, its vectors' hash)
        self._swap = threading.Lock()
        self.versions: dict[str, str | None] = {}
        for name, ref in sources.items():
            self.banks[name], self.versions[name] = self._load(name, ref)

    def _load(self, name: str, ref: str) -> tuple[DirectionBank, str | None]:
        from noiseclr.tracking.registry import bank_folder  # imports mlflow only for models:/

        version = registered_version(ref)
        pinned = f"{ref.split('@')[0]}/{version}" if version and "@" in ref else ref
        bank = DirectionBank.load(bank_folder(pinned), self.model)  # safetensors + json, checked
        bank.require_tokens(f"the endpoint edits with token directions (bank {name!r}, {ref})")
        return bank, version

    def moved(self) -> list[str]:
        """Banks whose alias resolves to another version than the one loaded."""
        return [
            name
            for name, ref in self.sources.items()
            if "@" in ref and ref.startswith("models:/") and registered_version(ref) != self.versions[name]
        ]

    def refresh(self, names: list[str]) -> None:
        """Reload these banks (each loaded fully before it replaces the old one)."""
        for name in names:
            bank, version = self._load(name, self.sources[name])
            with self._swap:  # a reader of `current` sees the old pair or the new one, never a mix
                self.banks[name], self.versions[name] = bank, version

    def current(self, name: str) -> tuple[DirectionBank, str | None]:
        """The bank loaded under `name` and its registered version, read together."""
        with self._swap:
            if name not in self.banks:
                raise NotFound(f"no bank named {name!r}; this server has {sorted(self.banks)}")
            return self.banks[name], self.versions.get(name)

    def get(self, name: str) -> DirectionBank:
        if name not in self.banks:
            raise NotFound(f"no bank named {name!r}; this server has {sorted(self.banks)}")
        return self.banks[name]

    def index(self, name: str, direction: str | int) -> int:
        """An index, a token, the bank's own label, or a label set through the API (in that order:
        a label never takes over what an index or a token names)."""
        bank = self.get(name)
        try:
            i = bank.index(direction)
        except (BankError, KeyError, IndexError, ValueError) as err:
            named = [t for t, label in self.human_labels(name).items() if label == direction]
            if not (named and named[0] in bank.tokens):
                raise NotFound(
                    f"bank {name!r} has no direction {direction!r} ({len(bank)} directions)"
                ) from err
            i = bank.tokens.index(named[0])
        if self.hidden(name, i):
            raise NotFound(
                f"bank {name!r}: direction {direction!r} was measured dead and is hidden (hide_dead)"
            )
        return i

    def hidden(self, name: str, i: int) -> bool:
        """Direction i is measured dead and this server leaves dead directions out."""
        return self.hide_dead and self.get(name).state(i) == "dead"

    def _labels_file(self, name: str) -> Path:
        """Labels belong to one set of directions: keyed by the bank's name and a hash of its
        vectors, so a promoted version (other directions) starts without the old one's labels."""
        bank = self.get(name)
        known = self._digests.get(name)
        if known is None or known[0] is not bank:
            digest = hashlib.sha256(bank.directions.detach().float().cpu().numpy().tobytes()).hexdigest()
            known = self._digests[name] = (bank, digest[:16])
        return self.labels_dir / f"{name}.{known[1]}.json"

    def human_labels(self, name: str) -> dict[str, str]:
        path = self._labels_file(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}

    def set_label(self, name: str, direction: str | int, label: str) -> dict:
        """Set (or with "" clear) a direction's human label; atomic, under a file lock."""
        i = self.index(name, direction)
        bank = self.get(name)
        token = bank.tokens[i]
        if label and (label in bank.tokens or label.lstrip("-").isdigit()):
            raise EditError(f"label {label!r} is a direction's index or token; choose another name")
        self.labels_dir.mkdir(parents=True, exist_ok=True)
        with open(self.labels_dir / ".lock", "w") as lock:  # replicas read-modify-write one file
            fcntl.flock(lock, fcntl.LOCK_EX)
            labels = self.human_labels(name)
            taken = [t for t, other in labels.items() if other == label and t != token]
            if label and taken:
                raise EditError(f"label {label!r} already names {taken[0]}; choose another name")
            if label:
                labels[token] = label
            else:
                labels.pop(token, None)
            atomic_write_bytes(self._labels_file(name), json.dumps(labels, indent=1, sort_keys=True).encode())
        return self.direction(name, i)

    def direction(self, name: str, i: int, human: dict[str, str] | None = None) -> dict:
        bank = self.get(name)
        token = bank.tokens[i]
        human = self.human_labels(name) if human is None else human
        auto = bank.labels.get(token, {}).get("auto")
        figures = bank.direction_score(i)
        return {
            "index": i,
            "token": token,
            "label": human.get(token) or bank.label(i) or token,
            "human_label": human.get(token),
            "auto_label": auto,
            "window": list(bank.window(i)),
            **{
                k: getattr(figures, k) if figures else None
                for k in ("score", "interval", "rank", "dead", "duplicate_of")
            },
        }

    def directions(self, name: str) -> list[dict]:
        """Best first by the oracle-free score (bank order if unmeasured); hidden ones left out."""
        human = self.human_labels(name)
        bank = self.get(name)
        return [self.direction(name, i, human) for i in bank.ranked() if not self.hidden(name, i)]

    def describe(self, name: str) -> dict:
        bank = self.get(name)
        ref = self.sources[name]
        return {
            "name": name,
            "source": ref if ref.startswith("models:/") else Path(ref).name,
            "directions": len(bank),
            "measured": bank.measured,
            "window": list(bank.window()),
            "base_model": bank.base_model.get("fingerprint"),
            "version": self.versions.get(name),
            "score": bank.scores.score if bank.scores else None,
            "live": bank.scores.live if bank.scores else None,
            "hidden": sum(self.hidden(name, i) for i in range(len(bank))),
        }


UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what the API documents; PIL would open many more


def decode_upload(data: str, resolution: int, max_pixels: int) -> torch.Tensor:
    """A base64 image (optionally a data: URL) -> (1, 3, R, R) in [-1, 1]; ImageError otherwise."""
    from noiseclr.data.images import image_tensor

    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image: not valid base64") from None
    return image_tensor(raw, resolution, "image", max_pixels, UPLOAD_FORMATS)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) float in [0, 1] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class EditEngine:
    """The model, the banks, and batched edits."""

    def __init__(self, cfg: ServeConfig, model: DiffusionModel | None = None):
        from noiseclr.models.base import load_model
        from noiseclr.utils.precision import resolve_dtype

        if cfg.tracking_uri:
            os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.tracking_uri)
        self.cfg = cfg
        self.model = model or load_model(cfg.model, device=cfg.device, dtype=resolve_dtype(cfg.precision))
        self.store = BankStore(cfg.banks, self.model, cfg.labels_dir, cfg.hide_dead)
        self._thumbs: dict[str, tuple[DirectionBank, list[bytes]]] = {}  # name -> (bank, strips)
        self._thumbs_guard = threading.Lock()
        self._thumb_locks: dict[str, threading.Lock] = {}
        self.on_thumbnail_chunk: Callable[[str], None] | None = None  # the server counts renders

    def reload(self, banks: dict[str, str]) -> None:
        """Swap to another set of banks (a new user_config): load first, then replace."""
        self.store = BankStore(banks, self.model, self.cfg.labels_dir, self.cfg.hide_dead)
        self._thumbs.clear()

    def follow_aliases(self) -> list[str]:
        """Reload the banks whose MLflow alias moved since they were loaded; returns their names."""
        moved = self.store.moved()
        if moved:
            self.store.refresh(moved)
            for name in moved:
                self._thumbs.pop(name, None)
            log.warning("bank alias moved: reloaded %s (versions %s)", moved, self.store.versions)
        return moved

    def units(self, req: EditRequest) -> int:
        """What a request costs the UNet, in rows x steps, read from the request alone (before
        any work is done for it): per step its edits' rows, eps(empty) and, under CFG, the
        prompt's row (no prompt means the domain prompt, guided); an upload's inversion adds a
        row per step. The replica's admission (`serving.admission`) expects a wait in proportion."""
        if req.image is not None:
            steps = req.steps or self.cfg.default_inversion_steps
            return steps * (len(req.edits) + 2)
        guided = req.prompt != "" and (req.guidance is None or req.guidance > 1)
        return (req.steps or self.cfg.default_steps) * (len(req.edits) + 1 + int(guided))

    def prepare(self, req: EditRequest) -> Job:
        """Check a request against the banks and the limits; resolve it to a Job (cheap, no UNet)."""
        lim = self.cfg.limits
        edits, seen = [], {}
        store, versions = self.store, {}  # one store throughout, even if `reload` swaps it meanwhile
        for item in req.edits:
            bank, versions[item.bank] = store.current(item.bank)
            i = store.index(item.bank, item.direction)
            if (item.bank, i) in seen:  # scales of one direction would add up past max_scale
                raise EditError(
                    f"edits: direction {item.direction!r} of bank {item.bank!r} is given twice (as "
                    f"{seen[(item.bank, i)]!r} too); give it once, with one scale"
                )
            seen[(item.bank, i)] = item.direction
            raw = bank.raw_scales(i, [item.scale])[0]
            hi, lo = bank.window(i)
            hi = hi if item.t_high is None else item.t_high
            lo = lo if item.t_low is None else item.t_low
            edits.append(sampler.Edit(bank.directions[i], raw, hi, lo, label=f"{item.bank}:{bank.tokens[i]}"))
        meta = {
            "edits": [e.label for e in edits],
            "raw_scales": [e.scale for e in edits],
            # the registered version of each bank that answered (None: a folder); the edit's
            # vectors were read from it here, so a reload after this point does not change them
            "versions": versions,
        }
        if req.image is not None:
            pixels = decode_upload(req.image, self.model.resolution, lim.max_pixels)
            start = request.from_pixels(pixels, req.steps or self.cfg.default_inversion_steps)
            return Job(start, edits, {**meta, "source": "upload", "steps": start.steps})
        # A request without a prompt edits an image of its banks' domain (their gallery prompt);
        # "" asks for an unconditional one.
        banks = request.prompt_banks(edits, store.banks)
        try:
            start = request.from_seeds(
                self.model, [req.seed], banks, req.prompt, req.guidance, req.steps or self.cfg.default_steps
            )
        except ValueError as err:
            shown = req.prompt if req.prompt is not None else request.domain_prompt(banks)
            raise EditError(f"prompt {shown!r}: {err}") from None
        return Job(
            start,
            edits,
            {
                **meta,
                "source": "seed",
                "seed": req.seed,
                "prompt": start.prompt,
                "guidance": start.guidance,
                "steps": start.steps,
            },
        )

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[bytes | Exception]:
        """Edit many requests in as few batched calls as their settings allow: uploads are
        inverted together per step count; then one sampling call per (steps, start) group, its
        edits the union of the group's, each trajectory scaling only its own.

        Each request gets its PNG or its own exception: a call that fails fails only the
        requests in it, and an image that comes out non-finite fails only its request; nothing
        is run twice."""
        out: dict[int, bytes | Exception] = {}
        uploads = defaultdict(list)
        for n, job in enumerate(jobs):
            if job.x_T is None:
                uploads[job.start.steps].append(n)
        for group in uploads.values():
            try:
                request.invert(self.model, [jobs[n].start for n in group])
            except Exception as err:  # becomes these requests' answers
                log.exception("inverting %d uploads failed", len(group))
                out.update(dict.fromkeys(group, err))
        groups = defaultdict(list)
        for n, job in enumerate(jobs):
            if n not in out:
                groups[(job.start.steps, job.start.start_t)].append(n)
        for key, members in groups.items():
            try:
                out.update(self._sample_group(jobs, members, *key))
            except Exception as err:  # becomes these requests' answers
                log.exception("a sampling call of %d requests failed", len(members))
                out.update(dict.fromkeys(members, err))
        return [out[n] for n in range(len(jobs))]

    def _sample_group(
        self, jobs: list[Job], members: list[int], steps: int, start: int | None
    ) -> dict[int, bytes | Exception]:
        """One sampling call for requests of one (steps, start): their PNGs, or a per-request error."""
        union: dict[tuple, int] = {}
        columns: list[sampler.Edit] = []
        for n in members:
            for e in jobs[n].edits:
                key = (e.label, e.t_high, e.t_low)
                if key not in union:
                    union[key] = len(columns)
                    columns.append(sampler.Edit(e.vector, 1.0, e.t_high, e.t_low, e.label))
        scales = torch.zeros(len(members), len(columns))
        for row, n in enumerate(members):
            for e in jobs[n].edits:
                scales[row, union[(e.label, e.t_high, e.t_low)]] += e.scale
        noise = [jobs[n].start.generators() for n in members]
        x0 = sampler.sample(
            self.model,
            torch.cat([jobs[n].x_T for n in members]),
            columns,
            scales,
            prompt=[jobs[n].start.prompt for n in members],
            guidance_scale=[jobs[n].start.guidance for n in members],
            steps=steps,
            start_t=start,
            generator=None if None in noise else [g for gens in noise for g in gens],
        )
        done: dict[int, bytes | Exception] = {}
        finite = torch.isfinite(x0.flatten(1)).all(dim=1).tolist()
        for n, image, ok in zip(members, sampler.decode(self.model, x0), finite, strict=True):
            done[n] = png_bytes(image) if ok else EditError("the edit gave a non-finite image")
        return done

    def thumbnails(self, name: str) -> list[bytes]:
        """Per direction a strip at the configured scales (the bank's units) from seed 0, cached
        on the replica. Rendered once per bank (single flight: concurrent callers wait for the
        render under way instead of starting their own), a chunk of directions per sampling call
        so that no call holds more than `thumbnail_max_rows` UNet rows."""
        with self._thumbs_guard:
            lock = self._thumb_locks.setdefault(name, threading.Lock())
        with lock:
            bank = self.store.get(name)
            cached = self._thumbs.get(name)
            if cached is not None and cached[0] is bank:
                return cached[1]
            s = len(self.cfg.thumbnail_scales)
            rows = 3 if request.domain_prompt([bank]) else 2  # empty, (prompt,) edit per image
            per_call = max(1, self.cfg.thumbnail_max_rows // (rows * s))
            strips: list[bytes] = []
            for first in range(0, len(bank), per_call):
                strips += self._thumbnail_chunk(bank, range(first, min(len(bank), first + per_call)))
                if self.on_thumbnail_chunk is not None:
                    self.on_thumbnail_chunk(name)
            if self.store.banks.get(name) is bank:  # not reloaded meanwhile
                self._thumbs[name] = (bank, strips)
            return strips

    def _thumbnail_chunk(self, bank: DirectionBank, indices: range) -> list[bytes]:
        k, s = len(indices), len(self.cfg.thumbnail_scales)
        edits = [sampler.Edit(bank.directions[i], 1.0, *bank.window(i), bank.tokens[i]) for i in indices]
        scales = torch.zeros(k * s, k)  # trajectory (c, j): the chunk's c-th direction at scale j
        for c, i in enumerate(indices):
            scales[c * s : (c + 1) * s, c] = torch.tensor(bank.raw_scales(i, self.cfg.thumbnail_scales))
        start = request.from_seeds(self.model, [0], [bank], steps=self.cfg.thumbnail_steps)  # its domain
        x0 = sampler.sample(
            self.model,
            start.x_T.expand(k * s, -1, -1, -1),
            edits,
            scales,
            prompt=start.prompt,
            guidance_scale=start.guidance,
            steps=start.steps,
            max_rows=self.cfg.thumbnail_max_rows,
            generator=sampler.repeat_generators(start.generators(), k * s),
        )
        images = sampler.decode(self.model, x0)
        images = images.reshape(k, s, *images.shape[1:])
        return [png_bytes(np.concatenate(list(row), axis=1)) for row in images]
