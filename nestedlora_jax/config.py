"""Configuration as data: what a run is, in small frozen dataclasses.

* :class:`NetworkConfig`: the eigenfunction network (architecture, widths, input features).
* :class:`OperatorConfig`: how ``T = scale * (-H) + shift`` is built (Laplacian, scaling).
* :class:`TrainingConfig`: steps, batch, optimiser settings, seed, guards, collapse remedy.
* :class:`EvaluationConfig`: the final and the periodic evaluation.
* :class:`SolveConfig`: the four above plus the method; what :func:`~nestedlora_jax.solve`
  takes and writes beside its checkpoints, so that ``restore(run_dir)`` needs nothing else.

Every field is checked when the object is made (types, ranges, options that exclude each
other), so a bad configuration fails in one place, before anything is compiled. ``to_dict``
gives plain JSON; ``from_dict`` reads it back and refuses a dictionary written by another
configuration version or carrying unknown fields. Change one field with
``dataclasses.replace(config, steps=...)``, or a nested one with :meth:`SolveConfig.replace`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nestedlora_jax._checks import (
    check_choice,
    check_hidden_widths,
    check_input_options,
    check_positive_float,
    check_positive_int,
    is_int,
)
from nestedlora_jax.operators import MAX_ABS_OPERATOR_VALUE

__all__ = [
    "CONFIG_VERSION",
    "METHODS",
    "SHARED_NETWORK_METHODS",
    "ConfigVersionError",
    "EvaluationConfig",
    "NetworkConfig",
    "OperatorConfig",
    "SolveConfig",
    "TrainingConfig",
    "CollapseConfig",
]

# Version 1: the first configuration written beside checkpoints.
# Version 2: NetworkConfig.gaussian_envelope and CollapseConfig.reorder (both on by default).
# Version 3: SolveConfig.guard_functions (0 by default, as versions 1 and 2 trained).
# Version 4: CollapseConfig.formed_ratio (0.5: only formed functions are reordered; versions
# 2 and 3 reordered every function, and read as 0).
# Version 5: CollapseConfig.reference ("rayleigh" by default, the test every earlier version
# ran).
# Version 6: CollapseConfig.candidates (1 by default: the single fresh draw every earlier
# version took).
# Version 7: TrainingConfig.moment_sampling ("random" by default, what every earlier version
# drew).
# Version 8: TrainingConfig.batch_sampling ("random" by default, what every earlier version
# drew).
# Version 9: CollapseConfig.readout ("drawn" by default: the fresh draw's own last layer, what
# every earlier version kept) and CollapseConfig.growth (None: no flagged function is spared).
# A version-1 configuration is read with both off, as it was trained.
CONFIG_VERSION = 9
READABLE_CONFIG_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)


def upgrade_config_dict(data: dict) -> dict:
    """A saved :class:`SolveConfig` dictionary of a readable older version, as the current
    version reads it (the same run): version 1 had no Gaussian envelope and no reordering;
    versions before 4 reordered functions still forming too (``formed_ratio`` 0); versions
    before 5 compared norms with Rayleigh quotients, the default ``reference``; versions
    before 6 took one fresh draw, the default ``candidates``; versions before 7 drew random
    moment samples and versions before 8 a random batch (``TRAINING_FIELDS_ADDED``); versions
    before 9 kept a fresh draw's readout and spared no growing function, the defaults
    ``readout`` and ``growth``."""
    version = data.get("version")
    if version in (1, 2, 3, 4, 5, 6, 7, 8):
        network = dict(data.get("network") or {})
        training = dict(data.get("training") or {})
        collapse = training.get("collapse")
        if version == 1:
            network.setdefault("gaussian_envelope", False)
        if isinstance(collapse, dict):
            older = {name: value for name, (added, value) in COLLAPSE_FIELDS_ADDED.items()
                     if version < added}
            training["collapse"] = {**older, **collapse}
        training = {**{name: value for name, (added, value) in TRAINING_FIELDS_ADDED.items()
                       if version < added}, **training}
        data = {**data, "network": network, "training": training, "version": CONFIG_VERSION}
    return data

MAX_SEED = 2**31 - 16  # seeds are 32-bit; fit and solve derive seed + 1 and seed + 7
METHODS = ("neuralsvd-seq", "neuralsvd-joint", "neuralef", "spin", "spin-batch-jacobian",
           "omm-seq", "omm-joint", "omm-sanger")
# Joint nesting trains one network with L outputs; the other methods L parallel networks.
SHARED_NETWORK_METHODS = ("neuralsvd-joint", "omm-joint")
ACTIVATIONS = ("softplus", "tanh", "silu", "gelu")
ARCHITECTURES = ("parallel", "shared")
ENVELOPES = (None, "fixed", "learnable")
MOMENT_SAMPLINGS = ("random", "lattice")
BATCH_SAMPLINGS = ("random", "lattice")
EVALUATION_MODES = ("auto", "grid", "mc")
# Imported here so that its name is part of the configuration vocabulary.
from nestedlora_jax.hooks import (COLLAPSE_FIELDS_ADDED, TRAINING_FIELDS_ADDED,  # noqa: E402
                                  CollapseConfig)


class ConfigVersionError(ValueError):
    """A saved configuration was written by an incompatible version of the library."""


def _check_seed(seed: Any) -> None:
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        # PRNGKey takes 32 bits (a larger int is silently truncated: 2**40 gives the key of 0).
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}.")


class _Config:
    """Shared JSON round trip of the configuration dataclasses."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = value.to_dict() if isinstance(value, _Config) else dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigVersionError(
                f"{cls.__name__}: unknown field(s) {unknown} (written by another version of "
                f"nestedlora_jax?); known fields: {sorted(names)}."
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            nested = _NESTED.get((cls.__name__, f.name))
            if nested is not None and value is not None:
                value = nested.from_dict(value) if issubclass(nested, _Config) else nested(**value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetworkConfig(_Config):
    """The eigenfunction network (:func:`~nestedlora_jax.networks.eigenfunction_network`).

    Attributes:
      architecture: ``"parallel"`` (one MLP per function; the re-initialisation of collapsed
        functions needs it) or ``"shared"`` (one MLP with L outputs); ``None``: shared for
        joint nesting, parallel otherwise.
      hidden: hidden widths; ``None``: (32, 32, 32) parallel, (64, 64, 64) shared.
      activation: one of ``"softplus"``, ``"tanh"``, ``"silu"``, ``"gelu"``.
      fourier_features: ``None`` or ``(num, scale)`` frozen random Fourier features.
      radial_input: append ``|x|`` to the input; ``None``: the problem's choice (Coulomb
        problems ask for it).
      periodic: periodic input embedding; ``None``: the problem's choice.
      envelope: ``None``, ``"fixed"`` or ``"learnable"`` ``exp(-|x| / a)`` envelope.
      envelope_decay: its length ``a``.
      standardize_input: apply the problem's input standardization (``(x - center) / scale``,
        :meth:`~nestedlora_jax.problems.Problem.input_standardization`) when it has one.
      gaussian_envelope: multiply the output by the problem's Gaussian envelope
        (:meth:`~nestedlora_jax.problems.Problem.gaussian_envelope`, harmonically confined
        problems) when it has one.
    """

    architecture: str | None = None
    hidden: tuple[int, ...] | None = None
    activation: str = "softplus"
    fourier_features: tuple[int, float] | None = None
    radial_input: bool | None = None
    periodic: bool | None = None
    envelope: str | None = None
    envelope_decay: float = 1.0
    standardize_input: bool = True
    gaussian_envelope: bool = True

    def __post_init__(self):
        if self.architecture is not None:
            check_choice("NetworkConfig.architecture", self.architecture, ARCHITECTURES)
        if self.hidden is not None:
            object.__setattr__(self, "hidden", check_hidden_widths("NetworkConfig.hidden", self.hidden))
        check_choice("NetworkConfig.activation", self.activation, ACTIVATIONS)
        if self.fourier_features is not None:
            ff = self.fourier_features
            if not (isinstance(ff, (list, tuple)) and len(ff) == 2 and is_int(ff[0]) and ff[0] >= 1
                    and isinstance(ff[1], (int, float)) and math.isfinite(ff[1]) and ff[1] > 0):
                raise ValueError(
                    f"NetworkConfig.fourier_features must be None or (num >= 1, scale > 0), got {ff!r}."
                )
            object.__setattr__(self, "fourier_features", (int(ff[0]), float(ff[1])))
        for name in ("radial_input", "periodic"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"NetworkConfig.{name} must be None, True or False, got "
                                 f"{getattr(self, name)!r}.")
        check_choice("NetworkConfig.envelope", self.envelope, ENVELOPES)
        check_input_options(periodic=self.periodic, radial_input=self.radial_input,
                            envelope=self.envelope)
        check_positive_float("NetworkConfig.envelope_decay", self.envelope_decay)
        for name in ("standardize_input", "gaussian_envelope"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NetworkConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatorConfig(_Config):
    """How :func:`~nestedlora_jax.operators.problem_operator` builds ``T``.

    Attributes:
      laplacian: a method of :data:`~nestedlora_jax.laplacians.LAPLACIAN_METHODS`.
      num_probes: probe vectors of the stochastic Laplacians (``"hutchinson"``,
        ``"hutchinson_gaussian"``): needed by them, refused by the others.
      scale, shift: ``T = scale * (-H) + shift``; ``None``: from the problem's energies (or,
        for an unknown spectrum, the Rayleigh-Ritz energies of the initial network).
    """

    laplacian: str = "default"
    num_probes: int | None = None
    scale: float | None = None
    shift: float | None = None

    def __post_init__(self):
        from nestedlora_jax.laplacians import LAPLACIAN_METHODS, STOCHASTIC_LAPLACIAN_METHODS

        check_choice("OperatorConfig.laplacian", self.laplacian, LAPLACIAN_METHODS)
        if self.laplacian in STOCHASTIC_LAPLACIAN_METHODS:
            if self.num_probes is None:
                raise ValueError(f"OperatorConfig: laplacian={self.laplacian!r} needs num_probes "
                                 "(e.g. num_probes=8).")
            check_positive_int("OperatorConfig.num_probes", self.num_probes)
        elif self.num_probes is not None:
            raise ValueError(f"OperatorConfig: num_probes is for the stochastic Laplacians "
                             f"{STOCHASTIC_LAPLACIAN_METHODS}, not {self.laplacian!r}; leave it None.")
        if self.scale is not None:
            check_positive_float("OperatorConfig.scale", self.scale)
        if self.shift is not None and (isinstance(self.shift, bool)
                                       or not isinstance(self.shift, (int, float))
                                       or not math.isfinite(self.shift)):
            raise ValueError(f"OperatorConfig.shift must be None or a finite number, got {self.shift!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig(_Config):
    """What :func:`~nestedlora_jax.training.fit` does, as data.

    Attributes:
      steps: optimisation steps (``0``: the initial state).
      batch_size: samples per step (even for the objectives that split the batch in halves).
      moment_batch_size: ``None``, or moment samples per step: points drawn besides the batch
        where the networks are only evaluated (no operator, no backward pass), on which
        NestedLoRA estimates the second moments ``<f_i, f_j>`` its gradient multiplies (see
        :func:`~nestedlora_jax.objectives.nested_lora_loss`); ``None`` estimates them from the
        two halves of the batch.
      moment_sampling: how the moment samples are drawn: ``"random"`` (independent draws of the
        sampler) or ``"lattice"`` (a randomly shifted lattice mapped through the sampler's
        inverse transform, :func:`~nestedlora_jax.lattice.lattice_sample`: each point drawn
        from the sampler's density, so the moments stay unbiased, with errors that fall
        faster than ``1 / sqrt(moment_batch_size)`` for smooth functions in low dimension).
        ``"lattice"`` needs ``moment_batch_size`` and a sampler with ``from_uniforms``.
      batch_sampling: how the batch itself (where the operator and the gradient are
        evaluated) is drawn: ``"random"`` or ``"lattice"``, as for ``moment_sampling``; for an
        objective that splits the batch in halves (no moment samples), each half is its own
        lattice, so the two halves stay independent. ``"lattice"`` needs a sampler with
        ``from_uniforms``.
      learning_rate: peak rate of the default optimiser (Adam, cosine-decayed to 1%);
        ``None`` means 3e-3, which trained every measured problem (from the 2-D oscillator and
        hydrogen to the coupled oscillator in d = 5) faster than 1e-3. Must stay ``None``
        when an optimiser is passed: that optimiser carries its own rate.
      ema_decay: decay of the parameter average used for evaluation, in [0, 1).
      seed: PRNG seed in [0, 2^31 - 16]; the same seed on the same machine gives the same
        numbers.
      log_every: steps per compiled chunk; history, progress and hooks run between chunks.
      checkpoint_every: steps between checkpoints (a multiple of ``log_every``); ``None``: the
        final state only (and on interrupt).
      max_consecutive_bad_steps: stop after this many consecutive skipped steps.
      max_abs_value: a batch with a network or operator value beyond this magnitude (or
        non-finite) is skipped.
      collapse: collapse detection and re-initialisation; ``None`` turns it off.
    """

    steps: int = 20000
    batch_size: int = 512
    moment_batch_size: int | None = None
    moment_sampling: str = "random"
    batch_sampling: str = "random"
    learning_rate: float | None = None
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int | None = None
    max_consecutive_bad_steps: int = 100
    max_abs_value: float = MAX_ABS_OPERATOR_VALUE
    collapse: CollapseConfig | None = CollapseConfig()

    DEFAULT_LEARNING_RATE = 3e-3
    # Fields a resumed run may change: where checkpoints go and how often.
    RESUME_EXEMPT = ("checkpoint_every",)

    def __post_init__(self):
        check_positive_int("TrainingConfig.steps", self.steps, allow_zero=True)
        check_positive_int("TrainingConfig.batch_size", self.batch_size)
        if self.moment_batch_size is not None:
            check_positive_int("TrainingConfig.moment_batch_size", self.moment_batch_size)
        check_choice("TrainingConfig.moment_sampling", self.moment_sampling, MOMENT_SAMPLINGS)
        if self.moment_sampling != "random" and self.moment_batch_size is None:
            raise ValueError(
                f"TrainingConfig.moment_sampling={self.moment_sampling!r} draws the moment samples, "
                "but moment_batch_size is None (no moment samples): set moment_batch_size, "
                "e.g. 2048, or leave moment_sampling 'random'.")
        check_choice("TrainingConfig.batch_sampling", self.batch_sampling, BATCH_SAMPLINGS)
        if self.learning_rate is not None:
            check_positive_float("TrainingConfig.learning_rate", self.learning_rate)
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                or not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainingConfig.ema_decay must be a number in [0, 1), got {self.ema_decay!r}.")
        _check_seed(self.seed)
        check_positive_int("TrainingConfig.log_every", self.log_every)
        if self.checkpoint_every is not None and (
                not is_int(self.checkpoint_every) or self.checkpoint_every < 1
                or self.checkpoint_every % self.log_every):
            raise ValueError(
                f"TrainingConfig.checkpoint_every ({self.checkpoint_every!r}) must be a positive "
                f"multiple of log_every ({self.log_every})."
            )
        check_positive_int("TrainingConfig.max_consecutive_bad_steps", self.max_consecutive_bad_steps)
        check_positive_float("TrainingConfig.max_abs_value", self.max_abs_value)
        if self.collapse is not None and not isinstance(self.collapse, CollapseConfig):
            raise ValueError(f"TrainingConfig.collapse must be a CollapseConfig or None, got "
                             f"{self.collapse!r}.")

    @property
    def peak_learning_rate(self) -> float:
        """``learning_rate``, or the default 3e-3 when it is ``None``."""
        return self.DEFAULT_LEARNING_RATE if self.learning_rate is None else float(self.learning_rate)

    def resume_key(self) -> dict:
        """The fields a resumed run must share with the saved one (all but where checkpoints
        go and how often)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUME_EXEMPT}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationConfig(_Config):
    """The evaluation :func:`~nestedlora_jax.solve` runs.

    Attributes:
      mode: ``"grid"`` (quadrature, d <= 2), ``"mc"`` (fresh Monte Carlo samples, with
        standard errors) or ``"auto"`` (grid when d <= 2).
      num_samples: Monte Carlo samples of the final evaluation.
      grid_size: nodes per axis of the quadrature grid.
      every: also evaluate every this many steps (a multiple of ``TrainingConfig.log_every``)
        on ``num_periodic_samples`` fixed samples, into the history; ``None``: never.
      num_periodic_samples: samples of the periodic evaluation.
    """

    mode: str = "auto"
    num_samples: int = 2**18
    grid_size: int = 200
    every: int | None = None
    num_periodic_samples: int = 8192

    def __post_init__(self):
        check_choice("EvaluationConfig.mode", self.mode, EVALUATION_MODES)
        check_positive_int("EvaluationConfig.num_samples", self.num_samples)
        check_positive_int("EvaluationConfig.grid_size", self.grid_size)
        if self.grid_size < 2:
            raise ValueError(f"EvaluationConfig.grid_size must be >= 2 nodes per axis, got {self.grid_size}.")
        if self.every is not None:
            check_positive_int("EvaluationConfig.every", self.every)
        check_positive_int("EvaluationConfig.num_periodic_samples", self.num_periodic_samples)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolveConfig(_Config):
    """Everything :func:`~nestedlora_jax.solve` needs besides the problem and L.

    Attributes:
      method: one of :data:`METHODS` (``"neuralsvd-seq"``: NestedLoRA
        with sequential nesting; ``"neuralsvd-joint"``; the baselines ``"neuralef"``,
        ``"spin"`` (with the parameter-space Jacobian average of Pfau et al.),
        ``"spin-batch-jacobian"`` (the current batch's Jacobian instead); the orbital
        minimisation objectives ``"omm-seq"``, ``"omm-joint"``, ``"omm-sanger"``).
      network, operator, training, evaluation: the parts.
      guard_functions: train ``L + guard_functions`` functions and report the first ``L``
        (the guard vectors of block eigensolvers). The nested objectives give the first
        ``L`` the same optimum either way; the extra functions matter where the cut at ``L``
        falls inside a dense part of the spectrum. There a function can settle on a level
        beyond ``L`` and leave a level of the window held by none. A guard function is
        drawn to the highest level the others leave free, and the reordering at the
        collapse checks (``CollapseConfig.reorder``) moves it into the window. The network,
        the operator's scaling and the training see ``L + guard_functions`` states; the
        evaluation, the metrics and the table see ``L``.
    """

    method: str = "neuralsvd-seq"
    network: NetworkConfig = NetworkConfig()
    operator: OperatorConfig = OperatorConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    guard_functions: int = 0

    def __post_init__(self):
        check_choice("SolveConfig.method", self.method, METHODS)
        check_positive_int("SolveConfig.guard_functions", self.guard_functions, allow_zero=True)
        for name, cls in (("network", NetworkConfig), ("operator", OperatorConfig),
                          ("training", TrainingConfig), ("evaluation", EvaluationConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"SolveConfig.{name} must be a {cls.__name__}, got "
                                 f"{getattr(self, name)!r}.")
        every, log_every = self.evaluation.every, self.training.log_every
        if every is not None and every % log_every:
            raise ValueError(f"EvaluationConfig.every ({every}) must be a multiple of "
                             f"TrainingConfig.log_every ({log_every}).")

    @property
    def architecture(self) -> str:
        """The network architecture this method uses."""
        if self.network.architecture is not None:
            return self.network.architecture
        return "shared" if self.method in SHARED_NETWORK_METHODS else "parallel"

    def replace(self, **changes) -> "SolveConfig":
        """A copy with fields changed; nested fields by part, e.g.
        ``config.replace(training={"steps": 1000}, method="neuralsvd-joint")``."""
        parts = {}
        for name, value in changes.items():
            current = getattr(self, name) if hasattr(self, name) else None
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                value = dataclasses.replace(current, **value)
            parts[name] = value
        return dataclasses.replace(self, **parts)

    def to_dict(self) -> dict:
        return {"version": CONFIG_VERSION, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "SolveConfig":
        if not isinstance(data, dict):
            raise ValueError(f"SolveConfig.from_dict needs a dict, got {type(data).__name__}.")
        version = data.get("version")
        if version not in READABLE_CONFIG_VERSIONS:
            raise ConfigVersionError(
                f"this configuration has version {version!r}, but this nestedlora_jax reads "
                f"versions {READABLE_CONFIG_VERSIONS}: it was written by an incompatible version; "
                "rerun, or load it with the version that wrote it."
            )
        data = upgrade_config_dict(data)
        return super().from_dict({k: v for k, v in data.items() if k != "version"})


_NESTED = {
    ("SolveConfig", "network"): NetworkConfig,
    ("SolveConfig", "operator"): OperatorConfig,
    ("SolveConfig", "training"): TrainingConfig,
    ("SolveConfig", "evaluation"): EvaluationConfig,
    ("TrainingConfig", "collapse"): CollapseConfig,
}
