"""Algorithms on the real embedded engine (SmolLM2-135M) with the real LLM judge.

SmolLM2 is useless at math, so these tests check the contracts, not accuracy: population
sizes, step caps, absorbing finished particles, weights, usage and reproducibility.
"""

from __future__ import annotations

import math

import pytest

from conftest import make_test_algorithm
from itscale.answers import is_equivalent
from itscale.errors import UsageError
from itscale.rewards.judge import LLMJudge
from itscale.search import algorithm_names, make_algorithm
from itscale.search.settings import SearchSettings
from itscale.types import FINISHING

PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SMALL = SearchSettings(budget=3, max_steps=3, max_step_tokens=24, max_tokens=64, seed=7)


@pytest.fixture
def judge(smol):
    """A fresh judge per test: a judge caches scores by content, so a shared one would make
    later runs score for free."""
    return LLMJudge(smol)


def assert_well_formed(result, budget: int) -> None:
    assert len(result.particles) == budget == len(result.weights)
    assert math.isclose(sum(result.weights), 1.0, abs_tol=1e-6)
    for p in result.particles:
        assert 1 <= len(p.steps) <= SMALL.max_steps
        # Absorbing: nothing ever follows a step that finished the particle.
        assert all(s.end in ("delimiter", "step_cap") for s in p.steps[:-1])
        if p.finished:
            assert p.end in FINISHING
    u = result.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.seconds > 0


@pytest.mark.parametrize("name", ["greedy", "self-consistency", "best-of-n", "weighted-best-of-n"])
async def test_sampling_algorithms(smol, judge, name: str) -> None:
    algorithm = make_algorithm(name)
    result = await algorithm.run(smol, PROBLEM, SMALL, reward=judge)
    budget = 1 if name == "greedy" else SMALL.budget
    assert_well_formed(result, budget)
    answers = [p.answer for p in result.particles]
    if name == "self-consistency":
        counts = {a: sum(1 for b in answers if b is not None and is_equivalent(a, b)) for a in answers if a}
        assert result.answer is None or counts[result.answer] == max(counts.values())
    if name in ("best-of-n", "weighted-best-of-n"):
        assert all(p.score is not None and 0 <= p.score <= 1 for p in result.particles)
        assert result.usage.reward_tokens > 0 and result.usage.reward_calls == 1
    if name == "best-of-n":
        best = max(result.particles, key=lambda p: p.score)
        assert result.answer == best.answer
    if name == "weighted-best-of-n" and result.answer is not None:
        totals = {}
        for p in result.particles:
            if p.answer is not None:
                key = next((k for k in totals if is_equivalent(p.answer, k)), p.answer)
                totals[key] = totals.get(key, 0.0) + p.score
        assert totals[result.answer] == max(totals.values())


async def test_particle_filter_paper_mode(smol, judge) -> None:
    result = await make_algorithm("particle-filter").run(smol, PROBLEM, SMALL.replace(budget=4), reward=judge)
    assert_well_formed(result, 4)
    assert result.usage.reward_tokens > 0
    # Paper weights: softmax over the pool of logit(prefix reward) / temperature, the logit
    # computed here (with the paper's clamp), not with the implementation's function.
    clamped = [min(max(p.score, 1e-6), 1 - 1e-6) for p in result.particles]
    logits = [math.log(r / (1 - r)) for r in clamped]
    top = max(logits)
    expected = [math.exp(v - top) for v in logits]
    assert result.weights == pytest.approx([e / sum(expected) for e in expected], abs=1e-9)
    best = max(range(4), key=lambda i: result.weights[i])
    assert result.answer == result.particles[best].answer
    # Multinomial resampling after every step that left a live particle, with genealogy.
    assert result.diagnostics["resampled_steps"] == len(result.genealogy) >= 1
    for event in result.genealogy:
        assert len(event.parents) == len(event.children) == 4
    # Particles get ids only when selected: the final pool is the last event's children.
    assert [p.id for p in result.particles] == result.genealogy[-1].children
    for earlier, later in zip(result.genealogy, result.genealogy[1:], strict=False):
        assert set(later.parents) <= set(earlier.children)


async def test_same_seed_same_result_and_other_seeds_differ(smol, judge) -> None:
    algorithm = make_algorithm("particle-filter")
    first = await algorithm.run(smol, PROBLEM, SMALL, reward=judge)
    again = await algorithm.run(smol, PROBLEM, SMALL, reward=LLMJudge(smol))
    assert [p.text for p in again.particles] == [p.text for p in first.particles]
    assert again.weights == pytest.approx(first.weights)
    other = await algorithm.run(smol, PROBLEM, SMALL.replace(seed=8), reward=LLMJudge(smol))
    assert [p.text for p in other.particles] != [p.text for p in first.particles]


async def test_max_steps_means_at_most_k_steps(smol) -> None:
    for k in (1, 2):
        result = await make_algorithm("self-consistency").run(
            smol, PROBLEM, SMALL.replace(max_steps=k, max_tokens=200, max_step_tokens=8)
        )
        assert max(len(p.steps) for p in result.particles) <= k
        assert any(p.end == "max_steps" and len(p.steps) == k for p in result.particles)


async def test_usage_counts_prompt_generation_and_reward(smol, judge) -> None:
    result = await make_algorithm("best-of-n").run(smol, PROBLEM, SMALL, reward=judge)
    u = result.usage
    assert u.completion_tokens == sum(p.tokens for p in result.particles)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens + u.reward_tokens
    assert u.lm_seconds > 0 and u.reward_seconds > 0 and u.seconds >= u.lm_seconds
    as_dict = result.to_dict()
    assert as_dict["usage"]["total_tokens"] == u.total_tokens
    assert as_dict["settings"]["budget"] == SMALL.budget and as_dict["settings"]["reward"] == "llm-judge"


async def test_bad_input(smol) -> None:
    with pytest.raises(UsageError, match="empty"):
        await make_algorithm("greedy").run(smol, "   ")
    with pytest.raises(UsageError, match="budget"):
        SearchSettings(budget=0)
    with pytest.raises(UsageError, match="needs a reward"):
        await make_algorithm("best-of-n").run(smol, PROBLEM, SMALL)
    with pytest.raises(UsageError, match="unknown algorithm"):
        make_algorithm("beam-me-up")
    with pytest.raises(UsageError, match="unknown aggregation"):
        make_algorithm("best-of-n", aggregation="median")
    with pytest.raises(UsageError, match="mode"):
        make_algorithm("particle-filter", mode="exact")
    assert "particle-filter-sound" in algorithm_names()


@pytest.mark.parametrize("name", [n for n in algorithm_names() if n not in ("greedy", "self-consistency")])
async def test_every_algorithm_on_the_engine_releases_its_kv_cache(smol, name: str) -> None:
    """Forks, replayed references (particle Gibbs), chains stepped together (parallel
    tempering) and lookahead probes all run on real KV sequences and give them all back."""
    options = {"sweeps": 2} if name in ("particle-gibbs", "parallel-tempering") else {}
    if name in ("beam-search", "dvts"):
        options = {"beam_width": 2, "lookahead": 1} if name == "beam-search" else {"beam_width": 2}
    algorithm = make_test_algorithm(name, **options)
    reward = LLMJudge(smol) if algorithm.uses_reward else None
    result = await algorithm.run(smol, PROBLEM, SMALL.replace(budget=8, max_tokens=48, max_steps=2), reward=reward)
    assert result.particles and result.usage.completion_tokens > 0
    assert all(len(p.steps) <= 2 for p in result.particles)
    assert smol.cached_branches == 0
