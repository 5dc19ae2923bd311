"""A progress bar per (algorithm, budget) on stderr: records done, accuracy so far, ETA.

On a stderr that is not a terminal (a log file of a run in the background, CI) live bars
draw nothing until the end, so each finished run prints one plain line instead: what it
was, its verdicts, how much of the grid is done, and a rough overall ETA.

The ETA weighs each run still to do by the particles it holds (`Unit.run_budget`): a grid's
runs differ in cost by its largest budget (greedy is one sample, a search at 16 sixteen), so
time per record, which depends on which runs happened to finish, swings by hours on a long
study.
"""

from __future__ import annotations

import time
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

from itscale.eval.plan import Plan, Unit
from itscale.eval.store import Key


class EvalProgress:
    def __init__(self, plan: Plan, done: dict[Key, dict[str, Any]], units: list[Unit], enabled: bool = True):
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
        self.console = self.progress.console
        self.plain = enabled and not self.console.is_terminal
        self.started = time.monotonic()
        wanted = set(plan.keys())
        self.total = len(wanted)
        self.done = sum(k in wanted for k in done)
        self.weight_of = {
            (unit.problem.id, algorithm, budget, unit.seed): unit.run_budget
            for unit in units
            for algorithm, budgets in unit.picks
            for budget in budgets
        }
        self.weight_left = sum(unit.run_budget for unit in units)
        self.weight_done = 0
        self.tasks: dict[tuple[str, int], Any] = {}
        self.scores: dict[tuple[str, int], list[int]] = {}
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
        records = list(records)
        for r in records:
            cell = (r["algorithm"], r["budget"])
            if cell not in self.tasks:
                continue
            self.scores[cell][0] += bool(r["correct"])
            self.scores[cell][1] += 1
            self.progress.update(self.tasks[cell], advance=1, accuracy=self._accuracy(cell))
        if self.plain and records:
            self._log(records)

    def _log(self, records: list[dict[str, Any]]) -> None:
        """One line for a finished run (its records share a problem and a seed)."""
        self.done += len(records)
        first = records[0]
        weight = self.weight_of.get((first["problem"], first["algorithm"], first["budget"], first["seed"]), 0)
        self.weight_done += weight
        self.weight_left -= weight
        elapsed = time.monotonic() - self.started
        left = self.weight_left * elapsed / max(self.weight_done, 1)
        cells = ", ".join(f"{r['algorithm']}@{r['budget']} {'right' if r['correct'] else 'wrong'}" for r in records)
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {first['problem']} seed {first['seed']}: {cells} | "
            f"{self.done}/{self.total} records, ETA ~{_duration(left)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "<1m"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
