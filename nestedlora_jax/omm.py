"""Orbital minimisation (OMM) objectives, nested like NestedLoRA.

Ryu, Zhou, Wornell, "Revisiting Orbital Minimization Method for Neural Operator
Decomposition", NeurIPS 2025 (arXiv 2510.21952); the orbital minimisation method of electronic
structure (Mauri, Galli, Car 1993) applied to network eigenfunctions. For a self-adjoint ``T``
with its top-L eigenvalues positive, with ``Lambda = E[f f^T]`` and ``Pi = E[f (Tf)^T]``::

    L_omm(f_1:L) = -tr((2 I - Lambda) Pi) = -2 sum_i <f_i, T f_i> + sum_ij <f_i, f_j> <f_j, T f_i>

Its minimisers are orthonormal bases of the top-L eigenspace (``Lambda = I``, unlike LoRA's
``||f_i||^2 = lambda_i``): for one function ``f = a phi`` it is ``-(2 - a^2) a^2 lambda``,
smallest at ``a = 1``. Eigenvalues are read as Rayleigh quotients. The gradient in ``f_k``
(``T`` self-adjoint, so ``Pi`` is symmetric)::

    dL/df_k = -4 T f_k + 2 sum_j (f_j Pi_jk + T f_j Lambda_jk)

**Nesting** uses the masks of :func:`~nestedlora_jax.objectives.nesting_masks` unchanged:
joint nesting minimises ``sum_l w_l L_omm(f_1:l)``, whose gradient is the one above with
``-4 m_k T f_k`` and ``M_jk`` on each term of the sum; sequential nesting gives ``f_k`` the
gradient of ``L_omm(f_1:k)`` with ``f_1:k-1`` held (``m = 1``, ``M_jk = 1`` for ``j <= k``).
Per sample, with ``Lambda``, ``Pi`` estimated on the *other* half of the batch
(``split_batch``; each product of two expectations is then a product of independent
estimates, so the update is unbiased)::

    dL/df_b = (2/B) [ -2 m * (Tf)_b + f_b @ (M * Pi) + (Tf)_b @ (M * Lambda) ]

**Sanger's variant** (the generalised Hebbian algorithm, Sanger 1989, for an operator)
replaces ``T f_j Lambda_jk`` by ``f_j Pi_jk``: ``f_k`` moves along
``T f_k - sum_{j <= k} f_j <f_j, T f_k>``, which deflates the earlier functions exactly and is
not the gradient of any objective; its fixed points are the same orthonormal eigenfunctions::

    dL/df_b = (4/B) [ -(Tf)_b + f_b @ (M * Pi) ]      (sequential masks)

**Why the spectrum must be shifted.** If ``T`` has a direction ``v`` with ``<v, T v> < 0``,
``L_omm(a v) = |<v, T v>| (2 a^2 - a^4)`` is unbounded below: a function that finds such a
direction grows without bound. LoRA's ``-2 <f, T f> + |f|^4`` has no such direction. A
Schrödinger operator ``T = scale (-H) + shift`` is unbounded below (the kinetic energy), so
OMM relies on the networks staying smooth and on ``shift`` putting the wanted eigenvalues
well above zero (the problems' scaling puts them in ``[1/2, 1]``).

No gradient flows into ``Tf`` (self-adjointness, as for NestedLoRA).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from nestedlora_jax.objectives import (
    Objective,
    _check_even,
    _check_pair,
    _halves,
    _masks_as,
    require_self_adjoint,
)

__all__ = ["OMM_VARIANTS", "omm_loss", "omm_objective"]

OMM_VARIANTS = ("joint", "sequential", "sanger")
OmmVariant = Literal["joint", "sequential", "sanger"]


def _moments(f, Tf):
    """``(Lambda, Pi)`` on a batch: ``f^T f / B`` and the symmetrised ``f^T Tf / B``."""
    B = f.shape[0]
    cross = f.T @ Tf / B
    return f.T @ f / B, 0.5 * (cross + cross.T)


def _paired_moments(f, Tf, split_batch):
    """``((Lam_a, Pi_a), (Lam_b, Pi_b))``: moments of the two halves, or twice the batch's."""
    if not split_batch:
        both = _moments(f, Tf)
        return both, both
    (fa, fb), (ta, tb) = _halves(f), _halves(Tf)
    return _moments(fa, ta), _moments(fb, tb)


def _omm_value(f, Tf, m, M, split_batch):
    (lam_a, pi_a), (lam_b, pi_b) = _paired_moments(f, Tf, split_batch)
    linear = jnp.mean(f * Tf, axis=0)
    quadratic = 0.5 * jnp.sum(M * (lam_a * pi_b + lam_b * pi_a))
    return -2.0 * jnp.sum(m * linear) + quadratic


