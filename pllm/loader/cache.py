"""Where converted models are kept on disk, and the key that names each one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_DIR_ENV = "PLLM_CACHE_DIR"

# Bytes hashed from the start, middle and end of a file. The GGUF header (all
# metadata, tensor names, shapes and quantization types) sits at the start, so
# together with the size this tells files apart without reading gigabytes.
_SAMPLE_BYTES = 4 << 20


def cache_root() -> Path:
    """``$PLLM_CACHE_DIR`` if set, else ``~/.cache/pllm``; read on every call."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pllm"


def file_fingerprint(path: str | os.PathLike) -> str:
    """A short hex key for a file's content: sha256 of its size and sampled bytes."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 3 * _SAMPLE_BYTES:
            digest.update(f.read())
        else:
            for offset in (0, size // 2, size - _SAMPLE_BYTES):
                f.seek(offset)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:20]
