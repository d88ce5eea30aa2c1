"""The canonical dependence kernel and the SVD side of the operator contract.

Exact checks: a finite joint distribution (singular values of P / sqrt(p_x p_y^T), top one
dropped) and a non-symmetric matrix (numpy.linalg.svd) recovered by free parameter tables in
float64; Mehler's formula for Gaussian pairs; the unbiasedness and the gradient of the
leave-one-out estimate; the data samplers and their errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nestedlora_jax import metrics as M
from nestedlora_jax.dependence import (
    ClassPairedData,
    GaussianPairs,
    PairedData,
    dependence_kernel_operator,
    discrete_dependence_operator,
    discrete_dependence_singular_values,
    pair_metrics,
)
from nestedlora_jax.objectives import OperatorOutput, nested_lora_objective, nested_lora_svd_loss
from nestedlora_jax.operators import BatchOperator, kernel_integral_operator, matrix_operator
from nestedlora_jax.training import make_loss_fn


def _table(params, i):
    """A free parameter table as a 'network': row i (a category index given as a point (1,))."""
    return params[i[0].astype(jnp.int32)]


def _descend(loss_fn, tables, steps, lr):
    """Plain gradient descent on free tables (full population, deterministic)."""

    def step(_, p):
        g = jax.grad(lambda p: loss_fn(p, (), None)[0])(p)
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

    return jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, p))(tables)


def _joint_table(nx, ny, seed):
    """A joint distribution with well-separated singular values (a low-rank dependence)."""
    rng = np.random.default_rng(seed)
    px, py = rng.dirichlet(np.full(nx, 5.0)), rng.dirichlet(np.full(ny, 5.0))
    # P = px py^T (1 + sum_k s_k a_k b_k^T) with a_k, b_k orthonormal in L2(px), L2(py).
    a = np.linalg.qr(np.sqrt(px)[:, None] * np.c_[np.ones(nx), rng.normal(size=(nx, 3))])[0][:, 1:]
    b = np.linalg.qr(np.sqrt(py)[:, None] * np.c_[np.ones(ny), rng.normal(size=(ny, 3))])[0][:, 1:]
    a, b = a / np.sqrt(px)[:, None], b / np.sqrt(py)[:, None]
    s = np.array([0.5, 0.3, 0.15])
    scale = 0.9 / np.max(np.abs((a * s) @ b.T))  # keep P positive
    return np.outer(px, py) * (1 + scale * (a * s) @ b.T)


@pytest.mark.parametrize("nesting", ["sequential", "joint"])
@pytest.mark.parametrize("split_batch", [True, False])
def test_discrete_joint_distribution_recovered_to_1e6(nesting, split_batch):
    P = _joint_table(7, 5, seed=3)
    exact = discrete_dependence_singular_values(P)
    assert exact.shape == (4,)
    L = 3
    with jax.enable_x64(True):
        op = discrete_dependence_operator(P)
        loss_fn = make_loss_fn((_table, _table), op, nested_lora_objective(nesting, split_batch=split_batch))
        key = jax.random.PRNGKey(0)
        tables = (0.1 * jax.random.normal(key, (7, L)), 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (5, L)))
        F, G = _descend(loss_fn, tables, steps=8000, lr=3.0)
        F, G = np.asarray(F), np.asarray(G)
    px, py = P.sum(1), P.sum(0)
    # At the optimum f_i = c_i phi_i, g_i = (s_i / c_i) psi_i: only the product of the norms is fixed.
    s_learned = np.sqrt((px @ F**2) * (py @ G**2))
    np.testing.assert_allclose(s_learned, exact[:L], rtol=1e-6)
    # The functions: phi_i = U_i / sqrt(p_x) of the SVD of the centred, normalised table.
    Kt = P / np.sqrt(np.outer(px, py)) - np.outer(np.sqrt(px), np.sqrt(py))
    U, _, Vt = np.linalg.svd(Kt)
    for i in range(L):
        phi = np.sqrt(px) * F[:, i]
        assert abs(abs(phi @ U[:, i]) / np.linalg.norm(phi) - 1) < 1e-6
        psi = np.sqrt(py) * G[:, i]
        assert abs(abs(psi @ Vt[i]) / np.linalg.norm(psi) - 1) < 1e-6
    # The constant mode is not learned: every learned function is centred.
    np.testing.assert_allclose(px @ F, 0, atol=1e-7)
    np.testing.assert_allclose(py @ G, 0, atol=1e-7)


@pytest.mark.parametrize("nesting", ["sequential", "joint"])
def test_nonsymmetric_matrix_svd_by_free_tables(nesting):
    rng = np.random.default_rng(11)
    U = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    V = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    s = np.array([3.0, 2.0, 1.2, 0.5, 0.2, 0.1])
    A = U[:, :6] * s @ V.T  # (8, 6): non-symmetric, non-square
    L = 4
    with jax.enable_x64(True):
        loss_fn = make_loss_fn((_table, _table), matrix_operator(A), nested_lora_objective(nesting))
        key = jax.random.PRNGKey(1)
        tables = (0.1 * jax.random.normal(key, (8, L)), 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (6, L)))
        F, G = (np.asarray(t) for t in _descend(loss_fn, tables, steps=4000, lr=0.1))
    u, sv, vt = np.linalg.svd(A)
    learned = np.sqrt(np.sum(F**2, 0) * np.sum(G**2, 0))
    np.testing.assert_allclose(learned, sv[:L], rtol=1e-6)
    for i in range(L):
        assert abs(abs(F[:, i] @ u[:, i]) / np.linalg.norm(F[:, i]) - 1) < 1e-6
        assert abs(abs(G[:, i] @ vt[i]) / np.linalg.norm(G[:, i]) - 1) < 1e-6


def test_dependence_estimate_is_unbiased_and_its_gradient_is_the_closed_form():
    """mean_b f_b . Tg_b is the U-statistic of E[f g] - E f E g, and the objective's custom
    gradient (Tg held constant) equals autodiff of the explicit unbiased objective."""
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(0)
        B, L = 10, 3
        W = jax.random.normal(key, (2, L))
        V = jax.random.normal(jax.random.fold_in(key, 1), (3, L))
        xs = jax.random.normal(jax.random.fold_in(key, 2), (B, 2))
        ys = jax.random.normal(jax.random.fold_in(key, 3), (B, 3))
        fn = lambda W: (lambda x: jnp.tanh(x @ W)), lambda V: (lambda y: jnp.sin(y @ V))
        op = dependence_kernel_operator()

        def custom(W, V):
            out = op.apply((fn[0](W), fn[1](V)), (xs, ys))
            return nested_lora_svd_loss(*out[:4], nesting="joint")

        def explicit(W, V):
            f, g = jax.vmap(fn[0](W))(xs), jax.vmap(fn[1](V))(ys)
            off = 1.0 - jnp.eye(B)
            cross = jnp.einsum("bi,cj,bc->ij", f, g, off) / (B * (B - 1))  # sum over b != c
            linear = jnp.mean(f * g, axis=0) - jnp.diag(cross)
            h = B // 2
            mom = lambda a: a.T @ a / a.shape[0]
            m, Mm = np.full(L, 1.0), np.ones((L, L))
            from nestedlora_jax.objectives import nesting_masks

            m, Mm = nesting_masks(L, "joint")
            quad = 0.5 * jnp.sum(Mm * (mom(f[:h]) * mom(g[h:]) + mom(f[h:]) * mom(g[:h])))
            return -2 * jnp.sum(m * linear) + quad

        np.testing.assert_allclose(custom(W, V), explicit(W, V), rtol=1e-12)
        gc, ge = jax.grad(custom, argnums=(0, 1))(W, V), jax.grad(explicit, argnums=(0, 1))(W, V)
        for a, b in zip(gc, ge):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_gaussian_pairs_mehler_exact():
    prob = GaussianPairs((0.9, 0.6), dx=3, dy=2, mix=True)
    L = 6
    np.testing.assert_allclose(prob.singular_values(L), [0.9, 0.81, 0.729, 0.6561, 0.6, 0.59049])
    np.testing.assert_array_equal(prob.multi_indices(3), [[1, 0], [2, 0], [3, 0]])
    with jax.enable_x64(True):
        xs, ys, w = prob.quadrature(8)
        phi, psi = np.asarray(prob.left_functions(xs, L)), np.asarray(prob.right_functions(ys, L))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
    # Orthonormal families, E[phi_i(X) psi_j(Y)] = s_i delta_ij, both centred (no constant mode).
    np.testing.assert_allclose((phi * w[:, None]).T @ phi, np.eye(L), atol=1e-10)
    np.testing.assert_allclose((psi * w[:, None]).T @ psi, np.eye(L), atol=1e-10)
    np.testing.assert_allclose((phi * w[:, None]).T @ psi, np.diag(prob.singular_values(L)), atol=1e-10)
    np.testing.assert_allclose(w @ phi, 0, atol=1e-10)
    # The sampler draws the same law as the rule integrates (covariances, loosely).
    x, y = (np.asarray(a) for a in prob.sample(jax.random.PRNGKey(0), 200_000))
    cov = np.cov(np.c_[x, y].T)
    cov_rule = (np.c_[xs, ys] * w[:, None]).T @ np.c_[xs, ys]
    np.testing.assert_allclose(cov, cov_rule, atol=0.03)
    # The exact functions score zero distances and exact singular values in pair_metrics.
    with jax.enable_x64(True):
        m = pair_metrics(lambda a: prob.left_functions(a, L) * np.sqrt(prob.singular_values(L)),
                         lambda b: prob.right_functions(b, L) * np.sqrt(prob.singular_values(L)),
                         xs, ys, weights=w, exact=prob.singular_values(L), phi=phi, psi=psi,
                         blocks=prob.degenerate_blocks(L))
    assert m["max_rel_error"] < 1e-9 and m["max_rel_error_norm"] < 1e-9
    assert m["subspace_distance_left"] < 1e-9 and m["subspace_distance_right_total"] < 1e-9
    assert np.max(m["angle_distance_left"]) < 1e-9 and m["orthogonality_right"] < 1e-9


def test_gaussian_pairs_degenerate_blocks_and_errors():
    prob = GaussianPairs((0.5, 0.5))
    assert prob.degenerate_blocks(5) == [(0, 2), (2, 5)]  # 0.5 twice, then 0.25 three times
    with pytest.raises(ValueError, match=r"correlations must be in \(0, 1\)"):
        GaussianPairs((1.0,))
    with pytest.raises(ValueError, match="dy = 1 is smaller than the 2 canonical correlations"):
        GaussianPairs((0.9, 0.5), dy=1)
    with pytest.raises(ValueError, match="use a smaller num"):
        GaussianPairs((0.9, 0.5), dx=4, dy=4).quadrature(10)


def test_singular_ritz_recovers_svd_from_mixed_spans():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        A = rng.normal(size=(9, 7))
        u, s, vt = np.linalg.svd(A)
        mix = rng.normal(size=(3, 3))
        f = u[:, :3] @ mix  # a rotated, rescaled basis of the top-3 left singular space
        g = vt[:3].T @ rng.normal(size=(3, 3))
        ritz = M.singular_ritz(jnp.asarray(f), jnp.asarray(A @ g), jnp.asarray(g),
                               jnp.ones(9), jnp.ones(7))
        np.testing.assert_allclose(ritz.singular_values, s[:3], rtol=1e-12)
        # Collapsed directions are reported as NaN, not as spurious values.
        f0 = f.copy()
        f0[:, 2] = 0.0
        ritz0 = M.singular_ritz(jnp.asarray(f0), jnp.asarray(A @ g), jnp.asarray(g),
                                jnp.ones(9), jnp.ones(7))
        assert np.isnan(ritz0.singular_values[2]) and np.all(np.isfinite(ritz0.singular_values[:2]))


def test_kernel_integral_operator_is_unbiased_on_rbf_eigenfunction():
    """(K phi_0)(x) ~ lambda_0 phi_0(x) for the RBF kernel under N(0, s^2) (exact eigenpair)."""
    l, sd = 0.7, 1.3
    a, b = 1 / (4 * sd**2), 1 / (2 * l**2)
    c = np.sqrt(a**2 + 2 * a * b)
    lam0 = np.sqrt(2 * a / (a + b + c))
    phi0 = lambda x: jnp.exp(-(c - a) * x[0] ** 2)[None]
    op = kernel_integral_operator(lambda x, y: jnp.exp(-jnp.sum((x - y) ** 2) / (2 * l**2)))
    assert isinstance(op, BatchOperator) and not op.two_sided
    xs = sd * jax.random.normal(jax.random.PRNGKey(0), (4000, 1))
    out = op.apply(phi0, xs)
    ratio = float(jnp.sum(out.f * out.Tg) / jnp.sum(out.f**2))
    assert abs(ratio - lam0) / lam0 < 0.02


# ----------------------------------------------------------------- data and errors


def test_paired_data_sampling_and_validation(tmp_path):
    x = np.arange(20.0).reshape(10, 2)
    y = np.arange(10.0)  # (N,) is one feature
    data = PairedData(x, y)
    assert data.dim == (2, 1) and data.num_pairs == 10
    xs, ys = data.sample(jax.random.PRNGKey(0), 6)
    assert xs.shape == (6, 2) and ys.shape == (6, 1) and xs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(xs[:, 0]) / 2, np.asarray(ys[:, 0]))  # still paired
    # Independent uniform draws: every pair equally often.
    _, big = data.sample(jax.random.PRNGKey(1), 100_000)
    counts = np.bincount(np.asarray(big[:, 0]).astype(int), minlength=10)
    assert np.all(np.abs(counts - 10_000) < 5 * np.sqrt(10_000))
    with pytest.raises(ValueError, match="one y per x: got 10 x's and 9 y's"):
        PairedData(x, y[:9])
    with pytest.raises(ValueError, match="x is empty"):
        PairedData(np.zeros((0, 2)), np.zeros((0, 1)))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x has 1 rows with non-finite values \\(first: row 3\\)"):
        PairedData(bad, y)
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        data.sample(jax.random.PRNGKey(0), 0)
    path = tmp_path / "pairs.npz"
    np.savez(path, a=x, b=y)
    loaded = PairedData.from_npz(path, x="a", y="b")
    np.testing.assert_array_equal(loaded.x, x)
    with pytest.raises(ValueError, match="has no array\\(s\\) \\['x', 'y'\\]"):
        PairedData.from_npz(path)


def test_class_paired_data_draws_within_classes():
    rng = np.random.default_rng(0)
    lx, ly = rng.integers(0, 4, 50), rng.integers(0, 4, 80)
    ly[:4] = np.arange(4)  # every class on both sides
    x = lx[:, None] + 0.01 * rng.normal(size=(50, 1))
    y = np.c_[ly, -ly] + 0.01 * rng.normal(size=(80, 2))
    data = ClassPairedData(x, lx, y, ly)
    xs, ys = (np.asarray(a) for a in data.sample(jax.random.PRNGKey(1), 40))
    np.testing.assert_array_equal(np.rint(xs[:, 0]), np.rint(ys[:, 0]))
    with pytest.raises(ValueError, match="labels \\[7\\] of x have no y with the same label"):
        ClassPairedData(x, np.where(lx == 0, 7, lx), y, ly)
    with pytest.raises(ValueError, match="x_labels must be integers"):
        ClassPairedData(x, lx.astype(float), y, ly)


def test_operator_sidedness_is_checked():
    with pytest.raises(ValueError, match="two-sided .* but one network was given"):
        make_loss_fn(_table, dependence_kernel_operator())
    with pytest.raises(ValueError, match="one-sided .* but two networks were given"):
        make_loss_fn((_table, _table), lambda fn, x: (fn(x), fn(x)))
    op = dependence_kernel_operator()
    with pytest.raises(ValueError, match="batch of pairs \\(xs, ys\\)"):
        op.apply((lambda x: x, lambda y: y), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="the same B"):
        op.apply((lambda x: x, lambda y: y), (jnp.ones((4, 2)), jnp.ones((3, 2))))
    with pytest.raises(ValueError, match="the joint distribution must be finite and non-negative"):
        discrete_dependence_operator([[0.5, -0.1], [0.3, 0.3]])
    with pytest.raises(ValueError, match="every category needs positive marginal"):
        discrete_dependence_operator([[0.5, 0.0], [0.5, 0.0]])
