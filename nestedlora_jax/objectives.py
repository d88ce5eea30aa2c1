"""Nested low-rank approximation (NestedLoRA) objectives.

Ryu, Xu, Erol, Bu, Zheng, Wornell, "Operator SVD with Neural Networks via Nested
Low-Rank Approximation", ICML 2024 (arXiv 2402.03655).

For an operator ``T`` with singular triplets ``(s_i, phi_i, psi_i)``, the low-rank
approximation objective over L left functions ``f`` and right functions ``g`` is::

    L_lora(f_1:L, g_1:L) = -2 sum_i <f_i, T g_i> + sum_{i,j} <f_i, f_j> <g_i, g_j>

whose minimisers span the top-L singular subspaces. *Nesting* breaks the rotation
symmetry by minimising ``L_lora(f_1:k, g_1:k)`` for every ``k``; both variants
(joint and sequential) reduce to one masked gradient::

    d/df_i = 2 { -m_i T g_i + sum_j M_ji f_j <g_j, g_i> }
    d/dg_i = 2 { -m_i T* f_i + sum_j M_ji g_j <f_j, f_i> }

with the masks ``(m, M)`` of :func:`nesting_masks`. This module holds that gradient
once, as a ``jax.custom_vjp``, and every objective (EVD, SVD, and later CDK) is a
thin wrapper around it.

Inner products are expectations under the sampling density, estimated by batch means:
``<f_i, f_j> ~ mean_b f_bi f_bj``. The quadratic term is a product of two such
estimates; with ``split_batch=True`` they come from the two halves of the batch, so
the estimate (and its gradient) is unbiased. Alternatively the second moment that
multiplies each sample's gradient can come from *moment samples*: the functions at an
independent, larger batch (``f_moment``), which needs no operator and no backward pass.
Near the optimum the per-sample residual ``-T f + f Lambda`` vanishes except for the
error of the ``Lambda`` estimate, so that error is the gradient noise there, and a larger
moment batch shrinks it at the cost of forward passes only.

No gradient ever flows into ``T g`` or ``T* f``: by self-adjointness (EVD) or by
supplying both ``T g`` and ``T* f`` (SVD), the gradient of the linear term is known in
closed form, so a training step never differentiates through the operator (for a
differential operator that would mean third derivatives of the network).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax._checks import check_even_batch, check_num_states

__all__ = [
    "NESTINGS",
    "Objective",
    "OperatorOutput",
    "nested_lora_objective",
    "nesting_masks",
    "nesting_weights",
    "lora_objective",
    "nested_lora_loss",
    "nested_lora_svd_loss",
]

Nesting = Literal["joint", "sequential"]
NESTINGS = ("joint", "sequential")


# --------------------------------------------------------------------------- masks


def nesting_weights(L: int, step: int = 1) -> np.ndarray:
    """Joint-nesting weights on the simplex, optionally only on every ``step``-th k.

    Args:
      L: number of functions.
      step: put weight on ``k = step, 2 step, ...`` (and always on ``k = L``), 1-based.

    Returns:
      ``w`` of shape ``(L,)``, non-negative, summing to 1 (uniform over the chosen k).
    """
    L = check_num_states(L)
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}.")
    k = np.arange(1, L + 1)
    w = ((k % step == 0) | (k == L)).astype(np.float64)
    return w / w.sum()


def nesting_masks(
    L: int, nesting: Nesting = "sequential", weights=None
) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(m, M)`` of the unified (gradient-masked) nested objective.

    Joint nesting minimises ``sum_k w_k L_lora(f_1:k, g_1:k)`` with ``w`` on the
    simplex (uniform by default; unnormalised weights are normalised), which in
    closed form is ``-2 sum_i m_i <f_i, T g_i> + sum_ij M_ij <f_i,f_j><g_i,g_j>`` with::

        m_i  = sum_{k >= i} w_k
        M_ij = m_{max(i, j)} = min(m_i, m_j)

    Sequential nesting updates ``(f_i, g_i)`` with the gradient of
    ``L_lora(f_1:i, g_1:i)`` holding ``f_1:i-1`` fixed::

        m_i  = 1
        M_ji = 1 if j <= i else 0      (upper triangular in (j, i))

    Args:
      L: number of functions, ``L >= 1``.
      nesting: ``"joint"`` or ``"sequential"``.
      weights: joint only; array-like of shape ``(L,)``, non-negative, positive sum.

    Returns:
      ``m`` of shape ``(L,)`` and ``M`` of shape ``(L, L)``, float64 numpy arrays.
    """
    L = check_num_states(L)
    _check_nesting(nesting)
    if nesting == "sequential":
        if weights is not None:
            raise ValueError(
                "weights apply to joint nesting only; sequential nesting gives every "
                "function its own objective L_lora(f_1:i). Pass weights=None."
            )
        return np.ones(L), np.triu(np.ones((L, L)))
    w = np.full(L, 1.0 / L) if weights is None else _normalise_weights(weights, L)
    m = np.cumsum(w[::-1])[::-1]
    return m, np.minimum(m[:, None], m[None, :])


