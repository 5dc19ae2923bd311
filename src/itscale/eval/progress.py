"""Progress on stderr: a bar for the whole grid and one per (algorithm, budget), each with
records done, accuracy so far and an ETA.

ETAs come from the schedule, not from each bar's recent speed. The units run in a known
order, so the time a bar has left is what the units still to run up to its last one will
take. A unit is estimated by the mean wall time of the last runs of its kind (its algorithm
and the particles it holds: greedy holds one, a search at 16 sixteen), from this process or
from the records of earlier runs: a resumed study knows its costs at once, and a slow day
long past stops counting. A kind not seen yet is estimated per particle over all runs seen.
A bar's own speed cannot tell this: in a study run problem by problem each bar moves once
per problem, minutes apart (rich's estimate, over the last 30 seconds, showed nothing), and
time per record or per particle depends on which runs happened to finish (both swung by a
factor of two on the GSM8K study).

On a stderr that is not a terminal (a log file of a run in the background, CI) live bars
draw nothing until the end, and then all of them at once; there the bars are off and each
finished run prints one plain line instead: what it was, its verdicts, how much of the grid
is done, and the overall ETA.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
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
        wanted = set(plan.keys())
        self.total = len(wanted)
        self.done = sum(k in wanted for k in done)

        self.schedule = Schedule(units, done.values(), lambda a: plan.search(a).uses_budget, plan.algorithms)

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
        """Time left for `cell` (None: the whole grid), or "-" while no run has been timed."""
        seconds = self.schedule.seconds_left(cell)
        return "done" if seconds == 0 else "-" if seconds is None else _duration(seconds)

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
        self.schedule.finished(records)
        self.done += len(records)
        for r in records:
            cell = (r["algorithm"], r["budget"])
            if cell in self.scores:
                self.scores[cell][0] += bool(r["correct"])
                self.scores[cell][1] += 1
                self.progress.advance(self.tasks[cell])
        self.schedule.estimate()
        for cell, task in self.tasks.items():
            progress = {"completed": self.done} if cell is None else {"accuracy": self._accuracy(cell)}
            self.progress.update(task, eta=self.eta(cell), **progress)
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


Kind = tuple[str, int]  # (a unit's algorithm, the particles it holds): runs of a kind cost alike
RECENT_RUNS = 10  # a kind's cost is the mean of its last runs: the machine's load changes over days


class Schedule:
    """The units still to run, in their order, and the wall time runs of each kind took."""

    def __init__(
        self,
        units: Sequence[Unit],
        history: Iterable[dict[str, Any]],
        uses_budget: Callable[[str], bool],
        algorithms: Sequence[str],
    ):
        self.units = list(units)
        self._uses_budget = {a: uses_budget(a) for a in algorithms}
        self.left = set(range(len(self.units)))
        self.index_of: dict[Key, int] = {}
        self.units_of: dict[Cell, set[int]] = defaultdict(set)
        for i, unit in enumerate(self.units):
            for algorithm, budgets in unit.picks:
                for budget in budgets:
                    self.index_of[(unit.problem.id, algorithm, budget, unit.seed)] = i
                    self.units_of[(algorithm, budget)].add(i)
        self.seconds: dict[Kind, deque[float]] = defaultdict(lambda: deque(maxlen=RECENT_RUNS))
        for records in _runs(history):
            self._timed(records)
        self.cumulative: list[float | None] = []
        self.estimate()

    def kind(self, algorithm: str, budget: int) -> Kind:
        return (algorithm, budget if self._uses_budget.get(algorithm, True) else 1)

    def finished(self, records: list[dict[str, Any]]) -> None:
        """A unit's records are in: it is done, and its wall time tells what its kind costs."""
        first = records[0]
        i = self.index_of.get((first["problem"], first["algorithm"], int(first["budget"]), int(first["seed"])))
        if i is None or i not in self.left:
            return
        self.left.discard(i)
        self._timed(records)

    def _timed(self, records: list[dict[str, Any]]) -> None:
        """One run's wall time, counted for its kind: read off its records (the algorithm whose
        rollouts it ran, the particles it held), so saved runs and this process's count alike."""
        first = records[0]
        algorithm = first.get("rollouts_of") or first["algorithm"]
        if algorithm in self._uses_budget and "finished" in first:
            size = int(first.get("sampled_from") or min(int(r["budget"]) for r in records))
            self.seconds[self.kind(algorithm, size)].append(first["finished"] - first["started"])

    def estimate(self) -> None:
        """Seconds from now until each unit is done, running the units left in order."""
        known = {kind: sum(t) / len(t) for kind, t in self.seconds.items() if t}
        particles = sum(kind[1] * len(self.seconds[kind]) for kind in known)
        per_particle = sum(sum(self.seconds[kind]) for kind in known) / particles if particles else None
        total: float | None = 0.0
        self.cumulative = []
        for i, unit in enumerate(self.units):
            if i in self.left and total is not None:
                kind = self.kind(unit.algorithm, unit.run_budget)
                cost = known.get(kind, None if per_particle is None else per_particle * kind[1])
                total = None if cost is None else total + cost
            self.cumulative.append(total)

    def seconds_left(self, cell: Cell | None = None) -> float | None:
        """Until the last of `cell`'s units still to run is done (None: of every unit), as of
        the last `estimate`; 0 when nothing is left, None while no run has been timed."""
        left = self.left if cell is None else self.left & self.units_of.get(cell, set())
        return self.cumulative[max(left)] if left else 0


def _runs(records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Saved records grouped by the run that made them (they share its time stamps)."""
    runs: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if "started" in r:
            runs[(r["problem"], r["seed"], r["started"], r.get("finished"), r.get("worker"))].append(r)
    return list(runs.values())


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "<1m"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
