"""Compute-optimal allocation: the policy fitted from graded samples, the allocation it
makes for a mean budget, the `compute-optimal` algorithm on a real model, and the CLI
(`itscale fit-budget-policy`, `itscale solve --budget auto:B`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import THREADS
from itscale.answers import is_equivalent, majority
from itscale.errors import UsageError
from itscale.rewards.training import rollout_dir
from itscale.search import make_algorithm
from itscale.search.allocation import (
    BudgetPolicy,
    answer_classes,
    difficulty_level,
    fit_policy,
    value_level,
    vote_is_right,
)

GENERATOR = {"name": "toy", "gguf_sha256": "ab" * 32, "n_embd": 4}


def graded(answers: list[str | None], reference: str) -> dict:
    return {
        "samples": [{"answer": a, "correct": a is not None and is_equivalent(a, reference)} for a in answers],
        "reference": reference,
    }


def test_the_fitted_vote_is_the_vote_the_algorithm_takes() -> None:
    """`vote_is_right` on answer classes must agree with `answers.majority` (ties to the first
    seen, equivalent spellings pooled, no answer no vote), or the policy's accuracies would
    describe another selection than the one run."""
    rng = random.Random(0)
    pool = ["18", "18.0", "20", "\\frac{1}{2}", "0.5", None, "7"]
    for _ in range(400):
        answers = [rng.choice(pool) for _ in range(rng.randint(1, 7))]
        reference = rng.choice(["18", "0.5", "7"])
        right = [a is not None and is_equivalent(a, reference) for a in answers]
        weights = [rng.choice([0.25, 0.5, 1.0]) for _ in answers]  # ties happen, as they do in votes
        for w in (None, weights):
            winner, _ = majority(answers, w)
            expected = winner is not None and is_equivalent(winner, reference)
            assert vote_is_right(answer_classes(answers), right, w) is expected, (answers, w, reference)


def test_the_difficulty_level_counts_the_leading_answer_of_the_first_batch() -> None:
    assert difficulty_level(["3", "3.0"], 2) == 2
    assert difficulty_level(["3", "4"], 2) == 1
    assert difficulty_level([None, "4"], 2) == 1
    assert difficulty_level([None, None], 2) == 0


def three_kinds_of_problem() -> list[dict]:
    """Easy (every sample right), hopeless (no sample has an answer) and contested (one right
    answer among two wrong ones, right on 3 of 6 samples: more votes help)."""
    easy = [graded(["5"] * 6, "5") for _ in range(4)]
    hopeless = [graded([None] * 6, "5") for _ in range(4)]
    contested = [graded(["5", "6", "5", "7", "5", "8"], "5") for _ in range(4)]
    return easy + hopeless + contested


def budgets(allocation) -> list[int]:
    return [choice.budget for choice in allocation]


def test_a_policy_spends_on_problems_where_more_samples_help() -> None:
    policy = fit_policy(three_kinds_of_problem(), GENERATOR, first_batch=2, orders=200, seed=1)
    assert policy.budgets == [2, 4, 6]
    # Level 0 (no answer in the first batch) is exactly the hopeless third; level 2 (both
    # agree) holds the easy problems and the contested orders that began with two 5s.
    assert policy.frequency[0] == pytest.approx(1 / 3)
    assert policy.accuracy[0] == [0.0, 0.0, 0.0]
    assert policy.accuracy[2][0] == 1.0
    # The level tells the hopeless (wrong) from the easy (right) next sample.
    assert policy.card["difficulty_auroc"] > 0.8
    # Contested problems whose first two samples disagree: the vote gets better with samples.
    assert policy.accuracy[1][0] < policy.accuracy[1][2]
    # A mean budget of 3: the extra samples go to the contested level, none to the hopeless
    # or the easy; at the first batch's size nothing is extra.
    allocation = budgets(policy.allocate(3))
    assert allocation[0] == 2 and allocation[2] == 2 and allocation[1] > 2
    accuracy, spent = policy.expected(policy.allocate(3))
    assert spent <= 3 and accuracy > policy.expected([("vote", 2)] * 3)[0]
    assert policy.allocate(2) == [("vote", 2)] * 3
    # With plenty to spend, still nothing for what cannot gain: the cheapest of equals.
    assert budgets(policy.allocate(6)) == [2, 6, 2]
    with pytest.raises(UsageError, match="below this policy's first batch of 2"):
        policy.allocate(1)


def test_a_value_policy_levels_problems_by_the_first_batch_value(tmp_path) -> None:
    """With values after the first step (high on the easy problems, low on the hopeless ones,
    between on the contested), the value levels find the three kinds, and the policy spends
    where more samples help, as the agreement policy does."""
    records = three_kinds_of_problem()
    by_kind = [0.9] * 4 + [0.1] * 4 + [0.5] * 4
    rng = random.Random(2)
    first_values = [[v + rng.uniform(-0.05, 0.05) for _ in r["samples"]] for v, r in zip(by_kind, records, strict=True)]
    policy = fit_policy(
        records, GENERATOR, first_batch=2, orders=50, seed=1, first_values=first_values, head_sha256="c" * 64
    )
    assert policy.levels == 3 and len(policy.value_edges) == 2
    assert [value_level(v, policy.value_edges) for v in (0.1, 0.5, 0.9)] == [0, 1, 2]
    assert policy.frequency == pytest.approx([1 / 3] * 3)
    assert policy.accuracy[0] == [0.0, 0.0, 0.0] and policy.accuracy[2] == [1.0, 1.0, 1.0]
    assert policy.accuracy[1][0] < policy.accuracy[1][2]
    assert budgets(policy.allocate(3)) == [2, 4, 2]
    assert policy.card["difficulty_auroc"] > 0.8
    path = tmp_path / "value.json"
    policy.save(path)
    again = BudgetPolicy.load(path)
    assert again.value_edges == policy.value_edges and budgets(again.allocate(3)) == [2, 4, 2]
    assert json.loads(path.read_text())["difficulty"].startswith("value")


def test_a_policy_weighs_the_vote_where_the_head_tells_right_from_wrong(tmp_path) -> None:
    """Contested problems whose right answer is a minority the head values highly: the
    weighted vote is right where the plain vote is not, so the policy chooses it there, and
    names the head it weighs with; without a head, a weighted choice is refused."""
    minority = [graded(["5", "6", "6", "5", "6", "7"], "5") for _ in range(6)]
    finals = [[0.9 if s["correct"] else 0.2 for s in r["samples"]] for r in minority]
    records = three_kinds_of_problem() + minority
    finals = [[0.5] * 6 for _ in three_kinds_of_problem()] + finals
    policy = fit_policy(records, GENERATOR, first_batch=2, orders=50, seed=1, final_values=finals, head_sha256="c" * 64)
    assert policy.choices == [(s, b) for s in ("vote", "weighted-vote") for b in (2, 4, 6)]
    vote6, weighted6 = policy.choices.index(("vote", 6)), policy.choices.index(("weighted-vote", 6))
    # Level 1 (the first two disagree) holds the contested orders of both kinds.
    assert policy.accuracy[1][weighted6] > policy.accuracy[1][vote6]
    assert policy.allocate(6)[1] == ("weighted-vote", 6)
    # Where nothing helps (no answer at all), the first batch and the plain vote: among
    # equals the cheapest, then the one that needs no head.
    assert policy.allocate(6)[0] == ("vote", 2)
    path = tmp_path / "weighted.json"
    policy.save(path)
    assert BudgetPolicy.load(path).allocate(6) == policy.allocate(6)
    data = json.loads(path.read_text())
    del data["head_sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="reads a learned head but names none"):
        BudgetPolicy.load(path)


def test_compute_optimal_weighs_the_vote_only_when_the_samples_carry_values() -> None:
    """The weighted vote lets a minority answer the head values win; without values (a
    level whose choice is the plain vote) the count decides."""
    from itscale.types import Particle, Step

    def sample(answer: str, score: float | None) -> Particle:
        return Particle(0, [Step(f"So \\boxed{{{answer}}}.", 5, "eos")], finished=True, score=score)

    search = make_algorithm("compute-optimal")
    assert search.pick([sample("5", 0.9), sample("6", 0.2), sample("6", 0.3)]).answer == "5"
    assert search.pick([sample("5", None), sample("6", None), sample("6", None)]).answer == "6"


def test_a_policy_file_of_the_first_format_is_a_vote_policy(tmp_path) -> None:
    """Format 1 knew the majority vote only, with accuracies per budget."""
    old = {
        "format": 1,
        "generator": GENERATOR,
        "selection": "majority vote",
        "first_batch": 2,
        "budgets": [2, 4],
        "frequency": [0.5, 0.25, 0.25],
        "accuracy": [[0.0, 0.0], [0.2, 0.6], [0.9, 0.9]],
        "problems": 3,
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    policy = BudgetPolicy.load(tmp_path / "old.json")
    assert policy.choices == [("vote", 2), ("vote", 4)] and policy.card == {"problems": 3}
    assert policy.allocate(3) == [("vote", 2), ("vote", 4), ("vote", 2)]


def test_a_policy_file_round_trips_and_bad_files_are_refused(tmp_path) -> None:
    policy = fit_policy(three_kinds_of_problem(), GENERATOR, first_batch=2, orders=10)
    path = tmp_path / "policy.json"
    policy.save(path)
    again = BudgetPolicy.load(path)
    assert again.allocate(4) == policy.allocate(4) and again.card["problems"] == 12
    with pytest.raises(UsageError, match="no budget policy at"):
        BudgetPolicy.load(tmp_path / "missing.json")
    (tmp_path / "corrupt.json").write_text('{"format": 1, "first_ba')
    with pytest.raises(UsageError, match="unreadable"):
        BudgetPolicy.load(tmp_path / "corrupt.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(UsageError, match="not a budget policy"):
        BudgetPolicy.load(tmp_path / "other.json")
    broken = json.loads(path.read_text())
    broken["accuracy"] = broken["accuracy"][:1]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(UsageError, match="inconsistent"):
        BudgetPolicy.load(tmp_path / "broken.json")
    with pytest.raises(UsageError, match="between 1 and 5"):
        fit_policy(three_kinds_of_problem(), GENERATOR, first_batch=6)


def policy_for(tmp_path: Path, lm, accuracy: list[list[float]]) -> Path:
    """A policy for `lm` with first batch 2 and budgets 2 and 4, levels equally frequent."""
    policy = BudgetPolicy(
        generator={"name": lm.name, "gguf_sha256": lm.sha256},
        first_batch=2,
        choices=[("vote", 2), ("vote", 4)],
        frequency=[1 / 3] * 3,
        accuracy=accuracy,
    )
    path = tmp_path / "policy.json"
    policy.save(path)
    return path


@pytest.mark.parametrize("grows, used", [(True, 4), (False, 2)])
async def test_compute_optimal_draws_what_its_level_is_allotted(smol, tmp_path, grows, used) -> None:
    """A first batch of 2, then the rest of the budget its level gets: 4 in all where more
    samples helped on the training problems (every level here), 2 where they did not."""
    accuracy = [[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]] if grows else [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]
    path = policy_for(tmp_path, smol, accuracy)
    result = await make_algorithm("compute-optimal", policy=str(path)).run(
        smol, "What is 2 + 3?", budget=4, seed=0, max_tokens=24, max_step_tokens=12
    )
    assert result.diagnostics["samples_used"] == used == len(result.particles)
    level = result.diagnostics["difficulty_level"]
    assert level == difficulty_level([p.answer for p in result.particles[:2]], 2)
    assert budgets(result.diagnostics["allocation"]) == ([4, 4, 4] if grows else [2, 2, 2])
    assert result.diagnostics["selection"] == "vote"
    assert result.usage.completion_tokens == sum(s.tokens for p in result.particles for s in p.steps)


async def test_a_policy_for_another_generator_is_refused_before_any_compute(smol, tmp_path) -> None:
    policy = BudgetPolicy(
        {"name": "other", "gguf_sha256": "0" * 64}, 2, [("vote", 2), ("vote", 4)], [0.5, 0.25, 0.25], [[0, 0]] * 3
    )
    policy.save(tmp_path / "other.json")
    calls_before = smol.stats["decode_calls"]
    with pytest.raises(UsageError, match="fitted for other"):
        await make_algorithm("compute-optimal", policy=str(tmp_path / "other.json")).run(smol, "What is 2 + 3?")
    assert smol.stats["decode_calls"] == calls_before


@pytest.fixture
def smol_with_features():
    """An engine of its own: the probe turns features on for good, which changes what the
    session's shared engine evaluates for the tests after this one."""
    from itscale.lm.llamacpp import LlamaCppModel

    engine = LlamaCppModel("smollm2-135m", n_ctx=2048, n_seq_max=8, n_threads=THREADS)
    yield engine
    assert engine.cached_branches == 0
    engine.shutdown()


