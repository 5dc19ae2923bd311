"""The evaluation harness with real models: SmolLM2-135M in the embedded engine (one thread:
on this shared 2-core machine a second thread makes llama.cpp spin, not work), the real
llama.cpp server fixture, a local Ray instance. Problems, budgets and tokens are tiny."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itscale.answers import is_equivalent
from itscale.cli import main
from itscale.eval import Backend, Plan, evaluate, load_dataset
from itscale.eval.plan import Unit
from itscale.eval.progress import EvalProgress
from itscale.eval.runner import Job, run_unit
from itscale.lm.llamacpp import LlamaCppModel
from itscale.rewards.registry import make_reward
from itscale.search import make_algorithm
from itscale.search.settings import SearchSettings
from itscale.types import Prompt

TINY = SearchSettings(max_tokens=16, max_step_tokens=16, max_steps=2)
TINY_FLAGS = ["--max-tokens", "16", "--max-step-tokens", "16", "--max-steps", "2"]
ENGINE_FLAGS = ["--model", "smollm2-135m", "--n-threads", "1", "--n-ctx", "2048"]


def eval_command(out: Path, algorithms: str, limit: int, *backend: str) -> list[str]:
    """`itscale eval` on the first `limit` GSM8K problems at budgets 1,2 with tiny settings;
    `backend` flags (default: the embedded SmolLM2 on one thread), tiny settings last."""
    return [
        *("eval", "--dataset", "gsm8k", "--algorithms", algorithms, "--budgets", "1,2", "--limit", str(limit)),
        *("--out", str(out), "--no-progress"),
        *(backend or ENGINE_FLAGS),
        *TINY_FLAGS,
    ]


@pytest.fixture(scope="module")
def engine():
    model = LlamaCppModel("smollm2-135m", n_ctx=4096, n_seq_max=32, n_threads=1)
    yield model
    model.shutdown()


def plan_for(data_dir, algorithms, budgets, limit, backend=None, settings=TINY) -> Plan:
    return Plan(
        load_dataset("gsm8k", data_dir),
        tuple(algorithms),
        tuple(budgets),
        (0,),
        settings,
        "llm-judge",
        backend or Backend("smollm2-135m", n_ctx=2048, n_threads=1),
        {a: {} for a in algorithms},
        limit,
    )


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def keys(records: list[dict]) -> list[tuple]:
    return [(r["problem"], r["algorithm"], r["budget"], r["seed"]) for r in records]


# ------------------------------------------------------------------ sample reuse


def test_sample_reuse_picks_each_budget_from_the_big_run(engine, data_dir, tmp_path):
    plan = plan_for(data_dir, ["best-of-n", "self-consistency"], [1, 2, 3], limit=1)
    evaluate(plan, tmp_path, lm=engine, progress=False)
    records = {(r["algorithm"], r["budget"]): r for r in read_records(tmp_path)}
    assert len(records) == 6 and all(r["sampled_from"] == 3 for r in records.values())
    problem = plan.problems[0]

    async def big_run(name):
        search = make_algorithm(name)
        reward = make_reward("llm-judge", engine) if search.uses_reward else None
        result = await search.run(engine, problem.problem, TINY.replace(budget=3, seed=0), reward=reward)
        return search, result

    for name in ("best-of-n", "self-consistency"):
        search, result = asyncio.run(big_run(name))
        for b in (1, 2, 3):
            record, pick = records[(name, b)], search.pick(result.particles[:b])
            assert record["answer"] == pick.answer
            assert record["text"] == result.particles[pick.index].text
            assert [p["tokens"] for p in record["particles"]] == [p.tokens for p in result.particles[:b]]
            assert record["usage"]["completion_tokens"] == sum(p.tokens for p in result.particles[:b])
        full = records[(name, 3)]["usage"]
        assert (full["prompt_tokens"], full["completion_tokens"], full["reward_tokens"]) == (
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.usage.reward_tokens,
        )
        assert result.answer == records[(name, 3)]["answer"]
        # Budget 1 pays the shared prompt in full (the engine evaluates it once for all).
        prompt = Prompt.of(problem.problem, system=TINY.system_prompt)
        prompt_length = asyncio.run(engine.start(prompt)).prompt_len
        one = records[(name, 1)]["usage"]
        assert prompt_length <= one["prompt_tokens"] <= full["prompt_tokens"]
        assert records[(name, 1)]["seconds_estimated"] and not records[(name, 3)]["seconds_estimated"]
    assert records[("best-of-n", 1)]["usage"]["reward_tokens"] < records[("best-of-n", 3)]["usage"]["reward_tokens"]
    # Both came from one run (best-of-n's: it scores); self-consistency's records are what
    # its own run gives and costs (checked above), with no scores and no reward charged.
    assert {r["rollouts_of"] for r in records.values()} == {"best-of-n"}
    assert {r["started"] for r in records.values()} == {records[("best-of-n", 3)]["started"]}
    for b in (1, 2, 3):
        sc = records[("self-consistency", b)]
        assert all(p["score"] is None for p in sc["particles"]) and sc["usage"]["reward_seconds"] == 0
        assert sc["usage"]["seconds"] < records[("best-of-n", b)]["usage"]["seconds"]
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| self-consistency | 3 |" in report and "reused from run of 3 (best-of-n) |" in report
    assert "shared one run per problem" in report


def test_every_run_gets_a_fresh_reward(engine, data_dir):
    # A reward caches scores by content: shared across runs, the second identical run would
    # be scored from the cache and report no reward tokens.
    problem = load_dataset("gsm8k", data_dir).problems[1]
    unit = Unit(problem, "best-of-n", 0, 2, (2,), reuse=False)
    job = Job(TINY, "llm-judge", {})
    first = asyncio.run(run_unit(unit, job, engine))[0]
    second = asyncio.run(run_unit(unit, job, engine))[0]
    assert first["text"] == second["text"]
    assert first["usage"]["reward_tokens"] == second["usage"]["reward_tokens"] > 0


# ------------------------------------------------------------------ the command line: run, refuse, grow, report


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    command = eval_command(out, "greedy,best-of-n", 2)
    assert main(command) == 0
    return out, command


def test_records_hold_prediction_answer_reference_and_verdict(finished, data_dir):
    out, _ = finished
    records = read_records(out)
    problems = {p.id: p for p in load_dataset("gsm8k", data_dir).problems[:2]}
    assert sorted(keys(records)) == sorted(
        (p, a, b, 0) for p in problems for a in ("greedy", "best-of-n") for b in (1, 2)
    )
    from itscale.answers import extract_answer, is_equivalent

    for r in records:
        assert r["reference"] == problems[r["problem"]].answer
        assert r["correct"] == is_equivalent(r["answer"], r["reference"])
        if r["algorithm"] == "greedy":
            assert r["answer"] == extract_answer(r["text"])
        assert r["usage"]["completion_tokens"] > 0 and r["usage"]["total_tokens"] > r["usage"]["completion_tokens"]
    assert {r["sampled_from"] for r in records if r["algorithm"] == "best-of-n"} == {2}
    assert {r["sampled_from"] for r in records if r["algorithm"] == "greedy"} == {None}
    # Greedy ignores the budget: one run per problem, recorded at both budgets.
    greedy = {(r["problem"], r["budget"]): r for r in records if r["algorithm"] == "greedy"}
    for p in problems:
        once, twice = greedy[p, 1], greedy[p, 2]
        assert (once["text"], once["usage"], once["started"]) == (twice["text"], twice["usage"], twice["started"])


def test_the_same_command_again_computes_nothing(finished, capsys):
    out, command = finished
    before = (out / "results.jsonl").read_bytes()
    assert main(command) == 0
    assert "0 new records (8 from earlier runs)" in capsys.readouterr().out
    assert (out / "results.jsonl").read_bytes() == before
    assert len(json.loads((out / "config.json").read_text())["runs"]) >= 2


def test_other_settings_under_the_same_directory_are_refused(finished, capsys):
    out, command = finished
    before = (out / "results.jsonl").read_bytes()
    assert main([*command, "--temperature", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "settings.temperature: was 0.8, now 0.5" in err
    assert main([*command[:-6], "--max-tokens", "32", *command[-4:]]) == 2
    assert "settings.max_tokens: was 16, now 32" in capsys.readouterr().err
    assert main([*command, "--model", "qwen2.5-coder-0.5b"]) == 2
    assert "model.model" in capsys.readouterr().err
    assert (out / "results.jsonl").read_bytes() == before


def test_report_writes_table_json_and_readable_plots(finished, capsys):
    import matplotlib.image

    out, _ = finished
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best-of-n" in printed and "accuracy_vs_budget.png" in printed
    rows = json.loads((out / "report.json").read_text())["rows"]
    records = read_records(out)
    for row in rows:
        mine = [r for r in records if (r["algorithm"], r["budget"]) == (row["algorithm"], row["budget"])]
        assert row["problems"] == len(mine) == 2
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / 2)
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        right = [r["correct"] or any(is_equivalent(p["answer"], r["reference"]) for p in r["particles"]) for r in mine]
        assert row["any_correct"] == pytest.approx(sum(right) / 2) and row["any_correct"] >= row["accuracy"]
        assert row["mean_tokens"] == pytest.approx(sum(r["usage"]["total_tokens"] for r in mine) / 2)
        assert row["sampled_from"] == ([2] if row["algorithm"] == "best-of-n" else [])
    markdown = (out / "report.md").read_text()
    assert "| best-of-n | 1 |" in markdown and "reused from run of 2" in markdown and "own run" in markdown
    assert "Sample reuse: best-of-n" in markdown and "itscale eval --dataset gsm8k" in markdown
    for name in ("accuracy_vs_budget.png", "accuracy_vs_tokens.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 600 and image.shape[1] > 1000


def test_report_of_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no evaluation results" in capsys.readouterr().err


def test_a_larger_grid_adds_only_what_is_missing(finished, capsys):
    out, command = finished
    before = read_records(out)
    budgets = command.index("--budgets") + 1
    grown = [*command[:budgets], "1,2,3", *command[budgets + 1 :]]
    assert main(grown) == 0
    after = read_records(out)
    assert after[: len(before)] == before
    added = after[len(before) :]
    problems = sorted({r["problem"] for r in before})
    assert len(problems) == 2
    assert sorted(keys(added)) == sorted((p, a, 3, 0) for p in problems for a in ("greedy", "best-of-n"))
    assert all(r["sampled_from"] == 3 for r in added if r["algorithm"] == "best-of-n")


# ------------------------------------------------------------------ resume after a kill, Ctrl-C, a torn line


def eval_process(out: Path, limit: int = 3) -> subprocess.Popen:
    command = [sys.executable, "-m", "itscale.cli", *eval_command(out, "greedy,self-consistency", limit)]
    # Ctrl-C as in a terminal: a shell without job control (`make test &`, some CI runners)
    # starts children with SIGINT ignored, and Python then installs no KeyboardInterrupt.
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_lines(path: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if process.poll() is not None:
            pytest.fail(f"eval ended early: {process.stderr.read()}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no {n} records within {timeout} s")


def expected_keys(data_dir, limit=3) -> set[tuple]:
    problems = load_dataset("gsm8k", data_dir).problems[:limit]
    return {(p.id, a, b, 0) for p in problems for a in ("greedy", "self-consistency") for b in (1, 2)}


def test_a_killed_run_resumes_without_duplicates_or_losses(tmp_path, data_dir):
    results = tmp_path / "results.jsonl"
    process = eval_process(tmp_path)
    wait_for_lines(results, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = results.read_bytes()
    saved = saved[: saved.rfind(b"\n") + 1]
    assert 2 <= saved.count(b"\n") < 12

    again = eval_process(tmp_path)
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert results.read_bytes().startswith(saved)  # nothing written before the kill was lost
    records = read_records(tmp_path)
    assert len(records) == len(set(keys(records))) == 12
    assert set(keys(records)) == expected_keys(data_dir)


@pytest.mark.parametrize("stop, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "kill"])
def test_ctrl_c_or_kill_stops_cleanly_and_the_run_resumes(tmp_path, data_dir, stop, exit_code):
    results = tmp_path / "results.jsonl"
    process = eval_process(tmp_path, limit=6)  # long enough that the signal comes mid-run
    wait_for_lines(results, 1, process)
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == exit_code
    assert "run the same command to resume" in err and "Traceback" not in err and "interrupted" not in err
    data = results.read_bytes()
    assert data.endswith(b"\n")
    done = [json.loads(line) for line in data.splitlines()]  # every line complete
    assert 1 <= len(done) < 24

    again = eval_process(tmp_path, limit=6)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    records = read_records(tmp_path)
    assert records[: len(done)] == done
    assert len(records) == len(set(keys(records))) == 24 and set(keys(records)) == expected_keys(data_dir, 6)


def test_a_run_without_a_terminal_logs_a_line_per_finished_run(tmp_path, data_dir):
    command = [word for word in eval_command(tmp_path, "greedy", 2) if word != "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "itscale.cli", *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "/4 records, " in line]
    assert "greedy @ 1" not in done.stderr  # no bars drawn into a log
    problems = [p.id for p in load_dataset("gsm8k", data_dir).problems[:2]]
    # Greedy runs once per problem and is recorded at both budgets: a line each, in order.
    assert len(lines) == 2
    for line, problem, count in zip(lines, problems, (2, 4), strict=True):
        assert f" {problem} seed 0: greedy@1 " in line and ", greedy@2 " in line and f"| {count}/4 records" in line


def test_etas_come_from_the_schedule_and_what_each_kind_of_run_took(data_dir, capsys):
    plan = plan_for(data_dir, ["greedy", "particle-filter"], [1, 4], limit=2)
    units = plan.units({})
    runs = [(u.problem.id, u.algorithm, u.run_budget) for u in units]
    first, second = (p.id for p in plan.problems)
    assert runs == [
        (p, a, b) for p in (first, second) for a, b in (("greedy", 1), ("particle-filter", 1), ("particle-filter", 4))
    ]
    bars = EvalProgress(plan, {}, units)
    assert bars.eta() == "-"  # nothing timed yet
    clock = [0.0]
    saved = []

    def finish(problem: str, algorithm: str, seconds: float, *budgets: int) -> str:
        stamps = {"started": clock[0], "finished": clock[0] + seconds}
        clock[0] += seconds
        key = {"problem": problem, "algorithm": algorithm, "seed": 0, "correct": False, **stamps}
        records = [{**key, "budget": b} for b in budgets]
        saved.extend(records)
        bars.advance(records)
        return capsys.readouterr().err

    # Greedy took a minute: particle filtering, not seen yet, is a minute a particle, so the
    # 1 + 4 + 1 + 1 + 4 particles of runs left are 11 minutes; greedy's last run is 6 away.
    assert "| 2/8 records, ETA ~11m" in finish(first, "greedy", 60.0, 1, 4)
    assert (bars.eta(("greedy", 4)), bars.eta(("particle-filter", 1))) == ("6m", "7m")
    # Particle filtering at 1 took 48 s: 54 s a particle over what has run. Left: 4 x 54 +
    # 60 + 48 + 4 x 54 seconds.
    assert "| 3/8 records, ETA ~9m" in finish(first, "particle-filter", 48.0, 1)
    # At 4 it took 2 minutes, now known: 60 + 48 + 120 seconds left.
    assert "| 4/8 records, ETA ~4m" in finish(first, "particle-filter", 120.0, 4)

    # Resumed, the saved records tell every kind's cost before anything runs.
    done = {(r["problem"], r["algorithm"], r["budget"], r["seed"]): r for r in saved}
    resumed = EvalProgress(plan, done, plan.units(done))
    assert resumed.eta() == "4m" and resumed.eta(("greedy", 1)) == "1m"
    resumed.advance([{**r, "problem": second} for r in saved[:2]])  # greedy, second problem
    assert resumed.eta(("greedy", 1)) == "done" and resumed.eta() == "3m"


def test_a_kinds_cost_is_the_mean_of_its_recent_runs(data_dir):
    plan = plan_for(data_dir, ["greedy"], [1], limit=12)
    done = {}
    for i, problem in enumerate(plan.problems[:11]):
        took = 1000.0 if i == 0 else 60.0  # the first ran on a busy machine
        stamps = {"started": 1e4 * i, "finished": 1e4 * i + took}
        done[(problem.id, "greedy", 1, 0)] = {
            **{"problem": problem.id, "algorithm": "greedy", "budget": 1, "seed": 0, "correct": False},
            **stamps,
        }
    assert EvalProgress(plan, done, plan.units(done)).eta() == "1m"  # only the last 10 count
    del done[(plan.problems[10].id, "greedy", 1, 0)]
    assert EvalProgress(plan, done, plan.units(done)).eta() == "5m"  # 2 x (1000 + 9 x 60) / 10


def test_a_torn_last_line_is_redone(engine, data_dir, tmp_path):
    plan = plan_for(data_dir, ["greedy"], [1], limit=2)
    evaluate(plan, tmp_path, lm=engine, progress=False)
    results = tmp_path / "results.jsonl"
    complete = results.read_bytes()
    first_line_end = complete.index(b"\n") + 1
    results.write_bytes(complete[: first_line_end + 40])  # the second record cut mid-line
    summary = evaluate(plan, tmp_path, lm=engine, progress=False)
    assert summary.dropped_torn_line and summary.written == 1 and summary.already_done == 1
    records = read_records(tmp_path)
    assert len(records) == 2 and set(keys(records)) == {(p.id, "greedy", 1, 0) for p in plan.problems}
    assert results.read_bytes()[:first_line_end] == complete[:first_line_end]


# ------------------------------------------------------------------ concurrency: --workers, Ray


def overlapping(records: list[dict]) -> bool:
    spans = sorted({(r["started"], r["finished"]) for r in records})  # one per run (reuse: many records)
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


def test_workers_run_problems_at_once_against_a_server(llama_server, data_dir, tmp_path, capsys):
    command = eval_command(tmp_path, "greedy,self-consistency", 3, "--workers", "3", "--backend-url", llama_server)
    assert main(command) == 0, capsys.readouterr().err
    records = read_records(tmp_path)
    assert len(records) == len(set(keys(records))) == 12 and set(keys(records)) == expected_keys(data_dir)
    # Units ran concurrently: some run started before another one finished.
    assert overlapping(records)
    assert json.loads((tmp_path / "config.json").read_text())["identity"]["model"]["backend_url"] == llama_server


def test_ray_shards_problems_over_workers_with_their_own_engines(data_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        plan = plan_for(data_dir, ["greedy", "self-consistency"], [1, 2], limit=3)
        summary = evaluate(plan, tmp_path, executor="ray", progress=False)
    finally:
        ray.shutdown()
    records = read_records(tmp_path)
    assert summary.written == len(records) == len(set(keys(records))) == 12
    assert set(keys(records)) == expected_keys(data_dir)
    workers = {r["worker"] for r in records}
    assert len(workers) == 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert {r["threads"] for r in records} == {1}  # --ray-cpus 1: one thread each, not every core
    # A problem's units stay on one worker (its prompt is evaluated there once per run).
    by_problem = {}
    for r in records:
        by_problem.setdefault(r["problem"], set()).add(r["worker"])
    assert all(len(w) == 1 for w in by_problem.values())
