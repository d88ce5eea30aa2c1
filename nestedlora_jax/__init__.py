"""nestedlora_jax: learn the top-L eigenfunctions (and singular functions) of operators
with neural networks, by nested low-rank approximation (NestedLoRA / NeuralSVD).

The public API is flat, as in optax and jax: ``nl.solve``, ``nl.fit``, ``nl.laplacian``,
``nl.nested_lora_loss``, ``nl.SolveConfig``, ... Modules, one concept each:

* ``objectives``  nesting masks and the NestedLoRA losses (one masked-gradient custom VJP)
* ``baselines``   SpIN and NeuralEF objectives with the same interface
* ``laplacians``  Laplacians by autodiff (forward-over-forward, folx, Hutchinson, ...)
* ``operators``   the (importance-weighted) negative Hamiltonian, energy conversion; the
                  batch-level operator contract (``BatchOperator``, ``pointwise_operator``,
                  ``kernel_integral_operator``, ``matrix_operator``)
* ``dependence``  the canonical dependence kernel of paired data (operator, ``PairedData`` /
                  ``ClassPairedData`` samplers, exact ``GaussianPairs``, ``pair_metrics``)
* ``samplers``    Gaussian (isotropic or full covariance), Laplace, uniform box, radial mixture
* ``lattice``     randomly shifted lattice points through a sampler's inverse transform
* ``problems``    oscillators (isotropic, coupled), hydrogen, infinite well, cosine potential:
                  exact answers in any dimension
* ``metrics``     eigenvalue errors, orthogonality, subspace / angle distances, Ritz values
* ``training``    the pure compiled pieces (loss, step, state) and ``fit``
* ``hooks``       the host loop ``run_loop`` and its hooks (checkpoints, progress, collapse
                  remedy, divergence guard, history file, callbacks)
* ``config``      configuration as frozen dataclasses (network, operator, training, evaluation)
* ``evaluation``  ``evaluate``: every metric against a problem's exact answers, on a grid or
                  on Monte Carlo samples with standard errors
* ``networks``    Flax NNX eigenfunction networks and ``to_apply`` (imports Flax)
* ``solver``      ``solve(problem, L, config=...)`` and ``restore(run_dir)`` (imports Flax)
* ``pairs``       ``solve_pairs(x, y, L)``: two networks on paired data (imports Flax)
* ``grid_baseline`` finite-difference sparse eigensolver baseline (needs scipy; import it
                  explicitly: ``nestedlora_jax.grid_baseline``)

The core (everything but ``networks`` and ``solver``) is pure JAX and imports no Flax;
the Flax-based names below are loaded on first use.
"""

import importlib

