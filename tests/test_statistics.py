"""The samplers, checked against exact answers on a toy state-space model (tests/toy.py).

Everything runs through the real population loop with a `LanguageModel` whose steps are
draws from a known Markov chain and a `Reward` that is a known likelihood, so the target
p(x) r(x) / Z and Z are computed exactly by enumeration. Seeds are fixed: the tests are
deterministic, and their tolerances are set from the Monte Carlo error of the sample sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_test_algorithm
from itscale.rewards.base import CachedReward, ScoreRequest, Scores
from itscale.search import algorithm_names, make_algorithm
from itscale.search.gibbs import ParallelTempering
from itscale.search.particle_filter import annealing_temperature
from itscale.search.resampling import SCHEMES, effective_sample_size, normalise_log_weights, resample
from itscale.search.sampling import BestOfMajority, SelfConsistency, majority_confidence
from itscale.search.settings import SearchSettings
from itscale.types import FINISHING, Particle, Step
from toy import STOP, TRANS, G, MarkovLM, PotentialReward, exact_posterior, total_variation

T = 4  # steps


def settings(**changes) -> SearchSettings:
    return SearchSettings(**{"max_steps": T, "system_prompt": None, **changes})


@pytest.fixture
def lm() -> MarkovLM:
    return MarkovLM(TRANS, STOP)


@pytest.fixture(scope="module")
def exact():
    return exact_posterior(MarkovLM(TRANS, STOP), PotentialReward(G), T)


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_resampling_schemes_are_unbiased(scheme: str) -> None:
    weights = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    n, draws = 7, 20_000
    rng = np.random.default_rng(0)
    counts = np.zeros(len(weights))
    for _ in range(draws):
        counts += np.bincount(resample(weights, n, rng, scheme), minlength=len(weights))
    mean = counts / draws
    # Each count is at most binomial(n, w): its standard error bounds the tolerance.
    tolerance = 4 * np.sqrt(n * weights * (1 - weights) / draws) + 1e-12
    assert np.all(np.abs(mean - n * weights) <= tolerance), (scheme, mean, n * weights)
    assert counts[-1] == 0  # a zero weight is never drawn


def test_resampling_never_falls_off_the_end_on_rounding() -> None:
    weights = np.full(3, 1 / 3) * (1 - 1e-15)  # sums to slightly less than 1
    rng = np.random.default_rng(1)
    for scheme in SCHEMES:
        for _ in range(1000):
            assert max(resample(weights, 3, rng, scheme)) <= 2


def test_weights_all_minus_infinity_fall_back_to_uniform() -> None:
    weights, degenerate = normalise_log_weights([-math.inf] * 4)
    assert degenerate and weights.tolist() == [0.25] * 4
    weights, degenerate = normalise_log_weights([0.0, -math.inf, math.nan])
    assert not degenerate and weights.tolist() == [1.0, 0.0, 0.0]
    assert effective_sample_size(np.full(4, 0.25)) == pytest.approx(4)


# ---------------------------------------------------------------- sound particle filtering


async def weighted_distribution(lm: MarkovLM, n: int, runs: int, **options) -> tuple[dict[str, float], list[float]]:
    """The weighted final particles averaged over runs, and every run's evidence."""
    algorithm = make_algorithm("particle-filter", mode="sound", **options)
    average: dict[str, float] = {}
    evidences = []
    for seed in range(runs):
        result = await algorithm.run(lm, "toy", settings(budget=n, seed=seed), reward=PotentialReward(G))
        for p, w in zip(result.particles, result.weights, strict=True):
            average[p.text] = average.get(p.text, 0.0) + w / runs
        evidences.append(math.exp(result.diagnostics["log_evidence"]))
    return average, evidences


@pytest.mark.parametrize("aggregation", ["prod", "model"])
async def test_sound_particle_filter_targets_the_exact_posterior(lm, exact, aggregation: str) -> None:
    posterior, _ = exact
    distances = {}
    for n in (8, 64):
        average, _ = await weighted_distribution(lm, n, runs=100, aggregation=aggregation, final="vote")
        distances[n] = total_variation(average, posterior)
        # Self-normalised weights are biased by O(1/N); 100 runs add a little noise.
        assert distances[n] < 1.0 / n + 0.025, distances
    assert distances[64] < distances[8] / 2
    assert lm.extended_finished == 0


