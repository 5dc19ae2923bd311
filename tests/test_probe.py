"""The learned process reward: hidden states from the engine, `itscale train-reward`, the
probe reward, end to end on SmolLM2 at a tiny scale, and the head's training on features
with a known answer."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import THREADS
from itscale.errors import UsageError
from itscale.lm.base import StepSettings
from itscale.lm.chat import MATH_SYSTEM_PROMPT
from itscale.rewards.base import ScoreRequest
from itscale.rewards.probe import ProbeReward, ValueHead
from itscale.rewards.registry import make_reward
from itscale.rewards.training import (
    Examples,
    TrainSettings,
    auroc,
    auroc_within,
    split_by_problem,
    train,
    training_rollouts,
)
from itscale.search import make_algorithm
from itscale.types import Prompt

PROBLEM = Prompt.of("Tom has 3 apples and buys 4 more. How many apples does he have?", system=MATH_SYSTEM_PROMPT)
STEPS = StepSettings(temperature=0.8, max_step_tokens=24, max_tokens=72)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------ hidden states


async def test_every_step_carries_the_state_after_its_last_token(smol) -> None:
    """Features come with generation (a rollout's next step computes them; a single step
    or a rollout's last feeds its last token once more) and equal a separate evaluation of
    the same tokens on a fork."""
    smol.enable_features()
    root = await smol.start(PROBLEM)
    rollout, stepped = smol.fork(root), smol.fork(root)
    smol.release(root)
    [outs] = await smol.extend_to_end([rollout], STEPS, [[11, 12, 13, 14]], [72], lambda text: False)
    single = []
    for seed in (21, 22):
        single += await smol.extend([stepped], STEPS, [seed])
    try:
        for branch, steps in ((rollout, outs), (stepped, single)):
            assert steps and all(s.features is not None and s.features["final"].shape == (smol.n_embd,) for s in steps)
            for k, step in enumerate(steps, start=1):
                prefix = smol.fork(branch, steps=k)
                [(again, cost)] = await smol.features([prefix])
                smol.release(prefix)
                assert cost >= 1
                # The same tokens; a batch of one token and a lone one round differently.
                assert cosine(again["final"], step.features["final"]) > 0.999, (k, step.end)
        # Different prefixes have different states.
        assert cosine(outs[0].features["final"], outs[-1].features["final"]) < 0.99
    finally:
        smol.release(rollout)
        smol.release(stepped)


async def test_steps_from_elsewhere_get_their_features_from_their_text(smol, tmp_path) -> None:
    """A request without the generator's records (a server's steps, a file) is evaluated on
    the engine from its text; when the text tokenises as it was generated, the features are
    the generator's."""
    smol.enable_features()
    result = await make_algorithm("greedy").run(smol, PROBLEM, max_tokens=48, max_step_tokens=24)
    particle = result.particles[0]
    texts = tuple(s.text for s in particle.steps)
    head = synthetic_head(smol.n_embd, seed=0)
    reward = probe_on(smol, head, tmp_path)
    recorded = await reward.score([ScoreRequest(PROBLEM, texts, records=tuple(particle.steps))])
    from_text = await probe_on(smol, head, tmp_path).score([ScoreRequest(PROBLEM, texts)])
    assert recorded.tokens == 0 and from_text.tokens > 0  # features from records cost nothing
    assert from_text.values[0] == pytest.approx(recorded.values[0], abs=0.02)


