"""Two tiers: a local cache folder that saves commit into, and a remote run that a background
uploader copies each committed checkpoint to, so training never waits for the network.

Call order (the :class:`~savegame.Checkpointer` does all of it; rank 0 = the one process)::

    Tiers(remote, cache, rank=…)       every rank, at the same point (a collective under torchrun)
    open_remote()                      rank 0: take the remote lease, reconcile run.json
    runfile.open_run(cache, …)         rank 0: the cache's own lock and run.json (as today)
    reconcile(run_id)                  rank 0: which cache checkpoints are uploaded, pending, stale
    refs(run_id)                       every rank, restore: remote + usable cache copies
    start() / committed(step)          every rank: the first step; after each local commit
    raise_failure()                    every rank, every step()/save(): a failed upload, typed
    drain(); release()                 every rank, close(): wait for the uploads; rank 0 lets go

One upload (:meth:`Tiers._attempt`), every rank in lock step on a dedicated gloo group::

    rank 0: the remote holds this step already? identical manifest -> done; different -> refuse
    rank 0: remote.begin(tmp, final)                 -> broadcast of the staging name
    every rank: streams its own files (manifest FileEntry.rank) from the cache into the staging
            area and checks the size the remote holds     -> gather of (sizes | failure)
    rank 0: every file there with its size -> Staging.commit (manifest last), LATEST, run.json
    broadcast of the decision; a failure is retried by every rank with the same backoff

Invariants: a checkpoint exists remotely only once its manifest is committed there, after every
rank's files (the store's commit). The cache never deletes a checkpoint that is not uploaded
(identical manifest remotely) or that is the newest uploaded one (fast local resume). Remote
retention runs only after an upload committed, spares the checkpoint just uploaded and everything
newer, and deletes only checkpoints of this run (run.json's id): never the only complete one.
A failure is retried with exponential backoff (:class:`UploadRetry`), then raised on the
training thread as a :class:`~savegame.errors.StorageError` naming the step and the remote URL;
the checkpoint stays in the cache and is tried again with the next upload and at ``close()``.

Why collectives and not polling the remote for the other ranks' files: the staging area of an
object store has no listing promise (and a file being uploaded may be visible at its final size
only on some backends), while the ranks already share a gloo group; the same pattern as the
local save protocol, over its own group so an upload never blocks a save's coordination. Its
timeout (``SAVEGAME_UPLOAD_TIMEOUT_S``, default 3600 s) bounds a hung rank's upload; a dead rank
fails the collective at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from savegame import errors, policy
from savegame.checkpointer import retention, runfile
from savegame.distributed import collectives
from savegame.engine import reader
from savegame.format import layout, manifest
from savegame.storage import Location, Staging, Store

log = logging.getLogger("savegame")

__all__ = ["DEFAULT_UPLOAD_TIMEOUT_S", "Tiers", "UploadRetry", "merge_refs"]

#: Seconds one upload's coordination step may wait for the slowest rank (its files' upload);
#: override with ``SAVEGAME_UPLOAD_TIMEOUT_S`` (same value on every rank).
DEFAULT_UPLOAD_TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class UploadRetry:
    """How often an upload is tried before its failure reaches the training thread.

    Attempt ``i`` (from 0) waits ``min(max_delay, first_delay * 2**(i-1))`` seconds first; the
    defaults give up after 5 attempts and about 15 s. The checkpoint stays in the cache and is
    tried again (with the same schedule) at the next save's upload and at ``close()``.
    """

    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"UploadRetry(attempts={self.attempts!r}): at least 1")
        if self.first_delay < 0 or self.max_delay < 0:
            raise ValueError("UploadRetry delays must be ≥ 0 seconds")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (0 = the first: none)."""
        return 0.0 if attempt == 0 else min(self.max_delay, self.first_delay * 2 ** (attempt - 1))


class _Permanent(Exception):
    """An upload that retrying cannot fix (a different checkpoint of the step is already
    remote, the lease was lost, the cached checkpoint is unreadable)."""

    def __init__(self, error: errors.CheckpointError) -> None:
        super().__init__(str(error))
        self.error = error


def _upload_timeout() -> float:
    return collectives.seconds_from_env("SAVEGAME_UPLOAD_TIMEOUT_S", DEFAULT_UPLOAD_TIMEOUT_S)


def _manifest_bytes(store: Store, step: int) -> bytes | None:
    """The raw manifest of ``step`` in ``store``, or None if it has none (or it is unreadable)."""
    try:
        return store.read(_manifest_key(step))
    except (OSError, EOFError, ValueError):
        return None


