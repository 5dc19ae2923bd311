"""The short way in: open a model by name or URL, solve a problem with an algorithm by name.

    from itscale import solve
    result = solve("What is 12 * 7?", algorithm="particle-filter", budget=8)
    print(result.answer, result.usage.total_tokens)

For many problems, open the model once and call `asolve` (async) or an algorithm's `run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from itscale.errors import UsageError
from itscale.lm.base import LanguageModel
from itscale.lm.models import DEFAULT_MODEL
from itscale.rewards.base import Reward, close_reward
from itscale.rewards.registry import default_reward, make_reward
from itscale.search import make_algorithm, unused_reward_message
from itscale.search.population import Run
from itscale.search.settings import SearchSettings
from itscale.types import Prompt, Result


def open_model(
    model: str = DEFAULT_MODEL,
    *,
    backend_url: str | None = None,
    backend_model: str | None = None,
    backend_mode: str = "completions",
    chat_template: str | None = None,
    api_key: str | None = None,
    **engine_options: Any,
) -> LanguageModel:
    """The embedded engine for a named model or GGUF path, or a server when `backend_url`
    is given. `engine_options` go to LlamaCppModel (n_ctx, n_threads, n_batch, n_seq_max)."""
    if backend_url:
        from itscale.lm.openai import OpenAIModel

        return OpenAIModel(backend_url, backend_model, mode=backend_mode, chat_template=chat_template, api_key=api_key)
    from itscale.lm.llamacpp import LlamaCppModel

    return LlamaCppModel(model, chat_template=chat_template, **engine_options)


async def asolve(
    problem: str | Prompt,
    algorithm: str | None = None,
    *,
    lm: LanguageModel,
    reward: Reward | str | None = None,
    judge_model: Any = None,
    settings: SearchSettings | None = None,
    algorithm_options: dict[str, Any] | None = None,
    observer: Callable[[Run], None] | None = None,
    trace: bool = True,
    stream: Callable[[str], None] | None = None,
    **setting_values: Any,
) -> Result:
    """Solves one problem on an open model. `reward` None is the model's default
    (`default_reward`: a shipped learned head where its card says it beat the heuristic, else
    DEFAULT_REWARD). `algorithm` None is particle-filter, or compute-optimal for a budget
    "auto:B" (a mean budget per problem). `setting_values` are SearchSettings fields;
    `observer`, `trace` and `stream` are `Search.run`'s."""
    from itscale.search.allocation import resolve_budget

    algorithm, budget = resolve_budget(algorithm, setting_values.get("budget"), "particle-filter")
    if budget is not None:
        setting_values["budget"] = budget
    search = make_algorithm(algorithm, **(algorithm_options or {}))
    unknown = set(setting_values) - set(SearchSettings.field_names())
    if unknown:
        raise UsageError(
            f"unknown setting(s) {', '.join(sorted(unknown))}: use {', '.join(SearchSettings.field_names())}"
        )
    settings = (settings or SearchSettings()).replace(**setting_values)
    if reward is not None and not search.uses_reward:
        raise UsageError(unused_reward_message(algorithm, reward))
    if reward is None:
        reward = default_reward(lm, judge_model)
    if not isinstance(reward, str):
        return await search.run(lm, problem, settings, reward=reward, observer=observer, trace=trace, stream=stream)
    made = make_reward(reward, lm, judge_model) if search.uses_reward else None
    try:
        return await search.run(lm, problem, settings, reward=made, observer=observer, trace=trace, stream=stream)
    finally:
        await close_reward(made)  # made here: its resources (an HTTP client) are ours to free


def solve(
    problem: str | Prompt,
    algorithm: str | None = None,
    *,
    model: str = DEFAULT_MODEL,
    backend_url: str | None = None,
    backend_model: str | None = None,
    reward: Reward | str | None = None,
    algorithm_options: dict[str, Any] | None = None,
    **setting_values: Any,
) -> Result:
    """Opens the model, solves one problem, closes the model (`asolve`'s arguments)."""

    async def go() -> Result:
        lm = open_model(model, backend_url=backend_url, backend_model=backend_model)
        try:
            return await asolve(
                problem, algorithm, lm=lm, reward=reward, algorithm_options=algorithm_options, **setting_values
            )
        finally:
            await lm.close()

    return asyncio.run(go())
