"""Algorithms without intermediate selection: N independent rollouts, chosen at the end.

- greedy (pass@1): one rollout at temperature 0;
- self-consistency: majority vote over extracted answers (a missing answer is no vote);
- best-of-N: the rollout with the highest (aggregated) reward;
- weighted best-of-N: the answer with the largest summed reward over its rollouts.

Their choice depends only on the final particles (`pick`), so an evaluation can generate
the largest budget once and evaluate every smaller budget on a prefix of the rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence

from itscale.lm.base import StepSettings
from itscale.search.core import Pick, Run, Search, SearchSettings, vote
from itscale.types import Particle


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

    def pick(self, particles: Sequence[Particle]) -> Pick:
        return Pick(0, particles[0].answer, [1.0])


class SelfConsistency(Search):
    name = "self-consistency"
    uses_reward = False
    score_each_step = False
    reuses_samples = True

    async def finalise(self, run: Run) -> None:
        pass

    def pick(self, particles: Sequence[Particle]) -> Pick:
        return vote(particles)


class BestOfN(Search):
    name = "best-of-n"
    score_each_step = False
    reuses_samples = True


class WeightedBestOfN(Search):
    name = "weighted-best-of-n"
    score_each_step = False
    reuses_samples = True

    def pick(self, particles: Sequence[Particle]) -> Pick:
        return vote(particles, [p.score if p.score is not None else 0.0 for p in particles])
