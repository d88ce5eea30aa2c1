"""Nothing lost, nothing silently wrong: faults and bad input, tried as a demanding user would.

Each test is one case of the reliability checklist: a point on the nucleus (in a batch, on a
grid), bad values of every option (API and command line), interrupted runs (SIGINT, SIGTERM),
damaged checkpoints, planted symlinks, a resume with a changed configuration, and a problem
whose spectrum is unknown. Each asserts the message a user sees and that nothing was lost.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nestedlora_jax import hydrogen_benchmark, high_dim_benchmark
from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.checkpoint import CheckpointMismatchError
from nestedlora_jax.evaluation import evaluate, quadrature_grid
from nestedlora_jax.networks import eigenfunction_network, to_apply
from nestedlora_jax.operators import problem_operator
from nestedlora_jax.problems import HarmonicOscillator, Hydrogen, Problem
from nestedlora_jax.config import EvaluationConfig, NetworkConfig, SolveConfig, TrainingConfig
from nestedlora_jax.hooks import Callback, TrainingDivergedError
from nestedlora_jax.solver import default_network, solve
from nestedlora_jax.training import fit
from flax import nnx


def _network(problem, L, seed=0, hidden=(16, 16)):
    return to_apply(default_network(problem, L, NetworkConfig(hidden=hidden), seed=seed))


class _PlantingSampler:
    """The problem's sampler, with ``point`` planted as the first sample of every
    ``every``-th batch (a user's sampler or data with a point on a singularity)."""

    def __init__(self, base, point, every):
        self.base, self.dim = base, base.dim
        self.point, self.every = jnp.asarray(point, jnp.float32), every
        self.calls = 0

    def sample(self, key, n):
        xs = self.base.sample(key, n)
        plant = jax.random.uniform(jax.random.fold_in(key, 99)) < 1.0 / self.every
        return xs.at[0].set(jnp.where(plant, self.point, xs[0]))

    def log_prob(self, x):
        return self.base.log_prob(x)


# ------------------------------------------------------------------ the nucleus in a batch


@functools.lru_cache(maxsize=1)
def _clean_hydrogen_run():
    problem, L = Hydrogen(2), 1
    op = problem_operator(problem, L)
    apply, params = _network(problem, L)
    kw = dict(progress=False, config=TrainingConfig(steps=600, batch_size=128, log_every=200, seed=0,
                                                    learning_rate=3e-3, collapse=None))
    return apply, params, op, kw, fit(apply, params, op.op, op.sampler, **kw)


@pytest.mark.parametrize("point", [[0.0, 0.0], [1e-20, 0.0]], ids=["nucleus", "numerically-at-nucleus"])
def test_a_point_on_the_nucleus_costs_one_skipped_step_not_the_run(point):
    """Before: the r -> 0 clamp made V = -9.2e18 there, a finite value the guard let through
    (three such samples in 3000 steps raised the error from 0.074 to 0.464, no step skipped).
    Now the batch is recognised as invalid and skipped, counted, and the run is unharmed."""
    apply, params, op, kw, clean = _clean_hydrogen_run()
    planted = fit(apply, params, op.op, _PlantingSampler(op.sampler, point, every=20), **kw)
    assert clean.bad_steps == 0
    assert 10 <= planted.bad_steps <= 60  # ~ 600 / 20
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(planted.params))
    energy = lambda r: -(r.eigenvalues[0] - op.shift) / op.scale
    assert abs(energy(planted) - energy(clean)) < 0.02 * 4  # E_0 = -4: same accuracy


def test_a_grid_node_on_the_nucleus_is_left_out_and_reported():
    """Before: a user grid with a node at the origin gave energies around -2e18, no warning."""
    problem, L = Hydrogen(2), 2
    op = problem_operator(problem, L)
    apply, params = _network(problem, L)
    points, weights = quadrature_grid(problem, L, 40)
    clean = evaluate(apply, params, problem, op, points=points, weights=weights)
    points = np.concatenate([points, np.zeros((1, 2))])
    weights = np.concatenate([weights, [np.mean(weights)]])
    with pytest.warns(RuntimeWarning, match=r"1 of 1601 points gave non-finite or absurd"):
        m = evaluate(apply, params, problem, op, points=points, weights=weights)
    assert m.num_invalid_points == 1
    np.testing.assert_allclose(m.rayleigh, clean.rayleigh, rtol=1e-12)


