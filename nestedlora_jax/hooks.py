"""The host-side training loop and its hooks.

:func:`run_loop` is the whole loop: it runs the compiled training chunks (pure
``state -> state`` functions from :mod:`nestedlora_jax.training`) until ``loop.steps``, and
between chunks hands a :class:`Loop` (the state and the run's record) to a list of
:class:`Hook` objects. Everything else a run does is a hook, and a user may drop, reorder,
replace or add any of them:

* :class:`DivergenceGuard`: stop with :class:`TrainingDivergedError` after too many skipped steps.
* :class:`CollapseRemedy`: detect collapsed functions and re-initialise them, and put
  functions learned out of order back in order (any Optax optimiser; its counters live in
  the training state, so a resume is exact).
* :class:`Callback`: ``fn(step, state) -> dict | None`` merged into the history (e.g. a
  periodic evaluation).
* :class:`ProgressBar`: a tqdm bar.
* :class:`HistoryFile`: the JSON history, rewritten after every chunk.
* :class:`Checkpoints`: Orbax checkpoints, resume, a save on interrupt.

A hook subclasses :class:`Hook` and overrides what it needs:

``on_start(loop)``
    once, before the first chunk (a resume replaces ``loop.state`` and ``loop.history`` here);
``after_chunk(loop, entry)``
    after every chunk: may add keys to this chunk's history ``entry`` or replace
    ``loop.state`` (through ``loop.place``, which lays it out on the training devices);
``after_record(loop, entry)``
    once ``entry`` has joined ``loop.history``: show, write or save it;
``on_interrupt(loop)``
    on SIGINT / SIGTERM, before :class:`TrainingInterrupted` is raised;
``on_end(loop)``
    always, last (release files and bars), in reverse order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nestedlora_jax._checks import check_choice
from nestedlora_jax._io import write_json_atomic

__all__ = [
    "Callback",
    "Checkpoints",
    "CollapseConfig",
    "CollapseRemedy",
    "rayleigh_order",
    "rayleigh_statistics",
    "reorder_functions",
    "DivergenceGuard",
    "HistoryFile",
    "Hook",
    "Loop",
    "ProgressBar",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "check_resumed_config",
    "dead_functions",
    "formed_functions",
    "reinitialize_functions",
    "reinitializations",
    "run_loop",
]

PyTree = Any


class TrainingDivergedError(RuntimeError):
    """Raised when too many consecutive steps were skipped (non-finite or absurd values)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM, after saving a checkpoint.

    A ``KeyboardInterrupt``, so it stops a script or notebook cell like any interrupt.
    Attributes: ``signal_name`` (``"SIGINT"``/``"SIGTERM"``), ``step`` (the last completed
    step), ``checkpoint_dir`` (where that step was saved; ``None`` without one) and ``result``
    (the :class:`~nestedlora_jax.training.FitResult` of the training so far, when the loop
    was started by ``fit``).
    """

    def __init__(self, message, *, signal_name, step, checkpoint_dir, result=None):
        super().__init__(message)
        self.signal_name, self.step = signal_name, step
        self.checkpoint_dir, self.result = checkpoint_dir, result

    @property
    def exit_code(self) -> int:
        """The shell convention for death by this signal: 128 + signal number."""
        return 128 + int(getattr(signal, self.signal_name))


# ----------------------------------------------------------------- loop


@dataclasses.dataclass
class Loop:
    """What the hooks see and may change between chunks.

    Attributes:
      state: the current :class:`~nestedlora_jax.training.TrainState`.
      steps: the step the run ends at.
      config: the configuration that shapes the result (JSON-able; saved with checkpoints
        and compared on resume).
      history: one dict per chunk: ``step``, ``loss``, ``eigenvalues`` (the running
        estimates ``||f_i||^2`` of the operator's eigenvalues), ``rayleigh`` (running Rayleigh
        quotients), ``energies`` (``spectral_map`` of ``eigenvalues``, when given),
        ``bad_steps``, ``time``, and what hooks added.
      spectral_map: operator eigenvalues -> reported units (e.g. energies); with it the
        history entries also hold ``"energies"``.
      place: lays a state out on the training devices (identity on one device); apply it to
        any state a hook builds.
      start_step: the step this call started from (after a resume).
      checkpoint_dir: where the last checkpoint went (set by :class:`Checkpoints`).
    """

    state: Any
    steps: int
    config: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    spectral_map: Callable[[np.ndarray], np.ndarray] | None = None
    place: Callable[[Any], Any] = lambda state: state
    start_step: int = 0
    checkpoint_dir: str | None = None
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def metadata(self) -> dict:
        """What a checkpoint stores beside the state: the history and the configuration."""
        return {"history": self.history, "fit_config": self.config}


class Hook:
    """Base class of the loop's hooks: every method is optional (see the module docstring)."""

    def on_start(self, loop: Loop) -> None:
        pass

    def after_chunk(self, loop: Loop, entry: dict) -> None:
        pass

    def after_record(self, loop: Loop, entry: dict) -> None:
        pass

    def on_interrupt(self, loop: Loop) -> None:
        pass

    def on_end(self, loop: Loop) -> None:
        pass


