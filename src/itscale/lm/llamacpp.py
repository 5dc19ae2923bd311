"""The embedded engine: llama.cpp's low-level API, many sequences decoded in one batch.

How it works
------------
One engine thread owns the llama.cpp context and runs a continuous-batching loop: every
round it takes the pending work (steps to generate, judge prompts to score), builds one
`llama_batch` with one token per generating sequence plus chunks of tokens still to be
evaluated, calls `llama_decode` once, samples on the host, and resolves the work that is
done. Async callers submit work and await futures; concurrent callers are batched together.

Each `LlamaBranch` maps to a KV-cache sequence ("slot") holding all its tokens but the
last, which stays *pending*: the next decode feeds it and yields the logits to sample from.
So a fork never needs logits of its own and copying KV is all a fork costs:

- `fork` is lazy: the child records its source and the prefix length it shares. When the
  child is first used, the engine copies the shared cells from the nearest ancestor that
  holds them (`llama_memory_seq_cp` shares cells in a unified KV cache: no data is copied)
  and evaluates only what is missing (normally nothing but the pending token).
- When several branches waiting to be materialised share an ancestor that is not in the
  cache (all particles forked from a fresh prompt), that ancestor is evaluated once first.
- Releasing a branch that still has unmaterialised forks hands its slot to the longest one
  (trimming the cells past its prefix) instead of copying: resampling a particle into k
  children costs k - 1 copies, and no re-evaluation.
- When slots or KV cells run out, the least recently used idle branch is evicted; if it is
  needed again it is re-evaluated from its nearest cached ancestor (counted as prompt
  tokens, never silently).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itscale.errors import ItscaleError, UsageError
from itscale.lm.amx_check import extra_buffers_usable
from itscale.lm.base import Branch, StepOutput, StepSettings, ends_rollout, step_end
from itscale.lm.chat import CHATML, ChatTemplate
from itscale.lm.layers import FINAL, LayerObserver, layer_names, rows_by_entry
from itscale.lm.models import DEFAULT_MODEL, model_name, model_path
from itscale.lm.sampling import candidate_logprobs, sample_token
from itscale.types import Prompt

log = logging.getLogger(__name__)

_backend_ready = False
_backend_lock = threading.Lock()


def _init_backend() -> None:
    global _backend_ready, _silence
    import llama_cpp

    with _backend_lock:
        if not _backend_ready:
            # llama.cpp logs every load to stderr; keep a reference to the callback.
            _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
            llama_cpp.llama_log_set(_silence, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def _settle(future: concurrent.futures.Future, result: object = None, error: BaseException | None = None) -> None:
    """Resolves a caller's future, unless the caller cancelled it: a cancelled caller no
    longer waits. The caller cancels from its own thread, so checking `done()` first would
    race with it; the state check happens inside the future, under its lock."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class LlamaBranch(Branch):
    """A partial answer in the engine: its tokens, and where its KV cells live."""

    def __init__(self, owner: LlamaCppModel, prompt: Prompt, tokens: list[int], prompt_len: int):
        self.owner = owner
        self.prompt = prompt
        self.steps: list[str] = []
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.step_ends: list[int] = []  # len(tokens) at the end of each step
        self.slot: int | None = None  # KV sequence holding tokens[:kv_len]
        self.kv_len = 0
        self.source: LlamaBranch | None = None  # lazy fork: copy KV from here when used
        self.source_len = 0
        self.children: list[LlamaBranch] = []  # unmaterialised forks whose source is self
        self.released = False
        self.finished = False  # the model generated end-of-generation
        self.busy = False  # part of running work: never evicted
        self.preparing = False
        self.unattributed = 0  # tokens evaluated by a preparation, charged to its first copier
        self.last_used = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __repr__(self) -> str:
        return f"LlamaBranch(tokens={len(self.tokens)}, steps={len(self.steps)}, slot={self.slot})"


@dataclass(eq=False)
class _Work:
    branch: LlamaBranch
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    todo: list[int] = field(default_factory=list)
    ready: bool = False  # materialised: todo is set and the branch has a slot
    evaluated: int = 0  # tokens evaluated for this work that were not generated by it
    needs_logits: bool = True
    # With features on: the hidden state is read at this work's last fed token, so that
    # token is decoded alone in a round with embeddings switched on (see `_decode`).
    needs_features: bool = False


