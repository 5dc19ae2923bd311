"""Engine benchmark: batched decoding, KV forks, and particle filtering's overhead.

    .venv/bin/python benchmarks/engine.py [--model qwen2.5-coder-0.5b] [--threads 2] [--problems 5]
        [--tables throughput,fork,particle-filter]

Prints three tables (Markdown):
1. tokens/s for 1, 4, 8, 16 sequences decoded together versus the same sequences decoded
   one after another (each sequence generates exactly --tokens tokens);
2. the time to make a 300-token prefix ready to decode on a new sequence: forking its KV
   cache versus evaluating it again;
3. particle filtering (paper mode, 8 particles, the LLM judge) on the first GSM8K test
   problems, with the reward time taken out of its wall time, against two references:
   - *engine*: the engine's own busy time in the rounds that generated the run's tokens,
     in the batches the run formed (the orchestration overhead is what the wall time adds
     to it: Python, asyncio, resampling, forking);
   - *bare*: the engine decoding the same number of tokens (after the prompt) as 8
     sequences of equal length, always in a full batch: the ideal no algorithm that waits
     for its slowest particle, or whose particles stop at different lengths, can reach.
   Target: (wall - reward) at most 1.25x the bare decode time.
Targets: 8 together >= 1.3x one at a time; fork >= 10x faster than re-evaluation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from itscale.lm.base import StepSettings
from itscale.lm.chat import MATH_SYSTEM_PROMPT
from itscale.lm.llamacpp import LlamaCppModel
from itscale.rewards.judge import LLMJudge
from itscale.search import make_algorithm
from itscale.search.settings import SearchSettings
from itscale.types import Prompt

STORY = Prompt.of("Write a long story about a lighthouse keeper and a storm, in many paragraphs.")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


async def fresh_branches(engine: LlamaCppModel, prompt: Prompt, n: int) -> list:
    root = await engine.start(prompt)
    branches = [engine.fork(root) for _ in range(n)]
    engine.release(root)
    return branches


async def decode_throughput(engine: LlamaCppModel, tokens: int) -> list[tuple[int, float, float]]:
    """(n, tokens/s together, tokens/s one after another) for n = 1, 4, 8, 16."""
    settings = StepSettings(delimiter=tokens, max_step_tokens=tokens, temperature=0.8)
    rows = []
    for n in (1, 4, 8, 16):
        # Warm the prompt so both measurements only decode.
        together = await fresh_branches(engine, STORY, n)
        await engine.extend(together, StepSettings(delimiter=1, temperature=0.8), list(range(n)))
        start = time.perf_counter()
        outs = await engine.extend(together, settings, list(range(n)))
        together_rate = sum(o.tokens for o in outs) / (time.perf_counter() - start)
        alone = await fresh_branches(engine, STORY, n)
        await engine.extend(alone, StepSettings(delimiter=1, temperature=0.8), list(range(n)))
        start, count = time.perf_counter(), 0
        for i, branch in enumerate(alone):
            count += (await engine.extend([branch], settings, [i]))[0].tokens
        alone_rate = count / (time.perf_counter() - start)
        for b in together + alone:
            engine.release(b)
        rows.append((n, together_rate, alone_rate))
    return rows


async def fork_versus_evaluate(engine: LlamaCppModel, prefix_tokens: int = 300) -> tuple[int, float, float, float]:
    """(prefix length, fork seconds, re-evaluation seconds, KV copy seconds alone).

    Both paths go through the public API and end with one decoded token: a fork of a
    branch whose prefix is cached (the engine copies the cells, then decodes one token)
    versus a new branch with the same prompt (the engine evaluates the whole prefix)."""
    one_token = StepSettings(delimiter=1, max_step_tokens=1, temperature=0.8)
    text = "The lighthouse stood on the cliff above the harbour. " * 40
    words = text.split(" ")
    while len(engine.tokenize(engine.template.prompt_text(Prompt.of(" ".join(words))))) > prefix_tokens:
        words.pop()
    prompt = Prompt.of(" ".join(words))
    length = len(engine.tokenize(engine.template.prompt_text(prompt)))
    parent = await engine.start(prompt)
    await engine.extend([parent], one_token, [0])  # the prefix is now cached on the parent's sequence
    child = engine.fork(parent)
    start = time.perf_counter()
    await engine.extend([child], one_token, [1])
    fork_seconds = time.perf_counter() - start
    cold = await engine.start(prompt)
    start = time.perf_counter()
    await engine.extend([cold], one_token, [2])
    evaluate_seconds = time.perf_counter() - start
    copy_seconds = _time_kv_copy(engine, parent.slot, length)
    for b in (parent, child, cold):
        engine.release(b)
    return length, fork_seconds, evaluate_seconds, copy_seconds


def _time_kv_copy(engine: LlamaCppModel, source: int, length: int, repeats: int = 100) -> float:
    """The llama_memory_seq_cp call alone: the cached prefix copied to a free sequence id,
    then dropped again."""
    ll, memory = engine._ll, engine._memory
    with engine._lock:
        slot = engine._free_slots[-1]
        start = time.perf_counter()
        for _ in range(repeats):
            ll.llama_memory_seq_cp(memory, source, slot, 0, length)
            ll.llama_memory_seq_rm(memory, slot, -1, -1)
        return (time.perf_counter() - start) / repeats


async def particle_filter_overhead(engine: LlamaCppModel, problems: list[dict], budget: int) -> list[dict]:
    rows = []
    settings = SearchSettings(budget=budget, seed=0, max_tokens=512)
    for problem in problems:
        result, spent = await run_counted(engine, "particle-filter", problem["question"], settings)
        u = result.usage
        # The same work with no orchestration: the prompt once, then the same number of
        # tokens decoded by `budget` sequences together.
        per_sequence = max(1, round(u.completion_tokens / budget))
        prompt = Prompt.of(problem["question"], system=MATH_SYSTEM_PROMPT)
        start = time.perf_counter()
        branches = await fresh_branches(engine, prompt, budget)
        prompt_seconds = time.perf_counter() - start
        equal_lengths = StepSettings(
            delimiter=per_sequence, max_step_tokens=per_sequence, max_tokens=10_000, temperature=0.8
        )
        outs = await engine.extend(branches, equal_lengths, list(range(budget)))
        bare = time.perf_counter() - start
        for b in branches:
            engine.release(b)
        rows.append(
            {
                "problem": problem["id"],
                "tokens": u.completion_tokens,
                "bare_tokens": sum(o.tokens for o in outs),
                "wall": u.seconds,
                "reward": u.reward_seconds,
                "engine": prompt_seconds + spent["generating_seconds"],
                "generated": spent["generated_tokens"],
                "rounds": spent["generating_rounds"],
                "bare": bare,
                "answer": result.answer,
                "reference": problem["answer"],
            }
        )
    return rows


async def run_counted(engine: LlamaCppModel, algorithm: str, question: str, settings: SearchSettings):
    """Runs an algorithm (rewards from the LLM judge) and returns its result and the change
    in the engine's counters over the run."""
    before = dict(engine.stats)
    result = await make_algorithm(algorithm).run(engine, question, settings, reward=LLMJudge(engine))
    return result, {key: engine.stats[key] - before[key] for key in before}


