"""A/B of the network's Gaussian factor on the coupled oscillator. The record beside it,
co_envelope_ab.jsonl (d = 10, L = 11, 4000 steps, seed 0, shared CPU), was made with this
script before the envelope and the reordering of functions were built into the library;
today the default network carries the "gauss" factor and functions are reordered at the
collapse checks, so a rerun gives close but not identical numbers.

    python co_envelope_ab.py VARIANT DIM L STEPS

VARIANT: base (no envelope), gauss (matched: psi_0 / sqrt(p), precision Q diag(w/3) Q^T),
gauss_iso (isotropic, mean(w)/3), gauss_half (half the matched precision).
"""
import json
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

import nestedlora_jax as nl
from nestedlora_jax.config import NetworkConfig
from nestedlora_jax.networks import Frozen
from nestedlora_jax.solver import default_network

variant, dim, L, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
problem = nl.CoupledOscillator(dim=dim, seed=0)
q, w = np.asarray(problem.rotation), np.asarray(problem.frequencies)


class Gauss(nnx.Module):
    def __init__(self, inner, A):
        self.inner = inner
        self.A = Frozen(jnp.asarray(A, jnp.float32))

    def __call__(self, x):
        return self.inner(x) * jnp.exp(-0.5 * x @ (self.A[...] @ x))[..., None]


net = default_network(problem, L, NetworkConfig(gaussian_envelope=False), seed=0)
precision = {"gauss": (q * (w / 3)) @ q.T, "gauss_half": (q * (w / 6)) @ q.T,
             "gauss_iso": np.eye(dim) * np.mean(w) / 3}.get(variant)
network = None if precision is None else Gauss(net, precision)
config = nl.SolveConfig().replace(training={"steps": steps, "log_every": 500},
                                  evaluation={"num_samples": 2**16},
                                  network={"gaussian_envelope": False})
t = time.time()
m = nl.solve(problem, L, config=config, network=network, progress=False).metrics.to_dict()
out = dict(variant=variant, dim=dim, L=L, steps=steps, batch=512, wall=time.time() - t,
           mean=float(m["mean_rel_error"]), se=float(m["mean_rel_error_se"]),
           max=float(m["max_rel_error"]), rel=np.asarray(m["rel_error"]).round(5).tolist(),
           resid=np.asarray(m["residual"]).round(3).tolist())
print(json.dumps(out))
