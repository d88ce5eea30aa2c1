"""The bare 16-state hydrogen command with another learning-rate schedule (README, learning-rate
sweep): ``python hydrogen16_schedule_probe.py wsd [hydrogen.py options]``.

``wsd`` (warm-up-free "warmup-stable-decay"): Adam at the constant peak rate for the first 80%
of the steps, then a cosine decay to 1% of it over the last 20%, in place of the default cosine
decay over the whole run. It keeps the rate high longer (about 1.7x the integral of the rate
over the run), to see whether the outer states are limited by how far training gets or by
where it settles. The default optimiser is replaced in both places that build it.
"""
import sys

import optax

import nestedlora_jax.solver as solver
import nestedlora_jax.training as training
from nestedlora_jax.hydrogen_benchmark import main


def warmup_stable_decay(steps: int, learning_rate: float, final_fraction: float = 1e-2,
                        decay_fraction: float = 0.2):
    decay = max(int(steps * decay_fraction), 1)
    schedule = optax.join_schedules(
        [optax.constant_schedule(learning_rate),
         optax.cosine_decay_schedule(learning_rate, decay, alpha=final_fraction)],
        [steps - decay])
    return optax.adam(schedule)


SCHEDULES = {"wsd": warmup_stable_decay}

if __name__ == "__main__":
    training.default_optimizer = solver.default_optimizer = SCHEDULES[sys.argv[1]]
    sys.exit(main(sys.argv[2:]))
