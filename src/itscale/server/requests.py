"""A request body → a checked `SearchRequest`; anything wrong is an `APIError` (HTTP 400,
404 for an unknown model) naming the field, in OpenAI's error shape.

What a request may say, besides OpenAI's own fields (`model`, `messages` or `prompt`,
`temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop`, `n`,
`stream`, `stream_options`, `user`):

- `algorithm`, `budget` (a number of particles, or "auto:B": the compute-optimal algorithm
  at a mean budget B, as `--budget auto:B`), `reward`, `options` (the algorithm's own
  options, as `--option`),
  `trace` (return the search's trace), and every `SearchSettings` field under its own name
  (`max_steps`, `delimiter`, `max_step_tokens`, `token_budget`, `system_prompt`,
  `reward_fallback`, `reward_timeout`, `max_reward_failures`). The official `openai`
  client sends them with `extra_body={...}`.
- or, for clients that cannot send extra fields, the model name `ALGORITHM[-BUDGET]:MODEL`,
  for example `particle-filter-16:qwen2.5-coder-0.5b` or `best-of-n:qwen2.5-coder-0.5b`.

Fields of OpenAI's API that a search cannot honour (tools, response_format, logprobs,
penalties, logit_bias, best_of, echo, suffix) are refused with a 400 that says so, rather
than silently ignored. `n` asks for the n best distinct final answers (by their total
weight), at most the budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from itscale.errors import UsageError
from itscale.search import algorithm_names, make_algorithm, unused_reward_message
from itscale.search.settings import SearchSettings
from itscale.types import Message, Prompt

ROLES = ("system", "developer", "user", "assistant")
# OpenAI fields a search cannot honour: refused unless they are at their neutral value.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}
IGNORED = ("user", "metadata", "store", "parallel_tool_calls", "service_tier")
# Settings a request may give under their own names (OpenAI's names map onto the others).
SETTINGS_FIELDS = tuple(
    f for f in SearchSettings.field_names() if f not in ("budget", "seed", "temperature", "top_p", "max_tokens", "stop")
)
EXTENSIONS = ("algorithm", "budget", "reward", "options", "trace", *SETTINGS_FIELDS)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Defaults:
    """What the server uses when a request does not say (its flags)."""

    model: str
    algorithm: str = "particle-filter"
    reward: str | None = None  # None: the default reward for the model
    options: dict[str, Any] = field(default_factory=dict)
    settings: SearchSettings = field(default_factory=SearchSettings)
    max_budget: int = 64


@dataclass
class SearchRequest:
    kind: Literal["chat", "completions"]
    model: str  # as the client named it (echoed back)
    prompt: Prompt
    algorithm: str
    options: dict[str, Any]
    reward: str | None
    settings: SearchSettings
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    trace: bool = False


def parse_request(body: Any, kind: Literal["chat", "completions"], defaults: Defaults) -> SearchRequest:
    """Checks every field; raises APIError (400, 404) for the first one that is wrong."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    allowed = {"model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n", "stream",
               "stream_options", *UNSUPPORTED, *IGNORED, *EXTENSIONS}  # fmt: skip
    allowed.add("messages" if kind == "chat" else "prompt")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(
            f"unknown field {unknown[0]!r}: itscale takes OpenAI's fields and {', '.join(EXTENSIONS)}",
            param=unknown[0],
        )
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise bad(f"{name!r} is not supported by an inference-time-scaling search; leave it out", param=name)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a model name from GET /v1/models", param="model")
    algorithm, budget = resolve_model(model, defaults)
    auto = _auto_budget(body)
    if auto is not None:
        algorithm, budget = "compute-optimal", auto
    algorithm = _typed(body, "algorithm", str, algorithm)
    if algorithm not in algorithm_names():
        raise bad(f"unknown algorithm {algorithm!r}: use one of {', '.join(algorithm_names())}", param="algorithm")
    options = _typed(body, "options", dict, defaults.options if algorithm == defaults.algorithm else {})
    try:
        search = make_algorithm(algorithm, **options)
    except UsageError as error:
        raise bad(str(error), param="options") from None

    if auto is None:
        budget = _integer(body, "budget", budget if budget is not None else defaults.settings.budget)
    if not 1 <= budget <= defaults.max_budget:
        raise bad(f"budget must be between 1 and {defaults.max_budget} (this server's --max-budget)", param="budget")
    n = _integer(body, "n", 1)
    if not 1 <= n <= budget:
        raise bad(f"n must be between 1 and the budget ({budget}): n answers come from the final particles", param="n")

    changes: dict[str, Any] = {"budget": budget}
    if body.get("temperature") is not None:
        changes["temperature"] = _number(body, "temperature")
        if not 0 <= changes["temperature"] <= 2:
            raise bad("temperature must be between 0 and 2", param="temperature")
    if body.get("top_p") is not None:
        changes["top_p"] = _number(body, "top_p")
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            changes["max_tokens"] = _integer(body, name, 0)
            if changes["max_tokens"] < 1:
                raise bad(f"{name} must be at least 1", param=name)
    if body.get("seed") is not None:
        changes["seed"] = _integer(body, "seed", 0)
    if body.get("stop") is not None:
        stop = body["stop"]
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise bad("stop must be a non-empty string or a list of at most 4 of them", param="stop")
        changes["stop"] = tuple(stops)
    for name in SETTINGS_FIELDS:
        if name in body:
            changes[name] = _setting(body, name)
    try:
        settings = defaults.settings.replace(**changes)
    except (UsageError, TypeError, ValueError) as error:
        raise bad(str(error), param=_param_of(str(error), changes)) from None

    # The server's --reward is a default for the algorithms that use one; a reward the
    # request names for an algorithm that uses none is refused, not silently ignored.
    reward = _typed(body, "reward", str, defaults.reward) if body.get("reward") is not None else defaults.reward
    if not search.uses_reward:
        if body.get("reward") is not None:
            raise bad(unused_reward_message(algorithm, reward), param="reward")
        reward = None
    if reward is not None:
        _check_reward(reward)

    stream = _typed(body, "stream", bool, False)
    stream_options = _typed(body, "stream_options", dict, {}) if body.get("stream_options") is not None else {}
    if stream_options and not stream:
        raise bad("stream_options is only allowed with stream: true", param="stream_options")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be a boolean", param="stream_options")
    return SearchRequest(
        kind=kind,
        model=model,
        prompt=_prompt(body, kind, settings),
        algorithm=algorithm,
        options=options,
        reward=reward,
        settings=settings,
        n=n,
        stream=stream,
        include_usage=include_usage,
        trace=_typed(body, "trace", bool, False),
    )


