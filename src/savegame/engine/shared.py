"""Shared bytes of incremental checkpoints (docs/incremental.md): which files live manifests
refer to, where a reference resolves, and moving a deleted checkpoint's shared files aside.

A checkpoint's manifest may refer to a tensor file of an earlier checkpoint folder of the same
run (``step-…/rank-NNNNN.safetensors``, format version 2). When that earlier checkpoint is
deleted (retention, prune, set aside as damaged), every file of it that a live manifest refers
to is first *retired*: moved to ``retired-step-…-rank-NNNNN.safetensors`` in the run folder
(one atomic rename locally). A reference resolves to the file in its folder, else to the
retired file, so it resolves at every moment of a deletion, and a crash at any point leaves
every committed checkpoint complete. A retired file that no live manifest refers to any more
is garbage (:func:`garbage`). Imports no torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from savegame import errors
from savegame.engine.reader import CheckpointRef
from savegame.format import layout, manifest
from savegame.storage import Location, Store

__all__ = ["garbage", "references", "refuse_shadowing", "retire", "retired_files", "users"]


def references(refs: Iterable[CheckpointRef]) -> tuple[set[str], bool]:
    """The shared files (``step-…/rank-….safetensors``, relative to the run) that the
    manifests of ``refs`` refer to, and whether that is all of them: False when a manifest
    could not be read (an I/O error, a newer format version) — then any file may be
    referenced, and none may be removed."""
    used: set[str] = set()
    sure = True
    for r in refs:
        if r.manifest is not None:
            used.update(r.manifest.refs)
        elif isinstance(r.error, (errors.StorageError, errors.UnsupportedFormatError)):
            sure = False
    return used, sure


def users(refs: Iterable[CheckpointRef]) -> dict[str, set[int]]:
    """shared file (reference name) -> the steps whose manifests refer to it."""
    out: dict[str, set[int]] = {}
    for r in refs:
        if r.manifest is not None:
            for n in r.manifest.refs:
                out.setdefault(n, set()).add(r.step)
    return out


def retire(loc: Location, used: set[str], sure: bool = True) -> list[str]:
    """Move the files of checkpoint ``loc`` that live manifests refer to (``used``; every
    tensor file of it if not ``sure``) out of its folder, to ``retired-…`` names in the run
    folder, before the folder is deleted or set aside. Returns the retired names.

    Each move is one rename (atomic on a local folder; copy-then-delete on an object store,
    where a reference finds one of the two at every moment). A file already retired (a crash
    between two moves) is left as it is.
    """
    store = loc.store
    if "/" in loc.key or layout.parse_step_dir(loc.key) is None:
        return []  # not a checkpoint folder of a run: nothing can refer to it
    if sure and not any(u.startswith(f"{loc.key}/") for u in used):
        return []  # nothing of it is shared (the usual case): no listing
    out = []
    for e in store.list(loc.key):
        ref = f"{loc.key}/{e.name}"
        if e.is_dir or manifest.ref_step(ref) is None or (sure and ref not in used):
            continue
        dest = layout.retired_file(ref)
        try:
            store.rename(ref, dest)
        except FileExistsError:  # retired before (an interrupted deletion): keep that one
            pass
        out.append(dest)
    return out


def retired_files(store: Store) -> dict[str, str]:
    """The retired files of a run: file name -> the reference it stands for."""
    out = {}
    for e in store.list(""):
        if e.is_dir:
            continue
        ref = layout.parse_retired_file(e.name)
        if ref is not None:
            out[e.name] = ref
    return out


def garbage(store: Store, refs: Iterable[CheckpointRef]) -> list[str]:
    """Retired files of the run that no manifest of ``refs`` (the run's checkpoints) refers to;
    none when some manifest cannot be read."""
    used, sure = references(refs)
    if not sure:
        return []
    with contextlib.suppress(OSError):
        return sorted(n for n, ref in retired_files(store).items() if ref not in used)
    return []


def refuse_shadowing(
    store: Store,
    key: str,
    names: Iterable[str],
    step: int,
    same: Callable[[str, str], bool] | None = None,
) -> None:
    """Before checkpoint folder ``key`` is published with the files ``names``: refuse if one of
    them would stand in front of a retired file of the same name (a deleted ``step-…`` whose
    bytes later checkpoints still use). A reference resolves to the file in its folder first,
    so a new folder of that step would silently give those checkpoints other bytes.
    ``same(name, retired)``: the caller knows that file is the retired one's bytes (a transfer
    of the very checkpoint a later one was pushed before: same run, same step), so nothing is
    shadowed."""
    for name in names:
        ref = f"{key}/{name}"
        if manifest.ref_step(ref) is None:
            continue
        retired = layout.retired_file(ref)
        if store.exists(retired) and not (same is not None and same(name, retired)):
            raise errors.StepExistsError(
                f"{store.describe(key)}: step {step} was deleted, but later checkpoints of the run "
                f"still use its bytes ({store.describe(retired)}); a new step {step} would take "
                "their place. Save under a step after the newest one (or delete the checkpoints "
                "that use it, e.g. `savegame prune`, first); nothing was written over",
                path=store.describe(key),
                step=step,
            )
