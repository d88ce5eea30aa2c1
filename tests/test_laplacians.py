"""Tests for nestedlora_jax.laplacians: every method against closed-form Laplacians.

The reference values are analytic: a polynomial with mixed terms, a Gaussian, a product of
sines (all in d = 1, 2, 3, 10), and hydrogen eigenfunctions of H = -Lap - 1/r in d = 2 and 3,
whose Laplacian follows from the eigen-equation itself: Lap psi = -(E + 1/r) psi. Float64 runs
locally under ``jax.enable_x64(True)``.
"""
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nestedlora_jax.laplacians import (
    DEFAULT_LAPLACIAN_METHOD,
    EXACT_LAPLACIAN_METHODS,
    LAPLACIAN_METHODS,
    STOCHASTIC_LAPLACIAN_METHODS,
    batched_laplacian,
    default_fd_step,
    laplacian,
)

DETERMINISTIC = EXACT_LAPLACIAN_METHODS + ("finite_difference",)
# Exact methods agree with the analytic values to rounding; central differences in float64 are
# capped near sqrt(eps) ~ 1e-8 times |f| / |Lap f|, so they get a looser bound.
RTOL = {m: 1e-8 for m in EXACT_LAPLACIAN_METHODS} | {"finite_difference": 1e-6}
DIMS = (1, 2, 3, 10)
# The graphs here are tiny: compilation, not execution, is the run time. XLA's backend
# optimisations do not change float64 results at these tolerances, so skip them.
jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ---------------------------------------------------------------------------------------------
# Analytic test functions: each returns (f, grad f, Lap f) at one point x of shape (d,).
# ---------------------------------------------------------------------------------------------


def poly(x):
    """sum_i a_i x_i^4 + (sum_i x_i)^3: diagonal and mixed second derivatives."""
    d = x.shape[0]
    a = jnp.arange(1, d + 1, dtype=x.dtype) / d
    s = jnp.sum(x)
    f = jnp.sum(a * x**4) + s**3
    grad = 4 * a * x**3 + 3 * s**2
    lap = 12 * jnp.sum(a * x**2) + 6 * d * s
    return f, grad, lap


def gauss(x):
    """exp(-|x|^2 / 2): Lap = (|x|^2 - d) f."""
    f = jnp.exp(-jnp.sum(x**2) / 2)
    return f, -x * f, (jnp.sum(x**2) - x.shape[0]) * f


def sines(x):
    """prod_i sin(k_i x_i): Lap = -|k|^2 f."""
    d = x.shape[0]
    k = 1.0 + 0.25 * jnp.arange(d, dtype=x.dtype)
    f = jnp.prod(jnp.sin(k * x))
    # grad_i = k_i cos(k_i x_i) prod_{j != i} sin(k_j x_j), without dividing by sin.
    on_diagonal = jnp.eye(d, dtype=bool)
    factors = jnp.where(on_diagonal, (k * jnp.cos(k * x))[:, None], jnp.sin(k * x)[None, :])
    return f, jnp.prod(factors, axis=1), -jnp.sum(k**2) * f


def _hydrogen(energy, shape):
    def state(x):
        r = jnp.linalg.norm(x)
        psi = shape(x, r)
        return psi, None, -(energy + 1 / r) * psi  # -Lap psi - psi / r = E psi

    return state


# H = -Lap - 1/r. 2D: E_n = -1/(4 (n + 1/2)^2); 3D: E_n = -1/(4 n^2).
HYDROGEN = {
    2: [
        _hydrogen(-1.0, lambda x, r: jnp.exp(-r)),
        _hydrogen(-1 / 9, lambda x, r: (1 - 2 * r / 3) * jnp.exp(-r / 3)),
        _hydrogen(-1 / 25, lambda x, r: (x[0] ** 2 - x[1] ** 2) * jnp.exp(-r / 5)),
    ],
    3: [
        _hydrogen(-1 / 4, lambda x, r: jnp.exp(-r / 2)),
        _hydrogen(-1 / 16, lambda x, r: (1 - r / 4) * jnp.exp(-r / 4)),
        _hydrogen(-1 / 16, lambda x, r: x[2] * jnp.exp(-r / 4)),
    ],
}


def functions_for(d):
    return [poly, gauss, sines] + HYDROGEN.get(d, [])


