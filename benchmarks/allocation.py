"""Compute-optimal allocation on test problems, replayed on samples already drawn.

    .venv/bin/python benchmarks/allocation.py --policy runs/budget-policy-qwen.json [--samples 8] [--probe DIR]

Reads the samples the rewards benchmark drew (`benchmarks/rewards.py`: K samples per GSM8K
test problem, temperature 0.8, cached under .cache/benchmarks/rewards/) and replays, on every
problem and in the samples' own order, what the `compute-optimal` algorithm does: the first
batch sets the level, the policy's allocation for a mean budget B sets how many samples the
problem gets, and the level's selection (the majority vote, or the vote weighted by the
head's value of each finished sample) gives the answer. Beside it, the fixed budgets
(self-consistency over the first b samples) on the same problems and samples. Prints the
accuracy, the mean samples and generated tokens per problem, the paired difference against
the fixed budget of the same or higher mean cost (95% bootstrap interval over problems), and
how well the level predicts that a fresh sample is wrong (AUROC on the test problems).
With `--probe DIR`, also how well the learned value head's values on the first batch (as
the rewards benchmark scored them with that head) predict failure, beside the level.

Replaying on drawn samples is exact for this algorithm: its samples are independent
rollouts, so a problem that gets b samples gets what the first b of K would have been.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "benchmarks" / "rewards"
DATA = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"
STUDY = REPO / "docs" / "results" / "gsm8k-qwen0.5b" / "results.jsonl"


def load(samples: int) -> tuple[list[dict], dict]:
    cached: dict = {}
    for path in sorted(CACHE.glob(f"samples-{samples}*.json")):
        cached.update(json.loads(path.read_text()))
    if not cached:
        sys.exit(f"no samples in {CACHE}: run benchmarks/rewards.py --samples {samples} --sample-only first")
    with DATA.open() as f:
        problems = [json.loads(line) for line in f]
    return [p for p in problems if p["id"] in cached], cached


def main() -> None:
    from itscale.rewards.training import auroc
    from itscale.search.allocation import BudgetPolicy, answer_classes, level_of, value_level, vote_is_right

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a policy file from itscale fit-budget-policy")
    parser.add_argument("--samples", type=int, default=8, help="samples per problem in the cache (default 8)")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument(
        "--probe", help="a probe head directory whose scores the rewards benchmark cached: difficulty estimates"
    )
    args = parser.parse_args()

    policy = BudgetPolicy.load(args.policy)
    problems, cached = load(args.samples)
    b0 = policy.first_batch
    # A policy reading a head (its levels, its weighted vote): the values by the policy's own
    # head as the rewards benchmark scored these samples with it.
    values = probe_scores(policy.card["head_sha256"][:12]) if policy.reads_head else None
    if values is not None:
        unscored = [p["id"] for p in problems if p["id"] not in values]
        if unscored:
            sys.exit(f"{len(unscored)} problems lack the head's scores: run benchmarks/rewards.py --probe HEAD again")
    rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    per_problem = []
    for problem in problems:
        particles = cached[problem["id"]]["particles"]
        classes = answer_classes([p["answer"] for p in particles])
        right = [bool(p["correct"]) for p in particles]
        tokens = np.cumsum([sum(s["tokens"] for s in p["steps"]) for p in particles])
        steps = values[problem["id"]]["steps"] if values is not None else None
        finals = [s[-1] if s else 0.0 for s in steps] if steps is not None else None  # no step: no answer
        if policy.value_edges is None:
            level = level_of(classes[:b0])
        else:
            level = value_level(float(np.mean([s[0] for s in steps[:b0]])), policy.value_edges)
        per_problem.append((classes, right, tokens, level, finals))

    def record(name: str, choices: list) -> None:
        correct = np.array(
            [
                vote_is_right(c[:b], r[:b], f[:b] if selection == "weighted-vote" else None)
                for (c, r, _, _, f), (selection, b) in zip(per_problem, choices, strict=True)
            ]
        )
        budgets = [b for _, b in choices]
        spent = np.array([t[b - 1] for (_, _, t, _, _), b in zip(per_problem, budgets, strict=True)])
        rows[name] = (correct.astype(float), np.array(budgets, dtype=float), spent.astype(float))

    fixed_selections = ["vote", "weighted-vote"] if values is not None else ["vote"]
    for selection in fixed_selections:
        label = "self-consistency" if selection == "vote" else "weighted vote by the head"
        for b in sorted({1, b0, *policy.budgets, args.samples}):
            record(f"{label} @{b}", [(selection, b)] * len(per_problem))
    for mean in sorted({b0 + 1, *policy.budgets[1:]}):
        allocation = policy.allocate(mean)
        chosen = ", ".join(f"{c.selection} {c.budget}" for c in allocation)
        record(f"compute-optimal auto:{mean} [{chosen}]", [allocation[lv] for *_, lv, _ in per_problem])

    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(per_problem), size=(args.bootstrap, len(per_problem)))
    print(f"{len(per_problem)} GSM8K test problems x {args.samples} samples; policy {args.policy}")
    print("\n| method | accuracy | mean samples | mean tokens | vs fixed budget of >= cost: difference [95% CI] |")
    print("| --- | ---: | ---: | ---: | --- |")
    fixed = {name: row for name, row in rows.items() if not name.startswith("compute-optimal")}
    for name, (correct, samples, spent) in rows.items():
        comparison = ""
        if name.startswith("compute-optimal"):
            comparisons = []
            for kind in ("self-consistency", "weighted vote"):
                costlier = [
                    (n, r) for n, r in fixed.items() if n.startswith(kind) and r[1].mean() >= samples.mean() - 1e-9
                ]
                if costlier:
                    other, (other_correct, _, _) = min(costlier, key=lambda item: item[1][1].mean())
                    difference = correct - other_correct
                    low, high = np.percentile(difference[draws].mean(axis=1), [2.5, 97.5])
                    comparisons.append(f"vs {other}: {difference.mean():+.1%} [{low:+.1%}, {high:+.1%}]")
            comparison = "; ".join(comparisons)
        print(f"| {name} | {correct.mean():.1%} | {samples.mean():.2f} | {spent.mean():,.0f} | {comparison} |")
    scores, wrong = [], []
    for _, right, _, level, _ in per_problem:
        for j in range(b0, len(right)):
            scores.append(-level)  # a higher level is an easier problem, for both kinds
            wrong.append(not right[j])
    print(f"\nthe level (first {b0} samples) predicts that a later sample is wrong: AUROC {auroc(scores, wrong):.3f}")
    if args.probe:
        difficulty_table(problems, cached, per_problem, b0, Path(args.probe))


def probe_scores(digest: str) -> dict:
    """The rewards benchmark's cached scores of a head (by the first 12 hex digits of its sha256)."""
    path = CACHE / f"scores-probe-{digest}.json"
    if not path.exists():
        sys.exit(f"no probe scores at {path}: run benchmarks/rewards.py --probe HEAD --rewards probe with the head")
    return json.loads(path.read_text())


