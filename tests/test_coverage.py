"""Coverage laws in reports: the unbiased pass@k estimator, the fitted exponentiated power
law, and the report's section and plot on records with shared rollouts."""

from __future__ import annotations

import itertools
import math

import pytest

from itscale.eval.coverage import coverage_curves, coverage_table, fit_power_law, pass_at_k


@pytest.mark.parametrize(("n", "c"), [(5, 0), (5, 2), (6, 3), (6, 6), (4, 1)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_sample(n: int, c: int) -> None:
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        exact = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(exact)


def test_the_power_law_fit_recovers_a_known_law() -> None:
    a, b = -1.6, -0.45
    ks = list(range(1, 33))
    fitted = fit_power_law(ks, [math.exp(a * k**b) for k in ks])
    assert fitted == pytest.approx((a, b), rel=1e-6)
    assert fit_power_law([1, 2], [1.0, 1.0]) is None  # no point strictly inside (0, 1)


def shared(problem: str, algorithm: str, budget: int, answers: list[str], chosen: str) -> dict:
    return {
        "problem": problem, "algorithm": algorithm, "budget": budget, "seed": 0, "reference": "4",
        "answer": chosen, "correct": chosen == "4", "sampled_from": 4, "rollouts_of": "best-of-n",
        "particles": [{"answer": a} for a in answers[:budget]],
    }  # fmt: skip


def test_curves_from_shared_rollouts_with_each_selection_method() -> None:
    answers = {"p0": ["4", "5", "5", "6"], "p1": ["7", "7", "7", "7"], "p2": ["4", "4", "4", "3"]}
    records = []
    for problem, samples in answers.items():
        for algorithm in ("best-of-n", "self-consistency"):
            for budget in (1, 2, 4):
                records.append(shared(problem, algorithm, budget, samples, samples[0]))
    [curve] = coverage_curves(records)
    assert curve.source == "best-of-n" and curve.samples == 4 and curve.problems == 3
    # p0: 1 of 4 right, p1: none, p2: 3 of 4
    expected = [(pass_at_k(4, 1, k) + 0 + pass_at_k(4, 3, k)) / 3 for k in (1, 2, 3, 4)]
    assert curve.coverage == pytest.approx(expected)
    assert curve.selected["self-consistency"][1] == pytest.approx(2 / 3)
    table = "\n".join(coverage_table([curve]))
    assert "pass@k" in table and "self-consistency" in table and "| 4 |" in table


def test_the_report_has_a_coverage_section_and_plot(tmp_path) -> None:
    import json

    from itscale.eval.report import write_report
    from itscale.eval.store import OutputDir

    answers = {f"p{i}": (["4", "5", "4", "6"] if i % 2 else ["5", "5", "5", "4"]) for i in range(4)}
    records = [
        shared(problem, algorithm, budget, samples, samples[0])
        for problem, samples in answers.items()
        for algorithm in ("best-of-n", "self-consistency")
        for budget in (1, 2, 4)
    ]
    for r in records:
        r.update(usage={"total_tokens": 10, "completion_tokens": 8, "reward_tokens": 0, "seconds": 1.0}, weights=[])
        r["particles"] = [{**p, "end": "eos"} for p in r["particles"]]
    directory = OutputDir(tmp_path)
    grid = {"algorithms": ["best-of-n", "self-consistency"], "problems": 4}
    directory.record({"dataset": {}}, {"command": ["itscale", "eval"], "grid": grid})
    directory.results.append(records)
    _, paths = write_report(tmp_path, compare=[])
    assert "## Coverage and selection" in paths["markdown"].read_text()
    assert paths["coverage_vs_k"].stat().st_size > 10_000
    coverage = json.loads(paths["json"].read_text())["coverage"]
    assert coverage[0]["law"] is not None and len(coverage[0]["coverage"]) == 4
