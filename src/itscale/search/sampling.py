"""Algorithms without intermediate selection: N independent rollouts, chosen at the end.

- greedy (pass@1): one rollout at temperature 0;
- self-consistency: majority vote over extracted answers (a missing answer is no vote);
- best-of-N: the rollout with the highest (aggregated) reward;
- weighted best-of-N: the answer with the largest summed reward over its rollouts.
"""

from __future__ import annotations

from itscale.lm.base import StepSettings
from itscale.search.core import Run, Search, SearchSettings, vote
from itscale.types import Result


class Greedy(Search):
    name = "greedy"
    uses_reward = False
    score_each_step = False

    def population_size(self, budget: int) -> int:
        return 1

    def step_settings(self, settings: SearchSettings) -> StepSettings:
        return settings.step_settings(temperature=0.0)

    async def finalise(self, run: Run) -> None:
        pass

    def choose(self, run: Run) -> Result:
        chosen = run.particles[0]
        return run.result(chosen, chosen.answer, [1.0])


class SelfConsistency(Search):
    name = "self-consistency"
    uses_reward = False
    score_each_step = False

    async def finalise(self, run: Run) -> None:
        pass

    def choose(self, run: Run) -> Result:
        chosen, answer, totals = vote(run)
        run.diagnostics["votes"] = totals
        n = len(run.particles)
        return run.result(chosen, answer, [1.0 / n] * n)


class BestOfN(Search):
    name = "best-of-n"
    score_each_step = False


class WeightedBestOfN(Search):
    name = "weighted-best-of-n"
    score_each_step = False

    def choose(self, run: Run) -> Result:
        scores = [p.score if p.score is not None else 0.0 for p in run.particles]
        chosen, answer, totals = vote(run, scores)
        run.diagnostics["votes"] = totals
        total = sum(scores) or 1.0
        return run.result(chosen, answer, [s / total for s in scores])
