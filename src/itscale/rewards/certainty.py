"""Self-certainty: a reward from the generator's own token log-probabilities, at no cost.

The embedded engine (and a server asked for logprobs) records, for every step, the sum of
the log-probabilities of the sampled tokens (`Step.logprob`) and the mean over its tokens
of KL(uniform || p), the distance of the next-token distribution from uniform
(`Step.self_certainty`, Kang et al., 2025). Both say how sure the model was of what it
wrote; neither needs another model call.

Two variants, both mapped into [0, 1]:

- `mean-logprob`: exp(mean token log-probability) of the scored text, the geometric mean of
  the probabilities of its tokens. 1 = every token was certain.
- `kl`: 1 - exp(-KL / scale), where KL is the token-weighted mean KL(uniform || p) over the
  scored text and `scale` (default 16, the median step KL of Qwen2.5-0.5B on GSM8K) sets where the
  score reaches 0.63. 0 = the model's distributions were uniform.

A process request scores its last step; a prefix request (aggregation "model") pools all
its steps, weighting each by its token count. A step that ended the answer without
generating a token carries no log-probability and is skipped; if nothing remains, the
score is neutral (0.5) and counted in the notes.

When the records are absent (the particle came from a server that was not asked for
logprobs) the reward cannot work: it raises a RewardError that says how to get them,
which the search's reward guard reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from itscale.errors import RewardError, UsageError
from itscale.rewards.base import CachedReward, ScoreRequest, Scores
from itscale.types import Step

VARIANTS = ("mean-logprob", "kl")
DEFAULT_KL_SCALE = 16.0


class SelfCertainty(CachedReward):
    """Process reward from the generator's confidence in its own tokens (0 tokens)."""

    kind = "process"
    uses_logprobs = True

    def __init__(self, variant: str = "mean-logprob", scale: float = DEFAULT_KL_SCALE):
        super().__init__()
        if variant not in VARIANTS:
            raise UsageError(f"unknown self-certainty variant {variant!r}: use one of {', '.join(VARIANTS)}")
        if scale <= 0:
            raise UsageError(f"the self-certainty scale must be positive, got {scale}")
        self.variant, self.scale = variant, scale
        self.name = "self-certainty" if variant == "mean-logprob" else "self-certainty-kl"
        self.field = "logprob" if variant == "mean-logprob" else "self_certainty"

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        values, empty = [], 0
        for r in requests:
            steps = _scored_steps(r, self.field)
            value = self.certainty(steps)
            if value is None:
                empty += 1
                value = 0.5
            values.append(value)
        return Scores(values, notes={"steps_without_tokens": empty} if empty else {})

    def certainty(self, steps: Sequence[Step]) -> float | None:
        """The score of these steps pooled, or None when they generated no token."""
        counted = [s for s in steps if getattr(s, self.field) is not None and s.tokens > 0]
        tokens = sum(s.tokens for s in counted)
        if not tokens:
            return None
        if self.variant == "mean-logprob":
            return math.exp(min(0.0, sum(s.logprob for s in counted) / tokens))
        kl = sum(s.self_certainty * s.tokens for s in counted) / tokens
        return 1.0 - math.exp(-max(0.0, kl) / self.scale)


def _scored_steps(request: ScoreRequest, field: str) -> Sequence[Step]:
    """The generator's records of the text this request scores."""
    records = request.records
    if not records or any(_lacks(s, field) for s in records):
        what = "token log-probabilities" if field == "logprob" else "next-token distributions (KL from uniform)"
        how = (
            "generate with the embedded engine, or on a server that returns token log-probabilities "
            "(OpenAIModel asks for them unless logprobs=False)"
            if field == "logprob"
            else "generate with the embedded engine (servers return no full distributions; use variant=mean-logprob)"
        )
        raise RewardError(f"self-certainty needs the generator's {what}, and this particle has none: {how}")
    return records if request.prefix else records[-1:]


def _lacks(step: Step, field: str) -> bool:
    """A step with generated text but no record (an empty end-of-answer step has none)."""
    if getattr(step, field) is not None:
        return False
    return bool(step.text.strip()) and not (step.end == "eos" and step.tokens <= 1)
