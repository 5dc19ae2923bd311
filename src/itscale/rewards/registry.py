"""Rewards by name, for the CLI, the server and configuration files."""

from __future__ import annotations

from typing import Any

from itscale.errors import UsageError
from itscale.lm.base import LanguageModel
from itscale.rewards.base import Reward


def reward_names() -> list[str]:
    return list(_BUILDERS)


def make_reward(name: str, lm: LanguageModel, judge_model: Any = None, **options: Any) -> Reward:
    """A reward by name. `lm` is the generator (an embedded judge reuses its KV cache when
    it is the same engine); `judge_model` an embedded model to judge with otherwise."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise UsageError(f"unknown reward {name!r}: use one of {', '.join(_BUILDERS)}") from None
    return builder(lm, judge_model, **options)


def _embedded(lm: LanguageModel, judge_model: Any):
    from itscale.lm.llamacpp import LlamaCppModel

    if judge_model is not None:
        return judge_model
    if isinstance(lm, LlamaCppModel):
        return lm
    raise UsageError(
        "the llm-judge reward runs on an embedded model: pass judge_model (CLI: --judge-model "
        "qwen2.5-coder-0.5b), or choose a reward that works with a server"
    )


def _llm_judge(lm: LanguageModel, judge_model: Any, **options: Any) -> Reward:
    from itscale.rewards.judge import LLMJudge

    return LLMJudge(_embedded(lm, judge_model), **options)


_BUILDERS = {
    "llm-judge": _llm_judge,
}
DEFAULT_REWARD = "llm-judge"