@pytest.mark.parametrize("kv_layout", ["unified", "per-sequence"])
async def test_inner_layers_come_with_generation_and_equal_a_separate_evaluation(kv_layout) -> None:
    """A block's output, read by llama.cpp's graph callback, comes with every generated step
    of many sequences decoded together, each row matched to its own sequence (a per-sequence
    cache reorders a batch by sequence), and equals a separate evaluation of the same tokens."""
    from itscale.lm.llamacpp import LlamaCppModel

    model = LlamaCppModel(
        "smollm2-135m", n_seq_max=12, kv_layout=kv_layout, n_ctx=4096, seq_ctx=512, n_threads=THREADS,
        feature_layers=["final", "10"],
    )  # fmt: skip
    try:
        assert model.feature_layers == ("final", "10")
        root = await model.start(PROBLEM)
        branches = [model.fork(root) for _ in range(4)]
        model.release(root)
        outs = await model.extend_to_end(branches, STEPS, [[31 + i, 41 + i, 51 + i] for i in range(4)], [48] * 4,
                                         lambda text: False)  # fmt: skip
        assert len({o[0].text for o in outs}) > 1  # the sequences differ, so a mix-up would show
        for branch, steps in zip(branches, outs, strict=True):
            for k, step in enumerate(steps, start=1):
                assert set(step.features) == {"final", "10"}
                prefix = model.fork(branch, steps=k)
                [(again, _)] = await model.features([prefix])
                model.release(prefix)
                assert cosine(again["10"], step.features["10"]) > 0.999, (kv_layout, k)
                assert cosine(again["final"], step.features["final"]) > 0.999, (kv_layout, k)
                assert cosine(step.features["10"], step.features["final"]) < 0.9  # another layer's state
        for b in branches:
            model.release(b)
    finally:
        model.shutdown()


async def test_inner_layers_are_turned_on_only_while_the_engine_holds_nothing() -> None:
    """The graph callback needs a new context: asking for an inner layer while sequences
    hold KV cells is a clear error; once they are released it works, and a bad layer name
    says what is allowed."""
    from itscale.lm.llamacpp import LlamaCppModel

    model = LlamaCppModel("smollm2-135m", n_ctx=2048, n_seq_max=4, n_threads=THREADS)
    try:
        for bad in ("99", "-1", "middle"):
            with pytest.raises(UsageError, match="unknown feature layer"):
                model.enable_features([bad])
        model.enable_features()
        branch = await model.start(PROBLEM)
        [first] = await model.extend([branch], STEPS, [1])
        assert set(first.features) == {"final"}
        with pytest.raises(UsageError, match="before the engine holds any sequence"):
            model.enable_features(["5"])
        model.release(branch)
        model.enable_features(["5"])
        assert model.feature_layers == ("final", "5")
        branch = await model.start(PROBLEM)
        [again] = await model.extend([branch], STEPS, [1])
        assert set(again.features) == {"final", "5"}
        assert again.text == first.text  # a new context, the same model: the same sample
        model.release(branch)
    finally:
        model.shutdown()


# ------------------------------------------------------------------ training


def synthetic(n_problems: int = 300, per_problem: int = 8, d: int = 16, seed: int = 0):
    """Rows whose label follows a known logistic rule y ~ Bernoulli(sigmoid(w . x + b)),
    with a per-problem offset (some problems are easier) the rule does not see."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w) / 2.0
    x = rng.standard_normal((n_problems * per_problem, d)).astype(np.float32)
    problem = np.repeat(np.arange(n_problems), per_problem)
    offset = rng.normal(0, 0.5, n_problems)[problem]
    p = 1 / (1 + np.exp(-(x @ w + offset)))
    y = (rng.random(len(p)) < p).astype(np.float32)
    n = len(y)
    data = Examples(x, y, problem, np.arange(n), np.ones(n, dtype=bool), y.astype(bool))
    return data, w, p


def test_training_recovers_a_known_linear_rule() -> None:
    data, w, p = synthetic()
    head, report = train(data, 300, TrainSettings(kind="linear", seed=1))
    learned = head.weights[0] / head.scale  # back in the features' own units
    assert cosine(learned, w) > 0.95
    # On the validation problems it ranks about as well as the true rule itself does.
    validation = split_by_problem(300, 0.2, 1)[data.problem]
    best_possible = auroc(p[validation], data.labels[validation] > 0.5)
    assert report["candidates"][0]["validation"]["step_auroc_pooled"] > best_possible - 0.03
    # Reproducible from the seed.
    again, _ = train(data, 300, TrainSettings(kind="linear", seed=1))
    assert np.array_equal(again.weights[0], head.weights[0])


def test_out_of_fold_values_read_the_first_and_the_last_step() -> None:
    """The policy's difficulty reads each sample's first step and its weighted vote the
    finished sample: here only the last step's state tells right from wrong."""
    from itscale.rewards.training import encode_features, out_of_fold_values

    rng = np.random.default_rng(0)
    d, records = 8, []
    for i in range(40):
        samples = []
        for _ in range(4):
            right = bool(rng.random() < 0.5)
            rows = rng.normal(0, 0.3, (3, d)).astype(np.float32)
            rows[-1, 0] += 2.0 if right else -2.0
            samples.append({"answer": "1", "correct": right, "features": encode_features(rows)})
        records.append({"problem": f"p{i}", "samples": samples})
    first, final = out_of_fold_values(records, d, ["final"], TrainSettings(kind="linear", seed=0), folds=4)
    right = [s["correct"] for r in records for s in r["samples"]]
    assert auroc([v for vs in final for v in vs], right) > 0.95
    assert auroc([v for vs in first for v in vs], right) < 0.75