async def test_the_evidence_estimate_is_unbiased(lm, exact) -> None:
    _, z = exact
    for options in ({"ess_threshold": 0.5}, {"ess_threshold": 1.0, "resampling": "multinomial"}):
        _, evidences = await weighted_distribution(lm, 8, runs=1000, **options)
        standard_error = np.std(evidences) / math.sqrt(len(evidences))
        assert abs(np.mean(evidences) - z) < 4 * standard_error, (options, np.mean(evidences), z)


async def test_the_prior_alone_is_far_from_the_posterior(lm, exact) -> None:
    # The check above has power: sampling without weights is far off.
    posterior, _ = exact
    assert total_variation(lm.trajectories(T), posterior) > 0.3


# ---------------------------------------------------------------- particle Gibbs


def reference_histogram(result, burn_in: int) -> dict[str, float]:
    texts = [r["text"] for r in result.diagnostics["references"][burn_in:]]
    return {t: texts.count(t) / len(texts) for t in set(texts)}


async def test_particle_gibbs_leaves_the_posterior_invariant(lm, exact) -> None:
    posterior, _ = exact
    sweeps = 3000
    result = await make_algorithm("particle-gibbs", sweeps=sweeps).run(
        lm, "toy", settings(budget=4 * sweeps, seed=3), reward=PotentialReward(G)
    )
    assert len(result.diagnostics["references"]) == sweeps
    # ~2900 correlated draws over 30 trajectories: Monte Carlo error of the TV is ~0.05.
    assert total_variation(reference_histogram(result, 100), posterior) < 0.07
    assert lm.extended_finished == 0


async def test_parallel_tempering_cold_chain_targets_the_posterior(lm, exact) -> None:
    posterior, _ = exact
    sweeps = 1500
    algorithm = make_algorithm("parallel-tempering", chains=2, max_temperature=3.0, sweeps=sweeps)
    result = await algorithm.run(lm, "toy", settings(budget=2 * 4 * sweeps, seed=5), reward=PotentialReward(G))
    assert total_variation(reference_histogram(result, 100), posterior) < 0.08
    swaps = result.diagnostics["swaps"]
    assert swaps["attempted"] == sweeps - 1 and 0 < swaps["accepted"] < swaps["attempted"]


def test_swap_probability_is_the_tempered_target_ratio() -> None:
    # pi_k ∝ p r^(1/T_k): the ratio is (r_hot / r_cold)^(1/T_cold - 1/T_hot).
    assert ParallelTempering.swap_probability(0.2, 0.8, 1.0, 2.0) == 1.0
    assert ParallelTempering.swap_probability(0.8, 0.2, 1.0, 2.0) == pytest.approx((0.25) ** 0.5)
    assert ParallelTempering.swap_probability(0.8, 0.0, 1.0, 4.0) == 0.0
    assert ParallelTempering.swap_probability(0.0, 0.5, 1.0, 4.0) == 1.0


# ---------------------------------------------------------------- entropic annealing


def test_annealing_temperatures_match_the_formulas() -> None:
    w = np.array([0.7, 0.1, 0.1, 0.1])  # N = 4, ESS = 1 / 0.52
    ess = 1 / 0.52
    assert annealing_temperature(w, 0.25, "ess") == pytest.approx(4 / ess * 0.75)  # 1.56
    entropy = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert annealing_temperature(w, 0.25, "entropy") == pytest.approx(0.75 / (entropy / math.log(4)))
    assert annealing_temperature(w, 0.25, "linear", initial_temperature=3.0) == pytest.approx(2.25)
    uniform = np.full(4, 0.25)
    for schedule in ("ess", "entropy", "linear"):
        assert annealing_temperature(uniform, 0.9, schedule) == 1.0  # never below 1
    assert annealing_temperature(np.array([1.0, 0, 0, 0]), 0.0, "ess") == pytest.approx(4.0)


