"""Evaluate a stopped 2-D hydrogen SpIN run's newest checkpoint twice, on the benchmark's
whole-plane grid: with the EMA of the parameters (what ``benchmarks/hydrogen.py`` reports) and
with the live parameters (the ones SpIN's Sigma average and its Cholesky factor were tracked
on). Numbers recorded in ``hydrogen16_spin_b512_stopped.json``; the run folders are not in the
repository.

    python3 benchmarks/results/spin_checkpoint_ema_vs_live.py RUN/seed0 OUT.json
"""
import json
import sys

import numpy as np

from nestedlora_jax.solver import evaluate_result, problem_from_record, read_run_record, restore

KEYS = ("mean_rel_error", "max_rel_error", "subspace_distance_mean", "orthogonality_max")


def main(run_dir: str, out_path: str) -> None:
    run = restore(run_dir)  # evaluates the EMA parameters, as the benchmark did
    print("step", int(run.fit.state.step))
    problem = problem_from_record(read_run_record(run_dir)["problem"])
    live = evaluate_result(problem, run.operator, run.apply, run.fit, run.objective,
                           len(run.metrics.exact), run.config.evaluation, params=run.fit.params)
    out = {}
    for name, evaluation in (("ema", run.metrics), ("live", live)):
        metrics = evaluation.to_dict()
        row = {k: metrics[k] for k in KEYS}
        # NaN where the Rayleigh-Ritz step dropped directions of a nearly singular Gram matrix.
        ritz = float(np.mean(metrics["ritz_rel_error"]))
        row["mean_ritz_rel_error"] = ritz if np.isfinite(ritz) else None
        row["ritz_subspace_distance_mean"] = metrics["ritz_subspace_distance_mean"]
        out[name] = row
        print(name, row, flush=True)
    with open(out_path, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
