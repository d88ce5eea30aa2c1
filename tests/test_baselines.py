"""SpIN and NeuralEF baselines: masked gradients against explicit autodiff constructions,
recovery of numpy.linalg.eigh's top-L pairs, state bookkeeping and input validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from linalg_cases import symmetric_matrix
import pytest

from nestedlora_jax.baselines import (
    NeuralEFState,
    SpinState,
    neuralef_objective,
    spin_objective,
)
from nestedlora_jax.objectives import OperatorOutput

sg = jax.lax.stop_gradient
# The f-space variant: its loss alone is the whole update, so it is tested on f directly.
spin_current = functools.partial(spin_objective, jacobian="current_batch")


# ------------------------------------------------------------------ 1. SpIN gradient


def _spin_reference_loss(W, A, state, decay, epsilon):
    """Explicit masked SpIN objective, autodiff *through* T f = A f.

    ``-sum_k Lambda_kk`` where term k sees only ``f_k`` as variable (the others are
    stop-gradiented): the mask of Pfau et al. ``Sigma`` enters as ``Sigma_bar`` in value,
    with the current batch's derivative (``Sigma_bar + Sigma - sg(Sigma)``): our f-space
    version of the Jacobian term.
    """
    n, L = W.shape
    sigma_now = W.T @ W / n
    avg = (1 - decay) * state.sigma_avg + decay * sigma_now
    sigma_bar = sg(avg / ((1 - decay) * state.weight + decay))
    total = 0.0
    for k in range(L):
        Wk = jnp.concatenate([sg(W[:, :k]), W[:, k : k + 1], sg(W[:, k + 1 :])], axis=1)
        sigma = Wk.T @ Wk / n
        chol = jnp.linalg.cholesky(sigma_bar + sigma - sg(sigma) + epsilon * jnp.eye(L))
        chol_inv = jnp.linalg.inv(chol)
        pi = Wk.T @ (A @ Wk) / n
        total = total - (chol_inv @ pi @ chol_inv.T)[k, k]
    return total


@pytest.mark.parametrize("decay, epsilon", [(0.01, 1e-3), (0.3, 1e-2), (1.0, 0.0)])
def test_spin_masked_gradient_matches_autodiff_reference(decay, epsilon):
    n, L = 16, 5
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        A = jnp.asarray(symmetric_matrix(n, [], -2.0, 2.0, seed=1))
        W = jnp.asarray(rng.standard_normal((n, L)))
        obj = spin_current(decay=decay, epsilon=epsilon)
        state = obj.init(L, jnp.float64)
        W_prev = jnp.asarray(rng.standard_normal((n, L)))
        _, state = obj.loss(OperatorOutput(W_prev, A @ W_prev), state)  # a non-trivial moving average

        ours = lambda W: obj.loss(OperatorOutput(W, A @ W), state)[0]
        reference = lambda W: _spin_reference_loss(W, A, state, decay, epsilon)
        (v_ours, g_ours), (v_ref, g_ref) = (
            jax.jit(jax.value_and_grad(fn))(W) for fn in (ours, reference)
        )
        np.testing.assert_allclose(v_ours, v_ref, rtol=1e-12)
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------ 1b. SpIN in parameter space


def _mlp(p, x):
    return p["W2"] @ jnp.tanh(p["W1"] @ x + p["b1"])


def _mlp_params(key, d=3, width=8, L=4):
    k1, k2 = jax.random.split(key)
    return {"W1": jax.random.normal(k1, (width, d)), "b1": jnp.zeros(width),
            "W2": 0.5 * jax.random.normal(k2, (L, width))}


def _radial_op(fn, x):
    """A per-point self-adjoint (multiplication) operator: T f = (2 - |x|^2) f."""
    f = fn(x)
    return f, (2.0 - x @ x) * f


def _tree_max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_spin_jacobian_average_matches_explicit_reference():
    """Pfau et al.'s update, built independently: full per-sample Jacobians of the batch,
    ``J_lm = (2/B) sum_b f_bl df_bm/dtheta``, their bias-corrected moving average, and
    ``grad = (2/B) sum_b (Tf_b @ G_pi) . df_b/dtheta + sum_lm G_sigma_lm Jbar_lm``, over
    four steps of an evolving network; with decay 1 it equals the f-space variant."""
    from nestedlora_jax.baselines import _spin_gradient_factors
    from nestedlora_jax.training import make_loss_fn

    B, L, decay, eps = 12, 4, 0.3, 1e-3
    with jax.enable_x64(True):
        params = _mlp_params(jax.random.key(0))
        xs0 = jax.random.normal(jax.random.key(3), (B, 3))
        obj = spin_objective(decay=decay, epsilon=eps, chunk_size=5)  # chunks of 4 points
        loss_fn = jax.jit(make_loss_fn(_mlp, _radial_op, obj))
        state = obj.init_state(L, jnp.float64, params)
        sigma_avg, weight, j_avg = jnp.zeros((L, L)), 0.0, None
        p = params
        for t in range(4):
            xs = xs0 * (1.0 + 0.2 * t)
            (_, (state, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, state, xs)

            f = jax.vmap(lambda x: _mlp(p, x))(xs)
            Tf = (2.0 - jnp.sum(xs**2, axis=1))[:, None] * f
            jac = jax.jacrev(lambda q: jax.vmap(lambda x: _mlp(q, x))(xs))(p)  # (B, L, ...)
            j_new = jax.tree_util.tree_map(lambda j: 2 * jnp.einsum("bl,bm...->lm...", f, j) / B, jac)
            sigma_avg = (1 - decay) * sigma_avg + decay * f.T @ f / B
            weight = (1 - decay) * weight + decay
            j_avg = j_new if j_avg is None else j_avg
            j_avg = jax.tree_util.tree_map(lambda a, n: (1 - decay) * a + decay * n, j_avg, j_new) if t else jax.tree_util.tree_map(lambda n: decay * n, j_new)
            g_pi, g_sigma = _spin_gradient_factors(f, Tf, sigma_avg / weight, eps)
            first = jax.tree_util.tree_map(
                lambda j: jnp.einsum("bm,bm...->...", (2.0 / B) * Tf @ g_pi, j), jac)
            expected = jax.tree_util.tree_map(
                lambda a, j: a + jnp.tensordot(g_sigma, j / weight, axes=2), first, j_avg)
            assert _tree_max_abs_diff(g, expected) < 1e-12
            assert _tree_max_abs_diff(state.jacobian_avg, j_avg) < 1e-12
            p = jax.tree_util.tree_map(lambda a, d: a - 0.05 * d, p, g)

        # Decay 1: no memory, the same update as the current-batch (f-space) gradient.
        one = [make_loss_fn(_mlp, _radial_op, spin_objective(decay=1.0, jacobian=j))
               for j in ("moving_average", "current_batch")]
        grads = [jax.grad(fn, has_aux=True)(p, o.init_state(L, jnp.float64, p), xs0)[0]
                 for fn, o in zip(one, [spin_objective(decay=1.0), spin_current(decay=1.0)])]
        assert _tree_max_abs_diff(*grads) < 1e-13


def test_spin_jacobian_average_recovers_eigh():
    """Through make_loss_fn on a free table (f = W[i], T f = A W at row i, the whole
    population per batch), the parameter-space SpIN recovers the top-L pairs in order."""
    from nestedlora_jax.training import make_loss_fn

    L = len(TOP)
    with jax.enable_x64(True):
        A_np = symmetric_matrix(N, TOP, -3.0, 0.4, seed=7)
        A = jnp.asarray(A_np)
        rows = jnp.arange(N, dtype=jnp.float64)[:, None]
        table = lambda W, x: W[x[0].astype(jnp.int32)]

        def op(fn, x):
            return fn(x), A[x[0].astype(jnp.int32)] @ jax.vmap(fn)(rows)

        obj = spin_objective()
        loss_fn = make_loss_fn(table, op, obj)

        @jax.jit
        def descend(W):
            def step(_, carry):
                W, state = carry
                g, (state, _) = jax.grad(loss_fn, has_aux=True)(W, state, rows)
                return W - 1.0 * g, state
            return jax.lax.fori_loop(0, 12000, step, (W, obj.init_state(L, W.dtype, W)))

        W, state = descend(jax.random.normal(jax.random.key(0), (N, L)))
        psi = np.asarray(obj.readout(W, state))
    evals, evecs = np.linalg.eigh(A_np)
    order = np.argsort(evals)[::-1][:L]
    rayleigh = np.sum(psi * (A_np @ psi), axis=0) / np.sum(psi**2, axis=0)
    rel = np.abs(rayleigh - evals[order]) / evals[order]
    cos = np.abs(np.sum(psi * evecs[:, order], axis=0)) / np.linalg.norm(psi, axis=0)
    print(f"spin (Jacobian average): max rel eigenvalue error {rel.max():.2e}, max 1-|cos| {1 - cos.min():.2e}")
    assert rel.max() <= 1e-6
    assert cos.min() >= 1 - 1e-6


def test_spin_jacobian_average_needs_params_and_a_pointwise_operator():
    from nestedlora_jax.operators import kernel_integral_operator
    from nestedlora_jax.training import make_loss_fn

    with pytest.raises(ValueError, match=r"init\(L, dtype, params\).*jacobian='current_batch'"):
        spin_objective().init(3, jnp.float32)
    with pytest.raises(ValueError, match="no Jacobian average"):
        f = jnp.ones((4, 3))
        spin_objective().loss(OperatorOutput(f, f), spin_current().init(3, jnp.float32))
    with pytest.raises(ValueError, match="one network and a per-point operator"):
        make_loss_fn(_mlp, kernel_integral_operator(lambda x, y: jnp.exp(-jnp.sum((x - y) ** 2))),
                     spin_objective())
    with pytest.raises(ValueError, match="unknown SpIN jacobian"):
        spin_objective(jacobian="exact")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
        spin_objective(chunk_size=0)


# ------------------------------------------------------------------ 2. NeuralEF gradient


def _neuralef_reference_loss(W, A, variant, split_batch, pairing):
    """Explicit NeuralEF pseudo-objective, autodiff through A and the normalisation.

    Player j: ``-2 <psi_j, A psi_j>`` (self-adjoint: its gradient is ``-(4/B) T psi_j``)
    plus ``2 sum_{l<j} sg(C_lj) <psi_j, sg(A psi_l)>_h`` per half h, weighted by the
    half's share of the batch, with ``C`` from the paired half.
    """
    n, L = W.shape
    psi = W / jnp.sqrt(jnp.mean(W**2, axis=0))
    Apsi = A @ psi
    halves = [slice(0, n // 2), slice(n // 2, n)] if split_batch else [slice(0, n)]

    def coefficients(s):
        p, tp = psi[s], Apsi[s]
        if variant == "unbiased":
            return p.T @ p / p.shape[0]
        q = p.T @ tp / p.shape[0]
        return q / (jnp.diag(q)[:, None] + 1e-5)

    total = 0.0
    for j in range(L):
        total = total - 2.0 * jnp.mean(psi[:, j] * Apsi[:, j])
        for h, s in enumerate(halves):
            paired = halves[1 - h] if (split_batch and pairing == "cross") else s
            c = sg(coefficients(paired))
            share = (s.stop - s.start) / n
            for l in range(j):
                total = total + 4.0 * share * c[l, j] * jnp.mean(psi[s, j] * sg(Apsi[s, l]))
    return total


@pytest.mark.parametrize("pairing", ["cross", "own"])
@pytest.mark.parametrize("split_batch", [False, True])
@pytest.mark.parametrize("variant", ["unbiased", "original"])
def test_neuralef_gradient_matches_autodiff_reference(variant, split_batch, pairing):
    n, L = 16, 5
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        A = jnp.asarray(symmetric_matrix(n, [], -2.0, 2.0, seed=3))
        W = jnp.asarray(rng.standard_normal((n, L)))
        obj = neuralef_objective(variant=variant, split_batch=split_batch, pairing=pairing)
        state = obj.init(L, jnp.float64)
        ours = lambda W: obj.loss(OperatorOutput(W, A @ W), state)[0]
        g_ours = jax.jit(jax.grad(ours))(W)
        g_ref = jax.jit(jax.grad(
            lambda W: _neuralef_reference_loss(W, A, variant, split_batch, pairing)
        ))(W)
        scale = np.abs(g_ref).max()
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-11, atol=1e-13 * scale)


@pytest.mark.parametrize(
    "obj", [spin_current(), neuralef_objective()], ids=["spin", "neuralef"]
)
def test_no_gradient_flows_into_Tf(obj):
    f = jax.random.normal(jax.random.key(0), (6, 3))
    g = jax.jit(jax.grad(lambda Tf: obj.loss(OperatorOutput(f, Tf), obj.init(3, jnp.float32))[0]))(2.0 * f)
    np.testing.assert_array_equal(g, 0.0)


# ------------------------------------------------------------------ 3. exact linear algebra

N, TOP = 64, [5.0, 4.2, 3.1, 2.3, 1.5, 1.0]


@functools.partial(jax.jit, static_argnames=("obj", "steps", "duplicate"))
def _descend(obj, A, W, lr, steps, duplicate):
    """Plain gradient descent on the free table W (n, L), f = W, T f = A W (full population).

    ``duplicate`` feeds the population twice (B = 2n): each batch half is then the whole
    population, so a halves-based estimator is exact and deterministic.
    """

    def batch(W):
        f, Tf = W, A @ W
        if duplicate:
            f, Tf = jnp.concatenate([f, f]), jnp.concatenate([Tf, Tf])
        return f, Tf

    def step(_, carry):
        W, state = carry
        g, state = jax.grad(lambda W: obj.loss(OperatorOutput(*batch(W)), state), has_aux=True)(W)
        return W - lr * g, state

    return jax.lax.fori_loop(0, steps, step, (W, obj.init(W.shape[1], W.dtype)))


def _recover(obj, duplicate, lr=1.0, steps=5000):
    L = len(TOP)
    with jax.enable_x64(True):
        A_np = symmetric_matrix(N, TOP, -3.0, 0.4, seed=7)  # negatives below the top L
        W0 = jax.random.normal(jax.random.key(0), (N, L))
        W, state = _descend(obj, jnp.asarray(A_np), W0, lr, steps, duplicate)
        psi = np.asarray(jax.jit(obj.readout)(W, state))
        f, Tf = np.asarray(W), A_np @ np.asarray(W)
        if duplicate:
            f, Tf = np.concatenate([f, f]), np.concatenate([Tf, Tf])
        final_loss = float(jax.jit(obj.loss)(OperatorOutput(f, Tf), state)[0])
    evals, evecs = np.linalg.eigh(A_np)
    order = np.argsort(evals)[::-1][:L]
    exact_vals, exact_vecs = evals[order], evecs[:, order]
    rayleigh = np.sum(psi * (A_np @ psi), axis=0) / np.sum(psi**2, axis=0)
    rel = np.abs(rayleigh - exact_vals) / exact_vals
    cos = np.abs(np.sum(psi * exact_vecs, axis=0)) / np.linalg.norm(psi, axis=0)
    gram = psi.T @ psi / N
    return rel, cos, gram, final_loss, exact_vals


def test_spin_recovers_eigh():
    """SpIN (reference hyperparameters) recovers the top-L pairs in order.

    The epsilon ridge makes ``Lc^{-1} f`` orthonormal only up to ``O(epsilon / ||f||^2)``,
    but directions and Rayleigh quotients are exact at the fixed point (every matrix is
    diagonal in the eigenbasis there).
    """
    rel, cos, gram, loss, exact = _recover(spin_current(), duplicate=False)
    print(f"spin: max rel eigenvalue error {rel.max():.2e}, max 1-|cos| {1 - cos.min():.2e}")
    assert rel.max() <= 1e-6
    assert cos.min() >= 1 - 1e-6
    np.testing.assert_allclose(gram, np.eye(len(TOP)), atol=1e-3)
    np.testing.assert_allclose(loss, -np.sum(exact), rtol=1e-3)  # -tr(Lambda)


@pytest.mark.parametrize(
    "variant, split_batch",
    [("unbiased", True), ("unbiased", False), ("original", True), ("original", False)],
)
def test_neuralef_recovers_eigh(variant, split_batch):
    obj = neuralef_objective(variant=variant, split_batch=split_batch)
    rel, cos, gram, loss, exact = _recover(obj, duplicate=split_batch)
    print(f"neuralef {variant} split={split_batch}: max rel eigenvalue error {rel.max():.2e}, "
          f"max 1-|cos| {1 - cos.min():.2e}")
    assert rel.max() <= 1e-10
    assert cos.min() >= 1 - 1e-10
    # The running RMS has converged: transformed functions are orthonormal.
    np.testing.assert_allclose(gram, np.eye(len(TOP)), atol=1e-8)
    np.testing.assert_allclose(loss, -np.sum(exact), rtol=1e-8)


# ------------------------------------------------------------------ 4. state and dtypes


def test_spin_state_is_bias_corrected_average():
    with jax.enable_x64(True):
        obj = spin_current(decay=0.25, epsilon=1e-3)
        obj = obj._replace(loss=jax.jit(obj.loss), readout=jax.jit(obj.readout))
        f1, f2 = (jax.random.normal(jax.random.key(i), (10, 3)) for i in (1, 2))
        s0 = obj.init(3, jnp.float64)
        # Before any step the transform uses Sigma_bar = I.
        np.testing.assert_allclose(obj.readout(f1, s0), f1 / np.sqrt(1 + 1e-3), rtol=1e-12)
        _, s1 = obj.loss(OperatorOutput(f1, f1), s0)
        sig = lambda f: np.asarray(f.T @ f / f.shape[0])
        np.testing.assert_allclose(s1.sigma_avg / s1.weight, sig(f1), rtol=1e-12)
        _, s2 = obj.loss(OperatorOutput(f2, f2), s1)
        expected = (0.75 * 0.25 * sig(f1) + 0.25 * sig(f2)) / (0.75 * 0.25 + 0.25)
        np.testing.assert_allclose(s2.sigma_avg / s2.weight, expected, rtol=1e-12)
        # transform = Lc^{-1} f per sample.
        chol = np.linalg.cholesky(expected + 1e-3 * np.eye(3))
        np.testing.assert_allclose(
            obj.readout(f1, s2), np.linalg.solve(chol, np.asarray(f1).T).T, rtol=1e-10
        )


def test_neuralef_running_rms():
    with jax.enable_x64(True):
        obj = neuralef_objective(momentum=0.9)
        obj = obj._replace(loss=jax.jit(obj.loss), readout=jax.jit(obj.readout))
        f1, f2 = (jax.random.normal(jax.random.key(i), (10, 3)) for i in (1, 2))
        s0 = obj.init(3, jnp.float64)
        np.testing.assert_array_equal(obj.readout(f1, s0), f1)  # identity before training
        _, s1 = obj.loss(OperatorOutput(f1, f1), s0)
        ms = lambda f: np.mean(np.asarray(f) ** 2, axis=0)
        np.testing.assert_allclose(obj.readout(f1, s1), f1 / np.sqrt(ms(f1)), rtol=1e-12)
        _, s2 = obj.loss(OperatorOutput(f2, f2), s1)
        expected = (0.9 * 0.1 * ms(f1) + 0.1 * ms(f2)) / (0.9 * 0.1 + 0.1)
        np.testing.assert_allclose(obj.readout(f1, s2), f1 / np.sqrt(expected), rtol=1e-12)


@pytest.mark.parametrize(
    "obj", [spin_current(), neuralef_objective(), neuralef_objective(variant="original")],
    ids=["spin", "neuralef", "neuralef-original"],
)
def test_float32_jit(obj):
    f = jax.random.normal(jax.random.key(0), (8, 4), jnp.float32)
    Tf = jax.random.normal(jax.random.key(1), (8, 4), jnp.float32)
    state = obj.init(4, jnp.float32)

    @jax.jit
    def go(f, Tf, state):
        (value, state), g = jax.value_and_grad(
            lambda f: obj.loss(OperatorOutput(f, Tf), state), has_aux=True)(f)
        return value, state, g, obj.readout(f, state)

    value, new_state, g, phi = go(f, Tf, state)
    assert value.dtype == g.dtype == phi.dtype == jnp.float32
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new_state))
    assert np.all(np.isfinite(g)) and np.isfinite(value)


def test_names_and_flags():
    assert spin_objective().name == "spin" and not spin_objective().needs_even_batch
    assert spin_objective().parameter_term is not None and spin_current().parameter_term is None
    assert neuralef_objective().name == "neuralef" and neuralef_objective().needs_even_batch
    assert not neuralef_objective(split_batch=False).needs_even_batch
    assert isinstance(spin_current().init(2, jnp.float32), SpinState)
    assert isinstance(neuralef_objective().init(2, jnp.float32), NeuralEFState)


# ------------------------------------------------------------------ 5. bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: spin_objective(decay=0.0), "decay must lie in"),
        (lambda: spin_objective(decay=1.5), "decay must lie in"),
        (lambda: spin_objective(decay="fast"), "decay must be a real number"),
        (lambda: spin_objective(epsilon=-1e-3), "epsilon must be finite and >= 0"),
        (lambda: spin_objective(epsilon=float("nan")), "epsilon must be finite and >= 0"),
        (lambda: neuralef_objective(variant="biased"), "unknown NeuralEF variant"),
        (lambda: neuralef_objective(momentum=1.0), r"momentum must lie in \[0, 1\)"),
        (lambda: neuralef_objective(momentum=-0.1), r"momentum must lie in \[0, 1\)"),
        (lambda: neuralef_objective(pairing="other"), "unknown pairing"),
        (lambda: neuralef_objective(split_batch="yes"), "split_batch must be a bool"),
        (lambda: spin_objective().init(0, jnp.float32), "positive integer"),
        (lambda: neuralef_objective().init(3, jnp.int32), "floating-point"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "obj", [spin_current(), neuralef_objective()], ids=["spin", "neuralef"]
)
def test_bad_inputs(obj):
    f = jnp.ones((6, 3)) * jnp.arange(1.0, 4.0)
    state = obj.init(3, jnp.float32)
    with pytest.raises(ValueError, match=r"f must have shape \(B, L\)"):
        obj.loss(OperatorOutput(f[:, 0], f[:, 0]), state)
    with pytest.raises(ValueError, match="Tf must have the same shape"):
        obj.loss(OperatorOutput(f, f[:, :2]), state)
    with pytest.raises(ValueError, match="initialised for L = 3 functions but f has L = 2"):
        obj.loss(OperatorOutput(f[:, :2], f[:, :2]), state)
    with pytest.raises(ValueError, match="initialised for L = 3"):
        obj.readout(f[:, :2], state)
    with pytest.raises(ValueError, match="expects its own state"):
        obj.loss(OperatorOutput(f, f), ())
    with pytest.raises(ValueError, match="floating-point"):
        obj.loss(OperatorOutput(f.astype(jnp.int32), f), state)
    with pytest.raises(ValueError, match="takes an OperatorOutput"):
        obj.loss((f, f), state)  # the pre-0.3 (f, Tf, state) call, caught with what to pass
    with pytest.raises(ValueError, match="self-adjoint operator \\(one family\\).*nested_lora_objective"):
        obj.loss(OperatorOutput(f, f, f, f), state)
    with pytest.raises(ValueError, match="both g and Tadj_f"):
        obj.loss(OperatorOutput(f, f, f), state)


def test_neuralef_odd_batch():
    obj = neuralef_objective()
    f = jnp.ones((5, 2)) * jnp.arange(1.0, 3.0)
    with pytest.raises(ValueError, match="the batch size of f must be even .*; got 5"):
        obj.loss(OperatorOutput(f, f), obj.init(2, jnp.float32))
    # Without halves an odd batch is fine.
    obj = neuralef_objective(split_batch=False)
    obj.loss(OperatorOutput(f, f), obj.init(2, jnp.float32))


def test_spin_per_function_jacobian_equals_the_full_one_on_parallel_networks():
    """On ParallelMLPs (every leaf carries the function index first, outputs independent) the
    block-compressed Jacobian average gives the same update as the full one, and a network
    without that layout is refused."""
    from flax import nnx

    from nestedlora_jax.networks import eigenfunction_network, to_apply
    from nestedlora_jax.training import make_loss_fn

    L = 3
    apply, params = to_apply(eigenfunction_network(2, L, architecture="parallel", hidden=(8, 8),
                                                   rngs=nnx.Rngs(0)))
    xs = jax.random.normal(jax.random.key(1), (10, 2))
    op = lambda fn, x: (fn(x), (1.5 - x @ x) * fn(x))
    grads = []
    for per_function in (False, True):
        obj = spin_objective(decay=0.2, per_function_parameters=per_function, chunk_size=4)
        loss_fn = jax.jit(make_loss_fn(apply, op, obj))
        state, p = obj.init_state(L, jnp.float32, params), params
        for t in range(3):  # the averages carry three batches
            g, (state, _) = jax.grad(loss_fn, has_aux=True)(p, state, xs * (1 + 0.3 * t))
        grads.append(g)
    assert _tree_max_abs_diff(*grads) < 1e-5 * max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(grads[0]))
    shared_apply, shared = to_apply(eigenfunction_network(2, L, architecture="shared", hidden=(8,),
                                                          rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="leading axis.*per_function_parameters=False"):
        spin_objective(per_function_parameters=True).init(L, jnp.float32, shared)
