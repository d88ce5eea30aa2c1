"""Randomly shifted lattice points: low-variance, unbiased Monte Carlo in low dimension.

A rank-1 lattice of ``n`` points in ``[0, 1)^s`` with generating vector ``z`` is
``{k z / n mod 1 : k = 0..n-1}``; shifted by one uniform ``Delta`` (the same for every point)
it becomes ``u_k = (k z / n + Delta) mod 1``. Each ``u_k`` is then uniform on the cube, so
``mean_k g(u_k)`` is an unbiased estimate of ``int g``, and for a smooth ``g`` its error falls
like ``n^-1`` (up to logarithms) instead of Monte Carlo's ``n^-1/2``. Mapped through a sampler's
inverse transform (``sampler.from_uniforms``) the points estimate expectations under ``p``.

The generator here is of Korobov form, ``z = (1, a, a^2, ...) mod n``, with ``a`` chosen to
minimise the figure of merit ``P_2`` (the worst-case error for periodic integrands of
smoothness 1 in a Korobov space with unit weights)::

    P_2(z) = -1 + (1/n) sum_k prod_j (1 + 2 pi^2 B_2({k z_j / n})),  B_2(x) = x^2 - x + 1/6.

Where it helps: in the training loop, the *moment samples* NestedLoRA estimates its second
moments ``<f_i, f_j>`` on (``TrainingConfig.moment_sampling = "lattice"``). The error of those
moments is the gradient's noise near the optimum, and it is the same for every sample of the
batch, so a larger batch does not average it away. And the batch itself
(``TrainingConfig.batch_sampling = "lattice"``), where the operator and the gradient are
evaluated; an objective that multiplies estimates from the two halves of the batch gets one
lattice per half (``blocks=2``), since the halves of one lattice are not independent. The gain
shrinks as the dimension grows.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax._checks import check_positive_int
from nestedlora_jax.samplers import _resolve_dtype

__all__ = ["korobov_generator", "lattice_points", "shifted_lattice", "lattice_sample",
           "check_lattice_sampler"]

# Candidates scored when choosing the Korobov parameter (evenly spaced among all of them when
# there are more): enough for a good generator, cheap for n up to ~1e5.
_MAX_CANDIDATES = 1024


def _p2(n: int, generators: np.ndarray) -> np.ndarray:
    """``P_2`` of each row of ``generators`` ``(c, s)`` for ``n`` points."""
    k = np.arange(n, dtype=np.int64)
    total = np.ones((generators.shape[0], n))
    for j in range(generators.shape[1]):
        x = (k[None, :] * generators[:, j : j + 1] % n) / n
        total *= 1.0 + 2.0 * math.pi**2 * (x * x - x + 1.0 / 6.0)
    return total.mean(axis=1) - 1.0


@functools.lru_cache(maxsize=64)
def _korobov_generator(n: int, dim: int) -> tuple[int, ...]:
    if dim == 1 or n <= 2:  # the only generator there
        return (1,) * dim
    candidates = np.array([a for a in range(2, n // 2 + 1) if math.gcd(a, n) == 1], np.int64)
    if candidates.size == 0:
        candidates = np.array([1], np.int64)
    if candidates.size > _MAX_CANDIDATES:
        candidates = candidates[np.linspace(0, candidates.size - 1, _MAX_CANDIDATES).astype(int)]
    powers = np.ones((candidates.size, dim), np.int64)
    for j in range(1, dim):
        powers[:, j] = powers[:, j - 1] * candidates % n
    scores = np.concatenate([_p2(n, powers[i : i + 64]) for i in range(0, len(powers), 64)])
    return tuple(int(v) for v in powers[int(np.argmin(scores))])


def korobov_generator(n: int, dim: int) -> np.ndarray:
    """The generating vector ``(1, a, a^2, ...) mod n`` ``(dim,)`` of the Korobov lattice of
    ``n`` points in ``dim`` dimensions with the smallest ``P_2`` (see the module docstring);
    cached. Every coordinate of a lattice with ``gcd(a, n) = 1`` visits each ``k / n`` once."""
    n = check_positive_int("korobov_generator: n", n)
    dim = check_positive_int("korobov_generator: dim", dim)
    if n >= 2**31:
        raise ValueError(f"korobov_generator: n = {n} is too large (k * a must fit in int64).")
    return np.asarray(_korobov_generator(n, dim), np.int64)


def lattice_points(n: int, dim: int) -> np.ndarray:
    """The unshifted lattice ``{k z / n mod 1}``, float64 ``(n, dim)``, ``z`` from
    :func:`korobov_generator`."""
    z = korobov_generator(n, dim)
    return (np.arange(n, dtype=np.int64)[:, None] * z[None, :] % n) / n


def shifted_lattice(key: jax.Array, n: int, dim: int, dtype: Any = None) -> jax.Array:
    """``(n, dim)`` points ``(k z / n + Delta) mod 1`` with one uniform shift ``Delta`` drawn
    from ``key``: each point is uniform on ``[0, 1)^dim``, together they are a lattice.

    Values are kept inside ``[eps / 2, 1 - eps / 2]`` (``eps`` of ``dtype``), so that an
    inverse transform never sees 0 or 1 (a float32 shift lands on a lattice line with
    probability ``n * 2^-24``); the mass moved is below ``eps``.
    """
    dtype = _resolve_dtype(dtype)
    base = jnp.asarray(lattice_points(n, dim), dtype)
    shift = jax.random.uniform(key, (dim,), dtype=dtype)
    u = jnp.mod(base + shift[None, :], 1.0)
    eps = float(jnp.finfo(dtype).eps)
    return jnp.clip(u, 0.5 * eps, 1.0 - 0.5 * eps)


def check_lattice_sampler(sampler) -> None:
    """ValueError unless ``sampler`` maps uniforms to its points (``num_uniforms`` and
    ``from_uniforms``), which lattice sampling needs."""
    if not (hasattr(sampler, "from_uniforms") and hasattr(sampler, "num_uniforms")):
        raise ValueError(
            f"lattice sampling needs a sampler with an inverse transform (num_uniforms and "
            f"from_uniforms(u)); {type(sampler).__name__} has none. Use random draws "
            "(moment_sampling and batch_sampling 'random') or give the sampler these two members."
        )


def lattice_sample(sampler, key: jax.Array, n: int, dtype: Any = None, *, blocks: int = 1) -> jax.Array:
    """``n`` points of ``sampler``'s density from a randomly shifted lattice: ``(n, dim)``,
    each distributed as one draw of ``sampler.sample``, together spread more evenly.

    With ``blocks = k`` the points are ``k`` consecutive blocks of ``n / k``, each its own
    lattice with its own shift, so the blocks are independent of one another: what an estimate
    from the two halves of a batch (``split_batch``) needs to stay unbiased, since the halves
    of one lattice are not independent.

    Args:
      sampler: a sampler with ``num_uniforms`` and ``from_uniforms(u) -> x`` (the ones in
        :mod:`nestedlora_jax.samplers` have them).
      key: PRNG key of the shift(s).
      n: number of points, a multiple of ``blocks``.
      dtype: as in ``sampler.sample``.
      blocks: number of independently shifted lattices the points are made of.
    """
    check_lattice_sampler(sampler)
    n = check_positive_int("lattice_sample: n", n)
    blocks = check_positive_int("lattice_sample: blocks", blocks)
    if n % blocks:
        raise ValueError(f"lattice_sample: n = {n} points do not split into {blocks} equal "
                         f"blocks; give n a multiple of {blocks}.")
    s = int(sampler.num_uniforms)
    if blocks == 1:
        u = shifted_lattice(key, n, s, dtype)
    else:
        per_block = lambda k: shifted_lattice(k, n // blocks, s, dtype)
        u = jax.vmap(per_block)(jax.random.split(key, blocks)).reshape(n, s)
    return sampler.from_uniforms(u)
