"""Tests for nestedlora_jax.metrics against closed forms on the 2D harmonic oscillator.

Exact eigenfunctions of ``-Lap + |x|^2``: products of Hermite functions
``h_n(x) = H_n(x) exp(-x^2/2) / sqrt(2^n n! sqrt(pi))`` with energies ``2(n_x + n_y) + 2``,
evaluated on a tensor Gauss-Hermite grid whose weights ``w_k exp(x_k^2)`` make the quadrature
of ``int psi_i psi_j dx`` exact. Metrics are compiled (static blocks), which also proves they
are jit-compatible; everything runs in float64.
"""

import math

import jax
import numpy as np
import pytest
from numpy.polynomial import hermite

from nestedlora_jax import metrics as M

LEVELS = 5  # n = n_x + n_y = 0..4: 15 states
L = 10  # the learned set covers levels 0..3
BLOCKS = ((0, 1), (1, 3), (3, 6), (6, 10))
T = 0.3  # a mixing angle


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def hermite_function(n, x):
    coeffs = np.zeros(n + 1)
    coeffs[n] = 1.0
    return (
        hermite.hermval(x, coeffs)
        * np.exp(-(x**2) / 2)
        / math.sqrt(2**n * math.factorial(n) * math.sqrt(math.pi))
    )


def oscillator_2d(points_per_axis=16):
    """(psi (N, 15), energies (15,), w (N,)) on a tensor Gauss-Hermite grid."""
    nodes, weights = hermite.hermgauss(points_per_axis)
    x, y = (a.ravel() for a in np.meshgrid(nodes, nodes, indexing="ij"))
    w = np.outer(weights * np.exp(nodes**2), weights * np.exp(nodes**2)).ravel()
    states = [(n - ny, ny) for n in range(LEVELS) for ny in range(n + 1)]
    psi = np.stack([hermite_function(nx, x) * hermite_function(ny, y) for nx, ny in states], axis=1)
    energies = np.array([2.0 * (nx + ny) + 2.0 for nx, ny in states])
    return psi, energies, w


PSI, E, W = oscillator_2d()
HPSI = PSI * E  # H psi_i = E_i psi_i


def rotation(t):
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def block_diag(*blocks):
    n = sum(b.shape[0] for b in blocks)
    out, i = np.zeros((n, n)), 0
    for b in blocks:
        k = b.shape[0]
        out[i : i + k, i : i + k] = b
        i += k
    return out


# Compiled metrics (blocks are static).
subspace = jax.jit(M.subspace_distance, static_argnames=("blocks", "rtol"))
angles = jax.jit(M.angle_distance, static_argnames=("blocks", "align"))
ritz = jax.jit(M.rayleigh_ritz, static_argnames=("rtol",))
rayleigh = jax.jit(M.rayleigh_quotients)
norms = jax.jit(M.norms_squared)
ortho = jax.jit(M.orthogonality)
resid = jax.jit(M.residuals)


def test_fixture_is_orthonormal():
    np.testing.assert_allclose(jax.jit(M.gram)(PSI, W), np.eye(PSI.shape[1]), atol=1e-12)
    assert M.degenerate_blocks(E) == [(0, 1), (1, 3), (3, 6), (6, 10), (10, 15)]
    assert M.degenerate_blocks(E, 8) == [(0, 1), (1, 3), (3, 6)]