async def test_entropic_filter_anneals_only_early_and_when_collapsed(lm) -> None:
    # A reward that collapses the weights (one symbol almost impossible): annealing kicks in
    # early (progress < early_phase) and never late.
    algorithm = make_algorithm("entropic-particle-filter", mode="sound", early_phase=0.5, ess_threshold=1.0)
    result = await algorithm.run(lm, "toy", settings(budget=16, seed=2), reward=PotentialReward({"1": 0.01, "2": 1}))
    temperatures = result.diagnostics["annealing_temperatures"]
    assert temperatures[0] > 1.0
    assert all(t == 1.0 for t in temperatures[2:])  # steps 3+ are past half of max_steps=4


def paper_weights(scores: list[float], temperature: float) -> list[float]:
    """softmax(logit(r) / T) over the pool, computed here from the paper's formula (the
    implementation's own logit is not used), with its clamp of r into [1e-6, 1 - 1e-6]."""
    clamped = [min(max(r, 1e-6), 1 - 1e-6) for r in scores]
    logits = [(math.log(r) - math.log1p(-r)) / temperature for r in clamped]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
async def test_paper_mode_weights_are_the_tempered_softmax_of_the_logit(lm, temperature: float) -> None:
    result = await make_algorithm("particle-filter", temperature=temperature).run(
        lm, "toy", settings(budget=8, seed=5), reward=PotentialReward(G)
    )
    assert result.weights == pytest.approx(paper_weights([p.score for p in result.particles], temperature), abs=1e-9)


async def test_a_lower_resampling_temperature_concentrates_on_the_favoured_prefixes(lm) -> None:
    """G favours "2" (0.9) over "1" (0.3): at T = 0.5 the first resampling copies particles
    that began with "2" more often than at T = 2."""
    favoured = {}
    for temperature in (0.5, 2.0):
        favoured[temperature] = 0
        for seed in range(30):
            observed: list = []
            await make_algorithm("particle-filter", temperature=temperature).run(
                lm,
                "toy",
                settings(budget=16, seed=seed),
                reward=PotentialReward(G),
                observer=lambda run, seen=observed: seen.append([p.text[:1] for p in run.particles]),
            )
            favoured[temperature] += observed[0].count("2")  # the population after the first resampling
    assert favoured[0.5] > favoured[2.0] + 30


async def test_entropic_filter_in_paper_mode_flattens_its_early_resampling(lm) -> None:
    """Paper mode with entropic annealing: while the weights have collapsed early in the run,
    parents are drawn from the flattened weights, so prefixes the reward disfavours survive
    more often than under plain paper-mode resampling; the final weights stay the paper's."""
    kept_disfavoured = {"entropic": 0, "plain": 0}
    for seed in range(30):
        for name, algorithm in (
            ("entropic", make_algorithm("entropic-particle-filter", mode="paper", ess_threshold=1.0)),
            ("plain", make_algorithm("particle-filter", mode="paper", resampling="systematic")),
        ):
            observed: list = []
            result = await algorithm.run(
                lm,
                "toy",
                settings(budget=16, seed=seed),
                reward=PotentialReward(G),
                observer=lambda run, seen=observed: seen.append([p.text[:1] for p in run.particles]),
            )
            kept_disfavoured[name] += observed[0].count("1")
            assert result.weights == pytest.approx(paper_weights([p.score for p in result.particles], 1.0), abs=1e-9)
            if name == "entropic":
                assert result.diagnostics["annealing_temperatures"][0] > 1.0
    assert kept_disfavoured["entropic"] > kept_disfavoured["plain"] + 15


async def test_entropic_sound_mode_keeps_the_weights_proper(lm, exact) -> None:
    posterior, _ = exact
    algorithm = make_algorithm("entropic-particle-filter", mode="sound", ess_threshold=1.0, final="vote")
    average: dict[str, float] = {}
    for seed in range(100):
        result = await algorithm.run(lm, "toy", settings(budget=64, seed=seed), reward=PotentialReward(G))
        for p, w in zip(result.particles, result.weights, strict=True):
            average[p.text] = average.get(p.text, 0.0) + w / 100
    assert total_variation(average, posterior) < 1 / 64 + 0.025


# ---------------------------------------------------------------- every algorithm, regressions


