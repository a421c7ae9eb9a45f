"""Restoring in one process a checkpoint that one process wrote, and what restore leaves behind.

Invariants: nothing is applied to the live objects until a checkpoint was read and every hash
verified (a corrupt one never leaves them half-restored; the next older one is tried); tensors
are read straight into the live parameters and optimizer moments where they fit (one copy).
A skipped checkpoint is set aside only once proven damaged, by the lock holder only.
(Checkpoints written by several ranks, and every restore under torch.distributed, go through
:func:`savegame.distributed.protocol.restore`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from savegame import errors
from savegame import state as statelib
from savegame import tree as treelib
from savegame.distributed import protocol
from savegame.engine import reader, writer
from savegame.format import layout
from savegame.storage import locate

__all__ = ["restore_whole", "set_aside_damaged"]


def restore_whole(
    refs: Sequence[reader.CheckpointRef],
    state: statelib.TrainState,
    *,
    skip: Callable[[Path, BaseException | None], None],
) -> reader.CheckpointRef | None:
    """Restore the newest of ``refs`` (single-rank checkpoints) that reads and verifies; each
    unusable one is passed to ``skip``. Returns it, or None if none was valid.

    Raises:
        RestoreError: a valid checkpoint does not fit ``state``.
    """
    for ref in reversed(refs):
        if ref.error is not None or ref.manifest is None:
            skip(ref.path, ref.error)
            continue
        try:
            tensors = reader.load_tensors(ref.path, ref.manifest, dest=_live_destinations(state))
            tree = treelib.decode(ref.manifest.trees[0], tensors, path=ref.path / layout.MANIFEST)
        except (errors.FormatError, errors.StorageError) as exc:
            skip(ref.path, exc)
            continue
        # A run saved through DDP before savegame unwrapped it has "module."-prefixed keys.
        tree = protocol.match_wrapper_keys(state, tree)
        statelib.apply(state, tree, where=str(ref.path))
        return ref
    return None


def _live_destinations(state: statelib.TrainState) -> Any:
    """Map checkpoint tensors onto the live tensors they will end up in (parameters, existing
    optimizer moments), so restore copies once instead of allocating and copying again.
    The reader only writes into them after every hash verified."""
    try:
        _, live = treelib.encode(statelib.capture(state, loaders=False))
    except errors.EncodeError:
        return None

    def dest(key: str, entry: Any) -> Any:
        t = live.get(key)
        if (
            t is not None
            and t.device.type == "cpu"
            and t.is_contiguous()
            and tuple(t.shape) == tuple(entry.shape)
            and str(t.dtype).removeprefix("torch.") == entry.dtype
            and not t.requires_grad
        ):
            return t
        return None

    return dest


def set_aside_damaged(suspects: Sequence[tuple[Path, BaseException | None]]) -> None:
    """Set aside the checkpoints restore skipped, once they are proven damaged (issue 9.8).

    A damaged newest checkpoint left in place would collide with the next save of its step and
    be counted by retention forever. The caller is the lock holder (one process / rank 0), after
    every rank finished reading; a checkpoint skipped for a reason that is not damage (a newer
    format version, a storage error that does not recur) stays."""
    seen: set[Path] = set()
    for path, exc in suspects:
        if path in seen:
            continue
        seen.add(path)
        loc = locate(path)
        if isinstance(exc, errors.UnsupportedFormatError) or not loc.store.is_dir(loc.key):
            continue
        step = layout.parse_step_dir(loc.name)
        if step is None:
            continue
        problems = reader.damage(path)
        if problems:
            with contextlib.suppress(OSError):
                writer.set_aside_damaged(path, step, problems[0])
