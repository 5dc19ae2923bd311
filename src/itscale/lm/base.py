"""The `LanguageModel` protocol: extend many partial answers by one step, in one call.

A search never talks to a model one particle at a time. It asks a backend to *start* a
prompt, which gives a root `Branch`; it *forks* branches (a particle copied by resampling
gets a fork of its parent's branch); it *extends* a list of branches by one step each in a
single call; it *releases* branches it no longer needs. What a branch holds is the
backend's business: the embedded engine keeps a KV-cache sequence per branch, so a fork
shares the parent's cache instead of re-evaluating the prefix; a server backend keeps the
text and re-sends it (the server's prefix cache, if any, does the rest).

Forks are lazy and cheap to ask for: `fork` is synchronous, and the backend does the work
(a KV copy, or nothing) when the fork is first extended or scored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from itscale.errors import UsageError
from itscale.types import Prompt

DEFAULT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class StepSettings:
    """How one step is generated.

    `delimiter` ends a step when generated (the step keeps it); an integer instead makes
    every step that many tokens. `max_step_tokens` caps one step (the particle goes on);
    `max_tokens` caps a particle's whole answer (the particle finishes with end "length").
    `temperature` 0 is greedy decoding. `logprobs`: whether the sampled tokens'
    log-probabilities are wanted (a reward reads them); the embedded engine has them for
    free, a server is asked for them only when they are wanted, because some servers
    (llama-cpp-python's) decode ten times slower when they must return them.
    """

    delimiter: str | int = DEFAULT_DELIMITER
    max_step_tokens: int = 256
    max_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 1.0
    logprobs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.delimiter, str) and not self.delimiter:
            raise UsageError("the step delimiter is empty: give a string such as '\\n\\n' or a token count")
        if isinstance(self.delimiter, int) and self.delimiter < 1:
            raise UsageError(f"a token-count step delimiter must be at least 1, got {self.delimiter}")
        if self.max_step_tokens < 1 or self.max_tokens < 1:
            raise UsageError("max_step_tokens and max_tokens must be at least 1")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def step_token_cap(self) -> int:
        if isinstance(self.delimiter, int):
            return min(self.delimiter, self.max_step_tokens)
        return self.max_step_tokens


@dataclass
class StepOutput:
    """One branch's new step. `end` is "delimiter", "step_cap" or "eos" (the model ended
    its answer). `prompt_tokens` counts the tokens the backend had to evaluate to serve the
    request (for a server, the whole re-sent prefix; for the engine, the shared prompt once
    and any prefix it could not take from the cache)."""

    text: str
    tokens: int
    end: str
    prompt_tokens: int = 0
    logprob: float | None = None
    self_certainty: float | None = None
    # The generator's hidden states after the step's last token, by layer ("final", or a
    # block index), when the backend supplies them (the embedded engine with features on).
    features: dict[str, np.ndarray] | None = field(default=None, repr=False)


class Branch:
    """A backend's handle on one partial answer. `steps` holds the text of each step."""

    prompt: Prompt
    steps: list[str]


@runtime_checkable
class LanguageModel(Protocol):
    name: str

    async def start(self, prompt: Prompt) -> Branch:
        """A root branch for the prompt (no step yet). Cheap: evaluation is deferred."""
        ...

    async def extend(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[StepOutput]:
        """Extends every branch by one step, all in one batched call; each branch is
        updated in place. `seeds[i]` seeds branch i's sampling; `max_new_tokens[i]` lowers
        its step cap (the particle's remaining token allowance)."""
        ...

    def fork(self, branch: Branch, steps: int | None = None) -> Branch:
        """A new branch with the first `steps` steps of `branch` (all when None)."""
        ...

    def release(self, branch: Branch) -> None:
        """The caller no longer needs `branch`; its resources may be reused."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ExtendsToEnd(Protocol):
    """An optional backend capability: extend branches step after step to their ends in one
    call, each branch starting its next step as soon as its last one ends (see
    `itscale.search.population.extend_to_end`, which falls back to `extend` without it)."""

    async def extend_to_end(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        stop: Callable[[str], bool],
    ) -> list[list[StepOutput]]:
        """Per branch, its new steps: step k seeded by `seeds[i][k]`; it stops after a step
        that ends the answer (end of turn, "length"), that `stop(text)` accepts, that spends
        `max_new_tokens[i]`, or the last seed's step."""
        ...


def step_end(step: str | bytes, piece: str | bytes, delimiter: str | bytes | int, tokens: int, cap: int) -> str | None:
    """How the step ends with the token `piece`, just added to `step` (the step so far, as
    text or as bytes like `delimiter`), its `tokens`-th: "delimiter" when the token completes
    the delimiter (the step keeps the whole token) or reaches a token-count delimiter,
    "step_cap" at `cap` tokens, else None (the step goes on). The engine and the server
    backend's rollout split both cut steps by this rule."""
    if isinstance(delimiter, int):
        if tokens >= delimiter:
            return "delimiter"
    elif delimiter in step[-(len(piece) + len(delimiter)) :]:
        return "delimiter"
    return "step_cap" if tokens >= cap else None


def ends_rollout(out: StepOutput, tokens_left: int, stop: Callable[[str], bool]) -> bool:
    """Whether a branch extended to its end stops after the step `out` (besides running out
    of step seeds): the model ended its answer, its tokens are spent, or `stop` accepts the
    step's text. Every `extend_to_end` applies this same rule."""
    return out.end in ("eos", "length") or tokens_left <= 0 or stop(out.text)


async def extend_step_by_step(
    lm: LanguageModel,
    branches: Sequence[Branch],
    settings: StepSettings,
    seeds: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    stop: Callable[[str], bool],
) -> list[list[StepOutput]]:
    """`extend_to_end` for a backend without one: each branch's steps are requested one
    after another with `extend`, the branches concurrently."""

    async def one(branch: Branch, step_seeds: Sequence[int], allowance: int) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for seed in step_seeds:
            out = (await lm.extend([branch], settings, [seed], [allowance]))[0]
            outputs.append(out)
            allowance -= out.tokens
            if ends_rollout(out, allowance, stop):
                break
        return outputs

    return list(await asyncio.gather(*(one(*args) for args in zip(branches, seeds, max_new_tokens, strict=True))))
