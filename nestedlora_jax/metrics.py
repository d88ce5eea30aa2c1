"""Evaluation metrics for learned eigenfunctions: pure array functions.

Inputs are arrays of function values at N evaluation points:

* ``f``   (N, L)  learned functions, ``Tf`` (N, L) the operator applied to them;
* ``psi`` (N, Lt) exact eigenfunctions; ``exact`` (Lt,) exact eigenvalues;
* ``w``   (N,)    nonnegative weights: every inner product is ``<a, b> = sum_n w_n a_n b_n``.
  Quadrature weights on a grid, or ``1/N`` for samples that already estimate L2(dx) (importance
  weighting is the caller's business);
* for an SVD, ``f`` (N, L) and ``Tg`` (N, L) on the left points, ``g`` (M, L) on the right
  points with weights ``wg`` (:func:`singular_ritz`, :func:`svd_metrics`);
* ``blocks``: degenerate levels as half-open index ranges ``[(0, 1), (1, 3), (3, 6)]``, applied
  to the columns of both ``f`` and ``psi``. They must tile a prefix ``[0, K)`` in order;
  ``None`` means one block per state. :func:`degenerate_blocks` builds them from eigenvalues.
  A block must not cut a degenerate level (choose L at a level boundary).

Everything is ``jnp`` and jit-compatible (``blocks`` is static: close over it). Results with
several parts are NamedTuples (pytrees). :func:`summary_table` formats a dict of results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Blocks = Sequence[tuple[int, int]]

__all__ = [
    "inner",
    "gram",
    "normalised_gram",
    "norms_squared",
    "rayleigh_quotients",
    "RelativeErrors",
    "relative_errors",
    "Orthogonality",
    "orthogonality",
    "degenerate_blocks",
    "SubspaceDistance",
    "subspace_distance",
    "AngleDistance",
    "angle_distance",
    "residuals",
    "RayleighRitz",
    "rayleigh_ritz",
    "SingularRitz",
    "singular_ritz",
    "svd_metrics",
    "summary_table",
]


# --------------------------------------------------------------------------- inner products


def inner(a: Array, b: Array, w: Array) -> Array:
    """Cross Gram ``C_ij = <a_i, b_j> = sum_n w_n a_ni b_nj``: (N, La), (N, Lb) -> (La, Lb)."""
    return jnp.einsum("n,ni,nj->ij", w, a, b)


def gram(f: Array, w: Array) -> Array:
    """Gram matrix ``G_ij = <f_i, f_j>``: (N, L) -> (L, L)."""
    return inner(f, f, w)


def norms_squared(f: Array, w: Array) -> Array:
    """``||f_i||^2`` (L,). At the NestedLoRA optimum (g = f) this estimates ``lambda_i``."""
    return jnp.einsum("n,ni->i", w, jnp.square(f))


def rayleigh_quotients(f: Array, Tf: Array, w: Array) -> Array:
    """``<f_i, T f_i> / <f_i, f_i>`` (L,)."""
    return jnp.einsum("n,ni,ni->i", w, f, Tf) / norms_squared(f, w)


def _unit(f: Array, w: Array) -> Array:
    """Columns scaled to unit w-norm; an all-zero (collapsed) column stays zero instead of NaN."""
    n2 = norms_squared(f, w)
    return f / jnp.sqrt(jnp.where(n2 > 0, n2, 1))


class RelativeErrors(NamedTuple):
    per_state: Array  # (L,) |est_i - exact_i| / |exact_i|
    mean: Array  # ()


def relative_errors(estimated: Array, exact: Array) -> RelativeErrors:
    """``|est_i - exact_i| / |exact_i|`` per state and their mean; compares the first
    ``min(len(estimated), len(exact))`` entries."""
    estimated, exact = jnp.asarray(estimated), jnp.asarray(exact)
    k = min(estimated.shape[0], exact.shape[0])
    err = jnp.abs(estimated[:k] - exact[:k]) / jnp.abs(exact[:k])
    return RelativeErrors(err, jnp.mean(err))


def normalised_gram(f: Array, w: Array) -> Array:
    """``G_ij = <f_i, f_j> / (||f_i|| ||f_j||)`` (L, L); a zero function gives a zero row."""
    return gram(_unit(f, w), w)


class Orthogonality(NamedTuple):
    frobenius: Array  # () ||G - I||_F / L
    max_offdiag: Array  # () max_{i != j} |G_ij|


def orthogonality(f: Array, w: Array) -> Orthogonality:
    """Off-diagonal size of the normalised Gram ``G_ij = <f_i, f_j> / (||f_i|| ||f_j||)``.

    Returns ``||G - I||_F / L`` and ``max_{i != j} |G_ij|`` (0 for L = 1). A zero (collapsed)
    function has a zero row and column in G (so it counts fully in the Frobenius term).
    """
    g = normalised_gram(f, w)
    n = g.shape[0]
    eye = jnp.eye(n, dtype=g.dtype)
    off = jnp.abs(g) * (1 - eye)
    return Orthogonality(jnp.linalg.norm(g - eye) / n, jnp.max(off))


# --------------------------------------------------------------------------- blocks


def degenerate_blocks(
    eigenvalues: Sequence[float], num: int | None = None, *, rtol: float = 1e-6
) -> list[tuple[int, int]]:
    """Group consecutive (numerically) equal eigenvalues into half-open index ranges.

    ``|e_i - e_{i-1}| <= rtol * max(|e_i|, |e_{i-1}|)`` puts i in the block of i - 1. With
    ``num``, only blocks lying entirely in ``[0, num)`` are kept (a level cut by ``num`` is
    dropped, since its subspace is not determined). NumPy, static output.
    """
    e = np.asarray(eigenvalues, dtype=float).ravel()
    blocks, start = [], 0
    for i in range(1, len(e) + 1):
        if i == len(e) or abs(e[i] - e[i - 1]) > rtol * max(abs(e[i]), abs(e[i - 1])):
            blocks.append((start, i))
            start = i
    if num is not None:
        blocks = [b for b in blocks if b[1] <= num]
    return blocks


def _check_blocks(blocks: Blocks | None, limit: int) -> list[tuple[int, int]]:
    """Validate that blocks tile ``[0, K)`` in order with ``K <= limit``; None -> singletons."""
    if blocks is None:
        return [(i, i + 1) for i in range(limit)]
    out, expected = [], 0
    for b in blocks:
        try:
            start, stop = (int(v) for v in b)
        except (TypeError, ValueError):
            raise ValueError(f"each block must be a (start, stop) pair, got {b!r}") from None
        if start != expected or stop <= start:
            raise ValueError(
                f"blocks must be consecutive non-empty (start, stop) ranges tiling [0, K), "
                f"got {list(blocks)!r}"
            )
        out.append((start, stop))
        expected = stop
    if not out:
        raise ValueError("blocks must not be empty")
    if expected > limit:
        raise ValueError(
            f"blocks reach index {expected} but only {limit} functions are available in both "
            f"the learned and the exact set"
        )
    return out


# --------------------------------------------------------------------------- subspaces


def _orthonormal_basis(f: Array, w: Array, rtol: float) -> tuple[Array, Array]:
    """Orthonormal basis of span(f) in the w-inner product, as weighted values.

    SVD of ``sqrt(w) f = U S V^T``: the columns of U with ``S > rtol * max(S)`` are an
    orthonormal basis of the (weighted) span; the others are masked out rather than dropped so
    the shapes stay static (jit). A collapsed (zero) function thus reduces the rank instead of
    contributing an arbitrary direction. Returns (U (N, k), mask (k,)).
    """
    u, s, _ = jnp.linalg.svd(jnp.sqrt(w)[:, None] * f, full_matrices=False)
    mask = s > rtol * jnp.max(s)
    return u, mask.astype(u.dtype)


def _projector_overlap(f: Array, psi: Array, w: Array, rtol: float) -> Array:
    """``tr(P_psi P_f)`` for the w-orthogonal projectors onto span(psi) and span(f)."""
    uf, mf = _orthonormal_basis(f, w, rtol)
    up, mp = _orthonormal_basis(psi, w, rtol)
    overlap = jnp.square(up.T @ uf) * mp[:, None] * mf[None, :]
    return jnp.sum(overlap)


class SubspaceDistance(NamedTuple):
    per_block: Array  # (num_blocks,) 1 - tr(P_true P_learned) / k
    mean: Array  # () mean over blocks
    total: Array  # () the same for the span of all K = blocks[-1][1] functions


def subspace_distance(
    f: Array, psi: Array, w: Array, blocks: Blocks | None = None, *, rtol: float = 1e-6
) -> SubspaceDistance:
    """Per degenerate block of size k: ``1 - tr(P_true P_learned) / k`` in [0, 1].

    ``P`` are the w-orthogonal projectors onto the spans of ``psi[:, block]`` and
    ``f[:, block]`` (the scale and the rotation of the learned functions inside the block do
    not matter; directions with singular value below ``rtol * max`` count as absent, so a
    collapsed function costs ``1/k``). ``total`` compares the spans of the first
    ``K = blocks[-1][1]`` functions of both sets (the whole top-L span by default).
    """
    blocks = _check_blocks(blocks, min(f.shape[1], psi.shape[1]))
    # Clipped at 0: round-off can push 1 - tr(.)/k to -1e-16.
    per_block = jnp.stack(
        [
            jnp.maximum(1 - _projector_overlap(f[:, a:b], psi[:, a:b], w, rtol) / (b - a), 0)
            for a, b in blocks
        ]
    )
    k = blocks[-1][1]
    total = jnp.maximum(1 - _projector_overlap(f[:, :k], psi[:, :k], w, rtol) / k, 0)
    return SubspaceDistance(per_block, jnp.mean(per_block), total)


class AngleDistance(NamedTuple):
    per_function: Array  # (K,) 1 - |cos angle(psi_i, aligned f_i)|
    mean: Array  # ()
    aligned: Array  # (N, K) unit-norm learned functions after alignment, block by block


def angle_distance(
    f: Array, psi: Array, w: Array, blocks: Blocks | None = None, *, align: bool = True
) -> AngleDistance:
    """Per-function angle distance after orthogonal Procrustes alignment within each block.

    In each block, with ``F`` the learned functions normalised to unit w-norm and ``Psi`` the
    normalised exact ones, the orthogonal ``Q`` minimising ``||F Q - Psi||_w`` is ``Q = U V^T``
    from the SVD ``<F, Psi> = U S V^T`` (k x k). Then per function
    ``1 - |<psi_i, (FQ)_i>| / (||psi_i|| ||(FQ)_i||)``. Singleton blocks reduce to
    ``1 - |cos angle(psi_i, f_i)|``. ``align=False`` skips the alignment (Q = I).

    Returns the per-function values (K,), their mean, and the aligned unit-norm functions
    (N, K) (for plots: compare ``aligned[:, i]`` with ``psi[:, i] / ||psi_i||``). A zero
    (collapsed) function stays zero and gets distance 1 rather than NaN.
    """
    blocks = _check_blocks(blocks, min(f.shape[1], psi.shape[1]))
    k = blocks[-1][1]
    fn = _unit(f[:, :k], w)
    pn = _unit(psi[:, :k], w)
    aligned = []
    for a, b in blocks:
        fb = fn[:, a:b]
        if align and b - a > 1:
            u, _, vt = jnp.linalg.svd(inner(fb, pn[:, a:b], w))
            fb = fb @ (u @ vt)
        aligned.append(fb)
    aligned = jnp.concatenate(aligned, axis=1)
    # F Q has unit columns only if F was orthonormal: renormalise for a true cosine.
    aligned = _unit(aligned, w)
    cos = jnp.einsum("n,ni,ni->i", w, aligned, pn)
    per_function = jnp.maximum(1 - jnp.abs(cos), 0)  # clip round-off below 0
    return AngleDistance(per_function, jnp.mean(per_function), aligned)


# --------------------------------------------------------------------------- eigen-residuals


def residuals(f: Array, Tf: Array, lam: Array | None, w: Array) -> Array:
    """``||T f_i - lam_i f_i|| / ||f_i||`` (L,); ``lam=None`` uses the Rayleigh quotients.

    Zero iff f_i is an eigenfunction with eigenvalue lam_i. Units are those of T (pass ``H f``
    and energies to get it in energy units). It converges much more slowly than the
    eigenvalues (an eigenvalue error is quadratic in the function's error, the residual
    linear): report both.
    """
    if lam is None:
        lam = rayleigh_quotients(f, Tf, w)
    r = Tf - jnp.asarray(lam)[None, :] * f
    return jnp.sqrt(norms_squared(r, w) / norms_squared(f, w))


def _whitening(G: Array, rtol: float) -> tuple[Array, Array]:
    """``W`` with ``W^T G W = diag(keep)``: the kept eigen-directions of ``G`` whitened, the
    dropped ones (``g <= rtol max g``) zero columns, so shapes stay static."""
    g_vals, v = jnp.linalg.eigh(G)
    keep = g_vals > rtol * jnp.max(g_vals)
    return v * jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, g_vals, 1)), 0)[None, :], keep


class RayleighRitz(NamedTuple):
    eigenvalues: Array  # (L,) descending; NaN beyond rank
    coefficients: Array  # (L, L) column j: coefficients of Ritz vector j in f (zero beyond rank)
    rank: Array  # () number of kept directions of the Gram matrix


def rayleigh_ritz(f: Array, Tf: Array, w: Array, *, rtol: float = 1e-6) -> RayleighRitz:
    """Ritz values of T on span(f): the generalised eigenproblem ``A c = theta G c``.

    ``A = sym(<f_i, T f_j>)``, ``G = <f_i, f_j>``. Robust to a near-singular G: with
    ``G = V diag(g) V^T``, directions with ``g <= rtol * max(g)`` are dropped and the rest
    whitened, ``W = V_keep diag(g_keep^-1/2)``; then ``eigh(W^T A W)``. To keep shapes static
    (jit) the dropped directions are not removed but pushed below every kept Ritz value by a
    diagonal shift (the whitened matrix is block diagonal, so this does not mix them in), then
    reported as NaN with zero coefficients.

    Returns eigenvalues sorted descending (L,), coefficients (L, L) with the Ritz functions
    ``f @ coefficients`` (w-orthonormal for the kept columns), and the rank.
    """
    a = inner(f, Tf, w)
    a = (a + a.T) / 2
    whiten, keep = _whitening(gram(f, w), rtol)
    b = whiten.T @ a @ whiten
    b = (b + b.T) / 2
    shift = 2 * jnp.max(jnp.abs(b)) + 1
    b = b - jnp.diag(jnp.where(keep, 0, shift))
    theta, y = jnp.linalg.eigh(b)  # ascending
    theta, y = theta[::-1], y[:, ::-1]
    rank = jnp.sum(keep)
    valid = jnp.arange(theta.shape[0]) < rank
    theta = jnp.where(valid, theta, jnp.nan)
    coefficients = (whiten @ y) * valid[None, :]
    return RayleighRitz(theta, coefficients, rank)


# --------------------------------------------------------------------------- SVD


class SingularRitz(NamedTuple):
    singular_values: Array  # (L,) descending; NaN beyond rank
    left: Array  # (L, L) column j: coefficients of the j-th left Ritz function in f
    right: Array  # (L, L) the same for g


def singular_ritz(f: Array, Tg: Array, g: Array, wf: Array, wg: Array, *,
                  rtol: float = 1e-6) -> SingularRitz:
    """Singular values of ``T`` restricted to ``span(f) x span(g)``: the SVD analogue of
    :func:`rayleigh_ritz`.

    With ``C_ij = <f_i, T g_j>`` (from ``f`` and ``Tg`` under ``wf``) and whitenings ``W_f``,
    ``W_g`` of the Gram matrices ``<f_i, f_j>``, ``<g_i, g_j>``: ``svd(W_f^T C W_g) = U S V^T``.
    ``S`` are the best approximations of the top singular values the two spans allow (each is
    at most the true one, up to the estimation error of ``C``); the Ritz functions are
    ``f @ left`` and ``g @ right``. Singular values beyond the rank of either Gram are NaN.
    """
    Wf, kf = _whitening(gram(f, wf), rtol)
    Wg, kg = _whitening(gram(g, wg), rtol)
    u, sv, vt = jnp.linalg.svd(Wf.T @ inner(f, Tg, wf) @ Wg)
    rank = jnp.minimum(jnp.sum(kf), jnp.sum(kg))
    sv = jnp.where(jnp.arange(sv.shape[0]) < rank, sv, jnp.nan)
    return SingularRitz(sv, Wf @ u, Wg @ vt.T)


def svd_metrics(f: Array, Tg: Array, g: Array, wf: Array, wg: Array, *, exact: Array | None = None,
                phi: Array | None = None, psi: Array | None = None,
                blocks: Blocks | None = None) -> dict:
    """The evaluation protocol for learned singular functions ``f`` (left) and ``g`` (right).

    Returns a dict with
    ``singular_values`` (Ritz, :func:`singular_ritz`), ``norms`` (``||f_i|| ||g_i||``, the
    NestedLoRA estimate), ``orthogonality_left`` / ``_right`` (max off-diagonal of each
    family's normalised Gram); with ``exact`` (L,) descending singular values also
    ``rel_error`` (Ritz) and ``rel_error_norm`` per function with their ``mean_`` / ``max_``;
    with the exact left functions ``phi`` (N, L) (at the points of ``f``) and right functions
    ``psi`` (M, L): ``subspace_distance_left`` / ``_right`` (mean over ``blocks``),
    ``..._total`` (the whole span) and ``angle_distance_left`` / ``_right`` (per function, as
    learned, in nesting order: no re-ordering by the Ritz values).
    """
    ritz = singular_ritz(f, Tg, g, wf, wg)
    norms = jnp.sqrt(norms_squared(f, wf) * norms_squared(g, wg))
    out = {
        "singular_values": ritz.singular_values,
        "norms": norms,
        "orthogonality_left": orthogonality(f, wf).max_offdiag,
        "orthogonality_right": orthogonality(g, wg).max_offdiag,
    }
    if exact is not None:
        exact = jnp.asarray(exact)
        for key, value in (("rel_error", ritz.singular_values), ("rel_error_norm", norms)):
            rel = jnp.abs(value - exact) / jnp.abs(exact)
            out[key], out[f"mean_{key}"], out[f"max_{key}"] = rel, jnp.mean(rel), jnp.max(rel)
    for side, learned, true, w in (("left", f, phi, wf), ("right", g, psi, wg)):
        if true is None:
            continue
        sub = subspace_distance(learned, true, w, blocks)
        out[f"subspace_distance_{side}"] = sub.mean
        out[f"subspace_distance_{side}_total"] = sub.total
        out[f"angle_distance_{side}"] = angle_distance(learned, true, w, blocks).per_function
    return out


# --------------------------------------------------------------------------- table

# Known per-state columns: key -> (header, format).
_COLUMNS = {
    "exact": ("E exact", "{:.8g}"),
    "rayleigh": ("E Rayleigh", "{:.8g}"),
    "norm": ("E norm", "{:.8g}"),
    "rel_error": ("rel err", "{:.2e}"),
    "rel_error_se": ("+- (se)", "{:.1e}"),
    "residual": ("residual", "{:.2e}"),
    "angle_distance": ("angle dist", "{:.2e}"),
}


def _flatten_metrics(metrics: Mapping) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple results
            for field in value._fields:
                out[f"{key}.{field}"] = getattr(value, field)
        else:
            out[key] = value
    return out


def _fmt(value, fmt: str = "{:.4g}") -> str:
    v = float(value)
    return "nan" if np.isnan(v) else fmt.format(v)


def summary_table(metrics: Mapping, *, title: str | None = None) -> str:
    """Format metrics as a fixed-width text table: one row per state, then the aggregates.

    Keys with 1-D values as long as the longest 1-D value are per-state columns; the known ones
    come first in this order: ``exact``, ``rayleigh``, ``norm``, ``rel_error``, ``residual``,
    ``angle_distance`` (missing ones are omitted, shorter columns padded with blanks); other
    per-state keys follow in dict order. Scalars (and other 1-D values, e.g. per-block
    distances) are listed below as ``name: value``. NamedTuple values (results of this module)
    are expanded into ``key.field`` entries; arrays with 2+ dims are skipped.
    """
    flat = {k: np.asarray(v) for k, v in _flatten_metrics(metrics).items()}
    one_d = {k: v for k, v in flat.items() if v.ndim == 1}
    n = max((v.shape[0] for k, v in one_d.items() if k in _COLUMNS), default=0)
    n = n or max((v.shape[0] for v in one_d.values()), default=0)
    columns = [k for k in _COLUMNS if k in one_d and one_d[k].shape[0] <= n]
    columns += [k for k, v in one_d.items() if k not in _COLUMNS and v.shape[0] == n]
    lines = [] if title is None else [title]
    if columns:
        headers = ["state"] + [_COLUMNS.get(k, (k, ""))[0] for k in columns]
        rows = []
        for i in range(n):
            row = [str(i)]
            for k in columns:
                v = one_d[k]
                row.append(_fmt(v[i], _COLUMNS.get(k, ("", "{:.4g}"))[1]) if i < v.shape[0] else "")
            rows.append(row)
        widths = [max(len(r[j]) for r in [headers] + rows) for j in range(len(headers))]
        fmt_row = lambda r: "  ".join(s.rjust(wd) for s, wd in zip(r, widths))
        lines += [fmt_row(headers), "  ".join("-" * wd for wd in widths)]
        lines += [fmt_row(r) for r in rows]
    aggregates = [
        (k, v) for k, v in flat.items() if v.ndim == 0 or (v.ndim == 1 and k not in columns)
    ]
    if aggregates:
        lines.append("")
        width = max(len(k) for k, _ in aggregates)
        for k, v in aggregates:
            text = _fmt(v) if v.ndim == 0 else "[" + ", ".join(_fmt(x) for x in v) + "]"
            lines.append(f"{k.ljust(width)} : {text}")
    return "\n".join(lines)
