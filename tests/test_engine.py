"""The embedded engine on a real model (SmolLM2-135M): batching, KV forks, step ends."""

from __future__ import annotations

import math

import pytest

from itscale.errors import ItscaleError, UsageError
from itscale.lm.base import StepSettings
from itscale.lm.chat import MATH_SYSTEM_PROMPT
from itscale.lm.llamacpp import LlamaCppModel, _incomplete_utf8
from itscale.rewards.base import ScoreRequest
from itscale.rewards.judge import yes_probability
from itscale.rewards.text_tree import TextBranches
from itscale.types import Prompt

PROBLEM = Prompt.of("Tom has 3 apples and buys 4 more. How many apples does he have?", system=MATH_SYSTEM_PROMPT)
GREEDY = StepSettings(temperature=0.0, max_step_tokens=20)


async def test_batched_greedy_steps_match_a_single_sequence(smol: LlamaCppModel) -> None:
    root = await smol.start(PROBLEM)
    alone = smol.fork(root)
    together = [smol.fork(root) for _ in range(3)]
    smol.release(root)
    single = [(await smol.extend([alone], GREEDY, [0]))[0].text for _ in range(2)]
    batched = []
    for _ in range(2):
        outs = await smol.extend(together, GREEDY, [1, 2, 3])
        batched.append(outs)
    for step, outs in enumerate(batched):
        assert [o.text for o in outs] == [single[step]] * 3
    for b in [alone, *together]:
        smol.release(b)


async def test_prompt_is_evaluated_once_and_shared(smol: LlamaCppModel) -> None:
    root = await smol.start(PROBLEM)
    n_prompt = len(root.tokens)
    branches = [smol.fork(root) for _ in range(6)]
    smol.release(root)
    before = dict(smol.stats)
    outs = await smol.extend(branches, StepSettings(max_step_tokens=8), list(range(6)))
    # The whole prompt is charged once; every other fork only feeds the pending last token.
    assert sorted(o.prompt_tokens for o in outs) == [1, 1, 1, 1, 1, n_prompt]
    generated = sum(o.tokens for o in outs)
    evaluated = smol.stats["evaluated_tokens"] - before["evaluated_tokens"]
    assert evaluated == n_prompt - 1 + 6 + generated - sum(1 for o in outs if o.end != "eos")
    # The time accounting benchmarks rely on: the shared prompt is evaluated in a round of
    # its own, then every round samples one token for each sequence still in its step.
    spent = {key: smol.stats[key] - before[key] for key in before}
    assert spent["generated_tokens"] == generated
    assert spent["generating_rounds"] == max(o.tokens for o in outs)
    assert spent["generating_seconds"] > 0 and spent["evaluating_seconds"] > 0
    for b in branches:
        smol.release(b)


async def test_steps_to_the_end_are_the_steps_one_at_a_time_without_waiting(smol: LlamaCppModel) -> None:
    settings = StepSettings(temperature=0.8, max_step_tokens=12, delimiter="\n")
    seeds = [[11 * i + k for k in range(6)] for i in range(3)]
    root = await smol.start(PROBLEM)
    stepped, together = [smol.fork(root) for _ in range(3)], [smol.fork(root) for _ in range(3)]
    smol.release(root)
    one_at_a_time = []
    for i, branch in enumerate(stepped):
        outs, left = [], 40
        for seed in seeds[i]:
            out = (await smol.extend([branch], settings, [seed], [left]))[0]
            outs.append(out)
            left -= out.tokens
            if out.end == "eos" or left <= 0 or "=" in out.text:
                break
        one_at_a_time.append(outs)
    before = dict(smol.stats)
    to_end = await smol.extend_to_end(together, settings, seeds, [40] * 3, stop=lambda text: "=" in text)
    assert [[o.text for o in outs] for outs in to_end] == [[o.text for o in outs] for outs in one_at_a_time]
    assert [[o.end for o in outs] for outs in to_end] == [[o.end for o in outs] for outs in one_at_a_time]
    assert [b.steps for b in together] == [b.steps for b in stepped]
    # No branch waited at a step boundary: one round per token of the longest branch.
    totals = [sum(o.tokens for o in outs) for outs in to_end]
    assert smol.stats["generating_rounds"] - before["generating_rounds"] == max(totals)
    assert all(total <= 40 for total in totals) and max(len(outs) for outs in to_end) > 1
    for b in [*stepped, *together]:
        smol.release(b)