def test_exact_eigenfunctions_score_perfectly():
    f, hf = PSI[:, :L], HPSI[:, :L]
    np.testing.assert_allclose(rayleigh(f, hf, W), E[:L], rtol=1e-12)
    np.testing.assert_allclose(norms(f, W), 1.0, rtol=1e-12)
    rel = M.relative_errors(rayleigh(f, hf, W), E)
    assert rel.per_state.shape == (L,) and float(rel.mean) < 1e-12
    np.testing.assert_allclose(resid(f, hf, None, W), 0.0, atol=1e-10)
    np.testing.assert_allclose(resid(f, hf, E[:L], W), 0.0, atol=1e-10)
    o = ortho(f, W)
    assert float(o.frobenius) < 1e-12 and float(o.max_offdiag) < 1e-12
    sd = subspace(f, PSI, W, BLOCKS)
    assert sd.per_block.shape == (4,)
    np.testing.assert_allclose(sd.per_block, 0.0, atol=1e-12)
    assert abs(float(sd.mean)) < 1e-12 and abs(float(sd.total)) < 1e-12
    ad = angles(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(ad.per_function, 0.0, atol=1e-12)
    np.testing.assert_allclose(ad.aligned, f, atol=1e-10)
    rr = ritz(f, hf, W)
    np.testing.assert_allclose(rr.eigenvalues, np.sort(E[:L])[::-1], rtol=1e-12)
    assert int(rr.rank) == L


def test_rotation_inside_blocks_is_invisible_after_alignment():
    q = block_diag(
        np.eye(1),
        rotation(0.7),
        np.diag([1.0, -1.0, 1.0])
        @ np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0],  # any O(3)
        np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))[0],
    )
    f = PSI[:, :L] @ q
    sd = subspace(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(sd.per_block, 0.0, atol=1e-12)
    assert abs(float(sd.total)) < 1e-12
    ad = angles(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(ad.per_function, 0.0, atol=1e-12)
    np.testing.assert_allclose(ad.aligned, PSI[:, :L], atol=1e-10)  # Procrustes undoes Q
    # Without alignment the rotated pair is off by exactly the rotation angle.
    raw = angles(f, PSI, W, BLOCKS, align=False)
    np.testing.assert_allclose(raw.per_function[1:3], 1 - np.cos(0.7), rtol=1e-10)
    assert float(raw.mean) > 0.05
    # Rayleigh-Ritz on the rotated set recovers the exact eigenvalues.
    rr = ritz(f, HPSI[:, :L] @ q, W)
    np.testing.assert_allclose(rr.eigenvalues, np.sort(E[:L])[::-1], rtol=1e-12)


def test_mixing_across_blocks_matches_closed_forms():
    c, s = np.cos(T), np.sin(T)
    # f_0 = cos t psi_0 + sin t psi_1 (block [0:1] leaks into [1:3]).
    f = PSI[:, :L].copy()
    f[:, 0] = c * PSI[:, 0] + s * PSI[:, 1]
    sd = subspace(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(sd.per_block, [s**2, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(sd.mean, s**2 / 4, atol=1e-12)
    assert abs(float(sd.total)) < 1e-12  # psi_1 is still inside the top-10 span
    ad = angles(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(ad.per_function[0], 1 - c, rtol=1e-10)
    np.testing.assert_allclose(ad.per_function[1:], 0.0, atol=1e-12)

    # f_1 = cos t psi_1 + sin t psi_3: block [1:3] keeps one of its two directions partly.
    f = PSI[:, :L].copy()
    f[:, 1] = c * PSI[:, 1] + s * PSI[:, 3]
    sd = subspace(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(sd.per_block, [0, s**2 / 2, 0, 0], atol=1e-12)
    ad = angles(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(ad.per_function, [0, 1 - c] + [0] * 8, atol=1e-12)

    # f_9 = cos t psi_9 + sin t psi_10 leaves the top-10 span: total distance sin^2 t / 10.
    f = PSI[:, :L].copy()
    f[:, 9] = c * PSI[:, 9] + s * PSI[:, 10]
    sd = subspace(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(sd.per_block, [0, 0, 0, s**2 / 4], atol=1e-12)
    np.testing.assert_allclose(sd.total, s**2 / L, atol=1e-12)


def test_scaled_functions():
    scale = np.linspace(0.5, 3.0, L)
    f, hf = PSI[:, :L] * scale, HPSI[:, :L] * scale
    np.testing.assert_allclose(norms(f, W), scale**2, rtol=1e-12)
    np.testing.assert_allclose(rayleigh(f, hf, W), E[:L], rtol=1e-12)
    rel = M.relative_errors(norms(f, W), scale**2)
    assert float(rel.mean) < 1e-12
    assert float(ortho(f, W).max_offdiag) < 1e-12
    np.testing.assert_allclose(resid(f, hf, E[:L], W), 0.0, atol=1e-10)
    np.testing.assert_allclose(subspace(f, PSI, W, BLOCKS).per_block, 0.0, atol=1e-12)
    np.testing.assert_allclose(
        angles(-f, PSI, W, BLOCKS).per_function, 0.0, atol=1e-12
    )  # sign-blind


def test_residual_and_rayleigh_of_a_mixture():
    c, s = np.cos(T), np.sin(T)
    f = (c * PSI[:, 0] + s * PSI[:, 3])[:, None]
    hf = (c * E[0] * PSI[:, 0] + s * E[3] * PSI[:, 3])[:, None]
    lam = c**2 * E[0] + s**2 * E[3]
    np.testing.assert_allclose(rayleigh(f, hf, W), [lam], rtol=1e-12)
    # ||H f - lam f|| = |cos t sin t (E_3 - E_0)| for a unit f.
    np.testing.assert_allclose(resid(f, hf, None, W), [abs(c * s * (E[3] - E[0]))], rtol=1e-10)
    np.testing.assert_allclose(
        resid(3 * f, 3 * hf, None, W), [abs(c * s * (E[3] - E[0]))], rtol=1e-10
    )


def test_orthogonality_of_a_known_pair():
    c, s = np.cos(T), np.sin(T)
    f = np.stack([3.0 * PSI[:, 0], 0.5 * (c * PSI[:, 0] + s * PSI[:, 1])], axis=1)
    o = ortho(f, W)
    np.testing.assert_allclose(o.max_offdiag, c, rtol=1e-12)
    np.testing.assert_allclose(o.frobenius, math.sqrt(2) * c / 2, rtol=1e-12)


def test_rayleigh_ritz_on_a_general_basis_and_a_singular_one():
    # Any invertible mixing of the first 6 states (across blocks): same span, same Ritz values.
    r = np.random.default_rng(2).normal(size=(6, 6)) + 3 * np.eye(6)
    f, hf = PSI[:, :6] @ r, HPSI[:, :6] @ r
    rr = ritz(f, hf, W)
    np.testing.assert_allclose(rr.eigenvalues, np.sort(E[:6])[::-1], rtol=1e-10)
    # The Ritz functions f @ C are w-orthonormal eigenfunctions: G = I, residual 0.
    g = f @ rr.coefficients
    np.testing.assert_allclose(jax.jit(M.gram)(g, W), np.eye(6), atol=1e-10)
    np.testing.assert_allclose(resid(g, hf @ rr.coefficients, rr.eigenvalues, W), 0.0, atol=1e-8)
    # A duplicated direction: rank 5, the missing value is NaN, the rest exact.
    f = np.concatenate([PSI[:, :5], 2 * PSI[:, 4:5]], axis=1)
    hf = np.concatenate([HPSI[:, :5], 2 * HPSI[:, 4:5]], axis=1)
    rr = ritz(f, hf, W)
    assert int(rr.rank) == 5
    np.testing.assert_allclose(rr.eigenvalues[:5], np.sort(E[:5])[::-1], rtol=1e-10)
    assert np.isnan(rr.eigenvalues[5]) and np.all(np.asarray(rr.coefficients)[:, 5] == 0)


def test_collapsed_function_is_penalised_not_nan():
    f = PSI[:, :L].copy()
    f[:, 2] = 0.0
    sd = subspace(f, PSI, W, BLOCKS)
    np.testing.assert_allclose(sd.per_block, [0, 0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(sd.total, 1 / L, atol=1e-12)
    ad = angles(f, PSI, W, BLOCKS)
    assert np.all(np.isfinite(ad.per_function))
    np.testing.assert_allclose(ad.per_function[2], 1.0)
    o = ortho(f, W)
    assert np.isfinite(float(o.frobenius)) and float(o.max_offdiag) < 1e-12


def test_monte_carlo_weights_estimate_the_same_quantities():
    # Uniform weights 1/N on samples: values are plain averages (here of psi_i psi_j on the grid
    # nodes; no claim of accuracy, only that w enters linearly and consistently).
    f = PSI[:, :3]
    w = np.full(PSI.shape[0], 1.0 / PSI.shape[0])
    np.testing.assert_allclose(jax.jit(M.gram)(f, w), f.T @ f / f.shape[0], rtol=1e-12)


def test_relative_errors():
    rel = M.relative_errors(np.array([1.1, -2.0, 3.0]), np.array([1.0, -2.0, 4.0, 9.0]))
    np.testing.assert_allclose(rel.per_state, [0.1, 0.0, 0.25], rtol=1e-12)
    np.testing.assert_allclose(rel.mean, 0.35 / 3, rtol=1e-12)


@pytest.mark.parametrize(
    "blocks, match",
    [
        (((0, 1), (2, 3)), "consecutive"),
        (((1, 2),), "consecutive"),
        (((0, 0),), "consecutive"),
        (((0, 5), (5, 11)), "only 10"),
        ((), "empty"),
        (((0, 1, 2),), "pair"),
    ],
)
def test_bad_blocks_raise(blocks, match):
    with pytest.raises(ValueError, match=match):
        M.subspace_distance(PSI[:, :L], PSI, W, blocks)
    with pytest.raises(ValueError, match=match):
        M.angle_distance(PSI[:, :L], PSI, W, blocks)


def test_summary_table():
    f, hf = PSI[:, :L], HPSI[:, :L] * 1.001
    ray = rayleigh(f, hf, W)
    table = M.summary_table(
        {
            "exact": E[:L],
            "rayleigh": ray,
            "norm": norms(f, W),
            "rel_error": M.relative_errors(ray, E).per_state,
            "residual": resid(f, hf, None, W),
            "angle_distance": angles(f, PSI, W, BLOCKS).per_function,
            "subspace": subspace(f, PSI, W, BLOCKS),
            "orthogonality": ortho(f, W),
            "steps": 1000,
        },
        title="2D oscillator",
    )
    lines = table.splitlines()
    assert lines[0] == "2D oscillator"
    for header in ["state", "E exact", "E Rayleigh", "E norm", "rel err", "residual", "angle dist"]:
        assert header in lines[1]
    assert len({len(line) for line in lines[1 : L + 3]}) == 1  # fixed width
    assert lines[3].split()[:3] == ["0", "2", "2.002"]
    assert "1.00e-03" in lines[3]
    for key in [
        "subspace.mean",
        "subspace.total",
        "subspace.per_block",
        "orthogonality.frobenius",
        "steps",
    ]:
        assert any(line.startswith(key) for line in lines)
    assert not any(line.startswith("angle_distance.aligned") for line in lines)
