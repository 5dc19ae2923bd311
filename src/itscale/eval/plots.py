"""The two scaling plots: accuracy against budget, and against tokens spent (log x), one
line per algorithm with its 95% interval shaded. matplotlib comes with the `plot` extra."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from itscale.errors import UsageError

if TYPE_CHECKING:
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


def _plot(
    rows: Sequence[Row], x_field: str, x_label: str, title: str, path: Path, ticks: list[int] | None = None
) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    algorithms = list(dict.fromkeys(r.algorithm for r in rows))
    colours = plt.get_cmap("tab10" if len(algorithms) <= 10 else "tab20").colors
    figure, axes = plt.subplots(figsize=(10, 5.6), dpi=150)
    for i, algorithm in enumerate(algorithms):
        mine = sorted((r for r in rows if r.algorithm == algorithm), key=lambda r: getattr(r, x_field))
        x = [getattr(r, x_field) for r in mine]
        colour = colours[i % len(colours)]
        reused = " (sample reuse)" if any(r.sampled_from for r in mine) else ""
        axes.plot(
            x,
            [100 * r.accuracy for r in mine],
            marker=MARKERS[i % len(MARKERS)],
            color=colour,
            # Later lines are drawn thinner over earlier ones, so coinciding curves stay visible.
            linewidth=max(1.2, 3.0 - 0.2 * i),
            markersize=max(4.5, 10.0 - 0.7 * i),
            label=algorithm + reused,
        )
        axes.fill_between(
            x, [100 * r.ci_low for r in mine], [100 * r.ci_high for r in mine], color=colour, alpha=0.1, linewidth=0
        )
    axes.set_xscale("log", base=2 if ticks else 10)
    if ticks:
        axes.set_xticks(ticks)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    else:  # plain numbers at 1, 2, 5 × 10^k instead of 3×10^2 labels
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_ylim(*_accuracy_range(rows))
    axes.set_xlabel(x_label, fontsize=11)
    axes.set_ylabel("accuracy (%)", fontsize=11)
    problems = max(r.problems for r in rows)
    axes.set_title(f"{title}\n{problems} problems; shaded: 95% bootstrap interval", fontsize=12)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=10)
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, bbox_inches="tight")
    plt.close(figure)
    temporary.replace(path)


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