def run_loop(loop: Loop, run_chunk: Callable[[Any, int], Any], hooks: Sequence[Hook], *,
             chunk_steps: int) -> Loop:
    """Run ``loop.state = run_chunk(loop.state, n)`` until ``loop.steps``, calling ``hooks``.

    Chunks end at multiples of ``chunk_steps`` (so a resumed run logs at the same steps) and
    at ``loop.steps``. SIGINT / SIGTERM finish the running chunk, call ``on_interrupt`` and
    raise :class:`TrainingInterrupted`; a second SIGINT stops at once.
    """
    hooks = list(hooks)
    try:
        with _interrupt_requests() as interrupted:
            for hook in hooks:
                hook.on_start(loop)
            loop.start_step = loop.step
            loop.t_start = time.perf_counter()
            while loop.step < loop.steps:
                if interrupted:
                    for hook in hooks:
                        hook.on_interrupt(loop)
                    saved = (f"checkpoint of step {loop.step} saved in {loop.checkpoint_dir}; "
                             "resume=True (--resume) continues it"
                             if loop.checkpoint_dir else "no checkpoint_dir, nothing saved")
                    raise TrainingInterrupted(
                        f"training interrupted by {interrupted[0]} at step {loop.step}: {saved}.",
                        signal_name=interrupted[0], step=loop.step,
                        checkpoint_dir=loop.checkpoint_dir)
                before = loop.step
                num = min(chunk_steps - before % chunk_steps, loop.steps - before)
                loop.state = run_chunk(loop.state, num)
                if loop.step == before:
                    raise TrainingDivergedError(
                        f"training made no progress at step {before}: every step is skipped "
                        "(see DivergenceGuard)."
                    )
                entry = _history_entry(loop)
                for hook in hooks:
                    hook.after_chunk(loop, entry)
                loop.history.append(entry)
                for hook in hooks:
                    hook.after_record(loop, entry)
    finally:
        for hook in reversed(hooks):
            hook.on_end(loop)
    return loop


def _history_entry(loop: Loop) -> dict:
    state = loop.state
    norms = np.asarray(state.norms)
    entry = {
        "step": loop.step,
        "loss": float(state.loss),
        "eigenvalues": norms.tolist(),
        "rayleigh": np.asarray(state.rayleigh).tolist(),
    }
    if hasattr(state, "residual_rayleigh"):  # a state of the caller's own may not keep them
        entry["residual_rayleigh"] = np.asarray(state.residual_rayleigh).tolist()
    if loop.spectral_map is not None:
        entry["energies"] = np.asarray(loop.spectral_map(norms)).tolist()
    entry.update(bad_steps=int(state.bad_steps), time=loop.elapsed)
    return entry


