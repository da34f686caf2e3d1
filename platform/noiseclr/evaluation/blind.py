"""The oracle-free measurement: what each direction does to images of any model and domain,
judged on the decoded images alone (no labels, no world factors).

    m = BlindHarness(model, BlindProtocol(prompt="a photo of a face"), real=pixels)
    scores = m.measure(bank)                      # JSON-ready, written into bank.json

Space: decoded pixels, area-resized to `protocol.resolution` (64) per side, in [0, 1]. Pixels,
not VAE latents, because a latent's scale and channels differ between models (SD's 4 x 64 x 64,
the embedded model's own) while a pixel change means the same everywhere and is what the user
sees; 64 px keeps the cost and the noise of fine texture the same on every model.

Per signed direction (+s and -s apart, as the oracle protocol does), on n images edited inside
the bank's window from a shared trajectory top:

- change(s)    mean absolute pixel change of the image, in [0, 1] units;
- calibration  the smallest scale of the ladder whose change reaches `target` on separate
               calibration images without breaking them (binary search, as the oracle's);
               scale 1 of `noiseclr edit` then means that much change on any model;
- strength     change per unit of raw scale at the calibrated scale;
- consistency  how alike the edit's change is on two different images (NoiseCLR's own criterion,
               on the output instead of the noise): the mean cosine similarity over pairs of
               images of their change images (the same change everywhere: "stripes appear",
               "the background darkens"), or of their centred change-magnitude maps (a change in
               the same place that depends on the image: "the object turns green" moves a red and
               a blue object's pixels differently), whichever is higher; noise scores near 0;
- distinctness 1 - the largest mean cosine between its change and another direction's signed
               change on the same images (outside its own duplicate group), or the change of
               the null direction (a zero embedding at the same scale: a token without content
               still conditions the UNet unlike the empty prompt, so any direction does that
               much); above DUPLICATE_COS directions are grouped as duplicates, and one that
               only does what the null direction does is dead;
- area         the share of pixels that moved by more than AREA_THRESHOLD: how much of the
               image it disturbs;
- drift        how far the edited images' statistics leave the unedited ones' (high-frequency
               energy and colour spread, log-ratio): images turned to noise or flattened drift;
               above MAX_DRIFT an edit counts as breaking the image.

score = consistency x distinctness x (1 - area / 2) / (1 + log2(scale / ladder[0])): the last
factor is the strength (a direction that needs scale 32 to change the image as much as another
does at 1 is the weaker edit; on the shapes world it is what follows the oracle best alone,
docs/oracle-free.md). 0 for an edit that never reaches the target or breaks images. A
direction's score is its better sign's; it is dead when neither sign lives.
Bootstrap intervals resample images (calibrated scales fixed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ConfigDict, Field

from noiseclr.bank import DirectionBank, EditDefaults, Scores
from noiseclr.errors import DataError
from noiseclr.evaluation.harness import BaseProtocol, MeasuringHarness, Source
from noiseclr.models.base import DiffusionModel
from noiseclr.utils import parallel

log = logging.getLogger(__name__)

DUPLICATE_COS = 0.8  # signed changes this alike on the same images: the same edit
AREA_THRESHOLD = 0.1  # a pixel counts as disturbed beyond this change (max over channels)
MAX_DRIFT = 1.0  # |log ratio| of image statistics (x2.7) beyond which an edit breaks images:
# stripes drawn on an object raise the fine-detail energy by ~1.6x (0.5), noise far more
MIN_CONSISTENCY = 0.2  # below this an edit's changes are unrelated from image to image: noise


class BlindProtocol(BaseProtocol):
    """How a bank is measured without an oracle; every field is recorded with the scores."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | None = None  # generated images: this prompt (None: unconditional)
    generated: bool = True
    # real images: inversion_steps (the change is measured against the same round trip, so its
    # error does not count as an edit)
    window: tuple[int, int] | None = None  # (t_high, t_low); None: the bank's edit window
    target: float = Field(0.02, gt=0, lt=1)  # mean |pixel change| each signed edit is scaled to
    resolution: int = Field(64, ge=8)  # images compared at this size


def downsize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) -> (N, size, size, 3) by area averaging (antialiased)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(t, size=(size, size), mode="area").permute(0, 2, 3, 1).numpy()


