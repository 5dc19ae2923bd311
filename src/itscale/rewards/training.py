"""`itscale train-reward`: sample rollouts, label every step prefix, train a value head.

    sample   K rollouts per problem with the step settings searches use (the population
             loop's own rollouts), each step with the generator's hidden state after it;
             graded against the reference; optionally Monte Carlo labels: for each prefix,
             the fraction of k continuations from it that end right
    label    outcome labels: every prefix of a rollout gets the rollout's verdict; or the
             Monte Carlo fractions where they were sampled
    train    logistic regression and a one-hidden-layer MLP (numpy, full control of the
             loss, the split and the seed; no heavy dependency for a head this small),
             validation split by problem, early stopping on the validation loss; the one
             with the better within-problem AUROC on validation is kept

Sampling is resumable: one JSONL record per problem, appended whole (a killed run loses at
most the problems in flight), in a directory whose configuration (model, dataset, settings,
samples) is checked on every resume. The hidden states travel in the record as float16
(base64), one array per feature layer ("final", or a block index such as "12"), so
training needs no model. A layer the records lack (sampled before it was asked for) is
filled in once by evaluating the rollouts' text on the embedded model, into a file of its
own beside them (`features-LAYER.jsonl`, resumable like the rollouts), never by rewriting
the rollouts a sampler may still be appending to. Training is a pure function of the
records and the seed.

Why numpy and not scikit-learn or torch: the head has at most a few hundred thousand
weights and trains on tens of thousands of rows in seconds; numpy is already a dependency,
the validation split must be by problem (scikit-learn's MLP early stopping splits rows at
random) and the result must be bit-reproducible from a seed, which is simplest when every
step of the optimiser is ours.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from itscale.answers import is_equivalent
from itscale.errors import ItscaleError, UsageError
from itscale.files import write_json_atomic
from itscale.rewards.probe import CARD_FILE, FORMAT, HEAD_FILE, ValueHead

ROLLOUTS = "rollouts.jsonl"


# ------------------------------------------------------------------------------ sampling


def rollout_dir(path: str | Path):
    from itscale.eval.store import OutputDir

    return OutputDir(path, results=ROLLOUTS, key=lambda record: record["problem"], kind="itscale train-reward")


def training_rollouts(path: str | Path) -> tuple[Any, dict, list[dict[str, Any]]]:
    """A train-reward directory, its identity and its records in the dataset's order, for
    studies of the probe: they read training data only, so rollouts of a test split are
    refused."""
    from itscale.eval.datasets import load_dataset

    directory = rollout_dir(path)
    config = directory.read_config()
    if config is None:
        raise UsageError(f"no rollouts in {path}: sample them with `itscale train-reward --sample-only`")
    identity = config["identity"]
    if Path(identity["dataset"]["source"]).stem.endswith("_test"):
        raise UsageError(f"{path} holds rollouts of a test split: studies of the probe read training data only")
    saved = directory.results.load(repair=False)
    dataset = load_dataset(identity["dataset"]["source"])
    return directory, identity, [saved[p.id] for p in dataset.problems if p.id in saved]


def sampling_identity(lm: Any, dataset: Any, settings: Any, samples: int, mc_rollouts: int, seed: int) -> dict:
    """What a rollout record means; a directory refuses records made another way."""
    return {
        "generator": {"name": lm.name, "gguf_sha256": lm.sha256, "n_embd": lm.n_embd},
        "dataset": {"source": dataset.source, "fingerprint": dataset.fingerprint},
        "samples": samples,
        "mc_rollouts": mc_rollouts,
        "seed": seed,
        "settings": settings.identity(),
    }


async def sample_problem(
    lm: Any, problem: Any, index: int, settings: Any, samples: int, mc_rollouts: int, seed: int
) -> dict[str, Any]:
    """K rollouts of one problem, graded, each step with its hidden state; with
    `mc_rollouts` k, every non-final prefix also gets the fraction of k continuations that
    end right."""
    from itscale.search.population import Run
    from itscale.search.sampling import SelfConsistency
    from itscale.search.settings import derive_seed
    from itscale.types import Prompt

    started = time.perf_counter()
    search = SelfConsistency()
    run_settings = settings.replace(budget=samples, seed=derive_seed(seed, index))
    prompt = Prompt.of(problem.problem, system=settings.system_prompt)
    run = Run(search, lm, prompt, run_settings, None)
    run.particles = await run.start(samples)
    try:
        await run.rollout(run.particles)
        mc = await _monte_carlo(run, search, mc_rollouts, problem.answer) if mc_rollouts else None
    finally:
        for p in run.particles:
            run.release(p)
    out = []
    for i, p in enumerate(run.particles):
        if any(s.features is None for s in p.steps):
            raise UsageError("the engine returned steps without hidden states: features must be on while sampling")
        correct = bool(is_equivalent(p.answer, problem.answer)) if p.answer is not None else False
        out.append(
            {
                "answer": p.answer,
                "correct": correct,
                "end": p.end,
                "steps": [{"text": s.text, "tokens": s.tokens, "end": s.end} for s in p.steps],
                "features": {
                    layer: encode_features(np.stack([s.features[layer] for s in p.steps]))
                    for layer in lm.feature_layers
                },
                "mc": mc[i] + [float(correct)] if mc is not None else None,
            }
        )
    return {
        "problem": problem.id,
        "index": index,
        "reference": problem.answer,
        "samples": out,
        "usage": run.usage.to_dict(),
        "seconds": time.perf_counter() - started,
    }


async def _monte_carlo(run: Any, search: Any, k: int, reference: str) -> list[list[float]]:
    """For each particle, the fraction of `k` continuations from each of its non-final
    prefixes that end right (continuations from prefix j run as a sub-run at step j, so
    their seeds and step caps are those of a rollout that reached step j)."""
    from itscale.types import Particle

    groups: dict[int, list[tuple[int, Particle]]] = {}
    for i, p in enumerate(run.particles):
        for j in range(1, len(p.steps)):
            for _ in range(k):
                child = Particle(id=run.new_id(), steps=[replace(s) for s in p.steps[:j]])
                child.branch = run.lm.fork(p.branch, steps=j)
                groups.setdefault(j, []).append((i, child))
    subs = []
    for j, members in groups.items():
        sub = run.spawn(search, key=1000 + j)
        sub.step, sub.particles = j, [child for _, child in members]
        subs.append(sub)
    try:
        await asyncio.gather(*(sub.rollout(sub.particles) for sub in subs))
    finally:
        for sub in subs:
            for child in sub.particles:
                sub.release(child)
    fractions = [[0.0] * (len(p.steps) - 1) for p in run.particles]
    for j, members in groups.items():
        for i, child in members:
            fractions[i][j - 1] += float(child.answer is not None and is_equivalent(child.answer, reference)) / k
    return fractions


# Features travel as float16 (half the file); a state beyond float16's range (an inner
# block's residual stream can exceed 65,504) is kept whole as float32 instead of becoming inf.
FLOAT32_TAG = "f32:"


def encode_features(features: np.ndarray) -> str:
    features = np.asarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        raise ItscaleError(
            "the engine returned a hidden state that is not finite (NaN or inf): the model or its "
            "build is broken; check it with `itscale solve` on a simple problem"
        )
    if np.abs(features).max(initial=0.0) <= np.finfo(np.float16).max:
        half = features.astype(np.float16)
        return base64.b64encode(np.ascontiguousarray(half).tobytes()).decode()
    return FLOAT32_TAG + base64.b64encode(np.ascontiguousarray(features).tobytes()).decode()


def decode_features(text: str, n_embd: int) -> np.ndarray:
    if text.startswith(FLOAT32_TAG):
        return np.frombuffer(base64.b64decode(text[len(FLOAT32_TAG) :]), dtype=np.float32).reshape(-1, n_embd).copy()
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).reshape(-1, n_embd).astype(np.float32)


def sample_layers(sample: dict[str, Any]) -> dict[str, str]:
    """A rollout's encoded features by layer (records from before layers were named hold
    the final state only, as one string)."""
    features = sample["features"]
    return {"final": features} if isinstance(features, str) else features


# ------------------------------------------------------------------------------ layers from text


def layer_store(directory: Any, layer: str):
    from itscale.eval.store import ResultStore

    return ResultStore(directory.path / f"features-{layer}.jsonl", key=lambda record: record["problem"])


def with_layers(records: Sequence[dict[str, Any]], directory: Any, layers: Sequence[str]) -> tuple[list[dict], list]:
    """The records with the layers filled in from their side files where the rollouts lack
    them, and the records still missing one."""
    side = {layer: layer_store(directory, layer).load(repair=False) for layer in layers}
    merged, missing = [], []
    for record in records:
        samples = []
        for i, sample in enumerate(record["samples"]):
            features = dict(sample_layers(sample))
            for layer in layers:
                if layer not in features and record["problem"] in side[layer]:
                    filled = side[layer][record["problem"]]["samples"]
                    if i >= len(filled):
                        raise UsageError(
                            f"{layer_store(directory, layer).path} holds {len(filled)} rollouts of "
                            f"{record['problem']}, fewer than its rollouts file: delete it and run the "
                            "same command again to evaluate the layer anew"
                        )
                    features[layer] = filled[i]
            samples.append({**sample, "features": features})
        record = {**record, "samples": samples}
        merged.append(record)
        if any(layer not in s["features"] for s in samples for layer in layers):
            missing.append(record)
    return merged, missing


async def layer_features(lm: Any, record: dict[str, Any], prompt: Any, layers: Sequence[str]) -> dict[str, list[str]]:
    """The hidden states of `layers` after every step of a record's rollouts, by evaluating
    their text on the engine (one tree per problem: the prompt and shared leading steps are
    evaluated once), encoded as the rollouts encode them."""
    from itscale.rewards.base import ScoreRequest
    from itscale.rewards.text_tree import TextBranches

    texts = TextBranches(lm)
    try:
        requests = [
            ScoreRequest(prompt, tuple(step["text"] for step in sample["steps"][: k + 1]))
            for sample in record["samples"]
            for k in range(len(sample["steps"]))
        ]
        branches = [await texts.branch(r) for r in requests]
        results = await lm.features(branches)
    finally:
        texts.release()
    out: dict[str, list[str]] = {layer: [] for layer in layers}
    at = 0
    for sample in record["samples"]:
        n = len(sample["steps"])
        for layer in layers:
            out[layer].append(encode_features(np.stack([f[layer] for f, _ in results[at : at + n]])))
        at += n
    return out


async def sample_rollouts(
    lm: Any,
    problems: Sequence[Any],
    done: set[str],
    settings: Any,
    samples: int,
    mc_rollouts: int,
    seed: int,
    sink: Callable[[dict[str, Any]], None],
    concurrency: int = 8,
    mc_limit: int | None = None,
) -> None:
    """Samples every problem not in `done`, `concurrency` problems at once on the one engine
    (their particles share its decode rounds), handing each record to `sink` when done."""
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            index, problem = queue.get_nowait()
            mc = mc_rollouts if mc_limit is None or index < mc_limit else 0
            sink(await sample_problem(lm, problem, index, settings, samples, mc, seed))

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, len(todo))))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------ examples


@dataclass
class Examples:
    """One row per step prefix: features, label, and which problem and rollout it is from."""

    features: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) float32 in [0, 1]
    problem: np.ndarray  # (n,) int: index into the records
    rollout: np.ndarray  # (n,) int: a global rollout number
    final: np.ndarray  # (n,) bool: the rollout's last step
    correct: np.ndarray  # (n,) bool: the rollout ended right

    def subset(self, mask: np.ndarray) -> Examples:
        return Examples(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))


def examples_from(
    records: Sequence[dict[str, Any]], n_embd: int, label: str = "outcome", layers: Sequence[str] = ("final",)
) -> Examples:
    """Rows for every step prefix of every rollout: the states of `layers`, concatenated.
    `label` "outcome": the rollout's verdict; "mc": the Monte Carlo fraction where sampled
    (records without it are skipped)."""
    if label not in ("outcome", "mc"):
        raise UsageError(f"unknown label kind {label!r}: use outcome or mc")
    features, labels, problem, rollout, final, correct = [], [], [], [], [], []
    number = 0
    for p_index, record in enumerate(records):
        for sample in record["samples"]:
            encoded = sample_layers(sample)
            if any(layer not in encoded for layer in layers):
                raise UsageError(
                    f"the rollouts of {record['problem']} lack the features of layer(s) {', '.join(layers)}: "
                    "run itscale train-reward with the same --layers, which evaluates them from the text"
                )
            rows = np.concatenate([decode_features(encoded[layer], n_embd) for layer in layers], axis=1)
            n = rows.shape[0]
            if label == "mc":
                if sample.get("mc") is None:
                    number += 1
                    continue
                values = [float(v) for v in sample["mc"]]
            else:
                values = [float(sample["correct"])] * n
            features.append(rows)
            labels += values
            problem += [p_index] * n
            rollout += [number] * n
            final += [False] * (n - 1) + [True]
            correct += [bool(sample["correct"])] * n
            number += 1
    if not features:
        raise UsageError(f"no {label} labels in the rollouts: sample with --mc-rollouts for mc labels")
    return Examples(
        np.concatenate(features),
        np.asarray(labels, dtype=np.float32),
        np.asarray(problem),
        np.asarray(rollout),
        np.asarray(final),
        np.asarray(correct),
    )


def split_by_problem(n_problems: int, validation: float, seed: int) -> np.ndarray:
    """A boolean mask over problems: True for the validation problems."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_problems)
    n_val = max(1, round(validation * n_problems)) if n_problems > 1 else 0
    mask = np.zeros(n_problems, dtype=bool)
    mask[order[:n_val]] = True
    return mask


