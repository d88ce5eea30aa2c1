"""What TF32 products do to the evaluation of a trained 36-state hydrogen run, on a CPU.

    python benchmarks/results/tf32_emulation.py RUN_FOLDER {float32,tf32}

On GPUs JAX's default float32 matrix product rounds both operands to TF32 (a 10-bit mantissa).
With ``tf32`` every float32 ``dot_general`` here gets its operands rounded to nearest at 10
bits (tangents too, so the forward-mode Laplacian is rounded as a GPU would round it) before
the run is restored and evaluated exactly as the benchmark evaluates it; ``float32`` evaluates
it unchanged. Prints the mean relative error, the per-level means of the absolute and of the
signed relative errors ``(E - E_exact) / |E_exact|``, and the block subspace distances.
"""
import sys

import jax
import jax._src.lax.lax as lax_impl
import jax.numpy as jnp
import numpy as np
from jax import lax

if len(sys.argv) != 3 or sys.argv[2] not in ("float32", "tf32"):
    raise SystemExit(__doc__)

if sys.argv[2] == "tf32":
    float32_dot_general = lax_impl.dot_general

    @jax.custom_jvp
    def to_tf32(x):
        bits = lax.bitcast_convert_type(x, jnp.uint32)
        bits = (bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)
        return lax.bitcast_convert_type(bits, jnp.float32)

    @to_tf32.defjvp
    def _to_tf32_jvp(primals, tangents):
        return to_tf32(primals[0]), to_tf32(tangents[0])

    def tf32_dot_general(lhs, rhs, *args, **kwargs):
        r = lambda z: to_tf32(z) if getattr(z, "dtype", None) == jnp.float32 else z
        return float32_dot_general(r(lhs), r(rhs), *args, **kwargs)

    # jnp.matmul / einsum look dot_general up in this module at call time.
    lax_impl.dot_general = lax.dot_general = jax.lax.dot_general = tf32_dot_general

from nestedlora_jax.hydrogen_benchmark import load_run  # noqa: E402

m = load_run(sys.argv[1]).metrics
err, E, exact = (np.asarray(v) for v in (m.rel_error, m.rayleigh, m.exact))
sizes = [2 * n + 1 for n in range(6)][: int(np.sqrt(len(err)))]
level = np.repeat(np.arange(len(sizes)), sizes)
signed = (E - exact) / np.abs(exact)
print(sys.argv[2], f"mean {m.mean_rel_error:.4e}")
print("  level means     ", [f"{err[level == n].mean():.1e}" for n in range(len(sizes))])
print("  signed, by level", [f"{signed[level == n].mean():+.1e}" for n in range(len(sizes))])
print("  block subspace  ", [f"{b:.1e}" for b in m.subspace_distance_blocks])