@contextlib.contextmanager
def _interrupt_requests():
    """Turn the first SIGINT / SIGTERM into a request (the signal's name appended to the
    yielded list) that the loop serves between chunks, where the state is consistent with
    the history; a second SIGINT raises ``KeyboardInterrupt`` at once. Python delivers signals
    only to the main thread: elsewhere (a worker thread) nothing is installed."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if requests and name == "SIGINT":
            raise KeyboardInterrupt
        requests.append(name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------- divergence


class DivergenceGuard(Hook):
    """Stop with :class:`TrainingDivergedError` once ``max_consecutive_bad`` consecutive steps
    were skipped. The compiled chunk stops stepping at the same count (``train_steps(...,
    max_consecutive_bad=)``), so the error names the step where the run diverged."""

    def __init__(self, max_consecutive_bad: int, max_abs_value: float):
        self.max_consecutive_bad, self.max_abs_value = max_consecutive_bad, max_abs_value

    def after_chunk(self, loop: Loop, entry: dict) -> None:
        state = loop.state
        if int(state.consecutive_bad) >= self.max_consecutive_bad:
            raise TrainingDivergedError(
                f"{int(state.consecutive_bad)} consecutive steps up to step {loop.step} were "
                f"skipped ({int(state.bad_steps)} in total): a non-finite loss, gradient "
                "or update, or a batch with a point whose network or operator value is "
                f"non-finite or beyond max_abs_value = {self.max_abs_value:g}; training "
                "stopped. Check the sampler (points at singularities or outside the "
                "domain), the operator's scale and the learning rate."
            )


# ----------------------------------------------------------------- collapse


# A function takes part in a reordering only once its norm is at least this fraction of its
# Rayleigh quotient (at the NestedLoRA optimum the two are equal). A function still forming, or
# just re-initialised, has a small norm and a Rayleigh quotient inflated by the components
# the earlier functions hold, so sorting by the quotient would move it ahead of converged
# functions: on 2-D hydrogen with 36 states such moves put fresh functions into the n = 3
# slots at 46k, 56k and 80k of 100k steps, and the run ended with that level at 1.8e-2
# (7.5e-4 at 65k). At the saddle the reordering is for, both functions are formed.
FORMED_RATIO = 0.5

# What a function's norm is compared with in the collapse test (CollapseConfig.reference).
COLLAPSE_REFERENCES = ("rayleigh", "residual")
REINIT_READOUTS = ("drawn", "rayleigh-ritz")


@dataclasses.dataclass(frozen=True)
class CollapseConfig:
    """Detection of collapsed functions and their re-initialisation.

    A function is *dead* when its running norm ``||f_i||^2`` has fallen below
    ``threshold`` times its running Rayleigh quotient ``<f_i, T f_i>/||f_i||^2``, or its
    Rayleigh quotient is not positive. At the NestedLoRA optimum the two are equal
    (``||f_i||^2 = lambda_i``), so the test uses only quantities known during training.
    A collapsing function keeps a meaningful direction (typically drifting into the span
    of earlier functions, so its Rayleigh quotient stays large) while its norm goes to 0.

    ``reference="residual"`` compares the norm instead with the Rayleigh quotient of the
    residual the earlier functions leave, ``(<f_i, T f_i> - sum_{j<i} <f_i, f_j>^2) /
    ||f_i||^2`` (the operator ``T - sum_{j<i} f_j f_j^T``, whose top eigenvalue is
    ``lambda_i`` once they have converged; for two families ``<f_i, T g_i>`` and
    ``<f_i, f_j><g_i, g_j>`` over ``|f_i||g_i|``; each product multiplies two independent
    estimates, from the batch's two halves or, with moment samples, one from the batch and
    one from them, so it has no bias). A function still forming holds components along earlier
    eigenfunctions that NestedLoRA removes only at a rate proportional to its own norm; they
    inflate its plain Rayleigh quotient but not the residual one. Where ``lambda_1 /
    lambda_L`` is large the plain test flags such a function again and again: on 2-D
    hydrogen with 36 states (``t_1 / t_36 = 49``) the n = 5 functions were re-initialised
    every 4000 steps up to 28k of 100k steps and now and then until 54k (with the residual
    test, on the 150k schedule: 14 checks re-initialised against 24, the last at 60k against
    74k; the n = 5 error stayed about where it was, 1.0e-2 against 1.1e-2). A function whose
    direction lies in the span of earlier ones has a residual quotient near 0 and is then
    flagged only when it is not positive. For objectives whose norms are not eigenvalues the
    two quotients are the same.

    Checks run every ``check_every`` steps between ``start_fraction`` and
    ``stop_fraction`` of training; flagged functions are recorded in the history
    (``"dead"``). With ``reinitialize`` (the default) and fresh per-function parameters to
    draw from (a leading axis of size L on every leaf, as in ``ParallelMLPs``), a dead
    function is re-initialised (:func:`reinitialize_functions`).

    With ``candidates = K > 1`` a re-initialised function is the best of ``K`` fresh draws:
    the one with the largest residual Rayleigh quotient (above) in its slot, estimated for all
    ``K`` on one common sample (:func:`~nestedlora_jax.training.fit` builds the estimate from
    the training loss on 4 batches' worth of points). A fresh function starts mostly inside
    the earlier functions' span; what it must grow from is its share of the direction they
    leave uncovered. On 36-state hydrogen the best of 16 by this quotient triples that share
    for the last n = 5 slot (median 5.9e-4 to 2.0e-3,
    ``benchmarks/results/hydrogen36_candidate_selection.py``); its effect on training is not
    measured yet. ``K = 1`` is the first draw, as before the option existed.

    With ``readout="rayleigh-ritz"`` a re-initialised function keeps its fresh draw's hidden
    layers but not its random readout: the last layer's row is the one that maximises its
    residual Rayleigh quotient in its slot over the span of its own hidden features, scaled to
    the norm the NestedLoRA optimum gives that quotient (a generalized eigenproblem of size
    ``width + 1`` on ``training.RAYLEIGH_RITZ_SAMPLES`` points,
    :func:`~nestedlora_jax.training.rayleigh_ritz_readout`; it needs the library's parallel
    networks and a per-point operator on one family). On 36-state hydrogen (2-D, seed 2 at
    76.5k steps, the last n = 5 slot) the random readouts of 16 fresh draws held a median
    1.9e-3 of their norm in the one n = 5 direction the other functions left (the best of the
    16 by residual quotient 1.5e-3); their Rayleigh-Ritz readouts held a median 0.097, 15 of
    16 above 0.04 (``benchmarks/results/hydrogen36_readout.py``). ``"drawn"`` (the default)
    keeps the draw's readout, as before the option existed.

    With ``growth = g`` (``None``, the default, as before the option existed), a flagged
    function whose running norm is more than ``1 + g`` times the one first logged after the
    previous check is still forming and is spared (recorded in the history as ``"forming"``).
    A collapsing function's norm falls and a stalled one's stays; one that grows from a small
    share of what the earlier functions leave is neither, but the plain test calls it dead
    while its norm is small. On 36-state hydrogen a function given a Rayleigh-Ritz readout
    (seed 2 at 78k steps, the last n = 5 slot) grew from 0.0004 to 0.0007 in 2000 steps, its
    Rayleigh quotient falling from 0.037 to 0.034, and the plain test would re-initialise it
    after 4000 steps; drawn functions in that slot held still or shrank.

    A function is re-initialised only after ``patience`` consecutive checks flag it: under
    sequential nesting a later function can look dead for a while before the earlier ones
    have converged, while a real collapse persists (on 2-D hydrogen with 16 states, functions
    flagged once recovered alone, which is why ``patience`` defaults to 2).

    With ``reorder`` (the default), a check that flags no function also puts the functions
    in the order of their Rayleigh quotients, largest eigenvalue first, where the order is
    resolved: the mean of the running values logged since the last check, swapped only when
    out of order by more than 4 standard errors in this check interval and in the one before
    (:func:`rayleigh_statistics`, :func:`rayleigh_order`, :func:`reorder_functions`; it needs
    3 logged values per check interval, e.g. ``log_every <= check_every / 3``, and starts at
    the second check). Only formed functions take part (:func:`formed_functions`: norm at
    least ``formed_ratio`` times the Rayleigh quotient, default ``FORMED_RATIO`` = 0.5; 0
    lets every function take part, as configurations before version 4 did); the others keep
    their slots. Two functions that have learned two
    eigenfunctions in the wrong order sit at a saddle of the nested objective, which training
    leaves at a rate proportional to their eigenvalue gap, so with close levels it stays
    there (coupled oscillator, d = 10, 32 states: half of the two-quanta functions ended
    15 000 steps at a neighbour's energy). A permutation is exact for per-function
    parameters (the same condition as re-initialisation) and objectives without state of
    their own (NestedLoRA, OMM); it is skipped for the others.
    """

    threshold: float = 0.1
    check_every: int = 2000
    start_fraction: float = 0.05
    stop_fraction: float = 0.8
    reinitialize: bool = True
    patience: int = 2
    reorder: bool = True
    formed_ratio: float = FORMED_RATIO
    reference: str = "rayleigh"
    candidates: int = 1
    readout: str = "drawn"
    growth: float | None = None

    def __post_init__(self):
        if self.growth is not None and not (isinstance(self.growth, (int, float))
                                            and not isinstance(self.growth, bool)
                                            and np.isfinite(self.growth) and self.growth > 0):
            raise ValueError(f"CollapseConfig.growth must be None or a positive number, got "
                             f"{self.growth!r}: the factor 1 + growth by which a flagged "
                             "function's norm must have grown since the last check to be spared.")
        check_choice("CollapseConfig.readout", self.readout, REINIT_READOUTS,
                     "how a re-initialised function's last layer is set ('drawn': the fresh "
                     "draw's; 'rayleigh-ritz': chosen in its slot).")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, (int, np.integer)) \
                or self.candidates < 1:
            raise ValueError(f"CollapseConfig.candidates must be a positive integer, got "
                             f"{self.candidates!r}: the fresh draws a re-initialised function is "
                             "chosen from (1: the first draw).")
        check_choice("CollapseConfig.reference", self.reference, COLLAPSE_REFERENCES,
                     "the quotient a function's norm is compared with.")
        if not (isinstance(self.formed_ratio, (int, float)) and 0 <= self.formed_ratio < 1):
            raise ValueError(f"CollapseConfig.formed_ratio must be a number in [0, 1), got "
                             f"{self.formed_ratio!r}: the fraction of its Rayleigh quotient a "
                             "function's norm must reach before it is reordered (0: every "
                             "function is).")
        if not 0 < self.threshold < 1:
            raise ValueError(f"CollapseConfig.threshold must be in (0, 1), got {self.threshold}.")
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"CollapseConfig.check_every must be a positive integer, got {self.check_every}.")
        if not isinstance(self.reorder, bool):
            raise ValueError(f"CollapseConfig.reorder must be True or False, got {self.reorder!r}.")
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"CollapseConfig.patience must be a positive integer, got {self.patience}.")
        if not 0 <= self.start_fraction <= self.stop_fraction <= 1:
            raise ValueError(
                "CollapseConfig needs 0 <= start_fraction <= stop_fraction <= 1, got "
                f"{self.start_fraction}, {self.stop_fraction}."
            )


# CollapseConfig fields added after runs were saved without them: the configuration version
# that added each, and the value the earlier runs ran. A saved configuration is read with them
# filled in (by version in config.upgrade_config_dict, by absence in a checkpoint's saved fit
# configuration); a saved value that differs from today's is still refused, by name.
COLLAPSE_FIELDS_ADDED = {"reorder": (2, False), "formed_ratio": (4, 0.0),
                         "reference": (5, "rayleigh"), "candidates": (6, 1),
                         "readout": (9, "drawn"), "growth": (9, None)}
# TrainingConfig fields added the same way.
TRAINING_FIELDS_ADDED = {"moment_sampling": (7, "random"), "batch_sampling": (8, "random")}


def with_added_fields(fit_config: dict | None) -> dict | None:
    """A saved ``fit`` configuration (``TrainingConfig.resume_key()`` plus the fit-level keys)
    with the :data:`TRAINING_FIELDS_ADDED` it lacks, and the :data:`COLLAPSE_FIELDS_ADDED` its
    collapse configuration lacks, filled in."""
    if not isinstance(fit_config, dict):
        return fit_config
    older = {name: value for name, (_, value) in TRAINING_FIELDS_ADDED.items()}
    fit_config = {**older, **fit_config}
    if not isinstance(fit_config.get("collapse"), dict):
        return fit_config
    older = {name: value for name, (_, value) in COLLAPSE_FIELDS_ADDED.items()}
    return {**fit_config, "collapse": {**older, **fit_config["collapse"]}}


def formed_functions(norms, rayleigh, ratio: float = FORMED_RATIO) -> np.ndarray:
    """Boolean mask: functions whose running norm (``||f_i||^2``, the NestedLoRA eigenvalue
    estimate) is at least ``ratio`` times their running Rayleigh quotient, which is positive."""
    norms, rayleigh = np.asarray(norms), np.asarray(rayleigh)
    return (rayleigh > 0) & (norms >= ratio * rayleigh)


def growing_functions(history: list, since_step: int, norms, growth: float) -> np.ndarray:
    """Boolean mask: functions whose running norm ``norms`` exceeds ``1 + growth`` times the
    one logged first after ``since_step`` (the previous check; the first entry after it, so
    that a function re-initialised or moved there is compared with itself). All False when
    nothing was logged after ``since_step``. A function exactly zero then never grows."""
    norms = np.asarray(norms, np.float64)
    after = [h for h in history if h["step"] > since_step and "eigenvalues" in h]
    if not after:
        return np.zeros(norms.shape, dtype=bool)
    before = np.asarray(after[0]["eigenvalues"], np.float64)
    return (before > 0) & (norms > (1.0 + growth) * before)


def dead_functions(norms, rayleigh, threshold: float) -> np.ndarray:
    """Indices of functions judged collapsed (see :class:`CollapseConfig`)."""
    norms, rayleigh = np.asarray(norms), np.asarray(rayleigh)
    return np.flatnonzero((rayleigh <= 0) | (norms < threshold * rayleigh))


def _param_shaped_parts(optimizer: optax.GradientTransformation, opt_state) -> PyTree:
    """True on the leaves of the parts of ``opt_state`` shaped like the parameters (Adam's
    moments, a momentum trace), False elsewhere (step counts, schedules): any Optax optimiser."""
    return optax.tree_utils.tree_map_params(
        optimizer, lambda part: jax.tree_util.tree_map(lambda _: True, part), opt_state,
        transform_non_params=lambda _: False)


def _rows_from(old: jax.Array, new: jax.Array, rows) -> jax.Array:
    """``old`` with the rows ``rows`` of its leading axis (the L functions) taken from ``new``."""
    return old.at[rows].set(new[rows])


def _with_rows(tree: PyTree, fresh: PyTree, rows) -> PyTree:
    """:func:`_rows_from` on every leaf of ``tree`` and ``fresh``."""
    return jax.tree_util.tree_map(lambda old, new: _rows_from(old, new, rows), tree, fresh)


def reinitialize_functions(state, optimizer: optax.GradientTransformation, fresh_params: PyTree,
                           dead) -> Any:
    """Give the functions ``dead`` (indices into the leading axis L of every parameter leaf)
    the rows of ``fresh_params``, in the parameters and their EMA.

    Their slice of the optimiser state takes the mean of the live functions' slices, in every
    part of it shaped like the parameters (found by ``optax.tree_utils.tree_map_params``, so
    any Optax optimiser is served): a fresh function has no gradient history of its own, and
    the average of the others is the estimate that keeps its first steps the size of
    everyone else's (for Adam: the second moment of a typical function, and a first moment
    near zero, the mean of independent functions' momenta; zeroing the second moment instead
    would make the next few hundred steps several times larger). With no live function left
    the slice is the optimiser's own initial state. Other state (step counts, schedules) is
    kept. The dead functions' running norms are reset to their Rayleigh quotients, so they are
    not flagged again at once.
    """
    dead = np.asarray(dead, dtype=int)
    L = state.norms.shape[0]
    alive = np.setdiff1d(np.arange(L), dead)
    idx = jnp.asarray(dead)
    params = _with_rows(state.params, fresh_params, idx)
    ema = _with_rows(state.ema_params, fresh_params, idx)
    is_param_part = _param_shaped_parts(optimizer, state.opt_state)
    if alive.size:
        live = jnp.asarray(alive)
        fill = lambda v: v.at[idx].set(jnp.mean(v[live], axis=0).astype(v.dtype))
        opt_state = jax.tree_util.tree_map(lambda v, p: fill(v) if p else v,
                                           state.opt_state, is_param_part)
    else:
        opt_state = jax.tree_util.tree_map(lambda v, init, p: _rows_from(v, init, idx) if p else v,
                                           state.opt_state, optimizer.init(params), is_param_part)
    norms = state.norms.at[idx].set(state.rayleigh[idx])
    return state._replace(params=params, ema_params=ema, opt_state=opt_state, norms=norms)


# Adjacent functions are swapped only when the later one's mean Rayleigh quotient over the
# last check interval exceeds the earlier one's by this many standard errors (estimated from the
# spread of the logged running values), in that interval and in the one before: within a
# degenerate level the order is noise, and shuffling it costs accuracy (2-D hydrogen, 9 states:
# a fixed margin of 1e-3 swapped degenerate functions at most checks and ended at 5.6e-4
# instead of 3.7e-4; one interval at 4 sigma still swapped a degenerate level once in 16
# checks, as the t-distribution of 4 logged values predicts).
REORDER_Z = 4.0
# Fewer logged values than this in a check interval give no usable spread: no reordering.
REORDER_MIN_SAMPLES = 3


def rayleigh_order(mean, standard_error=None, z: float = REORDER_Z, *, confirm=None,
                   movable=None) -> np.ndarray:
    """The permutation ``order`` (``new[i] = old[order[i]]``) that puts the Rayleigh quotients
    ``mean`` in non-increasing order up to ties that ``standard_error`` cannot resolve:
    adjacent entries are swapped (bubble sort) only while the later exceeds the earlier by
    more than ``z * sqrt(se_i^2 + se_j^2)`` (and by more than ``1e-6 * max |mean|``, so that
    exact ties stay put). With ``confirm = (mean2, se2)``, an independent estimate, a swap
    also needs the same resolved inversion there. With ``movable`` (boolean, one per entry)
    only those entries are sorted, among the slots they hold; the others keep theirs. The
    identity when nothing qualifies."""
    if movable is not None:
        slots = np.flatnonzero(np.asarray(movable, bool))
        pick = lambda v: None if v is None else np.asarray(v, np.float64)[slots]
        sub = rayleigh_order(pick(mean), pick(standard_error), z,
                             confirm=None if confirm is None else tuple(map(pick, confirm)))
        order = np.arange(np.asarray(mean).size)
        order[slots] = slots[sub]
        return order
    estimates = [(mean, standard_error)] + ([confirm] if confirm is not None else [])
    checks = []
    for m, se in estimates:
        m = np.asarray(m, np.float64)
        se = np.zeros_like(m) if se is None else np.asarray(se, np.float64)
        floor = 1e-6 * float(np.max(np.abs(m))) if m.size else 0.0
        checks.append((m, se, floor))

    def inverted(a, b):
        return all(m[b] - m[a] > max(z * np.hypot(se[a], se[b]), floor) for m, se, floor in checks)

    order = np.arange(checks[0][0].size)
    swapped = True
    while swapped:
        swapped = False
        for i in range(order.size - 1):
            a, b = order[i], order[i + 1]
            if inverted(a, b):
                order[i], order[i + 1] = b, a
                swapped = True
    return order


def rayleigh_statistics(history: list, since_step: int, current) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean, standard error and count of the running Rayleigh quotients logged after
    ``since_step`` (the history entries' ``"rayleigh"``) together with ``current``: the
    running values of successive log intervals, each an average over about ``1 / (1 -
    stats_decay)`` steps, treated as independent draws."""
    values = [np.asarray(h["rayleigh"], np.float64) for h in history
              if h["step"] > since_step and "rayleigh" in h]
    values.append(np.asarray(current, np.float64))
    values = np.stack(values)
    n = values.shape[0]
    se = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(values.shape[1], np.inf)
    return values.mean(axis=0), se, n


def reorder_functions(state, optimizer: optax.GradientTransformation, order) -> Any:
    """Permute the functions: row ``i`` of every per-function quantity becomes row
    ``order[i]`` of the old one, in the parameters, their EMA, every part of the optimiser
    state shaped like the parameters (so Adam's moments move with their function), the
    running norms and Rayleigh quotients and the collapse counters. Every parameter leaf must
    have the leading axis L (``ParallelMLPs``); the objective must keep no state of its own."""
    if jax.tree_util.tree_leaves(state.objective_state):
        raise ValueError("reorder_functions: this objective keeps state of its own "
                         "(e.g. SpIN's or NeuralEF's running averages), which a permutation "
                         "of the functions would not follow.")
    idx = jnp.asarray(np.asarray(order, dtype=int))
    take = lambda v: v[idx]
    is_param_part = _param_shaped_parts(optimizer, state.opt_state)
    opt_state = jax.tree_util.tree_map(lambda v, p: take(v) if p else v, state.opt_state,
                                       is_param_part)
    return state._replace(
        params=jax.tree_util.tree_map(take, state.params),
        ema_params=jax.tree_util.tree_map(take, state.ema_params),
        opt_state=opt_state, norms=take(state.norms), rayleigh=take(state.rayleigh),
        residual_rayleigh=take(state.residual_rayleigh), collapse_flags=take(state.collapse_flags))


def reorderings(history: list) -> list[tuple[int, list[int]]]:
    """``[(step, order), ...]``: the reorderings recorded in a history."""
    return [(h["step"], list(h["reordered"])) for h in history if h.get("reordered")]


def reinitializations(history: list) -> list[tuple[int, list[int]]]:
    """``[(step, [function indices]), ...]``: the re-initialisations recorded in a history."""
    return [(h["step"], list(h["reinitialized"])) for h in history if h.get("reinitialized")]


class CollapseRemedy(Hook):
    """Flag collapsed functions every ``config.check_every`` steps and re-initialise those
    flagged ``config.patience`` checks in a row; with ``config.reorder``, put the functions
    in the order of their Rayleigh quotients at a check that flags none (see
    :class:`CollapseConfig`).

    ``init_params(key)`` draws fresh per-function parameters (leading axis L on every leaf);
    without it collapse is only reported. The consecutive-flag counters are the state's
    ``collapse_flags``, saved with every checkpoint; the fresh parameters of step ``t`` come
    from ``fold_in(PRNGKey(seed), t)``: a resumed run re-initialises exactly as an
    uninterrupted one.
    """

    def __init__(self, config: CollapseConfig, optimizer: optax.GradientTransformation, *,
                 init_params: Callable[[jax.Array], PyTree] | None = None, seed: int = 1,
                 residual_quotients: Callable[[PyTree, Any, jax.Array], Any] | None = None,
                 choose_readout: Callable[[PyTree, jax.Array, int], tuple[PyTree, Any]] | None = None):
        reinitializing = config.reinitialize and init_params is not None
        if config.candidates > 1 and reinitializing and residual_quotients is None:
            raise ValueError(
                f"CollapseConfig(candidates={config.candidates}) chooses among fresh draws by "
                "their residual Rayleigh quotients: pass residual_quotients(params, "
                "objective_state, key) -> (L,) (fit builds it), or use candidates=1.")
        if config.readout == "rayleigh-ritz" and reinitializing and choose_readout is None:
            raise ValueError(
                "CollapseConfig(readout='rayleigh-ritz') sets a re-initialised function's last "
                "layer by Rayleigh-Ritz: pass choose_readout(params, key, i) -> (params, mu) "
                "(fit builds it, training.rayleigh_ritz_readout), or use readout='drawn'.")
        self.config, self.optimizer = config, optimizer
        self.init_params, self.seed = init_params, seed
        self.residual_quotients = residual_quotients
        self.choose_readout = choose_readout

    def after_chunk(self, loop: Loop, entry: dict) -> None:
        c, step = self.config, loop.step
        num = step - (loop.history[-1]["step"] if loop.history else loop.start_step)
        if step % c.check_every >= num or not (
                c.start_fraction * loop.steps <= step <= c.stop_fraction * loop.steps):
            return
        state = loop.state
        quotients = state.rayleigh
        if c.reference == "residual":
            quotients = getattr(state, "residual_rayleigh", None)
            if quotients is None:
                raise ValueError("CollapseConfig(reference='residual') needs a state that keeps "
                                 "running residual Rayleigh quotients (TrainState."
                                 "residual_rayleigh); this one has none: use reference='rayleigh'.")
        dead = dead_functions(state.norms, quotients, c.threshold)
        if c.growth is not None and dead.size:
            forming = dead[growing_functions(loop.history, step - c.check_every, state.norms,
                                             c.growth)[dead]]
            if forming.size:
                entry["forming"] = forming.tolist()
                dead = np.setdiff1d(dead, forming)
        entry["dead"] = dead.tolist()
        flags = np.asarray(state.collapse_flags)
        flagged = np.zeros(flags.shape, dtype=bool)
        flagged[dead] = True
        flags = np.where(flagged, flags + 1, 0)
        due = np.flatnonzero(flags >= c.patience)
        if due.size and c.reinitialize and self.init_params is not None:
            flags[due] = 0
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
            fresh = self.init_params(key)
            if c.candidates > 1:
                fresh, chosen = self._best_draws(state, key, fresh, due)
                entry["reinitialized_from_candidates"] = chosen
            state = reinitialize_functions(state, self.optimizer, fresh, due)
            entry["reinitialized"] = due.tolist()
            if c.readout == "rayleigh-ritz":
                state, entry["readout_quotients"] = self._rayleigh_ritz_readouts(state, key, due)
        if (c.reorder and not dead.size and self.init_params is not None
                and not jax.tree_util.tree_leaves(state.objective_state)):
            order = self._resolved_order(loop, state)
            if np.any(order != np.arange(order.size)):
                state = reorder_functions(state, self.optimizer, order)
                flags = flags[order]
                entry["reordered"] = order.tolist()
        loop.state = loop.place(
            state._replace(collapse_flags=jnp.asarray(flags, state.collapse_flags.dtype)))

    def _best_draws(self, state, key, first, due) -> tuple[PyTree, list[int]]:
        """For each function in ``due`` (in order, each seeing the ones chosen before it), the
        fresh draw among ``config.candidates`` with the largest residual Rayleigh quotient in
        its slot; draw 0 is ``first`` (``init_params(key)``), draw ``k`` ``init_params(
        fold_in(key, k))``, and all are scored on one sample drawn from ``fold_in(key, 2**31 - 1)``.
        Returns the parameters holding the chosen rows and the chosen draw of each."""
        draws = [first] + [self.init_params(jax.random.fold_in(key, k))
                           for k in range(1, self.config.candidates)]
        score_key = jax.random.fold_in(key, 2**31 - 1)
        params, chosen = state.params, []
        for i in np.asarray(due, dtype=int):
            put = lambda draw: _with_rows(params, draw, i)
            scores = [float(self.residual_quotients(put(d), state.objective_state, score_key)[i])
                      for d in draws]
            best = int(np.argmax(scores))
            params = put(draws[best])
            chosen.append(best)
        return params, chosen

    def _rayleigh_ritz_readouts(self, state, key, due) -> tuple[Any, list[float]]:
        """The re-initialised functions ``due`` (in order, each seeing the ones set before it)
        with their readouts chosen by :attr:`choose_readout` on a sample drawn from
        ``fold_in(key, 2**31 - 2)``, in the parameters and their EMA; their running norms and
        quotients start at the chosen quotient ``mu``. Returns the state and the ``mu``s."""
        sample_key = jax.random.fold_in(key, 2**31 - 2)
        params, quotients = state.params, []
        for i in np.asarray(due, dtype=int):
            params, mu = self.choose_readout(params, sample_key, int(i))
            quotients.append(float(mu))
        rows = jnp.asarray(np.asarray(due, dtype=int))
        # Where mu <= 0 the readout was kept: those rows keep the running values they had.
        start = jnp.asarray(quotients, state.norms.dtype)
        keep = start <= 0
        set_rows = lambda v: v.at[rows].set(jnp.where(keep, v[rows], start))
        return state._replace(
            params=params, ema_params=_with_rows(state.ema_params, params, rows),
            norms=set_rows(state.norms), rayleigh=set_rows(state.rayleigh),
            residual_rayleigh=set_rows(state.residual_rayleigh)), quotients

    def _resolved_order(self, loop: Loop, state) -> np.ndarray:
        """The reordering of this check: inversions resolved both in this check interval and
        in the one before (in this interval's labels, undoing a reordering made in between),
        so that a 4-sigma fluctuation inside a degenerate level, which a run meets now and
        then over many checks, does not shuffle it. Derived from the history alone, so a
        resumed run decides as an uninterrupted one."""
        c, step = self.config, loop.step
        L = int(np.asarray(state.rayleigh).shape[0])
        now = rayleigh_statistics(loop.history, step - c.check_every, state.rayleigh)
        earlier = [h for h in loop.history if h["step"] <= step - c.check_every]
        if not earlier or now[2] < REORDER_MIN_SAMPLES:
            return np.arange(L)
        before = rayleigh_statistics(earlier[:-1], step - 2 * c.check_every, earlier[-1]["rayleigh"])
        if before[2] < REORDER_MIN_SAMPLES:
            return np.arange(L)
        mean, se = before[0], before[1]
        if earlier[-1].get("reordered"):
            # Made after that interval's values were logged: put them in today's labels.
            moved = np.asarray(earlier[-1]["reordered"])
            mean, se = mean[moved], se[moved]
        movable = (formed_functions(state.norms, state.rayleigh, c.formed_ratio)
                   if c.formed_ratio > 0 else None)
        return rayleigh_order(now[0], now[1], confirm=(mean, se), movable=movable)


# ----------------------------------------------------------------- callbacks, progress, files


class Callback(Hook):
    """``fn(step, state) -> dict | None`` after every chunk; a returned dict is merged into
    that chunk's history entry (e.g. a periodic evaluation)."""

    def __init__(self, fn: Callable[[int, Any], dict | None]):
        if not callable(fn):
            raise ValueError(f"callback must be callable(step, state), got {type(fn).__name__}.")
        self.fn = fn

    def after_chunk(self, loop: Loop, entry: dict) -> None:
        extra = self.fn(loop.step, loop.state)
        if extra:
            entry.update(extra)


class ProgressBar(Hook):
    """A tqdm bar: step rate, loss, the first eigenvalue estimates, skipped steps."""

    def __init__(self, desc: str = "nestedlora", shown: int = 4):
        self.desc, self.shown, self.bar = desc, shown, None

    def on_start(self, loop: Loop) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=loop.steps, initial=loop.step, desc=self.desc, dynamic_ncols=True)

    def after_record(self, loop: Loop, entry: dict) -> None:
        self.bar.update(loop.step - self.bar.n)
        shown = np.asarray(entry.get("energies", entry["eigenvalues"])[: self.shown])
        self.bar.set_postfix(loss=f"{entry['loss']:.4g}", eig=np.array2string(shown, precision=4),
                             bad=entry["bad_steps"])

    def on_end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class HistoryFile(Hook):
    """Rewrite ``path`` (JSON: ``history`` and ``reinitialized``) after every chunk, atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def after_record(self, loop: Loop, entry: dict) -> None:
        write_json_atomic(self.path, {"history": loop.history,
                                      "reinitialized": reinitializations(loop.history)})


class Checkpoints(Hook):
    """Orbax checkpoints of the whole state in ``directory``: every ``every`` steps (a
    multiple of the chunk length), at the end, and on interrupt.

    A directory that already holds checkpoints needs ``resume=True``: a new run never mixes
    its checkpoints with an old one's. On resume the newest intact checkpoint replaces
    ``loop.state`` and ``loop.history`` (a damaged newer one is skipped with a warning); the
    configuration saved with it must equal ``loop.config``, or the resume is refused.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int | None = None,
                 resume: bool = False):
        self.directory, self.every, self.resume = directory, every, resume
        self.manager = None

    def on_start(self, loop: Loop) -> None:
        from nestedlora_jax import checkpoint as ckpt

        self.manager = ckpt.CheckpointManager(self.directory)
        if not self.resume and self.manager.all_steps():
            raise FileExistsError(
                f"checkpoint_dir {self.manager.directory} already holds checkpoints of a run "
                f"(steps {self.manager.all_steps()}): pass resume=True to continue it, or use an "
                "empty folder (a new run would mix its checkpoints with the old ones)."
            )
        if self.resume:
            restored = self.manager.restore_latest(loop.state)
            if restored is not None:
                state, extra = restored
                check_resumed_config(with_added_fields(extra.get("fit_config")),
                                     loop.config, self.manager.directory)
                loop.state = loop.place(state)
                loop.history = list(extra.get("history", []))
                loop.checkpoint_dir = self.manager.directory

    def after_record(self, loop: Loop, entry: dict) -> None:
        step = loop.step
        # The final state is always saved, so a finished run can be reloaded.
        if step == loop.steps or (self.every and step % self.every == 0):
            self._save(loop)

    def on_interrupt(self, loop: Loop) -> None:
        if self.manager.latest_step() != loop.step:
            self._save(loop)
        loop.checkpoint_dir = self.manager.directory

    def on_end(self, loop: Loop) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None

    def _save(self, loop: Loop) -> None:
        self.manager.save(loop.step, loop.state, loop.metadata())
        loop.checkpoint_dir = self.manager.directory


def check_resumed_config(saved: dict | None, current: dict, directory: str, *,
                         saved_values: str = "the saved values") -> None:
    """Refuse to resume the run in ``directory`` when its saved configuration differs from
    ``current`` (nested dicts), naming each differing field (``training.steps: saved 100, now
    200``). ``saved=None`` (a run from before configurations were recorded) passes."""
    if saved is None:
        return
    differ = _differences(saved, current)
    if differ:
        raise ValueError(
            f"cannot resume the run in {directory} with a different configuration "
            f"({', '.join(differ)}): the result would mix two runs. Resume with {saved_values}, "
            "or start a new run in another folder."
        )


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: saved {a!r}, now {b!r}"]