def _normalise_weights(weights, L: int) -> np.ndarray:
    try:
        w = np.asarray(weights, dtype=np.float64)
    except Exception as e:  # e.g. a traced array: masks must be static.
        raise ValueError(
            "weights must be a concrete array-like of shape (L,) (masks are built "
            f"at trace time), got {type(weights).__name__}."
        ) from e
    if w.shape != (L,):
        raise ValueError(
            f"weights must have shape (L,) = ({L},) to match the {L} functions, got "
            f"shape {w.shape}."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w}.")
    total = w.sum()
    if not total > 0:
        raise ValueError(
            f"weights must sum to a positive value (they are normalised to the "
            f"simplex), got sum {total}."
        )
    return w / total


def _check_nesting(nesting) -> None:
    if nesting not in NESTINGS:
        raise ValueError(f"unknown nesting {nesting!r}; expected one of {NESTINGS}.")


# ------------------------------------------------------------- the masked core


def _second_moment(f):
    """``Lambda = f^T f / B``: the batch estimate of ``<f_i, f_j>``. f: (B, L) -> (L, L)."""
    return f.T @ f / f.shape[0]


def _halves(f):
    h = f.shape[0] // 2
    return f[:h], f[h:]


def _quadratic_factors(f, g, split_batch: bool, moments=None):
    """Second moments used by the quadratic term, and which one pairs with which.

    Returns ``(Lf_a, Lf_b, Lg_a, Lg_b)`` such that the quadratic term is
    ``sum_ij M_ij (Lf_a Lg_b + Lf_b Lg_a)_ij / 2``. Without splitting all four are
    the full-batch moments; with splitting ``a``/``b`` are the two batch halves, so
    each product multiplies two independent estimates. With ``moments = (Lf_m, Lg_m)``
    (from independent moment samples) ``a`` is the whole batch and ``b`` the moments.
    """
    if moments is not None:
        Lf_m, Lg_m = moments
        return _second_moment(f), Lf_m, _second_moment(g), Lg_m
    if not split_batch:
        Lf, Lg = _second_moment(f), _second_moment(g)
        return Lf, Lf, Lg, Lg
    fa, fb = _halves(f)
    ga, gb = _halves(g)
    return _second_moment(fa), _second_moment(fb), _second_moment(ga), _second_moment(gb)


def _objective_value(f, Tg, g, Tadj_f, m, M, split_batch, moments=None):
    # <f_i, T g_i> is estimated twice, from the left batch (f . Tg) and from the
    # right batch (T*f . g); averaging uses both halves of the information.
    linear = 0.5 * (jnp.mean(f * Tg, axis=0) + jnp.mean(Tadj_f * g, axis=0))
    Lf_a, Lf_b, Lg_a, Lg_b = _quadratic_factors(f, g, split_batch, moments)
    quadratic = 0.5 * jnp.sum(M * (Lf_a * Lg_b + Lf_b * Lg_a))
    return -2.0 * jnp.sum(m * linear) + quadratic


