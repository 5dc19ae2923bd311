"""Algorithms without intermediate selection: N independent rollouts, chosen at the end.

- greedy (pass@1): one rollout at temperature 0;
- self-consistency: majority vote over extracted answers (a missing answer is no vote);
- best-of-N: the rollout with the highest (aggregated) reward;
- weighted best-of-N: the answer with the largest summed reward over its rollouts;
- Best-of-Majority: the best-rewarded rollout among those with a frequent answer;
- adaptive self-consistency: majority vote, sampling in growing batches until confident;
- compute-optimal: a first batch, then the budget and selection (vote, or the vote
  weighted by a learned head) its difficulty deserves (a mean budget per problem;
  itscale.search.allocation).

Their choice depends only on the final particles (`pick`), so an evaluation can generate
the largest budget once and evaluate every smaller budget on a prefix of the rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from itscale.answers import is_equivalent
from itscale.errors import UsageError
from itscale.lm.base import StepSettings
from itscale.search.allocation import BudgetPolicy, difficulty_level, load_policy_for, value_level
from itscale.search.base import Pick, Search, vote
from itscale.search.population import Run
from itscale.search.settings import SearchSettings
from itscale.types import Particle, Result


class Greedy(Search):
    name = "greedy"
    independent_rollouts = True
    uses_reward = False
    score_each_step = False
    uses_budget = False

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
    independent_rollouts = True
    uses_reward = False
    score_each_step = False
    reuses_samples = True

    async def finalise(self, run: Run) -> None:
        pass

    def pick(self, particles: Sequence[Particle]) -> Pick:
        return vote(particles)


class BestOfN(Search):
    name = "best-of-n"
    independent_rollouts = True
    score_each_step = False
    reuses_samples = True


class WeightedBestOfN(Search):
    name = "weighted-best-of-n"
    independent_rollouts = True
    score_each_step = False
    reuses_samples = True

    def pick(self, particles: Sequence[Particle]) -> Pick:
        return vote(particles, [p.score if p.score is not None else 0.0 for p in particles])


class BestOfMajority(Search):
    """Best-of-Majority (Di et al., 2025): keep the rollouts whose answer is frequent (vote
    share at least `min_share`; if no answer is that frequent, those with the most frequent
    answer), then choose the one with the highest reward among them. Frequency guards
    against a reward that favours a rare wrong answer; the reward breaks ties in the vote."""

    name = "best-of-majority"
    independent_rollouts = True
    score_each_step = False
    reuses_samples = True

    def __init__(self, min_share: float = 0.3, aggregation: str = "model"):
        super().__init__(aggregation)
        if not 0 < min_share <= 1:
            raise UsageError(f"min_share is a vote share in (0, 1], got {min_share}")
        self.min_share = min_share

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "min_share": self.min_share}

    def pick(self, particles: Sequence[Particle]) -> Pick:
        votes = vote(particles).notes["votes"]
        answered = sum(votes.values())
        if not answered:
            return super().pick(particles)
        frequent = [a for a, n in votes.items() if n / answered >= self.min_share]
        if not frequent:
            frequent = [a for a, n in votes.items() if n == max(votes.values())]
        candidates = [
            i for i, p in enumerate(particles) if p.answer is not None and any(_same(p.answer, a) for a in frequent)
        ]
        best = max(candidates, key=lambda i: particles[i].score if particles[i].score is not None else 0.0)
        weights = [1.0 / len(candidates) if i in candidates else 0.0 for i in range(len(particles))]
        return Pick(best, particles[best].answer, weights, {"votes": votes, "frequent_answers": frequent})


class AdaptiveSelfConsistency(Search):
    """Adaptive self-consistency (Aggarwal et al., 2023): sample in growing batches
    (`initial_batch`, then × `growth`) and stop as soon as the leading answer is the
    majority with posterior probability at least `threshold` — with a uniform prior on the
    two leading answers' shares, P(p1 > p2 | v1, v2) for X ~ Beta(v1 + 1, v2 + 1) — or the
    budget is spent. The result reports the samples used and saved."""

    name = "adaptive-self-consistency"
    independent_rollouts = True
    uses_reward = False
    score_each_step = False

    def __init__(self, threshold: float = 0.95, initial_batch: int = 2, growth: float = 2.0):
        super().__init__()
        if not 0.5 < threshold < 1:
            raise UsageError(f"threshold must be in (0.5, 1), got {threshold}")
        if not isinstance(initial_batch, int) or initial_batch < 1 or growth < 1:
            raise UsageError("initial_batch must be a positive integer and growth at least 1")
        self.threshold, self.initial_batch, self.growth = threshold, initial_batch, growth

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "threshold": self.threshold,
            "initial_batch": self.initial_batch,
            "growth": self.growth,
        }

    async def search(self, run: Run) -> Result:
        budget = run.settings.budget
        samples: list[Particle] = []
        batch = self.initial_batch
        confidence = 0.0
        while len(samples) < budget and not run.budget_spent():
            run.particles = await run.start(min(batch, budget - len(samples)))
            await run.loop()
            samples += run.particles
            run.particles = samples
            confidence = majority_confidence(vote(samples).notes["votes"])
            if confidence >= self.threshold:
                break
            batch = max(batch + 1, math.ceil(batch * self.growth))
        run.particles = samples
        run.diagnostics.update(
            {"samples_used": len(samples), "samples_saved": budget - len(samples), "confidence": confidence}
        )
        return self.choose(run)

    async def finalise(self, run: Run) -> None:
        pass

    def pick(self, particles: Sequence[Particle]) -> Pick:
        return vote(particles)


class ComputeOptimal(Search):
    """Compute-optimal allocation across problems (Snell et al., 2024): the run's budget is
    a *mean* per problem. A first batch of samples estimates the problem's difficulty (the
    agreement of its answers, or a learned head's value after their first step), a
    `BudgetPolicy` fitted on training problems gives the choice that difficulty deserves (a
    budget and a selection), the rest is drawn (the first batch is kept) and the answer is
    the majority vote, or the vote weighted by the head's value of each finished sample.
    Easy problems stop after the first batch; hard ones get more; hopeless ones, where more
    samples did not help on the training problems, do not.

    `policy`: a policy file (`itscale fit-budget-policy`); by default the one shipped for
    the generator. A policy that reads a learned head (for the level or to weigh) reads the
    head it was fitted with: `head`, a head directory, by default the one shipped for the
    generator (its weights must be the policy's). The result reports the level, the samples
    used, the selection and the allocation; the weighted vote (weighted best-of-N with the
    probe as the reward) leaves each sample's value as its score and names the head in
    `weighted_by`. The run has no reward of its own (`uses_reward` is false), so scores are
    set only there."""

    name = "compute-optimal"
    independent_rollouts = True
    uses_reward = False
    score_each_step = False

    def __init__(self, policy: str | None = None, head: str | None = None):
        super().__init__()
        self.policy_path = policy
        self.head_path = head

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "policy": self.policy_path, "head": self.head_path}

    def load_policy(self, lm: Any) -> BudgetPolicy:
        policy = load_policy_for(getattr(lm, "name", ""), self.policy_path)
        policy.check_generator(getattr(lm, "name", None), getattr(lm, "sha256", None))
        return policy

    def value_reward(self, lm: Any, policy: BudgetPolicy) -> Any:
        """The probe whose values the policy's levels and weights are in (before any
        generation: it turns the engine's features on)."""
        from itscale.rewards.probe import ProbeReward, head_digest, shipped_head

        path = self.head_path or shipped_head(getattr(lm, "name", ""))
        wanted = policy.card.get("head_sha256")
        if path is None or head_digest(path) != wanted:
            where = f"the head in {path} is another" if path is not None else "no head is shipped for this model"
            raise UsageError(
                f"this budget policy reads the learned head with sha256 {str(wanted)[:12]}…, and "
                f"{where}: pass that head with --option head=DIR, or fit the policy again for this head"
            )
        return ProbeReward(lm, path)

    async def search(self, run: Run) -> Result:
        policy = self.load_policy(run.lm)
        allocation = policy.allocate(run.settings.budget)
        probe = self.value_reward(run.lm, policy) if policy.needs_head(allocation) else None
        run.particles = await run.start(policy.first_batch)
        await run.loop()
        samples = list(run.particles)
        if policy.value_edges is None:
            level = difficulty_level([p.answer for p in samples], policy.first_batch)
        else:
            firsts = [v for v in await self._values(run, probe, samples, first_step=True) if v is not None]
            # Nothing generated at all: the hardest level.
            level = value_level(sum(firsts) / len(firsts) if firsts else 0.0, policy.value_edges)
        choice = allocation[level]
        if choice.budget > len(samples) and not run.budget_spent():
            run.particles = await run.start(choice.budget - len(samples))
            await run.loop()
            samples += run.particles
        if choice.selection == "weighted-vote":
            for p, value in zip(samples, await self._values(run, probe, samples, first_step=False), strict=True):
                p.score = value if value is not None else 0.0
            run.diagnostics["weighted_by"] = policy.card["head_sha256"]
        run.particles = samples
        run.diagnostics.update(
            {
                "difficulty_level": level,
                "samples_used": len(samples),
                "selection": choice.selection,
                "allocation": allocation,
            }
        )
        return self.choose(run)

    @staticmethod
    async def _values(run: Run, probe: Any, samples: Sequence[Particle], first_step: bool) -> list[float | None]:
        """The probe's value of each sample after its first step, or after its last (their
        features came with generation, so this costs a dot product); None without a step."""
        from itscale.rewards.base import ScoreRequest

        def request(p: Particle) -> ScoreRequest:
            steps = p.steps[:1] if first_step else p.steps
            return ScoreRequest(run.prompt, tuple(s.text for s in steps), records=tuple(steps))

        scored = [i for i, p in enumerate(samples) if p.steps]
        values: list[float | None] = [None] * len(samples)
        if scored:
            scores = await probe.score([request(samples[i]) for i in scored])
            run.usage.reward_tokens += scores.tokens
            run.usage.reward_calls += 1
            for i, value in zip(scored, scores.values, strict=True):
                values[i] = value
        return values

    async def finalise(self, run: Run) -> None:
        pass

    def pick(self, particles: Sequence[Particle]) -> Pick:
        """The vote, weighted by the samples' values when the level's choice set them."""
        if particles and all(p.score is not None for p in particles):
            return vote(particles, [p.score for p in particles])  # type: ignore[misc]
        return vote(particles)


def majority_confidence(votes: dict[str, float]) -> float:
    """P(p1 > p2) for X ~ Beta(v1 + 1, v2 + 1), v1 >= v2 the two largest vote counts: the
    posterior probability that the leading answer really is the more frequent one. For
    integer parameters, P(X > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1)."""
    counts = sorted((round(v) for v in votes.values()), reverse=True)
    if not counts:
        return 0.0
    v1, v2 = counts[0], counts[1] if len(counts) > 1 else 0
    n = v1 + v2 + 1
    return sum(math.comb(n, j) for j in range(v1 + 1)) / 2**n


def _same(a: str, b: str) -> bool:
    return a == b or is_equivalent(a, b)
