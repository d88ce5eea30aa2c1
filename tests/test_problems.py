"""Problems: exact energies, eigenfunctions solving H psi = E psi, orthonormal by quadrature.

``H psi = E psi`` is checked with the package Laplacian (exact autodiff, float64) at points
drawn from each problem's default sampler: the residual ``||H psi_i - E_i psi_i|| / (|E_i| ||psi_i||)``
over the points must be <= 1e-8 (exact arithmetic gives 0; rounding gives ~1e-14 even with the
cancellation between -Lap psi and V psi near the hydrogen nucleus). Orthonormality uses
quadrature rules that are exact or exponentially accurate for these integrands, so ``1e-6`` is
a loose bound (observed ~1e-12).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from nestedlora_jax.laplacians import laplacian
from nestedlora_jax.operators import eigenvalues_from_energies
from nestedlora_jax.problems import CosinePotential, HarmonicOscillator, Hydrogen, InfiniteWell
from quadrature_rules import angular_rule

CASES = {
    "oscillator1d": (HarmonicOscillator(1), 8),
    "oscillator2d": (HarmonicOscillator(2), 15),
    "oscillator3d": (HarmonicOscillator(3), 20),
    "hydrogen2d": (Hydrogen(2), 36),  # n <= 5, the benchmark's largest table
    "hydrogen2d_Z2": (Hydrogen(2, Z=2.0), 9),
    "hydrogen3d": (Hydrogen(3), 30),  # n <= 4, every tabulated harmonic
    "well2d": (InfiniteWell(2, length=2.0), 12),
    "cosine2d": (CosinePotential(), 10),
}


# ---------------------------------------------------------------------------------------------
# Energies and blocks.
# ---------------------------------------------------------------------------------------------


def test_cosine_energies_match_reference():
    expected = [-0.5916245, 0.6233656, 0.6628879, 0.8915460, 0.9825416, 1.8778780, 2.1460584, 2.1975318]
    np.testing.assert_allclose(CosinePotential().energies(8), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_oscillator_levels_and_degeneracies(dim):
    L = sum(math.comb(n + dim - 1, n) for n in range(5))  # levels n = 0..4 exactly
    energies = HarmonicOscillator(dim).energies(L)
    blocks = HarmonicOscillator(dim).degenerate_blocks(L)
    assert [stop - start for start, stop in blocks] == [math.comb(n + dim - 1, n) for n in range(5)]
    for n, (start, stop) in enumerate(blocks):
        np.testing.assert_array_equal(energies[start:stop], 2 * n + dim)
    assert energies.dtype == np.float64


def test_hydrogen_energies_and_blocks():
    h2 = Hydrogen(2)
    n = np.repeat(np.arange(4), 2 * np.arange(4) + 1)
    np.testing.assert_allclose(h2.energies(16), -1 / (4 * (n + 0.5) ** 2), rtol=1e-15)
    assert h2.degenerate_blocks(16) == [(0, 1), (1, 4), (4, 9), (9, 16)]
    assert h2.degenerate_blocks(6) == [(0, 1), (1, 4), (4, 6)]  # truncated at L
    np.testing.assert_allclose(Hydrogen(2, Z=3.0).energies(4), 9 * h2.energies(4), rtol=1e-15)
    h3 = Hydrogen(3)
    n3 = np.repeat(np.arange(1, 5), np.arange(1, 5) ** 2)
    np.testing.assert_allclose(h3.energies(30), -1 / (4 * n3**2), rtol=1e-15)
    assert h3.degenerate_blocks(30) == [(0, 1), (1, 5), (5, 14), (14, 30)]
    assert len(h3.energies(100)) == 100  # energies for any n; eigenfunctions only n <= 4


def test_infinite_well_energies():
    well = InfiniteWell(2, length=2.0)
    sums = sorted(i * i + j * j for i in range(1, 20) for j in range(1, 20))[:30]
    np.testing.assert_allclose(well.energies(30), np.pi**2 * np.array(sums) / 4.0, rtol=1e-15)
    # 1 + 7^2 = 5^2 + 5^2 = 50: accidental degeneracy (1,7), (5,5), (7,1) is one block.
    blocks = well.degenerate_blocks(60)
    energies = well.energies(60) * 4 / np.pi**2
    for start, stop in blocks:
        assert np.all(energies[start:stop] == energies[start])
    assert any(np.isclose(energies[s], 50) and t - s == 3 for s, t in blocks)


@pytest.mark.parametrize("name", list(CASES))
def test_operator_scaling_makes_wanted_states_top_positive(name):
    problem, L = CASES[name]
    scale, shift = problem.operator_scaling(L)
    t = eigenvalues_from_energies(problem.energies(L + 5), scale, shift)
    assert scale > 0
    np.testing.assert_allclose(t[0], 1.0, rtol=1e-14)  # normalised top eigenvalue
    assert np.all(t[:L] > 0) and np.all(np.diff(t) <= 0)  # positive, in energy order
    if name.startswith("hydrogen"):
        # Continuum of -H + c reaches up to c = shift / scale; bound states stay above it.
        assert t[L - 1] > shift
    else:
        assert t[L - 1] >= 0.5 - 1e-12


# ---------------------------------------------------------------------------------------------
# Eigenfunctions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_eigenfunctions_solve_the_eigenproblem(name):
    problem, L = CASES[name]
    with jax.enable_x64(True):
        xs = jax.jit(problem.default_sampler(L).sample, static_argnums=1)(jax.random.key(3), 256)

        def residual(x):
            lap = laplacian(lambda y: problem.eigenfunctions(y, L), x, method="forward_over_forward")
            psi = problem.eigenfunctions(x, L)
            return -problem.kinetic * lap + problem.potential(x) * psi, psi

        h_psi, psi = jax.jit(jax.vmap(residual))(xs)
        energies = problem.energies(L)
        res = np.linalg.norm(h_psi - energies * psi, axis=0) / (np.abs(energies) * np.linalg.norm(psi, axis=0))
        assert psi.shape == (256, L) and psi.dtype == jnp.float64
        assert np.max(res) <= 1e-8, res


def _gl(a, b, n):
    t, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (b - a) * t + 0.5 * (a + b), 0.5 * (b - a) * w


def _radial_rule(r_max):
    # Gauss-Legendre panels, refined near the nucleus; integrands are polynomial x exponential.
    breaks = np.concatenate([[0.0], np.geomspace(0.5, r_max, 12)])
    nodes = [_gl(a, b, 32) for a, b in zip(breaks[:-1], breaks[1:])]
    return np.concatenate([n for n, _ in nodes]), np.concatenate([w for _, w in nodes])


def _angular_rule(d):
    # 2-D: trapezoid, exact for trigonometric polynomials of degree < 24 (here <= 10).
    # 3-D: exact for spherical polynomials of degree <= 9 (products of two l <= 3 harmonics
    # have degree <= 6).
    return angular_rule(2, 24) if d == 2 else angular_rule(3, 12, 6)


def _quadrature(problem):
    """Points (N, d) and weights (N,) integrating products of two eigenfunctions over the domain."""
    d = problem.dim
    if isinstance(problem, HarmonicOscillator):
        # psi_i psi_j = polynomial * exp(-|x|^2): Gauss-Hermite with weights w e^{x^2} is exact.
        x, w = np.polynomial.hermite.hermgauss(16)
        w = w * np.exp(x**2)
        grids = np.meshgrid(*([x] * d), indexing="ij")
        return np.stack([g.ravel() for g in grids], -1), np.prod(np.meshgrid(*([w] * d), indexing="ij"), 0).ravel()
    if isinstance(problem, InfiniteWell):
        x, w = _gl(0.0, problem.length, 24)
    if isinstance(problem, CosinePotential):
        # Periodic trapezoid rule: exact for trigonometric polynomials of degree < 64, and the
        # Fourier coefficients of these eigenfunctions decay super-exponentially.
        x, w = -np.pi + 2 * np.pi * np.arange(64) / 64, np.full(64, 2 * np.pi / 64)
    if isinstance(problem, (InfiniteWell, CosinePotential)):
        X, Y = np.meshgrid(x, x, indexing="ij")
        return np.stack([X.ravel(), Y.ravel()], -1), np.outer(w, w).ravel()
    # Hydrogen, n <= 5 at Z = 1: the slowest psi^2 ~ r^10 exp(-2 r / 11) holds below 1e-25 of
    # its norm beyond r ~ 800 / Z.
    r, wr = _radial_rule(800.0 / problem.Z)
    u, wu = _angular_rule(d)
    pts = (r[:, None, None] * u[None]).reshape(-1, d)
    return pts, (wr[:, None] * r[:, None] ** (d - 1) * wu[None]).ravel()


@pytest.mark.parametrize("name", list(CASES))
def test_eigenfunctions_orthonormal_by_quadrature(name):
    problem, L = CASES[name]
    with jax.enable_x64(True):
        pts, w = _quadrature(problem)
        psi = np.asarray(jax.jit(jax.vmap(lambda x: problem.eigenfunctions(x, L)))(jnp.asarray(pts)))
    gram = psi.T @ (w[:, None] * psi)
    np.testing.assert_allclose(gram, np.eye(L), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim, L", [(2, 9), (2, 16), (2, 36), (3, 14), (3, 30)])
def test_hydrogen_evaluation_radius_leaves_the_stated_tail(dim, L):
    # Independent of the Laguerre-quadrature bisection: integrate the eigenfunctions themselves
    # beyond R (Gauss-Legendre panels on [R, 12 R]; the mass past 12 R is below 1e-30).
    problem = Hydrogen(dim)
    R = problem.evaluation_radius(L)
    breaks = R * np.geomspace(1.0, 12.0, 9)
    nodes = [_gl(a, b, 40) for a, b in zip(breaks[:-1], breaks[1:])]
    r, wr = np.concatenate([n for n, _ in nodes]), np.concatenate([w for _, w in nodes])
    u, wu = _angular_rule(dim)
    x = (r[:, None, None] * u[None]).reshape(-1, dim)
    with jax.enable_x64(True):
        psi = np.asarray(jax.jit(jax.vmap(lambda y: problem.eigenfunctions(y, L)))(jnp.asarray(x)))
    tails = ((wr * r ** (dim - 1))[:, None] * wu[None]).reshape(-1) @ psi**2
    # The slowest state leaves exactly the stated fraction, none leaves more.
    assert np.max(tails) == pytest.approx(problem.EVALUATION_TAIL, rel=1e-6)
    assert np.all(tails <= problem.EVALUATION_TAIL * (1 + 1e-6))


@pytest.mark.parametrize("L", [9, 16, 36])
def test_hydrogen2d_evaluation_grid_integrates_every_state(L):
    # The benchmark's grid (300 nodes per polar axis) sees each state's whole norm and the
    # states' orthogonality; the old radius (62 for 16 states) lost 2.3% of the n = 3 norms.
    problem = Hydrogen(2)
    with jax.enable_x64(True):
        pts, w = problem.quadrature_grid(L, 300)
        psi = np.asarray(jax.jit(jax.vmap(lambda x: problem.eigenfunctions(x, L)))(jnp.asarray(pts)))
    assert np.linalg.norm(pts, axis=1).max() <= problem.evaluation_radius(L)
    np.testing.assert_allclose(psi.T @ (w[:, None] * psi), np.eye(L), rtol=0, atol=1e-9)


def test_hydrogen2d_matches_method_md_formula():
    # method.md §3 (Z = 1): psi ∝ r^|l| exp(-r/(2n+1)) L_{n-|l|}^{2|l|}(2r/(2n+1)) {cos, sin}(l theta),
    # ordered l = 0, then cos, sin for l = 1, 2, ...: our functions must be positive multiples.
    problem = Hydrogen(2)
    rng = np.random.default_rng(0)
    r, theta = rng.uniform(0.2, 20, 32), rng.uniform(-np.pi, np.pi, 32)
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], -1)
    with jax.enable_x64(True):
        psi = np.asarray(jax.jit(jax.vmap(lambda x: problem.eigenfunctions(x, 16)))(jnp.asarray(pts)))
    for i, (n, l, kind) in enumerate(problem.states(16)):
        trig = np.cos(l * theta) if kind == "c" else np.sin(l * theta)
        ref = r**l * np.exp(-r / (2 * n + 1)) * scipy.special.eval_genlaguerre(n - l, 2 * l, 2 * r / (2 * n + 1)) * trig
        ratio = psi[:, i] @ ref / (ref @ ref)
        assert ratio > 0
        np.testing.assert_allclose(psi[:, i], ratio * ref, rtol=1e-10, atol=1e-14)


def test_oscillator_eigenfunctions_are_hermite_products():
    problem = HarmonicOscillator(2)
    x = np.array([0.3, -1.2])
    with jax.enable_x64(True):
        psi = np.asarray(problem.eigenfunctions(jnp.asarray(x), 6))

    def h(n, t):
        return scipy.special.eval_hermite(n, t) * np.exp(-t * t / 2) / math.sqrt(2.0**n * math.factorial(n) * math.sqrt(math.pi))

    expected = [h(m0, x[0]) * h(m1, x[1]) for m0, m1 in [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0)]]
    np.testing.assert_allclose(psi, expected, rtol=1e-13)


def test_float32_default_and_jit():
    problem = Hydrogen(2)

    @jax.jit
    def evaluate(x):
        jac = jax.jacfwd(lambda y: problem.eigenfunctions(y, 4))(x)
        return problem.eigenfunctions(x, 4), problem.potential(x), jac

    psi, v, _ = evaluate(jnp.array([0.5, -0.25]))
    assert psi.dtype == jnp.float32 and v.dtype == jnp.float32
    # The nucleus itself: finite eigenfunctions and gradients (radius clamped); the potential
    # is -inf there, not a huge finite number, and NaN in gives NaN out.
    psi0, v0, jac0 = evaluate(jnp.zeros(2))
    assert bool(jnp.all(jnp.isfinite(psi0))) and bool(jnp.all(jnp.isfinite(jac0)))
    assert float(v0) == -np.inf
    assert np.isnan(float(problem.potential(jnp.array([np.nan, 0.0]))))
    assert np.all(np.isnan(np.asarray(problem.eigenfunctions(jnp.array([np.nan, 0.0]), 4))))


def test_boundary_mask_and_flags():
    well = InfiniteWell(2, length=2.0)
    np.testing.assert_allclose(float(well.boundary_mask(jnp.array([1.0, 1.0]))), 1.0)
    for edge in ([0.0, 0.7], [2.0, 1.3], [0.4, 0.0], [1.1, 2.0]):
        assert float(well.boundary_mask(jnp.array(edge))) == 0.0
    assert HarmonicOscillator(2).boundary_mask is None and Hydrogen(2).boundary_mask is None
    assert CosinePotential().periodic and not well.periodic
    assert well.box == (0.0, 2.0) and CosinePotential().box == (-np.pi, np.pi) and Hydrogen(3).box is None


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: HarmonicOscillator(2).energies(0), ValueError, "L .* must be a Python int >= 1"),
        (lambda: Hydrogen(2).energies(2.0), ValueError, "L .* must be a Python int >= 1"),
        (lambda: CosinePotential().energies(5000), ValueError, "L=5000 exceeds"),
        (lambda: Hydrogen(4), ValueError, r"dim must be one of \(2, 3\)"),
        (lambda: Hydrogen(2, Z=0.0), ValueError, "Z must be"),
        (lambda: InfiniteWell(2, length=-1.0), ValueError, "length must be"),
        (lambda: CosinePotential(3), ValueError, "tabulated for d = 2, 5 and 10"),
        (lambda: CosinePotential(3, coefficients=(1.0, 2.0)), ValueError,
         "coefficients must be 3 finite numbers"),
        (lambda: HarmonicOscillator(2).potential(jnp.zeros(3)), ValueError, r"ONE point of shape \(2,\)"),
        (lambda: Hydrogen(3).eigenfunctions(jnp.ones(3), 31), NotImplementedError, "n <= 4"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()
