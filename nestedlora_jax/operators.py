"""Operators applied to a per-point network: the (importance-weighted) negative Hamiltonian.

The solver decomposes ``T = scale * (-H) + shift`` with ``H = -kinetic * Lap + V`` (method.md
§2), i.e. ``T f = scale * (kinetic * Lap f - V f) + shift * f``; its top eigenvalues
``t_i = shift - scale * E_i`` belong to the lowest energies ``E_i``.

An operator here is a function ``op(fn, x, key=None) -> (f, Tf)``: ``fn`` maps one point ``x``
``(d,)`` to the ``L`` network outputs ``(L,)`` (or a scalar), and ``op`` returns ``f = fn(x)`` and
``(T f)(x)``, both ``(L,)``. ``key`` is needed only by the stochastic (Hutchinson) Laplacians.
``apply_operator`` vmaps it over a batch.

**Importance weighting.** With samples ``x ~ p`` and ``log_prob = log p`` given, the network
represents ``f = psi / sqrt(p)`` and ``op`` applies ``T_p f = T(sqrt(p) f) / sqrt(p)``. Writing
``sqrt(p) = e^u``, ``u = log_prob / 2``,

    Lap(e^u f) / e^u = Lap f + 2 grad u . grad f + (Lap u + |grad u|^2) f,

evaluated from ``u`` and its derivatives only (no ``exp`` of a log-density, so nothing underflows
in the tails). Then plain batch means estimate ``L2(dx)`` inner products of ``psi = sqrt(p) f``:
``E_p[f_i f_j] = <psi_i, psi_j>`` and ``E_p[f_i T_p f_j] = <psi_i, T psi_j>``. ``T_p`` is
self-adjoint in ``L2(p)``, so the objective may treat ``T f`` as a constant in the backward pass
(method.md §1): ``op`` does not stop gradients itself; the objective decides.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax.laplacian import LAPLACIAN_METHODS, STOCHASTIC_LAPLACIAN_METHODS, laplacian
from nestedlora_jax.samplers import check_sampler_dim

Array = jax.Array
Operator = Callable[..., tuple[Array, Array]]

__all__ = [
    "negative_hamiltonian",
    "apply_operator",
    "energies_from_eigenvalues",
    "eigenvalues_from_energies",
    "problem_operator",
    "ProblemOperator",
]


def _check_scalar_fn(fn: Callable, x: Array, name: str) -> None:
    # Trace-time check on shapes only: nothing is computed.
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{name} must return a scalar for one point of shape {x.shape}; got {shape}. "
            f"It is a per-point function: vmap over batches outside it."
        )


def negative_hamiltonian(
    potential: Callable[[Array], Array],
    *,
    kinetic: float = 1.0,
    scale: float = 1.0,
    shift: float = 0.0,
    laplacian_method: str = "default",
    num_probes: int | None = None,
    log_prob: Callable[[Array], Array] | None = None,
) -> Operator:
    """The operator ``T = scale * (kinetic * Lap - V) + shift``, optionally importance-weighted.

    Args:
      potential: ``V``, one point ``(d,)`` -> scalar.
      kinetic: coefficient of the Laplacian in ``H = -kinetic * Lap + V``.
      scale, shift: ``T = scale * (-H) + shift``; eigenvalues map back by
        ``energies_from_eigenvalues``.
      laplacian_method: any of ``laplacian.LAPLACIAN_METHODS`` for the network's Laplacian. The
        Laplacian of ``u = log_prob / 2`` always uses the exact default method (it is cheap, and
        noise there would only add variance).
      num_probes: probes per point for the Hutchinson methods.
      log_prob: per-point log-density of the sampler; if given, ``op`` applies the
        importance-weighted ``T_p f = T(sqrt(p) f) / sqrt(p)`` (module docstring).

    Returns:
      ``op(fn, x, key=None) -> (f, Tf)``: ``fn`` one point ``(d,)`` -> ``(L,)`` or ``()``; ``x``
      ``(d,)``; ``key`` a PRNG key, required by the stochastic Laplacian methods (ignored
      otherwise). ``f = fn(x)`` and ``Tf`` have ``fn``'s output shape.

    Raises:
      ValueError: unknown ``laplacian_method``; when called: ``potential`` or ``log_prob`` not
        scalar-valued, ``x`` not one point, a stochastic method without ``key`` (the message says
        what to pass).
    """
    if laplacian_method not in LAPLACIAN_METHODS:
        raise ValueError(
            f"Unknown Laplacian method {laplacian_method!r}; "
            f"expected one of {', '.join(LAPLACIAN_METHODS)}."
        )
    stochastic = laplacian_method in STOCHASTIC_LAPLACIAN_METHODS
    scale, shift, kinetic = float(scale), float(shift), float(kinetic)

    def op(fn: Callable[[Array], Array], x: Array, key: Array | None = None):
        x = jnp.asarray(x)
        if x.ndim != 1:
            raise ValueError(
                f"op takes ONE point of shape (d,); got shape {x.shape}. "
                "Use apply_operator for a batch."
            )
        if stochastic and key is None:
            raise ValueError(
                f"laplacian_method={laplacian_method!r} is stochastic: call op(fn, x, key=...) "
                "(apply_operator(op, fn, xs, key=...) splits one key per point)."
            )
        _check_scalar_fn(potential, x, "potential")
        kw = dict(method=laplacian_method, key=key if stochastic else None, num_probes=num_probes)
        if log_prob is None and stochastic:
            # The Hutchinson methods would add an exact reverse pass per output for a gradient
            # that is not needed here.
            f, lap = fn(x), laplacian(fn, x, **kw)
        elif log_prob is None:
            f, _, lap = laplacian(fn, x, return_grad=True, **kw)  # value and grad come for free
        else:
            _check_scalar_fn(log_prob, x, "log_prob")
            f, grad_f, lap_f = laplacian(fn, x, return_grad=True, **kw)
            _, grad_u, lap_u = laplacian(lambda y: 0.5 * log_prob(y), x, return_grad=True)
            # Lap(e^u f) / e^u, expanded so that only u (never e^u) is evaluated.
            lap = lap_f + 2.0 * (grad_f @ grad_u) + (lap_u + grad_u @ grad_u) * f
        v = potential(x)
        return f, scale * (kinetic * lap - v * f) + shift * f

    return op


def apply_operator(op: Operator, fn: Callable[[Array], Array], xs: Array, key: Array | None = None):
    """``op`` vmapped over a batch ``xs`` ``(B, d)``: ``(f, Tf)``, each ``(B, L)`` (or ``(B,)``).

    ``key`` (for stochastic Laplacians) is split into one key per point, so the estimator's
    errors are independent across the batch.
    """
    xs = jnp.asarray(xs)
    if xs.ndim != 2:
        raise ValueError(f"xs must be a batch of points of shape (B, d); got shape {xs.shape}.")
    if key is None:
        return jax.vmap(lambda x: op(fn, x))(xs)
    keys = jax.random.split(key, xs.shape[0])
    return jax.vmap(lambda x, k: op(fn, x, key=k))(xs, keys)


def energies_from_eigenvalues(t: Any, scale: float, shift: float):
    """Energies ``E = -(t - shift) / scale`` from eigenvalues ``t`` of ``T = scale (-H) + shift``.
    """
    return -(t - shift) / scale


def eigenvalues_from_energies(energies: Any, scale: float, shift: float):
    """Eigenvalues ``t = shift - scale * E`` of ``T = scale * (-H) + shift``; inverse of
    ``energies_from_eigenvalues``."""
    return shift - scale * energies


class ProblemOperator(NamedTuple):
    """What ``problem_operator`` builds: the operator, its sampler and scaling, and the exact
    operator eigenvalues ``t = shift - scale * E`` of the ``L`` wanted states (``(L,)`` float64)."""

    op: Operator
    sampler: Any
    scale: float
    shift: float
    eigenvalues: np.ndarray


def problem_operator(
    problem: Any,
    L: int,
    sampler: Any = None,
    *,
    laplacian_method: str = "default",
    num_probes: int | None = None,
    importance_weighting: bool = True,
    scale: float | None = None,
    shift: float | None = None,
) -> ProblemOperator:
    """The recommended operator for learning the ``L`` lowest states of ``problem``.

    Uses ``problem.operator_scaling(L)`` (unless ``scale``/``shift`` are given) and
    ``problem.default_sampler(L)`` (unless ``sampler`` is given), and importance-weights with the
    sampler's ``log_prob`` (so batch means estimate ``L2(dx)`` inner products); with
    ``importance_weighting=False`` the network represents ``psi`` itself and batch means estimate
    ``L2(p)`` inner products.

    Raises:
      ValueError: ``L`` not an int >= 1 or more states than the problem's exact list provides;
        sampler dimension different from ``problem.dim``; unknown Laplacian method.
    """
    energies = problem.energies(L)  # validates L (ValueError if too large or < 1)
    if sampler is None:
        sampler = problem.default_sampler(L)
    check_sampler_dim(sampler, problem.dim)
    default_scale, default_shift = problem.operator_scaling(L)
    scale = default_scale if scale is None else float(scale)
    shift = default_shift if shift is None else float(shift)
    op = negative_hamiltonian(
        problem.potential,
        kinetic=problem.kinetic,
        scale=scale,
        shift=shift,
        laplacian_method=laplacian_method,
        num_probes=num_probes,
        log_prob=sampler.log_prob if importance_weighting else None,
    )
    eigenvalues = eigenvalues_from_energies(energies, scale, shift)
    return ProblemOperator(op, sampler, scale, shift, eigenvalues)
