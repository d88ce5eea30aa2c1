"""How much of the gradient's noise near the optimum comes from the batch and how much from
the moment samples, and what lattice draws of each remove (README, "Lattice batches").

python gradient_noise.py RUN_FOLDER [SEED] [DRAWS]: a trained hydrogen benchmark folder with
moment samples (neuralsvd-seq). At its final raw parameters, the loss gradient is drawn
``DRAWS`` times (default 16) under each sampling scheme: batch and moment samples each random or
lattice, at the run's sizes and larger. Per learned function, the RMS deviation of the gradient
(all that function's parameters) from its mean over the draws; printed and saved as the median
over each level, relative to the norm of a reference gradient (the mean of 8 draws of a lattice
batch of 8192 and 16384 lattice moment samples, itself still noisy: the ratios between schemes
are what to read). Results: ``gradient_noise.json`` beside this script, one entry per folder.
"""
import functools
import json
import os
import sys

import jax
import numpy as np

from nestedlora_jax.hydrogen_benchmark import load_run
from nestedlora_jax.lattice import lattice_sample
from nestedlora_jax.training import make_loss_fn

run = load_run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
draws = int(sys.argv[3]) if len(sys.argv) > 3 else 16
sampler, params = run.operator.sampler, run.fit.params
objective_state = run.fit.state.objective_state
loss_fn = make_loss_fn(run.apply, run.operator.op, run.objective)
L = int(run.fit.eigenvalues.shape[0])
levels = np.concatenate([np.full(2 * n + 1, n) for n in range(6)])[:L]  # 2-D: 2n + 1 per level
random, lattice = sampler.sample, functools.partial(lattice_sample, sampler)
B, M = run.config.training.batch_size, run.config.training.moment_batch_size


def gradient_draws(batch_sample, moment_sample, b, m, keys):
    @jax.jit
    def grad(key):
        k_batch, k_moments, k_operator = jax.random.split(key, 3)
        xs, moments = batch_sample(k_batch, b), moment_sample(k_moments, m)
        return jax.grad(lambda p: loss_fn(p, objective_state, xs, k_operator, moments)[0])(params)

    per_function = lambda g: np.concatenate(
        [np.asarray(leaf).reshape(L, -1) for leaf in jax.tree_util.tree_leaves(g)], axis=1)
    return np.stack([per_function(grad(k)) for k in keys])


keys = jax.random.split(jax.random.PRNGKey(123), draws)
reference = gradient_draws(lattice, lattice, 8192, 16384, keys[:8]).mean(0)
reference_norm = np.linalg.norm(reference, axis=1)
schemes = {
    f"random {B} + random {M}": (random, random, B, M),
    f"random {B} + lattice {M}": (random, lattice, B, M),
    f"lattice {B} + lattice {M}": (lattice, lattice, B, M),
    f"random {4 * B} + lattice {M}": (random, lattice, 4 * B, M),
    f"lattice {B} + lattice {4 * M}": (lattice, lattice, B, 4 * M),
}
rows = {}
for name, (batch_sample, moment_sample, b, m) in schemes.items():
    g = gradient_draws(batch_sample, moment_sample, b, m, keys)
    noise = np.sqrt(((g - g.mean(0)) ** 2).sum(-1).mean(0)) / reference_norm
    rows[name] = {f"n={n}": float(np.median(noise[levels == n])) for n in np.unique(levels)}
    print(f"{name:28s}", "  ".join(f"{k} {v:6.2f}" for k, v in rows[name].items()), flush=True)

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gradient_noise.json")
record = json.load(open(path)) if os.path.exists(path) else {}
record[f"{L} states, {run.config.training.steps} steps, seed {run.config.training.seed}"] = {
    "draws": draws, "noise_over_reference_norm_median_per_level": rows}
with open(path, "w") as fh:
    json.dump(record, fh, indent=1)
