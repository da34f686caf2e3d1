"""The evaluation protocol: edit world images with every direction at a calibrated strength,
measure every factor before and after with the oracle, and score against the noise floor.

    harness = Harness(model, Protocol(fixed={"x": "center", "y": "middle"}))
    result = harness.evaluate(bank)          # a NoiseCLR, word or pullback bank
    ceiling = harness.evaluate_perfect()     # rendered one-factor edits through the VAE

What the protocol fixes, so every row of a comparison is measured the same way:
- images: n generated (seeded, prompted with the domain's fixed words, e.g. "a shape at middle
  center") and n real ones (rendered from the domain, DDIM-inverted), the same for every bank;
- the edit window: directions act only for t <= window[0]. Editing from t = 1000 re-draws the
  scene on the embedded model (new position, shape, colour), which measures re-sampling, not
  editing. The trajectory above the window is shared by all edits of an image (run once);
- per-direction windows (`windows`, optional): candidate window tops; each direction is
  calibrated in each and keeps the one where its calibrated edits are best on the calibration
  images (mean quality of its two signs; ties to the lower top), as its scale is chosen there;
- calibration: each signed edit (+s, -s) gets the smallest scale of a ladder at which its total
  effect above the floor reaches `target_effect` bins on separate calibration images without
  breaking the object, so weak and strong directions are compared at equal strength;
- the noise floor: the drift of the world's factors between a rendered scene and the model's
  rendering of it (VAE round trip, inversion round trip), per factor (metrics.noise_floor).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import Field, field_validator, model_validator

from noiseclr.bank import DirectionBank
from noiseclr.domains import shapes
from noiseclr.domains.oracle import Measurement, measure
from noiseclr.editing.sampler import decode, encode
from noiseclr.errors import ConfigError, WorldError
from noiseclr.evaluation.harness import CALIBRATION_SEED_OFFSET, BaseProtocol, MeasuringHarness, Source
from noiseclr.evaluation.metrics import (
    FACTORS,
    Changes,
    EditScore,
    bootstrap,
    changes,
    noise_floor,
    score_bank,
    score_edit,
    summary,
)
from noiseclr.models.base import DiffusionModel
from noiseclr.utils import parallel
from noiseclr.utils.images import make_grid


class Protocol(BaseProtocol):
    """How banks are measured; every field is recorded in the result."""

    fixed: dict[str, str] = Field(default_factory=dict)  # the domain: world factors held constant
    n_images: int = Field(16, ge=2)  # generated and real images each
    inversion_steps: int = Field(50, ge=2)  # real images: inversion and editing steps
    real: bool = True
    window: tuple[int, int] = (600, 0)  # t_high, t_low of every NoiseCLR edit
    # Candidate window tops tried per direction (t_low stays window[1]); empty: window only.
    windows: tuple[int, ...] = ()
    target_effect: float = Field(0.5, gt=0)  # bins of total effect each signed edit is scaled to
    max_broken: float = Field(0.25, ge=0, le=1)  # share of calibration images allowed to break
    seed: int = 1000

    @field_validator("fixed")
    @classmethod
    def _known(cls, fixed: dict[str, str]) -> dict[str, str]:
        for f, w in fixed.items():
            if f not in shapes.FACTOR_WORDS or w not in shapes.FACTOR_WORDS[f]:
                raise WorldError(f"fixed {f}={w!r}: allowed {dict(shapes.FACTOR_WORDS)}")
        return fixed

    @field_validator("window")
    @classmethod
    def _window(cls, window: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= window[1] < window[0] <= 1000:
            raise ValueError(f"window (t_high, t_low) must satisfy 0 <= t_low < t_high <= 1000, got {window}")
        return window

    @field_validator("windows")
    @classmethod
    def _windows(cls, windows: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 < t <= 1000 for t in windows) or len(set(windows)) != len(windows):
            raise ValueError(f"windows must be distinct window tops in 1..1000, got {windows}")
        return tuple(sorted(windows))

    @model_validator(mode="after")
    def _windows_above_low(self) -> Protocol:
        if any(t <= self.window[1] for t in self.windows):
            raise ValueError(f"every window top must lie above t_low = {self.window[1]}, got {self.windows}")
        return self

    @property
    def tops(self) -> tuple[int, ...]:
        """The window tops each direction is calibrated in."""
        return self.windows or (self.window[0],)

    @property
    def factors(self) -> tuple[str, ...]:
        """The factors that vary in the domain: the summary scores are taken over these."""
        return tuple(f for f in FACTORS if f not in self.fixed)

    @property
    def prompt(self) -> str:
        return shapes.caption(dict(self.fixed))


def require_oracle(model: DiffusionModel) -> None:
    """ConfigError unless the oracle can read this model's images (a shapes-world model).

    On any other model the oracle would still run and read every edit as "none" (and a caller
    storing its calibration would rewrite a bank's measured scales with the ladder's top)."""
    if not model.has_oracle:
        raise ConfigError(
            f"the oracle measures edits of the shapes world's models only; {model.source!r} has no "
            "known factors to read: measure its banks without an oracle, `noiseclr measure BANK "
            f"--model {model.source}` (nothing was written)"
        )


class Harness(MeasuringHarness):
    """Prepares the protocol's images and noise floor once; evaluates any number of banks: the
    oracle's scorer on the shared harness (images read as the world's factors)."""

    p: Protocol

    def __init__(
        self,
        model: DiffusionModel,
        protocol: Protocol | None = None,
        progress: bool = True,
        streams: int = parallel.MAX_STREAMS,  # directions measured at once on a CPU (1: in turn)
    ):
        require_oracle(model)
        p = protocol or Protocol()
        self.res = model.resolution
        self.scenes = shapes.sample_scenes(p.n_images, seed=p.seed, fixed=p.fixed)
        rendered = shapes.render(self.scenes, self.res)
        real = None
        if p.real:  # the domain's scenes, rendered: the "real" images, DDIM-inverted
            cal = shapes.sample_scenes(
                p.calibration_images, seed=p.seed + CALIBRATION_SEED_OFFSET, fixed=p.fixed
            )
            real = {"real": rendered * 2 - 1, "cal-real": shapes.render(cal, self.res) * 2 - 1}
        super().__init__(model, p, p.prompt, real, progress=progress, streams=streams)
        # The VAE round trip of each rendered scene: the "before" of the perfect edits.
        self.roundtrip = _measure(self._vae_roundtrip(rendered))
        truth = _measure(shapes.to_uint8(rendered))
        drifts = [changes(truth, self.roundtrip, self.res)]
        sources = self.sources(p.window[0])
        self.fidelity: float | None = None
        if p.real:  # the inversion round trip: its drift joins the floor
            recon = sources["real"].images
            self.fidelity = round(float(np.abs(recon - rendered.permute(0, 2, 3, 1).numpy()).mean()), 4)
            drifts.append(changes(truth, sources["real"].before, self.res))
        self.floor = noise_floor(drifts)

    def view(self, images: np.ndarray) -> list[Measurement]:
        return _measure(images)

    def _vae_roundtrip(self, rendered: torch.Tensor) -> np.ndarray:
        return decode(self.model, encode(self.model, rendered * 2 - 1))

    # --- one direction --------------------------------------------------------------------
    def _edited(
        self, bank: DirectionBank, k: int, src: Source, scales: list[float], n: int | None = None
    ) -> np.ndarray:
        """src's (first n) images edited by direction k at each scale: (N, S, H, W, 3)."""
        return self.edited(bank, k, src, scales, (src.top, self.p.window[1]), n)

    def _edit(self, bank: DirectionBank, k: int, src: Source, scales: list[float]) -> list[list[Measurement]]:
        """Measurements of src's images edited by direction k at each scale: [scale][image]."""
        imgs = self._edited(bank, k, src, scales)
        return [_measure(imgs[:, s]) for s in range(len(scales))]

    def _calibrate(self, bank: DirectionBank, k: int, top: int) -> list[float]:
        """[-s, +s] for direction k: for each sign, the smallest ladder scale whose total effect
        on the calibration images reaches the target without breaking more than max_broken of
        them (`harness.search_ladder`)."""
        p = self.p

        def verdict(score: EditScore) -> str:
            if score.broken > p.max_broken:
                return "broken"
            return "reached" if score.effect.sum() >= p.target_effect else "weak"

        return self.calibrate_with(
            bank, lambda scales: [verdict(e) for e in self._cal_scores(bank, k, top, scales)]
        )[0]

    def _cal_scores(self, bank: DirectionBank, k: int, top: int, scales: list[float]) -> list[EditScore]:
        """Direction k's edit at each scale, scored on all calibration images at once."""
        cals = self.calibration(top)
        per_cal = [[changes(c.before, r, self.res) for r in self._edit(bank, k, c, scales)] for c in cals]
        return [score_edit(Changes.concat(parts), self.floor) for parts in zip(*per_cal, strict=True)]

    def _cal_quality(self, bank: DirectionBank, k: int, top: int, scales: list[float]) -> float:
        """Mean quality of direction k's two calibrated edits on the calibration images."""
        return float(np.mean([e.quality for e in self._cal_scores(bank, k, top, scales)]))

    def _choose(self, bank: DirectionBank, k: int) -> tuple[int, list[float]]:
        """(window top, [-s, +s]) of direction k: calibrated in each candidate top, the top
        whose calibrated edits are best on the calibration images (ties: the lower top)."""
        if not bank.token_directions or len(self.p.tops) == 1:
            top = self._top(bank)
            return top, self._calibrate(bank, k, top)
        best: tuple[float, int, list[float]] | None = None
        for top in self.p.tops:  # ascending: a later top must do strictly better
            s = self._calibrate(bank, k, top)
            q = self._cal_quality(bank, k, top, s)
            if best is None or q > best[0]:
                best = (q, top, s)
        assert best is not None
        return best[1], best[2]

    def _top(self, bank: DirectionBank) -> int:
        return self.p.window[0] if bank.token_directions else bank.shift_at

    # --- banks ------------------------------------------------------------------------------
    def evaluate(self, bank: DirectionBank) -> dict:
        """Calibrated scales, per-source and pooled scores with intervals, for every direction
        (directions measured concurrently on a CPU's cores: utils.parallel)."""
        for top in [self._top(bank)] if not bank.token_directions else self.p.tops:
            self.sources(top)  # the shared sources exist before the threads read them

        def one(k: int) -> tuple[int, list[float], dict[str, list[Changes]]]:
            top, s = self._choose(bank, k)
            rows = {
                name: [changes(src.before, row, self.res) for row in self._edit(bank, k, src, s)]
                for name, src in self.sources(top).items()
                if not name.startswith("cal-")
            }
            return top, s, rows

        done = parallel.map_ordered(
            one, range(len(bank)), self.model.device, f"evaluate {bank.name}", self.progress, self.streams
        )
        per_source: dict[str, list[list[Changes]]] = {}
        for _, _, rows in done:
            for name, row in rows.items():
                per_source.setdefault(name, []).append(row)
        windows = [[top, 0 if not bank.token_directions else self.p.window[1]] for top, _, _ in done]
        result = self._result(per_source)
        result.update(
            bank=bank.name,
            method=bank.method,
            directions=len(bank),
            scales=[s for _, s, _ in done],
            windows=windows,
        )
        return result

    def evaluate_perfect(self, steps: int = 1) -> dict:
        """The ceiling: every factor of the domain edited exactly (rendered, through the VAE)
        by +-steps words (perfect_edit), scored like a bank."""
        per: list[list[Changes]] = []
        for f in self.p.factors:
            pair = []
            for sign in (-1, 1):
                edited = [perfect_edit(s, f, sign * steps) for s in self.scenes]
                after = _measure(self._vae_roundtrip(shapes.render(edited, self.res)))
                pair.append(changes(self.roundtrip, after, self.res))
            per.append(pair)
        result = self._result({"rendered": per})
        result.update(
            bank="perfect", method="perfect", directions=len(per), scales=[[-steps, steps]] * len(per)
        )
        result["direction_factors"] = list(self.p.factors)
        return result

    def best_edits_grid(self, bank: DirectionBank, result: dict, n: int = 4) -> Image.Image:
        """A row per domain factor: its best signed edit (by quality) on the first n generated
        and n real images, unedited above edited at the calibrated scale; "none" rows when
        no edit of the bank is dominated by that factor."""
        tops = [w[0] for w in result.get("windows") or [[self._top(bank)]] * len(bank)]
        sources = [s for name, s in self.sources(tops[0]).items() if not name.startswith("cal-")]
        edits = result["scores"]["all"]["edits"]
        rows, labels = [], []
        for f in self.p.factors:
            cands = [
                (e["quality"], k, i)
                for k, pair in enumerate(edits)
                for i, e in enumerate(pair)
                if e["dominant"] == f
            ]
            q, k, i = max(cands) if cands else (0.0, None, None)
            before = np.concatenate([src.images[:n] for src in sources])
            if k is None:
                after, label = np.ones_like(before), f"{f}: none"
            else:
                scale = result["scales"][k][i]
                own = [s for name, s in self.sources(tops[k]).items() if not name.startswith("cal-")]
                after = np.concatenate([self._edited(bank, k, src, [scale], n)[:, 0] for src in own])
                at = f"@{tops[k]}" if len(set(tops)) > 1 else ""
                label = f"{f}: #{k} x{scale:g}{at} {edits[k][i]['label']} q={q:.2f}"
            rows.append(np.concatenate([before, after]))
            labels.append(label)
        cols = len(rows[0]) // 2
        scale_up = 2 if self.res < 128 else 1
        grid = make_grid(np.concatenate(rows), cols=cols, scale=scale_up)
        canvas = Image.new("RGB", (grid.width + 230, grid.height), "white")
        canvas.paste(grid, (230, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = grid.height / len(rows)
        for j, text in enumerate(labels):
            draw.text((4, int(j * row_h + row_h / 2 - 6)), text[:38], fill="black")
        return canvas

    def _result(self, per_source: dict[str, list[list[Changes]]]) -> dict:
        p = self.p
        pooled = [
            [Changes.concat([per_source[name][k][i] for name in per_source]) for i in range(2)]
            for k in range(len(next(iter(per_source.values()))))
        ]
        scored = {"all": pooled, **per_source} if len(per_source) > 1 else {"all": pooled}
        out: dict = {
            name: summary(
                score_bank(per, self.floor, p.factors), bootstrap(per, self.floor, p.factors, p.n_boot)
            )
            for name, per in scored.items()
        }
        best = out["all"]
        labels = []
        for pair in best["edits"]:
            labels.append(", ".join(f"{sign}:{e['label']}" for sign, e in zip("-+", pair, strict=True)))
        return {
            "scores": out,
            "alignment": best["alignment"],
            "coverage": best["coverage"],
            "coverage_count": best["coverage_count"],
            "labels": labels,
            "floor": dict(zip(FACTORS, self.floor.round(4).tolist(), strict=True)),
            "fidelity": self.fidelity,
            "protocol": {**p.model_dump(), "prompt": p.prompt, "factors": list(p.factors)},
        }


def _measure(images) -> list[Measurement]:
    return [measure(img) for img in images]


# factor -> (Scene field of the value, Scene field of the word, word -> bin centre)
_CONTINUOUS = {
    "hue": ("hue", "hue_word", shapes.HUES),
    "size": ("size", "size_word", shapes.SIZES),
    "x": ("x", "x_word", shapes.XS),
    "y": ("y", "y_word", shapes.YS),
    "lightness": ("lightness", "lightness_word", shapes.LIGHTNESS),
}


def perfect_edit(scene: shapes.Scene, factor: str, steps: int) -> shapes.Scene:
    """`scene` with one factor moved `steps` words along its scale (the edits the world can
    show: the rendered value moves by whole bins and keeps its jitter). Hue and shape are
    cyclic; size, x, y and lightness stop at their ends (an image already there is unchanged);
    pattern: + striped, - plain."""
    if factor == "pattern":
        return dataclasses.replace(scene, pattern="striped" if steps > 0 else "plain")
    words = shapes.FACTOR_WORDS[factor]
    word = scene.words[factor]
    i = words.index(word) + steps
    new = words[i % len(words)] if factor in ("shape", "hue") else words[min(max(i, 0), len(words) - 1)]
    if new == word:
        return scene
    if factor == "shape":
        return dataclasses.replace(scene, shape=new)
    value_field, word_field, centres = _CONTINUOUS[factor]
    value = getattr(scene, value_field)
    # size jitter is relative, the others' absolute
    value = value * centres[new] / centres[word] if factor == "size" else value + centres[new] - centres[word]
    if factor == "hue":
        value %= 360.0
    return dataclasses.replace(scene, **{value_field: value, word_field: new})


def label_bank(bank: DirectionBank, result: dict) -> None:
    """Store the automatic labels next to any human label, the measured edit defaults (window
    and the calibrated [-s, +s] per direction) that `noiseclr edit` then uses, and the scores."""
    bank.metrics["evaluation"] = {k: result[k] for k in ("alignment", "coverage", "fidelity")} | {
        "interval": result["scores"]["all"]["intervals"]["alignment"],
        "protocol": result["protocol"],
    }
    for token, label in zip(bank.tokens, result["labels"], strict=True):
        bank.labels.setdefault(token, {})["auto"] = label
    bank.store_oracle_calibration(
        window=result["protocol"]["window"],
        scales=[(float(a), float(b)) for a, b in result["scales"]],
        target_effect=result["protocol"]["target_effect"],
        windows=result["windows"] if result["protocol"].get("windows") else None,
    )


def measure_bank(
    model: DiffusionModel, bank: DirectionBank, protocol: Protocol, out: str | Path, label: bool = True
) -> tuple[dict, dict[str, Path]]:
    """Evaluate `bank`, write its report into `out` and, with `label`, store its labels, edit
    defaults and scores in the bank object (the caller saves it). Returns (result, paths)."""
    from noiseclr.evaluation.report import write_report

    result = Harness(model, protocol).evaluate(bank)
    if label:
        label_bank(bank, result)
    return result, write_report(result, out)


def random_bank(model: DiffusionModel, like: DirectionBank, seed: int = 0) -> DirectionBank:
    """The floor: random token-embedding directions of the same count and norm as `like` (an
    SDXL pair: each half at the norm of `like`'s half, as its encoders see them)."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(like.directions.shape, generator=g)
    widths = list(like.base_model.get("widths") or [like.directions.shape[1]])
    halves = zip(vectors.split(widths, dim=1), like.directions.split(widths, dim=1), strict=True)
    vectors = torch.cat(
        [v / v.norm(dim=1, keepdim=True) * d.norm(dim=1, keepdim=True) for v, d in halves], dim=1
    )
    return DirectionBank(
        vectors, dict(like.base_model), name="random", config={"method": "noiseclr", "random": True}
    )


KNOWN_WORDS = ("square", "red", "blue", "large", "left", "top", "dark", "striped")


def word_bank(model: DiffusionModel, words: tuple[str, ...] = KNOWN_WORDS) -> DirectionBank:
    """Known-word directions: the input embeddings of world words, used as directions. A
    discoverer that found the world's own concepts would do about this well."""
    tok, enc = model.pipe.tokenizer, model.pipe.text_encoder
    table = enc.get_input_embeddings().weight.detach().float().cpu()
    ids = []
    for w in words:
        found = tok(w, add_special_tokens=False).input_ids
        if len(found) != 1:
            raise ValueError(f"word {w!r} is not one token of this model's tokenizer")
        ids.append(found[0])
    return DirectionBank(
        table[ids].clone(),
        {"source": model.source, "fingerprint": model.fingerprint, "hidden_size": table.shape[1]},
        name="words",
        config={"method": "noiseclr", "words": list(words)},
    )


# factor -> (from word, to word): the supervised reference of issue 26.4
REFERENCE_PAIRS = (
    ("circle", "square"),
    ("square", "triangle"),
    ("red", "blue"),
    ("small", "large"),
    ("light", "dark"),
    ("plain", "striped"),
)


def pair_bank(model: DiffusionModel, pairs: tuple[tuple[str, str], ...] = REFERENCE_PAIRS) -> DirectionBank:
    """A supervised reference: per pair of world words (a, b), the direction e(b) - e(a) between
    their input embeddings, the difference of the two one-word prompts. It uses the labels the
    method does not have, so it shows what the model can edit at all, not what was found."""
    words = word_bank(model, tuple(w for pair in pairs for w in pair))
    vectors = words.directions.view(len(pairs), 2, -1)
    return DirectionBank(
        (vectors[:, 1] - vectors[:, 0]).clone(),
        dict(words.base_model),
        name="pairs",
        tokens=[f"<{a}-to-{b}>" for a, b in pairs],
        config={"method": "noiseclr", "pairs": [list(p) for p in pairs]},
    )
