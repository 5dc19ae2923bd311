"""Rewards without a judge model: the arithmetic verifier, self-certainty, the reference
verifier, reward specs and the registry, and the guard that keeps a failing reward from
killing a run (through real searches on SmolLM2)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest

from itscale.errors import BackendError, RewardError, UsageError
from itscale.rewards import ProductReward, RewardGuard, ScoreRequest, Scores, aggregate
from itscale.rewards.arithmetic import ArithmeticVerifier, find_equations
from itscale.rewards.base import CachedReward
from itscale.rewards.certainty import SelfCertainty
from itscale.rewards.reference import ReferenceVerifier
from itscale.rewards.registry import DEFAULT_REWARD, REWARDS, make_reward
from itscale.rewards.spec import parse_spec
from itscale.search import make_algorithm
from itscale.types import Prompt, Step

PROMPT = Prompt.of("What is 12 * 7?")
TINY = {"budget": 2, "max_steps": 3, "max_tokens": 24, "max_step_tokens": 8, "seed": 1}


def request(*steps: str, prefix: bool = False, records=()) -> ScoreRequest:
    if prefix:
        return ScoreRequest.for_prefix(PROMPT, steps, records=records)
    return ScoreRequest(PROMPT, tuple(steps), records=tuple(records))


# ------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Natalia sold 48 / 2 = 24 clips in May.", "right"),
        ("Natalia sold 48 / 2 = 26 clips in May.", "wrong"),
        ("So 3 x 4 = 12 apples.", "right"),
        ("So 3 x 4 = 13 apples.", "wrong"),
        ("$5 + 7 = 12$", "right"),
        ("$5 + 7 = 13$", "wrong"),
        ("The total is 2 + 3 = 5 = 10/2.", "right"),
        ("The total is 2 + 3 = 5 = 6.", "wrong"),  # chained: the second link is false
        ("$\\frac{3}{4} \\times 8 = 6$", "right"),
        ("$\\frac{3}{4} \\cdot 8 = 7$", "wrong"),
        ("She pays $1,200 * 2 = $2,400.", "right"),
        ("She pays $1,200 * 2 = $2,500.", "wrong"),
        ("1{,}000 + 1 = 1{,}001", "right"),
        ("20% of 50 = 10", "right"),
        ("10 / 3 = 3.33", "right"),  # rounding the text shows
        ("10 / 3 = 3", "wrong"),  # not a rounding: an error
        ("1. 16 - 3 = 13", "right"),  # a list number is not an operand
        ("- 16 - 3 = 13", "right"),  # nor is a bullet
        ("12 ÷ 4 = 3", "right"),
        ("0.1 * 3 ≈ 0.3", "right"),
        ("2(3+4) = 14", "right"),
        ("x = 5, so the answer is \\boxed{5}", "neutral"),
        ("10% of 200 = 20 dollars", "right"),
        ("Let's think about the clips she sold.", "neutral"),
        ("60 minutes / 15 = 4", "neutral"),  # words inside: nothing checkable
    ],
)
def test_arithmetic_verifier_checks_stated_equations(text, verdict):
    verifier = ArithmeticVerifier()
    expected = {"right": verifier.right, "wrong": verifier.wrong, "neutral": verifier.neutral}[verdict]
    assert verifier.check(text) == expected


def test_arithmetic_equations_are_exact_fractions():
    (equation,) = find_equations("$\\frac{1}{3} + \\frac{1}{6} = \\frac{1}{2}$")
    assert equation.holds and equation.left_value == equation.right_value
    # 0.1 + 0.2 is exactly 0.3 with fractions (binary floats say otherwise)
    assert all(e.holds for e in find_equations("0.1 + 0.2 = 0.3"))


async def test_arithmetic_scores_last_step_or_whole_prefix():
    verifier = ArithmeticVerifier()
    wrong_then_right = ("48 / 2 = 25\n\n", "24 + 48 = 72\n\n")
    scores = await verifier.score([request(*wrong_then_right), request(*wrong_then_right, prefix=True)])
    assert scores.values == [verifier.right, verifier.wrong]
    assert scores.tokens == 0


def test_arithmetic_rejects_scores_outside_unit_interval():
    with pytest.raises(ValueError, match="wrong score must be in"):
        ArithmeticVerifier(wrong=-0.1)


# ------------------------------------------------------------------ self-certainty


async def test_self_certainty_from_real_generator_records(smol):
    result = await make_algorithm("self-consistency").run(smol, "What is 12 * 7?", **TINY)
    steps = [s for p in result.particles for s in p.steps if s.logprob is not None]
    assert steps, "the embedded engine records log-probabilities"
    mean_logprob, kl = SelfCertainty("mean-logprob"), SelfCertainty("kl", scale=12.0)
    for particle in result.particles:
        records = tuple(particle.steps)
        texts = [s.text for s in records]
        values = (await mean_logprob.score([request(*texts, records=records)])).values
        last = records[-1]
        if last.logprob is not None:
            assert values[0] == pytest.approx(math.exp(last.logprob / last.tokens))
            kl_value = (await kl.score([request(*texts, records=records)])).values[0]
            assert kl_value == pytest.approx(1 - math.exp(-last.self_certainty / 12.0))
        # the whole prefix pools every step, weighted by tokens
        pooled = (await mean_logprob.score([request(*texts, prefix=True, records=records)])).values[0]
        counted = [s for s in records if s.logprob is not None]
        expected = math.exp(sum(s.logprob for s in counted) / sum(s.tokens for s in counted))
        assert pooled == pytest.approx(expected)
        assert 0.0 <= pooled <= 1.0


async def test_self_certainty_without_records_says_how_to_get_them():
    with pytest.raises(RewardError, match="log-probabilities"):
        await SelfCertainty().score([request("12 * 7 = 84\n\n")])
    no_distribution = Step("12 * 7 = 84", tokens=6, end="delimiter", logprob=-2.0, self_certainty=None)
    with pytest.raises(RewardError, match="variant=mean-logprob"):
        await SelfCertainty("kl").score([request("12 * 7 = 84", records=[no_distribution])])


async def test_self_certainty_empty_final_step_is_neutral_and_noted():
    empty = Step("", tokens=1, end="eos")
    scores = await SelfCertainty().score([request("", records=[empty])])
    assert scores.values == [0.5]
    assert scores.notes == {"steps_without_tokens": 1}


# ------------------------------------------------------------------ reference verifier


async def test_reference_verifier_scores_answers_and_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        verifier = ReferenceVerifier("72")
    assert any("not a fair result" in r.message for r in caplog.records)
    scores = await verifier.score([request("So 48 + 24 = \\boxed{72}."), request("The answer is 70.")])
    assert scores.values == [1.0, 0.0]
    assert "not a fair result" in scores.notes["warning"]
    assert verifier.kind == "outcome"
    with pytest.raises(UsageError, match="known answer"):
        ReferenceVerifier(None)


async def test_reference_warning_reaches_the_search_result(smol):
    reward = make_reward("reference", smol, reference="84")
    result = await make_algorithm("best-of-n").run(smol, "What is 12 * 7?", reward=reward, **TINY)
    assert "not a fair result" in result.diagnostics["reward_notes"]["warning"]


# ------------------------------------------------------------------ specs, registry, products


def test_reward_specs_parse_names_options_and_exponents():
    (judge,) = parse_spec('llm-judge(step_question="Is it right, really? Answer \\"Yes\\" or No.")')
    assert judge.options == {"step_question": 'Is it right, really? Answer "Yes" or No.'}
    a, b = parse_spec("arithmetic^2 * self-certainty(variant=kl, scale=8)")
    assert (a.name, a.exponent, b.name, b.options) == (
        "arithmetic",
        2.0,
        "self-certainty",
        {"variant": "kl", "scale": 8},
    )
    for bad, message in [
        ("", "empty"),
        ("arithmetic *", "reward name"),
        ("arithmetic(right)", "needs a value"),
        ("arithmetic^x", "not a number"),
        ("arithmetic llm-judge", "'\\*' between"),
        ("arithmetic(right=1", "expected ',' or '\\)'"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_spec(bad)


async def test_products_of_rewards_by_name_multiply_with_exponents():
    reward = make_reward("arithmetic^2 * arithmetic(right=0.5)")
    assert isinstance(reward, ProductReward)
    scores = await reward.score([request("3 x 4 = 12")])
    assert scores.values == [pytest.approx(0.95**2 * 0.5)]
    targeted = make_reward("arithmetic * self-certainty", **{"arithmetic.wrong": 0.0, "variant": "kl"})
    assert targeted.factors[0][0].wrong == 0.0 and targeted.factors[1][0].variant == "kl"


def test_registry_errors_name_the_problem(smol):
    with pytest.raises(UsageError, match="unknown reward 'nope'"):
        make_reward("nope", smol)
    with pytest.raises(UsageError, match="takes no option 'colour'"):
        make_reward("arithmetic", smol, colour="red")
    with pytest.raises(UsageError, match="fit no factor"):
        make_reward("arithmetic * self-certainty", smol, colour="red")
    with pytest.raises(UsageError, match="needs the PRM server"):
        make_reward("remote-prm", smol)
    with pytest.raises(UsageError, match="remote-judge needs a server"):
        make_reward("remote-judge", smol)
    with pytest.raises(UsageError, match="unknown self-certainty variant"):
        make_reward("self-certainty(variant=entropy)", smol)


def test_every_reward_is_registered_and_default_is_valid():
    assert {"llm-judge", "remote-judge", "hf-prm", "remote-prm", "arithmetic", "self-certainty", "reference"} <= set(
        REWARDS
    )
    assert all(f.name in REWARDS for f in parse_spec(DEFAULT_REWARD))


def test_itscale_rewards_command_lists_rewards(capsys):
    from itscale.cli import main

    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    for name in REWARDS:
        assert name in out
    assert "arithmetic * llm-judge" in out and f"default: {DEFAULT_REWARD}" in out


async def test_cached_reward_scores_each_content_once():
    class Counting(CachedReward):
        name = "counting"

        def __init__(self):
            super().__init__()
            self.seen = []

        async def _score(self, requests):
            self.seen.extend(r.steps for r in requests)
            return Scores([0.25] * len(requests), tokens=len(requests))

    reward = Counting()
    first = await reward.score([request("a"), request("a"), request("a", "b")])
    second = await reward.score([request("a", "b"), request("a", "c")])
    assert first.values == [0.25] * 3 and second.values == [0.25] * 2
    assert reward.seen == [("a",), ("a", "b"), ("a", "c")]
    assert (first.tokens, second.tokens) == (2, 1)


def test_aggregations():
    scores = [0.5, 0.8, 0.2]
    assert aggregate(scores, "last") == aggregate(scores, "model") == 0.2
    assert aggregate(scores, "min") == 0.2
    assert aggregate(scores, "prod") == pytest.approx(0.08)
    assert aggregate(scores, "mean") == pytest.approx(0.5)
    with pytest.raises(UsageError, match="unknown aggregation"):
        aggregate(scores, "max")


# ------------------------------------------------------------------ the guard, end to end


class Raising(CachedReward):
    """Fails like a remote reward whose server went away on the first `failures` calls, then
    scores 0.7."""

    name = "raising"

    def __init__(self, failures: int):
        super().__init__()
        self.failures, self.calls = failures, 0

    async def _score(self, requests):
        self.calls += 1
        if self.calls <= self.failures:
            raise BackendError("the reward server went away")
        return Scores([0.7] * len(requests))


class Buggy(CachedReward):
    """A programming error inside a reward."""

    name = "buggy"

    async def _score(self, requests):
        return Scores([len(None) for _ in requests])  # type: ignore[arg-type]


class Constant(CachedReward):
    """Returns one value for everything (NaN, 1.5, -0.2: all invalid)."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.name = value, f"constant-{value}"

    async def _score(self, requests):
        return Scores([self.value] * len(requests))


