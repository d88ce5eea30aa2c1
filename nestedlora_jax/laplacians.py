"""Laplacians of per-sample functions ``R^d -> R^L`` by automatic differentiation.

``laplacian(fn, x)`` returns ``Lap f_l(x) = sum_k d^2 f_l / dx_k^2`` for every output ``l`` of
``fn`` at one point ``x`` of shape ``(d,)``; ``batched_laplacian`` vmaps it over a batch. With
``return_grad=True`` both also return ``f(x)`` and the Jacobian, which the operator code needs
together (``T f = -Lap f + V f`` and its importance-sampled form use all three).

Which method to use. Timings (ms per batch of 512 points for value + gradient + Laplacian,
float32, jit-compiled, on a 2-core CPU) are measured by ``benchmarks/laplacian.py`` and
recorded in ``benchmarks/results/laplacian.md``; in short:

- ``"folx"`` (the default, ``DEFAULT_LAPLACIAN_METHOD``): the forward Laplacian
  (``folx.forward_laplacian``, Li et al. 2023) propagates ``(f, J, Lap f)`` through the network
  in one pass. Exact. Fastest for a shared MLP ``d -> 64 -> 64 -> 64 -> 16``: 1.5 / 1.6 ms at
  d = 2 / 3 against 2.5 / 2.5 ms for forward-over-forward and 8-11 ms for the reverse-mode
  methods, and far ahead at large d (12.8 vs 92 ms at d = 48). For 16 vmapped MLPs
  ``d -> 32 -> 32 -> 32 -> 1`` it ties with forward-over-forward (10.2 / 13.3 vs 11.3 / 10.1 ms
  at d = 2 / 3; repeated interleaved runs put either one ahead by 10-15 %). Gradients *through*
  the Laplacian (w.r.t. parameters) are cheaper too: 7 vs 12 ms (shared) and 74 vs 136 ms
  (vmapped) at d = 2. folx interprets the jaxpr of ``fn`` and does not cover every primitive
  (folx 0.2.30 fails on ``lax.fori_loop``; ``lax.cond`` falls back to a full Hessian): when it
  fails, ``"default"`` warns and uses ``"forward_over_forward"`` instead.
- ``"forward_over_forward"``: ``d`` nested jvps, one per basis direction, vmapped. Exact, pure
  JAX, no reverse pass, so its cost hardly grows with ``L``. Fastest for a single small network
  (``L = 1``, vmapped: 0.69 ms vs 1.9 ms for folx at d = 2) and the robust fallback.
- ``"forward_over_reverse"``: a jvp of the per-output gradient (``jacrev``) along each basis
  direction. Pays one reverse pass per output: competitive for a scalar ``fn`` only
  (16 vmapped nets: 168 ms at d = 2).
- ``"hessian_trace"``: materialises the ``(L, d, d)`` Hessian; a reference, never the fastest.
- ``"hutchinson"`` / ``"hutchinson_gaussian"``: unbiased stochastic estimate from
  ``num_probes`` random probes (Rademacher / Gaussian); cost independent of ``d``. With 8
  probes it only pays from d ~ 48 on (16 vmapped nets: 109 vs 244 ms), and it adds noise of
  standard deviation ``sqrt(2 sum_{i != j} H_ij^2 / num_probes)`` to the operator. Needs
  ``key`` and ``num_probes``. Rademacher probes are never worse than Gaussian ones.
- ``"finite_difference"``: central second differences, ``2 d + 1`` evaluations of ``fn``. Never
  the default: no faster than the exact methods at d <= 3 (17 vs 10-11 ms, vmapped), and its
  rounding error ``~ d eps |f| / h^2`` is a *relative* error of 1e-2 (median) to 0.3 (max) on
  the benchmark MLPs in float32, whose Laplacians are small next to ``|f|`` (1e-8 in float64).
  The exact methods match float64 to ~1e-6 in float32.

All methods are pure and compose with ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (gradients of
the Laplacian with respect to parameters closed over by ``fn`` are exact for the exact methods),
and follow the dtype of ``x`` (float32 or float64).
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

EXACT_LAPLACIAN_METHODS = (
    "forward_over_forward",
    "forward_over_reverse",
    "hessian_trace",
    "folx",
)
STOCHASTIC_LAPLACIAN_METHODS = ("hutchinson", "hutchinson_gaussian")
LAPLACIAN_METHODS = (
    ("default",) + EXACT_LAPLACIAN_METHODS + STOCHASTIC_LAPLACIAN_METHODS + ("finite_difference",)
)
# Fastest exact method measured for the common case (d = 2..3, batch 512, shared MLP with 16
# outputs and 16 vmapped small MLPs); see the module docstring and benchmarks/laplacian.py.
DEFAULT_LAPLACIAN_METHOD = "folx"
# What "default" uses, with a RuntimeWarning, when folx cannot trace fn: exact, pure JAX.
FALLBACK_LAPLACIAN_METHOD = "forward_over_forward"


def _resolve_method(method: str) -> str:
    if not isinstance(method, str) or method not in LAPLACIAN_METHODS:
        raise ValueError(
            f"Unknown Laplacian method {method!r}; expected one of {', '.join(LAPLACIAN_METHODS)}."
        )
    return method


def _check_stochastic_args(method: str, key: Any, num_probes: Any) -> int:
    if key is None or isinstance(key, (int, float)):
        raise ValueError(
            f"method={method!r} is stochastic and needs a PRNG key: pass key=jax.random.key(...)"
            + ("." if key is None else f", not the Python number {key!r}.")
        )
    if num_probes is None:
        raise ValueError(
            f"method={method!r} needs num_probes, the number of random probe vectors (an int >= 1)."
        )
    try:
        n = operator.index(num_probes)  # ints and NumPy integers, not floats or bools
    except TypeError:
        n = None
    if n is None or isinstance(num_probes, bool) or n < 1:
        raise ValueError(
            f"num_probes must be an integer >= 1 (it fixes an array shape); got {num_probes!r}."
        )
    return n


def _check_x(x: Array) -> None:
    if jnp.ndim(x) != 1:
        raise ValueError(
            f"x must be a single point of shape (d,); got shape {jnp.shape(x)}. "
            "Use batched_laplacian for a batch of shape (B, d)."
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"x must have a floating dtype (float32 or float64); got {jnp.result_type(x)}."
        )


def _check_output(fn: Callable, x: Array) -> int:
    """Returns the output rank (0 or 1) of fn at x, raising if it is not a scalar or a vector."""
    out = jax.eval_shape(fn, x)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(
            f"fn must return a single array of shape (L,) or (); got a {type(out).__name__}."
        )
    if len(out.shape) > 1:
        raise ValueError(
            f"fn must return an array of shape (L,) or () for one point; got shape {out.shape}. "
            "Flatten the outputs, or vmap over the extra axes yourself."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"fn must return a floating array; got dtype {out.dtype}.")
    return len(out.shape)


# --------------------------------------------------------------------------------------------
# Exact methods. Each returns (value, grad, lap) with value (L,) or (), grad (L, d) or (d,).
# --------------------------------------------------------------------------------------------


def _second_directional(fn: Callable, x: Array, v: Array):
    """(f(x), J v, v^T H v) from a jvp of a jvp, all along the same direction v."""

    def jvp_along_v(y):
        return jax.jvp(fn, (y,), (v,))

    (value, first), (_, second) = jax.jvp(jvp_along_v, (x,), (v,))
    return value, first, second


def _forward_over_forward(fn, x):
    basis = jnp.eye(x.shape[0], dtype=x.dtype)
    # The primal f(x) does not depend on the direction, so vmap computes it once (row 0 of a
    # broadcast); the first-order tangents e_k . grad f are the gradient's columns for free.
    directional = lambda v: _second_directional(fn, x, v)
    value, grad, second = jax.vmap(directional, out_axes=(0, -1, 0))(basis)
    return value[0], grad, jnp.sum(second, axis=0)


def _with_copy(fn):
    # jacrev(..., has_aux=True) then returns the value alongside the Jacobian from one pass.
    def wrapped(y):
        out = fn(y)
        return out, out

    return wrapped


def _forward_over_reverse(fn, x):
    # jacrev = one reverse pass per output (a vmapped vjp); a jvp of it along e_k is the k-th
    # column of each output's Hessian. vmap over k shares the reverse pass between directions.
    jac_and_value = jax.jacrev(_with_copy(fn), has_aux=True)

    def hessian_column(v):
        (jac, value), (jac_dot, _) = jax.jvp(jac_and_value, (x,), (v,))
        return value, jac, jac_dot

    basis = jnp.eye(x.shape[0], dtype=x.dtype)
    value, jac, columns = jax.vmap(hessian_column, out_axes=(0, 0, -1))(basis)
    # columns[..., i, k] = d^2 f / dx_i dx_k: the Laplacian is the diagonal's sum.
    return value[0], jac[0], jnp.trace(columns, axis1=-2, axis2=-1)


def _hessian_trace(fn, x):
    def jac_with_aux(y):
        jac, value = jax.jacrev(_with_copy(fn), has_aux=True)(y)
        return jac, (jac, value)

    hess, (jac, value) = jax.jacfwd(jac_with_aux, has_aux=True)(x)
    return value, jac, jnp.trace(hess, axis1=-2, axis2=-1)


def _folx(fn, x):
    import folx  # deferred: only this method needs it

    try:
        # disable_jit: the caller decides where to jit; a nested jit only adds trace overhead.
        out = folx.forward_laplacian(fn, disable_jit=True)(x)
    except Exception as err:
        # folx interprets fn's jaxpr primitive by primitive and does not cover all of them
        # (in folx 0.2.30 e.g. lax.fori_loop with an integer carry fails).
        err.add_note(
            "nestedlora_jax.laplacians: folx could not propagate the Laplacian through fn; "
            "method='forward_over_forward' is the exact pure-JAX alternative."
        )
        raise
    if not isinstance(out, folx.api.FwdLaplArray):
        # An output that does not depend on x (e.g. a uniform log-density) comes back as a plain
        # array: its derivatives are zero.
        value = jnp.asarray(out)
        return value, jnp.zeros(value.shape + x.shape, value.dtype), jnp.zeros_like(value)
    # folx stores the Jacobian with the input axis first, (d, L); it may be sparse internally.
    jac = jnp.moveaxis(out.jacobian.dense_array, 0, -1)
    return out.x, jac, out.laplacian


def _default(fn, x):
    try:
        return _EXACT[DEFAULT_LAPLACIAN_METHOD](fn, x)
    except Exception as err:
        # Failures happen while tracing, so falling back keeps the call pure and jittable. A bug
        # in fn itself raises again from the fallback.
        warnings.warn(
            f"Laplacian method {DEFAULT_LAPLACIAN_METHOD!r} failed on this fn "
            f"({type(err).__name__}: {err}); using {FALLBACK_LAPLACIAN_METHOD!r} instead. "
            f"Pass method={FALLBACK_LAPLACIAN_METHOD!r} to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
        return _EXACT[FALLBACK_LAPLACIAN_METHOD](fn, x)


_EXACT = {
    "forward_over_forward": _forward_over_forward,
    "forward_over_reverse": _forward_over_reverse,
    "hessian_trace": _hessian_trace,
    "folx": _folx,
}


# --------------------------------------------------------------------------------------------
# Stochastic and finite-difference methods.
# --------------------------------------------------------------------------------------------


def _value_and_jacobian(fn, x, out_rank):
    # The estimators still return an exact gradient. Forward mode costs one jvp per input
    # dimension, reverse mode one vjp per output: take the cheaper (both exact).
    d = x.shape[0]
    num_outputs = 1 if out_rank == 0 else jax.eval_shape(fn, x).shape[0]
    if d <= num_outputs:
        basis = jnp.eye(d, dtype=x.dtype)
        value, jac = jax.vmap(lambda v: jax.jvp(fn, (x,), (v,)), out_axes=(0, -1))(basis)
        return value[0], jac
    value, vjp_fn = jax.vjp(fn, x)
    if out_rank == 0:
        (grad,) = vjp_fn(jnp.ones_like(value))
        return value, grad
    (jac,) = jax.vmap(vjp_fn)(jnp.eye(num_outputs, dtype=value.dtype))
    return value, jac


def _hutchinson(fn, x, key, num_probes, probe, return_grad, out_rank):
    shape = (num_probes, x.shape[0])
    if probe == "rademacher":
        probes = jax.random.rademacher(key, shape, dtype=x.dtype)
    else:
        probes = jax.random.normal(key, shape, dtype=x.dtype)
    _, _, quad = jax.vmap(lambda v: _second_directional(fn, x, v))(probes)
    lap = jnp.mean(quad, axis=0)
    if not return_grad:
        return lap
    value, grad = _value_and_jacobian(fn, x, out_rank)
    return value, grad, lap


def default_fd_step(dtype) -> float:
    """``eps(dtype) ** (1/4)`` rounded to a power of two: balances the O(h^2) truncation error
    against the O(eps / h^2) rounding error of a central second difference (2^-6 for float32,
    2^-13 for float64)."""
    return 2.0 ** round(math.log2(float(jnp.finfo(dtype).eps)) / 4)


def _finite_difference(fn, x, step, out_rank):
    d = x.shape[0]
    h = default_fd_step(x.dtype) if step is None else step
    offsets = h * jnp.eye(d, dtype=x.dtype)
    x_plus, x_minus = x + offsets, x - offsets
    # x + h is rounded, so the step actually taken differs from h by up to an ulp of x, which is
    # amplified by 1/h^2. Use the steps actually taken (recovered by subtraction to ~eps relative)
    # in the non-uniform three-point formula.
    h_plus = jnp.diagonal(x_plus) - x
    h_minus = x - jnp.diagonal(x_minus)
    value = fn(x)
    f_plus = jax.vmap(fn)(x_plus)
    f_minus = jax.vmap(fn)(x_minus)
    expand = (slice(None),) + (None,) * out_rank
    hp, hm = h_plus[expand], h_minus[expand]
    second = 2.0 * ((f_plus - value) / hp - (value - f_minus) / hm) / (hp + hm)
    lap = jnp.sum(second, axis=0)
    grad = jnp.moveaxis((f_plus - f_minus) / (hp + hm), 0, -1)
    return value, grad, lap


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def laplacian(
    fn: Callable[[Array], Array],
    x: Array,
    *,
    method: str = "default",
    key: Array | None = None,
    num_probes: int | None = None,
    return_grad: bool = False,
    fd_step: float | None = None,
):
    """Laplacian ``Lap f_l(x) = sum_k d^2 f_l(x) / dx_k^2`` of each output of ``fn`` at one point.

    Args:
      fn: maps one point of shape ``(d,)`` to an array of shape ``(L,)`` or a scalar ``()``.
      x: the point, shape ``(d,)``, floating dtype; the computation runs in this dtype.
      method: one of ``LAPLACIAN_METHODS``; ``"default"`` is ``DEFAULT_LAPLACIAN_METHOD``
        (``"folx"``), falling back with a ``RuntimeWarning`` to ``FALLBACK_LAPLACIAN_METHOD``
        (``"forward_over_forward"``) if folx cannot trace ``fn``.

        - ``"forward_over_forward"``: ``sum_k e_k^T H e_k`` with ``e_k^T H e_k`` the second
          tangent of ``jvp(jvp(f, e_k), e_k)``, vmapped over k. Exact.
        - ``"forward_over_reverse"``: ``sum_k (d/dx_k grad f_l)_k``, a jvp of the per-output
          gradient (``jacrev``) along each ``e_k``. Exact.
        - ``"hessian_trace"``: ``tr H_l`` with ``H = jacfwd(jacrev(f))``. Exact.
        - ``"folx"``: ``folx.forward_laplacian`` (forward Laplacian). Exact.
        - ``"hutchinson"``: ``(1/N) sum_n v_n^T H_l v_n``, ``v_n`` i.i.d. Rademacher (entries
          +-1), ``N = num_probes``. Unbiased because ``E[v v^T] = I``; per-probe variance
          ``2 sum_{i != j} H_ij^2`` (zero for a diagonal Hessian).
        - ``"hutchinson_gaussian"``: the same with ``v_n ~ N(0, I)``; per-probe variance
          ``2 ||H||_F^2``, never smaller than Rademacher's.
        - ``"finite_difference"``: ``sum_k (f(x + h e_k) - 2 f(x) + f(x - h e_k)) / h^2`` with
          ``h = fd_step`` (default ``default_fd_step(x.dtype)``). Error ``O(h^2 f'''') +
          O(d eps |f| / h^2)``: at best ~``sqrt(eps) |f|`` (~1e-4 |f| in
          float32), a large relative error when ``|Lap f| << |f|``.

      key: PRNG key for the Hutchinson methods (required there, ignored otherwise).
      num_probes: number of probes for the Hutchinson methods, an integer >= 1.
      return_grad: also return ``f(x)`` and its gradient.
      fd_step: step ``h`` for ``"finite_difference"`` (ignored otherwise).

    Returns:
      ``lap`` of shape ``(L,)`` or ``()``; with ``return_grad=True`` the tuple
      ``(value, grad, lap)``: ``value = fn(x)`` ``(L,)`` or ``()``, ``grad`` ``(L, d)`` or
      ``(d,)``. The exact methods get value and gradient from the same pass; the Hutchinson
      methods add ``min(d, L)`` jvps or vjps for an exact gradient; finite differences use
      the central first difference from the same evaluations.

    Raises:
      ValueError: unknown method; a Hutchinson method without ``key`` or with ``num_probes``
        missing or < 1; ``x`` not 1-D or not floating; ``fn`` not returning an ``(L,)`` or ``()``
        floating array.
    """
    method = _resolve_method(method)
    if method in STOCHASTIC_LAPLACIAN_METHODS:
        num_probes = _check_stochastic_args(method, key, num_probes)
    x = jnp.asarray(x)
    _check_x(x)
    out_rank = _check_output(fn, x)

    if method in STOCHASTIC_LAPLACIAN_METHODS:
        probe = "gaussian" if method == "hutchinson_gaussian" else "rademacher"
        return _hutchinson(fn, x, key, num_probes, probe, return_grad, out_rank)
    if method == "finite_difference":
        value, grad, lap = _finite_difference(fn, x, fd_step, out_rank)
    elif method == "default":
        value, grad, lap = _default(fn, x)
    else:
        value, grad, lap = _EXACT[method](fn, x)
    return (value, grad, lap) if return_grad else lap


def batched_laplacian(fn: Callable[[Array], Array], xs: Array, **kwargs):
    """``laplacian`` vmapped over a batch ``xs`` of shape ``(B, d)``.

    Takes the same keyword arguments as ``laplacian``; every output gains a leading ``B`` axis:
    ``lap`` ``(B, L)`` or ``(B,)``; with ``return_grad=True`` also ``value`` ``(B, L)`` or
    ``(B,)`` and ``grad`` ``(B, L, d)`` or ``(B, d)``. For the Hutchinson methods ``key`` is
    split into one key per sample, so the probes (and the errors) are independent across the
    batch.
    """
    xs = jnp.asarray(xs)
    if jnp.ndim(xs) != 2:
        raise ValueError(
            f"xs must be a batch of points of shape (B, d); got shape {jnp.shape(xs)}."
        )
    method = _resolve_method(kwargs.pop("method", "default"))
    if method in STOCHASTIC_LAPLACIAN_METHODS:
        key = kwargs.pop("key", None)
        _check_stochastic_args(method, key, kwargs.get("num_probes"))
        keys = jax.random.split(key, xs.shape[0])
        return jax.vmap(lambda x, k: laplacian(fn, x, method=method, key=k, **kwargs))(xs, keys)
    return jax.vmap(lambda x: laplacian(fn, x, method=method, **kwargs))(xs)