def stacked(fns):
    """One (L,) function out of several analytic scalar ones: (value, grad, lap) stacked."""

    def fn(x):
        outs = [f(x) for f in fns]
        grads = [g for _, g, _ in outs]
        return (
            jnp.stack([v for v, _, _ in outs]),
            None if any(g is None for g in grads) else jnp.stack(grads),
            jnp.stack([lap for _, _, lap in outs]),
        )

    return fn


def points(d, n=4, seed=0, dtype=np.float64):
    """n points with |x| in [0.5, 2]: away from the Coulomb singularity."""
    rng = np.random.default_rng(seed + d)
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return (u * rng.uniform(0.5, 2.0, size=(n, 1))).astype(dtype)


def assert_rel_close(actual, expected, rtol):
    """|actual - expected| <= rtol * (scale of that output over the batch)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected), axis=0, keepdims=True)
    err = np.abs(actual - expected) / scale
    assert np.all(err <= rtol), f"max relative error {err.max():.3g} > {rtol:g}"


def init_mlp(key, sizes, dtype):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        w = jax.random.normal(k1, (fan_in, fan_out), dtype) / np.sqrt(fan_in)
        params.append((w, 0.1 * jax.random.normal(k2, (fan_out,), dtype)))
    return params


def tree_vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def mlp(params, x):
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b


# Every function appears at every d in the stacked (L,) case; the scalar () path is checked on
# a subset. Compilation dominates this file's run time, so each method's checks are computed in
# one jitted function (cached), and the tests below read their part of it.
SCALAR_CASES = [(gauss, 1), (sines, 10), (HYDROGEN[2][2], 2)]
MLP_SIZES = [3, 16, 16, 4]


@functools.lru_cache(maxsize=None)
def analytic_cases():
    """Points and analytic values (float64), computed once."""
    with jax.enable_x64(True):
        xs = {d: jnp.asarray(points(d)) for d in DIMS}

        @jit
        def reference(xs):
            vector = {d: jax.vmap(lambda x: stacked(functions_for(d))(x)[2])(xs[d]) for d in DIMS}
            scalar = [jax.vmap(lambda x: f(x)[2])(xs[d]) for f, d in SCALAR_CASES]
            value_grad_lap = jax.vmap(stacked([poly, gauss, sines]))(xs[3])
            return vector, scalar, value_grad_lap

        return jax.tree.map(np.asarray, (xs, *reference(xs)))


@functools.lru_cache(maxsize=None)
def method_results(method):
    """Everything the per-method tests check, from one float64 compilation of ``method``."""
    xs, *_ = analytic_cases()
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(0), [3, 8, 8, 2], jnp.float64)
        direction = init_mlp(jax.random.key(1), [3, 8, 8, 2], jnp.float64)
        mlp_params = init_mlp(jax.random.key(0), MLP_SIZES, jnp.float32)  # as in the float32 test
        mlp_params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), mlp_params)

        def loss(params, method):
            return jnp.sum(jnp.sin(batched_laplacian(partial(mlp, params), xs[3], method=method)))

        @jit
        def compute(xs, params, direction, mlp_params):
            out = {}
            lap = partial(batched_laplacian, method=method)
            out["vector"] = {d: lap(lambda x: stacked(functions_for(d))(x)[0], xs[d]) for d in DIMS}
            out["scalar"] = [lap(lambda x: f(x)[0], xs[d]) for f, d in SCALAR_CASES]
            three = lambda x: stacked([poly, gauss, sines])(x)[0]
            out["with_grad"] = lap(three, xs[3], return_grad=True)
            out["scalar_with_grad"] = lap(lambda x: gauss(x)[0], xs[3], return_grad=True)
            fn = lambda x: stacked([poly, sines])(x)[0]
            out["per_point"] = jnp.stack([laplacian(fn, x, method=method) for x in xs[3][:2]])
            out["batched"] = jax.vmap(lambda x: laplacian(fn, x, method=method))(xs[3][:2])
            # Parameter gradient: <grad loss, u> against a central difference along u. Finite
            # differences of a finite-difference Laplacian drown in its rounding noise, so that
            # method's gradient is compared with the exact loss's difference instead (O(h^2)).
            grads = jax.grad(loss)(params, method)
            out["directional"] = tree_vdot(grads, direction)
            eps = 1e-5
            reference = "forward_over_forward" if method == "finite_difference" else method
            moved = lambda s: jax.tree.map(lambda p, u: p + s * u, params, direction)
            shifted = lambda s: loss(moved(s), reference)
            out["numeric"] = (shifted(eps) - shifted(-eps)) / (2 * eps)
            out["mlp"] = batched_laplacian(partial(mlp, mlp_params), xs[3], method=method)
            return out

        return jax.tree.map(np.asarray, compute(xs, params, direction, mlp_params))


# ---------------------------------------------------------------------------------------------
# Correctness against analytic Laplacians (float64).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_vector_output_matches_analytic(method, d):
    """All functions available in dimension d stacked into one (L,) output."""
    _, expected, _, _ = analytic_cases()
    lap = method_results(method)["vector"][d]
    assert lap.dtype == np.float64 and lap.shape == expected[d].shape
    assert_rel_close(lap, expected[d], RTOL[method])


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_scalar_output_matches_analytic(method):
    xs, _, expected, _ = analytic_cases()
    for (f, d), lap, want in zip(SCALAR_CASES, method_results(method)["scalar"], expected):
        assert lap.shape == (xs[d].shape[0],), f.__name__
        assert_rel_close(lap, want, RTOL[method])


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_return_grad_gives_value_and_gradient(method):
    _, _, _, (want_value, want_grad, want_lap) = analytic_cases()
    results = method_results(method)
    value, grad, lap = results["with_grad"]
    # Finite differences: central first differences, O(h^2) ~ 1e-8 at h = 2^-13.
    rtol = 1e-6 if method == "finite_difference" else 1e-12
    assert value.shape == (4, 3) and grad.shape == (4, 3, 3) and lap.shape == (4, 3)
    assert_rel_close(value, want_value, 1e-15)
    assert_rel_close(grad, want_grad, rtol)
    assert_rel_close(lap, want_lap, RTOL[method])
    value, grad, lap = results["scalar_with_grad"]
    assert value.shape == (4,) and grad.shape == (4, 3) and lap.shape == (4,)
    assert_rel_close(value, want_value[:, 1], 1e-15)
    assert_rel_close(grad, want_grad[:, 1], rtol)


def test_stochastic_return_grad_gives_exact_value_and_gradient():
    xs, _, _, (want_value, want_grad, _) = analytic_cases()
    with jax.enable_x64(True):

        @jit
        def compute(xs):
            kw = {"key": jax.random.key(0), "num_probes": 4, "return_grad": True}
            three = lambda x: stacked([poly, gauss, sines])(x)[0]
            return [
                (
                    batched_laplacian(three, xs, method=m, **kw),
                    batched_laplacian(lambda x: gauss(x)[0], xs, method=m, **kw),
                )
                for m in STOCHASTIC_LAPLACIAN_METHODS
            ]

        results = compute(xs[3])
    for (value, grad, lap), (s_value, s_grad, s_lap) in results:
        assert grad.shape == (4, 3, 3) and lap.shape == (4, 3)
        assert s_grad.shape == (4, 3) and s_lap.shape == (4,)
        assert_rel_close(value, want_value, 1e-15)
        assert_rel_close(grad, want_grad, 1e-12)
        assert_rel_close(s_value, want_value[:, 1], 1e-15)
        assert_rel_close(s_grad, want_grad[:, 1], 1e-12)


def test_default_resolves_to_an_exact_method():
    assert DEFAULT_LAPLACIAN_METHOD in EXACT_LAPLACIAN_METHODS
    others = {"default", "finite_difference"}
    named = set(EXACT_LAPLACIAN_METHODS + STOCHASTIC_LAPLACIAN_METHODS)
    assert set(LAPLACIAN_METHODS) == others | named
    x = jnp.asarray(points(3)[0], jnp.float32)
    f = jit(lambda x: (laplacian(_fn, x), laplacian(_fn, x, method=DEFAULT_LAPLACIAN_METHOD)))
    np.testing.assert_array_equal(*f(x))


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_outputs_independent_of_x_have_zero_derivatives(method):
    """folx returns such outputs as plain arrays; every method must give zeros, not fail."""
    xs = jnp.asarray(points(2), jnp.float32)
    fns = [
        lambda x: jnp.float32(2.0),
        lambda x: jnp.ones(3),
        lambda x: jnp.where(jnp.all(jnp.abs(x) < 9), 0.0, -jnp.inf),  # a uniform log-density
    ]

    @jit
    def compute(xs):
        return [batched_laplacian(fn, xs, method=method, return_grad=True) for fn in fns]

    for fn, (value, grad, lap) in zip(fns, compute(xs)):
        assert value.shape == lap.shape and grad.shape == value.shape + (2,)
        np.testing.assert_array_equal(value, jax.vmap(fn)(xs))
        np.testing.assert_array_equal(grad, 0.0)
        np.testing.assert_array_equal(lap, 0.0)


def _folx_fails(*args, **kwargs):
    raise NotImplementedError("primitive not in folx's registry")


def test_default_falls_back_when_folx_cannot_trace_fn(monkeypatch):
    """folx does not cover every primitive (0.2.30 fails on lax.fori_loop): "default" then warns
    and uses the pure-JAX forward-over-forward; an explicit "folx" raises with a hint."""
    import folx

    monkeypatch.setattr(folx, "forward_laplacian", _folx_fails)
    x = jnp.asarray(points(2)[0], jnp.float32)
    fn = lambda x: jnp.sum(jnp.tanh(x) ** 3)
    with pytest.warns(RuntimeWarning, match="not in folx's registry.*using 'forward_over_forward'"):
        lap = jit(lambda x: laplacian(fn, x))(x)
    fof = jit(lambda x: laplacian(fn, x, method="forward_over_forward"))(x)
    np.testing.assert_array_equal(lap, fof)
    with pytest.raises(NotImplementedError) as info:
        laplacian(fn, x, method="folx")
    assert any("method='forward_over_forward'" in note for note in info.value.__notes__)


def test_default_fd_step_balances_truncation_and_rounding():
    assert default_fd_step(jnp.float32) == 2.0**-6
    assert default_fd_step(jnp.float64) == 2.0**-13


# ---------------------------------------------------------------------------------------------
# Hutchinson estimator: unbiased, variance as predicted, error ~ 1/sqrt(num_probes).
# ---------------------------------------------------------------------------------------------

_A = np.array(
    [[2.0, 0.5, -1.0, 0.3], [0.5, -1.0, 0.8, 0.0], [-1.0, 0.8, 0.5, -0.6], [0.3, 0.0, -0.6, 1.5]]
)
_X4 = np.array([0.4, -0.7, 0.9, 0.2])


def _hutchinson_fn(x):
    """[x^T A x / 2, exp(-|x|^2/2)]: Hessians A and (x x^T - I) exp(-|x|^2/2), both off-diagonal."""
    return jnp.stack([0.5 * x @ jnp.asarray(_A, x.dtype) @ x, gauss(x)[0]])


def _hutchinson_reference():
    g = np.exp(-_X4 @ _X4 / 2)
    hess = np.stack([_A, (np.outer(_X4, _X4) - np.eye(4)) * g])
    exact = np.trace(hess, axis1=1, axis2=2)
    off_diagonal = hess * (1 - np.eye(4))
    # Var[v^T H v] for one probe: Rademacher 2 sum_{i != j} H_ij^2, Gaussian 2 ||H||_F^2.
    variance = {
        "hutchinson": 2 * np.sum(off_diagonal**2, axis=(1, 2)),
        "hutchinson_gaussian": 2 * np.sum(hess**2, axis=(1, 2)),
    }
    return exact, variance


# (method, num_probes, num_keys) -> estimates of shape (num_keys, 2).
HUTCHINSON_RUNS = [(m, 1, 4000) for m in STOCHASTIC_LAPLACIAN_METHODS] + [
    ("hutchinson", 16, 1000),
    ("hutchinson", 256, 1000),
    ("hutchinson", 50_000, 1),
]


@functools.lru_cache(maxsize=None)
def hutchinson_estimates():
    with jax.enable_x64(True):

        @jit
        def compute(x):
            out = {}
            for i, (method, num_probes, num_keys) in enumerate(HUTCHINSON_RUNS):
                keys = jax.random.split(jax.random.key(i), num_keys)
                kw = {"method": method, "num_probes": num_probes}
                one = lambda k: laplacian(_hutchinson_fn, x, key=k, **kw)
                out[method, num_probes] = jax.vmap(one)(keys)
            return out

        return jax.tree.map(np.asarray, compute(jnp.asarray(_X4)))


@pytest.mark.parametrize("method", STOCHASTIC_LAPLACIAN_METHODS)
def test_hutchinson_is_unbiased_with_predicted_variance(method):
    exact, variance = _hutchinson_reference()
    est = hutchinson_estimates()[method, 1]
    mean, var = est.mean(axis=0), est.var(axis=0, ddof=1)
    stderr = np.sqrt(var / est.shape[0])
    assert np.all(np.abs(mean - exact) < 4 * stderr), (mean, exact, stderr)
    np.testing.assert_allclose(var, variance[method], rtol=0.15)


def test_hutchinson_mean_over_many_probes_converges():
    exact, variance = _hutchinson_reference()
    n = 50_000
    (est,) = hutchinson_estimates()["hutchinson", n]
    assert np.all(np.abs(est - exact) < 4 * np.sqrt(variance["hutchinson"] / n))
    assert np.all(np.abs(est - exact) / np.abs(exact) < 1e-2)


def test_hutchinson_error_falls_as_inverse_sqrt_probes():
    exact, variance = _hutchinson_reference()
    rms = {}
    for n in (16, 256):
        est = hutchinson_estimates()["hutchinson", n]
        rms[n] = np.sqrt(np.mean((est - exact) ** 2, axis=0))
        # The RMS over 1000 keys has ~2% relative spread: 15% is a > 5 sigma bound.
        np.testing.assert_allclose(rms[n], np.sqrt(variance["hutchinson"] / n), rtol=0.15)
    ratio = rms[16] / rms[256]
    assert np.all((ratio > 4 / 1.2) & (ratio < 4 * 1.2)), ratio


def test_rademacher_hutchinson_is_exact_for_diagonal_hessian():
    with jax.enable_x64(True):
        x = jnp.asarray(points(5)[0])
        fn = lambda x: jnp.sum(jnp.sin(x) + x**4)  # separable: H diagonal, and v_i^2 = 1
        kw = {"method": "hutchinson", "key": jax.random.key(3), "num_probes": 1}
        est = jit(lambda x: laplacian(fn, x, **kw))(x)
        np.testing.assert_allclose(est, jnp.sum(-jnp.sin(x) + 12 * x**2), rtol=1e-13)


def test_batched_hutchinson_uses_independent_probes_per_sample():
    xs = jnp.tile(jnp.asarray(_X4, jnp.float32), (8, 1))
    kw = {"method": "hutchinson", "key": jax.random.key(0), "num_probes": 2}
    est = jit(lambda xs: batched_laplacian(_hutchinson_fn, xs, **kw))(xs)
    assert est.shape == (8, 2) and est.dtype == jnp.float32
    assert len(np.unique(np.asarray(est[:, 0]))) > 1


# ---------------------------------------------------------------------------------------------
# Transformations and dtypes.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_grad_wrt_closed_over_parameters(method):
    """jax.grad (under jit) of a loss of the Laplacian w.r.t. parameters the network closes over
    matches a central difference of the loss along a random parameter direction (float64)."""
    results = method_results(method)
    np.testing.assert_allclose(results["directional"], results["numeric"], rtol=1e-6)


def test_grad_wrt_parameters_of_hutchinson_estimate():
    """With the key fixed the estimate is a smooth function of the parameters."""
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(0), [3, 8, 8, 2], jnp.float64)
        direction = init_mlp(jax.random.key(1), [3, 8, 8, 2], jnp.float64)
        xs = jnp.asarray(points(3))

        def loss(params):
            kw = {"method": "hutchinson", "key": jax.random.key(0), "num_probes": 3}
            lap = batched_laplacian(partial(mlp, params), xs, **kw)
            return jnp.sum(jnp.sin(lap))

        @jit
        def check(params, direction):
            eps = 1e-5
            shifted = lambda s: loss(jax.tree.map(lambda p, u: p + s * u, params, direction))
            grads = jax.grad(loss)(params)
            return tree_vdot(grads, direction), (shifted(eps) - shifted(-eps)) / (2 * eps)

        analytic, numeric = check(params, direction)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_vmap_matches_per_point_calls(method):
    results = method_results(method)
    # Batching may reorder floating-point operations; finite differences amplify that by 1/h^2.
    rtol = 1e-6 if method == "finite_difference" else 1e-13
    np.testing.assert_allclose(results["batched"], results["per_point"], rtol=rtol)


def test_eager_call_works():
    x = jnp.asarray(points(2)[0], jnp.float32)
    np.testing.assert_allclose(laplacian(lambda x: jnp.sum(x**3), x), 6 * jnp.sum(x), rtol=1e-6)


# Float32 against float64 on a tanh MLP (relative to each output's scale): exact methods agree
# to ~1e-6; central differences in float32 only to ~sqrt(eps32) * |f| / |Lap f|.
FLOAT32_RTOL = {m: 1e-4 for m in EXACT_LAPLACIAN_METHODS} | {"finite_difference": 3e-2}


@functools.lru_cache(maxsize=None)
def float32_results():
    xs, *_ = analytic_cases()
    params = init_mlp(jax.random.key(0), MLP_SIZES, jnp.float32)

    @jit
    def compute(params, xs):
        fn = partial(mlp, params)
        return {m: batched_laplacian(fn, xs, method=m, return_grad=True) for m in DETERMINISTIC}

    return compute(params, jnp.asarray(xs[3], jnp.float32))


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_float32_is_finite_and_close_to_float64(method):
    value, grad, lap = float32_results()[method]
    assert value.dtype == grad.dtype == lap.dtype == jnp.float32
    assert np.all(np.isfinite(lap)) and np.all(np.isfinite(grad))
    assert_rel_close(lap, method_results("forward_over_forward")["mlp"], FLOAT32_RTOL[method])


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------

_x = jnp.ones(3)
_fn = lambda x: jnp.sum(x**2)


_key = jax.random.key(0)
BAD_INPUTS = {
    "unknown-method": (
        lambda: laplacian(_fn, _x, method="taylor"),
        r"Unknown Laplacian method 'taylor'.*forward_over_forward",
    ),
    "no-key": (lambda: laplacian(_fn, _x, method="hutchinson", num_probes=4), r"needs a PRNG key"),
    "int-key": (
        lambda: laplacian(_fn, _x, method="hutchinson", key=0, num_probes=4),
        r"needs a PRNG key.*not the Python number 0",
    ),
    "no-num-probes": (
        lambda: laplacian(_fn, _x, method="hutchinson_gaussian", key=_key),
        r"needs num_probes",
    ),
    "zero-probes": (
        lambda: laplacian(_fn, _x, method="hutchinson", key=_key, num_probes=0),
        r"num_probes must be an integer >= 1.*got 0",
    ),
    "float-probes": (
        lambda: laplacian(_fn, _x, method="hutchinson", key=_key, num_probes=2.5),
        r"num_probes must be an integer",
    ),
    "x-2d": (
        lambda: laplacian(_fn, jnp.ones((2, 3))),
        r"x must be a single point of shape \(d,\); got shape \(2, 3\)",
    ),
    "x-0d": (lambda: laplacian(_fn, jnp.float32(1.0)), r"x must be a single point of shape \(d,\)"),
    "x-int": (lambda: laplacian(_fn, jnp.ones(3, jnp.int32)), r"floating dtype"),
    "fn-2d-output": (
        lambda: laplacian(lambda x: jnp.outer(x, x), _x),
        r"shape \(L,\) or \(\).*got shape \(3, 3\)",
    ),
    "fn-tuple-output": (lambda: laplacian(lambda x: (x, x), _x), r"single array"),
    "batched-1d": (lambda: batched_laplacian(_fn, _x), r"shape \(B, d\); got shape \(3,\)"),
    "batched-no-key": (
        lambda: batched_laplacian(_fn, jnp.ones((2, 3)), method="hutchinson", num_probes=1),
        r"needs a PRNG key",
    ),
    "batched-unknown": (
        lambda: batched_laplacian(_fn, jnp.ones((2, 3)), method="nope"),
        r"Unknown Laplacian method",
    ),
}


@pytest.mark.parametrize("call, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