async def test_compute_optimal_reads_a_value_level_from_the_head_it_was_fitted_with(smol_with_features, tmp_path):
    """A value policy's level comes from the probe's value after each first-batch sample's
    first step, and a level whose choice is the weighted vote weighs each sample by the
    probe's value of it, finished; the head must be the policy's own, checked before any
    compute."""
    import math

    import numpy as np

    from itscale.rewards.probe import ValueHead, head_digest

    smol = smol_with_features

    head = tmp_path / "head"
    head.mkdir()
    d = smol.n_embd
    bias = np.float32(math.log(0.3 / 0.7))  # says 0.3 whatever the state: the middle level below
    ValueHead("linear", np.zeros(d, np.float32), np.ones(d, np.float32), (np.zeros(d, np.float32), bias)).save(
        head / "head.npz"
    )
    (head / "card.json").write_text(
        json.dumps({"format": 1, "generator": {"name": smol.name, "gguf_sha256": smol.sha256}})
    )
    policy = BudgetPolicy(
        generator={"name": smol.name, "gguf_sha256": smol.sha256},
        first_batch=2,
        choices=[("vote", 2), ("vote", 4), ("weighted-vote", 4)],
        frequency=[1 / 3] * 3,
        accuracy=[[0.0, 0.0, 0.0], [0.2, 0.6, 0.7], [0.9, 0.9, 0.9]],
        card={"head_sha256": head_digest(head)},
        value_edges=[0.1, 0.5],
    )
    policy.save(tmp_path / "policy.json")
    search = make_algorithm("compute-optimal", policy=str(tmp_path / "policy.json"), head=str(head))
    result = await search.run(smol, "What is 2 + 3?", budget=3, seed=0, max_tokens=24, max_step_tokens=12)
    assert result.diagnostics["difficulty_level"] == 1
    assert result.diagnostics["allocation"] == [("vote", 2), ("weighted-vote", 4), ("vote", 2)]
    assert result.diagnostics["samples_used"] == 4 == len(result.particles)
    assert result.diagnostics["selection"] == "weighted-vote"
    # Each sample weighs the head's value of it: 0.3, whatever the state.
    assert [p.score for p in result.particles] == pytest.approx([0.3] * 4)
    assert result.usage.reward_tokens == 0  # the steps' states came with generation

    other = tmp_path / "other"
    other.mkdir()
    ValueHead("linear", np.zeros(d, np.float32), np.ones(d, np.float32), (np.ones(d, np.float32), bias)).save(
        other / "head.npz"
    )
    (other / "card.json").write_text((head / "card.json").read_text())
    calls_before = smol.stats["decode_calls"]
    with pytest.raises(UsageError, match="reads the learned head with sha256"):
        await make_algorithm("compute-optimal", policy=str(tmp_path / "policy.json"), head=str(other)).run(
            smol, "What is 2 + 3?", budget=3
        )
    assert smol.stats["decode_calls"] == calls_before


def itscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itscale.cli", *args], capture_output=True, text=True, timeout=600)


def test_fit_budget_policy_from_train_reward_rollouts(tmp_path) -> None:
    directory = rollout_dir(tmp_path / "rollouts")
    identity = {"generator": GENERATOR, "dataset": {"source": "/data/tiny_train.jsonl", "fingerprint": "x"}}
    directory.record(identity, {"command": ["itscale", "train-reward"]})
    directory.results.append([{"problem": f"p{i}", **r} for i, r in enumerate(three_kinds_of_problem())])
    out = tmp_path / "policy.json"
    done = itscale("fit-budget-policy", "--rollouts", str(tmp_path / "rollouts"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "12 problems x 6 samples" in done.stdout and "auto:4" in done.stdout
    policy = BudgetPolicy.load(out)
    assert policy.generator == GENERATOR and policy.card["command"][:2] == ["itscale", "fit-budget-policy"]
    # Value difficulty needs a head for the rollouts' model; --head alone means nothing.
    rollouts = ["--rollouts", str(tmp_path / "rollouts"), "--out", str(tmp_path / "v.json")]
    for args, message in (
        (["--difficulty", "value"], "no head is shipped for toy"),
        (["--head", str(tmp_path)], "--head goes with --difficulty value"),
        (["--difficulty", "value", "--folds", "1"], "must be at least 2"),
        (["--selections", "weighted-vote"], "no head is shipped for toy"),
        (["--selections", "vote,best"], "--selections takes some of vote, weighted-vote"),
    ):
        done = itscale("fit-budget-policy", *rollouts, *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert not (tmp_path / "v.json").exists()
    # A test split is refused; so is a directory without rollouts.
    identity["dataset"]["source"] = "/data/gsm8k_test.jsonl"
    test_dir = rollout_dir(tmp_path / "test-rollouts")
    test_dir.record(identity, {})
    for rollouts, message in ((tmp_path / "test-rollouts", "test split"), (tmp_path / "nothing", "no rollouts in")):
        done = itscale("fit-budget-policy", "--rollouts", str(rollouts), "--out", str(tmp_path / "p.json"))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_eval_checks_the_budget_policy_before_opening_a_model(tmp_path) -> None:
    """`itscale eval --algorithms compute-optimal` (or `--budget auto:B`): a missing policy,
    one fitted for another model, or a mean budget below its first batch is one clear line,
    and nothing is written."""
    from itscale.lm.models import MODELS
    from itscale.search.allocation import SHIPPED

    qwen = SHIPPED / "qwen2.5-coder-0.5b.json"
    smol = BudgetPolicy(
        {"name": "smollm2-135m", "gguf_sha256": MODELS["smollm2-135m"].sha256}, 2, [("vote", 2), ("vote", 4)],
        [1 / 3] * 3, [[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]],
    )  # fmt: skip
    smol.save(tmp_path / "smol.json")
    out = tmp_path / "out"
    common = ["eval", "--dataset", "gsm8k", "--limit", "1", "--algorithms", "compute-optimal", "--out", str(out)]
    for args, message in (
        (["--model", "smollm2-135m", "--budgets", "4"], "no budget policy is shipped for smollm2-135m"),
        (["--model", "smollm2-135m", "--budgets", "4", "--option", f"policy={qwen}"], "fitted for qwen2.5-coder-0.5b"),
        (["--model", "smollm2-135m", "--budgets", "1,4", "--option", f"policy={tmp_path / 'smol.json'}"],
         "mean budget 1 (auto:1) is below this policy's first batch of 2"),
    ):  # fmt: skip
        done = itscale(*common, *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert not out.exists()
    # `--budget auto:B`, as in solve: compute-optimal at mean budget B, alone.
    common = ["eval", "--dataset", "gsm8k", "--limit", "1", "--model", "smollm2-135m", "--out", str(out)]
    policy = ["--option", f"policy={tmp_path / 'smol.json'}"]
    for args, message in (
        (["--budget", "auto:1", *policy], "mean budget 1 (auto:1) is below"),
        (["--budget", "auto:4", "--algorithms", "best-of-n"], "compute-optimal algorithm at a mean budget"),
        (["--budget", "auto:4", "--budgets", "2"], "is compute-optimal at one mean budget"),
        ([], "needs --algorithms"),
    ):
        done = itscale(*common, *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    done = itscale(*common, "--budget", "auto:4", *policy, "--max-tokens", "24", "--n-threads", str(THREADS))
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (record["algorithm"], record["budget"], record["diagnostics"]["samples_used"]) == ("compute-optimal", 4, 4)


def test_solve_with_an_auto_budget(smol, tmp_path) -> None:
    path = policy_for(tmp_path, smol, [[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]])
    common = ["--model", "smollm2-135m", "--n-threads", str(THREADS), "--max-tokens", "24", "--json"]
    done = itscale("solve", "What is 2 + 3?", "--budget", "auto:4", "--option", f"policy={path}", *common)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["algorithm"] == "compute-optimal" and result["diagnostics"]["samples_used"] == 4
    for args, message in (
        (["--budget", "auto:1", "--option", f"policy={path}"], "below this policy's first batch of 2"),
        (["--budget", "auto:4", "--algorithm", "beam-search"], "not beam-search"),
        (["--budget", "auto:x"], "or auto:B, a mean budget per problem"),
        (["--budget", "auto:4"], "no budget policy is shipped for smollm2-135m"),
    ):
        done = itscale("solve", "What is 2 + 3?", *args, *common)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


async def test_python_takes_an_auto_budget_under_the_same_name(smol, tmp_path) -> None:
    from itscale.api import asolve

    path = policy_for(tmp_path, smol, [[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]])
    result = await asolve(
        "What is 2 + 3?", lm=smol, budget="auto:4", algorithm_options={"policy": str(path)}, max_tokens=24,
        max_step_tokens=12, trace=False,
    )  # fmt: skip
    assert result.algorithm == "compute-optimal" and result.diagnostics["samples_used"] == 4
    with pytest.raises(UsageError, match="not best-of-n"):
        await asolve("What is 2 + 3?", "best-of-n", lm=smol, budget="auto:4")
    # A reward named for it would be ignored: refused, before any generation.
    with pytest.raises(UsageError, match="compute-optimal uses no reward"):
        await asolve("What is 2 + 3?", lm=smol, budget="auto:4", reward="arithmetic")
