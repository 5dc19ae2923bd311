"""The data that flows through a search: prompts, steps, particles, usage and results.

A *particle* is one partial reasoning trace: the steps generated so far for one prompt, its
log-weight and the rewards its steps received. A search keeps a population of particles and
returns a `Result` with every final particle, the chosen answer, the resampling genealogy
and honest usage (every token generated, evaluated or scored, including reward calls).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from itscale.errors import UsageError

Role = Literal["system", "user", "assistant"]

# Why a step ended. "delimiter": the step delimiter was generated; "step_cap": the per-step
# token cap was reached (the particle goes on); "eos": the model ended its turn; "answer":
# the step completed a \boxed{} answer; "length": the particle's total token cap was reached;
# "max_steps": the step cap was reached; "stop": the step held one of the settings' stop strings.
StepEnd = Literal["delimiter", "step_cap", "eos", "answer", "length", "max_steps", "stop"]
FINISHING = frozenset({"eos", "answer", "length", "max_steps", "stop"})


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Prompt:
    """Chat input. Steps continue the final assistant turn the chat template opens."""

    messages: tuple[Message, ...]

    @classmethod
    def of(cls, problem: str | Prompt | list[Message] | list[dict], system: str | None = None) -> Prompt:
        """A prompt from a problem text, a list of messages or message dicts."""
        if isinstance(problem, Prompt):
            return problem
        if isinstance(problem, str):
            if not problem.strip():
                raise UsageError("the problem is empty: give the text of a problem to solve")
            messages = [Message("user", problem)]
            if system:
                messages.insert(0, Message("system", system))
            return cls(tuple(messages))
        messages = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in problem]
        if not messages or messages[-1].role != "user":
            raise UsageError("a chat prompt must end with a user message")
        if system and messages[0].role != "system":
            messages.insert(0, Message("system", system))
        return cls(tuple(messages))

    @property
    def problem(self) -> str:
        return self.messages[-1].content


@dataclass
class Step:
    """One generated step: its text (delimiter included) and what it cost."""

    text: str
    tokens: int
    end: StepEnd
    # Sum of the generator's log-probabilities of the sampled tokens (untempered), and the
    # mean over tokens of KL(uniform || p), when the backend returns them.
    logprob: float | None = None
    self_certainty: float | None = None
    # The process reward of this step, given the steps before it.
    score: float | None = None
    # The generator's hidden states after the step's last token, by layer ("final", or a
    # block index; the embedded engine with features on): what a learned reward reads. Kept
    # in memory; written out only when asked for (`Particle.to_dict(features=True)`).
    features: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self, features: bool = False) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "features"}
        if features and self.features is not None:
            out["features"] = {layer: [float(x) for x in state] for layer, state in self.features.items()}
        return out


@dataclass
class Particle:
    """A partial reasoning trace and its weight. `branch` is the backend's handle on its
    generation state (for the embedded engine, a KV-cache sequence); it is not serialised."""

    id: int
    steps: list[Step] = field(default_factory=list)
    parent: int | None = None
    finished: bool = False
    end: StepEnd | None = None
    log_weight: float = 0.0
    # The particle's aggregated reward (process rewards aggregated over steps, or outcome).
    score: float | None = None
    branch: Any = field(default=None, repr=False, compare=False)
    # Scratch space for a policy (for example the subtree a DVTS particle belongs to).
    tag: Any = field(default=None, repr=False, compare=False)
    # A retained trajectory this particle replays instead of generating (conditional SMC);
    # never inherited by copies.
    replay: Any = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        return "".join(step.text for step in self.steps)

    @property
    def tokens(self) -> int:
        return sum(step.tokens for step in self.steps)

    @property
    def answer(self) -> str | None:
        from itscale.answers import extract_answer

        return extract_answer(self.text)

    def step_scores(self) -> list[float]:
        return [s.score for s in self.steps if s.score is not None]

    def copy(self, new_id: int) -> Particle:
        """A child with the same steps and weight; the caller gives it its own branch."""
        return Particle(
            id=new_id,
            steps=[dataclasses.replace(s) for s in self.steps],
            parent=self.id,
            finished=self.finished,
            end=self.end,
            log_weight=self.log_weight,
            score=self.score,
            tag=self.tag,
        )

    def to_dict(self, features: bool = False) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "text": self.text,
            "answer": self.answer,
            "finished": self.finished,
            "end": self.end,
            "log_weight": self.log_weight,
            "score": self.score,
            "tokens": self.tokens,
            "steps": [s.to_dict(features) for s in self.steps],
        }


@dataclass
class Usage:
    """What a run cost. Prompt tokens are tokens the backend evaluated (for the embedded
    engine, the prompt once plus any prefix it had to re-evaluate; for a server, what the
    server reports it processed). Reward tokens are tokens evaluated or generated by
    reward models."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reward_tokens: int = 0
    lm_calls: int = 0
    reward_calls: int = 0
    scored_steps: int = 0
    seconds: float = 0.0
    lm_seconds: float = 0.0
    reward_seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.reward_tokens

    @property
    def budget_tokens(self) -> int:
        """Tokens counted against a token budget: generated plus reward tokens."""
        return self.completion_tokens + self.reward_tokens

    def add(self, other: Usage) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_tokens"] = self.total_tokens
        return out


@dataclass
class Resampling:
    """One selection event: `parents[i]` is the id of the particle that child `children[i]`
    was copied from. `ess` is the effective sample size before selection."""

    step: int
    parents: list[int]
    children: list[int]
    ess: float | None = None
    resampled: bool = True
    sweep: int = 0


@dataclass
class Result:
    answer: str | None
    text: str
    particles: list[Particle]
    weights: list[float]
    algorithm: str
    usage: Usage
    genealogy: list[Resampling] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # True when the token budget ran out before every particle finished.
    budget_limited: bool = False
    # Every step of every particle (an `itscale.trace.Trace`), when recorded.
    trace: Any = field(default=None, repr=False)

    def trace_dict(self) -> dict[str, Any] | None:
        """The trace as JSON-ready data, with what a viewer shows beside it."""
        if self.trace is None:
            return None
        return self.trace.to_dict(algorithm=self.algorithm, settings=self.settings, usage=self.usage.to_dict())

    def to_dict(self, features: bool = False, trace: bool = False) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "text": self.text,
            "algorithm": self.algorithm,
            "budget_limited": self.budget_limited,
            "weights": self.weights,
            "particles": [p.to_dict(features) for p in self.particles],
            "genealogy": [dataclasses.asdict(g) for g in self.genealogy],
            "usage": self.usage.to_dict(),
            "diagnostics": self.diagnostics,
            "settings": self.settings,
            **({"trace": self.trace_dict()} if trace and self.trace is not None else {}),
        }


class Stopwatch:
    """Accumulates elapsed seconds into a Usage field: `with Stopwatch(usage, "lm_seconds")`."""

    def __init__(self, usage: Usage, attribute: str):
        self.usage, self.attribute = usage, attribute

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        setattr(self.usage, self.attribute, getattr(self.usage, self.attribute) + elapsed)
