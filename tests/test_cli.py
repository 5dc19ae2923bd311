"""The command line, run as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import THREADS


def itscale(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itscale.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["solve", ""], "the problem is empty"),
        (["solve", "x", "--budget", "0"], "budget must be a positive integer"),
        (["solve", "x", "--budget", "abc"], "takes a number of particles (8) or auto:B"),
        (["solve", "x", "--algorithm", "foo"], "unknown algorithm 'foo'"),
        (["solve", "x", "--model", "nope"], "unknown model 'nope'"),
        (["solve", "x", "--option", "mode"], "--option takes name=value"),
        (["solve", "x", "--option", "mode=exact"], "unknown particle-filter mode"),
        (["solve", "x", "--reward", "nope", "--model", "smollm2-135m"], "unknown reward 'nope'"),
        (["solve", "x", "--delimiter", ""], "delimiter is empty"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args: list[str], message: str) -> None:
    done = itscale(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_unreachable_server_is_one_line_exit_1() -> None:
    done = itscale("solve", "What is 1+1?", "--algorithm", "greedy", "--backend-url", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert "cannot reach the server" in done.stderr and "Traceback" not in done.stderr


def test_models_lists_the_named_models() -> None:
    done = itscale("models")
    assert done.returncode == 0
    assert "qwen2.5-coder-0.5b" in done.stdout and "smollm2-135m" in done.stdout and "ready" in done.stdout


def test_solve_json_prints_the_whole_result() -> None:
    done = itscale(
        "solve", "What is 2 + 3?", "--model", "smollm2-135m", "--algorithm", "particle-filter", "--budget", "2",
        "--max-steps", "2", "--max-tokens", "48", "--reference", "5", "--json", "--n-threads", str(THREADS),
        "--reward", "llm-judge",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["algorithm"] == "particle-filter" and len(result["particles"]) == 2
    assert set(result["usage"]) >= {"prompt_tokens", "completion_tokens", "reward_tokens", "lm_calls", "seconds"}
    assert result["usage"]["reward_tokens"] > 0
    assert isinstance(result["matches"], bool) and result["reference"] == "5"
    assert sum(result["weights"]) == pytest.approx(1.0)
    assert all(len(p["steps"]) <= 2 for p in result["particles"])


@pytest.mark.slow
def test_demo_on_the_embedded_default_model() -> None:
    done = itscale("demo", "--budget", "2", "--max-tokens", "200", "--n-threads", str(THREADS))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "answer:" in out and "reference: 72" in out
    assert ("— matches" in out) != ("does not match" in out)  # exactly one verdict
    assert "final particles" in out and "usage:" in out and "tokens" in out
