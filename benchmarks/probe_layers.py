"""Which layer's hidden state predicts a rollout's correctness best, and how much data it takes.

    .venv/bin/python benchmarks/probe_layers.py --rollouts runs/probe-qwen [--problems 80] [--folds 5]
        [--layers final,7,9,11,13] [--train-rollouts 100,200,400] [--rank-weights 0,1]
        [--features result_norm,step-mean:l_out-22,result_norm+step-mean:l_out-22]

1. Features. Rollouts sampled with `itscale train-reward --layers ...` carry every step's
   state for those layers: they are read as they are (no model is loaded). Otherwise the
   rollouts are re-evaluated on the embedded model, with llama.cpp's graph callback reading
   every block's output (`l_out-K`, the residual stream after block K) and the final normed
   state (`result_norm`, what the engine's features are) at the last token of every step,
   cached in `.cache/benchmarks/probe-layers/` (an .npz per run of problems).
   Re-evaluation also pools two blocks' states over tokens (every token's state of the
   block before the last and of a middle one, RMS-normalised, averaged over the step's own
   tokens, `step-mean:l_out-K`, and over all tokens so far, `prefix-mean:l_out-K`): whether a
   step's whole text predicts better than its last token.
2. Trains the same heads as `itscale train-reward` (itscale.rewards.training.fit: logistic
   and one-hidden-layer MLP, early stopping on a held-out fifth of the training folds'
   problems) per layer, in `--folds` folds split by problem, and prints the held-out AUROC
   of the whole answer's value, pooled and within a problem (the mean over the held-out
   problems with both right and wrong rollouts), averaged over the folds, and within a
   problem the AUROC of every earlier prefix's value against the verdict its rollout reached
   (what a particle filter's intermediate weights rest on).
3. With `--train-rollouts`, the same per fold with the training folds cut to about N
   rollouts (whole problems, in a random order): the data-size curve.

Only training-split rollouts are read; nothing here touches a test split.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from itscale.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "benchmarks" / "probe-layers"


def tensor_name(layer: str) -> str:
    """The graph tensor a feature layer reads: `final` is the output norm's state, block K's
    is the residual stream after it."""
    return "result_norm" if layer == "final" else f"l_out-{int(layer)}"


def stored(rollouts: Path, problems: int, layers: list[str]) -> dict[str, np.ndarray] | None:
    """The features the rollouts carry for `layers`, as `extract` lays them out, or None when
    some rollout lacks one of them."""
    from itscale.rewards.training import examples_from, training_rollouts, with_layers

    directory, identity, records = training_rollouts(rollouts)
    records, missing = with_layers(records[:problems], directory, layers)
    if missing:
        return None
    arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        data = examples_from(records, identity["generator"]["n_embd"], "outcome", [layer])
        arrays[tensor_name(layer)] = data.features
    arrays.update(problem=data.problem, rollout=data.rollout, final=data.final, correct=data.correct)
    return arrays


def pooled_states(states: np.ndarray, ends: list[int]) -> dict[str, np.ndarray]:
    """Each step's token states pooled, from one rollout's states (a row per token) and its
    steps' last tokens: the mean over the step's own tokens ("step-mean") and over every
    token so far ("prefix-mean"). Each token's state is RMS-normalised first (as the model's
    own norms do), so that a few huge residual dimensions do not swamp the mean. A step of
    no tokens takes the state where it ends."""
    h = states.astype(np.float32)
    h /= np.sqrt((h * h).mean(axis=1, keepdims=True) + 1e-6)
    running = np.cumsum(h, axis=0)
    step_means, prefix_means, start = [], [], 0
    for end in ends:
        last = max(end, 0)
        step_means.append(h[start : end + 1].mean(axis=0) if end >= start else h[last])
        prefix_means.append(running[last] / (last + 1))
        start = max(start, end + 1)
    return {"step-mean": np.stack(step_means), "prefix-mean": np.stack(prefix_means)}


def extract(rollouts: Path, problems: int, threads: int) -> Path:
    """Features of every step of the first `problems` records, per layer, cached."""
    import llama_cpp
    from llama_cpp import _ggml

    from itscale.eval.datasets import load_dataset
    from itscale.lm.llamacpp import LlamaCppModel
    from itscale.rewards.training import training_rollouts
    from itscale.types import Prompt

    _, identity, records = training_rollouts(rollouts)
    saved = {r["problem"]: r for r in records[:problems]}
    order = [p for p in load_dataset(identity["dataset"]["source"]).problems if p.id in saved]
    key = hashlib.sha256(json.dumps([str(rollouts), [p.id for p in order]]).encode()).hexdigest()[:12]
    path = CACHE / f"features-pooled-{len(order)}-{key}.npz"
    if path.exists():
        return path

    lm = LlamaCppModel(identity["generator"]["name"], n_ctx=256, n_seq_max=1, n_threads=threads)
    n_embd, n_layer = lm.n_embd, lm._ll.llama_model_n_layer(lm._model)
    names = [f"l_out-{k}" for k in range(n_layer)] + ["result_norm"]
    wanted = {n.encode() for n in names}
    ggml = _ggml.libggml
    ggml.ggml_get_name.restype, ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    ggml.ggml_nbytes.restype, ggml.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    captured: dict[str, list[np.ndarray]] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor, ask, _user):
        name = ggml.ggml_get_name(tensor)
        if ask:
            return name in wanted
        size = ggml.ggml_nbytes(tensor)
        rows = np.empty(size // 4, np.float32)
        ggml.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, size)
        captured.setdefault(name.decode(), []).append(rows.reshape(-1, n_embd))
        return True

    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 4096, 512, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.n_seq_max, cparams.kv_unified = 2, True  # the prompt, and a rollout on a copy of it
    cparams.cb_eval = observe
    ctx = llama_cpp.llama_init_from_model(lm._model, cparams)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(tokens: list[int], pos0: int, seq: int, outputs: set[int]) -> dict[str, np.ndarray]:
        """Decodes `tokens` at positions pos0..., returns each capture's rows: every token's
        for the inner blocks, the marked outputs' (in order) for the last block and the norm."""
        captured.clear()
        for start in range(0, len(tokens), 512):
            chunk = tokens[start : start + 512]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i] = token, pos0 + start + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                batch.logits[i] = 1 if start + i in outputs else 0
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        return {name: np.concatenate(parts) for name, parts in captured.items()}

    settings = identity["settings"]
    # Pooled over tokens: inner blocks give every token's state (the last block and the norm
    # only the marked outputs'), so the block before the last and a middle one.
    pooled_blocks = [str(n_layer // 2 + 1), str(n_layer - 2)]
    layers: dict[str, list[np.ndarray]] = {name: [] for name in names}
    layers |= {f"{kind}:l_out-{b}": [] for b in pooled_blocks for kind in ("step-mean", "prefix-mean")}
    meta: dict[str, list] = {"problem": [], "rollout": [], "final": [], "correct": []}
    started, rollout_number, evaluated = time.perf_counter(), 0, 0
    for p_index, problem in enumerate(order):
        chat = Prompt.of(problem.problem, system=settings["system_prompt"])
        prompt = lm._prompt_tokens(lm.template.prompt_text(chat))
        llama_cpp.llama_memory_clear(memory, True)
        decode(prompt, 0, 0, {len(prompt) - 1})
        evaluated += len(prompt)
        for sample in saved[problem.id]["samples"]:
            tokens, ends = [], []
            for step in sample["steps"]:
                tokens += lm.tokenize(step["text"], special=False)
                # The state after the step's last token; a step of no text (end of turn right
                # after a delimiter) reads the state before it, as the engine does.
                ends.append(max(len(tokens) - 1, -1))
            llama_cpp.llama_memory_seq_rm(memory, 1, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, 0, 1, 0, len(prompt))
            if not tokens:
                rollout_number += 1
                continue
            outputs = sorted({e for e in ends if e >= 0})
            rows = decode(tokens, len(prompt), 1, set(outputs))
            evaluated += len(tokens)
            index_of = {pos: i for i, pos in enumerate(outputs)}
            for name in names:
                if name in ("result_norm", f"l_out-{n_layer - 1}"):
                    picked = [rows[name][index_of[max(e, outputs[0])]] for e in ends]
                else:
                    picked = [rows[name][max(e, 0)] for e in ends]
                layers[name].append(np.stack(picked).astype(np.float16))
            for block in pooled_blocks:
                for kind, states in pooled_states(rows[f"l_out-{block}"], ends).items():
                    layers[f"{kind}:l_out-{block}"].append(states.astype(np.float16))
            n = len(ends)
            meta["problem"] += [p_index] * n
            meta["rollout"] += [rollout_number] * n
            meta["final"] += [False] * (n - 1) + [True]
            meta["correct"] += [bool(sample["correct"])] * n
            rollout_number += 1
        rate = evaluated / (time.perf_counter() - started)
        print(f"  {p_index + 1}/{len(order)} problems evaluated ({rate:.0f} tokens/s)", file=sys.stderr, flush=True)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    lm.shutdown()
    arrays = {name: np.concatenate(rows) for name, rows in layers.items()}
    arrays.update({k: np.asarray(v) for k, v in meta.items()})
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.rename(path)
    return path


def evaluate(
    data: dict[str, np.ndarray],
    names: list[str],
    folds: int,
    heads: list[tuple[str, float]],
    seed: int,
    sizes: list[int | None],
) -> None:
    """`heads`: (kind, rank weight) pairs, a column pair each."""
    from itscale.rewards.training import Examples, TrainSettings, auroc, auroc_within, fit, split_by_problem

    problem, final, correct = data["problem"], data["final"], data["correct"]
    n_problems = int(problem.max()) + 1
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n_problems) % folds
    rollouts_of = np.bincount(problem[final], minlength=n_problems)
    mixed = sum(1 for p in range(n_problems) if 0 < correct[final & (problem == p)].sum() < rollouts_of[p])
    print(
        f"{n_problems} training problems, {int(final.sum())} rollouts ({correct[final].mean():.0%} right), "
        f"{len(problem)} step prefixes, {mixed} problems with both right and wrong rollouts; "
        f"{folds} folds by problem\n"
    )
    labels = [kind if not rank else f"{kind} rank {rank:g}" for kind, rank in heads]
    header = " | ".join(f"{k} pooled | {k} within | {k} prefixes within" for k in labels)
    print(f"| training rollouts | layer | {header} |")
    print("| ---: | --- |" + " ---: |" * (3 * len(heads)))
    for size in sizes:
        for name in names:
            # "a+b": the two feature sets side by side.
            x = np.concatenate([data[part].astype(np.float32) for part in name.split("+")], axis=1)
            cells, used = [], []
            for kind, rank in heads:
                pooled, within, prefixes = [], [], []
                for f in range(folds):
                    held = fold_of[problem] == f
                    train_problems = np.flatnonzero(fold_of != f)
                    if size is not None:
                        # Whole problems in a random order (the same for every layer and kind)
                        # until about `size` rollouts.
                        order = np.random.default_rng(seed + 1000 + f).permutation(train_problems)
                        cut = int(np.searchsorted(np.cumsum(rollouts_of[order]), size)) + 1
                        train_problems = order[:cut]
                    train_rows = np.isin(problem, train_problems)
                    used.append(int((train_rows & final).sum()))
                    # Early stopping on a fifth of the training problems, as train-reward does.
                    stop_problems = train_problems[split_by_problem(len(train_problems), 0.2, seed + f)]
                    stop_mask = np.isin(problem, stop_problems)
                    fit_rows = train_rows & ~stop_mask

                    def examples(mask: np.ndarray, x: np.ndarray = x) -> Examples:
                        labels = correct[mask].astype(np.float32)
                        return Examples(
                            x[mask], labels, problem[mask], np.arange(mask.sum()), final[mask], correct[mask]
                        )

                    settings = TrainSettings(seed=seed, rank_weight=rank)
                    head, _ = fit(examples(fit_rows), examples(stop_mask), kind, settings)
                    scores = head.predict(x[held & final])
                    pooled.append(auroc(scores, correct[held & final]))
                    w, _ = auroc_within(scores, correct[held & final], problem[held & final])
                    within.append(w)
                    # Every earlier prefix's value against the verdict its rollout reached:
                    # what a particle filter's intermediate weights rest on.
                    early = held & ~final
                    w, _ = auroc_within(head.predict(x[early]), correct[early], problem[early])
                    prefixes.append(w)
                for values in (pooled, within, prefixes):
                    cells.append(f"{np.mean([v for v in values if v is not None]):.3f}")
            print(f"| {np.mean(used):.0f} | {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", default="runs/probe-qwen", help="an `itscale train-reward` directory")
    parser.add_argument("--problems", type=int, default=80, help="the first N sampled problems")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--heads", default="linear,mlp", help="head kinds to train per layer")
    parser.add_argument(
        "--rank-weights", default="0", help="within-problem ranking weights to try per kind (as --rank-weight)"
    )
    parser.add_argument(
        "--layers", default=None, help="layers the rollouts carry (final, block indices); default: re-evaluate all"
    )
    parser.add_argument(
        "--train-rollouts", default=None, help="training-set sizes for the data-size curve, e.g. 100,200,400"
    )
    parser.add_argument(
        "--features",
        default=None,
        help="which features to compare (default: all): names as printed, a+b for the two side by side, "
        "e.g. result_norm,step-mean:l_out-22,result_norm+prefix-mean:l_out-22",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        study(args)
    except UsageError as error:
        sys.exit(str(error))


def study(args: argparse.Namespace) -> None:
    sizes: list[int | None] = [int(n) for n in args.train_rollouts.split(",")] if args.train_rollouts else []
    sizes.append(None)  # every training rollout of the folds
    data = stored(Path(args.rollouts), args.problems, args.layers.split(",")) if args.layers else None
    if data is not None:
        names = [tensor_name(layer) for layer in args.layers.split(",")]
    else:
        if args.layers:
            print("the rollouts lack some of --layers: re-evaluating them on the model", file=sys.stderr)
        loaded = np.load(extract(Path(args.rollouts), args.problems, args.threads))
        data = {name: loaded[name] for name in loaded.files}
        names = sorted((n for n in data if n.startswith("l_out-")), key=lambda n: int(n.split("-")[1]))
        names.append("result_norm")
        names += sorted(n for n in data if ":" in n)
    if args.features:
        names = args.features.split(",")
        unknown = {part for name in names for part in name.split("+")} - set(data)
        if unknown:
            sys.exit(f"unknown --features {', '.join(sorted(unknown))}: choose from {', '.join(sorted(data))}")
    heads = [(kind, float(rank)) for kind in args.heads.split(",") for rank in args.rank_weights.split(",")]
    evaluate(data, names, args.folds, heads, args.seed, sizes)


if __name__ == "__main__":
    main()