def image_stats(images: np.ndarray) -> np.ndarray:
    """(N, 2): high-frequency energy (mean |Laplacian|) and colour spread (pixel std) per image."""
    lap = np.abs(
        4 * images[:, 1:-1, 1:-1]
        - images[:, :-2, 1:-1]
        - images[:, 2:, 1:-1]
        - images[:, 1:-1, :-2]
        - images[:, 1:-1, 2:]
    ).mean(axis=(1, 2, 3))
    return np.stack([lap, images.std(axis=(1, 2, 3))], axis=1)


def drift(before: np.ndarray, after: np.ndarray) -> float:
    """Largest |log ratio| of the mean image statistics after vs before (0: unchanged)."""
    eps = 1e-4
    ratio = (image_stats(after).mean(0) + eps) / (image_stats(before).mean(0) + eps)
    return float(np.abs(np.log(ratio)).max())


def pair_cosines(deltas: np.ndarray) -> np.ndarray:
    """(N, N) cosine similarity between flattened change images."""
    flat = deltas.reshape(len(deltas), -1).astype(np.float64)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.maximum(norm, 1e-12)
    return unit @ unit.T


def mean_offdiag(m: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Mean of m[a, b] over a != b (over the resampled indices `idx`, pairs of distinct draws)."""
    if idx is not None:
        m = m[np.ix_(idx, idx)]
        same = idx[:, None] == idx[None, :]
    else:
        same = np.eye(len(m), dtype=bool)
    vals = m[~same]
    return float(vals.mean()) if vals.size else 0.0


@dataclass
class SignedEdit:
    """One direction at one calibrated signed scale on the scored images."""

    scale: float
    reached: bool  # its change reached the target on the calibration images
    deltas: np.ndarray  # (N, r, r, 3) after - before on the scored images
    drift: float
    # (N,) per image, the cosine with the change the null direction (a zero embedding: what any
    # token does, whatever its content) makes at the same scale; None: no null reference
    null_cos: np.ndarray | None = None

    def null_similarity(self, idx: np.ndarray | None = None) -> float:
        if self.null_cos is None:
            return 0.0
        return float(self.null_cos.mean() if idx is None else self.null_cos[idx].mean())

    def __post_init__(self) -> None:
        place = np.abs(self.deltas).sum(axis=3)  # (N, r, r) where the image changed, how much
        place -= place.mean(axis=(1, 2), keepdims=True)
        self.cos_change, self.cos_place = pair_cosines(self.deltas), pair_cosines(place)
        self._area = (np.abs(self.deltas).max(axis=3) > AREA_THRESHOLD).mean(axis=(1, 2))  # (N,)

    def consistency(self, idx: np.ndarray | None = None) -> float:
        """max(mean pairwise cosine of the changes, of their centred magnitude maps)."""
        return max(mean_offdiag(self.cos_change, idx), mean_offdiag(self.cos_place, idx))

    @property
    def changes(self) -> np.ndarray:
        return np.abs(self.deltas).mean(axis=(1, 2, 3))

    @property
    def broken(self) -> bool:
        return self.drift > MAX_DRIFT

    def area(self, idx: np.ndarray | None = None) -> float:
        """The share of pixels moved by more than AREA_THRESHOLD (on the images idx)."""
        return float(self._area.mean() if idx is None else self._area[idx].mean())


def edit_score(consistency: float, distinctness: float, area: float, live: bool, steps: float = 0.0) -> float:
    """consistency x distinctness x (1 - area / 2) / (1 + steps), 0 for an edit that is not live;
    steps = log2(calibrated scale / the ladder's first)."""
    if not live:
        return 0.0
    return max(0.0, consistency) * max(0.0, distinctness) * (1.0 - area / 2) / (1.0 + max(0.0, steps))


class BlindHarness(MeasuringHarness):
    """Prepares the images once (generated from a prompt and/or real ones inverted); measures any
    number of banks of the model on them: the oracle-free scorer on the shared harness."""

    p: BlindProtocol

    def __init__(
        self,
        model: DiffusionModel,
        protocol: BlindProtocol | None = None,
        real: torch.Tensor | None = None,  # (M, 3, H, W) in [-1, 1]: scored + calibration images
        progress: bool = True,
        real_names: list[str] | None = None,  # where the real images came from (recorded)
        streams: int = parallel.MAX_STREAMS,  # directions measured at once on a CPU (1: in turn)
    ):
        p = protocol or BlindProtocol()
        if not p.generated and (real is None or len(real) < 3):
            raise DataError(
                "the oracle-free measurement needs generated images or at least 3 real ones "
                "(2 scored, 1 for calibration)"
            )
        self.n_real, self.real_names, self.cal_names = 0, list(real_names or []), []
        sets = None
        if real is not None:
            if len(real) < 2:
                raise DataError(f"the oracle-free measurement needs at least 2 real images, got {len(real)}")
            n_cal = max(1, min(p.calibration_images, len(real) // 3))
            scored = real[: min(p.n_images, len(real) - n_cal)]
            self.n_real = len(scored)
            self.cal_names = self.real_names[len(real) - n_cal :]
            sets = {"real": scored, "cal-real": real[len(real) - n_cal :]}
        super().__init__(model, p, p.prompt, sets, p.generated, progress, streams)

    def view(self, images: np.ndarray) -> np.ndarray:
        return downsize(images, self.p.resolution)

    def _window(self, bank: DirectionBank, k: int | None = None) -> tuple[int, int]:
        """The protocol's window, else direction k's (or the bank's) measured one."""
        if not bank.token_directions:
            return bank.shift_at, 0
        return tuple(self.p.window) if self.p.window else bank.window(k)

    def _edited(self, bank: DirectionBank, k: int, src: Source, scales: list[float]) -> np.ndarray:
        """(N, S, r, r, 3) src's images edited by direction k at each raw scale."""
        imgs = self.edited(bank, k, src, scales, self._window(bank, k))
        n, s, r = *imgs.shape[:2], self.p.resolution
        return self.view(imgs.reshape(n * s, *imgs.shape[2:])).reshape(n, s, r, r, 3)

    def calibrate(self, bank: DirectionBank, k: int) -> tuple[list[float], list[bool]]:
        """([-s, +s], [reached-, reached+]): per sign the smallest ladder scale whose change on the
        calibration images reaches the target without breaking them (`harness.search_ladder`)."""
        cals = self.calibration(self._window(bank, k)[0])
        before = np.concatenate([c.before for c in cals])

        def judge(scales: list[float]) -> list[str]:
            edited = [self._edited(bank, k, c, scales) for c in cals]
            verdicts = []
            for j in range(len(scales)):
                after = np.concatenate([e[:, j] for e in edited])
                if drift(before, after) > MAX_DRIFT:
                    verdicts.append("broken")
                elif float(np.abs(after - before).mean()) >= self.p.target:
                    verdicts.append("reached")
                else:
                    verdicts.append("weak")
            return verdicts

        return self.calibrate_with(bank, judge, settle=True)

    def signed_edits(self, bank: DirectionBank) -> list[list[SignedEdit]]:
        """(K, 2) signed edits at calibrated scales on the scored images (all sources pooled);
        directions measured concurrently on a CPU's cores (utils.parallel)."""
        windows = [self._window(bank, k) for k in range(len(bank))]
        # per window (a direction's own, issue 26.3): the scored images, their "before", the null,
        # all made before the threads share them
        per_window: dict[tuple[int, int], tuple[list[Source], np.ndarray, dict]] = {}
        for window in dict.fromkeys(windows):
            scored = self.scored(window[0])
            before = np.concatenate([s.before for s in scored])
            per_window[window] = (scored, before, self._null_changes(bank, scored, before, window))

        def one(k: int) -> list[SignedEdit]:
            scored, before, null = per_window[windows[k]]
            scales, reached = self.calibrate(bank, k)
            after = np.concatenate([self._edited(bank, k, s, scales) for s in scored])  # (N, 2, ...)
            pair = []
            for j in range(2):
                delta = after[:, j] - before
                ref = null.get(scales[j])
                cos = None if ref is None else _row_cosines(delta, ref)
                pair.append(SignedEdit(scales[j], reached[j], delta, drift(before, after[:, j]), cos))
            return pair

        return parallel.map_ordered(
            one, range(len(bank)), self.model.device, f"measure {bank.name}", self.progress, self.streams
        )

    def _null_changes(
        self, bank: DirectionBank, scored: list[Source], before: np.ndarray, window: tuple[int, int]
    ) -> dict:
        """signed scale -> (N, r, r, 3) the change a zero token embedding makes at that scale on
        the scored images: the floor of an embedding direction (a token with no content still
        conditions the UNet unlike the empty prompt). None for pullback banks (x_t shifts)."""
        if not bank.token_directions:
            return {}
        zero = DirectionBank(
            torch.zeros(1, bank.directions.shape[1]),
            dict(bank.base_model),
            name="null",
            edit_defaults=EditDefaults(window=window),
        )
        ladder = self.ladder(bank)
        scales = [-a for a in ladder] + ladder
        half = len(ladder)  # the two signs on two streams

        def edited(part: list[float]) -> np.ndarray:
            return np.concatenate([self._edited(zero, 0, s, part) for s in scored])  # (N, S/2, ...)

        signs = parallel.map_ordered(
            edited, [scales[:half], scales[half:]], self.model.device, progress=False
        )
        after = np.concatenate(signs, axis=1)
        return {sc: after[:, j] - before for j, sc in enumerate(scales)}

    def measure(self, bank: DirectionBank) -> dict:
        """Scores of every direction (JSON-ready, for bank.json's `scores`)."""
        return self.measure_distinct(bank, prune=False)[1]

    def measure_distinct(self, bank: DirectionBank, prune: bool = True) -> tuple[list[int], dict]:
        """(kept, scores): with `prune`, the live directions, one per duplicate group (its best),
        and the scores of the bank they form alone, from the same edits (no second model pass:
        a direction's edits do not depend on the others; its distinctness and rank do)."""
        edits = self.signed_edits(bank)
        result = score_edits(edits, n_boot=self.p.n_boot, ladder0=self.ladder(bank)[0])
        kept = list(range(len(bank)))
        if prune:
            kept = distinct_live(result)
            if not kept:
                raise DataError(f"bank {bank.name!r}: no direction is live on these images; nothing to keep")
            if len(kept) < len(bank):
                result = score_edits(
                    [edits[k] for k in kept], n_boot=self.p.n_boot, ladder0=self.ladder(bank)[0]
                )
        result["protocol"] = {
            **self.p.model_dump(),
            "window": list(self._window(bank)),
            "windows": [list(self._window(bank, k)) for k in kept],
            "ladder": self.ladder(bank),
            "images": {
                "generated": self.p.n_images if self.p.generated else 0,
                "real": self.n_real,
                "seeds": [self.p.seed, self.p.seed + self.p.n_images] if self.p.generated else None,
                "real_files": self.real_names[: self.n_real],
                "calibration_files": self.cal_names,
            },
            "space": f"pixels at {self.p.resolution}x{self.p.resolution}",
        }
        return kept, result


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) cosine between a[i] and b[i] flattened."""
    fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)


def per_image_cross(edits: list[list[SignedEdit]]) -> np.ndarray:
    """(N, 2K, 2K): on each image, the cosine between every two signed edits' changes (row
    2a + s: direction a, sign s). Computed once; any resample of images averages its rows."""
    n = len(edits[0][0].deltas)
    out = []
    for i in range(n):
        rows = np.stack([e.deltas[i].ravel() for pair in edits for e in pair]).astype(np.float64)
        unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        out.append(unit @ unit.T)
    return np.stack(out)


def _signed_stats(
    edits: list[list[SignedEdit]], per_image: np.ndarray, idx: np.ndarray | None
) -> tuple[np.ndarray, ...]:
    """(K, 2) consistency, distinctness, area, live; (K, 2, K, 2) cross cosines, on images idx.
    Distinctness is taken against directions outside the direction's own duplicate group (a
    group is flagged as such; its members need not rank each other down)."""
    k = len(edits)
    cross = (per_image if idx is None else per_image[idx]).mean(axis=0).reshape(k, 2, k, 2)
    cons, area, null, live = np.zeros((k, 2)), np.zeros((k, 2)), np.zeros((k, 2)), np.zeros((k, 2), bool)
    for a, pair in enumerate(edits):
        for s, e in enumerate(pair):
            cons[a, s] = e.consistency(idx)
            area[a, s] = e.area(idx)
            null[a, s] = e.null_similarity(idx)
            live[a, s] = (
                e.reached and not e.broken and cons[a, s] >= MIN_CONSISTENCY and null[a, s] <= DUPLICATE_COS
            )
    # distinctness: 1 - the largest mean cosine with a live signed edit of another direction
    others = np.where(live[None, None], cross, -np.inf)  # (K, 2, K, 2), only live targets
    for group in duplicate_groups(cross, live):  # not itself, nor its duplicates
        others[np.ix_(group, [0, 1], group, [0, 1])] = -np.inf
    nearest = others.reshape(k, 2, -1).max(axis=2) if k > 1 else np.full((k, 2), -np.inf)
    distinct = 1.0 - np.clip(np.maximum(nearest, null), 0.0, None)  # the null direction counts too
    return cons, distinct, area, live, cross


def score_edits(
    edits: list[list[SignedEdit]], n_boot: int = 200, seed: int = 0, ladder0: float | None = None
) -> dict:
    """Per-direction scores, ranks, dead flags, duplicate groups and bootstrap intervals."""
    k = len(edits)
    per_image = per_image_cross(edits)
    cons, distinct, area, live, cross = _signed_stats(edits, per_image, None)
    base = min(abs(e.scale) for pair in edits for e in pair) if ladder0 is None else ladder0
    steps = np.array([[np.log2(abs(e.scale) / base) for e in pair] for pair in edits])
    score = np.vectorize(edit_score)(cons, distinct, area, live, steps)
    drifts = np.array([[e.drift for e in pair] for pair in edits])
    whole = bank_aggregates(score, cons, area, drifts, live, cross)
    n = len(edits[0][0].deltas)
    rng = np.random.default_rng(seed)
    boots, agg_boots = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        c, d, a, lv, cr = _signed_stats(edits, per_image, idx)
        s = np.vectorize(edit_score)(c, d, a, lv, steps)
        boots.append(s.max(axis=1))
        agg_boots.append(bank_aggregates(s, c, a, drifts, lv, cr))
    boots = np.array(boots)  # (B, K)
    groups = duplicate_groups(cross, live)
    best = score.max(axis=1)
    order = [int(i) for i in np.argsort(-best, kind="stable")]
    directions = []
    for i in range(k):
        group = next((g for g in groups if i in g), [i])
        head = max(group, key=lambda j: (best[j], -j))  # a group is represented by its best
        signs = {}
        for s, sign in enumerate("-+"):
            e = edits[i][s]
            signs[sign] = {
                "scale": float(e.scale),
                "reached": bool(e.reached),
                "change": round(float(e.changes.mean()), 5),
                "strength": round(float(e.changes.mean() / abs(e.scale)), 6),
                "consistency": round(float(cons[i, s]), 4),
                "distinctness": round(float(distinct[i, s]), 4),
                "null_similarity": round(float(e.null_similarity()), 4),
                "area": round(float(area[i, s]), 4),
                "drift": round(float(e.drift), 4),
                "broken": bool(e.broken),
                "live": bool(live[i, s]),
                "score": round(float(score[i, s]), 4),
            }
        directions.append(
            {
                "index": i,
                "score": round(float(best[i]), 4),
                "interval": [round(float(np.quantile(boots[:, i], q)), 4) for q in (0.025, 0.975)],
                "rank": order.index(i) + 1,
                "dead": not bool(live[i].any()),
                "duplicate_of": head if head != i else None,
                "signs": signs,
            }
        )
    live_count = sum(not d["dead"] for d in directions)
    once = np.array([d["duplicate_of"] is None for d in directions])  # a duplicate group counts once
    # bank-level candidates (AGGREGATES), each with its interval over the same resamples
    aggregates = {
        name: {
            "value": round(float(value), 4),
            "interval": centred_interval(value, [b[name] for b in agg_boots]),
        }
        for name, value in whole.items()
    }
    return {
        # the bank's: mean over directions of their scores, dead ones and duplicates 0
        "score": round(float((best * once).mean()), 4),
        "interval": aggregates["mean_score"]["interval"],  # one definition for the one figure
        "live": live_count,
        "dead": k - live_count,
        "distinct_live": len(
            {
                d["duplicate_of"] if d["duplicate_of"] is not None else d["index"]
                for d in directions
                if not d["dead"]
            }
        ),
        "order": order,
        "groups": [g for g in groups if len(g) > 1],
        "aggregates": aggregates,
        "directions": directions,
    }


# Bank-level figures measured as sweep objectives against the oracle across banks
# (jobs/research/validate_bank_objective.py, docs/oracle-free.md).
# The sweeps' objective off the oracle: of these, what ranks banks as the oracle's alignment does
# (rank correlation 0.75 [0.32, 0.94] over 15 banks of different k, docs/oracle-free.md). Among
# banks of one k it falls as tau rises while the alignment rises (-0.40 over 9 banks of k 12).
OBJECTIVE = "diversity"
AGGREGATES = (
    "mean_score",  # mean direction score, dead directions and duplicates 0 (the `score`)
    "sum_score",  # the same summed: more good edits count more
    "top3",  # mean of the three best distinct scores (0 where fewer live)
    "distinct_live",  # live duplicate groups
    "diversity",  # effective number of different live edits (participation ratio of their cosines)
    "consistency",  # mean consistency of the live edits (best sign of each group head)
    "area",  # mean share of pixels the live edits disturb (damage)
    "drift",  # mean drift of the live edits (damage)
)


def centred_interval(value: float, resampled: list[float]) -> list[float]:
    """The 95% spread of the bootstrap resamples around the measured value (the percentile
    interval moved by value - median, so its median falls on the value). Resampling images with
    replacement lowers some bank figures by itself (duplicated images make the mean cosines
    between edits noisier, and a noisier |cosine| is larger: a bank's diversity falls by ~1 of
    ~6 at 8 images), so the plain percentile interval can lie wholly below the measurement."""
    if not resampled:
        return [round(float(value), 4)] * 2
    low, mid, high = np.quantile(resampled, [0.025, 0.5, 0.975])
    return [round(float(value - (mid - low)), 4), round(float(value + (high - mid)), 4)]


def bank_aggregates(
    score: np.ndarray,  # (K, 2) signed edit scores
    cons: np.ndarray,  # (K, 2)
    area: np.ndarray,  # (K, 2)
    drifts: np.ndarray,  # (K, 2)
    live: np.ndarray,  # (K, 2) bool
    cross: np.ndarray,  # (K, 2, K, 2) mean cosine between signed changes
) -> dict[str, float]:
    """Every candidate of AGGREGATES for one bank, from its signed edits' figures."""
    k = len(score)
    best_sign = score.argmax(axis=1)
    best = score.max(axis=1)
    heads = []  # live directions that head their duplicate group
    for group in duplicate_groups(cross, live):
        head = max(group, key=lambda j: (best[j], -j))
        if live[head].any():
            heads.append(head)
    sign = [int(best_sign[h]) if live[h, best_sign[h]] else int(live[h].argmax()) for h in heads]
    vals = np.sort(best[heads])[::-1] if heads else np.zeros(0)
    if heads:
        g = np.abs(
            np.array(
                [
                    [cross[a, sa, b, sb] for b, sb in zip(heads, sign, strict=True)]
                    for a, sa in zip(heads, sign, strict=True)
                ]
            )
        )
        diversity = float(len(heads) ** 2 / max((g**2).sum(), 1e-12))
    else:
        diversity = 0.0

    def on_heads(m: np.ndarray) -> float:
        return float(np.mean([m[h, s] for h, s in zip(heads, sign, strict=True)])) if heads else 0.0

    return {
        "mean_score": float(vals.sum() / k) if k else 0.0,
        "sum_score": float(vals.sum()),
        "top3": float(np.pad(vals, (0, max(0, 3 - len(vals))))[:3].mean()),
        "distinct_live": float(len(heads)),
        "diversity": diversity,
        "consistency": on_heads(cons),
        "area": on_heads(area),
        "drift": on_heads(drifts),
    }


def pack_edits(edits: list[list[SignedEdit]]) -> dict[str, np.ndarray]:
    """Signed edits as arrays (np.savez), so bank figures can be recomputed without the model."""
    n = len(edits[0][0].deltas)
    return {
        "deltas": np.array([[e.deltas for e in pair] for pair in edits], dtype=np.float16),
        "scales": np.array([[e.scale for e in pair] for pair in edits]),
        "reached": np.array([[e.reached for e in pair] for pair in edits]),
        "drift": np.array([[e.drift for e in pair] for pair in edits]),
        "null_cos": np.array(
            [[e.null_cos if e.null_cos is not None else np.full(n, np.nan) for e in pair] for pair in edits]
        ),
    }


def unpack_edits(arrays) -> list[list[SignedEdit]]:
    """pack_edits' arrays back to signed edits."""
    out = []
    for k in range(len(arrays["scales"])):
        pair = []
        for s in range(2):
            null = arrays["null_cos"][k, s]
            pair.append(
                SignedEdit(
                    float(arrays["scales"][k, s]),
                    bool(arrays["reached"][k, s]),
                    arrays["deltas"][k, s].astype(np.float32),
                    float(arrays["drift"][k, s]),
                    None if np.isnan(null).all() else null,
                )
            )
        out.append(pair)
    return out


def distinct_live(result: dict) -> list[int]:
    """The directions worth keeping from `score_edits`' result: live, and the best of their
    duplicate group (a group's other members repeat its edit), in bank order."""
    return [d["index"] for d in result["directions"] if not d["dead"] and d["duplicate_of"] is None]


def duplicate_groups(cross: np.ndarray, live: np.ndarray) -> list[list[int]]:
    """Live directions whose signed changes are alike (cosine > DUPLICATE_COS in some sign
    pairing) joined into groups (union-find); each group sorted, singletons included."""
    k = cross.shape[0]
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(k):
        for b in range(a + 1, k):
            alike = any(
                live[a, s] and live[b, t] and cross[a, s, b, t] > DUPLICATE_COS
                for s in range(2)
                for t in range(2)
            )
            if alike:
                parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for i in range(k):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def real_images(
    uri: str,
    model: DiffusionModel,
    protocol: BlindProtocol,
    storage_options: dict | None = None,
    skip: int = 0,
):
    """The scored + calibration images under `uri` (an ImageSet: pixels and file names): the
    first ones after `skip` files (a re-measurement skips those the first measurement read).
    Where too few are left after `skip`, the first ones again, with a warning; the set's
    `skipped` says which happened."""
    from noiseclr.data.images import ImageSet, load_images

    want = protocol.n_images + protocol.calibration_images
    found = load_images(uri, model.resolution, limit=skip + want, storage_options=storage_options)
    if skip and len(found.files) - skip < min(want, 3):
        log.warning("%s holds too few images to measure on others than the first: measured on those", uri)
        skip = 0
    part = slice(skip, skip + want)
    return ImageSet(found.pixels[part], found.files[part], found.bad_files, skipped=skip)


def measure_into(
    model: DiffusionModel,
    bank: DirectionBank,
    protocol: BlindProtocol,
    real: torch.Tensor | None = None,
    progress: bool = True,
    real_names: list[str] | None = None,
) -> dict:
    """Measure `bank` on generated (and `real`) images and store the result in it."""
    result = BlindHarness(model, protocol, real=real, progress=progress, real_names=real_names).measure(bank)
    bank.store_scores(result)
    return result


def summary_line(s: Scores) -> str:
    """One line for logs: the bank's score, live and dead counts, the best directions."""
    best = ", ".join(f"#{i} {s.directions[i].score:.2f}" for i in s.order[:3])
    groups = f", duplicate groups {s.groups}" if s.groups else ""
    counts = f"{s.live} live, {s.dead} dead{groups}"
    return f"oracle-free score {s.score:.3f} {list(s.interval)}: {counts}; best {best}"


def scores_table(bank: DirectionBank) -> str:
    """The bank's directions best first as a markdown table ("" if it was never measured)."""
    s = bank.scores
    if s is None:
        return ""
    lines = [
        "| rank | # | token | label | score [95% CI] | state | - scale / change / consistency "
        "| + scale / change / consistency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in s.order:
        d = s.directions[i]
        state = bank.state(i)
        if state == "duplicate":
            state = f"duplicate of #{bank.duplicate_of(i)}"
        label = bank.label(i) or "-"
        signs = [
            f"{e.scale:g} / {e.change:.3f} / {e.consistency:.2f}" + ("" if e.live else " (off)")
            for e in (d.signs["-"], d.signs["+"])
        ]
        lines.append(
            f"| {d.rank} | {i} | `{bank.tokens[i]}` | {label} | {d.score:.2f} {list(d.interval)} "
            f"| {state} | {signs[0]} | {signs[1]} |"
        )
    lines.append("")
    lines.append(summary_line(s))
    return "\n".join(lines)
