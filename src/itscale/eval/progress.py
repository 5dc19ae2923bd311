"""Progress on stderr: a bar for the whole grid and one per (algorithm, budget), each with
records done, accuracy so far and an ETA.

ETAs come from the schedule, not from each bar's recent speed. The units run in a known
order, and each costs about the particles it holds (`Unit.run_budget`: greedy is one sample,
a search at 16 sixteen), so the time a bar has left is the weight of the units up to its last
one, less the weight done, times the seconds a unit of weight has taken so far. A bar's own
speed cannot tell that: in a study run problem by problem each bar moves once per problem,
minutes apart, and time per record depends on which runs happened to finish (it swung by
hours on the GSM8K study).

On a stderr that is not a terminal (a log file of a run in the background, CI) live bars
draw nothing until the end, and then all of them at once; there the bars are off and each
finished run prints one plain line instead: what it was, its verdicts, how much of the grid
is done, and the overall ETA.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from itscale.eval.plan import Plan, Unit
from itscale.eval.store import Key

Cell = tuple[str, int]  # (algorithm, budget): a row of the report, a bar here


class EvalProgress:
    def __init__(self, plan: Plan, done: dict[Key, dict[str, Any]], units: list[Unit], enabled: bool = True):
        console = Console(stderr=True)
        # Without a terminal the bars would only be drawn once, at the end: every bar, into a log.
        self.plain = enabled and not console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[accuracy]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            disable=not enabled or self.plain,
        )
        self.console = console
        self.started = time.monotonic()
        wanted = set(plan.keys())
        self.total = len(wanted)
        self.done = sum(k in wanted for k in done)

        # The schedule: each unit's weight, and the weight done when each cell's last unit is.
        self.weight_of: dict[Key, int] = {}
        self.weight_when_done: dict[Cell, int] = {}
        scheduled = 0
        for unit in units:
            scheduled += unit.run_budget
            for algorithm, budgets in unit.picks:
                for budget in budgets:
                    self.weight_of[(unit.problem.id, algorithm, budget, unit.seed)] = unit.run_budget
                    self.weight_when_done[(algorithm, budget)] = scheduled
        self.weight_scheduled = scheduled
        self.weight_done = 0

        self.scores: dict[Cell, list[int]] = {}
        self.tasks: dict[Cell | None, Any] = {
            None: self.progress.add_task("all runs", total=self.total, completed=self.done, accuracy="    ", eta="-")
        }
        per_cell = len(plan.problems) * len(plan.seeds)
        for algorithm in plan.algorithms:
            for budget in plan.budgets:
                cell = (algorithm, budget)
                mine = [r for k, r in done.items() if k in wanted and (k[1], k[2]) == cell]
                self.scores[cell] = [sum(bool(r["correct"]) for r in mine), len(mine)]
                self.tasks[cell] = self.progress.add_task(
                    f"{algorithm} @ {budget}",
                    total=per_cell,
                    completed=len(mine),
                    accuracy=self._accuracy(cell),
                    eta="-",
                )

    def _accuracy(self, cell: Cell) -> str:
        correct, n = self.scores[cell]
        return f"{correct / n:.2f}" if n else " -  "

    def eta(self, cell: Cell | None = None) -> str:
        """Time left for `cell` (None: the whole grid), or "-" before any unit has finished."""
        left = self.weight_scheduled if cell is None else self.weight_when_done.get(cell, 0)
        left -= self.weight_done
        if left <= 0:
            return "done"
        if not self.weight_done:
            return "-"
        return _duration(left * (time.monotonic() - self.started) / self.weight_done)

    def __enter__(self) -> EvalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, records: Iterable[dict[str, Any]]) -> None:
        """One finished unit's records."""
        records = list(records)
        if not records:
            return
        first = records[0]
        self.weight_done += self.weight_of.get(
            (first["problem"], first["algorithm"], first["budget"], first["seed"]), 0
        )
        self.done += len(records)
        for r in records:
            cell = (r["algorithm"], r["budget"])
            if cell in self.scores:
                self.scores[cell][0] += bool(r["correct"])
                self.scores[cell][1] += 1
                self.progress.advance(self.tasks[cell])
        for cell, task in self.tasks.items():
            fields = {"eta": self.eta(cell)}
            if cell is not None:
                fields["accuracy"] = self._accuracy(cell)
            self.progress.update(task, **fields)
        self.progress.update(self.tasks[None], completed=self.done)
        if self.plain:
            self._log(records)

    def _log(self, records: list[dict[str, Any]]) -> None:
        """One line for a finished run (its records share a problem and a seed)."""
        cells = ", ".join(f"{r['algorithm']}@{r['budget']} {'right' if r['correct'] else 'wrong'}" for r in records)
        first = records[0]
        eta = self.eta()
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {first['problem']} seed {first['seed']}: {cells} | "
            f"{self.done}/{self.total} records, " + ("done" if eta == "done" else f"ETA ~{eta}"),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "<1m"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
