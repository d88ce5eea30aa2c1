"""Small I/O helpers: JSON that survives interruption and holds numpy/JAX values."""

from __future__ import annotations

import json
import os

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
    interrupted run never leaves a truncated file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=json_default)
    os.replace(tmp, path)
