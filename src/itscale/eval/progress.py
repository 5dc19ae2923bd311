"""A progress bar per (algorithm, budget) on stderr: records done, accuracy so far, ETA."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from itscale.eval.plan import Plan
from itscale.eval.store import Key


class EvalProgress:
    def __init__(self, plan: Plan, done: dict[Key, dict[str, Any]], enabled: bool = True):
        self.progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[accuracy]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.tasks: dict[tuple[str, int], Any] = {}
        self.scores: dict[tuple[str, int], list[int]] = {}
        wanted = set(plan.keys())
        total = len(plan.problems) * len(plan.seeds)
        for algorithm in plan.algorithms:
            for budget in plan.budgets:
                cell = (algorithm, budget)
                mine = [r for k, r in done.items() if k in wanted and (k[1], k[2]) == cell]
                self.scores[cell] = [sum(bool(r["correct"]) for r in mine), len(mine)]
                self.tasks[cell] = self.progress.add_task(
                    f"{algorithm} @ {budget}", total=total, completed=len(mine), accuracy=self._accuracy(cell)
                )

    def _accuracy(self, cell: tuple[str, int]) -> str:
        correct, n = self.scores[cell]
        return f"{correct / n:.2f}" if n else " -  "

    def __enter__(self) -> EvalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            cell = (r["algorithm"], r["budget"])
            if cell not in self.tasks:
                continue
            self.scores[cell][0] += bool(r["correct"])
            self.scores[cell][1] += 1
            self.progress.update(self.tasks[cell], advance=1, accuracy=self._accuracy(cell))