def difficulty_table(problems: list[dict], cached: dict, per_problem: list, b0: int, probe: Path) -> None:
    """How well each cheap difficulty estimate predicts failure on the test problems: that a
    later sample is wrong, and that greedy decoding is wrong (greedy from the GSM8K study's
    records). The estimates: the first batch's agreement (what the policy uses), and the
    learned value head's mean over the first batch of its value after the first step (one
    step of each sample) and of the whole answers (the whole batch)."""
    from itscale.rewards.probe import head_digest
    from itscale.rewards.training import auroc
    from itscale.search.allocation import level_of

    values = probe_scores(head_digest(probe)[:12])
    greedy = {}
    for line in STUDY.read_text().splitlines():
        record = json.loads(line)
        if record["algorithm"] == "greedy" and record["budget"] == 1:
            greedy[record["problem"]] = bool(record["correct"])
    estimates: dict[str, list[float]] = {"agreement of the first batch": [], "value after the first step": []}
    estimates["value of the whole answers"] = []
    later_wrong, greedy_wrong, kept = [], [], []
    for problem, (classes, right, *_) in zip(problems, per_problem, strict=True):
        if problem["id"] not in values or problem["id"] not in greedy:
            continue
        entry = values[problem["id"]]
        kept.append(problem["id"])
        # Higher means harder, so that every AUROC below is of predicting failure.
        estimates["agreement of the first batch"].append(b0 - level_of(classes[:b0]))
        estimates["value after the first step"].append(-float(np.mean([s[0] for s in entry["steps"][:b0]])))
        estimates["value of the whole answers"].append(-float(np.mean(entry["model"][:b0])))
        later_wrong.append(1.0 - float(np.mean(right[b0:])))
        greedy_wrong.append(not greedy[problem["id"]])
    print(f"\nDifficulty estimates on {len(kept)} test problems (first batch: {b0} samples; probe {probe}):\n")
    print("| estimate | AUROC: greedy is wrong | AUROC: majority of later samples wrong |")
    print("| --- | ---: | ---: |")
    for name, score in estimates.items():
        mostly_wrong = [w > 0.5 for w in later_wrong]
        print(f"| {name} | {auroc(score, greedy_wrong):.3f} | {auroc(score, mostly_wrong):.3f} |")


if __name__ == "__main__":
    main()