def test_the_mlp_learns_a_rule_a_line_cannot() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 8)).astype(np.float32)
    y = ((x[:, 0] * x[:, 1]) > 0).astype(np.float32)  # XOR of two signs
    problem = np.arange(4000) // 10
    data = Examples(x, y, problem, np.arange(4000), np.ones(4000, dtype=bool), y.astype(bool))
    head, report = train(data, 400, TrainSettings(kind="auto", hidden=32, seed=0, learning_rate=3e-3))
    by_kind = {c["kind"]: c["validation"]["auroc_pooled"] for c in report["candidates"]}
    assert by_kind["mlp"] > 0.9 > 0.6 > by_kind["linear"]
    assert report["chosen"] == "mlp" and head.kind == "mlp"


def test_an_mlp_of_one_hidden_unit_trains_and_predicts() -> None:
    data, _, _ = synthetic()
    head, _ = train(data, 300, TrainSettings(kind="mlp", hidden=1, seed=0, epochs=5))
    assert head.weights[0].shape == (data.features.shape[1], 1) and head.predict(data.features[:3]).shape == (3,)


def test_features_beyond_float16_keep_their_values_and_broken_ones_are_refused() -> None:
    from itscale.errors import ItscaleError
    from itscale.rewards.training import decode_features, encode_features

    ordinary = np.array([[0.5, -3.0], [100.0, 2.0]], np.float32)
    assert encode_features(ordinary) == encode_features(ordinary.astype(np.float16))  # the compact form
    large = np.array([[70000.0, 1.0]], np.float32)  # an inner block's residual stream can reach this
    assert np.array_equal(decode_features(encode_features(large), 2), large)
    with pytest.raises(ItscaleError, match="not finite"):
        encode_features(np.array([[np.nan, 1.0]], np.float32))


def test_the_ranking_term_sees_only_differences_within_a_problem() -> None:
    from itscale.rewards.training import _listwise

    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(6), 5)
    y = (rng.random(30) < 0.4).astype(np.float64)
    y[25:] = 1.0  # the last problem is all right: no ranking information, left out
    z = rng.standard_normal(30)
    loss, grad = _listwise(z, y, groups)
    # A per-problem shift of the logits (what "this problem is easy" adds) changes nothing.
    shifted, _ = _listwise(z + rng.standard_normal(6)[groups], y, groups)
    assert shifted == pytest.approx(loss)
    assert np.all(grad[25:] == 0) and np.allclose(np.bincount(groups, weights=grad), 0)
    # The gradient is the loss's.
    eps = 1e-6
    for i in (0, 7, 13):
        bumped = z.copy()
        bumped[i] += eps
        assert (_listwise(bumped, y, groups)[0] - loss) / eps == pytest.approx(grad[i], abs=1e-4)


