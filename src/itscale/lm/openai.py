"""Any OpenAI-compatible server as a `LanguageModel` (vLLM, SGLang, llama.cpp, Ollama).

Steps continue the assistant turn, which chat endpoints normally cannot do. Two ways:

- `mode="completions"` (the default): render the chat template here and send raw text to
  `/v1/completions`. The template is the one given (a local GGUF or named model, or Jinja
  text), or the server's own (`GET /props` on llama.cpp's server), or rendered by the
  server (vLLM's `/tokenize` with messages, then `/detokenize`), else ChatML, with a
  warning in every result (`Result.diagnostics["backend"]`) and on the command line.
- `mode="chat"`: `/v1/chat/completions` with the partial answer as the last assistant
  message and vLLM's `continue_final_message: true, add_generation_prompt: false` (vLLM
  and SGLang accept these).

Servers tried here: llama-cpp-python's `python -m llama_cpp.server` (completions mode; it
accepts `n` but returns one choice, which is detected and worked around). vLLM and SGLang
are documented to accept the fields used (`n`, `seed`, `stop`, `continue_final_message`);
they could not be run on this machine (no GPU).

Requests go through one pooled httpx client with bounded concurrency. Timeouts, 429 and 5xx
answers and dropped connections are retried with exponential backoff; anything else is a
`BackendError` naming the server and what it said. Particles with the same text (children
of one parent after resampling) share a request with `n` when the server supports it.

Independent rollouts (best-of-N, self-consistency, ...: `extend_to_end`) are one request
each, run to the end of the answer by the server's own batching and cut into steps here
from the returned tokens, instead of one request (and one re-sent prefix) per step.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from itscale.errors import BackendError, BackendTimeout, UsageError
from itscale.lm.base import Branch, StepOutput, StepSettings, ends_rollout, extend_step_by_step, step_end
from itscale.lm.chat import CHATML, ChatTemplate
from itscale.types import Message, Prompt

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(eq=False)
class RemoteBranch(Branch):
    prompt: Prompt
    prefix: str  # the rendered prompt (completions mode)
    steps: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def text(self) -> str:
        return "".join(self.steps)


class OpenAIModel:
    """A language model behind an OpenAI-compatible HTTP server.

    `logprobs` (default on) lets the backend ask for the sampled tokens' log-probabilities
    where they are used: for a step when the reward reads them (`StepSettings.logprobs`;
    the self-certainty reward, a factor of the default reward, does), and to cut a whole
    rollout into steps exactly. A server that ignores the field still works; that reward
    then says what is missing. `logprobs=False` never asks (rollouts then go step by step).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        mode: Literal["completions", "chat"] = "completions",
        chat_template: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
        logprobs: bool = True,
    ):
        if mode not in ("completions", "chat"):
            raise UsageError(f"unknown mode {mode!r}: use 'completions' or 'chat'")
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"the backend URL {base_url!r} must start with http:// or https://")
        base = base_url.rstrip("/")
        self.root_url = base.removesuffix("/v1")
        self.api_url = self.root_url + "/v1"
        self.model = model
        self.name = model or self.root_url
        self.mode = mode
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.logprobs = logprobs
        self._template_source = chat_template
        self.template: ChatTemplate | None = None
        self.supports_n: bool | None = None  # learned from the first request with n > 1
        # What this backend learned about its server (template source, n support, ...),
        # copied into every result's diagnostics; `warnings` are what a user must be told.
        self.diagnostics: dict[str, Any] = {}
        self.warnings: dict[str, str] = {}
        self._rendered: dict[tuple, str] = {}
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._setup_lock: asyncio.Lock | None = None
        self._closer: Any = None  # see _close_with_loop
        self._orphans: list = []

    # ----------------------------------------------------------------- HTTP

    async def _http(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The HTTP client of the running event loop. A client belongs to the loop it was
        made on (its connections do): on a new loop a new one is made, and the old one is
        closed by its own loop (see `_close_with_loop`), never left open."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            if self._client is not None:
                self._close_on_its_loop()
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=headers, limits=limits)
            self._client_loop = loop
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._setup_lock = asyncio.Lock()
            self._closer = _close_with_loop(self._client)
            await self._closer.__anext__()
        return self._client, self._semaphore

    def _close_on_its_loop(self) -> None:
        """Closes the current client on the loop it belongs to: at once if that loop runs in
        another thread; else when that loop shuts down (`asyncio.run` does so as it ends), or
        already done if it has."""
        old, loop, closer = self._client, self._client_loop, self._closer
        self._client = self._client_loop = self._closer = None
        if loop is not None and loop.is_running() and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(closer.aclose(), loop)
        elif loop is not None and not loop.is_closed():
            self._orphans.append(closer)  # kept alive until its loop finalises it
        del old

    async def request(self, method: str, path: str, payload: dict | None = None, under_v1: bool = True) -> dict:
        """One JSON request to `/v1{path}` (or `{path}` at the server root) with retries;
        a clear BackendError when it cannot succeed."""
        client, semaphore = await self._http()
        url = (self.api_url if under_v1 else self.root_url) + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            try:
                async with semaphore:
                    response = await client.request(method, url, json=payload)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
                continue
            except httpx.ConnectError as error:
                # Nothing listening: one quick retry, then say so (no long backoff).
                last = f"cannot reach the server ({error or 'connection refused'})"
                if attempt >= 1:
                    break
                continue
            except httpx.TransportError as error:
                last = f"the connection failed ({type(error).__name__}: {error})"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}: {_error_text(response)}"
                continue
            if response.status_code >= 400:
                raise BackendError(f"{url} answered HTTP {response.status_code}: {_error_text(response)}")
            try:
                data = response.json()
            except ValueError:
                raise BackendError(f"{url} returned malformed JSON: {response.text[:200]!r}") from None
            if not isinstance(data, dict):
                raise BackendError(f"{url} returned JSON that is not an object: {response.text[:200]!r}")
            return data
        error = BackendTimeout if last.startswith("timed out") else BackendError
        raise error(f"{url}: {last} (gave up after {attempt + 1} attempts)")

    def note(self, topic: str, warning: str) -> None:
        """Something every result made through this backend should say (once per topic)."""
        self.warnings[topic] = warning

    async def close(self) -> None:
        if self._client is None:
            return
        if self._client_loop is asyncio.get_running_loop():
            await self._closer.aclose()  # closes the client
            self._client = self._client_loop = self._closer = None
        else:
            self._close_on_its_loop()

    # ----------------------------------------------------------------- setup

    async def start_up(self) -> None:
        """Learns the served model's name and chat template now rather than at the first request."""
        await self._ensure_ready()

    async def _ensure_ready(self) -> None:
        await self._http()
        async with self._setup_lock:
            if self.model is None:
                data = await self.request("GET", "/models")
                try:
                    self.model = data["data"][0]["id"]
                except (KeyError, IndexError, TypeError):
                    raise BackendError(f"{self.api_url}/models lists no model; pass the model name") from None
                self.name = self.model
            if self.mode == "completions" and "chat_template" not in self.diagnostics:
                self.template = await self._find_template()

    async def _find_template(self) -> ChatTemplate | None:
        """The chat template, from (in order) the caller, llama.cpp's `/props`, or None when
        the server renders chats itself (vLLM's `/tokenize` and `/detokenize`); else ChatML,
        with a warning in every result: a wrong template silently changes every prompt."""
        source = self._template_source
        if source is not None:
            from itscale.lm.chat import template_from_model

            template = template_from_model(source)
            self.diagnostics["chat_template"] = f"from {source}" if template.source != source else "given"
            return template
        try:
            props = await self.request("GET", "/props", under_v1=False)
            if isinstance(props.get("chat_template"), str) and props["chat_template"]:
                self.diagnostics["chat_template"] = "from the server's /props"
                return ChatTemplate(props["chat_template"], props.get("bos_token", ""), props.get("eos_token", ""))
        except BackendError:
            pass
        try:
            await self._render_on_server([Message("user", "hi")], add_generation_prompt=True)
            self.diagnostics["chat_template"] = "rendered by the server (/tokenize, /detokenize)"
            return None
        except BackendError:
            pass
        self.diagnostics["chat_template"] = "assumed ChatML"
        self.note(
            "chat_template",
            f"{self.root_url} publishes no chat template (no /props, no /tokenize): prompts were rendered as "
            "ChatML, which may not be the model's format; pass chat_template (CLI: --chat-template) to be sure",
        )
        return ChatTemplate(CHATML)

    async def prompt_text(self, prompt: Prompt) -> str:
        """The text the assistant's steps are appended to (completions mode)."""
        if self.template is not None:
            return self.template.prompt_text(prompt)
        return await self._render_on_server(list(prompt.messages), add_generation_prompt=True)

    async def turn_suffix(self, question: str) -> str:
        """What closes the assistant turn and asks `question` in a new user turn (a judge)."""
        if self.template is not None:
            return self.template.turn_suffix(question)
        sentinel = "\u2063ITSCALE-SENTINEL\u2063"
        chat = [Message("user", "x"), Message("assistant", sentinel), Message("user", question)]
        rendered = await self._render_on_server(chat, add_generation_prompt=True)
        if sentinel not in rendered:
            raise BackendError(f"{self.root_url}/tokenize rendered a chat without its assistant turn")
        return rendered.split(sentinel, 1)[1]

    async def _render_on_server(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """A chat rendered by the server's own template: vLLM's /tokenize (with messages),
        then /detokenize. Cached: every particle of a prompt renders the same chat."""
        key = (tuple(messages), add_generation_prompt)
        if key not in self._rendered:
            chat = [{"role": m.role, "content": m.content} for m in messages]
            payload = {
                "model": self.model,
                "messages": chat,
                "add_generation_prompt": add_generation_prompt,
                "add_special_tokens": False,
            }
            tokens = (await self.request("POST", "/tokenize", payload, under_v1=False)).get("tokens")
            if not isinstance(tokens, list):
                raise BackendError(f"{self.root_url}/tokenize returned no token list")
            detokenized = await self.request("POST", "/detokenize", {"model": self.model, "tokens": tokens}, False)
            text = detokenized.get("prompt")
            if not isinstance(text, str):
                raise BackendError(f"{self.root_url}/detokenize returned no text")
            self._rendered[key] = text
        return self._rendered[key]

    # ----------------------------------------------------------------- LanguageModel

    async def start(self, prompt: Prompt) -> RemoteBranch:
        await self._ensure_ready()
        prefix = await self.prompt_text(prompt) if self.mode == "completions" else ""
        return RemoteBranch(prompt, prefix)

    def fork(self, branch: Branch, steps: int | None = None) -> RemoteBranch:
        assert isinstance(branch, RemoteBranch)
        k = len(branch.steps) if steps is None else steps
        return RemoteBranch(branch.prompt, branch.prefix, branch.steps[:k], branch.finished and k == len(branch.steps))

    def release(self, branch: Branch) -> None:
        pass

    async def extend(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[StepOutput]:
        caps = [
            settings.step_token_cap if max_new_tokens is None else max(1, min(settings.step_token_cap, m))
            for m in (max_new_tokens or [0] * len(branches))
        ]
        pairs = await self._continue(branches, settings, caps, seeds, delimited=True)
        outputs = [self._step(choice, usage, settings) for choice, usage in pairs]
        for b, out in zip(branches, outputs, strict=True):
            b.steps.append(out.text)
            b.finished = out.end == "eos"
        return outputs

    async def extend_to_end(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        stop: Callable[[str], bool],
    ) -> list[list[StepOutput]]:
        """Each rollout in one request (rollouts from the same text share one with `n`), run
        to the end of the answer or its token allowance and split into steps here from the
        returned tokens, by the same rules as the engine (delimiter, step cap,
        `ends_rollout`). A server cannot seed each step or stop on a step's content, so a
        rollout is seeded by its first step's seed, and the steps after the one that ends it
        (or after its last seed's step) are dropped, their tokens counted on the last step
        kept: they were generated. Without token log-probabilities (`logprobs=False`) the
        split cannot be exact, and steps are requested one by one instead."""
        if not self.logprobs:
            return await extend_step_by_step(self, branches, settings, seeds, max_new_tokens, stop)
        allowances = [max(1, m) for m in max_new_tokens]
        pairs = await self._continue(branches, settings, allowances, [s[0] for s in seeds], delimited=False)
        rollouts = [
            _split_rollout(choice, usage, settings, allowances[i], len(seeds[i]), stop)
            for i, (choice, usage) in enumerate(pairs)
        ]
        for b, steps in zip(branches, rollouts, strict=True):
            b.steps += [out.text for out in steps]
            b.finished = steps[-1].end == "eos"
        return rollouts

    async def _continue(
        self, branches: Sequence[Branch], settings: StepSettings, caps: list[int], seeds: Sequence[int], delimited: bool
    ) -> list[tuple[dict, dict]]:
        """A (choice, usage) continuation per branch; branches with the same text and cap
        (children of one parent, rollouts of one prompt) share a request (see `_sample`)."""
        await self._ensure_ready()
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(branches):
            assert isinstance(b, RemoteBranch)
            groups.setdefault((b.prompt, b.text, caps[i]), []).append(i)
        pairs: list[tuple[dict, dict]] = [({}, {})] * len(branches)

        async def run_group(members: list[int]) -> None:
            first = branches[members[0]]
            results = await self._sample(first, settings, caps[members[0]], [seeds[i] for i in members], delimited)
            for i, pair in zip(members, results, strict=True):
                pairs[i] = pair

        await asyncio.gather(*(run_group(m) for m in groups.values()))
        return pairs

    async def _sample(
        self, branch: RemoteBranch, settings: StepSettings, cap: int, seeds: list[int], delimited: bool
    ) -> list[tuple[dict, dict]]:
        """`len(seeds)` continuations of one text, each a (choice, usage) pair whose usage
        counts the prompt once per request (on its first choice): one request with n when
        the server supports it, else one request per seed. `delimited`: stop at the step
        delimiter, else run to the end of the answer or `cap`."""
        n = len(seeds)
        if n > 1 and self.supports_n is not False:
            choices, usage = await self._complete(branch, settings, cap, seeds[0], n, delimited)
            if self.supports_n is None:
                self.supports_n = len(choices) >= n
                self.diagnostics["server_supports_n"] = self.supports_n
            done = _with_usage(choices[:n], usage)
            if len(choices) >= n:
                return done
            rest = await asyncio.gather(
                *(self._sample(branch, settings, cap, [s], delimited) for s in seeds[len(choices) :])
            )
            return done + [pair for pairs in rest for pair in pairs]
        if n > 1:  # the server ignores n: one request per seed
            parts = await asyncio.gather(*(self._sample(branch, settings, cap, [s], delimited) for s in seeds))
            return [pair for pairs in parts for pair in pairs]
        choices, usage = await self._complete(branch, settings, cap, seeds[0], 1, delimited)
        if not choices:
            raise BackendError(f"{self.api_url} returned no choices")
        return _with_usage(choices[:1], usage)

    async def _complete(
        self, branch: RemoteBranch, settings: StepSettings, cap: int, seed: int, n: int, delimited: bool
    ) -> tuple[list[dict], dict]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": cap,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": int(seed % (2**31)),
            "n": n,
        }
        if delimited and isinstance(settings.delimiter, str):
            payload["stop"] = [settings.delimiter]
        # Asked for only when used: by a reward (settings.logprobs), or to cut a whole
        # rollout into steps. llama-cpp-python's server decodes about ten times slower
        # when it must return them (docs/benchmarks.md).
        logprobs = self.logprobs and (settings.logprobs or not delimited)
        if self.mode == "completions":
            payload["prompt"] = branch.prefix + branch.text
            if logprobs:
                payload["logprobs"] = 1
            data = await self.request("POST", "/completions", payload)
        else:
            messages = [{"role": m.role, "content": m.content} for m in branch.prompt.messages]
            messages.append({"role": "assistant", "content": branch.text})
            payload.update(messages=messages, continue_final_message=True, add_generation_prompt=False)
            if logprobs:
                payload["logprobs"] = True
            data = await self.request("POST", "/chat/completions", payload)
        choices = data.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise BackendError(f"{self.api_url} returned no 'choices' list: {json.dumps(data)[:200]}")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return choices, usage

    def _step(self, choice: dict, usage: dict, settings: StepSettings) -> StepOutput:
        """One step from a choice of a request that stopped at the delimiter (or at the end
        of the answer, or at the step cap): see `stopped_at_delimiter` for how the two
        stops are told apart."""
        text = _choice_text(choice)
        reason = choice.get("finish_reason")
        delimiter = settings.delimiter
        tokens = usage["completion_tokens"]
        if reason == "length":
            end = "delimiter" if isinstance(delimiter, int) and tokens >= delimiter else "step_cap"
        elif isinstance(delimiter, int):
            end = "eos"  # no stop string was sent: only the model ends a step early
        else:
            at_delimiter = stopped_at_delimiter(choice, text, delimiter)
            if at_delimiter is None:
                # The server does not say why it stopped. Taken as the delimiter: an answer
                # that ended there instead comes back as an empty step next time, which ends it.
                self.diagnostics["stop_unknown"] = self.diagnostics.get("stop_unknown", 0) + 1
                self.note(
                    "stop",
                    "the server does not say whether a step stopped at the delimiter or at the end of the "
                    "answer (no stop_reason, no token log-probabilities): an answer's end is seen one "
                    "(empty) step later",
                )
                at_delimiter = bool(text)
            end = "delimiter" if at_delimiter else "eos"
            if at_delimiter and not text.endswith(delimiter):
                text += delimiter  # servers strip the stop string; the step keeps it
        return StepOutput(
            text=text,
            tokens=tokens,
            end=end,
            prompt_tokens=usage["prompt_tokens"],
            logprob=_logprob_sum(choice),
        )


def stopped_at_delimiter(choice: dict, text: str, delimiter: str) -> bool | None:
    """Whether a choice with finish_reason "stop" stopped at the step delimiter (True) or
    because the model ended its answer (False), from what the server says; None when it
    says nothing that tells. In order:

    - vLLM's `stop_reason` (the matched stop string, None at end of turn) or SGLang's
      `matched_stop`;
    - the text itself ends with the delimiter (a server that keeps stop strings);
    - the generated tokens (log-probabilities on): llama.cpp servers list every generated
      token, the stop string's included, while the text stops before it; at end of turn
      the tokens spell exactly the text.
    """
    for field_name in ("stop_reason", "matched_stop"):
        if field_name in choice:
            return choice[field_name] == delimiter
    if text.endswith(delimiter):
        return True
    pieces = _token_pieces(choice)
    if pieces:
        spelled = "".join(piece for piece, _ in pieces)
        if spelled.startswith(text) and delimiter in spelled[max(0, len(text) - len(delimiter)) :]:
            return True
        if spelled == text:
            return False
    return None


async def _close_with_loop(client: httpx.AsyncClient) -> Any:
    """Closes `client` when finalised: by `aclose()`, or by the event loop's shutdown
    (`asyncio.run` finalises every live async generator of its loop before closing it), so
    a client is closed on the loop its connections belong to even when nobody calls close."""
    try:
        yield
    finally:
        await client.aclose()


def _with_usage(choices: list[dict], usage: dict) -> list[tuple[dict, dict]]:
    """Each choice of one request with its share of the request's usage: the prompt on the
    first choice, the completion tokens its own (see `_split_tokens`)."""
    tokens = _split_tokens(usage.get("completion_tokens"), [_choice_text(c) for c in choices], choices)
    prompt = int(usage.get("prompt_tokens") or 0)
    return [
        (choice, {"prompt_tokens": prompt if i == 0 else 0, "completion_tokens": n})
        for i, (choice, n) in enumerate(zip(choices, tokens, strict=True))
    ]


def _split_rollout(
    choice: dict, usage: dict, settings: StepSettings, allowance: int, max_steps: int, stop: Callable[[str], bool]
) -> list[StepOutput]:
    """A whole rollout's choice cut into steps where the engine would end them, then cut
    short by `ends_rollout` or `max_steps` (the dropped steps' tokens stay counted)."""
    last_end = "step_cap" if choice.get("finish_reason") == "length" else "eos"
    text, pieces = _choice_text(choice), _token_pieces(choice)
    if pieces is not None and "".join(piece for piece, _ in pieces) == text:
        steps = _steps_from_tokens(pieces, settings, last_end)
    else:
        # The server gave no tokens, or token texts that do not spell the text (a character
        # split across tokens shows as a replacement mark): cut the text at the delimiters
        # and share the tokens, and their log-probabilities in order, by text length.
        texts = (_cut_at(text, settings.delimiter) if isinstance(settings.delimiter, str) else []) or [text]
        counts = _split_tokens(usage["completion_tokens"], texts, [{} for _ in texts])
        ends = ["delimiter"] * (len(texts) - 1) + [last_end]
        steps = [StepOutput(t, n, e) for t, n, e in zip(texts, counts, ends, strict=True)]
        if pieces is not None:
            start = 0
            for out in steps:
                out.logprob = sum(lp or 0.0 for _, lp in pieces[start : start + out.tokens])
                start += out.tokens
    steps[0].prompt_tokens = usage["prompt_tokens"]
    kept, left = [], allowance
    for out in steps:
        kept.append(out)
        left -= out.tokens
        if len(kept) == max_steps or ends_rollout(out, left, stop):
            break
    kept[-1].tokens += sum(out.tokens for out in steps[len(kept) :])  # generated, then dropped
    return kept


def _steps_from_tokens(
    pieces: list[tuple[str, float | None]], settings: StepSettings, last_end: str
) -> list[StepOutput]:
    """Token by token, as the engine ends steps: a token whose text completes the delimiter
    ends a step (the step keeps the whole token), so does the step cap; the last step ends
    as the request did ("eos" when the model ended its answer there)."""
    steps: list[StepOutput] = []
    text, tokens, logprob = "", 0, 0.0
    for i, (piece, piece_logprob) in enumerate(pieces):
        text, tokens, logprob = text + piece, tokens + 1, logprob + (piece_logprob or 0.0)
        end = step_end(text, piece, settings.delimiter, tokens, settings.step_token_cap)
        if i == len(pieces) - 1 and (end is None or last_end == "eos"):
            end = last_end
        if end is not None:
            steps.append(StepOutput(text, tokens, end, logprob=logprob))
            text, tokens, logprob = "", 0, 0.0
    return steps or [StepOutput("", 0, last_end)]  # the model ended its answer at once


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability, and the top alternatives at its position
    (token text -> log-probability) when they were asked for."""

    token: str
    logprob: float | None
    top: dict[str, float]


def choice_logprobs(choice: dict) -> list[TokenLogprob] | None:
    """The generated tokens of a choice, from either API's format; None when it has none.

    completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: lp}, ...]}
    chat:        {"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}
    """
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("tokens"), list):
        values = lp.get("token_logprobs") if isinstance(lp.get("token_logprobs"), list) else []
        tops = lp.get("top_logprobs") if isinstance(lp.get("top_logprobs"), list) else []
        return [
            TokenLogprob(
                str(token),
                _number(values[i]) if i < len(values) else None,
                _alternatives(tops[i].items() if i < len(tops) and isinstance(tops[i], dict) else ()),
            )
            for i, token in enumerate(lp["tokens"])
        ]
    if isinstance(lp.get("content"), list):
        return [
            TokenLogprob(
                str(t.get("token", "")),
                _number(t.get("logprob")),
                _alternatives(
                    (e.get("token"), e.get("logprob")) for e in t.get("top_logprobs") or () if isinstance(e, dict)
                ),
            )
            for t in lp["content"]
            if isinstance(t, dict)
        ]
    return None


def _alternatives(pairs: Any) -> dict[str, float]:
    return {str(token): float(value) for token, value in pairs if token is not None and _number(value) is not None}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _token_pieces(choice: dict) -> list[tuple[str, float | None]] | None:
    """The generated tokens' texts and log-probabilities."""
    tokens = choice_logprobs(choice)
    return None if tokens is None else [(t.token, t.logprob) for t in tokens]


def _cut_at(text: str, delimiter: str) -> list[str]:
    """`text` cut after every occurrence of `delimiter` (each part keeps its delimiter)."""
    parts = text.split(delimiter)
    return [p + delimiter for p in parts[:-1]] + ([parts[-1]] if parts[-1] or len(parts) == 1 else [])


def _choice_text(choice: dict) -> str:
    text = choice["text"] if "text" in choice else (choice.get("message") or {}).get("content")
    if not isinstance(text, str):
        raise BackendError(f"a choice carries no text: {json.dumps(choice)[:200]}")
    return text


def _split_tokens(total: Any, texts: list[str], choices: list[dict]) -> list[int]:
    """Completion tokens per choice: exact from logprobs when present, else the server's
    total split in proportion to text length (the sum stays exact)."""
    exact = [None if (tokens := choice_logprobs(c)) is None else len(tokens) for c in choices]
    if all(e is not None for e in exact):
        return exact  # type: ignore[return-value]
    if not isinstance(total, int):
        return [max(1, len(t) // 4) for t in texts]
    lengths = [max(1, len(t)) for t in texts]
    shares = [total * n // sum(lengths) for n in lengths]
    shares[0] += total - sum(shares)
    return shares


def _logprob_sum(choice: dict) -> float | None:
    tokens = choice_logprobs(choice)
    return None if tokens is None else float(sum(t.logprob or 0.0 for t in tokens))


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message", error) if isinstance(error, dict) else error
        text = str(message)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:300] or response.reason_phrase
