"""Shared fixtures: real models, a real llama.cpp HTTP server, the benchmark data.

Models are loaded once per session. SmolLM2-135M is the plumbing model (fast); tests that
need the Qwen model are few and marked `slow`.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from itscale.lm.models import model_path

REPO = Path(__file__).resolve().parents[1]
# llama.cpp threads spin while they wait: on a machine shared with other model processes,
# ITSCALE_TEST_THREADS=1 keeps the tests from slowing each other down.
THREADS = int(os.environ.get("ITSCALE_TEST_THREADS", "2"))
SHARED_DATA = REPO.parent / "shared" / "data"


@functools.cache
def any_generator_policy() -> str:
    """A compute-optimal budget policy that names no GGUF sha256, so any model takes it:
    first batch 2, budgets 2 and 4, more samples help at every level (it allots 4 to all)."""
    from itscale.search.allocation import BudgetPolicy

    path = Path(tempfile.mkdtemp(prefix="itscale-policy-")) / "policy.json"
    accuracy = [[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]]
    BudgetPolicy({"name": "any"}, 2, [("vote", 2), ("vote", 4)], [1 / 3] * 3, accuracy).save(path)
    return str(path)


def make_test_algorithm(name: str, **options):
    """`make_algorithm`, with a budget policy for compute-optimal (no model ships one for tests)."""
    from itscale.search import make_algorithm

    if name == "compute-optimal":
        options.setdefault("policy", any_generator_policy())
    return make_algorithm(name, **options)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "gsm8k_test.jsonl").exists():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}: tests expect ../shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M in the embedded engine, shared by the session."""
    from itscale.lm.llamacpp import LlamaCppModel

    model = LlamaCppModel("smollm2-135m", n_ctx=8192, n_seq_max=64, n_threads=THREADS)
    yield model
    model.shutdown()


@pytest.fixture(scope="session")
def smol_per_sequence():
    """SmolLM2-135M with a KV buffer per sequence (forks copy cells instead of sharing)."""
    from itscale.lm.llamacpp import LlamaCppModel

    model = LlamaCppModel("smollm2-135m", n_seq_max=16, kv_layout="per-sequence", seq_ctx=1024, n_threads=THREADS)
    yield model
    model.shutdown()


@pytest.fixture(autouse=True)
def shared_engines_are_given_back(request):
    """Every test that uses a session engine must release every branch it made: a leaked
    branch holds KV cells and would make later tests (and long runs) fail far from the
    cause. Checked after each such test, so the failure names the test that leaked."""
    yield
    for name in ("smol", "qwen", "smol_per_sequence"):
        if name in request.fixturenames:
            engine = request.getfixturevalue(name)
            assert engine.cached_branches == 0, (
                f"{request.node.nodeid} left {engine.cached_branches} branches on {name}"
            )


@pytest.fixture(scope="session")
def qwen():
    from itscale.lm.llamacpp import LlamaCppModel

    model = LlamaCppModel("qwen2.5-coder-0.5b", n_ctx=8192, n_seq_max=64, n_threads=THREADS)
    yield model
    model.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server():
    """`python -m llama_cpp.server` with SmolLM2-135M on 127.0.0.1; yields its base URL."""
    port = free_port()
    log = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path("smollm2-135m")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--n_threads",
            str(THREADS),
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail("llama_cpp.server exited during start-up")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("llama_cpp.server did not start within 120 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
