"""Orbax checkpoints of a training state (parameters, EMA, optimizer state, step, counters).

Orbax writes each checkpoint to a temporary directory and renames it when complete, so an
interrupted save never leaves a half-written checkpoint that ``restore_latest`` would pick
up. The PRNG state needs no saving of its own: step ``t`` always uses
``fold_in(PRNGKey(seed), t)``, so the restored ``step`` determines every later sample.

A checkpoint damaged after it was written (a truncated or corrupted file, missing metadata,
an empty step folder) is not fatal: ``restore_latest`` falls back to the newest intact one,
moves the damaged folder aside (``<step>.damaged``, so nothing is deleted and a later save of
that step does not collide with it) and warns, naming the step and the reason.
"""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointManager", "CheckpointMismatchError", "DamagedCheckpointError", "state_signature"]


class CheckpointMismatchError(ValueError):
    """The saved state has other shapes or structure than the one it is restored into (a run
    resumed with a different number of states, network or optimizer)."""


class DamagedCheckpointError(RuntimeError):
    """No checkpoint in the directory could be read."""


def state_signature(state: Any) -> list[list]:
    """``[[path, shape, dtype], ...]`` of every leaf: what a restore must match."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [[jax.tree_util.keystr(p), [int(n) for n in np.shape(x)],
             str(np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype))] for p, x in leaves]


def _signature_difference(saved: list, wanted: list, limit: int = 4) -> str:
    saved_map = {p: (s, d) for p, s, d in saved}
    wanted_map = {p: (s, d) for p, s, d in wanted}
    lines = []
    for p in wanted_map:
        if p not in saved_map:
            lines.append(f"{p}: not in the checkpoint")
        elif saved_map[p] != wanted_map[p]:
            (s1, d1), (s2, d2) = saved_map[p], wanted_map[p]
            lines.append(f"{p}: saved {tuple(s1)} {d1}, expected {tuple(s2)} {d2}")
    lines += [f"{p}: in the checkpoint only" for p in saved_map if p not in wanted_map]
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def _without_added_fields(like: Any):
    """``like`` without the fields its NamedTuple type gained after checkpoints were written
    (its class attribute ``ADDED_FIELDS``: field name -> how to fill it from a dict of the
    older state's fields), as a NamedTuple of the older fields; ``None`` if it has none."""
    added = getattr(type(like), "ADDED_FIELDS", None)
    if not added or not hasattr(like, "_asdict"):
        return None
    fields = {k: v for k, v in like._asdict().items() if k not in added}
    return collections.namedtuple(type(like).__name__, list(fields))(**fields)


class CheckpointManager:
    """Save / restore a pytree state plus JSON metadata under ``directory``.

    Keeps the ``max_to_keep`` newest checkpoints. Saves are synchronous (a checkpoint
    returned from ``save`` is on disk), which keeps a resumed run bit-identical to an
    uninterrupted one and costs little at the intervals training uses. Every save records
    the state's signature (leaf paths, shapes, dtypes), so a restore into a differently
    shaped state fails with a message naming the differing leaves.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"checkpoint directory {self.directory} is a file, not a folder.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
        metadata = dict(metadata or {}, state_signature=state_signature(state))
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(metadata),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, like: Any) -> tuple[Any, dict] | None:
        """Restore the newest intact checkpoint into the structure of ``like``.

        Returns ``(state, metadata)``, or ``None`` if the directory has no checkpoint.

        A checkpoint written before ``like``'s NamedTuple type gained fields (listed in its
        class attribute ``ADDED_FIELDS``, each with a function of the older fields that fills
        it) is restored without them and filled: runs saved by an earlier version still load
        and resume.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint holds a state of other
            shapes than ``like`` (a changed configuration: not a damaged file, so no fallback).
          DamagedCheckpointError: checkpoints exist but none could be read (each one's reason
            is in the message).
        """
        try:
            return self._restore_latest(like)
        except CheckpointMismatchError as mismatch:
            older, error = _without_added_fields(like), mismatch
            if older is None:
                raise
        try:
            state, metadata = self._restore_latest(older)
        except CheckpointMismatchError:
            raise error from None  # not an older state either: name the difference from like
        saved = state._asdict()
        fill = type(like).ADDED_FIELDS
        return like._replace(**saved, **{k: fill[k](saved) for k in fill}), metadata

    def _restore_latest(self, like: Any) -> tuple[Any, dict] | None:
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        wanted = state_signature(like)
        skipped: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, metadata = self._restore(step, like, wanted)
            except CheckpointMismatchError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to read means damaged
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                skipped.append((step, reason[:300]))
                continue
            if skipped:
                self._quarantine(skipped)
                warnings.warn(
                    "resuming from checkpoint step {} in {}: skipped damaged {}".format(
                        step, self.directory,
                        "; ".join(f"step {s} ({r}), moved to {s}.damaged" for s, r in skipped)),
                    RuntimeWarning, stacklevel=2)
            return state, metadata
        raise DamagedCheckpointError(
            f"no checkpoint in {self.directory} could be read: "
            + "; ".join(f"step {s}: {r}" for s, r in skipped)
            + ". Start a new run (a new folder, or --overwrite), or restore the files from a copy."
        )

    def _restore(self, step: int, like: Any, wanted: list):
        meta = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        metadata = dict(meta["metadata"] or {})
        saved = metadata.pop("state_signature", None)
        if saved is not None and saved != wanted:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds a training state of another "
                f"shape: {_signature_difference(saved, wanted)}. It was trained with a different "
                "configuration (number of states L, network or optimizer): resume with the "
                "configuration it was trained with, or start a new run in another folder."
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        leaves = jax.tree_util.tree_leaves(restored["state"])
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
        if not all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves
                   if np.issubdtype(np.asarray(x).dtype, np.inexact)):
            # Training never saves a non-finite state (the step guard keeps the last finite one).
            raise ValueError("the saved state has non-finite values")
        return state, metadata

    def _quarantine(self, skipped) -> None:
        for step, _ in skipped:
            src = os.path.join(self.directory, str(step))
            dst, n = f"{src}.damaged", 1
            while os.path.exists(dst):
                dst, n = f"{src}.damaged{n}", n + 1
            if os.path.isdir(src):
                os.rename(src, dst)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()
