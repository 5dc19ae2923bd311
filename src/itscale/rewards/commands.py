"""`itscale rewards`: the rewards a search can use, and how to name and combine them."""

from __future__ import annotations

import argparse
from typing import Any

SPEC_HELP = """\
A reward spec names a reward, with options in parentheses, or a product with exponents:
  --reward arithmetic
  --reward 'llm-judge(step_question="Is the last step correct? Answer with Yes or No.")'
  --reward 'arithmetic * llm-judge'
  --reward 'arithmetic^2 * self-certainty(variant=kl)'
Aggregations of step scores (algorithm option aggregation=...): last, min, prod, mean, model."""


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("rewards", help="list the rewards and how to combine them")
    parser.set_defaults(handler=_list_rewards)
    add_train_command(subparsers)
    add_policy_command(subparsers)


def _list_rewards(args: argparse.Namespace) -> int:
    from itscale.rewards.registry import DEFAULT_REWARD, REWARDS, _accepted_options

    width = max(len(name) for name in REWARDS)
    for name, entry in REWARDS.items():
        default = "  (default)" if name == DEFAULT_REWARD else ""
        print(f"{name:<{width}}  {entry.summary}{default}")
        options = sorted(_accepted_options(entry))
        if options:
            print(f"{'':<{width}}  options: {', '.join(options)}")
    if DEFAULT_REWARD not in REWARDS:
        print(f"default: {DEFAULT_REWARD}")
    print()
    print(SPEC_HELP)
    return 0


TRAIN_EPILOG = """\
examples:
  itscale train-reward --dataset gsm8k_train --limit 500 --samples 4 --max-tokens 512 --out runs/probe
  itscale train-reward --out runs/probe --train-only --head mlp          # retrain on the saved rollouts
  itscale solve "..." --reward 'probe(path="runs/probe")'

Sampling resumes: run the same command again and only missing problems are sampled; a larger
--limit adds problems. The rollouts (with hidden states) stay in DIR/rollouts.jsonl; the head
is DIR/head.npz and its model card DIR/card.json.
"""


