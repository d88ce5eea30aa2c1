"""Would choosing a re-initialised function among K fresh candidates help the last n = 5 slot
of 36-state hydrogen? (a measured lead, not a library feature)

python hydrogen36_candidate_selection.py RUN_FOLDER: a 36-state benchmark folder (seed 0,
``--network-length 10``). On 32 768 samples of the run's sampler, 288 fresh single functions
(8 fresh default networks of 36) are placed after the run's first 35 learned functions. For
each: the residual quotient the nested objective offers it,
``(<g, T g> - sum_{j<36} <f_j, g>^2) / ||g||^2``, and its share of norm in the one direction
of the exact n = 5 eigenspace that the learned f_26..f_35 leave uncovered (the direction slot
36 must learn). Then best-of-K by residual quotient against a random pick.

On the residual-test 150k run (seed 0, CPU): 98% of the candidates start with a negative
residual quotient (median -8.9e-3; a formed n = 5 function has +0.020). The missing-direction share has median 5.9e-4 (the
90th percentile 4.7e-3); its Spearman correlation with the residual quotient is only 0.20 (0.78
with the whole n = 5 share, 0.76 with the n = 6 share: the selector cannot tell the missing n = 5
direction from n = 6, whose eigenvalue is 11% below). Best of K = 4 / 16 / 64 raises the median
missing share to 1.0e-3 / 2.0e-3 / 2.0e-3 (mean 3.9e-3 / 6.3e-3 / 5.7e-3, against 1.9e-3):
about 3x, i.e. about one e-fold less growth for a function that must grow from there.
"""
import sys, numpy as np, jax, jax.numpy as jnp
from nestedlora_jax.hydrogen_benchmark import load_run
from nestedlora_jax.evaluation import network_values
from nestedlora_jax.solver import default_network
from nestedlora_jax.networks import to_apply
from nestedlora_jax.config import NetworkConfig
r = load_run(sys.argv[1], seed=0)
from nestedlora_jax.problems import Hydrogen
op = r.operator; pb = Hydrogen(dim=2, network_length=10.0)

x = np.asarray(op.sampler.sample(jax.random.PRNGKey(5), 1 << 15))
f, Tf = network_values(r.apply, r.fit.ema_params, op.op, x.astype(np.float32), chunk=512)
n = len(x)
G, TG = [], []
for s in range(8):
    fa, fp = to_apply(default_network(pb, 36, NetworkConfig(hidden=(32, 32, 32)), seed=1000 + s))
    g, Tg = network_values(fa, fp, op.op, x.astype(np.float32), chunk=512)
    G.append(g); TG.append(Tg)
g, Tg = np.concatenate(G, 1), np.concatenate(TG, 1)
psi = np.asarray(jax.vmap(lambda p: pb.eigenfunctions(p, 49))(jnp.asarray(x)), np.float64)
phi = psi * np.exp(-0.5 * np.asarray(jax.vmap(op.sampler.log_prob)(jnp.asarray(x)), np.float64))[:, None]
F = f[:, :35]
norm = (g * g).mean(0); gTg = (g * Tg).mean(0)
C = F.T @ g / n
rho = (gTg - (C ** 2).sum(0)) / norm
# missing n=5 direction: n=5 coefficients of learned f_26..f_35
P5 = phi[:, 25:36]
A = P5.T @ f[:, 25:35] / n           # (11, 10)
U, S, Vt = np.linalg.svd(A)
m = U[:, -1]                          # unit vector in n=5 coefficient space orthogonal to learned
miss = ((P5 @ m) @ g / n) ** 2 / norm
share5 = ((P5.T @ g / n) ** 2).sum(0) / norm
share6 = ((phi[:, 36:49].T @ g / n) ** 2).sum(0) / norm
print('learned n=5 coverage singular values', np.round(S, 3))
print('candidates', g.shape[1])
print('residual quotient: median %.2e  90%% %.2e  max %.2e  neg frac %.2f' % (np.median(rho), np.quantile(rho, .9), rho.max(), (rho < 0).mean()))
print('missing-direction share: median %.2e  90%% %.2e  max %.2e' % (np.median(miss), np.quantile(miss, .9), miss.max()))
print('n=5 share median %.2e, n=6 share median %.2e' % (np.median(share5), np.median(share6)))
from scipy.stats import spearmanr
print('spearman(rho, miss) %.2f; spearman(rho, share5) %.2f; spearman(rho, share6) %.2f' % (spearmanr(rho, miss)[0], spearmanr(rho, share5)[0], spearmanr(rho, share6)[0]))
# best of K by rho vs random: mean missing share
rng = np.random.default_rng(0)
for K in (1, 4, 16, 64):
    picks = [rng.choice(g.shape[1], K, replace=False) for _ in range(2000)]
    best = np.array([p[np.argmax(rho[p])] for p in picks])
    print('K=%2d: best-by-rho missing share mean %.2e median %.2e; rho mean %.2e' % (K, miss[best].mean(), np.median(miss[best]), rho[best].mean()))