def test_only_invalid_points_is_an_error_not_a_number():
    problem, L = Hydrogen(2), 1
    op = problem_operator(problem, L)
    apply, params = _network(problem, L)
    with pytest.raises(ValueError, match="every one of the 2 points gave a non-finite or absurd"):
        evaluate(apply, params, problem, op, points=np.zeros((2, 2)), weights=np.ones(2))


def test_absurd_potential_values_are_invalid_for_every_problem():
    """Not only hydrogen: any potential with a finite but absurd value (here 1e20 on a shell)
    marks the point invalid in training and evaluation alike."""

    @dataclasses.dataclass(frozen=True)
    class Spiky(Problem):
        dim: int = 2

        def potential(self, x):
            return jnp.sum(x * x) + jnp.where(jnp.abs(x[0]) > 2.5, 1e20, 0.0)

        def energies(self, L):
            return HarmonicOscillator(2).energies(L)

        def default_sampler(self, L):
            return HarmonicOscillator(2).default_sampler(L)

    problem, L = Spiky(), 1
    op = problem_operator(problem, L)
    apply, params = _network(problem, L)
    res = fit(apply, params, op.op, op.sampler, progress=False,
              config=TrainingConfig(steps=100, batch_size=256, log_every=50, collapse=None,
                                    learning_rate=1e-3, max_consecutive_bad_steps=200))
    assert res.bad_steps > 50  # most batches of 256 have a point beyond |x_0| = 2.5
    with pytest.warns(RuntimeWarning, match="non-finite or absurd"):
        m = evaluate(apply, res.ema_params, problem, op, num_samples=2**13, groups=4)
    assert m.num_invalid_points > 0 and np.all(np.isfinite(m.rayleigh))


# ------------------------------------------------------------------ bad values, API


def _tiny(problem=None, L=1):
    problem = problem or HarmonicOscillator(1)
    op = problem_operator(problem, L)
    apply, params = _network(problem, L, hidden=(8,))
    return apply, params, op


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=-1e-3), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
    (dict(steps=-1), "steps must be a non-negative integer"),
    (dict(steps=10.5), "steps must be a non-negative integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=7), r"^TrainingConfig.batch_size must be even"),
    (dict(log_every=0), "log_every must be a positive integer"),
    (dict(ema_decay=1.0), r"ema_decay must be a number in \[0, 1\)"),
    (dict(seed=-3), "seed must be an integer in"),
    (dict(seed=2**40), "seed must be an integer in"),
    (dict(max_consecutive_bad_steps=0), "max_consecutive_bad_steps must be a positive integer"),
    (dict(max_abs_value=float("inf")), "max_abs_value must be a finite number > 0"),
    (dict(callback=5), "callback must be callable"),
])
def test_fit_rejects_bad_values_before_compiling(kwargs, match):
    """Every value is checked where the configuration is made (TrainingConfig, Callback),
    before fit traces anything."""
    apply, params, op = _tiny()
    traced = []
    spy = lambda p, x: traced.append(1) or apply(p, x)
    with pytest.raises(ValueError, match=match):
        callback = kwargs.pop("callback", None)
        hooks = [Callback(callback)] if callback is not None else []
        fit(spy, params, op.op, op.sampler, progress=False, hooks=hooks,
            config=TrainingConfig(**(dict(steps=10, batch_size=8) | kwargs)))
    assert not traced


def test_a_network_for_another_dimension_is_named_as_such():
    """Before: it failed inside opt_einsum."""
    _, _, op = _tiny(HarmonicOscillator(2))
    apply3, params3 = to_apply(eigenfunction_network(3, 1, hidden=(8,), rngs=nnx.Rngs(params=0)))
    with pytest.raises(ValueError, match=r"Was the network built for another input dimension than the problem's d = 2"):
        fit(apply3, params3, op.op, op.sampler, config=TrainingConfig(steps=10, batch_size=8),
            progress=False)


def test_a_non_callable_potential_is_refused_when_the_operator_is_built():
    @dataclasses.dataclass(frozen=True)
    class Broken(Problem):
        dim: int = 2
        potential = 3.0

        def energies(self, L):
            return HarmonicOscillator(2).energies(L)

        def default_sampler(self, L):
            return HarmonicOscillator(2).default_sampler(L)

    with pytest.raises(ValueError, match="Broken.potential must be a function of one point"):
        problem_operator(Broken(), 2)


