"""The training loop: validation, NaN guards, determinism, checkpoint/resume, collapse remedy."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestedlora_jax import problems
from nestedlora_jax.networks import eigenfunction_network, to_apply
from nestedlora_jax.operators import problem_operator
from nestedlora_jax.objectives import nested_lora_objective
from nestedlora_jax.config import TrainingConfig
from nestedlora_jax.hooks import (
    Callback,
    CollapseConfig,
    TrainingDivergedError,
    dead_functions,
    reinitialize_functions,
)
from nestedlora_jax.objectives import OperatorOutput
from nestedlora_jax.training import _batch_statistics, default_optimizer, fit

PROBLEM = problems.HarmonicOscillator(dim=2)


def _setup(L=3, seed=0, hidden=(16, 16)):
    op = problem_operator(PROBLEM, L)
    net = eigenfunction_network(2, L, architecture="parallel", hidden=hidden, rngs=nnx.Rngs(params=seed))
    apply, params = to_apply(net)
    return apply, params, op


def _one_dead_function(L=2):
    """A 1-D oscillator network whose function 1 is exactly zero (a fixed point of the masked
    gradient), and fresh per-function parameters drawn from a key."""
    net = eigenfunction_network(1, L, architecture="parallel", hidden=(16, 16), rngs=nnx.Rngs(params=0))
    apply, params = to_apply(net)
    params = jax.tree.map(lambda p: p.at[1].set(0.0) if p.shape[-1] == 1 else p, params)  # f_1 = 0
    op = problem_operator(problems.HarmonicOscillator(dim=1), L)

    def init_params(key):
        return to_apply(eigenfunction_network(1, L, architecture="parallel", hidden=(16, 16),
                                              rngs=nnx.Rngs(params=int(key[-1]) % 1000)))[1]

    return apply, params, op, init_params


class _Interrupt(Exception):
    pass


def _interrupt_at(step):
    """A hook that stops training (as a crash would) after the chunk that reaches ``step``."""

    def stop(at, state):
        if at >= step:
            raise _Interrupt
        return None

    return Callback(stop)


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    "config, kwargs, match",
    [
        ({"batch_size": 33}, {}, r"^TrainingConfig.batch_size must be even"),
        ({"checkpoint_every": 10, "log_every": 10}, {}, "checkpoint_every needs a checkpoint_dir"),
        ({}, {"resume": True}, "resume=True needs the checkpoint_dir"),
        ({"learning_rate": 1e-3}, {"optimizer": optax.adam(1e-3)}, "with an optimizer given"),
        ({}, {"objective": "sequential"}, "objective must be an Objective"),
        ({}, {"hooks": [print]}, "hooks must be nestedlora_jax.hooks.Hook objects"),
        ({}, {"spectral_map": 3.0}, "spectral_map must be callable"),
    ],
)
def test_bad_configuration_raises_before_compiling(config, kwargs, match):
    apply, params, op = _setup()
    compiled = []

    def spy_apply(p, x):
        compiled.append(1)
        return apply(p, x)

    config = TrainingConfig(**({"steps": 10, "batch_size": 32} | config))
    with pytest.raises(ValueError, match=match):
        fit(spy_apply, params, op.op, op.sampler, config=config, progress=False, **kwargs)
    assert not compiled  # nothing was traced


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"steps": -1}, "steps must be a non-negative integer"),
        ({"checkpoint_every": 15, "log_every": 10}, "multiple of log_every"),
        ({"seed": 2**40}, "seed must be an integer"),
        ({"ema_decay": 1.0}, "ema_decay must be a number in"),
        ({"collapse": {"threshold": 0.1}}, "collapse must be a CollapseConfig"),
    ],
)
def test_training_config_refuses_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig(**fields)


def test_zero_steps_returns_initial_parameters():
    apply, params, op = _setup()
    res = fit(apply, params, op.op, op.sampler, config=TrainingConfig(steps=0, batch_size=8), progress=False)
    assert _leaves_equal(res.params, params) and res.history == []


# ---------------------------------------------------------------- determinism, NaN, resume


def _short_fit(apply, params, op, *, steps=60, seed=3, checkpoint_every=None, **kw):
    config = TrainingConfig(steps=steps, batch_size=32, log_every=20, seed=seed, collapse=None,
                            checkpoint_every=checkpoint_every)
    return fit(apply, params, op.op, op.sampler, config=config, progress=False, **kw)


def test_same_seed_same_result_and_different_seed_differs():
    apply, params, op = _setup()
    a = _short_fit(apply, params, op)
    b = _short_fit(apply, params, op)
    c = _short_fit(apply, params, op, seed=4)
    assert _leaves_equal(a.params, b.params) and _leaves_equal(a.ema_params, b.ema_params)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not _leaves_equal(a.params, c.params)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    apply, params, op = _setup()
    full = _short_fit(apply, params, op)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupt):
        _short_fit(apply, params, op, checkpoint_dir=ckpt, checkpoint_every=20,
                   hooks=[_interrupt_at(50)])
    resumed = _short_fit(apply, params, op, checkpoint_dir=ckpt, checkpoint_every=20, resume=True)
    assert resumed.history[0]["step"] == 20 and resumed.history[-1]["step"] == 60  # restored history
    assert _leaves_equal(resumed.params, full.params)
    assert _leaves_equal(resumed.ema_params, full.ema_params)
    assert _leaves_equal(resumed.state.opt_state, full.state.opt_state)


def test_a_checkpoint_from_before_the_residual_quotients_loads_and_resumes_exactly(tmp_path):
    """A checkpoint written before ``TrainState`` had ``residual_rayleigh`` (the same state
    without that field) is restored with it filled from the Rayleigh quotients, and resumes
    as the uninterrupted run; a state of another shape is still refused."""
    import collections

    from nestedlora_jax.checkpoint import CheckpointManager, CheckpointMismatchError

    apply, params, op = _setup()
    full = _short_fit(apply, params, op)
    new, old = tmp_path / "new", tmp_path / "old"
    with pytest.raises(_Interrupt):
        _short_fit(apply, params, op, checkpoint_dir=new, checkpoint_every=20, hooks=[_interrupt_at(50)])
    state, metadata = CheckpointManager(new).restore_latest(full.state)
    fields = {k: v for k, v in state._asdict().items() if k != "residual_rayleigh"}
    writer = CheckpointManager(old)
    writer.save(int(state.step), collections.namedtuple("TrainState", list(fields))(**fields), metadata)
    writer.close()

    loaded, _ = CheckpointManager(old).restore_latest(full.state)
    np.testing.assert_array_equal(loaded.residual_rayleigh, state.rayleigh)
    assert _leaves_equal(loaded._replace(residual_rayleigh=state.residual_rayleigh), state)
    resumed = _short_fit(apply, params, op, checkpoint_dir=old, checkpoint_every=20, resume=True)
    assert _leaves_equal(resumed.params, full.params)
    assert _leaves_equal(resumed.ema_params, full.ema_params)
    wider = full.state._replace(norms=jnp.zeros(4))
    with pytest.raises(CheckpointMismatchError, match=r"\.norms: saved \(3,\) float32, expected \(4,\)"):
        CheckpointManager(old).restore_latest(wider)


@pytest.mark.parametrize("added", ["reference", "candidates"])
def test_a_run_saved_before_a_collapse_option_existed_resumes_exactly(tmp_path, added):
    """A checkpoint whose saved configuration predates a collapse option (no such key: the run
    ran what the option's old-behaviour value does) resumes as the uninterrupted run; a saved
    value that differs from today's is still refused, by name."""
    import copy

    from nestedlora_jax.checkpoint import CheckpointManager

    apply, params, op = _setup()
    config = TrainingConfig(steps=60, batch_size=32, log_every=20, seed=3, checkpoint_every=20,
                            collapse=CollapseConfig(check_every=20, start_fraction=0.0,
                                                    stop_fraction=1.0, reinitialize=False))
    run = lambda d, **kw: fit(apply, params, op.op, op.sampler, config=config, progress=False,
                              checkpoint_dir=d, **kw)
    full = run(tmp_path / "full")
    with pytest.raises(_Interrupt):
        run(tmp_path / "new", hooks=[_interrupt_at(40)])
    state, metadata = CheckpointManager(tmp_path / "new").restore_latest(full.state)
    assert added in metadata["fit_config"]["collapse"]
    for name, value in (("old", None), ("other", {"reference": "residual", "candidates": 4}[added])):
        saved = copy.deepcopy(metadata)
        if value is None:
            del saved["fit_config"]["collapse"][added]
        else:
            saved["fit_config"]["collapse"][added] = value
        writer = CheckpointManager(tmp_path / name)
        writer.save(int(state.step), state, saved)
        writer.close()
    resumed = run(tmp_path / "old", resume=True)
    assert _leaves_equal(resumed.params, full.params)
    with pytest.raises(ValueError, match=rf"collapse\.{added}: saved"):
        run(tmp_path / "other", resume=True)


def test_resume_is_exact_with_the_collapse_remedy_and_any_optimizer(tmp_path):
    """The collapse counters are training state: a run interrupted between two flags of the
    same function resumes with the count it had, and re-initialises at the same step with the
    same fresh parameters as the uninterrupted run (here with SGD + momentum, an optimiser the
    remedy knows nothing about)."""
    apply, params, op, init_params = _one_dead_function()

    collapse = CollapseConfig(check_every=100, start_fraction=0.0, stop_fraction=1.0, patience=2)
    config = TrainingConfig(steps=400, batch_size=32, log_every=50, seed=0, collapse=collapse,
                            checkpoint_every=50)
    args = dict(progress=False, optimizer=optax.sgd(1e-2, momentum=0.9), init_params=init_params)
    full = fit(apply, params, op.op, op.sampler, config=dataclasses.replace(config, checkpoint_every=None), **args)
    assert full.reinitialized and full.reinitialized[0] == (200, [1])

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupt):
        fit(apply, params, op.op, op.sampler, config=config, checkpoint_dir=ckpt,
            hooks=[_interrupt_at(150)], **args)
    resumed = fit(apply, params, op.op, op.sampler, config=config, checkpoint_dir=ckpt, resume=True, **args)
    assert int(resumed.state.step) == 400
    assert resumed.reinitialized == full.reinitialized
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _NaNSampler:
    """Wraps a sampler and poisons one sample in about `rate` of the batches."""

    def __init__(self, base, rate):
        self.base, self.rate, self.dim = base, rate, base.dim

    def sample(self, key, n):
        xs = self.base.sample(key, n)
        poison = jax.random.uniform(jax.random.fold_in(key, 99)) < self.rate
        return jnp.where(poison, xs.at[0, 0].set(jnp.nan), xs)

    def log_prob(self, x):
        return self.base.log_prob(x)


