"""Run folders that never lose work, and command-line values checked before anything runs.

A benchmark writes everything of a run under one ``--out`` folder: ``run_config.json`` (the
configuration, written before training starts), per-seed ``history.json`` and
``checkpoints/``, ``results.json`` and figures. :func:`prepare_run_folder` is the one gate
every command passes before it trains:

* a folder that already holds a run is refused unless ``--resume`` (continue it) or
  ``--overwrite`` (replace it: only the run's own files are removed) is given, so a second
  run never trains for hours and then dies at its first save, or silently replaces results;
* ``--resume`` compares the saved configuration with the new one and refuses a change of any
  value that shapes the result, naming each differing option;
* a symlink inside the folder that points outside it is refused: no writer follows a
  planted link out of ``--out``.

The ``positive_int`` / ``non_negative_int`` / ``positive_float`` argparse types turn a bad
value (0, negative, NaN, inf, non-integer) into a one-line usage error.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil

from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.config import SHARED_NETWORK_METHODS

__all__ = [
    "RUN_CONFIG",
    "RunFolderError",
    "escaping_symlinks",
    "non_negative_int",
    "positive_float",
    "check_no_escaping_symlinks",
    "check_sizes",
    "check_training_args",
    "positive_int",
    "prepare_run_folder",
    "seed_int",
]

RUN_CONFIG = "run_config.json"
# What a run writes at the top of its folder (figures are matched by extension).
_RUN_FILES = ("results.json", "grid_baseline.json")
_RUN_GLOBS = ("seed*", "*.png")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (it holds another run, a changed configuration
    was resumed, or it has a symlink pointing outside it)."""


