"""The evaluation harness without a model: datasets, bad input, the output directory, the
plan, the bootstrap. Every bad input is a one-line error (exit code 2) before anything runs:
these tests check that the output directory was not even created."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from itscale.answers import extract_answer
from itscale.cli import main
from itscale.errors import UsageError
from itscale.eval.datasets import default_data_dir, load_dataset
from itscale.eval.plan import Backend, Plan, parse_budgets
from itscale.eval.report import (
    bootstrap_interval,
    comparison_tables,
    complete_problems,
    markdown,
    paired_differences,
    reference_differences,
    reference_table,
    summarise,
    write_report,
)
from itscale.eval.store import OutputDir, ResultStore
from itscale.search import algorithm_names, make_algorithm
from itscale.search.settings import SearchSettings


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def eval_args(out, *extra: str) -> list[str]:
    base = {"--dataset": "gsm8k", "--algorithms": "greedy", "--budgets": "1,2", "--limit": "2"}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value
    return ["eval", *[w for pair in base.items() for w in pair], "--out", str(out), "--model", "smollm2-135m"]


# ------------------------------------------------------------------ datasets


def test_named_datasets_resolve_from_the_data_dir(data_dir):
    gsm8k = load_dataset("gsm8k", data_dir)
    assert len(gsm8k.problems) == 1319 and gsm8k.problems[0].id == "gsm8k-test-0"
    assert gsm8k.problems[0].answer == "18"
    for name, count in [("math500", 500), ("aime24", 30), ("amc23", 40)]:
        assert len(load_dataset(name, data_dir).problems) == count
    assert load_dataset("gsm8k", data_dir).fingerprint == gsm8k.fingerprint  # stable


def test_data_dir_defaults_to_env_then_shared_data(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ITSCALE_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data here: the checkout's is found
    assert default_data_dir().resolve() == data_dir.resolve()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tiny_test.jsonl").write_text('{"id": "1", "problem": "1+1?", "answer": "2"}\n')
    monkeypatch.setenv("ITSCALE_DATA_DIR", str(tmp_path / "mine"))
    assert [p.answer for p in load_dataset("tiny").problems] == ["2"]


def test_jsonl_path_and_field_errors_name_the_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1, "problem": "1+1?", "answer": 2}\n\n{"id": "b", "problem": "2+2?", "answer": "4"}\n')
    assert [(p.id, p.answer) for p in load_dataset(str(good)).problems] == [("1", "2"), ("b", "4")]
    cases = {
        '{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?"}\n': "line 2 has no 'answer'",
        '{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": \n': "line 2 is not JSON",
        '{"id": "a", "problem": "x", "answer": "2"}\n{"id": "a", "problem": "y", "answer": "3"}\n': "repeats id 'a'",
        "[1, 2]\n": "line 1 is not a JSON object",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(UsageError, match=message):
            load_dataset(str(bad))


def test_hugging_face_names_fail_clearly_without_a_hub():
    # This machine reaches no hub: the error says so and what to do instead, quickly.
    pytest.importorskip("datasets", reason="the datasets extra: pip install 'itscale[datasets]'")
    with pytest.raises(UsageError, match="cannot reach the Hugging Face hub for dataset 'openai/gsm8k:main'"):
        load_dataset("openai/gsm8k:main")


def test_hugging_face_datasets_map_onto_the_schema(data_dir, tmp_path, monkeypatch):
    # No hub here, but the datasets library loads a local dataset directory by the same call
    # (offline mode skips the reachability check): rows in the hub's GSM8K and MATH-500
    # layouts, built from the shared data, must come out as the JSONL schema does.
    pytest.importorskip("datasets", reason="the datasets extra: pip install 'itscale[datasets]'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

    def dataset_dir(name: str, split: str, rows: list[dict]) -> str:
        directory = tmp_path / name
        directory.mkdir()
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(directory)

    shared = load_dataset("gsm8k", data_dir)
    reference = shared.head(3)
    rows = [{"question": p.problem, "answer": f"The working.\n#### {p.answer}"} for p in reference]
    loaded = load_dataset(f"hf:{dataset_dir('gsm8k-layout', 'test', rows)}")
    assert [(p.id, p.problem, p.answer) for p in loaded.problems] == [
        (str(i), p.problem, p.answer) for i, p in enumerate(reference)
    ]
    assert loaded.fingerprint != shared.fingerprint

    math = dataset_dir(
        "math-layout", "train", [{"problem": "What is $1+1$?", "answer": "2", "unique_id": "algebra/1.json"}]
    )
    (problem,) = load_dataset(f"hf:{math}@train").problems
    assert (problem.id, problem.problem, problem.answer) == ("algebra/1.json", "What is $1+1$?", "2")

    odd = dataset_dir("odd-layout", "test", [{"text": "hi", "label": 1}])
    with pytest.raises(UsageError, match=r"has columns text, label: need one of problem/question"):
        load_dataset(f"hf:{odd}")


def test_hugging_face_names_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install 'itscale\[datasets\]'"):
        load_dataset("hf:HuggingFaceH4/MATH-500")


# ------------------------------------------------------------------ bad input on the command line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--dataset", "nonesuch"), "unknown dataset 'nonesuch': give a JSONL path, one of aime24, amc23, gsm8k"),
        (("--dataset", "missing.jsonl"), "dataset file missing.jsonl does not exist"),
        (("--algorithms", "greedy,best-of-nope"), "unknown algorithm 'best-of-nope' in --algorithms"),
        (("--budgets", "1,0"), "--budgets takes positive integers separated by commas, got '0'"),
        (("--budgets", "2,-4"), "got '-4'"),
        (("--budgets", "1.5"), "got '1.5'"),
        (("--budgets", "one"), "got 'one'"),
        (("--budgets", "1,,2"), "got ''"),
        (("--seeds", "x"), "--seeds takes non-negative integers"),
        (("--limit", "0"), "--limit must be a positive integer"),
        (("--option", "particle-filter:mode=sound"), "names algorithm 'particle-filter', which is not in --algorithms"),
        (("--option", "mode=sound"), "give it to one algorithm with --option ALGORITHM:NAME=VALUE"),
        (("--reward", "nonesuch"), "unknown reward 'nonesuch'"),
        (("--budget", "4"), "takes --budgets and --seeds"),
        (("--temperature", "-1"), "temperature must be >= 0"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(capsys, tmp_path, extra, message):
    out = tmp_path / "out"
    code, err = run_cli(capsys, *eval_args(out, *extra))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("itscale: error: ") and message in err
    assert not out.exists()


def test_a_jsonl_line_missing_a_field_on_the_command_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "answer": "4"}\n')
    code, err = run_cli(capsys, *eval_args(tmp_path / "out", "--dataset", str(bad)))
    assert code == 2 and "line 2 has no 'problem'" in err and err.count("\n") == 1


def test_algorithm_names_come_from_the_registry():
    # Whatever the search package registers is accepted, and nothing else.
    plan_names = algorithm_names()
    assert "particle-filter-sound" in plan_names
    for name in plan_names:
        make_algorithm(name)


# ------------------------------------------------------------------ the output directory


def identity(**settings):
    return {"dataset": {"source": "x", "fingerprint": "f"}, "settings": {"temperature": 0.8, **settings}}


def test_a_different_configuration_is_refused_naming_the_setting(tmp_path):
    out = OutputDir(tmp_path / "run")
    out.path.mkdir()
    out.record(identity(), {"command": ["a"]})
    out.record(identity(), {"command": ["b"]})  # same identity: fine, the run is logged
    assert [r["command"] for r in out.read_config()["runs"]] == [["a"], ["b"]]
    with pytest.raises(UsageError, match=r"settings\.temperature: was 0\.8, now 0\.5; use another --out"):
        out.check(identity(temperature=0.5))
    with pytest.raises(UsageError, match=r"settings\.max_steps: was null, now 3"):
        out.check(identity(max_steps=3))


def test_an_algorithm_added_later_brings_its_options_into_the_identity(tmp_path):
    """Adding an algorithm to a study is allowed; from then on its options (for
    compute-optimal, the policy's sha256) are part of what later runs must match."""
    out = OutputDir(tmp_path / "run")
    out.path.mkdir()
    out.record({**identity(), "options": {"best-of-n": {}}}, {"command": ["a"]})
    added = {**identity(), "options": {"best-of-n": {}, "compute-optimal": {"policy_sha256": "a" * 64}}}
    out.record(added, {"command": ["b"]})
    assert out.read_config()["identity"]["options"] == added["options"]
    with pytest.raises(UsageError, match=r"options\.compute-optimal\.policy_sha256: was"):
        out.check({**identity(), "options": {"compute-optimal": {"policy_sha256": "b" * 64}}})
    out.check({**identity(), "options": {"best-of-n": {}}})  # a run without it still matches


def test_an_identity_is_compared_as_it_is_stored(tmp_path):
    # Settings hold tuples (stop strings); config.json holds lists. A directory must match
    # the settings it was made with, whatever the field's Python type (CI found
    # "settings.stop: was [], now []" refusing a resumed train-reward).
    out = OutputDir(tmp_path / "run")
    stopping = SearchSettings(stop=("###",))
    out.record({"settings": stopping.identity()}, {})
    out.check({"settings": stopping.identity()})
    out.check({"settings": {**stopping.identity(), "stop": ("###",)}})
    with pytest.raises(UsageError, match=r'settings\.stop: was \["###"\], now null'):
        out.check({"settings": SearchSettings().identity()})


def test_settings_added_later_are_left_out_of_an_identity_at_their_defaults():
    assert "stop" not in SearchSettings().identity()
    assert "budget" not in SearchSettings().identity() and "seed" not in SearchSettings().identity()
    assert SearchSettings(stop=("a", "b")).identity()["stop"] == ["a", "b"]


def test_options_of_algorithms_added_later_do_not_conflict(tmp_path):
    out = OutputDir(tmp_path / "run")
    out.path.mkdir()
    out.record({"options": {"greedy": {}}}, {})
    out.check({"options": {"greedy": {}, "particle-filter": {"mode": "sound"}}})
    with pytest.raises(UsageError, match=r"options\.greedy\.x"):
        out.check({"options": {"greedy": {"x": 1}}})


def test_results_without_config_are_not_ours(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(UsageError, match="not an itscale eval directory"):
        OutputDir(tmp_path).check({})


def test_a_second_writer_is_refused(tmp_path):
    out = OutputDir(tmp_path)
    with out.lock(), pytest.raises(UsageError, match="another itscale eval is writing"), OutputDir(tmp_path).lock():
        pass


def record(problem: str, budget: int = 1) -> dict:
    particles = [{"answer": "4", "score": None, "tokens": 10, "steps": 2, "end": "eos"}]
    return {
        "problem": problem,
        "algorithm": "greedy",
        "budget": budget,
        "seed": 0,
        "reference": "4",
        "answer": "4",
        "correct": True,
        "particles": particles,
        "usage": {"total_tokens": 10, "completion_tokens": 8, "reward_tokens": 0, "seconds": 1.0},
    }


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    store.append([record("a"), record("b")])
    with open(store.path, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(json.dumps(record("c")).encode()[:25])
    loaded = store.load()
    assert sorted(k[0] for k in loaded) == ["a", "b"] and store.dropped_torn_line
    assert store.path.read_bytes().endswith(b"\n")
    store.append([record("c")])
    assert sorted(k[0] for k in ResultStore(store.path).load()) == ["a", "b", "c"]


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record("a")) + "\n{oops\n" + json.dumps(record("b")) + "\n")
    with pytest.raises(UsageError, match="line 2 is damaged"):
        ResultStore(path).load()


# ------------------------------------------------------------------ the plan


def test_a_study_scored_by_a_learned_head_belongs_to_that_head(data_dir, tmp_path):
    """The spec "probe" names no file: a head trained again must change the study's identity,
    so its directory refuses to mix records scored by the two heads."""
    import numpy as np

    from itscale.rewards.probe import SHIPPED, ValueHead

    dataset = load_dataset("gsm8k", data_dir)

    def identity(reward: str) -> dict:
        plan = Plan(dataset, ("best-of-n",), (4,), (0,), SearchSettings(), reward, Backend("qwen2.5-coder-0.5b"))
        return plan.identity()

    assert "probe_heads" not in identity("arithmetic * self-certainty")  # older studies keep their identity
    shipped = identity("probe * arithmetic")["probe_heads"]
    assert shipped == [hashlib.sha256((SHIPPED / "qwen2.5-coder-0.5b" / "head.npz").read_bytes()).hexdigest()]

    def head_in(directory: Path, bias: float) -> str:
        directory.mkdir()
        ValueHead(
            "linear", np.zeros(4, np.float32), np.ones(4, np.float32), (np.ones(4, np.float32), np.float32(bias))
        ).save(directory / "head.npz")
        return f'probe(path="{directory}")'

    first, retrained = head_in(tmp_path / "a", 0.0), head_in(tmp_path / "b", 1.0)
    assert identity(first)["probe_heads"] != identity(retrained)["probe_heads"]
    assert identity(first) == identity(first)


def test_a_compute_optimal_study_belongs_to_its_budget_policy(data_dir, tmp_path):
    """The policy file decides each problem's budget: one fitted again must change the
    study's identity; studies without compute-optimal keep theirs."""
    from itscale.search.allocation import SHIPPED

    dataset = load_dataset("gsm8k", data_dir)

    def identity(algorithms: tuple[str, ...], **options) -> dict:
        plan = Plan(dataset, algorithms, (4,), (0,), SearchSettings(), "probe", Backend("qwen2.5-coder-0.5b"), options)
        return plan.identity()

    assert identity(("best-of-n",))["options"] == {"best-of-n": {}}
    shipped = identity(("compute-optimal",))["options"]["compute-optimal"]
    digest = hashlib.sha256((SHIPPED / "qwen2.5-coder-0.5b.json").read_bytes()).hexdigest()
    assert shipped == {"policy_sha256": digest}
    (tmp_path / "a.json").write_text('{"format": 2}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "budget-policy.json").write_text('{"format": 2, "refitted": true}')
    own = [
        identity(("compute-optimal",), **{"compute-optimal": {"policy": str(tmp_path / name)}})["options"]
        for name in ("a.json", "b")
    ]
    assert own[0]["compute-optimal"]["policy_sha256"] != own[1]["compute-optimal"]["policy_sha256"] != digest


def test_units_reuse_samples_only_where_the_algorithm_allows(data_dir):
    dataset = load_dataset("gsm8k", data_dir)
    plan = Plan(
        dataset,
        ("greedy", "best-of-n", "particle-filter"),
        parse_budgets("4,1,2"),
        (0,),
        SearchSettings(),
        "llm-judge",
        Backend("smollm2-135m"),
        limit=2,
    )
    units = plan.units({})
    reuse = [u for u in units if u.algorithm == "best-of-n"]
    assert [(u.run_budget, u.budgets, u.reuse) for u in reuse] == [(4, (1, 2, 4), True)] * 2
    # Greedy ignores the budget: one run per problem, recorded at every budget.
    greedy = [u for u in units if u.algorithm == "greedy"]
    assert [(u.run_budget, u.budgets, u.reuse) for u in greedy] == [(1, (1, 2, 4), False)] * 2
    own = [u for u in units if u.algorithm == "particle-filter"]
    assert sorted((u.problem.id, u.run_budget, u.budgets) for u in own) == sorted(
        (p.id, b, (b,)) for p in dataset.problems[:2] for b in (1, 2, 4)
    )
    # Problem by problem, cheap budgets first within a problem: a stopped run has the whole
    # grid on its first problems.
    first, second = (p.id for p in dataset.problems[:2])
    assert [u.problem.id for u in units] == [first] * 5 + [second] * 5
    assert [(u.algorithm, u.run_budget) for u in units[:5]] == [
        ("greedy", 1),
        ("particle-filter", 1),
        ("particle-filter", 2),
        ("best-of-n", 4),
        ("particle-filter", 4),
    ]
    # Only what is missing: budget 4 of problem 0 done leaves best-of-n at 2 for it.
    done = {(first, "best-of-n", 4, 0): {}, (first, "particle-filter", 1, 0): {}}
    again = plan.units(done)
    assert [(u.run_budget, u.budgets) for u in again if u.algorithm == "best-of-n" and u.problem.id == first] == [
        (2, (1, 2))
    ]
    assert len(again) == len(units) - 1  # one particle-filter unit fewer; best-of-n still one unit


def test_samplers_with_the_same_rollouts_share_one_run(data_dir):
    def units(options=None, done=(), **settings):
        plan = Plan(
            load_dataset("gsm8k", data_dir),
            ("self-consistency", "best-of-n", "weighted-best-of-n", "particle-filter"),
            (1, 2, 4),
            (0,),
            SearchSettings(**settings),
            "llm-judge",
            Backend("smollm2-135m"),
            options or {},
            limit=1,
        )
        return [u for u in plan.units(set(done)) if u.reuse]

    # One run for the three samplers, run by the first that scores (self-consistency does
    # not, so its rollouts would carry no scores for the others).
    (shared,) = units()
    assert (shared.algorithm, shared.run_budget, shared.budgets) == ("best-of-n", 4, (1, 2, 4))
    assert shared.picks == (
        ("best-of-n", (1, 2, 4)),
        ("self-consistency", (1, 2, 4)),
        ("weighted-best-of-n", (1, 2, 4)),
    )
    # Each keeps its own missing budgets; the run is as large as the largest of them.
    problem = load_dataset("gsm8k", data_dir).problems[0].id
    done = [(problem, "best-of-n", 4, 0), (problem, "self-consistency", 4, 0), (problem, "self-consistency", 2, 0)]
    (shared,) = units(done=done)
    assert shared.run_budget == 4 and dict(shared.picks) == {
        "best-of-n": (1, 2),
        "self-consistency": (1,),
        "weighted-best-of-n": (1, 2, 4),
    }
    # Another aggregation scores the rollouts differently: its own run.
    alone = units({"weighted-best-of-n": {"aggregation": "min"}})
    assert sorted(u.algorithm for u in alone) == ["best-of-n", "weighted-best-of-n"]
    # Under a token budget the reward's tokens shorten the rollouts of a scorer: no sharing.
    assert len(units(token_budget=10_000)) == 3


# ------------------------------------------------------------------ the bootstrap


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_problems():
    rng = np.random.default_rng(1)
    small = (rng.random(20) < 0.6).astype(float)
    large = (rng.random(2000) < 0.6).astype(float)
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5
    # The normal approximation of a proportion's 95% interval, for many problems.
    half = 1.96 * np.sqrt(large.mean() * (1 - large.mean()) / len(large))
    assert abs((hi_l - lo_l) / 2 - half) < 0.005
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)
    assert bootstrap_interval(small) == (lo_s, hi_s)  # seeded: the report is reproducible


def test_an_unfinished_run_is_reported_over_the_problems_every_cell_has():
    def cell(problem: str, algorithm: str, budget: int) -> dict:
        return {**record(problem, budget), "algorithm": algorithm}

    done = [cell(p, a, b) for p in ("p0", "p1") for a in ("greedy", "particle-filter") for b in (1, 2)]
    in_progress = [cell("p2", "greedy", 1), cell("p2", "greedy", 2), cell("p2", "particle-filter", 1)]
    kept, left_out = complete_problems(done + in_progress)
    assert kept == done and left_out == 3
    assert complete_problems(done) == (done, 0)


def test_any_right_counts_problems_where_some_particle_was_right_though_not_chosen():

    def graded(problem: str, seed: int, chosen: str, others: list[str]) -> dict:
        particles = [{"answer": a, "score": 0.5, "tokens": 5, "steps": 1, "end": "eos"} for a in [chosen, *others]]
        verdict = {"answer": chosen, "correct": chosen == "4", "particles": particles}
        return {**record(problem), "seed": seed, **verdict}

    records = [
        graded("p0", 0, "4", ["5"]),  # chosen right
        graded("p1", 0, "5", ["4.0", None]),  # right only among the others, written differently
        graded("p2", 0, "5", ["6", None]),  # nowhere right
        graded("p3", 0, "5", ["4"]),  # right among the others on one seed of two
        graded("p3", 1, "5", ["7"]),
    ]
    (row,) = summarise(records, ["greedy"])
    assert row.accuracy == pytest.approx(1 / 4)
    assert row.any_correct == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert row.strict_accuracy is None  # records made before strict grading was kept
    assert "| greedy | 1 | 25.0% |" in markdown({"identity": {}, "runs": []}, [row], [])
    assert "| n/a | 62.5% | 4 |" in markdown({"identity": {}, "runs": []}, [row], [])


def test_strict_accuracy_counts_only_stated_answers(data_dir, tmp_path):
    """Grading keeps both verdicts: `correct` takes the last number when nothing is boxed,
    `correct_strict` only a stated answer; the report shows both."""
    from itscale.eval.datasets import Problem
    from itscale.eval.plan import Unit
    from itscale.eval.runner import _record
    from itscale.types import Result, Usage

    unit = Unit(Problem("p", "What is 3 + 4?", "7"), "greedy", 0, 1, (1,), False)
    records = []
    for problem, text in (("p0", "3 + 4 = 7"), ("p1", "3 + 4 = 7. The answer is 7."), ("p2", "\\boxed{7}")):
        result = Result(extract_answer(text), text, [], [], "greedy", Usage())
        records.append({**_record(unit, 1, result, [], result.answer, text, Usage()), "problem": problem})
    assert [(r["correct"], r["correct_strict"]) for r in records] == [(True, False), (True, True), (True, True)]
    (row,) = summarise(records, ["greedy"])
    assert (row.accuracy, row.strict_accuracy) == pytest.approx((1.0, 2 / 3))
    assert "| 100.0% |" in markdown({"identity": {}, "runs": []}, [row], []) and "| 66.7% |" in markdown(
        {"identity": {}, "runs": []}, [row], []
    )


def test_paired_differences_tell_what_overlapping_intervals_cannot():
    def scored(problem: str, algorithm: str, budget: int, correct: bool, seed: int = 0) -> dict:
        return {**record(problem, budget), "algorithm": algorithm, "seed": seed, "correct": correct}

    # 40 problems; at budget 4 "b" solves the first 12, "a" those and 4 more: 30% against 40%,
    # intervals that overlap, and a difference no resampling of the problems can reverse.
    problems = [f"p{i}" for i in range(40)]
    records = [scored(p, "b", 4, i < 12) for i, p in enumerate(problems)]
    records += [scored(p, "a", 4, i < 16) for i, p in enumerate(problems)]
    # At budget 8 they differ both ways on 10 problems each: no difference.
    records += [scored(p, "b", 8, i < 10) for i, p in enumerate(problems)]
    records += [scored(p, "a", 8, 10 <= i < 20) for i, p in enumerate(problems)]
    # "c" exists only at budget 4, on two seeds of which one is right: a problem's score is 0.5.
    records += [scored(p, "c", 4, seed == 0, seed) for p in problems for seed in (0, 1)]

    rows = {(r.algorithm, r.budget): r for r in summarise(records, ["a", "b", "c"])}
    assert rows[("a", 4)].ci_low < rows[("b", 4)].ci_high  # the rows alone cannot tell
    differences = {(d.other, d.budget): d for d in paired_differences(records, ["a"], ["c", "b", "a"])}
    assert set(differences) == {("b", 4), ("b", 8), ("c", 4)}
    clear, none, seeds = differences[("b", 4)], differences[("b", 8)], differences[("c", 4)]
    assert clear.problems == 40 and clear.difference == pytest.approx(0.1) and clear.ci_low > 0
    assert none.difference == pytest.approx(0.0) and none.ci_low < 0 < none.ci_high
    assert seeds.difference == pytest.approx(16 / 40 - 0.5)
    tables = "\n".join(comparison_tables(list(differences.values())))
    assert "| budget | vs c | vs b |" in tables  # columns in the given algorithm order
    assert "| 4 | " in tables and "+10.0 (" in tables and tables.count("**") == 2  # one flagged cell + legend
    # The legend says how many cells are flagged and how many chance alone would flag.
    assert "(1 of 3 here)" in tables and "about 0.1 of 3 would exclude 0 by chance" in tables
    # One common problem bootstraps to the interval [d, d]: too few to flag anything.
    (lone,) = paired_differences([*records[:1], scored("p0", "a", 4, False)], ["a"], ["b", "a"])
    assert lone.problems == 1 and lone.ci_low == lone.ci_high == -1.0
    assert "(0 of 1 here)" in "\n".join(comparison_tables([lone]))


def test_every_cell_against_one_reference_cell(tmp_path, capsys):
    """The "search at budget b matches weighted best-of-N at 16" question: each cell paired
    with one reference cell at another budget, over the problems both have."""

    def scored(problem: str, algorithm: str, budget: int, correct: bool) -> dict:
        return {**record(problem, budget), "algorithm": algorithm, "correct": correct}

    problems = [f"p{i}" for i in range(40)]
    records = [scored(p, "wbon", 16, i < 20) for i, p in enumerate(problems)]  # 50%
    records += [scored(p, "pf", 4, i < 8) for i, p in enumerate(problems)]  # 20%: short of it
    records += [scored(p, "pf", 8, 2 <= i < 22) for i, p in enumerate(problems)]  # 50%, other problems
    differences = reference_differences(records, ("wbon", 16), ["wbon", "pf"])
    by_cell = {(d.algorithm, d.budget): d for d in differences}
    assert set(by_cell) == {("pf", 4), ("pf", 8)}  # the reference is not set against itself
    short, level = by_cell[("pf", 4)], by_cell[("pf", 8)]
    assert short.other == level.other == "wbon at 16"
    assert short.difference == pytest.approx(-0.3) and short.ci_high < 0
    assert level.difference == pytest.approx(0.0) and level.ci_low < 0 < level.ci_high
    table = "\n".join(reference_table(differences))
    assert "## Every cell against wbon at 16" in table and "| algorithm | budget 4 | budget 8 |" in table
    assert "| pf | -30.0 (" in table and "(1 of 2 here)" in table

    # From the command line: the table in report.md, the cells in report.json; a cell the
    # records lack, or a malformed one, is one clear line.
    out = OutputDir(tmp_path)
    out.record({}, {"command": ["itscale"], "grid": {"algorithms": ["wbon", "pf"]}})
    out.results.append(records)
    code, _ = run_cli(capsys, "report", str(tmp_path), "--compare", "", "--reference", "wbon:16")
    assert code == 0 and "## Every cell against wbon at 16" in (tmp_path / "report.md").read_text()
    assert len(json.loads((tmp_path / "report.json").read_text())["reference"]) == 2
    code, err = run_cli(capsys, "report", str(tmp_path), "--reference", "wbon:32")
    assert code == 2 and "--reference wbon:32" in err and "pf:4" in err and len(err.splitlines()) == 1
    code, err = run_cli(capsys, "report", str(tmp_path), "--reference", "wbon")
    assert code == 2 and "ALGORITHM:BUDGET" in err


def test_report_compare_names_an_algorithm_the_directory_has(tmp_path, capsys):
    out = OutputDir(tmp_path)
    out.record({}, {"command": ["itscale"], "grid": {"algorithms": ["greedy"]}})
    out.results.append([record("p0")])
    code, err = run_cli(capsys, "report", str(tmp_path), "--compare", "particle-filter")
    assert code == 2 and "--compare particle-filter" in err and "greedy" in err and len(err.splitlines()) == 1


def test_the_report_says_how_much_of_an_unfinished_grid_it_covers(tmp_path):
    out = OutputDir(tmp_path)
    out.record({}, {"command": ["itscale"], "grid": {"algorithms": ["greedy"], "budgets": [1, 2], "problems": 3}})
    out.results.append([record("p0", 1), record("p0", 2), record("p1", 1)])  # p1 in progress
    write_report(tmp_path, compare=[])
    text = (tmp_path / "report.md").read_text()
    assert "Unfinished run: 1 of 3 problems have every algorithm and budget" in text
    assert "(1 record of a problem in progress is left out)" in text
    out.results.append([record("p1", 2), record("p2", 1), record("p2", 2)])
    write_report(tmp_path, compare=[])
    assert "Unfinished" not in (tmp_path / "report.md").read_text()


def test_the_report_lists_a_resumed_command_once_with_its_count():
    records = [record(p) for p in ("p0", "p1")]
    first = ["itscale", "eval", "--dataset", "gsm8k", "--budgets", "1"]
    grown = [*first[:-1], "1,2"]
    config = {"identity": {}, "grid": {}, "runs": [{"command": c} for c in (first, first, first, grown)]}
    text = markdown(config, summarise(records, ["greedy"]), [])
    listed = [line.strip() for line in text.splitlines() if line.startswith("    itscale")]
    assert listed == [" ".join(first) + "    # run 3 times", " ".join(grown)]


def test_the_selection_table_tells_the_search_from_the_choice():
    def run(problem: str, chosen: str, others: list[str], capped: int = 0) -> dict:
        answers = [chosen, *others]
        ends = ["length"] * capped + ["eos"] * (len(answers) - capped)
        pairs = zip(answers, ends, strict=True)
        particles = [{"answer": a, "score": 0.5, "tokens": 5, "steps": 1, "end": e} for a, e in pairs]
        return {**record(problem), "answer": chosen, "correct": chosen == "4", "particles": particles}

    records = [
        run("p0", "5", ["4", "4.0", None]),  # the reward chose a minority answer: the vote is right
        run("p1", "4", ["5", "5"], capped=1),  # chosen right, outvoted
        run("p2", "7", ["7", "7", "7"], capped=4),  # concentrated on one wrong answer
    ]
    (row,) = summarise(records, ["greedy"])
    assert (row.accuracy, row.vote_correct, row.any_correct) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert row.distinct_answers == pytest.approx((2 + 2 + 1) / 3)  # "4" and "4.0" are one answer
    assert row.capped == pytest.approx(5 / 11)
    text = markdown({"identity": {}, "runs": []}, [row], [])
    assert "## What the final particles held" in text
    assert "| greedy | 1 | 33.3% | 33.3% | 66.7% | 1.7 | 45% |  |" in text  # greedy does not resample


def test_the_selection_table_counts_the_runs_and_steps_that_resampled():
    def run(problem: str, resampled_steps: int, particle_steps: list[int]) -> dict:
        particles = [{"answer": "4", "score": 0.5, "tokens": 5, "steps": n, "end": "eos"} for n in particle_steps]
        diagnostics = {"resampled_steps": resampled_steps, "degenerate_weights": 0}
        return {**record(problem), "algorithm": "particle-filter", "particles": particles, "diagnostics": diagnostics}

    records = [run("p0", 0, [3, 5]), run("p1", 4, [6, 6]), run("p2", 1, [2, 7])]
    (row,) = summarise(records, ["particle-filter"])
    assert (row.resampled_runs, row.resampled_steps, row.search_steps) == (2, 5, 5 + 6 + 7)
    text = markdown({"identity": {}, "runs": []}, [row], [])
    assert "| 0% | 2/3 runs, 5/18 steps |" in text


# ------------------------------------------------------------------ the plots


def test_many_algorithms_get_a_panel_each_below_the_overview(tmp_path):
    import matplotlib.image

    from itscale.eval.plots import SHADED_TOGETHER, plot_scaling
    from itscale.eval.report import Row

    def curve(algorithm: str, shift: float, tokens_per_budget: float) -> list[Row]:
        return [
            Row(algorithm, b, 20, 20, 0.3 + shift, 0.1 + shift, 0.5 + shift, 0.6, 0.4, 3.0, 0.1,
                300 + tokens_per_budget * b, 250.0, 0.0, 9.0, False, [], [])
            for b in (1, 2, 4, 8)
        ]  # fmt: skip

    few = [*curve("greedy", 0.0, 0.0), *curve("best-of-n", 0.1, 300.0)]  # greedy: one x against tokens
    many = few + [row for i in range(SHADED_TOGETHER) for row in curve(f"algorithm-{i}", 0.02 * i, 280.0)]
    heights = {}
    for name, rows in (("few", few), ("many", many)):
        out = tmp_path / name
        out.mkdir()
        paths = plot_scaling(rows, out, title="test")
        shapes = {matplotlib.image.imread(p).shape[:2] for p in paths.values()}
        assert all(h > 600 and w > 1000 for h, w in shapes)
        heights[name] = min(h for h, _ in shapes)
        assert not list(out.glob(".*.tmp.png"))  # written atomically, nothing half-written left
    assert heights["many"] > 1.5 * heights["few"]


def test_a_study_is_set_against_a_baseline_study_problem_by_problem(tmp_path):
    """`itscale report DIR --baseline OTHER`: the same cells of two studies over the same
    problems (another reward, say), paired, with what differs between them named."""
    from itscale.eval.report import write_report

    def study(name: str, reward: str, right: list[bool], source: str = "gsm8k_test.jsonl") -> Path:
        out = OutputDir(tmp_path / name)
        out.path.mkdir()
        out.record({"dataset": {"source": source}, "reward": reward, "options": {"greedy": {}}}, {"command": ["x"]})
        records = []
        for i, ok in enumerate(right):
            answer = "4" if ok else "5"
            records.append({**record(f"p{i}"), "answer": answer, "correct": ok})
        out.results.append(records)
        return out.path

    baseline = study("heuristic", "arithmetic", [True, False, False, False])
    learned = study("probe", "probe", [True, True, True, False, True])  # one problem more
    assert main(["report", str(learned), "--baseline", str(baseline)]) == 0
    report = json.loads((learned / "report.json").read_text())["baseline"]
    assert report["changed"] == ['reward: was "arithmetic", now "probe"']
    (cell,) = report["differences"]
    assert (cell["algorithm"], cell["budget"], cell["problems"]) == ("greedy", 1, 4)  # the common problems
    assert (cell["accuracy"], cell["baseline_accuracy"], cell["difference"]) == pytest.approx((0.75, 0.25, 0.5))
    assert "| greedy | 1 | 4 | 75.0% | 25.0% | +50.0 (" in (learned / "report.md").read_text()
    other = study("math", "arithmetic", [True], source="math500_test.jsonl")
    with pytest.raises(UsageError, match="over another dataset"):
        write_report(learned, baseline=other)
