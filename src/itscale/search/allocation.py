"""Compute-optimal allocation: a budget and a selection per problem from its estimated difficulty.

Snell et al. (2024) spend test-time compute by difficulty: easy problems need one or two
samples, hard ones more, and hopeless ones gain nothing from more. Here the difficulty of a
problem is read off a small first batch of samples at no extra cost, since the batch is
kept: the vote share of its leading answer (0 when no sample has an answer). With a first
batch of b0 samples that share takes at most b0 + 1 values, the *levels*.

Where a learned value head exists for the generator, the difficulty can instead be read from
it (`difficulty="value"`): the mean, over the first batch, of the head's value after each
sample's first step, binned into levels by edges fitted on training problems (level 0: the
lowest values, the hardest problems). It predicts failure better than agreement does on this
project's GSM8K measurements (docs/results/README.md) and costs one step of each first-batch
sample before the level is known, which the batch has anyway.

A `BudgetPolicy` holds, for each level, how often problems fall in it and the accuracy of
every *choice* it knows, a selection rule and a budget b, measured on training problems
(`fit_policy`, from the rollouts `itscale train-reward` samples: K graded samples per
problem, so the budgets it knows run from b0 to K). The selection rules: the majority vote
over the b samples, and, where a learned head scored the training samples (out of fold),
the vote weighted by the head's value of each finished sample (weighted best-of-N with the
probe as the reward; on the 115 GSM8K train problems the shipped qwen policy was fitted on,
it beats the plain vote by 2-3 points at 4 and 8 samples). For a mean budget B per problem,
`allocate` chooses a choice per level that maximises the expected accuracy under that mean;
a level whose accuracy no longer grows (easy, or hopeless) keeps its first batch. The
`compute-optimal` algorithm (itscale.search.sampling) runs it: first batch, level, the rest
of the level's budget, its selection.

Particle filtering is not among the choices: fitting it would need particle-filter runs on
the training problems at every budget (hours here), where the vote's accuracy at every
budget comes from the K samples `itscale train-reward` draws anyway.

A policy is a JSON file written by `itscale fit-budget-policy`, with the data and the
command that made it; it belongs to one generator (its GGUF sha256).
"""

from __future__ import annotations

import bisect
import datetime
import itertools
import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from itscale.answers import is_equivalent
from itscale.errors import UsageError

FORMAT = 2  # 1: majority vote only, its accuracies per budget (still read)
# The selection rules a policy can choose, and what each means.
SELECTIONS = {
    "vote": "majority vote",
    "weighted-vote": "vote weighted by the head's value of each finished sample (head_sha256)",
}
# Policies shipped inside the package, one file per named model.
SHIPPED = Path(__file__).resolve().parent / "policies"


def difficulty_level(answers: Sequence[str | None], first_batch: int) -> int:
    """The level of a first batch: how many of its `first_batch` samples give the leading
    answer (0 when none has an answer); more agreement means an easier problem."""
    return level_of(answer_classes(answers[:first_batch]))


def level_of(classes: Sequence[int | None]) -> int:
    """How many of these answer classes are the most frequent one (0: no answer at all)."""
    answered = [c for c in classes if c is not None]
    return max((answered.count(c) for c in set(answered)), default=0)


def value_level(mean_value: float, edges: Sequence[float]) -> int:
    """The level of a first batch by its mean learned value after each sample's first step:
    how many of the policy's `edges` it reaches (0: the lowest values, the hardest)."""
    return bisect.bisect_right(list(edges), mean_value)