def test_nan_batches_are_skipped_and_counted_and_training_converges():
    L = 1
    apply, params, op = _setup(L=L)
    sampler = _NaNSampler(op.sampler, rate=0.1)
    res = fit(apply, params, op.op, sampler, progress=False,
              config=TrainingConfig(steps=1500, batch_size=64, log_every=500, seed=0, learning_rate=3e-3))
    assert 100 < res.bad_steps < 200  # ~10% of 1500
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(res.params))
    energy = -(res.eigenvalues[0] - op.shift) / op.scale
    assert abs(energy - 2.0) / 2.0 < 2e-2  # ground state E = 2


def test_consecutive_bad_steps_stop_with_an_error_naming_the_step():
    apply, params, op = _setup()
    sampler = _NaNSampler(op.sampler, rate=2.0)  # every batch poisoned
    # The limit is checked at every step, not once per chunk: the run stops at step 20 of a
    # 25-step chunk.
    with pytest.raises(TrainingDivergedError, match=r"20 consecutive steps up to step 20"):
        fit(apply, params, op.op, sampler, progress=False,
            config=TrainingConfig(steps=100, batch_size=8, log_every=25, max_consecutive_bad_steps=20))


# ---------------------------------------------------------------- collapse


def test_dead_function_criterion():
    norms = np.array([1.0, 0.8, 0.01, 0.5, 0.2])
    rayleigh = np.array([1.0, 0.8, 0.9, -0.1, 0.21])
    np.testing.assert_array_equal(dead_functions(norms, rayleigh, 0.1), [2, 3])


