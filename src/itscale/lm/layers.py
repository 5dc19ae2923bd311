"""Hidden states of inner layers, read during llama.cpp's own graph evaluation.

llama.cpp's API returns one hidden state per output token: the final one, after the output
norm (`llama_get_embeddings_ith`). A learned reward may predict better from an inner layer
(docs/rewards.md measures which), and llama.cpp computes those anyway: its scheduler can
call back for every tensor of the graph (`cb_eval` in the context parameters), asking first
whether the tensor is wanted and then handing it over once computed. Block K's output, the
residual stream after it, is named `l_out-K`.

Feature layers are named by strings: "final" (the state the API returns) or a block index
("12"). `LayerObserver` is the callback. It is installed when the context is created (the
engine recreates an idle context to install it) and reads only while `capturing` is set:
the engine sets that for the decodes whose states it keeps. Otherwise the callback answers
"not wanted" at once, which costs a Python call per graph node (about 800 per decode for a
24-block model; measured in docs/benchmarks.md).

The rows of a captured tensor are in llama.cpp's micro-batch order, which need not be the
batch's (a per-sequence KV cache splits a batch by sequence). The final norm's output is
captured beside them (`result_norm`, renamed `result_embd_pooled` when the graph pools the
embeddings, even with pooling "none"): its rows are the states `llama_get_embeddings_ith`
returns per batch entry, so matching the two gives each entry's row exactly.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np

from itscale.errors import ItscaleError, UsageError

FINAL = "final"
# The final state's tensor, by the names llama.cpp's graphs give it.
_FINAL_NAMES = {b"result_norm": "final:norm", b"result_embd_pooled": "final:pooled"}


def layer_names(layers: Iterable[str | int], n_layer: int) -> tuple[str, ...]:
    """The layers as canonical names ("final", "0" ... str(n_layer - 1)), in order, once each;
    a name that is neither is a UsageError saying what is allowed."""
    names: list[str] = []
    for layer in layers:
        name = str(layer).strip()
        if name != FINAL and not (name.isdigit() and 0 <= int(name) < n_layer):
            raise UsageError(
                f"unknown feature layer {layer!r}: use 'final' (the state after the output norm) "
                f"or a block index from 0 to {n_layer - 1}"
            )
        name = name if name == FINAL else str(int(name))
        if name not in names:
            names.append(name)
    return tuple(names)


def _ggml():
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


class LayerObserver:
    """llama.cpp's eval callback: copies the outputs of the chosen blocks (and the final
    norm, to place their rows) while `capturing` is set."""

    def __init__(self, n_embd: int, blocks: Iterable[str]):
        import llama_cpp

        self.n_embd = n_embd
        self.capturing = False
        self._lib = _ggml()
        self._wanted: dict[bytes, str] = {}
        self._captured: dict[str, list[np.ndarray]] = {}
        self.watch(blocks)
        # The C function pointer must live as long as the context that calls it.
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._observe)

    def watch(self, blocks: Iterable[str]) -> None:
        """Capture these blocks (names from `layer_names`, "final" excluded) from now on."""
        self._wanted = {f"l_out-{b}".encode(): b for b in blocks if b != FINAL} | _FINAL_NAMES

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(name for name in self._wanted.values() if not name.startswith(FINAL))

    def _observe(self, tensor: int, ask: bool, _user: int) -> bool:
        if not self.capturing:
            return False
        name = self._lib.ggml_get_name(tensor)
        if ask:
            return name in self._wanted
        layer = self._wanted.get(name)
        if layer is not None:
            size = self._lib.ggml_nbytes(tensor)
            rows = np.empty(size // 4, dtype=np.float32)
            self._lib.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, size)
            self._captured.setdefault(layer, []).append(rows.reshape(-1, self.n_embd))
        return True

    def start(self) -> None:
        self._captured = {}
        self.capturing = True

    def stop(self) -> dict[str, np.ndarray]:
        """Ends a capture; the rows of every captured tensor, micro-batches concatenated."""
        self.capturing = False
        captured, self._captured = self._captured, {}
        return {layer: np.concatenate(parts) for layer, parts in captured.items()}


def rows_by_entry(captured: dict[str, np.ndarray], final_states: np.ndarray) -> np.ndarray:
    """For each batch entry (its final state from the API, one row each), the row of the
    captured tensors that belongs to it: the row of the captured final state equal to its
    own. Equal states are interchangeable (the same context gives every layer the same state)."""
    for name in sorted(n for n in captured if n.startswith(FINAL)):
        rows = captured[name]
        if rows.shape == final_states.shape and np.array_equal(rows, final_states):
            return np.arange(len(final_states))
        where = {row.tobytes(): i for i, row in enumerate(rows)}
        found = [where.get(state.tobytes()) for state in final_states]
        if None not in found:
            return np.asarray(found)
    raise ItscaleError(
        "internal error: the captured layers' rows do not match the states llama.cpp returned "
        "(its graph may have changed: use the 'final' feature layer)"
    )
