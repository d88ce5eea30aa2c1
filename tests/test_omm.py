"""Orbital minimisation objectives: gradients against explicit constructions, unbiasedness of
the batch-half estimates, recovery of numpy.linalg.eigh, the unbounded direction, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from linalg_cases import symmetric_matrix

from nestedlora_jax.objectives import OperatorOutput, nesting_masks
from nestedlora_jax.omm import OMM_VARIANTS, omm_loss, omm_objective

sg = jax.lax.stop_gradient


def _explicit_omm(W, A, variant):
    """Autodiff *through* T f = A W (full population, batch means over the n rows).

    joint: ``sum_l w_l L_omm(f_1:l)`` (uniform w); sequential: term k sees only ``f_k``
    as variable, ``f_1:k-1`` held.
    """
    n, L = W.shape

    def omm(F):
        lam, pi = F.T @ F / n, F.T @ (A @ F) / n
        return -jnp.trace((2 * jnp.eye(F.shape[1]) - lam) @ pi)

    if variant == "joint":
        return sum(omm(W[:, :l]) for l in range(1, L + 1)) / L
    return sum(omm(jnp.concatenate([sg(W[:, :k]), W[:, k:k + 1]], axis=1)) for k in range(L))


def _loop_gradient(f, Tf, variant, split_batch):
    """The per-sample update written out with loops (numpy, float64)."""
    f, Tf = np.asarray(f, np.float64), np.asarray(Tf, np.float64)
    B, L = f.shape
    m, M = nesting_masks(L, "joint" if variant == "joint" else "sequential")
    halves = [range(0, B // 2), range(B // 2, B)] if split_batch else [range(B)]
    grad = np.zeros_like(f)
    for h, rows in enumerate(halves):
        other = list(halves[1 - h] if split_batch else rows)
        lam = f[other].T @ f[other] / len(other)
        c = f[other].T @ Tf[other] / len(other)
        pi = 0.5 * (c + c.T)
        for b in rows:
            for k in range(L):
                g = -2 * m[k] * Tf[b, k]
                for j in range(L):
                    if variant == "sanger":
                        g += 2 * M[j, k] * f[b, j] * pi[j, k]
                    else:
                        g += M[j, k] * (f[b, j] * pi[j, k] + Tf[b, j] * lam[j, k])
                grad[b, k] = 2.0 / B * g
    return grad


@pytest.mark.parametrize("variant", ["joint", "sequential"])
def test_gradient_matches_autodiff_through_the_operator(variant):
    n, L = 20, 5
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        A = jnp.asarray(symmetric_matrix(n, [], -1.0, 2.0, seed=2))
        W = jnp.asarray(rng.standard_normal((n, L)))
        ours = jax.jit(jax.grad(lambda W: omm_loss(W, A @ W, variant=variant, split_batch=False)))(W)
        ref = jax.jit(jax.grad(lambda W: _explicit_omm(W, A, variant)))(W)
        np.testing.assert_allclose(ours, ref, rtol=1e-11, atol=1e-13)
        if variant == "joint":  # joint nesting has a scalar objective: the value matches too
            np.testing.assert_allclose(omm_loss(W, A @ W, variant="joint", split_batch=False),
                                       _explicit_omm(W, A, "joint"), rtol=1e-12)


@pytest.mark.parametrize("split_batch", [False, True])
@pytest.mark.parametrize("variant", OMM_VARIANTS)
def test_gradient_matches_loops(variant, split_batch):
    f = jax.random.normal(jax.random.key(1), (8, 4), jnp.float32)
    Tf = jax.random.normal(jax.random.key(2), (8, 4), jnp.float32)
    ours = jax.jit(jax.grad(lambda f: omm_loss(f, Tf, variant=variant, split_batch=split_batch)))(f)
    np.testing.assert_allclose(ours, _loop_gradient(f, Tf, variant, split_batch), rtol=2e-5, atol=1e-6)
    g_Tf = jax.grad(lambda Tf: omm_loss(f, Tf, variant=variant, split_batch=split_batch))(Tf)
    np.testing.assert_array_equal(g_Tf, 0.0)  # the operator is never differentiated


def test_batch_halves_make_the_update_unbiased():
    """On a population of 32 rows, the mean of the split-batch update over 40 000 random
    batches of 8 (rows drawn with replacement, f = W[rows], T f = (A W)[rows]) equals the
    population gradient; with the whole batch for both factors it is visibly biased."""
    n, L, B, draws = 32, 3, 8, 40_000
    with jax.enable_x64(True):
        A = jnp.asarray(symmetric_matrix(n, [3.0, 2.0, 1.0], 0.0, 0.5, seed=4))
        W = jax.random.normal(jax.random.key(5), (n, L))
        AW = A @ W
        population = jax.grad(lambda W: omm_loss(W, sg(AW), variant="joint", split_batch=False))(W)

        def batch_grad(key, split):
            rows = jax.random.randint(key, (B,), 0, n)
            g = jax.grad(lambda Wb: omm_loss(Wb, AW[rows], variant="joint", split_batch=split))(W[rows])
            return jnp.zeros_like(W).at[rows].add(g)

        keys = jax.random.split(jax.random.key(6), draws)
        for split, ok in ((True, True), (False, False)):
            g = jax.jit(jax.vmap(lambda k: batch_grad(k, split)))(keys)
            mean, se = g.mean(0), g.std(0) / np.sqrt(draws)
            z = np.abs(np.asarray(mean - population)) / np.asarray(se)
            print(f"split={split}: max |z| {z.max():.1f}")
            assert (z.max() < 5.0) == ok


def _descend(obj, A, W, lr, steps):
    """Gradient descent on the free table W (n, L), the whole population fed twice (B = 2n),
    so both batch halves are the population: deterministic and exact."""

    def step(_, W):
        f = jnp.concatenate([W, W])
        return W - lr * jax.grad(lambda f: obj.loss(OperatorOutput(f, jnp.concatenate([A @ W, A @ W])), ())[0])(f)[:W.shape[0]] * 2

    return jax.jit(lambda W: jax.lax.fori_loop(0, steps, step, W))(W)


@pytest.mark.parametrize("variant", OMM_VARIANTS)
def test_recovers_eigh_with_orthonormal_functions(variant):
    n, top = 48, [5.0, 4.2, 3.1, 2.3, 1.5]
    L = len(top)
    with jax.enable_x64(True):
        A_np = symmetric_matrix(n, top, 0.0, 0.8, seed=7)  # positive semi-definite: see below
        W0 = 0.3 * jax.random.normal(jax.random.key(0), (n, L))
        W = np.asarray(_descend(omm_objective(variant), jnp.asarray(A_np), W0, 2.0, 6000))
    evals, evecs = np.linalg.eigh(A_np)
    order = np.argsort(evals)[::-1][:L]
    rayleigh = np.sum(W * (A_np @ W), axis=0) / np.sum(W**2, axis=0)
    rel = np.abs(rayleigh - evals[order]) / evals[order]
    cos = np.abs(np.sum(W * evecs[:, order], axis=0)) / np.linalg.norm(W, axis=0)
    gram = W.T @ W / n
    print(f"{variant}: max rel eigenvalue error {rel.max():.1e}, max 1-|cos| {1 - cos.min():.1e}, "
          f"max |Lambda - I| {np.abs(gram - np.eye(L)).max():.1e}")
    assert rel.max() <= 1e-10
    assert cos.min() >= 1 - 1e-10
    np.testing.assert_allclose(gram, np.eye(L), atol=1e-8)  # OMM's optimum is orthonormal


def test_a_negative_direction_is_unbounded_below():
    """Why OMM needs a shifted spectrum: along an eigenvector with a negative eigenvalue the
    objective is |lambda| (2 a^2 - a^4) -> -infinity (NestedLoRA's stays bounded)."""
    from nestedlora_jax.objectives import nested_lora_loss

    v = jnp.ones((16, 1))
    for a in (1.0, 10.0, 100.0):
        f = a * v
        np.testing.assert_allclose(omm_loss(f, -0.5 * f, split_batch=False), 0.5 * (2 * a**2 - a**4), rtol=1e-5)
        assert nested_lora_loss(f, -0.5 * f, split_batch=False) > 0


def test_objective_and_bad_input():
    assert [omm_objective(v).name for v in OMM_VARIANTS] == ["omm-joint", "omm-seq", "omm-sanger"]
    obj = omm_objective()
    assert obj.needs_even_batch and not obj.norms_are_eigenvalues and obj.parameter_term is None
    f = jnp.ones((6, 3)) * jnp.arange(1.0, 4.0)
    with pytest.raises(ValueError, match="unknown OMM variant"):
        omm_objective("parallel")
    with pytest.raises(ValueError, match="weights apply to joint nesting only"):
        omm_objective("sanger", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="split_batch must be a bool"):
        omm_objective(split_batch=1)
    with pytest.raises(ValueError, match="batch size of f must be even"):
        omm_loss(f[:5], f[:5])
    with pytest.raises(ValueError, match="Tf must have the same shape"):
        omm_loss(f, f[:, :2])
    with pytest.raises(ValueError, match="self-adjoint operator \\(one family\\)"):
        obj.loss(OperatorOutput(f, f, f, f), ())
