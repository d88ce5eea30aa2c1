"""Where the learned n = 5 functions of a 36-state hydrogen run put the part of their norm
that is not n = 5: earlier levels, the next bound levels n = 6 and 7, or the rest (n >= 8 and
the continuum)? (README, 36 states.)

python hydrogen36_leakage.py RUN_FOLDER [SEED]: a 36-state benchmark folder. On the polar
quadrature grid that covers the first 64 states (n <= 7; 200 nodes per axis), the EMA
functions are expanded in the exact states with n <= 7 (:func:`nestedlora_jax.level_weights`).
Per learned n = 5 function: the share of its norm in n <= 4, n = 5, n = 6, n = 7 and the rest;
for the 11 together, the block subspace distance of the evaluation (the mean ``1 - cos^2`` of
the principal angles between their span and the exact n = 5 eigenspace).
"""
import sys

import nestedlora_jax as nl
from nestedlora_jax.hydrogen_benchmark import load_run

run = load_run(sys.argv[1], seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
problem = nl.Hydrogen(dim=2)
K = 64  # n = 0..7
x, w = nl.quadrature_grid(problem, K, 200)
shares = nl.level_weights(run.apply, run.fit.ema_params, problem, run.operator, K, points=x, weights=w)
print("function  n<=4     n=5     n=6      n=7      rest")
for i in range(25, 36):
    s = shares[i]
    print(f"{i:8d}  {s[:5].sum():.1e}  {s[5]:.4f}  {s[6]:.1e}  {s[7]:.1e}  {s[8]:.1e}")
print(f"n = 5 block subspace distance {run.metrics.subspace_distance_blocks[5]:.2e}")