@pytest.mark.parametrize("name", algorithm_names())
async def test_every_algorithm_respects_the_contract(lm, name: str) -> None:
    """max_steps=k means at most k steps; finished particles are never extended; every
    generated and every reward token is counted (beam search included)."""
    reward = PotentialReward(G)
    result = await make_test_algorithm(name).run(lm, "toy", settings(budget=8, seed=11, max_steps=2), reward=reward)
    assert result.particles
    assert all(len(p.steps) <= 2 for p in result.particles)
    assert any(len(p.steps) == 2 for p in result.particles)  # the cap is reachable, not off by one
    assert lm.extended_finished == 0
    for p in result.particles:
        assert all(s.end in ("delimiter", "step_cap") for s in p.steps[:-1])
        assert not p.finished or p.end in FINISHING
    assert result.usage.completion_tokens == lm.generated > 0
    uses_reward = make_test_algorithm(name).uses_reward
    assert (result.usage.reward_tokens > 0) == uses_reward
    assert math.isclose(sum(result.weights), 1.0, abs_tol=1e-9)


async def test_the_resampling_scheme_argument_is_used(lm) -> None:
    flat = PotentialReward({"1": 1.0, "2": 1.0})  # every prefix scores 1: equal weights
    residual = await make_algorithm("particle-filter", resampling="residual").run(
        lm, "toy", settings(budget=8, seed=0), reward=flat
    )
    for event in residual.genealogy:  # equal weights: residual copies every particle once
        assert sorted(event.parents) == sorted(set(event.parents))
    duplicates = 0
    for seed in range(3):
        multinomial = await make_algorithm("particle-filter", resampling="multinomial").run(
            lm, "toy", settings(budget=8, seed=seed), reward=PotentialReward({"1": 1.0, "2": 1.0})
        )
        duplicates += sum(len(e.parents) - len(set(e.parents)) for e in multinomial.genealogy)
    assert duplicates > 0


async def test_finished_particles_stay_finished_after_resampling(lm) -> None:
    result = await make_algorithm("particle-filter").run(
        lm, "toy", settings(budget=16, seed=4), reward=PotentialReward(G)
    )
    assert lm.extended_finished == 0
    # Copies of particles that ended early are in the final pool, still short and finished.
    short = [p for p in result.particles if len(p.steps) < T]
    assert short and all(p.finished and p.end == "eos" for p in short)


async def test_beam_search_removes_duplicate_finished_beams(lm) -> None:
    result = await make_algorithm("beam-search", beam_width=2).run(
        lm, "toy", settings(budget=8, seed=6), reward=PotentialReward(G)
    )
    texts = [p.text for p in result.particles]
    assert len(texts) == len(set(texts))
    assert all(p.finished for p in result.particles)
    assert result.answer == max(result.particles, key=lambda p: p.score).answer


async def test_beam_search_lookahead_tokens_are_counted(lm) -> None:
    result = await make_algorithm("beam-search", beam_width=2, lookahead=1).run(
        lm, "toy", settings(budget=4, seed=6), reward=PotentialReward(G)
    )
    assert result.diagnostics["lookahead_steps"] > 0
    assert result.usage.completion_tokens == lm.generated  # lookahead steps included


async def test_dvts_keeps_one_best_particle_per_subtree(lm) -> None:
    result = await make_algorithm("dvts", beam_width=4).run(
        lm, "toy", settings(budget=8, seed=9), reward=PotentialReward(G)
    )
    assert len(result.particles) == 2  # 8 / 4 subtrees, one final particle each
    assert {p.tag for p in result.particles} == {(0, 4), (1, 4)}


def live_counter(counts: list[int]):
    return lambda run: counts.append(sum(not p.finished for p in run.particles))


@pytest.mark.parametrize("budget", [5, 6, 7])
async def test_dvts_never_holds_more_than_the_budget_when_the_width_does_not_divide_it(lm, budget) -> None:
    live: list[int] = []
    result = await make_algorithm("dvts", beam_width=4).run(
        lm, "toy", settings(budget=budget, seed=2), reward=PotentialReward(G), observer=live_counter(live)
    )
    assert live and max(live) <= budget, live  # was 8 for budget 6: two subtrees of 4
    assert live[0] == budget  # the narrower last subtree still expands to its own width
    assert {p.tag for p in result.particles} <= {(0, 4), (1, budget - 4)}
    assert lm.rollouts_started == budget


