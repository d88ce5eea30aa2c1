"""Configuration as data, runs that reload from their folder alone, and the hook contract."""

import dataclasses
import json
import shutil

import numpy as np
import optax
import pytest

import nestedlora_jax as nl
from nestedlora_jax.config import (
    CONFIG_VERSION,
    ConfigVersionError,
    EvaluationConfig,
    NetworkConfig,
    OperatorConfig,
    SolveConfig,
    TrainingConfig,
)
from nestedlora_jax.hooks import CollapseConfig, Hook, Loop, run_loop
from nestedlora_jax.solver import problem_from_record, problem_record, restore, solve

TINY = SolveConfig(
    network=NetworkConfig(hidden=(8,)),
    training=TrainingConfig(steps=100, batch_size=32, log_every=50, seed=1),
    evaluation=EvaluationConfig(grid_size=40),
)


# ------------------------------------------------------------------ the dataclasses


def test_a_configuration_survives_json_unchanged():
    config = SolveConfig(
        method="neuralsvd-joint",
        network=NetworkConfig(architecture="shared", hidden=(16, 16), fourier_features=(8, 2.0),
                              envelope="learnable", envelope_decay=3.0),
        operator=OperatorConfig(laplacian="hutchinson", num_probes=4, scale=0.5, shift=1.0),
        training=TrainingConfig(steps=7, learning_rate=1e-3, collapse=CollapseConfig(patience=3)),
        evaluation=EvaluationConfig(mode="mc", num_samples=4096, every=200),
    )
    assert SolveConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert SolveConfig.from_dict(SolveConfig().to_dict()) == SolveConfig()
    changed = config.replace(training={"steps": 9}, method="neuralsvd-seq")
    assert changed.training.steps == 9 and changed.training.learning_rate == 1e-3
    assert changed.method == "neuralsvd-seq" and changed.network == config.network


def test_a_configuration_of_another_version_or_with_unknown_fields_is_refused():
    data = SolveConfig().to_dict()
    with pytest.raises(ConfigVersionError, match="version 0, but this nestedlora_jax reads versions"):
        SolveConfig.from_dict(data | {"version": 0})
    with pytest.raises(ConfigVersionError, match=r"unknown field\(s\) \['width'\]"):
        SolveConfig.from_dict(data | {"network": data["network"] | {"width": 3}})


@pytest.mark.parametrize("make, match", [
    (lambda: OperatorConfig(num_probes=4), "num_probes is for the stochastic Laplacians"),
    (lambda: OperatorConfig(laplacian="hutchinson"), "needs num_probes"),
    (lambda: OperatorConfig(laplacian="bogus"), "OperatorConfig.laplacian must be one of"),
    (lambda: NetworkConfig(radial_input=True, periodic=True), "exclude each other"),
    (lambda: NetworkConfig(envelope="fixed", periodic=True), "envelope is not periodic"),
    (lambda: NetworkConfig(activation="relu6"), "activation must be one of"),
    (lambda: NetworkConfig(hidden=(8, 0)), "positive widths"),
    (lambda: SolveConfig(method="svd"), "SolveConfig.method must be one of"),
    (lambda: SolveConfig(training={"steps": 3}), "SolveConfig.training must be a TrainingConfig"),
    (lambda: SolveConfig(evaluation=EvaluationConfig(every=150)), r"every \(150\) must be a multiple"),
    (lambda: EvaluationConfig(mode="quadrature"), "EvaluationConfig.mode must be one of"),
])
def test_options_that_cannot_work_are_refused_when_the_configuration_is_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_activations_are_the_networks():
    from nestedlora_jax.config import ACTIVATIONS
    from nestedlora_jax.networks import ACTIVATION_FUNCTIONS

    assert set(ACTIVATIONS) == set(ACTIVATION_FUNCTIONS)


def test_problems_are_recorded_by_class_and_fields():
    for problem in (nl.CoupledOscillator(dim=3, seed=2), nl.Hydrogen(dim=3), nl.InfiniteWell(dim=2, length=2.0),
                    nl.CosinePotential(dim=5), nl.HarmonicOscillator(dim=2)):
        record = json.loads(json.dumps(problem_record(problem)))
        again = problem_from_record(record)
        assert type(again) is type(problem) and problem_record(again) == record
        np.testing.assert_allclose(again.energies(3), problem.energies(3))


