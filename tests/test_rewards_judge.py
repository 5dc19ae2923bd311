"""LLM judges: the embedded judge on KV forks and from text, and the remote judge against a
real llama.cpp server (`llama_server`), with and without log-probabilities."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from itscale.lm.base import StepSettings
from itscale.lm.chat import MATH_SYSTEM_PROMPT
from itscale.lm.openai import OpenAIModel
from itscale.rewards.base import ScoreRequest
from itscale.rewards.judge import LLMJudge
from itscale.rewards.registry import make_reward
from itscale.rewards.remote_judge import FALLBACK_NOTE, RemoteJudge, parse_rating, yes_no_probability
from itscale.search import make_algorithm
from itscale.types import Prompt

PROMPT = Prompt.of("What is 12 * 7?", system=MATH_SYSTEM_PROMPT)
STEPS = ("12 * 7 = 84\n\n", "So the answer is \\boxed{84}.")


async def generated_branches(model, n=4, steps=3):
    """Branches with real generated steps (the KV cache holds the generated tokens)."""
    root = await model.start(PROMPT)
    branches = [model.fork(root) for _ in range(n)]
    model.release(root)
    settings = StepSettings(max_step_tokens=10)
    for step in range(steps):
        live = [b for b in branches if not b.finished]
        if live:
            await model.extend(live, settings, [100 * step + i for i in range(len(live))])
    return branches


# ------------------------------------------------------------------ embedded judge


async def test_kv_fork_scoring_equals_scoring_from_text(smol):
    """The same tokens judged on a fork of the particle's KV cache and evaluated from text
    give the same probability, up to llama.cpp's numerics: the fork's cells were computed
    one token per decode during generation, the text's in one chunk, and the quantized
    kernels for one row and for many round differently (a few hundredths in P(Yes), as
    between two batch layouts or two places in the cache)."""
    branches = await generated_branches(smol, n=3, steps=2)
    differences = []
    try:
        for branch in branches:
            for k in range(1, len(branch.steps) + 1):
                fork = smol.fork(branch, steps=k)
                generated = fork.tokens[fork.prompt_len :]
                if generated != smol.tokenize("".join(branch.steps[:k]), special=False):
                    smol.release(fork)
                    continue  # text re-tokenised differently from what was generated
                on_fork = (await LLMJudge(smol).score([ScoreRequest(PROMPT, tuple(branch.steps[:k]), fork)])).values
                smol.release(fork)
                from_text = (await LLMJudge(smol).score([ScoreRequest(PROMPT, tuple(branch.steps[:k]))])).values
                differences.append(abs(on_fork[0] - from_text[0]))
    finally:
        for b in branches:
            smol.release(b)
    print("P(Yes) differences", differences)
    assert len(differences) >= 2
    assert max(differences) < 0.1 and sum(differences) / len(differences) < 0.05


async def test_kv_fork_scoring_costs_only_the_question(smol):
    branches = await generated_branches(smol, n=2, steps=2)
    judge = LLMJudge(smol)
    try:
        requests = [ScoreRequest(PROMPT, tuple(b.steps), b) for b in branches]
        scores = await judge.score(requests)
    finally:
        for b in branches:
            smol.release(b)
    question = len(judge._suffix[False])
    # each branch's pending last token plus the question, nothing of the particle's text
    assert scores.tokens <= len(branches) * (question + 1)
    assert all(0.0 < v < 1.0 for v in scores.values)


async def test_text_requests_share_their_prefixes(smol):
    """Scoring every prefix of a particle in one batch evaluates its text once."""
    steps = ("First, 12 * 7 = 84.\n\n", "Then we check: 84 / 7 = 12.\n\n", "So the answer is \\boxed{84}.")
    requests = [ScoreRequest(PROMPT, steps[:k]) for k in range(1, 4)]
    together = await LLMJudge(smol).score(requests)
    alone = [await LLMJudge(smol).score([r]) for r in requests]
    assert together.tokens < sum(a.tokens for a in alone) - len(smol.tokenize(steps[0], special=False))
    assert together.values == pytest.approx([a.values[0] for a in alone], abs=0.08)  # batch layout only


async def test_judge_questions_are_configurable_by_spec(smol):
    question = "Is 2 + 2 = 5? Answer with Yes or No."
    custom = make_reward(f'llm-judge(step_question="{question}")', smol)
    default = make_reward("llm-judge", smol)
    assert custom._suffix[False] == smol.tokenize(smol.template.turn_suffix(question))
    assert custom._suffix[False] != default._suffix[False]
    request = ScoreRequest(PROMPT, STEPS)
    assert (await custom.score([request])).values != (await default.score([request])).values


# ------------------------------------------------------------------ remote judge


def test_yes_no_probability_and_rating_parsing():
    assert yes_no_probability({"Yes": -0.1, " yes": -3.0, "No": -2.5}) == pytest.approx(
        (0.9048 + 0.0498) / (0.9048 + 0.0498 + 0.0821), abs=1e-3
    )
    # an unlisted class counts as likely as the least listed token, not as impossible
    assert yes_no_probability({"Yes": -0.1, "The": -4.0}) == pytest.approx(0.9048 / (0.9048 + 0.0183), abs=1e-3)
    assert yes_no_probability({"The": -0.1, "A": -1.0}) is None
    assert [parse_rating(t) for t in ["7", " 8/10", "Rating: 10.", "none", "3 out of 10"]] == [0.7, 0.8, 1.0, None, 0.3]


async def test_remote_judge_reads_p_yes_from_top_logprobs(llama_server, smol):
    """llama_cpp.server returns top_logprobs on both endpoints: the two formats give the
    same P(Yes), close to the embedded judge on the same model and text."""
    requests = [ScoreRequest(PROMPT, STEPS[:1]), ScoreRequest.for_prefix(PROMPT, STEPS)]
    completions = RemoteJudge(llama_server, chat_template="smollm2-135m")
    chat = RemoteJudge(llama_server, mode="chat")
    try:
        by_completions = await completions.score(requests)
        by_chat = await chat.score(requests)
    finally:
        await completions.close()
        await chat.close()
    assert by_completions.notes == {} and by_chat.notes == {}  # no fallback
    assert by_completions.tokens > 0 and by_chat.tokens > 0
    assert by_completions.values == pytest.approx(by_chat.values, abs=1e-3)
    embedded = [(await LLMJudge(smol).score([r])).values[0] for r in requests]
    assert by_completions.values == pytest.approx(embedded, abs=0.1)


class _StripLogprobs(BaseHTTPRequestHandler):
    """Forwards to the real llama.cpp server and drops log-probabilities from the answers,
    as a server without logprob support (or a proxy) would."""

    upstream = ""

    def do_GET(self):
        self._relay(httpx.get(self.upstream + self.path, timeout=60))

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._relay(
            httpx.post(
                self.upstream + self.path, content=body, timeout=120, headers={"content-type": "application/json"}
            )
        )

    def _relay(self, response):
        data = response.json()
        for choice in data.get("choices", []) if isinstance(data, dict) else []:
            choice["logprobs"] = None
        payload = json.dumps(data).encode()
        self.send_response(response.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def no_logprobs_server(llama_server):
    handler = type("Handler", (_StripLogprobs,), {"upstream": llama_server})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_remote_judge_falls_back_to_ratings_and_says_so(no_logprobs_server):
    judge = RemoteJudge(no_logprobs_server, chat_template="smollm2-135m")
    try:
        scores = await judge.score([ScoreRequest(PROMPT, STEPS[:1]), ScoreRequest(PROMPT, STEPS)])
    finally:
        await judge.close()
    assert scores.notes["fallback"] == FALLBACK_NOTE
    assert scores.notes["rated"] == 2
    assert judge.logprobs_available is False
    # a parsed rating is a multiple of 0.1; an unparsed one is neutral and counted
    unparsed = scores.notes.get("unparsed_ratings", 0)
    assert sum(v == 0.5 for v in scores.values) >= unparsed
    assert all(round(v * 10) == pytest.approx(v * 10) for v in scores.values)


async def test_fallback_reaches_the_search_diagnostics(no_logprobs_server, smol):
    reward = make_reward(f'remote-judge(url="{no_logprobs_server}", chat_template=smollm2-135m)', smol)
    result = await make_algorithm("particle-filter").run(
        smol, "What is 12 * 7?", reward=reward, budget=2, max_steps=2, max_tokens=16, max_step_tokens=8
    )
    await reward.close()
    assert result.diagnostics["reward_notes"]["fallback"] == FALLBACK_NOTE
    assert result.usage.reward_tokens > 0


async def test_remote_judge_uses_the_generators_server_by_default(llama_server):
    generator = OpenAIModel(llama_server, chat_template="smollm2-135m")
    reward = make_reward("remote-judge", generator)
    try:
        assert reward.server is generator
        scores = await reward.score([ScoreRequest(PROMPT, STEPS[:1])])
        assert 0.0 < scores.values[0] < 1.0 and not scores.notes
    finally:
        await generator.close()


async def test_an_evaluation_run_closes_the_judge_client_it_opened(llama_server, monkeypatch):
    """A remote judge built from a URL owns its HTTP client: the evaluation closes it after
    each run. One that talks to the generator's own server leaves that client to its owner."""
    from itscale.eval import runner
    from itscale.eval.datasets import Problem
    from itscale.eval.plan import Unit
    from itscale.search.settings import SearchSettings

    made = []

    def recording(*args, **kwargs):
        made.append(make_reward(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(runner, "make_reward", recording)
    generator = OpenAIModel(llama_server, chat_template="smollm2-135m")
    settings = SearchSettings(max_steps=1, max_tokens=8, max_step_tokens=8)
    unit = Unit(Problem("p", "What is 2 + 2?", "4"), "best-of-n", 0, 2, (2,), False)
    try:
        for spec in (f'remote-judge(url="{llama_server}", chat_template=smollm2-135m)', "remote-judge"):
            await runner.run_unit(unit, runner.Job(settings, spec), generator)
        own, borrowed = made
        assert own.owns_server and own.server._client is None  # opened for the run, closed after it
        assert not borrowed.owns_server and borrowed.server is generator
        assert generator._client is not None  # still usable: it is the caller's
    finally:
        await generator.close()
