"""The NestedLoRA objectives against closed forms, autodiff references and exact linear algebra."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from linalg_cases import symmetric_matrix
import pytest

from nestedlora_jax.objectives import (
    lora_objective,
    nested_lora_loss,
    nested_lora_svd_loss,
    nesting_masks,
    nesting_weights,
)

NESTINGS = ["joint", "sequential"]


# ----------------------------------------------------------------- helpers


def _lora_estimate(f, Tf, split_batch):
    """L_lora(f_1:k) with the batch estimates nested_lora_loss uses (EVD, g = f)."""
    linear = jnp.sum(jnp.mean(f * Tf, axis=0))
    if split_batch:
        h = f.shape[0] // 2
        quad = jnp.sum((f[:h].T @ f[:h] / h) * (f[h:].T @ f[h:] / h))
    else:
        quad = jnp.sum((f.T @ f / f.shape[0]) ** 2)
    return -2.0 * linear + quad


def _naive_joint(f, Tf, w, split_batch):
    return sum(
        w[k - 1] * _lora_estimate(f[:, :k], Tf[:, :k], split_batch)
        for k in range(1, f.shape[1] + 1)
    )


def _naive_sequential(f, Tf, split_batch):
    """sum_i L_lora(sg(f_1:i-1), f_i): its gradient in f_i is function i's own update."""
    sg = jax.lax.stop_gradient
    total = 0.0
    for i in range(f.shape[1]):
        fi = jnp.concatenate([sg(f[:, :i]), f[:, i : i + 1]], axis=1)
        Tfi = jnp.concatenate([sg(Tf[:, :i]), Tf[:, i : i + 1]], axis=1)
        total = total + _lora_estimate(fi, Tfi, split_batch)
    return total


# ----------------------------------------------------------------- 1. masks


def test_joint_masks_closed_form():
    w = np.array([0.1, 0.4, 0.2, 0.3])
    m, M = nesting_masks(4, "joint", w)
    np.testing.assert_allclose(m, [1.0, 0.9, 0.5, 0.3])
    for i in range(4):
        for j in range(4):
            assert M[i, j] == m[max(i, j)] == min(m[i], m[j])


def test_joint_masks_default_uniform_and_normalised():
    m, M = nesting_masks(5, "joint")
    np.testing.assert_allclose(m, [1.0, 0.8, 0.6, 0.4, 0.2])
    m2, M2 = nesting_masks(5, "joint", [3.0] * 5)  # unnormalised weights
    np.testing.assert_allclose(m2, m)
    np.testing.assert_allclose(M2, M)


def test_the_default_nesting_is_sequential_everywhere():
    """One default across the API: the masks, the losses, the Objective and fit."""
    import inspect

    from nestedlora_jax import objectives

    for fn in (objectives.nesting_masks, objectives.nested_lora_loss, objectives.nested_lora_svd_loss,
               objectives.nested_lora_objective):
        assert inspect.signature(fn).parameters["nesting"].default == "sequential", fn.__name__
    np.testing.assert_array_equal(nesting_masks(3)[1], nesting_masks(3, "sequential")[1])


def test_sequential_masks():
    m, M = nesting_masks(4, "sequential")
    np.testing.assert_array_equal(m, np.ones(4))
    np.testing.assert_array_equal(M, np.triu(np.ones((4, 4))))  # M_ji = 1 iff j <= i


def test_step_weights():
    np.testing.assert_allclose(nesting_weights(5, step=2), [0, 1 / 3, 0, 1 / 3, 1 / 3])
    np.testing.assert_allclose(nesting_weights(4), np.full(4, 0.25))


@pytest.mark.parametrize("split_batch", [False, True])
@pytest.mark.parametrize("weights", [None, [0.1, 0.0, 0.5, 0.15, 0.25]])
def test_joint_closed_form_equals_weighted_sum(split_batch, weights):
    with jax.enable_x64(True):
        key1, key2 = jax.random.split(jax.random.key(0))
        f = jax.random.normal(key1, (12, 5))
        Tf = jax.random.normal(key2, (12, 5))
        w = nesting_weights(5) if weights is None else np.asarray(weights) / np.sum(weights)
        naive = _naive_joint(f, Tf, w, split_batch)
        closed = nested_lora_loss(f, Tf, nesting="joint", weights=weights, split_batch=split_batch)
        np.testing.assert_allclose(closed, naive, rtol=1e-12)
        m, M = nesting_masks(5, "joint", weights)
        # L = 5 prefix with all weight on k = L is the plain LoRA objective.
        full = nested_lora_loss(f, Tf, nesting="joint", weights=[0, 0, 0, 0, 1], split_batch=False)
        np.testing.assert_allclose(full, lora_objective(f, Tf, f), rtol=1e-12)


# ------------------------------------------------------ 2. the custom VJP


