"""Host-side token sampling: the distribution it draws from is exactly the tempered softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest

from itscale.lm.sampling import _inverse_cdf, sample_token


def test_two_level_inverse_cdf_picks_what_a_full_cumulative_sum_picks() -> None:
    rng = np.random.default_rng(0)
    weights = np.exp(rng.standard_normal(151_936).astype(np.float32) * 4)
    weights[5_000:9_000] = 0.0  # whole blocks without mass are never chosen
    full = np.cumsum(weights, dtype=np.float64)
    for u in rng.random(3000):
        expected = int(np.searchsorted(full, u * full[-1], side="right"))
        got = _inverse_cdf(weights, float(u))
        assert got == expected or math.isclose(full[got], u * full[-1], rel_tol=1e-9), (u, got, expected)
        assert not 5_000 <= got < 9_000
    assert _inverse_cdf(weights, 0.0) == int(np.flatnonzero(weights)[0])
    assert _inverse_cdf(weights, 1.0 - 1e-17) == int(np.flatnonzero(weights)[-1])  # never past the end


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_frequencies_match_the_exact_softmax(temperature: float) -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(4_000).astype(np.float32) * 2.5  # four blocks of the vocabulary
    exact = np.exp((logits - logits.max()) / temperature)
    exact /= exact.sum()
    draws = 40_000
    counts = np.bincount([sample_token(logits, temperature, 1.0, rng)[0] for _ in range(draws)], minlength=4_000)
    top = np.argsort(-exact)[:40]
    for token in top:  # every frequent token within 5 standard deviations of its expected count
        expected = draws * exact[token]
        assert abs(counts[token] - expected) <= 5 * math.sqrt(expected * (1 - exact[token])) + 1, token
    tail = np.setdiff1d(np.arange(4_000), top)
    expected_tail = draws * exact[tail].sum()
    assert abs(counts[tail].sum() - expected_tail) <= 5 * math.sqrt(expected_tail) + 1
    token, logprob, _ = sample_token(logits, temperature, 1.0, rng)
    assert logprob == pytest.approx(float(logits[token] - np.log(np.exp(logits.astype(np.float64)).sum())), abs=1e-4)
