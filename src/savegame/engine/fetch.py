"""Parallel ranged reads from a blob that cannot map (an object store, HTTP), hashed on arrival.

The machinery under :mod:`savegame.engine.reader` for such blobs: the request plan (few
requests, since a server charges per request), the pool of requests in flight, and the staging
where bytes bound for live tensors wait until every hash of the call matched.

Invariant: every byte is hashed once its request completed (a chunk that lies whole in one
request by the thread that read it — from a blob that streams into a :class:`_Sink`, as each
piece arrives — a chunk split over requests in file order by the caller's thread), and a chunk
whose hash does not match is reported (``bad``) before :func:`pull` returns; nothing here
copies into a live tensor. The reader decides what is a target, where it lands, and what a mismatch means;
its knobs (``reader.REQUEST_BYTES``, ``reader.REQUESTS_IN_FLIGHT``) are passed in per call.

:class:`ReadAhead` reads a run's newest checkpoint while its lease is being taken, with the
same plan and hashing, into memory the restore claims only once the lease holder's listing
confirmed the versions read (docs/remote.md, "The lease").
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from savegame import errors
from savegame.format import hashing

#: Bytes between two small chunks that one request still spans instead of issuing two.
_GAP_BYTES = 1 << 20
_DEFAULT_STAGING = 1 << 30


def staging_budget() -> int:
    """Bytes bound for live tensors that one ``load_tensors`` call from a store that cannot
    map keeps in memory until every hash matched; the rest is staged in a temporary file.
    ``SAVEGAME_STAGING_MEMORY`` (bytes; suffixes K, M, G) overrides the default of 1 GiB."""
    raw = os.environ.get("SAVEGAME_STAGING_MEMORY", "").strip()
    if not raw:
        return _DEFAULT_STAGING
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:].upper(), 1)
    digits = raw[:-1] if scale != 1 else raw
    try:
        value = int(digits) * scale
    except ValueError:
        value = -1
    if value < 0:
        raise errors.StorageError(
            f"SAVEGAME_STAGING_MEMORY={raw!r} is not a number of bytes (e.g. 512M, 2G, 0)",
            path="SAVEGAME_STAGING_MEMORY",
        )
    return value


@dataclass(slots=True)
class Target:
    """One chunk to pull: where it lies in the file and where its bytes go."""

    ident: Any  # the caller's name for the chunk (reported back on a mismatch)
    offset: int
    length: int
    digest: str | None  # None: not hashed here (a file's header, checked by the caller)
    own: memoryview | None = None  # exactly this chunk's bytes (a fresh tensor)
    base: memoryview | None = None  # the whole file's staging (file offset o -> base[o])
    #: ``base`` is a spooled (file-backed, shared) staging map: its pages are dropped from this
    #: process's memory once written and hashed (see :func:`release`)
    spool: mmap.mmap | None = None

    def home(self, start: int, n: int) -> memoryview | None:
        if self.own is not None:
            return self.own[start - self.offset : start - self.offset + n]
        if self.base is not None:
            return self.base[start : start + n]
        return None  # only hashed (verify)


@dataclass(slots=True)
class _Seg:
    target: Target
    offset: int
    length: int
    home: memoryview | None


@dataclass(slots=True)
class _Request:
    offset: int
    length: int
    segs: list[_Seg]
    into: memoryview | None  # read straight here; None: into a bounce buffer, then the homes


def _parts(span: int, request: int, stretch: bool) -> int:
    """How many requests read ``span`` contiguous bytes, of about ``request`` bytes each.

    ``stretch`` (a restore): the count nearest to ``span / request``, so requests are of equal
    size between 0.75 and 1.5 times ``request`` and never a small tail: each request costs a
    round trip (on S3 also a fee; on a server that copies the whole object per ranged GET, such
    as moto, a whole-object copy), while 8-16 MiB ranges already fill a connection on S3, so a
    tail of a few KiB is pure overhead. A span under 1.5 ``request`` is one GET. Without
    ``stretch`` (``verify``: ``request`` bounds its memory) requests never exceed ``request``."""
    if stretch:
        return max(1, (2 * span + request) // (2 * request))  # round half up, at least one
    return max(1, -(-span // request))


def _plan_requests(
    targets: Sequence[Target], request: int, stretch: bool = False
) -> list[_Request]:
    """Ranged reads covering ``targets`` (sorted by offset, not overlapping): the fewest, since
    a server charges per request.

    Neighbouring chunks (a gap of up to ``_GAP_BYTES`` between them is read and dropped) form
    a span; a span is cut into :func:`_parts` requests of equal size, across chunk boundaries.
    A request inside one chunk with a home of its own (a fresh tensor) lands straight in it,
    one that covers only staged chunks straight in the staging; any other (a boundary between
    fresh tensors) goes through a bounce buffer of at most one request: one more memory copy,
    cheaper than a request."""
    out: list[_Request] = []
    segs: list[_Seg] = []

    def close() -> None:
        if not segs:
            return
        a, b = segs[0].offset, segs[-1].offset + segs[-1].length
        into: memoryview | None = None
        base = segs[0].target.base
        if len(segs) == 1 and segs[0].home is not None:
            into = segs[0].home
        elif base is not None and all(s.target.own is None and s.target.base is base for s in segs):
            into = base[a:b]  # the gaps land in the staging too: harmless
        out.append(_Request(a, b - a, list(segs), into))
        segs.clear()

    spans: list[list[Target]] = []
    for t in targets:
        if t.length == 0:
            continue
        if spans:
            last = spans[-1][-1]
            end = last.offset + last.length
            if not (t.offset < end or t.offset - end > _GAP_BYTES):
                spans[-1].append(t)
                continue
        spans.append([t])
    for span in spans:
        a, b = span[0].offset, span[-1].offset + span[-1].length
        parts = _parts(b - a, request, stretch)
        size = -(-(b - a) // parts)
        for t in span:
            pos, stop = t.offset, t.offset + t.length
            while pos < stop:
                room = (segs[0].offset + size - pos) if segs else size
                if room <= 0:
                    close()
                    continue
                n = min(room, stop - pos)
                segs.append(_Seg(t, pos, n, t.home(pos, n)))
                pos += n
        close()
    return out


class _Sink:
    """Where one request's bytes go as they arrive, for a blob that streams into a sink (an
    object store's ``readinto`` given an object with ``take`` calls it with each piece of
    the response body, in order, instead of filling one buffer).

    Each piece is copied straight into the homes it covers (several fresh tensors, or the
    staging) and hashed while it is in the cache: a chunk that lies whole in the request is
    hashed when its last byte arrives, with no second pass; one without a home (``verify``)
    is only hashed, never copied. Only a chunk split over requests that has no home keeps
    its bytes here (``kept``), for the caller to hash in file order. So no bounce buffer: a
    request across fresh tensors was read into one and copied again (one more copy of every
    byte, and a fresh buffer's page faults, per request)."""

    __slots__ = ("_parts", "_i", "_pos", "_n", "kept")

    def __init__(self, req: _Request) -> None:
        import numpy as np

        self._n = req.length
        self._i = 0
        self._pos = 0  # bytes of the request taken so far
        #: seg index -> the bytes of a split chunk without a home
        self.kept: dict[int, memoryview] = {}
        # (start, stop) in the request, home (numpy view) or None, hasher or None
        self._parts: list[tuple[int, int, Any, Any]] = []
        for idx, seg in enumerate(req.segs):
            t = seg.target
            home = seg.home
            hasher = None
            if t.digest is not None and seg.length == t.length:
                hasher = hashing.new()
            elif t.digest is not None and home is None:
                home = self.kept[idx] = memoryview(bytearray(seg.length))
            start = seg.offset - req.offset
            arr = None if home is None else np.frombuffer(home.cast("B"), dtype=np.uint8)
            self._parts.append((start, start + seg.length, arr, hasher))

    def __len__(self) -> int:
        return self._n

    def take(self, piece: Any) -> None:
        """The next ``len(piece)`` bytes of the request (the blob checks the total)."""
        import numpy as np

        src = np.frombuffer(piece, dtype=np.uint8)
        n, p, parts = len(src), 0, self._parts
        while p < n and self._i < len(parts):
            start, stop, home, hasher = parts[self._i]
            cur = self._pos + p
            if cur < start:  # a gap between two chunks: read, dropped
                p += min(start - cur, n - p)
                continue
            k = min(stop - cur, n - p)
            if home is not None:  # numpy's copy releases the GIL (a slice assignment holds it)
                np.copyto(home[cur - start : cur - start + k], src[p : p + k])
            if hasher is not None:
                hasher.update(src[p : p + k])
            p += k
            if cur + k == stop:
                self._i += 1
        self._pos += n

    def matched(self, req: _Request) -> list[bool]:
        """Per segment that is a whole hashed chunk, in order: whether its hash matched."""
        return [
            hasher.hexdigest() == seg.target.digest
            for (_, _, _, hasher), seg in zip(self._parts, req.segs, strict=True)
            if hasher is not None
        ]


def pull(
    read: Callable[[int, Any], None],
    targets: Sequence[Target],
    bad: Callable[[Target], None],
    *,
    request: int,
    in_flight: int,
    stretch: bool = False,
    sinks: bool = False,
) -> None:
    """Read ``targets`` with parallel ranged reads (``read(offset, into)`` fills ``into`` from
    that file offset) and hash each one; ``bad`` is called for a chunk whose hash does not
    match (it may raise). ``sinks``: ``read`` also takes a :class:`_Sink` for ``into`` (the
    blob streams each piece into it as it arrives: no bounce buffers, hashed on arrival).

    Requests (see :func:`_plan_requests`; ``stretch``: :func:`_parts`) are issued in file
    order, at most ``in_flight`` running and ``in_flight + 4`` submitted. A chunk that lies
    whole in one request is hashed by the thread that read it, right after the read (xxhash
    releases the GIL: hashes run in parallel and beside the downloads); a chunk split over
    several requests is hashed incrementally, in order, by this thread as they complete.
    Memory beyond the targets' homes: one bounce buffer per submitted request that has no
    single home (small chunks sharing a request, or ``verify``), at most
    ``(in_flight + 4) * request`` (1.5 times that with ``stretch``); with ``sinks``, only the
    bytes of chunks split over requests that have no home (``verify`` of a chunk larger than
    a request), within the same bound.

    Raises:
        Whatever ``read`` raises (the reader's: ChangedError when the blob changed, which the
        caller starts over; IntegrityError / StorageError when it ended early or could not be
        read); nothing is left running.
    """
    ordered = sorted(targets, key=lambda t: (t.offset, t.length))
    for t in ordered:
        if t.length == 0 and t.digest is not None and hashing.digest(b"") != t.digest:
            bad(t)
    requests = _plan_requests(ordered, request, stretch)
    stop = threading.Event()

    def fetch(req: _Request) -> tuple[dict[int, memoryview], list[bool]] | None:
        """Read ``req``; returns the bytes of its split chunks without a home (seg index ->
        bytes, for the in-order hash) and, per segment that is a whole hashed chunk, whether
        its hash matched."""
        if stop.is_set():
            return None
        if sinks:
            sink = _Sink(req)
            read(req.offset, sink)
            return sink.kept, sink.matched(req)
        buf: memoryview | None = None
        if req.into is not None:
            read(req.offset, req.into)
        else:
            buf = memoryview(bytearray(req.length))
            read(req.offset, buf)
            for s in req.segs:
                if s.home is not None:
                    s.home[:] = buf[s.offset - req.offset : s.offset - req.offset + s.length]

        def view_of(s: _Seg) -> memoryview:
            return s.home if s.home is not None else buf[s.offset - req.offset :][: s.length]  # type: ignore[index]

        ok = [
            hashing.digest(view_of(s)) == s.target.digest
            for s in req.segs
            if s.target.digest is not None and s.length == s.target.length
        ]
        kept = {
            i: view_of(s)
            for i, s in enumerate(req.segs)
            if s.home is None and s.target.digest is not None and s.length != s.target.length
        }  # every other byte is home and hashed: the buffer goes with its last view
        return kept, ok

    hashers: dict[int, Any] = {}
    seen: dict[int, int] = {}
    window: collections.deque[tuple[_Request, Future[Any]]] = collections.deque()
    pending = iter(requests)
    pool = ThreadPoolExecutor(max_workers=min(in_flight, max(1, len(requests))))
    try:
        for req in pending:
            window.append((req, pool.submit(fetch, req)))
            if len(window) >= in_flight + 4:  # a little slack for a slow oldest request
                break
        while window:
            req, fut = window.popleft()
            kept, ok = fut.result()
            nxt = next(pending, None)
            if nxt is not None:
                window.append((nxt, pool.submit(fetch, nxt)))
            whole = iter(ok)
            for i, s in enumerate(req.segs):
                t = s.target
                if t.digest is None:
                    continue
                if s.length == t.length:  # the whole chunk in one piece: hashed by its reader
                    if not next(whole):
                        bad(t)
                    continue
                h = hashers.setdefault(id(t), hashing.new())
                h.update(s.home if s.home is not None else kept[i])
                seen[id(t)] = seen.get(id(t), 0) + s.length
                if seen[id(t)] == t.length and hashers.pop(id(t)).hexdigest() != t.digest:
                    bad(t)
            # every byte of ``req`` is written and hashed: its spooled pages leave memory (they
            # stay in the temporary file; the copy phase faults them back in, range by range)
            spools = [
                (s.target.spool, s)
                for s in req.segs
                if s.target.spool is not None and s.home is not None
            ]
            if spools and req.into is not None:
                release(spools[0][0], req.offset, req.length)  # the gaps too
            else:
                for mm, s in spools:
                    release(mm, s.offset, s.length)
    finally:
        stop.set()  # queued requests return at once; running ones finish before we go on
        for _, fut in window:
            fut.cancel()
        pool.shutdown(wait=True)


def release(mm: mmap.mmap, offset: int, length: int) -> None:
    """Drop the pages wholly inside ``[offset, offset + length)`` of a spooled staging map (a
    shared mapping of a temporary file) from this process's memory: its bytes stay in the file
    (the page cache writes them back) and fault back in on the next access, so the resident
    size stays about the bytes in flight rather than the bytes spooled. Only for a
    file-backed map: on anonymous (private) staging this would lose the bytes. The pages a
    range shares with its neighbours (at most two) stay: a neighbour may be using them."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or mm.closed:
        return
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    stop = min(offset + length, len(mm)) // page * page
    if stop > start:
        try:
            mm.madvise(advice, start, stop - start)
        except (OSError, ValueError):  # only a hint: the bytes stay resident
            pass


def _huge_pages(mm: mmap.mmap) -> None:
    """Ask for transparent huge pages on an anonymous staging map: the download writes every
    page of it once, and with 4 KiB pages that is a page fault per 4 KiB (a quarter million
    per GiB, measured at about half the time of filling 48 MiB here), and as many pages to
    free at unmap. Only a hint: where the kernel has none to give, 4 KiB pages it is."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or len(mm) < (2 << 20):
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError):
        pass


