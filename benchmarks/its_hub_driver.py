"""its_hub's particle filtering on one problem, for `benchmarks/vs_its_hub.py`.

    .cache/its-hub-venv/bin/python benchmarks/its_hub_driver.py < settings.json > result.json

Runs in its_hub's own venv (its_hub 1.2.0, `pip install 'its-hub[lm]==1.2.0'`), never in
ours, and imports nothing from itscale. It reads one JSON object on stdin (the problem, the
server URL, the search settings, and the judge's prompt pieces rendered by the caller with
itscale's chat template) and writes one JSON object on stdout (the chosen answer's text,
the wall seconds of `ainfer`, and what its_hub asked for).

What is its_hub's own, unchanged: `ParticleFiltering` (multinomial resampling at every step
on softmax of the logit of the reward, the argmax particle as the answer), `StepGeneration`
(steps end at the delimiter, a particle stops at "\\boxed" or after `max_steps`), and
`OpenAICompatibleLanguageModel` (one chat request per particle per step, the partial answer
sent back as an assistant turn with `continue_final_message`, the length as
`max_completion_tokens`). What this file adds, through subclasses:

- a token cap per particle, which its_hub does not have (with a step delimiter it takes no
  token count at all): each request may generate at most min(step cap, tokens the particle
  has left), and a particle that has used `max_tokens` stops, as itscale's do. To give each
  particle its own cap, a round's requests are issued by one `agenerate` call each instead
  of one call for all: the same requests, all in flight together;
- the reward: a process reward model (its_hub's `AbstractProcessRewardModel`) that asks the
  question itscale's `remote-judge` asks of the whole answer so far, and scores
  P(Yes) / (P(Yes) + P(No)) from the top log-probabilities of one token, by the same rule
  (`itscale.rewards.remote_judge.yes_no_probability`, copied below). When neither answer is
  among the top tokens the score is 0.5 (itscale's judge would ask a 0-10 rating instead);
  such cases are counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
import warnings
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
from its_hub.api import AbstractProcessRewardModel
from its_hub.api.types import GenerationUsage
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel
from its_hub.core.lms.step_generation import StepGeneration

warnings.filterwarnings("ignore", category=DeprecationWarning)  # agenerate() is "deprecated"


def yes_probability(yes: list[float], no: list[float], floor: float | None = None) -> float | None:
    """A copy of itscale.rewards.judge.yes_probability: this driver runs in its_hub's venv,
    where itscale (and the llama-cpp-python that module imports) is not installed."""
    if not yes and not no:
        return None
    if floor is not None:
        yes, no = list(yes) or [floor], list(no) or [floor]
    values = [*yes, *no]
    top = max(values)
    p_yes = sum(math.exp(v - top) for v in yes)
    p_no = sum(math.exp(v - top) for v in no)
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5


def yes_no_probability(top: dict[str, float]) -> float | None:
    """As itscale.rewards.remote_judge.yes_no_probability."""
    yes = [v for t, v in top.items() if t.strip().lower() == "yes"]
    no = [v for t, v in top.items() if t.strip().lower() == "no"]
    return yes_probability(yes, no, floor=min(top.values()))


class CappedLM(OpenAICompatibleLanguageModel):
    """its_hub's client, with one `agenerate` call per conversation so that each carries
    its own token cap (`caps`, set by `CappedSteps` before a round), and a record of each
    answer's completion tokens and finish reason (`last`, in request order)."""

    def __init__(self, **kwargs: Any):
        super().__init__(include_raw_choices=True, **kwargs)
        self.caps: list[int] | None = None
        self.last: list[tuple[int, str | None]] = []
        self.requests = 0
        self.completion_tokens = 0
        self.empty_steps = 0
        self.finish_reasons: Counter[str] = Counter()

    async def agenerate(self, messages_or_messages_lst, **kwargs):
        single = not isinstance(messages_or_messages_lst[0], list)
        conversations = [messages_or_messages_lst] if single else list(messages_or_messages_lst)
        requested = kwargs.pop("max_completion_tokens", None)
        requested = kwargs.pop("max_tokens", None) if requested is None else requested
        caps = self.caps or [requested] * len(conversations)
        temperature = kwargs.pop("temperature", None)
        temperatures = temperature if isinstance(temperature, list) else [temperature] * len(conversations)
        usages = [GenerationUsage() for _ in conversations]
        generate = super().agenerate
        messages = await asyncio.gather(
            *(
                generate(c, max_completion_tokens=cap, temperature=t, usage_accumulator=u, **kwargs)
                for c, cap, t, u in zip(conversations, caps, temperatures, usages, strict=True)
            )
        )
        self.last = []
        for message, usage in zip(messages, usages, strict=True):
            finish = (message.pop("_raw_choice", None) or {}).get("finish_reason")
            self.last.append((usage.completion_tokens, finish))
            self.requests += 1
            self.completion_tokens += usage.completion_tokens
            self.finish_reasons[str(finish)] += 1
            if not (message.get("content") or ""):
                self.empty_steps += 1
        return messages[0] if single else messages