def _omm_gradient(f, Tf, m, M, sanger, split_batch):
    (lam_a, pi_a), (lam_b, pi_b) = _paired_moments(f, Tf, split_batch)

    def quad(f, Tf, lam, pi):
        if sanger:
            return 2.0 * f @ (M * pi)
        return f @ (M * pi) + Tf @ (M * lam)

    if split_batch:
        (fa, fb), (ta, tb) = _halves(f), _halves(Tf)
        # A sample in half a pairs with the moments of half b and vice versa.
        q = jnp.concatenate([quad(fa, ta, lam_b, pi_b), quad(fb, tb, lam_a, pi_a)], axis=0)
    else:
        q = quad(f, Tf, lam_a, pi_a)
    return (2.0 / f.shape[0]) * (q - 2.0 * m * Tf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _masked_omm(f, Tf, m, M, value_m, value_M, sanger, split_batch):
    """OMM value with masks ``(value_m, value_M)``, gradient masked by ``(m, M)``."""
    return _omm_value(f, Tf, value_m, value_M, split_batch)


def _masked_omm_fwd(f, Tf, m, M, value_m, value_M, sanger, split_batch):
    return _omm_value(f, Tf, value_m, value_M, split_batch), (f, Tf, m, M, value_m, value_M)


def _masked_omm_bwd(sanger, split_batch, residuals, ct):
    f, Tf, m, M, value_m, value_M = residuals
    grad = _omm_gradient(f, Tf, m, M, sanger, split_batch)
    zeros = jnp.zeros_like
    return ct * grad, zeros(Tf), zeros(m), zeros(M), zeros(value_m), zeros(value_M)


_masked_omm.defvjp(_masked_omm_fwd, _masked_omm_bwd)


def _check_options(variant, weights, split_batch):
    if variant not in OMM_VARIANTS:
        raise ValueError(f"unknown OMM variant {variant!r}; expected one of {OMM_VARIANTS}.")
    if not isinstance(split_batch, bool):
        raise ValueError(f"split_batch must be a bool, got {split_batch!r}.")
    if weights is not None and variant != "joint":
        raise ValueError(f"weights apply to joint nesting only (variant='joint'), not {variant!r}.")


def omm_loss(f, Tf, *, variant: OmmVariant = "sequential", weights=None,
             split_batch: bool = True):
    """Nested OMM objective ``-tr((2 I - Lambda) Pi)`` for a self-adjoint operator.

    Value (joint masks ``(m, M)`` of :func:`~nestedlora_jax.objectives.nesting_masks`)::

        -2 sum_i m_i Pi_ii + sum_ij M_ij Lambda_ij Pi_ij

    with ``Lambda``, ``Pi`` from the two batch halves (``(Lam_a Pi_b + Lam_b Pi_a) / 2``) when
    ``split_batch``. Sequential nesting and Sanger's variant report the value with uniform
    joint masks; their gradients are not the gradient of any scalar. Gradient
    (``jax.custom_vjp``), per sample (module docstring)::

        joint, sequential:  (2/B) [ -2 m * (Tf)_b + f_b @ (M * Pi) + (Tf)_b @ (M * Lambda) ]
        sanger:             (4/B) [ -(Tf)_b + f_b @ (M * Pi) ]

    Args:
      f: ``(B, L)`` the functions on a batch.
      Tf: ``(B, L)`` the operator applied to them (no gradient flows into it).
      variant: ``"joint"`` (one shared network), ``"sequential"`` (disjoint parameters per
        function) or ``"sanger"`` (sequential masks, Sanger's deflation).
      weights: joint nesting only, as in :func:`~nestedlora_jax.objectives.nesting_masks`.
      split_batch: moments from independent batch halves (B even); ``False`` uses the whole
        batch (full-population problems).

    Returns:
      Scalar objective estimate in the dtype of ``f``.
    """
    _check_options(variant, weights, split_batch)
    f, Tf = _check_pair(f, Tf, "f", "Tf")
    _check_even(f.shape[0], "f", split_batch)
    L = f.shape[1]
    nesting = "joint" if variant == "joint" else "sequential"
    m, M = _masks_as(f.dtype, L, nesting, weights)
    value_m, value_M = (m, M) if nesting == "joint" else _masks_as(f.dtype, L, "joint", None)
    Tf = jax.lax.stop_gradient(Tf)
    return _masked_omm(f, Tf, m, M, value_m, value_M, variant == "sanger", split_batch)


def omm_objective(variant: OmmVariant = "sequential", weights=None,
                  split_batch: bool = True) -> Objective:
    """The nested OMM objective (:func:`omm_loss`) as an :class:`Objective` (stateless,
    identity readout; its functions converge to orthonormal eigenfunctions, so norms are not
    eigenvalues). Names: ``"omm-seq"``, ``"omm-joint"``, ``"omm-sanger"``."""
    _check_options(variant, weights, split_batch)

    def loss(out, state):
        f, Tf = require_self_adjoint(out, "OMM")
        return omm_loss(f, Tf, variant=variant, weights=weights, split_batch=split_batch), state

    name = {"joint": "omm-joint", "sequential": "omm-seq", "sanger": "omm-sanger"}[variant]
    return Objective(
        name=name,
        init=lambda L, dtype=jnp.float32: (),
        loss=loss,
        readout=lambda f, state: f,
        needs_even_batch=split_batch,
    )