# ------------------------------------------------------------------ run folders


def test_solve_then_restore_from_the_folder_alone(tmp_path):
    run = tmp_path / "run"
    trained = solve(nl.HarmonicOscillator(dim=2), 2, config=TINY, run_dir=run, progress=False)
    saved = json.loads((run / "solve_config.json").read_text())
    assert saved["version"] == CONFIG_VERSION and saved["L"] == 2
    assert (run / "history.json").is_file() and (run / "checkpoints").is_dir()
    again = restore(run)
    assert again.config == TINY and int(again.fit.state.step) == 100
    np.testing.assert_array_equal(again.metrics.rayleigh, trained.metrics.rayleigh)
    assert again.fit.history == trained.fit.history


def test_restore_refuses_folders_without_a_run_or_from_another_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run: there is no solve_config.json"):
        restore(tmp_path)
    (tmp_path / "solve_config.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigVersionError, match="version 99; this nestedlora_jax reads versions"):
        restore(tmp_path)


def test_resuming_a_run_with_another_configuration_names_what_changed(tmp_path):
    run = tmp_path / "run"
    solve(nl.HarmonicOscillator(dim=2), 2, config=TINY, run_dir=run, progress=False)
    with pytest.raises(ValueError, match=r"network.hidden: saved \[8\], now \[16\]"):
        solve(nl.HarmonicOscillator(dim=2), 2, config=TINY.replace(network={"hidden": (16,)}),
              run_dir=run, resume=True, progress=False)
    before = (run / "solve_config.json").read_text()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        solve(nl.HarmonicOscillator(dim=2), 2, config=TINY.replace(training={"steps": 50}),
              run_dir=run, progress=False)
    assert (run / "solve_config.json").read_text() == before  # the old run's record is intact


def test_a_run_recorded_by_an_older_version_resumes(tmp_path):
    """A run folder written by configuration version 5 (no ``collapse.candidates``, no
    ``collapse.readout`` or ``collapse.growth``, no ``moment_sampling`` and no
    ``batch_sampling``, and its checkpoints' configuration without them) resumes under today's
    version: both records are read as the old run ran (one candidate, the drawn readout, no
    function spared, random moment samples, a random batch). A real change is still refused."""
    from nestedlora_jax.checkpoint import CheckpointManager

    run = tmp_path / "run"
    trained = solve(nl.HarmonicOscillator(dim=2), 2, config=TINY, run_dir=run, progress=False)
    record = json.loads((run / "solve_config.json").read_text())
    record["version"] = record["config"]["version"] = 5
    del record["config"]["training"]["collapse"]["candidates"]
    del record["config"]["training"]["collapse"]["readout"]
    del record["config"]["training"]["collapse"]["growth"]
    del record["config"]["training"]["moment_sampling"]
    del record["config"]["training"]["batch_sampling"]
    (run / "solve_config.json").write_text(json.dumps(record))
    state, metadata = CheckpointManager(run / "checkpoints").restore_latest(trained.fit.state)
    del metadata["fit_config"]["collapse"]["candidates"]
    del metadata["fit_config"]["collapse"]["readout"]
    del metadata["fit_config"]["collapse"]["growth"]
    del metadata["fit_config"]["moment_sampling"]
    del metadata["fit_config"]["batch_sampling"]
    shutil.rmtree(run / "checkpoints")
    manager = CheckpointManager(run / "checkpoints")
    manager.save(int(state.step), state, metadata)
    manager.close()
    again = solve(nl.HarmonicOscillator(dim=2), 2, config=TINY, run_dir=run, resume=True,
                  progress=False)
    np.testing.assert_array_equal(again.metrics.rayleigh, trained.metrics.rayleigh)
    with pytest.raises(ValueError, match=r"training.collapse.candidates: saved 1, now 4"):
        solve(nl.HarmonicOscillator(dim=2), 2, run_dir=run, resume=True, progress=False,
              config=TINY.replace(training={"collapse": CollapseConfig(candidates=4)}))
    with pytest.raises(ValueError, match=r"training.collapse.readout: saved 'drawn', now 'rayleigh-ritz'"):
        solve(nl.HarmonicOscillator(dim=2), 2, run_dir=run, resume=True, progress=False,
              config=TINY.replace(training={"collapse": CollapseConfig(readout="rayleigh-ritz")}))
    with pytest.raises(ValueError, match=r"training.moment_sampling: saved 'random', now 'lattice'"):
        solve(nl.HarmonicOscillator(dim=2), 2, run_dir=run, resume=True, progress=False,
              config=TINY.replace(training={"moment_batch_size": 64, "moment_sampling": "lattice"}))
    with pytest.raises(ValueError, match=r"training.batch_sampling: saved 'random', now 'lattice'"):
        solve(nl.HarmonicOscillator(dim=2), 2, run_dir=run, resume=True, progress=False,
              config=TINY.replace(training={"batch_sampling": "lattice"}))


def test_a_run_with_a_custom_optimizer_needs_it_to_be_restored(tmp_path):
    run = tmp_path / "run"
    optimizer = optax.sgd(1e-3, momentum=0.9)
    solve(nl.HarmonicOscillator(dim=1), 1, config=TINY, optimizer=optimizer, run_dir=run, progress=False)
    with pytest.raises(ValueError, match="trained with a custom optimizer: pass it"):
        restore(run)
    assert int(restore(run, optimizer=optimizer).fit.state.step) == 100


def test_solve_with_the_stochastic_laplacian():
    """Before: solve offered laplacian_method='hutchinson' but no way to give num_probes."""
    config = TINY.replace(operator=OperatorConfig(laplacian="hutchinson", num_probes=4),
                          network={"hidden": (16, 16)},
                          training={"steps": 1500, "batch_size": 128, "log_every": 500})
    result = solve(nl.HarmonicOscillator(dim=2), 1, config=config, progress=False)
    # Measured: 1.8e-3, as with the exact Laplacian; the evaluation itself uses the exact one.
    assert result.fit.bad_steps == 0 and result.metrics.rel_error[0] < 1e-2


# ------------------------------------------------------------------ hooks


class _Recorder(Hook):
    def __init__(self):
        self.calls = []

    def on_start(self, loop):
        self.calls.append(("start", loop.step))

    def after_chunk(self, loop, entry):
        entry["recorded"] = True
        self.calls.append(("chunk", loop.step))

    def after_record(self, loop, entry):
        assert loop.history[-1] is entry and entry["recorded"]
        self.calls.append(("record", loop.step))

    def on_end(self, loop):
        self.calls.append(("end", loop.step))


def test_a_users_hook_sees_every_chunk_in_order():
    apply, params, op = _tiny()
    recorder = _Recorder()
    result = nl.fit(apply, params, op.op, op.sampler, config=TrainingConfig(steps=120, batch_size=16, log_every=50),
                    hooks=[recorder], progress=False)
    assert recorder.calls == [("start", 0), ("chunk", 50), ("record", 50), ("chunk", 100),
                              ("record", 100), ("chunk", 120), ("record", 120), ("end", 120)]
    assert all(h["recorded"] for h in result.history)


def test_run_loop_runs_any_state_and_chunk_function():
    """The loop knows nothing of networks: a counter state and a Python chunk function do."""

    @dataclasses.dataclass
    class Counter:
        step: int = 0
        loss: float = 0.0
        norms: tuple = (1.0,)
        rayleigh: tuple = (1.0,)
        bad_steps: int = 0

    loop = Loop(state=Counter(), steps=7)
    run_loop(loop, lambda s, n: dataclasses.replace(s, step=s.step + n, loss=float(s.step + n)), [],
             chunk_steps=3)
    assert [h["step"] for h in loop.history] == [3, 6, 7] and loop.history[-1]["loss"] == 7.0


def _tiny():
    from flax import nnx

    op = nl.problem_operator(nl.HarmonicOscillator(dim=1), 1)
    apply, params = nl.to_apply(nl.eigenfunction_network(1, 1, hidden=(8,), rngs=nnx.Rngs(params=0)))
    return apply, params, op


def test_a_problem_that_asks_for_standardised_inputs_gets_them_unless_turned_off():
    import math

    from nestedlora_jax.solver import default_network

    box = default_network(nl.InfiniteWell(dim=3, length=2.0), 2)
    assert box.features.input_center == (1.0,) * 3
    np.testing.assert_allclose(box.features.input_scale, [2.0 / math.sqrt(12.0)] * 3)
    raw = default_network(nl.InfiniteWell(dim=3, length=2.0), 2, NetworkConfig(standardize_input=False))
    assert raw.features.input_center == (0.0,) * 3 and raw.features.input_scale == (1.0,) * 3
    oscillator = default_network(nl.HarmonicOscillator(dim=2), 2)  # no standardization asked
    assert oscillator.features.input_center == (0.0, 0.0)


def test_a_hydrogen_network_length_scales_coordinates_and_radius_and_is_recorded(tmp_path):
    """With network_length a the network at x is a raw-coordinate network (same parameters)
    at x Z / a, radius included; without it the coordinates are raw. The length is a field of
    the problem, so a run folder rebuilds the same network."""
    import jax
    from flax import nnx

    from nestedlora_jax.networks import eigenfunction_network, to_apply
    from nestedlora_jax.solver import default_network

    assert nl.Hydrogen(dim=2).input_standardization() is None
    assert default_network(nl.Hydrogen(dim=2), 3).features.input_scale == (1.0, 1.0)
    problem = nl.Hydrogen(dim=2, Z=2.0, network_length=10)
    net = default_network(problem, 3, NetworkConfig(hidden=(8,)), seed=4)
    np.testing.assert_allclose(net.features.input_scale, [5.0, 5.0])
    raw = eigenfunction_network(2, 3, hidden=(8,), radial_input=True, rngs=nnx.Rngs(params=4))
    (f, p), (g, q) = to_apply(net), to_apply(raw)
    xs = 30.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 2))
    np.testing.assert_allclose(jax.vmap(lambda x: f(p, x))(xs), jax.vmap(lambda x: g(q, x / 5.0))(xs),
                               rtol=2e-5, atol=1e-6)
    assert problem_from_record(problem_record(problem)) == problem
    for bad in (0.0, -1.0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match=r"network_length \(None, or a length in Bohr radii "
                                             r"at Z = 1\) must be a finite number > 0"):
            nl.Hydrogen(dim=2, network_length=bad)