def _forming_function_outputs(two_families):
    """Exact outputs on a finite operator (``n`` points, ``<u, w> = mean(u w)``, each batch
    half the full set, so every estimate is exact): functions 0 and 1 converged,
    ``f_j = sqrt(s_j) u_j``, and function 2 still forming, ``a u_2 + b u_0``, with ``a^2 =
    b^2 = s_2``. ``s = (1, 0.3, 0.02)`` (eigenvalues, or singular values for two families)."""
    n, s, a, b = 6, np.array([1.0, 0.3, 0.02]), np.sqrt(0.02), np.sqrt(0.02)
    rng = np.random.default_rng(3)
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0] if two_families else U
    A = (U[:, :3] * s) @ V[:, :3].T + (U[:, 3:] * [0.01, 0.0, -0.5]) @ V[:, 3:].T
    u, v = np.sqrt(n) * U, np.sqrt(n) * V  # unit norm in <., .>; <u_i, T v_i> = s_i

    def family(w):
        return np.stack([np.sqrt(s[0]) * w[:, 0], np.sqrt(s[1]) * w[:, 1],
                         a * w[:, 2] + b * w[:, 0]], axis=1)

    twice = lambda x: jnp.asarray(np.concatenate([x, x]), jnp.float32)
    f, g = family(u), family(v)
    if not two_families:
        return OperatorOutput(twice(f), twice(A @ f)), s, a, b
    return OperatorOutput(twice(f), twice(A @ g), twice(g), twice(A.T @ f)), s, a, b


