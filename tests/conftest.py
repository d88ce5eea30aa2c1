"""Shared test configuration.

Float32 is the library default; tests that need float64 enable it locally with
``with jax.enable_x64(True):`` and never flip the global flag.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests train small networks of the same shapes, each in its own freshly traced jit, and
# recompile identical programs. A compilation cache for this session only (a new empty folder,
# removed at exit; subprocesses and notebook kernels inherit it through the environment) lets
# them reuse each other's executables: on test_reliability + test_training it cut 212 s to
# 169 s. It starts empty, so no stale entry from another jax version or checkout is ever used.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="nestedlora-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
