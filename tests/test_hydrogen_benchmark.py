"""The hydrogen benchmark's code path, end to end at a tiny size: JSON and figures written."""

import json

import numpy as np

import pytest

from nestedlora_jax.hydrogen_benchmark import main


# The SpIN and OMM paths of the benchmark are slow tests (their objectives recover eigh in
# test_baselines and test_omm).
@pytest.mark.parametrize("method", ["neuralsvd-seq", pytest.param("spin", marks=pytest.mark.slow),
                                    pytest.param("omm-joint", marks=pytest.mark.slow)])
def test_benchmark_writes_results_and_figures(tmp_path, method):
    out = tmp_path / "h"
    figures = method == "neuralsvd-seq"
    args = ["--method", method, "--states", "4", "--steps", "200", "--batch", "64",
            "--hidden", "16", "16", "--grid", "60", "--log-every", "100",
            "--checkpoint-every", "100", "--quiet", "--seeds", "0", "1", "--out", str(out)]
    assert main(args + ([] if figures else ["--no-figures"])) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in results["per_seed"]] == [0, 1]
    m = results["per_seed"][0]["metrics"]
    assert len(m["exact"]) == len(m["rayleigh"]) == len(m["angle_distance"]) == 4
    assert results["summary"]["mean_rel_error"]["mean"] >= 0
    assert results["per_seed"][0]["steps_per_s"] > 0
    window = results["per_seed"][0]["metrics_paper_window"]
    assert set(window) == set(results["summary_paper_window"]) and window["mean_rel_error"] >= 0
    assert results["environment"]["jax"]
    history = json.loads((out / "seed0" / "history.json").read_text())
    assert history["history"][-1]["step"] == 200
    # The saved network is the evaluated one: reloading it reproduces the reported metrics.
    from nestedlora_jax.hydrogen_benchmark import load_run

    reloaded = load_run(out, seed=1)
    assert int(reloaded.fit.state.step) == 200
    saved = results["per_seed"][1]["metrics"]
    np.testing.assert_allclose(reloaded.metrics.rayleigh, saved["rayleigh"], rtol=1e-6)
    np.testing.assert_allclose(reloaded.metrics.subspace_distance_blocks,
                               saved["subspace_distance_blocks"], rtol=1e-5, atol=1e-12)
    if figures:
        for name in ("eigenfunctions", "errors", "gram", "convergence"):
            data = (out / f"{name}.png").read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_guard_functions_are_trained_and_only_the_asked_states_reported(tmp_path):
    out = tmp_path / "g"
    args = ["--states", "4", "--guard-functions", "1", "--steps", "100", "--batch", "64",
            "--hidden", "16", "16", "--grid", "60", "--log-every", "50", "--quiet", "--out", str(out)]
    assert main(args) == 0  # with figures: the convergence plot reads the first L of the log
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["guard_functions"] == 1
    assert len(results["per_seed"][0]["metrics"]["exact"]) == 4
    saved = json.loads((out / "seed0" / "solve_config.json").read_text())
    assert saved["L"] == 4 and saved["config"]["guard_functions"] == 1
    history = json.loads((out / "seed0" / "history.json").read_text())
    assert len(history["history"][-1]["energies"]) == 5  # the guard is trained
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_network_length_reaches_the_problem_and_a_resume_keeps_it(tmp_path):
    from nestedlora_jax.hydrogen_benchmark import load_run

    out = tmp_path / "a"
    args = ["--states", "1", "--steps", "20", "--batch", "32", "--hidden", "8", "--grid", "40",
            "--log-every", "10", "--no-figures", "--quiet", "--out", str(out)]
    assert main(args + ["--network-length", "10"]) == 0
    saved = json.loads((out / "seed0" / "solve_config.json").read_text())
    assert saved["problem"]["fields"]["network_length"] == 10.0
    # The folder rebuilds the scaled network: its evaluation is the run's.
    reported = json.loads((out / "results.json").read_text())["per_seed"][0]["metrics"]
    assert load_run(out).metrics.mean_rel_error == pytest.approx(reported["mean_rel_error"], rel=1e-5)
    with pytest.raises(SystemExit):  # resuming with raw coordinates would mix two runs
        main(args + ["--resume"])
    # A run recorded before the option existed reads as raw coordinates: resuming it with a
    # network length is refused.
    config = json.loads((out / "run_config.json").read_text())
    del config["network_length"]
    (out / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        main(args + ["--resume", "--network-length", "10"])


def test_default_batch_grows_with_the_number_of_states():
    from nestedlora_jax.hydrogen_benchmark import build_parser, default_batch

    assert build_parser().parse_args([]).batch is None  # resolved from --states in run()
    assert default_batch(9) == default_batch(16) == 256 and default_batch(17) == 512
    args = build_parser().parse_args(["--data-parallel"])
    assert args.data_parallel == -1  # all devices
    assert build_parser().parse_args(["--data-parallel", "2"]).data_parallel == 2


@pytest.mark.parametrize("argv, expected", [
    ([], (90000, 256, 512, None, "lattice")),  # the bare command: 16 states
    (["--states", "9"], (40000, 256, 512, None, "lattice")),
    (["--states", "10"], (90000, 256, 512, None, "lattice")),
    (["--states", "16"], (90000, 256, 512, None, "lattice")),
    (["--states", "16", "--moment-batch", "0"], (90000, 256, None, None, "random")),  # halves
    (["--states", "16", "--moment-sampling", "random"], (90000, 256, 512, None, "random")),
    (["--states", "16", "--method", "neuralef"], (90000, 256, None, None, "random")),
    (["--states", "17"], (100000, 512, 2048, 10.0, "lattice")),
    (["--states", "25"], (100000, 512, 2048, 10.0, "lattice")),
    (["--states", "26"], (300000, 512, 2048, 10.0, "lattice")),
    (["--states", "36"], (300000, 512, 2048, 10.0, "lattice")),
    (["--states", "36", "--method", "neuralef"], (300000, 512, None, 10.0, "random")),  # no moment samples
    (["--states", "36", "--moment-batch", "0", "--network-length", "0"], (300000, 512, None, None, "random")),
    (["--states", "36", "--moment-batch", "512", "--network-length", "4", "--batch", "256",
      "--steps", "500", "--moment-sampling", "lattice"], (500, 256, 512, 4.0, "lattice")),
    (["--states", "9", "--moment-batch", "1024", "--network-length", "10", "--steps", "0"],
     (0, 256, 1024, 10.0, "lattice")),
])
def test_defaults_resolved_from_the_number_of_states(argv, expected):
    """The bare command is 16 states; up to 9 it trains shorter; up to 16 its second moments
    come from 512 lattice moment samples; beyond 16 on a larger batch with 2048 lattice moment
    samples and the scaled input, beyond 25 (the n = 5 level) longer; without moment samples
    (a method that takes none, or 0) nothing is drawn on a lattice; an explicit value, 0
    meaning none for the moment batch and the length, overrides any of them."""
    from nestedlora_jax.hydrogen_benchmark import benchmark_problem, build_parser, resolve_defaults

    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    assert (args.steps, args.batch, args.moment_batch, args.network_length,
            args.moment_sampling) == expected
    assert benchmark_problem(args).network_length == expected[3]


def test_the_collapse_options_reach_the_configuration(capsys):
    """``--collapse-reference``, ``--reinit-candidates``, ``--reinit-readout`` and
    ``--collapse-growth`` set the run's CollapseConfig (defaults: the plain quotient, one draw,
    its readout, no function spared); a non-positive count and an unknown readout are usage
    errors."""
    from nestedlora_jax.hydrogen_benchmark import build_parser, resolve_defaults, solve_config

    def collapse(argv):
        args = build_parser().parse_args(argv)
        resolve_defaults(args)
        return solve_config(args, 0).training.collapse

    default = collapse([])
    assert (default.reference, default.candidates, default.readout, default.growth) == (
        "rayleigh", 1, "drawn", None)
    chosen = collapse(["--collapse-reference", "residual", "--reinit-candidates", "16",
                       "--reinit-readout", "rayleigh-ritz", "--collapse-growth", "0.25"])
    assert (chosen.reference, chosen.candidates, chosen.readout, chosen.growth) == (
        "residual", 16, "rayleigh-ritz", 0.25)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--reinit-candidates", "0"])
    assert "--reinit-candidates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--reinit-readout", "ritz"])
    assert "--reinit-readout" in capsys.readouterr().err


