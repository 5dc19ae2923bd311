"""Decode rounds with many diverging sequences: unified KV cache against a buffer per
sequence, and the host's share of a round (token sampling over the vocabulary).

    .venv/bin/python benchmarks/kv_layout.py [--sequences 8,16,32] [--context 400]

For each number of sequences S: a 100-token prompt is evaluated once and forked to S
sequences, each continued by its own 300 tokens (as particles that have diverged), then 24
decode rounds of one token per sequence are timed with llama.cpp's low-level API, on a
unified cache (forks share cells; every token attends over every cell in use) and on one
buffer per sequence (forks copy cells; a token attends only to its own sequence). The host
column times `itscale.lm.sampling.sample_token` on S rows of real logits, with the
two-level inverse CDF now used and with the full cumulative sum it replaced.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import llama_cpp
import numpy as np

from itscale.lm import sampling
from itscale.lm.models import model_path

PROMPT = 100


def rounds(model, unified: bool, sequences: int, context: int, steps: int = 24) -> tuple[float, np.ndarray]:
    """Seconds per decode round of one token per sequence, and one round's logits."""
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = sequences if not unified else 128
    params.n_ctx = sequences * (context + 256) if not unified else 32768
    params.n_batch = params.n_ubatch = 512
    params.kv_unified = unified
    params.n_threads = params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    tokens = [(i * 7919) % 5000 + 100 for i in range(context)]

    def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, logits)
        for i, (token, position, sequence, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, int(logits)
        batch.n_tokens = len(items)
        assert llama_cpp.llama_decode(ctx, batch) == 0

    decode([(tokens[p], p, 0, False) for p in range(PROMPT)])
    for s in range(1, sequences):
        llama_cpp.llama_memory_seq_cp(memory, 0, s, -1 if not unified else 0, -1 if not unified else PROMPT)
    for s in range(sequences):
        own = [(tokens[(p + 37 * s) % context], p, s, False) for p in range(PROMPT, context)]
        for start in range(0, len(own), 512):
            decode(own[start : start + 512])
    started = time.perf_counter()
    for step in range(steps):
        decode([(200 + s, context + step, s, True) for s in range(sequences)])
    seconds = (time.perf_counter() - started) / steps
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), shape=(151_936,)).copy()
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return seconds, logits


def host_seconds(logits: np.ndarray, sequences: int, full_cumsum: bool) -> float:
    """Seconds to sample one token for each of `sequences` rows at temperature 0.8."""
    rng = np.random.default_rng(0)
    two_level = sampling._inverse_cdf
    if full_cumsum:  # what the two-level draw replaced: a cumulative sum over the whole vocabulary
        sampling._inverse_cdf = lambda w, u: int(np.searchsorted(np.cumsum(w, dtype=np.float64), u * w.sum()))
    try:
        started = time.perf_counter()
        for _ in range(5):
            for _ in range(sequences):
                sampling.sample_token(logits, 0.8, 1.0, rng)
        return (time.perf_counter() - started) / 5
    finally:
        sampling._inverse_cdf = two_level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", default="8,16,32")
    parser.add_argument("--context", type=int, default=400)
    args = parser.parse_args()
    keep = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        str(model_path("qwen2.5-coder-0.5b")).encode(), llama_cpp.llama_model_default_params()
    )
    print(f"Qwen2.5-Coder-0.5B Q4_K_M, 2 threads; sequences of {args.context} tokens, the first {PROMPT} shared\n")
    print("| sequences | unified ms/round | per-sequence ms/round | per-sequence speed-up "
          "| host ms/round (two-level) | host ms/round (full cumsum) | host share of a round |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sequences in (int(s) for s in args.sequences.split(",")):
        unified, logits = rounds(model, True, sequences, args.context)
        separate, _ = rounds(model, False, sequences, args.context)
        now, before = host_seconds(logits, sequences, False), host_seconds(logits, sequences, True)
        print(
            f"| {sequences} | {1000 * unified:.0f} | {1000 * separate:.0f} | {unified / separate:.2f}x "
            f"| {1000 * now:.1f} | {1000 * before:.1f} | {now / (separate + now):.1%} |",
            flush=True,
        )
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
