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
    cumulative = np.cumsum(weights, dtype=np.float64)
    u = rng.random() * cumulative[-1]
    # Guard the last cumulative sum against rounding: never index past the end.
    return min(int(np.searchsorted(cumulative, u, side="right")), weights.shape[0] - 1)


def candidate_logprobs(logits: np.ndarray, tokens: list[int]) -> list[float]:
    """Log-probabilities of the given tokens under softmax(logits)."""
    top = float(logits.max())
    log_normaliser = top + math.log(float(np.exp(logits - top).sum()))
    return [float(logits[t]) - log_normaliser for t in tokens]
