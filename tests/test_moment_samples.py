"""Moment samples: NestedLoRA's second moments estimated on extra, operator-free samples."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from linalg_cases import symmetric_matrix
from test_training import _setup

from nestedlora_jax.baselines import neuralef_objective
from nestedlora_jax.config import TrainingConfig
from nestedlora_jax.objectives import (
    OperatorOutput,
    nested_lora_loss,
    nested_lora_svd_loss,
    nesting_masks,
)
from nestedlora_jax.run_folder import check_training_args
from nestedlora_jax.training import fit, init_train_state, make_train_step

NESTINGS = ["joint", "sequential"]


def _batch(B=12, L=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    f = jax.random.normal(k1, (B, L))
    Tf = f @ jnp.diag(jnp.arange(L, 0, -1.0)) + 0.1 * jax.random.normal(k2, (B, L))
    return f, Tf


# ------------------------------------------------------------- the objective


@pytest.mark.parametrize("nesting", NESTINGS)
def test_moments_of_the_batch_itself_give_the_unsplit_objective(nesting):
    """With the batch as its own moment samples the estimate is the full-batch one."""
    f, Tf = _batch()
    plain = lambda f: nested_lora_loss(f, Tf, nesting=nesting, split_batch=False)
    moment = lambda f: nested_lora_loss(f, Tf, nesting=nesting, f_moment=f)
    np.testing.assert_allclose(moment(f), plain(f), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(moment)(f), jax.grad(plain)(f), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("nesting", NESTINGS)
def test_svd_moments_of_the_batch_itself_give_the_unsplit_objective(nesting):
    f, Tg = _batch(seed=1)
    g, Tadj_f = _batch(seed=2)
    plain = lambda f, g: nested_lora_svd_loss(f, Tg, g, Tadj_f, nesting=nesting, split_batch=False)
    moment = lambda f, g: nested_lora_svd_loss(f, Tg, g, Tadj_f, nesting=nesting, f_moment=f, g_moment=g)
    np.testing.assert_allclose(moment(f, g), plain(f, g), rtol=1e-6)
    for a, b in zip(jax.grad(moment, argnums=(0, 1))(f, g), jax.grad(plain, argnums=(0, 1))(f, g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("nesting", NESTINGS)
def test_gradient_multiplies_the_moment_samples_second_moment(nesting):
    """dL/df_b = (4/B) [-m Tf_b + f_b @ (M * Lambda_m)] with Lambda_m = f_m^T f_m / B_m, for moment
    samples built to have a chosen second moment; no gradient reaches the moment samples."""
    B, L, B_m = 10, 3, 6
    f, Tf = _batch(B, L)
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(B_m, L)))  # orthonormal columns
    target = np.array([[2.0, 0.3, -0.1], [0.3, 1.0, 0.2], [-0.1, 0.2, 0.5]])
    f_m = jnp.asarray(np.sqrt(B_m) * Q @ np.linalg.cholesky(target).T, jnp.float32)
    np.testing.assert_allclose(f_m.T @ f_m / B_m, target, atol=1e-5)

    grad_f, grad_m = jax.grad(lambda f, fm: nested_lora_loss(f, Tf, nesting=nesting, f_moment=fm),
                              argnums=(0, 1))(f, f_m)
    m, M = nesting_masks(L, nesting)
    expected = (4.0 / B) * (-m * Tf + f @ (M * target))
    np.testing.assert_allclose(grad_f, expected, rtol=1e-5, atol=1e-6)
    assert not np.any(grad_m)


@pytest.mark.parametrize("nesting", NESTINGS)
def test_moment_sample_gradient_is_unbiased(nesting):
    """Minibatches of 4 rows and 4 independent moment rows of a finite problem (uniform over its
    rows): the mean gradient matches the population gradient (z-test at 5 standard errors over
    ~100 coordinates). Without moment samples or halves the same estimator is biased, and the
    test detects it, so it can fail."""
    n, L, B, K = 24, 4, 4, 20000
    with jax.enable_x64(True):
        A = jnp.asarray(symmetric_matrix(n, [], -1.0, 1.0, seed=5))
        W = jax.random.normal(jax.random.key(2), (n, L))
        AW = A @ W
        population = jax.grad(lambda W: nested_lora_loss(W, A @ W, nesting=nesting, split_batch=False))(W)

        def one(key, with_moments):
            kb, km = jax.random.split(key)
            idx = jax.random.randint(kb, (B,), 0, n)
            idx_m = jax.random.randint(km, (B,), 0, n)

            def loss(W):
                if with_moments:
                    return nested_lora_loss(W[idx], AW[idx], nesting=nesting, f_moment=W[idx_m])
                return nested_lora_loss(W[idx], AW[idx], nesting=nesting, split_batch=False)

            return jax.grad(loss)(W)

        keys = jax.random.split(jax.random.key(9), K)

        def zscores(with_moments):
            grads = jax.lax.map(lambda k: one(k, with_moments), keys, batch_size=1000)
            mean, se = grads.mean(axis=0), grads.std(axis=0, ddof=1) / np.sqrt(K)
            return np.abs(np.asarray((mean - population) / se))

        z_moments, z_plain = zscores(True), zscores(False)
    assert z_moments.max() < 5.0, z_moments.max()
    assert z_plain.max() > 8.0, z_plain.max()


def test_moment_samples_refused_when_malformed():
    f, Tf = _batch(8, 3)
    with pytest.raises(ValueError, match=r"f_moment must have shape \(B_m, L\) with L = 3"):
        nested_lora_loss(f, Tf, f_moment=f[:, :2])
    with pytest.raises(ValueError, match="f_moment must be a floating-point array"):
        nested_lora_loss(f, Tf, f_moment=jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="both families .* got only f_moment"):
        nested_lora_svd_loss(f, Tf, f, Tf, f_moment=f)
    # An odd batch is fine: with moment samples the batch is not split.
    assert np.isfinite(nested_lora_loss(f[:7], Tf[:7], f_moment=f))


def test_baselines_refuse_moment_samples_rather_than_ignore_them():
    f, Tf = _batch(8, 3)
    obj = neuralef_objective()
    with pytest.raises(ValueError, match="NeuralEF does not use moment samples"):
        obj.loss(OperatorOutput(f, Tf, f_moment=f), obj.init(3, jnp.float32))


# ------------------------------------------------------------- training


def test_the_batch_is_the_same_with_and_without_moment_samples():
    """Moment samples come from their own key: adding them leaves every step's batch as it was
    (a loss that ignores them trains identically)."""
    seen = []

    def loss_fn(params, objective_state, batch, key=None, moment_batch=None):
        seen.append(moment_batch)
        return jnp.sum(params * jnp.mean(batch, axis=0)) ** 2, (objective_state, {
            "norms": jnp.zeros(1), "rayleigh": jnp.zeros(1)})

    sample = lambda key, n: jax.random.normal(key, (n, 2))
    opt = optax.sgd(0.1)
    params = jnp.array([1.0, -0.5])
    state = init_train_state(params, opt, 1)
    key = jax.random.key(3)
    plain = make_train_step(loss_fn, opt, sample, 16)(state, key)
    with_moments = make_train_step(loss_fn, opt, sample, 16, moment_batch_size=64)(state, key)
    assert seen[0] is None and seen[1].shape == (64, 2)
    np.testing.assert_array_equal(plain.params, with_moments.params)
    assert not np.array_equal(plain.params, params)


def test_fit_with_moment_samples_learns_the_oscillator():
    """2-D oscillator, 3 states (E = 2, 4, 4): energies within 2% with a batch of 64 and 1024
    moment samples per step."""
    apply, params, op = _setup()
    res = fit(apply, params, op.op, op.sampler, progress=False,
              config=TrainingConfig(steps=2000, batch_size=64, moment_batch_size=1024, log_every=500,
                                    seed=0, learning_rate=3e-3))
    energies = -(np.asarray(res.eigenvalues) - op.shift) / op.scale
    np.testing.assert_allclose(np.sort(energies), [2.0, 4.0, 4.0], rtol=2e-2)
    assert res.bad_steps == 0


def test_moment_batch_size_is_validated():
    with pytest.raises(ValueError, match="TrainingConfig.moment_batch_size must be"):
        TrainingConfig(moment_batch_size=0)
    apply, params, op = _setup()
    with pytest.raises(ValueError, match="'neuralef' objective does not use moment samples"):
        fit(apply, params, op.op, op.sampler, objective=neuralef_objective(), progress=False,
            config=TrainingConfig(steps=1, batch_size=8, moment_batch_size=16))


def test_benchmark_option_refused_for_baselines():
    args = argparse.Namespace(states=4, batch=64, hidden=None, method="neuralef", seeds=None,
                              moment_batch=512)
    with pytest.raises(ValueError, match="--moment-batch applies to the neuralsvd methods only"):
        check_training_args(args, dim=2)
    check_training_args(argparse.Namespace(**(vars(args) | {"method": "neuralsvd-seq"})), dim=2)