@dataclass(eq=False)
class _Generate(_Work):
    settings: StepSettings = field(default_factory=StepSettings)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    cap: int = 0
    # Several steps in one work (`extend_to_end`): the seeds of the steps still to come,
    # the tokens the branch may still generate, the test that a step ended the answer,
    # and the finished steps. `steps` is None for a single step (`extend`).
    next_seeds: list[int] = field(default_factory=list)
    allowance: int = 0
    stop: Callable[[str], bool] | None = None
    steps: list[StepOutput] | None = None
    new_tokens: int = 0
    step_bytes: bytearray = field(default_factory=bytearray)
    logprob: float = 0.0
    certainty: float = 0.0
    # Features on: the step whose features the next decode gives (the state after its last
    # token), and whether the work ends after that decode (with `closing_output`).
    awaiting_features: StepOutput | None = None
    closing: bool = False
    closing_output: StepOutput | None = None
    # Streaming: the text as it is generated, whole characters at a time.
    on_text: Callable[[str], None] | None = None
    text_decoder: Any = None

    def __post_init__(self) -> None:
        self.needs_features = self.branch.owner.features_enabled


@dataclass(eq=False)
class _Features(_Work):
    """Evaluates a branch's tokens to read the hidden state after its last one."""

    needs_features: bool = True


@dataclass(eq=False)
class _Score(_Work):
    candidates: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Prepare(_Work):
    """Evaluates a shared ancestor once so that its waiting forks can copy it."""

    needs_logits: bool = False
    waiting: list[_Work] = field(default_factory=list)


_CLOSE = object()


@dataclass(eq=False)
class _Control:
    """An action the engine thread runs between rounds (it alone touches the context)."""

    action: Callable[[bool], None]
    done: concurrent.futures.Future

    def run(self, busy: bool) -> None:
        try:
            self.action(busy)
        except BaseException as error:
            self.done.set_exception(error)
        else:
            self.done.set_result(None)


KV_LAYOUTS = ("unified", "per-sequence")


