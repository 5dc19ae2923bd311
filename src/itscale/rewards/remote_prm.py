"""A process reward model served by vLLM's pooling API (a PRM served with `--task reward`).

Serve Qwen2.5-Math-PRM-7B on a GPU machine with

    vllm serve Qwen/Qwen2.5-Math-PRM-7B --task reward          # older vLLM
    vllm serve Qwen/Qwen2.5-Math-PRM-7B --runner pooling       # vLLM >= 0.10

and use `RemotePRM("http://host:8000")` (CLI: `--reward 'remote-prm(url="http://host:8000")'`).

The request is vLLM's documented pooling request, `POST /pooling` with
`{"model": ..., "input": [text, ...]}` (one entry per particle, all in one request). Each
text is the chat rendered with the steps of the answer joined by the step separator and a
separator after the last step (Qwen2.5-Math-PRM: `<extra_0>`). vLLM's PRM pooler (pooling
type STEP) returns, per input, one row of class probabilities per separator:

    {"object": "list", "model": ..., "usage": {"prompt_tokens": N, "total_tokens": N},
     "data": [{"index": 0, "object": "pooling", "data": [[p_bad, p_good], ...]}, ...]}

The score of step k is the probability of the positive class in row k (column
`positive_index`, 1 for Qwen2.5-Math-PRM). One forward pass scores every step of a prefix,
so the scores of the earlier steps are cached on the side. Math-Shepherd is served with
`--override-pooler-config '{"pooling_type": "STEP", "step_tag_id": 12902,
"returned_token_ids": [648, 387]}'` (rows are [P(+), P(-)]): use `separator=" ки"`,
`positive_index=0`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itscale.errors import BackendError, UsageError
from itscale.lm.chat import CHATML, ChatTemplate, template_from_model
from itscale.lm.openai import OpenAIModel
from itscale.rewards.base import CachedReward, ScoreRequest, Scores
from itscale.types import Message, Prompt

QWEN_PRM_SEPARATOR = "<extra_0>"
# The system prompt Qwen2.5-Math-PRM was trained with.
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def prm_text(template: ChatTemplate, prompt: Prompt, steps: Sequence[str], separator: str, system: str | None) -> str:
    """The chat as a PRM reads it: the problem, then the steps (stripped) each followed by
    the separator, in the assistant's turn."""
    messages = [m for m in prompt.messages if m.role != "system" or system is None]
    if system is not None:
        messages.insert(0, Message("system", system))
    answer = "".join(step.strip() + separator for step in steps)
    return template.render([*messages, Message("assistant", answer)], add_generation_prompt=False)


class RemotePRM(CachedReward):
    """Process reward from a PRM behind vLLM's `/pooling` endpoint."""

    kind = "process"

    def __init__(
        self,
        server: OpenAIModel | str,
        model: str | None = None,
        *,
        separator: str = QWEN_PRM_SEPARATOR,
        positive_index: int = 1,
        system: str | None = QWEN_PRM_SYSTEM,
        chat_template: str | None = None,
        max_batch: int = 64,
        api_key: str | None = None,
        name: str = "remote-prm",
    ):
        super().__init__()
        self.owns_server = isinstance(server, str)
        if isinstance(server, str):
            server = OpenAIModel(server, model, api_key=api_key)
        if max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {max_batch}")
        self.server, self.name = server, name
        self.separator, self.positive_index, self.system = separator, positive_index, system
        self.template = template_from_model(chat_template) if chat_template else ChatTemplate(CHATML)
        self.max_batch = max_batch

    async def close(self) -> None:
        """Closes the HTTP client this reward opened (a server given to it is its owner's)."""
        if self.owns_server:
            await self.server.close()

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        if self.server.model is None:
            await self.server.start(requests[0].prompt)  # learns the served model's name
        values: list[float] = []
        tokens = 0
        for start in range(0, len(requests), self.max_batch):
            chunk = requests[start : start + self.max_batch]
            texts = [prm_text(self.template, r.prompt, r.steps, self.separator, self.system) for r in chunk]
            payload = {"model": self.server.model, "input": texts}
            data = await self.server.request("POST", "/pooling", payload, under_v1=False)
            rows_per_input = _pooling_rows(data, len(chunk))
            for r, rows in zip(chunk, rows_per_input, strict=True):
                step_scores = [self._positive(row) for row in rows]
                if len(step_scores) != len(r.steps):
                    raise BackendError(
                        f"the PRM server returned {len(step_scores)} step scores for {len(r.steps)} steps: serve the "
                        f"PRM with the STEP pooler on the separator {self.separator!r} (see itscale.rewards.remote_prm)"
                    )
                values.append(self.remember_prefixes(r, step_scores))
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            tokens += int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
        return Scores(values, tokens=tokens)

    def _positive(self, row: Any) -> float:
        if not isinstance(row, list) or len(row) <= self.positive_index:
            raise BackendError(f"a PRM row should list class probabilities, got {str(row)[:80]}")
        return float(row[self.positive_index])


def _pooling_rows(data: dict, n: int) -> list[list]:
    """Per input, its rows of class probabilities, in input order."""
    items = data.get("data")
    if not isinstance(items, list) or len(items) != n:
        raise BackendError(f"the PRM server answered {str(data)[:200]} for {n} inputs (expected {n} 'data' entries)")
    ordered: list[list | None] = [None] * n
    for position, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("data"), list):
            raise BackendError(f"a pooling result carries no 'data' list: {str(item)[:200]}")
        index = item.get("index", position)
        if not isinstance(index, int) or not 0 <= index < n:
            raise BackendError(f"a pooling result has index {index!r} for {n} inputs")
        rows = item["data"]
        if rows and not isinstance(rows[0], list):
            rows = [rows]  # a single step may come back as one flat row
        ordered[index] = rows
    if any(rows is None for rows in ordered):
        raise BackendError("the PRM server returned duplicate indices")
    return ordered  # type: ignore[return-value]
