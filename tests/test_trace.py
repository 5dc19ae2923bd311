"""The trace the population loop records, checked on the toy model for every algorithm."""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_test_algorithm
from itscale.errors import UsageError
from itscale.search import algorithm_names
from itscale.search.settings import SearchSettings
from itscale.trace import check_trace, to_llamppl
from toy import STOP, TRANS, G, MarkovLM, PotentialReward


async def traced(name: str, budget: int = 8, seed: int = 3) -> dict:
    result = await make_test_algorithm(name).run(
        MarkovLM(TRANS, STOP),
        "toy",
        SearchSettings(budget=budget, seed=seed, max_steps=4, system_prompt=None),
        reward=PotentialReward(G),
    )
    return json.loads(json.dumps(result.trace_dict()))  # as a file would hold it


@pytest.mark.parametrize("name", algorithm_names())
async def test_every_parent_is_in_the_previous_column_and_the_final_population_is_the_last(name: str) -> None:
    trace = await traced(name)
    assert trace["format"] == "itscale-trace" and trace["version"] == 1 and trace["columns"]
    last_of: dict[tuple[int, int], set[int]] = {}
    for column in trace["columns"]:
        key = (column["chain"], column["sweep"])
        previous = last_of.get(key)
        for node in column["nodes"]:
            if previous is None:
                assert node["parent"] is None  # a sweep's first column starts from the prompt
            else:
                assert node["parent"] in previous, (name, column["step"], node)
        if column["selection"]:
            assert set(column["selection"]["parents"]) <= {n["id"] for n in column["nodes"]}
        last_of[key] = {n["id"] for n in column["nodes"]}
    final = trace["final"]
    assert math.isclose(sum(final["weights"]), 1.0, abs_tol=1e-9)
    chains = [c for c in trace["columns"] if set(final["ids"]) == {n["id"] for n in c["nodes"]}]
    assert chains and chains[-1] is [c for c in trace["columns"] if c["chain"] == chains[-1]["chain"]][-1]
    assert final["chosen"] is None or final["chosen"] in final["ids"]


async def test_resampling_is_recorded_with_the_ess_and_the_parents_of_every_child() -> None:
    trace = await traced("particle-filter", budget=8)
    resampled = [c for c in trace["columns"] if c["resampled"]]
    assert resampled
    for column in resampled:
        assert len(column["selection"]["parents"]) == len(column["selection"]["children"]) == 8
        assert 1.0 <= column["ess"] <= 8.0
        # the next column's nodes are the children, each linked to its parent
        following = trace["columns"][trace["columns"].index(column) + 1] if column is not trace["columns"][-1] else None
        if following is not None:
            links = {n["id"]: n["parent"] for n in following["nodes"]}
            for child, parent in zip(column["selection"]["children"], column["selection"]["parents"], strict=True):
                assert links[child] == parent


async def test_a_trace_of_a_finished_particle_carries_it_unchanged() -> None:
    trace = await traced("particle-filter", budget=16, seed=4)
    seen_finished = False
    for column in trace["columns"]:
        for node in column["nodes"]:
            if node["finished"] and not node["extended"]:
                seen_finished = True
                assert node["text"] == ""  # carried along, no new step
    assert seen_finished


def rebuild_llamppl(history: list[dict]) -> list[list[tuple[str, str]]]:
    """Every entry's strings as LLaMPPL's smc.html rebuilds them: the parent is particle j of
    the entry before, or its `ancestors[j]` after a resampling; the newer viewer rebuilds a
    string from the parent's with `keep` and `contents_incr`, the older reads `contents`."""
    rows: list[list[tuple[str, str]]] = []
    for i, entry in enumerate(history):
        row = []
        for j, particle in enumerate(entry["particles"]):
            parent = None if i == 0 else rows[i - 1][entry["ancestors"][j] if entry["mode"] == "resample" else j]
            rebuilt = (parent[1][: particle["keep"]] if parent else "") + particle["contents_incr"]
            row.append((particle["contents"], rebuilt))
        rows.append(row)
    return rows


@pytest.mark.parametrize("name", ["particle-filter", "particle-gibbs"])
async def test_the_llamppl_export_is_their_record_format_and_rebuilds_every_text(name: str) -> None:
    trace = await traced(name, budget=4)
    history = json.loads(json.dumps(to_llamppl(trace)))  # what `--llamppl FILE` writes
    # the lane that answers: the last sweep of the chain whose last column holds the final particles
    last = [c for c in trace["columns"] if {n["id"] for n in c["nodes"]} == set(trace["final"]["ids"])][-1]
    lane = [c for c in trace["columns"] if (c["chain"], c["sweep"]) == (last["chain"], last["sweep"])]
    assert isinstance(history, list) and len(history) == len(lane)
    assert [h["step"] for h in history] == list(range(1, len(lane) + 1))
    assert history[0]["mode"] == "init" and {h["mode"] for h in history} <= {"init", "smc_step", "resample"}
    if name == "particle-filter":
        assert any(h["mode"] == "resample" for h in history)
    whole: dict[int, str] = {}
    for column, entry, row in zip(lane, history, rebuild_llamppl(history), strict=True):
        before = dict(whole)
        for node, particle, (contents, rebuilt) in zip(column["nodes"], entry["particles"], row, strict=True):
            prefix = before[node["parent"]] if node["parent"] is not None else ""
            whole[node["id"]] = prefix + node["text"]
            assert contents == rebuilt == f"{prefix}<<<{node['text']}>>>"
            assert float(particle["logweight"]) == node["log_weight"]
        if entry["mode"] == "resample":
            previous = lane[lane.index(column) - 1]["nodes"]
            assert [previous[a]["id"] for a in entry["ancestors"]] == [n["parent"] for n in column["nodes"]]


def test_a_file_that_is_not_a_trace_or_is_too_new_is_one_clear_error() -> None:
    with pytest.raises(UsageError, match="not an itscale trace"):
        check_trace({"answer": 3}, "run.json")
    with pytest.raises(UsageError, match="newer than this itscale reads"):
        check_trace({"format": "itscale-trace", "version": 99, "columns": []}, "run.json")


async def test_sound_mode_records_the_ess_at_every_step_and_tempering_answers_in_its_cold_chain() -> None:
    sound = await traced("particle-filter-sound", budget=8)
    assert all(c["ess"] is not None and 1.0 <= c["ess"] <= 8.0 for c in sound["columns"])
    tempered = await traced("parallel-tempering", budget=8)
    final_ids = set(tempered["final"]["ids"])
    assert any({n["id"] for n in c["nodes"]} == final_ids and c["chain"] == 1 for c in tempered["columns"])
    assert {c["chain"] for c in tempered["columns"]} == {1, 2}  # no detached lane for the final population