@pytest.mark.parametrize("split_batch", [False, True])
@pytest.mark.parametrize("nesting", NESTINGS)
def test_masked_gradient_matches_autodiff_reference(nesting, split_batch):
    """With T f = A f for symmetric A, autodiff *through* T f is the true gradient.

    The custom VJP never differentiates Tf, so agreement proves both the masks and
    the self-adjointness shortcut (the factor 2 on the linear term).
    """
    n, L = 16, 5
    with jax.enable_x64(True):
        A = jnp.asarray(symmetric_matrix(n, [], -2.0, 2.0, seed=1))
        W = jax.random.normal(jax.random.key(3), (n, L))
        weights = [0.3, 0.1, 0.2, 0.0, 0.4] if nesting == "joint" else None

        def ours(W):
            return nested_lora_loss(
                W, A @ W, nesting=nesting, weights=weights, split_batch=split_batch
            )

        if nesting == "joint":
            w = np.asarray(weights) / np.sum(weights)
            reference = lambda W: _naive_joint(W, A @ W, w, split_batch)
        else:
            reference = lambda W: _naive_sequential(W, A @ W, split_batch)

        g_ours = jax.jit(jax.grad(ours))(W)
        g_ref = jax.grad(reference)(W)
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("split_batch", [False, True])
@pytest.mark.parametrize("nesting", NESTINGS)
def test_svd_masked_gradient_matches_autodiff_reference(nesting, split_batch):
    """SVD form: both families get their masked gradients (T g and T* f supplied)."""
    nx, ny, L = 12, 10, 4
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        A = jnp.asarray(rng.standard_normal((nx, ny)))
        F = jnp.asarray(rng.standard_normal((nx, L)))
        G = jnp.asarray(rng.standard_normal((ny, L)))
        # <f, T g> = f^T A g / nx on both sides: T g = A g, T* f = (ny/nx) A^T f.
        Tg = lambda G: A @ G
        Tadj = lambda F: (ny / nx) * A.T @ F

        def ours(F, G):
            return nested_lora_svd_loss(
                F, Tg(G), G, Tadj(F), nesting=nesting, split_batch=split_batch
            )

        def est(F, G):  # L_lora with the same quadratic estimator, autodiff through T
            linear = jnp.sum(jnp.mean(F * Tg(G), axis=0))
            if split_batch:
                hx, hy = nx // 2, ny // 2
                mom = lambda a: a.T @ a / a.shape[0]
                quad = 0.5 * jnp.sum(
                    mom(F[:hx]) * mom(G[hy:]) + mom(F[hx:]) * mom(G[:hy])
                )
            else:
                quad = jnp.sum((F.T @ F / nx) * (G.T @ G / ny))
            return -2.0 * linear + quad

        if nesting == "joint":
            def reference(F, G):
                return sum(est(F[:, :k], G[:, :k]) for k in range(1, L + 1)) / L
        else:
            sg = jax.lax.stop_gradient

            def reference(F, G):
                total = 0.0
                for i in range(L):
                    Fi = jnp.concatenate([sg(F[:, :i]), F[:, i : i + 1]], axis=1)
                    Gi = jnp.concatenate([sg(G[:, :i]), G[:, i : i + 1]], axis=1)
                    total = total + est(Fi, Gi)
                return total

        gf, gg = jax.grad(ours, argnums=(0, 1))(F, G)
        rf, rg = jax.grad(reference, argnums=(0, 1))(F, G)
        np.testing.assert_allclose(gf, rf, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(gg, rg, rtol=1e-12, atol=1e-13)


def test_no_gradient_flows_into_Tf():
    f = jnp.ones((4, 2)) * jnp.arange(1.0, 3.0)
    g_Tf = jax.grad(lambda Tf: nested_lora_loss(f, Tf))(f * 3.0)
    np.testing.assert_array_equal(g_Tf, 0.0)


def test_sequential_value_is_uniform_joint_objective():
    f = jax.random.normal(jax.random.key(0), (8, 3))
    Tf = jax.random.normal(jax.random.key(1), (8, 3))
    np.testing.assert_allclose(
        nested_lora_loss(f, Tf, nesting="sequential"), nested_lora_loss(f, Tf), rtol=1e-6
    )


# ------------------------------------------------- 3. exact linear algebra


@functools.partial(jax.jit, static_argnames=("loss", "steps"))
def _gradient_descent(loss, W, lr, steps):
    return jax.lax.fori_loop(0, steps, lambda _, W: W - lr * jax.grad(loss)(W), W)


@pytest.mark.parametrize("nesting", NESTINGS)
def test_recovers_eigh(nesting):
    """Optimising over a free matrix W recovers numpy.linalg.eigh's top-L pairs in order."""
    n, top = 64, [5.0, 4.2, 3.1, 2.3, 1.5, 1.0]
    L = len(top)
    with jax.enable_x64(True):
        A_np = symmetric_matrix(n, top, -3.0, 0.4, seed=7)  # negatives below the top L
        A = jnp.asarray(A_np)
        loss = lambda W: nested_lora_loss(W, A @ W, nesting=nesting, split_batch=False)
        W0 = 0.1 * jax.random.normal(jax.random.key(0), (n, L))
        # The per-sample gradient carries a 4/B factor, so lr = n/40 is a function-space
        # step eta = 0.1; the norm of f_1 then contracts as 1 - 2 eta lambda_1 = 0 (stable
        # for eta < 1/lambda_1 = 0.2).
        W = _gradient_descent(loss, W0, n / 40.0, 6000)

    evals, evecs = np.linalg.eigh(A_np)
    order = np.argsort(evals)[::-1][:L]
    exact_vals, exact_vecs = evals[order], evecs[:, order]
    W = np.asarray(W)
    learned_vals = np.mean(W**2, axis=0)  # ||f_i||^2 with the mean inner product
    rel = np.abs(learned_vals - exact_vals) / exact_vals
    cos = np.abs(np.sum(W * exact_vecs, axis=0)) / np.linalg.norm(W, axis=0)
    print(f"{nesting}: max rel eigenvalue error {rel.max():.2e}, min |cos| {cos.min():.15f}")
    assert rel.max() <= 1e-5
    assert cos.min() >= 1 - 1e-6


@pytest.mark.parametrize("nesting", NESTINGS)
def test_recovers_svd(nesting):
    """SVD form on a rectangular matrix recovers numpy.linalg.svd's top-L triplets."""
    nx, ny, L = 80, 64, 5
    rng = np.random.default_rng(11)
    u, _ = np.linalg.qr(rng.standard_normal((nx, nx)))
    v, _ = np.linalg.qr(rng.standard_normal((ny, ny)))
    sv = np.concatenate([[3.0, 2.5, 2.0, 1.5, 1.0], rng.uniform(0.0, 0.5, ny - L)])
    A_np = (u[:, :ny] * sv) @ v.T
    with jax.enable_x64(True):
        A = jnp.asarray(A_np)
        # Mean inner products on both sides: T g = A g, T* f = (ny/nx) A^T f.
        def loss(FG):
            F, G = FG
            return nested_lora_svd_loss(
                F, A @ G, G, (ny / nx) * A.T @ F, nesting=nesting, split_batch=False
            )

        k1, k2 = jax.random.split(jax.random.key(1))
        FG0 = (0.1 * jax.random.normal(k1, (nx, L)), 0.1 * jax.random.normal(k2, (ny, L)))

        @jax.jit
        def run(FG):
            def step(_, FG):
                gF, gG = jax.grad(loss)(FG)
                # 2/B per-sample factor: function-space step 0.1 (< 1/s_1 for stability).
                return (FG[0] - (nx / 20.0) * gF, FG[1] - (ny / 20.0) * gG)
            return jax.lax.fori_loop(0, 6000, step, FG)

        F, G = map(np.asarray, run(FG0))

    U, S, Vt = np.linalg.svd(A_np)
    s_exact = np.sqrt(ny / nx) * S[:L]  # singular values of T between the mean-L2 spaces
    s_learned = np.sqrt(np.mean(F**2, axis=0) * np.mean(G**2, axis=0))
    rel = np.abs(s_learned - s_exact) / s_exact
    cos_f = np.abs(np.sum(F * U[:, :L], axis=0)) / np.linalg.norm(F, axis=0)
    cos_g = np.abs(np.sum(G * Vt[:L].T, axis=0)) / np.linalg.norm(G, axis=0)
    print(f"{nesting}: max rel singular value error {rel.max():.2e}, "
          f"min |cos| {min(cos_f.min(), cos_g.min()):.15f}")
    assert rel.max() <= 1e-5
    assert cos_f.min() >= 1 - 1e-6 and cos_g.min() >= 1 - 1e-6


# ------------------------------------------------------------ 4. unbiasedness


def _minibatch_gradients(A, W, nesting, split_batch, batch, num_batches, seed):
    """Gradients w.r.t. W of the loss on uniformly drawn minibatches of rows."""
    n = W.shape[0]
    AW = A @ W

    def one(key):
        idx = jax.random.randint(key, (batch,), 0, n)

        def loss(W):
            return nested_lora_loss(W[idx], AW[idx], nesting=nesting, split_batch=split_batch)

        return jax.grad(loss)(W)

    keys = jax.random.split(jax.random.key(seed), num_batches)
    return jax.lax.map(one, keys, batch_size=1000)


@pytest.mark.parametrize("nesting", NESTINGS)
def test_split_batch_gradient_is_unbiased(nesting):
    """Mean of minibatch gradients = population gradient, within Monte Carlo error.

    The population gradient (split_batch=False on all n rows) is the gradient of the
    objective with exact inner products. Each coordinate's mean over K minibatches is
    compared with a z-test at 5 standard errors (estimated from the K samples); with
    ~100 coordinates the chance of a false failure is ~1e-4. The unsplit estimator is
    biased by O(1/B): at B = 4 the same test must detect it, which shows the test has
    the power to fail.
    """
    n, L, batch, K = 24, 4, 4, 40000
    with jax.enable_x64(True):
        A = jnp.asarray(symmetric_matrix(n, [], -1.0, 1.0, seed=5))
        W = jax.random.normal(jax.random.key(2), (n, L))
        population = jax.grad(
            lambda W: nested_lora_loss(W, A @ W, nesting=nesting, split_batch=False)
        )(W)

        def zscores(split_batch):
            grads = _minibatch_gradients(A, W, nesting, split_batch, batch, K, seed=9)
            mean = grads.mean(axis=0)
            se = grads.std(axis=0, ddof=1) / np.sqrt(K)
            return np.abs(np.asarray((mean - population) / se))

        z_split = zscores(True)
        z_full = zscores(False)
    assert z_split.max() < 5.0, z_split.max()
    assert z_full.max() > 8.0, z_full.max()  # the biased estimator is detectably off


# ------------------------------------------------------------- transforms, dtypes


def test_float32_default_dtype_and_vmap_over_problems():
    f = jax.random.normal(jax.random.key(0), (3, 8, 4))  # 3 independent problems
    Tf = 2.0 * f
    values = jax.vmap(nested_lora_loss)(f, Tf)
    grads = jax.vmap(jax.grad(nested_lora_loss))(f, Tf)
    assert values.dtype == jnp.float32 and grads.dtype == jnp.float32
    for p in range(3):
        np.testing.assert_allclose(values[p], nested_lora_loss(f[p], Tf[p]), rtol=1e-6)
        np.testing.assert_allclose(grads[p], jax.grad(nested_lora_loss)(f[p], Tf[p]), rtol=1e-5)


def test_float64_keeps_dtype():
    with jax.enable_x64(True):
        f = jnp.ones((4, 2), jnp.float64)
        assert nested_lora_loss(f, f).dtype == jnp.float64
        assert jax.grad(nested_lora_loss)(f, f).dtype == jnp.float64


# ----------------------------------------------------------------- 5. bad input


@pytest.mark.parametrize(
    "kwargs, f_shape, Tf_shape, match",
    [
        ({}, (8, 3), (8, 2), r"Tf must have the same shape as f"),
        ({}, (8,), (8,), r"f must have shape \(B, L\)"),
        ({}, (8, 0), (8, 0), r"L = 0"),
        ({}, (7, 3), (7, 3), r"batch size of f must be even .*; got 7"),
        ({"nesting": "parallel"}, (8, 3), (8, 3), r"unknown nesting 'parallel'"),
        ({"nesting": "joint", "weights": [1.0, 2.0]}, (8, 3), (8, 3), r"weights must have shape \(L,\) = \(3,\)"),
        ({"nesting": "joint", "weights": [0.0, 0.0, 0.0]}, (8, 3), (8, 3), r"sum to a positive value"),
        ({"nesting": "joint", "weights": [1.0, -1.0, 1.0]}, (8, 3), (8, 3), r"non-negative"),
        ({"nesting": "sequential", "weights": [1, 1, 1]}, (8, 3), (8, 3), r"joint nesting only"),
    ],
)
def test_bad_input_raises(kwargs, f_shape, Tf_shape, match):
    with pytest.raises(ValueError, match=match):
        nested_lora_loss(jnp.ones(f_shape), jnp.ones(Tf_shape), **kwargs)
    # ... at trace time under jit as well.
    with pytest.raises(ValueError, match=match):
        jax.jit(functools.partial(nested_lora_loss, **kwargs))(
            jnp.ones(f_shape), jnp.ones(Tf_shape)
        )


def test_odd_batch_allowed_without_split():
    f = jnp.ones((7, 3))
    assert jnp.isfinite(nested_lora_loss(f, f, split_batch=False))


def test_svd_bad_input():
    with pytest.raises(ValueError, match="same number of functions L"):
        nested_lora_svd_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="batch size of g must be even"):
        nested_lora_svd_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((5, 3)), jnp.ones((5, 3)))


@pytest.mark.parametrize("L, nesting, match", [(0, "joint", r"L \(the number of states\) must be a Python int >= 1"),
                                              (3, "x", "unknown nesting")])
def test_masks_bad_input(L, nesting, match):
    with pytest.raises(ValueError, match=match):
        nesting_masks(L, nesting)
