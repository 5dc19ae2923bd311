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

import math
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

    def selected(self, column: Column, event: Any | None, ess: float | None = None) -> None:
        """After the policy selected: the log-weights it gave the column's particles, and
        its selection event (a `Resampling`), if any."""
        for node, p in zip(column.nodes, column.particles, strict=True):
            node["log_weight"] = p.log_weight
        column.particles = []
        column.ess = ess
        if event is not None:
            column.ess, column.resampled = event.ess if event.ess is not None else ess, event.resampled
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


def to_llamppl(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace in LLaMPPL's SMC record format: what its `SMCRecord.to_json` writes with
    `smc_standard(..., json_file=...)` and its `html/smc.html` viewer opens (probcomp/hfppl,
    genlm/llamppl). The record is a JSON list with one entry per step: `mode` "init" for the
    first, "smc_step" when particle j continued particle j, "resample" when particles were
    copied, with `ancestors[j]` the index of particle j's parent in the entry before; each
    particle's `logweight` and `weight_incr` (its log-weight minus its ancestor's) are
    strings, "-Infinity" for a zero weight. A particle's `contents` is its whole text with
    the step just taken marked `<<<...>>>`; `keep` and `contents_incr` say the same as a diff
    against the ancestor's contents (the first `keep` characters, then `contents_incr`), which
    is what the newer viewer reads.

    LLaMPPL records one population, so only the lane that answers is written: the last sweep
    of the chain whose last column holds the final particles."""
    columns = trace["columns"]
    final_ids = set((trace.get("final") or {}).get("ids") or [])
    answering = [c for c in columns if {n["id"] for n in c["nodes"]} == final_ids]
    last = answering[-1] if answering else columns[-1] if columns else None
    lane = [c for c in columns if last is not None and (c["chain"], c["sweep"]) == (last["chain"], last["sweep"])]

    def number(x: float) -> str:  # as JavaScript spells it, for the viewer's parseFloat
        if math.isnan(x):
            return "NaN"
        return str(float(x)) if math.isfinite(x) else "Infinity" if x > 0 else "-Infinity"

    history: list[dict[str, Any]] = []
    whole: dict[int, str] = {}  # node id -> its whole text (in the previous column)
    ids: list[int] = []  # the previous entry's particles: ids, contents, log-weights
    contents: list[str] = []
    weights: list[float] = []
    for k, column in enumerate(lane):
        position = {node_id: i for i, node_id in enumerate(ids)}
        ancestors = [position[n["parent"]] for n in column["nodes"]] if k else []
        particles, texts = [], {}
        for j, node in enumerate(column["nodes"]):
            prefix = whole[node["parent"]] if k else ""
            texts[node["id"]] = prefix + node["text"]
            shown = f"{prefix}<<<{node['text']}>>>"
            before = contents[ancestors[j]] if k else ""
            keep = next(
                (i for i, (a, b) in enumerate(zip(before, shown, strict=False)) if a != b), min(len(before), len(shown))
            )
            log_weight = node["log_weight"] if node["log_weight"] is not None else float("-inf")
            increment = log_weight - (weights[ancestors[j]] if k else 0.0)
            particles.append(
                {
                    "contents": shown,
                    "keep": keep,
                    "contents_incr": shown[keep:],
                    "logweight": number(log_weight),
                    "weight_incr": number(increment),
                }
            )
        mode = "init" if k == 0 else "smc_step" if ancestors == list(range(len(ids))) else "resample"
        entry: dict[str, Any] = {"step": k + 1, "mode": mode, "particles": particles}
        if mode == "resample":
            entry["ancestors"] = ancestors
        history.append(entry)
        whole = texts
        ids = [n["id"] for n in column["nodes"]]
        contents = [p["contents"] for p in particles]
        weights = [n["log_weight"] if n["log_weight"] is not None else float("-inf") for n in column["nodes"]]
    return history
