"""High-dimensional problems: the coupled oscillator, the Han-Lu-Zhou cosine potential in d = 5
and 10, the correlated Gaussian sampler and the operator scaling.

Every exact answer is checked against something independent of the code under test:

- coupled-oscillator energies (d = 2) against a Galerkin diagonalisation of ``H`` in the product
  Hermite-function basis of the ORIGINAL coordinates (exact 1-D matrix elements of ``x``, ``x^2``
  and ``-d^2/dx^2``; Ritz values are upper bounds that converge exponentially in the basis size);
- cosine-potential energies against scipy's Mathieu characteristic values (``-y'' + c cos(x) y =
  E y`` is Mathieu's equation with ``x = 2z``, ``a = 4E``, ``q = 2c``; the ``2 pi``-periodic
  solutions are ``ce_{2n}`` and ``se_{2n+2}``) and the published ground energies;
- ``H psi = E psi`` by exact autodiff Laplacians (float64) at random points;
- orthonormality by importance-weighted Monte Carlo in d = 10, every Gram entry within 5 of its
  own standard errors (estimated from the samples), plus an exact quadrature in d = 2;
- the sampler's density against ``scipy.stats.multivariate_normal``.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.special
import scipy.stats

from nestedlora_jax.laplacians import laplacian
from nestedlora_jax.operators import eigenvalues_from_energies
from nestedlora_jax.problems import (
    HAN_LU_ZHOU_COEFFICIENTS_5D,
    HAN_LU_ZHOU_COEFFICIENTS_10D,
    CosinePotential,
    CoupledOscillator,
    HarmonicOscillator,
    Hydrogen,
    InfiniteWell,
)
from nestedlora_jax.samplers import CorrelatedGaussianSampler

GROUND_5D = -0.054018930536326  # Han, Lu, Zhou (2020), tables
GROUND_10D = -0.098087448866409


# ---------------------------------------------------------------------------------------------
# 1. Coupled oscillator, d = 2: direct diagonalisation in the original coordinates.
# ---------------------------------------------------------------------------------------------


def _hermite_basis_matrices(N):
    """Exact matrices of x, x^2 and -d^2/dx^2 in the first N Hermite functions h_n (the
    eigenfunctions of -d^2/dx^2 + x^2, eigenvalues 2n + 1): <n-1|x|n> = sqrt(n/2),
    <n|x^2|n> = (2n+1)/2, <n-2|x^2|n> = sqrt(n(n-1))/2, and -d^2/dx^2 = (2n+1) - x^2."""
    n = np.arange(N)
    X = np.diag(np.sqrt(n[1:] / 2.0), 1)
    X = X + X.T
    off = np.sqrt(n[2:] * (n[2:] - 1)) / 2.0
    X2 = np.diag((2 * n + 1) / 2.0) + np.diag(off, 2) + np.diag(off, -2)
    T = np.diag((2 * n + 1) / 2.0) - np.diag(off, 2) - np.diag(off, -2)
    return X, X2, T


def _direct_energies_2d(K, count, N=40):
    """Lowest ``count`` eigenvalues of -Lap + x^T K x in the basis h_m(x_1) h_n(x_2), m, n < N."""
    X, X2, T = _hermite_basis_matrices(N)
    eye = np.eye(N)
    H = (
        scipy.sparse.kron(T + K[0, 0] * X2, eye)
        + scipy.sparse.kron(eye, T + K[1, 1] * X2)
        + 2 * K[0, 1] * scipy.sparse.kron(X, X)
    )
    values = scipy.sparse.linalg.eigsh(
        scipy.sparse.csc_matrix(H), k=count, sigma=0.0, which="LM", return_eigenvectors=False
    )
    return np.sort(values)


COUPLED_2D = {
    "default": CoupledOscillator(2),
    "seed3_wide": CoupledOscillator(2, seed=3, frequency_range=(0.5, 3.0)),
    "explicit_K": CoupledOscillator(2, K=[[2.0, 1.2], [1.2, 1.5]]),
}


@pytest.mark.parametrize("name", list(COUPLED_2D))
def test_coupled_oscillator_2d_energies_match_direct_diagonalisation(name):
    problem = COUPLED_2D[name]
    K = np.asarray(problem.K)
    exact = problem.energies(10)
    direct = _direct_energies_2d(K, 10)
    np.testing.assert_allclose(exact, direct, rtol=1e-9, atol=0)
    # Ritz values bound the true eigenvalues from above (Courant-Fischer).
    assert np.all(direct >= exact * (1 - 1e-12))
    # The coupling matters at this tolerance: dropping K_12 changes the spectrum far more.
    uncoupled = _direct_energies_2d(np.diag(np.diag(K)), 10)
    assert np.max(np.abs(uncoupled - exact) / exact) > 1e-3


def test_coupled_oscillator_2d_orthonormal_by_quadrature():
    # Gauss-Hermite with the weight removed: psi_i psi_j e^{|x|^2} = poly * exp(-y^T (W - I) y),
    # W = diag(w) in [1, 2]: an entire function, integrated to ~machine precision by 60 nodes.
    problem = COUPLED_2D["default"]
    L = 10
    t, w = np.polynomial.hermite.hermgauss(60)
    w = w * np.exp(t**2)
    X, Y = np.meshgrid(t, t, indexing="ij")
    pts = np.stack([X.ravel(), Y.ravel()], -1)
    weights = np.outer(w, w).ravel()
    with jax.enable_x64(True):
        psi = np.asarray(jax.jit(jax.vmap(lambda x: problem.eigenfunctions(x, L)))(jnp.asarray(pts)))
    gram = psi.T @ (weights[:, None] * psi)
    np.testing.assert_allclose(gram, np.eye(L), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 2. H psi = E psi by autodiff, float64.
# ---------------------------------------------------------------------------------------------

EIGEN_CASES = {
    "coupled10d": (CoupledOscillator(10), 32),
    "cosine10d": (CosinePotential(10), 21),
    "well5d": (InfiniteWell(5), 16),
    "hydrogen3d_L14": (Hydrogen(3), 14),
    "hydrogen3d_L30": (Hydrogen(3), 30),
}


@pytest.mark.parametrize("name", list(EIGEN_CASES))
def test_eigenfunctions_solve_the_eigenproblem(name):
    problem, L = EIGEN_CASES[name]
    with jax.enable_x64(True):
        xs = np.asarray(problem.default_sampler(L).sample(jax.random.key(11), 72))
        if isinstance(problem, Hydrogen):
            xs = xs[np.linalg.norm(xs, axis=-1) > 0.1]  # keep away from the nucleus
        assert xs.shape[0] >= 48 and xs.dtype == np.float64

        def apply_h(x):
            fn = lambda y: problem.eigenfunctions(y, L)
            lap = laplacian(fn, x, method="forward_over_forward")
            psi = fn(x)
            return -lap + problem.potential(x) * psi, psi

        h_psi, psi = jax.jit(jax.vmap(apply_h))(jnp.asarray(xs))
    h_psi, psi = np.asarray(h_psi), np.asarray(psi)
    assert psi.shape == (xs.shape[0], L)
    energies = problem.energies(L)
    scale = np.max(np.abs(psi), axis=0)
    assert np.all(scale > 1e-6)  # no state is (numerically) zero at every point
    residual = np.max(np.abs(h_psi - energies * psi), axis=0) / scale
    assert np.max(residual) < 1e-8, residual
    # The eigenvalue is attributed to the right function: a neighbouring energy does not fit.
    distinct = np.nonzero(np.abs(np.diff(energies)) > 1e-3)[0]
    if len(distinct):
        i = distinct[0]
        wrong = np.max(np.abs(h_psi[:, i] - energies[i + 1] * psi[:, i])) / scale[i]
        assert wrong > 1e-4


# ---------------------------------------------------------------------------------------------
# 3. Orthonormality by importance-weighted Monte Carlo, d = 10.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem, L, n", [(CoupledOscillator(10), 16, 2**17), (CosinePotential(10), 21, 2**16)]
)
def test_orthonormal_by_monte_carlo(problem, L, n):
    sampler = problem.default_sampler(L)
    with jax.enable_x64(True):
        xs = sampler.sample(jax.random.key(5), n)

        def weighted(x):  # f = psi / sqrt(p), so E_p[f_i f_j] = int psi_i psi_j
            return problem.eigenfunctions(x, L) * jnp.exp(-0.5 * sampler.log_prob(x))

        f = np.asarray(jax.jit(jax.vmap(weighted))(xs))
    assert np.all(np.isfinite(f))
    gram = f.T @ f / n
    second = (f * f).T @ (f * f) / n  # E[(f_i f_j)^2]
    stderr = np.sqrt((second - gram**2) / (n - 1))
    z = (gram - np.eye(L)) / stderr
    assert np.max(np.abs(z)) < 5, np.max(np.abs(z))
    # The test has power: a 5 % error in any norm or overlap would be caught.
    assert np.max(stderr) < 0.01, np.max(stderr)
    # And the standard errors are honest (z-scores of order one, not all ~0).
    assert 0.3 < np.mean(z**2) < 3.0, np.mean(z**2)


# ---------------------------------------------------------------------------------------------
# 4. Cosine potential in d = 5 and 10.
# ---------------------------------------------------------------------------------------------


def _mathieu_spectrum(c, count=5):
    """Lowest ``count`` eigenvalues of -d^2/dx^2 + c cos x, 2 pi-periodic, from scipy's Mathieu
    characteristic values (independent of the Fourier solver under test)."""
    q = 2.0 * c
    values = [scipy.special.mathieu_a(0, q)]
    for m in range(1, count):
        values += [scipy.special.mathieu_a(2 * m, q), scipy.special.mathieu_b(2 * m, q)]
    return np.sort(values)[:count] / 4.0


def test_cosine_default_coefficients_and_ground_energies():
    p5, p10 = CosinePotential(5), CosinePotential(10)
    assert p5.coefficients == HAN_LU_ZHOU_COEFFICIENTS_5D
    assert p10.coefficients == HAN_LU_ZHOU_COEFFICIENTS_10D
    assert HAN_LU_ZHOU_COEFFICIENTS_10D[:5] == HAN_LU_ZHOU_COEFFICIENTS_5D
    assert abs(p5.energies(1)[0] - GROUND_5D) < 1e-12
    assert abs(p10.energies(1)[0] - GROUND_10D) < 1e-12
    # Independently: the ground energy is the sum of the 1-D Mathieu ground values.
    for problem, ground in ((p5, GROUND_5D), (p10, GROUND_10D)):
        mathieu = sum(_mathieu_spectrum(c)[0] for c in problem.coefficients)
        assert abs(mathieu - ground) < 1e-12


@pytest.mark.parametrize("dim, L", [(5, 40), (10, 60)])
def test_cosine_energies_are_sums_of_1d_spectra(dim, L):
    problem = CosinePotential(dim)
    spectra = [_mathieu_spectrum(c, 3) for c in problem.coefficients]
    # Modes 0..2 (the 1-D ground state and the split pair near 1) cover every state below ~3.8:
    # the next 1-D mode is near 4.
    assert all(s[2] < 1.1 for s in spectra) and all(_mathieu_spectrum(c, 4)[3] > 3.9 for c in problem.coefficients)
    sums = np.sort(functools.reduce(np.add.outer, spectra).ravel())
    energies = problem.energies(L)
    assert energies[-1] < 3.0
    np.testing.assert_allclose(energies, sums[:L], rtol=0, atol=1e-12)
    # The first excitation is the smallest 1-D excitation over the coordinates.
    gap = min(s[1] - s[0] for s in spectra)
    assert abs((energies[1] - energies[0]) - gap) < 1e-12


@pytest.mark.parametrize("dim", [5, 10])
def test_cosine_first_excited_cluster(dim):
    problem = CosinePotential(dim)
    size = 2 * dim  # one quantum e^{+-i x_k} in one coordinate
    energies = problem.energies(size + 2)
    cluster = energies[1 : size + 1]
    assert np.all(np.diff(energies) >= 0)
    assert np.all((cluster > 0.9) & (cluster < 0.98)), cluster
    assert energies[size + 1] > 1.9  # the next level (two quanta) is a whole gap higher
    if dim == 10:  # the brief's bound: E_21 < 1.2 < E_22 (observed 0.9355 and 1.9023)
        assert energies[20] < 1.2 < energies[21]
    index = problem.multi_indices(size + 1)
    assert np.all(index[0] == 0)
    excited = index[1:]
    # Each cluster state excites exactly one coordinate to 1-D mode 1 or 2, and every
    # coordinate appears with both modes.
    assert np.all(np.sum(excited > 0, axis=1) == 1)
    pairs = {(int(np.argmax(row > 0)), int(row.max())) for row in excited}
    assert pairs == {(k, m) for k in range(dim) for m in (1, 2)}


# ---------------------------------------------------------------------------------------------
# 5. CorrelatedGaussianSampler.
# ---------------------------------------------------------------------------------------------


def _random_covariance(d, seed):
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T + 0.3 * np.eye(d)


def test_correlated_gaussian_log_prob_matches_scipy():
    d = 4
    cov = _random_covariance(d, 0)
    mean = np.array([0.5, -1.0, 2.0, 0.0])
    sampler = CorrelatedGaussianSampler(d, cov, mean=mean)
    rng = np.random.default_rng(1)
    # Bulk and far-tail points (the log-density must stay accurate there).
    pts = np.concatenate([rng.standard_normal((32, d)), 8 * rng.standard_normal((8, d))]) + mean
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(jax.vmap(sampler.log_prob))(jnp.asarray(pts)))
        assert got.dtype == np.float64
    expected = scipy.stats.multivariate_normal(mean, cov).logpdf(pts)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-10)
    # Scalar mean broadcasts.
    s0 = CorrelatedGaussianSampler(d, cov)
    with jax.enable_x64(True):
        got0 = np.asarray(jax.vmap(s0.log_prob)(jnp.asarray(pts)))
    np.testing.assert_allclose(got0, scipy.stats.multivariate_normal(np.zeros(d), cov).logpdf(pts), atol=1e-10)


def test_correlated_gaussian_log_prob_integrates_to_one_2d():
    cov = np.array([[1.0, 0.8], [0.8, 2.0]])
    sampler = CorrelatedGaussianSampler(2, cov, mean=(0.3, -0.2))
    t = np.linspace(-12, 12, 481)  # trapezoid: spectrally accurate for a Gaussian
    X, Y = np.meshgrid(t, t, indexing="ij")
    pts = np.stack([X.ravel(), Y.ravel()], -1)
    with jax.enable_x64(True):
        p = np.exp(np.asarray(jax.vmap(sampler.log_prob)(jnp.asarray(pts))))
    h = t[1] - t[0]
    assert abs(p.sum() * h * h - 1.0) < 1e-10


def test_correlated_gaussian_samples_match_mean_and_covariance():
    d, n = 3, 2**16
    cov = _random_covariance(d, 2)
    mean = np.array([1.0, -2.0, 0.5])
    sampler = CorrelatedGaussianSampler(d, cov, mean=mean)
    with jax.enable_x64(True):
        x = np.asarray(sampler.sample(jax.random.key(0), n))
        assert x.dtype == np.float64 and x.shape == (n, d)
    c = x - mean  # the true mean: products are unbiased for the covariance
    mean_z = (x.mean(0) - mean) / (x.std(0) / math.sqrt(n))
    assert np.max(np.abs(mean_z)) < 5
    prods = c[:, :, None] * c[:, None, :]
    est = prods.mean(0)
    stderr = prods.std(0) / math.sqrt(n)
    assert np.max(np.abs((est - cov) / stderr)) < 5
    assert np.max(stderr / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))) < 0.01  # power
    # Outside x64 the default dtype is float32.
    assert sampler.sample(jax.random.key(0), 4).dtype == jnp.float32


def test_correlated_gaussian_is_hashable_and_a_static_argument():
    cov = _random_covariance(3, 4)
    a = CorrelatedGaussianSampler(3, cov)
    b = CorrelatedGaussianSampler(3, cov.tolist())  # another container, same numbers
    c = CorrelatedGaussianSampler(3, cov + 0.1 * np.eye(3))
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c}) == 2
    assert a != CorrelatedGaussianSampler(3, cov, mean=1.0)
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def log_probs(sampler, x):
        traces.append(1)
        return jax.vmap(sampler.log_prob)(x)

    x = jnp.zeros((2, 3))
    np.testing.assert_array_equal(log_probs(a, x), log_probs(b, x))  # b hits a's cache
    assert len(traces) == 1
    log_probs(c, x)
    assert len(traces) == 2


# ---------------------------------------------------------------------------------------------
# 6. CoupledOscillator construction.
# ---------------------------------------------------------------------------------------------


def test_coupled_oscillator_seed_determines_K():
    a, b, c = CoupledOscillator(5, seed=7), CoupledOscillator(5, seed=7), CoupledOscillator(5, seed=8)
    assert a == b and hash(a) == hash(b) and a.K == b.K
    assert a.K != c.K and a != c
    assert len({a, b, c}) == 2
    # A list frequency_range is normalised (the problem stays hashable, equal to the tuple one).
    d = CoupledOscillator(5, seed=7, frequency_range=[1, 2])
    assert d == a and hash(d) == hash(a)


def test_coupled_oscillator_random_K_structure():
    problem = CoupledOscillator(6, seed=1, frequency_range=(0.5, 3.0))
    w = np.asarray(problem.frequencies)
    Q = np.asarray(problem.rotation)
    K = np.asarray(problem.K)
    assert np.all(np.diff(w) >= 0)
    assert np.all((w >= 0.5 - 1e-12) & (w <= 3.0 + 1e-12))
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-13)
    np.testing.assert_allclose((Q * w**2) @ Q.T, K, atol=1e-12)
    np.testing.assert_allclose(K, K.T, atol=0)
    assert np.max(np.abs(K - np.diag(np.diag(K)))) > 0.1  # a genuinely rotated problem
    np.testing.assert_allclose(problem.energies(1), [np.sum(w)], rtol=1e-14)
    np.testing.assert_allclose(problem.energies(2), [np.sum(w), np.sum(w) + 2 * w[0]], rtol=1e-14)


def test_coupled_oscillator_explicit_K_round_trips():
    K = _random_covariance(4, 3)
    problem = CoupledOscillator(4, K=K)
    np.testing.assert_array_equal(np.asarray(problem.K), K)
    np.testing.assert_allclose(problem.frequencies, np.sqrt(np.linalg.eigvalsh(K)), rtol=1e-13)
    assert problem == CoupledOscillator(4, K=K.tolist()) and hash(problem) == hash(CoupledOscillator(4, K=K))
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((16, 4))
    with jax.enable_x64(True):
        v = np.asarray(jax.jit(jax.vmap(problem.potential))(jnp.asarray(pts)))
    np.testing.assert_allclose(v, np.einsum("ni,ij,nj->n", pts, K, pts), rtol=1e-13)


def test_coupled_oscillator_isotropic_K_is_the_harmonic_oscillator():
    # K = I: frequencies exactly 1, the spectrum and its degeneracies are those of -Lap + |x|^2;
    # K = 4 I doubles every energy.
    iso = CoupledOscillator(3, K=np.eye(3))
    ho = HarmonicOscillator(3)
    np.testing.assert_allclose(iso.energies(20), ho.energies(20), rtol=1e-14)
    assert iso.degenerate_blocks(20) == ho.degenerate_blocks(20)
    np.testing.assert_allclose(CoupledOscillator(3, K=4 * np.eye(3)).energies(20), 2 * ho.energies(20), rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# 7. Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: CoupledOscillator(2, K=[[2.0, 1.0], [0.0, 2.0]]), ValueError, "K must be symmetric"),
        (lambda: CoupledOscillator(2, K=[[1.0, 2.0], [2.0, 1.0]]), ValueError, "K must be positive definite"),
        (lambda: CoupledOscillator(2, K=[[1.0, 1.0], [1.0, 1.0]]), ValueError, "K must be positive definite"),
        (lambda: CoupledOscillator(2, K=-np.eye(2)), ValueError, "K must be positive definite"),
        (lambda: CoupledOscillator(2, K=np.eye(3)), ValueError, r"K must have shape \(2, 2\)"),
        (lambda: CoupledOscillator(2, K=[1.0, 1.0]), ValueError, r"K must have shape \(2, 2\)"),
        (lambda: CoupledOscillator(2, K=[[np.nan, 0.0], [0.0, 1.0]]), ValueError, "K has non-finite"),
        (lambda: CoupledOscillator(2, K=[[np.inf, 0.0], [0.0, 1.0]]), ValueError, "K has non-finite"),
        (lambda: CoupledOscillator(2, frequency_range=(2.0, 1.0)), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(2, frequency_range=(0.0, 1.0)), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(2, frequency_range=(-1.0, 1.0)), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(2, frequency_range=(1.0, np.inf)), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(2, frequency_range=(np.nan, 1.0)), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(2, frequency_range=(1.0, 2.0, 3.0)), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(2, frequency_range=1.0), ValueError, "frequency_range must be"),
        (lambda: CoupledOscillator(0), ValueError, "dim must be a positive int"),
        (lambda: CoupledOscillator(2).potential(jnp.zeros(3)), ValueError, r"ONE point of shape \(2,\)"),
        (lambda: CoupledOscillator(2).energies(0), ValueError, "L .* must be a Python int >= 1"),
        (lambda: CorrelatedGaussianSampler(2, [[1.0, 0.5], [0.0, 1.0]]), ValueError, "covariance must be symmetric"),
        (lambda: CorrelatedGaussianSampler(2, np.zeros((2, 2))), ValueError, "covariance must be positive definite"),
        (lambda: CorrelatedGaussianSampler(2, np.eye(2), mean=(0.0, 1.0, 2.0)), ValueError, "mean must be a scalar or have length dim=2"),
        (lambda: CorrelatedGaussianSampler(2, np.eye(2)).log_prob(jnp.zeros(3)), ValueError, r"ONE point of shape \(2,\)"),
        (lambda: CosinePotential(7), ValueError, r"tabulated for d = 2, 5 and 10, not d = 7"),
        (lambda: CosinePotential(1, coefficients=0.5).energies(65), ValueError, "L=65 exceeds"),
        (lambda: Hydrogen(3).eigenfunctions(jnp.ones(3), 31), NotImplementedError, r"n <= 4 \(L <= 30\); L=31"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_limits_are_sharp():
    # The largest accepted inputs next to the rejected ones above.
    assert CosinePotential(7, coefficients=0.1).dim == 7  # explicit coefficients: any d
    assert jax.jit(lambda x: Hydrogen(3).eigenfunctions(x, 30))(jnp.ones(3)).shape == (30,)
    assert len(CosinePotential(1, coefficients=0.5).energies(63)) == 63
    assert CoupledOscillator(2, frequency_range=(1.5, 1.5)).frequencies == pytest.approx((1.5, 1.5))


# ---------------------------------------------------------------------------------------------
# 8. Operator scaling.
# ---------------------------------------------------------------------------------------------


def test_operator_scaling_coupled_oscillator_10d():
    problem, L = CoupledOscillator(10), 32
    scale, shift = problem.operator_scaling(L)
    energies = problem.energies(L + 8)
    t = eigenvalues_from_energies(energies, scale, shift)
    assert scale > 0
    np.testing.assert_allclose(t[0], 1.0, rtol=1e-14)
    np.testing.assert_allclose(t[L - 1], 0.5, rtol=1e-13)
    assert np.all((t[:L] >= 0.5 - 1e-13) & (t[:L] <= 1.0 + 1e-13))
    assert np.all(np.diff(t) <= 0) and np.all(t[L:] < t[L - 1])
    # D is the spread E_L - E_1 (not max(spread, |E_1|), which would give t_L = 0.75 here).
    spread = energies[L - 1] - energies[0]
    assert energies[0] > spread  # the case the change is about
    np.testing.assert_allclose(scale, 1.0 / (2 * spread), rtol=1e-14)
    np.testing.assert_allclose(shift, (2 * energies[L - 1] - energies[0]) / (2 * spread), rtol=1e-14)


@pytest.mark.parametrize("problem, L", [(HarmonicOscillator(3), 1), (CosinePotential(10), 1), (InfiniteWell(2), 1)])
def test_operator_scaling_zero_spread_uses_ground_energy(problem, L):
    # All wanted energies equal: D = |E_1| (t_1 = 1 still).
    scale, shift = problem.operator_scaling(L)
    e1 = problem.energies(1)[0]
    np.testing.assert_allclose(scale, 1.0 / abs(e1), rtol=1e-14)
    np.testing.assert_allclose(shift - scale * e1, 1.0, rtol=1e-14)


def test_lowest_states_in_a_hundred_dimensions_are_cheap_and_right():
    """d = 100 enumerates in milliseconds (a tensor grid of modes would need 2^100 sums), and
    the low spectrum follows from the frequencies: ground state sum(w), then one quantum
    (2 w_k) in the softest axes, in order."""
    from nestedlora_jax.problems import CoupledOscillator

    problem = CoupledOscillator(dim=100)
    E = problem.energies(8)
    w = np.asarray(problem.frequencies)
    np.testing.assert_allclose(E[0], w.sum(), rtol=1e-12)
    expected = np.sort(np.concatenate([w.sum() + 2 * w, [w.sum() + 4 * w[0]]]))[:7]
    np.testing.assert_allclose(E[1:], expected, rtol=1e-12)
