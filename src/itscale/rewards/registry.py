"""Rewards by name, for the CLI, the server and configuration files.

`make_reward` takes a reward spec (see `itscale.rewards.spec`): a name such as
"arithmetic", a name with options such as `self-certainty(variant=kl)`, or a product with
exponents such as "arithmetic * llm-judge" or "arithmetic^2 * llm-judge". Keyword options
given to `make_reward` go to the reward; in a product, `factor.option` targets one factor
and a plain option goes to every factor that accepts it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itscale.errors import UsageError
from itscale.lm.base import LanguageModel
from itscale.rewards.base import ProductReward, Reward
from itscale.rewards.spec import parse_spec

# The reward particle filtering uses when none is named, chosen from the table in
# docs/rewards.md (GSM8K, 8 samples per problem from the embedded model): the arithmetic
# verifier times self-certainty, scored on the whole prefix (aggregation "model", the
# search's default), ranks right answers above wrong ones better than the embedded LLM
# judge, and costs nothing (no model call: the generator's own log-probabilities and an
# exact check of the equations).
DEFAULT_REWARD = "arithmetic * self-certainty"


def default_reward(lm: Any, judge_model: Any = None) -> str:
    """The reward a search uses when none is named: the learned probe where a head is shipped
    for the embedded model and its card says it beat the heuristic (`"default": true`, set
    from the measurements in docs/rewards.md), else `DEFAULT_REWARD`."""
    from itscale.lm.llamacpp import LlamaCppModel

    model = lm if isinstance(lm, LlamaCppModel) else judge_model
    return default_reward_for(model.name if isinstance(model, LlamaCppModel) else None)


def default_reward_for(embedded_model: str | None) -> str:
    """`default_reward` by the embedded model's name, before any model is opened (an
    evaluation's plan): None when the generator is a server without an embedded judge."""
    from itscale.rewards.probe import read_card, shipped_head

    head = shipped_head(embedded_model) if embedded_model else None
    if head is None or not read_card(head).get("default"):
        return DEFAULT_REWARD
    return "probe"


@dataclass(frozen=True)
class RewardEntry:
    build: Callable[..., Reward]
    summary: str


def reward_names() -> list[str]:
    return list(REWARDS)


def make_reward(name: str, lm: LanguageModel | None = None, judge_model: Any = None, **options: Any) -> Reward:
    """A reward from a spec. `lm` is the generator (an embedded judge reuses its KV cache
    when it is the same engine; a remote judge uses its server when no url is given);
    `judge_model` an embedded model to judge with otherwise."""
    factors = parse_spec(name)
    if len(factors) == 1 and factors[0].exponent == 1.0:
        factor = factors[0]
        return _build(factor.name, lm, judge_model, {**factor.options, **options})
    names = [f.name for f in factors]
    for key in options:
        target = key.split(".", 1)[0] if "." in key else None
        if target is not None and target not in names:
            raise UsageError(f"option {key!r} names no factor of {name!r} (factors: {', '.join(names)})")
    built = []
    for factor in factors:
        entry = _entry(factor.name)
        accepted = _accepted_options(entry)
        chosen = {k.split(".", 1)[1]: v for k, v in options.items() if k.startswith(factor.name + ".")}
        chosen.update({k: v for k, v in options.items() if "." not in k and k in accepted})
        built.append((_build(factor.name, lm, judge_model, {**factor.options, **chosen}), factor.exponent))
    leftover = [k for k in options if "." not in k and not any(k in _accepted_options(_entry(n)) for n in names)]
    if leftover:
        raise UsageError(f"option(s) {', '.join(leftover)} fit no factor of {name!r}")
    return ProductReward(built)


def _entry(name: str) -> RewardEntry:
    try:
        return REWARDS[name]
    except KeyError:
        raise UsageError(f"unknown reward {name!r}: use one of {', '.join(REWARDS)} (see `itscale rewards`)") from None


def _accepted_options(entry: RewardEntry) -> set[str]:
    parameters = inspect.signature(entry.build).parameters
    return {p for p in parameters if p not in ("lm", "judge_model")}


def _build(name: str, lm: Any, judge_model: Any, options: dict[str, Any]) -> Reward:
    entry = _entry(name)
    accepted = _accepted_options(entry)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UsageError(
            f"reward {name!r} takes no option {', '.join(map(repr, unknown))}: "
            f"its options are {', '.join(sorted(accepted)) or 'none'}"
        )
    try:
        return entry.build(lm, judge_model, **options)
    except (TypeError, ValueError) as error:
        if isinstance(error, UsageError):
            raise
        raise UsageError(f"bad option for reward {name!r}: {error}") from None


def _embedded(lm: Any, judge_model: Any) -> Any:
    from itscale.lm.llamacpp import LlamaCppModel

    if judge_model is not None:
        return judge_model
    if isinstance(lm, LlamaCppModel):
        return lm
    raise UsageError(
        "the llm-judge reward runs on an embedded model: pass judge_model (CLI: --judge-model "
        "qwen2.5-coder-0.5b), or use remote-judge, which asks the generator's server"
    )


