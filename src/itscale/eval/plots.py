"""The two scaling plots: accuracy against budget, and against tokens spent (log x), one
line per algorithm with its 95% interval shaded (on small panels of their own when there
are too many to shade together). matplotlib comes with the `plot` extra."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from itscale.errors import UsageError

if TYPE_CHECKING:
    from itscale.eval.coverage import CoverageCurve
    from itscale.eval.report import Row

MARKERS = "osD^vP*X<>"


def plot_scaling(rows: Sequence[Row], directory: Path, title: str) -> dict[str, Path]:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'itscale[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    paths = {
        "accuracy_vs_budget": directory / "accuracy_vs_budget.png",
        "accuracy_vs_tokens": directory / "accuracy_vs_tokens.png",
    }
    budgets = sorted({r.budget for r in rows})
    _plot(rows, "budget", "budget (particles / rollouts), log scale", title, paths["accuracy_vs_budget"], budgets)
    _plot(
        rows,
        "mean_tokens",
        "mean tokens per problem (prompt + generated + reward), log scale",
        title,
        paths["accuracy_vs_tokens"],
    )
    return paths


def plot_coverage(curves: Sequence[CoverageCurve], directory: Path, title: str) -> dict[str, Path]:
    """coverage_vs_k.png: pass@k of each set of rollouts with its fitted law (extended to 4n,
    dashed), and the accuracy of every method that chose among them, against k (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = directory / "coverage_vs_k.png"
    figure, axes = plt.subplots(figsize=(10, 5.6), dpi=150)
    methods = sorted({m for c in curves for m in c.selected})
    colours = dict(zip(methods, _colours(len(methods)), strict=False))
    for curve in curves:
        axes.plot(curve.ks, [100 * v for v in curve.coverage], "k-", lw=2, label=f"pass@k ({curve.source}'s rollouts)")
        if curve.law is not None:
            xs = [1 + i * (4 * curve.samples - 1) / 200 for i in range(201)]
            axes.plot(xs, [100 * curve.fitted(x) for x in xs], "k--", lw=1,
                      label=f"fit exp({curve.law[0]:.2f} k^{curve.law[1]:.2f})")  # fmt: skip
        for i, (method, accuracy) in enumerate(sorted(curve.selected.items())):
            budgets = sorted(accuracy)
            axes.plot(budgets, [100 * accuracy[b] for b in budgets], marker=MARKERS[i % len(MARKERS)],
                      color=colours[method], label=method)  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_xlabel("k: samples (pass@k) or budget (a method's choice), log scale")
    axes.set_ylabel("% of problems")
    axes.set_title(f"coverage and selection · {title}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return {"coverage_vs_k": path}


# Up to this many algorithms, their intervals shaded on one panel stay readable; beyond it
# the bands pile into one muddy area, so each algorithm gets a small panel of its own.
SHADED_TOGETHER = 3
PANEL_COLUMNS = 4


def _plot(
    rows: Sequence[Row], x_field: str, x_label: str, title: str, path: Path, ticks: list[int] | None = None
) -> None:
    """One panel with every algorithm's line; with more than SHADED_TOGETHER algorithms, the
    intervals go below it, one small panel an algorithm (the others faint, for context)."""
    import matplotlib.pyplot as plt

    algorithms = list(dict.fromkeys(r.algorithm for r in rows))
    colours = _colours(len(algorithms))
    curves = {a: sorted((r for r in rows if r.algorithm == a), key=lambda r: getattr(r, x_field)) for a in algorithms}
    problems = max(r.problems for r in rows)
    if len(algorithms) <= SHADED_TOGETHER:
        figure, overview = plt.subplots(figsize=(10, 5.6), dpi=150)
        panels = {}
        subtitle = f"{problems} problems; shaded: 95% bootstrap interval"
    else:
        columns = min(PANEL_COLUMNS, len(algorithms))
        panel_rows = -(-len(algorithms) // columns)
        figure = plt.figure(figsize=(3.6 * columns, 5.6 + 2.9 * panel_rows), dpi=150)
        grid = figure.add_gridspec(1 + panel_rows, columns, height_ratios=[5.6] + [2.9] * panel_rows)
        overview = figure.add_subplot(grid[0, :])
        panels = {
            a: figure.add_subplot(grid[1 + i // columns, i % columns], sharex=overview, sharey=overview)
            for i, a in enumerate(algorithms)
        }
        subtitle = f"{problems} problems; below, each algorithm with its 95% bootstrap interval shaded"
    for i, (algorithm, mine) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        x, y = [getattr(r, x_field) for r in mine], [100 * r.accuracy for r in mine]
        reused = " (sample reuse)" if any(r.sampled_from for r in mine) else ""
        overview.plot(
            x,
            y,
            marker=MARKERS[i % len(MARKERS)],
            color=colour,
            # Later lines are drawn thinner over earlier ones, so coinciding curves stay visible.
            linewidth=max(1.2, 3.0 - 0.2 * i),
            markersize=max(4.5, 10.0 - 0.7 * i),
            label=algorithm + reused,
        )
        shaded_on = panels.get(algorithm, overview)
        low, high = [100 * r.ci_low for r in mine], [100 * r.ci_high for r in mine]
        if len(set(x)) > 1:
            shaded_on.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
        else:  # every budget at one x (greedy against tokens): a band would have no width
            spread = [[y[0] - low[0]], [high[0] - y[0]]]
            shaded_on.errorbar(x[:1], y[:1], yerr=spread, color=colour, alpha=0.5, capsize=4, linewidth=1.5)
        if algorithm in panels:
            for other, theirs in curves.items():
                if other != algorithm:
                    shaded_on.plot(
                        [getattr(r, x_field) for r in theirs],
                        [100 * r.accuracy for r in theirs],
                        color="0.8",
                        linewidth=0.9,
                        zorder=1,
                    )
            shaded_on.plot(x, y, marker=MARKERS[i % len(MARKERS)], color=colour, linewidth=2.0, markersize=5, zorder=3)
            shaded_on.set_title(algorithm + reused, color=colour, fontsize=10)
            shaded_on.grid(True, which="major", alpha=0.3)
            shaded_on.tick_params(labelsize=8)
    _scale_x(overview, ticks)
    overview.set_ylim(*_accuracy_range(rows))
    overview.set_xlabel(x_label, fontsize=11)
    overview.set_ylabel("accuracy (%)", fontsize=11)
    overview.set_title(f"{title}\n{subtitle}", fontsize=12)
    overview.grid(True, which="major", alpha=0.3)
    overview.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=10)
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, bbox_inches="tight")
    plt.close(figure)
    temporary.replace(path)


def _colours(n: int) -> list:
    """Distinct colours; tab10's grey is left out below ten, since context lines are grey."""
    import matplotlib.pyplot as plt

    if n <= 9:
        return [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    return list(plt.get_cmap("tab10" if n == 10 else "tab20").colors)


def _scale_x(axes, ticks: list[int] | None) -> None:
    """Log x: the budgets themselves as ticks, or plain numbers at 1, 2, 5 × 10^k (not
    3×10^2 labels). Panels sharing x with `axes` follow it."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_xscale("log", base=2 if ticks else 10)
    if ticks:
        axes.set_xticks(ticks)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
    axes.xaxis.set_minor_formatter(NullFormatter())


def _accuracy_range(rows: Sequence[Row], span: float = 20.0) -> tuple[float, float]:
    """At least `span` points around the data (a narrow range exaggerates differences), a
    little below 0 and above 100 so lines at the edges stay visible."""
    low = min(100 * r.ci_low for r in rows) - 3
    high = max(100 * r.ci_high for r in rows) + 3
    if high - low < span:
        middle = (high + low) / 2
        low, high = middle - span / 2, middle + span / 2
    low, high = max(low, -2.0), min(high, 102.0)
    if high - low < span:  # pushed against an edge: extend the other way
        low, high = (low, low + span) if low <= -2.0 else (high - span, high)
    return low, high


def _plain(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"
