"""Rank correlation with bootstrap intervals: how the oracle-free measurement is validated
against the oracle (docs/oracle-free.md), over directions or over banks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import spearmanr


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); nan when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def bootstrap_interval(
    stat: Callable[..., float], *cols: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> list[float]:
    """95% percentile interval of stat(*cols) over resamples of the rows (cols resampled
    together); resamples where the statistic is undefined (nan) are left out."""
    rng = np.random.default_rng(seed)
    cols = tuple(np.asarray(c) for c in cols)
    n = len(cols[0])
    vals = [stat(*(c[idx] for c in cols)) for idx in (rng.integers(0, n, n) for _ in range(n_boot))]
    vals = np.array([v for v in vals if np.isfinite(v)])
    if not vals.size:
        return [float("nan"), float("nan")]
    return [round(float(np.quantile(vals, q)), 3) for q in (0.025, 0.975)]


def partial_spearman(a: np.ndarray, b: np.ndarray, given: np.ndarray) -> float:
    """Spearman's rho between a and b with `given` held out: the correlation of their ranks once
    each rank is regressed on the ranks of `given` (e.g. a bank figure against the alignment with
    the number of directions, which lifts both, taken away); nan when undefined."""
    from scipy.stats import rankdata

    a, b, given = (np.asarray(x, dtype=float) for x in (a, b, given))
    if len(a) < 4 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    design = np.c_[np.ones(len(a)), rankdata(given)]

    def residual(x: np.ndarray) -> np.ndarray:
        r = rankdata(x)
        return r - design @ np.linalg.lstsq(design, r, rcond=None)[0]

    ra, rb = residual(a), residual(b)
    if ra.std() < 1e-12 or rb.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