class Slow(CachedReward):
    name = "slow"

    async def _score(self, requests):
        await asyncio.sleep(5)
        return Scores([0.9] * len(requests))


class WrongLength(CachedReward):
    name = "wrong-length"

    async def _score(self, requests):
        return Scores([0.5])


async def run_pf(smol, reward, **settings):
    return await make_algorithm("particle-filter").run(smol, "What is 12 * 7?", reward=reward, **{**TINY, **settings})


async def test_a_reward_that_fails_once_does_not_kill_the_run(smol):
    result = await run_pf(smol, Raising(failures=1), reward_fallback=0.3)
    assert result.diagnostics["reward_failures"] == 1
    assert "BackendError: the reward server went away" in result.diagnostics["reward_errors"][0]
    first_step_scores = {p.steps[0].score for p in result.particles}
    assert first_step_scores == {0.3}  # the failed (first) batch got the fallback
    later = [s.score for p in result.particles for s in p.steps[1:]]
    assert later and set(later) == {0.7}  # and the reward scored again once it came back


async def test_a_bug_in_a_reward_surfaces_instead_of_becoming_the_fallback(smol):
    with pytest.raises(TypeError, match="len"):
        await run_pf(smol, Buggy(), max_reward_failures=100)


@pytest.mark.parametrize("value", [math.nan, 1.5, -0.2])
async def test_invalid_values_get_the_fallback_and_are_counted(smol, value):
    result = await run_pf(smol, Constant(value), reward_fallback=0.4, max_reward_failures=100)
    scores = [s.score for p in result.particles for s in p.steps if s.score is not None]
    assert scores and all(s == 0.4 for s in scores)
    assert result.diagnostics["reward_invalid_values"] >= len(result.particles)
    assert "NaN or outside [0, 1]" in result.diagnostics["reward_errors"][0]


