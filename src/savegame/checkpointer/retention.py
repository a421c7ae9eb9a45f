"""Retention: which checkpoints of a run are kept, and deleting the others. One copy, used by
the :class:`~savegame.Checkpointer` after each save and by ``savegame prune``.

Invariants: only valid checkpoints of this run family (the manifest's run id is the one in
``run.json``) are ever deleted, never the one the caller spares (the newest / the one just
written); damaged checkpoints set aside and temp folders are never retention candidates;
"best" is ranked from the manifests on disk, so it survives restarts; nothing is deleted while
a checkpoint kept in its place is damaged (issue 9.8). A deleted checkpoint first leaves the run
atomically (renamed to a temp name), so a crash never leaves a half-deleted ``step-…`` folder.

Shared bytes (incremental checkpoints, docs/incremental.md): before a checkpoint is deleted,
each of its files that a live checkpoint still refers to is *retired* — renamed to
``retired-step-…-rank-….safetensors`` in the run folder, where references resolve once the
folder is gone (engine/shared.py). A retired file that no live manifest refers to any more is
garbage, removed right after by the same retention (and by the next writer's
:func:`collect_garbage`). Deletion never breaks a live reference: when any manifest of the run
cannot be read (an I/O error, a newer format), every tensor file of a deleted checkpoint is
retired and no retired file is removed.

Imports no torch (``savegame ls``/``prune``); setting a damaged checkpoint aside imports the
writer on use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from savegame import errors, policy
from savegame.checkpointer.runfile import read_run_file, run_keep
from savegame.engine import reader
from savegame.format import layout, manifest
from savegame.storage import Location, Store, as_store, locate

Root = str | os.PathLike[str] | Store

log = logging.getLogger("savegame")

__all__ = [
    "CheckpointInfo",
    "collect_garbage",
    "delete_unkept",
    "find_damage",
    "free",
    "list_run",
    "plan_retention",
    "run_position",
    "unkept",
]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One checkpoint of a run, as listed by :meth:`Checkpointer.list` and ``savegame ls``."""

    step: int
    path: Path | Location  # a Path in a local run folder
    valid: bool
    created: float | None
    size: int  # every byte a restore of it reads: its own files + the shared ones it refers to
    metrics: Mapping[str, float]
    ours: bool  # written by this run family (run.json); only those are ever deleted
    kept_for: tuple[str, ...]  # retention reasons; () = would be pruned
    error: str | None
    #: "checkpoint" (a step-… folder), "damaged" (set aside after failing verification: kept for
    #: inspection, never restored or counted by retention) or "leftover" (a ``.tmp-`` folder: a
    #: save in progress, or garbage from an interrupted one that the next writer removes).
    #: "retired" (``savegame ls``): a tensor file of a deleted checkpoint that later checkpoints
    #: still refer to (incremental saves), kept as ``retired-step-…-rank-….safetensors``: no
    #: checkpoint, never restored, never a retention candidate; removed once nothing uses it.
    kind: Literal["checkpoint", "damaged", "leftover", "retired"] = "checkpoint"
    #: Bytes in this checkpoint's own folder (what deleting it alone could free, unless later
    #: checkpoints refer to them); summing ``own`` over a run counts every byte once.
    own: int = 0
    #: Bytes it refers to in earlier checkpoint folders of the run (shared, stored once).
    shared: int = 0
    #: Where it was listed from (the store given to :func:`list_run`, wrapped or not): deleting
    #: it goes through that store, not through a new one over ``path``.
    location: Location | None = dataclasses.field(default=None, repr=False, compare=False)


def list_run(
    root: Root,
    keep: policy.Keep | None = None,
    run_id: str | None = None,
    *,
    aside: bool = False,
) -> list[CheckpointInfo]:
    """Checkpoints of a run folder with validity (manifest level) and retention reasons.

    ``run_id`` and ``keep`` default to the folder's ``run.json`` (written by the Checkpointer).
    With ``aside=True`` (``savegame ls``), damaged checkpoints set aside and leftover temp
    folders follow, with ``kind`` "damaged" / "leftover" (never retention candidates).
    """
    root = as_store(root)
    record = read_run_file(root)
    if run_id is None and record is not None:
        run_id = str(record["run_id"])
    if keep is None:
        keep = run_keep(root, record) or policy.Keep(last=3)
    refs = reader.list_checkpoints(root)
    ours = [r for r in refs if r.manifest is not None and r.manifest.run_id == run_id]
    cands = [
        policy.Candidate(r.step, int(r.manifest.info.get("index", 0)), r.manifest.metrics)
        for r in ours
        if r.manifest
    ]
    kept = policy.retain(cands, keep)
    out = []
    for r in refs:
        m = r.manifest
        own = sum(f.size for f in m.own_files.values()) if m else _du(root, r.location.key)
        shared_bytes = sum(f.size for f in m.refs.values()) if m else 0
        mine = m is not None and m.run_id == run_id
        out.append(
            CheckpointInfo(
                step=r.step,
                path=r.path,
                location=r.location,
                valid=r.valid,
                created=m.created if m else None,
                size=own + shared_bytes,
                metrics=dict(m.metrics) if m else {},
                ours=mine,
                kept_for=(tuple(kept.get(r.step, ())) if mine else ("not ours",))
                + ((_LINKED,) if _linked(r.location) else ()),
                error=str(r.error) if r.error else None,
                own=own,
                shared=shared_bytes,
            )
        )
    if aside:
        out.extend(_aside(root))
        out.extend(_retired_infos(root, refs))
    return out


