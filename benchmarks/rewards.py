"""How well does each reward predict correctness? AUROC, best-of-8 accuracy and cost.

    .venv/bin/python benchmarks/rewards.py [--problems 50] [--samples 8]

1. Samples `--samples` solutions per problem for the first `--problems` GSM8K test problems
   with the embedded Qwen2.5-Coder-0.5B at temperature 0.8, through itscale's own
   self-consistency run (every particle keeps its steps, with the generator's
   log-probabilities), and labels each by the reference answer.
2. Scores every particle with every reward: each step given the steps before it (for the
   aggregations last/min/prod/mean) and the whole answer as one step (aggregation `model`).
3. Prints, per reward and aggregation: AUROC of the particle score against correctness
   (pooled over all samples, and within a problem: the mean over problems whose samples are
   neither all right nor all wrong; only the second says whether the reward can choose
   among one problem's samples, the first also rewards knowing which problems are easy),
   the accuracy of choosing the highest-scoring of the 8 samples, and the cost per scored
   step (seconds, reward tokens).

Samples and scores are cached under `.cache/benchmarks/rewards/` (gitignored), written
atomically after every problem, so a killed run resumes where it stopped. The data is read
from ../shared/data (never copied into the repository).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from itscale.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"
CACHE = REPO / ".cache" / "benchmarks" / "rewards"
GENERATOR = "qwen2.5-coder-0.5b"
TEMPERATURE = 0.8
MAX_TOKENS = 512


def read_json(path: Path, default: object) -> object:
    return json.loads(path.read_text()) if path.exists() else default


def load_problems(n: int) -> list[dict]:
    if not DATA.exists():
        sys.exit(f"GSM8K data not found at {DATA}: the benchmark reads ../shared/data beside the repository")
    with DATA.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


# ------------------------------------------------------------------------------ sampling


def load_samples(n_samples: int) -> dict:
    """Every cached sample: the main file and the files of reversed-order helpers."""
    samples: dict = {}
    for path in sorted(CACHE.glob(f"samples-{n_samples}*.json")):
        samples.update(read_json(path, {}))
    return samples


async def sample(lm, problems: list[dict], n_samples: int, concurrency: int, reverse: bool = False) -> dict:
    """Samples per problem id: {"particles": [{"steps": [...], "answer", "correct"}], ...}.
    `concurrency` problems run at once on the one engine, which decodes all their
    particles in the same batches (far more tokens per second than one problem at a time)."""
    path = CACHE / f"samples-{n_samples}{'-reversed' if reverse else ''}.json"
    samples = read_json(path, {})
    done = load_samples(n_samples)
    todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in done]
    if reverse:  # a second process working from the other end (one engine thread each)
        todo.reverse()
    queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            i, problem = queue.get_nowait()
            if problem["id"] in load_samples(n_samples):
                continue  # the process working from the other end got here first
            samples[problem["id"]] = await _sample_one(lm, problem, i, n_samples)
            write_json_atomic(path, samples)
            record = samples[problem["id"]]
            right = sum(p["correct"] for p in record["particles"])
            print(
                f"sampled {len(load_samples(n_samples))}/{len(problems)} {problem['id']}: {right}/{n_samples} correct, "
                f"{record['completion_tokens']} tokens, {record['seconds']:.0f} s",
                flush=True,
            )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return load_samples(n_samples)


async def _sample_one(lm, problem: dict, seed: int, n_samples: int) -> dict:
    from itscale.answers import is_equivalent
    from itscale.search import make_algorithm

    started = time.perf_counter()
    from itscale.rewards.training import encode_features

    lm.enable_features()  # the learned probe reads the generator's hidden state after each step
    result = await make_algorithm("self-consistency").run(
        lm, problem["problem"], budget=n_samples, seed=seed, temperature=TEMPERATURE, max_tokens=MAX_TOKENS
    )
    particles = [
        {
            "steps": [
                {
                    "text": s.text,
                    "tokens": s.tokens,
                    "end": s.end,
                    "logprob": s.logprob,
                    "self_certainty": s.self_certainty,
                    "features": {layer: encode_features(state[None, :]) for layer, state in s.features.items()}
                    if s.features is not None
                    else None,
                }
                for s in p.steps
            ],
            "answer": p.answer,
            "correct": is_equivalent(p.answer, problem["answer"]),
        }
        for p in result.particles
    ]
    return {
        "particles": particles,
        "seconds": time.perf_counter() - started,
        "completion_tokens": result.usage.completion_tokens,
    }


# ------------------------------------------------------------------------------ scoring

# Rewards measured: (spec, problems it is measured on: None = all). The LLM judge costs about
# as much as generation on this CPU, so it runs on the first JUDGE_PROBLEMS problems.
JUDGE_PROBLEMS = 10
MEASURED: list[tuple[str, int | None]] = [
    ("arithmetic", None),
    ("self-certainty", None),
    ("self-certainty-kl", None),
    ("llm-judge", JUDGE_PROBLEMS),
    ("probe", None),  # the learned head (--probe DIR, else the one shipped for the generator)
]
# Products are computed from the cached scores of their factors, exactly as ProductReward
# does (prod_i score_i ** a_i); their cost is the sum of the factors' costs.
PRODUCTS = [
    "arithmetic * self-certainty",
    "arithmetic * llm-judge",
    "arithmetic * self-certainty * llm-judge",
    "probe * arithmetic",
    "probe * self-certainty",
    "probe * arithmetic * self-certainty",
]
AGGREGATION_NAMES = ("last", "min", "prod", "mean", "model")


def step_record(cached: dict):
    """A generator's Step record from the cache, with its hidden state when it was kept."""
    import numpy as np

    from itscale.rewards.training import decode_features
    from itscale.types import Step

    def state(text: str) -> np.ndarray:
        return decode_features(text, 1).reshape(-1)  # one state, encoded as one row

    fields = {k: v for k, v in cached.items() if k != "features"}
    features = cached.get("features")
    if isinstance(features, str):  # samples cached before layers were named: the final state
        fields["features"] = {"final": state(features)}
    elif features is not None:
        fields["features"] = {layer: state(text) for layer, text in features.items()}
    return Step(**fields)


