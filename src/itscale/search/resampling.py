"""Resampling schemes and weight utilities.

Each scheme takes normalised weights and returns N parent indices such that the expected
number of copies of particle i is N * w_i (all four are unbiased). Multinomial draws N
independent parents; systematic uses one uniform and N evenly spaced points; stratified one
uniform per stratum; residual keeps floor(N w_i) copies deterministically and draws the rest
multinomially. Cumulative sums are guarded against rounding: the last one is forced to 1,
so a draw can never fall off the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from itscale.errors import UsageError


def normalise_log_weights(log_weights: Sequence[float]) -> tuple[np.ndarray, bool]:
    """Normalised weights from log-weights, and whether all were -inf (then uniform)."""
    lw = np.asarray(log_weights, dtype=np.float64)
    finite = np.isfinite(lw) | (lw == -np.inf)
    lw = np.where(finite, lw, -np.inf)  # NaN and +inf never win silently
    top = lw.max() if lw.size else -np.inf
    if not np.isfinite(top):
        return np.full(lw.size, 1.0 / max(lw.size, 1)), True
    w = np.exp(lw - top)
    return w / w.sum(), False


def effective_sample_size(weights: np.ndarray) -> float:
    """1 / sum(w_i^2) for normalised weights: N for uniform weights, 1 for a single one."""
    return float(1.0 / np.square(weights).sum())


def _cumulative(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights)
    c[-1] = 1.0
    return c


def multinomial(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.searchsorted(_cumulative(weights), rng.random(n), side="right")


def systematic(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    points = (rng.random() + np.arange(n)) / n
    return np.searchsorted(_cumulative(weights), points, side="right")


def stratified(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    points = (rng.random(n) + np.arange(n)) / n
    return np.searchsorted(_cumulative(weights), points, side="right")


def residual(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    copies = np.floor(n * weights).astype(int)
    parents = np.repeat(np.arange(weights.size), copies)
    rest = n - int(copies.sum())
    if rest > 0:
        leftover = n * weights - copies
        leftover = leftover / leftover.sum()
        parents = np.concatenate([parents, multinomial(leftover, rest, rng)])
    # Order does not matter for the estimator; shuffling keeps children from being grouped.
    return rng.permutation(parents)


SCHEMES: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
}


def resample(weights: np.ndarray, n: int, rng: np.random.Generator, scheme: str) -> list[int]:
    """N parent indices drawn from normalised weights with the named scheme."""
    try:
        draw = SCHEMES[scheme]
    except KeyError:
        raise UsageError(f"unknown resampling scheme {scheme!r}: use one of {', '.join(SCHEMES)}") from None
    indices = draw(np.asarray(weights, dtype=np.float64), n, rng)
    return [min(int(i), weights.size - 1) for i in indices]


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))
