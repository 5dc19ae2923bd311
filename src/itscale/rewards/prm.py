"""Hugging Face process reward models (optional extra: `pip install 'itscale[hf]'`).

Two formats, the two PRMs the literature uses:

- `format="qwen"` (Qwen2.5-Math-PRM-7B/72B, the paper's reward): the chat with the steps
  joined by `<extra_0>` and one after the last step; the model's token-level two-class
  head gives, at each separator, P(step is correct) = softmax(logits)[1]. The hub model
  ships its own modeling code (`Qwen2ForProcessRewardModel`), which runs only when asked
  for (`trust_remote_code=true`: it executes the checkpoint's Python); any checkpoint with
  a token-classification head and two labels (`*ForTokenClassification`) is read the same
  way without it.
- `format="math-shepherd"` (peiyi9979/math-shepherd-mistral-7b-prm): a causal LM; the
  question, a space, then every step followed by the step tag " ки"; at each tag the
  score is P("+") / (P("+") + P("-")) from the next-token logits.

Where a hub is reachable, the paper's reward model runs with

    pip install torch==2.13.0 transformers accelerate   # CPU wheel; on a GPU machine the CUDA one
    itscale solve "..." --reward 'hf-prm(model="Qwen/Qwen2.5-Math-PRM-7B", trust_remote_code=true)'

(the 7B model wants a GPU with ~16 GB, `device="cuda"` is chosen when one is present).
The tests use a tiny random Qwen2 model built on the spot, so loading, batching, padding
and the separator indexing run for real without a hub.

One forward pass scores every step of a prefix, so the earlier steps' scores are cached on
the side. Requests are sorted by length and run in batches of `batch_size` in a worker
thread (the event loop keeps serving). torch is imported only when a model is loaded, and a
loaded model is kept for the process (`_LOADED`): an evaluation makes a fresh reward for
every run (fresh score caches), not a fresh 15 GB model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from itscale.errors import ItscaleError, UsageError
from itscale.lm.chat import CHATML, ChatTemplate
from itscale.rewards.base import CachedReward, ScoreRequest, Scores
from itscale.rewards.remote_prm import QWEN_PRM_SEPARATOR, QWEN_PRM_SYSTEM, prm_text
from itscale.types import Prompt

FORMATS = ("qwen", "math-shepherd")
MATH_SHEPHERD_TAG = " ки"


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise ItscaleError(
            "the hf-prm reward needs torch and transformers: pip install torch==2.13.0 transformers accelerate "
            "(on a CPU-only machine; a bare `pip install torch` pulls several GB of CUDA libraries)"
        ) from None
    return torch, transformers


# Loaded (tokenizer, model) pairs, by (source, format, device, dtype, trust_remote_code).
_LOADED: dict[tuple, tuple[Any, Any]] = {}


def _load(transformers: Any, source: str, format: str, device: str, dtype: Any, trust_remote_code: bool) -> tuple:
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if format == "qwen":
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        custom = "Qwen2ForProcessRewardModel" in (config.architectures or [])
        if custom and not trust_remote_code:
            raise UsageError(
                f"{source} is a Qwen2ForProcessRewardModel, whose modeling code ships with the checkpoint: if "
                "you trust it, pass trust_remote_code=true (CLI: --reward 'hf-prm(model=..., trust_remote_code=true)')"
            )
        # The hub model's own Qwen2ForProcessRewardModel, else a standard token-classification head.
        loader = transformers.AutoModel if custom else transformers.AutoModelForTokenClassification
    else:
        loader = transformers.AutoModelForCausalLM
    model = loader.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return tokenizer, model


class HFProcessRewardModel(CachedReward):
    """Process reward from a Hugging Face PRM, on CPU or GPU, batched."""

    kind = "process"

    def __init__(
        self,
        model: str | Path,
        format: str = "qwen",
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        separator: str | None = None,
        system: str | None = QWEN_PRM_SYSTEM,
        good_token: str = "+",
        bad_token: str = "-",
        trust_remote_code: bool = False,
        name: str = "hf-prm",
    ):
        super().__init__()
        if format not in FORMATS:
            raise UsageError(f"unknown PRM format {format!r}: use one of {', '.join(FORMATS)}")
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        torch, transformers = _import_torch()
        self.torch, self.format, self.name, self.batch_size = torch, format, name, batch_size
        self.system = system
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device != "cpu" else torch.float32)
        source = str(model)
        key = (source, format, self.device, str(torch_dtype), trust_remote_code)
        if key not in _LOADED:
            _LOADED.clear()  # one PRM at a time: they are large
            _LOADED[key] = _load(transformers, source, format, self.device, torch_dtype, trust_remote_code)
        self.tokenizer, self.model = _LOADED[key]
        self.separator = separator or (QWEN_PRM_SEPARATOR if format == "qwen" else MATH_SHEPHERD_TAG)
        self.separator_id = self._last_token(self.separator)
        if format == "qwen":
            self.template = ChatTemplate(self.tokenizer.chat_template or CHATML)
        else:
            self.candidates = [self._last_token(good_token), self._last_token(bad_token)]

    def _last_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise UsageError(f"the tokenizer turns {text!r} into no token")
        return ids[-1]

    def text(self, prompt: Prompt, steps: Sequence[str]) -> str:
        """What the PRM reads for these steps (the separator is removed from the steps)."""
        clean = [s.replace(self.separator.strip(), " ") for s in steps]
        if self.format == "qwen":
            return prm_text(self.template, prompt, clean, self.separator, self.system)
        return prompt.problem + " " + "".join(s.strip() + self.separator + "\n" for s in clean)

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        texts = [self.text(r.prompt, r.steps) for r in requests]
        per_step, tokens = await asyncio.to_thread(self.step_scores, texts)
        values = []
        for r, scores in zip(requests, per_step, strict=True):
            if len(scores) != len(r.steps):
                raise ItscaleError(
                    f"the PRM input has {len(scores)} separators for {len(r.steps)} steps: the separator "
                    f"{self.separator!r} must be a token of its own in this tokenizer"
                )
            values.append(self.remember_prefixes(r, scores))
        return Scores(values, tokens=tokens)

    def step_scores(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """The score at every separator of every text, and the tokens evaluated."""
        torch = self.torch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[list[float]] = [[] for _ in texts]
        tokens = 0
        for start in range(0, len(order), self.batch_size):
            members = order[start : start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in members], return_tensors="pt", padding=True)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                output = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = output.logits if hasattr(output, "logits") else output[0]
            if self.format == "qwen":
                probabilities = torch.softmax(logits.float(), dim=-1)[..., 1]
            else:
                probabilities = torch.softmax(logits[..., self.candidates].float(), dim=-1)[..., 0]
            mask = (batch["input_ids"] == self.separator_id) & batch["attention_mask"].bool()
            for row, i in enumerate(members):
                results[i] = probabilities[row][mask[row]].tolist()
            tokens += int(batch["attention_mask"].sum())
        return results, tokens