def requests_for(problem: dict, record: dict) -> tuple[list, list[tuple[int, int | None]]]:
    """Every step of every particle (k = 1..K, for last/min/prod/mean) and every whole
    answer as one step (for model), with (particle, k or None) targets."""
    from itscale.lm.chat import MATH_SYSTEM_PROMPT
    from itscale.rewards.base import ScoreRequest
    from itscale.types import Prompt

    prompt = Prompt.of(problem["problem"], system=MATH_SYSTEM_PROMPT)
    requests, targets = [], []
    for i, particle in enumerate(record["particles"]):
        steps = [step_record(s) for s in particle["steps"]]
        texts = tuple(s.text for s in steps)
        for k in range(1, len(steps) + 1):
            requests.append(ScoreRequest(prompt, texts[:k], records=tuple(steps[:k])))
            targets.append((i, k))
        requests.append(ScoreRequest.for_prefix(prompt, texts, records=steps))
        targets.append((i, None))
    return requests, targets


async def score_all(lm, problems: list[dict], samples: dict, only: set[str] | None = None, probe=None) -> dict:
    """Scores per reward: {problem id: {"steps": [[...] per particle], "model": [...],
    "seconds", "tokens", "scored"}}, cached per reward (the probe: per head) and problem."""
    from itscale.rewards.probe import head_digest, shipped_head
    from itscale.rewards.registry import make_reward

    probe = probe or shipped_head(GENERATOR)  # scores are kept by the head file's digest either way
    scores = {}
    for spec, limit in MEASURED:
        # A head's scores are cached by the head's own bytes: a head trained again is scored again.
        name = spec if spec != "probe" or probe is None else f"probe-{head_digest(probe)[:12]}"
        path = CACHE / f"scores-{name}.json"
        cached = read_json(path, {})
        scores[spec] = cached
        if only is not None and spec not in only:
            continue  # report what is cached, score nothing new
        spec_with_options = f'probe(path="{probe}")' if spec == "probe" and probe is not None else spec
        try:
            reward = make_reward(spec_with_options, lm)
        except Exception as error:  # no head for this generator yet: the table goes without it
            print(f"not measuring {spec}: {error}", flush=True)
            del scores[spec]
            continue
        for problem in problems[:limit]:
            record = samples.get(problem["id"])
            if record is None or problem["id"] in cached:
                continue
            requests, targets = requests_for(problem, record)
            started = time.perf_counter()
            result = await reward.score(requests)
            seconds = time.perf_counter() - started
            entry = {
                "steps": [[] for _ in record["particles"]],
                "model": [None] * len(record["particles"]),
                "seconds": seconds,
                "tokens": result.tokens,
                "scored": len(requests),
            }
            for (i, k), value in zip(targets, result.values, strict=True):
                if k is None:
                    entry["model"][i] = value
                else:
                    entry["steps"][i].append(value)
            cached[problem["id"]] = entry
            write_json_atomic(path, cached)
            print(f"scored {spec} on {problem['id']}: {len(requests)} steps, {seconds:.1f} s", flush=True)
    for product in PRODUCTS:
        factors = [f.strip() for f in product.split("*")]
        common = set.intersection(*(set(scores[f]) for f in factors))
        if not common:
            continue
        scores[product] = {pid: _product([scores[f][pid] for f in factors]) for pid in common}
    return scores


