"""The user-level cache (teacher ONNX exports, teacher evaluation results): one location."""

from __future__ import annotations

import os
from pathlib import Path

from compressor.errors import BadEnvironment

CACHE_ENV = "COMPRESS_CACHE"


def cache_root() -> Path:
    """$COMPRESS_CACHE, else ~/.cache/compress; created if missing. A cache that cannot be a
    writable folder (a file there, an unwritable or missing home) is one BadEnvironment naming
    the variable to set."""
    given = os.environ.get(CACHE_ENV)
    try:
        root = Path(given) if given else Path.home() / ".cache" / "compress"
    except (RuntimeError, KeyError) as err:  # no HOME and no user entry
        raise BadEnvironment(
            f"no home folder for the cache ({err}); set {CACHE_ENV} to a writable folder"
        ) from None
    source = f"{CACHE_ENV}={given}" if given else f"the default cache {root} (under HOME)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except (OSError, PermissionError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise BadEnvironment(
            f"{source}: cannot use it as the cache folder ({why}); set {CACHE_ENV} to a"
            " writable folder"
        ) from None
    return root
