"""The trace viewer: pages made by `itscale view` from real searches (SmolLM2-135M), opened in
a real headless Chromium driven by Playwright, and every bad input as one line and exit 2.

The browser tests need Debian's Chromium and the playwright package; without them they skip
and say how to get them, except under ITSCALE_REQUIRE_BROWSER=1 (CI), where they fail.
Playwright's own browser download is never used: it drives /usr/bin/chromium.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
from pathlib import Path

import pytest

from conftest import THREADS
from itscale.cli import main
from itscale.rewards.registry import DEFAULT_REWARD, make_reward
from itscale.search import make_algorithm
from itscale.search.settings import SearchSettings
from itscale.trace import to_llamppl
from itscale.viewer import render_html
from itscale.viewer.browser import CHROMIUM, launch

HOW_TO_ENABLE = "apt-get install chromium; pip install playwright"
PROBLEM = "What is 3 + 4?"


def browser_missing(why: str) -> None:
    """Skips the test (fails it under ITSCALE_REQUIRE_BROWSER=1), saying how to enable it."""
    message = f"{why}: the viewer's browser tests need Chromium and Playwright ({HOW_TO_ENABLE})"
    if os.environ.get("ITSCALE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message}; ITSCALE_REQUIRE_BROWSER=1 requires them", pytrace=False)
    pytest.skip(message)


@pytest.fixture
async def browser():
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        browser_missing("the playwright package is not installed")
    if not CHROMIUM.exists():
        browser_missing(f"{CHROMIUM} does not exist")
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        try:
            yield chromium
        finally:
            await chromium.close()


class Page:
    """A viewer page opened from its file, with everything that went wrong while it ran."""

    def __init__(self, page, path: Path):
        self.page, self.path = page, path
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))

    @classmethod
    async def open(cls, browser, path: Path, width: int = 1400, height: int = 850) -> Page:
        page = await browser.new_page(viewport={"width": width, "height": height})
        opened = cls(page, path)
        await page.goto(path.resolve().as_uri())
        await page.wait_for_function("window.itscaleViewer !== undefined")
        return opened

    def assert_clean(self) -> None:
        """No console error, no script error, nothing fetched but the page itself."""
        assert self.errors == []
        assert self.requests == [self.path.resolve().as_uri()]

    async def counts(self) -> tuple[int, int]:
        return await self.page.locator("#graph .node").count(), await self.page.locator("#graph .edge").count()

    def node(self, lane: int, column: int, node_id: int):
        return self.page.locator(f'#graph .node[data-lane="{lane}"][data-column="{column}"][data-id="{node_id}"]')


# ---------------------------------------------------------------- what the page must show


def lanes_of(trace: dict) -> list[list[dict]]:
    """The columns of each (chain, sweep), in the page's order (chain, then sweep)."""
    lanes: dict[tuple[int, int], list[dict]] = {}
    for column in trace["columns"]:
        lanes.setdefault((column["chain"], column["sweep"]), []).append(column)
    return [lanes[key] for key in sorted(lanes)]


def expected_counts(trace: dict) -> tuple[int, int]:
    nodes = sum(len(c["nodes"]) for c in trace["columns"])
    edges = sum(1 for c in trace["columns"] for n in c["nodes"] if n["parent"] is not None)
    return nodes, edges


def lineage_steps(lane: list[dict], column: int, node_id: int) -> list[str]:
    """The texts of a node's steps, first to last, following parents back through its lane."""
    steps = []
    for k in range(column, -1, -1):
        node = next(n for n in lane[k]["nodes"] if n["id"] == node_id)
        if node["extended"] and node["text"]:
            steps.append(node["text"])
        if node["parent"] is None:
            break
        node_id = node["parent"]
    return steps[::-1]


def surviving_roots(lane: list[dict]) -> int:
    """How many particles of the lane's first column have descendants in its last."""
    alive = {n["id"] for n in lane[-1]["nodes"]}
    for k in range(len(lane) - 1, 0, -1):
        alive = {n["parent"] for n in lane[k]["nodes"] if n["id"] in alive}
    return len(alive)


def squeeze(text: str) -> str:
    return " ".join(text.split())


async def assert_panel_shows_the_lineage(page: Page, lane_index: int, lane: list[dict], column: int, node_id: int):
    await page.node(lane_index, column, node_id).click()
    panel = squeeze(await page.page.locator("#particle").inner_text())
    assert f"particle #{node_id}" in panel
    steps = [squeeze(s) for s in lineage_steps(lane, column, node_id) if s.strip()]
    assert steps, "the node clicked has some text"
    at = 0
    for step in steps:  # every step of its text, in order
        found = panel.find(step, at)
        assert found >= 0, (step, panel)
        at = found + len(step)
    assert "selected" in (await page.node(lane_index, column, node_id).get_attribute("class"))


