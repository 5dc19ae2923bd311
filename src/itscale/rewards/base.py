"""The `Reward` protocol, step-score aggregation, products of rewards, and the guard.

A reward scores the *last* step of a partial answer given the steps before it (a process
reward), or a finished answer (an outcome reward), with a number in [0, 1]. Requests come
in batches. A request may carry the generator's branch, so a reward that runs on the same
engine can evaluate its prompt on a fork of the particle's KV cache. A request with
`prefix=True` asks for the whole prefix scored as one step (the `model` aggregation, the
paper's best choice).

How step scores become one particle score is a separate, named choice (`AGGREGATIONS`).
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

from itscale.errors import ItscaleError, RewardError, UsageError
from itscale.lm.base import Branch
from itscale.types import Prompt, Step

RewardKind = Literal["process", "outcome"]
Aggregation = Literal["last", "min", "prod", "mean", "model"]
AGGREGATIONS: tuple[str, ...] = ("last", "min", "prod", "mean", "model")


@dataclass(frozen=True)
class ScoreRequest:
    """Score the last of `steps` given `prompt` and the steps before it. `records` are the
    generator's `Step` records for those steps (token counts, log-probabilities), when the
    caller has them: a self-certainty reward needs nothing else."""

    prompt: Prompt
    steps: tuple[str, ...]
    branch: Branch | None = field(default=None, compare=False, hash=False)
    prefix: bool = False  # score the steps together as one step
    records: tuple[Step, ...] = field(default=(), compare=False, hash=False)

    @classmethod
    def for_prefix(
        cls, prompt: Prompt, steps: Sequence[str], branch: Branch | None = None, records: Sequence[Step] = ()
    ) -> ScoreRequest:
        return cls(prompt, ("".join(steps),), branch, prefix=True, records=tuple(records))

    @property
    def text(self) -> str:
        return "".join(self.steps)

    @property
    def key(self) -> tuple:
        return (self.prompt, self.steps, self.prefix)


@dataclass
class Scores:
    """Scores for a batch of requests, what they cost, and anything worth reporting (for
    example that a remote judge fell back from log-probabilities to parsed scores)."""

    values: list[float]
    tokens: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    name: str
    kind: RewardKind
    # Whether the reward reads the generator's token log-probabilities (Step.logprob): a
    # server is asked for them only then. Optional: a reward without it does not.
    # uses_logprobs: bool

    async def score(self, requests: Sequence[ScoreRequest]) -> Scores: ...


def uses_logprobs(reward: Any) -> bool:
    """Whether `reward` (or a factor of it) reads the generator's token log-probabilities."""
    return bool(getattr(reward, "uses_logprobs", False))


async def close_reward(reward: Any) -> None:
    """Frees what a reward holds (a remote judge's HTTP client it opened, the factors of a
    product); a reward without a `close` holds nothing."""
    close = getattr(reward, "close", None)
    if close is not None:
        await close()


class CachedReward:
    """Base class for rewards: caches scores by content, so a step is scored once even
    when resampling copies it into many particles. Subclasses implement `_score`.

    The cache keeps the `cache_size` most recently used scores: a long-lived process (the
    server) keeps one reward across many searches without growing without bound."""

    name: str = "reward"
    kind: RewardKind = "process"
    uses_logprobs: bool = False
    cache_size: int = 100_000

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple, float] = OrderedDict()

    async def score(self, requests: Sequence[ScoreRequest]) -> Scores:
        missing: dict[tuple, ScoreRequest] = {}
        for r in requests:
            if r.key not in self._cache and r.key not in missing:
                missing[r.key] = r
        result = Scores([])
        known = {r.key: self._cache[r.key] for r in requests if r.key not in missing}
        if missing:
            fresh = await self._score(list(missing.values()))
            if len(fresh.values) != len(missing):
                raise RewardError(f"{self.name} returned {len(fresh.values)} scores for {len(missing)} requests")
            result.tokens, result.notes = fresh.tokens, fresh.notes
            for key, value in zip(missing, fresh.values, strict=True):
                known[key] = value
                self._store(key, value)
        for key in known:
            if key in self._cache:
                self._cache.move_to_end(key)
        result.values = [known[r.key] for r in requests]
        return result

    def remember(self, request: ScoreRequest, value: float) -> None:
        """Records a score computed on the side (a PRM scores every step of a prefix in one
        forward pass)."""
        self._store(request.key, value)

    def _store(self, key: tuple, value: float) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def remember_prefixes(self, request: ScoreRequest, step_scores: Sequence[float]) -> float:
        """A PRM scores every step of a request in one forward pass: keeps the scores of
        the earlier prefixes for later requests, and returns the last step's."""
        for k in range(1, len(request.steps)):
            self.remember(ScoreRequest(request.prompt, request.steps[:k], prefix=request.prefix), step_scores[k - 1])
        return step_scores[-1]

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        raise NotImplementedError


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """One particle score from its step scores. `model` means each stored score already is
    the score of the whole prefix, so the last one is the particle's."""
    if not step_scores:
        return 0.5
    if how in ("last", "model"):
        return step_scores[-1]
    if how == "min":
        return min(step_scores)
    if how == "prod":
        return math.prod(step_scores)
    if how == "mean":
        return sum(step_scores) / len(step_scores)
    raise UsageError(f"unknown aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")


