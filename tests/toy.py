"""A toy state-space model with an exact posterior, for checking samplers.

`MarkovLM` is a real `LanguageModel` whose steps are draws from a known Markov chain over
symbols: from state s (the last symbol, or START) it ends the answer with probability
stop[s], else emits symbol y with probability trans[s][y]; a step's text is "y\\n\\n" and
costs one token. `PotentialReward` is a known likelihood: each symbol y scores g[y], so the
prefix reward is the product of g over the steps (aggregation "prod" on step scores, or
"model" on whole prefixes). The target over finished trajectories is p(x) r(x) / Z, and
`exact_posterior` enumerates it with Z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from itscale.lm.base import Branch, StepOutput, StepSettings
from itscale.rewards.base import CachedReward, ScoreRequest, Scores
from itscale.types import Prompt

START = "^"


@dataclass(eq=False)
class ToyBranch(Branch):
    prompt: Prompt
    steps: list[str] = field(default_factory=list)
    finished: bool = False
    root: bool = False  # made by start(): a fork of it begins a new rollout


class MarkovLM:
    name = "toy-markov"

    def __init__(self, trans: dict[str, dict[str, float]], stop: dict[str, float]):
        self.trans, self.stop = trans, stop
        self.calls = 0
        self.generated = 0  # tokens generated, to check a search's usage against
        self.extended_finished = 0  # a finished branch must never be extended
        self.rollouts_started = 0  # forks of a prompt's root: what a budget counts

    async def start(self, prompt: Prompt) -> ToyBranch:
        return ToyBranch(prompt, root=True)

    def fork(self, branch: Branch, steps: int | None = None) -> ToyBranch:
        self.rollouts_started += getattr(branch, "root", False)
        k = len(branch.steps) if steps is None else steps
        return ToyBranch(branch.prompt, branch.steps[:k], branch.finished and k == len(branch.steps))

    def release(self, branch: Branch) -> None:
        pass

    async def close(self) -> None:
        pass

    async def extend(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[StepOutput]:
        self.calls += 1
        outputs = []
        for branch, seed in zip(branches, seeds, strict=True):
            if branch.finished:
                self.extended_finished += 1
            state = branch.steps[-1].strip() if branch.steps else START
            rng = np.random.default_rng(seed)
            if rng.random() < self.stop.get(state, 0.0):
                branch.finished = True
                out = StepOutput("", 1, "eos")
            else:
                symbols = list(self.trans[state])
                probs = np.array([self.trans[state][y] for y in symbols])
                y = symbols[int(rng.choice(len(symbols), p=probs / probs.sum()))]
                out = StepOutput(f"{y}\n\n", 1, "delimiter")
            branch.steps.append(out.text)
            self.generated += out.tokens
            outputs.append(out)
        return outputs

    def trajectories(self, max_steps: int) -> dict[str, float]:
        """Every finished trajectory's text with its probability under the chain (the step
        cap ends a trajectory deterministically)."""
        out: dict[str, float] = {}

        def walk(state: str, text: str, prob: float, steps: int) -> None:
            if steps == max_steps:
                out[text] = out.get(text, 0.0) + prob
                return
            stop = self.stop.get(state, 0.0)
            if stop > 0:
                out[text] = out.get(text, 0.0) + prob * stop
            for y, q in self.trans[state].items():
                walk(y, text + f"{y}\n\n", prob * (1 - stop) * q, steps + 1)

        walk(START, "", 1.0, 0)
        return out


class PotentialReward(CachedReward):
    """Scores a step "y" with g[y] (the end-of-answer step scores 1); a whole prefix with
    the product of g over its symbols."""

    name = "potential"
    kind = "process"

    def __init__(self, g: dict[str, float]):
        super().__init__()
        self.g = g
        self.calls = 0

    def prefix_reward(self, text: str) -> float:
        return math.prod(self.g[y] for y in text.split())

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        self.calls += 1
        values = []
        for r in requests:
            if r.prefix:
                values.append(self.prefix_reward(r.text))
            else:
                last = r.steps[-1].strip()
                values.append(self.g[last] if last else 1.0)
        return Scores(values, tokens=len(requests))


def exact_posterior(lm: MarkovLM, reward: PotentialReward, max_steps: int) -> tuple[dict[str, float], float]:
    """The target p(x) r(x) / Z over finished trajectories, and Z."""
    prior = lm.trajectories(max_steps)
    unnormalised = {x: p * reward.prefix_reward(x) for x, p in prior.items()}
    z = sum(unnormalised.values())
    return {x: v / z for x, v in unnormalised.items()}, z


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


# A chain that prefers "1" but a likelihood that prefers "2": the posterior differs a lot
# from the prior, so a sampler that ignores its weights fails the tests.
# Symbols are digits, so a trajectory's extracted answer is its last symbol.
TRANS = {START: {"1": 0.7, "2": 0.3}, "1": {"1": 0.6, "2": 0.4}, "2": {"1": 0.5, "2": 0.5}}
STOP = {"1": 0.15, "2": 0.25}
G = {"1": 0.3, "2": 0.9}