class Staging:
    """Where bytes for live tensors wait until every hash matched (stores that cannot map):
    anonymous memory while under the budget, then unnamed temporary files. Each file's
    staging is a mapping of the file's size of which only the read ranges are touched: private
    anonymous memory, or a shared mapping of a temporary file (:meth:`spool`), whose pages
    :func:`release` drops from memory once written and hashed, and again once copied."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.spooled = 0  # bytes staged in temporary files (for tests and benchmarks)
        self._files: list[mmap.mmap] = []

    def spool(self, mm: mmap.mmap) -> mmap.mmap | None:
        """``mm`` if it is one of this staging's temporary-file maps, else None (memory)."""
        return mm if any(f is mm for f in self._files) else None

    def new(self, size: int, staged: int) -> mmap.mmap:
        if staged <= self.left:
            self.left -= staged
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            _huge_pages(mm)
            return mm
        self.spooled += staged
        try:
            with tempfile.TemporaryFile(prefix="savegame-restore-") as f:
                # Sparse, so a write into the map past the free space would be a SIGBUS, not an
                # error: the space is checked first (a folder filled by someone else meanwhile
                # can still fault; fallocate would reserve the whole file, not the ranges read).
                free = os.fstatvfs(f.fileno())
                if free.f_bavail * free.f_frsize < staged:
                    raise OSError(errno.ENOSPC, f"{free.f_bavail * free.f_frsize} bytes free")
                os.ftruncate(f.fileno(), size)  # sparse: only the ranges read take disk space
                mm = mmap.mmap(f.fileno(), size)  # the mapping keeps the unnamed file alive
                self._files.append(mm)
                return mm
        except OSError as exc:
            raise errors.StorageError(
                f"could not stage {staged} bytes in the temporary folder {tempfile.gettempdir()} "
                f"({exc}); set TMPDIR to a folder with space, or raise SAVEGAME_STAGING_MEMORY",
                path=tempfile.gettempdir(),
            ) from exc


