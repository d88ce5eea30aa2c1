"""The SVD side's exact checks, measured: the Gaussian CDK (Mehler) learned by two networks, and
finite operators recovered by free parameter tables.

Cases (``--cases``, default all):

- ``gauss1d``: (X, Y) standard normal with correlation 0.8, L = 5, both nestings: singular values
  0.8^k, Hermite singular functions;
- ``gauss3x2``: X in R^3, Y in R^2 (randomly mixed), canonical correlations (0.9, 0.6), L = 6:
  singular values 0.9^a 0.6^b;
- ``discrete``: a 7 x 5 joint distribution (singular values of P / sqrt(p_x p_y^T), top one
  dropped) and an 8 x 6 non-symmetric matrix (numpy.linalg.svd), float64, plain gradient descent
  on free tables, both nestings.

The Gaussian cases are evaluated with a Gauss-Hermite rule for p(x, y) (no sampling noise):
Rayleigh-Ritz singular values of the learned features, their relative errors, each family's
angle distance to the exact functions (per function, in nesting order) and subspace distances.
Prints a table and writes ``cdk_gaussian.json`` to ``--out``; times are wall-clock seconds of
training (compilation included) on whatever ran it, recorded with the machine's load average.

    python benchmarks/cdk_gaussian.py [--steps 30000] [--batch 4096] [--seeds 0] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nestedlora_jax.config import TrainingConfig
from nestedlora_jax.dependence import (
    GaussianPairs,
    dependence_kernel_operator,
    discrete_dependence_operator,
    discrete_dependence_singular_values,
    pair_metrics,
)
from nestedlora_jax.networks import eigenfunction_network, to_apply
from nestedlora_jax.objectives import nested_lora_objective
from nestedlora_jax.operators import matrix_operator
from nestedlora_jax.run_folder import positive_int
from nestedlora_jax.training import fit, make_loss_fn

CASES = ("gauss1d", "gauss3x2", "discrete")


def learn_gaussian(prob, L, nesting, steps, batch, seed, num):
    dx, dy = prob.dim
    af, pf = to_apply(eigenfunction_network(dx, L, architecture="shared", activation=jax.nn.silu,
                                            rngs=nnx.Rngs(params=2 * seed)))
    ag, pg = to_apply(eigenfunction_network(dy, L, architecture="shared", activation=jax.nn.silu,
                                            rngs=nnx.Rngs(params=2 * seed + 1)))
    t0 = time.perf_counter()
    result = fit((af, ag), (pf, pg), dependence_kernel_operator(), prob,
                 config=TrainingConfig(steps=steps, batch_size=batch, learning_rate=3e-3, seed=seed),
                 objective=nested_lora_objective(nesting), progress=False)
    train_s = time.perf_counter() - t0
    ef, eg = result.ema_params
    xs, ys, w = prob.quadrature(num)
    m = pair_metrics(jax.jit(jax.vmap(lambda a: af(ef, a))), jax.jit(jax.vmap(lambda b: ag(eg, b))),
                     xs, ys, weights=w, exact=prob.singular_values(L),
                     phi=prob.left_functions(xs, L), psi=prob.right_functions(ys, L),
                     blocks=prob.degenerate_blocks(L))
    row = {k: np.asarray(v).tolist() for k, v in m.items()}
    row.update(exact=prob.singular_values(L).tolist(), train_s=round(train_s, 1),
               bad_steps=int(result.bad_steps), quadrature_nodes=int(len(w)))
    return row


def _table(params, i):
    return params[i[0].astype(jnp.int32)]


def recover_tables(op, shapes, L, nesting, steps, lr):
    with jax.enable_x64(True):
        loss_fn = make_loss_fn((_table, _table), op, nested_lora_objective(nesting))
        key = jax.random.PRNGKey(0)
        tables = tuple(0.1 * jax.random.normal(jax.random.fold_in(key, i), (n, L))
                       for i, n in enumerate(shapes))

        def step(_, p):
            g = jax.grad(lambda p: loss_fn(p, (), None)[0])(p)
            return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

        F, G = jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, p))(tables)
        return np.asarray(F), np.asarray(G)


def run_discrete():
    rows = []
    rng = np.random.default_rng(3)
    nx, ny = 7, 5
    px, py = rng.dirichlet(np.full(nx, 5.0)), rng.dirichlet(np.full(ny, 5.0))
    a = np.linalg.qr(np.sqrt(px)[:, None] * np.c_[np.ones(nx), rng.normal(size=(nx, 3))])[0][:, 1:]
    b = np.linalg.qr(np.sqrt(py)[:, None] * np.c_[np.ones(ny), rng.normal(size=(ny, 3))])[0][:, 1:]
    a, b = a / np.sqrt(px)[:, None], b / np.sqrt(py)[:, None]
    s = np.array([0.5, 0.3, 0.15])
    P = np.outer(px, py) * (1 + 0.9 / np.max(np.abs((a * s) @ b.T)) * (a * s) @ b.T)
    exact = discrete_dependence_singular_values(P)[:3]
    A = (np.linalg.qr(rng.normal(size=(8, 8)))[0][:, :6] * np.array([3.0, 2.0, 1.2, 0.5, 0.2, 0.1])
         @ np.linalg.qr(rng.normal(size=(6, 6)))[0].T)
    for nesting in ("sequential", "joint"):
        F, G = recover_tables(discrete_dependence_operator(P), (nx, ny), 3, nesting, 8000, 3.0)
        learned = np.sqrt((P.sum(1) @ F**2) * (P.sum(0) @ G**2))
        rows.append({"case": "discrete joint 7x5", "nesting": nesting, "exact": exact.tolist(),
                     "learned": learned.tolist(),
                     "max_rel_error": float(np.max(np.abs(learned - exact) / exact))})
        F, G = recover_tables(matrix_operator(A), (8, 6), 4, nesting, 4000, 0.1)
        sv = np.linalg.svd(A, compute_uv=False)[:4]
        learned = np.sqrt(np.sum(F**2, 0) * np.sum(G**2, 0))
        rows.append({"case": "matrix 8x6", "nesting": nesting, "exact": sv.tolist(),
                     "learned": learned.tolist(),
                     "max_rel_error": float(np.max(np.abs(learned - sv) / sv))})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--steps", type=positive_int, default=30000)
    p.add_argument("--batch", type=positive_int, default=4096)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]},
           "steps": args.steps, "batch": args.batch, "runs": []}
    if "discrete" in args.cases:
        for row in run_discrete():
            out["runs"].append(row)
            print(f"{row['case']:20s} {row['nesting']:10s} max rel. error {row['max_rel_error']:.1e}")
    jobs = []
    if "gauss1d" in args.cases:
        jobs += [("gauss1d", GaussianPairs((0.8,)), 5, n, 60) for n in ("sequential", "joint")]
    if "gauss3x2" in args.cases:
        prob = GaussianPairs((0.9, 0.6), dx=3, dy=2, mix=True)
        jobs += [("gauss3x2", prob, 6, n, 10) for n in ("sequential", "joint")]
    for name, prob, L, nesting, num in jobs:
        for seed in args.seeds:
            row = learn_gaussian(prob, L, nesting, args.steps, args.batch, seed, num)
            row.update(case=name, nesting=nesting, seed=seed, L=L, load_average=os.getloadavg())
            out["runs"].append(row)
            print(f"{name:9s} {nesting:10s} seed {seed}: rel. errors "
                  f"{np.array2string(np.asarray(row['rel_error']), precision=1)}, max angle dist. "
                  f"f {max(row['angle_distance_left']):.1e} g {max(row['angle_distance_right']):.1e}, "
                  f"{row['train_s']:.0f} s")
            with open(os.path.join(args.out, "cdk_gaussian.json"), "w") as fh:
                json.dump(out, fh, indent=1)  # after every run: nothing lost if interrupted
    with open(os.path.join(args.out, "cdk_gaussian.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