def _llm_judge(lm: Any, judge_model: Any, step_question: str | None = None, prefix_question: str | None = None):
    from itscale.rewards.judge import PREFIX_QUESTION, STEP_QUESTION, LLMJudge

    return LLMJudge(_embedded(lm, judge_model), step_question or STEP_QUESTION, prefix_question or PREFIX_QUESTION)


def _remote_judge(
    lm: Any,
    judge_model: Any,
    url: str | None = None,
    model: str | None = None,
    mode: str = "completions",
    chat_template: str | None = None,
    step_question: str | None = None,
    prefix_question: str | None = None,
    logprobs: bool = True,
    top_logprobs: int = 20,
):
    from itscale.lm.openai import OpenAIModel
    from itscale.rewards.judge import PREFIX_QUESTION, STEP_QUESTION
    from itscale.rewards.remote_judge import RemoteJudge

    if url is None:
        if not isinstance(lm, OpenAIModel):
            raise UsageError(
                "remote-judge needs a server: give url=... (CLI: --reward 'remote-judge(url=\"http://...\")')"
            )
        server: OpenAIModel | str = lm
    else:
        server = url
    return RemoteJudge(
        server,
        model,
        mode=mode,
        chat_template=chat_template,
        step_question=step_question or STEP_QUESTION,
        prefix_question=prefix_question or PREFIX_QUESTION,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _hf_prm(
    lm: Any,
    judge_model: Any,
    model: str | None = None,
    format: str = "qwen",
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    trust_remote_code: bool = False,
):
    from itscale.rewards.prm import HFProcessRewardModel

    if not model:
        raise UsageError('hf-prm needs a model: hf-prm(model="Qwen/Qwen2.5-Math-PRM-7B") or a local directory')
    return HFProcessRewardModel(
        model, format, device=device, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code
    )


def _remote_prm(
    lm: Any,
    judge_model: Any,
    url: str | None = None,
    model: str | None = None,
    separator: str | None = None,
    positive_index: int = 1,
    max_batch: int = 64,
):
    from itscale.rewards.remote_prm import QWEN_PRM_SEPARATOR, RemotePRM

    if not url:
        raise UsageError('remote-prm needs the PRM server: remote-prm(url="http://host:8000")')
    return RemotePRM(
        url, model, separator=separator or QWEN_PRM_SEPARATOR, positive_index=positive_index, max_batch=max_batch
    )


def _arithmetic(lm: Any, judge_model: Any, right: float = 0.95, wrong: float = 0.05, neutral: float = 0.5):
    from itscale.rewards.arithmetic import ArithmeticVerifier

    return ArithmeticVerifier(right, wrong, neutral)


def _self_certainty(lm: Any, judge_model: Any, variant: str = "mean-logprob", scale: float | None = None):
    from itscale.rewards.certainty import DEFAULT_KL_SCALE, SelfCertainty

    return SelfCertainty(variant, scale or DEFAULT_KL_SCALE)


def _self_certainty_kl(lm: Any, judge_model: Any, scale: float | None = None):
    return _self_certainty(lm, judge_model, "kl", scale)


def _probe(lm: Any, judge_model: Any, path: str | None = None):
    from itscale.lm.llamacpp import LlamaCppModel
    from itscale.rewards.probe import ProbeReward, shipped_head

    model = lm if isinstance(lm, LlamaCppModel) else judge_model
    if not isinstance(model, LlamaCppModel):
        raise UsageError(
            "the probe reward reads the hidden states of the embedded model its head was trained for: with a "
            "server generator, give that model as the judge (CLI: --judge-model qwen2.5-coder-0.5b), and the "
            "server's steps are evaluated on it"
        )
    if path is None:
        path = shipped_head(model.name)
        if path is None:
            raise UsageError(
                f"no probe head is shipped for {model.name}: train one with `itscale train-reward --model "
                f'{model.name} --out DIR`, then use probe(path="DIR")'
            )
    return ProbeReward(model, path)


def _reference(lm: Any, judge_model: Any, reference: str | None = None):
    from itscale.rewards.reference import ReferenceVerifier

    return ReferenceVerifier(reference)


REWARDS: dict[str, RewardEntry] = {
    "llm-judge": RewardEntry(_llm_judge, "P(Yes) from an embedded model asked about the step, on a KV fork"),
    "remote-judge": RewardEntry(_remote_judge, "P(Yes) from a judge on an OpenAI-compatible server (0-10 fallback)"),
    "hf-prm": RewardEntry(_hf_prm, "a Hugging Face PRM: Qwen2.5-Math-PRM or Math-Shepherd format (extra: hf)"),
    "remote-prm": RewardEntry(_remote_prm, "a PRM served by vLLM's pooling API (--task reward)"),
    "arithmetic": RewardEntry(_arithmetic, "checks the equations a step states, exactly (no model)"),
    "self-certainty": RewardEntry(_self_certainty, "exp(mean token log-probability) of the step (free)"),
    "self-certainty-kl": RewardEntry(
        _self_certainty_kl, "mean KL(uniform || p) of the step tokens, mapped to [0, 1] (free)"
    ),
    "probe": RewardEntry(
        _probe, "P(right | prefix) from a head trained on the generator's hidden states (free beside generation)"
    ),
    "reference": RewardEntry(_reference, "1 if the answer matches the known one: evaluation only, warns"),
}