#: Why a checkpoint folder that is a symlink is kept (see :func:`delete_unkept`).
_LINKED = "a symlink out of the run: left to you"


def _linked(loc: Location) -> bool:
    """Whether ``loc`` is a step folder the user moved elsewhere and linked back (local runs)."""
    path = loc.store.local_path(loc.key)
    return path is not None and path.is_symlink()


def _retired_infos(root: Store, refs: list[reader.CheckpointRef]) -> list[CheckpointInfo]:
    """Retired shared files, for ``ls``: one entry per file."""
    from savegame.engine import shared  # imports no torch; kept off import time (STYLE)

    out = []
    try:
        files = shared.retired_files(root)
    except OSError:
        return []
    users = shared.users(refs)
    for name, ref in sorted(files.items()):
        by = sorted(users.get(ref, ()))
        why = (
            f"retired: a file of deleted {manifest.ref_folder(ref)} that step(s) "
            + ", ".join(map(str, by))
            + " still use (shared bytes, removed once unused)"
            if by
            else f"retired: a file of deleted {manifest.ref_folder(ref)} no checkpoint uses any "
            "more (the next retention or writer removes it)"
        )
        size = _du(root, name)
        out.append(
            CheckpointInfo(
                step=manifest.ref_step(ref) or 0,
                path=root.local_path(name) or Location(root, name),
                valid=False,
                created=root.mtime(name),
                size=size,
                metrics={},
                ours=False,
                kept_for=(),
                error=why,
                kind="retired",
                own=size,
            )
        )
    return out


def _aside(root: Store) -> list[CheckpointInfo]:
    """Damaged checkpoints set aside and temp folders, for ``ls``: never retention candidates."""
    out = []
    with contextlib.suppress(OSError):
        for entry in sorted(root.list(""), key=lambda e: e.name):
            if not entry.is_dir:
                continue
            path = root.local_path(entry.name) or Location(root, entry.name)
            if isinstance(path, Path) and path.is_symlink():
                continue
            step = layout.parse_damaged_dir(entry.name)
            if step is not None:
                kind: Literal["damaged", "leftover"] = "damaged"
                why = "set aside: failed verification (kept for inspection; delete it when done)"
            elif layout.is_tmp(entry.name):
                kind, step = "leftover", -1
                why = "temp folder: a save in progress, or left by an interrupted save (the next writer removes it)"
            else:
                continue
            created = root.mtime(entry.name)
            out.append(
                CheckpointInfo(
                    step=step,
                    path=path,
                    valid=False,
                    created=created,
                    size=(du := _du(root, entry.name)),
                    own=du,
                    metrics={},
                    ours=False,
                    kept_for=(),
                    error=why,
                    kind=kind,
                )  # fmt: skip
            )
    return out


def run_position(
    root: Root, run_id: str, keep: policy.Keep, *, also: tuple[Root, ...] = ()
) -> tuple[int, float | None]:
    """Where a run stands, from its checkpoints on disk (one listing per root; ``also``: the
    other tier of a run with a cache): the index of the next save, and the best value of the
    monitored metric so far (None without a monitor)."""
    ours = [
        r
        for where in (root, *also)
        for r in reader.list_checkpoints(where)
        if r.manifest is not None and r.manifest.run_id == run_id
    ]
    index = max((int(r.manifest.info.get("index", -1)) for r in ours if r.manifest), default=-1)
    if not keep.monitor:
        return index + 1, None
    cands = [policy.Candidate(r.step, 0, r.manifest.metrics) for r in ours if r.manifest]
    return index + 1, policy.best_value(cands, keep.monitor, keep.mode)


def unkept(plan: list[CheckpointInfo], *, spare: int | None) -> list[CheckpointInfo]:
    """What ``plan`` deletes: valid checkpoints of this run that no rule keeps, except step
    ``spare`` (the newest, or the one just written)."""
    return [i for i in plan if i.valid and i.ours and not i.kept_for and i.step != spare]