def test_a_hook_can_end_the_run_early_and_the_final_state_is_saved(tmp_path):
    """The README's example: a hook that sets loop.steps ends the loop after that chunk, and
    the checkpoint hook saves that step as the final one."""

    class StopAt(Hook):
        def after_chunk(self, loop, entry):
            if entry["step"] >= 100:
                loop.steps = loop.step

    apply, params, op = _tiny()
    result = nl.fit(apply, params, op.op, op.sampler, progress=False, hooks=[StopAt()],
                    config=TrainingConfig(steps=1000, batch_size=16, log_every=50),
                    checkpoint_dir=tmp_path / "ck", spectral_map=lambda t: -t)
    assert int(result.state.step) == 100 and result.history[-1]["step"] == 100
    assert "energies" in result.history[-1]
    from nestedlora_jax.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path / "ck")
    assert manager.latest_step() == 100
    manager.close()


def test_solve_takes_your_own_network_and_objective_and_restore_asks_for_them(tmp_path):
    from flax import nnx

    net = nl.eigenfunction_network(1, 2, hidden=(12,), rngs=nnx.Rngs(params=5))
    run = tmp_path / "run"
    result = solve(nl.HarmonicOscillator(dim=1), 2, config=TINY, network=net,
                   objective=nl.nested_lora_objective("joint"), run_dir=run, progress=False)
    assert result.objective.name == nl.nested_lora_objective("joint").name
    with pytest.raises(ValueError, match="custom network: pass it"):
        restore(run)
    with pytest.raises(ValueError, match="custom objective: pass it"):
        restore(run, network=net)
    again = restore(run, network=net, objective=nl.nested_lora_objective("joint"))
    np.testing.assert_array_equal(again.metrics.rayleigh, result.metrics.rayleigh)
    wrong = nl.eigenfunction_network(1, 3, hidden=(12,), rngs=nnx.Rngs(params=5))
    with pytest.raises(ValueError, match=r"shape \(3,\), but L = 2 states"):
        solve(nl.HarmonicOscillator(dim=1), 2, config=TINY, network=wrong, progress=False)
    with pytest.raises(ValueError, match="network must be a Flax NNX module"):
        solve(nl.HarmonicOscillator(dim=1), 2, config=TINY, network=lambda p, x: x, progress=False)
