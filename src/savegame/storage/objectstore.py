"""Object stores (S3, GCS, Azure, HTTP(S) read-only, obstore's in-memory store) behind the
:class:`~savegame.storage.base.Store` interface, on obstore.

Invariant: **a checkpoint exists iff its manifest object exists** (docs/remote.md, "The commit
rule"). There is no rename: a save writes a small *marker* object at its temporary name
(``.tmp-step-…-<id>``, create-only) that names where the data goes, writes the data objects
straight to ``<final>/<file>``, and commits by putting ``<final>/manifest.json`` create-only;
the marker is deleted after. While a marker names a prefix that has no manifest, listings hide
that prefix, so no reader ever sees a partial checkpoint; a writer killed at any point leaves a
marker, which the next writer's garbage collection (``collect_garbage``) frees.

Deletion is the mirror image: a marker ``{"deleting": true}`` is created, then the manifest is
deleted first (the checkpoint is gone for every reader at that instant), then the data objects,
then the marker. A committed checkpoint never loses a data object while its manifest exists.

The writer lock is a *lease* (:class:`Lease`): an object taken with a create-only put, renewed
by a daemon thread with ``If-Match`` puts, taken over with a conditional put once expired.

Round trips (each one is a request's latency, which a small checkpoint does not amortize): the
small objects (``manifest.json``, ``run.json``, ``LATEST``) are read with one GET, no HEAD
first; and while a *snapshot* is open (:meth:`ObjectStore.begin_snapshot`: taken when a lease is
acquired, and by a transfer for its source) a run's listing, ``run.json``, its manifests and
the listings of its newest checkpoints are fetched once, concurrently, and serve every read of
the start-up (lock check, ``run.json``, garbage collection, the listing of checkpoints, the
restore's opens) instead of one sequential request each. Any write through the store ends the
snapshot; so does :func:`end_snapshot` (after a restore), and it expires after
:data:`SNAPSHOT_SECONDS`. It is only taken where nothing else may change the run meanwhile (the
lease holder, right *after* the lease is taken), or where a stale view is harmless (a transfer
plans from one listing anyway). A Checkpointer also reads ahead *before* its lease
(:meth:`ObjectStore.before_lease`): the run's listing (is the URL a checkpoint?), then
``run.json`` and the newest manifests while the lease's PUT is in flight; the holder's snapshot
lists the run whole (:meth:`ObjectStore._ls_deep`: every checkpoint folder's files with it)
and uses each of those reads only once that listing shows the very version read. The newest
checkpoint's data is read then too (:class:`savegame.engine.fetch.ReadAhead`, kept by the store
with :meth:`ObjectStore.attach_read_ahead` and cancelled when the snapshot ends), under the
same rule: used only once the holder's listing shows the versions read.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

from savegame import errors
from savegame.format import layout
from savegame.storage import base, urls

__all__ = ["DEFAULT_LEASE_SECONDS", "Lease", "ObjectStore", "begin_snapshot", "end_snapshot"]

T = TypeVar("T")
log = logging.getLogger(__name__)
#: A lease whose expiry is further than this from now (seconds: a year) was not written by a
#: savegame writer (whose leases run ``lease_seconds``): it is taken over as unreadable.
_LEASE_FUTURE = 366 * 86400.0

#: How long a lease lives without renewal (a dead writer's run is free after this).
DEFAULT_LEASE_SECONDS = 60.0
#: Bytes buffered per multipart part of a staged file, and parts in flight at once, for a file
#: of unknown size (obstore's own ``put`` takes 5 MiB x 12; on the moto benchmark 10 MiB x 8
#: uploaded 240 MiB ~25 % slower). A write holds at most parts x concurrency in memory.
PART_BYTES = 5 << 20
PART_CONCURRENCY = 12
#: S3's limits: at most 10,000 parts per upload, each part but the last at least 5 MiB.
_MAX_PARTS = 10_000
_PART_MEMORY = PART_BYTES * PART_CONCURRENCY


def part_plan(size: int | None) -> tuple[int, int]:
    """(part bytes, parts in flight) of a multipart upload of about ``size`` bytes: parts of
    ``PART_BYTES`` while the file fits in 9,000 of them (a margin under S3's 10,000), larger
    (whole MiB) beyond; the parts in flight shrink so the memory held stays about
    ``PART_BYTES x PART_CONCURRENCY``, never under 2. Without a size, a file over 9,000 x
    ``PART_BYTES`` (44 GiB) fails at S3's part limit: every writer here passes one."""
    part = PART_BYTES
    if size is not None and size > (_MAX_PARTS - 1_000) * PART_BYTES:
        mib = 1 << 20
        part = -(-size // ((_MAX_PARTS - 1_000) * mib)) * mib  # whole MiB, <= 9,000 parts
    return part, max(2, min(PART_CONCURRENCY, _PART_MEMORY // part))


#: Objects small by design, read whole with one GET and no HEAD before it.
_SMALL_NAMES = frozenset({layout.MANIFEST, layout.RUN_FILE, layout.LATEST})
#: A "small" object bigger than this (a damaged manifest) is not read on open: its GET is
#: dropped after the headers (size, ETag) and it is read in ranges like any other blob.
_SMALL_BYTES = 4 << 20
#: Folders below a key that a walk of a read-only HTTP run descends (a run is two deep).
_HTTP_DEPTH = 4
#: A name from an HTTP listing longer than this is no file of a run.
_HTTP_NAME_MAX = 255
#: How long a snapshot (see the module docstring) serves reads at most.
SNAPSHOT_SECONDS = 10.0
#: Step folders whose manifest and listing a snapshot fetches ahead (the newest ones: a restore
#: reads the newest valid checkpoint; older ones are read on demand).
SNAPSHOT_STEPS = 8
#: A lease holder's run of fewer objects than this is listed whole, in one request (one page of
#: an S3 listing), instead of the run and then each newest checkpoint folder.
_DEEP_OBJECTS = 1000


class _Pending:
    """A deletion whose freer this process has not finished (detach's freer, maybe run later
    on a background thread). A new save of the same key must not race it (its objects have
    the same names): if the freer has not started, the save takes the work over (the freer
    then does nothing); if it is running, the save waits for it."""

    def __init__(self) -> None:
        self.state = "waiting"  # -> "running" (the freer) or "taken" (a save), then "done"
        self.done = threading.Event()


# (store url, marker key) -> its pending deletion.
_PENDING: dict[tuple[str, str], _Pending] = {}
_PENDING_LOCK = threading.Lock()


def _obstore() -> Any:
    import obstore  # urls.connect checked that it is installed

    return obstore


def _parent(key: str) -> str:
    return key.rsplit("/", 1)[0] if "/" in key else ""


def _base(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _is_marker(key: str) -> bool:
    return _base(key).startswith(layout.TMP_PREFIX)


def _who() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _ObjBlob(base.Blob):
    """An object pinned to the version it had when opened (its ETag); thread-safe. ``body``:
    the whole object, already read by the GET that opened it (a small object): reads are
    served from it, with no request."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        meta: Any,
        body: bytes | None = None,
        *,
        unseen: bool = False,
    ) -> None:
        self._store = store
        self._key = key
        self.size = int(meta["size"])
        self.etag = meta.get("e_tag")
        self._body = body if body is not None and len(body) == self.size else None
        #: Opened without a request (:meth:`ObjectStore.open_expecting`): ``size`` is the one
        #: expected, and the version is pinned by the first response (see :meth:`_pin`).
        self._unseen = unseen
        self._pin_lock = threading.Lock()

    def _pin(self, meta: Any) -> None:
        """A blob opened unseen learns its version from the first response: every response
        must then be of that version (those sent before it was known are checked here, those
        after carry ``If-Match``) and of the expected size."""
        size, etag = int(meta["size"]), meta.get("e_tag")
        where = self._store.describe(self._key)
        if size != self.size:
            raise EOFError(f"is {size} bytes but the manifest says {self.size}")
        with self._pin_lock:
            if self.etag is None:
                self.etag = etag
            elif etag != self.etag:
                raise base.ChangedError(
                    errno.ESTALE, f"{where} changed while it was being read ({etag} != {self.etag})"
                )

    def _get(self, start: int, end: int | None) -> Any:
        opts: dict[str, Any] = {}
        if end is not None and (start, end) != (0, self.size):  # the whole object: no Range
            opts["range"] = (start, end)
        elif start:  # the whole object needs no Range (a server that ignores Range is fine)
            opts["range"] = {"offset": start}
        if self.etag:
            opts["if_match"] = self.etag
        s = self._store
        try:
            res = s._call(lambda: _obstore().get(s._obs, s._p(self._key), options=opts), self._key)
        except (base.ChangedError, FileNotFoundError) as exc:
            s._forget()  # opened from a snapshot that is out of date: the next open asks anew
            if isinstance(exc, FileNotFoundError):
                # Gone since it was opened (or, unseen, since it was listed): moved aside (a
                # deleted folder's shared file, which retention copies to its retired name
                # first) or deleted. A change: the reader starts the file over and opens it
                # again the usual way, which finds the retired copy or says it is missing.
                raise base.VanishedError(
                    errno.ENOENT, f"{s.describe(self._key)} is not there any more"
                ) from None
            raise
        if self._unseen:
            self._pin(res.meta)
        got = tuple(res.range)
        # A server that ignores Range answers 200 with the whole object: another start, or
        # (a range from byte 0) another end.
        if got[0] != start or (end is not None and got[1] != end and "range" in opts):
            raise base.RangeNotSupportedError(
                errno.EIO,
                f"{s.describe(self._key)}: the server ignored a Range request (sent the whole "
                "object); fetch it from its start",
            )
        return res

    #: ``readinto`` also takes a sink (see :meth:`readinto`).
    takes_sinks = True

    def readinto(self, offset: int, dest: Any) -> None:
        """Fill ``dest`` with the bytes at ``offset``. ``dest`` may also be a *sink*: an
        object with ``len()`` and ``take(piece)``, given each piece of the body in order as
        it arrives (:class:`savegame.engine.fetch._Sink` scatters them into several tensors
        and hashes them on arrival)."""
        n = len(dest)
        if offset < 0 or offset + n > self.size:
            raise EOFError(f"ends at byte {self.size}, expected {offset + n}")
        if n == 0:
            return
        take = getattr(dest, "take", None)
        if self._body is not None:
            if take is not None:
                take(memoryview(self._body)[offset : offset + n])
            else:
                dest.cast("B")[:] = memoryview(self._body)[offset : offset + n]
            return
        res = self._get(offset, offset + n)
        # Streamed straight into ``dest`` as the body arrives: one copy, overlapping the
        # download, and no whole response held (``bytes()`` would hold all ``n`` bytes per
        # request in flight before copying them). The copy is numpy's, which releases the GIL
        # (a memoryview slice assignment holds it): the requests in flight copy, and fault in
        # their fresh destination pages, in parallel — 10-15% of a 48 MiB restore here.
        import numpy as np

        out = None if take is not None else np.frombuffer(dest.cast("B"), dtype=np.uint8)
        pos = 0
        it = iter(res.stream(min_chunk_size=1 << 20))
        while True:
            try:
                piece = next(it)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - obstore's errors, translated
                raise urls.translate(exc, self._store.describe(self._key)) from None
            view = np.frombuffer(piece, dtype=np.uint8)
            if pos + len(view) > n:
                pos += len(view)
                break
            if out is None:
                take(view)  # type: ignore[misc]
            else:
                np.copyto(out[pos : pos + len(view)], view)
            pos += len(view)
        if pos != n:
            raise EOFError(f"{self._store.describe(self._key)}: got {pos} bytes, expected {n}")

    def stream(
        self, offset: int = 0, chunk: int = 8 << 20, end: int | None = None
    ) -> Iterator[memoryview]:
        """One streaming GET from ``offset`` to ``end`` (default: the end), pinned to the
        opened version; pieces of at most ``chunk`` bytes as they arrive."""
        stop = self.size if end is None else min(end, self.size)
        if offset >= stop:
            return
        if self._body is not None:
            view = memoryview(self._body)[:stop]
            for i in range(offset, stop, chunk):
                yield view[i : i + chunk]
            return
        res = self._get(offset, None if stop == self.size else stop)
        it = iter(res.stream(min_chunk_size=min(chunk, 1 << 20)))
        while True:
            try:
                piece = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - obstore's errors, translated
                raise urls.translate(exc, self._store.describe(self._key)) from None
            view = memoryview(piece)
            for i in range(0, len(view), chunk):
                yield view[i : i + chunk]


class _WriterFile(io.RawIOBase):
    """What ``produce`` writes into: an obstore multipart writer (aborted on an exception)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._inner.write(view)
        return len(view)


class _ObjStaging(base.Staging):
    """A save in progress: the marker ``name`` and the data objects under ``dest``."""

    def __init__(self, store: ObjectStore, name: str, dest: str) -> None:
        self.name = name
        self.dest = dest
        self._store = store
        self._manifest: tuple[str, bytes] | None = None
        self._published = False
        self._copy_to: str | None = None

    def describe(self, fname: str = "") -> str:
        return self._store.describe(base.join(self.dest, fname))

    def _check(self) -> None:
        if self._store._head(self.name) is None:
            raise FileNotFoundError(
                errno.ENOENT,
                "the save's marker is gone (removed by another writer?)",
                self._store.describe(self.name),
            )

    def write(
        self, fname: str, produce: Callable[[BinaryIO], T], *, size: int | None = None
    ) -> tuple[T, int]:
        key = base.join(self.dest, base.check_name(fname))
        s = self._store
        s._forget()
        s._check_lease(f"write {key}")
        self._check()
        # The writer streams parts as they fill (memory stays bounded) and aborts the
        # multipart upload when ``produce`` raises: nothing is left under the key.
        part, flight = part_plan(size)
        writer = s._call(
            lambda: _obstore().open_writer(
                s._obs, s._p(key), buffer_size=part, max_concurrency=flight
            ),
            key,
        )
        try:
            with writer:
                out = produce(_WriterFile(writer))  # type: ignore[arg-type]
        except Exception as exc:
            if isinstance(exc, _obstore().exceptions.BaseError):
                raise urls.translate(exc, s.describe(key)) from None
            raise  # produce's own error; the upload was aborted
        return out, s.size(key)

    def seal(self, manifest_name: str, manifest: bytes) -> None:
        # Every put is durable when it returns: what is left is to remember the manifest for
        # publish, which writes it (create-only) as the commit.
        self._check()
        self._manifest = (base.check_name(manifest_name), bytes(manifest))

    def publish(self, final: str) -> None:
        s = self._store
        base.check_name(final)
        if self._manifest is None:
            raise RuntimeError("publish before seal")  # an engine bug, not a storage failure
        self._check()
        mname, raw = self._manifest
        s._forget()
        s._check_lease(f"commit {final}")
        if final != self.dest:  # the rare path: copy (no rename on object stores)
            if s.exists(final):
                raise FileExistsError(errno.EEXIST, "already exists", s.describe(final))
            # The marker names the copy first, so the copies stay hidden until the manifest
            # (and garbage collection frees them, and the staged ones, after a crash).
            if _parent(final) == _parent(self.name):
                info = {"final": final, "dest": final, "writer": _who(), "created": time.time()}
                s.put(self.name, json.dumps(info).encode())
            self._copy_to = final
            for rel, _meta in s._walk(self.dest):
                s._copy(base.join(self.dest, rel), base.join(final, rel))
        s._call(
            lambda: _obstore().put(
                s._obs, s._p(base.join(final, mname)), raw, mode="create", use_multipart=False
            ),
            base.join(final, mname),
        )
        self._published = True
        if final != self.dest:
            s._delete_under(self.dest, [])
        problems: list[str] = []
        s._delete(self.name, problems)
        if problems:  # committed; the next writer's garbage collection removes the marker
            log.warning("step committed at %s; %s", s.describe(final), problems[0])

    def abort(self) -> None:
        s = self._store
        s._forget()
        try:
            s._check_lease(f"clean up {self.name}")
        except errors.LockedError:
            # Another writer owns the run now and may be writing under the same names: leave
            # everything to its garbage collection rather than delete its objects.
            log.warning(
                "lost the run's lease: leaving the save at %s to the new owner", self.describe()
            )
            return
        try:
            problems: list[str] = []
            for dest in {self.dest, self._copy_to or self.dest}:
                if not self._published and s._head(base.join(dest, layout.MANIFEST)) is None:
                    s._delete_under(dest, problems)
            if self.dest != self.name:
                s._delete_under(self.name, problems)
            s._delete(self.name, problems)
            if problems:
                log.warning("could not remove the save at %s: %s", self.describe(), problems[0])
        except Exception as exc:  # noqa: BLE001 - abort never raises; gc finishes it
            log.warning("could not remove the save at %s: %s", self.describe(), exc)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_POOL_WORKERS = 16
#: Fetches submitted to the pool and not finished (running or queued).
_POOL_BUSY = [0]


def _snapshot_pool() -> ThreadPoolExecutor:
    """The threads snapshots fetch on, shared by the stores of this process (started once: a
    thread start is not free, and a snapshot's fetches are a handful of short requests)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=_POOL_WORKERS, thread_name_prefix="savegame-snapshot"
            )
        return _POOL


def _queued_behind_others() -> bool:
    """Whether a fetch not started yet waits for a busy pool (more fetches than workers),
    rather than for a worker that is about to take it (a submit is not picked up at once)."""
    with _POOL_LOCK:
        return _POOL_BUSY[0] > _POOL_WORKERS


def _uncount_cancelled(fut: Future[Any]) -> None:
    if fut.cancelled():  # never ran: its count was not taken back
        with _POOL_LOCK:
            _POOL_BUSY[0] -= 1


class _Snapshot:
    """What one store read during a snapshot (module docstring): listings, whole small objects
    and object metadata, each a Future (fetched ahead on a small pool, or on first use).

    ``listings``: prefix -> (folders, {name: meta}) directly under it; ``walked``: prefix ->
    {relative path: meta} of every object under it; ``hidden``: folder -> the keys a marker
    hides; ``small``: key -> (body, meta), or None where the object is absent."""

    def __init__(
        self,
        store: ObjectStore,
        seconds: float,
        held: bool = False,
        *,
        before_lease: bool = False,
        before: _Snapshot | None = None,
    ) -> None:
        self.store = store
        #: Taken by the run's lease holder: nothing else writes the run while it lasts.
        self.held = held
        #: Taken while the lease is being taken (:meth:`ObjectStore.before_lease`): the run's
        #: listing (which tells whether the URL is a checkpoint), then ``run.json`` and the
        #: newest manifests, fetched while the lease's PUT is in flight. None of it is used by
        #: the holder until a listing made after the lease confirms it (``_confirm``).
        self.before_lease = before_lease
        #: The holder's snapshot: the one taken before the lease, whose reads it reuses once
        #: confirmed.
        self.before = before
        self.until = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.listings: dict[str, Future[Any]] = {}
        self.walked: dict[str, Future[Any]] = {}
        self.hidden: dict[str, Future[Any]] = {}
        self.small: dict[str, Future[Any]] = {}
        self.pool = _snapshot_pool()

    @property
    def live(self) -> bool:
        return time.monotonic() < self.until

    def close(self) -> None:
        self.until = 0.0
        with self.lock:
            pending = [
                f for t in (self.listings, self.walked, self.hidden, self.small) for f in t.values()
            ]
        for fut in pending:
            fut.cancel()  # those not started yet (the pool is shared)

    def _entry(self, table: dict[str, Future[Any]], key: str, fn: Callable[[], Any]) -> Future[Any]:
        with self.lock:
            fut = table.get(key)
            if fut is None:

                def counted() -> Any:
                    try:
                        return fn()
                    finally:
                        with _POOL_LOCK:
                            _POOL_BUSY[0] -= 1

                with _POOL_LOCK:
                    _POOL_BUSY[0] += 1
                try:
                    fut = table[key] = self.pool.submit(counted)
                except RuntimeError:  # interpreter shutting down: the caller fetches it itself
                    with _POOL_LOCK:
                        _POOL_BUSY[0] -= 1
                    fut = Future()
                    fut.set_exception(RuntimeError("snapshot closed"))
                fut.add_done_callback(_uncount_cancelled)
            return fut

    def ahead(self, table: dict[str, Future[Any]], key: str, fn: Callable[[], Any]) -> None:
        """Start fetching ``key`` now (nothing once the snapshot is over)."""
        if self.live:
            self._entry(table, key, fn)

    def get(self, table: dict[str, Future[Any]], key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s result for ``key``, fetched once. A failed fetch is not remembered: the
        caller's own request is made again, so its error is the one a plain call raises."""
        fut = self._entry(table, key, fn)
        if _queued_behind_others() and fut.cancel():
            # Still queued behind other fetches (the pool is shared): never wait for a slot,
            # fetch it here, and let later readers have the result.
            done: Future[Any] = Future()
            try:
                done.set_result(fn())
            except BaseException:
                with self.lock:
                    if table.get(key) is fut:
                        del table[key]
                raise
            with self.lock:
                if table.get(key) is fut:
                    table[key] = done
            return done.result()
        try:
            return fut.result()
        except BaseException:
            with self.lock:
                if table.get(key) is fut:
                    del table[key]
            return fn()

    def lookup(self, table: dict[str, Future[Any]], key: str) -> tuple[bool, Any]:
        """``(True, result)`` if ``key`` was fetched (or is being fetched) successfully, else
        ``(False, None)``."""
        with self.lock:
            fut = table.get(key)
        if fut is None:
            return False, None
        if _queued_behind_others() and fut.cancel():
            # still queued behind other fetches (the pool is shared): not known, never waited for
            with self.lock:
                if table.get(key) is fut:
                    del table[key]
            return False, None
        try:
            return True, fut.result()
        except BaseException:  # noqa: BLE001 - not known then
            return False, None

    # -- what a run's start-up reads, ahead --
    def prefetch_run(self) -> None:
        s = self.store
        if self.before_lease:
            self.ahead(self.listings, "", lambda: self._listed(""))
            return
        self.ahead(self.listings, "", lambda: self._listed(""))
        early = self._read_before(layout.RUN_FILE)
        with self.lock:
            listing = self.listings.get("")
            if early is not None and listing is not None and layout.RUN_FILE not in self.small:
                # read before the lease: used once this listing shows that very version
                run_file = self.small[layout.RUN_FILE] = Future()
            else:
                run_file = None
        if run_file is not None and listing is not None and early is not None:
            _confirm(
                run_file,
                early,
                listing,
                lambda got, listed: _same_version(got, listed[1].get(layout.RUN_FILE)),
                lambda: s._get_small(layout.RUN_FILE),
                self.pool,
            )
        else:
            self.ahead(self.small, layout.RUN_FILE, lambda: s._get_small(layout.RUN_FILE))

    def _listed(self, prefix: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """The listing of ``prefix``; for a run folder, the follow-up reads start at once."""
        s = self.store
        deep = s._ls_deep(prefix) if prefix == "" and (self.held or self.before_lease) else None
        if deep is not None:
            # The holder's run in one listing of every object (a run of fewer than
            # ``_DEEP_OBJECTS``): each folder's listing comes with it, so none is fetched on
            # its own — a round trip off the start, and one request per checkpoint less.
            # Before the lease, the same listing gives the data files' ETags, which the data
            # read ahead of the lease is pinned to (engine/fetch.py, ``ReadAhead``).
            dirs, objs, under = deep
            for d, files in under.items():
                known: Future[Any] = Future()
                known.set_result(files)
                with self.lock:
                    self.walked.setdefault(d, known)
        else:
            dirs, objs = s._ls(prefix)
        if prefix == "" and self.before_lease:
            # Before the lease: run.json and the newest manifests, to overlap the lease's PUT
            # (nothing if the URL is a checkpoint: no lease will be taken). The holder's
            # snapshot confirms each against a listing made after the lease.
            if layout.MANIFEST in objs:
                return dirs, objs
            self.ahead(self.small, layout.RUN_FILE, lambda: s._get_small(layout.RUN_FILE))
            for d in _newest_steps(dirs):
                mkey = base.join(d, layout.MANIFEST)
                self.ahead(self.small, mkey, lambda k=mkey: s._get_small(k))
            return dirs, objs
        if prefix == "" and dirs:
            if self.held:
                # The lease holder's run changes only through this store: the markers are
                # those of this very listing (no second LIST: a round trip saved at start-up).
                self.ahead(self.hidden, "", lambda: s._hidden("", objs))
            else:
                # Listed after ours (markers precede what they hide): see ObjectStore._hidden.
                self.ahead(self.hidden, "", lambda: s._hidden(""))
            for d in _newest_steps(dirs):
                mkey = base.join(d, layout.MANIFEST)
                self.ahead(self.walked, d, lambda k=d: dict(s._walk(k)))
                early = self._read_before(mkey)
                if early is None:
                    self.ahead(self.small, mkey, lambda k=mkey: s._get_small(k))
                    continue
                with self.lock:
                    walk = self.walked.get(d)
                    if walk is None or mkey in self.small:  # closed, or asked for already
                        continue
                    confirmed = self.small[mkey] = Future()
                _confirm(
                    confirmed,
                    early,
                    walk,
                    lambda got, listed: _same_version(got, listed.get(layout.MANIFEST)),
                    lambda k=mkey: s._get_small(k),
                    self.pool,
                )
        return dirs, objs

    def _read_before(self, key: str) -> Future[Any] | None:
        """The read of ``key`` the snapshot taken before the lease started, if any."""
        before = self.before
        if before is None:
            return None
        with before.lock:
            return before.small.get(key)

    def head(self, key: str) -> tuple[bool, dict[str, Any] | None]:
        """``(True, meta or None)`` when the snapshot already knows whether ``key`` is an
        object (from a small object's GET or a listing of its folder), else ``(False, None)``."""
        found, small = self.lookup(self.small, key)
        if found:
            return True, None if small is None else small[1]
        found, listing = self.lookup(self.listings, _parent(key))
        if found:
            return True, listing[1].get(_base(key))
        with self.lock:
            folders = [f for f in self.walked if key.startswith(f + "/")]
        for folder in folders:
            found, walked = self.lookup(self.walked, folder)
            if found:
                return True, walked.get(key[len(folder) + 1 :])
        return False, None

    def wrote(self, key: str, data: bytes, etag: str | None) -> None:
        """This store just replaced the small object ``key`` with ``data``."""
        meta = {"path": self.store._p(key), "size": len(data), "e_tag": etag,
                "last_modified": datetime.datetime.now(datetime.timezone.utc)}  # fmt: skip
        done: Future[Any] = Future()
        done.set_result((data, meta))
        parent = _parent(key)
        with self.lock:
            self.small[key] = done
            fut = self.listings.get(parent)
            if fut is None:
                return
            if not (fut.done() and fut.exception() is None):
                del self.listings[parent]  # still being listed: it may or may not show the put
                return
            dirs, objs = fut.result()  # copied, not changed: a reader may be iterating it
            listed: Future[Any] = Future()
            listed.set_result((dirs, {**objs, _base(key): meta}))
            self.listings[parent] = listed

    def any_under(self, key: str) -> bool | None:
        """Whether objects lie under ``key/``, if the snapshot knows; else None."""
        found, walked = self.lookup(self.walked, key)
        if found:
            return bool(walked)
        found, listing = self.lookup(self.listings, _parent(key))
        if found:
            return _base(key) in listing[0]
        return None


def _newest_steps(dirs: list[str]) -> list[str]:
    """The step folders among ``dirs`` whose manifest and listing a snapshot fetches ahead."""
    steps = sorted((d for d in dirs if layout.parse_step_dir(d) is not None), reverse=True)
    return steps[:SNAPSHOT_STEPS]


def _same_version(got: Any, listed: dict[str, Any] | None) -> bool:
    """Whether a small object's read (``(body, meta)``, None when it was absent) is of the
    version a later listing shows (``listed``: its meta there, None when absent)."""
    if got is None or listed is None:
        return got is None and listed is None
    etag = got[1].get("e_tag")
    return etag is not None and etag == listed.get("e_tag")


def _confirm(
    out: Future[Any],
    early: Future[Any],
    check: Future[Any],
    same: Callable[[Any, Any], bool],
    again: Callable[[], Any],
    pool: ThreadPoolExecutor,
) -> None:
    """Resolve ``out`` to ``early``'s result once ``check``'s result confirms it (``same``),
    else to ``again()`` (a fresh read, on ``pool``). Chained by callbacks: no thread waits."""
    started = threading.Lock()

    def settle(_: Future[Any]) -> None:
        if not (early.done() and check.done()) or not started.acquire(blocking=False):
            return
        if not out.set_running_or_notify_cancel():
            return  # cancelled (the snapshot closed, or a reader fetched it itself)
        try:
            if (
                not early.cancelled()
                and not check.cancelled()
                and early.exception() is None
                and check.exception() is None
                and same(early.result(), check.result())
            ):
                out.set_result(early.result())
                return
        except Exception:  # noqa: BLE001 - not confirmed: read it again
            pass

        def fresh() -> None:
            try:
                out.set_result(again())
            except BaseException as exc:  # noqa: BLE001 - the reader's own call raises it
                out.set_exception(exc)

        try:
            pool.submit(fresh)
        except RuntimeError as exc:  # interpreter shutting down
            out.set_exception(exc)

    early.add_done_callback(settle)
    check.add_done_callback(settle)


class Lease:
    """The writer lock of an object store: an object ``{holder, expires, ttl}``.

    ``acquire`` creates it (create-only put); if it exists and has expired it is taken over
    with a put conditional on the ETag read (two takers: one wins). A daemon thread renews it
    every ``ttl / 3`` with ``If-Match``; if a renewal finds the object changed (another writer
    took it over after we failed to renew in time) :attr:`held` becomes False and an error is
    logged — the Checkpointer checks :attr:`held` before committing. ``release`` deletes it.
    """

    def __init__(self, store: ObjectStore, name: str, ttl: float) -> None:
        self._store = store
        self._name = name
        self.ttl = float(ttl)
        self._etag: str | None = None
        self._version: str | None = None  # GCS: the generation (see _update)
        # When our own hold ends, by this machine's monotonic clock (the object holds the wall
        # clock's expiry, for other machines): an NTP step of the wall clock (a VM resumed)
        # must neither end the hold early nor stretch it.
        self._deadline = 0.0
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Why the lease was lost, once it was (None while held or never taken).
        self.lost: str | None = None

    @property
    def held(self) -> bool:
        """True while this process holds the lease (renewed in time, not taken over)."""
        return self._held and time.monotonic() < self._deadline

    def _body(self) -> bytes:
        body = {"holder": _who(), "expires": time.time() + self.ttl, "ttl": self.ttl}
        return json.dumps(body).encode()

    def _put(self, mode: Any) -> str | None:
        started = time.monotonic()  # (the hold counts from before the request, to be safe)
        raw = self._body()
        res = _obstore().put(
            self._store._obs, self._store._p(self._name), raw, mode=mode, use_multipart=False
        )
        self._deadline = started + self.ttl
        self._version = res.get("version")
        return res.get("e_tag")

    @staticmethod
    def _update(etag: str | None, version: str | None) -> dict[str, Any]:
        """The conditional-put mode for "still the object we read". obstore's GCS client
        conditions on the generation (``version``) and refuses an update without one; S3 and
        Azure use the ETag (a ``version`` there is ignored)."""
        mode: dict[str, Any] = {"e_tag": etag}
        if version is not None:
            mode["version"] = version
        return mode

    def acquire(self) -> None:
        """Take the lease.

        Raises:
            LockedError: another writer holds it and it has not expired (the message names
                the holder and when the lease expires).
            StorageError: the store refused (read-only, no permission, unreachable).
        """
        s = self._store
        s._writable(self._name)
        try:  # (the reads started by ``s.before_lease()``, if any, go on meanwhile)
            self._take()
        except BaseException:
            s._forget_before_lease()
            raise
        self._held = True
        self._start_holding()

    def _take(self) -> None:
        """Create the lease object, or take over an expired one (see :meth:`acquire`)."""
        s = self._store
        where = s.describe(self._name)
        for _ in range(3):
            try:
                self._etag = s._call(lambda: self._put("create"), self._name)
                break
            except FileExistsError:
                pass
            try:
                res = s._call(lambda: _obstore().get(s._obs, s._p(self._name)), self._name)
                raw = bytes(s._call(res.bytes, self._name))
                etag = res.meta.get("e_tag")
                version = res.meta.get("version")
            except FileNotFoundError:
                continue  # released between the two calls: try to create it again
            try:
                info = json.loads(raw)
                holder, expires = errors.quoted(info["holder"]), float(info["expires"])
            except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
                holder, expires = "unknown (unreadable lease)", 0.0
            now = time.time()
            if not now - _LEASE_FUTURE < expires < now + _LEASE_FUTURE:
                # (NaN, inf, or centuries away: no savegame writer wrote it; it holds nothing)
                holder, expires = f"{holder} (an expiry no writer sets)", 0.0
            if expires > now:
                until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
                raise errors.LockedError(
                    f"run {s.describe()} is in use by another writer ({holder}); its lease "
                    f"{where} expires at {until} (in {expires - now:.0f} s) unless renewed — "
                    "two trainings must not share a run: use another URL, or stop the other "
                    "process (a dead writer's lease expires by itself)",
                    path=s.describe(),
                )
            try:
                self._etag = s._call(
                    lambda e=etag, v=version: self._put(self._update(e, v)), self._name
                )
                log.warning("took over the expired lease %s of %s", where, holder)
                break
            except (base.ChangedError, FileNotFoundError, FileExistsError):
                continue  # someone else took it over (or released it) first: look again
        else:
            raise errors.LockedError(
                f"run {s.describe()} is in use by another writer (its lease {where} keeps "
                "changing); stop the other process",
                path=s.describe(),
            )

    def _start_holding(self) -> None:
        s = self._store
        where = s.describe(self._name)
        self.lost = None
        # From here on no other writer changes the run: what the holder reads next (the run's
        # listing, run.json, the manifests) is fetched once, ahead and concurrently.
        s.begin_snapshot(held=True)
        # A script that dies of an exception without close() must not lock its own re-run out
        # for the lease time (a local run's flock is dropped by the kernel; here we must).
        atexit.register(self.release)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"savegame-lease {where}", daemon=True
        )
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.renew()

    def renew(self) -> bool:
        """Extend the lease now (the daemon thread does it every ``ttl / 3``); False once it
        is lost."""
        if not self._held:
            return False
        s = self._store
        try:
            self._etag = s._call(
                lambda: self._put(self._update(self._etag, self._version)), self._name
            )
            return True
        except (base.ChangedError, FileNotFoundError) as exc:
            self._lose(f"another writer took it over ({exc})")
            return False
        except Exception as exc:  # noqa: BLE001 - a thread boundary: retried on the next tick
            if time.monotonic() >= self._deadline:
                self._lose(f"it could not be renewed before it expired ({exc})")
                return False
            log.warning(
                "could not renew the lease %s (will retry): %s", s.describe(self._name), exc
            )
            return True

    def _lose(self, why: str) -> None:
        self._held = False
        self._stop.set()
        self.lost = why
        log.error(
            "lost the writer lease %s: %s; this process must not commit to the run any more",
            self._store.describe(self._name), why,
        )  # fmt: skip

    def release(self) -> None:
        atexit.unregister(self.release)
        self._store.end_snapshot()  # the holder's snapshot ends with its hold (and its threads)
        with contextlib.suppress(ValueError):
            self._store._leases.remove(self)  # a released lease no longer guards the store
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if not self._held:
            return
        self._held = False
        s = self._store
        # No conditional delete on S3: check the ETag is still ours, then delete (a taker in
        # between would have to have found our lease expired, which it is not). Put by us
        # less than a third of its life ago (a session that only restored), it cannot have
        # been taken over since, for the same reason: delete it without the HEAD, one round
        # trip less at close.
        fresh = self._deadline - time.monotonic() > self.ttl * 2 / 3
        with contextlib.suppress(Exception):
            meta = None if fresh else s._head(self._name)
            if fresh or (meta is not None and meta.get("e_tag") == self._etag):
                s._call(lambda: _obstore().delete(s._obs, s._p(self._name)), self._name)


class ObjectStore(base.Store):
    """A prefix in an object store (``s3://bucket/runs/exp``) as a :class:`Store`.

    Folders are implicit (a prefix with objects under it; :meth:`makedirs` does nothing). A
    checkpoint is committed by its manifest put create-only; see the module docstring.

    Args:
        target: What :func:`savegame.storage.urls.connect` returned for the URL.
        lease_seconds: How long the writer lease lives without renewal (default
            ``$SAVEGAME_LEASE_SECONDS`` or 60 s).
    """

    def __init__(self, target: urls.Target, *, lease_seconds: float | None = None) -> None:
        self._obs = target.store
        self._prefix = target.prefix.strip("/")
        self.url = target.url
        self.scheme = target.scheme
        self.read_only = target.read_only
        if lease_seconds is None:
            env = os.environ.get("SAVEGAME_LEASE_SECONDS")
            try:
                lease_seconds = float(env) if env else DEFAULT_LEASE_SECONDS
            except ValueError:
                raise errors.StorageError(
                    f"SAVEGAME_LEASE_SECONDS={env!r} is not a number of seconds", path=self.url
                ) from None
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.lease_seconds = float(lease_seconds)
        self._leases: list[Lease] = []  # taken through this store: checked before each change
        self._snap: _Snapshot | None = None
        self._ahead: Any = None  # data read ahead of the lease (attach_read_ahead)

    @classmethod
    def from_obstore(
        cls,
        store: Any,
        url: str,
        *,
        prefix: str = "",
        read_only: bool = False,
        lease_seconds: float | None = None,
    ) -> ObjectStore:
        """A store over an obstore store built by the caller (tests, custom credentials)."""
        scheme = url.split("://", 1)[0] if "://" in url else "memory"
        target = urls.Target(scheme, store, urls.redact(url), read_only=read_only, prefix=prefix)
        return cls(target, lease_seconds=lease_seconds)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # ---- snapshots (module docstring) --------------------------------------------------------
    def begin_snapshot(self, seconds: float = SNAPSHOT_SECONDS, *, held: bool = False) -> None:
        """Serve the reads of the next ``seconds`` from one concurrent fetch of the run's
        listing, ``run.json``, and its newest manifests and checkpoint listings. Only where
        nothing else changes the run meanwhile (the lease holder: ``held``, which also lets
        one listing of the run tell the markers in it) or a stale view is harmless; any write
        through this store ends it. The holder's snapshot reuses the manifests read while its
        lease was being taken (:meth:`before_lease`), each once the listing of its folder,
        made after the lease, shows that very version."""
        old = self._snap
        before = old if held and old is not None and old.before_lease and old.live else None
        self._start(_Snapshot(self, seconds, held, before=before), keep=before)

    def before_lease(self) -> None:
        """About to take the run's lease: list the run now, and read ``run.json`` and its
        newest manifests while the lease's PUT is in flight (a round trip off a resume's
        start). The listing also answers "is this URL a checkpoint?" (:meth:`is_object`),
        asked before the lease is written. Until the lease is held, nothing else is served
        from it; after, the holder's snapshot lists the run again (a listing made before the
        lease can miss a checkpoint the previous holder committed just before releasing it)
        and reuses a read only once that listing, made after the lease, shows its version."""
        if self.read_only or self.scheme in ("http", "https"):
            return
        snap = self._snap
        if snap is not None and snap.before_lease and snap.live:
            return
        self._start(_Snapshot(self, SNAPSHOT_SECONDS, before_lease=True))

    def _start(self, snap: _Snapshot, keep: _Snapshot | None = None) -> None:
        old, self._snap = self._snap, snap
        if keep is None or old is not keep:
            self._drop_read_ahead(wait=False)  # only the holder inherits what was read ahead
        if old is not None:
            if old is keep:
                old.until = 0.0  # serves nothing more; its reads in flight are reused
            else:
                old.close()
        snap.prefetch_run()

    def _forget_before_lease(self) -> None:
        """The lease was not taken: what was read ahead for it is dropped."""
        snap = self._snap
        if snap is not None and snap.before_lease:
            self._forget()

    def end_snapshot(self) -> None:
        """Every read from now on asks the store (and data read ahead of the lease and not
        used is dropped, its threads gone)."""
        job = self._ahead
        self._forget()
        if job is not None:
            job.cancel(wait=True)

    def _forget(self) -> None:
        snap, self._snap = self._snap, None
        if snap is not None:
            snap.close()
        self._drop_read_ahead(wait=False)

    # ---- a checkpoint's data read ahead of the lease (engine/fetch.py, ``ReadAhead``) --------
    def attach_read_ahead(self, job: Any) -> bool:
        """Keep ``job`` (it has ``cancel(wait)``) for the holder's restore while the reads
        made before the lease are: it is cancelled when the snapshot ends (the lease not taken,
        a write, :meth:`end_snapshot`, the release). False (not kept) unless the lease is being
        taken (:meth:`before_lease`)."""
        snap = self._snap
        if snap is None or not snap.before_lease or not snap.live:
            return False
        self._drop_read_ahead(wait=False)
        self._ahead = job
        return True

    def read_ahead(self) -> Any:
        """The job :meth:`attach_read_ahead` kept, while it is kept."""
        return self._ahead

    def _drop_read_ahead(self, *, wait: bool) -> None:
        job, self._ahead = getattr(self, "_ahead", None), None
        if job is not None:
            job.cancel(wait=wait)

    def newest_before_lease(
        self,
    ) -> tuple[str, Future[Any], dict[str, dict[str, Any]]] | None:
        """While the lease is being taken: the newest step folder of the listing made before
        it (waited for), the read of its manifest started then (a Future of ``(bytes, meta)``,
        None when absent) and its files as that listing showed them (name -> meta; empty
        when the run was listed folder by folder). None when there is none, the listing
        failed, or the URL is a checkpoint. Nothing here is confirmed: the lease holder's
        listing must show these very versions before anything read from them is used."""
        snap = self._snap
        if snap is None or not snap.before_lease:
            return None
        with snap.lock:
            listing = snap.listings.get("")
        try:
            dirs, objs = listing.result() if listing is not None else ([], {layout.MANIFEST: {}})
        except BaseException:  # noqa: BLE001 - failed or cancelled: nothing to read ahead
            return None
        steps = _newest_steps(dirs)
        if layout.MANIFEST in objs or not steps:
            return None
        folder = steps[0]
        with snap.lock:  # (both started by the listing, before it returned)
            read = snap.small.get(base.join(folder, layout.MANIFEST))
            walk = snap.walked.get(folder)
        if read is None or walk is None or not walk.done() or walk.cancelled():
            return None
        if walk.exception() is not None:
            return None
        return folder, read, walk.result()

    def listed_since_lease(self, key: str) -> dict[str, Any] | None:
        """``key``'s meta (size, ETag) as the lease holder sees it: from the listing made
        after the lease was taken (or a read confirmed by it), or, once that snapshot has
        expired (a ``restore()`` called long after the constructor), from a HEAD made now;
        None when this store holds no lease, its snapshot was ended (by a write, which also
        drops what was read ahead), or ``key`` is not there."""
        if not any(lease._held and lease.held for lease in self._leases):
            return None
        snap = self._snap
        if snap is None or not snap.held:
            return None
        if not snap.live:
            return self._head(key)
        known, meta = snap.head(key)
        return meta if known else None

    def open_pinned(self, key: str, size: int, etag: str | None) -> base.Blob:
        """A data object opened with no request and no snapshot: every GET carries
        ``If-Match: etag`` (a listing's), or, with no ETag, the first response pins the
        version and checks ``size`` (as :meth:`open_expecting`)."""
        base.check_name(key)
        if etag:
            return _ObjBlob(self, key, {"size": size, "e_tag": etag})
        return _ObjBlob(self, key, {"size": size, "e_tag": None}, unseen=True)

    def _snapshot(self, key: str | None = None) -> _Snapshot | None:
        """The live snapshot, if any; never for a lease object (``key``): it changes at every
        renewal, without a write through this store."""
        snap = self._snap
        if snap is None or not snap.live:
            return None
        if snap.before_lease and key != layout.MANIFEST:
            return None  # before the lease, only "is this URL a checkpoint?" (before_lease)
        if key is not None and (key == layout.LOCK or any(le._name == key for le in self._leases)):
            return None
        return snap

    def _get_small(self, key: str) -> tuple[bytes | None, dict[str, Any]] | None:
        """One GET of a small object: (its bytes, meta), or None if absent. Bigger than
        ``_SMALL_BYTES`` (a damaged manifest): (None, meta), its body never read."""
        try:
            res = self._call(lambda: _obstore().get(self._obs, self._p(key)), key)
        except FileNotFoundError:
            return None
        meta = dict(res.meta)
        if int(meta["size"]) > _SMALL_BYTES:
            return None, meta  # the response is dropped unread: the blob reads ranges
        return bytes(self._call(res.bytes, key)), meta

    def _head_known(self, key: str) -> dict[str, Any] | None:
        snap = self._snapshot(key)
        # A web server's folder index leaves out hidden names: only a HEAD says they exist.
        if snap is not None and self.scheme not in ("http", "https"):
            known, meta = snap.head(key)
            if known:
                return meta
        return self._head(key)

    def _any_under_known(self, key: str) -> bool:
        snap = self._snapshot()
        if snap is not None:
            known = snap.any_under(key)
            if known is not None:
                return known
        return self._any_under(key)

    def _hidden_known(self, folder: str) -> set[str]:
        snap = self._snapshot()
        if snap is None:
            return self._hidden(folder)
        return set(snap.get(snap.hidden, folder, lambda: self._hidden(folder)))

    def _hidden_listed(self, folder: str, dirs: list[str]) -> set[str]:
        """:meth:`_hidden_known` for the folders ``dirs`` of a listing of ``folder``. A marker
        hides only a prefix that has no manifest, so when the snapshot already read the
        manifest of every one of them (it fetches the newest ones' beside the markers'
        listing) none is hidden, and that listing is not waited for: a round trip off the
        start of a transfer from a run another process may be writing (the snapshot of a
        source is not the lease holder's, so its markers come from a second listing)."""
        snap = self._snapshot()
        if snap is not None and not snap.held and self.scheme not in ("http", "https"):
            keys = [base.join(folder, d, layout.MANIFEST) for d in dirs]
            with snap.lock:
                fetched = all(k in snap.small for k in keys)  # (the holder's markers are free)
            # (found, (bytes, meta)): there; (True, None): absent; (False, None): unknown
            if fetched and all(snap.lookup(snap.small, k)[1] is not None for k in keys):
                return set()
        return self._hidden_known(folder)

    # ---- plumbing ------------------------------------------------------------------------
    def _p(self, key: str) -> str:
        return base.join(self._prefix, key)

    def _rel(self, path: str) -> str:
        return path[len(self._prefix) + 1 :] if self._prefix else path

    def _call(self, fn: Callable[[], T], key: str) -> T:
        """Run one obstore call; its failure becomes a typed, redacted error."""
        try:
            return fn()
        except errors.CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - obstore raises its own classes, translated
            raise urls.translate(exc, self.describe(key)) from None

    def _writable(self, key: str) -> None:
        if self.read_only:
            # Caused by EROFS, as a read-only mount: the Checkpointer then opens the run
            # read-only (restore works) instead of failing.
            raise errors.StorageError(
                f"{self.describe(key)}: read-only: http(s) URLs can only be read; push to "
                "s3://… or a folder to write",
                path=self.describe(key),
            ) from OSError(errno.EROFS, "read-only store", self.describe(key))

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self._call(lambda: _obstore().head(self._obs, self._p(key)), key))
        except FileNotFoundError:
            return None

    def _ls(self, prefix: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """(folders, {name: meta}) directly under ``prefix``."""
        if self.scheme in ("http", "https"):
            return _http_listing(self, prefix)
        p = self._p(prefix) or None
        res = self._call(lambda: _obstore().list_with_delimiter(self._obs, p), prefix)
        dirs = [_base(d.rstrip("/")) for d in res["common_prefixes"]]
        objs = {_base(m["path"]): dict(m) for m in res["objects"]}
        return dirs, objs

    def _ls_deep(
        self, prefix: str
    ) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]] | None:
        """:meth:`_ls` of ``prefix`` and, per folder, what :meth:`_walk` gives, from one
        listing of every object under it; None for a web server, or when there are
        ``_DEEP_OBJECTS`` or more (a listing page holds 1000: more would be several requests
        one after the other, where the folders' own listings go in parallel)."""
        if self.scheme in ("http", "https"):
            return None
        p = self._p(prefix)
        stream = self._call(
            lambda: _obstore().list(self._obs, p or None, chunk_size=_DEEP_OBJECTS), prefix
        )
        items: list[Any] = []
        while len(items) < _DEEP_OBJECTS:
            try:
                items.extend(next(stream))
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - obstore's errors, translated
                raise urls.translate(exc, self.describe(prefix)) from None
        if len(items) >= _DEEP_OBJECTS:
            return None
        pre = p + "/" if p else ""
        objs: dict[str, dict[str, Any]] = {}
        under: dict[str, dict[str, dict[str, Any]]] = {}
        for m in items:
            if not m["path"].startswith(pre):
                continue
            rel = m["path"][len(pre) :]
            folder, sep, rest = rel.partition("/")
            if sep:
                under.setdefault(folder, {})[rest] = dict(m)
            else:
                objs[rel] = dict(m)
        return sorted(under), objs, under

    def _walk(self, key: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(path relative to ``key``, meta) of every object under ``key/``. Over HTTP, folder
        by folder, at most ``_HTTP_DEPTH`` folders deep: a run is two levels (step folders,
        their files), and a server that answers every folder URL with more links (a catch-all
        page) would otherwise be walked forever."""
        if self.scheme in ("http", "https"):
            todo = [("", 0)]
            while todo:
                rel, depth = todo.pop()
                dirs, objs = _http_listing(self, base.join(key, rel) if rel else key)
                for n, m in objs.items():
                    yield (f"{rel}/{n}" if rel else n), m
                if depth + 1 < _HTTP_DEPTH:
                    todo.extend(((f"{rel}/{d}" if rel else d), depth + 1) for d in reversed(dirs))
            return
        p = self._p(key)
        stream = self._call(lambda: _obstore().list(self._obs, p or None, chunk_size=500), key)
        pre = p + "/" if p else ""
        while True:
            try:
                chunk = next(stream)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - obstore's errors, translated
                raise urls.translate(exc, self.describe(key)) from None
            for m in chunk:
                if m["path"].startswith(pre):
                    yield m["path"][len(pre) :], dict(m)

    def _any_under(self, key: str) -> bool:
        return next(iter(self._walk(key)), None) is not None

    def _delete(self, key: str, problems: list[str]) -> None:
        self._forget()
        try:
            self._call(lambda: _obstore().delete(self._obs, self._p(key)), key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"{self.describe(key)}: {exc}")

    def _delete_under(self, key: str, problems: list[str]) -> None:
        self._forget()
        try:
            paths = [self._p(base.join(key, rel)) for rel, _ in self._walk(key)]
        except OSError as exc:
            problems.append(f"{self.describe(key)}: {exc}")
            return
        for i in range(0, len(paths), 500):
            batch = paths[i : i + 500]
            try:
                self._call(lambda b=batch: _obstore().delete(self._obs, b), key)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"{self.describe(key)}: {exc}")

    def _copy(self, src: str, dest: str) -> None:
        self._forget()
        self._call(lambda: _obstore().copy(self._obs, self._p(src), self._p(dest)), dest)

    def _marker(self, key: str) -> dict[str, Any] | None:
        """The marker object ``key`` (a save in progress or a deletion), or None."""
        try:
            raw = bytes(self._call(lambda: _obstore().get(self._obs, self._p(key)).bytes(), key))
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
        except (ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def _hidden(self, folder: str, objs: dict[str, dict[str, Any]] | None = None) -> set[str]:
        """Keys in ``folder`` that a marker names while they have no manifest: a save being
        written straight to its final name, or a deletion under way. This listing is made
        after the caller's (markers are created before the objects they hide), so a prefix
        the caller saw is hidden if its marker existed when it was written. ``objs``: the
        objects of the caller's own listing, for a run no one else writes meanwhile (the
        lease holder's snapshot), instead of a second listing."""
        if objs is None:
            _, objs = self._ls(folder)
        out = set()
        for name in objs:
            if not name.startswith(layout.TMP_PREFIX):
                continue
            info = self._marker(base.join(folder, name)) or {}
            dest = info.get("dest")
            if isinstance(dest, str) and dest and dest != base.join(folder, name):
                try:
                    base.check_name(dest)
                except ValueError:  # no key savegame writes (``../x``): hides nothing
                    continue
                if self._head(base.join(dest, layout.MANIFEST)) is None:
                    out.add(dest)
        return out

    # ---- reading -------------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[base.Entry]:
        base.check_key(prefix)
        snap = self._snapshot()
        if snap is not None and not prefix:
            dirs, objs = snap.get(snap.listings, prefix, lambda: snap._listed(prefix))
        else:
            dirs, objs = self._ls(prefix)
        if prefix and not dirs and not objs:
            if self._head(prefix) is not None:
                raise NotADirectoryError(errno.ENOTDIR, "is an object", self.describe(prefix))
            raise FileNotFoundError(errno.ENOENT, "no such folder", self.describe(prefix))
        hidden = self._hidden_listed(prefix, dirs) if dirs else set()
        out: dict[str, bool] = {}
        for d in dirs:
            if base.join(prefix, d) not in hidden:
                out[d] = True
        for name in objs:
            out[name] = name.startswith(layout.TMP_PREFIX) or out.get(name, False)
        return [base.Entry(n, d) for n, d in out.items()]

    def exists(self, key: str) -> bool:
        if base.check_key(key) == "":
            return True
        return self._head_known(key) is not None or self.is_dir(key)

    def is_object(self, key: str) -> bool:
        """Whether ``key`` is an object (one HEAD; :meth:`exists` also lists, for a folder)."""
        return self._head_known(base.check_name(key)) is not None

    def is_dir(self, key: str) -> bool:
        if base.check_key(key) == "":
            return True
        if _is_marker(key) and self._head_known(key) is not None:
            return True
        if not self._any_under_known(key):
            return False
        if self._head_known(base.join(key, layout.MANIFEST)) is not None:
            return True
        return key not in self._hidden_known(_parent(key))

    def size(self, key: str) -> int:
        base.check_key(key)
        meta = self._call(lambda: _obstore().head(self._obs, self._p(key)), key)
        return int(meta["size"])

    def mtime(self, key: str) -> float | None:
        try:
            meta = self._head(base.check_key(key))
        except OSError:
            return None
        return meta["last_modified"].timestamp() if meta else None

    def du(self, key: str) -> int:
        base.check_key(key)
        if key and not _is_marker(key):
            meta = self._head(key)
            if meta is not None:
                return int(meta["size"])
        total = sum(int(m["size"]) for _, m in self._walk(key))
        if _is_marker(key):
            info = self._marker(key) or {}
            dest = info.get("dest")
            if isinstance(dest, str) and dest and dest != key:
                total += sum(int(m["size"]) for _, m in self._walk(dest))
        return total

    def open(self, key: str) -> base.Blob:
        base.check_name(key)
        snap = self._snapshot(key)
        if _base(key) in _SMALL_NAMES or _base(key) == layout.LOCK:
            # Read whole by the GET that opens it: one round trip, not a HEAD and a GET. (A
            # lease object is rewritten every ttl/3 by its holder: a HEAD then a pinned GET
            # would race with that; it is never served from a snapshot either.)
            got = (
                snap.get(snap.small, key, lambda: self._get_small(key))
                if snap is not None and _base(key) != layout.LOCK
                else self._get_small(key)
            )
            if got is None:
                raise FileNotFoundError(errno.ENOENT, "not found", self.describe(key))
            return _ObjBlob(self, key, got[1], got[0])
        if snap is not None:
            # The size and ETag a listing gave (the reads are pinned to that version with
            # If-Match: a newer one fails them, and the snapshot is forgotten).
            known, meta = snap.head(key)
            if known and meta is not None and meta.get("e_tag"):
                # (Only an object store's listing: a web server's folder index gives no ETag,
                # and an HTML one no size either.)
                return _ObjBlob(self, key, meta)
        meta = self._call(lambda: _obstore().head(self._obs, self._p(key)), key)
        return _ObjBlob(self, key, meta)

    def open_expecting(self, key: str, size: int) -> base.Blob:
        """:meth:`open` for a reader that knows the object's size (a manifest says it), with
        no request: the size and version come with the first read's response, which checks
        the size (EOFError) and pins the version of every read (ChangedError, as a pinned
        read gets; also when the object is not there: open it the usual way then). Saves the
        HEAD of ``sg.load(url)``: one round trip."""
        base.check_name(key)
        if _base(key) in _SMALL_NAMES or self.scheme in ("http", "https"):
            return self.open(key)  # read whole on open / a web server may send no ETag
        snap = self._snapshot(key)
        if snap is not None:
            known, meta = snap.head(key)
            if known and meta is not None and meta.get("e_tag"):
                return _ObjBlob(self, key, meta)
        return _ObjBlob(self, key, {"size": size, "e_tag": None}, unseen=True)

    # ---- writing -------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        base.check_name(key)
        self._writable(key)
        self._check_lease(f"write {key}")
        snap = self._snap
        try:
            res = self._call(
                lambda: _obstore().put(self._obs, self._p(key), bytes(data), use_multipart=False),
                key,
            )
        except BaseException:
            self._forget()
            raise
        if snap is not None and snap is self._snap and _base(key) in _SMALL_NAMES:
            # Only this object changed (run.json, LATEST): the snapshot learns its new version
            # rather than being dropped.
            snap.wrote(key, bytes(data), res.get("e_tag"))
        else:
            self._forget()

    def create(self, key: str, data: bytes) -> None:
        base.check_name(key)
        self._forget()
        self._writable(key)
        self._call(
            lambda: _obstore().put(
                self._obs, self._p(key), bytes(data), mode="create", use_multipart=False
            ),
            key,
        )

    def makedirs(self, key: str = "") -> None:
        base.check_key(key)  # folders are implicit: a prefix exists once an object is under it

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        base.check_name(name)
        self._forget()
        if not _is_marker(name):
            raise ValueError(
                f"invalid staging name {name!r}: an object store's staging names start with "
                f"{layout.TMP_PREFIX!r} (listings recognise the save's marker by it)"
            )
        self._writable(name)
        self._check_lease(f"start a save in {name}")
        dest = name
        if final is not None and _parent(base.check_name(final)) == _parent(name):
            if not _is_marker(final) and self._head(base.join(final, layout.MANIFEST)) is None:
                dest = final
        if dest != name:
            self._finish_deletions(final or "", _parent(name))
        info = {"final": final, "dest": dest, "writer": _who(), "created": time.time()}
        self.create(name, json.dumps(info).encode())
        if dest != name:
            # Leftovers of a killed writer under the final name (no manifest: never a
            # checkpoint). Deleted after the marker exists, so they stay hidden meanwhile.
            problems: list[str] = []
            self._delete_under(dest, problems)
            if problems:
                with contextlib.suppress(OSError):
                    self._delete(name, [])
                raise OSError(
                    errno.EIO, f"could not clear leftovers of an interrupted save: {problems[0]}"
                )
        return _ObjStaging(self, name, dest)

    def _finish_deletions(self, final: str, folder: str) -> None:
        """Before writing to ``final``: a deletion of it still under way (a detach whose freer
        has not run) must end first, or it would delete the new objects."""
        _, objs = self._ls(folder)
        for name in objs:
            key = base.join(folder, name)
            if not name.startswith(layout.TMP_PREFIX):
                continue
            info = self._marker(key) or {}
            if info.get("dest") != final or not info.get("deleting"):
                continue
            with _PENDING_LOCK:
                pending = _PENDING.get((self.url, key))
                running = pending is not None and pending.state == "running"
                if pending is not None and not running:
                    pending.state = "taken"
            if running and pending is not None and pending.done.wait(timeout=300):
                continue
            problems = self._free_marker(key, info)()
            if pending is not None and not running:
                with _PENDING_LOCK:
                    pending.state = "done"
                    _PENDING.pop((self.url, key), None)
                pending.done.set()
            if problems:
                raise OSError(
                    errno.EIO,
                    f"an earlier deletion of {self.describe(final)} could not finish: {problems[0]}",
                )

    def staging(self, name: str) -> base.Staging:
        base.check_name(name)
        info = self._marker(name)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such save in progress", self.describe(name))
        dest = info.get("dest")
        if not isinstance(dest, str) or not dest:
            raise OSError(errno.EIO, f"{self.describe(name)} is not a save marker")
        return _ObjStaging(self, name, base.check_name(dest))

    def _free_marker(self, key: str, info: dict[str, Any]) -> Callable[[], list[str]]:
        """Free a marker: the objects under its ``dest`` (only while that has no manifest),
        those under the marker's own name, then the marker (last: until then it hides)."""

        def free() -> list[str]:
            problems: list[str] = []
            dest = info.get("dest")
            if isinstance(dest, str) and dest and dest != key:
                with contextlib.suppress(ValueError):
                    base.check_name(dest)
                    if self._head(base.join(dest, layout.MANIFEST)) is None:
                        self._delete_under(dest, problems)
            self._delete_under(key, problems)
            if not problems:
                self._delete(key, problems)
            return problems

        return free

    def detach(self, key: str, trash: str | None) -> Callable[[], list[str]]:
        base.check_name(key)
        self._forget()
        self._writable(key)
        self._check_lease(f"delete {key}")
        if trash is None:  # a leftover save (or deletion) marker: free it in place
            info = self._marker(key) if _is_marker(key) else None
            return self._free_marker(key, info or {})
        base.check_name(trash)
        if not _is_marker(trash) or _parent(trash) != _parent(key):
            raise ValueError(
                f"invalid trash name {trash!r}: a {layout.TMP_PREFIX}… name beside {key!r}"
            )
        if self._head(key) is not None and not self._any_under(key):
            problems: list[str] = []  # one object: its delete is atomic
            self._call(lambda: _obstore().delete(self._obs, self._p(key)), key)
            return lambda: problems
        if not self.is_dir(key):
            raise FileNotFoundError(errno.ENOENT, "no such key", self.describe(key))
        info = {
            "final": key,
            "dest": key,
            "deleting": True,
            "writer": _who(),
            "created": time.time(),
        }
        self.create(trash, json.dumps(info).encode())
        # The manifest goes first: from here on the checkpoint exists for no reader.
        self._delete_manifest(key)
        pending = _Pending()
        with _PENDING_LOCK:
            _PENDING[(self.url, trash)] = pending
        freer = self._free_marker(trash, info)

        def free() -> list[str]:
            with _PENDING_LOCK:
                if pending.state != "waiting":  # a new save of ``key`` did the work
                    return []
                pending.state = "running"
            try:
                return freer()
            finally:
                with _PENDING_LOCK:
                    pending.state = "done"
                    _PENDING.pop((self.url, trash), None)
                pending.done.set()

        return free

    def _delete_manifest(self, key: str) -> None:
        self._forget()
        mkey = base.join(key, layout.MANIFEST)
        with contextlib.suppress(FileNotFoundError):
            self._call(lambda: _obstore().delete(self._obs, self._p(mkey)), mkey)

    def rename(self, key: str, new_key: str) -> None:
        """Copy, then delete (not atomic: object stores have no rename). Used to set a damaged
        checkpoint aside — the copy's manifest is written last and the original's deleted
        first, so at no point are there two checkpoints, and a crash leaves at worst a copy
        without a manifest (never listed as a checkpoint) beside the original — and to retire
        a shared file of a deleted checkpoint (docs/incremental.md): readers find the bytes
        under either name, so a crash between the copy and the delete loses nothing."""
        base.check_name(key)
        base.check_name(new_key)
        self._forget()
        self._writable(key)
        if not self.exists(key):
            raise FileNotFoundError(errno.ENOENT, "no such key", self.describe(key))
        if self.exists(new_key):
            raise FileExistsError(errno.EEXIST, "already exists", self.describe(new_key))
        if self._head(key) is not None and not self._any_under(key):
            self._copy(key, new_key)
            self._call(lambda: _obstore().delete(self._obs, self._p(key)), key)
            return
        rels = [rel for rel, _ in self._walk(key)]
        manifest = layout.MANIFEST in rels
        for rel in rels:
            if rel != layout.MANIFEST:
                self._copy(base.join(key, rel), base.join(new_key, rel))
        if manifest:
            self._copy(base.join(key, layout.MANIFEST), base.join(new_key, layout.MANIFEST))
            self._delete_manifest(key)
        problems: list[str] = []
        self._delete_under(key, problems)
        if problems:
            raise OSError(errno.EIO, f"copied to {self.describe(new_key)}; {problems[0]}")

    def lock(self, name: str) -> Lease:
        base.check_name(name)
        lease = Lease(self, name, self.lease_seconds)
        self._leases.append(lease)
        return lease

    def _check_lease(self, doing: str) -> None:
        """Refuse to change the run once a lease this store took is lost (taken over by another
        writer, or expired without renewal): that writer owns the run now, and a commit from
        here could interleave with its saves and retention."""
        for lease in self._leases:
            if lease.lost is not None or (lease._held and not lease.held):
                raise errors.LockedError(
                    f"cannot {doing} in {self.describe()}: this process lost the run's writer "
                    f"lease ({lease.lost or 'it expired before it could be renewed'}); another "
                    "writer may own the run now — stop this one, or restart it to resume from the "
                    "newest checkpoint",
                    path=self.describe(),
                )


# ---- HTTP(S) listings ----------------------------------------------------------------------
def _http_listing(store: ObjectStore, prefix: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """A static web server's folder index: nginx ``autoindex_format json`` or an HTML page of
    links (as fsspec's HTTPFileSystem reads it). Sizes and times come from HEAD on open."""
    import re
    import urllib.error
    import urllib.request
    from datetime import datetime, timezone
    from urllib.parse import unquote, urlsplit

    key = base.join(store._prefix, prefix)
    # A plain GET, not obstore's: index pages are often sent chunked (nginx's autoindex),
    # which obstore's HTTP store refuses for want of a Content-Length.
    base_url = str(store._obs.url).rstrip("/")
    url = f"{base_url}/{urls.quote_key(key)}/" if key else f"{base_url}/"
    headers = {"Accept": "application/json, text/html;q=0.9"}
    for name, value in (store._obs.client_options.get("default_headers") or {}).items():
        headers[name] = value.decode() if isinstance(value, bytes) else str(value)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            raw = r.read(64 << 20)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return [], {}
        raise OSError(
            errno.EIO, f"{store.describe(prefix)}: listing the folder failed (HTTP {exc.code})"
        ) from None
    except (OSError, ValueError) as exc:
        raise OSError(
            errno.EIO,
            f"{store.describe(prefix)}: listing the folder failed: {urls.redact_text(str(exc))}",
        ) from None
    dirs: list[str] = []
    objs: dict[str, dict[str, Any]] = {}
    now = datetime.now(timezone.utc)
    try:
        listing = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        listing = None
    if isinstance(listing, list):
        for item in listing:
            if not isinstance(item, dict) or not _http_name(item.get("name")):
                continue
            n = item["name"]
            if item.get("type") == "directory":
                dirs.append(n)
            else:
                size = item.get("size", 0)
                size = size if type(size) is int and 0 <= size < 1 << 63 else 0
                objs[n] = {"path": base.join(key, n), "size": size,
                           "last_modified": now, "e_tag": None}  # fmt: skip
        return sorted(set(dirs)), objs
    text = raw.decode("utf-8", "replace")
    for href in re.findall(r"""href\s*=\s*["']([^"'?#]+)["']""", text, flags=re.I):
        if "://" in href or (
            href.startswith(("/", ".")) and not href.startswith(layout.TMP_PREFIX)
        ):  # another host, an absolute link, the parent folder or a hidden file
            continue
        name = unquote(urlsplit(href).path)
        is_dir = name.endswith("/")
        name = name.rstrip("/")
        if not _http_name(name):
            continue
        if is_dir:
            dirs.append(name)
        else:
            objs[name] = {"path": base.join(key, name), "size": 0, "last_modified": now,
                          "e_tag": None}  # fmt: skip
    return sorted(set(dirs)), objs


def _http_name(name: object) -> bool:
    """Whether a name from an HTTP listing can be an entry of a run folder: a plain name (not
    empty, ``.`` or ``..``; no ``/``, ``\\``, NUL or other control character; at most
    ``_HTTP_NAME_MAX`` characters). The server's other names are not savegame's: ignored."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= _HTTP_NAME_MAX
        and name not in (".", "..")
        and not any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name)
    )


def begin_snapshot(store: base.Store) -> None:
    """:meth:`ObjectStore.begin_snapshot` on an object store; nothing on others (a local
    folder's reads are system calls, not round trips)."""
    if isinstance(store, ObjectStore):
        store.begin_snapshot()


def end_snapshot(store: base.Store | None) -> None:
    """:meth:`ObjectStore.end_snapshot` on an object store; nothing on others."""
    if isinstance(store, ObjectStore):
        store.end_snapshot()
