"""nestedlora_jax: learn the top-L eigenfunctions (and singular functions) of operators
with neural networks, by nested low-rank approximation (NestedLoRA / NeuralSVD).

The core (objectives, operators, samplers, metrics) is pure JAX and imports no Flax;
networks (Flax NNX) and the training loop compose it.
"""

from nestedlora_jax.objectives import (
    NESTINGS,
    lora_objective,
    nested_lora_loss,
    nested_lora_svd_loss,
    nesting_masks,
    nesting_weights,
)

__version__ = "0.1.0"

__all__ = [
    "NESTINGS",
    "lora_objective",
    "nested_lora_loss",
    "nested_lora_svd_loss",
    "nesting_masks",
    "nesting_weights",
]
