"""Run by ``test_parallel.py`` in a fresh process with 4 fake CPU devices.

Trains the same problem with the same seed and global batch on 1, 2 and 4 devices and prints
one JSON object: losses, eigenvalue estimates and parameter leaves of each run, and the error
message for a batch that does not divide over the devices.
"""

import json
import os
import sys

# Must be set before JAX initialises its backends.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nestedlora_jax import TrainingConfig, fit, problem_operator, problems  # noqa: E402
from nestedlora_jax.networks import eigenfunction_network, to_apply  # noqa: E402
from nestedlora_jax.parallel import data_parallel_mesh  # noqa: E402


def count_all_reduces(apply, params, op, L):
    """All-reduces in the compiled 4-device step: > 0 proves the batch work is split."""
    import optax

    from nestedlora_jax.parallel import batch_sharding, replicate
    from nestedlora_jax.training import init_train_state, make_loss_fn, make_train_step

    mesh = data_parallel_mesh(4)
    optimizer = optax.adam(1e-3)
    step = make_train_step(make_loss_fn(apply, op.op), optimizer, op.sampler.sample, 64,
                           batch_sharding=batch_sharding(mesh))
    state = replicate(init_train_state(params, optimizer, L), mesh)
    hlo = jax.jit(step).lower(state, jax.random.PRNGKey(0)).compile().as_text()
    return hlo.count("all-reduce(") + hlo.count("all-reduce-start(")


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    assert len(jax.devices()) == 4, jax.devices()
    from flax import nnx

    problem = problems.HarmonicOscillator(dim=2)
    L = 4
    op = problem_operator(problem, L)
    apply, params = to_apply(eigenfunction_network(2, L, hidden=(16, 16), rngs=nnx.Rngs(params=0)))

    def run(mesh, batch=64):
        config = TrainingConfig(steps=steps, batch_size=batch, learning_rate=3e-3, seed=7,
                                log_every=10, collapse=None)
        result = fit(apply, params, op.op, op.sampler, config=config, progress=False, mesh=mesh)
        leaves = [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(result.params)]
        shardings = {str(len(x.sharding.device_set)) for x in jax.tree_util.tree_leaves(result.params)}
        return {"losses": [h["loss"] for h in result.history], "eigenvalues": result.eigenvalues.tolist(),
                "params": leaves, "devices_holding_params": sorted(shardings)}

    out = {"1": run(None)}
    out["all_reduces"] = count_all_reduces(apply, params, op, L)
    for n in (2, 4):
        out[str(n)] = run(data_parallel_mesh(n))
    from nestedlora_jax import EvaluationConfig, NetworkConfig, SolveConfig, solve

    energies = {}
    for dp in (False, 2):
        config = SolveConfig(network=NetworkConfig(hidden=(8,)),
                             training=TrainingConfig(steps=20, batch_size=32, log_every=10),
                             evaluation=EvaluationConfig(grid_size=40))
        res = solve(problem, 2, config=config, progress=False, data_parallel=dp)
        energies[str(dp)] = res.energies.tolist()
    out["solve_energies"] = energies
    try:
        run(data_parallel_mesh(4), batch=66)
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    try:
        data_parallel_mesh(5)
        out["too_many_error"] = None
    except ValueError as e:
        out["too_many_error"] = str(e)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