def find_damage(
    plan: list[CheckpointInfo], *, spare: int | None, verified: set[str]
) -> dict[Path | Location, str]:
    """Damage in the checkpoints kept in place of those ``plan`` deletes: ``{path: first
    problem}``, empty if they are intact or nothing would be deleted (then nothing is read).

    Each kept checkpoint is read in full once per process: ``verified`` holds the folders known
    intact (written or restored by this process, or checked before) and is updated.
    """
    if not unkept(plan, spare=spare):
        return {}
    found: dict[Path | Location, str] = {}
    for i in plan:
        if not (i.valid and i.ours and (i.kept_for or i.step == spare)) or str(i.path) in verified:
            continue
        problems = reader.damage(i.path)
        if problems:
            found[i.path] = problems[0]
        else:
            verified.add(str(i.path))
    return found


def plan_retention(
    root: Root,
    keep: policy.Keep | None,
    run_id: str | None,
    *,
    verified: set[str],
    spare: int | None = None,
    set_aside: list[int] | None = None,
) -> list[CheckpointInfo]:
    """The run's checkpoints with retention reasons, made safe to act on: nothing is deleted
    while a checkpoint kept in its place is damaged (issue 9.8). The caller holds the run
    folder's lock. ``set_aside``: gets the step of each checkpoint set aside as damaged.

    Before a valid checkpoint may be deleted, every checkpoint retention keeps instead is
    verified once (:func:`find_damage`): a damaged one is set aside (``damaged-step-…``, kept
    for inspection) and the plan made again. This reads each older kept checkpoint once per
    process — on the save's thread, the persist worker for async saves. If a damaged one
    cannot be moved, the plan keeps everything.
    """
    from savegame.engine import writer  # imports torch: only when something must be set aside

    while True:
        infos = list_run(root, keep, run_id)
        damaged = find_damage(infos, spare=spare, verified=verified)
        if not damaged:
            return infos
        for i in infos:
            if i.path not in damaged:
                continue
            try:
                writer.set_aside_damaged(i.path, i.step, damaged[i.path])
                if set_aside is not None:
                    set_aside.append(i.step)
            except OSError as exc:  # cannot move it: delete nothing this time
                log.warning(
                    "could not set aside damaged %s: %s; retention deletes nothing", i.path, exc
                )
                return [
                    dataclasses.replace(x, kept_for=x.kept_for or ("damaged kept",)) for x in infos
                ]


def delete_unkept(
    plan: list[CheckpointInfo],
    *,
    spare: int | None,
    keep: policy.Keep | None = None,
    release: Callable[[Callable[[], list[str]], str], object] | None = None,
    strict: bool = False,
    store: Store | None = None,
) -> list[CheckpointInfo]:
    """Delete what ``plan`` does not keep (:func:`unkept`); returns what was deleted.

    ``store``: the run's store, when the plan was listed from one (a wrapped local folder):
    every rename and delete goes through it, not through a new store over the same folder.

    Each checkpoint first leaves the run atomically (renamed to a ``.tmp-deleted-…`` name, by
    the store's ``detach``); ``release(freer, name)`` then frees its bytes (default:
    :func:`free`, now; the Checkpointer frees on a background thread). One that cannot be moved is logged and left in place, or with
    ``strict`` (``savegame prune``) its ``OSError`` is raised.

    A checkpoint whose files a checkpoint still in the run refers to (incremental saves) is
    retired instead (:func:`retire`: only its manifest goes); retired folders that nothing
    refers to any more are removed at the end (:func:`collect_garbage`).
    """
    from savegame.engine import shared  # imports no torch; kept off import time (STYLE)

    todo = unkept(plan, spare=spare)
    if not todo:
        return []

    def where(info: CheckpointInfo) -> Location:
        if info.location is not None:
            return info.location
        if store_given is None or isinstance(info.path, Location):
            return locate(info.path)
        return Location(store_given, Path(info.path).name)

    store_given = store
    store = where(todo[0]).store
    live: dict[str, reader.CheckpointRef] | None
    try:
        live = {r.location.key: r for r in reader.list_checkpoints(store)}
    except errors.CheckpointError as exc:  # cannot see the run: every tensor file is kept
        log.warning("could not list %s to find shared files: %s", store.describe(), exc)
        live = None
    deleted = []
    for info in todo:
        loc = where(info)
        if _linked(loc):  # (list_run keeps it already; a plan made otherwise is checked here)
            # A checkpoint the user moved elsewhere and linked back: deleting or retiring it
            # would remove or move files in a folder outside the run. Left to the user.
            log.warning(
                "not deleting %s: it is a symlink to %s, outside the run folder; remove it "
                "by hand (and the folder it points to) if it is no longer needed",
                info.path,
                os.path.realpath(str(loc.store.local_path(loc.key))),
            )
            continue
        used, sure = (
            (set(), False)
            if live is None
            else shared.references(r for k, r in live.items() if k != loc.key)
        )
        try:
            # Shared files first (each one atomic rename), then the folder: references
            # resolve at every moment, whatever is cut short by a crash.
            kept = shared.retire(loc, used, sure)
            freer = loc.store.detach(
                loc.key, f"{layout.TMP_PREFIX}deleted-{loc.name}-{uuid.uuid4().hex[:8]}"
            )
        except OSError as exc:
            if strict:
                raise
            log.warning("could not delete %s: %s", info.path, exc)
            continue
        if live is not None:
            live.pop(loc.key, None)
        (release or free)(freer, str(info.path))
        deleted.append(info)
        log.info(
            "deleted %s (not kept by %s)%s",
            info.path.name,
            keep if keep is not None else "the run's rule",
            f"; {len(kept)} file(s) shared with later checkpoints kept as {kept[0]}…"
            if kept
            else "",
        )
    if deleted:
        _collect_retired(store, strict=strict)
    return deleted