def _masked_gradient(f, Tg, m, M, Lg_for_a, Lg_for_b, split_batch):
    """Per-sample masked gradient for the left family (swap roles for the right).

    ``dL/df_bi = (2/B) [ -m_i (Tg)_bi + sum_j f_bj M_ji Lambda^g_ji ]``, where for a
    sample in half ``a`` the ``Lambda^g`` is estimated from the *other* half ``b``.
    """
    B = f.shape[0]
    if split_batch:
        fa, fb = _halves(f)
        quad = jnp.concatenate([fa @ (M * Lg_for_a), fb @ (M * Lg_for_b)], axis=0)
    else:
        quad = f @ (M * Lg_for_a)
    return (2.0 / B) * (quad - m * Tg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _masked_lora(f, Tg, g, Tadj_f, m, M, value_m, value_M, split_batch, moments=None):
    """Objective with masks ``(value_m, value_M)``, gradient masked by ``(m, M)``.

    The two pairs coincide for joint nesting; sequential nesting has no scalar
    objective, so its value is reported with uniform joint masks. ``moments``:
    ``None`` or the moment samples' ``(Lambda^f, Lambda^g)``, constants; with them
    ``split_batch`` must be False.
    """
    return _objective_value(f, Tg, g, Tadj_f, value_m, value_M, split_batch, moments)


def _masked_lora_fwd(f, Tg, g, Tadj_f, m, M, value_m, value_M, split_batch, moments=None):
    value = _objective_value(f, Tg, g, Tadj_f, value_m, value_M, split_batch, moments)
    return value, (f, Tg, g, Tadj_f, m, M, value_m, value_M, moments)


def _masked_lora_bwd(split_batch, residuals, ct):
    f, Tg, g, Tadj_f, m, M, value_m, value_M, moments = residuals
    Lf_a, Lf_b, Lg_a, Lg_b = _quadratic_factors(f, g, split_batch, moments)
    # A sample in half a pairs with the moment of half b and vice versa; with moment
    # samples (then split_batch is False) every sample pairs with their moment.
    grad_f = _masked_gradient(f, Tg, m, M, Lg_b, Lg_a, split_batch)
    grad_g = _masked_gradient(g, Tadj_f, m, M, Lf_b, Lf_a, split_batch)
    zeros = jnp.zeros_like
    return (
        ct * grad_f, zeros(Tg), ct * grad_g, zeros(Tadj_f),
        zeros(m), zeros(M), zeros(value_m), zeros(value_M),
        None if moments is None else jax.tree_util.tree_map(zeros, moments),
    )


_masked_lora.defvjp(_masked_lora_fwd, _masked_lora_bwd)


# ------------------------------------------------------------- public objectives


def nested_lora_svd_loss(
    f,
    Tg,
    g,
    Tadj_f,
    *,
    nesting: Nesting = "sequential",
    weights=None,
    split_batch: bool = True,
    f_moment=None,
    g_moment=None,
):
    """Nested LoRA objective for operator SVD (two function families).

    Value (joint nesting, masks of :func:`nesting_masks`)::

        -2 sum_i m_i <f_i, T g_i> + sum_ij M_ij <f_i, f_j> <g_i, g_j>

    with ``<f_i, T g_i>`` estimated as the average of ``mean_b f_bi (Tg)_bi`` and
    ``mean_b (T*f)_bi g_bi``, and the quadratic term as
    ``sum_ij M_ij (Lf1 Lg2 + Lf2 Lg1)_ij / 2`` over batch halves when
    ``split_batch`` (else full-batch moments). For sequential nesting the reported
    value uses uniform joint masks (``(1/L) sum_k L_lora(f_1:k, g_1:k)``); its gradient
    is the sequential masked gradient, which is not the gradient of any scalar.

    Gradient (``jax.custom_vjp``), per sample, ``B_x``/``B_y`` the batch sizes::

        dL/df_b = (2/B_x) [ -m * (Tg)_b + f_b @ (M * Lambda^g) ]
        dL/dg_b = (2/B_y) [ -m * (T*f)_b + g_b @ (M * Lambda^f) ]

    with ``Lambda`` from the other half of the batch when ``split_batch``, or from the
    moment samples when they are given. No gradient flows into ``Tg`` or ``Tadj_f`` (they
    are wrapped in ``stop_gradient``): the operator is never differentiated.

    Args:
      f: ``(B_x, L)`` left functions at left samples ``x_b``.
      Tg: ``(B_x, L)`` ``(T g)(x_b)``.
      g: ``(B_y, L)`` right functions at right samples ``y_b``.
      Tadj_f: ``(B_y, L)`` ``(T* f)(y_b)``.
      nesting: ``"joint"`` or ``"sequential"``.
      weights: joint-nesting weights ``(L,)`` (default uniform).
      split_batch: estimate the quadratic term from independent batch halves
        (unbiased; needs even batch sizes). ``False`` uses the whole batch for both
        factors (for full-population or deterministic problems). When x and y are
        drawn as pairs, halves are taken at the same indices on both sides.
      f_moment: optional ``(B_m, L)`` left functions at *moment samples*: points drawn
        independently of the batch (from the same density), where no operator is applied.
        Both together or neither. Then ``Lambda^f = f_moment^T f_moment / B_m`` (and
        ``Lambda^g`` from ``g_moment``) is the moment every sample's gradient uses, the
        quadratic term's value is ``sum_ij M_ij (Lf Lg_m + Lf_m Lg)_ij / 2`` (unbiased: the
        factors are independent), and ``split_batch`` has no effect. No gradient flows
        into the moment samples (only forward passes are needed there).
      g_moment: optional ``(B_m', L)`` right functions at moment samples.

    Returns:
      Scalar objective estimate, in the dtype of ``f``.
    """
    f, Tg, g, Tadj_f = _check_svd_inputs(f, Tg, g, Tadj_f, split_batch and f_moment is None)
    L = f.shape[1]
    moments = _moment_pair(f_moment, g_moment, L, f.dtype)
    m, M = _masks_as(f.dtype, L, nesting, weights)
    value_m, value_M = (m, M) if nesting == "joint" else _masks_as(f.dtype, L, "joint", None)
    Tg, Tadj_f = jax.lax.stop_gradient(Tg), jax.lax.stop_gradient(Tadj_f)
    split = bool(split_batch) and moments is None
    return _masked_lora(f, Tg, g, Tadj_f, m, M, value_m, value_M, split, moments)


def nested_lora_loss(
    f,
    Tf,
    *,
    nesting: Nesting = "sequential",
    weights=None,
    split_batch: bool = True,
    f_moment=None,
):
    """Nested LoRA objective for the eigendecomposition of a self-adjoint operator.

    The SVD objective with ``g = f``: value::

        -2 sum_i m_i <f_i, T f_i> + sum_ij M_ij <f_i, f_j>^2

    At the optimum ``f_i = sqrt(lambda_i) phi_i`` for the top-L eigenpairs (eigenvalues
    positive and ordered), so ``||f_i||^2`` estimates ``lambda_i``.

    Gradient (``jax.custom_vjp``), per sample::

        dL/df_b = (4/B) [ -m * (Tf)_b + f_b @ (M * Lambda) ]

    where ``Lambda = f^T f / B`` (with ``split_batch``, estimated on the half of the
    batch that does not contain sample b; with ``f_moment``, on the moment samples).
    **No gradient flows into ``Tf``**: for a
    self-adjoint ``T``, ``d<f, T f> = 2 <df, T f>``, so the linear term's gradient is
    known without differentiating the operator. This is only right if ``T`` is
    self-adjoint in the inner product the batch mean estimates (for importance
    sampling, use the weighted operator ``T_p``, which is self-adjoint in ``L2(p)``).

    Args:
      f: ``(B, L)`` values of the L functions on a batch of B samples.
      Tf: ``(B, L)`` the operator applied to them at the same samples.
      nesting: ``"joint"`` (one network, shared parameters) or ``"sequential"``
        (disjoint parameters per function).
      weights: joint-nesting weights ``(L,)`` on ``k`` (normalised; default uniform).
      split_batch: unbiased two-halves estimate of the quadratic term (B must be
        even); ``False`` for full-population / deterministic problems.
      f_moment: optional ``(B_m, L)`` values of the functions at moment samples, drawn
        independently of the batch from the same density: ``Lambda`` is estimated there
        (forward passes only, no operator, no gradient), and ``split_batch`` has no effect.
        Near the optimum the error of ``Lambda`` is the gradient's noise, so a moment batch
        several times larger than the batch lowers it (see the module docstring).

    Returns:
      Scalar objective estimate, in the dtype of ``f``.
    """
    f, Tf = _check_pair(f, Tf, "f", "Tf")
    _check_even(f.shape[0], "f", split_batch and f_moment is None)
    return nested_lora_svd_loss(
        f, Tf, f, Tf, nesting=nesting, weights=weights, split_batch=split_batch,
        f_moment=f_moment, g_moment=f_moment,
    )


def lora_objective(f, Tg, g):
    """The plain (un-nested) LoRA objective, full-batch moments, for reference/reporting.

    ``-2 sum_i <f_i, T g_i> + sum_ij <f_i, f_j><g_i, g_j>``, with ``<f_i, T g_i>`` from
    ``mean_b f_bi (Tg)_bi``. Differentiable by ordinary autodiff (including through
    ``Tg`` if it depends on the inputs). Shapes as in :func:`nested_lora_svd_loss`.
    """
    return -2.0 * jnp.sum(jnp.mean(f * Tg, axis=0)) + jnp.sum(
        _second_moment(f) * _second_moment(g)
    )


# ------------------------------------------------------------- validation


def _masks_as(dtype, L, nesting, weights):
    m, M = nesting_masks(L, nesting, weights)
    return jnp.asarray(m, dtype), jnp.asarray(M, dtype)


def _check_pair(a, b, name_a, name_b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2:
        raise ValueError(
            f"{name_a} must have shape (B, L) (batch, functions), got shape {a.shape}."
        )
    if b.shape != a.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} (B, L) = {a.shape}, got "
            f"shape {b.shape}."
        )
    if a.shape[1] < 1:
        raise ValueError(f"{name_a} has L = 0 functions; need L >= 1 (shape {a.shape}).")
    if a.shape[0] < 1:
        raise ValueError(f"{name_a} has an empty batch (shape {a.shape}).")
    for name, arr in ((name_a, a), (name_b, b)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}.")
    if a.dtype != b.dtype:
        b = b.astype(a.dtype)
    return a, b