def test_a_nan_learning_rate_inside_a_custom_optimizer_never_writes_nan_parameters():
    """Before: the guard checked loss and gradients only, so NaN parameters were written on
    step 1. Now the update is checked too, and the run stops at the limit, where it diverged."""
    apply, params, op = _tiny()
    with pytest.raises(TrainingDivergedError, match="10 consecutive steps up to step 10"):
        fit(apply, params, op.op, op.sampler, progress=False, optimizer=optax.adam(float("nan")),
            config=TrainingConfig(steps=100, batch_size=8, log_every=50, max_consecutive_bad_steps=10))


class _Refuse:
    """A callback that fails the test if training ever reaches it."""

    def __call__(self, step, state):
        raise AssertionError("training ran before the bad setting was caught")


@pytest.mark.parametrize("evaluation, kwargs, match", [
    (dict(mode="bogus"), {}, "EvaluationConfig.mode must be one of"),
    (dict(mode="grid"), dict(problem=HarmonicOscillator(5)), "mode 'grid' needs d <= 2"),
    (dict(mode="mc", num_samples=100), {}, "num_samples=100 is too few"),
    (dict(grid_size=1), {}, "grid_size must be >= 2"),
    (dict(grid_size=10**6), {}, "too many to evaluate"),
    ({}, dict(L=0), "L .* must be a positive integer"),
    (dict(every=75), {}, r"EvaluationConfig.every \(75\) must be a multiple of TrainingConfig.log_every"),
    (dict(every=100, num_periodic_samples=10), {}, "num_periodic_samples=10 is too few"),
    ({}, dict(data_parallel=0), "data_parallel .* must be a positive integer"),
])
def test_solve_rejects_evaluation_settings_before_training(evaluation, kwargs, match):
    """Before: an unknown evaluation mode, grid settings it cannot use, too few samples were
    only noticed after training, throwing the trained result away."""
    problem = kwargs.pop("problem", HarmonicOscillator(2))
    L = kwargs.pop("L", 2)
    with pytest.raises(ValueError, match=match):
        config = SolveConfig(training=TrainingConfig(steps=100, log_every=50),
                             evaluation=EvaluationConfig(**evaluation))
        solve(problem, L, config=config, progress=False, hooks=[Callback(_Refuse())], **kwargs)


# ------------------------------------------------------------------ training without answers


@dataclasses.dataclass(frozen=True)
class _Mystery(Problem):
    """The 2-D oscillator with its spectrum withheld: potential and sampler only."""

    dim: int = 2

    def potential(self, x):
        return HarmonicOscillator(2).potential(x)

    def default_sampler(self, L):
        return HarmonicOscillator(2).default_sampler(L)


def test_solve_trains_a_problem_whose_spectrum_is_unknown():
    """Before: energies() raised an empty NotImplementedError even with scale and shift given.
    Now scale and shift are estimated from the Ritz energies of the initial network (upper
    bounds), and the evaluation reports energies and residuals without errors."""
    result = solve(_Mystery(), 3, progress=False,
                   config=SolveConfig(training=TrainingConfig(steps=2000, log_every=500)))
    m = result.metrics
    np.testing.assert_allclose(np.sort(m.rayleigh), [2.0, 4.0, 4.0], rtol=1e-2)
    assert m.rel_error is None and m.exact is None and m.subspace_distance_mean is None
    assert np.all(m.residual < 0.5) and m.orthogonality_max < 1e-2
    # The estimated shift lies above the wanted energies, as the Ritz bound promises.
    assert result.operator.shift / result.operator.scale > 4.0
    assert "E Rayleigh" in result.table and "exact" not in result.table


def test_problem_operator_without_a_spectrum_asks_for_scale_and_shift():
    with pytest.raises(ValueError, match="has no known spectrum .* pass scale and shift"):
        problem_operator(_Mystery(), 3)
    op = problem_operator(_Mystery(), 3, scale=0.2, shift=1.5)
    assert op.eigenvalues is None and op.scale == 0.2
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        problem_operator(_Mystery(), 3, scale=-1.0, shift=1.5)