def add_train_command(subparsers: Any) -> None:
    from itscale.cli import add_settings_arguments
    from itscale.lm.models import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "train-reward",
        help="train a value head on the generator's hidden states (a learned process reward)",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", default="gsm8k_train", help="a JSONL path or a named set (default gsm8k_train)")
    parser.add_argument("--data-dir", help="where named sets live (default: $ITSCALE_DATA_DIR, else ../shared/data)")
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--samples", type=int, default=4, help="rollouts per problem (default 4)")
    parser.add_argument(
        "--mc-rollouts", type=int, default=0, help="Monte Carlo labels: continuations per step prefix (default 0: none)"
    )
    parser.add_argument("--mc-limit", type=int, help="Monte Carlo labels only on the first N problems")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"named model or GGUF path (default {DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, help="directory for the head and its card (and the rollouts)")
    parser.add_argument("--rollouts", help="directory of the sampled rollouts, if not --out")
    parser.add_argument("--concurrency", type=int, default=8, help="problems sampled at once (default 8)")
    parser.add_argument("--n-threads", type=int, default=None, help="CPU threads for llama.cpp")
    parser.add_argument(
        "--layers",
        default="final",
        help="feature layers, comma-separated: 'final' (after the output norm) or block indices "
        "(the residual stream after block K); sampled with the rollouts, evaluated from their text where "
        "older rollouts lack them (default final)",
    )
    parser.add_argument("--label", choices=["outcome", "mc"], default="outcome", help="labels to train on")
    parser.add_argument("--head", choices=["auto", "linear", "mlp"], default="auto", help="head kind (auto: both)")
    parser.add_argument("--hidden", type=int, default=64, help="MLP hidden units (default 64)")
    parser.add_argument(
        "--rank-weight",
        type=float,
        default=0.0,
        help="weight of a within-problem ranking term added to the cross-entropy (default 0: none)",
    )
    parser.add_argument("--train-rollouts", type=int, help="train on the first N rollouts only (data-size studies)")
    parser.add_argument("--sample-only", action="store_true", help="sample, do not train")
    parser.add_argument("--train-only", action="store_true", help="train on the saved rollouts, sample nothing")
    parser.add_argument(
        "--allow-test-split", action="store_true", help="train on a file named *_test (refused by default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser)
    parser.set_defaults(handler=_train_reward, parser=parser)


def _train_reward(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from itscale.cli import settings_from
    from itscale.errors import UsageError
    from itscale.eval.commands import command_line
    from itscale.eval.datasets import load_dataset
    from itscale.rewards.training import TrainSettings, examples_from, rollout_dir, train, with_layers, write_head

    # Everything a user can get wrong is checked before a model is loaded.
    if args.budget is not None:
        raise UsageError("itscale train-reward takes --samples (rollouts per problem), not --budget")
    for flag, value, low in (
        ("--samples", args.samples, 1),
        ("--concurrency", args.concurrency, 1),
        ("--mc-rollouts", args.mc_rollouts, 0),
        ("--hidden", args.hidden, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not (math.isfinite(args.rank_weight) and args.rank_weight >= 0):
        raise UsageError(f"--rank-weight must be a finite number >= 0, got {args.rank_weight}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {args.limit}")
    if args.train_rollouts is not None and args.train_rollouts < 2:
        raise UsageError(f"--train-rollouts must be at least 2, got {args.train_rollouts}")
    if args.sample_only and args.train_only:
        raise UsageError("--sample-only and --train-only exclude each other")
    if args.label == "mc" and not args.mc_rollouts and not args.train_only:
        raise UsageError("--label mc needs Monte Carlo labels: sample with --mc-rollouts K")
    settings = settings_from(args)
    seed = settings.seed
    layers = tuple(x for x in args.layers.split(",") if x.strip())
    if not layers:
        raise UsageError("--layers names no layer: give 'final' or block indices such as 12")
    out = Path(args.out)
    directory = rollout_dir(args.rollouts or out)
    dataset = load_dataset(args.dataset, args.data_dir)
    if Path(dataset.source).stem.endswith("_test") and not args.allow_test_split:
        raise UsageError(
            f"{dataset.source} is a test split: train on training data (gsm8k_train), or pass --allow-test-split"
        )
    problems = dataset.head(args.limit)
    command = command_line(args, "train-reward")

    if not args.train_only:
        _sample(args, directory, dataset, problems, settings, seed, command, layers)
    if args.sample_only:
        return 0

    config = directory.read_config()
    if config is None:
        raise UsageError(f"no rollouts in {directory.path}: sample first (run without --train-only)")
    identity = config["identity"]
    if identity["dataset"]["fingerprint"] != dataset.fingerprint:
        raise UsageError(f"the rollouts in {directory.path} were sampled from another dataset than {args.dataset}")
    saved = directory.results.load(repair=False)
    records = [saved[p.id] for p in problems if p.id in saved]
    if args.train_rollouts is not None:
        records = _first_rollouts(records, args.train_rollouts)
    if len(records) < 2:
        raise UsageError(f"{len(records)} problem(s) sampled in {directory.path}: too few to train on")
    records, missing = with_layers(records, directory, layers)
    if missing:
        # The side files hold every rollout of a problem, whatever --train-rollouts kept here.
        _fill_layers(args, directory, dataset, [saved[r["problem"]] for r in missing], identity, layers)
        records, missing = with_layers(records, directory, layers)
    if args.label == "mc":
        # Only the problems with Monte Carlo labels (--mc-limit) are data: the split and the
        # card count those, not the problems sampled without them.
        records = [r for r in records if any(s.get("mc") is not None for s in r["samples"])]
        if len(records) < 2:
            raise UsageError(
                f"{len(records)} problem(s) in {directory.path} have Monte Carlo labels: too few to train on; "
                "sample more with --mc-rollouts (and a larger --mc-limit)"
            )
    data = examples_from(records, identity["generator"]["n_embd"], args.label, layers)
    train_settings = TrainSettings(kind=args.head, hidden=args.hidden, seed=seed, rank_weight=args.rank_weight)
    head, report = train(data, len(records), train_settings)
    card = write_head(
        out, head, report, identity, records, data, args.label, train_settings, command, args.dataset, layers
    )
    v = card["validation"]

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(
        f"{card['head']['kind']} head on {card['data']['rollouts']} rollouts ({card['data']['steps']} steps) of "
        f"{len(records)} problems: validation AUROC pooled {number(v['auroc_pooled'])}, within a problem "
        f"{number(v['auroc_within'])} ({v['mixed_problems']} mixed problems); written to {out}"
    )
    return 0


def _first_rollouts(records: list[dict], n: int) -> list[dict]:
    """The records cut to their first `n` rollouts in problem order (the last one trimmed)."""
    kept, left = [], n
    for record in records:
        if left <= 0:
            break
        samples = record["samples"][:left]
        kept.append({**record, "samples": samples})
        left -= len(samples)
    return kept


def _fill_layers(
    args: argparse.Namespace, directory: Any, dataset: Any, records: list, identity: dict, layers: tuple
) -> None:
    """Evaluates the layers the records lack from their text, a few problems at once, each
    problem's states appended to the layer's side file as soon as they are known."""
    import asyncio

    from itscale.errors import UsageError
    from itscale.lm.llamacpp import LlamaCppModel
    from itscale.rewards.training import layer_features, layer_store
    from itscale.types import Prompt

    # The records name their generator: that is the model to evaluate on.
    system = identity["settings"].get("system_prompt")
    texts = {p.id: p.problem for p in dataset.problems}
    lm = LlamaCppModel(identity["generator"]["name"], n_threads=args.n_threads, feature_layers=layers)
    if lm.sha256 != identity["generator"]["gguf_sha256"]:
        lm.shutdown()
        raise UsageError(f"the rollouts in {directory.path} were sampled from another GGUF than {lm.path}")
    stores = {layer: layer_store(directory, layer) for layer in layers}
    with _SamplingProgress(len(records), 0, 1, not args.no_progress, what="layers from text") as bar:

        async def fill(queue: list) -> None:
            while queue:
                record = queue.pop(0)
                prompt = Prompt.of(texts[record["problem"]], system=system)
                encoded = await layer_features(lm, record, prompt, layers)
                for layer, store in stores.items():
                    store.append([{"problem": record["problem"], "samples": encoded[layer]}])
                bar.advance_by(record["problem"])

        async def main() -> None:
            queue = list(records)
            await asyncio.gather(*(fill(queue) for _ in range(min(4, len(queue)))))

        try:
            asyncio.run(main())
        finally:
            lm.shutdown()


def _sample(
    args: argparse.Namespace,
    directory: Any,
    dataset: Any,
    problems: list,
    settings: Any,
    seed: int,
    command: list[str],
    layers: tuple,
) -> None:
    import asyncio
    import datetime
    import math

    from itscale.lm.llamacpp import LlamaCppModel
    from itscale.rewards.training import sample_rollouts, sampling_identity

    # A KV buffer per sequence: the problems sampled at once do not slow each other's
    # attention down (docs/benchmarks.md). Room for every rollout in flight and its prompt.
    per_problem = args.samples * (1 + (settings.max_steps * args.mc_rollouts if args.mc_rollouts else 0)) + 1
    lm = LlamaCppModel(
        args.model,
        n_seq_max=min(256, args.concurrency * per_problem + 8),
        kv_layout="per-sequence",
        seq_ctx=256 * math.ceil((settings.max_tokens + 768) / 256),
        n_threads=args.n_threads,
        feature_layers=layers,
    )
    try:
        identity = sampling_identity(lm, dataset, settings, args.samples, args.mc_rollouts, seed)
        with directory.lock():
            directory.check(identity)
            done = directory.results.load()
            todo = [p for p in problems if p.id not in done]
            directory.record(
                identity,
                {
                    "command": command,
                    "limit": args.limit,
                    "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                },
            )
            with _SamplingProgress(len(problems), len(problems) - len(todo), args.samples, not args.no_progress) as bar:

                def sink(record: dict) -> None:
                    directory.results.append([record])
                    bar.advance(record)

                asyncio.run(
                    sample_rollouts(
                        lm,
                        problems,
                        set(done),
                        settings,
                        args.samples,
                        args.mc_rollouts,
                        seed,
                        sink,
                        concurrency=args.concurrency,
                        mc_limit=args.mc_limit,
                    )
                )
    finally:
        lm.shutdown()


class _SamplingProgress:
    """A bar over problems with the share of right rollouts, generated tokens/s and an ETA;
    one plain line per problem when stderr is not a terminal (a log file)."""

    def __init__(self, total: int, done: int, samples: int, enabled: bool, what: str = "sampling"):
        import time

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal
        self.progress = Progress(
            TextColumn(what),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled or self.plain,
        )
        self.task = self.progress.add_task(what, total=total, completed=done, stats="")
        self.what = what
        self.total, self.done, self.started = total, done, time.time()
        self.right = self.rollouts = self.tokens = 0
        self.samples = samples

    def __enter__(self) -> _SamplingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, record: dict) -> None:
        import time

        self.done += 1
        self.rollouts += len(record["samples"])
        self.right += sum(s["correct"] for s in record["samples"])
        self.tokens += record["usage"]["completion_tokens"]
        elapsed = time.time() - self.started
        rate = self.tokens / max(elapsed, 1e-9)
        stats = f"right {self.right}/{self.rollouts}, {rate:.0f} tok/s"
        self.progress.update(self.task, advance=1, stats=stats)
        if self.plain:
            per_problem = elapsed / max(1, self.done_here)
            eta = per_problem * (self.total - self.done)
            self.console.print(
                f"{time.strftime('%H:%M:%S')} {record['problem']}: "
                f"{sum(s['correct'] for s in record['samples'])}/{len(record['samples'])} right | "
                f"{self.done}/{self.total} problems, {stats}, ETA ~{eta / 3600:.1f} h",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    def advance_by(self, label: str) -> None:
        """One more item done that is not a sampled problem (layers evaluated from text)."""
        import time

        self.done += 1
        self.progress.update(self.task, advance=1)
        if self.plain:
            elapsed = time.time() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            self.console.print(
                f"{time.strftime('%H:%M:%S')} {label}: {self.what} | {self.done}/{self.total}, ETA ~{eta / 60:.0f} min",
                highlight=False,
                markup=False,
            )

    @property
    def done_here(self) -> int:
        return self.rollouts // max(1, self.samples)


POLICY_EPILOG = """\
examples:
  itscale fit-budget-policy --rollouts runs/probe --out runs/budget-policy.json
  itscale solve "..." --budget auto:3 --option policy=runs/budget-policy.json

The rollouts are those `itscale train-reward` sampled (K graded samples per training
problem); the policy knows the budgets from --first-batch to K.
"""


def add_policy_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fit-budget-policy",
        help="fit a compute-optimal budget policy (budget by difficulty) on sampled training rollouts",
        epilog=POLICY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rollouts", required=True, help="a directory of rollouts from `itscale train-reward`")
    parser.add_argument("--out", required=True, help="the policy file to write (JSON)")
    parser.add_argument("--first-batch", type=int, default=2, help="samples that estimate difficulty (default 2)")
    parser.add_argument("--orders", type=int, default=24, help="random orders of each problem's samples (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--difficulty",
        choices=["agreement", "value"],
        default="agreement",
        help="agreement of the first batch (default), or a learned head's mean value after its first steps",
    )
    parser.add_argument(
        "--selections",
        help="the selection rules the policy chooses among, comma-separated: vote, weighted-vote (the vote weighted "
        "by the head's value of each sample); default vote,weighted-vote with --difficulty value, else vote",
    )
    parser.add_argument(
        "--head",
        help="with --difficulty value or the weighted vote: the head (default: the one shipped for the model)",
    )
    parser.add_argument("--value-levels", type=int, default=3, help="with --difficulty value: levels (default 3)")
    parser.add_argument(
        "--folds", type=int, default=5, help="with --difficulty value: folds of the out-of-fold values (default 5)"
    )
    parser.add_argument(
        "--allow-test-split", action="store_true", help="fit on rollouts of a *_test file (refused by default)"
    )
    parser.set_defaults(handler=_fit_policy, parser=parser)


def _head_values(args: argparse.Namespace, directory: Any, records: list, generator: dict) -> tuple[list, list, str]:
    """Out-of-fold values after each sample's first step and of each finished sample, by
    heads trained with the chosen head's recorded settings on outcome labels (a recorded
    kind "auto" chooses linear or MLP again in each fold), and the chosen head's sha256 (the
    policy reads its values at run time)."""
    from pathlib import Path

    from itscale.errors import UsageError
    from itscale.rewards.probe import card_layers, head_digest, read_card, shipped_head
    from itscale.rewards.training import card_settings, out_of_fold_values, with_layers

    if args.value_levels < 2 or args.folds < 2:
        raise UsageError(f"--value-levels and --folds must be at least 2, got {args.value_levels} and {args.folds}")
    head = Path(args.head) if args.head else shipped_head(generator["name"])
    if head is None:
        raise UsageError(f"no head is shipped for {generator['name']}: pass --head DIR (from itscale train-reward)")
    card = read_card(head)
    if card["generator"].get("gguf_sha256") != generator["gguf_sha256"]:
        raise UsageError(f"the head in {head} was trained for another model than these rollouts: pass its own head")
    layers = card_layers(card)
    records, missing = with_layers(records, directory, layers)
    if missing:
        raise UsageError(
            f"{len(missing)} problems' rollouts lack the features of layer(s) {', '.join(layers)}: "
            f"run itscale train-reward --rollouts {args.rollouts} --layers {','.join(layers)} first"
        )
    first, final = out_of_fold_values(records, generator["n_embd"], layers, card_settings(card), args.folds)
    return first, final, head_digest(head)


def _selections(args: argparse.Namespace) -> list[str]:
    from itscale.errors import UsageError
    from itscale.search.allocation import SELECTIONS

    if args.selections is None:
        return ["vote", "weighted-vote"] if args.difficulty == "value" else ["vote"]
    names = list(dict.fromkeys(n.strip() for n in args.selections.split(",") if n.strip()))
    unknown = [n for n in names if n not in SELECTIONS]
    if unknown or not names:
        raise UsageError(f"--selections takes some of {', '.join(SELECTIONS)}; got {args.selections!r}")
    return names


def _fit_policy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from itscale.errors import UsageError
    from itscale.eval.commands import command_line
    from itscale.rewards.training import rollout_dir
    from itscale.search.allocation import fit_policy

    if args.orders < 1:
        raise UsageError(f"--orders must be at least 1, got {args.orders}")
    directory = rollout_dir(args.rollouts)
    config = directory.read_config()
    if config is None:
        raise UsageError(f"no rollouts in {args.rollouts}: sample them with `itscale train-reward --sample-only`")
    identity = config["identity"]
    source = identity["dataset"]["source"]
    if Path(source).stem.endswith("_test") and not args.allow_test_split:
        raise UsageError(f"the rollouts in {args.rollouts} come from a test split ({source}): fit on training data")
    records = list(directory.results.load(repair=False).values())
    selections = _selections(args)
    first_values, final_values, head_sha = None, None, None
    if args.difficulty == "value" or "weighted-vote" in selections:
        first_values, final_values, head_sha = _head_values(args, directory, records, identity["generator"])
    elif args.head is not None:
        raise UsageError("--head goes with --difficulty value or --selections with weighted-vote")
    policy = fit_policy(
        records,
        identity["generator"],
        args.first_batch,
        args.orders,
        args.seed,
        first_values if args.difficulty == "value" else None,
        args.value_levels,
        final_values if "weighted-vote" in selections else None,
        head_sha,
        selections,
    )
    command = command_line(args, "fit-budget-policy")
    policy.card.update({"data": {"rollouts": str(args.rollouts), "dataset": source}, "command": command})
    policy.save(args.out)
    print(
        f"budget policy from {len(records)} problems x {policy.card['samples_per_problem']} samples, "
        f"first batch {policy.first_batch}, budgets {policy.budgets}; written to {args.out}"
    )
    edges = policy.value_edges
    if edges is not None:
        split = ", ".join(f"{e:.3f}" for e in edges)
        print(f"  difficulty: the head's mean value after the first step, levels split at {split}")
    difficulty = policy.card["difficulty_auroc"]
    if difficulty is not None:
        print(f"  the level predicts that one more sample is wrong with AUROC {difficulty:.3f}")
    for level, (share, row) in enumerate(zip(policy.frequency, policy.accuracy, strict=True)):
        accuracies = "; ".join(
            f"{selection} "
            + ", ".join(
                f"{c.budget}: {a:.0%}" for c, a in zip(policy.choices, row, strict=True) if c.selection == selection
            )
            for selection in dict.fromkeys(c.selection for c in policy.choices)
        )
        if edges is None:
            what = f"{level}/{policy.first_batch} agree"
        else:
            bounds = [
                f"{edges[level - 1]:.3f} <=" if level else "",
                "value",
                f"< {edges[level]:.3f}" if level < len(edges) else "",
            ]
            what = " ".join(b for b in bounds if b)
        print(f"  level {level} ({what}, {share:.0%} of problems): accuracy {accuracies}")
    for mean in sorted({policy.first_batch, *policy.budgets[1:]}):
        allocation = policy.allocate(mean)
        accuracy, spent = policy.expected(allocation)
        chosen = ", ".join(f"{c.selection} {c.budget}" for c in allocation)
        print(f"  auto:{mean}: by level {chosen}; mean {spent:.2f}, expected accuracy {accuracy:.0%}")
    return 0