@pytest.mark.parametrize("two_families", [False, True])
def test_residual_rayleigh_is_the_quotient_of_the_operator_the_earlier_functions_leave(two_families):
    """``(<f_i, T g_i> - sum_{j<i} <f_i, f_j><g_i, g_j>) / (|f_i||g_i|)``: for converged
    functions it is their eigenvalue (singular value); for a function mixing ``u_2`` with
    the earlier ``u_0`` it drops the ``u_0`` part (``s_2 a^2 / (a^2 + b^2)``), which inflates
    the plain Rayleigh quotient to ``(s_2 a^2 + s_0 b^2) / (a^2 + b^2)``. So the plain test
    calls that function dead and the residual test does not."""
    out, s, a, b = _forming_function_outputs(two_families)
    stats = _batch_statistics(out, nested_lora_objective(), None, 1e30)
    mix = a**2 + b**2
    np.testing.assert_allclose(stats["norms"], [s[0], s[1], mix], rtol=1e-5)
    np.testing.assert_allclose(stats["rayleigh"], [s[0], s[1], (s[2] * a**2 + s[0] * b**2) / mix],
                               rtol=1e-5)
    np.testing.assert_allclose(stats["residual_rayleigh"], [s[0], s[1], s[2] * a**2 / mix],
                               rtol=1e-4)
    assert list(dead_functions(stats["norms"], stats["rayleigh"], 0.1)) == [2]
    assert list(dead_functions(stats["norms"], stats["residual_rayleigh"], 0.1)) == []


@pytest.mark.parametrize("two_families", [False, True])
def test_residual_rayleigh_multiplies_the_batch_by_the_moment_samples(two_families):
    """With moment samples each product ``<f_i, f_j><g_i, g_j>`` multiplies the batch's
    estimate by the moment samples', which are drawn independently of each other. The moment
    samples here are two copies of two of the six points, the extreme of halves that are not
    independent (as a lattice's are not): the product of their halves would be ``<f_i,
    f_j>^2`` over that pair, whose mean over the 15 pairs is not ``<f_i, f_j>^2`` (0.0250
    against 0.0200 for functions 2 and 0 here). One factor from the exact batch keeps it linear in the moment
    samples, so the mean over the pairs is exact."""
    out, s, a, b = _forming_function_outputs(two_families)
    n = out.f.shape[0] // 2
    exact = [s[0], s[1], s[2] * a**2 / (a**2 + b**2)]
    residual, halves_product = [], []
    for pair in itertools.combinations(range(n), 2):
        rows = jnp.asarray(pair + pair)  # the two halves of the moment samples are the same
        moments = dict(f_moment=out.f[rows])
        if two_families:
            moments["g_moment"] = out.g[rows]
        stats = _batch_statistics(out._replace(**moments), nested_lora_objective(), None, 1e30)
        residual.append(stats["residual_rayleigh"])
        lam = out.f[rows[:2]].T @ out.f[rows[:2]] / 2
        halves_product.append(lam[2, 0] ** 2)
    np.testing.assert_allclose(np.mean(residual, axis=0), exact, rtol=1e-4, atol=1e-7)
    # What a product of the moment samples' halves would have averaged: a bias the test sees.
    exact_overlap = float((out.f[:n, 2] @ out.f[:n, 0] / n) ** 2)
    assert abs(np.mean(halves_product) - exact_overlap) > 1e-2 * exact_overlap


def test_residual_rayleigh_is_the_plain_one_where_norms_are_not_eigenvalues():
    from nestedlora_jax.baselines import neuralef_objective

    out, *_ = _forming_function_outputs(False)
    objective = neuralef_objective()
    stats = _batch_statistics(out, objective, objective.init_state(3, jnp.float32, None), 1e30)
    np.testing.assert_array_equal(stats["residual_rayleigh"], stats["rayleigh"])


@pytest.mark.parametrize("optimizer", ["default", "sgd-momentum", "adamw-chain"])
def test_reinitialize_replaces_only_dead_rows_for_any_optax_optimizer(optimizer):
    """The dead function's parameters and EMA come from the fresh draw; in every part of the
    optimiser state shaped like the parameters its rows become the live functions' mean;
    everything else (the live rows, step counts) is untouched."""
    apply, params, op = _setup(L=3)
    opt = {"default": default_optimizer(20, 3e-3),
           "sgd-momentum": optax.sgd(1e-3, momentum=0.9),
           "adamw-chain": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))}[optimizer]
    res = _short_fit(apply, params, op, steps=20, optimizer=opt)
    fresh = to_apply(eigenfunction_network(2, 3, architecture="parallel", hidden=(16, 16), rngs=nnx.Rngs(params=7)))[1]
    state = reinitialize_functions(res.state, opt, fresh, np.array([1]))
    for new, old, fr in zip(jax.tree.leaves(state.params), jax.tree.leaves(res.state.params), jax.tree.leaves(fresh)):
        new, old = np.asarray(new), np.asarray(old)
        np.testing.assert_array_equal(new[1], np.asarray(fr)[1])
        np.testing.assert_array_equal(new[[0, 2]], old[[0, 2]])
    for new, fr in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(new)[1], np.asarray(fr)[1])
    n_params = len(jax.tree.leaves(params))
    new_leaves, old_leaves = jax.tree.leaves(state.opt_state), jax.tree.leaves(res.state.opt_state)
    param_shaped = [i for i, x in enumerate(old_leaves) if np.ndim(x) >= 1 and np.shape(x)[0] == 3]
    # Every parameter-shaped part was found (Adam: mu and nu; momentum: the trace).
    assert len(param_shaped) == {"default": 2, "sgd-momentum": 1, "adamw-chain": 2}[optimizer] * n_params
    changed = 0
    for i, (new, old) in enumerate(zip(new_leaves, old_leaves)):
        new, old = np.asarray(new), np.asarray(old)
        if i in param_shaped:
            np.testing.assert_allclose(new[1], (old[0] + old[2]) / 2, rtol=1e-6, atol=1e-12)
            np.testing.assert_array_equal(new[[0, 2]], old[[0, 2]])
            changed += not np.array_equal(new[1], old[1])
        else:
            np.testing.assert_array_equal(new, old)  # counts, schedules
    assert changed > 0


