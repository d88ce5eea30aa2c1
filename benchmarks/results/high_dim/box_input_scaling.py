"""How the box's input coordinates change training (the record box_input_scaling.jsonl).

python box_input_scaling.py VARIANT DIM L STEPS, VARIANT one of base, centred, std, std3 and
base-lr1e3, base-b2048. The box is moved and scaled instead of the network's inputs (relative
errors are invariant under both), and the library's own standardisation is switched off, so the
variants mean what they meant when the record was made: base = raw [0, 1]^d, centred =
[-1/2, 1/2]^d, std = centred with unit variance per axis, std3 = three times wider.
"""
import sys, time, json, dataclasses, math
import numpy as np, jax, jax.numpy as jnp
import nestedlora_jax as nl
from nestedlora_jax.problems import InfiniteWell
from nestedlora_jax.samplers import UniformBoxSampler

@dataclasses.dataclass(frozen=True)
class CentredWell(InfiniteWell):
    """The same box shifted to [-a/2, a/2]^d: the network sees centred inputs."""
    @property
    def box(self):
        return (-self.length / 2, self.length / 2)
    def boundary_mask(self, x):
        return super().boundary_mask(x + self.length / 2)
    def eigenfunctions(self, x, L):
        return super().eigenfunctions(x + self.length / 2, L)
    def default_sampler(self, L):
        return UniformBoxSampler(-self.length / 2, self.length / 2, self.dim)

variant, dim, L, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
name = variant.split("-")[0]
length = 1.0
if name == "std":  # centred, unit variance per axis
    name, length = "centred", 12 ** 0.5
if name == "std3":
    name, length = "centred", 3 * 12 ** 0.5
prob = {"base": InfiniteWell, "centred": CentredWell}[name](dim=dim, length=length)
kw = {}
if variant.endswith("-lr1e3"): kw["learning_rate"] = 1e-3
if variant.endswith("-b2048"): kw["batch_size"] = 2048
t = time.time()
config = nl.SolveConfig(network=nl.NetworkConfig(standardize_input=False), training=nl.TrainingConfig(steps=steps, log_every=500, **kw),
                        evaluation=nl.EvaluationConfig(mode="mc", num_samples=2**17))
r = nl.solve(prob, L, config=config, progress=False)
m = r.metrics
out = {"variant": variant, "dim": dim, "L": L, "steps": steps, "wall": time.time() - t,
       "mean_rel_error": m["mean_rel_error"], "rel_error": list(map(float, m["rel_error"])),
       "reinit": r.fit.reinitialized}
print(json.dumps(out), flush=True)