async def traced(lm, algorithm: str, budget: int, seed: int = 1, max_tokens: int = 64) -> dict:
    result = await make_algorithm(algorithm).run(
        lm,
        PROBLEM,
        SearchSettings(budget=budget, seed=seed, max_tokens=max_tokens),
        reward=make_reward(DEFAULT_REWARD, lm),
    )
    return json.loads(json.dumps(result.trace_dict()))  # as the file holds it


def write_trace(trace: dict, path: Path) -> Path:
    path.write_text(json.dumps(trace), encoding="utf-8")
    return path


# ---------------------------------------------------------------- pages in the browser


async def test_a_particle_filter_trace_shows_every_particle_parent_and_text(smol, browser, tmp_path) -> None:
    trace = await traced(smol, "particle-filter", budget=6)
    source = write_trace(trace, tmp_path / "run.json")
    assert main(["view", str(source)]) == 0
    page = await Page.open(browser, tmp_path / "run.html")

    assert await page.counts() == expected_counts(trace)
    (lane,) = lanes_of(trace)
    # the chosen particle: highlighted, and its whole text step by step in the side panel
    chosen = trace["final"]["chosen"]
    assert "chosen" in (await page.node(0, len(lane) - 1, chosen).get_attribute("class")).split()
    await assert_panel_shows_the_lineage(page, 0, lane, len(lane) - 1, chosen)
    # a particle halfway through, too
    middle = max(0, len(lane) // 2 - 1)
    some = next(n for n in lane[middle]["nodes"] if n["extended"] and n["text"].strip())
    await assert_panel_shows_the_lineage(page, 0, lane, middle, some["id"])
    # the surviving ancestry: the particles with no descendant at the end are faded
    survivors = surviving_roots(lane)
    assert await page.page.locator('#graph .node[data-column="0"]').count() == 6
    assert await page.page.locator('#graph .node[data-column="0"]:not(.extinct)').count() == survivors
    notes = await page.page.locator("#graph .lane-note").all_text_contents()
    assert f"{survivors} of 6 roots survive" in notes
    # resampling steps are marked with their ESS, the final answers and usage are shown
    resampled = [c for c in lane if c["resampled"]]
    assert await page.page.locator("#graph .resample-band").count() == len(resampled)
    final_text = squeeze(await page.page.locator("#final").inner_text())
    assert str(trace["final"]["answer"]) in final_text
    usage_text = squeeze(await page.page.locator("#usage").inner_text())
    assert f"completion tokens {trace['usage']['completion_tokens']:,}" in usage_text
    await page.page.screenshot(path=str(tmp_path / "particle-filter.png"), full_page=True)
    assert (tmp_path / "particle-filter.png").stat().st_size > 10_000
    page.assert_clean()


async def test_parallel_tempering_shows_each_chain_and_sweep_as_a_lane(smol, browser, tmp_path) -> None:
    trace = await traced(smol, "parallel-tempering", budget=8)  # 2 chains x 2 sweeps x 2 particles
    page_path = tmp_path / "pt.html"
    assert main(["view", str(write_trace(trace, tmp_path / "pt.json")), "--out", str(page_path)]) == 0
    page = await Page.open(browser, page_path)

    assert await page.counts() == expected_counts(trace)
    lanes = lanes_of(trace)
    keys = {(c["chain"], c["sweep"]) for c in trace["columns"]}
    assert {chain for chain, _ in keys} >= {1, 2} and {sweep for _, sweep in keys} >= {0, 1}
    labels = await page.page.locator("#graph .lane-label").all_text_contents()
    assert labels == [f"chain {chain} · sweep {sweep}" for chain, sweep in sorted(keys)]
    notes = await page.page.locator("#graph .lane-note").all_text_contents()
    assert sum("answers" in note for note in notes) == 1
    for index, lane in enumerate(lanes):  # a click in every lane reads that lane's lineage
        last = len(lane) - 1
        node = next((n for n in lane[last]["nodes"] if n["extended"] and n["text"].strip()), None)
        if node is not None:
            await assert_panel_shows_the_lineage(page, index, lane, last, node["id"])
    await page.page.screenshot(path=str(tmp_path / "parallel-tempering.png"), full_page=True)
    page.assert_clean()


async def test_a_record_of_an_evaluation_run_with_trace_renders(browser, tmp_path, data_dir) -> None:
    out = tmp_path / "eval"
    command = [
        *("eval", "--dataset", "gsm8k", "--data-dir", str(data_dir), "--limit", "1"),
        *("--algorithms", "best-of-n,particle-filter", "--budgets", "2", "--out", str(out), "--trace"),
        *("--model", "smollm2-135m", "--n-threads", str(THREADS), "--n-ctx", "4096"),
        *("--max-tokens", "48", "--no-progress"),
    ]
    assert await asyncio.to_thread(main, command) == 0  # it runs its own event loop
    record = next(
        json.loads(line)
        for line in (out / "results.jsonl").read_text().splitlines()
        if json.loads(line)["algorithm"] == "particle-filter"
    )
    problem = record["problem"]
    assert main(["view", str(out), "--problem", problem, "--algorithm", "particle-filter", "--budget", "2"]) == 0
    page_path = out / f"view-{problem}-particle-filter-2.html"
    page = await Page.open(browser, page_path)

    assert await page.counts() == expected_counts(record["trace"])
    headline = squeeze(await page.page.locator("#top").inner_text())
    assert f"problem {problem}" in headline and f"reference {record['reference']}" in headline
    assert ("✓ right" if record["correct"] else "✗ wrong") in headline
    final_text = squeeze(await page.page.locator("#final").inner_text())
    for particle in record["particles"]:  # the record's own answers, not extracted again
        assert str(particle["answer"]) in final_text
    page.assert_clean()

    # the same record from an evaluation run without --trace
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.jsonl").write_text(json.dumps({k: v for k, v in record.items() if k != "trace"}) + "\n")
    assert main(["view", str(bare), "--problem", problem, "--algorithm", "particle-filter", "--budget", "2"]) == 2


def synthetic_trace(particles: int = 64, steps: int = 30, seed: int = 0) -> dict:
    """A particle filter's trace written from the format: every step each particle takes a
    step, weights drawn at random, multinomial resampling when the ESS falls below half;
    particles finish along the way (and are carried unchanged after)."""
    rng = random.Random(seed)
    columns, next_id = [], particles
    ids = list(range(particles))
    parents: list[int | None] = [None] * particles
    finished = set()
    for step in range(1, steps + 1):
        nodes = []
        for i, node_id in enumerate(ids):
            done = parents[i] in finished if parents[i] is not None else False
            ends = not done and (step == steps or rng.random() < 0.02)
            log_weight = rng.gauss(0, 1.5)
            nodes.append(
                {
                    "id": node_id,
                    "parent": parents[i],
                    "text": "" if done else f"Step {step} of particle {node_id}: {rng.randint(1, 99)} apples.\n\n",
                    "step_reward": None if done else rng.random(),
                    "reward": rng.random(),
                    "log_weight": log_weight,
                    "extended": not done,
                    "finished": done or ends,
                    "end": "answer" if ends or done else "delimiter",
                }
            )
            if done or ends:
                finished.add(node_id)
        nodes[0]["log_weight"] = -math.inf  # a particle with zero weight
        if step == 3:  # text that must stay text inside the page's <script> element
            marked = next(n for n in nodes[1:] if n["extended"])
            marked["text"] = "</script><script>document.title = 'injected'</script> <!-- & -->\n\n"
        weights = [math.exp(n["log_weight"]) for n in nodes]
        total = sum(weights)
        ess = total**2 / sum(w * w for w in weights)
        column = {
            "step": step,
            "sweep": 0,
            "chain": 0,
            "nodes": nodes,
            "ess": ess,
            "resampled": False,
            "selection": None,
        }
        if ess < particles / 2 and step < steps:
            chosen = rng.choices(range(particles), weights=weights, k=particles)
            children = list(range(next_id, next_id + particles))
            next_id += particles
            column["resampled"] = True
            column["selection"] = {"parents": [ids[c] for c in chosen], "children": children}
            parents, ids = [ids[c] for c in chosen], children
        else:
            parents = list(ids)
        columns.append(column)
    last = columns[-1]["nodes"]
    weights = [math.exp(n["log_weight"]) for n in last]
    total = sum(weights)
    return {
        "format": "itscale-trace",
        "version": 1,
        "prompt": [{"role": "user", "content": "How many apples?"}],
        "algorithm": "particle-filter-sound",
        "settings": {"budget": particles, "seed": seed},
        "usage": {"prompt_tokens": 50, "completion_tokens": 40000, "reward_tokens": 0, "seconds": 12.5},
        "columns": columns,
        "final": {
            "ids": [n["id"] for n in last],
            "weights": [w / total for w in weights],
            "chosen": last[max(range(len(last)), key=weights.__getitem__)]["id"],
            "answer": "42",
            "votes": None,
        },
    }


async def test_a_big_search_renders_quickly_and_stays_readable(browser, tmp_path) -> None:
    trace = synthetic_trace(particles=64, steps=30)
    source = tmp_path / "big.json"
    source.write_text(json.dumps(trace))  # -Infinity as Python writes it
    started = time.perf_counter()
    assert main(["view", str(source), "--llamppl", str(tmp_path / "big-llamppl.json")]) == 0
    assert time.perf_counter() - started < 10
    started = time.perf_counter()
    page = await Page.open(browser, tmp_path / "big.html")
    opened = time.perf_counter() - started

    nodes, edges = expected_counts(trace)
    assert (nodes, edges) == (64 * 30, 64 * 29)
    assert await page.counts() == (nodes, edges)
    assert opened < 20 and await page.page.evaluate("window.itscaleViewer.renderMilliseconds") < 5000
    # no per-node labels: the text in the drawing grows with columns, not with particles
    assert await page.page.locator("#graph text").count() <= 4 + 2 * 30  # lane labels, step and ESS labels
    radii = await page.page.locator("#graph .node").evaluate_all("nodes => nodes.map(n => n.r.baseVal.value)")
    assert min(radii) >= 2.0  # a floor: the lightest particle can still be clicked
    assert await page.page.locator("#graph .node.zero").count() >= 30  # the -inf log-weights
    # the page is zoomable and scrollable
    before = await page.page.locator("#graph svg").get_attribute("width")
    await page.page.click("#zoom-in")
    assert float(await page.page.locator("#graph svg").get_attribute("width")) > float(before)
    # text that looks like markup is shown as text, and nothing runs from it
    (lane,) = lanes_of(trace)
    marked = next(n for n in lane[2]["nodes"] if n["text"].startswith("</script>"))
    await assert_panel_shows_the_lineage(page, 0, lane, 2, marked["id"])
    assert await page.page.title() != "injected"
    await page.page.screenshot(path=str(tmp_path / "big.png"))
    page.assert_clean()

    history = json.loads((tmp_path / "big-llamppl.json").read_text())
    assert history == json.loads(json.dumps(to_llamppl(trace))) and history[0]["mode"] == "init"


# ---------------------------------------------------------------- bad input: one line, exit 2


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("itscale: error: "), err
    return err


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert "does not exist" in one_error(capsys, ["view", str(tmp_path / "nothing.json")])
    (tmp_path / "result.json").write_text(json.dumps({"answer": "7"}))
    assert "not an itscale trace" in one_error(capsys, ["view", str(tmp_path / "result.json")])
    (tmp_path / "notes.txt").write_text("not json at all")
    assert "not an itscale trace" in one_error(capsys, ["view", str(tmp_path / "notes.txt")])
    newer = {"format": "itscale-trace", "version": 99, "columns": []}
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    assert "upgrade itscale" in one_error(capsys, ["view", str(tmp_path / "newer.json")])

    runs = tmp_path / "runs"
    runs.mkdir()
    assert "not an evaluation directory" in one_error(
        capsys, ["view", str(runs), "--problem", "p1", "--algorithm", "best-of-n", "--budget", "2"]
    )
    assert "give --problem, --algorithm, --budget" in one_error(capsys, ["view", str(runs)])
    record = {"problem": "p1", "algorithm": "best-of-n", "budget": 2, "seed": 0, "particles": []}
    (runs / "results.jsonl").write_text(json.dumps(record) + "\n")
    view = ["view", str(runs), "--algorithm", "best-of-n"]
    assert "run the eval with --trace" in one_error(capsys, [*view, "--problem", "p1", "--budget", "2"])
    assert "no run of best-of-n at budget 4" in one_error(capsys, [*view, "--problem", "p1", "--budget", "4"])
    assert "no problem 'p2'" in one_error(capsys, [*view, "--problem", "p2", "--budget", "2"])
    assert "with seed 1" in one_error(capsys, [*view, "--problem", "p1", "--budget", "2", "--seed", "1"])
    assert "is not a directory" in one_error(capsys, ["view", str(tmp_path / "result.json"), "--budget", "2"])


def test_the_page_is_self_contained_and_carries_the_trace_as_text() -> None:
    trace = synthetic_trace(particles=4, steps=4)
    page = render_html(trace)
    assert "<script src" not in page and '<link rel="stylesheet"' not in page and "url(" not in page
    assert set(re.findall(r"https?://[^\s\"']*", page)) == {"http://www.w3.org/2000/svg"}  # a namespace, not fetched
    assert page.count("</script>") == 2  # the data's own "</script>" is escaped
    data = page.split('<script type="application/json" id="trace-data">')[1].split("</script>")[0]
    embedded = json.loads(data)
    texts = [[n["text"] for n in c["nodes"]] for c in trace["columns"]]
    assert [[n["text"] for n in c["nodes"]] for c in embedded["trace"]["columns"]] == texts  # markup intact
    assert any("</script>" in text for column in texts for text in column)
    assert embedded["trace"]["columns"][0]["nodes"][0]["log_weight"] is None  # -inf, as JSON can carry it


def test_without_a_browser_the_tests_skip_or_under_ci_fail(monkeypatch) -> None:
    monkeypatch.delenv("ITSCALE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium; pip install playwright"):
        browser_missing("no browser")
    monkeypatch.setenv("ITSCALE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="ITSCALE_REQUIRE_BROWSER=1"):
        browser_missing("no browser")
