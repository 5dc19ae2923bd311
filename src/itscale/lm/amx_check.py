"""Whether llama.cpp's AMX kernels run on this machine, checked once in a child process.

A llama.cpp built with `-march=native` on a Xeon that advertises AMX puts the weights in an
AMX buffer and multiplies them with tile instructions. Some VMs (Firecracker, seen here)
advertise AMX without enabling it: the first `llama_decode` dies with SIGSEGV at
`ldtilecfg`, taking the whole process with it, with nothing a user could act on. Loading the
model with `use_extra_bufts = False` keeps the weights in plain CPU buffers and runs fine
(slower: weight repacking goes too).

So, for a build that has AMX only, a child process loads the model with the default buffers
and decodes a few tokens; if a signal kills it, the engine loads without extra buffers and
says why. The verdict is kept in the cache directory, keyed by the llama.cpp library, the
CPU and the kernel, so the check costs about a second once per machine and build. The
project's own set-up builds llama.cpp without AMX (see the Makefile); this is for everyone
who installs with plain pip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

from itscale.files import write_atomic
from itscale.lm.models import cache_dir

log = logging.getLogger(__name__)

# Loads the model with llama.cpp's default (extra) buffer types and decodes four tokens.
PROBE = """
import ctypes, sys
import llama_cpp
llama_cpp.llama_backend_init()
silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
llama_cpp.llama_log_set(silence, ctypes.c_void_p(0))
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
if not model:
    sys.exit(2)
params = llama_cpp.llama_context_default_params()
params.n_ctx, params.n_threads, params.n_threads_batch = 256, 1, 1
ctx = llama_cpp.llama_init_from_model(model, params)
tokens = (llama_cpp.llama_token * 4)(1, 2, 3, 4)
sys.exit(llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 4)))
"""


def build_has_amx() -> bool:
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def extra_buffers_usable(model_path: Path) -> bool:
    """False when this llama.cpp build's AMX kernels crash on this machine."""
    if not build_has_amx():
        return True
    verdict_file = cache_dir() / "checks" / f"amx-{_machine_and_build_key()}.json"
    try:
        usable = bool(json.loads(verdict_file.read_text())["usable"])
    except (OSError, ValueError, KeyError):
        usable = survives(PROBE, str(model_path))
        write_atomic(verdict_file, json.dumps({"usable": usable, "probed_with": str(model_path)}))
    if not usable:
        log.warning(
            "llama.cpp's AMX kernels crash on this machine (the CPU advertises AMX, the VM does not "
            "enable it), so models load without extra buffer types, which is slower. A build without "
            "AMX avoids this: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall --no-cache-dir "
            "llama-cpp-python"
        )
    return usable


def survives(code: str, *args: str, timeout: float = 300.0) -> bool:
    """Runs `code` in a child Python; False only if a signal killed it. Any other failure
    (a bad model file, a missing package) is not evidence against the build, and the
    engine's own load reports it properly."""
    child = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=timeout, check=False)
    return child.returncode >= 0


def _machine_and_build_key() -> str:
    import llama_cpp

    library = Path(llama_cpp.__file__).parent / "lib"
    stamps = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in library.glob("libggml*"))
    try:
        cpu = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("model name", "flags"))
        ][:2]
    except OSError:
        cpu = [platform.processor()]
    return hashlib.sha256("\n".join([*stamps, *cpu, platform.release()]).encode()).hexdigest()[:16]
