"""nestedlora_jax: learn the top-L eigenfunctions (and singular functions) of operators
with neural networks, by nested low-rank approximation (NestedLoRA / NeuralSVD).

Layout (one concept per module):

* ``objectives``  nesting masks and the NestedLoRA losses (one masked-gradient custom VJP)
* ``baselines``   SpIN and NeuralEF objectives with the same interface
* ``laplacian``   Laplacians by autodiff (forward-over-forward, folx, Hutchinson, ...)
* ``operators``   the (importance-weighted) negative Hamiltonian, energy conversion
* ``samplers``    Gaussian (isotropic or full covariance), Laplace, uniform box, radial mixture
* ``problems``    oscillators (isotropic, coupled), hydrogen, infinite well, cosine potential:
                  exact answers in any dimension
* ``metrics``     eigenvalue errors, orthogonality, subspace / angle distances, Ritz values
* ``training``    ``fit``: Optax loop with EMA, NaN guards, checkpoints, collapse remedy
* ``evaluation``  ``evaluate``: every metric against a problem's exact answers, on a grid or
                  on Monte Carlo samples with standard errors
* ``networks``    Flax NNX eigenfunction networks and ``to_apply`` (imports Flax)
* ``solver``      ``solve(problem, L)``: all of the above in one call (imports Flax)
* ``grid_baseline`` finite-difference sparse eigensolver baseline (needs scipy; import it
                  explicitly: ``nestedlora_jax.grid_baseline``)

The core (everything but ``networks`` and ``solver``) is pure JAX and imports no Flax;
the Flax-based names below are loaded on first use.
"""

import importlib

from nestedlora_jax import baselines, laplacian, metrics, objectives, operators, problems, samplers
from nestedlora_jax.baselines import neuralef_objective, spin_objective
from nestedlora_jax.evaluation import evaluate, quadrature_grid
# The function is `nestedlora_jax.laplacian.laplacian`: re-exporting it here would shadow
# the module of the same name.
from nestedlora_jax.laplacian import LAPLACIAN_METHODS, batched_laplacian
from nestedlora_jax.objectives import (
    NESTINGS,
    Objective,
    lora_objective,
    nested_lora_loss,
    nested_lora_objective,
    nested_lora_svd_loss,
    nesting_masks,
    nesting_weights,
)
from nestedlora_jax.operators import (
    ProblemOperator,
    apply_operator,
    eigenvalues_from_energies,
    energies_from_eigenvalues,
    negative_hamiltonian,
    problem_operator,
)
from nestedlora_jax.problems import (
    CosinePotential,
    CoupledOscillator,
    HarmonicOscillator,
    Hydrogen,
    InfiniteWell,
    Problem,
)
from nestedlora_jax.samplers import (
    CorrelatedGaussianSampler,
    GaussianSampler,
    LaplaceSampler,
    RadialExponentialMixture,
    UniformBoxSampler,
)
from nestedlora_jax.training import CollapseConfig, FitResult, TrainingDivergedError, fit, make_loss_fn

__version__ = "0.1.0"

# Flax-based names, imported lazily so that the core never pulls in Flax.
_LAZY = {
    "networks": ("nestedlora_jax.networks", None),
    "solver": ("nestedlora_jax.solver", None),
    "eigenfunction_network": ("nestedlora_jax.networks", "eigenfunction_network"),
    "to_apply": ("nestedlora_jax.networks", "to_apply"),
    "load_params": ("nestedlora_jax.networks", "load_params"),
    "solve": ("nestedlora_jax.solver", "solve"),
    "SolveResult": ("nestedlora_jax.solver", "SolveResult"),
    "METHODS": ("nestedlora_jax.solver", "METHODS"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'nestedlora_jax' has no attribute {name!r}")


__all__ = [
    "CollapseConfig",
    "CorrelatedGaussianSampler",
    "CosinePotential",
    "CoupledOscillator",
    "FitResult",
    "GaussianSampler",
    "HarmonicOscillator",
    "Hydrogen",
    "InfiniteWell",
    "LAPLACIAN_METHODS",
    "LaplaceSampler",
    "METHODS",
    "NESTINGS",
    "Objective",
    "Problem",
    "ProblemOperator",
    "RadialExponentialMixture",
    "SolveResult",
    "TrainingDivergedError",
    "UniformBoxSampler",
    "apply_operator",
    "batched_laplacian",
    "eigenfunction_network",
    "eigenvalues_from_energies",
    "energies_from_eigenvalues",
    "evaluate",
    "fit",
    "load_params",
    "lora_objective",
    "make_loss_fn",
    "negative_hamiltonian",
    "nested_lora_loss",
    "nested_lora_objective",
    "nested_lora_svd_loss",
    "nesting_masks",
    "nesting_weights",
    "neuralef_objective",
    "problem_operator",
    "quadrature_grid",
    "solve",
    "spin_objective",
    "to_apply",
]