# ------------------------------------------------------------------------------ metrics


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a right one > score of a wrong one), ties counting half (Mann-Whitney)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if np.isnan(scores).any():  # NaN equals nothing: the tie loop below would never end
        raise ValueError("AUROC of scores that include NaN: the values being ranked are broken")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j < len(scores) and sorted_scores[j] == sorted_scores[i]:
            j += 1
        ranks[order[i:j]] = (i + 1 + j) / 2
        i = j
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_by_group(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[Any]) -> dict[Any, float]:
    """The AUROC of each group (problem) with both right and wrong members."""
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=bool)
    return {g: a for g, idx in by_group.items() if (a := auroc(scores[idx], labels[idx])) is not None}


def auroc_within(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[Any]) -> tuple[float | None, int]:
    """The mean AUROC over groups (problems) with both right and wrong members, and how many."""
    areas = list(auroc_by_group(scores, labels, groups).values())
    return (float(np.mean(areas)) if areas else None), len(areas)


def head_metrics(head: ValueHead, data: Examples) -> dict[str, Any]:
    """How well the head's value of each whole answer ranks right over wrong answers (pooled,
    and within a problem: what choosing among one problem's samples needs), and its step-level
    log loss and pooled AUROC."""
    p = head.predict(data.features)
    final = data.final
    within, mixed = auroc_within(p[final], data.correct[final], data.problem[final])
    eps = 1e-6
    log_loss = -np.mean(data.labels * np.log(p + eps) + (1 - data.labels) * np.log(1 - p + eps))
    return {
        "auroc_pooled": auroc(p[final], data.correct[final]),
        "auroc_within": within,
        "mixed_problems": mixed,
        "step_auroc_pooled": auroc(p, data.labels >= 0.5),
        "log_loss": float(log_loss),
        "rollouts": int(final.sum()),
        "steps": len(p),
    }