@pytest.mark.parametrize("layout", ["smol", "smol_per_sequence"])
async def test_forks_share_the_parent_cache_instead_of_re_evaluating(layout: str, request) -> None:
    """In a unified cache a fork shares its parent's cells; with a buffer per sequence it
    copies them (then cuts them to the shared prefix). Either way nothing is evaluated again
    and the fork continues exactly as its parent would."""
    smol = request.getfixturevalue(layout)
    root = await smol.start(PROBLEM)
    parent = smol.fork(root)
    control = smol.fork(root)
    smol.release(root)
    await smol.extend([parent, control], GREEDY, [0, 0])
    children = [smol.fork(parent) for _ in range(3)]
    copies_before = smol.stats["kv_copies"]
    smol.release(parent)  # the first child inherits the slot, the others copy from it
    outs = await smol.extend(children, GREEDY, [5, 6, 7])
    expected = (await smol.extend([control], GREEDY, [0]))[0]
    assert [o.text for o in outs] == [expected.text] * 3
    assert all(o.prompt_tokens == 0 for o in outs)  # nothing re-evaluated
    assert smol.stats["kv_copies"] - copies_before == 2
    # A fork from an earlier step continues from there.
    early = smol.fork(children[0], steps=1)
    assert early.steps == children[0].steps[:1]
    again = await smol.extend([early], GREEDY, [0])
    assert again[0].text == expected.text
    for b in [*children, control, early]:
        smol.release(b)


async def test_steps_end_at_the_delimiter_the_cap_or_eos(smol: LlamaCppModel) -> None:
    root = await smol.start(PROBLEM)
    branches = [smol.fork(root) for _ in range(4)]
    smol.release(root)
    settings = StepSettings(temperature=0.8, max_step_tokens=40)
    for _ in range(2):
        live = [b for b in branches if not b.finished]
        if not live:
            break
        for out in await smol.extend(live, settings, [11, 12, 13, 14][: len(live)]):
            assert out.end in ("delimiter", "step_cap", "eos")
            if out.end == "delimiter":
                assert out.text.endswith("\n\n")
                assert "\n\n" not in out.text[:-2].rstrip("\n")
            if out.end == "step_cap":
                assert out.tokens >= 40
            assert out.logprob is not None and out.logprob <= 0
            assert out.self_certainty is not None and out.self_certainty >= 0
    capped = smol.fork(branches[0], steps=0)
    out = (await smol.extend([capped], StepSettings(max_step_tokens=5, temperature=0), [0]))[0]
    assert (out.tokens, out.end) == (5, "step_cap")
    counted = smol.fork(branches[0], steps=0)
    for _ in range(2):
        out = (await smol.extend([counted], StepSettings(delimiter=7, temperature=0.7), [3]))[0]
        assert (out.tokens, out.end) == (7, "delimiter")
    lowered = smol.fork(branches[0], steps=0)
    out = (await smol.extend([lowered], GREEDY, [0], max_new_tokens=[3]))[0]
    assert out.tokens == 3
    for b in [*branches, capped, counted, lowered]:
        smol.release(b)


async def test_sampling_is_seeded_per_request(smol: LlamaCppModel) -> None:
    async def sample(seeds: list[int]) -> list[str]:
        root = await smol.start(PROBLEM)
        branches = [smol.fork(root) for _ in seeds]
        smol.release(root)
        outs = await smol.extend(branches, StepSettings(temperature=1.0, max_step_tokens=24), seeds)
        for b in branches:
            smol.release(b)
        return [o.text for o in outs]

    first = await sample([1, 2, 3])
    assert await sample([1, 2, 3]) == first
    assert len(set(first)) > 1  # different seeds give different samples


async def test_eviction_re_evaluates_and_counts_it() -> None:
    small = LlamaCppModel("smollm2-135m", n_ctx=4096, n_seq_max=3, n_threads=2)
    try:
        root = await small.start(PROBLEM)
        first = [small.fork(root) for _ in range(2)]
        small.release(root)
        await small.extend(first, GREEDY, [0, 0])
        # Two more branches of another prompt need slots: the idle ones are evicted.
        other_root = await small.start(Prompt.of("Say hello.", system=MATH_SYSTEM_PROMPT))
        second = [small.fork(other_root) for _ in range(2)]
        small.release(other_root)
        await small.extend(second, GREEDY, [0, 0])
        assert small.stats["evictions"] >= 1
        # The evicted branches still continue correctly: their prefix is re-evaluated.
        outs = await small.extend(first, GREEDY, [0, 0])
        assert outs[0].text == outs[1].text
        assert max(o.prompt_tokens for o in outs) > len(first[0].tokens) // 2
        with pytest.raises(ItscaleError, match="raise n_seq_max"):
            root = await small.start(PROBLEM)
            too_many = [small.fork(root) for _ in range(4)]
            await small.extend(too_many, GREEDY, [0] * 4)
    finally:
        small.shutdown()


async def test_a_full_kv_cache_is_a_clear_error() -> None:
    tiny = LlamaCppModel("smollm2-135m", n_ctx=256, n_seq_max=4, n_threads=2)
    try:
        root = await tiny.start(PROBLEM)
        branches = [tiny.fork(root) for _ in range(4)]
        tiny.release(root)
        with pytest.raises(ItscaleError, match="KV cache is full"):
            for _ in range(20):
                await tiny.extend(branches, StepSettings(temperature=0.0, max_step_tokens=64, delimiter=64), [0] * 4)
    finally:
        tiny.shutdown()


