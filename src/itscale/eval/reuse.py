"""Sample reuse: evaluate budget b on the first b rollouts of one run at a larger budget N.

For an algorithm with `reuses_samples` the rollouts are independent and its choice depends
on the final particles only (`Search.pick`), so the answer at budget b is
`pick(particles[:b])`, as search-and-learn evaluates best-of-N. Its cost must be what a run
at budget b would have cost, not the big run's. Usage at budget b:

- completion tokens: exactly the tokens of the first b particles;
- prompt tokens: the tokens the backend reported for the first b particles' requests, plus
  the shared prompt. The backend charges the shared prompt to one particle (the engine
  evaluates it once; a server answering `n` choices reports it once): on the first call, the
  largest charge minus the smallest is that shared part, counted at every budget. At b = N
  this sums to the run's prompt tokens exactly;
- reward tokens: the run's reward tokens in proportion to the scored steps of the first b
  particles (each scored step is one reward request of the same shape);
- generation calls: one batched call per step in lockstep, so the most steps among the first
  b, or the run's single call when its rollouts ran independently (`Run.rollout`);
- wall time (`seconds`, `lm_seconds`, `reward_seconds`): the run's, in proportion to the
  tokens above. An estimate, marked `seconds_estimated` in the record: batched decoding makes
  a small run cheaper per token than this says, never dearer.

`MeteredModel` measures the per-particle prompt tokens: it wraps the backend for the run and
remembers which fork of the prompt each particle got (forks are made in particle order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from itscale.lm.base import Branch, LanguageModel, StepOutput, StepSettings
from itscale.search.population import extend_to_end
from itscale.types import Particle, Prompt, Result, Usage


@dataclass
class _Meter:
    first: int | None = None  # prompt tokens charged on this branch's first generation call
    total: int = 0


@dataclass
class MeteredModel:
    """A LanguageModel that passes everything through and counts prompt tokens per fork of
    the prompt. Anything else a search asks of the backend is delegated unchanged."""

    inner: LanguageModel
    forks: list[Branch] = field(default_factory=list)
    meters: dict[int, tuple[Branch, _Meter]] = field(default_factory=dict)
    roots: list[Branch] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def start(self, prompt: Prompt) -> Branch:
        root = await self.inner.start(prompt)
        self.roots.append(root)
        return root

    def fork(self, branch: Branch, steps: int | None = None) -> Branch:
        child = self.inner.fork(branch, steps)
        if any(branch is r for r in self.roots):
            self.forks.append(child)
            self.meters[id(child)] = (child, _Meter())
        return child

    def release(self, branch: Branch) -> None:
        self.inner.release(branch)

    async def extend(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[StepOutput]:
        outputs = await self.inner.extend(branches, settings, seeds, max_new_tokens)
        for branch, out in zip(branches, outputs, strict=True):
            self._charge(branch, out)
        return outputs

    async def extend_to_end(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        stop: Callable[[str], bool],
    ) -> list[list[StepOutput]]:
        outputs = await extend_to_end(self.inner, branches, settings, seeds, max_new_tokens, stop)
        for branch, outs in zip(branches, outputs, strict=True):
            for out in outs:
                self._charge(branch, out)
        return outputs

    def _charge(self, branch: Branch, out: StepOutput) -> None:
        entry = self.meters.get(id(branch))
        if entry is not None and entry[0] is branch:
            meter = entry[1]
            if meter.first is None:
                meter.first = out.prompt_tokens
            meter.total += out.prompt_tokens

    async def close(self) -> None:
        await self.inner.close()

    def prompt_split(self, n: int, total: int) -> tuple[int, list[int]]:
        """(shared prompt tokens, each particle's own prompt tokens) for n particles whose
        run reported `total` prompt tokens. Falls back to an even split when the forks do not
        line up with the particles (an algorithm that made its population differently)."""
        meters = [self.meters[id(b)][1] for b in self.forks]
        if len(meters) != n or any(m.first is None for m in meters) or sum(m.total for m in meters) != total:
            return 0, _even(total, n)
        firsts = [m.first or 0 for m in meters]
        shared = max(firsts) - min(firsts)
        payer = firsts.index(max(firsts))
        own = [m.total - (shared if i == payer else 0) for i, m in enumerate(meters)]
        return shared, own


def _even(total: int, n: int) -> list[int]:
    shares = [total // n] * n
    shares[0] += total - sum(shares)
    return shares


def subset_usage(result: Result, b: int, shared_prompt: int, own_prompt: list[int]) -> tuple[Usage, bool]:
    """The usage a run at budget b would have had, from the first b particles (see the module
    docstring); also whether the wall times are estimates (b < N)."""
    particles: list[Particle] = result.particles
    n, total = len(particles), result.usage
    if b >= n:
        return total, False
    first = particles[:b]
    scored = [sum(1 for s in p.steps if s.score is not None) for p in particles]
    scored_share = sum(scored[:b]) / sum(scored) if sum(scored) else b / n
    usage = Usage(
        prompt_tokens=shared_prompt + sum(own_prompt[:b]),
        completion_tokens=sum(p.tokens for p in first),
        reward_tokens=round(total.reward_tokens * scored_share),
        # One call per step in lockstep, one for the whole run in independent rollouts.
        lm_calls=min(total.lm_calls, max((len(p.steps) for p in first), default=0)),
        reward_calls=total.reward_calls,
    )
    if hasattr(total, "scored_steps"):  # newer Usage counts the reward's scored steps
        usage.scored_steps = sum(scored[:b])
    share = usage.total_tokens / total.total_tokens if total.total_tokens else b / n
    usage.seconds = total.seconds * share
    usage.lm_seconds = total.lm_seconds * share
    usage.reward_seconds = total.reward_seconds * share
    return usage, True