# ---- a checkpoint's data read ahead of the run's lease (issue 11) ---------------------------


#: Whether a Checkpointer taking a run's lease on an object store reads the newest checkpoint's
#: data ahead (:class:`ReadAhead`); tests turn it off to reach the plain restore path.
READ_AHEAD = True


def digest_empty() -> str:
    """The hash of no bytes (an empty tensor's chunk)."""
    return hashing.digest(b"")


class _Stopped(Exception):
    """The read-ahead was cancelled: its requests stop at the next piece."""


class _CopySink:
    """Where one read-ahead request's bytes go as they arrive (the blob streams pieces into
    it, see :class:`_Sink`): copied in order into ``dest``, then ``arrived(bytes so far)``
    (the read-ahead hashes what is now contiguous from the file's start); raises once the
    read-ahead is cancelled, which stops the request at its next piece."""

    __slots__ = ("_dest", "_pos", "_stop", "_arrived")

    def __init__(
        self,
        dest: memoryview,
        stop: threading.Event,
        arrived: Callable[[int], None] | None = None,
    ) -> None:
        import numpy as np

        self._dest = np.frombuffer(dest, dtype=np.uint8)
        self._pos = 0
        self._stop = stop
        self._arrived = arrived

    def __len__(self) -> int:
        return len(self._dest)

    def take(self, piece: Any) -> None:
        import numpy as np

        if self._stop.is_set():
            raise _Stopped()
        src = np.frombuffer(piece, dtype=np.uint8)
        np.copyto(self._dest[self._pos : self._pos + len(src)], src)  # releases the GIL
        self._pos += len(src)
        if self._arrived is not None:
            self._arrived(self._pos)