def load_problems(n: int) -> list[dict]:
    problems = []
    with DATA.open() as f:
        for line in f:
            record = json.loads(line)
            problems.append({"id": record["id"], "question": record["problem"], "answer": record["answer"]})
            if len(problems) == n:
                break
    return problems


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per sequence in the throughput table")
    parser.add_argument("--problems", type=int, default=5)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument(
        "--tables", default="throughput,fork,particle-filter", help="which tables to measure (comma-separated)"
    )
    args = parser.parse_args()
    tables = set(args.tables.split(","))
    if unknown := tables - {"throughput", "fork", "particle-filter"}:
        parser.error(f"unknown table(s) {', '.join(sorted(unknown))}: use throughput, fork, particle-filter")
    engine = LlamaCppModel(args.model, n_threads=args.threads, n_ctx=16384)

    if "throughput" in tables:
        print(f"## Batched decoding ({args.model}, {args.threads} threads, {args.tokens} tokens per sequence)\n")
        print("| sequences | together tok/s | one after another tok/s | speed-up |")
        print("| --- | --- | --- | --- |")
        for n, together, alone in await decode_throughput(engine, args.tokens):
            print(f"| {n} | {together:.1f} | {alone:.1f} | {together / alone:.2f}x |")

    if "fork" in tables:
        length, fork, evaluate, copy = await fork_versus_evaluate(engine)
        print(f"\n## Fork versus re-evaluation of a {length}-token prefix\n")
        print("| operation | seconds |")
        print("| --- | --- |")
        print(f"| fork (KV copy, then one token decoded) | {fork:.4f} |")
        print(f"| llama_memory_seq_cp alone | {copy:.6f} |")
        print(f"| re-evaluate the prefix, then one token decoded | {evaluate:.3f} |")
        print(f"| speed-up | {evaluate / fork:.0f}x |")

    if "particle-filter" in tables:
        await print_particle_filter_table(engine, args.problems, args.budget)
    engine.shutdown()


async def print_particle_filter_table(engine: LlamaCppModel, problems: int, budget: int) -> None:
    rows = await particle_filter_overhead(engine, load_problems(problems), budget)
    print(f"\n## Particle filtering, {budget} particles, first {problems} GSM8K test problems\n")
    print(
        "| problem | tokens | wall s | reward s | engine s | mean batch | bare s "
        "| (wall - reward) / engine | (wall - reward) / bare | answer | reference |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    summed = ("tokens", "wall", "reward", "engine", "bare", "generated", "rounds")
    total = {key: sum(r[key] for r in rows) for key in summed}
    for r in [*rows, {**total, "problem": "all", "answer": "", "reference": ""}]:
        net = r["wall"] - r["reward"]
        batch = r["generated"] / max(1, r["rounds"])
        print(
            f"| {r['problem']} | {r['tokens']} | {r['wall']:.1f} | {r['reward']:.1f} | {r['engine']:.1f} | "
            f"{batch:.1f} | {r['bare']:.1f} | {net / r['engine']:.2f} | {net / r['bare']:.2f} | "
            f"{r['answer']} | {r['reference']} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
