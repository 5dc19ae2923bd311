"""`itscale serve`, run as users run it: a real server process on 127.0.0.1 with SmolLM2,
driven by the official `openai` client (sync and async, streaming and not), by raw HTTP
for the errors, by 32 concurrent clients, by a property-based fuzz of request bodies, and
in front of a real llama-cpp-python server (proxy mode)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import THREADS, free_port

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install openai")

KEY = "test-key-123"
SMALL = {"max_tokens": 24, "max_step_tokens": 12}
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


class Served:
    def __init__(self, process: subprocess.Popen, url: str, log_path: str):
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


def serve(tmp_path, *args: str, name: str = "server") -> Served:
    port = free_port()
    log_path = str(tmp_path / f"{name}.log")
    log = open(log_path, "w")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(
        [sys.executable, "-m", "itscale.cli", "serve", "--port", str(port), "--n-threads", str(THREADS), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"itscale serve exited during start-up:\n{Path(log_path).read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Served(process, url, log_path)
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    pytest.fail("itscale serve did not start within 120 s")


def stop(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            served.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Served]:
    served = serve(
        tmp_path_factory.mktemp("serve"), "--model", "smollm2-135m", "--api-key", KEY, "--budget", "2",
        "--max-budget", "8", "--max-tokens", "24", "--max-step-tokens", "12", "--max-concurrency", "8",
        "--max-queue", "64", "--max-body-bytes", "65536", "--n-ctx", "2048",
    )  # fmt: skip
    yield served
    stop(served)


@pytest.fixture
def client(server: Served):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as c:
        yield c


def raw(
    server: Served, body: object, path: str = "/v1/chat/completions", key: str | None = KEY, **kw
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=300, **kw)


# ------------------------------------------------------------------ the official client


def test_chat_completion_with_the_official_client(client) -> None:
    response = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24)
    assert response.object == "chat.completion" and response.model == "smollm2-135m"
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage.model_dump()
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] + usage["reward_tokens"]
    extension = response.model_extra["itscale"]
    assert extension["algorithm"] == "particle-filter" and extension["budget"] == 2
    assert len(extension["particles"]) == 2 and abs(sum(p["weight"] for p in extension["particles"]) - 1) < 1e-6
    assert extension["calls"]["lm"] > 0 and extension["seconds"] > 0 and "trace" not in extension


def test_search_settings_come_through_extra_body_with_their_own_names(client) -> None:
    response = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,
        max_tokens=24,
        seed=5,
        extra_body={
            "algorithm": "particle-filter",
            "budget": 4,
            "max_steps": 2,
            "reward": "arithmetic",
            "options": {"mode": "sound", "resampling": "stratified"},
            "trace": True,
        },
    )
    extension = response.model_extra["itscale"]
    assert extension["budget"] == 4 and extension["reward"] == "arithmetic" and len(extension["particles"]) == 4
    assert all(p["tokens"] <= 24 for p in extension["particles"])
    trace = extension["trace"]
    assert trace["format"] == "itscale-trace" and trace["settings"]["mode"] == "sound"
    assert 1 <= len(trace["columns"]) <= 2  # max_steps
    again = client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=24, seed=5,
        extra_body={"algorithm": "particle-filter", "budget": 4, "max_steps": 2, "reward": "arithmetic",
                    "options": {"mode": "sound", "resampling": "stratified"}},
    )  # fmt: skip
    assert again.choices[0].message.content == response.choices[0].message.content  # same seed, same answer


def test_the_model_name_form_chooses_the_algorithm_and_budget(client) -> None:
    response = client.chat.completions.create(model="best-of-n-3:smollm2-135m", messages=QUESTION, max_tokens=24)
    extension = response.model_extra["itscale"]
    assert extension["algorithm"] == "best-of-n" and extension["budget"] == 3
    assert response.model == "best-of-n-3:smollm2-135m"
    listed = [m.id for m in client.models.list()]
    assert "smollm2-135m" in listed and "particle-filter:smollm2-135m" in listed


def test_n_returns_distinct_answers_best_first(client) -> None:
    response = client.chat.completions.create(
        model="self-consistency-6:smollm2-135m", messages=QUESTION, max_tokens=24, n=3, temperature=1.2
    )
    choices = response.choices
    assert 1 <= len(choices) <= 3 and [c.index for c in choices] == list(range(len(choices)))
    answers = [p["answer"] for p in response.model_extra["itscale"]["particles"]]
    assert choices[0].message.content  # the algorithm's own choice first
    texts = [c.message.content for c in choices]
    assert len(set(texts)) == len(texts)
    assert len(choices) <= len({a for a in answers if a is not None}) or len(choices) == 1


def test_completions_endpoint(client) -> None:
    response = client.completions.create(model="greedy:smollm2-135m", prompt="What is 2 + 3?", max_tokens=24)
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage.completion_tokens > 0


def test_streaming_sends_progress_then_the_answer_then_usage(client, server: Served) -> None:
    stream = client.chat.completions.create(
        model="particle-filter-4:smollm2-135m", messages=QUESTION, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, seed=3,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # the usage chunk comes last
    whole = client.chat.completions.create(
        model="particle-filter-4:smollm2-135m", messages=QUESTION, max_tokens=24, seed=3
    )
    assert text == whole.choices[0].message.content  # the same search, streamed
    # Raw SSE: progress comments while the search runs, and [DONE] at the end.
    body = {"model": "particle-filter-4:smollm2-135m", "messages": QUESTION, "max_tokens": 24, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}, timeout=300) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    assert any(line.startswith(": progress") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_a_single_rollout_streams_its_tokens_as_they_are_generated(client) -> None:
    started = time.perf_counter()
    arrivals = []
    stream = client.chat.completions.create(model="greedy:smollm2-135m", messages=QUESTION, max_tokens=24, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 5  # token by token, not one block at the end
    assert arrivals[0] < arrivals[-1]


async def test_the_async_client_and_concurrent_requests(server: Served) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as client:
        responses = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="best-of-n-2:smollm2-135m", messages=QUESTION, max_tokens=24, seed=i
                )
                for i in range(4)
            )
        )
        assert all(r.choices[0].message.content for r in responses)
        stream = await client.chat.completions.create(
            model="smollm2-135m", messages=QUESTION, max_tokens=24, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text


def test_metrics_and_request_ids(server: Served) -> None:
    response = raw(server, {"model": "greedy:smollm2-135m", "messages": QUESTION, "max_tokens": 8})
    request_id = response.headers["x-request-id"]
    assert response.status_code == 200 and request_id in server.log()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'itscale_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert 'itscale_tokens_total{kind="generated"}' in metrics and "itscale_queue_depth" in metrics
    assert "itscale_live_particles" in metrics and "itscale_request_seconds_bucket" in metrics


# ------------------------------------------------------------------ errors, each


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "smollm2-135m", "messages": QUESTION, "algorithm": "magic"}, "algorithm", "unknown algorithm"),
        ({"model": "smollm2-135m", "messages": QUESTION, "reward": "vibes"}, "reward", "unknown reward"),
        ({"model": "smollm2-135m", "messages": QUESTION, "budget": 9}, "budget", "between 1 and 8"),
        ({"model": "smollm2-135m", "messages": QUESTION, "budget": 0}, "budget", "between 1 and 8"),
        ({"model": "smollm2-135m", "messages": QUESTION, "budget": "4"}, "budget", "must be an integer"),
        ({"model": "smollm2-135m", "messages": QUESTION, "budget": "auto:x"}, "budget", "or auto:B, a mean budget"),
        (
            {"model": "smollm2-135m", "messages": QUESTION, "budget": "auto:4", "algorithm": "best-of-n"},
            "budget",
            "compute-optimal algorithm at a mean budget",
        ),
        ({"model": "smollm2-135m", "messages": QUESTION, "budget": "auto:9"}, "budget", "between 1 and 8"),
        (
            {"model": "self-consistency:smollm2-135m", "messages": QUESTION, "reward": "arithmetic"},
            "reward",
            "self-consistency uses no reward",
        ),
        (
            {"model": "smollm2-135m", "messages": QUESTION, "budget": "auto:4", "reward": "probe"},
            "reward",
            "compute-optimal uses no reward",
        ),
        ({"model": "smollm2-135m", "messages": QUESTION, "temperature": "hot"}, "temperature", "must be a number"),
        ({"model": "smollm2-135m", "messages": []}, "messages", "non-empty list"),
        ({"model": "smollm2-135m", "messages": [{"role": "user"}]}, "messages[0].content", "string or a list"),
        ({"model": "smollm2-135m", "messages": "hi"}, "messages", "non-empty list"),
        (
            {"model": "smollm2-135m", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
            "not supported",
        ),
        ({"model": "smollm2-135m", "messages": [{"role": "assistant", "content": "x"}]}, "messages", "the user's"),
        ({"model": "smollm2-135m", "messages": QUESTION, "n": 3}, "n", "between 1 and the budget"),
        ({"model": "smollm2-135m", "messages": QUESTION, "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"model": "smollm2-135m", "messages": QUESTION, "budgte": 4}, "budgte", "unknown field"),
        ({"model": "smollm2-135m", "messages": QUESTION, "max_steps": 0}, "max_steps", "max_steps must be"),
        ({"messages": QUESTION}, "model", "'model' is required"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "7 " * 2000}]}, "messages", "context"),
    ],
)
def test_every_bad_field_is_a_400_naming_it(server: Served, body: dict, param: str, message: str) -> None:
    response = raw(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"], error


def test_an_auto_budget_is_compute_optimal_and_needs_a_policy(server: Served) -> None:
    """budget "auto:B" runs compute-optimal at mean budget B; a model without a budget policy
    gets a 400 that says how to make one, before anything is generated."""
    response = raw(server, {"model": "smollm2-135m", "messages": QUESTION, "budget": "auto:4"})
    assert response.status_code == 400, response.text
    assert "no budget policy is shipped for smollm2-135m" in response.json()["error"]["message"]


def test_malformed_json_and_oversized_bodies(server: Served) -> None:
    assert raw(server, b"{not json").status_code == 400
    big = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * 70000}]}
    response = raw(server, big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_the_api_key_is_required_and_checked(server: Served) -> None:
    body = {"model": "smollm2-135m", "messages": QUESTION}
    for key in (None, "wrong-key"):
        response = raw(server, body, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key


def test_an_unknown_model_is_a_404(server: Served) -> None:
    response = raw(server, {"model": "gpt-5", "messages": QUESTION})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert raw(server, {"model": "beam-me-up:smollm2-135m", "messages": QUESTION}).status_code == 404


def test_a_full_server_answers_429_with_retry_after(tmp_path) -> None:
    served = serve(
        tmp_path, "--model", "smollm2-135m", "--max-concurrency", "1", "--max-queue", "0", "--max-tokens", "200",
        "--max-step-tokens", "100", name="full",
    )  # fmt: skip
    try:
        body = {"model": "best-of-n-2:smollm2-135m", "messages": QUESTION, "max_tokens": 200}
        slow = threading.Thread(target=lambda: raw(served, body, key=None))
        slow.start()
        deadline = time.time() + 30
        while served.health()["running"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        response = raw(served, body, key=None)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
        slow.join()
    finally:
        stop(served)


def test_sigterm_finishes_running_searches_then_exits_cleanly(tmp_path) -> None:
    served = serve(tmp_path, "--model", "smollm2-135m", "--shutdown-timeout", "60", name="sigterm")
    results: list[httpx.Response] = []
    body = {"model": "best-of-n-4:smollm2-135m", "messages": QUESTION, "max_tokens": 120, "max_step_tokens": 60}
    worker = threading.Thread(target=lambda: results.append(raw(served, body, key=None)))
    worker.start()
    deadline = time.time() + 30
    while served.health()["running"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    served.process.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert served.process.wait(timeout=120) == 0
    assert results and results[0].status_code == 200  # the running search was finished, not dropped
    with pytest.raises(httpx.ConnectError):  # and nothing is accepted after
        httpx.get(served.url + "/health", timeout=2)
    assert "Traceback" not in served.log()


# ------------------------------------------------------------------ upstream failures (proxy mode)


class _Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that fails (HTTP 500) or hangs."""

    mode = "fail"

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "up", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.mode == "hang":
            time.sleep(30)
        self._send(500, {"error": {"message": "upstream exploded"}})

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("mode", "status", "timeout"), [("fail", 502, "60"), ("hang", 504, "3")])
def test_upstream_failures_are_502_and_504(tmp_path, mode: str, status: int, timeout: str) -> None:
    handler = type("Handler", (_Upstream,), {"mode": mode})
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    served = serve(
        tmp_path, "--backend-url", f"http://127.0.0.1:{upstream.server_address[1]}", "--chat-template", "chatml",
        "--request-timeout", timeout, name=mode,
    )  # fmt: skip
    try:
        response = raw(served, {"model": "greedy:up", "messages": QUESTION}, key=None)
        assert response.status_code == status, response.text
        assert "Traceback" not in response.text and response.json()["error"]["type"] in ("upstream_error", "timeout")
    finally:
        stop(served)
        upstream.shutdown()