#: In the cache folder: the remote checkpoint this cache's work descends from when it was
#: restored from the remote alone (a fresh cache holds no copy of it): ``{"step": N,
#: "manifest_sha256": …, "cache_steps": [the cache's steps before that restore]}``. Its later
#: checkpoints are this run's own work, not stale, for as long as that checkpoint is still the
#: remote's newest; dropped at the first upload from the cache (stop 19, R15, D20).
BASE_FILE = "remote-base.json"
#: In the cache folder: the newest step this cache uploaded, ``{"step": N,
#: "manifest_identity": …}``. If the remote later holds that step without its manifest, it
#: was complete once: damage, set aside at open (:meth:`Tiers._set_aside_lost_manifest`), not
#: removed as an interrupted upload (review D22).
UPLOADED_FILE = "uploaded.json"


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _unsure(where: str, cache: Store, exc: BaseException) -> errors.StorageError:
    return errors.StorageError(
        f"could not read {where}: {exc}. Without it savegame cannot tell which checkpoints of "
        f"the cache {cache.describe()} are this run's newest work, so none was removed or "
        "restored; try again once the store answers (its own retries were spent)",
        path=where,
    )


def _read_strict(store: Store, key: str) -> bytes | None:
    """Blob ``key`` of ``store``, None only if it is absent; a read that fails otherwise (a 503
    after the store's retries, EIO) raises a StorageError: never taken for "absent"."""
    try:
        return store.read(key)
    except FileNotFoundError:
        return None
    except (OSError, EOFError) as exc:
        where = store.describe(key)
        raise errors.StorageError(f"could not read {where}: {exc}", path=where) from exc


def _read_sure(store: Store, key: str, cache: Store) -> bytes | None:
    """:func:`_read_strict`, its failure said in reconcile's words: whether a cache checkpoint
    is this run's work is never decided on a guess, since the answer "stale" deletes it."""
    try:
        return _read_strict(store, key)
    except errors.StorageError as exc:
        raise _unsure(store.describe(key), cache, exc.__cause__ or exc) from exc.__cause__


def _manifest_key(step: int) -> str:
    return f"{layout.step_dir(step)}/{layout.MANIFEST}"


def _manifest_sure(store: Store, step: int, cache: Store) -> bytes | None:
    return _read_sure(store, _manifest_key(step), cache)


def _manifest_strict(store: Store, step: int) -> bytes | None:
    """(an upload retries its failure: a 503 is not "the remote holds another step")"""
    return _read_strict(store, _manifest_key(step))


def _identity(m: manifest.Manifest) -> str:
    """A digest of a parsed manifest's content (the same for every copy of one checkpoint):
    what remote-base.json records, so that recording it needs no second read of the remote."""
    return _digest(m.to_bytes())


def _cache_record(cache: Store, name: str) -> dict[str, Any] | None:
    """A JSON record savegame keeps in the cache (:data:`BASE_FILE`, :data:`UPLOADED_FILE`),
    or None if it is absent or not one (an integer ``step`` in an object); a read that fails
    raises (:func:`_read_sure`)."""
    text = _read_sure(cache, name, cache)
    try:
        rec = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and type(rec.get("step")) is int else None


def _restored_base(
    remote: Store, cache: Store, newest: reader.CheckpointRef
) -> frozenset[int] | None:
    """If the cache was restored from the remote's ``newest`` checkpoint as it is now: the
    cache's steps that were there before that restore (never its work after it); else None."""
    rec = _cache_record(cache, BASE_FILE)
    if rec is None or rec["step"] != newest.step:
        return None
    before = rec.get("cache_steps")
    if not isinstance(before, list) or not all(type(x) is int for x in before):
        return None
    if "manifest_identity" in rec:
        same = newest.manifest is not None and rec["manifest_identity"] == _identity(
            newest.manifest
        )
    else:  # a record written before manifest_identity existed: the digest of the raw bytes
        raw = _manifest_sure(remote, newest.step, cache)
        same = raw is not None and rec.get("manifest_sha256") == _digest(raw)
    return frozenset(before) if same else None


def _broken(exc: BaseException | None) -> bool:
    """A remote copy proven damaged (not: of a newer format version, which is no damage)."""
    return isinstance(exc, errors.FormatError) and not isinstance(
        exc, errors.UnsupportedFormatError
    )


def _set_aside(remote: Store) -> dict[int, list[str]]:
    """The checkpoints set aside as damaged in ``remote``: their folder names by step (one
    more listing)."""
    try:
        entries = remote.list("")
    except OSError as exc:
        raise _unsure(remote.describe(), remote, exc) from exc
    out: dict[int, list[str]] = {}
    for e in entries:
        step = layout.parse_damaged_dir(e.name)
        if step is not None:
            out.setdefault(step, []).append(e.name)
    return out


def _set_aside_copies(
    remote: Store, cache: Store, steps: Sequence[int], aside: dict[int, list[str]]
) -> list[int]:
    """Of ``steps`` (cache checkpoints), those the remote holds set aside as damaged with the
    very same manifest: the same checkpoint (its data rotted remotely), not another machine's
    work, so the cache copy goes back in its place whatever is newer remotely."""
    same = []
    for step in steps:
        mine = _manifest_sure(cache, step, cache)
        for name in aside.get(step, ()):
            theirs = _read_sure(remote, f"{name}/{layout.MANIFEST}", cache)
            if mine is not None and theirs == mine:
                same.append(step)
                break
    return same