def _product(entries: list[dict]) -> dict:
    return {
        "steps": [
            [math.prod(v) for v in zip(*rows, strict=True)] for rows in zip(*(e["steps"] for e in entries), strict=True)
        ],
        "model": [math.prod(v) for v in zip(*(e["model"] for e in entries), strict=True)],
        "seconds": sum(e["seconds"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "scored": entries[0]["scored"],
    }


# ------------------------------------------------------------------------------ metrics


def particle_scores(entry: dict, how: str) -> list[float]:
    from itscale.rewards.base import aggregate

    if how == "model":
        return entry["model"]
    return [aggregate(steps, how) for steps in entry["steps"]]


def table_rows(problems: list[dict], samples: dict, scores: dict, limit: int | None) -> list[dict]:
    """One row per (reward, aggregation) on the first `limit` problems."""
    from itscale.rewards.training import auroc

    chosen = [p["id"] for p in problems[:limit] if p["id"] in samples]
    rows = []
    for spec, by_problem in scores.items():
        ids = [pid for pid in chosen if pid in by_problem]
        if len(ids) < len(chosen):
            continue  # not measured on these problems
        seconds = sum(by_problem[pid]["seconds"] for pid in ids)
        tokens = sum(by_problem[pid]["tokens"] for pid in ids)
        scored = sum(by_problem[pid]["scored"] for pid in ids)
        for how in AGGREGATION_NAMES:
            all_scores, labels, best, within = [], [], [], []
            for pid in ids:
                values = particle_scores(by_problem[pid], how)
                correct = [p["correct"] for p in samples[pid]["particles"]]
                all_scores += values
                labels += correct
                best.append(correct[max(range(len(values)), key=lambda i: values[i])])
                if (area := auroc(values, correct)) is not None:
                    within.append(area)
            rows.append(
                {
                    "reward": spec,
                    "aggregation": how,
                    "auroc": auroc(all_scores, labels),
                    "auroc_within": sum(within) / len(within) if within else None,
                    "mixed_problems": len(within),
                    "best_of_n": sum(best) / len(best),
                    "ms_per_step": 1000 * seconds / scored,
                    "tokens_per_step": tokens / scored,
                }
            )
    return rows


def baselines(problems: list[dict], samples: dict, limit: int | None) -> dict[str, float]:
    from itscale.answers import majority

    ids = [p["id"] for p in problems[:limit] if p["id"] in samples]
    particles = [samples[pid]["particles"] for pid in ids]
    vote = []
    for ps in particles:
        winner, _ = majority([p["answer"] for p in ps])
        vote.append(any(p["correct"] for p in ps if winner is not None and p["answer"] == winner))
    return {
        "problems": len(ids),
        "particles": sum(len(ps) for ps in particles),
        "mean accuracy of one sample": sum(p["correct"] for ps in particles for p in ps)
        / max(1, sum(map(len, particles))),
        "majority vote of 8": sum(vote) / max(1, len(vote)),
        "oracle (pass@8)": sum(any(p["correct"] for p in ps) for ps in particles) / max(1, len(particles)),
    }


def print_table(title: str, rows: list[dict], base: dict) -> None:
    print(f"\n### {title}\n")
    print(
        f"{base['problems']} problems, {base['particles']} samples; one sample is right "
        f"{base['mean accuracy of one sample']:.1%} of the time; majority vote of 8: {base['majority vote of 8']:.1%}; "
        f"oracle (pass@8): {base['oracle (pass@8)']:.1%}\n"
    )
    mixed = rows[0]["mixed_problems"] if rows else 0
    print(f"AUROC within a problem: the mean over the {mixed} problems with both right and wrong samples.\n")
    print(
        "| reward | aggregation | AUROC pooled | AUROC within a problem | best-of-8 accuracy "
        "| ms / scored step | tokens / scored step |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        pooled = "n/a" if r["auroc"] is None else f"{r['auroc']:.3f}"
        within = "n/a" if r["auroc_within"] is None else f"{r['auroc_within']:.3f}"
        print(
            f"| {r['reward']} | {r['aggregation']} | {pooled} | {within} | {r['best_of_n']:.1%} | "
            f"{r['ms_per_step']:.2f} | {r['tokens_per_step']:.1f} |"
        )


def print_paired(problems: list[dict], samples: dict, scores: dict, baseline: str, draws: int = 10_000) -> None:
    """Every reward against `baseline` (aggregation `model`), paired by problem: the mean
    difference of within-problem AUROC (over the problems with both right and wrong samples)
    and of best-of-8 accuracy, with 95% bootstrap intervals over problems."""
    import numpy as np

    from itscale.rewards.training import auroc

    if baseline not in scores:
        return
    ids = [p["id"] for p in problems if p["id"] in samples and p["id"] in scores[baseline]]
    rng = np.random.default_rng(0)

    def per_problem(spec: str) -> tuple[np.ndarray, np.ndarray]:
        within, best = [], []
        for pid in ids:
            values = particle_scores(scores[spec][pid], "model")
            correct = [p["correct"] for p in samples[pid]["particles"]]
            area = auroc(values, correct)
            within.append(np.nan if area is None else area)
            best.append(float(correct[max(range(len(values)), key=lambda i: values[i])]))
        return np.array(within), np.array(best)

    def interval(difference: np.ndarray) -> str:
        picks = rng.integers(0, len(difference), size=(draws, len(difference)))
        low, high = np.percentile(difference[picks].mean(axis=1), [2.5, 97.5])
        return f"{difference.mean():+.3f} [{low:+.3f}, {high:+.3f}]"

    base_within, base_best = per_problem(baseline)
    mixed = ~np.isnan(base_within)
    print(f"\n### Paired against {baseline} (aggregation model, {len(ids)} problems, {mixed.sum()} mixed)\n")
    print("| reward | AUROC within: difference [95% CI] | best-of-8: difference [95% CI] |")
    print("| --- | --- | --- |")
    for spec in scores:
        if spec != baseline and all(pid in scores[spec] for pid in ids):  # the judge: 10 problems only
            within, best = per_problem(spec)
            print(f"| {spec} | {interval((within - base_within)[mixed])} | {interval(best - base_best)} |")


def arithmetic_speed(samples: dict) -> float:
    """Steps per second of the arithmetic verifier alone on every sampled step (no cache)."""
    from itscale.rewards.arithmetic import ArithmeticVerifier, _evaluated_stripped

    texts = [s["text"] for record in samples.values() for p in record["particles"] for s in p["steps"]]
    _evaluated_stripped.cache_clear()
    verifier = ArithmeticVerifier()
    started = time.perf_counter()
    for text in texts:
        verifier.check(text)
    return len(texts) / (time.perf_counter() - started)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--sample-only", action="store_true", help="stop after sampling")
    parser.add_argument("--concurrency", type=int, default=6, help="problems sampled at once on the engine")
    parser.add_argument("--reverse", action="store_true", help="sample from the last problem backwards")
    parser.add_argument("--rewards", help="comma-separated rewards to score now (default: all measured)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for llama.cpp (1 on a busy machine)")
    parser.add_argument("--probe", help="the probe head directory to measure (default: the one shipped)")
    parser.add_argument(
        "--layers",
        default="final",
        help="feature layers the samples keep (comma-separated, see `itscale train-reward --layers`); a probe "
        "reading another layer evaluates it from the text",
    )
    args = parser.parse_args(argv)

    from itscale.lm.llamacpp import LlamaCppModel

    problems = load_problems(args.problems)
    only = set(args.rewards.split(",")) if args.rewards else None
    sampled = all(p["id"] in load_samples(args.samples) for p in problems)
    needs_engine = not sampled or only is None or "llm-judge" in only or "probe" in only
    # A KV buffer per sequence: the problems sampled at once do not slow each other's attention.
    engine = {
        "kv_layout": "per-sequence",
        "seq_ctx": 1536,
        "n_seq_max": 128,
        "n_threads": args.threads,
        "feature_layers": args.layers.split(","),
    }
    lm = LlamaCppModel(GENERATOR, **engine) if needs_engine else None
    try:
        samples = await sample(lm, problems, args.samples, args.concurrency, args.reverse) if not sampled else None
        samples = samples or load_samples(args.samples)
        if args.sample_only:
            return
        scores = await score_all(lm, problems, samples, only, args.probe)
    finally:
        if lm is not None:
            lm.shutdown()
    print(
        f"\nGenerator {GENERATOR}, temperature {TEMPERATURE}, max_tokens {MAX_TOKENS}; reward costs exclude sampling."
    )
    print_table(
        f"All {len(problems)} problems (rewards without a model)",
        table_rows(problems, samples, scores, None),
        baselines(problems, samples, None),
    )
    print_table(
        f"First {JUDGE_PROBLEMS} problems (every reward, including the LLM judge)",
        table_rows(problems, samples, scores, JUDGE_PROBLEMS),
        baselines(problems, samples, JUDGE_PROBLEMS),
    )
    print_paired(problems, samples, scores, "arithmetic * self-certainty")
    print(f"\narithmetic verifier alone: {arithmetic_speed(samples):,.0f} steps/second (one core, no cache)")


if __name__ == "__main__":
    asyncio.run(main())
