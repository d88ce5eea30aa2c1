"""``solve_pairs``: the singular functions of the canonical dependence kernel of paired data.

A few lines from arrays to features::

    result = solve_pairs(x, y, L=8)            # x (N, dx), y (N, dy): aligned pairs
    fx, gy = result.embed_x(x), result.embed_y(y)   # (N, 8) each
    result.singular_values                      # (8,) the learned dependence spectrum
    scores = result.embed_x(queries) @ result.embed_y(gallery).T   # ~ k(x, y): retrieval

With labels instead of alignment (``x_labels``, ``y_labels``), the pairs are class-level: x and
y independent given a shared label (:class:`~nestedlora_jax.dependence.ClassPairedData`).

It trains two networks with :func:`~nestedlora_jax.training.fit` on
:func:`~nestedlora_jax.dependence.dependence_kernel_operator` (the pure pieces stay usable in a
user's own step: ``make_loss_fn((apply_f, apply_g), dependence_kernel_operator())``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from nestedlora_jax._checks import check_num_states
from nestedlora_jax.config import ACTIVATIONS, TrainingConfig
from nestedlora_jax.dependence import (
    ClassPairedData,
    PairedData,
    dependence_kernel_operator,
    pair_metrics,
)
from nestedlora_jax.evaluation import EVALUATION_MATMUL_PRECISION
from nestedlora_jax.networks import ACTIVATION_FUNCTIONS, eigenfunction_network, to_apply
from nestedlora_jax.objectives import NESTINGS, nested_lora_objective
from nestedlora_jax.training import FitResult, fit, network_output_count

__all__ = ["PairsResult", "solve_pairs"]

# Pairs used to estimate the singular values after training (a random subset of the data).
EVALUATION_PAIRS = 2**17


def _embedding(apply, params):
    """``x (n, d) -> apply(params, x_i)`` stacked ``(n, L)``, compiled, with every matrix product
    at full float32 precision (as in evaluation: GPUs default to TF32)."""
    def embed(xs):
        with jax.default_matmul_precision(EVALUATION_MATMUL_PRECISION):
            return jax.vmap(lambda x: apply(params, x))(xs)
    return jax.jit(embed)


@dataclasses.dataclass
class PairsResult:
    """What :func:`solve_pairs` returns.

    Attributes:
      fit: the :class:`~nestedlora_jax.training.FitResult` (history, state, both networks'
        raw and EMA parameters as pairs ``(params_f, params_g)``).
      apply_f, apply_g: the pure networks, one point -> ``(L,)``.
      params_f, params_g: the EMA parameters (used by ``embed_x`` / ``embed_y``).
      metrics: all of :func:`~nestedlora_jax.dependence.pair_metrics` of ``embed_x`` /
        ``embed_y`` on a subset of the training pairs (for a held-out estimate call it on other
        pairs).
    """

    fit: FitResult
    apply_f: Callable
    apply_g: Callable
    params_f: Any
    params_g: Any
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def singular_values(self) -> np.ndarray:
        """``(L,)`` Rayleigh-Ritz singular values of the learned features (``metrics``;
        :func:`~nestedlora_jax.metrics.singular_ritz`)."""
        return np.asarray(self.metrics["singular_values"])

    def __post_init__(self):
        self._embed_x = _embedding(self.apply_f, self.params_f)
        self._embed_y = _embedding(self.apply_g, self.params_g)

    def embed_x(self, x) -> np.ndarray:
        """The left features ``f(x)`` ``(n, L)`` of ``x`` ``(n, dx)`` (``(n,)`` for dx = 1)."""
        return np.asarray(self._embed_x(_rows(x)))

    def embed_y(self, y) -> np.ndarray:
        """The right features ``g(y)`` ``(n, L)`` of ``y`` ``(n, dy)``."""
        return np.asarray(self._embed_y(_rows(y)))

    def kernel(self, x, y) -> np.ndarray:
        """``f(x_i)^T g(y_j)`` ``(n, m)``: the learned rank-L approximation of the dependence
        kernel ``p(x, y) / (p(x) p(y)) - 1`` (e.g. retrieval scores of queries x in a gallery y)."""
        return self.embed_x(x) @ self.embed_y(y).T


def _rows(a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a[:, None] if a.ndim == 1 else a


def solve_pairs(
    x,
    y,
    L: int,
    *,
    x_labels=None,
    y_labels=None,
    nesting: str = "sequential",
    config: TrainingConfig | None = None,
    hidden: Sequence[int] = (64, 64, 64),
    activation: str = "silu",
    networks: tuple[nnx.Module, nnx.Module] | None = None,
    standardize: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    hooks: Sequence = (),
    progress: bool = True,
) -> PairsResult:
    """Learn the top-``L`` singular functions of the canonical dependence kernel of ``(x, y)``.

    Args:
      x: ``(N, dx)`` samples of the first view (``(N,)`` for one feature).
      y: ``(N, dy)`` samples of the second view, aligned with ``x`` (row n of both is one item);
        with labels, any count ``(Ny, dy)``.
      L: number of singular pairs.
      x_labels, y_labels: integer class labels ``(N,)``, ``(Ny,)``: class-level pairs (x and y
        drawn independently from the same class). Give both or neither.
      nesting: ``"sequential"`` (default) or ``"joint"``.
      config: a :class:`~nestedlora_jax.config.TrainingConfig`; default
        ``TrainingConfig(steps=10000, batch_size=512)`` (batches are independent draws of
        pairs, so a batch may be larger than the data).
      hidden: hidden widths of the default networks (one shared MLP per view with L outputs).
      activation: their activation, one of ``config.ACTIVATIONS`` (SiLU by default: on the
        Gaussian CDK it learned the high-degree Hermite functions faster than softplus).
      networks: your own pair of Flax NNX modules ``(f, g)`` (one point -> ``(L,)``) instead.
      standardize: the default networks see ``(x - mean) / std`` per feature, from the data.
      checkpoint_dir, resume, hooks, progress: as in :func:`~nestedlora_jax.training.fit`.

    Returns:
      A :class:`PairsResult`: ``embed_x`` / ``embed_y``, ``singular_values``, ``kernel``,
      ``metrics`` and the training result.

    Raises:
      ValueError: mismatched pair counts, empty or non-finite data, one label array without the
        other, a network for another input dimension, ``L`` different from the networks'
        outputs, an unknown nesting (each message says what to change).
    """
    L = check_num_states(L)
    if nesting not in NESTINGS:
        raise ValueError(f"unknown nesting {nesting!r}; expected one of {NESTINGS}.")
    if (x_labels is None) != (y_labels is None):
        raise ValueError("class-level pairs need labels for both views: give x_labels and "
                         "y_labels, or neither for aligned pairs.")
    data = (PairedData(x, y) if x_labels is None
            else ClassPairedData(x, x_labels, y, y_labels))
    n = data.x.shape[0]
    if config is None:
        config = TrainingConfig(steps=10000, batch_size=512)
    elif not isinstance(config, TrainingConfig):
        raise ValueError(f"config must be a TrainingConfig, got {type(config).__name__}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    seed = config.seed
    dx, dy = data.dim
    if networks is None:
        networks = tuple(
            eigenfunction_network(
                d, L, architecture="shared", hidden=hidden,
                activation=ACTIVATION_FUNCTIONS[activation],
                input_center=tuple(a.mean(axis=0)) if standardize else None,
                input_scale=tuple(np.maximum(a.std(axis=0), 1e-12)) if standardize else None,
                rngs=nnx.Rngs(params=seed + side))
            for side, (d, a) in enumerate(((dx, data.x), (dy, data.y))))
    elif not (isinstance(networks, tuple) and len(networks) == 2
              and all(isinstance(m, nnx.Module) for m in networks)):
        raise ValueError("networks must be a pair (f, g) of Flax NNX modules.")
    (apply_f, params_f), (apply_g, params_g) = to_apply(networks[0]), to_apply(networks[1])
    for name, apply, params, d, view in (("f", apply_f, params_f, dx, "x"),
                                         ("g", apply_g, params_g, dy, "y")):
        outputs = network_output_count(apply, params, d, name=f"the network {name}",
                                       data=f"the data's {view}:")
        if outputs != L:
            raise ValueError(f"the network {name} maps a point to ({outputs},), but L = {L} "
                             f"singular pairs were asked for: build it with {L} outputs.")
    result = fit((apply_f, apply_g), (params_f, params_g), dependence_kernel_operator(), data,
                 config=config, objective=nested_lora_objective(nesting),
                 checkpoint_dir=checkpoint_dir, resume=resume, hooks=hooks, progress=progress)
    pairs = PairsResult(result, apply_f, apply_g, *result.ema_params)
    xs, ys = data.sample(jax.random.PRNGKey(seed + 2), min(n, EVALUATION_PAIRS))
    # Through the result's own embeddings: each network is compiled for evaluation once.
    pairs.metrics = pair_metrics(pairs.embed_x, pairs.embed_y, xs, ys)
    return pairs