def test_the_ranking_term_learns_the_within_problem_rule_under_a_strong_problem_signal() -> None:
    """Each problem's states share a large problem-level part that predicts how easy it is;
    which of its rollouts are right follows a small direction u. Cross-entropy alone spends
    itself on the problem-level part and barely ranks within a problem; with the ranking term
    the head ranks a problem's rollouts by u."""
    rng = np.random.default_rng(7)
    n_problems, per_problem, d = 200, 8, 24
    problem = np.repeat(np.arange(n_problems), per_problem)
    ease = rng.standard_normal(n_problems)
    topic = rng.standard_normal((n_problems, d)) * 3.0
    topic[:, 0] = ease * 3.0
    u = np.zeros(d)
    u[1] = 1.0
    within = rng.standard_normal((len(problem), d)) * 0.3
    x = (topic[problem] + within).astype(np.float32)
    logit = 2.0 * ease[problem] + 8.0 * (within @ u)
    y = (rng.random(len(problem)) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    data = Examples(x, y, problem, np.arange(len(y)), np.ones(len(y), dtype=bool), y.astype(bool))
    validation = split_by_problem(n_problems, 0.2, 0)[problem]
    best_possible, _ = auroc_within(within[validation] @ u, y[validation] > 0.5, problem[validation])
    assert best_possible > 0.85

    def within_on_validation(rank_weight: float) -> float:
        _, report = train(data, n_problems, TrainSettings(kind="linear", seed=0, rank_weight=rank_weight))
        return report["candidates"][0]["validation"]["auroc_within"]

    plain, ranked = within_on_validation(0.0), within_on_validation(4.0)
    assert plain < 0.65
    assert ranked > 0.75 and ranked > plain + 0.15


def test_auroc_within_a_problem_averages_over_problems_with_both_labels() -> None:
    scores = [0.9, 0.1, 0.5, 0.4, 0.7, 0.8]
    labels = [True, False, False, True, True, True]
    groups = ["a", "a", "b", "b", "c", "c"]  # c has only right answers: left out
    assert auroc_within(scores, labels, groups) == (pytest.approx((1.0 + 0.0) / 2), 2)
    assert auroc([1, 1, 1], [True, False, True]) == 0.5
    with pytest.raises(ValueError, match="NaN"):  # it once looped for ever on a NaN
        auroc([0.2, float("nan"), 0.7], [True, False, True])


# ------------------------------------------------------------------ the reward and its errors


def synthetic_head(d: int, seed: int) -> ValueHead:
    rng = np.random.default_rng(seed)
    return ValueHead(
        "linear",
        np.zeros(d, np.float32),
        np.ones(d, np.float32),
        (rng.standard_normal(d).astype(np.float32) / math.sqrt(d), np.float32(0.0)),
    )


def probe_on(model, head: ValueHead, directory: Path, sha: str | None = None) -> ProbeReward:
    directory.mkdir(parents=True, exist_ok=True)
    head.save(directory / "head.npz")
    card = {"format": 1, "generator": {"name": model.name, "gguf_sha256": sha or model.sha256}}
    (directory / "card.json").write_text(json.dumps(card))
    return make_reward(f'probe(path="{directory}")', model)


def test_a_head_for_another_model_or_a_damaged_one_is_refused_before_any_compute(smol, tmp_path) -> None:
    head = synthetic_head(smol.n_embd, 0)
    with pytest.raises(UsageError, match=r"trained for .*not for smollm2-135m"):
        probe_on(smol, head, tmp_path / "other", sha="0" * 64)
    probe_on(smol, head, tmp_path / "ok")
    (tmp_path / "ok" / "head.npz").write_bytes(b"not a numpy file")
    with pytest.raises(UsageError, match="damaged or not a head file"):
        make_reward(f'probe(path="{tmp_path / "ok"}")', smol)
    with pytest.raises(UsageError, match="no probe head in"):
        make_reward(f'probe(path="{tmp_path / "missing"}")', smol)
    wrong_size = synthetic_head(smol.n_embd + 1, 0)
    with pytest.raises(UsageError, match=r"damaged|reads"):
        probe_on(smol, wrong_size, tmp_path / "size")


def test_a_server_generator_without_an_embedded_model_is_a_clear_error() -> None:
    from itscale.lm.openai import OpenAIModel

    with pytest.raises(UsageError, match="--judge-model"):
        make_reward("probe", OpenAIModel("http://127.0.0.1:9", "m"))


async def test_the_probe_scores_every_algorithm_and_combines_in_products(smol, tmp_path) -> None:
    probe_on(smol, synthetic_head(smol.n_embd, 1), tmp_path / "head")
    probe = f'probe(path="{tmp_path / "head"}")'
    for spec in (probe, f"{probe} * arithmetic"):
        reward = make_reward(spec, smol)
        for name in ("particle-filter-sound", "best-of-n", "beam-search"):
            result = await make_algorithm(name).run(
                smol, PROBLEM, budget=2, max_steps=2, max_tokens=32, max_step_tokens=16, reward=reward
            )
            scores = [s.score for p in result.particles for s in p.steps if s.score is not None]
            assert scores and all(0 < v < 1 for v in scores)
            assert result.usage.reward_tokens == 0  # every step's features came with generation
            assert not result.diagnostics.get("reward_failures")


async def test_a_shipped_head_whose_card_says_default_is_the_default_everywhere(smol, tmp_path, monkeypatch) -> None:
    """Python (reward None), the CLI's solve and eval (no --reward) and the server all take
    the model's default from one place: the shipped head where its card says "default"."""
    import itscale.rewards.probe as probe_module
    from itscale.api import asolve
    from itscale.cli import build_parser
    from itscale.eval.commands import plan_from
    from itscale.rewards.registry import DEFAULT_REWARD, default_reward, default_reward_for

    monkeypatch.setattr(probe_module, "SHIPPED", tmp_path)
    directory = tmp_path / smol.name
    # A head that says 0.123 whatever the state: its scores are recognisable.
    constant = ValueHead(
        "linear",
        np.zeros(smol.n_embd, np.float32),
        np.ones(smol.n_embd, np.float32),
        (np.zeros(smol.n_embd, np.float32), np.float32(math.log(0.123 / 0.877))),
    )
    probe_on(smol, constant, directory)
    assert default_reward(smol) == default_reward_for(smol.name) == DEFAULT_REWARD  # no "default" in the card
    card = json.loads((directory / "card.json").read_text())
    (directory / "card.json").write_text(json.dumps({**card, "default": True}))
    assert default_reward(smol) == default_reward_for(smol.name) == "probe"
    assert default_reward_for("qwen2.5-coder-0.5b") == DEFAULT_REWARD  # no head shipped for it here

    result = await asolve(PROBLEM, "best-of-n", lm=smol, budget=2, max_tokens=24, max_step_tokens=12, seed=0)
    scores = [s.score for p in result.particles for s in p.steps if s.score is not None]
    assert scores and all(v == pytest.approx(0.123) for v in scores)

    command = ["eval", "--dataset", "gsm8k", "--model", smol.name, "--algorithms", "best-of-n", "--out", "unused"]
    args = build_parser().parse_args(command)
    plan = plan_from(args)
    assert plan.reward == "probe" and plan.identity()["probe_heads"] == [probe_module.head_digest(directory)]


# ------------------------------------------------------------------ the command, end to end


def problems_file(tmp_path: Path) -> Path:
    rows = [
        {"id": f"q{i}", "problem": f"What is {a} + {b}?", "answer": str(a + b)}
        for i, (a, b) in enumerate([(1, 1), (2, 3), (4, 4), (5, 2), (3, 3), (6, 1)])
    ]
    path = tmp_path / "tiny_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_reward(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "itscale.cli", "train-reward", "--model", "smollm2-135m", "--samples", "2",
        "--max-tokens", "24", "--max-step-tokens", "12", "--n-threads", str(THREADS), "--concurrency", "1",
        "--no-progress", *args,
    ]  # fmt: skip


