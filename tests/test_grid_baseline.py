"""The finite-difference grid baseline: stencil, boundaries, convergence order, the sweep."""

import math

import numpy as np
import pytest

pytest.importorskip("scipy")

from nestedlora_jax import grid_baseline as G
from nestedlora_jax.problems import CosinePotential, HarmonicOscillator, Hydrogen, InfiniteWell


@pytest.mark.parametrize(
    "dim, sizes, L",
    [
        (1, (127, 255, 511), 5),  # h = 1/8, 1/16, 1/32 on [-8, 8]
        (2, (47, 95, 191), 3),  # h = 1/3, 1/6, 1/12
    ],
)
def test_oscillator_converges_second_order(dim, sizes, L):
    """Halving h divides the error by ~4 (O(h^2)); the finest grid is within 1e-3."""
    problem = HarmonicOscillator(dim=dim)
    errors, hs = [], []
    for n in sizes:
        out = G.finite_difference_eigensolver(problem, L, n, radius=8.0)
        degree = problem.multi_indices(L).sum(axis=1)
        np.testing.assert_allclose(out["exact"], 2.0 * degree + dim)
        errors.append(out["rel_error"])
        hs.append(out["h"])
        # Dirichlet: the boundary rows lack their outside neighbours.
        assert out["grid_points"] == n**dim
        assert out["nnz"] == n**dim + 2 * dim * (n - 1) * n ** (dim - 1)
    np.testing.assert_allclose(np.array(hs[:-1]) / np.array(hs[1:]), 2.0)
    for coarse, fine in zip(errors[:-1], errors[1:]):
        ratio = coarse / fine
        assert np.all((ratio > 3) & (ratio < 5)), ratio
    assert np.max(errors[-1]) < 1e-3, errors[-1]


def test_infinite_well_matches_discrete_spectrum():
    """Dirichlet interior nodes of [0, 1]: eigenvalues sum_i (4/h^2) sin^2(m_i pi h / 2) exactly."""
    n, L = 24, 12
    out = G.finite_difference_eigensolver(InfiniteWell(dim=2), L, n)
    h = 1.0 / (n + 1)
    assert out["h"] == pytest.approx(h) and out["domain"] == (0.0, 1.0)
    assert out["boundary"] == "dirichlet"
    one_d = (4 / h**2) * np.sin(np.arange(1, n + 1) * math.pi * h / 2) ** 2
    discrete = np.sort(np.add.outer(one_d, one_d).ravel())[:L]
    np.testing.assert_allclose(out["energies"], discrete, rtol=1e-9)
    # ... and both solvers agree.
    lanczos = G.finite_difference_eigensolver(InfiniteWell(dim=2), L, n, method="lanczos")
    assert lanczos["method"] == "lanczos" and out["method"] == "shift-invert"
    np.testing.assert_allclose(lanczos["energies"], discrete, rtol=1e-9)


def test_cosine_potential_periodic():
    out = G.finite_difference_eigensolver(CosinePotential(dim=2), 6, 128)
    assert out["boundary"] == "periodic"
    assert out["h"] == pytest.approx(2 * math.pi / 128)
    assert out["max_rel_error"] < 1e-3, out["rel_error"]
    assert out["energies"][0] < 0  # the ground state sits below zero (-0.5916)