# ------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainSettings:
    kind: str = "auto"  # linear, mlp, or auto: both, keep the better on validation
    hidden: int = 64
    validation: float = 0.2
    seed: int = 0
    epochs: int = 200
    patience: int = 10
    batch_size: int = 256
    weight_decay: float = 1e-3
    learning_rate: float = 1e-3
    # Weight of the within-problem ranking term (0: plain cross-entropy). See `fit`.
    rank_weight: float = 0.0


def train(data: Examples, n_problems: int, settings: TrainSettings) -> tuple[ValueHead, dict[str, Any]]:
    """Trains the head(s) on the training problems, early-stopped on the validation
    problems' loss; returns the chosen head and a report of every candidate."""
    if settings.kind not in ("auto", "linear", "mlp"):
        raise UsageError(f"unknown head kind {settings.kind!r}: use auto, linear or mlp")
    val_problems = split_by_problem(n_problems, settings.validation, settings.seed)
    is_val = val_problems[data.problem]
    train_data, val_data = data.subset(~is_val), data.subset(is_val)
    if not len(train_data.labels) or not len(val_data.labels):
        raise UsageError(f"too few problems ({n_problems}) for a validation split: sample more problems")
    kinds = ["linear", "mlp"] if settings.kind == "auto" else [settings.kind]
    candidates = []
    for kind in kinds:
        head, epochs = fit(train_data, val_data, kind, settings)
        candidates.append(
            {
                "kind": kind,
                "best_epoch": epochs,
                "head": head,
                "train": head_metrics(head, train_data),
                "validation": head_metrics(head, val_data),
            }
        )

    def quality(c: dict) -> tuple[float, float]:
        within = c["validation"]["auroc_within"]
        return (within if within is not None else 0.0, -c["validation"]["log_loss"])

    best = max(candidates, key=quality)
    report = {
        "chosen": best["kind"],
        "validation_problems": int(val_problems.sum()),
        "training_problems": int((~val_problems).sum()),
        "candidates": [{k: v for k, v in c.items() if k != "head"} for c in candidates],
    }
    return best["head"], report


