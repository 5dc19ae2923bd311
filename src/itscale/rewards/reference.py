"""The reference verifier: 1 when the answer matches the known one, else 0.

An outcome reward for evaluation (the oracle row of a reward benchmark, pass@N, an upper
bound for best-of-N). It reads the answer to the problem, so a search that uses it is
cheating: constructing it logs a warning, and every batch it scores says so in the notes
(which the search copies into `Result.diagnostics["reward_notes"]`).
"""

from __future__ import annotations

import logging

from itscale.answers import extract_answer, is_equivalent
from itscale.errors import UsageError
from itscale.rewards.base import CachedReward, ScoreRequest, Scores

log = logging.getLogger(__name__)

WARNING = (
    "the reference verifier reads the known answer: a search guided by it is not a fair result; "
    "use it to evaluate, not to search"
)


class ReferenceVerifier(CachedReward):
    """Outcome reward: is the extracted answer equivalent to `reference`?"""

    name = "reference"
    kind = "outcome"

    def __init__(self, reference: str | int | float | None = None):
        super().__init__()
        if reference is None or not str(reference).strip():
            raise UsageError(
                "the reference verifier needs the known answer: pass reference=... "
                "(CLI: --reward 'reference(reference=72)')"
            )
        self.reference = str(reference).strip()
        log.warning("%s (reference answer %r)", WARNING, self.reference)

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        values = [1.0 if is_equivalent(extract_answer(r.text), self.reference) else 0.0 for r in requests]
        return Scores(values, notes={"warning": WARNING})
