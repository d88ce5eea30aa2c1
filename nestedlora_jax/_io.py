"""Small I/O helpers: JSON that survives interruption and holds numpy/JAX values."""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np


def json_default(x):
    """``json.dump`` fallback for numpy / JAX arrays and scalars."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and an atomic rename, so an
    interrupted run never leaves a truncated file.

    The temporary file is created new (``mkstemp``: a fresh random name, ``O_EXCL``), so a
    file or symlink planted beside ``path`` is never opened or followed; the rename replaces a
    symlink at ``path`` itself, not the file it points to.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, default=json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