def fit(train_data: Examples, val_data: Examples, kind: str, settings: TrainSettings) -> tuple[ValueHead, int]:
    """Minibatch Adam on the mean binary cross-entropy (soft labels allowed) plus weight
    decay; the weights of the epoch with the lowest validation loss are kept.

    With `rank_weight` w > 0 the loss adds w times a within-problem listwise term: for each
    problem whose rows do not all share one label, the cross-entropy between the softmax of
    its rows' logits and its labels normalised to sum to one. Cross-entropy alone can lower
    its loss by learning which *problems* are easy (their states differ by topic), which does
    not help choose among one problem's particles; the listwise term only sees differences
    within a problem, which is what a search's weights use. Minibatches are then whole
    problems, so every problem's rows meet in one batch."""
    rng = np.random.default_rng(settings.seed)
    x = train_data.features
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-4
    xs = ((x - mean) / scale).astype(np.float32)
    xv = ((val_data.features - mean) / scale).astype(np.float32)
    y, yv = train_data.labels, val_data.labels
    groups, groups_v = train_data.problem, val_data.problem
    d = xs.shape[1]
    if kind == "linear":
        params = [np.zeros((d, 1), np.float32), np.zeros(1, np.float32)]
    else:
        h = settings.hidden
        params = [
            (rng.standard_normal((d, h)) * math.sqrt(2.0 / d)).astype(np.float32),
            np.zeros(h, np.float32),
            (rng.standard_normal((h, 1)) * math.sqrt(1.0 / h)).astype(np.float32),
            np.zeros(1, np.float32),
        ]
    # Start the output bias at the base rate: the first epochs learn features, not the mean.
    rate = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
    params[-1][:] = math.log(rate / (1 - rate))
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    beta1, beta2, step = 0.9, 0.999, 0
    best_loss, best_params, best_epoch, waited = math.inf, [p.copy() for p in params], 0, 0
    w_rank = settings.rank_weight
    for epoch in range(1, settings.epochs + 1):
        for idx in _minibatches(rng, groups, settings.batch_size, by_problem=w_rank > 0):
            grads = _gradients(params, xs[idx], y[idx], groups[idx], w_rank)
            step += 1
            for p, g, (m, v) in zip(params, grads, moments, strict=True):
                if p.ndim == 2:
                    g = g + settings.weight_decay * p
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                p -= settings.learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
        loss = _loss(params, xv, yv, groups_v, w_rank)
        if loss < best_loss - 1e-5:
            best_loss, best_params, best_epoch, waited = loss, [p.copy() for p in params], epoch, 0
        else:
            waited += 1
            if waited >= settings.patience:
                break
    # The output layer's (n, 1) weights flattened and its bias made a scalar; the hidden
    # layer's (d, hidden) weights stay whole, even for hidden = 1.
    *inner, out_weights, out_bias = best_params
    weights = (*inner, out_weights.reshape(-1), np.float32(out_bias[0]).reshape(()))
    return ValueHead(kind, mean.astype(np.float32), scale.astype(np.float32), weights), best_epoch


