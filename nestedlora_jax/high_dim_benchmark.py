"""High-dimensional eigenproblems with exact answers: the lowest L states in d = 3..50.

Run ``python benchmarks/high_dim.py --problem coupled-oscillator --dim 10 --states 32``;
``--help`` lists the options. Problems (every one with an exact spectrum and eigenfunctions):

* ``coupled-oscillator``: ``-Lap + x^T K x``, ``K = Q diag(w^2) Q^T`` with a random rotation
  and frequencies in [1, 2] (:class:`~nestedlora_jax.problems.CoupledOscillator`), any d;
* ``cosine``: the Han-Lu-Zhou periodic cosine potential, d = 2, 5, 10
  (learn ``L = 1 + 2d``: the ground state and the whole first cluster);
* ``box``: the Dirichlet box ``[0, 1]^d``;
* ``hydrogen3d``: ``-Lap - 1/r`` in 3-D (L = 14: n <= 3; L = 30: n <= 4).

Evaluation is Monte Carlo (the only option in high d) with jackknife standard errors on every
number; ``--grid-sizes`` runs the finite-difference grid solver on the same problem and states
(d <= 4 in practice) side by side, recording its time, peak memory and accuracy per grid size
and where it stops fitting.

Writes to ``--out``: ``results.json`` (configuration, per-seed metrics with standard errors,
mean +- std over seeds, the grid baseline, timings, environment), per-seed histories and
checkpoints (``--resume`` continues an interrupted run), and figures (``errors.png``: error per
state with error bars; ``convergence.png``: Monte Carlo error vs step; ``slice.png``: a 2-D
slice of learned vs exact eigenfunctions).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.evaluation import min_monte_carlo_samples
from nestedlora_jax.hydrogen_benchmark import (
    ADDED_OPTIONS,
    _environment,
    add_guard_functions_option,
    run_cli,
    seed_record,
    summarize,
    training_config,
)
from nestedlora_jax.problems import CosinePotential, CoupledOscillator, Hydrogen, InfiniteWell
from nestedlora_jax.run_folder import (
    RunFolderError,
    check_no_escaping_symlinks,
    check_training_args,
    non_negative_int,
    positive_float,
    positive_int,
    prepare_run_folder,
    seed_int,
    zero_means_none,
)
from nestedlora_jax.config import (
    METHODS,
    CollapseConfig,
    EvaluationConfig,
    NetworkConfig,
    SolveConfig,
)
from nestedlora_jax.solver import solve

PROBLEMS = ("coupled-oscillator", "cosine", "box", "hydrogen3d")

SUMMARY_KEYS = (
    "mean_rel_error",
    "max_rel_error",
    "subspace_distance_mean",
    "subspace_distance_total",
    "angle_distance_mean",
    "orthogonality_max",
)


def make_problem(name: str, dim: int):
    """The benchmark problem ``name`` in ``dim`` dimensions (ValueError if it has no such d)."""
    if name == "coupled-oscillator":
        return CoupledOscillator(dim=dim)
    if name == "cosine":
        return CosinePotential(dim=dim)
    if name == "box":
        return InfiniteWell(dim=dim)
    if name == "hydrogen3d":
        if dim != 3:
            raise ValueError(f"hydrogen3d is 3-dimensional; got --dim {dim}.")
        return Hydrogen(dim=3)
    raise ValueError(f"unknown problem {name!r}; expected one of {PROBLEMS}.")


def grid_radius(problem, L: int) -> float | None:
    """Half-width of the finite-difference box for problems on ``R^d`` (None on boxes): where
    the slowest of the ``L`` states has decayed far below the grid's own error
    (:meth:`~nestedlora_jax.problems.Problem.grid_radius`)."""
    return problem.grid_radius(L)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nestedlora-high-dim",
        description="Learn the lowest states of a high-dimensional problem with an exact "
                    "spectrum; Monte Carlo evaluation with standard errors; optional grid baseline.",
    )
    p.add_argument("--problem", choices=PROBLEMS, default="coupled-oscillator")
    p.add_argument("--dim", type=positive_int, default=10)
    p.add_argument("--states", type=positive_int, default=16, help="number of states L")
    add_guard_functions_option(p)
    p.add_argument("--method", choices=METHODS, default="neuralsvd-seq")
    p.add_argument("--steps", type=non_negative_int, default=20000)
    p.add_argument("--batch", type=positive_int, default=512)
    p.add_argument("--seed", type=seed_int, default=0, help="seed (ignored when --seeds is given)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None)
    p.add_argument("--lr", type=positive_float, default=3e-3, help="Adam learning rate (cosine-decayed to 1%%; the hydrogen benchmark's too: in d = 5, 3000 steps, 3e-3 reached 1.6e-3 where 1e-3 reached 1.9e-2)")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=None,
                   help="hidden widths of each parallel MLP (default 32 32 32)")
    p.add_argument("--eval-samples", type=positive_int, default=2**18,
                   help="Monte Carlo samples of the final evaluation (chunked)")
    p.add_argument("--eval-every", type=non_negative_int, default=2000,
                   help="periodic Monte Carlo evaluation (8192 fixed samples) every this many steps; 0: off")
    p.add_argument("--log-every", type=positive_int, default=500)
    p.add_argument("--checkpoint-every", type=positive_int, default=5000)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (refused if a result-shaping option changed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (without it, a folder holding a run is refused)")
    p.add_argument("--grid-sizes", type=positive_int, nargs="*", default=None,
                   help="also run the finite-difference grid solver with these points per axis")
    p.add_argument("--grid-only", action="store_true",
                   help="run only the grid baseline (--grid-sizes), written to grid_baseline.json")
    p.add_argument("--grid-time-limit", type=positive_float, default=600.0, help="seconds per grid size")
    p.add_argument("--grid-memory-limit", type=positive_float, default=20.0, help="GB per grid size")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="default results/high_dim/<problem>_d<dim>_L<states>")
    return p


# Options whose change would make a resumed run a different run.
RESULT_KEYS = ("problem", "dim", "states", "guard_functions", "method", "steps", "batch", "lr",
               "hidden", "moment_batch", "moment_sampling", "batch_sampling")


def check_args(args) -> None:
    """Combinations argparse cannot check (ValueError naming the option)."""
    if args.dim > 1000:
        raise ValueError(f"--dim {args.dim}: the problems here hold d x d matrices and d-dimensional "
                         "Hessians per point; use d <= 1000.")
    check_training_args(args, dim=args.dim)
    if args.grid_only and not args.grid_sizes:
        raise ValueError("--grid-only needs --grid-sizes N [N ...] (grid points per axis).")
    for n in args.grid_sizes or ():
        if n < 3:
            raise ValueError(f"--grid-sizes {n}: a finite-difference grid needs at least 3 points per axis.")
    if args.eval_every and args.eval_every < args.log_every:
        raise ValueError(f"--eval-every {args.eval_every} is below --log-every {args.log_every}: "
                         "evaluations happen on logging steps; use a multiple of --log-every, or 0 (off).")
    minimum = min_monte_carlo_samples(args.states)
    if args.eval_samples < minimum:
        raise ValueError(f"--eval-samples {args.eval_samples} is too few to evaluate {args.states} "
                         f"states with standard errors: use at least {minimum}.")


def solve_config(args, seed: int) -> SolveConfig:
    """The command line as a :class:`~nestedlora_jax.config.SolveConfig` (one seed)."""
    eval_every = args.eval_every - args.eval_every % args.log_every if args.eval_every else None
    return SolveConfig(
        method=args.method,
        network=NetworkConfig(hidden=tuple(args.hidden) if args.hidden else None),
        training=training_config(args, seed, CollapseConfig()),
        evaluation=EvaluationConfig(mode="mc", num_samples=args.eval_samples,
                                    every=eval_every or None),
        guard_functions=args.guard_functions,
    )


def resolve_defaults(args) -> None:
    """Fill, in place, what the command line leaves implicit: ``--moment-batch 0`` means the
    second moments from the batch halves, as its default (``None``) does; moment samples are
    drawn independently unless ``--moment-sampling lattice``."""
    args.moment_batch = zero_means_none(args.moment_batch)
    if args.moment_sampling is None:
        args.moment_sampling = "random"


def run(args) -> dict:
    resolve_defaults(args)
    check_args(args)
    problem = make_problem(args.problem, args.dim)
    problem.energies(args.states)  # fails now, before training, if L is out of range
    seeds = args.seeds if args.seeds else [args.seed]
    out_dir = args.out or os.path.join("results", "high_dim", f"{args.problem}_d{args.dim}_L{args.states}")
    if args.grid_only:
        # The grid baseline may share a training run's folder: it only guards its own file.
        os.makedirs(out_dir, exist_ok=True)
        check_no_escaping_symlinks(out_dir)
        if os.path.lexists(os.path.join(out_dir, "grid_baseline.json")) and not args.overwrite:
            raise RunFolderError(f"{out_dir}/grid_baseline.json exists: --overwrite replaces it, "
                                 "or choose another --out.")
    else:
        prepare_run_folder(out_dir, vars(args) | {"seeds": seeds, "out": out_dir}, resume=args.resume,
                           overwrite=getattr(args, "overwrite", False), result_keys=RESULT_KEYS,
                           added_options=ADDED_OPTIONS)
    if args.grid_only:
        grid = run_grid_baseline(problem, args)
        out = {"config": vars(args) | {"out": out_dir}, "problem": describe(problem),
               "exact_energies": problem.energies(args.states), "grid_baseline": grid,
               "environment": _environment()}
        write_json_atomic(os.path.join(out_dir, "grid_baseline.json"), out)
        print_grid(grid)
        return out
    per_seed, last = [], None
    for seed in seeds:
        seed_dir = os.path.join(out_dir, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        t0 = time.perf_counter()
        result = solve(problem, args.states, config=solve_config(args, seed), run_dir=seed_dir,
                       resume=args.resume, progress=not args.quiet)
        wall = time.perf_counter() - t0
        m = result.metrics
        print(result.table)
        print(f"seed {seed}: mean rel. error {m.mean_rel_error:.3e} +- {m.se('mean_rel_error'):.1e} "
              f"(standard error), max {m.max_rel_error:.3e}; wall {wall:.0f} s, "
              f"{result.fit.steps_run / max(result.fit.train_time, 1e-9):.1f} steps/s, "
              f"re-initialised {result.fit.reinitialized}")
        per_seed.append(seed_record(seed, result, wall))
        last = result
    summary = summarize(per_seed, SUMMARY_KEYS)
    out = {
        "config": vars(args) | {"seeds": seeds, "out": out_dir},
        "problem": describe(problem),
        "exact_energies": problem.energies(args.states),
        "per_seed": per_seed,
        "summary": summary,
        "environment": _environment(),
    }
    if args.grid_sizes:
        out["grid_baseline"] = run_grid_baseline(problem, args)
    write_json_atomic(os.path.join(out_dir, "results.json"), out)
    print_summary(args, summary, per_seed, out.get("grid_baseline"))
    if not args.no_figures and last is not None:
        make_figures(problem, last, out_dir, args.states)
    return out


def run_grid_baseline(problem, args) -> list[dict]:
    from nestedlora_jax.grid_baseline import grid_baseline_sweep

    return grid_baseline_sweep(
        problem, args.states, args.grid_sizes, radius=grid_radius(problem, args.states),
        time_limit_s=args.grid_time_limit, memory_limit_bytes=args.grid_memory_limit * 1e9,
    )


def print_summary(args, summary, per_seed, grid=None):
    print(f"\n{args.problem}, d = {args.dim}, {args.states} states, {args.method}, {args.steps} steps, "
          f"batch {args.batch}, seeds {[s['seed'] for s in per_seed]}")
    for k, v in summary.items():
        if v is not None:
            print(f"  {k:26s} {v['mean']:.3e} +- {v['std']:.1e} (over seeds)")
    print(f"  {'steps/s':26s} {np.mean([s['steps_per_s'] for s in per_seed]):.1f}")
    print(f"  {'wall time per seed (s)':26s} {np.mean([s['wall_time_s'] for s in per_seed]):.0f}")
    print_grid(grid)


def describe(problem) -> str:
    """The problem's one-line description (:meth:`~nestedlora_jax.problems.Problem.describe`)."""
    return problem.describe()


