"""Running units: one search per unit, graded by the answers module, turned into records;
`stream` runs K units at once on one backend and yields each unit's records when done.

Each run gets a fresh reward: rewards cache scores by content, so one shared across runs
would make a run's reward tokens depend on what ran before it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from itscale.answers import extract_answer, is_equivalent
from itscale.errors import ItscaleError
from itscale.eval.datasets import Problem
from itscale.eval.plan import Unit
from itscale.eval.reuse import MeteredModel, subset_usage
from itscale.lm.base import LanguageModel
from itscale.rewards.base import close_reward
from itscale.rewards.registry import make_reward
from itscale.search import make_algorithm
from itscale.search.settings import SearchSettings
from itscale.trace import Trace, rollout_trace
from itscale.types import Particle, Result, Usage


@dataclass(frozen=True)
class Job:
    """What a worker needs besides its units and its backend (picklable, for Ray)."""

    settings: SearchSettings
    reward: str
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    trace: bool = False  # keep every run's trace in its records (`itscale view DIR --problem ...`)


async def run_unit(unit: Unit, job: Job, lm: LanguageModel, judge: Any = None) -> list[dict[str, Any]]:
    """Runs the unit's search and returns its records (one per budget it covers)."""
    started = time.time()
    search = make_algorithm(unit.algorithm, **job.options.get(unit.algorithm, {}))
    reward = (
        make_reward(job.reward, lm, judge, **reward_options(job.reward, unit.problem)) if search.uses_reward else None
    )
    try:
        return await _run_unit(unit, job, lm, search, reward, started)
    finally:
        await close_reward(reward)


async def _run_unit(
    unit: Unit, job: Job, lm: LanguageModel, search: Any, reward: Any, started: float
) -> list[dict[str, Any]]:
    settings = job.settings.replace(budget=unit.run_budget, seed=unit.seed)
    if not unit.reuse:  # one run; several budgets only for an algorithm that ignores the budget
        result = await search.run(lm, unit.problem.problem, settings, reward=reward, trace=job.trace)
        records = [
            _record(unit, b, result, result.particles, result.answer, result.text, result.usage) for b in unit.budgets
        ]
        if job.trace:
            for record in records:
                record["trace"] = result.trace_dict()
        return _stamped(records, started, lm)
    metered = MeteredModel(lm)
    result = await search.run(metered, unit.problem.problem, settings, reward=reward, trace=job.trace)
    shared, own = metered.prompt_split(len(result.particles), result.usage.prompt_tokens)
    records = []
    for algorithm, budgets in unit.picks:
        picker = search if algorithm == unit.algorithm else make_algorithm(algorithm, **job.options.get(algorithm, {}))
        for b in budgets:
            subset = result.particles[:b]
            pick = picker.pick(subset)
            text = subset[pick.index].text if pick.index is not None else ""
            usage, estimated = subset_usage(result, b, shared, own)
            record = _record(unit, b, result, subset, pick.answer, text, usage, pick.weights, pick.notes)
            if not picker.uses_reward:
                _without_reward(record)
            record.update(
                algorithm=algorithm,
                sampled_from=len(result.particles),
                seconds_estimated=estimated,
                rollouts_of=unit.algorithm,
            )
            if job.trace:  # the rollouts this choice saw, and the choice
                trace = Trace(result.trace.prompt)
                rollout_trace(trace, subset)
                chosen = subset[pick.index] if pick.index is not None else None
                trace.finish(subset, pick.weights, chosen, pick.answer, pick.notes.get("votes"))
                settings_of = {**result.settings, "algorithm": algorithm, "budget": b}
                record["trace"] = trace.to_dict(algorithm=algorithm, settings=settings_of, usage=record["usage"])
            records.append(record)
    return _stamped(records, started, lm)