def _moment_pair(f_moment, g_moment, L, dtype):
    """``(Lambda^f, Lambda^g)`` of the moment samples (constants), or ``None``."""
    if f_moment is None and g_moment is None:
        return None
    if f_moment is None or g_moment is None:
        raise ValueError(
            "give moment samples for both families (f_moment and g_moment) or for neither; "
            f"got only {'f_moment' if g_moment is None else 'g_moment'}."
        )
    moments = []
    for name, a in (("f_moment", f_moment), ("g_moment", g_moment)):
        a = jnp.asarray(a)
        if a.ndim != 2 or a.shape[1] != L or a.shape[0] < 1:
            raise ValueError(
                f"{name} must have shape (B_m, L) with L = {L} (the functions at the moment "
                f"samples), got shape {a.shape}."
            )
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype}.")
        moments.append(_second_moment(jax.lax.stop_gradient(a).astype(dtype)))
    return tuple(moments)


def _check_even(B, name, split_batch):
    if split_batch:
        check_even_batch(B, f"the batch size of {name}")


def _check_svd_inputs(f, Tg, g, Tadj_f, split_batch):
    f, Tg = _check_pair(f, Tg, "f", "Tg")
    g, Tadj_f = _check_pair(g, Tadj_f, "g", "Tadj_f")
    if g.shape[1] != f.shape[1]:
        raise ValueError(
            f"f and g must have the same number of functions L; got f with L = "
            f"{f.shape[1]} and g with L = {g.shape[1]}."
        )
    _check_even(f.shape[0], "f", split_batch)
    _check_even(g.shape[0], "g", split_batch)
    g, Tadj_f = g.astype(f.dtype), Tadj_f.astype(f.dtype)
    return f, Tg, g, Tadj_f