def answer_classes(answers: Sequence[str | None]) -> list[int | None]:
    """For each answer, the index of the first equivalent answer before it (None: no answer)."""
    firsts: list[tuple[int, str]] = []
    out: list[int | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        match = next((i for i, a in firsts if a == answer or is_equivalent(answer, a)), None)
        if match is None:
            match = len(firsts)
            firsts.append((match, answer))
        out.append(match)
    return out


def vote_is_right(classes: Sequence[int | None], right: Sequence[bool], weights: Sequence[float] | None = None) -> bool:
    """Whether the majority (or weighted) vote over these samples is right, with
    `answers.majority`'s rule: the largest total, a tie to the class seen first, no answer
    no vote."""
    counts: dict[int, float] = {}
    first: dict[int, int] = {}
    for i, c in enumerate(classes):
        if c is not None:
            counts[c] = counts.get(c, 0) + (1.0 if weights is None else weights[i])
            first.setdefault(c, i)
    if not counts:
        return False
    best = max(counts.values())
    winner = min((c for c, n in counts.items() if n == best), key=first.__getitem__)
    return bool(right[first[winner]])


class Choice(NamedTuple):
    """What a level gets: a selection rule (a key of SELECTIONS) over `budget` samples."""

    selection: str
    budget: int


@dataclass
class BudgetPolicy:
    """Per level: the share of training problems in it (`frequency`) and the accuracy of
    each known choice (`accuracy[level][i]` of `choices[i]`). The levels are the first
    batch's agreement (0..first_batch), or, with `value_edges`, its mean learned value after
    the first step, binned by those edges (0..len(value_edges)). `card["head_sha256"]` names
    the head whose values the edges and the weighted vote are in."""

    generator: dict[str, Any]
    first_batch: int
    choices: list[Choice]
    frequency: list[float]
    accuracy: list[list[float]]
    card: dict[str, Any] = field(default_factory=dict)
    value_edges: list[float] | None = None

    @property
    def levels(self) -> int:
        return len(self.value_edges) + 1 if self.value_edges is not None else self.first_batch + 1

    @property
    def budgets(self) -> list[int]:
        return sorted({c.budget for c in self.choices})

    def __post_init__(self) -> None:
        try:
            self.choices = [Choice(str(selection), int(budget)) for selection, budget in self.choices]
        except (TypeError, ValueError):
            raise UsageError("the budget policy's choices are not (selection, budget) pairs: fit it again") from None
        unknown = sorted({c.selection for c in self.choices} - set(SELECTIONS))
        if unknown:
            raise UsageError(
                f"the budget policy chooses unknown selection(s) {', '.join(unknown)} "
                f"(known: {', '.join(SELECTIONS)}): it was written by a newer itscale, or fit it again"
            )
        levels = self.levels
        if (
            self.first_batch < 1
            or not self.choices
            or self.budgets[0] != self.first_batch
            or len(set(self.choices)) != len(self.choices)
            or len(self.frequency) != levels
            or len(self.accuracy) != levels
            or any(len(row) != len(self.choices) for row in self.accuracy)
        ):
            raise UsageError("the budget policy is inconsistent (levels, choices, accuracies): fit it again")
        if self.reads_head and not self.card.get("head_sha256"):
            raise UsageError("the budget policy reads a learned head but names none (head_sha256): fit it again")

    @property
    def reads_head(self) -> bool:
        """Whether some allocation of this policy reads the learned head (for the level, or to weigh)."""
        return self.needs_head(self.choices)

    def needs_head(self, allocation: Sequence[Choice]) -> bool:
        """Whether running this allocation reads the learned head: for the level, or to weigh."""
        return self.value_edges is not None or any(c.selection != "vote" for c in allocation)

    def allocate(self, mean_budget: float) -> list[Choice]:
        """The choice of each level that maximises expected accuracy with a mean budget per
        problem of at most `mean_budget` (exhaustive over the known choices: a handful of
        levels, budgets and rules). Among equals, the cheapest, then the plain vote (it needs
        no head). Below the first batch no allocation exists: a UsageError."""
        if mean_budget < self.first_batch:
            raise UsageError(
                f"the mean budget {mean_budget:g} (auto:{mean_budget:g}) is below this policy's first batch of "
                f"{self.first_batch} samples: "
                f"use a mean budget of at least {self.first_batch}"
            )
        levels = range(self.levels)
        best: tuple[float, float, int, tuple[int, ...]] | None = None
        for choice in itertools.product(range(len(self.choices)), repeat=len(levels)):
            cost = sum(self.frequency[lv] * self.choices[i].budget for lv, i in zip(levels, choice, strict=True))
            if cost > mean_budget + 1e-9:
                continue
            gain = sum(self.frequency[lv] * self.accuracy[lv][i] for lv, i in zip(levels, choice, strict=True))
            weighted = sum(self.choices[i].selection != "vote" for i in choice)
            # The most accurate; among equals, the cheapest, then the fewest levels that read
            # the head (the plain vote needs none).
            key = (round(gain, 12), -round(cost, 9), -weighted, choice)
            if best is None or key[:3] > best[:3]:
                best = key
        assert best is not None  # the first batch everywhere always fits
        return [self.choices[i] for i in best[3]]

    def expected(self, allocation: Sequence[Choice]) -> tuple[float, float]:
        """(expected accuracy, mean budget) of an allocation on the training problems."""
        index = {c: i for i, c in enumerate(self.choices)}
        pairs = list(enumerate(zip(self.frequency, allocation, strict=True)))
        accuracy = sum(f * self.accuracy[lv][index[Choice(*c)]] for lv, (f, c) in pairs)
        return accuracy, sum(f * c[1] for f, c in zip(self.frequency, allocation, strict=True))

    def check_generator(self, name: str | None, sha: str | None) -> None:
        """A policy fitted for another generator (by its GGUF sha256, where known) is refused:
        its accuracies are not this one's."""
        if sha and self.generator.get("gguf_sha256") and sha != self.generator["gguf_sha256"]:
            raise UsageError(
                f"this budget policy was fitted for {self.generator.get('name')} "
                f"(sha256 {self.generator['gguf_sha256'][:12]}…), not for {name}: "
                "fit one for this model with `itscale fit-budget-policy`"
            )

    def to_json(self) -> dict[str, Any]:
        if self.value_edges is None:
            difficulty = "agreement of the first batch: samples giving its leading answer (level 0: none answered)"
        else:
            difficulty = (
                "value: the first batch's mean learned value after the first step, binned by value_edges "
                "(level 0: the lowest values); the head is card head_sha256"
            )
        return {
            "format": FORMAT,
            "generator": self.generator,
            "difficulty": difficulty,
            **({"value_edges": self.value_edges} if self.value_edges is not None else {}),
            "selections": {s: SELECTIONS[s] for s in dict.fromkeys(c.selection for c in self.choices)},
            "first_batch": self.first_batch,
            "choices": [list(c) for c in self.choices],
            "frequency": self.frequency,
            "accuracy": self.accuracy,
            **self.card,
        }

    def save(self, path: str | Path) -> None:
        from itscale.files import write_json_atomic

        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> BudgetPolicy:
        path = policy_file(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(
                f"no budget policy at {path}: fit one with `itscale fit-budget-policy --rollouts DIR --out {path}`"
            ) from None
        except (OSError, ValueError) as error:
            raise UsageError(f"the budget policy {path} is unreadable ({error}): fit it again") from None
        if not isinstance(data, dict) or data.get("format") not in (1, FORMAT):
            found = data.get("format") if isinstance(data, dict) else None
            raise UsageError(f"{path} is not a budget policy of format 1 or {FORMAT} (it says {found!r}): fit it again")
        if data["format"] == 1:  # the vote only, its accuracies per budget
            data["choices"] = [["vote", b] for b in data.get("budgets", [])]
        known = {"generator", "first_batch", "choices", "frequency", "accuracy"}
        described = {"format", "difficulty", "selection", "selections", "budgets", "value_edges"}
        try:
            return cls(
                **{k: data[k] for k in known},
                value_edges=data.get("value_edges"),
                card={k: v for k, v in data.items() if k not in known | described},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"the budget policy {path} is incomplete ({error}): fit it again") from None


def policy_file(path: str | Path) -> Path:
    """The policy file a path names: the file, or budget-policy.json in a directory."""
    path = Path(path).expanduser()
    return path / "budget-policy.json" if path.is_dir() else path


def policy_digest(path: str | Path | None) -> str | None:
    """The sha256 of a policy file (None without one): what a study's identity records."""
    import hashlib

    file = policy_file(path) if path is not None else None
    return hashlib.sha256(file.read_bytes()).hexdigest() if file is not None and file.is_file() else None


def load_policy_for(model_name: str, path: str | Path | None = None) -> BudgetPolicy:
    """The policy at `path`, else the one shipped for the named model (a UsageError saying how
    to fit one when there is none)."""
    path = path or shipped_policy(model_name)
    if path is None:
        raise UsageError(
            f"no budget policy is shipped for {model_name or 'this model'}: fit one with "
            "`itscale fit-budget-policy --rollouts DIR --out FILE` and pass --option policy=FILE"
        )
    return BudgetPolicy.load(path)


AUTO_BUDGET = "auto:"


def resolve_budget(algorithm: str | None, budget: int | str | None, default_algorithm: str) -> tuple[str, int | None]:
    """(algorithm, budget) from what a user gave: a budget "auto:B" is the compute-optimal
    algorithm at a mean budget B (another algorithm named beside it is a contradiction);
    otherwise the algorithm, or the default, and the budget as given. The same rule for
    Python, the CLI and the server."""
    if not isinstance(budget, str):
        return algorithm or default_algorithm, budget
    mean = budget.removeprefix(AUTO_BUDGET)
    if not budget.startswith(AUTO_BUDGET) or not mean.isdigit():
        raise UsageError(
            f"budget {budget!r}: give a number of particles (8) or auto:B, a mean budget per problem (auto:4)"
        )
    if algorithm not in (None, "compute-optimal"):
        raise UsageError(
            f"budget {budget} is the compute-optimal algorithm at a mean budget per problem, not {algorithm}: "
            "leave the algorithm out, or give a number of particles"
        )
    return "compute-optimal", int(mean)


def check_policy_before_loading(model: str, path: str | Path | None, budgets: Sequence[int]) -> None:
    """The policy compute-optimal will read for an embedded `model` (a name or GGUF path),
    checked before the model is opened: it exists, belongs to the model (for a named model,
    whose sha256 is known without reading the file), and can allocate every mean budget."""
    from itscale.lm.models import MODELS, model_name

    name = model_name(model)
    policy = load_policy_for(name, path)
    policy.check_generator(name, MODELS[model].sha256 if model in MODELS else None)
    for budget in budgets:
        policy.allocate(budget)


def shipped_policy(model_name: str) -> Path | None:
    """The policy shipped for a named model, if there is one."""
    path = SHIPPED / f"{model_name}.json"
    return path if path.exists() else None


def fit_policy(
    records: Sequence[dict[str, Any]],
    generator: dict[str, Any],
    first_batch: int = 2,
    orders: int = 24,
    seed: int = 0,
    first_values: Sequence[Sequence[float]] | None = None,
    value_levels: int = 3,
    final_values: Sequence[Sequence[float]] | None = None,
    head_sha256: str | None = None,
    selections: Sequence[str] | None = None,
) -> BudgetPolicy:
    """A policy from graded samples: `records` as `itscale train-reward` writes them (per
    problem, "samples" with "answer" and "correct"). Every problem's K samples are taken in
    `orders` random orders; each order's first `first_batch` samples set the level, and the
    vote over its first b samples is scored for every known budget b (b0, the powers of two
    between, and K). Levels seen in no order keep the mean accuracy of all problems.

    With `first_values` (per record, per sample: a learned head's value after the sample's
    first step, from a head that did not train on that record), the level is the first
    batch's mean value, binned into `value_levels` levels at the quantiles of those means.
    With `final_values` (likewise, the value of the finished sample), the vote weighted by
    them is a choice too, at every budget; `head_sha256` names the head both come from.
    `selections` narrows the rules (default: the vote, and the weighted vote where
    `final_values` are given)."""
    sizes = {len(r["samples"]) for r in records}
    if not records:
        raise UsageError("no sampled problems to fit a budget policy on: sample with `itscale train-reward` first")
    k = min(sizes)
    if first_batch < 1 or first_batch >= k:
        raise UsageError(f"--first-batch must be between 1 and {k - 1} (the problems have {k} samples each)")
    if first_values is not None and value_levels < 2:
        raise UsageError(f"--value-levels must be at least 2, got {value_levels}")
    if (first_values is not None or final_values is not None) and not head_sha256:
        raise ValueError("values from a learned head need that head's sha256 (head_sha256)")
    budgets = sorted({first_batch, k, *(2**i for i in range(10) if first_batch < 2**i < k)})
    if selections is None:
        selections = ["vote", "weighted-vote"] if final_values is not None else ["vote"]
    if "weighted-vote" in selections and final_values is None:
        raise ValueError("the weighted vote needs the head's values of the finished samples (final_values)")
    choices = [Choice(s, b) for s in selections for b in budgets]
    rng = random.Random(seed)
    # Every (problem, order): its answer classes, verdicts and final values in that order,
    # and the first batch's mean value when values are given.
    instances: list[tuple[list[int | None], list[bool], list[float] | None, float | None]] = []
    for r, record in enumerate(records):
        samples = record["samples"][:k]
        classes = answer_classes([s["answer"] for s in samples])
        correct = [bool(s["correct"]) for s in samples]
        for _ in range(orders):
            order = list(range(k))
            rng.shuffle(order)
            values = first_values[r] if first_values is not None else None
            mean = statistics.fmean(values[i] for i in order[:first_batch]) if values is not None else None
            finals = [final_values[r][i] for i in order] if final_values is not None else None
            instances.append(([classes[i] for i in order], [correct[i] for i in order], finals, mean))
    edges = None
    if first_values is not None:
        means = sorted(m for *_, m in instances if m is not None)
        edges = [means[len(means) * j // value_levels] for j in range(1, value_levels)]
    levels = len(edges) + 1 if edges is not None else first_batch + 1
    counts = [0] * levels
    right = [[0] * len(choices) for _ in range(levels)]
    overall = [0] * len(choices)
    for c, r, finals, mean in instances:
        level = value_level(mean, edges) if edges is not None else level_of(c[:first_batch])
        counts[level] += 1
        for j, (selection, b) in enumerate(choices):
            weights = finals[:b] if selection == "weighted-vote" and finals is not None else None
            hit = vote_is_right(c[:b], r[:b], weights)
            right[level][j] += hit
            overall[j] += hit
    total = sum(counts)
    accuracy = [
        [right[lv][j] / counts[lv] if counts[lv] else overall[j] / total for j in range(len(choices))]
        for lv in range(levels)
    ]
    return BudgetPolicy(
        generator=generator,
        first_batch=first_batch,
        choices=choices,
        frequency=[c / total for c in counts],
        accuracy=accuracy,
        value_edges=edges,
        card={
            "problems": len(records),
            "samples_per_problem": k,
            "orders": orders,
            "seed": seed,
            "difficulty_auroc": difficulty_auroc(records, first_batch, orders, seed, first_values),
            "date": datetime.date.today().isoformat(),
            **({"head_sha256": head_sha256} if head_sha256 else {}),
        },
    )


def difficulty_auroc(
    records: Sequence[dict[str, Any]],
    first_batch: int,
    orders: int = 24,
    seed: int = 0,
    first_values: Sequence[Sequence[float]] | None = None,
) -> float | None:
    """How well the difficulty predicts that one more sample is wrong (as greedy decoding
    would be on a hard problem): AUROC of (first_batch - agreement level), or of minus the
    first batch's mean value when `first_values` are given, against "sample first_batch + 1
    is wrong", over `orders` random orders of each problem's samples. 0.5 is no better than
    chance; None when every such sample is right, or every one wrong."""
    from itscale.rewards.training import auroc

    rng = random.Random(seed)
    scores, wrong = [], []
    for r, record in enumerate(records):
        samples = record["samples"]
        if len(samples) <= first_batch:
            continue
        classes = answer_classes([s["answer"] for s in samples])
        for _ in range(orders):
            order = list(range(len(samples)))
            rng.shuffle(order)
            if first_values is not None:
                scores.append(-statistics.fmean(first_values[r][i] for i in order[:first_batch]))
            else:
                scores.append(first_batch - level_of([classes[i] for i in order[:first_batch]]))
            wrong.append(not samples[order[first_batch]]["correct"])
    return auroc(scores, wrong)