class _AheadFile:
    """One data file read ahead: its whole bytes (``mm``), the version read and which chunks
    matched their hash. ``done`` is set once it is read and hashed, failed or stopped."""

    def __init__(self, key: str, size: int, etag: str | None) -> None:
        self.key, self.size, self.etag = key, size, etag
        self.mm: mmap.mmap | None = None
        self.ok: set[tuple[int, int, str]] = set()  # (offset, length, hash) that matched
        self.failed = False
        self.done = threading.Event()
        #: the manifest's chunks of this file, once it is parsed: (offset, length, hash)
        self.chunks: list[tuple[int, int, str]] | None = None
        self.starts: list[int] = []  # each request's first byte (requests cut [0, size))
        self.got: list[int] = []  # per request: its bytes arrived so far
        #: per chunk of the manifest, its hash as far as it went (see ReadAhead._advance), and
        #: per request the chunks it holds a part of; built once the manifest is parsed
        self.hashes: list[_ChunkHash] | None = None
        self.cover: list[list[_ChunkHash]] = []
        self.lock = threading.Lock()


class _ChunkHash:
    """One chunk of a data file read ahead, hashed in order as its bytes arrive: ``at`` is
    the file offset hashed up to; ``done`` once every byte of it was hashed."""

    __slots__ = ("chunk", "hasher", "at", "done", "lock")

    def __init__(self, chunk: tuple[int, int, str]) -> None:
        self.chunk = chunk
        self.hasher: Any = hashing.new()
        self.at = chunk[0]
        self.done = False
        self.lock = threading.Lock()


