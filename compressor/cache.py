"""The user-level cache (teacher ONNX exports, teacher evaluation results): one location."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "COMPRESS_CACHE"


def cache_root() -> Path:
    """$COMPRESS_CACHE, else ~/.cache/compress."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "compress"))