def test_reinitialize_with_no_live_function_uses_the_optimizers_initial_state():
    apply, params, op = _setup(L=2)
    opt = default_optimizer(20, 3e-3)
    res = _short_fit(apply, params, op, steps=20, optimizer=opt)
    state = reinitialize_functions(res.state, opt, params, np.array([0, 1]))
    initial = opt.init(params)
    for new, init, old in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(initial),
                              jax.tree.leaves(res.state.opt_state)):
        if np.ndim(old) >= 1:
            np.testing.assert_array_equal(np.asarray(new), np.asarray(init))
        else:
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_collapse_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        CollapseConfig(threshold=2.0)
    with pytest.raises(ValueError, match="patience"):
        CollapseConfig(patience=0)
    with pytest.raises(ValueError, match="start_fraction"):
        CollapseConfig(start_fraction=0.9, stop_fraction=0.5)
    with pytest.raises(ValueError, match=r"reference must be one of \('rayleigh', 'residual'\)"):
        CollapseConfig(reference="residue")
    with pytest.raises(ValueError, match=r"readout must be one of \('drawn', 'rayleigh-ritz'\)"):
        CollapseConfig(readout="ritz")


def test_a_version_four_configuration_reads_with_the_rayleigh_reference():
    from nestedlora_jax.config import CONFIG_VERSION, SolveConfig

    data = SolveConfig().to_dict()
    assert data["version"] == CONFIG_VERSION == 9
    assert data["training"]["collapse"]["reference"] == "rayleigh"
    collapse = {k: v for k, v in data["training"]["collapse"].items() if k != "reference"}
    old = {**data, "version": 4, "training": {**data["training"], "collapse": collapse}}
    assert SolveConfig.from_dict(old) == SolveConfig()
    residual = SolveConfig(training=TrainingConfig(collapse=CollapseConfig(reference="residual")))
    assert SolveConfig.from_dict(residual.to_dict()) == residual


def test_a_version_five_configuration_reads_with_one_candidate():
    from nestedlora_jax.config import SolveConfig

    data = SolveConfig().to_dict()
    collapse = {k: v for k, v in data["training"]["collapse"].items() if k != "candidates"}
    old = {**data, "version": 5, "training": {**data["training"], "collapse": collapse}}
    assert SolveConfig.from_dict(old) == SolveConfig()
    assert SolveConfig.from_dict(old).training.collapse.candidates == 1
    best_of = SolveConfig(training=TrainingConfig(collapse=CollapseConfig(candidates=16)))
    assert SolveConfig.from_dict(best_of.to_dict()) == best_of


def test_a_version_eight_configuration_reads_with_the_drawn_readout_and_no_growth():
    from nestedlora_jax.config import SolveConfig

    data = SolveConfig().to_dict()
    collapse = {k: v for k, v in data["training"]["collapse"].items()
                if k not in ("readout", "growth")}
    old = {**data, "version": 8, "training": {**data["training"], "collapse": collapse}}
    assert SolveConfig.from_dict(old).training.collapse.readout == "drawn"
    assert SolveConfig.from_dict(old).training.collapse.growth is None
    ritz = SolveConfig(training=TrainingConfig(collapse=CollapseConfig(readout="rayleigh-ritz",
                                                                        growth=0.25)))
    assert SolveConfig.from_dict(ritz.to_dict()) == ritz


def test_a_version_seven_configuration_reads_with_a_random_batch():
    from nestedlora_jax.config import SolveConfig

    data = SolveConfig().to_dict()
    training = {k: v for k, v in data["training"].items() if k != "batch_sampling"}
    old = {**data, "version": 7, "training": training}
    assert SolveConfig.from_dict(old).training.batch_sampling == "random"
    lattice = SolveConfig(training=TrainingConfig(batch_sampling="lattice"))
    assert SolveConfig.from_dict(lattice.to_dict()) == lattice


@pytest.mark.parametrize("reference,growth", [("rayleigh", None), ("residual", None),
                                              ("rayleigh", 0.25)])
