"""`Search`, the base class of every algorithm: a policy over the population loop.

An algorithm sets a few class attributes and overrides `select` (after every step) and
`pick` (the answer from the final particles); algorithms with several sweeps (particle
Gibbs, parallel tempering) override `search` and run the loop more than once. `vote` is the
(weighted) majority vote several of them end with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from itscale.answers import is_equivalent, majority
from itscale.errors import UsageError
from itscale.lm.base import (
    LanguageModel,
    StepSettings,
)
from itscale.rewards.base import AGGREGATIONS, Reward
from itscale.search.population import Run
from itscale.search.settings import SearchSettings
from itscale.trace import Trace
from itscale.types import Particle, Prompt, Result


class Search:
    """An algorithm: a policy over the population loop.

    Class attributes: `name` (as used by the CLI and the server); `uses_reward` (whether
    a reward is required); `score_each_step` (score every new step, else only at the end);
    `reuses_samples` and `uses_budget` (see below).
    Instance attribute `aggregation` turns step scores into one particle score.
    """

    name: ClassVar[str] = "search"
    uses_reward: ClassVar[bool] = True
    score_each_step: ClassVar[bool] = True
    # N independent rollouts chosen by `pick`: an evaluation may run the largest budget
    # once and pick from its first b particles for every smaller budget b.
    reuses_samples: ClassVar[bool] = False
    # The run is the same at every budget (greedy decoding): an evaluation runs it once
    # and records it for every budget, at its real cost.
    uses_budget: ClassVar[bool] = True
    # Particles never interact before the end (no selection, no per-step scores): each
    # runs to its end without waiting at step boundaries for the others (`Run.rollout`).
    independent_rollouts: ClassVar[bool] = False
    # Keep the KV state of finished particles until the end of a sweep (a retained
    # reference trajectory is forked from it in the next sweep).
    keeps_finished_branches: ClassVar[bool] = False

    def __init__(self, aggregation: str = "model"):
        if aggregation not in AGGREGATIONS:
            raise UsageError(f"unknown aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        self.aggregation = aggregation

    def describe(self) -> dict[str, Any]:
        """The algorithm's own settings, recorded in the result."""
        return {"algorithm": self.name, "aggregation": self.aggregation}

    def population_size(self, budget: int) -> int:
        return budget

    def step_settings(self, settings: SearchSettings) -> StepSettings:
        return settings.step_settings()

    def rollout_signature(self, settings: SearchSettings) -> tuple | None:
        """What the rollouts of a sample-reusing algorithm depend on besides the problem,
        the seed and the budget. Algorithms with equal signatures draw the very same
        rollouts (same steps, same per-step seeds, same final scores when they score), so an
        evaluation runs them once and lets each `pick`. None when the rollouts cannot be
        shared: no sample reuse, or a token budget (a reward's tokens count against it, so
        an algorithm that scores would stop its rollouts sooner than one that does not)."""
        if not self.reuses_samples or settings.token_budget is not None:
            return None
        return (
            self.step_settings(settings),
            self.population_size(settings.budget),
            self.independent_rollouts,
            self.score_each_step,
            self.aggregation,
        )

    async def run(
        self,
        lm: LanguageModel,
        prompt: str | Prompt,
        settings: SearchSettings | None = None,
        reward: Reward | None = None,
        observer: Callable[[Run], None] | None = None,
        trace: bool = True,
        stream: Callable[[str], None] | None = None,
        **overrides: Any,
    ) -> Result:
        """Solves one prompt. `overrides` are SearchSettings fields (budget=16, seed=1);
        `observer` is called with the run after every step (for progress displays); `trace`
        records every step of every particle in `Result.trace` (see itscale.trace); `stream`
        receives the text as it is generated when the search is a single rollout on a backend
        that can stream (the embedded engine), from the engine's thread."""
        settings = (settings or SearchSettings()).replace(**overrides) if overrides else (settings or SearchSettings())
        if self.uses_reward and reward is None:
            raise UsageError(f"algorithm {self.name!r} needs a reward; pass one (for example LLMJudge)")
        prompt = Prompt.of(prompt, system=settings.system_prompt)
        run = Run(self, lm, prompt, settings, reward if self.uses_reward else None)
        run.observer = observer
        run.stream = stream
        run.trace = Trace([{"role": m.role, "content": m.content} for m in prompt.messages]) if trace else None
        started = time.perf_counter()
        try:
            result = await self.search(run)
        finally:
            for p in run.particles:
                run.release(p)
        result.usage.seconds = time.perf_counter() - started
        return result

    async def search(self, run: Run) -> Result:
        run.particles = await run.start(self.population_size(run.settings.budget))
        await run.loop()
        await self.finalise(run)
        return self.choose(run)

    async def select(self, run: Run) -> None:
        """After every step: weigh and select. The default keeps every particle."""

    async def finalise(self, run: Run) -> None:
        """After the loop: score what the choice needs. The default scores every final
        particle's unscored steps."""
        await run.score(run.particles, all_steps=True)

    def choose(self, run: Run) -> Result:
        """The result of the run, from `pick` over its final particles. When the token
        budget cut the run short, only finished particles are candidates (if any finished):
        an unfinished trace has no final answer, only a last number."""
        candidates = list(range(len(run.particles)))
        if run.budget_limited and any(p.finished for p in run.particles):
            candidates = [i for i, p in enumerate(run.particles) if p.finished]
        pick = self.pick([run.particles[i] for i in candidates])
        run.diagnostics.update(pick.notes)
        weights = [0.0] * len(run.particles)
        for i, w in zip(candidates, pick.weights, strict=True):
            weights[i] = w
        chosen = run.particles[candidates[pick.index]] if pick.index is not None else None
        return run.result(chosen, pick.answer, weights)

    def pick(self, particles: Sequence[Particle]) -> Pick:
        """The answer from final particles; by default the particle with the highest score.
        Sampling algorithms (`reuses_samples`) are evaluated on subsets of one large run
        through this method, so it must depend on nothing but the particles."""
        scores = [p.score if p.score is not None else -math.inf for p in particles]
        if not particles:
            return Pick(None, None, [])
        best = int(np.argmax(scores))
        total = sum(s for s in scores if s > -math.inf) or 1.0
        weights = [max(s, 0.0) / total if s > -math.inf else 0.0 for s in scores]
        return Pick(best, particles[best].answer, weights)


@dataclass
class Pick:
    """An algorithm's choice among final particles: the chosen index (None when there is
    nothing to choose), its answer, a normalised weight per particle, notes for diagnostics."""

    index: int | None
    answer: str | None
    weights: list[float]
    notes: dict[str, Any] = field(default_factory=dict)


def vote(particles: Sequence[Particle], weights: Sequence[float] | None = None) -> Pick:
    """Majority (or weighted) vote over the particles' answers; the chosen particle is the
    heaviest one with the winning answer. A particle without an answer is no vote."""
    answers = [p.answer for p in particles]
    winner, totals = majority(answers, list(weights) if weights is not None else None)
    n = len(particles)
    if weights is None:
        normalised = [1.0 / n] * n if n else []
    else:
        total = sum(weights) or 1.0
        normalised = [w / total for w in weights]
    if winner is None:
        return Pick(0 if particles else None, None, normalised, {"votes": totals})
    members = [i for i, a in enumerate(answers) if a is not None and (a == winner or is_equivalent(a, winner))]
    best = max(members, key=lambda i: weights[i] if weights is not None else 1.0)
    return Pick(best, winner, normalised, {"votes": totals})
