"""Where does a freshly initialised function start, relative to the 25 learned n <= 4 functions
of a 36-state hydrogen run and to the exact n = 5 eigenspace? (the record hydrogen36.json,
"fresh_functions").

python hydrogen36_fresh_function.py RUN_FOLDER: a 36-state benchmark folder (seed 0, raw
coordinates). On 65 536 samples of the run's sampler, for the 36 functions of a fresh network
(seed 12345): their share of norm in the exact n <= 4 span and in the n = 5 eigenspace, their
Rayleigh quotient, and the residual form <g, (T - sum_{j<25} f_j f_j^T) g> / ||g||^2 that the
nested objective offers a function placed after the 25 learned ones (in operator units, where
the top eigenvalue is 1).
"""
import sys, numpy as np, jax, jax.numpy as jnp
from nestedlora_jax.hydrogen_benchmark import load_run
from nestedlora_jax.evaluation import network_values
from nestedlora_jax.solver import default_network
from nestedlora_jax.networks import to_apply
from nestedlora_jax.config import NetworkConfig
from nestedlora_jax.problems import Hydrogen
r = load_run(sys.argv[1], seed=0)
op = r.operator; pb = Hydrogen(dim=2)
x = np.asarray(op.sampler.sample(jax.random.PRNGKey(5), 1 << 16))
f, Tf = network_values(r.apply, r.fit.ema_params, op.op, x.astype(np.float32), chunk=512)
f, Tf = np.asarray(f, np.float64), np.asarray(Tf, np.float64)
n = len(x)
fresh_apply, fresh_params = to_apply(default_network(pb, 36, NetworkConfig(hidden=(32, 32, 32)), seed=12345))
g, Tg = network_values(fresh_apply, fresh_params, op.op, x.astype(np.float32), chunk=512)
g, Tg = np.asarray(g, np.float64), np.asarray(Tg, np.float64)
psi = np.asarray(jax.vmap(lambda p: pb.eigenfunctions(p, 36))(jnp.asarray(x)), np.float64)
phi = psi * np.exp(-0.5 * np.asarray(jax.vmap(op.sampler.log_prob)(jnp.asarray(x)), np.float64))[:, None]
F = f[:, :25]
norm = (g * g).mean(0); gTg = (g * Tg).mean(0)
C = F.T @ g / n                       # <f_j, g>, (25, K)
resid = gTg - (C ** 2).sum(0)         # the residual quadratic form seen by a function after 25 others
share5 = ((phi[:, 25:36].T @ g / n) ** 2).sum(0) / norm
share_low = ((phi[:, :25].T @ g / n) ** 2).sum(0) / norm
lam = np.asarray(op.eigenvalues)  # hydrogen's spectrum is known
print('operator eigenvalues (T units) n=0, n=4, n=5:', lam[[0, 16, 25]])
print('learned ||f_j||^2 - lambda_j for j < 25 (max, min):', ((F * F).mean(0) - lam[:25]).max(), ((F * F).mean(0) - lam[:25]).min())
print('fresh functions: share in the exact n <= 4 span  median %.3f, in the n = 5 eigenspace median %.2e' % (np.median(share_low), np.median(share5)))
print('Rayleigh <g,Tg>/||g||^2 median %.3f; residual form / ||g||^2 median %.2e, min %.2e, max %.2e; fraction negative %.2f'
      % (np.median(gTg / norm), np.median(resid / norm), (resid / norm).min(), (resid / norm).max(), (resid < 0).mean()))
print('lambda_5 * share5 median %.2e' % np.median(lam[25] * share5))
