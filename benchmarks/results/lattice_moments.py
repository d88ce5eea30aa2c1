"""How accurately moment samples estimate NestedLoRA's second moments, drawn independently or
as a randomly shifted lattice (``TrainingConfig.moment_sampling``; README, moment samples).

python lattice_moments.py [OUT.json]: for the exact ``f_i = sqrt(lambda_i) psi_i / sqrt(p)`` of
2-D hydrogen (16 and 36 states, under the benchmark's sampler for that many states, so that
``<f_i, f_j> = lambda_i delta_ij``), the root-mean-square error of ``Lambda = f^T f / n`` over 32
draws (or shifts), float64, for n = 512, 2048, 8192 moment samples: over all entries, over the
last level's columns and on the last level's diagonal, relative to ``sqrt(lambda_i lambda_j)``.
Then the same for the 10 lowest states of the oscillators in d = 2, 5 and 10 (the isotropic one
in 2-D, the coupled one beyond; ``psi / sqrt(p)``, whose moments are the identity), 2048
points: how the gain falls with the dimension.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import nestedlora_jax as nl
from nestedlora_jax.hydrogen_benchmark import _environment

jax.config.update("jax_enable_x64", True)
REPS = 32


def errors(problem, L: int, n: int, lattice: bool, lam) -> np.ndarray:
    """Per-entry RMS error of ``Lambda`` for ``f_i = sqrt(lam_i) psi_i / sqrt(p)`` under the
    problem's sampler for ``L`` states, relative to ``sqrt(lam_i lam_j)``, over ``REPS`` draws."""
    sampler = problem.default_sampler(L)
    psi = jax.jit(jax.vmap(lambda x: problem.eigenfunctions(x, L)))
    log_p = jax.jit(jax.vmap(sampler.log_prob))
    out = []
    for key in jax.random.split(jax.random.PRNGKey(0), REPS):
        x = nl.lattice_sample(sampler, key, n) if lattice else sampler.sample(key, n)
        f = np.asarray(psi(x)) * np.exp(-0.5 * np.asarray(log_p(x)))[:, None] * np.sqrt(lam)
        out.append((f.T @ f / n - np.diag(lam)) / np.sqrt(np.outer(lam, lam)))
    return np.sqrt(np.mean(np.square(out), axis=0))


rows = []
hydrogen = nl.Hydrogen(dim=2)
for L, last in ((16, slice(9, 16)), (36, slice(25, 36))):
    for n in (512, 2048, 8192):
        row = {"states": L, "moment_samples": n}
        for name, lattice in (("random", False), ("lattice", True)):
            rms = errors(hydrogen, L, n, lattice, -hydrogen.energies(L))
            row[name] = {"all": float(np.sqrt(np.mean(rms**2))),
                         "last_level_columns": float(np.sqrt(np.mean(rms[:, last] ** 2))),
                         "last_level_diagonal": float(np.sqrt(np.mean(np.diagonal(rms)[last] ** 2)))}
        rows.append(row)
        r, q = row["random"], row["lattice"]
        print(f"L = {L:2d}, n = {n:5d}: all {r['all']:.2e} -> {q['all']:.2e} "
              f"({r['all'] / q['all']:.1f}x), last level columns {r['last_level_columns']:.2e} -> "
              f"{q['last_level_columns']:.2e} ({r['last_level_columns'] / q['last_level_columns']:.1f}x), "
              f"diagonal {r['last_level_diagonal']:.2e} -> {q['last_level_diagonal']:.2e} "
              f"({r['last_level_diagonal'] / q['last_level_diagonal']:.1f}x)")
oscillators = []
for problem in (nl.HarmonicOscillator(dim=2), nl.CoupledOscillator(dim=5), nl.CoupledOscillator(dim=10)):
    L, n = 10, 2048
    row = {"problem": type(problem).__name__, "dim": problem.dim, "states": L, "moment_samples": n}
    for name, lattice in (("random", False), ("lattice", True)):
        # psi / sqrt(p): lam = 1, moments the identity.
        row[name] = float(np.sqrt(np.mean(errors(problem, L, n, lattice, np.ones(L)) ** 2)))
    oscillators.append(row)
    print(f"{row['problem']} d = {row['dim']}: {row['random']:.2e} -> {row['lattice']:.2e} "
          f"({row['random'] / row['lattice']:.1f}x)")
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as fh:
        json.dump({"note": __doc__.strip().splitlines()[0], "repetitions": REPS, "rows": rows, "oscillators": oscillators,
                   "environment": _environment()}, fh, indent=1)
