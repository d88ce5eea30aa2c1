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
        obj = spin_objective(decay=decay, epsilon=epsilon)
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
    "obj", [spin_objective(), neuralef_objective()], ids=["spin", "neuralef"]
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
    rel, cos, gram, loss, exact = _recover(spin_objective(), duplicate=False)
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
        obj = spin_objective(decay=0.25, epsilon=1e-3)
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
    "obj", [spin_objective(), neuralef_objective(), neuralef_objective(variant="original")],
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
    assert neuralef_objective().name == "neuralef" and neuralef_objective().needs_even_batch
    assert not neuralef_objective(split_batch=False).needs_even_batch
    assert isinstance(spin_objective().init(2, jnp.float32), SpinState)
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
    "obj", [spin_objective(), neuralef_objective()], ids=["spin", "neuralef"]
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