async def test_judge_scores_on_a_fork_equal_scoring_from_text(smol: LlamaCppModel) -> None:
    root = await smol.start(PROBLEM)
    branch = smol.fork(root)
    smol.release(root)
    await smol.extend([branch], GREEDY, [0])
    suffix = smol.tokenize(smol.template.turn_suffix("Is the last step correct? Answer Yes or No."))
    yes, no = smol.tokenize("Yes", special=False)[0], smol.tokenize("No", special=False)[0]
    [(on_fork, cost)] = await smol.next_token_logprobs([branch], [suffix], [yes, no])
    assert cost == len(suffix) + 1  # the suffix and the pending token: the prefix is shared
    texts = TextBranches(smol)  # the same text evaluated on its own, as a judge does for a server's steps
    from_text = await texts.branch(ScoreRequest(PROBLEM, (branch.steps[0],)))
    [(on_text, cost_text)] = await smol.next_token_logprobs([from_text], [suffix], [yes, no])
    assert cost_text > cost
    # Identical tokens; batched prompt processing and one-token decoding round differently
    # (different matmul kernels), so log-probabilities agree to a few hundredths.
    assert on_fork == pytest.approx(on_text, abs=0.15)
    assert yes_probability(on_fork[:1], on_fork[1:]) == pytest.approx(
        yes_probability(on_text[:1], on_text[1:]), abs=0.03
    )
    assert all(v < 0 for v in on_fork) and math.exp(on_fork[0]) + math.exp(on_fork[1]) <= 1.0001
    # The branch itself is untouched by scoring and can go on.
    assert len(branch.steps) == 1
    await smol.extend([branch], GREEDY, [0])
    texts.release()
    for b in [branch]:
        smol.release(b)


def test_incomplete_utf8() -> None:
    euro = "€".encode()
    assert _incomplete_utf8(bytearray(b"ab" + euro[:2]))
    assert not _incomplete_utf8(bytearray(b"ab" + euro))
    assert not _incomplete_utf8(bytearray(b"plain"))


async def test_a_closed_engine_refuses_work() -> None:
    engine = LlamaCppModel("smollm2-135m", n_ctx=1024, n_seq_max=2, n_threads=2)
    root = await engine.start(PROBLEM)
    engine.shutdown()
    with pytest.raises(ItscaleError, match="closed"):
        await engine.extend([engine.fork(root)], GREEDY, [0])


async def test_a_cancelled_caller_does_not_disturb_the_others(smol: LlamaCppModel) -> None:
    import asyncio

    root = await smol.start(PROBLEM)
    doomed, other = smol.fork(root), smol.fork(root)
    smol.release(root)
    long_step = StepSettings(delimiter=64, max_step_tokens=64, temperature=0.0)
    task = asyncio.create_task(smol.extend([doomed], long_step, [0]))
    await asyncio.sleep(0.3)  # the work is running on the engine thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outs = await smol.extend([other], GREEDY, [0])  # shares rounds with the cancelled work
    assert outs[0].tokens > 0
    smol.release(doomed)
    smol.release(other)
    fresh_root = await smol.start(PROBLEM)
    fresh = smol.fork(fresh_root)
    smol.release(fresh_root)
    await smol.extend([fresh], StepSettings(max_step_tokens=1), [0])
    assert smol.cached_branches == 1, smol._slot_owner  # only the branch just made holds cells
    smol.release(fresh)


async def test_a_search_on_a_per_sequence_cache_matches_the_unified_one(smol, smol_per_sequence) -> None:
    """Particle filtering forks and releases KV sequences all the time: on either layout it
    gives the same particles for a seed (greedy here, so numerics cannot flip a sample) and
    hands every sequence back."""
    from itscale.rewards.arithmetic import ArithmeticVerifier
    from itscale.search import make_algorithm

    results = []
    for engine in (smol, smol_per_sequence):
        results.append(
            await make_algorithm("particle-filter").run(
                engine,
                "What is 12 * 7?",
                budget=4,
                max_steps=3,
                max_tokens=48,
                max_step_tokens=16,
                temperature=0.0,
                reward=ArithmeticVerifier(),
            )
        )
        assert engine.cached_branches == 0
    assert [p.text for p in results[0].particles] == [p.text for p in results[1].particles]


def test_a_per_sequence_cache_is_checked_and_sized_per_sequence() -> None:
    with pytest.raises(UsageError, match="kv_layout"):
        LlamaCppModel("smollm2-135m", kv_layout="paged")
    with pytest.raises(UsageError, match="multiple of 256"):
        LlamaCppModel("smollm2-135m", kv_layout="per-sequence", seq_ctx=1000)
