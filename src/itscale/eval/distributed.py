"""`--executor ray`: shard the problems over a Ray cluster, gather the records here.

Each shard is a Ray streaming-generator task: it opens its own backend (an embedded engine,
or its own HTTP client to a server), runs its units with `--workers` at once, and yields
each unit's records as soon as they are graded. The driver waits on all shards and appends
every batch to the output directory as it arrives, so a killed driver or worker loses at
most the units in flight, and the usual resume picks them up.

Shards are made per problem (all of a problem's units go to one worker) and dealt round-robin
over the worker slots the cluster has: its CPUs divided by `cpus` per worker.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from itscale.errors import ItscaleError, UsageError
from itscale.eval.plan import Backend, Unit
from itscale.eval.runner import Job, stream


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'itscale[ray]'") from None
    return ray


def shards(units: Sequence[Unit], slots: int) -> list[list[Unit]]:
    """Units grouped by problem, problems dealt round-robin over at most `slots` shards."""
    by_problem: dict[str, list[Unit]] = {}
    for unit in units:
        by_problem.setdefault(unit.problem.id, []).append(unit)
    count = max(1, min(slots, len(by_problem)))
    out: list[list[Unit]] = [[] for _ in range(count)]
    for i, group in enumerate(by_problem.values()):
        out[i % count].extend(group)
    return [s for s in out if s]


def run_shard(job: Job, backend: Backend, units: list[Unit], workers: int) -> Iterator[list[dict[str, Any]]]:
    """A worker's whole life: open the backend, run the units, yield records, close."""
    loop = asyncio.new_event_loop()
    lm, judge = backend.open(), backend.open_judge()
    records = stream(units, job, lm, judge, workers)
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(records))
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(records.aclose())
        for model in (lm, judge):
            if model is not None:
                loop.run_until_complete(model.close())
        loop.close()


def _get(ray, ref: Any) -> list[dict[str, Any]]:
    """The records, or the worker's own error (a user's error keeps its one-line message)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ItscaleError):
            raise error.cause from None
        raise


def run_on_ray(
    job: Job,
    backend: Backend,
    units: Sequence[Unit],
    sink: Callable[[list[dict[str, Any]]], None],
    *,
    workers: int = 1,
    address: str | None = None,
    cpus: float = 1,
) -> None:
    """Runs the units on Ray (connecting to `address`, or the cluster already initialised, or
    a new local one) and passes each batch of records to `sink` in this process."""
    ray = _ray()
    if backend.n_threads is None and not backend.backend_url:
        # An embedded engine would take every core of its host; each worker gets its share.
        backend = replace(backend, n_threads=max(1, math.floor(cpus)))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False)
    try:
        slots = int(ray.cluster_resources().get("CPU", 1) // cpus) or 1
        task = ray.remote(run_shard).options(num_cpus=cpus, num_returns="streaming")
        pending = [task.remote(job, backend, shard, workers) for shard in shards(units, slots)]
        try:
            while pending:
                ready, _ = ray.wait(pending, num_returns=1)
                for generator in ready:
                    try:
                        ref = next(generator)
                    except StopIteration:
                        pending.remove(generator)
                        continue
                    sink(_get(ray, ref))
        except BaseException:
            for generator in pending:
                ray.cancel(generator, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()