async def test_beam_search_refills_n_active_beams_and_runs_until_none_is_active(lm) -> None:
    """search-and-learn's semantics: N active beams every iteration (refilled from the kept
    N/M), duplicates filtered before ranking, and the search goes on until no beam is active,
    then keeps the N best completed beams."""
    events: list[tuple[int, int]] = []

    def observe(run) -> None:
        live = [p for p in run.particles if not p.finished]
        events.append((len(live), len({p.text for p in live})))

    budget = 8
    result = await make_algorithm("beam-search", beam_width=4).run(
        lm, "toy", settings(budget=budget, seed=6, max_steps=6), reward=PotentialReward(G), observer=observe
    )
    assert events[-1] == (0, 0)  # it stopped because no beam was active
    for live, distinct in events[:-1]:
        assert live == budget  # refilled to N, whatever finished
        assert distinct <= budget // 4  # from the top N/M distinct beams
    assert len(result.particles) <= budget and all(p.finished for p in result.particles)
    assert len({p.text for p in result.particles}) == len(result.particles)
    assert lm.extended_finished == 0


@pytest.mark.parametrize("name", ["particle-gibbs", "parallel-tempering"])
async def test_sweeping_algorithms_never_start_more_rollouts_than_the_budget(name) -> None:
    for budget in range(1, 10):
        lm = MarkovLM(TRANS, STOP)
        result = await make_algorithm(name, sweeps=2).run(
            lm, "toy", settings(budget=budget, seed=budget), reward=PotentialReward(G)
        )
        assert lm.rollouts_started <= budget, (budget, lm.rollouts_started)
        needed = 4 if name == "particle-gibbs" else 8
        if budget < needed:  # too small to run as configured: the result says what it ran
            assert "needs a budget of at least" in result.diagnostics["budget_note"], result.diagnostics
        if budget == 1:
            assert lm.rollouts_started == 1 and "single sample" in result.diagnostics["budget_note"]


@pytest.mark.parametrize("name", ["beam-search", "dvts"])
async def test_a_budget_below_the_beam_width_never_holds_more_particles(lm, name) -> None:
    for budget in (1, 2, 3):
        live: list[int] = []
        result = await make_algorithm(name, beam_width=4).run(
            lm, "toy", settings(budget=budget, seed=3), reward=PotentialReward(G), observer=live_counter(live)
        )
        assert live and max(live) <= budget, (budget, live)  # extended at once: at most N
        assert result.usage.completion_tokens <= budget * (T + 1)  # one token a step, and the end


class Zero(CachedReward):
    name = "zero"

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        return Scores([0.0] * len(requests))


async def test_all_weights_minus_infinity_resample_uniformly_and_say_so(lm) -> None:
    result = await make_algorithm("particle-filter", mode="sound").run(
        lm, "toy", settings(budget=4, seed=1), reward=Zero()
    )
    assert result.diagnostics["degenerate_weights"] >= 1
    assert "uniformly" in result.diagnostics["degenerate_note"]
    assert result.weights == pytest.approx([0.25] * 4)
    assert result.diagnostics["log_evidence"] == -math.inf


def test_after_a_uniform_restart_the_next_step_s_reward_weighs_again() -> None:
    # Every weight -inf at a step with reward 0 resamples uniformly to weight 1; from there the
    # telescoping product starts again, so the next step's reward must count in full.
    search = make_algorithm("particle-filter", mode="sound")

    def after_a_zero(reward: float) -> Particle:
        return Particle(0, [Step("a", 1, "delimiter", score=0.0), Step("b", 1, "delimiter", score=reward)])

    good, bad = (search.incremental_log_weight(after_a_zero(r)) for r in (0.99, 0.01))
    assert good == pytest.approx(math.log(0.99)) and bad == pytest.approx(math.log(0.01))
    dead = Particle(1, [Step("a", 1, "delimiter", score=0.0)], log_weight=-math.inf)
    dead.steps.append(Step("b", 1, "delimiter", score=0.99))
    assert dead.log_weight + search.incremental_log_weight(dead) == -math.inf  # a dead weight stays dead


# ---------------------------------------------------------------- independent rollouts


