"""The population loop every algorithm shares.

    start N particles ──► propose: extend every live particle by one step (one batched call)
                          score:   the reward scores each new step (batched, cached)
                          select:  the algorithm's policy (weigh and resample, keep top-k, …)
                          stop?    all finished, the step cap, or the token budget spent

A `Run` is one execution of an algorithm on one prompt: its population, selection
randomness, genealogy, diagnostics and usage. `lockstep` is the loop; `Run.rollout` runs
particles that never meet before the end (self-consistency, best-of-N, ...) each to its end
without waiting at step boundaries for the slowest.

Semantics that matter (the anchors got these wrong):
- a finished particle (end of turn, a complete \\boxed{} answer, its token cap, or the step
  cap) is absorbing: resampling may copy it, nothing extends it again;
- `max_steps=k` means at most k steps;
- every token is counted: the prompt, every generated step, and every reward call;
- the same seed with the same backend gives the same result: each step's sampling seed is
  derived from (seed, sweep, step, particle id), selection draws from one seeded stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from itscale.answers import has_boxed_answer
from itscale.lm.base import (
    ExtendsToEnd,
    LanguageModel,
    StepOutput,
    StepSettings,
    extend_step_by_step,
)
from itscale.rewards.base import Reward, RewardGuard, ScoreRequest, aggregate, uses_logprobs
from itscale.search.settings import SearchSettings, derive_seed
from itscale.trace import Trace, rollout_trace
from itscale.types import Particle, Prompt, Resampling, Result, Step, Stopwatch, Usage

if TYPE_CHECKING:
    from itscale.search.base import Search


@dataclass
class Replay:
    """A trajectory replayed step by step instead of generated: the retained reference of
    conditional SMC (particle Gibbs). `branch` holds its KV state, forked at each step."""

    steps: list[Step]
    end: str | None
    branch: Any = None


class Run:
    """One execution of an algorithm on one prompt: a population and its bookkeeping.

    Sub-runs made with `spawn` (the chains of parallel tempering, the batches of adaptive
    self-consistency) have their own population, selection randomness, genealogy and
    diagnostics, and share the backend, the reward guard, the usage and the particle ids.
    """

    def __init__(
        self,
        algorithm: Search,
        lm: LanguageModel,
        prompt: Prompt,
        settings: SearchSettings,
        reward: Reward | None,
        shared: Run | None = None,
        key: int = 0,
    ):
        self.algorithm, self.lm, self.prompt, self.settings = algorithm, lm, prompt, settings
        self.reward = reward
        if shared is None:
            self.guard = (
                RewardGuard(reward, settings.reward_fallback, settings.reward_timeout, settings.max_reward_failures)
                if reward is not None
                else None
            )
            self.usage = Usage()
            self._ids = itertools.count()
        else:
            self.guard, self.usage, self._ids = shared.guard, shared.usage, shared._ids
        # Token log-probabilities are asked of a server only for a reward that reads them.
        self.step_settings = replace(algorithm.step_settings(settings), logprobs=uses_logprobs(reward))
        self.particles: list[Particle] = []
        self.genealogy: list[Resampling] = []
        self.diagnostics: dict[str, Any] = {}
        self.rng = np.random.default_rng(derive_seed(settings.seed, 0xA1, key))
        self.step = 0  # steps taken in the current sweep
        self.sweep = 0
        self.budget_limited = False
        self.observer: Callable[[Run], None] | None = shared.observer if shared is not None else None
        # Where a single rollout's text goes as it is generated (see `rollout`), if anywhere.
        self.stream: Callable[[str], None] | None = shared.stream if shared is not None else None
        # The trace, shared by the sub-runs (chains) of one search; None when not recorded.
        self.trace: Trace | None = shared.trace if shared is not None else None
        self.chain = key if shared is not None else 0
        self.ess: float | None = None  # the effective sample size the policy saw at this step

    def spawn(self, algorithm: Search, key: int) -> Run:
        """A sub-run of `algorithm` sharing this run's backend, reward, usage and ids."""
        return Run(algorithm, self.lm, self.prompt, self.settings, self.reward, shared=self, key=key)

    # ---------------------------------------------------------------- population

    async def start(self, n: int) -> list[Particle]:
        """N fresh particles, each on a fork of the prompt (evaluated once, shared)."""
        root = await self.lm.start(self.prompt)
        particles = [Particle(id=next(self._ids), branch=self.lm.fork(root)) for _ in range(n)]
        self.lm.release(root)
        self.step = 0
        return particles

    def new_id(self) -> int:
        return next(self._ids)

    def live(self) -> list[Particle]:
        return [p for p in self.particles if not p.finished]

    def finish(self, particle: Particle, end: str) -> None:
        particle.finished, particle.end = True, end

    def release(self, particle: Particle) -> None:
        if particle.branch is not None:
            self.lm.release(particle.branch)
            particle.branch = None

    def select(self, parents: Sequence[int], ess: float | None = None) -> None:
        """Replaces the population by copies of `parents` (indices into it). A child gets
        a fork of its parent's branch (finished children need none); the old branches are
        released, so the engine hands each parent's KV cells to one child without copying."""
        old = self.particles
        children = []
        for i in parents:
            parent = old[i]
            child = parent.copy(self.new_id())
            if parent.branch is not None and (not parent.finished or self.algorithm.keeps_finished_branches):
                child.branch = self.lm.fork(parent.branch)
            children.append(child)
        for p in old:
            self.release(p)
        self.genealogy.append(
            Resampling(self.step, [old[i].id for i in parents], [c.id for c in children], ess=ess, sweep=self.sweep)
        )
        self.particles = children

    def budget_spent(self) -> bool:
        cap = self.settings.token_budget
        return cap is not None and self.usage.budget_tokens >= cap

    def token_allowance(self, n_live: int) -> int | None:
        """Tokens each of `n_live` particles may generate this step under the token budget
        (None without one), so the cap holds within a step, not only between steps. The
        expected cost of scoring the step (the average reward tokens per scored step so
        far) is set aside first; 0 means the budget cannot pay for another step."""
        cap = self.settings.token_budget
        if cap is None:
            return None
        scoring = 0
        if self.algorithm.score_each_step and self.usage.scored_steps:
            scoring = math.ceil(self.usage.reward_tokens / self.usage.scored_steps) * n_live
        return max(0, (cap - self.usage.budget_tokens - scoring) // max(1, n_live))

    # ---------------------------------------------------------------- propose

    async def extend(self, particles: Sequence[Particle], settings: StepSettings | None = None) -> None:
        """One step for every given live particle: generated in one batched call, or
        replayed for a particle following a retained trajectory."""
        live = [p for p in particles if not p.finished]
        for p in [p for p in live if p.replay is not None]:
            self._replay_step(p)
        live = [p for p in live if p.replay is None]
        if not live:
            return
        settings = settings or self.step_settings
        remaining = self._token_caps(live, settings)
        if remaining is None:
            return
        seeds = [derive_seed(self.settings.seed, self.sweep, self.step, p.id) for p in live]
        with Stopwatch(self.usage, "lm_seconds"):
            outputs = await self.lm.extend([p.branch for p in live], settings, seeds, remaining)
        self.usage.lm_calls += 1
        for p, out in zip(live, outputs, strict=True):
            self._record(p, out, settings)

    async def rollout(self, particles: Sequence[Particle]) -> None:
        """Every given live particle step after step to its end, none waiting for another:
        for algorithms that select nothing between steps. The steps, their seeds and the
        ends are those `extend` would give step by step in lockstep; what changes is the
        batching: a particle that ends a step goes straight on with its next one instead
        of waiting for the slowest particle's step (one backend call for the whole run)."""
        live = [p for p in particles if not p.finished and p.replay is None]
        if not live:
            return
        settings, first = self.step_settings, self.step
        remaining = self._token_caps(live, settings)
        if remaining is None:
            return
        steps = self.settings.max_steps - first
        seeds = [[derive_seed(self.settings.seed, self.sweep, first + k, p.id) for k in range(steps)] for p in live]
        with Stopwatch(self.usage, "lm_seconds"):
            # A single rollout can be streamed as it is generated (a server's budget-1 request).
            on_text = (lambda i, text: self.stream(text)) if self.stream is not None and len(live) == 1 else None
            outputs = await extend_to_end(
                self.lm, [p.branch for p in live], settings, seeds, remaining, self._rollout_stop, on_text
            )
        self.usage.lm_calls += 1
        for p, outs in zip(live, outputs, strict=True):
            for out in outs:
                self._record(p, out, settings)
            if not p.finished:
                if len(outs) == steps:
                    self.finish(p, "max_steps")
                else:  # stopped by its share of the token budget
                    self.budget_limited = True
        self.step = first + max(len(outs) for outs in outputs)

    def _token_caps(self, live: Sequence[Particle], settings: StepSettings) -> list[int] | None:
        """The tokens each live particle may still generate (its answer's cap, lowered to
        its share of the token budget); None, and the run marked budget-limited, when the
        budget cannot pay for another step."""
        allowance = self.token_allowance(len(live))
        if allowance == 0:
            self.budget_limited = True
            return None
        remaining = [max(1, settings.max_tokens - p.tokens) for p in live]
        return remaining if allowance is None else [min(r, allowance) for r in remaining]

    def _rollout_stop(self, text: str) -> bool:
        """Whether a rollout ends after a step with this text: a complete \\boxed{} answer
        or one of the settings' stop strings."""
        return has_boxed_answer(text) or _stop_cut(text, self.settings.stop) is not None

    def _record(self, p: Particle, out: StepOutput, settings: StepSettings) -> None:
        """Appends a generated step to its particle, counts it, and ends the particle if
        the step ended its answer."""
        cut = _stop_cut(out.text, self.settings.stop)
        text = out.text if cut is None else out.text[:cut]
        p.steps.append(Step(text, out.tokens, out.end, out.logprob, out.self_certainty, features=out.features))
        self.usage.prompt_tokens += out.prompt_tokens
        self.usage.completion_tokens += out.tokens
        if cut is not None:
            self.finish(p, "stop")  # a stop string: the answer ends before it
        elif out.end == "eos":
            self.finish(p, "eos")
        elif has_boxed_answer(out.text):
            self.finish(p, "answer")
        elif out.end == "length" or p.tokens >= settings.max_tokens:
            self.finish(p, "length")

    def _replay_step(self, p: Particle) -> None:
        """Appends the next step of the particle's retained trajectory (generated and scored
        in an earlier sweep: it costs nothing now)."""
        replay = p.replay
        k = len(p.steps)
        p.steps.append(replace(replay.steps[k]))
        self.release(p)
        if replay.branch is not None:
            p.branch = self.lm.fork(replay.branch, steps=k + 1)
        if p.step_scores():
            p.score = aggregate(p.step_scores(), self.algorithm.aggregation)
        if k + 1 == len(replay.steps):
            self.finish(p, replay.end or "max_steps")

    # ---------------------------------------------------------------- score

    def _request(self, p: Particle, k: int, branch: Any) -> ScoreRequest:
        texts = [s.text for s in p.steps[:k]]
        records = tuple(p.steps[:k])
        if self.algorithm.aggregation == "model":
            return ScoreRequest.for_prefix(self.prompt, texts, branch, records)
        return ScoreRequest(self.prompt, tuple(texts), branch, records=records)

    async def score(self, particles: Sequence[Particle], all_steps: bool = False) -> None:
        """Scores the particles' unscored steps: the last one, or with `all_steps` every
        step the aggregation needs (only the last for "last" and "model")."""
        await score_together([(self, particles)], all_steps)

    def _score_requests(
        self, particles: Sequence[Particle], all_steps: bool
    ) -> list[tuple[ScoreRequest, Particle, int]]:
        need_all = all_steps and self.algorithm.aggregation not in ("last", "model")
        wanted = []
        for p in particles:
            if not p.steps:
                continue
            for k in range(1, len(p.steps) + 1) if need_all else [len(p.steps)]:
                if p.steps[k - 1].score is None:
                    branch = p.branch
                    if branch is not None and k < len(p.steps):
                        branch = self.lm.fork(branch, steps=k)  # released after scoring
                    wanted.append((self._request(p, k, branch), p, k))
        return wanted

    # ---------------------------------------------------------------- the loop

    async def loop(self) -> None:
        """Propose, score, select until every particle has finished, the step cap is
        reached or the token budget is spent. Independent rollouts (an algorithm that
        selects nothing between steps) need no common step boundary: each particle runs
        to its end on its own."""
        if self.algorithm.independent_rollouts:
            await self.rollout(self.particles)
            if self.observer is not None:
                self.observer(self)
        else:
            await lockstep([self])

    # ---------------------------------------------------------------- result

    def result(self, chosen: Particle | None, answer: str | None, weights: Sequence[float]) -> Result:
        for p in self.particles:
            self.release(p)
        if self.guard is not None:
            self.diagnostics.update(self.guard.diagnostics())
        # What the backend learned about its server, and what a user must be told about it
        # (a chat template it had to assume, a server that does not say why it stopped).
        if getattr(self.lm, "diagnostics", None):
            self.diagnostics["backend"] = dict(self.lm.diagnostics)
        if getattr(self.lm, "warnings", None):
            self.diagnostics["warnings"] = list(self.lm.warnings.values())
        if self.trace is not None:
            mine = [c for c in self.trace.columns if c.chain == self.chain]
            if not mine:
                rollout_trace(self.trace, self.particles, self.sweep, self.chain)  # independent rollouts
            elif [n["id"] for n in mine[-1].nodes] != [p.id for p in self.particles]:
                # A last selection (beam search keeping its best N) made the final population.
                self.trace.record(self.particles, self.step, self.sweep, self.chain, set())
            self.trace.finish(self.particles, weights, chosen, answer, self.diagnostics.get("votes"))
        return Result(
            answer=answer,
            text=chosen.text if chosen is not None else "",
            particles=self.particles,
            weights=[float(w) for w in weights],
            algorithm=self.algorithm.name,
            usage=self.usage,
            genealogy=self.genealogy,
            diagnostics=self.diagnostics,
            settings={
                **asdict(self.settings),
                **self.algorithm.describe(),
                "reward": getattr(self.reward, "name", None),
            },
            budget_limited=self.budget_limited,
            trace=self.trace,
        )


async def score_together(work: Sequence[tuple[Run, Sequence[Particle]]], all_steps: bool = False) -> None:
    """Scores the particles of one or more runs (sharing a reward) in one reward call."""
    wanted = [(run, *item) for run, particles in work for item in run._score_requests(particles, all_steps)]
    if not wanted or wanted[0][0].guard is None:
        return
    lead = wanted[0][0]
    try:
        with Stopwatch(lead.usage, "reward_seconds"):
            scores = await lead.guard.score([request for _, request, _, _ in wanted])
    finally:
        for run, request, particle, _ in wanted:
            if request.branch is not None and request.branch is not particle.branch:
                run.lm.release(request.branch)  # a fork made for an earlier step
    lead.usage.reward_calls += 1
    lead.usage.reward_tokens += scores.tokens
    lead.usage.scored_steps += len(wanted)
    for run in {id(run): run for run, *_ in wanted}.values():
        if scores.notes:
            run.diagnostics.setdefault("reward_notes", {}).update(scores.notes)
    for (_, _, particle, k), value in zip(wanted, scores.values, strict=True):
        particle.steps[k - 1].score = value
    for run, _, particle, _ in wanted:
        particle.score = aggregate(particle.step_scores(), run.algorithm.aggregation)


async def extend_to_end(
    lm: LanguageModel,
    branches: Sequence[Any],
    settings: StepSettings,
    seeds: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    stop: Callable[[str], bool] = has_boxed_answer,
    on_text: Callable[[int, str], None] | None = None,
) -> list[list[StepOutput]]:
    """Extends each branch step after step (step k seeded by `seeds[i][k]`) until the model
    ends its answer, `stop(step text)` holds (by default: the step has a complete \\boxed{}
    answer), its `max_new_tokens[i]` are spent or its seeds run out. A backend with an
    `extend_to_end` of its own does this inside its batching (the embedded engine: in its
    thread, so batch composition never depends on timing; a server: one request a rollout);
    for any other, each branch's steps are requested one after another."""
    if on_text is not None and getattr(lm, "streams_text", False):  # a backend that streams: text as it comes
        return await lm.extend_to_end(branches, settings, seeds, max_new_tokens, stop, on_text=on_text)
    if isinstance(lm, ExtendsToEnd):
        return await lm.extend_to_end(branches, settings, seeds, max_new_tokens, stop)
    return await extend_step_by_step(lm, branches, settings, seeds, max_new_tokens, stop)


async def lockstep(runs: Sequence[Run]) -> None:
    """The population loop for one or more populations stepped together: every round, all
    their live particles are extended in one batched call and scored in one reward call,
    then each population's policy selects. Several chains stepped this way batch on the
    backend and stay reproducible (batch composition never depends on timing)."""
    while True:
        active = [r for r in runs if r.live()]
        if not active:
            return
        lead = active[0]
        if lead.budget_spent():
            for r in active:
                r.budget_limited = True
            return
        live = [(r, r.live()) for r in active]
        await lead.extend([p for _, ps in live for p in ps])
        if lead.budget_limited:  # the budget could not pay for this step: nothing was generated
            for r in active:
                r.budget_limited = True
            return
        for r, ps in live:
            r.step += 1
            if r.step >= r.settings.max_steps:
                for p in ps:
                    if not p.finished:
                        r.finish(p, "max_steps")
        await score_together([(r, ps) for r, ps in live if r.algorithm.score_each_step])
        for r, ps in live:
            events = len(r.genealogy)
            column = r.trace.record(r.particles, r.step, r.sweep, r.chain, {p.id for p in ps}) if r.trace else None
            r.ess = None
            await r.algorithm.select(r)
            if column is not None:
                r.trace.selected(column, r.genealogy[-1] if len(r.genealogy) > events else None, r.ess)
            if r.algorithm.score_each_step and not r.algorithm.keeps_finished_branches:
                # Finished particles are never extended again; an algorithm that scores at
                # the end keeps their branches so the reward can reuse their KV cache.
                for p in r.particles:
                    if p.finished:
                        r.release(p)
            if r.observer is not None:
                r.observer(r)


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of the stop strings begins in `text`, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None