def test_hamiltonian_structure_and_chunked_potential():
    """C-order grid (last axis fastest), symmetric H, periodic corners, chunk padding."""
    problem = HarmonicOscillator(dim=3)
    n = 5
    H, h, nodes = G.finite_difference_hamiltonian(problem, n, radius=3.0)
    assert H.format == "csr" and H.shape == (n**3, n**3) and H.dtype == np.float64
    assert abs(H - H.T).max() == 0
    np.testing.assert_allclose(nodes, np.linspace(-3, 3, n + 2)[1:-1])
    X = np.stack(np.meshgrid(nodes, nodes, nodes, indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_allclose(H.diagonal(), (X**2).sum(1) + 6 / h**2, rtol=1e-14)
    # Chunks of 7 points do not divide 125: the padded last chunk must be cut correctly.
    V = G._grid_potential(problem, nodes, chunk=7)
    np.testing.assert_allclose(V, (X**2).sum(1), rtol=1e-14)
    # Periodic with V = 0: every row has all 2d + 1 entries (wrap-around) and sums to zero.
    Hp, _, _ = G.finite_difference_hamiltonian(CosinePotential(dim=2, coefficients=0.0), 4)
    assert Hp.nnz == 5 * 16
    np.testing.assert_allclose(np.asarray(Hp.sum(axis=1)).ravel(), 0.0, atol=1e-12)
    # Hydrogen on R^3 with an even n: no node on the nucleus, V = -1/|x| at every node.
    Hh, hh, nh = G.finite_difference_hamiltonian(Hydrogen(dim=3), 6, radius=10.0)
    Xh = np.stack(np.meshgrid(nh, nh, nh, indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_allclose(Hh.diagonal() - 6 / hh**2, -1 / np.linalg.norm(Xh, axis=1))


def test_sweep_runs_children_and_skips():
    problem = HarmonicOscillator(dim=1)
    results = G.grid_baseline_sweep(
        problem, 3, [100, 10**8, 2 * 10**8], radius=8.0, progress=None, time_limit_s=120
    )
    ok, big, bigger = results
    assert ok["status"] == "ok" and ok["reason"] is None
    assert ok["peak_rss_bytes"] > 0 and ok["peak_rss_bytes"] >= ok["base_rss_bytes"] > 0
    assert ok["wall_time_s"] > 0 and ok["build_time_s"] > 0 and ok["solve_time_s"] > 0
    assert ok["grid_points"] == 100 and ok["energies"].shape == (3,)
    assert ok["mean_rel_error"] < 1e-2
    # 10^8 points (estimated ~65 GB) exceed the default 20 GB: not run.
    assert big["status"] == "does not fit" and "estimated" in big["reason"]
    assert "peak_rss_bytes" not in big and big["estimated_memory_bytes"] > 20e9
    assert bigger["status"] == "does not fit"

    lines = []
    small = G.grid_baseline_sweep(
        problem, 3, [20, 40], radius=8.0, memory_limit_bytes=1e6, progress=lines.append
    )
    assert [r["status"] for r in small] == ["does not fit"] * 2
    assert "not run" in small[1]["reason"] and len(lines) == 2


def test_sweep_timeout():
    # Starting the child (importing JAX) alone takes longer than 0.05 s.
    out = G.grid_baseline_sweep(
        HarmonicOscillator(dim=1), 3, [30, 40], radius=8.0, time_limit_s=0.05, progress=None
    )
    assert [r["status"] for r in out] == ["timeout", "timeout"]
    assert "killed" in out[0]["reason"] and "not run" in out[1]["reason"]


def test_estimate_grows_with_grid_and_states():
    e = G.estimate_memory_bytes
    assert e(3, 40, 10) < e(3, 80, 10) < e(3, 160, 10)
    assert e(3, 80, 10) < e(3, 80, 50)
    assert e(3, 30, 10, method="shift-invert") > e(3, 30, 10)  # 3-D LU fill
    assert e(3, 100, 10) > G._BASE_RSS_BYTES + 12 * 7 * 100**3  # at least H itself


def test_bad_input_raises():
    with pytest.raises(ValueError, match="radius"):
        G.finite_difference_eigensolver(HarmonicOscillator(dim=2), 3, 10)
    with pytest.raises(ValueError, match="radius"):
        G.finite_difference_hamiltonian(InfiniteWell(dim=2), 10, radius=1.0)
    with pytest.raises(ValueError, match="smaller than the number of grid points"):
        G.finite_difference_eigensolver(InfiniteWell(dim=2), 16, 4)
    with pytest.raises(ValueError, match="L"):
        G.finite_difference_eigensolver(InfiniteWell(dim=2), 0, 10)
    with pytest.raises(ValueError, match="num_points"):
        G.finite_difference_eigensolver(InfiniteWell(dim=2), 3, 2)
    with pytest.raises(ValueError, match="method"):
        G.finite_difference_eigensolver(InfiniteWell(dim=2), 3, 10, method="dense")
    with pytest.raises(ValueError, match="radius"):
        G.grid_baseline_sweep(HarmonicOscillator(dim=1), 3, [10], progress=None)
    with pytest.raises(ValueError, match="smaller than"):
        G.grid_baseline_sweep(InfiniteWell(dim=1), 5, [10, 4], progress=None)


def test_child_failures_are_reported():
    import pickle

    payload = {"sys_path": [], "problem": pickle.dumps(HarmonicOscillator(dim=1)), "L": 3,
               "num_points": 2, "radius": 8.0, "tol": 0, "method": "auto"}
    failed = G._run_in_child(payload, 120, None)  # num_points=2 raises in the child
    assert failed["status"] == "failed" and "num_points" in failed["reason"]
    assert failed["peak_rss_bytes"] > 0
    # The interpreter alone is over 100 MB: the watchdog kills the child.
    killed = G._run_in_child(dict(payload, num_points=50), 120, 1e8)
    assert killed["status"] == "out of memory" and "exceeded" in killed["reason"]
