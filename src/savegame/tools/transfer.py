"""Move runs between stores: :func:`push` and :func:`pull`, resumable and verified (断点续传).

Key invariants:

- **Nothing partial is ever visible in the destination.** Each checkpoint goes through the
  destination store's commit: ``begin`` a staging area, ``Staging.write`` every data file,
  then the manifest last with ``Staging.commit``. A transfer killed at any point leaves the
  destination's committed checkpoints as they were, plus a staging area no listing shows.
- **No byte is committed unverified.** Every byte is hashed as it streams through (the same
  per-chunk and per-file hashes as :func:`savegame.engine.reader.verify`) and its size checked
  before the manifest is written. A source whose manifest lies about sizes or hashes raises
  :class:`~savegame.errors.IntegrityError` naming the file, and nothing of that checkpoint is
  committed.
- **Re-running resumes.** A checkpoint already in the destination with the same manifest bytes
  that verifies is skipped. Inside a checkpoint, files a killed run already staged and that
  verify are kept. A pull from a remote store into a local folder downloads each file into
  ``<staging>/<file>.part`` next to a small ``<file>.part.json`` (the source's ETag and size);
  a later run continues it with a ranged GET from its size, unless the source's ETag changed
  (or it has none) — then that file starts over. Within one run, a connection cut mid-file
  keeps the bytes received and continues from there with backoff.
- **Uploads resume at file granularity.** obstore has no public API to resume one multipart
  upload from another process, so a push killed mid-file uploads that file again; files it had
  already finished (and that verify) are not uploaded again.
- **Memory is bounded**: at most ``workers`` blocks of :data:`BLOCK` bytes in flight; no file
  is ever held whole.

Which checkpoints move: every committed, valid one (newest first, so the most useful one is
safe soonest if the transfer is cut), or those named by ``steps``, or the one a source URL or
path ending in ``step-…`` names. ``run.json`` is copied so the destination keeps the run's id,
then ``LATEST`` (a hint) last. A destination that already holds *another* run (a different run
id) is refused before anything is written; a step the destination holds with *different*
valid content is refused (:class:`~savegame.errors.StepExistsError`); a destination checkpoint
that is incomplete or damaged is taken out of view and replaced by the source's bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from savegame import errors
from savegame.engine import reader
from savegame.format import hashing, layout, manifest
from savegame.storage import Location, Staging, Store, as_store, base, locate, urls

__all__ = ["TransferReport", "pull", "push"]

log = logging.getLogger(__name__)

#: Bytes per streamed block (one per worker in flight: the memory bound).
BLOCK = 8 << 20
#: Files moved at once.
WORKERS = 4
#: Failed attempts in a row (no new byte between them) before a file's transfer gives up.
RETRIES = 6
#: First backoff delay in seconds; doubles per failure in a row, capped at :data:`BACKOFF_MAX`.
BACKOFF = 0.25
BACKOFF_MAX = 8.0
#: Files over this size are downloaded into a local folder as parallel ranges of this size,
#: each its own resumable part file (memory: at most WORKERS x WORKERS blocks in flight).
SPLIT = 64 << 20
#: Times one file may start over (its source changed, or the server ignored ``Range``).
RESTARTS = 3

PART = ".part"
SIDECAR = ".part.json"


@dataclass(frozen=True, slots=True)
class TransferReport:
    """What a :func:`push` or :func:`pull` did.

    Attributes:
        source: Where the run came from (credentials redacted).
        dest: Where it went (credentials redacted).
        copied: Steps committed in the destination by this transfer, in the order moved.
        skipped: Steps the destination already held, identical and verified.
        bytes_moved: Bytes read from the source (every attempt counted, so a cut connection's
            retries show here; manifests and ``run.json`` included).
        bytes_skipped: Bytes not moved because the destination already held them verified
            (skipped checkpoints, and staged files or ``.part`` prefixes of an earlier run).
        ignored: Source steps that were never committed (no manifest: a save in progress, or
            a killed writer's leftovers on an object store): not checkpoints, not moved.
        problems: Source checkpoints that could not be moved because they are damaged in the
            source (their manifest does not parse or verify), each with the reason.
    """

    source: str
    dest: str
    copied: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    bytes_moved: int = 0
    bytes_skipped: int = 0
    ignored: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        """True when every checkpoint of the source is in the destination and verified (the
        CLI exits 0 only then)."""
        return not self.problems


def push(
    src: str | os.PathLike[str] | Store | Location,
    dst: str | os.PathLike[str] | Store,
    *,
    steps: Iterable[int] | None = None,
    progress: bool | None = None,
) -> TransferReport:
    """Copy a run (or one checkpoint) from ``src`` to the run folder ``dst``, verified.

    Resumable by re-running: checkpoints already in ``dst`` (same manifest, verified) are
    skipped, and so are files a killed push had finished; a file cut by a kill is uploaded
    again from its start (obstore cannot resume a multipart upload across processes).

    Args:
        src: A run folder or one checkpoint (``…/step-000000001200``): a path, a URL
            (``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``) or a Store.
        dst: The destination run folder: a path, a URL or a Store. Created if absent.
        steps: Only these steps (default: every committed, valid checkpoint).
        progress: Show a progress bar (bytes, rate, ETA) on stderr; default: when stderr is a
            terminal.

    Returns:
        What was copied and skipped; ``report.verified`` is True when everything is.

    Raises:
        CheckpointNotFoundError: ``src`` does not exist, holds no committed checkpoint, or a
            requested step is not in it.
        IntegrityError: a source file does not match its manifest (named in the message;
            nothing of that checkpoint is committed, the others are moved first).
        StepExistsError: ``dst`` holds the same step with different valid content.
        CheckpointError: ``dst`` holds another run (a different run id).
        StorageError: a store failed (after retries for network errors); re-run to resume.

    Example:
        >>> report = push("runs/exp1", "s3://bucket/runs/exp1")  # doctest: +SKIP
        >>> report.verified  # doctest: +SKIP
        True
    """
    return _Transfer(src, dst, steps, progress).run()


def pull(
    src: str | os.PathLike[str] | Store | Location,
    dst: str | os.PathLike[str] | Store,
    *,
    steps: Iterable[int] | None = None,
    progress: bool | None = None,
) -> TransferReport:
    """Copy a run (or one checkpoint) from a remote ``src`` into the run folder ``dst``.

    The same operation as :func:`push` seen from the other side (the arguments and the result
    are the same). Into a local folder, each file is downloaded into ``<file>.part`` inside the
    checkpoint's staging area and a re-run continues it with a ranged GET (断点续传); a source
    file whose ETag changed, or a server that ignores ``Range``, makes that file start over.
    Each file is then written into place, hashed on the way, before the manifest commits.

    Raises:
        The same errors as :func:`push`.

    Example:
        >>> report = pull("https://host/runs/exp1", "runs/exp1")  # doctest: +SKIP
    """
    return _Transfer(src, dst, steps, progress).run()


# ---- where things are ----------------------------------------------------------------------
def _source(src: str | os.PathLike[str] | Store | Location) -> tuple[Store, str | None]:
    """The source store and, when ``src`` names one checkpoint, its key in that store."""
    if isinstance(src, Location):
        return src.store, (src.key or None)
    if isinstance(src, Store):
        return src, None
    if urls.is_url(src):
        text = str(src)
        last = text.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if layout.parse_step_dir(last) is not None:
            loc = locate(text)  # the checkpoint's key in the store of its run
            return loc.store, loc.key
        return as_store(text), None
    path = Path(src)
    if layout.parse_step_dir(path.name) is not None:
        loc = locate(path)
        return loc.store, loc.key
    return as_store(path), None


def _dest(dst: str | os.PathLike[str] | Store) -> Store:
    if isinstance(dst, Store):
        return dst
    name = str(dst).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
    if layout.parse_step_dir(name) is not None:
        raise errors.CheckpointError(
            f"the destination {urls.redact(str(dst))} names a checkpoint; name the run folder "
            "that should hold it (its parent)",
            path=urls.redact(str(dst)),
        )
    return as_store(dst)


def _retryable(exc: BaseException) -> bool:
    """A failure worth another attempt: a network or server hiccup, not a missing object, a
    refusal, a change of the source, or a bug."""
    if isinstance(
        exc,
        (
            FileNotFoundError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            errors.CredentialsError,
            errors.AccessDeniedError,
            errors.UnsupportedURLError,
            errors.LockedError,
            base.ChangedError,
            base.RangeNotSupportedError,
        ),
    ):
        return False
    if isinstance(exc, OSError) and exc.errno in _FINAL_ERRNOS:
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


# A full disk, a quota, a read-only or forbidden destination: retrying cannot help.
_FINAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class _Restart(Exception):
    """A file must be transferred again from its first byte (the source changed, or the
    server answered a ranged GET with the whole object)."""


# ---- verification on the fly ---------------------------------------------------------------
class _FileCheck:
    """Hashes one file's bytes as they stream by (in order) and checks them against its
    manifest entry: the same checks as :func:`savegame.engine.reader.verify`."""

    def __init__(self, m: manifest.Manifest, name: str, where: str) -> None:
        self.m, self.name, self.where = m, name, where
        self.entry = m.files[name]
        spans = sorted(
            (c.offset, c.length, c.hash, key)
            for key, t in m.tensors.items()
            for c in t.chunks
            if c.file == name
        )
        self.spans = spans
        self.hashers = [hashing.new() for _ in spans]
        self.first = 0  # spans before this one have ended
        self.header = bytearray()
        self.pos = 0

    def feed(self, view: memoryview) -> None:
        start, end = self.pos, self.pos + len(view)
        hl = self.entry.header_length
        if start < hl:
            self.header += view[: min(end, hl) - start]
        spans = self.spans
        while self.first < len(spans) and spans[self.first][0] + spans[self.first][1] <= start:
            self.first += 1
        i = self.first
        while i < len(spans) and spans[i][0] < end:
            off, length = spans[i][0], spans[i][1]
            lo, hi = max(off, start), min(off + length, end)
            if lo < hi:
                self.hashers[i].update(view[lo - start : hi - start])
            i += 1
        self.pos = end

    def finish(self) -> None:
        """Raises IntegrityError naming the file (and tensor) if anything does not match."""
        if self.pos != self.entry.size:
            raise errors.IntegrityError(
                f"{self.where}: the source sent {self.pos} bytes but its manifest says "
                f"{self.entry.size} (a lying manifest, or a file replaced); nothing of step "
                f"{self.m.step} was committed",
                path=self.where,
                step=self.m.step,
            )
        for (_, _, want, key), h in zip(self.spans, self.hashers, strict=True):
            if h.hexdigest() != want:
                raise errors.IntegrityError(
                    f"{self.where}: tensor {key!r} does not match the hash in its manifest "
                    f"(corrupt source data or a lying manifest); nothing of step {self.m.step} "
                    "was committed — run `savegame verify` on the source",
                    path=self.where,
                    step=self.m.step,
                    key=key,
                )
        got = hashing.file_hash(bytes(self.header), [s[2] for s in self.spans], path=self.where)
        if got != self.entry.hash:
            raise errors.IntegrityError(
                f"{self.where}: header does not match its hash in the manifest (corrupt source "
                f"or a lying manifest); nothing of step {self.m.step} was committed",
                path=self.where,
                step=self.m.step,
            )


# ---- progress ------------------------------------------------------------------------------
class _Progress:
    """A rich progress bar on stderr (bytes, rate, ETA), or nothing."""

    def __init__(self, enabled: bool | None, label: str) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(label, total=None)

    def start(self, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total)
            self._bar.start()

    def advance(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---- the transfer ----------------------------------------------------------------------------
class _Transfer:
    def __init__(
        self,
        src: str | os.PathLike[str] | Store | Location,
        dst: str | os.PathLike[str] | Store,
        steps: Iterable[int] | None,
        progress: bool | None,
    ) -> None:
        self.src, self.one = _source(src)
        self.dst = _dest(dst)
        self.steps = None if steps is None else {int(s) for s in steps}
        self.progress = _Progress(progress, "transfer")
        self.lock = threading.Lock()
        self.moved = 0
        self.skipped_bytes = 0
        self.copied: list[int] = []
        self.skipped: list[int] = []
        self.ignored: list[int] = []
        self.problems: list[str] = []
        # A local destination fed from a remote source keeps resumable .part files.
        self.parts = self.dst.local_path() is not None and self.src.local_path() is None

    # -- counters (several threads) --
    def _moved(self, n: int) -> None:
        with self.lock:
            self.moved += n
        self.progress.advance(n)

    def _skip(self, n: int) -> None:
        with self.lock:
            self.skipped_bytes += n
        self.progress.advance(n)

    def _where(self, store: Store, key: str = "") -> str:
        return urls.redact(store.describe(key))

    # -- the run --
    def run(self) -> TransferReport:
        if getattr(self.dst, "read_only", False):
            where = self._where(self.dst)
            raise errors.StorageError(
                f"{where} is read-only (an http(s) URL can only be read); push to s3://, gs://, "
                "az:// or a folder",
                path=where,
            )
        todo = self._plan()
        lock = self._lock()
        try:
            self.progress.start(sum(reader.total_bytes(m) for _, _, m in todo))
            self._run_file()
            failures: list[errors.IntegrityError] = []
            for key, raw, m in todo:
                self.progress.describe(f"step {m.step}")
                try:
                    self._checkpoint(key, raw, m)
                except errors.IntegrityError as exc:
                    failures.append(exc)
            if failures:
                self._raise_integrity(failures)
            self._latest()
        finally:
            self.progress.stop()
            if lock is not None:
                lock.release()
        return TransferReport(
            source=self._where(self.src, self.one or ""),
            dest=self._where(self.dst),
            copied=tuple(self.copied),
            skipped=tuple(self.skipped),
            bytes_moved=self.moved,
            bytes_skipped=self.skipped_bytes,
            ignored=tuple(self.ignored),
            problems=tuple(self.problems),
        )

    def _raise_integrity(self, failures: list[errors.IntegrityError]) -> None:
        first = failures[0]
        more = "; ".join(str(f) for f in failures[1:])
        done = f"; the other checkpoints were moved and verified ({len(self.copied)} copied, {len(self.skipped)} already there)"
        raise errors.IntegrityError(
            str(first) + (f"; also: {more}" if more else "") + done,
            path=first.path,
            step=first.step,
            key=first.key,
        ) from first

    def _lock(self) -> base.Lock | None:
        """The destination's writer lock where it is a local folder (a flock the kernel drops
        when a transfer is killed): no training run and no second transfer writes it meanwhile.
        A remote destination is not locked: its lease would outlive a killed push and block
        the re-run that resumes it until it expires."""
        if self.dst.local_path() is None:
            return None
        try:
            self.dst.makedirs("")
            lock = self.dst.lock(layout.LOCK)
            lock.acquire()
        except errors.CheckpointError:
            raise
        except OSError as exc:
            raise errors.StorageError(
                f"could not lock {self._where(self.dst)}: {exc}", path=self._where(self.dst)
            ) from exc
        return lock

    def _read(self, store: Store, key: str) -> bytes | None:
        """A small blob (manifest, run.json, LATEST), or None if absent; retried."""
        where = self._where(store, key)
        for attempt in range(RETRIES):
            try:
                # One GET from byte 0 (a plain GET where the store can): a server that ignores
                # Range still serves small files whole.
                with store.open(key) as blob:
                    data = b"".join(bytes(v) for v in blob.stream(0))
                if len(data) != blob.size:
                    raise EOFError(f"got {len(data)} bytes of {blob.size}")
            except FileNotFoundError:
                return None
            except (OSError, EOFError) as exc:
                if not _retryable(exc) or attempt == RETRIES - 1:
                    raise _storage_error("could not read", exc, where) from exc
                _sleep(attempt)
                continue
            with self.lock:
                self.moved += len(data)
            return data
        return None  # pragma: no cover - the loop returns or raises

    # -- what to move --
    def _plan(self) -> list[tuple[str, bytes, manifest.Manifest]]:
        if self.one is not None:
            key = self.one
            ref = reader.CheckpointRef(0, Location(self.src, key), loc=Location(self.src, key))
            ref.manifest = reader.read_manifest(Location(self.src, key))  # raises if not one
            ref.step = ref.manifest.step
            refs = [ref]
        else:
            refs = reader.list_checkpoints(self.src)
        if self.steps is not None:
            missing = self.steps - {r.step for r in refs}
            if missing:
                raise errors.CheckpointNotFoundError(
                    f"{self._where(self.src)} has no step {', '.join(map(str, sorted(missing)))}; "
                    f"run `savegame ls {self._where(self.src)}` to see its checkpoints",
                    path=self._where(self.src),
                    step=min(missing),
                )
            refs = [r for r in refs if r.step in self.steps]
        todo = []
        for ref in sorted(refs, key=lambda r: r.step, reverse=True):
            key = ref.location.key
            if not ref.valid:
                if isinstance(ref.error, errors.IncompleteCheckpointError):
                    self.ignored.append(ref.step)
                else:
                    self.problems.append(
                        f"step {ref.step} is damaged in the source and was not moved: {ref.error}"
                    )
                continue
            where = self._where(self.src, join(key, layout.MANIFEST))
            raw = self._read(self.src, join(key, layout.MANIFEST))
            if raw is None:  # deleted by the source's retention since it was listed
                self.ignored.append(ref.step)
                continue
            try:
                m = manifest.Manifest.from_bytes(raw, where)
            except errors.FormatError as exc:
                self.problems.append(f"step {ref.step} is damaged in the source: {exc}")
                continue
            todo.append((key, raw, m))
        if not todo and not self.problems and self.steps is None:
            raise errors.CheckpointNotFoundError(
                f"{self._where(self.src)} holds no committed checkpoint to move; run "
                f"`savegame ls {self._where(self.src)}` to see what is there",
                path=self._where(self.src),
            )
        self._check_run(todo)
        return todo

    def _run_id(self, store: Store) -> tuple[bytes | None, str | None]:
        raw = self._read(store, layout.RUN_FILE)
        if raw is None:
            return None, None
        try:
            record = json.loads(raw)
        except ValueError:
            return raw, None
        rid = record.get("run_id") if isinstance(record, dict) else None
        return raw, (rid if isinstance(rid, str) and rid else None)

    def _check_run(self, todo: list[tuple[str, bytes, manifest.Manifest]]) -> None:
        """Refuse a destination that holds another run (before anything is written)."""
        self.src_run, src_id = self._run_id(self.src)
        if self.src_run is not None and src_id is None:
            self.problems.append(
                f"{self._where(self.src, layout.RUN_FILE)} is damaged (not a JSON object with a "
                "run_id) and was not copied"
            )
            self.src_run = None
        self.src_id = src_id
        ours = {src_id} if src_id else {m.run_id for _, _, m in todo}
        try:
            _, dst_id = self._run_id(self.dst)
        except errors.StorageError:
            raise
        if dst_id is None:
            try:
                theirs = {r.manifest.run_id for r in reader.list_checkpoints(self.dst) if r.valid}  # type: ignore[union-attr]
            except errors.CheckpointNotFoundError:
                theirs = set()
        else:
            theirs = {dst_id}
        if theirs and ours and not (theirs & ours):
            raise errors.CheckpointError(
                f"{self._where(self.dst)} holds another run (run id {sorted(theirs)[0]}, not "
                f"{sorted(ours)[0]}); move this run into an empty folder or a new URL — savegame "
                "never mixes two runs in one folder",
                path=self._where(self.dst),
            )
        self.dst_id = dst_id

    # -- run.json and LATEST --
    def _run_file(self) -> None:
        if self.src_run is None:
            return
        if self.one is not None and self.dst_id is not None:
            return  # one checkpoint into an existing run of the same id: keep its run.json
        current = self._read(self.dst, layout.RUN_FILE)
        if current == self.src_run:
            return
        self._put(layout.RUN_FILE, self.src_run)

    def _latest(self) -> None:
        if self.one is not None:
            return
        raw = self._read(self.src, layout.LATEST)
        if raw is None or self._read(self.dst, layout.LATEST) == raw:
            return
        self._put(layout.LATEST, raw)

    def _put(self, key: str, data: bytes) -> None:
        where = self._where(self.dst, key)
        for attempt in range(RETRIES):
            try:
                self.dst.put(key, data)
                return
            except errors.CheckpointError:
                raise
            except OSError as exc:
                if not _retryable(exc) or attempt == RETRIES - 1:
                    raise _storage_error("could not write", exc, where) from exc
                _sleep(attempt)

    # -- one checkpoint --
    def _checkpoint(self, key: str, raw: bytes, m: manifest.Manifest) -> None:
        final = layout.step_dir(m.step)
        state = self._dest_state(final, raw)
        if state == "same":
            self.skipped.append(m.step)
            self._skip(reader.total_bytes(m))
            return
        if state == "different":
            where = self._where(self.dst, final)
            raise errors.StepExistsError(
                f"{where} holds a different valid checkpoint of step {m.step}; it is never "
                "overwritten — move it away (or choose another destination) and run again",
                path=where,
                step=m.step,
            )
        if state in ("damaged", "incomplete-local"):
            self._replace_damaged(final, m.step)
        tmp = layout.tmp_dir(m.step, hashing.digest(raw)[:16])
        try:
            try:
                staging = self.dst.begin(tmp, final)
            except FileExistsError:  # a killed transfer's staging area: continue it
                staging = self.dst.staging(tmp)
        except OSError as exc:
            where = self._where(self.dst, tmp)
            raise _storage_error("could not create the staging area", exc, where) from exc
        names = sorted(m.files, key=lambda n: -m.files[n].size)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(names)))) as pool:
                futures = [
                    pool.submit(self._file, key, name, m, staging, tmp, final) for name in names
                ]
            for f in futures:  # every file finished (or failed) before anything is judged
                f.result()
            self._commit(staging, tmp, final, raw, m)
        except errors.IntegrityError:
            staging.abort()  # the source lies: nothing of it is worth resuming
            if self._vanished(key):
                log.info("step %d was deleted from the source while it was moved", m.step)
                self.ignored.append(m.step)
                return
            raise
        self.copied.append(m.step)

    def _vanished(self, key: str) -> bool:
        """The source checkpoint is gone (its run's retention deleted it meanwhile): not a
        lie, nothing to move."""
        try:
            return not self.src.exists(join(key, layout.MANIFEST))
        except OSError:
            return False

    def _dest_state(self, final: str, raw: bytes) -> str:
        """What the destination holds under ``final``: absent, same (skip), different (refuse),
        damaged (replaced), incomplete (no manifest)."""
        try:
            if not self.dst.is_dir(final):
                return "absent"
        except OSError as exc:
            raise _storage_error("could not read", exc, self._where(self.dst, final)) from exc
        there = self._read(self.dst, join(final, layout.MANIFEST))
        if there is None:
            # An object store stages in place: a killed transfer's files, continued in place.
            return "incomplete-local" if self.dst.local_path() is not None else "incomplete"
        loc = Location(self.dst, final)
        if there == raw:
            return "same" if not self._damage(loc) else "damaged"
        return "different" if not reader.damage(loc) else "damaged"

    def _damage(self, loc: Location) -> list[str]:
        """Problems of a destination checkpoint: every byte read where the destination is a
        local folder; over the network the sizes and headers (a full re-read of a remote run
        on every re-run would cost as much as the transfer; `savegame verify URL` does it)."""
        if loc.store.local_path() is not None:
            return reader.verify(loc)
        try:
            m = reader.read_manifest(loc)
        except errors.CheckpointError as exc:
            return [str(exc)]
        problems = []
        for name, entry in m.files.items():
            try:
                with loc.store.open(loc.sub(name)) as blob:
                    if blob.size != entry.size:
                        problems.append(f"{name}: {blob.size} bytes, expected {entry.size}")
                        continue
                    check = _FileCheck(m, name, self._where(loc.store, loc.sub(name)))
                    header = blob.read(0, entry.header_length)
                    got = hashing.file_hash(header, [s[2] for s in check.spans])
                    if got != entry.hash:
                        problems.append(f"{name}: header does not match its hash")
            except (OSError, EOFError, errors.CheckpointError) as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def _replace_damaged(self, final: str, step: int) -> None:
        """Take a damaged (or manifest-less) destination copy out of view atomically and free
        it: the source holds the good bytes, which are copied in its place."""
        trash = f"{layout.TMP_PREFIX}deleted-{final}-{uuid.uuid4().hex[:8]}"
        where = self._where(self.dst, final)
        try:
            free = self.dst.detach(final, trash)
        except OSError as exc:
            raise _storage_error(
                "could not remove the damaged copy of this step (move it away and run again)",
                exc,
                where,
            ) from exc
        for problem in free():
            log.warning("damaged copy %s taken out of the run; freeing it: %s", where, problem)

    def _commit(
        self, staging: Staging, tmp: str, final: str, raw: bytes, m: manifest.Manifest
    ) -> None:
        where = self._where(self.dst, final)
        self._sweep(tmp, m)
        try:
            try:
                staging.seal(layout.MANIFEST, raw)
            except FileExistsError:  # a killed transfer sealed it; it holds these bytes?
                if self._read(self.dst, join(tmp, layout.MANIFEST)) != raw:
                    raise
            try:
                staging.publish(final)
            except FileExistsError:
                if self._dest_state(final, raw) == "same":
                    return  # published by a killed run that never heard of it
                raise errors.StepExistsError(
                    f"{where} appeared while step {m.step} was being moved (another writer?); "
                    "nothing was overwritten — check it and run again",
                    path=where,
                    step=m.step,
                ) from None
        except errors.CheckpointError:
            raise
        except OSError as exc:
            raise _storage_error(f"could not commit step {m.step}", exc, where) from exc

    def _sweep(self, tmp: str, m: manifest.Manifest) -> None:
        """Remove from a local staging folder what is not the checkpoint's (a killed run's
        ``.part`` files): a committed folder holds exactly the manifest's files."""
        folder = self.dst.local_path(tmp)
        if folder is None or not folder.is_dir():
            return
        for e in self.dst.list(tmp):
            if e.name not in m.files and e.name != layout.MANIFEST:
                self._drop(join(tmp, e.name))

    # -- one file --
    def _file(
        self, key: str, name: str, m: manifest.Manifest, staging: Staging, tmp: str, final: str
    ) -> None:
        entry = m.files[name]
        skey = join(key, name)
        folder = self.dst.local_path(tmp)
        via_part = self.parts and folder is not None and folder.is_dir()
        # A file a killed run staged is kept only when it is known durable: an object store's
        # object exists once its upload completed; a local file once Staging.write returned
        # (it fsyncs), which in .part mode is when its .part is gone. A local file otherwise
        # may be complete in the page cache but not on disk: it is written again (locally).
        durable = folder is None or (via_part and not (folder / (name + PART)).exists())
        if durable and self._staged(name, m, tmp, final):
            self._skip(entry.size)
            return
        if via_part:
            self._file_via_part(skey, name, m, staging, tmp)
        else:
            self._file_direct(skey, name, m, staging)

    def _staged(self, name: str, m: manifest.Manifest, tmp: str, final: str) -> bool:
        """A killed transfer already staged ``name`` whole: it verifies, so keep it (in the
        staging folder of a local store; in place under ``final`` on an object store)."""
        entry = m.files[name]
        for where in (join(tmp, name), join(final, name)):
            try:
                if not self.dst.exists(where) or self.dst.size(where) != entry.size:
                    continue
                check = _FileCheck(m, name, self._where(self.dst, where))
                with self.dst.open(where) as blob:
                    for view in blob.stream(0, BLOCK):
                        check.feed(view)
                check.finish()
                return True
            except (OSError, EOFError, errors.CheckpointError):
                continue
        return False

    def _open(self, skey: str) -> base.Blob:
        where = self._where(self.src, skey)
        for attempt in range(RETRIES):
            try:
                return self.src.open(skey)
            except FileNotFoundError as exc:
                raise errors.IntegrityError(
                    f"{where}: listed in its manifest but missing from the source (deleted "
                    "while moving, or a damaged source); nothing of this step was committed",
                    path=where,
                ) from exc
            except OSError as exc:
                if not _retryable(exc) or attempt == RETRIES - 1:
                    raise _storage_error("could not open", exc, where) from exc
                _sleep(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _blob(self, skey: str, m: manifest.Manifest, name: str) -> base.Blob:
        blob = self._open(skey)
        if blob.size != m.files[name].size:
            blob.close()
            where = self._where(self.src, skey)
            raise errors.IntegrityError(
                f"{where}: file is {blob.size} bytes but its manifest says {m.files[name].size} "
                f"(a lying manifest, or a file replaced); nothing of step {m.step} was committed",
                path=where,
                step=m.step,
            )
        return blob

    def _stream(self, blob: base.Blob, skey: str, offset: int) -> Iterator[memoryview]:
        """The bytes of ``blob`` from ``offset``, through cut connections: what arrived is
        kept and the next GET starts where it stopped, with backoff; :class:`_Restart` when
        the file must start over; StorageError after :data:`RETRIES` failures in a row."""
        where = self._where(self.src, skey)
        pos, failures = offset, 0
        while pos < blob.size:
            try:
                for view in blob.stream(pos, BLOCK):
                    if len(view) > blob.size - pos:
                        raise _Restart(f"{where} grew while it was read")
                    pos += len(view)
                    self._moved(len(view))
                    failures = 0
                    yield view
                if pos < blob.size:
                    raise ConnectionError(f"stream ended at byte {pos} of {blob.size}")
            except base.RangeNotSupportedError as exc:
                # Also from a GET at byte 0: obstore continues a cut body with a Range request
                # itself, which such a server answers with the whole file. Start it over
                # (bounded by RESTARTS).
                raise _Restart(str(exc)) from exc
            except (base.ChangedError, EOFError) as exc:
                raise _Restart(str(exc)) from exc
            except errors.CheckpointError:
                raise
            except OSError as exc:
                if pos and _unsatisfiable(exc):  # 416: the file is not what was opened
                    raise _Restart(str(exc)) from exc
                failures += 1
                if not _retryable(exc) or failures >= RETRIES:
                    raise _storage_error(
                        f"could not download (gave up at byte {pos} of {blob.size} after "
                        f"{failures} failed attempts in a row; run the transfer again to resume)",
                        exc,
                        where,
                    ) from exc
                _sleep(failures - 1)

    def _file_direct(self, skey: str, name: str, m: manifest.Manifest, staging: Staging) -> None:
        """Stream the source file into the staging area, hashing it on the way; a cut
        connection continues from where it stopped within this call."""
        restart = failures = 0
        while True:
            blob = self._blob(skey, m, name)
            check = _FileCheck(m, name, self._where(self.src, skey))

            def produce(f: BinaryIO, blob: base.Blob = blob, check: _FileCheck = check) -> None:
                for view in self._stream(blob, skey, 0):
                    check.feed(view)
                    _write_all(f, view)
                check.finish()

            try:
                _, size = staging.write(name, produce)
            except _Restart as exc:
                restart += 1
                if restart > RESTARTS:
                    raise self._unstable(skey, exc) from exc
                continue
            except errors.CheckpointError:
                raise
            except OSError as exc:  # the destination failed: write the file again, or give up
                failures += 1
                if not _retryable(exc) or failures >= RETRIES:
                    where = urls.redact(staging.describe(name))
                    raise _storage_error("could not write", exc, where) from exc
                _sleep(failures - 1)
                continue
            finally:
                blob.close()
            self._check_size(size, m, name)
            return

    def _unstable(self, skey: str, exc: BaseException) -> errors.StorageError:
        where = self._where(self.src, skey)
        return errors.StorageError(
            f"{where} kept changing while it was downloaded ({RESTARTS + 1} tries; last: "
            f"{urls.redact_text(str(exc))}); wait until nothing writes it and run again",
            path=where,
        )

    def _check_size(self, size: int, m: manifest.Manifest, name: str) -> None:
        if size != m.files[name].size:
            where = self._where(self.dst, name)
            raise errors.StorageError(
                f"{where}: the destination holds {size} bytes after writing "
                f"{m.files[name].size}; nothing was committed — run the transfer again",
                path=where,
                step=m.step,
            )

    def _file_via_part(
        self, skey: str, name: str, m: manifest.Manifest, staging: Staging, tmp: str
    ) -> None:
        """Download into ``<staging>/<name>.part`` (or, for a file over :data:`SPLIT` bytes,
        one ``.part-NNNNN`` per range, fetched in parallel), resumable across runs; then write
        the file into place from the parts, hashed on the way."""
        folder = self.dst.local_path(tmp)
        assert folder is not None  # checked by the caller
        side = folder / (name + SIDECAR)
        retried_whole = False
        while True:
            paths, resumed = self._download(skey, name, m, folder, side)

            def produce(f: BinaryIO, paths: list[Path] = paths) -> None:
                check = _FileCheck(m, name, self._where(self.src, skey))
                buf = bytearray(BLOCK)
                view = memoryview(buf)
                for path in paths:
                    with open(path, "rb", buffering=0) as src:
                        while n := src.readinto(buf):
                            check.feed(view[:n])
                            _write_all(f, view[:n])
                check.finish()

            try:
                _, size = staging.write(name, produce)
            except errors.IntegrityError:
                if resumed and not retried_whole:
                    # The kept prefix came from an earlier run; after a power cut an unsynced
                    # .part may hold zeros. Fetch the file whole once before blaming the source.
                    retried_whole = True
                    self._drop(join(tmp, side.name))
                    continue
                raise
            except OSError as exc:
                where = urls.redact(staging.describe(name))
                raise _storage_error("could not write", exc, where) from exc
            self._check_size(size, m, name)
            for path in paths:
                self._drop(join(tmp, path.name))
            self._drop(join(tmp, side.name))
            return

    def _drop(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.dst.delete(key, None)

    def _download(
        self, skey: str, name: str, m: manifest.Manifest, folder: Path, side: Path
    ) -> tuple[list[Path], bool]:
        """Make the part files hold the whole source file, in order; True if an earlier run's
        bytes were continued."""
        resumed = False
        split = SPLIT
        for restart in range(RESTARTS + 1):
            blob = self._blob(skey, m, name)
            try:
                segs = _segments(blob.size, split)
                paths = _part_paths(folder, name, len(segs))
                done = _resume_offsets(paths, segs, side, blob, split)
                try:
                    if not any(done):
                        record = {"etag": blob.etag, "size": blob.size, "split": split}
                        side.write_text(
                            json.dumps({**record, "source": self._where(self.src, skey)})
                        )
                    else:
                        resumed = True
                        self._skip(sum(done))
                    if len(segs) == 1:
                        self._fetch_stream(blob, skey, paths[0], done[0])
                    else:
                        self._fetch_ranges(blob, skey, paths, segs, done)
                    return paths, resumed
                except (_Restart, _NoRanges) as exc:
                    if restart == RESTARTS:
                        raise self._unstable(skey, exc) from exc
                    if isinstance(exc, _NoRanges):
                        split = 0  # the server ignores Range: one stream from byte 0
                    with open(side, "w"):  # forget the old version: start over
                        pass
                    continue
                except OSError as exc:
                    if isinstance(exc, errors.CheckpointError):
                        raise
                    raise _storage_error("could not write", exc, str(folder / name)) from exc
            finally:
                blob.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _fetch_stream(self, blob: base.Blob, skey: str, path: Path, done: int) -> None:
        """One streaming GET from ``done`` to the end, appended to ``path``."""
        with open(path, "r+b" if done else "wb", buffering=0) as f:
            f.truncate(done)
            f.seek(done)
            for view in self._stream(blob, skey, done):
                _write_all(f, view)

    def _fetch_ranges(
        self,
        blob: base.Blob,
        skey: str,
        paths: list[Path],
        segs: list[tuple[int, int]],
        done: list[int],
    ) -> None:
        """Each range into its own part file, :data:`WORKERS` at once."""
        stop = threading.Event()

        def one(k: int) -> None:
            try:
                self._fetch_range(blob, skey, paths[k], segs[k], done[k], stop)
            except BaseException:
                stop.set()  # the others stop at their next block: the file starts over
                raise

        with ThreadPoolExecutor(max_workers=min(WORKERS, len(segs))) as pool:
            futures = [pool.submit(one, k) for k in range(len(segs))]
        errs = [f.exception() for f in futures if f.exception() is not None]
        for exc in errs:  # the reason to start over first: the others only followed it
            if isinstance(exc, (_Restart, _NoRanges)):
                raise exc
        if errs:
            raise errs[0]  # type: ignore[misc]

    def _fetch_range(
        self,
        blob: base.Blob,
        skey: str,
        path: Path,
        seg: tuple[int, int],
        done: int,
        stop: threading.Event,
    ) -> None:
        """Bytes ``seg`` of the source into ``path`` (which holds the first ``done``), one
        ranged GET of at most :data:`BLOCK` bytes at a time, each retried with backoff."""
        where = self._where(self.src, skey)
        start, end = seg
        pos, failures = start + done, 0
        buf = bytearray(min(BLOCK, end - start))
        with open(path, "r+b" if done else "wb", buffering=0) as f:
            f.truncate(done)
            f.seek(done)
            while pos < end and not stop.is_set():
                view = memoryview(buf)[: min(len(buf), end - pos)]
                try:
                    blob.readinto(pos, view)
                except base.RangeNotSupportedError as exc:
                    raise _NoRanges(str(exc)) from exc
                except (base.ChangedError, EOFError) as exc:
                    raise _Restart(str(exc)) from exc
                except errors.CheckpointError:
                    raise
                except OSError as exc:
                    if _unsatisfiable(exc):
                        raise _Restart(str(exc)) from exc
                    failures += 1
                    if not _retryable(exc) or failures >= RETRIES:
                        raise _storage_error(
                            f"could not download (gave up at byte {pos} of {blob.size} after "
                            f"{failures} failed attempts in a row; run the transfer again to "
                            "resume)",
                            exc,
                            where,
                        ) from exc
                    _sleep(failures - 1)
                    continue
                _write_all(f, view)
                pos += len(view)
                failures = 0
                self._moved(len(view))


class _NoRanges(Exception):
    """The server answered a ranged GET with the whole object: fetch the file as one stream."""


def _segments(size: int, split: int) -> list[tuple[int, int]]:
    """The byte ranges a file of ``size`` bytes is fetched in (one when ``split`` is 0)."""
    if split <= 0 or size <= split:
        return [(0, size)]
    return [(a, min(a + split, size)) for a in range(0, size, split)]


def _part_paths(folder: Path, name: str, n: int) -> list[Path]:
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


def _unsatisfiable(exc: BaseException) -> bool:
    """An HTTP 416 (the range starts past the end): the server's file is shorter than the
    one opened (a server without ETags can change it unseen). Matched on the message: the
    store reports it as a plain I/O error."""
    text = str(exc).lower()
    return "416" in text or "not satisfiable" in text


def join(*parts: str) -> str:
    return base.join(*parts)


def _write_all(f: BinaryIO, view: memoryview) -> None:
    while view:
        n = f.write(view)
        if n is None or n <= 0:
            raise OSError(f"write to {getattr(f, 'name', 'the destination')} made no progress")
        view = view[n:]


def _sleep(failures: int) -> None:
    time.sleep(min(BACKOFF * (2**failures), BACKOFF_MAX))


def _storage_error(what: str, exc: BaseException, where: str) -> errors.StorageError:
    """A typed error naming ``where`` (credentials redacted), of the same kind as ``exc``
    where that is already a savegame storage error (missing credentials, access denied)."""
    cls: Callable[..., errors.StorageError] = errors.StorageError
    if isinstance(exc, errors.StorageError):
        cls = type(exc)
    elif isinstance(exc, PermissionError):
        cls = errors.AccessDeniedError
    detail = urls.redact_text(str(exc))
    # A store's own errors usually name the object already: say it once.
    return cls(f"{what}: {detail}" if where in detail else f"{what} {where}: {detail}", path=where)