# ----------------------------------------------------------------------- argparse types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int(text, 0)


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**31 - 16] (PRNG keys take 32 bits)."""
    value = _int(text, 0)
    if value > 2**31 - 16:
        raise argparse.ArgumentTypeError(f"must be at most {2**31 - 16} (seeds are 32-bit), got {value}")
    return value


def check_sizes(*, states: int, batch: int | None, hidden, dim: int, architecture: str = "parallel") -> None:
    """Refuse sizes that cannot run on any machine this library targets (a typo such as an
    extra zero), with the option to change: ``ValueError``."""
    if states > 4096:
        raise ValueError(f"--states {states}: more than 4096 functions is beyond what one network "
                         "can learn here; use fewer.")
    if batch is not None and batch > 2**20:
        raise ValueError(f"--batch {batch}: over 2^20 samples per step would need tens of GB for "
                         "the Laplacians; use a smaller batch (512-4096 is typical).")
    widths = [dim + 1] + list(hidden or ((32, 32, 32) if architecture == "parallel" else (128, 128, 128))) + [1]
    per_net = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    params = per_net * (states if architecture == "parallel" else 1)
    if params * 4 * 4 > 8e9:  # parameters, two Adam moments and the EMA, float32
        raise ValueError(f"--hidden {' '.join(map(str, hidden or []))}: the network would have "
                         f"{params:.3g} parameters (over 8 GB with the optimizer state); use "
                         "narrower layers.")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float(text, allow_zero=False)


def positive_float_or_zero(text: str) -> float:
    """argparse type: a finite number >= 0 (0 typically meaning "none")."""
    return _float(text, allow_zero=True)


def zero_means_none(value):
    """An option whose explicit 0 means "none" (``--moment-batch 0``, ``--network-length 0``):
    ``None`` for 0, the value otherwise (``None`` stays ``None``)."""
    return None if value == 0 else value


def _float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0 (0: none)" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
    return abs(value)  # -0.0 -> 0.0


# ----------------------------------------------------------------------- run folders


def run_entries(out_dir: str) -> list[str]:
    """The entries of ``out_dir`` that hold a run's work (empty: no run there).

    ``run_config.json`` alone and empty folders are not work: a command that stopped at a bad
    option after the folder was prepared (its check in ``solve`` comes after this gate) must
    not make the next, corrected command need ``--overwrite``.
    """
    found = [os.path.join(out_dir, f) for f in _RUN_FILES if os.path.lexists(os.path.join(out_dir, f))]
    for pattern in _RUN_GLOBS:
        found += glob.glob(os.path.join(glob.escape(out_dir), pattern))
    return sorted(e for e in set(found) if not _is_empty_folder(e))


def _is_empty_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not any(os.scandir(path))


def escaping_symlinks(out_dir: str) -> list[str]:
    """Symlinks under ``out_dir`` whose target lies outside it (or dangles outside it)."""
    root = os.path.realpath(out_dir)
    bad = []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if os.path.commonpath([root, target]) != root:
                    bad.append(path)
    return bad


def check_no_escaping_symlinks(out_dir: str) -> None:
    """``RunFolderError`` if a symlink under ``out_dir`` points outside it."""
    bad = escaping_symlinks(out_dir)
    if bad:
        raise RunFolderError(
            f"--out {out_dir} holds symlinks pointing outside it ({', '.join(bad[:3])}): a run "
            "would write through them. Remove them, or use another folder."
        )


def check_training_args(args, dim: int) -> None:
    """The checks both training commands share (``--states``, ``--batch``, ``--hidden``,
    ``--seeds``): ``ValueError`` naming the option."""
    check_sizes(states=args.states, batch=args.batch, hidden=args.hidden, dim=dim,
                architecture="shared" if args.method in SHARED_NETWORK_METHODS else "parallel")
    if args.batch is not None and args.batch % 2:
        raise ValueError(f"--batch must be even (the objective splits it in halves), got {args.batch}.")
    if getattr(args, "moment_batch", None) is not None:
        from nestedlora_jax.solver import make_objective  # the objective says; jax only here

        if not make_objective(args.method).takes_moment_samples:
            raise ValueError(f"--moment-batch applies to the neuralsvd methods only (NestedLoRA's "
                             f"second moments); {args.method} does not use it.")
    if getattr(args, "moment_sampling", None) == "lattice" and getattr(args, "moment_batch", None) is None:
        raise ValueError(f"--moment-sampling {args.moment_sampling} draws the moment samples, but "
                         "there are none: give --moment-batch N (N > 0).")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeated seeds: {args.seeds}.")


def prepare_run_folder(out_dir: str, config: dict, *, resume: bool, overwrite: bool,
                       result_keys: tuple[str, ...], added_options: dict | None = None) -> None:
    """Make ``out_dir`` ready for a run with ``config`` (a JSON-able dict), or refuse.

    Args:
      out_dir: the run folder (created if missing).
      config: the run's configuration; written to ``run_config.json``.
      resume: continue the run in ``out_dir``: allowed only if its saved configuration agrees
        with ``config`` on every key in ``result_keys``.
      overwrite: replace the run in ``out_dir`` (its files only; other files are kept).
      result_keys: the options that shape the result (a resume must not change them).
      added_options: result keys added after runs were first recorded, with the value every
        run had before: a saved configuration without such a key is read with that value.

    Raises:
      RunFolderError: ``out_dir`` is a file; it holds a run and neither ``resume`` nor
        ``overwrite`` is given; a resume changes a value in ``result_keys``; both ``resume`` and
        ``overwrite``; a symlink in ``out_dir`` points outside it.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: give one.")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise RunFolderError(f"--out {out_dir} is a file, not a folder.")
    os.makedirs(out_dir, exist_ok=True)
    check_no_escaping_symlinks(out_dir)
    entries = run_entries(out_dir)
    if entries and not resume and not overwrite:
        shown = ", ".join(os.path.relpath(e, out_dir) for e in entries[:4])
        raise RunFolderError(
            f"--out {out_dir} already holds a run ({shown}): --resume continues it, --overwrite "
            "replaces it, or choose another --out."
        )
    saved_path = os.path.join(out_dir, RUN_CONFIG)
    if resume and os.path.exists(saved_path):
        with open(saved_path) as fh:
            saved = json.load(fh)
        saved = (added_options or {}) | saved
        differ = [k for k in result_keys if _jsonable(saved.get(k)) != _jsonable(config.get(k))]
        if differ:
            details = ", ".join(f"--{k.replace('_', '-')}: saved {saved.get(k)!r}, now {config.get(k)!r}"
                                for k in differ)
            raise RunFolderError(
                f"--resume with a changed configuration ({details}): the result would mix two "
                "runs. Resume with the saved values, or start a new run (another --out, or "
                "--overwrite)."
            )
    if overwrite:
        for entry in entries:
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
    write_json_atomic(saved_path, config)


def _jsonable(value):
    return json.loads(json.dumps(value))