from nestedlora_jax import (
    baselines,
    config,
    dependence,
    hooks,
    laplacians,
    lattice,
    metrics,
    objectives,
    omm,
    operators,
    problems,
    samplers,
    training,
)
from nestedlora_jax.baselines import neuralef_objective, spin_objective
from nestedlora_jax.omm import omm_loss, omm_objective
from nestedlora_jax.config import (
    METHODS,
    ConfigVersionError,
    EvaluationConfig,
    NetworkConfig,
    OperatorConfig,
    SolveConfig,
    TrainingConfig,
)
from nestedlora_jax.dependence import (
    ClassPairedData,
    GaussianPairs,
    PairedData,
    dependence_kernel_operator,
    discrete_dependence_operator,
    pair_metrics,
)
from nestedlora_jax.evaluation import Evaluation, evaluate, level_weights, quadrature_grid
from nestedlora_jax.hooks import (
    Callback,
    Checkpoints,
    CollapseConfig,
    CollapseRemedy,
    DivergenceGuard,
    HistoryFile,
    Hook,
    Loop,
    ProgressBar,
    TrainingDivergedError,
    TrainingInterrupted,
    run_loop,
)
from nestedlora_jax.laplacians import LAPLACIAN_METHODS, batched_laplacian, laplacian
from nestedlora_jax.lattice import lattice_sample
from nestedlora_jax.objectives import (
    NESTINGS,
    Objective,
    OperatorOutput,
    lora_objective,
    nested_lora_loss,
    nested_lora_objective,
    nested_lora_svd_loss,
    nesting_masks,
    nesting_weights,
)
from nestedlora_jax.operators import (
    BatchOperator,
    ProblemOperator,
    apply_operator,
    kernel_integral_operator,
    matrix_operator,
    pointwise_operator,
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
from nestedlora_jax.training import (
    FitResult,
    TrainState,
    default_optimizer,
    fit,
    init_train_state,
    make_loss_fn,
    make_train_step,
    train_steps,
)

__version__ = "0.3.0"

# Flax-based names, imported lazily so that the core never pulls in Flax.
_LAZY = {
    "networks": ("nestedlora_jax.networks", None),
    "solver": ("nestedlora_jax.solver", None),
    "eigenfunction_network": ("nestedlora_jax.networks", "eigenfunction_network"),
    "to_apply": ("nestedlora_jax.networks", "to_apply"),
    "load_params": ("nestedlora_jax.networks", "load_params"),
    "solve": ("nestedlora_jax.solver", "solve"),
    "restore": ("nestedlora_jax.solver", "restore"),
    "SolveResult": ("nestedlora_jax.solver", "SolveResult"),
    "PeriodicEvaluation": ("nestedlora_jax.solver", "PeriodicEvaluation"),
    "pairs": ("nestedlora_jax.pairs", None),
    "solve_pairs": ("nestedlora_jax.pairs", "solve_pairs"),
    "PairsResult": ("nestedlora_jax.pairs", "PairsResult"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'nestedlora_jax' has no attribute {name!r}")


__all__ = [
    # solving
    "solve", "restore", "SolveResult", "SolveConfig", "NetworkConfig", "OperatorConfig",
    "TrainingConfig", "EvaluationConfig", "CollapseConfig", "ConfigVersionError", "METHODS",
    # problems and samplers
    "Problem", "HarmonicOscillator", "CoupledOscillator", "Hydrogen", "InfiniteWell",
    "CosinePotential", "GaussianSampler", "CorrelatedGaussianSampler", "LaplaceSampler",
    "RadialExponentialMixture", "UniformBoxSampler", "lattice_sample",
    # paired data and the dependence kernel
    "solve_pairs", "PairsResult", "PairedData", "ClassPairedData", "GaussianPairs",
    "dependence_kernel_operator", "discrete_dependence_operator", "pair_metrics",
    # objectives
    "Objective", "OperatorOutput", "NESTINGS", "nested_lora_loss", "nested_lora_objective", "nested_lora_svd_loss",
    "lora_objective", "nesting_masks", "nesting_weights", "neuralef_objective", "spin_objective",
    "omm_loss", "omm_objective",
    # operators
    "laplacian", "batched_laplacian", "LAPLACIAN_METHODS", "negative_hamiltonian",
    "apply_operator", "problem_operator", "ProblemOperator", "BatchOperator",
    "pointwise_operator", "kernel_integral_operator", "matrix_operator", "eigenvalues_from_energies",
    "energies_from_eigenvalues",
    # training
    "fit", "FitResult", "TrainState", "make_loss_fn", "make_train_step", "init_train_state",
    "train_steps", "default_optimizer", "run_loop", "Loop", "Hook", "Callback", "Checkpoints",
    "CollapseRemedy", "DivergenceGuard", "HistoryFile", "ProgressBar", "PeriodicEvaluation",
    "TrainingDivergedError", "TrainingInterrupted",
    # networks and evaluation
    "eigenfunction_network", "to_apply", "load_params", "evaluate", "level_weights", "Evaluation", "quadrature_grid",
    # modules
    "baselines", "config", "dependence", "hooks", "laplacians", "lattice", "metrics", "objectives", "omm", "operators",
    "problems", "samplers", "training", "networks", "solver", "pairs",
]