def resolve_model(name: str, defaults: Defaults) -> tuple[str, int | None]:
    """(algorithm, budget or None) for a model name: the served model itself, or
    `ALGORITHM[-BUDGET]:MODEL`; anything else is a 404."""
    if name == defaults.model:
        return defaults.algorithm, None
    prefix, colon, rest = name.partition(":")
    if colon and rest == defaults.model:
        algorithm, budget = prefix, None
        head, dash, tail = prefix.rpartition("-")
        if dash and tail.isdigit() and head in algorithm_names():
            algorithm, budget = head, int(tail)
        if algorithm in algorithm_names():
            return algorithm, budget
    raise APIError(
        404,
        f"the model {name!r} does not exist: this server serves {defaults.model!r}, also as "
        f"ALGORITHM[-BUDGET]:{defaults.model} (for example particle-filter-16:{defaults.model}); see GET /v1/models",
        param="model",
        code="model_not_found",
    )


def _prompt(body: dict, kind: str, settings: SearchSettings) -> Prompt:
    if kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list):
            raise bad("one prompt per request: a search answers one problem", param="prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("'prompt' must be a non-empty string (the problem to solve)", param="prompt")
        return Prompt.of(prompt, system=settings.system_prompt)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content}", param="messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad(
                f"messages[{i}].role {role!r} is not supported: use one of {', '.join(ROLES)}",
                param=f"messages[{i}].role",
            )
        parsed.append(Message("system" if role == "developer" else role, _content(m.get("content"), i)))
    if parsed[-1].role != "user":
        raise bad("the last message must be the user's: the search writes the assistant's answer", param="messages")
    return Prompt.of(parsed, system=settings.system_prompt)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad(f"{name} must be {_kind_name(kind)}, got {type(value).__name__}", param=name)
    return value


def _auto_budget(body: dict) -> int | None:
    """B of a budget "auto:B" (None for any other budget); it names the compute-optimal
    algorithm, so another algorithm beside it is a contradiction."""
    from itscale.search.allocation import AUTO_BUDGET, resolve_budget

    budget = body.get("budget")
    if not isinstance(budget, str) or not budget.startswith(AUTO_BUDGET):
        return None
    try:
        return resolve_budget(body.get("algorithm"), budget, "compute-optimal")[1]
    except UsageError as error:
        raise bad(str(error), param="budget") from None


def _integer(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {type(value).__name__}", param=name)
    return value


def _number(body: dict, name: str) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{name} must be a number, got {type(value).__name__}", param=name)
    return float(value)


def _setting(body: dict, name: str) -> Any:
    """A SearchSettings field, checked against the type of its default."""
    value = body[name]
    default = next(f.default for f in dataclasses.fields(SearchSettings) if f.name == name)
    if name == "delimiter":
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise bad("delimiter must be a string or a token count", param=name)
        return value
    if value is None and name in ("token_budget", "system_prompt"):
        return None
    if isinstance(default, float):
        return _number(body, name)
    if isinstance(default, int) or name == "token_budget":
        return _integer(body, name, 0)
    if isinstance(default, str) or name == "system_prompt":
        return _typed(body, name, str, default)
    return value


def _check_reward(spec: str) -> None:
    from itscale.rewards.registry import reward_names
    from itscale.rewards.spec import parse_spec

    try:
        names = [factor.name for factor in parse_spec(spec)]
    except UsageError as error:
        raise bad(str(error), param="reward") from None
    for name in names:
        if name not in reward_names():
            raise bad(f"unknown reward {name!r}: use one of {', '.join(reward_names())}", param="reward")


def _param_of(message: str, changes: dict[str, Any]) -> str | None:
    return next((name for name in changes if name in message), None)


def _kind_name(kind: type) -> str:
    return {str: "a string", bool: "a boolean", dict: "an object", int: "an integer"}.get(kind, kind.__name__)
