"""The run folder: its lock, its ``run.json``, and what a run / checkpoint folder looks like.

Invariants: one writer per run folder — the lock holder (one process, or rank 0) is the only
process that writes ``run.json``, commits, sets aside or deletes; other ranks hold a stand-in
(:class:`RankLock`). ``run.json`` records the run family's id (retention only ever deletes
checkpoints whose manifest carries it), the retention rule in force and the sessions that
opened the run (the interval advice learns the run's failures from them), and is replaced
atomically. A folder this process may read but not write opens read-only (restore works, a
save raises :class:`~savegame.errors.StorageError`).

Imports no torch: ``savegame ls``/``verify``/``prune`` read run folders through it, and
``show``/``verify`` of a foreign file ask it whether a path is a run (so it imports little:
storage is imported by the functions that write).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from savegame import errors, policy
from savegame.format import layout
from savegame.storage import Store, as_store

Root = str | os.PathLike[str] | Store

log = logging.getLogger("savegame")

__all__ = [
    "RankLock",
    "end_session",
    "is_checkpoint",
    "is_run",
    "looks_like_checkpoint",
    "open_run",
    "read_run_file",
    "run_file",
    "run_file_problem",
    "run_keep",
    "run_lock",
    "start_session",
    "verify_checkpoint",
]


class Lock(Protocol):
    def acquire(self) -> None: ...
    def release(self) -> None: ...


class RankLock:
    """Stands in for the run lock on ranks other than 0 (rank 0 holds the real one)."""

    held = True

    def acquire(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False


def run_lock(root: Root, rank: int = 0) -> Lock:
    """The run folder's lock for this rank (not taken yet): the real one on rank 0 only."""
    if rank != 0:
        return RankLock()
    store = as_store(root)
    try:
        return store.lock(layout.LOCK)
    except OSError as exc:
        raise errors.StorageError(
            f"could not open the lock of run folder {store.describe()}: {exc}",
            path=store.describe(),
        ) from exc


def run_file(root: Root) -> Path | str:
    """Where a run folder's ``run.json`` is (a path for a local run)."""
    store = as_store(root)
    return store.local_path(layout.RUN_FILE) or store.describe(layout.RUN_FILE)


def read_run_file(root: Root, *, strict: bool = False) -> dict[str, Any] | None:
    """``run.json`` of a run folder (run id, retention rule), or None if absent or unreadable.

    ``strict``: None only if it is absent (or damaged); a read that fails (a 503 after the
    store's retries, EIO) raises :class:`~savegame.errors.StorageError` — for decisions that
    would otherwise take a run that exists for a new one."""
    store = as_store(root)
    try:
        return _parse_run_file(store.read(layout.RUN_FILE))
    except FileNotFoundError:
        return None
    except (OSError, EOFError) as exc:
        if not strict:
            return None
        where = store.describe(layout.RUN_FILE)
        raise errors.StorageError(f"could not read {where}: {exc}", path=where) from exc


def run_file_problem(root: Root) -> str | None:
    """Why ``run.json`` makes the Checkpointer refuse this run, or None if it is fine/absent."""
    path = run_file(root)
    if not as_store(root).exists(layout.RUN_FILE):
        return None
    record = read_run_file(root)
    if record is None:
        return (
            f"{path} is damaged (not a JSON object with a run_id): the Checkpointer refuses this "
            "run folder and retention cannot tell this run's checkpoints from others'; restore "
            "it from a backup, or start a new run folder"
        )
    try:
        run_keep(root, record)
    except errors.FormatError as exc:
        return str(exc)
    return None


def run_keep(root: Root, record: dict[str, Any] | None) -> policy.Keep | None:
    """The retention rule ``run.json`` records (None when it records none).

    Raises:
        FormatError: the rule is not a valid :class:`~savegame.policy.Keep` (a hand edit: a
            count written as 2.0, an unknown field).
    """
    rule = record.get("keep") if record else None
    if rule is None:
        return None
    try:
        if not isinstance(rule, dict):
            raise TypeError("not an object")
        return policy.Keep(**rule)
    except (TypeError, ValueError) as exc:
        raise errors.FormatError(
            f"{run_file(root)}: its retention rule {errors.quoted(repr(rule))} is not valid "
            f"({errors.quoted(exc)}); write it as "
            'the Checkpointer does (e.g. {"last": 3}) or delete the "keep" entry',
            path=run_file(root),
        ) from None


