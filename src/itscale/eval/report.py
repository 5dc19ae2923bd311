"""`itscale report DIR`: the accuracy table (Markdown and JSON) and the scaling plots.

One row per (algorithm, budget): accuracy over problems (a problem's score is its mean over
seeds) with a 95% percentile-bootstrap interval (problems resampled, 10,000 times, fixed
seed, so the report is reproducible), how often any final particle was right (what a perfect
selector would score: the gap to accuracy is the selection's loss, the gap to 100% the
search's), mean tokens and wall time per run, and where the row's answers came from: its own
runs, or subsets of a shared larger run (sample reuse).

A second table tells the search from the choice: for each row, what its final particles
held. A plain vote over them (did the search find the answer the particles agree on?), how
many distinct answers they held (a search that concentrates its particles has few), and how
many ended on the token cap (cut short, not wrong by reasoning), and, for the algorithms
that resample, in how many runs and at how many of their steps they did (a filter that
resamples at nearly every step keeps few lineages, one that never resamples is independent
sampling weighted by the reward). When `any right` is far above accuracy the
selector, not the search, is what loses.

Rows over the same problems have overlapping intervals long before their difference is
noise: the report also compares chosen algorithms (particle filtering, by default) with
every other at each budget, paired over problems (the difference of per-problem scores,
with its own bootstrap interval), which is the test that says whether one beat the other.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itscale.answers import is_equivalent, majority
from itscale.errors import UsageError
from itscale.eval.coverage import CoverageCurve, coverage_curves, coverage_table
from itscale.eval.store import RESULTS, OutputDir
from itscale.files import write_atomic, write_json_atomic

BOOTSTRAP_SAMPLES = 10_000
TOKEN_NOTE = (
    "Tokens are everything the run cost: prompt tokens the backend evaluated, generated tokens, and reward "
    "tokens (tokens the judge evaluated). For sample-reuse rows the count is what a run at that budget would "
    "have cost: the exact generated tokens of the first b rollouts, the prompt tokens the backend reported for "
    "them plus the shared prompt once, and the run's reward tokens in proportion to the steps scored for them; "
    "their wall time is the shared run's in proportion to those tokens (an estimate, marked *)."
)


@dataclass
class Row:
    algorithm: str
    budget: int
    problems: int
    runs: int
    accuracy: float
    ci_low: float
    ci_high: float
    any_correct: float  # problems where some final particle's answer is right (mean over seeds)
    vote_correct: float  # problems where a plain vote over the final particles is right (mean over seeds)
    distinct_answers: float  # distinct answers (equivalents pooled) among a run's final particles, mean
    capped: float  # share of final particles that ended on the token cap (end "length")
    mean_tokens: float
    mean_completion_tokens: float
    mean_reward_tokens: float
    mean_seconds: float
    seconds_estimated: bool
    sampled_from: list[int]  # sizes of the shared runs this row was picked from; [] for its own runs
    rollouts_of: list[str]  # other algorithms whose runs this row picked from (shared rollouts)
    # For algorithms that resample (their records carry diagnostics["resampled_steps"]); None otherwise.
    resampled_runs: int | None = None  # runs that resampled at least once
    resampled_steps: int | None = None  # steps at which they resampled, summed over runs
    search_steps: int | None = None  # steps the runs took (their longest particle's), summed
    # Accuracy when only an answer the chosen solution states (boxed, or an explicit final
    # line) counts, not the last number of its text; None for records made before it was kept.
    strict_accuracy: float | None = None


def bootstrap_interval(scores: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `scores`."""
    if len(scores) < 2:
        value = float(scores.mean()) if len(scores) else float("nan")
        return value, value
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(samples, len(scores)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def cells_of(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Records grouped by (algorithm, budget): one cell per row of the report."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        cells[(r["algorithm"], int(r["budget"]))].append(r)
    return cells


def in_grid_order(cells: Iterable[tuple[str, int]], algorithms: list[str]) -> list[tuple[str, int]]:
    """(algorithm, budget) cells in the configuration's algorithm order (algorithms it does
    not name after, by name), budgets ascending: the order of every table."""
    order = {a: i for i, a in enumerate(algorithms)}
    return sorted(cells, key=lambda cell: (order.get(cell[0], len(order)), cell))


def summarise(records: list[dict[str, Any]], algorithms: list[str]) -> list[Row]:
    """Rows in the configuration's algorithm order, budgets ascending."""
    cells = cells_of(records)
    rows = []
    for algorithm, budget in in_grid_order(cells, algorithms):
        group = cells[(algorithm, budget)]
        per_problem: dict[str, list[float]] = defaultdict(list)
        any_right: dict[str, list[float]] = defaultdict(list)
        vote_right: dict[str, list[float]] = defaultdict(list)
        distinct, ends = [], []
        for r in group:
            per_problem[r["problem"]].append(float(bool(r["correct"])))
            any_right[r["problem"]].append(float(any_particle_right(r)))
            winner, votes = majority([p["answer"] for p in r["particles"]])
            vote_right[r["problem"]].append(float(winner is not None and is_equivalent(winner, r["reference"])))
            distinct.append(len(votes))
            ends += [p.get("end") == "length" for p in r["particles"]]
        scores = np.array([np.mean(v) for v in per_problem.values()])
        low, high = bootstrap_interval(scores)
        strict = None
        if all("correct_strict" in r for r in group):
            strict_per_problem: dict[str, list[float]] = defaultdict(list)
            for r in group:
                strict_per_problem[r["problem"]].append(float(bool(r["correct_strict"])))
            strict = float(np.mean([np.mean(v) for v in strict_per_problem.values()]))
        usage = [r["usage"] for r in group]
        resampled_runs, resampled_steps, search_steps = resampling_counts(group)
        rows.append(
            Row(
                algorithm=algorithm,
                budget=budget,
                problems=len(per_problem),
                runs=len(group),
                accuracy=float(scores.mean()),
                ci_low=low,
                ci_high=high,
                strict_accuracy=strict,
                any_correct=float(np.mean([np.mean(v) for v in any_right.values()])),
                vote_correct=float(np.mean([np.mean(v) for v in vote_right.values()])),
                distinct_answers=float(np.mean(distinct)),
                capped=float(np.mean(ends)) if ends else 0.0,
                mean_tokens=float(np.mean([u["total_tokens"] for u in usage])),
                mean_completion_tokens=float(np.mean([u["completion_tokens"] for u in usage])),
                mean_reward_tokens=float(np.mean([u["reward_tokens"] for u in usage])),
                mean_seconds=float(np.mean([u["seconds"] for u in usage])),
                seconds_estimated=any(r.get("seconds_estimated") for r in group),
                sampled_from=sorted({int(r["sampled_from"]) for r in group if r.get("sampled_from")}),
                rollouts_of=sorted({r["rollouts_of"] for r in group if r.get("rollouts_of", algorithm) != algorithm}),
                resampled_runs=resampled_runs,
                resampled_steps=resampled_steps,
                search_steps=search_steps,
            )
        )
    return rows


def resampling_counts(group: list[dict[str, Any]]) -> tuple[int | None, int | None, int | None]:
    """Runs that resampled, steps at which they did, and steps the runs took (a run's steps: its
    longest particle's), summed over `group`; all None for an algorithm that does not resample
    (its records carry no `resampled_steps` diagnostic)."""
    counts = [r.get("diagnostics", {}).get("resampled_steps") for r in group]
    if None in counts:
        return None, None, None
    steps = sum(max((p["steps"] for p in r["particles"]), default=0) for r in group)
    return sum(n > 0 for n in counts), sum(counts), steps


def any_particle_right(record: dict[str, Any]) -> bool:
    """Whether some final particle's answer equals the reference. The chosen answer is one of
    theirs, so a record graded right needs no regrading."""
    if record["correct"]:
        return True
    answers = {p["answer"] for p in record["particles"]}
    return any(is_equivalent(a, record["reference"]) for a in answers)


@dataclass
class Difference:
    """`algorithm` minus `other` at `budget`: mean over problems of the per-problem score
    difference, with a 95% paired bootstrap interval."""

    algorithm: str
    other: str
    budget: int
    problems: int
    difference: float
    ci_low: float
    ci_high: float


DEFAULT_COMPARED = ("particle-filter",)


def cell_scores(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (algorithm, budget): each problem's score, its accuracy averaged over seeds."""
    scores: dict[tuple[str, int], dict[str, float]] = {}
    for cell, group in cells_of(records).items():
        per_problem: dict[str, list[float]] = defaultdict(list)
        for r in group:
            per_problem[r["problem"]].append(float(bool(r["correct"])))
        scores[cell] = {problem: float(np.mean(v)) for problem, v in per_problem.items()}
    return scores


def paired(mine: dict[str, float], theirs: dict[str, float]) -> tuple[int, float, float, float] | None:
    """(problems, mean difference, 95% interval) of two cells' scores over their common problems."""
    common = sorted(mine.keys() & theirs.keys())
    if not common:
        return None
    delta = np.array([mine[p] - theirs[p] for p in common])
    low, high = bootstrap_interval(delta)
    return len(common), float(delta.mean()), low, high


def paired_differences(records: list[dict[str, Any]], compared: list[str], algorithms: list[str]) -> list[Difference]:
    """Each of `compared` against every other algorithm (in the order of `algorithms`) at
    every budget both have, over the problems both have (a problem's score: its mean over
    seeds)."""
    scores = cell_scores(records)
    differences = []
    cells = in_grid_order(scores, algorithms)
    for algorithm in compared:
        for other, budget in cells:
            mine = scores.get((algorithm, budget))
            if other == algorithm or mine is None:
                continue
            both = paired(mine, scores[(other, budget)])
            if both is not None:
                differences.append(Difference(algorithm, other, budget, *both))
    return differences


def reference_differences(
    records: list[dict[str, Any]], reference: tuple[str, int], algorithms: list[str]
) -> list[Difference]:
    """Every cell against one `reference` cell (algorithm, budget), paired over problems:
    the form of "method X at budget b matches method Y at 16" claims, which a comparison
    within one budget cannot answer. Each Difference's `other` names the reference cell."""
    scores = cell_scores(records)
    if reference not in scores:
        have = ", ".join(f"{a}:{b}" for a, b in sorted(scores))
        raise UsageError(f"--reference {reference[0]}:{reference[1]}: no such cell in the records; they have {have}")
    name = f"{reference[0]} at {reference[1]}"
    out = []
    for cell in in_grid_order(scores, algorithms):
        if cell == reference:
            continue
        both = paired(scores[cell], scores[reference])
        if both is not None:
            out.append(Difference(cell[0], name, cell[1], *both))
    return out


@dataclass
class BaselineDifference:
    """This study's `algorithm` at `budget` against the same cell of a baseline study (same
    dataset, something else changed: the reward, a setting), paired over common problems."""

    algorithm: str
    budget: int
    problems: int
    accuracy: float
    baseline_accuracy: float
    difference: float
    ci_low: float
    ci_high: float


def baseline_differences(
    records: list[dict[str, Any]], baseline: list[dict[str, Any]], algorithms: list[str]
) -> list[BaselineDifference]:
    mine, theirs = cell_scores(records), cell_scores(baseline)
    out = []
    for cell in in_grid_order(mine.keys() & theirs.keys(), algorithms):
        both = paired(mine[cell], theirs[cell])
        if both is None:
            continue
        problems, difference, low, high = both
        # Over the common problems, as the difference is: the baseline's is this minus it.
        accuracy = float(np.mean([mine[cell][p] for p in mine[cell].keys() & theirs[cell].keys()]))
        out.append(BaselineDifference(*cell, problems, accuracy, accuracy - difference, difference, low, high))
    return out


def load_baseline(path: Path, baseline: str | Path, config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """A baseline directory's complete records, and how its identity differs from this one's;
    a baseline over another dataset is refused (nothing to pair)."""
    from itscale.eval.store import diff_identity

    other_config, other_records = load(baseline)
    dataset, other_dataset = config["identity"].get("dataset"), other_config["identity"].get("dataset")
    if dataset != other_dataset:
        raise UsageError(
            f"--baseline {baseline} is over another dataset ({other_dataset}) than {path} ({dataset}): "
            "a baseline pairs the same problems"
        )
    other_records, _ = complete_problems(other_records)
    return other_records, diff_identity(other_config["identity"], config["identity"])


def complete_problems(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The records of the problems every (algorithm, budget) cell has, and how many records
    of other problems were left out: rows of an unfinished run then compare the same
    problems (a run goes problem by problem, so that is its first k problems)."""
    problems = [{r["problem"] for r in cell} for cell in cells_of(records).values()]
    common = set.intersection(*problems) if problems else set()
    kept = [r for r in records if r["problem"] in common]
    return kept, len(records) - len(kept)


def load(directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out = OutputDir(directory)
    config = out.read_config()
    if config is None or not out.results.path.exists():
        raise UsageError(f"{out.path} has no evaluation results ({RESULTS}): run `itscale eval --out {out.path}` first")
    records = list(out.results.load(repair=False).values())
    if not records:
        raise UsageError(f"{out.results.path} is empty: the evaluation has not finished a run yet")
    return config, records


def algorithm_order(config: dict[str, Any]) -> list[str]:
    names: dict[str, None] = {}
    for run in config.get("runs", []):
        names.update(dict.fromkeys(run.get("grid", {}).get("algorithms", [])))
    return list(names)


def write_report(
    directory: str | Path,
    compare: list[str] | None = None,
    baseline: str | Path | None = None,
    reference: tuple[str, int] | None = None,
) -> tuple[list[Row], dict[str, Path]]:
    """Writes report.md, report.json and the plots into `directory`; returns the rows and
    the files' paths. `compare`: the algorithms set against every other, paired over problems
    (default: particle filtering, where the directory has it; [] for none). `baseline`:
    another study's directory over the same dataset; every cell both have is set against it,
    paired over problems. `reference`: one (algorithm, budget) cell every other cell is set
    against, paired over problems."""
    path = Path(directory)
    config, records = load(path)
    records, left_out = complete_problems(records)
    if not records:
        raise UsageError(f"no problem in {path} has records for every algorithm and budget yet: let the run go on")
    present = {r["algorithm"] for r in records}
    if compare is None:
        compare = [a for a in DEFAULT_COMPARED if a in present]
    for name in compare:
        if name not in present:
            raise UsageError(f"--compare {name}: {path} has no records of it; it has {', '.join(sorted(present))}")
    algorithms = algorithm_order(config)
    rows = summarise(records, algorithms)
    differences = paired_differences(records, compare, algorithms)
    referenced = reference_differences(records, reference, algorithms) if reference is not None else []
    against: dict[str, Any] | None = None
    if baseline is not None:
        baseline_records, changed = load_baseline(path, baseline, config)
        against = {
            "directory": str(baseline),
            "changed": changed,
            "differences": baseline_differences(records, baseline_records, algorithms),
        }
    curves = coverage_curves(records)
    notes = [TOKEN_NOTE]
    unfinished = unfinished_note(config, records, left_out)
    if unfinished:
        notes.insert(0, unfinished)
    paths = {"markdown": path / "report.md", "json": path / "report.json"}
    report = {
        "config": config,
        "rows": [asdict(r) for r in rows],
        "differences": [asdict(d) for d in differences],
        "reference": [asdict(d) for d in referenced],
        "coverage": [asdict(c) for c in curves],
        "notes": notes,
    }
    if against is not None:
        report["baseline"] = {**against, "differences": [asdict(d) for d in against["differences"]]}
    write_json_atomic(paths["json"], report)
    write_atomic(paths["markdown"], markdown(config, rows, notes, differences, curves, against, referenced))
    from itscale.eval.plots import plot_coverage, plot_scaling

    paths.update(plot_scaling(rows, path, title=_title(config)))
    if curves:
        paths.update(plot_coverage(curves, path, title=_title(config)))
    return rows, paths


def unfinished_note(config: dict[str, Any], complete: list[dict[str, Any]], left_out: int) -> str | None:
    """What part of the planned grid the report covers, when not all of it."""
    planned = (config.get("runs") or [{}])[-1].get("grid", {}).get("problems")
    done = len({r["problem"] for r in complete})
    if not left_out and (planned is None or done >= planned):
        return None
    of = f" of {planned}" if planned else ""
    some = f"{left_out} records of problems in progress are" if left_out > 1 else "1 record of a problem in progress is"
    progress = f" ({some} left out)" if left_out else ""
    return f"Unfinished run: {done}{of} problems have every algorithm and budget; every row is over those{progress}."


def _title(config: dict[str, Any]) -> str:
    identity = config.get("identity", {})
    model = identity.get("model", {})
    name = model.get("model") or model.get("backend_model") or model.get("backend_url") or "?"
    dataset = (config.get("runs") or [{}])[-1].get("grid", {}).get("dataset", "?")
    return f"{dataset} · {name} · reward {identity.get('reward')}"


def markdown(
    config: dict[str, Any],
    rows: list[Row],
    notes: list[str],
    differences: list[Difference] = (),
    curves: list[CoverageCurve] = (),
    against: dict[str, Any] | None = None,
    referenced: list[Difference] = (),
) -> str:
    identity = config.get("identity", {})
    settings = identity.get("settings", {})
    dataset = identity.get("dataset", {})
    lines = [
        f"# Evaluation: {_title(config)}",
        "",
        f"Dataset: `{dataset.get('source')}` (fingerprint {dataset.get('fingerprint')}).",
        "Settings: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ".",
    ]
    options = {a: o for a, o in identity.get("options", {}).items() if o}
    if options:
        lines.append("Algorithm options: " + "; ".join(f"{a}: {o}" for a, o in options.items()) + ".")
    # A long study is the same command run again and again (it resumes): list it once.
    commands = Counter(" ".join(run["command"]) for run in config.get("runs", []) if run.get("command"))
    lines += ["", "Commands:", ""]
    lines += [f"    {command}" + (f"    # run {n} times" if n > 1 else "") for command, n in commands.items()]
    lines += [
        "",
        "| algorithm | budget | accuracy | 95% CI | strict | any right | problems | mean tokens | mean generated "
        "| mean reward tokens | mean seconds | samples |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        samples = f"reused from run of {', '.join(map(str, r.sampled_from))}" if r.sampled_from else "own run"
        if r.rollouts_of:
            samples += f" ({', '.join(r.rollouts_of)})"
        seconds = f"{r.mean_seconds:.1f}{'*' if r.seconds_estimated else ''}"
        lines.append(
            f"| {r.algorithm} | {r.budget} | {r.accuracy:.1%} | {r.ci_low:.1%} – {r.ci_high:.1%} "
            f"| {_percent(r.strict_accuracy)} | {r.any_correct:.1%} | {r.problems} "
            f"| {r.mean_tokens:,.0f} | {r.mean_completion_tokens:,.0f} | {r.mean_reward_tokens:,.0f} "
            f"| {seconds} | {samples} |"
        )
    reused = sorted({r.algorithm for r in rows if r.sampled_from})
    lines += [
        "",
        "Accuracy is over problems; the interval is a 95% bootstrap over problems. It takes the chosen "
        "answer as extracted flexibly (the last \\boxed{}, else the last number of the text); `strict` counts "
        "only an answer the solution states (\\boxed{}, or an explicit final-answer line), as "
        "lm-evaluation-harness's strict-match (n/a for records made before it was kept). `any right`: "
        "problems where some final particle (rollout) had the right answer, what a perfect choice among them "
        "would score.",
    ]
    if reused:
        lines.append(
            f"Sample reuse: {', '.join(reused)} ran once per problem at the largest budget and each smaller "
            "budget b is that algorithm's choice among the first b rollouts (`samples` column)."
        )
    if any(r.rollouts_of for r in rows):
        lines.append(
            "Algorithms with the same rollouts (same step settings and seed) shared one run per problem, each "
            "choosing by its own rule; the run's algorithm is named in the `samples` column. A row whose "
            "algorithm uses no reward is charged no reward tokens or time."
        )
    for note in notes:
        lines += ["", note]
    lines += selection_table(rows)
    if curves:
        lines += ["", "## Coverage and selection"]
        lines += coverage_table(list(curves))
    lines += comparison_tables(differences)
    lines += reference_table(list(referenced))
    if against is not None:
        lines += baseline_table(against)
    lines.append("")
    return "\n".join(lines)


def baseline_table(against: dict[str, Any]) -> list[str]:
    """This study against a baseline study, cell by cell, paired over problems."""
    differences: list[BaselineDifference] = against["differences"]
    changed = "; ".join(f"`{c}`" for c in against["changed"]) or "nothing in their identities"
    lines = [
        "",
        f"## Against the baseline `{against['directory']}`, paired over problems",
        "",
        f"What differs from the baseline: {changed}. Each row: this study's accuracy minus the baseline's in "
        "the same (algorithm, budget), in points, over the problems both have, with a 95% paired bootstrap "
        "interval.",
        "",
        "| algorithm | budget | problems | this | baseline | difference (95% CI) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for d in differences:
        lines.append(
            f"| {d.algorithm} | {d.budget} | {d.problems} | {d.accuracy:.1%} | {d.baseline_accuracy:.1%} "
            f"| {100 * d.difference:+.1f} ({100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f})"
            + (" **" if _excludes_zero(d) else "")
            + " |"
        )
    if not differences:
        lines.append("| (no cell in common) | | | | | |")
    return lines


def selection_table(rows: list[Row]) -> list[str]:
    """What each row's final particles held: the search's part of the result, apart from the choice."""
    lines = [
        "",
        "## What the final particles held",
        "",
        "`chosen`: the algorithm's answer (the accuracy above); `plain vote`: a majority vote over the final "
        "particles' answers, equivalent answers pooled; `any right`: some particle right; `distinct answers`: "
        "per run, mean; `at token cap`: final particles that ended on max_tokens; `resampled`, for algorithms "
        "that resample: runs that resampled at least once, of all runs, and steps at which they resampled, of "
        "all steps the runs took (a run's steps: its longest particle's). A search that concentrates its "
        "particles has few distinct answers; `any right` far above `chosen` is the selector's loss.",
        "",
        "| algorithm | budget | chosen | plain vote | any right | distinct answers | at token cap | resampled |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.algorithm} | {r.budget} | {r.accuracy:.1%} | {r.vote_correct:.1%} | {r.any_correct:.1%} "
        f"| {r.distinct_answers:.1f} | {r.capped:.0%} | {resampled_text(r)} |"
        for r in rows
    ]
    return lines


def resampled_text(row: Row) -> str:
    if row.resampled_runs is None:
        return ""
    return f"{row.resampled_runs}/{row.runs} runs, {row.resampled_steps:,}/{row.search_steps:,} steps"


def comparison_tables(differences: list[Difference]) -> list[str]:
    """One Markdown table per compared algorithm: a row per budget, a column per other
    algorithm, each cell the difference in points with its 95% paired interval."""
    lines = []
    for algorithm in dict.fromkeys(d.algorithm for d in differences):
        mine = [d for d in differences if d.algorithm == algorithm]
        others = list(dict.fromkeys(d.other for d in mine))
        cell = {(d.budget, d.other): d for d in mine}
        lines += [
            "",
            f"## {algorithm} against the others, paired over problems",
            "",
            f"Accuracy of {algorithm} minus that of each other algorithm at the same budget, in points, over "
            "the problems both have, with a 95% paired bootstrap interval; an interval that excludes 0 is a "
            "difference these problems can tell.",
            "",
            "| budget | " + " | ".join(f"vs {o}" for o in others) + " |",
            "| ---: |" + " --- |" * len(others),
        ]
        for budget in sorted({d.budget for d in mine}):
            lines.append(_difference_row(budget, [cell.get((budget, other)) for other in others]))
        # Each interval is 95% on its own, not jointly: a table of many comparisons has some
        # ** by chance alone, and a reader should know how many to expect.
        flagged = sum(_excludes_zero(d) for d in mine)
        lines += [
            "",
            f"**: the interval excludes 0 over at least {MIN_PROBLEMS_TO_FLAG} problems ({flagged} of {len(mine)} "
            "here). Each interval is 95% on its own: "
            f"if nothing differed, about {len(mine) / 20:.1f} of {len(mine)} would exclude 0 by chance.",
        ]
    return lines


def reference_table(differences: list[Difference]) -> list[str]:
    """Every cell against one reference cell: a row per algorithm, a column per budget."""
    if not differences:
        return []
    name = differences[0].other
    budgets = sorted({d.budget for d in differences})
    cell = {(d.algorithm, d.budget): d for d in differences}
    lines = [
        "",
        f"## Every cell against {name}, paired over problems",
        "",
        f"Accuracy of each (algorithm, budget) minus that of {name}, in points, over the problems both have, "
        "with a 95% paired bootstrap interval: where an interval holds 0, that cell is not shown to fall "
        f"short of {name} (at a smaller budget: the question of matching it with fewer samples).",
        "",
        "| algorithm | " + " | ".join(f"budget {b}" for b in budgets) + " |",
        "| --- |" + " --- |" * len(budgets),
    ]
    for algorithm in dict.fromkeys(d.algorithm for d in differences):
        lines.append(_difference_row(algorithm, [cell.get((algorithm, budget)) for budget in budgets]))
    flagged = sum(_excludes_zero(d) for d in differences)
    lines += ["", f"**: the interval excludes 0 ({flagged} of {len(differences)} here)."]
    return lines


def _difference_row(label: object, differences: list[Difference | None]) -> str:
    return f"| {label} | " + " | ".join("" if d is None else _difference_text(d) for d in differences) + " |"


def _difference_text(d: Difference) -> str:
    return f"{100 * d.difference:+.1f} ({100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f})" + (
        " **" if _excludes_zero(d) else ""
    )


# Below this many problems a percentile bootstrap says nothing (one problem gives the
# interval [d, d]), so no difference is flagged however its interval lies.
MIN_PROBLEMS_TO_FLAG = 10


def _excludes_zero(d: Difference | BaselineDifference) -> bool:
    return d.problems >= MIN_PROBLEMS_TO_FLAG and (d.ci_low > 0 or d.ci_high < 0)


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(
        Column("algorithm", no_wrap=True),
        Column("budget", justify="right", no_wrap=True),
        Column("accuracy", justify="right", no_wrap=True),
        Column("95% CI", no_wrap=True),
        Column("strict", justify="right", no_wrap=True),
        Column("any right", justify="right", no_wrap=True),
        Column("n", justify="right", no_wrap=True),
        Column("tokens", justify="right", no_wrap=True),
        Column("seconds", justify="right", no_wrap=True),
        Column("samples", no_wrap=True),
        caption="n: problems; tokens, seconds: mean per run; *: estimated (sample reuse)",
    )
    for r in rows:
        table.add_row(
            r.algorithm,
            str(r.budget),
            f"{r.accuracy:.1%}",
            f"{r.ci_low:.1%} – {r.ci_high:.1%}",
            _percent(r.strict_accuracy),
            f"{r.any_correct:.1%}",
            str(r.problems),
            f"{r.mean_tokens:,.0f}",
            f"{r.mean_seconds:.1f}{'*' if r.seconds_estimated else ''}",
            f"from {', '.join(map(str, r.sampled_from))}" if r.sampled_from else "own",
        )
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table needs, not 80 columns
        console = Console(width=140)
    console.print(table)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
