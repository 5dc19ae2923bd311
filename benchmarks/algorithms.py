"""Every algorithm at one budget on the same GSM8K problems: accuracy, tokens, wall time.

    .venv/bin/python benchmarks/algorithms.py [--budget 8] [--limit 10] [--out runs/bench-algorithms]

A smoke-level comparison (the scaling study is `itscale eval` over budgets). It runs the
evaluation harness itself, so it resumes where it stopped when run again with the same
arguments, then prints the report's table. Extra arguments are passed to `itscale eval`
(for example `--reward ...` or `--n-threads 1`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from itscale.search import algorithm_names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--out", default="runs/bench-algorithms")
    args, extra = parser.parse_known_args()
    command = [
        sys.executable, "-m", "itscale.cli", "eval",
        "--dataset", args.dataset, "--limit", str(args.limit), "--model", args.model,
        "--algorithms", ",".join(algorithm_names()), "--budgets", str(args.budget),
        "--max-tokens", "512", "--out", args.out, *extra,
    ]  # fmt: skip
    print("$", " ".join(command[2:]).replace("itscale.cli", "itscale"), file=sys.stderr)
    done = subprocess.run(command)
    if done.returncode != 0:
        return done.returncode
    subprocess.run([sys.executable, "-m", "itscale.cli", "report", args.out], check=True, capture_output=True)
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
