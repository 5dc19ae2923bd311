"""Coverage laws: how often some sample is right (pass@k), and how much selection loses.

Brown et al. (2024, "Large Language Monkeys") find that coverage, the share of problems
where at least one of k samples is right, grows smoothly with k and is well fitted by an
exponentiated power law, coverage(k) ≈ exp(a k^b) (a < 0, b < 0), while the methods that
choose one answer among the samples (majority vote, a reward) plateau below it.

From the n independent rollouts of a sample-reusing run (self-consistency, best-of-N, ...:
the records that were picked from one run of n rollouts), pass@k is estimated for every
k ≤ n with the unbiased estimator of Chen et al. (2021),

    pass@k = 1 - C(n - c, k) / C(n, k)      (c of the n samples right),

averaged over problems; the law is fitted by least squares on log(-log coverage) against
log k; and at each budget the gap between coverage and each selection method's accuracy is
what a perfect selector would add.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from itscale.answers import is_equivalent


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples is right) from n samples, c right."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def fit_power_law(ks: list[int], coverage: list[float]) -> tuple[float, float] | None:
    """(a, b) of coverage(k) = exp(a k^b), fitted on the points with 0 < coverage < 1; None
    with fewer than two such points."""
    points = [(math.log(k), math.log(-math.log(c))) for k, c in zip(ks, coverage, strict=True) if 0 < c < 1]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    if np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return -math.exp(intercept), float(slope)


@dataclass
class CoverageCurve:
    """pass@k of one set of rollouts, its fitted law, and the selection methods on them."""

    source: str  # the algorithm whose run drew the rollouts
    samples: int  # n, the rollouts per problem
    problems: int
    ks: list[int]
    coverage: list[float]
    law: tuple[float, float] | None  # (a, b)
    # algorithm -> {budget: accuracy} for the methods that picked from these rollouts
    selected: dict[str, dict[int, float]] = field(default_factory=dict)

    def fitted(self, k: float) -> float | None:
        return None if self.law is None else math.exp(self.law[0] * k ** self.law[1])


def coverage_curves(records: list[dict[str, Any]]) -> list[CoverageCurve]:
    """One curve per set of shared rollouts: the records picked from one run of n rollouts
    (`sampled_from`), grouped by the algorithm that drew them."""
    largest: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # source -> problem -> record
    accuracy: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        n = r.get("sampled_from")
        if not n:
            continue
        source = r.get("rollouts_of") or r["algorithm"]
        accuracy[source][r["algorithm"]][int(r["budget"])].append(float(bool(r["correct"])))
        if int(r["budget"]) == int(n) and len(r["particles"]) == int(n):
            key = f"{r['problem']}/{r['seed']}"
            largest[source].setdefault(key, r)
    curves = []
    for source, by_problem in sorted(largest.items()):
        if not by_problem:
            continue
        n = min(len(r["particles"]) for r in by_problem.values())
        ks = [k for k in range(1, n + 1)]
        values = np.zeros(n)
        for r in by_problem.values():
            right = sum(
                1 for p in r["particles"][:n] if p["answer"] is not None and is_equivalent(p["answer"], r["reference"])
            )
            values += [pass_at_k(n, right, k) for k in ks]
        coverage = list(values / len(by_problem))
        selected = {
            a: {b: float(np.mean(v)) for b, v in sorted(budgets.items())} for a, budgets in accuracy[source].items()
        }
        curves.append(CoverageCurve(source, n, len(by_problem), ks, coverage, fit_power_law(ks, coverage), selected))
    return curves


def coverage_table(curves: list[CoverageCurve]) -> list[str]:
    """Markdown: pass@k, the fitted law, and each selection method's accuracy and gap."""
    lines: list[str] = []
    for curve in curves:
        law = f"coverage(k) ≈ exp({curve.law[0]:.3f} · k^{curve.law[1]:.3f})" if curve.law is not None else "no fit"
        lines += [
            "",
            f"### Coverage of {curve.source}'s rollouts ({curve.samples} per problem, {curve.problems} problems)",
            "",
            f"pass@k from the unbiased estimator; fitted law: {law} (Brown et al., 2024). For each method that "
            "chose among these rollouts: its accuracy at budget k, and in brackets the gap to pass@k, what a "
            "perfect choice would add.",
            "",
        ]
        methods = sorted(curve.selected)
        lines.append("| k | pass@k | fitted | " + " | ".join(methods) + " |")
        lines.append("| ---: | ---: | ---: | " + " | ".join("---:" for _ in methods) + " |")
        for k, cov in zip(curve.ks, curve.coverage, strict=True):
            if k & (k - 1) and k != curve.ks[-1]:
                continue  # powers of two, and n
            fitted = curve.fitted(k)
            cells = []
            for method in methods:
                acc = curve.selected[method].get(k)
                cells.append("" if acc is None else f"{acc:.1%} ({cov - acc:+.1%})")
            fitted_text = "" if fitted is None else f"{fitted:.1%}"
            lines.append(f"| {k} | {cov:.1%} | {fitted_text} | " + " | ".join(cells) + " |")
    return lines