def test_the_moment_sampling_option_reaches_the_configuration(capsys):
    """``--moment-sampling`` sets TrainingConfig.moment_sampling (default with moment samples:
    lattice; ``random`` chooses independent draws); without moment samples (``--moment-batch
    0``) ``lattice`` is refused by name."""
    from nestedlora_jax.hydrogen_benchmark import build_parser, check_args, resolve_defaults, solve_config

    def training(argv):
        args = build_parser().parse_args(argv)
        resolve_defaults(args)
        check_args(args)
        return solve_config(args, 0).training

    default = training(["--states", "36"])
    assert (default.moment_sampling, default.moment_batch_size) == ("lattice", 2048)
    random = training(["--states", "36", "--moment-sampling", "random"])
    assert (random.moment_sampling, random.moment_batch_size) == ("random", 2048)
    for argv in (["--states", "16", "--moment-batch", "0"], ["--states", "36", "--moment-batch", "0"]):
        with pytest.raises(ValueError, match="--moment-sampling lattice draws the moment samples"):
            training(argv + ["--moment-sampling", "lattice"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--moment-sampling", "sobol"])
    assert "--moment-sampling" in capsys.readouterr().err
    assert training(["--states", "16"]).batch_sampling == "random"
    assert training(["--states", "36", "--batch-sampling", "lattice"]).batch_sampling == "lattice"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--batch-sampling", "sobol"])
    assert "--batch-sampling" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--moment-batch", "--network-length"])
def test_negative_moment_batch_or_length_is_refused(option, capsys):
    from nestedlora_jax.hydrogen_benchmark import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([option, "-1"])
    assert option in capsys.readouterr().err


def test_paper_window_grid_integrates_the_box():
    import jax
    import jax.numpy as jnp

    from nestedlora_jax.hydrogen_benchmark import PAPER_WINDOW, paper_window_grid
    from nestedlora_jax.problems import Hydrogen

    pts, w = paper_window_grid(300)
    assert np.abs(pts).max() <= PAPER_WINDOW and w.sum() == pytest.approx((2 * PAPER_WINDOW) ** 2, rel=1e-12)
    # The n <= 1 states lie inside the box (tail below 1e-10 beyond r = 49): orthonormal on it.
    with jax.enable_x64(True):
        psi = np.asarray(jax.vmap(lambda x: Hydrogen(2).eigenfunctions(x, 4))(jnp.asarray(pts)))
    np.testing.assert_allclose(psi.T @ (w[:, None] * psi), np.eye(4), rtol=0, atol=1e-6)


def test_states_beyond_the_old_cap_are_accepted():
    from nestedlora_jax.hydrogen_benchmark import build_parser, check_args

    args = build_parser().parse_args(["--states", "36"])
    args.batch = 512
    check_args(args)  # 36 states (n <= 5): no cap; the grid covers them (test_problems)


@pytest.mark.slow
def test_the_bare_command_learns_16_states_to_the_readme_accuracy(tmp_path):
    """The README's main job, as run by the quick start (about 7.5 minutes on a 2-core CPU):
    16 states, seed 0, mean relative error <= 1e-4 on the whole plane and every state
    <= 1e-3 (measured: 6.0e-5, the worst state 2.1e-4)."""
    out = tmp_path / "bare"
    assert main(["--quiet", "--no-figures", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["states"] == 16
    m = results["per_seed"][0]["metrics"]
    assert len(m["exact"]) == 16 and results["per_seed"][0]["bad_steps"] == 0
    assert results["config"]["moment_sampling"] == "lattice"
    assert m["mean_rel_error"] <= 1e-4
    assert m["max_rel_error"] <= 1e-3