def _minibatches(rng: np.random.Generator, groups: np.ndarray, size: int, by_problem: bool) -> list[np.ndarray]:
    """Row indices of each minibatch of an epoch: rows in a random order, or (`by_problem`)
    whole problems in a random order, filled to about `size` rows."""
    if not by_problem:
        order = rng.permutation(len(groups))
        return [order[start : start + size] for start in range(0, len(order), size)]
    rows_of: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        rows_of.setdefault(g, []).append(i)
    batches, current = [], []
    for g in rng.permutation(sorted(rows_of)).tolist():
        current += rows_of[g]
        if len(current) >= size:
            batches.append(np.asarray(current))
            current = []
    if current:
        batches.append(np.asarray(current))
    return batches


def _listwise(z: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, np.ndarray]:
    """The within-problem listwise loss of `fit` (mean over problems with differing labels)
    and its gradient with respect to `z`."""
    _, g = np.unique(groups, return_inverse=True)
    n_groups = int(g.max()) + 1 if len(g) else 0
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, g, y)
    np.maximum.at(hi, g, y)
    informative = hi > lo
    if not informative.any():
        return 0.0, np.zeros_like(z)
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, g, z)
    e = np.exp(z - top[g])
    softmax = e / np.bincount(g, weights=e, minlength=n_groups)[g]
    target = y / np.maximum(np.bincount(g, weights=y, minlength=n_groups)[g], 1e-12)
    keep = informative[g]
    count = int(informative.sum())
    loss = -float(np.sum(target[keep] * np.log(softmax[keep] + 1e-12))) / count
    return loss, np.where(keep, softmax - target, 0.0) / count


