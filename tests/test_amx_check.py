"""The AMX check: a build whose AMX kernels crash the process loads models without extra
buffer types instead of dying at the first decode. This machine's build has no AMX, so the
crash is a real segmentation fault in a real child process standing in for the probe."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from itscale.lm import amx_check
from itscale.lm.models import model_path

SEGFAULT = "import ctypes; ctypes.string_at(0)"


def test_only_a_child_killed_by_a_signal_counts_as_a_crash() -> None:
    assert not amx_check.survives(SEGFAULT)
    assert amx_check.survives("import sys; sys.exit(3)")  # a failure, not evidence against the build
    assert amx_check.survives("pass")


def test_the_probe_loads_the_model_and_decodes_with_default_buffers(tmp_path) -> None:
    run = [sys.executable, "-c", amx_check.PROBE]
    assert subprocess.run([*run, str(model_path("smollm2-135m"))], check=False).returncode == 0
    not_a_model = tmp_path / "x.gguf"
    not_a_model.write_bytes(b"not a model")
    assert subprocess.run([*run, str(not_a_model)], capture_output=True, check=False).returncode == 2


def test_a_build_without_amx_is_not_probed(monkeypatch) -> None:
    assert not amx_check.build_has_amx()  # the project's set-up builds for x86-64-v3
    monkeypatch.setattr(amx_check, "survives", lambda *a, **k: pytest.fail("probed a build without AMX"))
    assert amx_check.extra_buffers_usable(model_path("smollm2-135m"))


@pytest.fixture
def crashing_amx(monkeypatch, tmp_path):
    """This build as if it had AMX kernels that crash: the probe is a real segfaulting child."""
    monkeypatch.setenv("ITSCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(amx_check, "build_has_amx", lambda: True)
    monkeypatch.setattr(amx_check, "PROBE", SEGFAULT)
    return tmp_path


async def test_a_crashing_build_loads_without_extra_buffers_and_still_generates(crashing_amx, caplog) -> None:
    from itscale.lm.base import StepSettings
    from itscale.lm.llamacpp import LlamaCppModel
    from itscale.types import Prompt

    with caplog.at_level(logging.WARNING, logger="itscale.lm.amx_check"):
        engine = LlamaCppModel("smollm2-135m", n_ctx=1024, n_seq_max=2, n_threads=1)
    try:
        assert not engine.uses_extra_buffers
        assert "CMAKE_ARGS=-DGGML_NATIVE=OFF" in caplog.text
        root = await engine.start(Prompt.of("What is 12 * 7?"))
        (step,) = await engine.extend([root], StepSettings(temperature=0.0, max_step_tokens=8), [0])
        assert step.text.strip() and step.tokens > 0
        engine.release(root)
    finally:
        engine.shutdown()


def test_the_verdict_is_probed_once_per_machine_and_build(crashing_amx, monkeypatch) -> None:
    calls = []
    probe = amx_check.survives
    monkeypatch.setattr(amx_check, "survives", lambda *a, **k: calls.append(a) or probe(*a, **k))
    path = model_path("smollm2-135m")
    assert not amx_check.extra_buffers_usable(path)
    assert not amx_check.extra_buffers_usable(path)
    assert len(calls) == 1
    (verdict,) = (crashing_amx / "checks").glob("amx-*.json")
    assert json.loads(verdict.read_text())["usable"] is False
    assert not list((crashing_amx / "checks").glob(".*.tmp"))
