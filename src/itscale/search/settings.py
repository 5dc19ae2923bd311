"""The settings every algorithm accepts, and the seeds derived from them.

Every field has the same name in Python (`SearchSettings(max_steps=10)`), on the command
line (`--max-steps 10`) and in a server request (`"max_steps": 10`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from itscale.errors import UsageError
from itscale.lm.base import (
    DEFAULT_DELIMITER,
    StepSettings,
)
from itscale.lm.chat import MATH_SYSTEM_PROMPT


@dataclass(frozen=True)
class SearchSettings:
    """Settings every algorithm accepts, under the same names in Python, the CLI
    (`--max-steps`) and the server (`"max_steps"`).

    budget: particles (rollouts); seed: makes a run reproducible; max_steps: at most this
    many steps per particle; delimiter: ends a step ("\\n\\n", or a token count);
    max_step_tokens / max_tokens: caps per step / per particle; temperature, top_p: the
    generator's sampling; token_budget: a hard cap on generated plus reward tokens, after
    which the search returns its best current answer marked budget-limited; system_prompt:
    prepended when the prompt has none; stop: strings that end an answer where they appear
    (the text stops before them, as OpenAI's `stop`); reward_*: how a failing reward is
    handled.
    """

    budget: int = 8
    seed: int = 0
    max_steps: int = 40
    delimiter: str | int = DEFAULT_DELIMITER
    max_step_tokens: int = 256
    max_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 1.0
    token_budget: int | None = None
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    stop: tuple[str, ...] = ()
    reward_fallback: float = 0.5
    reward_timeout: float = 300.0
    max_reward_failures: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise UsageError(f"budget must be a positive integer, got {self.budget!r}")
        if self.max_steps < 1:
            raise UsageError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.token_budget is not None and self.token_budget < 1:
            raise UsageError(f"token_budget must be positive, got {self.token_budget}")
        if isinstance(self.stop, str) or not all(isinstance(t, str) and t for t in self.stop):
            raise UsageError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > 4:
            raise UsageError(f"at most 4 stop strings (as OpenAI allows), got {len(self.stop)}")
        if self.max_reward_failures < 1:
            raise UsageError(f"max_reward_failures must be at least 1, got {self.max_reward_failures}")
        if not 0.0 <= self.reward_fallback <= 1.0:
            raise UsageError(f"reward_fallback must be in [0, 1], got {self.reward_fallback}")
        self.step_settings()  # validates the step fields

    def step_settings(self, **overrides: Any) -> StepSettings:
        values = {
            "delimiter": self.delimiter,
            "max_step_tokens": self.max_step_tokens,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        values.update(overrides)
        return StepSettings(**values)

    def replace(self, **changes: Any) -> SearchSettings:
        return replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """What a stored record's meaning depends on, as JSON values: every field but the
        per-record grid (budget, seed). Fields added since records were first stored are
        left out at their defaults, so directories made before them still match."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("budget", "seed")}
        if not self.stop:
            del values["stop"]
        else:
            values["stop"] = list(self.stop)
        return values

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])
