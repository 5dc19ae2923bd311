"""`evaluate`: run a plan into an output directory, resuming whatever is already there.

    check the directory's configuration  ─► load its records (drop a torn last line)
    ─► the units still missing  ─► run them (here, K at once, or on Ray)
    ─► append each unit's records as it finishes, advance the progress bars

Nothing is computed before the configuration check passes. Stopping at any point (Ctrl-C, a
kill, an error) leaves only complete records; running the same command again computes the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from itscale.eval.plan import Plan, Unit
from itscale.eval.progress import EvalProgress
from itscale.eval.runner import Job, reward_options, stream
from itscale.eval.store import OutputDir
from itscale.rewards.base import close_reward
from itscale.rewards.registry import make_reward

Sink = Callable[[list[dict[str, Any]]], None]


@dataclass
class Summary:
    out: Path
    already_done: int  # records found from earlier runs
    written: int  # records this run added
    dropped_torn_line: bool
    warnings: list[str] = field(default_factory=list)  # what the records' diagnostics warn of


def evaluate(
    plan: Plan,
    out: str | Path,
    *,
    executor: Literal["local", "ray"] = "local",
    workers: int = 1,
    lm: Any = None,
    judge: Any = None,
    progress: bool = True,
    command: list[str] | None = None,
    on_records: Sink | None = None,
    ray_address: str | None = None,
    ray_cpus: float = 1,
    trace: bool = False,
) -> Summary:
    """Runs what `plan` still lacks in `out`. `lm`/`judge`: an open backend to use here
    (else the plan's backend is opened, and closed at the end); `on_records` is called after
    each batch is safely written; `trace` keeps every run's trace in its records."""
    directory = OutputDir(out)
    identity = plan.identity()
    run = {
        "command": command,
        "grid": plan.grid(),
        "executor": executor,
        "workers": workers,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with directory.lock():
        directory.check(identity)
        done = directory.results.load()
        summary = Summary(directory.path, len(done), 0, directory.results.dropped_torn_line)
        units = plan.units(done)
        job = Job(plan.settings, plan.reward, plan.options, trace)
        with EvalProgress(plan, done, units, enabled=progress) as bars:

            def sink(records: list[dict[str, Any]]) -> None:
                directory.results.append(records)
                summary.written += len(records)
                for record in records:
                    for warning in record.get("diagnostics", {}).get("warnings", []):
                        if warning not in summary.warnings:
                            summary.warnings.append(warning)
                bars.advance(records)
                if on_records is not None:
                    on_records(records)

            if not units:
                directory.record(identity, run)
            elif executor == "ray":
                from itscale.eval.distributed import run_on_ray

                directory.record(identity, run)
                run_on_ray(job, plan.backend, units, sink, workers=workers, address=ray_address, cpus=ray_cpus)
            else:
                ready = lambda: directory.record(identity, run)  # noqa: E731 - after the reward check
                asyncio.run(_run_here(plan, job, units, sink, workers, lm, judge, ready))
    return summary


async def _run_here(
    plan: Plan,
    job: Job,
    units: list[Unit],
    sink: Sink,
    workers: int,
    lm: Any,
    judge: Any,
    ready: Callable[[], None],
) -> None:
    """Opens the backend (unless given one), checks that the reward can be built on it, calls
    `ready` (which records the configuration), then runs the units."""
    opened = lm is None
    if opened:
        lm, judge = plan.backend.open(), plan.backend.open_judge()
    try:
        if any(plan.search(a).uses_reward for a in {u.algorithm for u in units}):
            await close_reward(make_reward(job.reward, lm, judge, **reward_options(job.reward, units[0].problem)))
        ready()
        async with contextlib.aclosing(stream(units, job, lm, judge, workers)) as batches:
            async for records in batches:
                sink(records)
    finally:
        if opened:
            for model in (lm, judge):
                if model is not None:
                    await model.close()
