"""Token sampling on the host from one row of logits, seeded per request.

Besides the sampled token, returns what self-certainty rewards need, computed from the
untempered distribution p = softmax(logits): the token's log-probability and
KL(uniform || p) = -log V - mean_i log p_i, which costs one extra pass over the row.
"""

from __future__ import annotations

import math

import numpy as np

# Candidates examined for top-p before falling back to a full sort.
_TOP_P_CANDIDATES = 1024


def sample_token(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> tuple[int, float, float]:
    """(token, log p(token), KL(uniform || p)) for one row of logits."""
    top = float(logits.max())
    shifted = logits - top
    log_normaliser = math.log(float(np.exp(shifted).sum()))
    if temperature == 0:
        token = int(logits.argmax())
    else:
        token = _draw(shifted / temperature if temperature != 1 else shifted, top_p, rng)
    logprob = float(shifted[token]) - log_normaliser
    kl_from_uniform = -math.log(logits.shape[0]) - (float(shifted.mean()) - log_normaliser)
    return token, logprob, kl_from_uniform


def _draw(scaled: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    weights = np.exp(scaled - scaled.max())
    if top_p < 1.0:
        total = float(weights.sum())
        k = min(_TOP_P_CANDIDATES, weights.shape[0] - 1)
        candidates = np.argpartition(-weights, k)[:k]
        order = candidates[np.argsort(-weights[candidates], kind="stable")]
        cumulative = np.cumsum(weights[order]) / total
        if cumulative[-1] < top_p:
            order = np.argsort(-weights, kind="stable")
            cumulative = np.cumsum(weights[order]) / total
        keep = int(np.searchsorted(cumulative, top_p)) + 1
        order = order[:keep]
        kept = weights[order]
        u = rng.random() * float(kept.sum())
        index = min(int(np.searchsorted(np.cumsum(kept), u, side="right")), keep - 1)
        return int(order[index])
    return _inverse_cdf(weights, rng.random())


# Inverse-CDF sampling in two levels: which block of the vocabulary, then which token in it.
# One pass of block sums and one cumulative sum over a single block replace a cumulative sum
# over the whole vocabulary (half of the host's time per token at 151,936 tokens). The token
# is the one a full cumulative sum would give for the same uniform draw, up to rounding.
_BLOCK = 1024


def _inverse_cdf(weights: np.ndarray, uniform: float) -> int:
    """The token i with cumulative weight just above `uniform` times the total."""
    starts = np.arange(0, weights.shape[0], _BLOCK)
    blocks = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    u = uniform * blocks[-1]
    # Guard every cumulative sum against rounding: never index past the end.
    b = min(int(np.searchsorted(blocks, u, side="right")), blocks.shape[0] - 1)
    start = int(starts[b])
    within = np.cumsum(weights[start : start + _BLOCK], dtype=np.float64)
    u -= blocks[b - 1] if b else 0.0
    return start + min(int(np.searchsorted(within, u, side="right")), within.shape[0] - 1)


def candidate_logprobs(logits: np.ndarray, tokens: list[int]) -> list[float]:
    """Log-probabilities of the given tokens under softmax(logits)."""
    top = float(logits.max())
    log_normaliser = top + math.log(float(np.exp(logits - top).sum()))
    return [float(logits[t]) - log_normaliser for t in tokens]