# ------------------------------------------------------------- objective protocol


class OperatorOutput(NamedTuple):
    """What an operator gives every objective on one batch: the one contract of EVD and SVD.

    For an operator ``T`` (``T*`` its adjoint) and learned left functions ``f`` and right
    functions ``g``, at left samples ``x_b`` and right samples ``y_b``::

        f      (B, L)    f(x_b)
        Tg     (B, L)    (T g)(x_b), or an unbiased single-batch estimate of it
        g      (B', L)   g(y_b)
        Tadj_f (B', L)   (T* f)(y_b), or an unbiased estimate

    A self-adjoint problem (EVD, one family) leaves ``g`` and ``Tadj_f`` ``None``: then
    ``g = f`` and ``T* f = T f = Tg`` (:attr:`is_self_adjoint`). Per-point differential operators
    produce it by ``vmap`` (:func:`~nestedlora_jax.operators.pointwise_operator`); a
    batch-estimated operator (a kernel integral, the canonical dependence kernel from paired
    samples, see :mod:`nestedlora_jax.dependence`) produces it from the whole batch.

    An objective uses ``Tg`` and ``Tadj_f`` as constants in its backward pass (NestedLoRA's
    linear term ``<f, T g>`` is bilinear, so its gradient is known in closed form): an
    estimate here must make ``mean_b f_b . Tg_b`` an unbiased estimate of ``<f, T g>`` whose
    derivative in ``f_b`` is ``Tg_b / B``, and likewise on the right.

    Optionally, *moment samples*: the functions at points drawn independently of the batch
    from the same density, where no operator is applied (forward passes only; the training
    loop adds them when ``TrainingConfig.moment_batch_size`` is set)::

        f_moment (B_m, L)   f(x'_b)
        g_moment (B_m', L)  g(y'_b)    (None for one family: g_moment = f_moment)

    An objective that takes them (:attr:`Objective.takes_moment_samples`) estimates its second
    moments ``<f_i, f_j>`` there.
    """

    f: Any
    Tg: Any
    g: Any = None
    Tadj_f: Any = None
    f_moment: Any = None
    g_moment: Any = None

    @property
    def is_self_adjoint(self) -> bool:
        """One family (``g = f``, ``T* = T``): an eigendecomposition."""
        return self.g is None