# ------------------------------------------------------------------ checkpoints


def _fit_with_checkpoints(directory, steps=200, resume=False, batch_size=32, L=1):
    apply, params, op = _tiny(L=L)
    config = TrainingConfig(steps=steps, batch_size=batch_size, log_every=50, checkpoint_every=100,
                            learning_rate=1e-3, collapse=None)
    return fit(apply, params, op.op, op.sampler, config=config, progress=False,
               checkpoint_dir=directory, resume=resume)


def _damage(step_dir, how):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    if how == "truncated":
        for f in files:
            open(f, "r+b").truncate(5)
    elif how == "corrupted":
        for f in files:
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)
            open(f, "wb").write(bytes(data))
    elif how == "metadata-missing":
        os.remove(os.path.join(step_dir, "metadata", "metadata"))


# Reading damaged data leaves an "Event loop is closed" message from Orbax's I/O threads.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated", "corrupted", "metadata-missing", "empty-newer-folder"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, how):
    """Before: a damaged newest checkpoint made resume fail (JSONDecodeError, TensorStore, ZSTD
    errors) and never used the intact older one. Now it warns naming the step and the reason,
    moves the damaged folder aside, resumes from the older one, and ends bit-identical."""
    ck = str(tmp_path / "ck")
    reference = _fit_with_checkpoints(ck)
    if how == "empty-newer-folder":
        os.makedirs(os.path.join(ck, "300"))
        damaged, fallback = 300, 200
    else:
        _damage(os.path.join(ck, "200"), how)
        damaged, fallback = 200, 100
    with pytest.warns(RuntimeWarning, match=rf"resuming from checkpoint step {fallback} .* skipped damaged step {damaged} \(.+\), moved to {damaged}.damaged"):
        resumed = _fit_with_checkpoints(ck, resume=True)
    assert resumed.steps_run == 200 - fallback
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isdir(os.path.join(ck, f"{damaged}.damaged"))  # kept, not deleted


def test_a_new_run_into_a_checkpoint_folder_is_refused_before_training(tmp_path):
    """Before: the second run trained fully, then failed at its final save
    (StepAlreadyExistsError), leaving a folder mixed from both runs."""
    ck = str(tmp_path / "ck")
    _fit_with_checkpoints(ck, steps=100)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints of a run \(steps \[100\]\): pass resume=True"):
        _fit_with_checkpoints(ck, steps=100)


def test_resume_with_a_changed_configuration_is_refused_naming_the_fields(tmp_path):
    ck = str(tmp_path / "ck")
    _fit_with_checkpoints(ck, steps=100)
    with pytest.raises(ValueError, match=r"different configuration \(batch_size: saved 32, now 64, steps: saved 100, now 200\)"):
        _fit_with_checkpoints(ck, steps=200, batch_size=64, resume=True)
    # A different L changes the state's shapes: named, before Orbax sees it.
    with pytest.raises(CheckpointMismatchError, match=r"another shape: .*saved \(1,.*expected \(2,.*number of states L"):
        _fit_with_checkpoints(ck, steps=100, L=2, resume=True)


# ------------------------------------------------------------------ symlinks


