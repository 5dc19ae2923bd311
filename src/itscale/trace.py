"""The trace of a search: every step of every particle, recorded by the population loop.

One trace serves every algorithm. It is a list of *columns*, one per step of a population:
the population after the step (live particles with the text they just generated, finished
ones carried along unchanged), each node with its parent in the previous column, its step
reward, aggregated reward and log-weight, followed by what the policy did (the effective
sample size, whether it resampled, which parents its children came from). The final column
is the final population, and `final` says which particle was chosen and with what weights.

    {"format": "itscale-trace", "version": 1, "algorithm", "settings", "prompt",
     "columns": [{"step", "sweep", "chain",
                  "nodes": [{"id", "parent", "text", "step_reward", "reward",
                             "log_weight", "extended", "finished", "end"}],
                  "ess", "resampled", "selection": {"parents", "children"} | null}],
     "final": {"ids", "weights", "chosen", "answer", "votes"}, "usage"}

Invariants (tests/test_trace.py): every node's parent is a node of the previous column of
its chain and sweep (None in a sweep's first column); the weights of `final` sum to 1; the
final particles are the nodes of the last column of the chain that answers.

Independent rollouts (self-consistency, best-of-N, ...) are traced after the fact from
their particles' steps, since they never wait for each other at a step. `to_llamppl`
writes the same run in LLaMPPL's SMC record format, for their viewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from itscale.errors import UsageError

FORMAT = "itscale-trace"
VERSION = 1


@dataclass
class Column:
    step: int
    sweep: int
    chain: int
    nodes: list[dict[str, Any]]
    ess: float | None = None
    resampled: bool = False
    selection: dict[str, list[int]] | None = None
    # The particles this column snapshots, to read their log-weights after selection.
    particles: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sweep": self.sweep,
            "chain": self.chain,
            "nodes": self.nodes,
            "ess": self.ess,
            "resampled": self.resampled,
            "selection": self.selection,
        }


@dataclass
class Trace:
    """What the population loop records for one search (shared by its sub-runs)."""

    prompt: list[dict[str, str]] = field(default_factory=list)  # the chat the search answered
    columns: list[Column] = field(default_factory=list)
    final: dict[str, Any] | None = None
    # The ids of each (chain, sweep)'s last column, to find a node's parent.
    _last_ids: dict[tuple[int, int], set[int]] = field(default_factory=dict, repr=False)

    def record(self, particles: list[Any], step: int, sweep: int, chain: int, extended: set[int]) -> Column:
        """A column: the population after a step; `extended` are the ids that took it."""
        previous = self._last_ids.get((chain, sweep), set())
        nodes = []
        for p in particles:
            if p.id in previous:
                parent = p.id  # the same particle one step on
            elif p.parent in previous:
                parent = p.parent  # a child of the last selection
            else:
                parent = None  # the first column of a sweep
            took_step = p.id in extended and p.steps
            last = p.steps[-1] if took_step else None
            nodes.append(
                {
                    "id": p.id,
                    "parent": parent,
                    "text": last.text if last is not None else "",
                    "step_reward": last.score if last is not None else None,
                    "reward": p.score,
                    "log_weight": p.log_weight,
                    "extended": bool(took_step),
                    "finished": p.finished,
                    "end": p.end if p.finished else (last.end if last is not None else None),
                }
            )
        column = Column(step, sweep, chain, nodes, particles=list(particles))
        self.columns.append(column)
        self._last_ids[(chain, sweep)] = {p.id for p in particles}
        return column

    def selected(self, column: Column, event: Any | None) -> None:
        """After the policy selected: the log-weights it gave the column's particles, and
        its selection event (a `Resampling`), if any."""
        for node, p in zip(column.nodes, column.particles, strict=True):
            node["log_weight"] = p.log_weight
        column.particles = []
        if event is not None:
            column.ess, column.resampled = event.ess, event.resampled
            column.selection = {"parents": list(event.parents), "children": list(event.children)}

    def finish(self, particles: list[Any], weights: list[float], chosen: Any, answer: Any, votes: Any) -> None:
        self.final = {
            "ids": [p.id for p in particles],
            "weights": [float(w) for w in weights],
            "chosen": chosen.id if chosen is not None else None,
            "answer": answer,
            "votes": votes,
        }

    def to_dict(self, **context: Any) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "prompt": self.prompt,
            **context,
            "columns": [c.to_dict() for c in self.columns],
            "final": self.final,
        }


def rollout_trace(trace: Trace, particles: list[Any], sweep: int = 0, chain: int = 0) -> None:
    """Columns for independent rollouts, built from their finished particles: column k holds
    every particle, extended if it has a k-th step."""
    depth = max((len(p.steps) for p in particles), default=0)
    for k in range(1, depth + 1):
        previous = trace._last_ids.get((chain, sweep), set())
        nodes = []
        for p in particles:
            step = p.steps[k - 1] if len(p.steps) >= k else None
            nodes.append(
                {
                    "id": p.id,
                    "parent": p.id if p.id in previous else None,
                    "text": step.text if step is not None else "",
                    "step_reward": step.score if step is not None else None,
                    "reward": p.score if k == len(p.steps) else None,
                    "log_weight": p.log_weight,
                    "extended": step is not None,
                    "finished": len(p.steps) <= k and p.finished,
                    "end": step.end if step is not None else p.end,
                }
            )
        trace.columns.append(Column(k, sweep, chain, nodes))
        trace._last_ids[(chain, sweep)] = {p.id for p in particles}


def check_trace(data: Any, source: str) -> dict[str, Any]:
    """A trace read from a file, checked: a clear UsageError for anything else."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(
            f'{source} is not an itscale trace (no "format": "{FORMAT}"): write one with '
            "`itscale solve ... --trace FILE`"
        )
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise UsageError(
            f"{source} is a trace of format version {data.get('version')}, newer than this itscale reads "
            f"({VERSION}): upgrade itscale"
        )
    if not isinstance(data.get("columns"), list):
        raise UsageError(f"{source} is a damaged trace (no columns list)")
    return data


def to_llamppl(trace: dict[str, Any]) -> dict[str, Any]:
    """The trace in LLaMPPL's SMC record format (the JSON their `smc.html` viewer opens):
    a history of steps, each the particles' contents and weights, with a resampling step's
    ancestor indices."""
    history = []
    texts: dict[int, str] = {}
    for column in trace["columns"]:
        particles = []
        for node in column["nodes"]:
            prefix = texts.get(node["parent"], "") if node["parent"] is not None else ""
            texts[node["id"]] = prefix + node["text"]
            particles.append({"contents": texts[node["id"]], "logweight": node["log_weight"]})
        step: dict[str, Any] = {"mode": "smc_step", "step": column["step"], "particles": particles}
        history.append(step)
        if column["resampled"] and column["selection"]:
            ids = [n["id"] for n in column["nodes"]]
            ancestors = [ids.index(parent) for parent in column["selection"]["parents"]]
            children = [{"contents": texts[parent], "logweight": 0.0} for parent in column["selection"]["parents"]]
            for child, parent in zip(column["selection"]["children"], column["selection"]["parents"], strict=True):
                texts[child] = texts[parent]
            history.append({"mode": "resample", "step": column["step"], "ancestors": ancestors, "particles": children})
    return {"step": len(trace["columns"]), "history": history}
