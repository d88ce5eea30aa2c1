"""Shared test configuration.

Float32 is the library default; tests that need float64 enable it locally with
``with jax.enable_x64(True):`` and never flip the global flag.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