def test_the_json_writer_never_follows_a_planted_symlink(tmp_path):
    """Before: write_json_atomic followed a `<file>.tmp` symlink planted in a received results
    folder and overwrote the file it pointed to, outside the folder."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "results.json.tmp")
    write_json_atomic(run / "results.json", {"a": 1})
    assert outside.read_text() == "precious"
    assert json.loads((run / "results.json").read_text()) == {"a": 1}
    # A symlink at the target path itself is replaced, not written through.
    os.symlink(outside, run / "history.json")
    write_json_atomic(run / "history.json", {"b": 2})
    assert outside.read_text() == "precious" and not os.path.islink(run / "history.json")


# ------------------------------------------------------------------ the command lines


HYDROGEN_TINY = ["--states", "1", "--steps", "400", "--batch", "32", "--hidden", "8", "--grid", "24",
                 "--log-every", "50", "--checkpoint-every", "100000", "--no-figures", "--quiet"]


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    return err


HYDROGEN_BAD = [
    ("--states", "0"), ("--states", "-2"), ("--states", "2.5"), ("--states", "100"),
    ("--steps", "-1"), ("--steps", "1e3"), ("--batch", "0"), ("--batch", "33"), ("--batch", "99999999"),
    ("--seed", "-1"), ("--seed", "99999999999"), ("--lr", "-3e-3"), ("--lr", "0"), ("--lr", "nan"),
    ("--lr", "inf"), ("--hidden", "0"), ("--hidden", "100000 100000"), ("--grid", "0"), ("--grid", "3"),
    ("--grid", "100000"), ("--log-every", "0"), ("--checkpoint-every", "-5"), ("--data-parallel", "0"),
]


@pytest.mark.parametrize("option, value", HYDROGEN_BAD)
def test_hydrogen_cli_rejects_each_bad_value_with_a_usage_error(option, value, capsys, tmp_path):
    # --steps 0 first (a later --steps overrides it): a value wrongly accepted fails fast.
    argv = ["--steps", "0", "--no-figures", "--quiet", "--out", str(tmp_path / "run"), option, *value.split()]
    err = _usage_error(hydrogen_benchmark.main, argv, capsys)
    assert err.startswith("usage:") or "error:" in err
    assert option in err or option.lstrip("-").replace("-", "_") in err or "grid" in err


HIGH_DIM_BAD = [
    ("--dim", "0"), ("--dim", "-1"), ("--dim", "10.5"), ("--dim", "100000"), ("--states", "0"),
    ("--states", "100000"), ("--steps", "-1"), ("--batch", "0"), ("--batch", "7"), ("--seed", "-1"),
    ("--lr", "-1"), ("--lr", "nan"), ("--eval-samples", "0"), ("--eval-samples", "100"),
    ("--eval-every", "-1"), ("--eval-every", "100"), ("--log-every", "0"), ("--grid-sizes", "1"),
    ("--grid-time-limit", "0"), ("--grid-memory-limit", "-1"),
]


@pytest.mark.parametrize("option, value", HIGH_DIM_BAD)
def test_high_dim_cli_rejects_each_bad_value_with_a_usage_error(option, value, capsys, tmp_path):
    argv = ["--steps", "0", "--no-figures", "--quiet", "--out", str(tmp_path / "run"), option, *value.split()]
    err = _usage_error(high_dim_benchmark.main, argv, capsys)
    assert option in err or "grid" in err


def test_cli_problem_and_dimension_mismatch_is_a_usage_error(capsys, tmp_path):
    """Before: a traceback."""
    err = _usage_error(high_dim_benchmark.main, ["--problem", "cosine", "--dim", "7", "--out", str(tmp_path)], capsys)
    assert "tabulated for d = 2, 5 and 10" in err
    err = _usage_error(high_dim_benchmark.main, ["--problem", "hydrogen3d", "--dim", "5", "--out", str(tmp_path)], capsys)
    assert "hydrogen3d is 3-dimensional" in err


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    """Before: running twice into one --out trained fully, then died at its final save; into a
    finished folder it silently replaced the old run."""
    out = str(tmp_path / "run")
    argv = HYDROGEN_TINY + ["--out", out, "--steps", "100"]
    assert hydrogen_benchmark.main(argv) == 0
    before = (tmp_path / "run" / "results.json").read_text()
    err = _usage_error(hydrogen_benchmark.main, argv, capsys)
    assert "already holds a run" in err and "--resume continues it, --overwrite replaces it" in err
    assert (tmp_path / "run" / "results.json").read_text() == before  # untouched
    # A changed option on --resume: refused by name, before anything is compiled.
    err = _usage_error(hydrogen_benchmark.main, argv + ["--resume", "--batch", "64"], capsys)
    assert "--batch: saved 32, now 64" in err
    err = _usage_error(hydrogen_benchmark.main, argv + ["--resume", "--states", "4"], capsys)
    assert "--states: saved 1, now 4" in err
    # --overwrite replaces the run (and keeps files that are not the run's).
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert hydrogen_benchmark.main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["overwrite"]


def test_a_run_folder_with_a_symlink_out_of_it_is_refused(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "seed0")
    err = _usage_error(hydrogen_benchmark.main, HYDROGEN_TINY + ["--out", str(run)], capsys)
    assert "holds symlinks pointing outside it" in err
    assert list(outside.iterdir()) == []


def _start(out, steps, extra=()):
    cmd = [sys.executable, "-m", "nestedlora_jax.hydrogen_benchmark", *HYDROGEN_TINY,
           "--steps", str(steps), "--out", str(out), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_history(out, min_step, proc, timeout=240):
    path = os.path.join(out, "seed0", "history.json")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        try:
            with open(path) as fh:
                if json.load(fh)["history"][-1]["step"] >= min_step:
                    return
        except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no progress")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_saves_a_checkpoint_and_resumes_bit_identically(tmp_path, sig, code):
    """Before: Ctrl-C saved nothing, losing every step since the last checkpoint (up to 5000
    by default). Now SIGINT / SIGTERM save the last completed step, exit with 130 / 143 and a
    message, and --resume finishes with the numbers of an uninterrupted run."""
    steps = 20000  # far more than the test lets it run
    out = tmp_path / "interrupted"
    proc = _start(out, steps)
    _wait_for_history(str(out), 100, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert f"training interrupted by {sig.name} at step" in stderr and "--resume" in stderr
    saved = [int(d) for d in os.listdir(out / "seed0" / "checkpoints") if d.isdigit()]
    assert saved and max(saved) >= 100  # no periodic checkpoint before step 100000: this is the interrupt's
    if sig is not signal.SIGINT:
        return
    # The saved state is exactly that of an uninterrupted run at the same step (and resuming a
    # checkpoint is bit-identical, see the fallback test): nothing was lost.
    step = max(saved)
    history = json.loads((out / "seed0" / "history.json").read_text())["history"]
    assert history[-1]["step"] == step
    from nestedlora_jax.solver import restore
    from nestedlora_jax.hooks import TrainingInterrupted

    interrupted = restore(out / "seed0")  # the folder alone
    assert int(interrupted.fit.state.step) == step
    config = interrupted.config.replace(training={"checkpoint_every": None})
    with pytest.raises(TrainingInterrupted) as info:
        solve(Hydrogen(2), 1, config=config, progress=False, hooks=[Callback(_StopAt(step))])
    assert info.value.step == step and info.value.checkpoint_dir is None
    for a, b in zip(jax.tree.leaves(interrupted.fit.state), jax.tree.leaves(info.value.result.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _StopAt:
    """Callback that interrupts an in-process run at ``step`` (as SIGINT would)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, step, state):
        if step >= self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return None


