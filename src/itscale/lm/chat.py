"""Chat templates rendered client-side, so that steps continue the assistant turn.

A search generates an assistant answer step by step: the prompt is the chat rendered with
the generation prompt (`<|im_start|>assistant\\n` for ChatML), and every step is appended to
that text. Rendering on our side keeps the chat structure (system message, turns) with any
backend that accepts raw text (the embedded engine, `/v1/completions`).

Templates are the Jinja templates stored in GGUF files (`tokenizer.chat_template`) or served
by llama.cpp's `/props`; ChatML is the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.sandbox

from itscale.types import Message, Prompt

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

# The system prompt searches use by default: the format Qwen2.5-Math and the paper use,
# with the step structure made explicit so that "\n\n" separates steps.
MATH_SYSTEM_PROMPT = (
    "Please reason step by step, separating the steps with a blank line, and put your final answer within \\boxed{}."
)

_SENTINEL = "\u2063ITSCALE-SENTINEL\u2063"


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


@dataclass
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(self.source)

    def render(self, messages: list[Message] | tuple[Message, ...], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def prompt_text(self, prompt: Prompt) -> str:
        """The text the assistant's steps are appended to."""
        return self.render(prompt.messages, add_generation_prompt=True)

    def turn_suffix(self, question: str) -> str:
        """The text that closes an assistant turn, adds a user turn with `question` and
        opens the next assistant turn: what an LLM judge appends to a partial answer."""
        rendered = self.render(
            [Message("user", "x"), Message("assistant", _SENTINEL), Message("user", question)],
            add_generation_prompt=True,
        )
        if _SENTINEL not in rendered:
            rendered = CHATML_TEMPLATE.render(
                [Message("user", "x"), Message("assistant", _SENTINEL), Message("user", question)],
                add_generation_prompt=True,
            )
        return rendered.split(_SENTINEL, 1)[1]


CHATML_TEMPLATE = ChatTemplate(CHATML)


def template_from_model(source: str) -> ChatTemplate:
    """A chat template from a name: "chatml", a named model or a GGUF path (read from
    its metadata without loading the weights), else the text of a Jinja template."""
    from pathlib import Path

    from itscale.lm.models import MODELS, model_path

    if source.lower() == "chatml":
        return ChatTemplate(CHATML)
    if source in MODELS or (source.endswith(".gguf") and Path(source).expanduser().is_file()):
        return _gguf_template(str(model_path(source)))
    return ChatTemplate(source)


def _gguf_template(path: str) -> ChatTemplate:
    import ctypes

    import llama_cpp

    from itscale.lm.llamacpp import _init_backend

    _init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise ValueError(f"cannot read {path} as a GGUF model")
    try:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(model, b"tokenizer.chat_template", buf, len(buf))
        return ChatTemplate(buf.value.decode() if n > 0 else CHATML)
    finally:
        llama_cpp.llama_model_free(model)
