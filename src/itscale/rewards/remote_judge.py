"""An LLM judge behind any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama).

The judge sees the particle as the assistant's turn, then a user question ("Is the last
step correct? Answer with Yes or No."), and is asked for one token with `top_logprobs`.
Its score is P(yes) / (P(yes) + P(no)), summing the probabilities of every listed spelling
("Yes", " yes", "YES", ...). A class missing from the top list counts as no more likely
than the least likely listed token (an upper bound, so the score is never overconfident).

Servers that return no log-probabilities (some Ollama versions, proxies that strip them)
get a second question instead, "Rate ... from 0 to 10", answered greedily and parsed; the
score is the rating / 10. That fallback changes what the numbers mean, so it is never
silent: every batch scored that way says so in `Scores.notes` (copied by the search into
`Result.diagnostics["reward_notes"]`), with the count of ratings that could not be parsed
(scored neutral, 0.5).

Two ways to talk to the server, as for generation (`itscale.lm.openai`):
`mode="completions"` renders the chat template here and sends text to `/v1/completions`
(the template is the server's own, or the one given); `mode="chat"` sends messages to
`/v1/chat/completions`. Requests go through `OpenAIModel.request`: one pooled client,
bounded concurrency, retries with backoff, a clear BackendError when the server fails.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from itscale.errors import BackendError
from itscale.lm.openai import OpenAIModel, choice_logprobs
from itscale.rewards.base import CachedReward, ScoreRequest, Scores
from itscale.rewards.judge import PREFIX_QUESTION, STEP_QUESTION, yes_probability
from itscale.types import Message

STEP_RATING = (
    "Rate the last step of your answer above from 0 (certainly wrong) to 10 (certainly correct). "
    "Reply with the number only."
)
PREFIX_RATING = (
    "Rate your answer above so far from 0 (certainly wrong) to 10 (certainly correct). Reply with the number only."
)
FALLBACK_NOTE = "the server returned no log-probabilities: scores are parsed 0-10 ratings / 10, not P(Yes)"
_RATING = re.compile(r"\b(10|[0-9])(?:\s*/\s*10)?\b")


def yes_no_probability(top: dict[str, float]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from one position's top log-probabilities (token -> logprob),
    summing every spelling; an unlisted class is at most as likely as the least listed token."""
    yes = [v for t, v in top.items() if t.strip().lower() == "yes"]
    no = [v for t, v in top.items() if t.strip().lower() == "no"]
    return yes_probability(yes, no, floor=min(top.values()))


def parse_rating(text: str) -> float | None:
    """A 0-10 rating at the start of a reply ("7", "8/10", "Rating: 9") as a score in [0, 1]."""
    match = _RATING.search(text)
    return int(match.group(1)) / 10 if match else None


class RemoteJudge(CachedReward):
    """Process reward: P(Yes) from a judge model on an OpenAI-compatible server.

    `server` is a base URL or an `OpenAIModel` (its client, template and retries are
    reused; pass the generator's own to let it judge itself). `logprobs=False` goes
    straight to parsed ratings for servers known to have none."""

    kind = "process"

    def __init__(
        self,
        server: OpenAIModel | str,
        model: str | None = None,
        *,
        mode: str = "completions",
        chat_template: str | None = None,
        step_question: str = STEP_QUESTION,
        prefix_question: str = PREFIX_QUESTION,
        step_rating: str = STEP_RATING,
        prefix_rating: str = PREFIX_RATING,
        top_logprobs: int = 20,
        logprobs: bool = True,
        api_key: str | None = None,
        name: str = "remote-judge",
    ):
        super().__init__()
        self.owns_server = isinstance(server, str)
        if isinstance(server, str):
            server = OpenAIModel(server, model, mode=mode, chat_template=chat_template, api_key=api_key)
        self.server, self.name = server, name
        self.questions = {False: step_question, True: prefix_question}
        self.ratings = {False: step_rating, True: prefix_rating}
        self.top_logprobs = top_logprobs
        self.logprobs_available: bool | None = None if logprobs else False

    async def close(self) -> None:
        """Closes the HTTP client this reward opened (a server given to it is its owner's)."""
        if self.owns_server:
            await self.server.close()

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        results = await asyncio.gather(*(self._judge(r) for r in requests))
        values = [v for v, _, _ in results]
        tokens = sum(t for _, t, _ in results)
        hows = [how for _, _, how in results]
        notes: dict[str, Any] = {}
        fallback = [h for h in hows if h in ("rating", "unparsed")]
        if fallback:
            notes["fallback"] = FALLBACK_NOTE
            notes["rated"] = len(fallback)
        if hows.count("no-yes-no"):
            notes["rated_without_yes_no"] = hows.count("no-yes-no")  # neither answer in the top logprobs
        if hows.count("unparsed"):
            notes["unparsed_ratings"] = hows.count("unparsed")
        return Scores(values, tokens=tokens, notes=notes)

    async def _judge(self, r: ScoreRequest) -> tuple[float, int, str]:
        """(score, tokens, how): how is "logprobs"; "rating" or "unparsed" (no logprobs: a
        parsed rating, or none parsed and neutral); "no-yes-no" (logprobs listed neither
        answer: a parsed rating, else neutral)."""
        tokens, how = 0, "rating"
        if self.logprobs_available is not False:
            data = await self._ask(r, self.questions[r.prefix], max_tokens=1, logprobs=True)
            tokens += _tokens(data)
            top = _top_logprobs(data)
            if top is None:
                self.logprobs_available = False  # this server has none: rate from now on
            else:
                self.logprobs_available = True
                p = yes_no_probability(top)
                if p is not None:
                    return p, tokens, "logprobs"
                how = "no-yes-no"
        data = await self._ask(r, self.ratings[r.prefix], max_tokens=4, logprobs=False)
        tokens += _tokens(data)
        rating = parse_rating(_text(data))
        if rating is None:
            return 0.5, tokens, "unparsed" if how == "rating" else how
        return rating, tokens, how

    async def _ask(self, r: ScoreRequest, question: str, max_tokens: int, logprobs: bool) -> dict:
        server = self.server
        payload: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0}
        if server.mode == "completions":
            branch = await server.start(r.prompt)  # renders the prompt with the server's template
            payload["prompt"] = branch.prefix + r.text + await server.turn_suffix(question)
            if logprobs:
                payload["logprobs"] = self.top_logprobs
            path = "/completions"
        else:
            await server.start(r.prompt)  # resolves the model name
            messages = [*r.prompt.messages, Message("assistant", r.text), Message("user", question)]
            payload["messages"] = [{"role": m.role, "content": m.content} for m in messages]
            if logprobs:
                payload.update(logprobs=True, top_logprobs=self.top_logprobs)
            path = "/chat/completions"
        payload["model"] = server.model
        return await server.request("POST", path, payload)


def _first_choice(data: dict) -> dict:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError(f"the judge server returned no choices: {str(data)[:200]}")
    return choices[0]


def _top_logprobs(data: dict) -> dict[str, float] | None:
    """The first generated position's top log-probabilities (the token itself when the
    server lists no alternatives)."""
    tokens = choice_logprobs(_first_choice(data))
    if not tokens:
        return None
    first = tokens[0]
    if first.top:
        return first.top
    return {first.token: first.logprob} if first.logprob is not None else None


def _text(data: dict) -> str:
    choice = _first_choice(data)
    text = choice.get("text")
    if text is None:
        text = (choice.get("message") or {}).get("content")
    return text if isinstance(text, str) else ""


def _tokens(data: dict) -> int:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