def open_run(root: Root, keep: policy.Keep, lock: Lock) -> tuple[str, bool]:
    """The lock holder opens its run: take the lock, read (or create) ``run.json``.

    Returns:
        ``(run_id, writable)``. A folder this process may read but not write (permissions, a
        read-only mount) opens read-only: the run id comes from ``run.json`` ("" if none).

    Raises:
        LockedError: another live process writes this run folder.
        FormatError: ``run.json`` is damaged.
    """
    store = as_store(root)
    # On an object store, the run's listing answers the next question and the lease's PUT
    # overlaps the reads of run.json and the newest manifests (storage/objectstore.py,
    # ``before_lease``; the lease taken through this very store confirms or drops them).
    before_lease = getattr(store, "before_lease", None)
    ahead = None
    if before_lease is not None and getattr(lock, "_store", None) is store:
        before_lease()
        # The newest checkpoint's data too, as soon as the run's listing is in: a restore uses
        # it only once the lease is held and its listing shows the very versions read
        # (engine/fetch.py, ReadAhead).
        from savegame.engine import fetch

        ahead = fetch.ReadAhead.start(store)
    try:
        checkpoint = _holds_manifest(store)
    except BaseException:
        _drop_reads_ahead(store, ahead)
        raise
    if checkpoint:  # never write a lock or run.json into a checkpoint
        _drop_reads_ahead(store, ahead)
        raise errors.CheckpointError(
            f"{store.describe()} is a checkpoint (it holds {layout.MANIFEST}), not a run folder; "
            "pass the run folder that holds it",
            path=store.describe(),
        )
    try:
        lock.acquire()
    except BaseException as exc:
        if ahead is not None:  # not ours to restore (LockedError): its reads stop, threads end
            ahead.cancel(wait=True)
        if not isinstance(exc, errors.StorageError):
            raise
        cause = exc.__cause__
        if not (
            isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        ):
            raise
        log.info(
            "run folder %s (or its lock file) is not writable by this process (%s): opened read-only",
            root,
            cause,
        )
        record = read_run_file(root)
        return (str(record["run_id"]) if record else ""), False
    return _run_id(root, keep), True


def _drop_reads_ahead(store: Store, ahead: Any = None) -> None:
    """The run will not be opened: what an object store read ahead for it is dropped."""
    if getattr(store, "before_lease", None) is not None:
        from savegame.storage import objectstore

        objectstore.end_snapshot(store)
    if ahead is not None:
        ahead.cancel(wait=True)


def _holds_manifest(store: Store) -> bool:
    """Whether the folder is a checkpoint (``manifest.json`` is in it). On an object store one
    HEAD (``exists`` would also list, to tell a folder of that name: never a checkpoint)."""
    is_object = getattr(store, "is_object", None)
    return (
        bool(is_object(layout.MANIFEST)) if is_object is not None else store.exists(layout.MANIFEST)
    )


def _parse_run_file(raw: bytes | None) -> dict[str, Any] | None:
    try:
        record = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):  # (a deeply nested document: not a run.json)
        return None
    return record if isinstance(record, dict) and "run_id" in record else None


def _run_id(root: Root, keep: policy.Keep) -> str:
    """The run family's id from ``run.json`` (created on first use). The file also records
    the retention rule in force, so ``savegame ls``/``prune`` apply the run's own rule."""
    store = as_store(root)
    path = run_file(store)
    raw: bytes | None = None
    try:  # an I/O error is not damage: never tell the user to abandon an intact run
        raw = store.read(layout.RUN_FILE)  # read once: one request on an object store
    except FileNotFoundError:
        pass
    except (OSError, EOFError) as exc:
        raise errors.StorageError(f"could not read {path}: {exc}", path=str(path)) from exc
    record = _parse_run_file(raw)
    if record is None and raw is not None:
        raise errors.FormatError(
            f"{path} is damaged; restore it or start a new run folder", path=path
        )
    run_id = str(record["run_id"]) if record else uuid.uuid4().hex
    rule = dataclasses.asdict(keep)
    if record is None or record.get("keep") != rule:
        created = record.get("created", time.time()) if record else time.time()
        # Anything else recorded (the sessions) is kept.
        new = {**(record or {}), "run_id": run_id, "created": created, "keep": rule}
        data = json.dumps(new).encode()
        try:
            store.put(layout.RUN_FILE, data)
        except errors.StorageError:
            raise
        except OSError as exc:
            raise errors.StorageError(f"could not write {path}: {exc}", path=str(path)) from exc
    return run_id


