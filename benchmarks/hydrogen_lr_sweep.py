"""The same short learning-rate sweep for every method of the hydrogen table.

Each (method, learning rate) pair runs the hydrogen benchmark (``benchmarks/hydrogen.py``)
with the table's networks, sampler, scaling, batch (512) and whole-plane evaluation, on a
smaller, shorter proxy of its runs: by default 9 states and 20 000 steps, cosine-decayed from
the rate (the table's runs are 16 states and 100k steps, too long to sweep on a CPU). The
pick per method is the rate with the lowest mean relative eigenvalue error. A short schedule
favours large rates, so a method whose pick is the smallest rate swept would want a smaller
one still. Rows are written to ``--out`` as they finish, and a re-run skips the rows already
there (``--overwrite`` starts over).

    python3 benchmarks/hydrogen_lr_sweep.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax

from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.config import METHODS
from nestedlora_jax.hydrogen_benchmark import build_parser, run
from nestedlora_jax.run_folder import positive_float, positive_int

TABLE_METHODS = ("neuralsvd-seq", "neuralsvd-joint", "neuralef", "omm-seq", "spin")
RATES = (3e-3, 1e-3, 3e-4, 1e-4)
KEYS = ("mean_rel_error", "max_rel_error", "subspace_distance_mean", "angle_distance_mean",
        "orthogonality_max")


def sweep_row(method: str, lr: float, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        argv = ["--method", method, "--states", str(args.states), "--steps", str(args.steps),
                "--batch", str(args.batch), "--lr", repr(lr), "--seed", str(args.seed),
                "--log-every", str(max(args.steps // 4, 1)), "--grid", str(args.grid),
                "--no-figures", "--quiet",
                "--out", folder]
        out = run(build_parser().parse_args(argv))
    seed = out["per_seed"][0]
    return {"method": method, "lr": lr, **{k: seed["metrics"][k] for k in KEYS},
            "rel_error": seed["metrics"]["rel_error"],
            "reinitialized": seed["reinitialized"], "bad_steps": seed["bad_steps"],
            "train_time_s": seed["train_time_s"]}


def best_rates(rows) -> dict:
    best = {}
    for row in rows:
        if row["method"] not in best or row["mean_rel_error"] < best[row["method"]]["mean_rel_error"]:
            best[row["method"]] = row
    return {m: r["lr"] for m, r in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(TABLE_METHODS))
    p.add_argument("--rates", nargs="+", type=positive_float, default=list(RATES))
    p.add_argument("--states", type=positive_int, default=9)
    p.add_argument("--batch", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=positive_int, default=300, help="quadrature nodes per polar axis")
    p.add_argument("--out", default="benchmarks/results/hydrogen_lr_sweep.json")
    p.add_argument("--overwrite", action="store_true", help="discard the rows already in --out")
    args = p.parse_args(argv)
    setting = {"states": args.states, "batch": args.batch, "steps": args.steps, "seed": args.seed,
               "grid": args.grid}
    rows = []
    if os.path.exists(args.out) and not args.overwrite:
        with open(args.out) as fh:
            done = json.load(fh)
        if done["setting"] != setting:
            p.error(f"{args.out} holds a sweep with {done['setting']}, not {setting}: pass "
                    "--overwrite or another --out.")
        rows = done["rows"]
    for method in args.methods:
        for lr in args.rates:
            if any(r["method"] == method and r["lr"] == lr for r in rows):
                continue
            row = sweep_row(method, lr, args)
            rows.append(row)
            print(f"{method:16s} lr {lr:.0e}: mean rel. error {row['mean_rel_error']:.2e}, "
                  f"subspace {row['subspace_distance_mean']:.2e}", flush=True)
            write_json_atomic(args.out, {
                "note": ("2-D hydrogen, the table's networks, sampler, scaling and evaluation "
                         "(whole plane, polar quadrature grid) on a short cosine schedule; one seed"),
                "setting": setting, "rows": rows, "best_rate": best_rates(rows),
                "jax": jax.__version__})
    print("best rate per method:", best_rates(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