class CappedSteps(StepGeneration):
    """its_hub's step generation plus a token cap per particle (see the module docstring).
    A particle is known by its steps: copies made by resampling share their count."""

    def __init__(self, *, max_tokens: int, step_cap: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_tokens, self.step_cap = max_tokens, step_cap
        self.used: dict[tuple[str, ...], int] = {}
        self.capped = 0

    async def aforward(self, lm, prompt_or_prompts, steps_so_far=None, tools=None, tool_choice=None):
        if isinstance(prompt_or_prompts, str):
            raise TypeError("particle filtering always asks for a batch of steps")
        used = [self.used.get(tuple(steps), 0) for steps in steps_so_far]
        lm.caps = [max(1, min(self.step_cap, self.max_tokens - u)) for u in used]
        try:
            results = await super().aforward(lm, prompt_or_prompts, steps_so_far, tools, tool_choice)
        finally:
            lm.caps = None
        out = []
        for steps, u, (step, stopped), (tokens, _) in zip(steps_so_far, used, results, lm.last, strict=True):
            total = u + tokens
            self.used[(*steps, step)] = total
            if total >= self.max_tokens and not stopped:
                self.capped += 1
                stopped = True
            out.append((step, stopped))
        return out


class YesNoJudge(AbstractProcessRewardModel):
    """P(Yes) from one token's top log-probabilities, asked of the whole answer so far on
    `/v1/completions`, with the prompt rendered by the caller: `prefix` (the chat up to the
    open assistant turn) + answer + `suffix` (closes the turn, asks the question)."""

    def __init__(self, url: str, model: str, problem: str, prefix: str, suffix: str, top_logprobs: int = 20):
        self.url, self.model, self.problem = url.rstrip("/") + "/completions", model, problem
        self.prefix, self.suffix, self.top_logprobs = prefix, suffix, top_logprobs
        self.session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.without_yes_no = 0

    def score(self, prompt_or_messages, steps):
        return asyncio.run(self.ascore(prompt_or_messages, steps))

    async def ascore(self, prompt_or_messages, steps):
        if prompt_or_messages != self.problem:
            raise ValueError("the judge was set up for another problem")
        answers = [steps] if isinstance(steps, str) else list(steps)
        if self.session is None:
            self.session = aiohttp.ClientSession()
        return list(await asyncio.gather(*(self._judge(answer) for answer in answers)))

    async def _judge(self, answer: str) -> float:
        payload = {
            "model": self.model,
            "prompt": self.prefix + answer + self.suffix,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.top_logprobs,
        }
        assert self.session is not None
        async with self.session.post(self.url, json=payload) as response:
            if response.status != 200:
                raise RuntimeError(f"the judge request failed: HTTP {response.status}: {(await response.text())[:300]}")
            data = await response.json()
        self.requests += 1
        logprobs = data["choices"][0].get("logprobs") or {}
        tops = logprobs.get("top_logprobs") or [{}]
        top = tops[0] or {}
        p = yes_no_probability(top) if top else None
        if p is None:
            self.without_yes_no += 1
            return 0.5
        return p

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    random.seed(cfg["seed"])  # its_hub resamples with `random` (multinomial) and numpy
    np.random.seed(cfg["seed"] % 2**32)
    lm = CappedLM(
        endpoint=cfg["url"], api_key="none", model_name=cfg["model"], system_prompt=cfg["system_prompt"], max_tries=3
    )
    sg = CappedSteps(
        max_steps=cfg["max_steps"],
        step_token=cfg["delimiter"],
        stop_token=r"\boxed",
        temperature=cfg["temperature"],
        include_stop_str_in_output=False,
        max_tokens=cfg["max_tokens"],
        step_cap=min(cfg["max_step_tokens"], cfg["max_tokens"]),
    )
    prm = YesNoJudge(cfg["url"], cfg["model"], cfg["problem"], cfg["judge_prefix"], cfg["judge_suffix"])
    pf = ParticleFiltering(sg, prm)  # its defaults: multinomial resampling, argmax selection
    try:
        started = time.perf_counter()
        result = await pf.ainfer(lm, cfg["problem"], cfg["budget"], return_response_only=False)
        wall = time.perf_counter() - started
    finally:
        await prm.close()
        await lm.close()
    return {
        "text": result.the_one["content"],
        "wall_seconds": wall,
        "selected_index": result.selected_index,
        "log_weights": [float(w) for w in result.log_weights_lst],
        "steps_used": [int(s) for s in result.steps_used_lst],
        "gen_requests": lm.requests,
        "completion_tokens": lm.completion_tokens,
        "empty_steps": lm.empty_steps,
        "finish_reasons": dict(lm.finish_reasons),
        "capped_particles": sg.capped,
        "judge_requests": prm.requests,
        "judge_without_yes_no": prm.without_yes_no,
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = json.load(sys.stdin)
    print(json.dumps(asyncio.run(run(cfg))))


if __name__ == "__main__":
    main()
