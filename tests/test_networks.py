"""Tests for nestedlora_jax.networks: shapes, independence, frozen features, the pure bridge.

Compilation dominates on CPU, so the option matrix is checked abstractly (jax.eval_shape: no
compilation) and the numerical tests share a few cached networks ("full": every option that
combines with the others).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestedlora_jax.networks import (
    MLP,
    Envelope,
    Frozen,
    ParallelMLPs,
    dirichlet_box_mask,
    eigenfunction_network,
    load_params,
    stable_radius,
    to_apply,
)

DIM, L = 2, 3
SMALL = (8, 8)
KINDS = ["parallel", "shared"]
BOX = dirichlet_box_mask(-5.0, 5.0)

OPTIONS = {
    "plain": {},
    "fourier": dict(fourier_features=(4, 1.5)),
    "radial": dict(radial_input=True),
    "fixed_envelope": dict(envelope="fixed", envelope_decay=2.0),
    "learnable_envelope": dict(envelope="learnable", envelope_decay=(1.0, 2.0, 3.0)),
    "box_mask": dict(boundary_mask=BOX),
    "periodic": dict(periodic=True),
    "periodic+fourier": dict(periodic=(2.0, 3.0), fourier_features=(4, 1.0)),
    "full": dict(
        fourier_features=(4, 1.0), radial_input=True, envelope="learnable", boundary_mask=BOX
    ),
}


def rngs(seed=0):
    # The "rbg" key implementation compiles ~6x faster than threefry on CPU (random draws at
    # init dominate the compile time of these tiny networks); the library accepts any key.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def make(kind, option="full", seed=0, **kw):
    return eigenfunction_network(
        DIM, L, architecture=kind, hidden=SMALL, rngs=rngs(seed), **OPTIONS[option], **kw
    )


@functools.lru_cache(maxsize=None)
def cached(kind, option="full"):
    """A shared network; tests that mutate it must nnx.clone it first.

    Built under nnx.jit: one compilation instead of one per eager op (this halves the run time).
    """
    return nnx.jit(make, static_argnums=(0, 1))(kind, option)


@functools.lru_cache(maxsize=None)
def cached_apply(kind, option="full"):
    """(apply, params) of the cached network."""
    return to_apply(cached(kind, option))


@functools.lru_cache(maxsize=None)
def outputs(kind, option="full"):
    """Compiled ``(x, xs) -> (net(x), net(xs), apply(params, x), vmap(apply)(params, xs))``.

    One compilation per network serves every test that evaluates it (same input shapes).
    """
    net = cached(kind, option)
    apply, params = cached_apply(kind, option)

    @nnx.jit
    def run(net, params, x, xs):
        return net(x), net(xs), apply(params, x), jax.vmap(apply, (None, 0))(params, xs)

    return lambda x, xs=XS: jax.device_get(run(net, params, x, xs))


@nnx.jit
def call(net, x):
    """The module's own __call__, compiled (eager calls compile every op separately)."""
    return net(x)


