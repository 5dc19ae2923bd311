"""The OpenAI-compatible backend against a real llama.cpp server, and against scripted HTTP
servers on 127.0.0.1 for what that server cannot show (errors, retries, vLLM fields)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from itscale.answers import has_boxed_answer
from itscale.errors import BackendError, UsageError
from itscale.lm.base import StepSettings
from itscale.lm.openai import OpenAIModel
from itscale.search import make_algorithm
from itscale.types import Prompt

PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"


async def test_greedy_search_through_a_real_server(llama_server: str) -> None:
    lm = OpenAIModel(llama_server, chat_template="smollm2-135m")
    requests = count_generation_requests(lm)
    try:
        result = await make_algorithm("greedy").run(lm, PROBLEM, max_steps=3, max_tokens=120, max_step_tokens=60)
    finally:
        await lm.close()
    particle = result.particles[0]
    assert 1 <= len(particle.steps) <= 3
    for step in particle.steps[:-1]:
        assert step.end in ("delimiter", "step_cap")
        if step.end == "delimiter":
            assert "\n\n" in step.text
    # One request for the whole rollout (greedy's particle never waits for another): the
    # prompt is sent once, not once a step.
    assert len(requests) == 1 and requests[0]["max_tokens"] == 120
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens == particle.tokens > 0
    assert lm.diagnostics["chat_template"] == "from smollm2-135m"
    assert lm.name.endswith(".gguf")  # learned from /v1/models


async def test_particle_filtering_with_the_default_reward_through_a_real_server(llama_server: str) -> None:
    """The default reward reads the generator's token log-probabilities: the backend asks
    the server for them, so no particle falls back to the fallback score."""
    from itscale.rewards.registry import DEFAULT_REWARD, make_reward

    lm = OpenAIModel(llama_server, chat_template="smollm2-135m")
    try:
        result = await make_algorithm("particle-filter").run(
            lm,
            PROBLEM,
            budget=2,
            seed=0,
            max_steps=2,
            max_tokens=60,
            max_step_tokens=30,
            reward=make_reward(DEFAULT_REWARD, lm),
        )
    finally:
        await lm.close()
    assert not result.diagnostics.get("reward_failures"), result.diagnostics
    steps = [s for p in result.particles for s in p.steps if s.tokens]
    assert steps and all(s.logprob is not None and s.logprob < 0 for s in steps)
    assert all(p.score is not None and 0 < p.score <= 1 for p in result.particles)


@pytest.mark.parametrize("reward, asked", [("arithmetic", False), ("arithmetic * self-certainty", True)])
async def test_token_logprobs_are_asked_for_only_when_the_reward_reads_them(
    llama_server: str, reward: str, asked: bool
) -> None:
    """llama-cpp-python's server decodes about ten times slower when it must return token
    log-probabilities (issue #27: 2.7 against 28 tokens/s), so a step is asked for them
    only when the reward reads them; token counts stay exact either way (from usage)."""
    from itscale.rewards.registry import make_reward

    lm = OpenAIModel(llama_server, chat_template="smollm2-135m")
    requests = count_generation_requests(lm)
    try:
        result = await make_algorithm("particle-filter").run(
            lm, PROBLEM, budget=2, seed=0, max_steps=2, max_tokens=40, max_step_tokens=20,
            reward=make_reward(reward, lm),
        )  # fmt: skip
    finally:
        await lm.close()
    assert requests and all(("logprobs" in r) is asked for r in requests)
    assert not result.diagnostics.get("reward_failures"), result.diagnostics
    steps = [s for p in result.particles for s in p.steps]
    assert result.usage.completion_tokens == sum(s.tokens for s in steps) > 0
    assert all((s.logprob is not None) is asked for s in steps if s.tokens)


async def test_n_is_detected_as_unsupported_and_worked_around(llama_server: str) -> None:
    lm = OpenAIModel(llama_server, chat_template="chatml")
    try:
        root = await lm.start(Prompt.of(PROBLEM))
        branches = [lm.fork(root) for _ in range(3)]
        settings = StepSettings(temperature=1.0, max_step_tokens=16)
        outs = await lm.extend(branches, settings, [1, 2, 3])
        assert len(outs) == 3 and all(o.tokens > 0 for o in outs)
        assert lm.supports_n is False  # llama_cpp.server returns one choice for n=3
        assert [b.steps[0] for b in branches] == [o.text for o in outs]
        # Seeded: the same seeds give the same continuations.
        again = [lm.fork(root) for _ in range(3)]
        assert [o.text for o in await lm.extend(again, settings, [1, 2, 3])] == [o.text for o in outs]
    finally:
        await lm.close()


def count_generation_requests(lm: OpenAIModel) -> list[dict]:
    """The payloads of the generation requests `lm` sends from now on."""
    payloads: list[dict] = []
    send = lm.request

    async def counting(method: str, path: str, payload: dict | None = None, under_v1: bool = True) -> dict:
        if path in ("/completions", "/chat/completions"):
            payloads.append(payload)
        return await send(method, path, payload, under_v1)

    lm.request = counting  # type: ignore[method-assign]
    return payloads


async def test_a_rollout_is_one_request_cut_into_steps_where_the_engine_would(llama_server: str) -> None:
    lm = OpenAIModel(llama_server, chat_template="smollm2-135m")
    greedy = StepSettings(temperature=0.0, max_step_tokens=12)
    never = lambda text: False  # noqa: E731
    try:
        root = await lm.start(Prompt.of(PROBLEM))
        # The server's own greedy continuation of the prompt, in one piece.
        whole = await lm.request(
            "POST",
            "/completions",
            {"model": lm.model, "prompt": root.prefix, "max_tokens": 90, "temperature": 0.0, "logprobs": 1},
        )
        tokens = whole["choices"][0]["logprobs"]["tokens"]
        requests = count_generation_requests(lm)
        [steps] = await lm.extend_to_end([root], greedy, [list(range(40))], [90], never)
        assert len(requests) == 1 and "stop" not in requests[0] and requests[0]["max_tokens"] == 90
        assert "".join(s.text for s in steps) == whole["choices"][0]["text"] == "".join(root.steps)
        assert sum(s.tokens for s in steps) == len(tokens) <= 90
        assert len(steps) > 1 and steps[0].prompt_tokens > 0
        for step in steps[:-1]:
            assert step.end in ("delimiter", "step_cap") and 0 < step.tokens <= 12
            assert ("\n\n" in step.text) == (step.end == "delimiter")
            assert step.logprob is not None and step.logprob <= 0
        assert steps[-1].end in ("eos", "step_cap")

        # Cut short by the stop rule or the step seeds: the dropped steps' tokens are
        # still counted (the server generated them), on the last step kept.
        [stopped] = await lm.extend_to_end([await lm.start(Prompt.of(PROBLEM))], greedy, [[0] * 40], [90], bool)
        assert len(stopped) == 1 and stopped[0].text == steps[0].text
        assert stopped[0].tokens == sum(s.tokens for s in steps)
        [two] = await lm.extend_to_end([await lm.start(Prompt.of(PROBLEM))], greedy, [[0, 1]], [90], never)
        assert [s.text for s in two] == [s.text for s in steps[:2]]
        assert two[1].tokens == sum(s.tokens for s in steps[1:])

        # Rollouts from the same text share a request with n (split per seed when the
        # server returns one choice); seeded, so the same seeds give the same rollouts.
        sampled = StepSettings(temperature=1.0, max_step_tokens=12)
        again = []
        for _ in range(2):
            forks = [lm.fork(root, steps=0) for _ in range(3)]
            again.append(await lm.extend_to_end(forks, sampled, [[1, 9], [2, 9], [3, 9]], [30] * 3, never))
        assert [[s.text for s in r] for r in again[0]] == [[s.text for s in r] for r in again[1]]
        assert all(sum(s.tokens for s in r) <= 30 for r in again[0])
    finally:
        await lm.close()


async def test_without_token_logprobs_rollouts_go_step_by_step(llama_server: str) -> None:
    lm = OpenAIModel(llama_server, chat_template="smollm2-135m", logprobs=False)
    requests = count_generation_requests(lm)
    try:
        root = await lm.start(Prompt.of(PROBLEM))
        settings = StepSettings(temperature=0.0, max_step_tokens=12)
        [steps] = await lm.extend_to_end([root], settings, [[0, 1, 2]], [60], lambda text: False)
    finally:
        await lm.close()
    assert 1 <= len(steps) == len(requests) <= 3 and all(r["stop"] == ["\n\n"] for r in requests)


def test_steps_are_cut_from_tokens_by_delimiter_cap_and_end() -> None:
    from itscale.lm.openai import _steps_from_tokens

    pieces = [("a", -0.5), (".\n\nB", -0.25), ("c", -1.0), ("d", -1.0), ("e", -2.0)]
    steps = _steps_from_tokens(pieces, StepSettings(max_step_tokens=2), "eos")
    assert [(s.text, s.tokens, s.end, s.logprob) for s in steps] == [
        ("a.\n\nB", 2, "delimiter", -0.75),  # the step keeps the whole token that ends it
        ("cd", 2, "step_cap", -2.0),
        ("e", 1, "eos", -2.0),
    ]
    # A delimiter at the very end of an answer that ended: the step ends the answer.
    assert [s.end for s in _steps_from_tokens(pieces[:2], StepSettings(), "eos")] == ["eos"]
    # The allowance ran out (finish "length"), and token-count steps.
    assert [s.end for s in _steps_from_tokens(pieces, StepSettings(delimiter=3), "step_cap")] == [
        "delimiter",
        "step_cap",
    ]
    assert [(s.text, s.end) for s in _steps_from_tokens([], StepSettings(), "eos")] == [("", "eos")]


# ---------------------------------------------------------------- scripted servers


@contextmanager
def scripted_server(respond: Callable[[str, dict | None], tuple[int, bytes]]) -> Iterator[tuple[str, list]]:
    """An HTTP server on 127.0.0.1 answering each request with respond(path, json_body)."""
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            seen.append((self.path, body))
            status, payload = respond(self.path, body)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def completion(text: str, finish: str = "stop", **extra: object) -> bytes:
    choice = {"text": text, "index": 0, "finish_reason": finish, **extra}
    return json.dumps({"choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}).encode()


async def extend_once(url: str, **options: object) -> str:
    lm = OpenAIModel(url, "m", chat_template="chatml", backoff=0.01, **options)
    try:
        root = await lm.start(Prompt.of("hi"))
        return (await lm.extend([root], StepSettings(), [0]))[0].text
    finally:
        await lm.close()


async def test_retries_on_5xx_and_429_then_succeeds() -> None:
    answers = iter([(500, b'{"error": "busy"}'), (429, b'{"error": "slow down"}'), (200, completion("ok"))])
    with scripted_server(lambda path, body: next(answers)) as (url, seen):
        assert await extend_once(url) == "ok\n\n"
    assert len(seen) == 3


async def test_gives_up_with_the_last_error_after_retries() -> None:
    overloaded = scripted_server(lambda path, body: (503, b'{"error": {"message": "overloaded"}}'))
    with overloaded as (url, seen), pytest.raises(BackendError, match=r"HTTP 503: overloaded .*after 3 attempts"):
        await extend_once(url, retries=2)
    assert len(seen) == 3


async def test_a_client_error_is_not_retried_and_says_what_the_server_said() -> None:
    refusing = scripted_server(lambda path, body: (400, b'{"error": {"message": "max_tokens too large"}}'))
    with refusing as (url, seen), pytest.raises(BackendError, match="HTTP 400: max_tokens too large"):
        await extend_once(url)
    assert len(seen) == 1


async def test_malformed_json_is_a_clear_error() -> None:
    html = scripted_server(lambda path, body: (200, b"<html>oops"))
    with html as (url, _), pytest.raises(BackendError, match="malformed JSON"):
        await extend_once(url)
    no_choices = scripted_server(lambda path, body: (200, b'{"id": 1}'))
    with no_choices as (url, _), pytest.raises(BackendError, match="no 'choices'"):
        await extend_once(url)


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with scripted_server(lambda path, body: (200, b"{}")) as (url, _):
        pass  # the server is gone: nothing listens on its port any more
    with pytest.raises(BackendError, match="cannot reach the server"):
        await extend_once(url)


def test_bad_urls_and_modes_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="must start with http"):
        OpenAIModel("localhost:8000")
    with pytest.raises(UsageError, match="unknown mode"):
        OpenAIModel("http://x", mode="rpc")  # type: ignore[arg-type]


async def test_chat_mode_continues_the_assistant_turn_with_vllm_fields() -> None:
    def vllm(path: str, body: dict | None) -> tuple[int, bytes]:
        assert path == "/v1/chat/completions"
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["messages"][-1]["role"] == "assistant"
        n = body["n"]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": f"step{i}"},
                "finish_reason": "stop",
                "stop_reason": "\n\n",
            }
            for i in range(n)
        ]
        return 200, json.dumps({"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 2 * n}}).encode()

    with scripted_server(vllm) as (url, seen):
        lm = OpenAIModel(url, "m", mode="chat")
        root = await lm.start(Prompt.of("hi"))
        branches = [lm.fork(root) for _ in range(3)]
        outs = await lm.extend(branches, StepSettings(), [4, 5, 6])
        # Identical particles share one request with n=3; the continuation keeps the turn.
        assert len(seen) == 1 and seen[0][1]["n"] == 3
        assert [o.text for o in outs] == ["step0\n\n", "step1\n\n", "step2\n\n"]
        assert lm.supports_n is True
        assert sum(o.tokens for o in outs) == 6 and sum(o.prompt_tokens for o in outs) == 7
        await lm.extend(branches[:1], StepSettings(), [1])
        assert seen[1][1]["messages"][-1] == {"role": "assistant", "content": "step0\n\n"}
        await lm.close()


async def test_a_rollout_from_a_server_without_token_logprobs_is_cut_at_the_delimiters() -> None:
    text = "Step one.\n\nStep two is longer.\n\nSo \\boxed{7}."
    payload = json.dumps(
        {"choices": [{"text": text, "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 20}}
    ).encode()
    with scripted_server(lambda path, body: (200, payload)) as (url, seen):
        lm = OpenAIModel(url, "m", chat_template="chatml")
        [steps] = await lm.extend_to_end([await lm.start(Prompt.of("hi"))], StepSettings(), [[0] * 5], [50], bool)
        await lm.close()
    assert len(seen) == 1 and seen[0][1]["max_tokens"] == 50 and seen[0][1]["logprobs"] == 1
    # The stop rule ends the rollout after its first step; every generated token is counted.
    assert [(s.text, s.tokens, s.end) for s in steps] == [("Step one.\n\n", 20, "delimiter")]
    assert steps[0].prompt_tokens == 9
    with scripted_server(lambda path, body: (200, payload)) as (url, seen):
        lm = OpenAIModel(url, "m", chat_template="chatml")
        [steps] = await lm.extend_to_end(
            [await lm.start(Prompt.of("hi"))], StepSettings(), [[0] * 5], [50], has_boxed_answer
        )
        await lm.close()
    assert [s.text for s in steps] == ["Step one.\n\n", "Step two is longer.\n\n", "So \\boxed{7}."]
    assert [s.end for s in steps] == ["delimiter", "delimiter", "eos"] and sum(s.tokens for s in steps) == 20
    assert steps[0].tokens < steps[1].tokens  # shared by text length


async def test_token_texts_that_do_not_spell_the_text_leave_the_text_intact() -> None:
    # A character split across two tokens: each token's text alone is a replacement mark.
    tokens = ["Step", " ", "\ufffd", "\ufffd", ".\n\n", "Done", "."]
    choice = {"text": "Step é.\n\nDone.", "finish_reason": "stop"}
    choice["logprobs"] = {"tokens": tokens, "token_logprobs": [-1.0] * 7}
    payload = json.dumps({"choices": [choice], "usage": {"prompt_tokens": 9, "completion_tokens": 7}}).encode()
    with scripted_server(lambda path, body: (200, payload)) as (url, _):
        lm = OpenAIModel(url, "m", chat_template="chatml")
        root = await lm.start(Prompt.of("hi"))
        [steps] = await lm.extend_to_end([root], StepSettings(), [[0] * 5], [50], lambda text: False)
        await lm.close()
    assert [(s.text, s.end) for s in steps] == [("Step é.\n\n", "delimiter"), ("Done.", "eos")]
    assert [s.tokens for s in steps] == [5, 2] and [s.logprob for s in steps] == [-5.0, -2.0]


async def test_stop_reason_distinguishes_the_delimiter_from_end_of_turn() -> None:
    answers = iter(
        [(200, completion("The answer is 7.", stop_reason=None)), (200, completion("x", stop_reason="\n\n"))]
    )
    with scripted_server(lambda path, body: next(answers)) as (url, _):
        lm = OpenAIModel(url, "m", chat_template="chatml")
        root = await lm.start(Prompt.of("hi"))
        [eos] = await lm.extend([root], StepSettings(), [0])
        assert (eos.text, eos.end) == ("The answer is 7.", "eos")
        [step] = await lm.extend([lm.fork(root, steps=0)], StepSettings(), [0])
        assert (step.text, step.end) == ("x\n\n", "delimiter")
        await lm.close()


# ---------------------------------------------------------------- why a step stopped


async def test_an_answer_that_ends_its_turn_is_not_taken_for_a_step(llama_server: str) -> None:
    """llama.cpp's server says finish_reason "stop" both at the stop string and at end of
    turn; the generated tokens (which include a stop string the text leaves out) tell them
    apart, so an answer that ended is not given a delimiter and extended again."""
    lm = OpenAIModel(llama_server, chat_template="smollm2-135m")
    greedy = StepSettings(temperature=0.0, max_step_tokens=80)
    try:
        answer = await lm.start(Prompt.of("What is 2 + 2?"))
        [out] = await lm.extend([answer], greedy, [0])
        assert (out.end, answer.finished) == ("eos", True) and not out.text.endswith("\n\n")
        two_steps = await lm.start(Prompt.of("Reply with the word yes."))
        first = (await lm.extend([two_steps], greedy, [0]))[0]
        second = (await lm.extend([two_steps], greedy, [0]))[0]
    finally:
        await lm.close()
    assert first.end == "delimiter" and first.text.endswith("\n\n")  # a real stop at the delimiter
    assert second.end == "eos" and second.text
    assert not lm.warnings


async def test_a_server_that_does_not_say_why_it_stopped_is_named_in_the_result(llama_server: str) -> None:
    """Without token log-probabilities nothing tells the two stops apart: the step is taken
    as delimited (the model may then go on where its answer had ended), and the result says
    so instead of hiding it."""
    lm = OpenAIModel(llama_server, chat_template="smollm2-135m", logprobs=False)
    try:
        result = await make_algorithm("greedy").run(
            lm, "What is 2 + 2?", max_tokens=120, max_step_tokens=80, temperature=0.0
        )
    finally:
        await lm.close()
    assert result.particles[0].steps[0].end == "delimiter"  # it was the end of the turn (see above)
    assert any("does not say whether a step stopped" in w for w in result.diagnostics["warnings"])


@pytest.mark.parametrize(
    ("extra", "end"),
    [
        ({"matched_stop": "\n\n"}, "delimiter"),  # SGLang
        ({"matched_stop": None}, "eos"),
        ({"stop_reason": 151645}, "eos"),  # vLLM: a stop token id is not the delimiter
    ],
)
async def test_what_vllm_and_sglang_say_decides_the_end(extra: dict, end: str) -> None:
    with scripted_server(lambda path, body: (200, completion("Step", **extra))) as (url, _):
        lm = OpenAIModel(url, "m", chat_template="chatml")
        [out] = await lm.extend([await lm.start(Prompt.of("hi"))], StepSettings(), [0])
        await lm.close()
    assert out.end == end and out.text == ("Step\n\n" if end == "delimiter" else "Step")


# ---------------------------------------------------------------- the chat template


def vllm_like(rendered: list, bare: bool = False):
    """A vLLM-shaped server: no /props; /tokenize renders chats with its own template (here
    a made-up one), /detokenize turns tokens back into text; /v1/completions answers."""

    def respond(path: str, body: dict | None) -> tuple[int, bytes]:
        if path == "/tokenize" and not bare:
            text = "".join(f"[{m['role']}]{m['content']}" for m in body["messages"])
            text += "[assistant]" if body["add_generation_prompt"] else ""
            rendered.append(text)
            return 200, json.dumps({"tokens": [ord(c) for c in text], "count": len(text)}).encode()
        if path == "/detokenize" and not bare:
            return 200, json.dumps({"prompt": "".join(chr(t) for t in body["tokens"])}).encode()
        if path == "/v1/completions":
            return 200, completion("The answer is \\boxed{4}.", stop_reason=None)
        return 404, b'{"error": {"message": "not found"}}'

    return respond


async def test_a_server_without_props_renders_the_chat_itself() -> None:
    rendered: list = []
    with scripted_server(vllm_like(rendered)) as (url, seen):
        lm = OpenAIModel(url, "m")
        try:
            result = await make_algorithm("greedy").run(lm, "What is 2 + 2?")
        finally:
            await lm.close()
    prompt = next(body["prompt"] for path, body in seen if path == "/v1/completions")
    assert prompt.startswith("[system]") and prompt.endswith("[user]What is 2 + 2?[assistant]")
    assert result.diagnostics["backend"]["chat_template"].startswith("rendered by the server")
    assert "warnings" not in result.diagnostics


async def test_an_assumed_chatml_template_is_said_in_every_result_and_on_the_command_line(capsys) -> None:
    from itscale.cli import main

    with scripted_server(vllm_like([], bare=True)) as (url, seen):
        lm = OpenAIModel(url, "m")
        try:
            result = await make_algorithm("greedy").run(lm, "What is 2 + 2?")
        finally:
            await lm.close()
        assert "<|im_start|>user\nWhat is 2 + 2?" in next(b["prompt"] for p, b in seen if p == "/v1/completions")
        assert any("rendered as ChatML" in w for w in result.diagnostics["warnings"])
        code = await asyncio.to_thread(
            main, ["solve", "What is 2 + 2?", "--algorithm", "greedy", "--backend-url", url, "--backend-model", "m"]
        )
    assert code == 0
    assert "warning:" in capsys.readouterr().err


def test_a_client_is_closed_with_its_event_loop_when_a_new_loop_takes_over() -> None:
    """Each `asyncio.run` has its own event loop, and a client's connections belong to the
    loop that made them: a backend used from a new loop makes a new client, and the old one
    has been closed by its loop as that loop ended, without anyone calling close()."""
    with scripted_server(lambda path, body: (200, completion("ok"))) as (url, seen):
        lm = OpenAIModel(url, "m", chat_template="chatml")
        clients = []

        async def one_step() -> None:
            await lm.extend([await lm.start(Prompt.of("hi"))], StepSettings(), [0])
            clients.append(lm._client)

        asyncio.run(one_step())
        assert clients[0].is_closed
        asyncio.run(one_step())
        assert clients[1] is not clients[0] and clients[1].is_closed
        asyncio.run(lm.close())
    assert len([p for p, _ in seen if p == "/v1/completions"]) == 2