class ProductReward(CachedReward):
    """The product of rewards raised to exponents: prod_i r_i(x) ** a_i (for example an
    arithmetic verifier times a judge). Scores are computed concurrently."""

    def __init__(self, factors: Sequence[tuple[Reward, float]]):
        super().__init__()
        if not factors:
            raise UsageError("a product of rewards needs at least one reward")
        self.factors = list(factors)
        self.name = "*".join(f"{r.name}^{a:g}" if a != 1 else r.name for r, a in self.factors)
        self.kind = "outcome" if all(r.kind == "outcome" for r, _ in self.factors) else "process"
        self.uses_logprobs = any(uses_logprobs(r) for r, _ in self.factors)

    async def close(self) -> None:
        for reward, _ in self.factors:
            await close_reward(reward)

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        parts = await asyncio.gather(*(r.score(requests) for r, _ in self.factors))
        values = [
            math.prod(max(part.values[i], 0.0) ** a for part, (_, a) in zip(parts, self.factors, strict=True))
            for i in range(len(requests))
        ]
        notes = {}
        for part, (reward, _) in zip(parts, self.factors, strict=True):
            notes.update({f"{reward.name}.{k}": v for k, v in part.notes.items()})
        return Scores(values, tokens=sum(p.tokens for p in parts), notes=notes)


# Failures of a reward's world, which the guard turns into the fallback score: a timeout, a
# server or network failure (BackendError, httpx errors, OSError), a reward that says it
# cannot score (RewardError and other ItscaleErrors). Anything else is a bug and surfaces.
REWARD_WORLD_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, ItscaleError, OSError, httpx.HTTPError)


@dataclass
class RewardGuard:
    """Keeps a failing reward from killing a run. A reward that times out, loses its server
    or says it cannot score (`REWARD_WORLD_FAILURES`), returns NaN, a value outside [0, 1] or
    the wrong number of scores gives the particles `fallback`; each such batch is counted,
    and once `max_failures` batches have failed the run stops with a RewardError. Any other
    exception is a bug in the reward and is raised as it is."""

    reward: Reward
    fallback: float = 0.5
    timeout: float | None = 300.0
    max_failures: int = 3
    failures: int = 0
    invalid_values: int = 0
    errors: list[str] = field(default_factory=list)

    async def score(self, requests: Sequence[ScoreRequest]) -> Scores:
        try:
            scores = await asyncio.wait_for(self.reward.score(requests), self.timeout)
        except REWARD_WORLD_FAILURES as error:
            self._fail(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
            return Scores([self.fallback] * len(requests))
        if len(scores.values) != len(requests):
            self._fail(f"{self.reward.name} returned {len(scores.values)} scores for {len(requests)} requests")
            return Scores([self.fallback] * len(requests), scores.tokens, scores.notes)
        valid = [isinstance(v, int | float) and not math.isnan(v) and 0.0 <= v <= 1.0 for v in scores.values]
        scores.values = [float(v) if ok else self.fallback for v, ok in zip(scores.values, valid, strict=True)]
        if not all(valid):
            self.invalid_values += valid.count(False)
            self._fail(f"returned {valid.count(False)} values that are NaN or outside [0, 1]")
        return scores

    def _fail(self, message: str) -> None:
        self.failures += 1
        self.errors.append(message)
        if self.failures >= self.max_failures:
            raise RewardError(
                f"reward {self.reward.name!r} failed {self.failures} times (last: {message}); "
                f"fix the reward, or raise max_reward_failures (now {self.max_failures})"
            )

    def diagnostics(self) -> dict[str, Any]:
        return {
            "reward_failures": self.failures,
            "reward_invalid_values": self.invalid_values,
            "reward_errors": self.errors[-5:],
        }