@pytest.mark.parametrize("reinitialize", [False, True])
def test_a_dead_function_is_detected_and_only_the_remedy_revives_it(reinitialize, reference, growth):
    """An exactly-zero function is a fixed point of the masked gradient (zero is a saddle):
    without re-initialisation it stays dead; with it, it is replaced and learns. Either
    reference quotient sees it, and sparing growing functions does not spare it."""
    apply, params, op, init_params = _one_dead_function()

    collapse = CollapseConfig(check_every=200, start_fraction=0.1, stop_fraction=0.5,
                              reinitialize=reinitialize, patience=2, reference=reference,
                              growth=growth)
    config = TrainingConfig(steps=1200, batch_size=64, log_every=100, learning_rate=3e-3,
                            collapse=collapse)
    res = fit(apply, params, op.op, op.sampler, config=config, progress=False, init_params=init_params)
    flagged = [h["step"] for h in res.history if h.get("dead") == [1]]
    assert flagged and flagged[0] == 200  # detected at the first check
    if reinitialize:
        assert res.reinitialized[0] == (400, [1])  # after `patience` = 2 consecutive flags
        assert res.eigenvalues[1] > 0.3 * (op.eigenvalues[1])  # alive and learning
    else:
        assert res.reinitialized == []
        assert res.eigenvalues[1] == 0.0  # still exactly dead


def test_growing_functions_compare_the_norm_with_the_first_one_logged_after_the_last_check():
    """Function 0 grew 1.5x since the entry after the previous check (step 2500, not 2000: a
    function re-initialised at the check is compared with itself), function 1 10% (below 1 +
    0.25), function 2 shrank, function 3 is exactly zero; nothing logged after the check: none."""
    from nestedlora_jax.hooks import growing_functions

    history = [{"step": 2000, "eigenvalues": [9.0, 9.0, 9.0, 0.0]},
               {"step": 2500, "eigenvalues": [0.002, 0.002, 0.002, 0.0]},
               {"step": 3000, "eigenvalues": [0.0025, 0.002, 0.0015, 0.0]}]
    now = [0.003, 0.0022, 0.001, 0.0]
    np.testing.assert_array_equal(growing_functions(history, 2000, now, 0.25),
                                  [True, False, False, False])
    assert not growing_functions(history, 3000, now, 0.25).any()


def test_a_flagged_function_that_grows_is_spared_and_one_that_stalls_is_not():
    """The remedy's check: with ``growth`` the flagged function whose norm rose since the
    previous check is recorded as forming, not dead, and its consecutive-flag count restarts;
    the stalled one is re-initialised after ``patience`` checks as without the option."""
    from nestedlora_jax.hooks import CollapseRemedy, Loop

    apply, params, op = _setup(L=3)
    state = _short_fit(apply, params, op, steps=20).state
    state = state._replace(step=jnp.asarray(4000, jnp.int32), norms=jnp.asarray([1.0, 0.001, 0.001]),
                           rayleigh=jnp.asarray([1.0, 0.05, 0.05]),
                           collapse_flags=jnp.asarray([0, 1, 1], jnp.int32))

    def init_params(key):
        return to_apply(eigenfunction_network(2, 3, architecture="parallel", hidden=(16, 16),
                                              rngs=nnx.Rngs(params=5)))[1]

    remedy = CollapseRemedy(CollapseConfig(check_every=1000, start_fraction=0.0, growth=0.25),
                            default_optimizer(20, 3e-3), init_params=init_params)
    history = [{"step": 3500, "eigenvalues": [1.0, 0.0005, 0.001]}]
    loop = Loop(state=state, steps=10_000, config={}, history=history)
    entry = {"step": 4000}
    remedy.after_chunk(loop, entry)
    assert entry["forming"] == [1] and entry["dead"] == [2] and entry["reinitialized"] == [2]
    np.testing.assert_array_equal(loop.state.collapse_flags, [0, 0, 0])
    with pytest.raises(ValueError, match="growth must be None or a positive number"):
        CollapseConfig(growth=0.0)


