"""Training speed of every method on the hydrogen benchmark's configuration, in one process.

Each method trains ``--steps`` steps with the benchmark's defaults (16 states, batch 512,
its networks, sampler and scaling); steps/s is measured on the second half of the steps, so
compilation is left out. Run it with nothing else on the machine: the figures are only
comparable within one run. Writes ``--out`` (JSON).

    python3 benchmarks/hydrogen_speed.py --steps 2000
"""

from __future__ import annotations

import argparse
import platform
import sys

import jax

from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.config import METHODS
from nestedlora_jax.hydrogen_benchmark import build_parser, solve_config
from nestedlora_jax.problems import Hydrogen
from nestedlora_jax.solver import solve


def measure(method: str, states: int, steps: int, batch: int) -> dict:
    half = steps // 2
    args = build_parser().parse_args(
        ["--method", method, "--states", str(states), "--steps", str(steps), "--batch", str(batch),
         "--log-every", str(half), "--checkpoint-every", str(steps), "--grid", "40"])
    config = solve_config(args, 0).replace(training={"checkpoint_every": None})
    result = solve(Hydrogen(dim=2), states, config=config, progress=False)
    times = {e["step"]: e["time"] for e in result.fit.history}
    rate = half / (times[steps] - times[half])
    return {"method": method, "states": states, "batch": batch, "steps_timed": half,
            "steps_per_s": rate, "first_half_s": times[half]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default="benchmarks/results/hydrogen_speed.json")
    args = p.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be an even number >= 2 (the second half is timed)")
    rows = []
    for batch in args.batch:
        for method in args.methods:
            row = measure(method, args.states, args.steps, batch)
            print(f"{method:22s} batch {batch:4d}: {row['steps_per_s']:7.1f} steps/s", flush=True)
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
