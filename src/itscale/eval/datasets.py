"""Benchmark problems: from a JSONL file, a named shortcut, or a Hugging Face dataset.

A dataset is a list of `Problem`s (id, problem text, reference answer). Where they come from:

- a path to a JSONL file, one `{"id", "problem", "answer", ...}` object per line (the schema of
  shared/data/README.md); a line that is not JSON or lacks a field is an error naming its line;
- a shortcut such as `gsm8k`, `math500`, `aime24` or `amc23`: `NAME.jsonl` or `NAME_test.jsonl`
  in the data directory (`--data-dir`, else $ITSCALE_DATA_DIR, else ../shared/data relative to
  the working directory or to this checkout, whichever exists);
- a Hugging Face dataset, `owner/name[:config][@split]` or `hf:name...` (split "test" by
  default), through the optional `datasets` package, when a hub is reachable.

`fingerprint` hashes every problem of the source (not only those under `--limit`), so an
output directory can tell when the data under a name has changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itscale.errors import UsageError

REPO = Path(__file__).resolve().parents[3]
FIELDS = ("id", "problem", "answer")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class Dataset:
    name: str  # what the user asked for
    source: str  # the resolved file or hub name
    problems: tuple[Problem, ...]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for p in self.problems:
            digest.update(json.dumps([p.id, p.problem, p.answer]).encode())
        return digest.hexdigest()[:16]

    def head(self, limit: int | None) -> list[Problem]:
        return list(self.problems if limit is None else self.problems[:limit])


def default_data_dir() -> Path | None:
    """$ITSCALE_DATA_DIR, else ../shared/data beside the working directory or the checkout."""
    if os.environ.get("ITSCALE_DATA_DIR"):
        return Path(os.environ["ITSCALE_DATA_DIR"])
    for base in (Path.cwd(), REPO):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def shortcuts(data_dir: Path | None) -> dict[str, Path]:
    """Names the data directory offers: `gsm8k` for gsm8k_test.jsonl (and gsm8k.jsonl)."""
    if data_dir is None or not data_dir.is_dir():
        return {}
    found = {}
    for path in sorted(data_dir.glob("*.jsonl")):
        found[path.stem] = path
        found.setdefault(path.stem.removesuffix("_test"), path)
    return found


def load_dataset(spec: str, data_dir: str | Path | None = None) -> Dataset:
    """The dataset `spec` names: a JSONL path, a shortcut, or a Hugging Face name."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    path = Path(spec).expanduser()
    if path.is_file():
        return Dataset(spec, str(path.resolve()), read_jsonl(path))
    names = shortcuts(directory)
    if spec in names:
        return Dataset(spec, str(names[spec].resolve()), read_jsonl(names[spec]))
    if spec.startswith("hf:") or ("/" in spec and not spec.endswith((".jsonl", ".json")) and not path.exists()):
        return load_hub_dataset(spec.removeprefix("hf:"), spec)
    where = f" in {directory}" if directory is not None and directory.is_dir() else ""
    offered = f"one of {', '.join(sorted(n for n in names if not n.endswith('_test')))}{where}" if names else None
    if path.suffix in (".jsonl", ".json"):
        raise UsageError(f"dataset file {spec} does not exist: give the path of a JSONL file (id, problem, answer)")
    hint = offered or "no data directory found: pass --data-dir or set ITSCALE_DATA_DIR"
    raise UsageError(
        f"unknown dataset {spec!r}: give a JSONL path, {hint}, or a Hugging Face name such as openai/gsm8k:main"
    )


def read_jsonl(path: Path) -> tuple[Problem, ...]:
    """Problems from a JSONL file; blank lines are skipped, anything else malformed is an
    error that names the file and the line."""
    problems, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise UsageError(f"{path} line {number} is not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UsageError(f"{path} line {number} is not a JSON object")
            missing = [k for k in FIELDS if record.get(k) in (None, "")]
            if missing:
                raise UsageError(
                    f"{path} line {number} has no {', '.join(repr(m) for m in missing)}: "
                    f"every line needs {', '.join(FIELDS)}"
                )
            problem = Problem(str(record["id"]), str(record["problem"]), str(record["answer"]))
            if problem.id in seen:
                raise UsageError(f"{path} line {number} repeats id {problem.id!r} (first on line {seen[problem.id]})")
            seen[problem.id] = number
            problems.append(problem)
    if not problems:
        raise UsageError(f"{path} holds no problems")
    return tuple(problems)


# ------------------------------------------------------------------ Hugging Face

_HUB_SPEC = re.compile(r"(?P<name>[^:@]+)(?::(?P<config>[^@]+))?(?:@(?P<split>.+))?")
PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "expected_answer")


def load_hub_dataset(spec: str, asked: str) -> Dataset:
    """`name[:config][@split]` from the Hugging Face hub, mapped onto the schema: the problem
    from the first of PROBLEM_KEYS, the answer from the first of ANSWER_KEYS (GSM8K's
    "... #### 72" becomes "72"), the id from "id"/"unique_id" or the row number."""
    match = _HUB_SPEC.fullmatch(spec)
    if not match:
        raise UsageError(f"cannot read Hugging Face dataset name {spec!r}: use owner/name[:config][@split]")
    name, config, split = match["name"], match["config"], match["split"] or "test"
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"dataset {asked!r} looks like a Hugging Face name, which needs the datasets package: "
            "pip install 'itscale[datasets]', or give a JSONL path"
        ) from None
    _check_hub_reachable(name, asked)
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # the hub library raises many kinds; all mean "cannot load"
        raise UsageError(f"cannot load Hugging Face dataset {asked!r}: {_one_line(error)}") from None
    return Dataset(asked, f"hf:{name}:{config or ''}@{split}", _hub_problems(rows, asked))


def _check_hub_reachable(name: str, asked: str) -> None:
    """Fails fast when the hub cannot be reached (the datasets library retries for ~25 s
    before saying so). Skipped in offline mode, where a cached copy may serve."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(name, timeout=10)
    except Exception as error:
        raise UsageError(
            f"cannot reach the Hugging Face hub for dataset {asked!r} ({_one_line(error)}): give a JSONL path, "
            "or set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None


def _hub_problems(rows: Any, asked: str) -> tuple[Problem, ...]:
    columns = list(rows.column_names)
    problem_key = next((k for k in PROBLEM_KEYS if k in columns), None)
    answer_key = next((k for k in ANSWER_KEYS if k in columns), None)
    if problem_key is None or answer_key is None:
        raise UsageError(
            f"Hugging Face dataset {asked!r} has columns {', '.join(columns)}: need one of "
            f"{'/'.join(PROBLEM_KEYS)} and one of {'/'.join(ANSWER_KEYS)}; convert it to JSONL (id, problem, answer)"
        )
    id_key = next((k for k in ("id", "unique_id") if k in columns), None)
    problems = []
    for i, row in enumerate(rows):
        answer = str(row[answer_key])
        if "####" in answer:
            answer = answer.rsplit("####", 1)[1].strip()
        problems.append(Problem(str(row[id_key]) if id_key else str(i), str(row[problem_key]), answer))
    return tuple(problems)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]