class LlamaCppModel:
    """The embedded engine. `model` is a named model (`itscale models`) or a GGUF path.

    `kv_layout` is how sequences share the KV cache:

    - "unified" (the default): one pool of `n_ctx` cells for all sequences; a fork shares
      its parent's cells (a prompt shared by N particles occupies its cells once). Small,
      but every token's attention spans every cell in use, so many long sequences slow each
      other down.
    - "per-sequence": every sequence has its own `seq_ctx` cells (n_seq_max x seq_ctx in
      all, allocated up front); a fork copies its parent's cells (a memory copy, no
      evaluation). Each token attends only to its own sequence: with 16 to 32 diverging
      sequences of a few hundred tokens, decoding is 20 to 40% faster (docs/benchmarks.md).

    `n_seq_max` is the number of sequences the cache holds at once, `n_batch` the most
    tokens decoded in one call. `feature_layers` turns features on from the start with
    these layers (see `enable_features`).
    """

    streams_text = True  # extend_to_end can hand on the text as it is generated (on_text)

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        n_ctx: int = 16384,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_seq_max: int = 128,
        chat_template: str | None = None,
        kv_layout: str = "unified",
        seq_ctx: int = 2048,
        feature_layers: Sequence[str | int] = (),
    ):
        import llama_cpp

        if kv_layout not in KV_LAYOUTS:
            raise UsageError(f"unknown kv_layout {kv_layout!r}: use one of {', '.join(KV_LAYOUTS)}")
        if kv_layout == "per-sequence":
            if seq_ctx < 256 or seq_ctx % 256:
                raise UsageError(f"seq_ctx must be a multiple of 256 (llama.cpp pads to it), got {seq_ctx}")
            n_ctx = n_seq_max * seq_ctx
        if n_ctx < 256 or n_batch < 1 or not 1 <= n_seq_max <= llama_cpp.llama_max_parallel_sequences():
            raise UsageError(
                f"bad engine settings n_ctx={n_ctx}, n_batch={n_batch}, n_seq_max={n_seq_max}: "
                f"need n_ctx >= 256, n_batch >= 1, 1 <= n_seq_max <= {llama_cpp.llama_max_parallel_sequences()}"
            )
        _init_backend()
        self._ll = llama_cpp
        self.path = model_path(str(model))
        self.name = model_name(str(model))
        self.n_ctx, self.n_batch, self.n_seq_max = n_ctx, n_batch, n_seq_max
        self.kv_layout = kv_layout
        # The most tokens one sequence can hold.
        self.seq_capacity = seq_ctx if kv_layout == "per-sequence" else n_ctx
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)

        params = llama_cpp.llama_model_default_params()
        # False only where this build's AMX kernels would crash the process (amx_check).
        self.uses_extra_buffers = extra_buffers_usable(self.path)
        params.use_extra_bufts = self.uses_extra_buffers
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ItscaleError(f"llama.cpp could not load {self.path}: is it a valid GGUF model?")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.features_enabled = False
        # The layers every generated step carries the state of, when features are on; the
        # observer reads inner blocks (itscale.lm.layers) and exists only once one is asked for.
        self.feature_layers: tuple[str, ...] = (FINAL,)
        self._observer: LayerObserver | None = None
        self._block_rows: dict[str, np.ndarray] = {}
        self._entry_rows: np.ndarray | None = None

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch  # one micro-batch per decode: a failed decode changes nothing
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = kv_layout == "unified"  # forks share cells instead of copying them
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        # Hidden states beside the logits, per token, when features are on (`enable_features`):
        # no pooling, and embeddings switched on only for decodes that need them.
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        cparams.embeddings = False
        self._cparams = cparams
        blocks = [b for b in layer_names(feature_layers, self.n_layer) if b != FINAL]
        if blocks:
            self._observer = LayerObserver(self.n_embd, blocks)
            cparams.cb_eval = self._observer.callback
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ItscaleError(f"llama.cpp could not create a context with n_ctx={n_ctx}: lower n_ctx")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

        self._pieces: dict[int, bytes] = {}
        self.template = ChatTemplate(
            chat_template or self._metadata("tokenizer.chat_template") or CHATML,
            bos_token=self._special_text(llama_cpp.llama_vocab_bos(self._vocab)),
            eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)),
        )
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

        self._lock = threading.Lock()
        self._free_slots = list(range(n_seq_max - 1, -1, -1))
        self._slot_owner: dict[int, LlamaBranch] = {}
        self._pending_ops: list[tuple[int, int, bool]] = []  # (slot, p0, free slot after)
        self._clock = itertools.count(1)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        # Counters for benchmarks and tests. A round is one pass of the engine thread over
        # its ready work; the *_seconds are the thread's busy time (llama_decode, sampling,
        # detokenising), split by whether the round generated tokens or only evaluated
        # (prompts, fork prefixes, reward scoring), so callers can compare their wall time
        # with the engine's own time for the same batches.
        self.stats = {
            "decode_calls": 0,
            "evaluated_tokens": 0,
            "generated_tokens": 0,
            "kv_copies": 0,
            "evictions": 0,
            "generating_rounds": 0,
            "generating_seconds": 0.0,
            "evaluating_seconds": 0.0,
        }
        self._thread = threading.Thread(target=self._run, name="itscale-llamacpp", daemon=True)
        self._thread.start()
        if feature_layers:
            self.enable_features(feature_layers)

    # ----------------------------------------------------------------- tokens and text

    def _metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n > 0 else None

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", "replace")

    def _piece(self, token: int, special: bool = False) -> bytes:
        if not special and token in self._pieces:
            return self._pieces[token]
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        piece = buf.raw[: max(n, 0)]
        if not special:
            self._pieces[token] = piece
        return piece

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Tokens of `text`; with `special`, control tokens such as <|im_end|> are parsed."""
        data = text.encode()
        capacity = len(data) + 8
        buf = (self._ll.llama_token * capacity)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, special)
        if n < 0:
            raise ItscaleError(f"tokenization needs {-n} tokens, more than expected")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens = self.tokenize(text)
        bos = self._ll.llama_vocab_bos(self._vocab)
        if self._add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    # ----------------------------------------------------------------- LanguageModel API

    async def start(self, prompt: Prompt) -> LlamaBranch:
        tokens = self._prompt_tokens(self.template.prompt_text(prompt))
        if len(tokens) >= self.seq_capacity - 8:
            raise UsageError(
                f"the prompt has {len(tokens)} tokens, more than a sequence of this engine holds "
                f"({self.seq_capacity}): raise {'seq_ctx' if self.kv_layout == 'per-sequence' else 'n_ctx'}"
            )
        return LlamaBranch(self, prompt, tokens, prompt_len=len(tokens))

    def fork(self, branch: Branch, steps: int | None = None) -> LlamaBranch:
        parent = self._own(branch)
        with self._lock:
            if parent.released:
                raise ItscaleError("internal error: fork of a released branch")
            k = len(parent.steps) if steps is None else steps
            n = parent.step_ends[k - 1] if k > 0 else parent.prompt_len
            child = LlamaBranch(self, parent.prompt, parent.tokens[:n], parent.prompt_len)
            child.steps = parent.steps[:k]
            child.step_ends = parent.step_ends[:k]
            child.finished = parent.finished and k == len(parent.steps)
            child.decoder.setstate(parent.decoder.getstate())
            child.source, child.source_len = parent, n
            parent.children.append(child)
            return child

    def release(self, branch: Branch) -> None:
        branch = self._own(branch)
        with self._lock:
            if branch.released:
                return
            branch.released = True
            if not branch.busy:  # else released when its work finishes
                self._release_locked(branch)

    def _release_locked(self, branch: LlamaBranch) -> None:
        """Frees a released branch's slot, or hands it to its longest pending fork (which
        then needs no copy); the other forks copy from that heir. Lock held."""
        source = branch.source
        if source is not None:
            branch.source = None
            if branch in source.children:
                source.children.remove(branch)
            if source.released and not source.children and not source.busy:
                self._release_locked(source)
        if branch.slot is None:
            return
        live = [c for c in branch.children if not c.released]
        branch.children = []
        if live:
            heir = max(live, key=lambda c: c.source_len)
            keep = min(branch.kv_len, heir.source_len, len(heir.tokens) - 1)
            self._pending_ops.append((branch.slot, keep, False))
            heir.slot, heir.kv_len, heir.source = branch.slot, keep, None
            heir.unattributed += branch.unattributed
            self._slot_owner[heir.slot] = heir
            for other in live:
                if other is not heir:
                    other.source = heir
                    heir.children.append(other)
        else:
            self._pending_ops.append((branch.slot, 0, True))
            self._slot_owner.pop(branch.slot, None)
        branch.slot, branch.kv_len = None, 0

    async def extend(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[StepOutput]:
        works = []
        for i, b in enumerate(branches):
            branch = self._extendable(b)
            cap = settings.step_token_cap if max_new_tokens is None else min(settings.step_token_cap, max_new_tokens[i])
            works.append(_Generate(branch, settings=settings, rng=np.random.default_rng(seeds[i]), cap=max(1, cap)))
        return await self._submit(works)

    async def extend_to_end(
        self,
        branches: Sequence[Branch],
        settings: StepSettings,
        seeds: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        stop: Callable[[str], bool],
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[list[StepOutput]]:
        """Extends each branch step after step, in this engine's thread, until the model
        ends its answer, `stop(step text)` is true, its `max_new_tokens[i]` are spent or
        its `seeds[i]` (one per step) run out. A branch that ends a step starts its next
        one in the following round, whatever the other branches are doing, so no branch
        waits for another's step and the batch composition never depends on timing.

        `on_text(i, text)`, if given, receives branch i's text as it is generated (whole
        characters); it is called from the engine thread and must only hand the text on
        (for example with `loop.call_soon_threadsafe`)."""
        works = []
        for i, b in enumerate(branches):
            branch = self._extendable(b)
            if not seeds[i]:
                raise ItscaleError("internal error: extend_to_end needs a seed for each step")
            allowance = max(1, max_new_tokens[i])
            works.append(
                _Generate(
                    branch,
                    settings=settings,
                    rng=np.random.default_rng(seeds[i][0]),
                    cap=min(settings.step_token_cap, allowance),
                    next_seeds=list(seeds[i][1:]),
                    allowance=allowance,
                    stop=stop,
                    steps=[],
                    on_text=(lambda text, i=i: on_text(i, text)) if on_text is not None else None,
                )
            )
        return await self._submit(works)

    async def next_token_logprobs(
        self, branches: Sequence[Branch], suffixes: Sequence[list[int]], candidates: list[int]
    ) -> list[tuple[list[float], int]]:
        """For each branch continued by its suffix tokens: the log-probabilities of the
        candidate next tokens, and the number of tokens evaluated to get them. The branch
        itself is untouched: the suffix is evaluated on a fork of its KV cells."""
        forks = []
        for b, suffix in zip(branches, suffixes, strict=True):
            child = self.fork(self._own(b))
            child.tokens.extend(suffix)
            forks.append(child)
        try:
            return await self._submit([_Score(f, candidates=candidates) for f in forks])
        finally:
            for f in forks:
                self.release(f)

    # ----------------------------------------------------------------- hidden states

    def enable_features(self, layers: Sequence[str | int] = (FINAL,)) -> None:
        """From now on every generated step carries the generator's hidden states after the
        step's last token (`StepOutput.features`, a dict by layer name): "final" (after the
        output norm) always, and the outputs of the blocks named in `layers` ("12": the
        residual stream after block 12 of 0..n_layer-1). A learned reward reads them without
        a decode of its own; the rewards that need them turn them on. Layers add up: a
        second reward's layers join the first's.

        What it costs: a copy of n_embd floats per layer and step, and per step that is not
        a rollout's next (a lockstep search's step) one token decoded twice, about 1/50 of
        generation. Inner blocks need llama.cpp's graph callback, which a context gets only
        when it is created: the first time one is asked for, the engine recreates its
        context, which it can do only while no branch holds KV cells (so enable features
        before generating, as the rewards do when they are made), and every decode then
        pays a Python call per graph node (docs/benchmarks.md)."""
        names = layer_names(layers, self.n_layer)
        blocks = tuple(dict.fromkeys((*self.feature_layers, *names)))
        new_blocks = [b for b in blocks if b != FINAL and (self._observer is None or b not in self._observer.blocks)]
        if new_blocks:
            self._control(lambda busy: self._observe_blocks([b for b in blocks if b != FINAL], busy))
        self.feature_layers = (FINAL, *(b for b in blocks if b != FINAL))
        self.features_enabled = True

    def _observe_blocks(self, blocks: list[str], busy: bool) -> None:
        """On the engine thread: capture these blocks, recreating the context with the
        observer installed if it has none."""
        if self._observer is not None:
            self._observer.watch(blocks)
            return
        if busy or self._slot_owner:
            raise UsageError(
                "inner-layer features must be turned on before the engine holds any sequence: "
                "make the reward that needs them before generating, or open the model with "
                "LlamaCppModel(..., feature_layers=[...])"
            )
        observer = LayerObserver(self.n_embd, blocks)
        self._cparams.cb_eval = observer.callback
        ctx = self._ll.llama_init_from_model(self._model, self._cparams)
        if not ctx:
            raise ItscaleError("llama.cpp could not create a context with the layer observer")
        self._ll.llama_free(self._ctx)
        self._ctx, self._memory, self._observer = ctx, self._ll.llama_get_memory(ctx), observer
        self._pending_ops.clear()
        self._free_slots = list(range(self.n_seq_max - 1, -1, -1))

    def _control(self, action: Callable[[bool], None]) -> None:
        """Runs `action(busy)` on the engine thread between rounds and waits for it; `busy`
        says whether work is in flight."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Control(action, done))
        done.result()

    @property
    def sha256(self) -> str:
        """The GGUF file's sha256: what a learned reward head is tied to."""
        from itscale.lm.models import model_sha256

        return model_sha256(self.path)

    async def features(self, branches: Sequence[Branch]) -> list[tuple[dict[str, np.ndarray], int]]:
        """The hidden states after the last token of each branch (every enabled layer), as a
        generated step records them, by evaluating its tokens on a fork (reusing the KV cells
        of its nearest cached ancestor), and the tokens that cost. The branches themselves
        are not changed."""
        self.enable_features(self.feature_layers)
        forks = [self.fork(self._own(b)) for b in branches]
        try:
            return await self._submit([_Features(f) for f in forks])
        finally:
            for f in forks:
                self.release(f)

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_CLOSE)
        self._thread.join()
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)
        self._ll.llama_model_free(self._model)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()

    @property
    def cached_branches(self) -> int:
        """Branches holding KV cells now (0 when every branch has been released)."""
        with self._lock:
            return len(self._slot_owner)

    def _own(self, branch: Branch) -> LlamaBranch:
        if not isinstance(branch, LlamaBranch) or branch.owner is not self:
            raise ItscaleError("internal error: a branch from another backend was passed to the engine")
        return branch

    def _extendable(self, branch: Branch) -> LlamaBranch:
        owned = self._own(branch)
        if owned.finished:
            raise ItscaleError("internal error: a finished branch cannot be extended")
        return owned

    async def _submit(self, works: list[_Work]) -> list:
        if self._closed:
            raise ItscaleError("the engine is closed")
        if not works:
            return []
        self._inbox.put(works)
        return list(await asyncio.gather(*(asyncio.wrap_future(w.future) for w in works)))

    # ----------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        active: list[_Work] = []
        while True:
            try:
                item = self._inbox.get(block=not active)
                while True:
                    if item is _CLOSE:
                        for w in active:
                            _settle(w.future, error=ItscaleError("the engine was closed"))
                        return
                    if isinstance(item, _Control):
                        item.run(busy=bool(active))
                    else:
                        active.extend(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                active = self._round(active)
            except Exception as error:  # never leave callers waiting on a dead thread
                log.exception("engine round failed")
                with self._lock:
                    for w in active:
                        w.branch.busy = w.branch.preparing = False
                        _settle(w.future, error=error)
                active = []

    def _round(self, active: list[_Work]) -> list[_Work]:
        with self._lock:
            for w in [w for w in active if w.future.cancelled()]:
                # The caller gave up (its task was cancelled): free the branch for reuse.
                w.branch.busy = w.branch.preparing = False
                if w.branch.released:
                    self._release_locked(w.branch)
            active = [w for w in active if not w.future.cancelled()]
            self._apply_pending_ops()
            active = active + self._materialise(active)
            ready = [w for w in active if w.ready and w.todo]
        # Counted before decoding: a caller woken by this round's results sees it counted.
        generating = any(isinstance(w, _Generate) for w in ready)
        self.stats["generating_rounds"] += generating
        started = time.perf_counter()
        self._decode(ready)
        if ready:
            self.stats["generating_seconds" if generating else "evaluating_seconds"] += time.perf_counter() - started
        # Cancelled work stays listed until the next round frees its branch.
        return [w for w in active if not w.future.done() or w.future.cancelled()]

    def _apply_pending_ops(self) -> None:
        for slot, p0, free in self._pending_ops:
            self._ll.llama_memory_seq_rm(self._memory, slot, p0, -1)
            if free:
                self._free_slots.append(slot)
        self._pending_ops.clear()
        if not self._slot_owner and len(self._free_slots) == self.n_seq_max:
            # Nothing is cached: start from an empty cache. Where cells sit in the unified
            # cache changes the rounding of attention, so a run that starts on an idle
            # engine is reproducible only if every such run starts from the same layout.
            self._ll.llama_memory_clear(self._memory, True)
            self._free_slots.sort(reverse=True)

    def _materialise(self, active: list[_Work]) -> list[_Work]:
        """Gives every waiting work's branch a slot; returns new preparation work."""
        new_work: list[_Work] = []
        waiting = [w for w in active if not w.ready]
        chains = {id(w): self._uncached_ancestors(w.branch) for w in waiting}
        sharers: dict[int, int] = {}
        for chain in chains.values():
            for node in chain:
                sharers[id(node)] = sharers.get(id(node), 0) + 1
        for w in waiting:
            chain = chains[id(w)]
            shared = next((n for n in reversed(chain) if n.preparing or sharers[id(n)] > 1), None)
            if shared is not None:
                if not shared.preparing:
                    shared.preparing = True
                    prep = _Prepare(shared)
                    self._place(prep)
                    new_work.append(prep)
                continue
            self._place(w)
        return new_work

    def _uncached_ancestors(self, branch: LlamaBranch) -> list[LlamaBranch]:
        """Ancestors (nearest first) between `branch` and the nearest cached one."""
        chain = []
        node = branch.source
        while node is not None and node.slot is None:
            chain.append(node)
            node = node.source
        return chain

    def _place(self, w: _Work) -> None:
        """Gives `w.branch` a slot: copy the longest cached prefix, queue the rest."""
        b = w.branch
        if b.slot is None:
            source, shared = self._cached_prefix(b)
            if source is not None:  # never evict the branch we are about to copy from
                was_busy, source.busy = source.busy, True
            try:
                b.slot = self._allocate_slot(b)
            finally:
                if source is not None:
                    source.busy = was_busy
            if shared > 0:
                if self.kv_layout == "unified":
                    self._ll.llama_memory_seq_cp(self._memory, source.slot, b.slot, 0, shared)
                else:  # llama.cpp copies whole per-sequence buffers: copy, then cut to the prefix
                    self._ll.llama_memory_seq_cp(self._memory, source.slot, b.slot, -1, -1)
                    self._ll.llama_memory_seq_rm(self._memory, b.slot, shared, -1)
                self.stats["kv_copies"] += 1
                b.unattributed += source.unattributed
                source.unattributed = 0
            b.kv_len = shared
            self._detach(b)
        w.evaluated += b.unattributed
        b.unattributed = 0
        b.busy = True
        b.last_used = next(self._clock)
        if isinstance(w, _Prepare):
            w.todo = b.tokens[b.kv_len : len(b.tokens) - 1]  # a prefix for forks: no logits
        else:
            w.todo = b.tokens[b.kv_len :]
        # The pending token of a branch that has steps was generated (and counted) by the
        # previous step; everything else fed now is evaluated prompt or prefix.
        pending_was_generated = isinstance(w, _Generate) and len(b.tokens) > b.prompt_len
        w.evaluated += len(w.todo) - (1 if pending_was_generated and w.todo else 0)
        w.ready = True
        if isinstance(w, _Prepare) and not w.todo:
            self._finish(w, None)

    @staticmethod
    def _cached_prefix(b: LlamaBranch) -> tuple[LlamaBranch | None, int]:
        """The nearest ancestor holding KV cells that `b` can copy, and how many."""
        limit, node = len(b.tokens) - 1, b
        while node.slot is None and node.source is not None:
            limit = min(limit, node.source_len)
            node = node.source
        if node is b or node.slot is None:
            return None, 0
        return node, min(limit, node.kv_len)

    def _detach(self, b: LlamaBranch) -> None:
        """`b` has its own cells now and no longer needs its source."""
        source, b.source = b.source, None
        if source is None:
            return
        if b in source.children:
            source.children.remove(b)
        if source.released and not source.children and not source.busy:
            self._release_locked(source)

    def _finish(self, w: _Work, result: object) -> None:
        """Resolves a work; its branch stops being busy in the same critical section."""
        b = w.branch
        b.busy = False
        if isinstance(w, _Prepare):
            b.preparing = False
            b.unattributed += w.evaluated
        if b.released:
            self._release_locked(b)
        _settle(w.future, result)

    def _allocate_slot(self, owner: LlamaBranch) -> int:
        if not self._free_slots:
            self._evict(reason="no free sequence slot (raise n_seq_max)")
        slot = self._free_slots.pop()
        self._slot_owner[slot] = owner
        return slot

    def _evict(self, reason: str) -> None:
        idle = [b for b in self._slot_owner.values() if not b.busy]
        if not idle:
            raise ItscaleError(f"the engine is full: {reason}")
        victim = min(idle, key=lambda b: b.last_used)
        slot = victim.slot
        self._ll.llama_memory_seq_rm(self._memory, slot, -1, -1)
        del self._slot_owner[slot]
        victim.slot, victim.kv_len = None, 0
        self._free_slots.append(slot)
        self.stats["evictions"] += 1

    def _decode(self, ready: list[_Work]) -> None:
        if not ready:
            return
        if not self.features_enabled:
            self._decode_group(ready, embeddings=False)
            return
        # Hidden states are read where a single token is decoded with embeddings switched on.
        # llama.cpp then makes every token of the batch an output (full-vocabulary logits for
        # each), so prompt and prefix chunks are decoded apart with embeddings off, and a work
        # that wants the state at the end of its chunk holds its last token back for the
        # second decode of the same round.
        chunks = [w for w in ready if not (w.needs_features and len(w.todo) == 1)]
        if chunks:
            self._decode_group(chunks, embeddings=False)
        single = [w for w in ready if w.needs_features and len(w.todo) == 1 and not w.future.done()]
        if single:
            self._decode_group(single, embeddings=True)

    def _decode_group(self, ready: list[_Work], embeddings: bool) -> None:
        """One llama_decode of the works' pending tokens (fewer when the KV cache is full),
        then the works that are done are resolved or advanced."""
        if self.features_enabled:
            self._ll.llama_set_embeddings(self._ctx, embeddings)
        # Generation (one token each) first, then evaluation chunks, up to n_batch tokens.
        ready.sort(key=lambda w: len(w.todo))
        while True:
            plan, n = [], 0
            for w in ready:
                held_back = 1 if (w.needs_features and not embeddings and self.features_enabled) else 0
                take = min(len(w.todo) - held_back, self.n_batch - n)
                if take <= 0:
                    if self.n_batch - n <= 0:
                        break
                    continue
                plan.append((w, n, take))
                n += take
            if not plan:
                return
            batch = self._batch
            for w, start, take in plan:
                pos0 = w.branch.kv_len
                last_needed = take == len(w.todo) and w.needs_logits
                for j in range(take):
                    i = start + j
                    batch.token[i] = w.todo[j]
                    batch.pos[i] = pos0 + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = w.branch.slot
                    batch.logits[i] = 1 if (last_needed and j == take - 1) else 0
            batch.n_tokens = n
            observing = embeddings and self._observer is not None
            if observing:
                self._observer.start()
            status = self._ll.llama_decode(self._ctx, batch)
            captured = self._observer.stop() if observing else {}
            self.stats["decode_calls"] += 1
            if status == 0:
                if observing:
                    self._place_block_rows(captured, n)
                break
            if status != 1:
                raise ItscaleError(f"llama_decode failed with status {status}")
            # No room in the KV cache: evict an idle branch (in a unified cache its cells are
            # everyone's room; per sequence they are only its own), else decode fewer sequences.
            if self.kv_layout == "unified":
                with self._lock:
                    try:
                        self._evict(reason="")
                        continue
                    except ItscaleError:
                        pass
            if len(ready) > 1:
                ready = ready[: len(ready) // 2]
                continue
            raise ItscaleError(
                f"the KV cache is full (n_ctx={self.n_ctx} cells shared by all sequences): "
                "raise n_ctx, or lower the budget or max_tokens"
                if self.kv_layout == "unified"
                else f"a sequence outgrew its {self.seq_capacity} KV cells: raise seq_ctx, or lower max_tokens"
            )
        self.stats["evaluated_tokens"] += n
        with self._lock:
            for w, start, take in plan:
                w.branch.kv_len += take
                w.todo = w.todo[take:]
                if w.todo:
                    continue
                if isinstance(w, _Prepare):
                    self._finish(w, None)
                    continue
                index = start + take - 1
                features = self._features_of(index) if embeddings else None
                if isinstance(w, _Features):
                    self._finish(w, (features, w.evaluated))
                    continue
                row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,))
                if isinstance(w, _Score):
                    self._finish(w, (candidate_logprobs(row, w.candidates), w.evaluated))
                else:
                    self._advance(w, row, features)

    def _hidden_state(self, index: int) -> np.ndarray:
        """The final hidden state of batch entry `index` (a view, valid until the next decode)."""
        pointer = self._ll.llama_get_embeddings_ith(self._ctx, index)
        if not pointer:
            raise ItscaleError("llama.cpp returned no hidden state for a token decoded with embeddings on")
        return np.ctypeslib.as_array(pointer, shape=(self.n_embd,))

    def _place_block_rows(self, captured: dict[str, np.ndarray], n: int) -> None:
        """Keeps the inner blocks' rows of the decode just made, and which row is whose
        (every entry is an output when embeddings are on)."""
        finals = np.stack([self._hidden_state(i) for i in range(n)])
        self._entry_rows = rows_by_entry(captured, finals)
        self._block_rows = {layer: rows for layer, rows in captured.items() if not layer.startswith(FINAL)}

    def _features_of(self, index: int) -> dict[str, np.ndarray]:
        """Every enabled layer's state for batch entry `index` of the last decode (copies)."""
        features = {FINAL: self._hidden_state(index).copy()}
        if self._block_rows:
            row = self._entry_rows[index]
            for layer in self.feature_layers[1:]:
                features[layer] = self._block_rows[layer][row].copy()
        return features

    def _advance(self, w: _Generate, logits: np.ndarray, features: dict[str, np.ndarray] | None = None) -> None:
        """Samples the next token of a generating work and decides whether its step ends.

        `features` (when features are on) are the hidden states these logits came from: the
        states after the token just fed. A step's features are the state after its last
        token: for a step that ended with end of turn, the state that predicted it (this
        decode); for any other, the state after its last sampled token, which the next
        decode computes: a rollout's next step does that anyway; a single step, or a
        rollout's last, feeds it once more and then gives the cell back, so the token stays
        pending as after any step."""
        b, s = w.branch, w.settings
        if w.awaiting_features is not None:  # this decode fed the last token of a finished step
            w.awaiting_features.features = features
            w.awaiting_features = None
            if w.closing:
                b.kv_len -= 1
                self._ll.llama_memory_seq_rm(self._memory, b.slot, b.kv_len, -1)
                self._finish(w, w.steps if w.steps is not None else w.closing_output)
                return
        token, logprob, certainty = sample_token(logits, s.temperature, s.top_p, w.rng)
        self.stats["generated_tokens"] += 1
        end = None
        if self._ll.llama_vocab_is_eog(self._vocab, token):
            b.finished = True
            end = "eos"
        else:
            w.new_tokens += 1
            w.logprob += logprob
            w.certainty += certainty
            b.tokens.append(token)
            piece = self._piece(token)
            w.step_bytes += piece
            if w.on_text is not None:
                if w.text_decoder is None:
                    w.text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
                if text := w.text_decoder.decode(piece):
                    w.on_text(text)
            delimiter = s.delimiter if isinstance(s.delimiter, int) else s.delimiter.encode()
            end = step_end(w.step_bytes, piece, delimiter, w.new_tokens, w.cap)
            if len(b.tokens) >= self.seq_capacity - 1:
                end = "length"
            if end in ("delimiter", "step_cap") and _incomplete_utf8(w.step_bytes) and w.new_tokens < w.cap + 4:
                end = None  # finish the character before ending the step
        if end is None:
            w.todo = [token]
            return
        text = b.decoder.decode(bytes(w.step_bytes), final=end == "eos")
        b.steps.append(text)
        b.step_ends.append(len(b.tokens))
        n = w.new_tokens
        output = StepOutput(
            text=text,
            tokens=n + (1 if end == "eos" else 0),
            end=end,
            prompt_tokens=w.evaluated,
            logprob=w.logprob if n else None,
            self_certainty=w.certainty / n if n else None,
            features=features if end == "eos" else None,
        )
        deferred = w.needs_features and end != "eos"  # the state after `token` comes next decode
        if deferred:
            w.awaiting_features = output
        if w.steps is not None:
            w.steps.append(output)
            w.allowance -= output.tokens
        if w.steps is None or not w.next_seeds or ends_rollout(output, w.allowance, w.stop):
            if deferred:
                w.closing, w.closing_output, w.todo = True, output, [token]
            else:
                self._finish(w, output if w.steps is None else w.steps)
            return
        # The next step, in the same work: its pending first token is this step's last.
        w.rng = np.random.default_rng(w.next_seeds.pop(0))
        w.cap = min(s.step_token_cap, w.allowance)
        w.new_tokens, w.step_bytes, w.logprob, w.certainty, w.evaluated = 0, bytearray(), 0.0, 0.0, 0
        w.todo = [token]


def _incomplete_utf8(data: bytearray) -> bool:
    """Whether `data` ends inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            expected = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return expected > back
    return False