class SlowChecks(ArithmeticVerifier):
    """An arithmetic verifier whose check blocks (CPU-bound work, or a pathological step)."""

    def check(self, text: str) -> float:
        time.sleep(3)
        return super().check(text)


async def test_the_timeout_fires_for_a_reward_that_blocks(smol):
    """The arithmetic verifier checks in a worker thread, so a check that takes too long is
    cut off by the reward timeout instead of stalling the event loop until it returns."""
    result = await run_pf(smol, SlowChecks(), reward_timeout=0.2, reward_fallback=0.6, max_steps=1)
    # Scoring time, not wall time: generation's share varies with the machine's load.
    assert result.usage.reward_seconds < 2.5  # the check alone takes 3 s
    assert "TimeoutError" in result.diagnostics["reward_errors"][0]
    assert all(s.score == 0.6 for p in result.particles for s in p.steps)


def test_nested_powers_are_bounded_work_not_a_hang():
    verifier = ArithmeticVerifier()
    started = time.perf_counter()
    assert verifier.check("(((9^64)^64)^64)^64 = 1") == verifier.neutral  # too big to check: no verdict
    assert verifier.check("2^10 * 2^10 = 1048576") == verifier.right  # ordinary powers still checked
    assert time.perf_counter() - started < 0.5  # was 26 s