X = jnp.array([0.3, -0.7])
XS = jnp.asarray(np.random.default_rng(1).normal(size=(5, DIM)), dtype=jnp.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_shapes_every_option(kind, option):
    def run(x, xs):
        net = make(kind, option)
        apply, params = to_apply(net)
        return net(x), apply(params, x), jax.vmap(apply, (None, 0))(params, xs), net(xs)

    one, applied, vmapped, batched = jax.eval_shape(run, X, XS)
    assert one.shape == applied.shape == (L,)
    assert vmapped.shape == batched.shape == (5, L)
    assert one.dtype == jnp.float32


@pytest.mark.parametrize("kind", KINDS)
def test_apply_matches_module(kind):
    y, ys, applied, vmapped = outputs(kind)(X)
    assert np.all(np.isfinite(y)) and np.max(np.abs(y)) > 0
    np.testing.assert_allclose(applied, y, rtol=1e-5, atol=1e-7)
    # A (B, d) input to the module agrees with the caller's vmap of the per-point function.
    np.testing.assert_allclose(ys, vmapped, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys[0], outputs(kind)(XS[0])[0], rtol=1e-5, atol=1e-7)


def test_bodies_directly():
    assert jax.eval_shape(lambda: MLP(4, 5, hidden=(7,), rngs=nnx.Rngs(0))(jnp.ones(4))).shape == (
        5,
    )
    assert jax.eval_shape(
        lambda: ParallelMLPs(4, 5, hidden=(7, 6), rngs=nnx.Rngs(0))(jnp.ones(4))
    ).shape == (5,)


def test_parallel_functions_are_independent():
    apply, params = cached_apply("parallel")
    # Every trainable leaf (stacked MLP weights and the learnable envelope) has leading axis L.
    assert all(leaf.shape[0] == L for leaf in jax.tree.leaves(params))
    jac = jax.device_get(jax.jit(jax.jacrev(apply))(params, X))  # (L outputs, L functions, ...)
    for leaf in jax.tree.leaves(jac):
        for i, j in itertools.product(range(L), range(L)):
            if i != j:
                assert np.max(np.abs(leaf[i, j])) == 0.0
    # ...while each function does depend on its own parameters (the test is not vacuous).
    kernel_jac = jac["body"]["layers"][0]["kernel"]
    assert all(np.max(np.abs(kernel_jac[i, i])) > 0 for i in range(L))


def test_full_parallel_network_matches_numpy_reference():
    """Output i = scalar MLP on slice [i] of the stacked params, times envelope and box mask,
    re-implemented in NumPy from the documented formulas."""
    net = cached("parallel")
    _, params = cached_apply("parallel")
    p = jax.device_get(params)
    x = np.asarray(X, dtype=np.float64)
    b = np.asarray(net.features.fourier.frequencies[...], dtype=np.float64)
    r = np.sqrt(x @ x + 1e-12)
    z = np.concatenate([np.sin(b @ x), np.cos(b @ x), [r]])
    layers = [
        (p["body"]["layers"][k]["kernel"], p["body"]["layers"][k]["bias"])
        for k in range(len(SMALL) + 1)
    ]
    rate = np.logaddexp(0.0, p["envelope"]["raw_rate"])  # softplus
    mask = np.prod((x + 5.0) * (5.0 - x) / 25.0)
    y = outputs("parallel")(X)[0]
    for i in range(L):
        h = z
        for k, (kernel, bias) in enumerate(layers):
            h = h @ kernel[i] + bias[i]
            if k < len(layers) - 1:
                h = np.logaddexp(0.0, h)  # softplus
        np.testing.assert_allclose(y[i], h[0] * np.exp(-r * rate[i]) * mask, rtol=1e-5)


def test_fourier_features_formula():
    ff = cached("parallel").features.fourier
    b, x = np.asarray(ff.frequencies[...]), np.asarray(X)
    assert b.shape == (4, DIM)
    np.testing.assert_allclose(
        call(ff, X), np.concatenate([np.sin(b @ x), np.cos(b @ x)]), rtol=1e-5
    )


def test_fourier_features_are_frozen():
    net = nnx.clone(cached("parallel"))
    freqs = net.features.fourier.frequencies
    assert isinstance(freqs, Frozen) and not isinstance(freqs, nnx.Param)
    b0 = np.array(freqs[...])
    apply, params = to_apply(net)
    # Not among the trainable parameters handed out by to_apply.
    assert "features" not in params
    assert all(leaf.shape != b0.shape for leaf in jax.tree.leaves(params))

    # An optax step changes the params; loading them back leaves B alone.
    tx = optax.adam(1e-1)

    @jax.jit
    def step(p):
        grads = jax.grad(lambda q: jnp.sum(apply(q, X) ** 2))(p)
        updates, _ = tx.update(grads, tx.init(p), p)
        return (
            optax.apply_updates(p, updates),
            apply(p, X),
            apply(optax.apply_updates(p, updates), X),
        )

    new_params, old_y, new_y = jax.device_get(step(params))
    assert not np.allclose(new_y, old_y)
    load_params(net, new_params)
    np.testing.assert_array_equal(net.features.fourier.frequencies[...], b0)
    loaded = jax.device_get(to_apply(net)[1])
    jax.tree.map(np.testing.assert_array_equal, loaded, new_params)

    # The NNX optimizer restricted to nnx.Param does not touch B either.
    opt = nnx.Optimizer(net, optax.sgd(1.0), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(opt, net):
        opt.update(net, nnx.grad(lambda m: jnp.sum(m(X) ** 2))(net))

    nnx_step(opt, net)
    stepped = jax.device_get(to_apply(net)[1])
    kernel = ("body", "layers", 0, "kernel")
    assert not np.allclose(
        functools.reduce(dict.get, kernel, stepped), functools.reduce(dict.get, kernel, new_params)
    )
    np.testing.assert_array_equal(net.features.fourier.frequencies[...], b0)


def test_apply_is_pure_and_transformable():
    net = nnx.clone(cached("shared"))
    apply, params = to_apply(net)
    batched = jax.vmap(apply, (None, 0))

    # Laplacian by forward-over-forward equals the Hessian trace.
    def lap_fwd(p, x):
        def d2(e):
            return jax.jvp(lambda y: jax.jvp(lambda z: apply(p, z), (y,), (e,))[1], (x,), (e,))[1]

        return sum(d2(e) for e in jnp.eye(DIM))

    @jax.jit
    def derivatives(p):
        g = jax.grad(lambda q: jnp.sum(batched(q, XS) ** 2))(p)
        lap_hess = jnp.trace(jax.hessian(apply, argnums=1)(p, X), axis1=1, axis2=2)
        return g, lap_fwd(p, X), lap_hess, apply(p, X)

    g, lap_f, lap_h, before = derivatives(params)
    # grad w.r.t. params: finite, nonzero, with the params' structure.
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert all(
        np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 0
        for leaf in jax.tree.leaves(jax.device_get(g))
    )
    np.testing.assert_allclose(lap_f, lap_h, rtol=1e-4, atol=1e-6)
    # Stacked params vmap (e.g. an ensemble) works too.
    stacked = jax.tree.map(lambda a: np.stack([a, 2 * a]), jax.device_get(params))
    assert jax.eval_shape(jax.vmap(apply, (0, None)), stacked, X).shape == (2, L)
    # Changing the module later does not change apply (it closed over a snapshot).
    zeros = jax.tree.map(np.zeros_like, jax.device_get(params))
    load_params(net, zeros)
    np.testing.assert_array_equal(derivatives(params)[3], before)
    np.testing.assert_array_equal(derivatives(zeros)[3], 0.0)  # softplus MLP with zero weights
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(to_apply(net)[1]), zeros)


def test_float64_params():
    with jax.enable_x64(True):
        net = nnx.jit(
            lambda: eigenfunction_network(
                DIM,
                L,
                architecture="shared",
                hidden=SMALL,
                fourier_features=(4, 1.0),
                envelope="fixed",
                param_dtype=jnp.float64,
                rngs=rngs(),
            )
        )()
        apply, params = to_apply(net)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
        assert net.features.fourier.frequencies[...].dtype == jnp.float64
        assert jax.jit(apply)(params, jnp.array([0.1, 0.2], dtype=jnp.float64)).dtype == jnp.float64


@pytest.mark.parametrize("kind", KINDS)
def test_radial_input_has_finite_derivatives_at_origin(kind):
    apply, params = cached_apply(kind)  # radial input and exp(-r/a) envelope
    x0 = jnp.zeros(DIM)

    @jax.jit
    def derivatives(p):
        return (
            jax.jacfwd(apply, argnums=1)(p, x0),
            jax.hessian(apply, argnums=1)(p, x0),
            jax.grad(lambda q: jnp.sum(apply(q, x0)))(p),
        )

    jac, hess, pgrad = derivatives(params)
    for leaf in jax.tree.leaves(jax.device_get((jac, hess, pgrad))):
        assert np.all(np.isfinite(leaf))


def test_stable_radius():
    r, g0, naive = jax.jit(
        lambda x, z: (stable_radius(x), jax.grad(stable_radius)(z), jax.grad(jnp.linalg.norm)(z))
    )(X, jnp.zeros(3))
    np.testing.assert_allclose(r, np.hypot(*np.asarray(X)), rtol=1e-6)
    np.testing.assert_array_equal(g0, np.zeros(3))
    assert np.isnan(np.asarray(naive)).any()  # why it exists


def test_envelope_values_and_decay():
    env = Envelope(2, (1.0, 4.0))
    learn = Envelope(2, (1.0, 4.0), learnable=True)
    x = jnp.array([3.0, 4.0])  # r = 5
    expected = np.exp(-5.0 / np.array([1.0, 4.0]))
    np.testing.assert_allclose(call(env, x), expected, rtol=1e-5)
    np.testing.assert_allclose(
        call(learn, x), expected, rtol=1e-5
    )  # initialised at the given lengths
    _, params = to_apply(learn)
    assert set(params) == {"raw_rate"} and params["raw_rate"].shape == (2,)
    _, params = to_apply(env)
    assert params == {}  # fixed lengths are Frozen, not trainable
    # The network output vanishes far out, for both kinds (the box mask only grows like x^2).
    for kind in KINDS:
        y, _, applied, _ = outputs(kind)(jnp.array([80.0, 0.0]))
        assert np.max(np.abs(y)) < 1e-25 and np.max(np.abs(applied)) < 1e-25


def test_boundary_mask_vanishes_on_the_box():
    mask = jax.jit(jax.vmap(dirichlet_box_mask((0.0, -1.0), (2.0, 1.0))))
    np.testing.assert_allclose(
        mask(jnp.array([[1.0, 0.0], [0.0, 0.5], [1.5, 1.0]])), [1.0, 0.0, 0.0]
    )
    edge = jnp.array([[-5.0, 0.3], [5.0, 0.7], [0.5, -5.0], [0.2, 5.0], [-5.0, -5.0]])
    for kind in KINDS:
        y, ys, applied, vmapped = outputs(kind)(X, edge)
        np.testing.assert_array_equal(ys, 0.0)
        np.testing.assert_array_equal(vmapped, 0.0)
        assert np.min(np.abs(y)) > 0


def test_periodic_inputs_are_periodic():
    shifted = X + jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, -3.0], [4.0, 6.0], [-2.0, 3.0]])
    y, ys, _, vmapped = outputs("shared", "periodic+fourier")(X, shifted)
    np.testing.assert_allclose(ys, np.broadcast_to(y, ys.shape), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vmapped, ys, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(L=0), "number of functions"),
        (dict(hidden=()), "hidden"),
        (dict(hidden=(8, -1)), "hidden"),
        (dict(architecture="conv"), "unknown architecture"),
        (dict(envelope="gaussian"), "unknown envelope"),
        (dict(envelope="fixed", envelope_decay=-1.0), "envelope_decay"),
        (dict(envelope="fixed", envelope_decay=(1.0, 2.0)), "envelope_decay"),
        (dict(fourier_features=(0, 1.0)), "num_features"),
        (dict(fourier_features=(4, 0.0)), "scale"),
        (dict(fourier_features=4), "fourier_features"),
        (dict(periodic=True, radial_input=True), "periodic"),
        (dict(periodic=True, envelope="fixed"), "periodic"),
        (dict(periodic=-1.0), "period"),
        (dict(boundary_mask="box"), "boundary_mask"),
        (dict(activation="relu"), "activation"),
    ],
)
def test_bad_config_raises(kwargs, match):
    args = dict(dim=DIM, L=L, hidden=SMALL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        eigenfunction_network(args.pop("dim"), args.pop("L"), rngs=nnx.Rngs(0), **args)


def test_bad_body_config_raises():
    with pytest.raises(ValueError, match="in_features"):
        MLP(0, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="number of functions"):
        ParallelMLPs(2, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden"):
        ParallelMLPs(2, 3, hidden=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="upper > lower"):
        dirichlet_box_mask(1.0, 0.0)


def test_input_standardization_is_an_affine_map_before_everything_else():
    """The network with (center, scale) at x is the plain network at (x - center) / scale;
    the boundary mask still sees x itself."""
    center, scale = np.array([0.5, 0.5]), np.array([0.25, 2.0])
    plain = to_apply(eigenfunction_network(2, 3, hidden=(8,), rngs=nnx.Rngs(params=0)))
    shifted = to_apply(eigenfunction_network(2, 3, hidden=(8,), input_center=center,
                                             input_scale=scale, rngs=nnx.Rngs(params=0)))
    xs = jax.random.uniform(jax.random.PRNGKey(0), (5, 2))
    np.testing.assert_allclose(jax.vmap(lambda x: shifted[0](shifted[1], x))(xs),
                               jax.vmap(lambda x: plain[0](plain[1], (x - center) / scale))(xs),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="input_scale must be positive"):
        eigenfunction_network(2, 3, input_scale=[1.0, 0.0], rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="input_center must be a finite number or 2 finite numbers"):
        eigenfunction_network(2, 3, input_center=[0.0, 1.0, 2.0], rngs=nnx.Rngs(params=0))