def test_a_command_stopped_by_a_bad_option_leaves_no_run_behind(tmp_path, capsys):
    """solve's own checks run after the folder gate: a command they stop has written only
    run_config.json and an empty seed folder, which is no work, so the corrected command runs
    without --overwrite (and a folder with work is still refused)."""
    out = tmp_path / "run"
    err = _usage_error(hydrogen_benchmark.main, HYDROGEN_TINY + ["--out", str(out), "--grid", "100000"], capsys)
    assert "grid_size=100000" in err and "too many to evaluate" in err
    assert (out / "run_config.json").exists() and list((out / "seed0").iterdir()) == []
    from nestedlora_jax.run_folder import prepare_run_folder, run_entries

    assert run_entries(str(out)) == []
    prepare_run_folder(str(out), {"states": 1}, resume=False, overwrite=False, result_keys=("states",))
    (out / "seed0" / "history.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        prepare_run_folder(str(out), {"states": 1}, resume=False, overwrite=False, result_keys=("states",))


def test_a_run_recorded_before_an_option_existed_resumes_with_its_old_value(tmp_path):
    """A folder written before --guard-functions existed has no such key: it resumes with 0,
    the value it was trained with, and any other value is refused."""
    from nestedlora_jax.run_folder import prepare_run_folder

    out = tmp_path / "run"
    keys, added = ("states", "guard_functions"), {"guard_functions": 0}
    prepare_run_folder(str(out), {"states": 4}, resume=False, overwrite=False, result_keys=("states",))
    prepare_run_folder(str(out), {"states": 4, "guard_functions": 0}, resume=True, overwrite=False,
                       result_keys=keys, added_options=added)
    with pytest.raises(ValueError, match="--guard-functions: saved 0, now 2"):
        prepare_run_folder(str(out), {"states": 4, "guard_functions": 2}, resume=True,
                           overwrite=False, result_keys=keys, added_options=added)
