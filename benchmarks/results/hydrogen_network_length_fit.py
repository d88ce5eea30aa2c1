"""Can the default hydrogen network represent a level's ``f = psi / sqrt(p)``? A supervised fit
(part of the record hydrogen_network_length.json).

python hydrogen_network_length_fit.py L LEVEL STEPS [A [HIDDEN]]: fit the states of level
n = LEVEL among the L lowest (the problem's default network, ``default_network``: one parallel
32-32-32 softplus MLP per state, radial input) to ``psi / sqrt(p)`` under the problem's L-state
sampler ``p``, by Adam (3e-3, cosine to 1%) on batches of 512, and print the relative L2 error
per state on 65 536 fresh samples. ``A``: the network sees ``x / A`` and its radius
(``Hydrogen(network_length=A)``); without it or with 0, raw coordinates. ``HIDDEN``: hidden
widths of each parallel MLP, e.g. ``64,64,64`` (default: ``NetworkConfig``'s, 32-32-32).
"""
import sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from nestedlora_jax.problems import Hydrogen
from nestedlora_jax.run_folder import zero_means_none
from nestedlora_jax.solver import NetworkConfig, default_network

L, level, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
length = zero_means_none(float(sys.argv[4])) if len(sys.argv) > 4 else None
# None: NetworkConfig's own default widths
hidden = tuple(int(h) for h in sys.argv[5].split(",")) if len(sys.argv) > 5 else None
problem = Hydrogen(dim=2, network_length=length)
sampler = problem.default_sampler(L)
idx = jnp.array([i for i, s in enumerate(problem.states(L)) if s[0] == level])
graphdef, params = nnx.split(default_network(problem, len(idx), NetworkConfig(hidden=hidden), seed=0))

def target(x):
    psi = jax.vmap(lambda p: problem.eigenfunctions(p, L))(x)[..., idx]
    return psi * jnp.exp(-0.5 * jax.vmap(sampler.log_prob)(x))[:, None]

def relative_sq_error(params, x):
    f, t = nnx.merge(graphdef, params)(x), target(x)
    return jnp.sum((f - t) ** 2, 0) / jnp.sum(t ** 2, 0)

opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.01))
state = opt.init(params)

@jax.jit
def step(params, state, key):
    loss, g = jax.value_and_grad(lambda p: relative_sq_error(p, sampler.sample(key, 512)).mean())(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

key, t0 = jax.random.PRNGKey(1), time.time()
x_eval = sampler.sample(jax.random.PRNGKey(99), 65536)
for i in range(steps):
    key, k = jax.random.split(key)
    params, state, _ = step(params, state, k)
rel = np.sqrt(np.asarray(relative_sq_error(params, x_eval)))
print(f"L={L} n={level} network_length={length} steps={steps} hidden={hidden}: "
      f"relative L2 error per state mean {rel.mean():.2e}, worst {rel.max():.2e} "
      f"({time.time() - t0:.0f} s)")