def test_a_reinitialised_function_is_the_best_of_its_draws_by_the_residual_quotient():
    """With ``candidates = K`` the due function's row comes from the draw whose residual
    quotient in that slot is largest (the quotient here a stand-in known per row, the sum of
    its row of the largest parameter leaf); draw 0 is the single draw ``candidates = 1`` takes; the
    other rows are untouched; asking for candidates without a way to score them is refused."""
    from nestedlora_jax.hooks import CollapseRemedy

    apply, params, op = _setup(L=3)
    state = _short_fit(apply, params, op, steps=20).state

    def init_params(key):
        seed = int(jax.random.randint(key, (), 0, 10**6))
        return to_apply(eigenfunction_network(2, 3, architecture="parallel", hidden=(16, 16),
                                              rngs=nnx.Rngs(params=seed)))[1]

    row_sum = lambda p: jnp.sum(max(jax.tree.leaves(p), key=np.size).reshape(3, -1), axis=1)
    calls = []

    def quotients(p, objective_state, key):
        calls.append(np.asarray(key))
        return row_sum(p)

    key = jax.random.PRNGKey(14)
    draws = [init_params(key)] + [init_params(jax.random.fold_in(key, k)) for k in (1, 2, 3, 4)]
    remedy = CollapseRemedy(CollapseConfig(candidates=5), default_optimizer(20, 3e-3),
                            init_params=init_params, residual_quotients=quotients)
    fresh, chosen = remedy._best_draws(state, key, draws[0], np.array([1]))
    expected = int(np.argmax([float(row_sum(d)[1]) for d in draws]))
    assert expected != 0  # so the choice is not the single draw by accident
    assert chosen == [expected] and len(calls) == 5
    assert all(np.array_equal(c, calls[0]) for c in calls)  # one common sample for all draws
    for new, old, best in zip(jax.tree.leaves(fresh), jax.tree.leaves(state.params),
                              jax.tree.leaves(draws[expected])):
        np.testing.assert_array_equal(np.asarray(new)[1], np.asarray(best)[1])
        np.testing.assert_array_equal(np.asarray(new)[[0, 2]], np.asarray(old)[[0, 2]])
    with pytest.raises(ValueError, match=r"candidates=5\) chooses among fresh draws"):
        CollapseRemedy(CollapseConfig(candidates=5), default_optimizer(20, 3e-3),
                       init_params=init_params)
    with pytest.raises(ValueError, match="candidates must be a positive integer"):
        CollapseConfig(candidates=0)


def test_a_dead_function_revives_from_the_best_of_its_candidates():
    """End to end: fit scores the draws with the training loss's residual quotients, records
    which draw each re-initialised function took, and the function learns."""
    apply, params, op, init_params = _one_dead_function()
    collapse = CollapseConfig(check_every=200, start_fraction=0.1, stop_fraction=0.5, patience=2,
                              candidates=4)
    config = TrainingConfig(steps=1200, batch_size=64, log_every=100, learning_rate=3e-3,
                            collapse=collapse)
    res = fit(apply, params, op.op, op.sampler, config=config, progress=False, init_params=init_params)
    assert res.reinitialized[0] == (400, [1])
    entry = next(h for h in res.history if h["step"] == 400)
    assert len(entry["reinitialized_from_candidates"]) == 1
    assert 0 <= entry["reinitialized_from_candidates"][0] < 4
    assert res.eigenvalues[1] > 0.3 * op.eigenvalues[1]


def test_collapse_checks_skip_objectives_whose_norms_are_not_eigenvalues():
    """A baseline's raw outputs have arbitrary norms, so collapse checks (which compare norms
    with Rayleigh quotients) do not run for it; under NestedLoRA the same config runs them."""
    from nestedlora_jax.baselines import neuralef_objective

    L = 2
    net = eigenfunction_network(1, L, architecture="parallel", hidden=(8,), rngs=nnx.Rngs(params=0))
    apply, params = to_apply(net)
    op = problem_operator(problems.HarmonicOscillator(dim=1), L)
    collapse = CollapseConfig(check_every=100, start_fraction=0.0, stop_fraction=1.0,
                              threshold=0.99, reinitialize=False)
    config = TrainingConfig(steps=200, batch_size=64, log_every=100, learning_rate=1e-3,
                            collapse=collapse)
    checked = {}
    for objective in (neuralef_objective(), nested_lora_objective()):
        res = fit(apply, params, op.op, op.sampler, config=config, progress=False, objective=objective)
        checked[objective.norms_are_eigenvalues] = any("dead" in h for h in res.history)
    assert checked == {False: False, True: True}


class _GridSampler:
    """Evenly spaced points on [-a, a]: sample means are quadratures, so the inner products of
    functions that vanish at the ends are exact to float32 (``<u, v> = (1/2a) int u v``)."""

    def __init__(self, a=10.0):
        self.a, self.dim = a, 1

    def sample(self, key, n):
        return jnp.linspace(-self.a, self.a, n, dtype=jnp.float32)[:, None]