def _collect_retired(store: Store, *, strict: bool = False) -> None:
    """Remove the retired files that no live manifest refers to any more."""
    from savegame.engine import shared  # imports no torch; kept off import time (STYLE)

    try:
        if not shared.retired_files(store):  # one listing; manifests only when there is some
            return
        refs = reader.list_checkpoints(store)
    except (errors.CheckpointError, OSError) as exc:
        log.warning("could not list %s to collect shared files: %s", store.describe(), exc)
        return
    for name in shared.garbage(store, refs):
        try:
            freer = store.detach(name, f"{layout.TMP_PREFIX}deleted-{name}-{uuid.uuid4().hex[:8]}")
        except OSError as exc:
            if strict:
                raise
            log.warning("could not remove retired %s: %s", store.describe(name), exc)
            continue
        log.info("removed %s: no checkpoint uses it any more", name)
        free(freer, store.describe(name))


def collect_garbage(root: Root, *, incomplete: bool = False) -> None:
    """Remove every temp folder of a run. Only the lock holder calls it: every temp folder
    then belongs to a dead writer (kill -9, power cut) or to a deletion that did not finish.

    ``incomplete``: also remove ``step-…`` folders without a manifest — on an object store,
    which writes a checkpoint's data objects under its final name and commits by putting the
    manifest last, they are what a killed writer (or upload) leaves. (A local folder never
    shows one: it renames complete folders into place; one there was damaged by hand and is
    left for the user.)

    Retired files (shared with later checkpoints, engine/shared.py) go once no live manifest
    refers to them, and none while any manifest of the run cannot be read."""
    store = as_store(root)
    entries = reader.list_run_folder(store)
    for entry in entries:
        # (An object store's save in progress is a marker object, not a folder.)
        leftover = layout.is_tmp(entry.name) and (
            entry.is_dir
            or incomplete
            # a retired file whose removal was cut short (renamed away, not yet unlinked)
            or entry.name.startswith(f"{layout.TMP_PREFIX}deleted-{layout.RETIRED_PREFIX}")
        )
        if leftover:
            log.info("removing leftover %s from an interrupted save or deletion", entry.name)
            try:
                freer = store.detach(entry.name, None)
            except OSError as exc:  # not worth refusing the run for: the next writer tries again
                log.warning("could not remove leftover %s: %s", entry.name, exc)
                continue
            free(freer, store.describe(entry.name))
        elif (
            incomplete
            and entry.is_dir
            and layout.parse_step_dir(entry.name) is not None
            and not store.exists(f"{entry.name}/{layout.MANIFEST}")
        ):
            log.info("removing leftover %s from an interrupted save or deletion", entry.name)
            try:
                trash = f"{layout.TMP_PREFIX}deleted-{entry.name}-{uuid.uuid4().hex[:8]}"
                freer = store.detach(entry.name, trash)
            except OSError as exc:
                log.warning("could not remove leftover %s: %s", entry.name, exc)
                continue
            free(freer, store.describe(entry.name))
    if any(layout.parse_retired_file(e.name) is not None for e in entries):
        _collect_retired(store)


def free(freer: Callable[[], list[str]], path: str) -> None:
    """Free the bytes of a folder already taken out of the run (``freer`` from the store's
    ``detach``); warn (never fail) if they cannot be freed."""
    failures = freer()
    if failures:
        log.warning(
            "could not delete %s (%d errors, first: %s); its disk space is not freed — delete it by hand",
            path, len(failures), failures[0],
        )  # fmt: skip


def _du(store: Store, key: str) -> int:
    try:
        return store.du(key)
    except OSError:
        return 0
