"""Reading one source file's bytes, through cut connections: a stream that continues where it
stopped (within a run), and part files that a later run continues (断点续传).

Invariants:

- A cut connection keeps the bytes received; the next GET starts where it stopped, with
  backoff, until ``RETRIES`` failures in a row (no new byte between them).
- Into a local folder, a file is downloaded into ``<staging>/<file>.part`` (over ``SPLIT``
  bytes: one ``.part-NNNNN`` per range, fetched in parallel) next to ``<file>.part.json`` (the
  source's ETag, size and split). A later run continues the parts only when that sidecar names
  the source's current version; otherwise the file starts over (at most ``RESTARTS`` times).
- Memory: at most one block of ``BLOCK`` bytes per range in flight.

The knobs (``BLOCK``, ``WORKERS``, ``RETRIES``, ``SPLIT``, ``RESTARTS``) are the package's,
read at call time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from savegame import errors
from savegame.format import manifest
from savegame.storage import base, urls
from savegame.tools import transfer
from savegame.tools.transfer import failures
from savegame.tools.transfer.check import FileCheck
from savegame.tools.transfer.endpoints import Endpoints

PART = ".part"
SIDECAR = ".part.json"


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
    new_check: Callable[[], FileCheck] | None = None,
) -> tuple[list[Path], bool, FileCheck | None]:
    """Make the part files hold the whole source file, in order; True if an earlier run's
    bytes were continued. A file fetched as one stream is also hashed on the way (an earlier
    run's prefix read back once, then every byte as it arrives): the third value is its
    :class:`FileCheck` (fed, not yet finished) when ``new_check`` is given; None for a file
    fetched as parallel ranges (the caller hashes the parts in order)."""
    resumed = False
    split = transfer.SPLIT
    for restart in range(transfer.RESTARTS + 1):
        blob = ends.blob(skey, m, name)
        try:
            segs = segments(blob.size, split)
            paths = part_paths(folder, name, len(segs))
            done = _resume_offsets(paths, segs, side, blob, split)
            try:
                if not any(done):
                    record = {"etag": blob.etag, "size": blob.size, "split": split}
                    side.write_text(json.dumps({**record, "source": ends.where(ends.src, skey)}))
                else:
                    resumed = True
                    ends.skip(sum(done))
                check = None
                if len(segs) == 1:
                    check = new_check() if new_check is not None else None
                    _fetch_stream(ends, blob, skey, paths[0], done[0], check)
                else:
                    _fetch_ranges(ends, blob, skey, paths, segs, done)
                return paths, resumed, check
            except (failures.Restart, failures.NoRanges) as exc:
                if restart == transfer.RESTARTS:
                    raise unstable(ends, skey, exc) from exc
                if isinstance(exc, failures.NoRanges):
                    split = 0  # the server ignores Range: one stream from byte 0
                with open(side, "w"):  # forget the old version: start over
                    pass
                continue
            except OSError as exc:
                if isinstance(exc, errors.CheckpointError):
                    raise
                raise failures.storage_error("could not write", exc, str(folder / name)) from exc
        finally:
            blob.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _fetch_stream(
    ends: Endpoints, blob: base.Blob, skey: str, path: Path, done: int, check: FileCheck | None
) -> None:
    """One streaming GET from ``done`` to the end, appended to ``path``; ``check`` (if any) is
    fed the kept prefix (read back once) and then every byte as it arrives."""
    with open(path, "r+b" if done else "wb", buffering=0) as f:
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
    paths: list[Path],
    segs: list[tuple[int, int]],
    done: list[int],
) -> None:
    """Each range into its own part file, ``WORKERS`` at once."""
    stop = threading.Event()

    def one(k: int) -> None:
        try:
            _fetch_range(ends, blob, skey, paths[k], segs[k], done[k], stop)
        except BaseException:
            stop.set()  # the others stop at their next block: the file starts over
            raise

    with ThreadPoolExecutor(max_workers=min(transfer.WORKERS, len(segs))) as pool:
        futures = [pool.submit(one, k) for k in range(len(segs))]
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
    path: Path,
    seg: tuple[int, int],
    done: int,
    stop: threading.Event,
) -> None:
    """Bytes ``seg`` of the source into ``path`` (which holds the first ``done``): one
    streaming ranged GET to the segment's end, continued from where it stopped when the
    connection is cut (with backoff, as :func:`stream`). One GET per segment, not one per
    ``BLOCK``: a server that reads the whole object for every ranged GET (moto) made a 256 MiB
    pull 11x slower than one GET, and every request is a round trip on any server."""
    start, end = seg
    with open(path, "r+b" if done else "wb", buffering=0) as f:
        f.truncate(done)
        f.seek(done)
        if stop.is_set():
            return
        try:
            for view in stream(ends, blob, skey, start + done, end):
                failures.write_all(f, view)
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


def part_paths(folder: Path, name: str, n: int) -> list[Path]:
    """The part files of ``name`` in ``folder``: one, or one per range."""
    if n == 1:
        return [folder / (name + PART)]
    return [folder / f"{name}{PART}-{k:05d}" for k in range(n)]


def _resume_offsets(
    paths: list[Path], segs: list[tuple[int, int]], side: Path, blob: base.Blob, split: int
) -> list[int]:
    """How much of each part an earlier run left that may be continued: all of it when the
    sidecar names the source's current version (same ETag, size and split), else none."""
    none = [0] * len(paths)
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return none
    if (
        not isinstance(record, dict)
        or blob.etag is None
        or record.get("etag") != blob.etag
        or record.get("size") != blob.size
        or record.get("split") != split
    ):
        return none
    out = []
    for path, (a, b) in zip(paths, segs, strict=True):
        try:
            have = path.stat().st_size
        except OSError:
            have = 0
        out.append(have if have <= b - a else 0)
    return out
