"""Throughput and latency of `itscale serve` with 1, 2, 4 and 8 concurrent clients.

    .venv/bin/python benchmarks/server.py [--clients 1,2,4,8] [--requests 8] [--budget 8]

Starts `itscale serve` on the embedded model (Qwen2.5-Coder-0.5B by default) and, for each
number of clients C, sends the same `--requests` particle-filtering requests (the first
GSM8K test problems, a fixed seed each) with C in flight at once. Prints, per C: generated
tokens per second over the whole batch (from the responses' usage), and the latency of a
request (p50, p95). The work is the same for every C, so the throughput column says how much
the engine's shared decode rounds gain from concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def batch(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], int]:
    """Sends every body with `clients` in flight; (wall seconds, latencies, generated tokens)."""
    queue = list(bodies)
    latencies, generated = [], 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal generated
        while queue:
            body = queue.pop(0)
            started = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            generated += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - started, latencies, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    problems = [json.loads(line) for line in DATA.read_text().splitlines()[: args.requests]]
    bodies = [
        {
            "model": f"particle-filter-{args.budget}:{args.model}",
            "messages": [{"role": "user", "content": p["problem"]}],
            "max_tokens": args.max_tokens,
            "seed": i,
        }
        for i, p in enumerate(problems)
    ]
    port = free_port()
    clients = [int(c) for c in args.clients.split(",")]
    server = subprocess.Popen(
        [sys.executable, "-m", "itscale.cli", "serve", "--model", args.model, "--port", str(port),
         "--n-threads", str(args.threads), "--max-concurrency", str(max(clients)), "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f"model {args.model}, particle filtering at budget {args.budget}, max_tokens {args.max_tokens}, "
              f"{args.requests} requests per row (GSM8K test 0-{args.requests - 1})\n")  # fmt: skip
        print("| clients | generated tokens | wall s | generated tokens/s | vs 1 client | p50 latency s | p95 s |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        base = None
        for c in clients:
            wall, latencies, generated = asyncio.run(batch(url, bodies, c))
            rate = generated / wall
            base = base or rate
            p50, p95 = np.percentile(latencies, [50, 95])
            print(f"| {c} | {generated} | {wall:.0f} | {rate:.1f} | {rate / base:.2f}x | {p50:.0f} | {p95:.0f} |",
                  flush=True)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


if __name__ == "__main__":
    main()