def test_proxy_mode_in_front_of_a_real_llama_cpp_server(llama_server, tmp_path) -> None:
    served = serve(tmp_path, "--backend-url", llama_server, "--chat-template", "smollm2-135m", name="proxy")
    try:
        with openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
            model = next(m.id for m in client.models.list() if ":" not in m.id)
            assert model.endswith(".gguf")  # the upstream's own model name
            response = client.chat.completions.create(
                model=f"particle-filter-2:{model}", messages=QUESTION, max_tokens=24,
                extra_body={"max_step_tokens": 12, "reward": "arithmetic"},
            )  # fmt: skip
        assert response.choices[0].message.content and response.usage.completion_tokens > 0
        assert response.model_extra["itscale"]["diagnostics"]["backend"]["chat_template"] == "from smollm2-135m"
    finally:
        stop(served)


# ------------------------------------------------------------------ load


def test_32_concurrent_clients_some_streaming_some_cancelled(server: Served) -> None:
    """Mixed algorithms, a third streaming, some cancelled midway: every other request is
    answered, the engine's KV sequences are all given back, and nothing is logged as an
    error."""
    algorithms = ["particle-filter-2", "best-of-n-2", "greedy", "beam-search-2", "particle-filter-sound-3", "dvts-2"]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": f"{algorithms[i % len(algorithms)]}:smollm2-135m", "messages": QUESTION, **SMALL, "seed": i}
        if i % 8 == 7:  # cancelled midway: the client gives up
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json={**body, "max_tokens": 64}, timeout=0.8)
            return "cancelled"
        if i % 3 == 0:
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and '"finish_reason": "' in "".join(lines)
            return "streamed"
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] is not None
        return "answered"

    async def everyone() -> list[str]:
        headers = {"authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    outcomes = asyncio.run(everyone())
    assert outcomes.count("cancelled") == 4 and outcomes.count("streamed") + outcomes.count("answered") == 28
    deadline = time.time() + 30
    while (server.health()["running"] or server.health()["kv_sequences"]) and time.time() < deadline:
        time.sleep(0.2)
    health = server.health()
    assert health["running"] == 0 and health["queued"] == 0 and health["kv_sequences"] == 0
    log = server.log()
    assert " ERROR " not in log and "Traceback" not in log


# ------------------------------------------------------------------ fuzz


def test_no_request_body_gets_a_5xx(smol) -> None:
    """Hypothesis throws request bodies at the app (in process, on the real engine): valid
    ones are answered, bad ones get a 4xx; nothing gets a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from itscale.search.settings import SearchSettings
    from itscale.server.app import Limits, Server, create_app
    from itscale.server.requests import Defaults

    defaults = Defaults(
        "smollm2-135m", settings=SearchSettings(budget=2, max_tokens=8, max_step_tokens=8), max_budget=4
    )
    app = create_app(Server(smol, None, defaults, Limits(max_body_bytes=4096)))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True), st.text(max_size=12))

    def containers(inner):
        return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)

    values = st.recursive(scalars, containers, max_leaves=6)
    roles = st.sampled_from(["user", "system", "assistant", "tool", 3])
    messages = st.lists(st.fixed_dictionaries({"role": roles, "content": values}), max_size=3)
    fields = {
        "model": st.sampled_from(["smollm2-135m", "greedy:smollm2-135m", "best-of-n-2:smollm2-135m", "x", 7]),
        "messages": messages | values,
        "max_tokens": st.integers(-2, 8) | values,
        "budget": st.integers(-1, 6) | values,
        "n": st.integers(-1, 3),
        "temperature": st.floats(-1, 3) | st.just(float("nan")) | values,
        "stream": st.booleans() | values,
        "stop": values,
        "algorithm": st.sampled_from(["greedy", "best-of-n", "particle-filter", "nope"]) | values,
        "reward": st.sampled_from(["arithmetic", "self-certainty", "x * y", "probe"]) | values,
        "delimiter": values,
        "options": values,
        "max_steps": st.integers(-1, 3) | values,
    }
    bodies = st.fixed_dictionaries({}, optional=fields) | values

    async def post(body: object) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/chat/completions", content=json.dumps(body, default=str))
            if response.status_code < 500 and body and isinstance(body, dict) and body.get("stream") is True:
                await response.aread()
            return response.status_code

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body: object) -> None:
        status = asyncio.run(post(body))
        assert status < 500, (status, body)

    check()
    assert smol.cached_branches == 0


def test_the_serve_command_checks_its_flags_before_loading_anything(tmp_path) -> None:
    for args, message in (
        (["--algorithm", "magic"], "unknown algorithm"),
        (["--budget", "100"], "above --max-budget"),
        (["--reward", "vibes"], "unknown reward"),
        (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
        (["--budget", "auto:4", "--algorithm", "best-of-n"], "per problem, not best-of-n"),
        (["--budget", "auto:4"], "no budget policy is shipped for smollm2-135m"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "itscale.cli", "serve", "--model", "smollm2-135m", *args],
            capture_output=True, text=True, timeout=60, env={**os.environ},
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