def require_self_adjoint(out: OperatorOutput, method: str) -> tuple[Any, Any]:
    """``(f, Tf)`` of a self-adjoint :class:`OperatorOutput`; ValueError naming ``method``
    otherwise (the eigendecomposition baselines learn one family only)."""
    if not isinstance(out, OperatorOutput):
        raise ValueError(
            f"{method}'s loss takes an OperatorOutput (e.g. OperatorOutput(f, Tf)), got "
            f"{type(out).__name__}."
        )
    if (out.g is None) != (out.Tadj_f is None):
        raise ValueError("OperatorOutput: give both g and Tadj_f (an SVD) or neither (an EVD).")
    if not out.is_self_adjoint:
        raise ValueError(
            f"{method} learns the eigenfunctions of a self-adjoint operator (one family); this "
            "operator gives two families (g, T* f): use nested_lora_objective() for an SVD."
        )
    if out.f_moment is not None:
        raise ValueError(
            f"{method} does not use moment samples (OperatorOutput.f_moment); only NestedLoRA "
            "does. Leave TrainingConfig.moment_batch_size None for this objective."
        )
    return out.f, out.Tg


class Objective(NamedTuple):
    """A training objective on network outputs, as pure functions (NestedLoRA or a baseline).

    Attributes:
      name: short identifier (e.g. ``"neuralsvd-seq"``).
      init: ``(L, dtype) -> state``, the objective's own state (a pytree; ``()`` if none),
        e.g. SpIN's moving average of the second-moment matrix.
      loss: ``(out, state) -> (loss, new_state)`` for an :class:`OperatorOutput` ``out``
        (``f, Tg`` of shape ``(B, L)``, and ``g, Tadj_f`` for an SVD). The gradient of ``loss``
        w.r.t. ``f`` (and ``g``) is the method's update direction (it may be a masked / custom
        gradient, not the gradient of the returned value).
      readout: ``(f, state) -> phi``: maps raw outputs ``(B, L)`` to the method's
        eigenfunction estimates (identity for NestedLoRA; a linear map for baselines, so it
        applies to ``Tf`` as well).
      needs_even_batch: ``True`` if the batch is split in halves.
      norms_are_eigenvalues: ``True`` if at the optimum ``||f_i||^2`` equals the i-th
        eigenvalue (NestedLoRA). Collapse detection compares the two, so it runs only for
        such objectives; the baselines' raw outputs have arbitrary norms.
      parameter_term: ``None`` for an objective whose update is a function of ``f`` alone
        (all but one). Otherwise ``(apply, params, xs, out, state) -> (term, new_state)``,
        called after ``loss`` with its new state, for an update that needs the network's
        parameter-space Jacobian (SpIN's moving average of ``dSigma/dtheta``): ``term`` is
        added to the loss; its value is zero and its gradient w.r.t. ``params`` is the
        method's extra update. Such an objective takes ``init(L, dtype, params)`` (its state
        may hold parameter-shaped averages) and needs one network and a per-point operator,
        so that ``out.f = vmap(apply(params, .))(xs)``.
      takes_moment_samples: ``True`` if ``loss`` estimates its second moments on the moment
        samples of :class:`OperatorOutput` when present (NestedLoRA).
    """

    name: str
    init: Callable[..., Any]
    loss: Callable[[Any, Any], tuple[Any, Any]]
    readout: Callable[[Any, Any], Any]
    needs_even_batch: bool
    norms_are_eigenvalues: bool = False
    parameter_term: Callable[..., tuple[Any, Any]] | None = None
    takes_moment_samples: bool = False

    def init_state(self, L: int, dtype, params):
        """The objective's state for a network with parameters ``params`` (passed to
        ``init`` only when the objective has a :attr:`parameter_term`)."""
        if self.parameter_term is None:
            return self.init(L, dtype)
        return self.init(L, dtype, params)