def merge_refs(
    remote: Store, cache: Store, run_id: str
) -> tuple[list[reader.CheckpointRef], list[int], list[int], list[int]]:
    """The restore candidates of a two-tier run, and what the cache holds.

    Returns ``(refs, uploaded, pending, stale)``: ``refs`` oldest first, a remote checkpoint
    followed by its cache copy (restore tries the last first: the local copy, then the remote
    one); ``uploaded`` — cache checkpoints with an identical manifest remotely; ``pending`` —
    cache checkpoints of this run newer than every remote one, written after the remote's
    newest (which the cache holds identically, or was restored from as it still is —
    :data:`BASE_FILE` —, or the remote holds none): uploads that a crash cut short, resumed
    from and uploaded again; ``stale`` — the rest of this run's cache
    checkpoints (the remote went on without them, e.g. from another machine): never restored,
    removed by the lock holder. A cache checkpoint whose remote copy is damaged, newer than
    every readable remote one, is pending once that copy is set aside; while the copy is in
    place, it is in none of the three lists: restored and kept, never uploaded over it.
    """
    rrefs = reader.list_checkpoints(remote)
    all_crefs = reader.list_checkpoints(cache)

    def unreadable(r: reader.CheckpointRef) -> bool:  # (not: absent, or damaged)
        return isinstance(r.error, errors.StorageError) and not isinstance(
            r.error, FileNotFoundError
        )

    for r in all_crefs:
        if unreadable(r):
            raise _unsure(str(r.path), cache, r.error)  # type: ignore[arg-type]
    # A remote manifest that could not be read decides something if it may be the run's newest,
    # or if the cache holds that step; an older one the cache does not hold decides nothing
    # here (restore reaches it only past every newer one, and raises there).
    readable = [r.step for r in rrefs if r.valid and r.manifest and r.manifest.run_id == run_id]
    held = {r.step for r in all_crefs}
    for r in rrefs:
        if unreadable(r) and (not readable or r.step > max(readable) or r.step in held):
            raise _unsure(str(r.path), cache, r.error)  # type: ignore[arg-type]
    crefs = [
        r for r in all_crefs if r.valid and r.manifest is not None and r.manifest.run_id == run_id
    ]
    by_step = {r.step: r for r in rrefs}
    ours = [r.step for r in rrefs if r.valid and r.manifest and r.manifest.run_id == run_id]
    newest = max(ours, default=None)
    uploaded: list[int] = []
    for c in crefs:
        if c.step in by_step:
            raw = _manifest_sure(cache, c.step, cache)
            if raw is not None and raw == _manifest_sure(remote, c.step, cache):
                uploaded.append(c.step)
    # A remote copy proven broken (its manifest damaged or missing; or set aside as
    # ``damaged-step-…``) of a step the cache holds intact, newer than every readable remote
    # checkpoint of the run: whose work the remote copy was cannot be told, but the cache copy
    # is the newest intact one of the run there is, and the cache's later work follows it like
    # work after an upload. Still in place remotely: kept and restored, never uploaded over the
    # remote's copy (the lock holder sets it aside at open, :meth:`Tiers.reconcile`). Set aside:
    # pending, uploaded in its place.
    later = [
        c.step for c in crefs if c.step not in uploaded and (newest is None or c.step > newest)
    ]
    kept = [s for s in later if s in by_step and _broken(by_step[s].error)]
    base_ok = newest is None or newest in uploaded or bool(kept)
    aside: dict[int, list[str]] | None = None  # (one more listing, only when needed)
    if not base_ok and later:
        aside = _set_aside(remote)
        base_ok = bool((set(aside) & set(later)) - set(by_step))
    older: frozenset[int] = frozenset()  # cache steps from before a restore from the remote
    if not base_ok:
        marked = _restored_base(remote, cache, by_step[newest])  # type: ignore[index]
        if marked is not None:
            base_ok, older = True, marked
    pending = [
        c.step
        for c in crefs
        if base_ok
        and c.step not in by_step
        and c.step not in older
        and (newest is None or c.step > newest)
    ]
    usable = set(uploaded) | set(pending) | set(kept)
    stale = [c.step for c in crefs if c.step not in usable]
    if stale:  # a copy set aside remotely that is this very checkpoint: uploaded again
        aside = _set_aside(remote) if aside is None else aside
        back = _set_aside_copies(remote, cache, [s for s in stale if s not in by_step], aside)
        pending = sorted(set(pending) | set(back))
        usable |= set(back)
        stale = [s for s in stale if s not in back]
    refs: list[reader.CheckpointRef] = []
    for step in sorted(set(by_step) | usable):
        if step in by_step:
            refs.append(by_step[step])
        if step in usable:
            refs.append(next(c for c in crefs if c.step == step))
    return refs, sorted(uploaded), sorted(pending), sorted(stale)


