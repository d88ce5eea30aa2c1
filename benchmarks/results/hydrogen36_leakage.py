"""Where the learned n = 5 functions of a 36-state hydrogen run put the part of their norm
that is not n = 5: earlier levels, the next bound levels n = 6 and 7, or the rest (n >= 8 and
the continuum)? (README, 36 states.)

python hydrogen36_leakage.py RUN_FOLDER [SEED]: a 36-state benchmark folder. On the polar
quadrature grid that covers the first 64 states (n <= 7; 200 nodes per axis), the EMA
functions in the L2(dx) representation (``sqrt(p) f``) are expanded in the exact states with
n <= 7. Per learned n = 5 function: the share of its norm in n <= 4, n = 5, n = 6, n = 7 and
the rest; for the 11 together, the mean of ``1 - cos^2`` of the principal angles between
their span and the exact n = 5 eigenspace (the block subspace distance of the evaluation).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax.hydrogen_benchmark import load_run
from nestedlora_jax.problems import Hydrogen

run = load_run(sys.argv[1], seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
problem = Hydrogen(dim=2)
LEVELS = 8  # n = 0..7
K = LEVELS**2
level = np.repeat(np.arange(LEVELS), [2 * n + 1 for n in range(LEVELS)])
x, w = problem.quadrature_grid(K, num=200)
values = jax.jit(jax.vmap(lambda p: run.apply(run.fit.ema_params, p)))
f = np.concatenate([np.asarray(values(jnp.asarray(x[i:i + 8192], jnp.float32)), np.float64)
                    for i in range(0, len(x), 8192)])
with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    half_log_p = 0.5 * np.asarray(jax.vmap(run.operator.sampler.log_prob)(x64), np.float64)
    psi = np.asarray(jax.vmap(lambda p: problem.eigenfunctions(p, K))(x64), np.float64)
u = f * np.exp(half_log_p)[:, None]
finite = np.all(np.isfinite(u), axis=1)  # a node on the nucleus is left out, as in evaluation
u, psi, w = u[finite], psi[finite], w[finite]
print(f"grid: {len(w)} nodes; exact states orthonormal to "
      f"{np.abs(psi.T @ (w[:, None] * psi) - np.eye(K)).max():.1e}")
coefficients = psi.T @ (w[:, None] * u)  # (K, 36)
norms = np.einsum("n,ni,ni->i", w, u, u)
print("function  n<=4     n=5     n=6      n=7      rest")
for i in range(25, 36):
    share = [np.sum(coefficients[level == n, i] ** 2) / norms[i] for n in range(LEVELS)]
    print(f"{i:8d}  {sum(share[:5]):.1e}  {share[5]:.4f}  {share[6]:.1e}  {share[7]:.1e}  "
          f"{1 - sum(share):.1e}")
span, _ = np.linalg.qr(np.sqrt(w)[:, None] * u[:, 25:36])
cosines = np.linalg.svd((np.sqrt(w)[:, None] * psi[:, level == 5]).T @ span, compute_uv=False)
print(f"n = 5 block: mean 1 - cos^2 {np.mean(1 - cosines**2):.2e}, smallest cos^2 {np.min(cosines**2):.3f}")