def _without_reward(record: dict[str, Any]) -> None:
    """A record for an algorithm that does not use the reward, picked from a shared run that
    scored its rollouts: what its own run would have recorded and cost (no scores, no reward
    tokens, calls or time)."""
    usage = record["usage"]
    usage["seconds"] -= usage["reward_seconds"]
    usage["total_tokens"] -= usage["reward_tokens"]
    usage.update(reward_tokens=0, reward_calls=0, scored_steps=0, reward_seconds=0.0)
    for particle in record["particles"]:
        particle["score"] = None
    record["diagnostics"] = {k: v for k, v in record["diagnostics"].items() if not k.startswith("reward")}


def _stamped(records: list[dict[str, Any]], started: float, lm: Any) -> list[dict[str, Any]]:
    """When and where the run happened (wall clock; host:pid tells Ray workers apart; the
    embedded engine's CPU threads)."""
    where = f"{socket.gethostname()}:{os.getpid()}"
    finished = time.time()
    for r in records:
        r.update(started=started, finished=finished, worker=where, threads=getattr(lm, "n_threads", None))
    return records


def reward_factors(spec: str) -> list[str]:
    """The reward names in a reward spec ("arithmetic * llm-judge")."""
    from itscale.rewards.spec import parse_spec

    return [factor.name for factor in parse_spec(spec)]


def reward_options(spec: str, problem: Problem) -> dict[str, Any]:
    """The per-problem options a reward needs: the reference verifier (an oracle, for
    pass@N-style upper bounds) is given the problem's known answer."""
    return {"reference": problem.answer} if "reference" in reward_factors(spec) else {}


def _record(
    unit: Unit,
    budget: int,
    result: Result,
    particles: Sequence[Particle],
    answer: str | None,
    text: str,
    usage: Usage,
    weights: Sequence[float] | None = None,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "problem": unit.problem.id,
        "algorithm": unit.algorithm,
        "budget": budget,
        "seed": unit.seed,
        "reference": unit.problem.answer,
        "answer": answer,
        "correct": is_equivalent(answer, unit.problem.answer),
        # Strict: the chosen solution states its answer (boxed, or an explicit final-answer
        # line) and it is right; `correct` also accepts the last number of the text.
        "correct_strict": is_equivalent(extract_answer(text, strict=True), unit.problem.answer),
        "text": text,
        "particles": [
            {"answer": p.answer, "score": p.score, "tokens": p.tokens, "steps": len(p.steps), "end": p.end}
            for p in particles
        ],
        "weights": list(result.weights if weights is None else weights),
        "usage": usage.to_dict(),
        "sampled_from": None,
        "seconds_estimated": False,
        "budget_limited": result.budget_limited,
        "diagnostics": result.diagnostics if notes is None else {**result.diagnostics, **notes},
    }


_DONE = object()


def _located(error: Exception, unit: Unit | None) -> Exception:
    """The error, its message prefixed with the run it stopped (for a user's error, whose
    message is all the CLI prints)."""
    if unit is None or not isinstance(error, ItscaleError):
        return error
    try:
        located = type(error)(f"{unit.algorithm} at budget {unit.run_budget} on problem {unit.problem.id}: {error}")
    except TypeError:
        return error
    located.__cause__ = error
    return located


async def stream(
    units: Sequence[Unit], job: Job, lm: LanguageModel, judge: Any = None, workers: int = 1
) -> AsyncIterator[list[dict[str, Any]]]:
    """Yields each unit's records as it finishes, running up to `workers` units at once (a
    server backend serves them concurrently; the embedded engine batches them together).
    The first error stops every worker and is raised here."""
    todo = iter(units)
    finished: asyncio.Queue = asyncio.Queue()

    async def worker() -> None:
        unit = None
        try:
            for unit in todo:  # one shared iterator: each unit is taken once
                await finished.put(await run_unit(unit, job, lm, judge))
        except Exception as error:
            await finished.put(_located(error, unit))
        finally:
            await finished.put(_DONE)

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, len(units))))]
    running = len(tasks)
    try:
        while running:
            item = await finished.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