def _contiguous(f: _AheadFile, at: int, end: int) -> int:
    """How far past file offset ``at`` (up to ``end``) the bytes of ``f`` read ahead are all
    in, with none missing: through every request that arrived whole, into the first that has
    not."""
    import bisect

    r = bisect.bisect_right(f.starts, at) - 1
    pos = at
    while pos < end and 0 <= r < len(f.starts):
        stop = f.starts[r + 1] if r + 1 < len(f.starts) else f.size
        arrived = f.starts[r] + f.got[r]
        if arrived < stop:
            pos = max(pos, arrived)
            break
        pos = stop
        r += 1
    return min(pos, end)


class ReadAhead:
    """The newest checkpoint's data, read while the run's lease is being taken (issue 11):
    the data GETs of a fresh-machine restore start as soon as the run's listing made before
    the lease arrived (it names the newest checkpoint's files, their sizes and ETags), beside
    the manifest's GET and the lease's PUT, instead of after the lease and the holder's
    listing (three round trips later). Each chunk is hashed as its bytes arrive, in order
    (:meth:`_advance`, once the manifest is parsed), so when the last byte lands only its own
    piece is left to hash, not every chunk its request holds a part of.

    Nothing read here is trusted until a restore claims it (:meth:`claim`), and only then if:
    this store holds the lease, the listing made after the lease shows the very manifest
    (ETag) and data file versions read (every GET carries ``If-Match`` on the ETag the listing
    made before the lease gave), and every chunk the restore wants was read and matched its
    hash in the manifest read with it. Otherwise the claim returns None and the restore
    reads the checkpoint the usual way (a checkpoint committed, or replaced, in the window is
    what gets restored).

    Bounded: only a checkpoint written by one process (another is dropped once its manifest
    says so) whose own files fit in the staging budget (:func:`staging_budget`: what the
    restore would stage anyway), in anonymous memory, at most ``REQUESTS_IN_FLIGHT`` requests
    at once; cancelled (requests stopped at their next piece, memory freed, threads gone)
    when the store's snapshot ends: the lease not taken (:class:`~savegame.errors.LockedError`),
    a write, the end of ``restore()``, the first save, the release.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.planned = threading.Event()  # the files are known (or there are none)
        self._known = threading.Event()  # the manifest is parsed (or will never be)
        self.folder: str | None = None
        self.manifest_etag: str | None = None
        self.files: dict[str, _AheadFile] = {}
        self._claimed = False
        self._thread = threading.Thread(target=self._run, name="savegame-read-ahead", daemon=True)

    @classmethod
    def start(cls, store: Any) -> ReadAhead | None:
        """Read ahead on ``store`` (an object store taking its lease: ``before_lease`` was
        called), or None where there is nothing to do."""
        if not READ_AHEAD or getattr(store, "attach_read_ahead", None) is None:
            return None
        if staging_budget() <= 0:
            return None
        job = cls(store)
        if not store.attach_read_ahead(job):
            return None
        job._thread.start()
        return job

    # -- the reading thread --
    def _run(self) -> None:
        try:
            self._plan_and_read()
        except BaseException:  # noqa: BLE001 - a read-ahead only: the restore reads anew
            pass
        finally:
            self.planned.set()
            self._known.set()
            with self._lock:
                files = list(self.files.values())
            for f in files:
                if not f.done.is_set():
                    f.failed = True
                    f.done.set()
            if self._stop.is_set():
                self._free()

    def _plan_and_read(self) -> None:
        from savegame.engine import reader
        from savegame.format import layout

        got = self._store.newest_before_lease()
        if got is None or self._stop.is_set():
            return
        folder, manifest_read, listed = got
        sizes = {
            n: int(meta.get("size", 0))
            for n, meta in listed.items()
            if "/" not in n and n != layout.MANIFEST and meta.get("e_tag")
        }
        names = sorted(n for n, size in sizes.items() if size > 0)
        if not names or sum(sizes[n] for n in names) > staging_budget():
            return
        with self._lock:
            self.folder = folder
            for n in names:
                f = self.files[n] = _AheadFile(f"{folder}/{n}", sizes[n], listed[n]["e_tag"])
                whole = [Target(None, 0, f.size, None)]
                f.starts = [r.offset for r in _plan_requests(whole, reader.REQUEST_BYTES, True)]
                f.got = [0] * len(f.starts)
        self.planned.set()
        where = self._store.describe(f"{folder}/{layout.MANIFEST}")
        manifest_read.add_done_callback(lambda fut: self._parse(fut, where))
        for n in names:
            if self._stop.is_set():
                return
            self._read(self.files[n], reader.REQUESTS_IN_FLIGHT)

    def _parse(self, fut: Future[Any], where: str) -> None:
        """The manifest read beside the data (a done-callback: no thread waits for it): each
        file's chunks, so the requests done hash theirs. Not one process's checkpoint, or
        not the files listed: the read-ahead stops."""
        from savegame.format import manifest

        try:
            got = None if fut.cancelled() or fut.exception() is not None else fut.result()
            if got is None or got[0] is None:
                raise ValueError("no manifest")
            raw, meta = got
            m = manifest.Manifest.from_bytes(raw, where)
            if m.world_size != 1:  # each rank reads its own share: not this process's to guess
                raise ValueError("written by several processes")
            chunks: dict[str, list[tuple[int, int, str]]] = {}
            for t in m.tensors.values():
                for c in t.chunks:
                    chunks.setdefault(c.file, []).append((c.offset, c.length, c.hash))
            with self._lock:
                self.manifest_etag = meta.get("e_tag")
                for n, f in self.files.items():
                    entry = m.files.get(n)
                    if entry is None or entry.size != f.size:
                        f.chunks = []  # not this manifest's file: never claimed (nothing ok)
                        f.failed = True
                    else:
                        f.chunks = sorted(set(chunks.get(n, [])))
        except BaseException:  # noqa: BLE001 - a read-ahead only
            self.cancel()
        finally:
            self._known.set()

    def _read(self, f: _AheadFile, in_flight: int) -> None:
        mm = mmap.mmap(-1, f.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _huge_pages(mm)
        with self._lock:
            if self._stop.is_set():
                mm.close()
                return
            f.mm = mm
        base = memoryview(mm)
        blob = self._store.open_pinned(f.key, f.size, f.etag)
        stops = [*f.starts[1:], f.size]
        stop = self._stop

        def one(i: int) -> None:
            if stop.is_set():
                raise _Stopped()
            a, b = f.starts[i], stops[i]

            def arrived(pos: int) -> None:
                f.got[i] = pos
                self._advance(f, i, base, wait=False)

            blob.readinto(a, _CopySink(base[a:b], stop, arrived))
            if not self._known.wait(timeout=600) or stop.is_set():
                raise _Stopped()
            self._advance(f, i, base, wait=True)

        pool = ThreadPoolExecutor(
            max_workers=max(1, min(in_flight, len(f.starts))),
            thread_name_prefix="savegame-read-ahead",
        )
        futures = [pool.submit(one, i) for i in range(len(f.starts))]
        try:
            for fut in futures:
                fut.result()
            f.etag = blob.etag or f.etag  # the version every response was of
        except BaseException:  # noqa: BLE001 - the restore reads it the usual way
            f.failed = True
            for fut in futures:
                fut.cancel()  # those not started; the running ones end with their request
        finally:
            pool.shutdown(wait=True)
            with contextlib.suppress(BufferError, ValueError):  # a view may linger: the GC's
                base.release()
            blob.close()
            f.done.set()

    def _advance(self, f: _AheadFile, i: int, base: memoryview, *, wait: bool) -> None:
        """Hash, in order, what arrived of each chunk that request ``i`` of ``f`` holds a part
        of: from where its hash stands, over the bytes now contiguous (a chunk across several
        requests waits for the earlier ones). Called by the request's thread after each piece
        (``wait`` False: a chunk another thread is hashing is left to it, or to this
        request's next piece or end) and once the request ended and the manifest is parsed
        (``wait`` True): since every request's end hashes all it can of each of its chunks,
        the last of a chunk's requests to end leaves it hashed. So a chunk within one request
        is hashed by its thread as the bytes arrive, several requests' chunks in parallel
        (xxhash releases the GIL), and at the last byte only its own piece is left."""
        hashes = f.hashes
        if hashes is None:
            if f.chunks is None:  # the manifest not parsed yet: the request's end comes back
                return
            hashes = self._cover(f)
        for h in f.cover[i]:
            if h.done or not h.lock.acquire(blocking=wait):
                continue
            try:
                off, n, digest = h.chunk
                end = min(off + n, f.size)
                upto = _contiguous(f, h.at, end)
                if upto > h.at:
                    h.hasher.update(base[h.at : upto])
                    h.at = upto
                if h.at >= off + n and not h.done:
                    h.done = True
                    if h.hasher.hexdigest() == digest:
                        f.ok.add(h.chunk)
                    h.hasher = None  # (its state freed: a file may hold thousands of chunks)
            finally:
                h.lock.release()

    @staticmethod
    def _cover(f: _AheadFile) -> list[_ChunkHash]:
        """Once ``f``'s chunks are known: their hash states, and which requests hold a part of
        each (an empty chunk is matched at once: nothing to read)."""
        import bisect

        with f.lock:
            if f.hashes is not None:
                return f.hashes
            cover: list[list[_ChunkHash]] = [[] for _ in f.starts]
            hashes = []
            for c in f.chunks or ():
                h = _ChunkHash(c)
                hashes.append(h)
                if c[1] == 0:
                    h.done = True
                    if digest_empty() == c[2]:
                        f.ok.add(c)
                    continue
                first = bisect.bisect_right(f.starts, c[0]) - 1
                last = bisect.bisect_right(f.starts, c[0] + c[1] - 1) - 1
                for r in range(max(first, 0), last + 1):
                    cover[r].append(h)
            f.cover = cover
            f.hashes = hashes  # last: a thread that sees it sees the cover too
            return hashes

    # -- the restore's side --
    def claim(self, key: str, wanted: Sequence[tuple[int, int, str | None]]) -> mmap.mmap | None:
        """The whole bytes of data file ``key`` (the caller owns the map from now on: it
        closes it), if they may be used for the chunks ``wanted`` (offset, length, hash): see
        the class docstring. None: read it the usual way (what was read ahead is dropped when
        it is stale)."""
        if not self.planned.wait(timeout=600) or self._stop.is_set():
            return None
        folder, _, name = key.rpartition("/")
        with self._lock:
            f = self.files.get(name) if folder == self.folder else None
        if f is None:
            if not self._claimed:  # another checkpoint is restored: stop reading this one
                self.cancel(wait=True)
            return None
        self._known.wait(timeout=600)
        store = self._store
        manifest_now = store.listed_since_lease(f"{folder}/manifest.json")
        data_now = store.listed_since_lease(key)
        confirmed = (
            manifest_now is not None
            and data_now is not None
            and self.manifest_etag is not None
            and manifest_now.get("e_tag") == self.manifest_etag
            and int(data_now.get("size", -1)) == f.size
            and (f.etag is None or data_now.get("e_tag") == f.etag)
        )
        if not confirmed:  # committed, replaced or deleted since it was read: drop it all
            self.cancel(wait=True)
            return None
        f.done.wait()
        with self._lock:
            mm, f.mm = f.mm, None
        ok = (
            mm is not None
            and not f.failed
            and not self._stop.is_set()
            and f.etag is not None
            and data_now.get("e_tag") == f.etag
            and all(d is None or (o, n, d) in f.ok for o, n, d in wanted)
        )
        if not ok:
            if mm is not None:
                mm.close()
            return None
        self._claimed = True
        return mm

    def cancel(self, *, wait: bool = False) -> None:
        """Stop reading (each request at its next piece) and free what was not claimed;
        ``wait``: until the threads are gone (never from one of them)."""
        self._stop.set()
        self._known.set()  # (requests waiting for the manifest stop too)
        if (
            wait
            and self._thread.ident is not None
            and self._thread is not threading.current_thread()
        ):
            self._thread.join()
        if not self._thread.is_alive():
            self._free()

    def _free(self) -> None:
        with self._lock:
            maps = [f.mm for f in self.files.values() if f.mm is not None]
            for f in self.files.values():
                f.mm = None
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a view is still being released; the GC closes it
                pass
