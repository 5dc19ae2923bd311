"""Do Monte Carlo labels train a better value head than outcome labels, and are they worth their cost?

    .venv/bin/python benchmarks/mc_labels.py --mc runs/probe-qwen-mc --held-out runs/probe-qwen [--seeds 5]

`--mc` is an `itscale train-reward --mc-rollouts k` directory: every non-final prefix of its
rollouts carries the fraction of k continuations from it that ended right. `--held-out` is an
`itscale train-reward` directory of the same generator, settings and training split, sampled
without continuations. The heads of `itscale train-reward` (itscale.rewards.training.fit:
logistic and one-hidden-layer MLP, early stopping on a fifth of the training problems) are
trained on the MC run's rollouts with each label:

    outcome   every prefix gets its rollout's verdict (train-reward's default);
    mc        the fraction of the k continuations that ended right (train-reward --label mc);
    mc+own    the same fraction with the rollout itself counted as a (k+1)-th continuation
              (it is one more draw from the same prefix, already paid for);

and, for the cost question, on outcome labels of the held-out directory's first problems not
in the MC run, as many as cost the same generated tokens as the MC run did ("outcome, same
tokens"). Every head is evaluated on the held-out directory's remaining problems (never
trained on): AUROC of the whole answer's value (its last step) against the rollout's verdict,
pooled and within a problem (the mean over problems with both right and wrong rollouts), and
of every earlier prefix's value against the verdict its rollout reached (within a problem),
which is what a particle filter's intermediate weights use. Means over `--seeds` training
seeds; the mc-minus-outcome differences are paired by problem with a bootstrap interval.

Only training-split rollouts are read; nothing here touches a test split.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from itscale.errors import UsageError


def rollouts_in(records: list[dict]) -> int:
    return sum(len(r["samples"]) for r in records)


def generated_tokens(record: dict) -> int:
    return int(record["usage"]["completion_tokens"])


def main() -> None:
    from itscale.eval.report import bootstrap_interval
    from itscale.rewards.training import (
        TrainSettings,
        auroc,
        auroc_by_group,
        examples_from,
        fit,
        split_by_problem,
        training_rollouts,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mc", default="runs/probe-qwen-mc", help="a train-reward --mc-rollouts directory")
    parser.add_argument("--held-out", default="runs/probe-qwen", help="a train-reward directory to test on")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds to average over")
    parser.add_argument("--heads", default="linear,mlp")
    args = parser.parse_args()

    try:
        _, mc_identity, mc_records = training_rollouts(args.mc)
        _, held_identity, held_records = training_rollouts(args.held_out)
    except UsageError as error:
        sys.exit(str(error))
    k = int(mc_identity["mc_rollouts"])
    if not k:
        sys.exit(f"{args.mc} was sampled without --mc-rollouts: it has no Monte Carlo labels")
    for field in ("generator", "settings"):
        if mc_identity[field] != held_identity[field]:
            sys.exit(
                f"{args.mc} and {args.held_out} differ in their {field}: sample both with the same model and settings"
            )
    mc_records = [r for r in mc_records if all(s.get("mc") is not None for s in r["samples"])]
    taken = {r["problem"] for r in mc_records}
    others = [r for r in held_records if r["problem"] not in taken]
    mc_cost = sum(generated_tokens(r) for r in mc_records)
    spent, same_cost = 0, []
    for r in others:
        if spent >= mc_cost:
            break
        same_cost.append(r)
        spent += generated_tokens(r)
    test = others[len(same_cost) :]
    if not mc_records or len(test) < 10:
        sys.exit(f"too few problems: {len(mc_records)} with MC labels, {len(test)} held out (need 10+)")
    n_embd = mc_identity["generator"]["n_embd"]
    held = examples_from(test, n_embd)
    final = held.final
    mixed = len(auroc_by_group(held.correct[final].astype(float), held.correct[final], held.problem[final]))
    print(
        f"MC run: {len(mc_records)} problems, {rollouts_in(mc_records)} rollouts, k = {k}, "
        f"{mc_cost:,} generated tokens\n"
        f"same tokens as outcome labels: {len(same_cost)} problems, {rollouts_in(same_cost)} rollouts, "
        f"{spent:,} tokens\n"
        f"held out: {len(test)} problems, {rollouts_in(test)} rollouts ({held.correct[final].mean():.0%} right), "
        f"{mixed} with both right and wrong; {args.seeds} seeds\n"
    )
    # One set of rows (every MC record has its labels), three labellings of it.
    mc = examples_from(mc_records, n_embd, "mc")
    own = np.where(mc.final, mc.labels, (k * mc.labels + mc.correct) / (k + 1))
    training = {
        "outcome": replace(mc, labels=mc.correct.astype(np.float32)),
        "mc": mc,
        "mc+own": replace(mc, labels=own.astype(np.float32)),
        "outcome, same tokens": examples_from(same_cost, n_embd),
    }
    print("| head | labels | training rollouts | answer AUROC pooled | answer AUROC within | prefix AUROC within |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    by_problem: dict[tuple[str, str], list[dict[int, float]]] = {}
    for kind in args.heads.split(","):
        for label, data in training.items():
            pooled, within, prefix = [], [], []
            n_problems = int(data.problem.max()) + 1
            for seed in range(args.seeds):
                stop = split_by_problem(n_problems, 0.2, seed)[data.problem]
                head, _ = fit(data.subset(~stop), data.subset(stop), kind, TrainSettings(seed=seed))
                scores = head.predict(held.features)
                pooled.append(auroc(scores[final], held.correct[final]))
                answers = auroc_by_group(scores[final], held.correct[final], held.problem[final])
                prefixes = auroc_by_group(scores[~final], held.correct[~final], held.problem[~final])
                within.append(np.mean(list(answers.values())))
                prefix.append(np.mean(list(prefixes.values())))
                by_problem.setdefault((kind, label), []).append(answers)
            cells = " | ".join(f"{np.mean(values):.3f}" for values in (pooled, within, prefix))
            print(f"| {kind} | {label} | {int(data.final.sum())} | {cells} |", flush=True)
    print("\nWithin-problem answer AUROC against outcome labels on the same rollouts, paired by held-out problem")
    print("(each problem's AUROC averaged over the seeds; 95% bootstrap interval over problems):\n")
    print("| head | labels | difference [95% CI] |")
    print("| --- | --- | --- |")
    for kind in args.heads.split(","):
        base = by_problem[(kind, "outcome")]
        problems = sorted(base[0])
        base_mean = np.array([np.mean([s[p] for s in base]) for p in problems])
        for label in list(training)[1:]:
            other = by_problem[(kind, label)]
            diff = np.array([np.mean([s[p] for s in other]) for p in problems]) - base_mean
            low, high = bootstrap_interval(diff)
            print(f"| {kind} | {label} | {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}] |")


if __name__ == "__main__":
    main()
