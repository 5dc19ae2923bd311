"""The output directory of an evaluation: its configuration and its results, both crash-safe.

    DIR/config.json    what the records mean (dataset, model, reward, settings, options) and
                       the commands that wrote them; replaced atomically (temporary file, fsync,
                       rename)
    DIR/results.jsonl  one record per (problem, algorithm, budget, seed), appended
    DIR/.lock          held while an evaluation writes, so two cannot interleave

A batch of records goes to results.jsonl in one `write` of complete lines followed by fsync,
with SIGINT and SIGTERM held back meanwhile: Ctrl-C or `kill` never leaves half a line. Only
SIGKILL (or a full disk)
can, and then only at the very end of the file; `ResultStore.load` drops such a torn last line
(the record is simply run again) and truncates the file before anything is appended. A damaged
line anywhere else is not a crash artefact, so it is an error rather than silently skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from itscale.errors import UsageError
from itscale.files import write_json_atomic

Key = tuple[str, str, int, int]  # (problem id, algorithm, budget, seed)
CONFIG = "config.json"
RESULTS = "results.jsonl"


def record_key(record: dict[str, Any]) -> Key:
    return (record["problem"], record["algorithm"], int(record["budget"]), int(record["seed"]))


class ResultStore:
    """Append-only JSONL records, keyed by (problem, algorithm, budget, seed) or by `key`."""

    def __init__(self, path: Path, key: Callable[[dict[str, Any]], Any] = record_key):
        self.path = path
        self.key = key
        self.dropped_torn_line = False

    def load(self, repair: bool = True) -> dict[Any, dict[str, Any]]:
        """Every complete record; a torn last line is cut off the file (and noted), unless
        `repair` is False: a reader beside a running writer (training while sampling goes
        on) must not cut the line the writer is appending, so it only skips it."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and repair:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            self.dropped_torn_line = True
        records: dict[Any, dict[str, Any]] = {}
        for number, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = self.key(record)
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"{self.path} line {number} is damaged (not a complete record): remove that line "
                    "and run the same command again to redo it"
                ) from None
            records.setdefault(key, record)
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        """Appends the records as one write of complete lines, then fsyncs."""
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode()
        with _stop_signals_held(), open(self.path, "ab") as f:
            view = memoryview(data)
            while view:  # a regular file takes it in one write unless the disk is full
                view = view[os.write(f.fileno(), view) :]
            os.fsync(f.fileno())


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Defers Ctrl-C and SIGTERM until the block is done (only the main thread handles them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class OutputDir:
    """An evaluation's directory: checks and records its configuration, holds the lock.
    `results` and `key` name its record file and what identifies a record (the rollouts of
    `itscale train-reward` live in such a directory too, one record per problem)."""

    def __init__(
        self,
        path: str | Path,
        results: str = RESULTS,
        key: Callable[[dict[str, Any]], Any] = record_key,
        kind: str = "itscale eval",
    ):
        self.path = Path(path)
        self.results = ResultStore(self.path / results, key)
        self.kind = kind

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except ValueError:
            raise UsageError(f"{self.config_path} is not valid JSON: restore it or use another --out") from None

    def check(self, identity: dict[str, Any]) -> None:
        """Refuses a directory whose records were made with another identity (or that is
        not an evaluation directory); changes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file: give a directory")
        config = self.read_config()
        if config is None:
            if self.results.path.exists():
                raise UsageError(
                    f"{self.path} has {self.results.path.name} but no {CONFIG}: not an {self.kind} directory"
                )
            return
        # Compared as JSON, as it is stored: a tuple now and the list it was saved as are equal.
        differences = diff_identity(config.get("identity", {}), json.loads(json.dumps(identity)))
        if differences:
            first, *rest = differences
            more = f" (and {len(rest)} more: {', '.join(d.split(':')[0] for d in rest)})" if rest else ""
            raise UsageError(
                f"{self.path} holds results of a different configuration: {first}{more}; "
                "use another --out, or the settings it was made with"
            )

    def record(self, identity: dict[str, Any], run: dict[str, Any]) -> None:
        """Saves the identity (first time) and appends `run` (the command and its grid). An
        algorithm new to the directory adds its options to the saved identity, so that a later
        run is compared with them too."""
        self.check(identity)
        config = self.read_config() or {"version": 1, "identity": identity, "runs": []}
        if "options" in identity:
            saved = config["identity"].setdefault("options", {})
            for algorithm, options in json.loads(json.dumps(identity["options"])).items():
                saved.setdefault(algorithm, options)
        config["runs"].append(run)
        write_json_atomic(self.config_path, config)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while records are written: a second evaluation on the same directory stops
        with a clear error instead of interleaving its records."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"another {self.kind} is writing to {self.path}: wait for it or stop it") from None
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def diff_identity(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Readable differences, "settings.temperature: was 0.8, now 0.5". Algorithm options are
    compared only for algorithms both runs have: adding an algorithm is allowed."""
    out = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if name == "options" and isinstance(a, dict) and isinstance(b, dict):
            common = set(a) & set(b)
            out += diff_identity({k: a[k] for k in common}, {k: b[k] for k in common}, "options.")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += diff_identity(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: was {json.dumps(a)}, now {json.dumps(b)}")
    return out
