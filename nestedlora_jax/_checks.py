"""Argument checks shared by the core and the networks: one wording, one rule, everywhere."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(x: Any) -> bool:
    """An integer (Python or numpy), and not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """``value`` as an int if it is one (not a bool, not a float) and positive (or zero)."""
    if not is_int(value) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}.")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices, why: str | None = None) -> None:
    """ValueError naming ``name``, the allowed ``choices`` and ``value`` unless ``value`` is one
    of them; ``why`` (what the option sets) is appended to the message."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}"
                         + (f": {why}" if why else "."))


def check_num_states(L: Any) -> int:
    """``L``, the number of states, as an int >= 1 (the problems' and operators' rule)."""
    if not is_int(L) or L < 1:
        raise ValueError(f"L (the number of states) must be a Python int >= 1; got {L!r}.")
    return int(L)


def check_even_batch(B: Any, name: str = "the batch size") -> int:
    """The batch size of an objective that splits the batch in two equal halves (its unbiased
    estimate of a product of expectations): even and at least 2. ``name`` says which size
    (``"TrainingConfig.batch_size"``, ``"the batch size of f"``)."""
    B = check_positive_int(name, B)
    if B % 2 or B < 2:
        raise ValueError(
            f"{name} must be even (the objective estimates a product of expectations from two "
            f"equal halves of the batch); got {B}. Use an even batch, or split_batch=False where "
            "the objective offers it."
        )
    return B


def check_hidden_widths(name: str, hidden: Any) -> tuple[int, ...]:
    """Hidden layer widths: a non-empty sequence of positive integers, as a tuple of ints."""
    try:
        sizes = tuple(hidden)
    except TypeError:
        sizes = ()
    if not sizes or any(not is_int(h) or h < 1 for h in sizes):
        raise ValueError(f"{name} must be a non-empty sequence of positive widths (layer sizes), "
                         f"got {hidden!r}.")
    return tuple(int(h) for h in sizes)


def check_input_options(*, periodic: Any, radial_input: Any, envelope: Any) -> None:
    """The input options of an eigenfunction network that exclude each other: ``|x|`` and an
    ``exp(-|x|/a)`` envelope are not periodic."""
    is_periodic = periodic is not None and periodic is not False
    if is_periodic and radial_input:
        raise ValueError("radial_input and periodic exclude each other (|x| is not periodic).")
    if is_periodic and envelope is not None:
        raise ValueError("an exp(-|x|/a) envelope is not periodic: do not combine envelope with "
                         "periodic inputs.")