def _hermite_model(L=2, shift=5.0, a=10.0):
    """Functions linear in a readout over 4 features that mix the oscillator's first four
    eigenfunctions ``u_k = sqrt(2a) phi_k`` (unit norm on :class:`_GridSampler`) by a fixed
    invertible matrix, plus the bias; ``T = Lap / 2 - x^2 / 2 + shift`` has eigenvalues
    ``shift - (k + 1/2)`` on them. Function 0 is converged, ``sqrt(lambda_0) u_0``; function 1
    has a random readout."""
    from nestedlora_jax.operators import negative_hamiltonian

    def u(x):  # (1,) -> (4,)
        t = x[0]
        phi0 = np.pi ** -0.25 * jnp.exp(-0.5 * t * t)
        herm = jnp.stack([jnp.ones_like(t), np.sqrt(2) * t, (2 * t * t - 1) / np.sqrt(2),
                          (2 * t**3 - 3 * t) / np.sqrt(3)])
        return np.sqrt(2 * a) * phi0 * herm

    mix = np.random.default_rng(0).normal(size=(4, 4)) + 3 * np.eye(4)

    def apply(params, x):
        layer = params["body"]["layers"][0]
        return layer["kernel"][:, :, 0] @ (jnp.asarray(mix, jnp.float32) @ u(x)) + layer["bias"][:, 0]

    lam = shift - (np.arange(4) + 0.5)
    kernel = np.zeros((L, 4, 1), np.float32)
    # f_0 = sqrt(lam_0) u_0 (zero where lam_0 <= 0)
    kernel[0, :, 0] = np.linalg.solve(mix.T, np.sqrt(max(lam[0], 0.0)) * np.eye(4)[0])
    kernel[1:, :, 0] = np.random.default_rng(1).normal(size=(L - 1, 4))
    params = {"body": {"layers": [{"kernel": jnp.asarray(kernel),
                                   "bias": jnp.full((L, 1), 0.1, jnp.float32)}]}}
    op = negative_hamiltonian(lambda x: 0.5 * jnp.sum(x * x), kinetic=0.5, shift=shift)
    return apply, params, op, u, lam


@pytest.mark.parametrize("slot", [0, 1])
def test_a_rayleigh_ritz_readout_is_the_top_eigenfunction_of_the_residual_in_the_features_span(slot):
    """Function ``i``'s readout maximises its Rayleigh quotient for ``T - sum_{j<i} f_j
    f_j^T`` over its features' span, scaled so that ``||f_i||^2`` is that quotient: with
    function 0 converged on ``u_0``, function 1 becomes ``sqrt(lambda_1) u_1`` (``mu =
    lambda_1``); function 0, with nothing before it, ``sqrt(lambda_0) u_0``. Other rows stay."""
    from nestedlora_jax.networks import readout_paths
    from nestedlora_jax.training import rayleigh_ritz_readout

    apply, params, op, u, lam = _hermite_model()
    sampler = _GridSampler()
    choose = rayleigh_ritz_readout(apply, op, sampler.sample, 4096, readout_paths(params, 2))
    new, mu = choose(params, jax.random.PRNGKey(0), slot)
    np.testing.assert_allclose(float(mu), lam[slot], rtol=1e-4)
    x = sampler.sample(None, 4096)
    f = jax.vmap(lambda xx: apply(new, xx))(x)[:, slot]
    target = np.sqrt(lam[slot]) * jax.vmap(u)(x)[:, slot]
    sign = np.sign(float(jnp.mean(f * target)))
    np.testing.assert_allclose(sign * f, target, atol=2e-3 * np.sqrt(lam[slot]))
    other = 1 - slot
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(new["body"]["layers"][0][name][other],
                                      params["body"]["layers"][0][name][other])


def test_a_rayleigh_ritz_readout_is_left_alone_where_no_direction_has_a_positive_quotient():
    from nestedlora_jax.networks import readout_paths
    from nestedlora_jax.training import rayleigh_ritz_readout

    apply, params, op, _, lam = _hermite_model(shift=0.0)  # every quotient negative
    choose = rayleigh_ritz_readout(apply, op, _GridSampler().sample, 2048, readout_paths(params, 2))
    new, mu = choose(params, jax.random.PRNGKey(0), 1)
    assert float(mu) < 0
    assert _leaves_equal(new, params)


def test_a_function_re_initialised_with_a_rayleigh_ritz_readout_starts_formed():
    """The dead function of the remedy test, re-initialised with ``readout='rayleigh-ritz'``:
    its recorded quotient is near the operator's second eigenvalue, its norm is near that at
    once (the drawn readout starts mostly inside function 0's span), and it ends closer."""
    apply, params, op, init_params = _one_dead_function()
    config = TrainingConfig(steps=1200, batch_size=64, log_every=100, learning_rate=3e-3,
                            collapse=CollapseConfig(check_every=200, start_fraction=0.1,
                                                    stop_fraction=0.5, readout="rayleigh-ritz"))
    res = fit(apply, params, op.op, op.sampler, config=config, progress=False, init_params=init_params)
    assert res.reinitialized[0] == (400, [1])
    entry = next(h for h in res.history if h["step"] == 400)
    lam = float(op.eigenvalues[1])
    assert abs(entry["readout_quotients"][0] - lam) < 0.1 * lam
    after = next(h for h in res.history if h["step"] == 500)
    assert after["eigenvalues"][1] > 0.8 * lam
    np.testing.assert_allclose(res.eigenvalues[1], lam, rtol=0.05)
    with pytest.raises(ValueError, match=r"readout='rayleigh-ritz'\) sets a re-initialised"):
        from nestedlora_jax.hooks import CollapseRemedy

        CollapseRemedy(CollapseConfig(readout="rayleigh-ritz"), default_optimizer(20, 3e-3),
                       init_params=init_params)
