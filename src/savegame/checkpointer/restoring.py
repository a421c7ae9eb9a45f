"""Restoring in one process a checkpoint that one process wrote, and what restore leaves behind.

Invariants: nothing is applied to the live objects until a checkpoint was read and every hash
verified (a corrupt one never leaves them half-restored; the next older one is tried, but
never past one that could not be read: a StorageError is raised instead); tensors
are read straight into the live parameters and optimizer moments where they fit (one copy).
A skipped checkpoint is set aside only once proven damaged, by the lock holder only.
``only=``/``skip=``/``strict=False`` read and apply the parts :mod:`savegame.state.overrides`
selects, and nothing is read into a part left alone.
(Checkpoints written by several ranks, and every restore under torch.distributed, go through
:func:`savegame.distributed.protocol.restore`.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from savegame import errors
from savegame import state as statelib
from savegame import tree as treelib
from savegame.distributed import collectives, loading, planning, protocol
from savegame.engine import reader, writer
from savegame.format import layout
from savegame.state import overrides
from savegame.storage import Location, Store, as_store, locate, urls

__all__ = ["restore", "restore_whole", "set_aside_damaged", "source_refs", "warn_skip"]

log = logging.getLogger("savegame")


def restore(
    group: collectives.Group | collectives.LocalGroup,
    refs: Sequence[reader.CheckpointRef],
    state: statelib.TrainState,
    opts: overrides.RestoreOptions,
    *,
    per_rank: Literal["strict", "fresh"],
    skip: Callable[[Path, BaseException | None], None],
) -> tuple[reader.CheckpointRef, overrides.RestoreReport] | None:
    """Restore the newest valid checkpoint of ``refs`` in one process or on every rank; log
    what it restored and, with ``only=``/``skip=``/``strict=False``, what it left as it was.

    Returns:
        The checkpoint restored and the report (its step and path filled in), or None.
    """
    sharded = group.distributed or any(
        r.manifest is not None and r.manifest.world_size > 1 for r in refs
    )
    if sharded:
        done = protocol.restore(group, refs, state, per_rank=per_rank, skip=skip, opts=opts)
    else:
        done = restore_whole(refs, state, skip=skip, opts=opts)
    if done is None:
        return None
    ref, report = done
    report = replace(report, step=ref.step, path=str(ref.path))
    where = f" (rank {group.rank})" if sharded else ""
    log.info("restored step %d from %s%s", ref.step, ref.path, where)
    if report.missing or report.unexpected or report.mismatched:
        log.warning("restore of %s%s left parts as they were: %s", ref.path, where, report)
    elif report.skipped:
        log.info("restore of %s%s: %s", ref.path, where, report)
    return ref, report


def restore_whole(
    refs: Sequence[reader.CheckpointRef],
    state: statelib.TrainState,
    *,
    skip: Callable[[Path, BaseException | None], None],
    opts: overrides.RestoreOptions = overrides.EVERYTHING,
) -> tuple[reader.CheckpointRef, overrides.RestoreReport] | None:
    """Restore the newest of ``refs`` (single-rank checkpoints) that reads and verifies; each
    unusable one is passed to ``skip``. Returns it and what was restored, or None if none was
    valid. Only the parts ``opts`` selects are read (:mod:`savegame.state.overrides`).

    Raises:
        RestoreError: a valid checkpoint does not fit ``state``, or ``opts`` names a part that
            does not exist (checked on the manifest, before anything is read).
    """
    for i in reversed(range(len(refs))):
        ref = refs[i]
        if ref.error is not None or ref.manifest is None:
            loading.skip_or_raise(refs, i, ref.error, skip)
            continue
        try:
            stored = ref.manifest.trees[0]
            sel = overrides.select(opts, state, stored, where=str(ref.path))
            skeleton = sel.skeleton(stored)
            if opts.default:  # the objects by name, as statelib.apply checks them (below)
                statelib.check_names(state, skeleton, where=str(ref.path))
            if opts.strict:  # before any byte is read into a live tensor: never half-loaded
                loading.check_fit(state, skeleton, ref.manifest, where=str(ref.path))
            keys = None if opts.default else list(dict.fromkeys(planning.tensor_refs(skeleton)))
            dest = _live_destinations(state, sel)
            tensors = reader.load_tensors(ref.path, ref.manifest, keys, dest=dest)
            tree = treelib.decode(skeleton, tensors, path=ref.path / layout.MANIFEST)
        except (errors.FormatError, errors.StorageError) as exc:
            loading.skip_or_raise(refs, i, exc, skip)
            continue
        # A run saved through DDP before savegame unwrapped it has "module."-prefixed keys.
        tree = protocol.match_wrapper_keys(state, tree)
        return ref, overrides.apply(state, tree, sel, where=str(ref.path))
    return None


def _live_destinations(state: statelib.TrainState, sel: overrides.Selection) -> Any:
    """Map checkpoint tensors onto the live tensors they will end up in (parameters, existing
    optimizer moments), so restore copies once instead of allocating and copying again.
    The reader only writes into them after every hash verified; never into a part the
    selection leaves alone (or, with ``strict=False``, may yet find not to fit)."""
    try:
        _, live = treelib.encode(statelib.capture(state, loaders=False))
    except errors.EncodeError:
        return None
    allowed = {n for n in state if sel.in_place(n, state[n])}

    def dest(key: str, entry: Any) -> Any:
        t = live.get(key)
        ok = t is not None and treelib.split_key(key)[0] in allowed and reader.fits(t, entry)
        return t if ok else None

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


def source_refs(where: str | os.PathLike[str] | Store) -> list[reader.CheckpointRef]:
    """The checkpoints of another run to start from (``Checkpointer(start_from=…)``): a run
    folder (or URL, or store) gives all of its ``step-…`` checkpoints, one checkpoint gives
    itself. Read-only: nothing there is written, locked or set aside.

    Raises:
        CheckpointNotFoundError: ``where`` is neither a run nor a checkpoint.
    """
    store = as_store(where)
    try:
        is_ckpt = store.exists(layout.MANIFEST)
    except OSError as exc:
        raise errors.StorageError(
            f"could not read start_from={store.describe()}: {exc}", path=store.describe()
        ) from exc
    if not is_ckpt:
        try:
            return reader.list_checkpoints(store)
        except errors.CheckpointNotFoundError as exc:  # said in this run's words: rephrased
            what = (
                "does not exist"
                if isinstance(exc.__cause__, FileNotFoundError)
                else "is a file, not a run folder nor a checkpoint folder"
            )
            raise errors.CheckpointNotFoundError(
                f"start_from={store.describe()} {what}: give the folder (or URL) of the run to "
                "start from, or one step-… checkpoint folder of it",
                path=store.describe(),
            ) from exc
    # A path or URL is located as sg.load locates it: the checkpoint as a folder of its run, so
    # the files an incremental checkpoint shares with earlier ones (named relative to the run)
    # are found beside it. A store given as such is the checkpoint alone.
    loc = Location(store, "") if isinstance(where, Store) else locate(where)
    ref = reader.CheckpointRef(-1, loc.store.local_path(loc.key) or loc, loc=loc)
    try:
        ref.manifest = reader.read_manifest(loc)
        ref.step = ref.manifest.step
    except errors.CheckpointError as exc:
        ref.error = exc
    return [ref]


def warn_skip(path: Path | Location, exc: BaseException | None) -> None:
    """A checkpoint of ``start_from`` that cannot be used: warn, and leave it where it is."""
    warnings.warn(
        f"skipping checkpoint {path} of start_from: {exc}; trying an earlier one, if any",
        errors.CorruptCheckpointWarning,
        stacklevel=4,
    )


def warn_nothing_to_start_from(where: str | os.PathLike[str] | Store, found: int) -> None:
    """``start_from`` gave nothing to restore: say so, and that the job starts from step 0."""
    shown = where.describe() if isinstance(where, Store) else urls.redact(os.fspath(where))
    why = (
        f"has no valid checkpoint ({found} found, all corrupt or incomplete)"
        if found
        else "holds no checkpoint (check the path: nothing named step-… with a manifest.json)"
    )
    warnings.warn(
        f"start_from={shown} {why}; this run starts from step 0 (fresh weights)",
        errors.CorruptCheckpointWarning if found else UserWarning,
        stacklevel=4,
    )