def nested_lora_objective(
    nesting: Nesting = "sequential", weights=None, split_batch: bool = True
) -> Objective:
    """NestedLoRA as an :class:`Objective` (stateless; identity readout):
    :func:`nested_lora_loss` on a self-adjoint :class:`OperatorOutput`,
    :func:`nested_lora_svd_loss` on one with two families."""
    _check_nesting(nesting)
    kw = dict(nesting=nesting, weights=weights, split_batch=split_batch)

    def loss(out, state):
        if not isinstance(out, OperatorOutput):
            raise ValueError(
                "the objective's loss takes an OperatorOutput (e.g. OperatorOutput(f, Tf)), got "
                f"{type(out).__name__}."
            )
        if out.is_self_adjoint:
            return nested_lora_loss(out.f, out.Tg, f_moment=out.f_moment, **kw), state
        return nested_lora_svd_loss(out.f, out.Tg, out.g, out.Tadj_f, f_moment=out.f_moment,
                                    g_moment=out.g_moment, **kw), state

    name = "neuralsvd-seq" if nesting == "sequential" else "neuralsvd-joint"
    return Objective(
        name=name,
        init=lambda L, dtype: (),
        loss=loss,
        readout=lambda f, state: f,
        needs_even_batch=bool(split_batch),
        norms_are_eigenvalues=True,
        takes_moment_samples=True,
    )
