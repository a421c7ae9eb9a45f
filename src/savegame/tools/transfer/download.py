"""Reading one source file's bytes, through cut connections: a stream that continues where it
stopped (within a run), and part files that a later run continues (断点续传).

Invariants:

- A cut connection keeps the bytes received; the next GET starts where it stopped, with
  backoff, until ``RETRIES`` failures in a row (no new byte between them).
- Into a local folder, a file is downloaded into ``<staging>/<file>.part`` next to
  ``<file>.part.json`` (the source's ETag, size and split). A file over ``SPLIT`` bytes comes
  as parallel ranges, each written at its own offset of the one ``.part``; the sidecar then
  also records how many bytes of each range are written (updated after each write, so after a
  kill it never claims a byte the file does not hold). A later run continues only when the
  sidecar names the source's current version; otherwise the file starts over (at most
  ``RESTARTS`` times). Either way the finished ``.part`` is the file: it is moved into place,
  never written a second time.
- The sidecar is replaced whole (a temporary file, then a rename), and written only after the
  bytes it counts; a fresh ``.part`` is emptied before its sidecar is written. So a kill at any
  point leaves a sidecar that counts no byte the ``.part`` lacks, and keeps what it counted.
- A ``.part`` or sidecar that is a link, a named pipe or a device is removed, never opened: a
  link could point outside the run (the pull would write there), a pipe would block forever.
- Memory: at most one block of ``BLOCK`` bytes per range in flight.

The knobs (``BLOCK``, ``WORKERS``, ``RETRIES``, ``SPLIT``, ``RESTARTS``) are the package's,
read at call time.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from savegame import errors
from savegame.format import manifest
from savegame.storage import base, urls
from savegame.storage import files as storage_files
from savegame.tools import transfer
from savegame.tools.transfer import failures
from savegame.tools.transfer.check import FileCheck
from savegame.tools.transfer.endpoints import Endpoints

PART = ".part"
SIDECAR = ".part.json"
#: A sidecar holds an ETag and one count per range: one larger than this is not ours.
_SIDECAR_MAX = 1 << 20


def stream(
    ends: Endpoints, blob: base.Blob, skey: str, offset: int, end: int | None = None
) -> Iterator[memoryview]:
    """The bytes of ``blob`` from ``offset`` to ``end`` (default: its end), through cut
    connections: what arrived is kept and the next GET starts where it stopped, with
    backoff; :class:`failures.Restart` when the file must start over; StorageError after
    ``RETRIES`` failures in a row."""
    where = ends.where(ends.src, skey)
    stop = blob.size if end is None else end
    pos, fails = offset, 0
    while pos < stop:
        try:
            for view in blob.stream(pos, transfer.BLOCK, end=None if stop == blob.size else stop):
                if len(view) > stop - pos:
                    raise failures.Restart(f"{where} grew while it was read")
                pos += len(view)
                ends.moved(len(view))
                fails = 0
                yield view
            if pos < stop:
                raise ConnectionError(f"stream ended at byte {pos} of {stop}")
        except base.RangeNotSupportedError as exc:
            # Also from a GET at byte 0: obstore continues a cut body with a Range request
            # itself, which such a server answers with the whole file. Start it over
            # (bounded by RESTARTS).
            raise failures.Restart(str(exc)) from exc
        except (base.ChangedError, EOFError) as exc:
            raise failures.Restart(str(exc)) from exc
        except errors.CheckpointError:
            raise
        except OSError as exc:
            if pos and failures.unsatisfiable(exc):  # 416: the file is not what was opened
                raise failures.Restart(str(exc)) from exc
            fails += 1
            if not failures.retryable(exc) or fails >= transfer.RETRIES:
                raise failures.storage_error(
                    f"could not download (gave up at byte {pos} of {blob.size} after "
                    f"{fails} failed attempts in a row; run the transfer again to resume)",
                    exc,
                    where,
                ) from exc
            failures.sleep(fails - 1)


def unstable(ends: Endpoints, skey: str, exc: BaseException) -> errors.StorageError:
    """The error for a source file that kept changing (more than ``RESTARTS`` start-overs)."""
    where = ends.where(ends.src, skey)
    return errors.StorageError(
        f"{where} kept changing while it was downloaded ({transfer.RESTARTS + 1} tries; last: "
        f"{urls.redact_text(str(exc))}); wait until nothing writes it and run again",
        path=where,
    )


def download(
    ends: Endpoints,
    skey: str,
    name: str,
    m: manifest.Manifest,
    folder: Path,
    side: Path,
    new_check: Callable[[], FileCheck],
) -> tuple[Path, bool, FileCheck]:
    """Make ``<folder>/<name>.part`` hold the whole source file; True if an earlier run's bytes
    were continued. The third value is the :class:`FileCheck` fed every byte of the file, in
    order, not yet finished: a file fetched as one stream is hashed on the way (an earlier
    run's prefix read back once, then every byte as it arrives); one fetched as parallel
    ranges is read back once from the page cache when all of it is there."""
    resumed = False
    split = transfer.SPLIT
    path = folder / (name + PART)
    for restart in range(transfer.RESTARTS + 1):
        blob = ends.blob(skey, m, name)
        try:
            segs = segments(blob.size, split)
            done = _resume_offsets(path, segs, side, blob, split)
            try:
                record = {"etag": blob.etag, "size": blob.size, "split": split}
                record["source"] = ends.where(ends.src, skey)
                if any(done):
                    resumed = True
                    ends.skip(sum(done))
                check = new_check()
                if len(segs) == 1:
                    if not any(done):  # the old bytes gone before a sidecar could count them
                        os.close(_open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
                        _write_json(side, record)
                    _fetch_stream(ends, blob, skey, path, done[0], check)
                else:
                    _fetch_ranges(ends, blob, skey, path, segs, done, _Ranges(side, record, done))
                    _feed(path, blob.size, check)
                return path, resumed, check
            except (failures.Restart, failures.NoRanges) as exc:
                if restart == transfer.RESTARTS:
                    raise unstable(ends, skey, exc) from exc
                if isinstance(exc, failures.NoRanges):
                    split = 0  # the server ignores Range: one stream from byte 0
                try:  # forget the old version: start over
                    _write_json(side, {})
                except OSError as err:
                    raise failures.storage_error("could not write", err, str(side)) from err
                continue
            except OSError as exc:
                if isinstance(exc, errors.CheckpointError):
                    raise
                raise failures.storage_error("could not write", exc, str(path)) from exc
        finally:
            blob.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _write_json(path: Path, record: dict[str, object]) -> None:
    """Replace ``path`` by ``record`` as JSON, whole (a run killed mid-write keeps the previous
    counts). Not fsynced: after a power cut the file's hash catches a ``.part`` that lost bytes
    the sidecar counted, and the file is fetched whole once more. A leftover temporary file is
    swept before the commit."""
    storage_files.replace_unsynced(path, json.dumps(record).encode())


def _read_json(path: Path) -> object:
    """The sidecar's JSON; ValueError when it is too large or does not parse."""
    with open(_open(path, os.O_RDONLY), "rb") as f:
        raw = f.read(_SIDECAR_MAX + 1)
    if len(raw) > _SIDECAR_MAX:
        raise ValueError(f"{path} is over {_SIDECAR_MAX} bytes")
    try:
        return json.loads(raw)
    except RecursionError as exc:  # nested past the parser's depth: not ours
        raise ValueError(f"{path} is nested too deep") from exc


#: A ``.part`` or sidecar is opened never through a link nor as a pipe (see the storage helper).
_open = storage_files.open_plain


class _Ranges:
    """How many bytes of each range the ``.part`` holds, kept in the sidecar as they are
    written: the sidecar is rewritten only after the bytes it counts were written, so a run
    killed at any point leaves it counting no byte the file lacks."""

    def __init__(self, side: Path, record: dict[str, object], done: list[int]) -> None:
        self.side = side
        self.record = record
        self.done = list(done)
        self.unsaved = 0
        self.lock = threading.Lock()
        self._save()

    def advance(self, k: int, n: int, last: bool) -> None:
        """Count ``n`` more bytes of range ``k`` as written; the sidecar is rewritten once a
        ``BLOCK`` more is counted, and at the end of each range (a body arrives in pieces of
        tens of KB: one rename per piece would cost more than the bytes)."""
        with self.lock:
            self.done[k] += n
            self.unsaved += n
            if last or self.unsaved >= transfer.BLOCK:
                self.unsaved = 0
                self._save()

    def _save(self) -> None:
        _write_json(self.side, {**self.record, "done": self.done})


def _feed(path: Path, size: int, check: FileCheck) -> None:
    """Feed ``check`` the first ``size`` bytes of ``path`` (just written: from the page cache)."""
    buf = bytearray(min(transfer.BLOCK, max(size, 1)))
    view = memoryview(buf)
    left = size
    with open(_open(path, os.O_RDONLY), "rb", buffering=0) as f:
        while left:
            n = f.readinto(view[: min(len(buf), left)])
            if not n:
                raise EOFError(f"{path} ends {left} bytes before its size {size}")
            check.feed(view[:n])
            left -= n


def _fetch_stream(
    ends: Endpoints, blob: base.Blob, skey: str, path: Path, done: int, check: FileCheck | None
) -> None:
    """One streaming GET from ``done`` to the end, appended to ``path``; ``check`` (if any) is
    fed the kept prefix (read back once) and then every byte as it arrives."""
    with open(_open(path, os.O_RDWR | os.O_CREAT), "r+b", buffering=0) as f:
        f.truncate(done)
        if check is not None and done:
            buf = bytearray(min(transfer.BLOCK, done))
            view = memoryview(buf)
            left = done
            while left:
                n = f.readinto(view[: min(len(buf), left)])
                if not n:
                    raise EOFError(f"{path} ends before byte {done}")  # pragma: no cover
                check.feed(view[:n])
                left -= n
        f.seek(done)
        for view in stream(ends, blob, skey, done):
            if check is not None:
                check.feed(view)
            failures.write_all(f, view)


def _fetch_ranges(
    ends: Endpoints,
    blob: base.Blob,
    skey: str,
    path: Path,
    segs: list[tuple[int, int]],
    done: list[int],
    progress: _Ranges,
) -> None:
    """Each range at its own offset of ``path``, ``WORKERS`` at once."""
    stop = threading.Event()
    fd = _open(path, os.O_RDWR | os.O_CREAT)
    try:
        if os.fstat(fd).st_size != blob.size:
            os.ftruncate(fd, blob.size)  # the ranges then fill it in place

        def one(k: int) -> None:
            try:
                _fetch_range(ends, blob, skey, fd, segs[k], done[k], stop, k, progress)
            except BaseException:
                stop.set()  # the others stop at their next block: the file starts over
                raise

        with ThreadPoolExecutor(max_workers=min(transfer.WORKERS, len(segs))) as pool:
            futures = [pool.submit(one, k) for k in range(len(segs))]
    finally:
        os.close(fd)
    errs = [f.exception() for f in futures if f.exception() is not None]
    for exc in errs:  # the reason to start over first: the others only followed it
        if isinstance(exc, (failures.Restart, failures.NoRanges)):
            raise exc
    if errs:
        raise errs[0]  # type: ignore[misc]


def _fetch_range(
    ends: Endpoints,
    blob: base.Blob,
    skey: str,
    fd: int,
    seg: tuple[int, int],
    done: int,
    stop: threading.Event,
    k: int,
    progress: _Ranges,
) -> None:
    """Bytes ``seg`` of the source into the same offsets of ``fd`` (the first ``done`` are
    there): one streaming ranged GET to the segment's end, continued from where it stopped
    when the connection is cut (with backoff, as :func:`stream`). One GET per segment, not
    one per ``BLOCK``: a server that reads the whole object for every ranged GET (moto) made
    a 256 MiB pull 11x slower than one GET, and every request is a round trip on any server."""
    start, end = seg
    pos = start + done
    if stop.is_set() or pos >= end:
        return
    try:
        for view in stream(ends, blob, skey, pos, end):
            rest = view
            while rest:
                n = os.pwrite(fd, rest, pos)
                if n <= 0:
                    raise OSError(f"write at byte {pos} made no progress")
                pos += n
                rest = rest[n:]
            progress.advance(k, len(view), pos >= end)
            if stop.is_set():
                return
    except failures.Restart as exc:
        if isinstance(exc.__cause__, base.RangeNotSupportedError):
            raise failures.NoRanges(str(exc)) from exc
        raise


def segments(size: int, split: int) -> list[tuple[int, int]]:
    """The byte ranges a file of ``size`` bytes is fetched in (one when ``split`` is 0)."""
    if split <= 0 or size <= split:
        return [(0, size)]
    return [(a, min(a + split, size)) for a in range(0, size, split)]


def _resume_offsets(
    path: Path, segs: list[tuple[int, int]], side: Path, blob: base.Blob, split: int
) -> list[int]:
    """How much of each range an earlier run left that may be continued, when the sidecar
    names the source's current version (same ETag, size and split), else none: for one
    stream, the ``.part``'s size; for ranges, the counts the sidecar keeps."""
    none = [0] * len(segs)
    try:
        record = _read_json(side)
        st = os.lstat(path)
    except (OSError, ValueError):
        return none
    if not stat.S_ISREG(st.st_mode):
        return none
    have = st.st_size
    if (
        not isinstance(record, dict)
        or blob.etag is None
        or record.get("etag") != blob.etag
        or record.get("size") != blob.size
        or record.get("split") != split
    ):
        return none
    if len(segs) == 1:
        return [have] if have <= blob.size else none
    done = record.get("done")
    if (
        type(done) is not list
        or len(done) != len(segs)
        or have != blob.size
        or not all(type(d) is int and 0 <= d <= b - a for d, (a, b) in zip(done, segs, strict=True))
    ):
        return none
    return done
