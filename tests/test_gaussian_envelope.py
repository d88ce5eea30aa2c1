"""The Gaussian envelope of harmonically confined problems.

What is proved:

- the envelope algebra: for an importance-weighted network the factor ``exp(-x^T M x / 2 +
  b^T x)`` times ``sqrt(p(x))`` is the ground state ``psi_0`` up to one constant (d = 10 coupled
  oscillator; a shifted Gaussian sampler in 3-D), and without a sampler it is ``psi_0`` itself;
- every exact eigenfunction divided by the envelope is a polynomial of the stated degree
  (finite differences of high order vanish along random lines), so the MLPs are left the
  polynomial factors and nothing else;
- ``solve``'s default network carries it (and only for problems that ask), and it can be
  turned off;
- bad input is refused: a sampler narrower than ``psi^2``, a non-Gaussian sampler for an
  importance-weighted network, a precision that is not positive definite, shapes that do not
  match;
- a configuration written before the envelope existed (version 1) is read with it off, so an
  old run is rebuilt as it was trained.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nestedlora_jax as nl
from nestedlora_jax.config import NetworkConfig, SolveConfig
from nestedlora_jax.networks import GaussianEnvelope, gaussian_envelope_for_network, to_apply
from nestedlora_jax.samplers import (
    CorrelatedGaussianSampler,
    GaussianSampler,
    LaplaceSampler,
    gaussian_mean_precision,
)
from nestedlora_jax.solver import default_network


def _log_envelope(m, b, x):
    return -0.5 * np.einsum("ni,ij,nj->n", x, m, x) + x @ b


def test_importance_weighted_envelope_times_sqrt_density_is_the_ground_state_in_d10():
    problem = nl.CoupledOscillator(dim=10, seed=3)
    sampler = problem.default_sampler(4)
    center, precision = problem.gaussian_envelope()
    with jax.enable_x64(True):
        x = np.asarray(sampler.sample(jax.random.PRNGKey(0), 200, dtype=jnp.float64))
        log_psi0 = np.log(np.asarray(jax.vmap(lambda p: problem.eigenfunctions(p, 1)[0])(x)))
        log_p = np.asarray(jax.vmap(sampler.log_prob)(x))
    m, b = gaussian_envelope_for_network(center, precision, sampler)
    weighted = _log_envelope(m, b, x) + 0.5 * log_p - log_psi0
    assert np.ptp(weighted) < 1e-9 * np.abs(log_psi0).max()
    m, b = gaussian_envelope_for_network(center, precision)  # the network represents psi
    plain = _log_envelope(m, b, x) - log_psi0
    assert np.ptp(plain) < 1e-9 * np.abs(log_psi0).max()


def test_a_shifted_gaussian_sampler_and_a_shifted_centre():
    """``b`` carries both centres: exp(-(x-c)^T A (x-c)/2) / sqrt(N(x; mu, Sigma)) up to one
    constant, for c != 0 and mu != 0 (isotropic sampler)."""
    rng = np.random.default_rng(0)
    c, mu = rng.normal(size=3), rng.normal(size=3)
    a = np.diag([1.0, 2.0, 3.0])
    sampler = GaussianSampler(3, scale=1.2, mean=tuple(mu))
    with jax.enable_x64(True):
        x = np.asarray(sampler.sample(jax.random.PRNGKey(1), 100, dtype=jnp.float64))
        log_p = np.asarray(jax.vmap(sampler.log_prob)(x))
    m, b = gaussian_envelope_for_network(c, a, sampler)
    target = -0.5 * np.einsum("ni,ij,nj->n", x - c, a, x - c) - 0.5 * log_p
    assert np.ptp(_log_envelope(m, b, x) - target) < 1e-10


def test_the_gaussian_samplers_report_their_mean_and_precision():
    cov = np.array([[2.0, 0.3], [0.3, 0.5]])
    mean, precision = gaussian_mean_precision(CorrelatedGaussianSampler(2, cov, mean=(1.0, -1.0)))
    np.testing.assert_allclose(precision, np.linalg.inv(cov), rtol=1e-12)
    np.testing.assert_array_equal(mean, [1.0, -1.0])
    mean, precision = gaussian_mean_precision(GaussianSampler(3, scale=2.0))
    np.testing.assert_allclose(precision, np.eye(3) / 4)
    np.testing.assert_array_equal(mean, np.zeros(3))
    assert gaussian_mean_precision(LaplaceSampler(2)) is None


@pytest.mark.parametrize("dim, L", [(2, 10), (6, 28)])
def test_every_exact_state_is_the_envelope_times_a_polynomial(dim, L):
    """psi_i / envelope restricted to a random line is a polynomial in t of degree <= the state's
    total quantum number: its finite differences of one order higher vanish (float64)."""
    problem = nl.CoupledOscillator(dim=dim, seed=1)
    center, precision = problem.gaussian_envelope()
    degree = problem.multi_indices(L).sum(axis=1)
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        for _ in range(3):
            x0, v = rng.normal(size=dim), rng.normal(size=dim)
            t = np.linspace(-1.0, 1.0, int(degree.max()) + 3)
            points = x0[None, :] + t[:, None] * v[None, :]
            psi = np.asarray(jax.vmap(lambda p: problem.eigenfunctions(p, L))(jnp.asarray(points)))
            envelope = np.exp(-0.5 * np.einsum("ni,ij,nj->n", points - center, precision,
                                               points - center))
            poly = psi / envelope[:, None]
            for i in range(L):
                k = int(degree[i]) + 1
                diff = np.diff(poly[:, i], n=k)
                assert np.abs(diff).max() < 1e-8 * max(1.0, np.abs(poly[:, i]).max())
                if degree[i] > 0:  # and not of a lower degree (the check is not vacuous)
                    assert np.abs(np.diff(poly[:, i], n=k - 1)).max() > 1e-6


def test_solve_default_network_carries_the_envelope_for_the_problems_that_ask():
    problem = nl.CoupledOscillator(dim=4, seed=0)
    net = default_network(problem, 3, NetworkConfig(hidden=(8,)))
    assert isinstance(net.gaussian_envelope, GaussianEnvelope)
    m, b = gaussian_envelope_for_network(*problem.gaussian_envelope(), problem.default_sampler(3))
    np.testing.assert_allclose(np.asarray(net.gaussian_envelope.quadratic[...]), m, rtol=1e-6)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    body = jax.vmap(lambda p: net.body(net.features(p)))(x)
    expected = body * np.exp(_log_envelope(m, b, np.asarray(x, np.float64)))[:, None]
    np.testing.assert_allclose(np.asarray(jax.vmap(net)(x)), expected, rtol=1e-5)
    # Off by configuration; absent for problems without harmonic confinement.
    assert default_network(problem, 3, NetworkConfig(hidden=(8,), gaussian_envelope=False)) \
        .gaussian_envelope is None
    assert default_network(nl.Hydrogen(dim=2), 3, NetworkConfig(hidden=(8,))).gaussian_envelope is None
    assert default_network(nl.InfiniteWell(dim=3), 3, NetworkConfig(hidden=(8,))) \
        .gaussian_envelope is None
    # A network that represents psi itself gets psi's own decay.
    plain = default_network(problem, 3, NetworkConfig(hidden=(8,)), importance_weighted=False)
    np.testing.assert_allclose(np.asarray(plain.gaussian_envelope.quadratic[...]),
                               problem.gaussian_envelope()[1], rtol=1e-6)
    # The envelope is frozen: not among the trainable parameters.
    _, params = to_apply(net)
    assert "gaussian_envelope" not in params


def test_bad_envelopes_and_samplers_are_refused_with_what_to_change():
    problem = nl.CoupledOscillator(dim=3, seed=0)
    center, precision = problem.gaussian_envelope()
    w_max = max(problem.frequencies)
    # psi^2 has covariance (2A)^-1; a sampler narrower than that along the stiffest axis fails.
    narrow = GaussianSampler(3, scale=0.9 / math.sqrt(2 * w_max))
    with pytest.raises(ValueError, match="narrower than psi\\^2"):
        gaussian_envelope_for_network(center, precision, narrow)
    with pytest.raises(ValueError, match="narrower than psi\\^2"):
        default_network(problem, 2, NetworkConfig(hidden=(8,)), sampler=narrow)
    with pytest.raises(ValueError, match="Gaussian sampler.*gaussian_envelope=False"):
        gaussian_envelope_for_network(center, precision, LaplaceSampler(3))
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_envelope_for_network(center, -precision)
    with pytest.raises(ValueError, match="center \\(d,\\) and precision \\(d, d\\)"):
        gaussian_envelope_for_network(center[:2], precision)
    with pytest.raises(ValueError, match="2-dimensional but the envelope 3-dimensional"):
        gaussian_envelope_for_network(center, precision, GaussianSampler(2))
    with pytest.raises(ValueError, match="gaussian_envelope must be"):
        nl.eigenfunction_network(2, 1, gaussian_envelope=(np.eye(3), np.zeros(3)),
                                 rngs=__import__("flax").nnx.Rngs(0))
    # Turning the envelope off lifts the Gaussian-sampler requirement.
    net = default_network(problem, 2, NetworkConfig(hidden=(8,), gaussian_envelope=False),
                          sampler=LaplaceSampler(3))
    assert net.gaussian_envelope is None


def test_a_version_one_configuration_is_read_without_the_envelope_and_the_reordering():
    data = SolveConfig().to_dict()
    collapse = {k: v for k, v in data["training"]["collapse"].items() if k != "reorder"}
    old = {**data, "version": 1,
           "network": {k: v for k, v in data["network"].items() if k != "gaussian_envelope"},
           "training": {**data["training"], "collapse": collapse}}
    config = SolveConfig.from_dict(old)
    assert config.network.gaussian_envelope is False
    assert config.training.collapse.reorder is False
    assert SolveConfig.from_dict(data).network.gaussian_envelope is True
    assert SolveConfig.from_dict(data).training.collapse.reorder is True
    with pytest.raises(ValueError, match="gaussian_envelope must be True or False"):
        NetworkConfig(gaussian_envelope=1)
