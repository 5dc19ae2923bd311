"""Generated tokens per second of a particle-filtering `itscale eval` with K problems at once.

    .venv/bin/python benchmarks/eval_workers.py [--workers 1,2,4] [--limit 6] [--max-tokens 256]

Runs `itscale eval --algorithms particle-filter --budgets 8` on the first `--limit` GSM8K test
problems on the embedded engine, once per K (`--workers K`: K problems share the engine's
decode rounds), each into a fresh directory under .cache/benchmarks/eval-workers/, and prints
per K the generated tokens (from the records' usage), the wall seconds of the whole command
(model load included) and their ratio, against K = 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "benchmarks" / "eval-workers"


def run(workers: int, limit: int, max_tokens: int) -> tuple[int, float, float]:
    out = CACHE / f"workers-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "itscale.cli", "eval", "--dataset", "gsm8k", "--limit", str(limit),
        "--algorithms", "particle-filter", "--budgets", "8", "--max-tokens", str(max_tokens),
        "--workers", str(workers), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    generated = sum(r["usage"]["completion_tokens"] for r in records)
    accuracy = sum(bool(r.get("correct")) for r in records) / len(records)
    return generated, wall, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    print(f"particle-filter, budget 8, first {args.limit} GSM8K test problems, max_tokens {args.max_tokens}\n")
    print("| workers | generated tokens | wall s | tokens/s | vs 1 worker | accuracy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for k in (int(x) for x in args.workers.split(",")):
        generated, wall, accuracy = run(k, args.limit, args.max_tokens)
        rate = generated / wall
        base = base or rate
        print(f"| {k} | {generated:,} | {wall:.0f} | {rate:.1f} | {rate / base:.2f}x | {accuracy:.0%} |", flush=True)


if __name__ == "__main__":
    main()