def _forward(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if len(params) == 2:
        return (x @ params[0] + params[1])[:, 0], None
    hidden = np.maximum(x @ params[0] + params[1], 0.0)
    return (hidden @ params[2] + params[3])[:, 0], hidden


def _loss(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, groups: np.ndarray, rank_weight: float) -> float:
    z, _ = _forward(params, x)
    # log(1 + e^z) - y z, computed stably
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    return loss + rank_weight * _listwise(z, y, groups)[0] if rank_weight else loss


def _gradients(
    params: list[np.ndarray], x: np.ndarray, y: np.ndarray, groups: np.ndarray, rank_weight: float
) -> list[np.ndarray]:
    z, hidden = _forward(params, x)
    dz = (1.0 / (1.0 + np.exp(-z))) - y
    dz /= len(y)
    if rank_weight:
        dz += rank_weight * _listwise(z, y, groups)[1]
    dz = dz.astype(np.float32)[:, None]
    if hidden is None:
        return [x.T @ dz, dz.sum(axis=0)]
    d_hidden = (dz @ params[2].T) * (hidden > 0)
    return [x.T @ d_hidden, d_hidden.sum(axis=0), hidden.T @ dz, dz.sum(axis=0)]


def out_of_fold_values(
    records: Sequence[dict[str, Any]], n_embd: int, layers: Sequence[str], settings: TrainSettings, folds: int = 5
) -> tuple[list[list[float]], list[list[float]]]:
    """Per record, per sample: the value after the sample's first step, and after its last
    (the finished sample), by a head trained (with `settings`) on the other folds' problems,
    so that no value comes from a head that saw its own label: what a policy fitted on these
    records will meet on new problems."""
    if len(records) < 2 * folds:
        raise UsageError(f"{len(records)} problems are too few for {folds} folds: sample more problems")
    fold_of = np.random.default_rng(settings.seed).permutation(len(records)) % folds
    first: list[list[float]] = [[] for _ in records]
    final: list[list[float]] = [[] for _ in records]
    for f in range(folds):
        train_records = [r for i, r in enumerate(records) if fold_of[i] != f]
        head, _ = train(examples_from(train_records, n_embd, "outcome", layers), len(train_records), settings)
        for i in np.flatnonzero(fold_of == f):
            states = [
                np.concatenate([decode_features(sample_layers(s)[layer], n_embd) for layer in layers], axis=1)
                for s in records[i]["samples"]
            ]
            first[i] = [float(v) for v in head.predict(np.stack([rows[0] for rows in states]))]
            final[i] = [float(v) for v in head.predict(np.stack([rows[-1] for rows in states]))]
    return first, final


def card_settings(card: dict[str, Any]) -> TrainSettings:
    """The training settings a head's card records (defaults for what an older card lacks)."""
    recorded = card.get("training", {})
    return TrainSettings(**{k: recorded[k] for k in TrainSettings.__dataclass_fields__ if k in recorded})


# ------------------------------------------------------------------------------ the head on disk


def write_head(
    out: Path,
    head: ValueHead,
    report: dict[str, Any],
    identity: dict[str, Any],
    records: Sequence[dict[str, Any]],
    data: Examples,
    label: str,
    settings: TrainSettings,
    command: list[str] | None,
    dataset_name: str,
    layers: Sequence[str] = ("final",),
) -> dict[str, Any]:
    """head.npz and card.json in `out`, each written atomically."""
    chosen = next(c for c in report["candidates"] if c["kind"] == report["chosen"])
    card = {
        "format": FORMAT,
        "generator": identity["generator"],
        "layers": list(layers),
        "features": "the hidden states of these layers after the step's last token, concatenated "
        "('final': after the output norm; 'K': the residual stream after block K, from 0)",
        "label": label,
        "head": {"kind": head.kind, "hidden": settings.hidden if head.kind == "mlp" else None},
        "data": {
            "dataset": dataset_name,
            "source": identity["dataset"]["source"],
            "fingerprint": identity["dataset"]["fingerprint"],
            "problems": len(records),
            "rollouts": int(data.final.sum()),
            "steps": len(data.labels),
            "right_rollouts": float(data.correct[data.final].mean()),
            "samples_per_problem": identity["samples"],
            "mc_rollouts": identity["mc_rollouts"],
            "settings": identity["settings"],
        },
        "validation": {
            **chosen["validation"],
            "problems": report["validation_problems"],
            "split": "by problem",
            # These problems also chose the epoch and the head's kind: optimistic, not held out.
            "also_chose": "the early-stopping epoch and the head kind",
        },
        "training": {**asdict(settings), "best_epoch": chosen["best_epoch"], "candidates": report["candidates"]},
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    head.save(out / HEAD_FILE)
    write_json_atomic(out / CARD_FILE, card)
    return card