class Tiers:
    """The remote tier of a run whose saves commit into a local cache folder.

    Args:
        remote: The run's store of record (an object store, or any :class:`Store`).
        cache: The local folder saves commit into (shared by the ranks of a node).
        keep: The run's retention rule, applied to the remote run.
        rank: This process's rank (rank 0 holds the remote lease and commits uploads).
        retry: How often a failed upload is tried before it is raised.

    Every rank constructs it at the same point (it creates a gloo group under torchrun).
    """

    def __init__(
        self,
        remote: Store,
        cache: Store,
        *,
        keep: policy.Keep,
        rank: int,
        retry: UploadRetry | None = None,
    ) -> None:
        self.remote = remote
        self.cache = cache
        self.keep = keep
        self.rank = rank
        self.retry = retry if retry is not None else UploadRetry()
        self._group: collectives.Group | collectives.LocalGroup = (
            collectives.Group(timeout=_upload_timeout())
            if collectives.initialized()
            else collectives.LocalGroup()
        )
        self._lease = runfile.run_lock(remote, rank)
        self.run_id = ""
        #: The remote's run.json as this process last read or wrote it (None: unknown); the
        #: lease holder is its only writer, so an identical one is not put again.
        self._remote_run: bytes | None = None
        self.pending: list[int] = []
        self._uploaded: set[int] = set()
        self._verified: set[str] = set()  # remote checkpoints known intact (for retention)
        self._recorded = -1  # the step UPLOADED_FILE names (rank 0)
        self._failure: errors.CheckpointError | None = None
        self._cond = threading.Condition()
        self._rounds: list[int | None] = []  # each: upload pending steps ≤ it (None: all)
        self._busy = False
        self._started = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        try:
            remote.makedirs()
        except OSError as exc:
            raise errors.StorageError(
                f"cannot create the remote run {remote.describe()}: {exc}", path=remote.describe()
            ) from exc

    # ---- opening (rank 0) -------------------------------------------------------------------
    def open_remote(self) -> None:
        """Rank 0, before the cache's run.json is read: take the remote lease (held for the
        run's life) and make the cache's ``run.json`` the remote run's (a fresh cache gets the
        remote's; a cache of another run is refused).

        Raises:
            LockedError: another live writer holds the remote run's lease.
            CheckpointError: the cache folder holds another run.
        """
        self._lease.acquire()
        # Strict reads: a remote run.json that failed to read (not: is absent) would make this
        # a new run — the remote's run.json replaced by a new id, or a cache refused as
        # "another run" with the advice to empty it (its pending work lost).
        rrec = runfile.read_run_file(self.remote, strict=True)
        crec = runfile.read_run_file(self.cache, strict=True)
        if crec is not None and (rrec is None or rrec["run_id"] != crec["run_id"]):
            has_ckpts = any(r.valid for r in reader.list_checkpoints(self.cache))
            if rrec is not None or has_ckpts:
                raise errors.CheckpointError(
                    f"cache folder {self.cache.describe()} holds run "
                    f"{errors.quoted(crec['run_id'])}, but the remote run "
                    f"{self.remote.describe()} is "
                    + (f"run {errors.quoted(rrec['run_id'])}" if rrec else "new")
                    + "; use an empty cache folder (one per run), or the cache of this run",
                    path=self.cache.describe(),
                )
        if rrec is not None and crec is None:
            self._remote_run = self.remote.read(layout.RUN_FILE)  # the lease's snapshot: no request
            self.cache.put(layout.RUN_FILE, self._remote_run)
        elif rrec is not None:
            with contextlib.suppress(OSError, EOFError):  # unknown: mirrored as before
                self._remote_run = self.remote.read(layout.RUN_FILE)

    def reconcile(self, run_id: str) -> list[int]:
        """Rank 0, after the cache's run.json: publish it remotely, remove a dead writer's
        leftovers there, find what the cache holds (uploaded, pending, stale) and remove the
        stale cache checkpoints. Returns the pending steps (oldest first) for every rank."""
        self.run_id = run_id
        self._mirror_run_file()
        if self.remote.local_path() is None:
            self._set_aside_lost_manifest()
        retention.collect_garbage(self.remote, incomplete=self.remote.local_path() is None)
        refs, uploaded, pending, stale = merge_refs(self.remote, self.cache, run_id)
        if self._set_aside_broken(refs, uploaded, pending):
            refs, uploaded, pending, stale = merge_refs(self.remote, self.cache, run_id)
        self._uploaded = set(uploaded)
        for step in stale:
            log.warning(
                "cache %s: step %d is not in the remote run %s, which went on without it (another "
                "machine?); removing it from the cache",
                self.cache.describe(), step, self.remote.describe(),
            )  # fmt: skip
        if stale:
            plan = [i for i in retention.list_run(self.cache, self.keep, run_id) if i.step in stale]
            retention.delete_unkept([dataclasses.replace(i, kept_for=()) for i in plan], spare=None)
        self.pending = list(pending)
        if pending:
            log.info(
                "cache %s holds step(s) %s not yet uploaded to %s: resuming their upload",
                self.cache.describe(), pending, self.remote.describe(),
            )  # fmt: skip
        return list(pending)

    def _set_aside_lost_manifest(self) -> None:
        """Rank 0 at open, before the garbage collection of an object store (which removes a
        step folder without a manifest as an interrupted upload): if that folder is of the step
        this cache uploaded last (:data:`UPLOADED_FILE`, its copy still here as uploaded), it
        was complete once — its manifest was lost, and it is set aside as damaged instead, so
        the cache copy is uploaded in its place (the same path as a damaged manifest). A step
        folder deleted whole (the user dropping a branch) is not brought back."""
        from savegame.engine import writer  # imports torch: only when something is set aside

        rec = _cache_record(self.cache, UPLOADED_FILE)
        if rec is None:
            return
        step = rec["step"]
        key = layout.step_dir(step)
        try:
            mine = reader.read_manifest(Location(self.cache, key))
        except errors.CheckpointError:
            return  # the cache no longer holds it intact: nothing to put in its place
        if _identity(mine) != rec.get("manifest_identity"):
            return
        there = Location(self.remote, key)
        try:
            reader.read_manifest(there)
        except errors.IncompleteCheckpointError as exc:  # the folder, without its manifest
            try:
                writer.set_aside_damaged(there, step, exc)
            except OSError as err:
                log.warning("could not set aside %s (%s)", there, err)
        except errors.CheckpointError:
            return  # absent, readable or otherwise damaged: decided elsewhere

    def _set_aside_broken(
        self, refs: Sequence[reader.CheckpointRef], uploaded: Sequence[int], pending: Sequence[int]
    ) -> bool:
        """Rank 0 at open, under the lease and before any upload: the remote copy of a step the
        cache holds intact and :func:`merge_refs` keeps for it (the remote copy is damaged) is
        set aside there (``damaged-step-…``, kept for inspection), once proven damaged again,
        so that the cache copy is uploaded in its place and the run's remote line has no hole.
        Returns whether anything was set aside. One that cannot be moved stays, and the cache
        copy stays kept (restored, not uploaded)."""
        from savegame.engine import writer  # imports torch: only when something is set aside

        done = set(uploaded) | set(pending)
        moved = False
        for r in refs:
            if r.loc is None or r.loc.store is not self.cache or r.step in done:
                continue
            there = Location(self.remote, layout.step_dir(r.step))
            problems = reader.damage(there)
            if not problems:
                continue
            try:
                writer.set_aside_damaged(there, r.step, problems[0])
            except OSError as exc:
                log.warning(
                    "could not set aside the damaged %s (%s): the intact cache copy %s is kept "
                    "and restored, not uploaded in its place",
                    there, exc, self.cache.describe(layout.step_dir(r.step)),
                )  # fmt: skip
                continue
            moved = True
        return moved

    def restored(self, ref: reader.CheckpointRef) -> None:
        """Rank 0, after a restore of ``ref``: if that is a remote checkpoint the cache holds
        no identical copy of (a fresh cache), record it as the base of this cache's work, so
        that what is saved next and not yet uploaded when the process dies is resumed and
        uploaded, not removed as stale (docs/tiers.md). From the manifest the restore read:
        no request to the remote, which could fail where the restore did not. A cache that
        cannot take the record is logged as an error, not raised: rank 0 alone runs this, and
        the saves into that cache fail on every rank anyway."""
        m = ref.manifest
        if m is None or ref.loc is None or ref.loc.store is not self.remote:
            return  # restored from the cache itself
        try:
            mine = reader.read_manifest(Location(self.cache, layout.step_dir(ref.step)))
        except errors.CheckpointError:
            mine = None  # absent (or unusable): the cache holds no copy of it
        if mine is not None and _identity(mine) == _identity(m):
            return
        try:
            # What the cache holds now is not the work that follows this restore (a rollback
            # to an older step leaves newer ones there): never pending on its account.
            before = sorted(r.step for r in reader.list_checkpoints(self.cache))
            rec = {"step": ref.step, "manifest_identity": _identity(m), "cache_steps": before}
            self.cache.put(BASE_FILE, json.dumps(rec).encode())
        except OSError as exc:
            log.error(
                "restored step %d from %s, but could not record it in the cache %s (%s): work "
                "saved next is taken for stale at the next open if this process dies before "
                "uploading it — fix the cache folder (space, permissions)",
                ref.step, self.remote.describe(), self.cache.describe(), exc,
            )  # fmt: skip

    def follow(self, run_id: str, pending: Sequence[int]) -> None:
        """Ranks other than 0: what rank 0 found when it opened the run."""
        self.run_id = run_id
        self.pending = list(pending)

    def refs(self) -> list[reader.CheckpointRef]:
        """Every rank, at restore: the remote checkpoints and the usable cache copies."""
        return merge_refs(self.remote, self.cache, self.run_id)[0]

    def list(self) -> list[retention.CheckpointInfo]:
        return retention.list_run(self.remote, self.keep, self.run_id)

    # ---- uploads (every rank) ------------------------------------------------------------------
    def start(self) -> None:
        """The first step: upload what an earlier session left pending (idempotent)."""
        if not self._started:
            self._started = True
            self._round(None)

    def committed(self, step: int) -> None:
        """Every rank, after ``step`` committed in the cache: upload it in the background."""
        self._started = True
        with self._cond:
            if step not in self.pending:
                self.pending.append(step)
        self._round(step)

    def raise_failure(self) -> None:
        """Raise (once) an upload failure on the caller's thread; never blocks."""
        with self._cond:
            exc, self._failure = self._failure, None
        if exc is not None:
            raise exc

    def drain(self) -> None:
        """Every rank, at ``close()``: upload everything pending (one more round), wait, and
        raise a failure (the checkpoints that failed stay in the cache)."""
        self._started = True
        self._round(None)
        with self._cond:
            while self._rounds or self._busy:
                self._cond.wait()
        self.raise_failure()

    def release(self) -> None:
        """Rank 0 lets go of the remote run (after :meth:`drain`): publish the final run.json
        (its sessions) and release the lease. Never raises; stops the worker."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self.rank == 0 and self._lease.held and self.run_id:
            try:
                self._mirror_run_file()
            except OSError as exc:
                log.warning("could not publish run.json to %s: %s", self.remote.describe(), exc)
        try:
            self._lease.release()
        except Exception as exc:  # noqa: BLE001 - a lease that cannot be released expires
            log.warning("could not release the lease of %s: %s", self.remote.describe(), exc)

    def _round(self, limit: int | None) -> None:
        with self._cond:
            if self._stopped:
                return
            self._rounds.append(limit)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="savegame-upload", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        # Rounds are the same on every rank (one per commit, one at start, one per drain) and
        # run in order: the steps a round uploads, and so every collective, match on every rank.
        while True:
            with self._cond:
                while not self._rounds and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._rounds:
                    self._thread = None
                    return
                limit = self._rounds[0]
                self._busy = True
                steps = [s for s in sorted(self.pending) if limit is None or s <= limit]
            try:
                for step in steps:
                    if self._stopped or not self._upload(step):
                        break
            finally:
                with self._cond:
                    if self._rounds:
                        self._rounds.pop(0)
                    self._busy = False
                    self._cond.notify_all()

    def _fail(self, exc: errors.CheckpointError) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = exc

    def _upload(self, step: int) -> bool:
        """Upload one step with retries; True once it is remote (then retention runs)."""
        key = layout.step_dir(step)
        where = self.remote.describe(key)
        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            time.sleep(self.retry.delay(attempt))
            try:
                t0 = time.perf_counter()
                nbytes = self._attempt(step)
            except _Permanent as exc:
                self._fail(exc.error)
                with self._cond:  # retrying cannot help: stop trying it (it stays in the cache)
                    if step in self.pending:
                        self.pending.remove(step)
                return False
            except Exception as exc:  # noqa: BLE001 - thread boundary: retried, then reported
                last = exc
                log.warning(
                    "upload of step %d to %s failed (attempt %d of %d): %s",
                    step, where, attempt + 1, self.retry.attempts, exc,
                )  # fmt: skip
                continue
            if self.rank == 0 and nbytes:
                log.info(
                    "step %d: uploaded to %s (%d bytes, %.2fs)",
                    step, where, nbytes, time.perf_counter() - t0,
                )  # fmt: skip
            with self._cond:
                if step in self.pending:
                    self.pending.remove(step)
                self._uploaded.add(step)
                if self._failure is not None and self._failure.step == step:
                    self._failure = None  # not reported yet, and no longer true: it is uploaded
            if self.rank == 0:
                # The cache holds an uploaded step of its own now: the restored base is no
                # longer needed, and left there it would outlive a deletion of this step.
                with contextlib.suppress(OSError):
                    if self.cache.exists(BASE_FILE):
                        self.cache.delete(BASE_FILE, None)
                self._record_upload(step)
                try:
                    self._retention(step)
                except Exception as exc:  # noqa: BLE001 - thread boundary
                    err = errors.StorageError(
                        f"step {step} was uploaded to {where}, but retention after it failed: "
                        f"{type(exc).__name__}: {exc}; old checkpoints may not have been deleted",
                        path=where,
                        step=step,
                    )
                    err.__cause__ = exc
                    self._fail(err)
            return True
        err = errors.StorageError(
            f"upload of step {step} to {where} failed after {self.retry.attempts} attempt(s): "
            f"{type(last).__name__}: {last}; the checkpoint is kept in the cache "
            f"{self.cache.describe()} and its upload is tried again with the next save and at "
            "close() — check the remote (credentials, network, space)",
            path=where,
            step=step,
        )
        err.__cause__ = last
        self._fail(err)
        return False

    def _record_upload(self, step: int) -> None:
        """Rank 0, after ``step`` is uploaded: :data:`UPLOADED_FILE`, if it is the newest."""
        if step < self._recorded:
            return
        try:
            m = reader.read_manifest(Location(self.cache, layout.step_dir(step)))
            rec = {"step": step, "manifest_identity": _identity(m)}
            self.cache.put(UPLOADED_FILE, json.dumps(rec).encode())
            self._recorded = step
        except (OSError, errors.CheckpointError) as exc:  # the record only helps a rare repair
            log.warning(
                "could not record the upload of step %d in %s: %s", step, self.cache.describe(), exc
            )

    def _attempt(self, step: int) -> int:
        """One collective upload attempt of ``step``; the bytes this rank uploaded.

        Raises:
            _Permanent: retrying cannot help (on every rank).
            Exception: this attempt failed (on every rank); retry.
        """
        g, key = self._group, layout.step_dir(step)
        where = f"upload of step {step} to {self.remote.describe(key)}"
        raw = _manifest_bytes(self.cache, step)
        staging: Staging | None = None
        opened: tuple[str, str] = ("go", "")
        if self.rank == 0:
            try:
                opened = self._open_upload(step, raw)
                if opened[0] == "go":
                    staging = self.remote.begin(layout.tmp_dir(step, uuid.uuid4().hex[:12]), key)
                    opened = ("go", staging.name)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it (no hang)
                if not g.distributed:
                    raise
                opened = ("fail", f"rank 0: {type(exc).__name__}: {exc}")
        kind, name = g.broadcast(opened, what=where)
        if kind == "done":
            return 0
        if kind == "fail":
            raise OSError(errno.EIO, name)
        if kind == "permanent":
            raise _Permanent(
                errors.StepExistsError(name, path=self.remote.describe(key), step=step)
            )
        report: tuple[str, Any] = ("ok", {})
        nbytes = 0
        try:
            if raw is None:
                raise OSError(errno.ENOENT, f"no manifest for step {step} in the cache")
            m = manifest.Manifest.from_bytes(raw, self.cache.describe(key))
            if staging is None:
                staging = self.remote.staging(name)
            sizes = self._send_files(staging, key, m, g.rank, g.world)
            nbytes = sum(sizes.values())
            report = ("ok", sizes)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0 like any failure
            report = ("fail", f"rank {g.rank}: {type(exc).__name__}: {exc}")
            if not g.distributed:
                if staging is not None:
                    staging.abort()
                raise
        reports = g.gather(report, what=where)
        decision: tuple[str, str] = ("ok", "")
        if self.rank == 0:
            try:
                decision = self._finish(step, staging, raw, reports)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it (no hang)
                if not g.distributed:
                    raise
                decision = ("fail", f"rank 0: {type(exc).__name__}: {exc}")
        status, why = g.broadcast(decision, what=where)
        if status == "permanent":
            raise _Permanent(errors.StorageError(why, path=self.remote.describe(key), step=step))
        if status != "ok":
            raise OSError(errno.EIO, why)
        return nbytes

    def _open_upload(self, step: int, raw: bytes | None) -> tuple[str, str]:
        """Rank 0: ("done", "") if the remote holds this exact checkpoint (an earlier attempt
        committed it), ("permanent", why) if it holds another, else ("go", "")."""
        remote_raw = _manifest_strict(self.remote, step)
        if remote_raw is None:
            return ("go", "")
        if raw is not None and remote_raw == raw:
            return ("done", "")
        return (
            "permanent",
            f"the remote run {self.remote.describe()} already holds a different step {step}; "
            f"the cached one ({self.cache.describe(layout.step_dir(step))}) is not uploaded — "
            "delete one of them by hand",
        )

    def _send_files(
        self, staging: Staging, key: str, m: manifest.Manifest, rank: int, world: int
    ) -> dict[str, int]:
        """Stream this rank's files (a rank no longer in the job: rank 0's) from the cache
        into the remote staging area; each size the remote holds is checked."""
        out = {}
        for fname, entry in sorted(m.files.items()):
            if entry.rank % world != rank:
                continue
            if manifest.is_ref(fname):
                out[fname] = self._send_shared(fname, entry)
                continue
            with self.cache.open(f"{key}/{fname}") as blob:
                if blob.size != entry.size:
                    raise OSError(
                        errno.EIO,
                        f"{self.cache.describe(f'{key}/{fname}')} has {blob.size} bytes, the manifest "
                        f"says {entry.size}",
                    )
                sent, size = staging.write(fname, _copier(blob), size=entry.size)
            if sent != entry.size or size != entry.size:
                raise OSError(
                    errno.EIO,
                    f"{staging.describe(fname)} holds {size} bytes after the upload "
                    f"({sent} sent), expected {entry.size}",
                )
            out[fname] = size
        return out

    def _send_shared(self, fname: str, entry: manifest.FileEntry) -> int:
        """A file the checkpoint shares with an earlier one (incremental saves): it must be in
        the remote run, at the same place relative to the run, with its size, before the
        manifest that refers to it is committed there. Normally it is (the earlier checkpoint
        was uploaded first, and remote retention keeps files that remote checkpoints use); if
        not (remote retention removed a folder only this pending checkpoint uses), it is
        uploaded again from the cache, which keeps it while this checkpoint refers to it."""
        folder = manifest.ref_folder(fname)
        there = reader.resolve(Location(self.remote, folder), fname)
        try:
            size: int | None = self.remote.size(there)
        except FileNotFoundError:
            size = None
        if size == entry.size:
            return size
        with self.cache.open(reader.resolve(Location(self.cache, folder), fname)) as blob:
            if blob.size != entry.size:
                raise OSError(
                    errno.EIO,
                    f"{self.cache.describe(fname)} has {blob.size} bytes, the manifest says {entry.size}",
                )
            # Under its retired name (where references find it while its folder is not
            # there), in one put (atomic on every store); a shared file is uploaded again only
            # in the rare case above, so holding it in memory once is acceptable.
            dest = layout.retired_file(fname)
            self.remote.put(dest, blob.read(0, blob.size))
        got = self.remote.size(dest)
        if got != entry.size:
            raise OSError(
                errno.EIO,
                f"{self.remote.describe(dest)} holds {got} bytes after the upload, expected {entry.size}",
            )
        return got

    def _finish(
        self, step: int, staging: Staging | None, raw: bytes | None, reports: list[Any]
    ) -> tuple[str, str]:
        """Rank 0: commit the manifest once every rank's files are in the staging area."""
        failed = [str(rep[1]) for rep in reports if rep[0] != "ok"]
        if staging is None or raw is None or failed:
            if staging is not None:
                staging.abort()
            return ("fail", "; ".join(failed) or "nothing to upload")
        m = manifest.Manifest.from_bytes(raw, self.cache.describe(layout.step_dir(step)))
        got: dict[str, int] = {}
        for rep in reports:
            got.update(rep[1])
        missing = {f: e.size for f, e in m.files.items() if got.get(f) != e.size}
        if missing:
            staging.abort()
            return (
                "fail",
                f"files missing or of the wrong size in the remote staging area: {missing}",
            )
        if not self._lease.held:
            staging.abort()
            return (
                "permanent",
                f"the lease on {self.remote.describe()} was lost (expired or taken by another "
                "writer); uploads stopped — another process may be writing this run",
            )
        key = layout.step_dir(step)
        try:
            staging.commit(key, layout.MANIFEST, raw)
        except FileExistsError:
            # (A failed read raises: retried, and the next attempt finds it "done" if it is ours;
            # the staging area is left to garbage collection, never aborted on a guess.)
            if _manifest_strict(self.remote, step) != raw:
                staging.abort()
                return ("permanent", f"another step {step} appeared at {self.remote.describe(key)}")
        except BaseException:
            staging.abort()
            raise
        self._verified.add(self.remote.describe(key))  # its sizes were checked just now
        try:
            self.remote.put(layout.LATEST, f"{key}\n".encode())
            self._mirror_run_file()
        except OSError as exc:  # hints only: the manifest is the commit
            log.warning("step %d uploaded; could not update LATEST/run.json: %s", step, exc)
        return ("ok", "")

    def _mirror_run_file(self) -> None:
        data = self.cache.read(layout.RUN_FILE)
        if data == self._remote_run:
            return  # the remote holds these bytes already (a session that only restored)
        self._remote_run = None  # unknown until the put succeeded
        self.remote.put(layout.RUN_FILE, data)
        self._remote_run = data

    # ---- retention (rank 0, on the upload thread) ----------------------------------------------
    def _retention(self, step: int) -> None:
        """After ``step`` committed remotely: the user's Keep on the remote run (sparing ``step``
        and anything newer), then the cache keeps the newest uploaded + the pending ones."""
        moved: list[int] = []  # remote checkpoints found damaged and set aside
        plan = retention.plan_retention(
            self.remote,
            self.keep,
            self.run_id,
            verified=self._verified,
            spare=step,
            set_aside=moved,
        )
        plan = [dataclasses.replace(i, kept_for=("newer than the upload",)) if i.step > step else i for i in plan]  # fmt: skip
        retention.delete_unkept(plan, spare=step, keep=self.keep)
        # only checkpoints still on the remote stay known intact (one entry per upload)
        self._verified.intersection_update(
            str(i.path) for i in plan if i.kept_for or i.step == step
        )
        here = {s for s in moved if self.cache.exists(_manifest_key(s))}  # (its copy is here)
        with self._cond:
            for gone in sorted(s for s in self._uploaded if s in here):
                # Its remote copy was set aside as damaged (a data file rotted there): the
                # cache copy is the run's intact one. One process uploads it again (next
                # round); under torch.distributed the pending list must be the same on every
                # rank, so it stays in the cache until the next open, which finds the set-aside
                # copy with the same manifest and uploads it then (merge_refs).
                self._uploaded.discard(gone)
                log.warning(
                    "the remote copy of step %d in %s was set aside as damaged; the cache's "
                    "copy %s is kept%s",
                    gone, self.remote.describe(), self.cache.describe(layout.step_dir(gone)),
                    "" if self._group.distributed else " and uploaded again",
                )  # fmt: skip
                if not self._group.distributed and gone not in self.pending:
                    self.pending.append(gone)
            uploaded, pending = set(self._uploaded), set(self.pending)
        newest = max(uploaded, default=None)
        cplan = retention.list_run(self.cache, policy.Keep(last=1), self.run_id)
        cplan = [
            dataclasses.replace(
                i,
                kept_for=()
                if i.step in uploaded
                and newest is not None
                and i.step < newest
                and i.step not in pending
                else (i.kept_for or ("cache",)),
            )
            for i in cplan
        ]
        for info in retention.delete_unkept(cplan, spare=newest):
            with self._cond:
                self._uploaded.discard(info.step)


def _copier(blob: Any) -> Callable[[BinaryIO], int]:
    """``produce`` for :meth:`Staging.write`: stream ``blob`` into the file, every count checked."""

    def produce(f: BinaryIO) -> int:
        sent = 0
        for piece in blob.stream():
            view = memoryview(piece).cast("B")
            while len(view):
                n = f.write(view)
                if not n:
                    raise OSError(errno.EIO, "the remote accepted no bytes (short write)")
                view = view[n:]
                sent += n
        return sent

    return produce
