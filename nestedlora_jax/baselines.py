"""Baselines with the same :class:`~nestedlora_jax.objectives.Objective` interface as NestedLoRA.

Both follow the public PyTorch reference of the NeuralSVD paper (jongharyu/neural-svd,
``methods/spin.py`` and ``methods/neuralef.py``), so that the same training loop, networks,
sampler and evaluation can run every method side by side. Conventions are the library's:
``f, Tf`` are ``(B, L)`` network outputs and operator outputs on a batch, inner products
are batch means, the operator ``T`` is self-adjoint in that inner product, its **top**
(largest, positive) eigenvalues are the wanted ones, and the returned scalar is
*minimised*; its gradient w.r.t. ``f`` is the method's update direction. No gradient ever
flows into ``Tf`` (it is wrapped in ``stop_gradient``), so a training step never
differentiates the operator.

**SpIN** (Pfau, Petersen, Agarwal, Barrett, Stachenfeld, "Spectral Inference Networks",
ICLR 2019). With ``Sigma = E[f f^T]``, ``Pi = E[f (Tf)^T]``, a moving average ``Sigma_bar``
of ``Sigma`` and ``Lc = chol(Sigma_bar + epsilon I)``::

    Lambda = Lc^{-1} Pi Lc^{-T},        loss = -tr(Lambda)

(the reference reports ``tr(Lambda)`` but its custom backward is the masked gradient of
``-tr(Lambda)``: gradient descent *maximises* the trace, i.e. finds the top eigenvalues).
The update is the *masked* gradient: ``lambda_k = Lambda_kk`` depends on ``f_1..f_k`` only
(``Lc`` is lower triangular) and is differentiated w.r.t. ``f_k`` alone. Per sample, with
``D = diag(Lc^{-1})``::

    dL/df_b = (2/B) [ (Tf)_b @ G_pi + f_b @ G_sigma ]
    G_pi    = -Lc^{-T} D,      G_sigma = Lc^{-T} triu(Lambda D)

These are the reference's ``gpi`` and ``gsigma`` (Pfau et al.'s ``gobj``/``gxx`` with the
sign flipped for maximisation). The reference lets ``G_pi`` flow through ``T f`` as well
as through ``f`` (its ``Covariance`` backward); for self-adjoint ``T`` the two contributions
are equal, hence the factor 2 on ``(Tf)_b @ G_pi`` without differentiating ``T``. Its
``Covariance`` backward also sends ``f @ G`` (not ``f @ (G + G^T)/2``) to each factor of
``Sigma``: that *is* the mask, and the ``2 f_b @ G_sigma`` above.

*The moving average of the Jacobian* (``jacobian="moving_average"``, the default, as Pfau
et al. and the reference run it). The ``G_sigma`` term is applied in parameter space: with
``J_lm = (2/B) sum_b f_bl df_bm/dtheta`` (the reference's ``j_new``; ``sum_lm G_lm J_lm`` is
what ``f_b @ G_sigma`` gives through the network), SpIN keeps a moving average ``Jbar`` of
``J`` (same decay as ``Sigma_bar``) and the update is::

    dL/dtheta = (2/B) sum_b (Tf_b @ G_pi) . df_b/dtheta  +  sum_lm (G_sigma)_lm Jbar_lm

An ``Objective`` only sees ``f``, and ``Jbar`` of past batches is not a function of the
current ``f``, so this part is the objective's ``parameter_term``: ``make_loss_fn`` hands it
the network, parameters and batch, and it adds a zero-valued term whose gradient is the
second sum. Cost: ``L`` reverse passes per sample for the per-sample Jacobians
(:func:`sigma_jacobian`) and a state of ``L^2`` times the parameters, as in the reference.
``jacobian="current_batch"`` (method ``"spin-batch-jacobian"``) uses the current batch's
``J`` instead: the f-space gradient ``(2/B) f_b @ G_sigma`` above, as cheap as NestedLoRA. The
two variants have the same stationary points. Pfau et al. average both ``Sigma`` and ``J`` so
that the update is a function of (approximately) full expectations, not of products of
estimates from one batch; with ``Sigma_bar`` already averaged, the current batch enters
``G_sigma`` only with weight ``decay``, so the batch's ``J`` is nearly independent of it, and
averaging ``J`` trades its variance for staleness (``Jbar`` lags the parameters by about
``1 / decay`` steps). With ``decay = 1`` the two are identical (tested).

*Second difference.* The reference starts ``Sigma_bar`` at zero with no correction, so for
the first ~``1/decay`` steps it is shrunk by ``1 - (1-decay)^t``. Here the average is
bias-corrected (divided by its accumulated weight, as in Adam), i.e. it is the weighted mean
of the batches seen so far; the two agree once ``(1-decay)^t`` is negligible. ``Jbar`` is
corrected by the same weight.

Learned eigenfunctions are ``Lc^{-1} f`` per sample (:func:`spin_objective`'s ``readout``).

**NeuralEF** (Deng, Shi, Zhu, "NeuralEF: Deconstructing Kernels by Deep Neural Networks",
ICML 2022). Outputs are normalised per function by their batch RMS, ``psi_j = f_j / ||f_j||``
with ``||f_j||^2 = mean_b f_bj^2`` (the gradient flows through the normalisation, as in the
reference's training mode), and ``Tpsi = Tf / ||f||`` (no gradient). The update for
``psi_j`` at sample ``b`` (in batch half ``h``)::

    dL/dpsi_bj = (4/B) [ -(Tpsi)_bj + sum_{l<j} (Tpsi)_bl C_lj ]

with ``C_lj = <psi_l, psi_j>`` (``variant="unbiased"``, the mu-EigenGame form of NeuralEF) or
``C_lj = <psi_l, Tpsi_j> / (<psi_l, Tpsi_l> + 1e-5)`` (``variant="original"``, Deng et al.),
estimated on the *other* half of the batch (``split_batch=True``; both halves' estimates are
independent, so the expected update is the population one) or on the whole batch. The
readout for evaluation divides by a running RMS (momentum 0.9, as the reference's
``batchnorm_mode='unbiased'``).

*Difference from the reference.* Its ``unbiased`` variant takes ``C`` for a sample from
the sample's **own** half (``gram_phi1`` pairs with ``Tphi1``), which makes the product of
two estimates biased by O(1/B); its ``original`` variant already pairs opposite halves. Here
both pair opposite halves by default; ``pairing="own"`` reproduces the reference's
``unbiased`` path exactly. Its running norm starts at the first batch's; here it is a
bias-corrected moving average (identical at the first step, same limit). (The reference's
evaluation also has ``norm = _norm_biased if self.batchnorm_mode else ...`` with a non-empty
string, so it always evaluates with the linear (not RMS) running average; we use the RMS
average that its hydrogen script asks for.)
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from nestedlora_jax._checks import check_even_batch
from nestedlora_jax.objectives import Objective, _check_pair, require_self_adjoint

__all__ = [
    "NEURALEF_PAIRINGS",
    "NEURALEF_VARIANTS",
    "NeuralEFState",
    "SPIN_JACOBIANS",
    "SpinState",
    "neuralef_objective",
    "sigma_jacobian",
    "spin_objective",
]

NEURALEF_VARIANTS = ("unbiased", "original")
NEURALEF_PAIRINGS = ("cross", "own")
_ORIGINAL_DENOM_EPS = 1e-5  # the reference's guard in <psi_l, T psi_l> + 1e-5


# ------------------------------------------------------------------ shared pieces


def _check_unit_interval(value, name, *, open_left, open_right):
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real number, got {value!r}.") from e
    lo_ok = v > 0 if open_left else v >= 0
    hi_ok = v < 1 if open_right else v <= 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if open_left else '['}0, 1{')' if open_right else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return v


def _check_init(L, dtype):
    if int(L) != L or L < 1:
        raise ValueError(f"the number of functions L must be a positive integer, got {L!r}.")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"the state dtype must be floating-point, got {dtype}.")
    return int(L), dtype


def _check_state_matches(L_state, f, method):
    L = f.shape[1]
    if L_state != L:
        raise ValueError(
            f"{method} state was initialised for L = {L_state} functions but f has L = {L} "
            f"(shape {f.shape}); call init({L}, dtype) for this network."
        )


def _ema_update(avg, weight, new, decay):
    """Bias-corrected moving average: returns the new (avg, weight) and avg / weight."""
    avg = (1 - decay) * avg + decay * new
    weight = (1 - decay) * weight + decay
    return avg, weight, avg / weight


# ------------------------------------------------------------------ SpIN

SPIN_JACOBIANS = ("moving_average", "current_batch")


class SpinState(NamedTuple):
    """SpIN's state: the moving averages of ``Sigma = E[f f^T]`` and of its Jacobian.

    Attributes:
      sigma_avg: ``(L, L)`` un-normalised moving average (starts at 0).
      weight: scalar, accumulated weight ``1 - (1 - decay)^t``; ``sigma_avg / weight`` is
        the bias-corrected average (``Sigma_bar``). Zero before the first step.
      jacobian_avg: with ``jacobian="moving_average"``, a pytree shaped like the network's
        parameters with two leading axes ``(L, L)``: the un-normalised moving average of
        ``J_lm = (2/B) sum_b f_bl df_bm/dtheta`` (same weight as ``sigma_avg``); ``None``
        for ``jacobian="current_batch"``.
    """

    sigma_avg: jax.Array
    weight: jax.Array
    jacobian_avg: Any = None


def _spin_sigma_bar(state: SpinState, dtype):
    """``Sigma_bar`` (identity before the first step, as the reference's intended default)."""
    L = state.sigma_avg.shape[0]
    w = state.weight.astype(dtype)
    safe = jnp.where(w > 0, w, 1)
    return jnp.where(w > 0, state.sigma_avg.astype(dtype) / safe, jnp.eye(L, dtype=dtype))


def _spin_factors(sigma_bar, epsilon):
    L = sigma_bar.shape[0]
    eye = jnp.eye(L, dtype=sigma_bar.dtype)
    chol = jnp.linalg.cholesky(sigma_bar + epsilon * eye)
    chol_inv = solve_triangular(chol, eye, lower=True)
    return chol, chol_inv


def _spin_value(f, Tf, sigma_bar, epsilon):
    _, chol_inv = _spin_factors(sigma_bar, epsilon)
    pi = f.T @ Tf / f.shape[0]
    return -jnp.trace(chol_inv @ pi @ chol_inv.T)


def _spin_gradient_factors(f, Tf, sigma_bar, epsilon):
    """``(G_pi, G_sigma)`` of the masked gradient (module docstring), each ``(L, L)``."""
    _, chol_inv = _spin_factors(sigma_bar, epsilon)
    lam = chol_inv @ (f.T @ Tf / f.shape[0]) @ chol_inv.T
    d = jnp.diagonal(chol_inv)  # D = diag(Lc^{-1}), applied as column scaling
    g_pi = -chol_inv.T * d  # -Lc^{-T} D
    g_sigma = chol_inv.T @ jnp.triu(lam * d)  # Lc^{-T} triu(Lambda D)
    return g_pi, g_sigma


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _spin_masked(f, Tf, sigma_bar, epsilon, sigma_term):
    """``-tr(Lambda)``, with SpIN's masked gradient w.r.t. ``f`` (none to Tf or Sigma_bar).

    ``sigma_term=False`` leaves out the ``f_b @ G_sigma`` part: the parameter-space moving
    average supplies it instead.
    """
    return _spin_value(f, Tf, sigma_bar, epsilon)


def _spin_masked_fwd(f, Tf, sigma_bar, epsilon, sigma_term):
    return _spin_value(f, Tf, sigma_bar, epsilon), (f, Tf, sigma_bar)


def _spin_masked_bwd(epsilon, sigma_term, residuals, ct):
    f, Tf, sigma_bar = residuals
    g_pi, g_sigma = _spin_gradient_factors(f, Tf, sigma_bar, epsilon)
    grad_f = Tf @ g_pi + f @ g_sigma if sigma_term else Tf @ g_pi
    return ct * (2.0 / f.shape[0]) * grad_f, jnp.zeros_like(Tf), jnp.zeros_like(sigma_bar)


_spin_masked.defvjp(_spin_masked_fwd, _spin_masked_bwd)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(c for c in range(1, min(n, cap) + 1) if n % c == 0)


def sigma_jacobian(apply, params, xs, f, *, chunk_size: int | None = None,
                   per_function: bool = False):
    """``J_lm = (2/B) sum_b f_bl d f_m(x_b) / d theta``: the Jacobian term of SpIN's update.

    ``sum_lm G_lm J_lm`` is the parameter-space gradient that ``f_b @ G`` gives in f-space
    (``dSigma/dtheta`` with the mask of Pfau et al.: one factor of ``Sigma`` varies).
    Per-point Jacobians, contracted with ``f`` ``chunk_size`` points at a time so memory stays
    ``O(chunk_size L P)`` (default: 64 points, or 1024 with ``per_function``, whose per-point
    Jacobian is just one gradient).

    Args:
      apply: ``apply(params, x)``, one point ``(d,)`` -> ``(L,)``.
      params: the parameters (a pytree; no gradient flows through this function).
      xs: ``(B, d)`` the batch.
      f: ``(B, L)`` the values ``apply(params, x_b)`` (the weights of the sum).
      per_function: the network is L independent networks whose every parameter leaf has
        the function index as its leading axis (``networks.ParallelMLPs``): ``df_m/dtheta`` is
        zero outside slice ``m``, so one reverse pass per point gives all of them and ``J``
        is stored without its zero blocks (``L`` times the parameters instead of ``L^2``).

    Returns:
      A pytree like ``params`` whose leaves have shape ``(L, L, *leaf.shape)``, or with
      ``per_function`` ``(L, *leaf.shape)`` (leaf axis 0 is ``m``: ``J_lm`` restricted to
      the slice it lives in).
    """
    params, f = jax.lax.stop_gradient(params), jax.lax.stop_gradient(f)
    B, L = f.shape
    if chunk_size is None:
        chunk_size = 1024 if per_function else 64
    c = _largest_divisor_at_most(B, chunk_size)
    if per_function:
        # d(sum_m f_m)/dtheta has df_m/dtheta_m in slice m of every leaf.
        jac_point = jax.grad(lambda p, x: jnp.sum(apply(p, x)))
        lead = (L,)
    else:
        jac_point = jax.jacrev(apply)  # leaves (L, *shape): L reverse passes
        lead = (L, L)

    def body(acc, chunk):
        xc, fc = chunk
        jac = jax.vmap(jac_point, in_axes=(None, 0))(params, xc)  # leaves (c, [L,] *shape)
        return jax.tree_util.tree_map(
            lambda a, j: a + jnp.einsum("bl,bm...->lm...", fc, j.astype(a.dtype)), acc, jac), None

    acc = jax.tree_util.tree_map(lambda p: jnp.zeros(lead + p.shape, p.dtype), params)
    chunks = (xs.reshape((B // c, c) + xs.shape[1:]), f.reshape(B // c, c, L))
    acc, _ = jax.lax.scan(body, acc, chunks)
    return jax.tree_util.tree_map(lambda a: a * (2.0 / B), acc)


def spin_objective(*, decay: float = 0.01, epsilon: float = 1e-3,
                   jacobian: str = "moving_average", per_function_parameters: bool = False,
                   chunk_size: int | None = None) -> Objective:
    """Spectral Inference Networks (SpIN) as an :class:`Objective` (name ``"spin"``).

    Each call of ``loss`` updates ``Sigma_bar`` with the batch's ``E[f f^T]`` (weight
    ``decay``, bias-corrected), then returns ``-tr(Lambda)`` with
    ``Lambda = Lc^{-1} E[f (Tf)^T] Lc^{-T}``, ``Lc = chol(Sigma_bar + epsilon I)``, whose
    gradient is SpIN's masked gradient (module docstring). ``diag(Lambda)`` estimates the
    top-L eigenvalues in decreasing order.

    Args:
      decay: weight of the new batch in the moving averages, in ``(0, 1]`` (reference: 0.01;
        1 means no averaging).
      epsilon: ridge added to ``Sigma_bar`` before the Cholesky factorisation, ``>= 0``
        (reference: 1e-3).
      jacobian: ``"moving_average"`` (Pfau et al. and the reference): the ``G_sigma`` term is
        contracted with a moving average of ``J = dSigma/dtheta`` in parameter space
        (:func:`sigma_jacobian`, L reverse passes per sample, state of ``L^2`` times the
        parameters; needs one network and a per-point operator). ``"current_batch"``: the
        current batch's Jacobian, i.e. the f-space gradient ``(2/B) f_b @ G_sigma`` (decay 1
        for the Jacobian only; no parameter-space state, as cheap as NestedLoRA).
      per_function_parameters: the network is L independent networks, every parameter leaf
        with the function index as leading axis (``architecture="parallel"``;
        :func:`sigma_jacobian`'s ``per_function``): the same update at one reverse pass per
        sample instead of L, with ``L`` instead of ``L^2`` copies of the parameters in the
        state. ``init`` checks the leading axes; independence of the slices is the caller's
        promise (:func:`~nestedlora_jax.solve` sets it for its parallel networks).
      chunk_size: points per chunk of the per-sample Jacobians (memory; default as in
        :func:`sigma_jacobian`).

    Returns:
      An :class:`Objective` with state :class:`SpinState`, ``readout(f, state) =
      f @ Lc^{-T}`` (``Lc^{-1} f`` per sample: the learned, approximately orthonormal
      eigenfunctions; ``Lc`` from the state) and ``needs_even_batch=False``; with
      ``"moving_average"`` its ``init(L, dtype, params)`` takes the parameters and its
      ``parameter_term`` adds the averaged Jacobian term.
    """
    decay = _check_unit_interval(decay, "decay", open_left=True, open_right=False)
    try:
        epsilon = float(epsilon)
    except (TypeError, ValueError) as e:
        raise ValueError(f"epsilon must be a real number, got {epsilon!r}.") from e
    if not (epsilon >= 0 and epsilon < float("inf")):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}.")
    if jacobian not in SPIN_JACOBIANS:
        raise ValueError(f"unknown SpIN jacobian {jacobian!r}; expected one of {SPIN_JACOBIANS}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, float))
                                   or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    chunk_size = None if chunk_size is None else int(chunk_size)
    if not isinstance(per_function_parameters, bool):
        raise ValueError(f"per_function_parameters must be a bool, got {per_function_parameters!r}.")
    averaged = jacobian == "moving_average"
    per_function = per_function_parameters and averaged

    def init(L, dtype=jnp.float32, params=None):
        L, dtype = _check_init(L, dtype)
        jac = None
        if averaged:
            if params is None:
                raise ValueError(
                    "SpIN with jacobian='moving_average' keeps a moving average shaped like the "
                    "parameters: call init(L, dtype, params) (init_train_state does), or use "
                    "spin_objective(jacobian='current_batch')."
                )
            if per_function:
                _check_per_function_leaves(params, L)
            lead = (L,) if per_function else (L, L)
            jac = jax.tree_util.tree_map(lambda p: jnp.zeros(lead + jnp.shape(p), jnp.result_type(p)), params)
        return SpinState(jnp.zeros((L, L), dtype), jnp.zeros((), dtype), jac)

    def loss(out, state):
        f, Tf = _check_pair(*require_self_adjoint(out, "SpIN"), "f", "Tf")
        _check_spin_state(state, f, averaged)
        Tf = jax.lax.stop_gradient(Tf)
        fs = jax.lax.stop_gradient(f)
        sigma = fs.T @ fs / f.shape[0]
        avg, weight, sigma_bar = _ema_update(
            state.sigma_avg.astype(f.dtype), state.weight.astype(f.dtype), sigma, decay
        )
        value = _spin_masked(f, Tf, sigma_bar, epsilon, not averaged)
        new_state = state._replace(sigma_avg=avg.astype(state.sigma_avg.dtype),
                                   weight=weight.astype(state.weight.dtype))
        return value, new_state

    def parameter_term(apply, params, xs, out, state):
        f, Tf = (jax.lax.stop_gradient(a) for a in require_self_adjoint(out, "SpIN"))
        j_avg = jax.tree_util.tree_map(
            lambda a, new: (1 - decay) * a + decay * new, state.jacobian_avg,
            sigma_jacobian(apply, params, xs, f, chunk_size=chunk_size, per_function=per_function))
        # loss() has already folded this batch into the weight shared by both averages.
        _, g_sigma = _spin_gradient_factors(f, Tf, _spin_sigma_bar(state, f.dtype), epsilon)
        w = state.weight
        if per_function:  # J_lm lives in slice m: sum_l G_lm J_lm, slice by slice
            contract = lambda g, a: jnp.einsum("lm,lm...->m...", g, a)
        else:
            contract = lambda g, a: jnp.tensordot(g, a, axes=2)
        direction = jax.tree_util.tree_map(
            lambda a: contract(g_sigma.astype(a.dtype), a / w.astype(a.dtype)), j_avg)
        # Value zero, gradient w.r.t. params = direction.
        term = sum(jnp.vdot(p, jax.lax.stop_gradient(d)) for p, d in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(direction)))
        return term - jax.lax.stop_gradient(term), state._replace(jacobian_avg=j_avg)

    def readout(f, state):
        f = jnp.asarray(f)
        if f.ndim != 2:
            raise ValueError(f"f must have shape (B, L), got shape {f.shape}.")
        if not jnp.issubdtype(f.dtype, jnp.floating):
            raise ValueError(f"f must be a floating-point array, got dtype {f.dtype}.")
        _check_spin_state(state, f, averaged)
        chol, _ = _spin_factors(_spin_sigma_bar(state, f.dtype), epsilon)
        return solve_triangular(chol, f.T, lower=True).T

    return Objective(
        name="spin" if averaged else "spin-batch-jacobian", init=init, loss=loss,
        readout=readout, needs_even_batch=False,
        parameter_term=parameter_term if averaged else None,
    )


def _check_per_function_leaves(params, L):
    bad = [jnp.shape(p) for p in jax.tree_util.tree_leaves(params)
           if jnp.ndim(p) < 1 or jnp.shape(p)[0] != L]
    if bad:
        raise ValueError(
            f"per_function_parameters=True needs every parameter leaf to carry the {L} functions "
            f"on its leading axis (L independent networks, architecture='parallel'); leaves of "
            f"shape {bad[:3]} do not. Use per_function_parameters=False for this network."
        )


def _check_spin_state(state, f, averaged):
    if not isinstance(state, SpinState):
        raise ValueError(
            f"SpIN expects its own state (SpinState from spin_objective().init), got "
            f"{type(state).__name__}."
        )
    if averaged and state.jacobian_avg is None:
        raise ValueError(
            "this SpinState has no Jacobian average: it was made by "
            "spin_objective(jacobian='current_batch'); use that objective with it, or init "
            "this one with init(L, dtype, params)."
        )
    if state.sigma_avg.ndim != 2 or state.sigma_avg.shape[0] != state.sigma_avg.shape[1]:
        raise ValueError(
            f"SpinState.sigma_avg must be (L, L), got shape {state.sigma_avg.shape}."
        )
    _check_state_matches(state.sigma_avg.shape[0], f, "SpIN")


# ------------------------------------------------------------------ NeuralEF


class NeuralEFState(NamedTuple):
    """NeuralEF's state: the running mean square of each output (for evaluation).

    Attributes:
      sq_norm_avg: ``(L,)`` un-normalised moving average of ``mean_b f_bj^2`` (starts at 0).
      weight: scalar, accumulated weight ``1 - momentum^t`` (bias correction); zero before
        the first step, when the readout is the identity.
    """

    sq_norm_avg: jax.Array
    weight: jax.Array


def _neuralef_coefficients(psi, Tpsi, variant):
    """``C`` of shape (L, L), strictly upper triangular: ``C_lj`` multiplies ``Tpsi_l`` for j."""
    B = psi.shape[0]
    if variant == "unbiased":
        c = psi.T @ psi / B  # <psi_l, psi_j>
    else:
        q = psi.T @ Tpsi / B  # <psi_l, T psi_j>
        c = q / (jnp.diagonal(q)[:, None] + _ORIGINAL_DENOM_EPS)
    return jnp.triu(c, k=1)


def _neuralef_update(psi, Tpsi, variant, split_batch, pairing):
    """Per-sample update ``(4/B) [-Tpsi + Tpsi @ C_other]`` and the matching value."""
    B = psi.shape[0]
    if split_batch:
        h = B // 2
        c_a = _neuralef_coefficients(psi[:h], Tpsi[:h], variant)
        c_b = _neuralef_coefficients(psi[h:], Tpsi[h:], variant)
        if pairing == "cross":
            c_a, c_b = c_b, c_a  # a sample in half a uses the moments of half b
        align = jnp.concatenate([Tpsi[:h] @ c_a, Tpsi[h:] @ c_b], axis=0)
    else:
        align = Tpsi @ _neuralef_coefficients(psi, Tpsi, variant)
    grad = (4.0 / B) * (align - Tpsi)
    # The reference's reported value: -sum_j <psi_j, T psi_j> + (1/2) sum_b psi_b . align_b
    value = (jnp.sum(psi * align) - jnp.sum(psi * Tpsi)) / B
    return grad, value


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _neuralef_masked(psi, Tpsi, variant, split_batch, pairing):
    return _neuralef_update(psi, Tpsi, variant, split_batch, pairing)[1]


def _neuralef_masked_fwd(psi, Tpsi, variant, split_batch, pairing):
    grad, value = _neuralef_update(psi, Tpsi, variant, split_batch, pairing)
    return value, (grad, Tpsi)


def _neuralef_masked_bwd(variant, split_batch, pairing, residuals, ct):
    grad, Tpsi = residuals
    return ct * grad, jnp.zeros_like(Tpsi)


_neuralef_masked.defvjp(_neuralef_masked_fwd, _neuralef_masked_bwd)


def neuralef_objective(
    *,
    variant: Literal["unbiased", "original"] = "unbiased",
    momentum: float = 0.9,
    split_batch: bool = True,
    pairing: Literal["cross", "own"] = "cross",
) -> Objective:
    """NeuralEF as an :class:`Objective` (name ``"neuralef"``).

    ``loss`` normalises ``psi = f / rms_batch(f)`` (differentiably) and returns a scalar
    whose gradient w.r.t. ``psi`` is, per sample ``b`` and function ``j``::

        (4/B) [ -(Tpsi)_bj + sum_{l<j} (Tpsi)_bl C_lj ]

    (module docstring for ``C``), chained through the normalisation to ``f``; the value is
    the reference's ``-sum_j <psi_j, T psi_j> + (1/2) sum_h sum_{l<j} C^h_lj <psi_j, T psi_l>_h``,
    which tends to ``-sum_j lambda_j`` at the solution. The state tracks a running RMS of
    each output for ``readout``.

    Args:
      variant: ``"unbiased"`` (mu-EigenGame form, ``C = <psi_l, psi_j>``; the reference's
        default in its PDE experiments) or ``"original"`` (Deng et al.,
        ``C = <psi_l, T psi_j> / <psi_l, T psi_l>``).
      momentum: of the running mean square used by ``readout``, in ``[0, 1)``
        (reference: 0.9).
      split_batch: estimate ``C`` from batch halves (B must be even) so that it is
        independent of the sample it multiplies; ``False`` uses the whole batch (the
        original NeuralEF, and deterministic full-population problems).
      pairing: with ``split_batch``, ``"cross"`` (default) takes ``C`` for a sample from
        the other half (unbiased); ``"own"`` from its own half (the reference's
        ``unbiased=True`` code path, biased by O(1/B)).

    Returns:
      An :class:`Objective` with state :class:`NeuralEFState`, ``readout(f, state) =
      f / running_rms`` and ``needs_even_batch=split_batch``.
    """
    if variant not in NEURALEF_VARIANTS:
        raise ValueError(
            f"unknown NeuralEF variant {variant!r}; expected one of {NEURALEF_VARIANTS}."
        )
    if pairing not in NEURALEF_PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; expected one of {NEURALEF_PAIRINGS}.")
    if not isinstance(split_batch, bool):
        raise ValueError(f"split_batch must be a bool, got {split_batch!r}.")
    momentum = _check_unit_interval(momentum, "momentum", open_left=False, open_right=True)

    def init(L, dtype=jnp.float32):
        L, dtype = _check_init(L, dtype)
        return NeuralEFState(jnp.zeros((L,), dtype), jnp.zeros((), dtype))

    def loss(out, state):
        f, Tf = _check_pair(*require_self_adjoint(out, "NeuralEF"), "f", "Tf")
        _check_neuralef_state(state, f)
        if split_batch:
            check_even_batch(f.shape[0], "the batch size of f")
        sq_norm = jnp.mean(f * f, axis=0)  # (L,), differentiable
        rms = jnp.sqrt(sq_norm)
        psi = f / rms
        Tpsi = jax.lax.stop_gradient(Tf / rms)
        value = _neuralef_masked(psi, Tpsi, variant, split_batch, pairing)
        avg, weight, _ = _ema_update(
            state.sq_norm_avg.astype(f.dtype),
            state.weight.astype(f.dtype),
            jax.lax.stop_gradient(sq_norm),
            1.0 - momentum,
        )
        new_state = NeuralEFState(
            avg.astype(state.sq_norm_avg.dtype), weight.astype(state.weight.dtype)
        )
        return value, new_state

    def readout(f, state):
        f = jnp.asarray(f)
        if f.ndim != 2:
            raise ValueError(f"f must have shape (B, L), got shape {f.shape}.")
        _check_neuralef_state(state, f)
        w = state.weight
        safe = jnp.where(w > 0, w, 1)
        rms = jnp.where(w > 0, jnp.sqrt(state.sq_norm_avg / safe), 1)
        return f / rms.astype(jnp.result_type(f.dtype, rms.dtype))

    return Objective(
        name="neuralef",
        init=init,
        loss=loss,
        readout=readout,
        needs_even_batch=bool(split_batch),
    )


def _check_neuralef_state(state, f):
    if not isinstance(state, NeuralEFState):
        raise ValueError(
            f"NeuralEF expects its own state (NeuralEFState from neuralef_objective().init), "
            f"got {type(state).__name__}."
        )
    if state.sq_norm_avg.ndim != 1:
        raise ValueError(
            f"NeuralEFState.sq_norm_avg must be (L,), got shape {state.sq_norm_avg.shape}."
        )
    _check_state_matches(state.sq_norm_avg.shape[0], f, "NeuralEF")