def test_train_reward_end_to_end_resumes_after_a_kill(smol, tmp_path) -> None:
    data, out = problems_file(tmp_path), tmp_path / "head"
    rollouts = out / "rollouts.jsonl"
    # Sampling, killed (SIGKILL: no clean-up) once some problems are written.
    process = subprocess.Popen(
        train_reward("--dataset", str(data), "--out", str(out), "--sample-only"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if rollouts.exists() and rollouts.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert 2 <= len(before) < 6
    # The same command again samples only what is missing, then trains.
    done = subprocess.run(
        train_reward("--dataset", str(data), "--out", str(out)), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert sorted(r["problem"] for r in records) == [f"q{i}" for i in range(6)]  # each once
    assert [r["problem"] for r in records[: len(before)]] == [r["problem"] for r in before]  # kept, not redone
    assert all(len(r["samples"]) == 2 for r in records)
    card = json.loads((out / "card.json").read_text())
    assert card["generator"]["name"] == "smollm2-135m" and card["generator"]["gguf_sha256"] == smol.sha256
    assert card["label"] == "outcome" and card["data"]["problems"] == 6 and card["data"]["rollouts"] == 12
    assert card["command"][:2] == ["itscale", "train-reward"] and card["date"]
    assert {"auroc_pooled", "auroc_within", "problems"} <= set(card["validation"])
    assert (out / "head.npz").stat().st_size < 1_000_000
    # The head loads as a reward and scores.
    reward = make_reward(f'probe(path="{out}")', smol)
    assert reward.head.n_features == smol.n_embd
    # Training again is reproducible (same seed, same records).
    first = (out / "head.npz").read_bytes()
    again = subprocess.run(
        train_reward("--dataset", str(data), "--out", str(out), "--train-only"), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert (out / "head.npz").read_bytes() == first
    # A compute-optimal policy whose difficulty is this head's value after the first step,
    # from values of heads trained like it on the other folds.
    from itscale.rewards.probe import head_digest

    policy_file = tmp_path / "value-policy.json"

    def fit_policy(*args: str) -> dict:
        fitted = subprocess.run(
            [sys.executable, "-m", "itscale.cli", "fit-budget-policy", "--rollouts", str(out), "--out",
             str(policy_file), "--head", str(out), "--folds", "2", "--first-batch", "1", *args],
            capture_output=True, text=True,
        )  # fmt: skip
        assert fitted.returncode == 0, fitted.stderr
        return json.loads(policy_file.read_text())

    policy = fit_policy("--difficulty", "value")
    assert policy["difficulty"].startswith("value") and len(policy["value_edges"]) == 2
    assert policy["head_sha256"] == head_digest(out)
    # The vote, and the vote weighted by the head's out-of-fold value of each finished sample.
    assert policy["choices"] == [["vote", 1], ["vote", 2], ["weighted-vote", 1], ["weighted-vote", 2]]
    # Levels by agreement, the weighted vote only.
    policy = fit_policy("--selections", "weighted-vote")
    assert policy["difficulty"].startswith("agreement") and "value_edges" not in policy
    assert policy["choices"] == [["weighted-vote", 1], ["weighted-vote", 2]]
    assert policy["head_sha256"] == head_digest(out)
    # A layer the rollouts were not sampled with is evaluated from their text, once, into a
    # file of its own; the head reads it, and the probe turns it on in the engine.
    # Training on the first 7 rollouts cuts one problem to 1 of its 2: the side file still
    # holds both, so a later run on every rollout finds them.
    layered = tmp_path / "layered"
    inner = subprocess.run(
        train_reward("--dataset", str(data), "--rollouts", str(out), "--out", str(layered), "--train-only",
                     "--layers", "12", "--train-rollouts", "7"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert inner.returncode == 0, inner.stderr
    side = [json.loads(line) for line in (out / "features-12.jsonl").read_text().splitlines()]
    assert sorted(r["problem"] for r in side) == [f"q{i}" for i in range(4)]
    assert all(len(r["samples"]) == 2 for r in side)
    inner = subprocess.run(
        train_reward("--dataset", str(data), "--rollouts", str(out), "--out", str(layered), "--train-only",
                     "--layers", "12"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert inner.returncode == 0, inner.stderr
    side = [json.loads(line) for line in (out / "features-12.jsonl").read_text().splitlines()]
    assert sorted(r["problem"] for r in side) == [f"q{i}" for i in range(6)]
    assert json.loads((layered / "card.json").read_text())["layers"] == ["12"]
    from itscale.lm.llamacpp import LlamaCppModel

    engine = LlamaCppModel("smollm2-135m", n_ctx=2048, n_seq_max=4, n_threads=THREADS)
    try:
        probe = make_reward(f'probe(path="{layered}")', engine)
        assert engine.feature_layers == ("final", "12") and probe.head.n_features == engine.n_embd
        result = await_run(make_algorithm("best-of-n"), engine, probe)
        assert result.usage.reward_tokens == 0 and all(0 < p.score < 1 for p in result.particles)
    finally:
        engine.shutdown()
    # Training on it again does not evaluate anything: the side file has every problem.
    lines = (out / "features-12.jsonl").read_text().count("\n")
    subprocess.run(train_reward("--dataset", str(data), "--rollouts", str(out), "--out", str(layered),
                                "--train-only", "--layers", "12"), check=True, capture_output=True)  # fmt: skip
    assert (out / "features-12.jsonl").read_text().count("\n") == lines


def test_monte_carlo_labels_train_on_the_problems_that_have_them(tmp_path) -> None:
    data, out = problems_file(tmp_path), tmp_path / "mc"
    done = subprocess.run(
        train_reward("--dataset", str(data), "--out", str(out), "--mc-rollouts", "2", "--mc-limit", "3",
                     "--label", "mc"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = {r["problem"]: r for r in map(json.loads, (out / "rollouts.jsonl").read_text().splitlines())}
    for problem, record in records.items():
        for sample in record["samples"]:
            if problem in ("q0", "q1", "q2"):
                # A fraction in [0, 1] for each step prefix, in steps of 1/2; the finished
                # rollout's own verdict last.
                *fractions, verdict = sample["mc"]
                assert all(f in (0.0, 0.5, 1.0) for f in fractions) and verdict == float(sample["correct"])
            else:
                assert sample["mc"] is None
    card = json.loads((out / "card.json").read_text())
    # The three labelled problems are the data, and the split is among them.
    assert card["label"] == "mc" and card["data"]["problems"] == 3 and card["validation"]["problems"] == 1
    assert card["data"]["mc_rollouts"] == 2
    # What the studies of the probe (benchmarks/) read: the records in the dataset's order...
    _, identity, ordered = training_rollouts(out)
    assert [r["problem"] for r in ordered] == [f"q{i}" for i in range(6)] and identity["mc_rollouts"] == 2
    # ...and never a test split's.
    config = json.loads((out / "config.json").read_text())
    config["identity"]["dataset"]["source"] = str(tmp_path / "gsm8k_test.jsonl")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="test split"):
        training_rollouts(out)


def await_run(search, model, reward):
    import asyncio

    return asyncio.run(search.run(model, PROBLEM, budget=2, max_steps=2, max_tokens=32, max_step_tokens=16,
                                  reward=reward))  # fmt: skip


def test_train_reward_refuses_a_test_split_and_bad_flags(tmp_path) -> None:
    test_split = tmp_path / "gsm8k_test.jsonl"
    test_split.write_text(json.dumps({"id": "t", "problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    for args, message in (
        (["--dataset", str(test_split)], "is a test split"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--budget", "4"], "takes --samples"),
        (["--label", "mc"], "needs Monte Carlo labels"),
    ):
        done = subprocess.run(train_reward("--out", str(tmp_path / "x"), *args), capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