async def test_independent_rollouts_are_the_lockstep_samples_and_exact_draws(lm) -> None:
    class LockstepSelfConsistency(SelfConsistency):
        independent_rollouts = False

    rolled = await make_algorithm("self-consistency").run(lm, "toy", settings(budget=64, seed=3))
    stepped = await LockstepSelfConsistency().run(MarkovLM(TRANS, STOP), "toy", settings(budget=64, seed=3))
    # The same steps from the same per-step seeds, without step boundaries: identical samples.
    assert [p.text for p in rolled.particles] == [p.text for p in stepped.particles]
    assert [p.end for p in rolled.particles] == [p.end for p in stepped.particles]
    assert rolled.usage.completion_tokens == stepped.usage.completion_tokens
    assert rolled.usage.lm_calls == 1 < stepped.usage.lm_calls
    # And they are draws from the chain: compare with its exact trajectory distribution.
    draws = []
    for seed in range(40):
        result = await make_algorithm("self-consistency").run(lm, "toy", settings(budget=250, seed=seed))
        draws += [p.text for p in result.particles]
    empirical = {t: draws.count(t) / len(draws) for t in set(draws)}
    # 10,000 draws over 30 trajectories: the expected TV of an exact sampler is about 0.02.
    assert total_variation(empirical, lm.trajectories(T)) < 0.04


# ---------------------------------------------------------------- budgets and answer rules


async def test_token_budget_is_a_hard_cap_and_marks_the_result(lm) -> None:
    result = await make_algorithm("particle-filter", mode="sound").run(
        lm, "toy", settings(budget=8, seed=0, token_budget=20), reward=PotentialReward(G)
    )
    assert result.budget_limited
    assert result.usage.budget_tokens <= 20
    assert result.answer is not None or all(not p.finished for p in result.particles)
    plain = await make_algorithm("self-consistency").run(lm, "toy", settings(budget=8, seed=0, token_budget=20))
    assert plain.budget_limited and plain.usage.completion_tokens <= 20
    assert any(p.finished for p in plain.particles) and not all(p.finished for p in plain.particles)
    # Only finished samples vote when the budget cut the run short.
    voters = [i for i, p in enumerate(plain.particles) if plain.weights[i] > 0]
    assert voters and all(plain.particles[i].finished for i in voters)


def particle(answer: str, score: float) -> Particle:
    return Particle(id=0, steps=[Step(f"so \\boxed{{{answer}}}", 3, "answer", score=score)], finished=True, score=score)


def test_best_of_majority_filters_by_frequency_then_reward() -> None:
    pool = [particle("7", 0.5), particle("7", 0.6), particle("7", 0.4), particle("9", 0.99)]
    pick = BestOfMajority(min_share=0.3).pick(pool)
    assert pick.answer == "7" and pick.index == 1  # the rare, highly rewarded 9 is filtered out
    pick = BestOfMajority(min_share=0.25).pick(pool)
    assert pick.answer == "9"  # 9 is frequent enough at this threshold


def test_majority_confidence_is_the_beta_posterior() -> None:
    assert majority_confidence({"a": 3}) == pytest.approx(15 / 16)
    assert majority_confidence({"a": 4}) == pytest.approx(31 / 32)
    assert majority_confidence({"a": 2, "b": 2}) == pytest.approx(0.5)
    assert majority_confidence({}) == 0.0


async def test_adaptive_self_consistency_stops_early_when_confident() -> None:
    certain = MarkovLM({"^": {"1": 1.0}, "1": {"1": 1.0}}, {"1": 1.0})  # always answers 1
    result = await make_algorithm("adaptive-self-consistency").run(certain, "toy", settings(budget=16, seed=0))
    assert result.answer == "1"
    assert result.diagnostics["samples_used"] == 6 and result.diagnostics["samples_saved"] == 10
    assert result.usage.completion_tokens == certain.generated
    undecided = MarkovLM({"^": {"1": 0.5, "2": 0.5}, "1": {"1": 1.0}, "2": {"2": 1.0}}, {"1": 1.0, "2": 1.0})
    result = await make_algorithm("adaptive-self-consistency").run(undecided, "toy", settings(budget=8, seed=0))
    assert result.diagnostics["samples_used"] == 8  # never confident enough: the whole budget
