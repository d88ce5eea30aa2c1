"""Training speed of every method on the hydrogen benchmark's configuration, in one process.

Each method trains ``--steps`` steps with the benchmark's defaults (16 states, batch 512,
its networks, sampler and scaling); steps/s is measured on the second half of the steps, so
compilation is left out. Run it with nothing else on the machine: the figures are only
comparable within one run. ``--moment-batch 0 2048`` also times the NestedLoRA methods with
2048 moment samples per step (0: without). Writes ``--out`` (JSON).

    python3 benchmarks/hydrogen_speed.py --steps 2000
    python3 benchmarks/hydrogen_speed.py --methods neuralsvd-seq --states 36 --moment-batch 0 1024 2048
"""

from __future__ import annotations

import argparse
import platform
import sys

import jax

from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.config import METHODS
from nestedlora_jax.hydrogen_benchmark import (build_parser, benchmark_problem, resolve_defaults,
                                               solve_config)
from nestedlora_jax.solver import make_objective, solve


def measure(method: str, states: int, steps: int, batch: int, moment_batch: int = 0) -> dict:
    """``moment_batch``: moment samples per step, 0 for none (the batch halves)."""
    half = steps // 2
    args = build_parser().parse_args(
        ["--method", method, "--states", str(states), "--steps", str(steps), "--batch", str(batch),
         "--log-every", str(half), "--checkpoint-every", str(steps), "--grid", "40",
         "--moment-batch", str(moment_batch)])
    resolve_defaults(args)
    config = solve_config(args, 0).replace(training={"checkpoint_every": None})
    result = solve(benchmark_problem(args), states, config=config, progress=False)
    times = {e["step"]: e["time"] for e in result.fit.history}
    rate = half / (times[steps] - times[half])
    return {"method": method, "states": states, "batch": batch, "moment_batch": args.moment_batch,
            "network_length": args.network_length, "steps_timed": half,
            "steps_per_s": rate, "first_half_s": times[half]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--moment-batch", type=int, nargs="+", default=None,
                   help="also time NestedLoRA methods with these many moment samples per step "
                        "(0: without), e.g. 0 1024 2048; methods that take none are timed once")
    p.add_argument("--out", default="benchmarks/results/hydrogen_speed.json")
    args = p.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be an even number >= 2 (the second half is timed)")
    if args.moment_batch is not None and min(args.moment_batch) < 0:
        p.error("--moment-batch values must be >= 0 (0: without moment samples)")
    rows = []
    for batch in args.batch:
        for method in args.methods:
            takes = make_objective(method).takes_moment_samples
            for m in (args.moment_batch or [0]) if takes else [0]:
                row = measure(method, args.states, args.steps, batch, m)
                print(f"{method:22s} batch {batch:4d}, moment samples {m:5d}: "
                      f"{row['steps_per_s']:7.1f} steps/s", flush=True)
                rows.append(row)
    write_json_atomic(args.out, {
        "note": "steps/s after compilation, one process, nothing else running",
        "rows": rows,
        "environment": {"jax": jax.__version__, "device": str(jax.devices()[0]),
                        "python": sys.version.split()[0], "machine": platform.machine()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