def start_session(
    root: Root, run_id: str, *, write: bool = True
) -> tuple[list[dict[str, Any]], Any]:
    """The lock holder records that a Checkpointer opened the run now (``run.json``'s
    ``sessions``; a previous one still open ended without ``close()``: a failure, taken to
    end at its newest checkpoint) and returns the sessions, from which the interval advice
    learns the MTBF (docs/policies.md), with the cost estimates the last session ended with
    (``advice``, see :func:`end_session`; unchecked). ``write=False``: the sessions as they
    would be, written nowhere (a Checkpointer records its session at its first step or save)."""
    from savegame.engine import reader
    from savegame.policy import advice

    store = as_store(root)
    record = read_run_file(store)
    if record is None:  # only a read-only run has none here; it records nothing
        return [], None
    times = [
        r.manifest.created
        for r in reader.list_checkpoints(store)
        if r.manifest is not None and r.manifest.run_id == run_id
    ]
    record["sessions"] = advice.open_session(record.get("sessions"), time.time(), times)
    if not write:
        return list(record["sessions"]), record.get("advice")
    try:
        store.put(layout.RUN_FILE, json.dumps(record).encode())
    except (OSError, errors.CheckpointError) as exc:  # a full disk must not stop a resume
        log.warning("could not record this session in %s: %s", run_file(store), exc)
    return list(record["sessions"]), record.get("advice")


def end_session(
    root: Root, *, failed: bool = False, estimates: dict[str, Any] | None = None
) -> None:
    """The lock holder records that its session ended (``close()``): ``failed`` when an
    exception ended it; ``estimates``: the save costs measured so far (``advice``; a
    checkpoint records those of the saves *before* it, so the last save's measurement would
    otherwise be lost — a run whose sessions save once each would never have one). Never
    raises: a run folder that became unwritable only loses the record (the next session then
    counts this one as a failure)."""
    from savegame.policy import advice

    store = as_store(root)
    record = read_run_file(store)
    if record is None:
        return
    sessions = record.get("sessions")
    if not (isinstance(sessions, list) and sessions and isinstance(sessions[-1], dict)):
        return
    if sessions[-1].get("end") is not None:  # already ended (close() called twice)
        return
    record["sessions"] = advice.end_session(sessions, time.time(), failed=failed)
    if estimates:
        record["advice"] = estimates
    try:
        store.put(layout.RUN_FILE, json.dumps(record).encode())
    except (OSError, errors.CheckpointError) as exc:
        log.warning("could not record the end of this session in %s: %s", run_file(store), exc)


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A savegame checkpoint folder (it holds a manifest)."""
    return (Path(path) / layout.MANIFEST).is_file()


def looks_like_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A checkpoint folder, or a folder named like one (``step-…``, ``damaged-step-…``) whose
    manifest may be missing: verify reports what is wrong with it."""
    name = Path(path).name
    return (
        is_checkpoint(path)
        or layout.parse_step_dir(name) is not None
        or layout.parse_damaged_dir(name) is not None
    )


def is_run(path: str | os.PathLike[str]) -> bool:
    """A run folder: has ``run.json``, or step / set-aside / temp checkpoint folders (a run
    whose first save never committed is still a run: "no checkpoints yet")."""
    path = Path(path)
    if not path.is_dir() or is_checkpoint(path):
        return False
    if run_file(path).exists():
        return True
    return any(
        p.name.startswith(("step-", layout.DAMAGED_PREFIX + "step-", layout.TMP_PREFIX + "step-"))
        for p in path.iterdir()
    )


def verify_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """Every problem of one savegame checkpoint folder (empty: intact), reading every byte and
    checking every hash; a folder without a readable manifest is reported, not raised."""
    from savegame.engine import reader

    return reader.verify(path)