def print_grid(grid):
    for row in grid or []:
        if row.get("status") == "ok":
            print(f"  grid {row['num_points_per_axis']}^{row['dim']}: mean rel. error "
                  f"{row['mean_rel_error']:.2e}, {row['wall_time_s']:.1f} s, "
                  f"{row['peak_rss_bytes'] / 2**30:.2f} GiB")
        else:
            print(f"  grid {row.get('num_points_per_axis')}: {row.get('status')} ({row.get('reason', '')})")


def slice_plane(problem, L: int):
    """Centre and two orthonormal directions of the plotted 2-D slice, and its half-width
    (:meth:`~nestedlora_jax.problems.Problem.slice_plane`: the centre is offset along the other
    directions, so that states odd along them still show)."""
    return problem.slice_plane(L)


def make_figures(problem, result, out_dir, L, max_slice_states: int = 8):
    """``errors.png`` (per-state error +- standard error), ``convergence.png`` (periodic Monte
    Carlo error vs step) and ``slice.png`` (learned vs exact on a 2-D slice, the learned
    functions of each degenerate block aligned to the exact ones by least squares on the slice).
    Uses the current matplotlib backend."""
    import matplotlib.pyplot as plt

    from nestedlora_jax.evaluation import network_values

    m = result.metrics
    fig, ax = plt.subplots(figsize=(6.5, 3))
    states = np.arange(L)
    ax.errorbar(states, m.rel_error, yerr=m.standard_errors.get("rel_error"), fmt="o", ms=3, capsize=2,
                label="Rayleigh quotient (+- standard error)")
    ax.semilogy(states, m.rel_error_norm, "s", ms=3, mfc="none", label="norm")
    ax.set_yscale("log"), ax.set_xlabel("state"), ax.set_ylabel("relative energy error")
    ax.legend(fontsize=7), fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "errors.png"), dpi=110)
    plt.close(fig)

    hist = [h for h in result.fit.history if "mean_rel_error" in h]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3))
        steps = [h["step"] for h in hist]
        ax.semilogy(steps, [h["mean_rel_error"] for h in hist], "k-", label="mean")
        ax.semilogy(steps, [h["max_rel_error"] for h in hist], "r--", lw=0.8, label="max")
        ax.set_xlabel("step"), ax.set_ylabel("rel. energy error (8192-sample Monte Carlo)")
        ax.legend(fontsize=7), fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "convergence.png"), dpi=110)
        plt.close(fig)

    centre, u, v, R = slice_plane(problem, L)
    g = np.linspace(-R, R, 81)
    A, B = np.meshgrid(g, g, indexing="xy")
    pts = centre[None] + A.reshape(-1, 1) * u[None] + B.reshape(-1, 1) * v[None]
    f, _ = network_values(result.apply, result.fit.ema_params, result.operator.op, pts.astype(np.float32))
    with jax.enable_x64(True):
        x64 = jax.numpy.asarray(pts)
        psi = np.asarray(jax.vmap(lambda x: problem.eigenfunctions(x, L))(x64))
        learned = f * np.exp(0.5 * np.asarray(jax.vmap(result.operator.sampler.log_prob)(x64)))[:, None]
    aligned = np.empty_like(learned)
    for a, b in problem.degenerate_blocks(L):
        coef, *_ = np.linalg.lstsq(learned[:, a:b], psi[:, a:b], rcond=None)
        aligned[:, a:b] = learned[:, a:b] @ coef
    k = min(L, max_slice_states)
    fig, axes = plt.subplots(2, k, figsize=(1.7 * k, 3.6), squeeze=False)
    for i in range(k):
        vmax = np.abs(psi[:, i]).max() or 1.0
        for row, vals in enumerate((psi[:, i], aligned[:, i])):
            ax = axes[row, i]
            ax.imshow(vals.reshape(A.shape), origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                      extent=(-R, R, -R, R))
            ax.set_xticks([]), ax.set_yticks([])
        axes[0, i].set_title(f"E={m.exact[i]:.4g}", fontsize=6)
    axes[0, 0].set_ylabel("exact", fontsize=8)
    axes[1, 0].set_ylabel("learned", fontsize=8)
    fig.suptitle(f"{type(problem).__name__}, d = {problem.dim}: a 2-D slice, exact vs learned", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "slice.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
