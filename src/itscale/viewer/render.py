"""A trace (see itscale.trace) rendered as one self-contained HTML page.

The page is `static/page.html` with `static/viewer.css` and `static/viewer.js` written into
it, and the data as JSON in a `<script type="application/json">` element: nothing is fetched
when it is opened (its Content-Security-Policy forbids it), so the file can be mailed,
attached to an issue or opened from a CI artefact.

The page draws the trace as written (lanes, columns, nodes, parents, weights). Python adds
only what needs itscale itself, under `view`: each final particle's answer (extracted from
its whole text as the search extracts it), the final answers with their summed weights and
particle counts (equivalent answers pooled as the vote pools them), and for a record of an
evaluation its problem, reference and verdict.

Inputs are checked here: a missing file, a file that is not a trace or is of a newer format,
an evaluation directory without the record asked for, a record kept without its trace;
each is a `UsageError` whose message says what to do.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

from itscale.answers import extract_answer, is_equivalent, majority
from itscale.errors import UsageError
from itscale.trace import check_trace

RESULTS = "results.jsonl"  # as itscale.eval.store names it


def read_trace(path: str | Path) -> dict[str, Any]:
    """The trace in a file written by `itscale solve --trace FILE` (or `Result.trace_dict()`)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist: give a trace file (`itscale solve ... --trace FILE` writes one)")
    if path.is_dir():
        raise UsageError(
            f"{path} is a directory: to view a record of an evaluation, give --problem, --algorithm and --budget"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        data = None  # not JSON: not a trace, said below in the words of check_trace
    return check_trace(data, str(path))


def read_eval_record(
    directory: str | Path, problem: str, algorithm: str, budget: int, seed: int | None = None
) -> dict[str, Any]:
    """The record of one run in an evaluation directory (`itscale eval --out DIR`), read
    without changing the file (an evaluation may be appending to it). Without `seed`, the
    lowest seed recorded for that problem, algorithm and budget."""
    directory = Path(directory)
    results = directory / RESULTS
    if not directory.exists():
        raise UsageError(f"{directory} does not exist: give the --out directory of `itscale eval`")
    if not results.exists():
        raise UsageError(f"{directory} is not an evaluation directory (no {RESULTS}): give the --out of `itscale eval`")
    records = []
    lines = results.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # the last piece: empty, or a line still being written
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise UsageError(f"{results} line {number} is damaged (not a complete record)") from None
    where = f"in {directory}"
    matching = [r for r in records if str(r.get("problem")) == problem]
    if not matching:
        raise UsageError(f"no problem {problem!r} {where} (it has {_some(r.get('problem') for r in records)})")
    runs = matching
    matching = [r for r in runs if r.get("algorithm") == algorithm]
    if not matching:
        raise UsageError(
            f"no run of {algorithm} on problem {problem} {where} (it has {_some(r.get('algorithm') for r in runs)})"
        )
    runs = matching
    matching = [r for r in runs if r.get("budget") == budget]
    if not matching:
        raise UsageError(
            f"no run of {algorithm} at budget {budget} on problem {problem} {where} "
            f"(budgets: {_some(r.get('budget') for r in runs)})"
        )
    runs = matching
    matching = sorted((r for r in runs if seed is None or r.get("seed") == seed), key=lambda r: r.get("seed", 0))
    if not matching:
        raise UsageError(
            f"no run of {algorithm} at budget {budget} on problem {problem} with seed {seed} {where} "
            f"(seeds: {_some(r.get('seed') for r in runs)})"
        )
    record = matching[0]
    if record.get("trace") is None:
        raise UsageError(
            f"the record of {algorithm} at budget {budget} on problem {problem} {where} has no trace: run the eval "
            "with --trace (into a new --out directory: records already there are not run again)"
        )
    check_trace(record["trace"], f"the trace of {algorithm} at budget {budget} on problem {problem} {where}")
    return record


def _some(values: Any, most: int = 8) -> str:
    """Distinct values in order of appearance, the first `most` of them."""
    seen = list(dict.fromkeys(str(v) for v in values))
    return ", ".join(seen[:most]) + (f" and {len(seen) - most} more" if len(seen) > most else "")


def final_texts(trace: dict[str, Any]) -> dict[int, str]:
    """The whole text of every final particle: its steps' texts along its parents, in the
    lane (chain, sweep) whose last column holds the final particles."""
    final = trace.get("final") or {}
    ids = final.get("ids") or []
    columns = trace["columns"]
    holding = [c for c in columns if {n["id"] for n in c["nodes"]} == set(ids)]
    if not ids or not holding:
        return {}
    lane = (holding[-1]["chain"], holding[-1]["sweep"])
    whole: dict[int, str] = {}
    for column in columns:
        if (column["chain"], column["sweep"]) == lane:
            before = whole
            whole = {n["id"]: before.get(n["parent"], "") + n["text"] for n in column["nodes"]}
            if column is holding[-1]:
                break
    return {i: whole.get(i, "") for i in ids}


def final_answers(trace: dict[str, Any], answers: list[str | None] | None = None) -> dict[str, Any]:
    """Each final particle's answer and the final answers: summed weight, particle count and
    the search's vote where it voted. `answers` (in the order of `final.ids`) are used when
    known (an evaluation record keeps them); otherwise they are extracted from the texts."""
    final = trace.get("final") or {}
    ids, weights = final.get("ids") or [], final.get("weights") or []
    if answers is None or len(answers) != len(ids):
        texts = final_texts(trace)
        answers = [extract_answer(texts[i]) if i in texts else None for i in ids]
    if len(weights) != len(ids):
        weights = [1.0 / len(ids)] * len(ids) if ids else []
    summed = majority(answers, [float(w) for w in weights])[1]
    counts = majority(answers)[1]  # pooled the same way: keys in order of first appearance
    votes = final.get("votes") or {}
    rows = []
    for answer, weight in summed.items():
        vote = votes.get(answer)
        if vote is None:
            vote = next((v for k, v in votes.items() if is_equivalent(k, answer)), None)
        rows.append({"answer": answer, "weight": weight, "particles": int(counts.get(answer, 0)), "vote": vote})
    rows.sort(key=lambda row: -row["weight"])
    missing = [w for a, w in zip(answers, weights, strict=True) if a is None]
    return {
        "particles": {str(i): a for i, a in zip(ids, answers, strict=True)},
        "answers": rows,
        "no_answer": {"weight": sum(missing), "particles": len(missing)},
        "voted": bool(votes),
    }


def render_html(
    trace: dict[str, Any], context: dict[str, Any] | None = None, answers: list[str | None] | None = None
) -> str:
    """The page for a trace; `context` says where it came from (shown in the header),
    `answers` are the final particles' answers when known (see `final_answers`)."""
    view = {**final_answers(trace, answers), "context": context or {}}
    data = _script_json({"trace": trace, "view": view})
    static = resources.files("itscale.viewer") / "static"
    parts = {
        "title": html.escape(_title(trace, context or {})),
        "style": (static / "viewer.css").read_text(encoding="utf-8"),
        "script": (static / "viewer.js").read_text(encoding="utf-8"),
        "data": data,
    }
    template = (static / "page.html").read_text(encoding="utf-8")
    # One pass: text put in (the trace's own text) is never searched for placeholders again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)


def _title(trace: dict[str, Any], context: dict[str, Any]) -> str:
    problem = context.get("problem")
    where = f" on problem {problem}" if problem is not None else ""
    return f"itscale trace: {trace.get('algorithm') or 'search'}{where}"


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: no `</script>` or `<!--` can appear,
    and non-finite numbers (a log-weight of -inf) become null, which JSON can carry."""
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def record_context(directory: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """What the page says about an evaluation record beside its trace."""
    return {
        "source": str(directory),
        "problem": record.get("problem"),
        "seed": record.get("seed"),
        "budget": record.get("budget"),
        "reference": record.get("reference"),
        "answer": record.get("answer"),
        "correct": record.get("correct"),
    }