async def test_a_reward_that_times_out_gets_the_fallback(smol):
    result = await run_pf(smol, Slow(), reward_timeout=0.2, reward_fallback=0.6, max_steps=1)
    assert result.diagnostics["reward_failures"] >= 1
    assert "TimeoutError" in result.diagnostics["reward_errors"][0]
    assert all(s.score == 0.6 for p in result.particles for s in p.steps)


async def test_a_reward_returning_the_wrong_number_of_scores_is_a_failure(smol):
    result = await run_pf(smol, WrongLength(), max_steps=1, budget=3)
    assert "wrong-length returned 1 scores for 3 requests" in result.diagnostics["reward_errors"][0]


async def test_repeated_failures_stop_the_run_with_a_clear_error(smol):
    with pytest.raises(
        RewardError, match=r"reward 'raising' failed 2 times .*went away.*max_reward_failures \(now 2\)"
    ):
        await run_pf(smol, Raising(failures=100), max_reward_failures=2, max_steps=3)


async def test_guard_stops_after_max_failures_failures_as_it_says():
    guard = RewardGuard(Raising(failures=100), fallback=0.2, max_failures=2)
    assert (await guard.score([request("a")])).values == [0.2]
    with pytest.raises(RewardError, match="failed 2 times"):
        await guard.score([request("b")])
    assert guard.diagnostics()["reward_failures"] == 2


async def test_the_score_cache_is_bounded_and_keeps_the_recently_used():
    reward = ArithmeticVerifier()
    reward.cache_size = 3
    for text in ("1 + 1 = 2", "2 + 2 = 4", "3 + 3 = 6"):
        await reward.score([request(text)])
    await reward.score([request("1 + 1 = 2")])  # used again: now the most recent
    await reward.score([request("4 + 4 = 8")])
    kept = {key[1][-1] for key in reward._cache}
    assert kept == {"1 + 1 = 2", "3 + 3 = 6", "4 + 4 = 8"}  # the least recently used went
