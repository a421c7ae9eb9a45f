"""The two ends of a transfer: where a source or destination argument points, and the stores
with the byte counters and the small retried operations every other part uses.

Invariant: every byte read from the source is counted once in :attr:`Endpoints.bytes_moved`
(retries included), every byte not moved because the destination held it verified in
:attr:`Endpoints.bytes_skipped`; both may be updated from several threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from savegame import errors
from savegame.format import layout, manifest
from savegame.storage import Location, Store, as_store, base, locate, urls
from savegame.tools import transfer
from savegame.tools.transfer import failures
from savegame.tools.transfer.progress import Progress


# ---- where things are ----------------------------------------------------------------------
def source(src: str | os.PathLike[str] | Store | Location) -> tuple[Store, str | None]:
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


def dest(dst: str | os.PathLike[str] | Store) -> Store:
    """The destination run folder's store (never one checkpoint)."""
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


# ---- the stores, counted -------------------------------------------------------------------
class Endpoints:
    """The source and destination stores of one transfer, its byte counters and progress bar."""

    def __init__(self, src: Store, dst: Store, progress: Progress) -> None:
        self.src, self.dst, self.progress = src, dst, progress
        self.lock = threading.Lock()
        self.bytes_moved = 0
        self.bytes_skipped = 0

    # -- counters (several threads) --
    def moved(self, n: int) -> None:
        with self.lock:
            self.bytes_moved += n
        self.progress.advance(n)

    def skip(self, n: int) -> None:
        with self.lock:
            self.bytes_skipped += n
        self.progress.advance(n)

    def where(self, store: Store, key: str = "") -> str:
        return urls.redact(store.describe(key))

    # -- small objects, retried --
    def read(
        self, store: Store, key: str, limit: int = manifest.MAX_MANIFEST_BYTES
    ) -> bytes | None:
        """A small blob (manifest, run.json, LATEST), or None if absent; retried. One over
        ``limit`` bytes is not read: FormatError (memory stays bounded whatever a server
        serves)."""
        where = self.where(store, key)
        for attempt in range(transfer.RETRIES):
            try:
                # One GET from byte 0 (a plain GET where the store can): a server that ignores
                # Range still serves small files whole.
                with store.open(key) as blob:
                    if blob.size > limit:
                        raise errors.FormatError(
                            f"{where} is {blob.size} bytes, over the {limit} it may hold: not read",
                            path=where,
                        )
                    data = b"".join(bytes(v) for v in blob.stream(0))
                if len(data) != blob.size:
                    raise EOFError(f"got {len(data)} bytes of {blob.size}")
            except FileNotFoundError:
                return None
            except (OSError, EOFError) as exc:
                if not failures.retryable(exc) or attempt == transfer.RETRIES - 1:
                    raise failures.storage_error("could not read", exc, where) from exc
                failures.sleep(attempt)
                continue
            if store is self.src:  # bytes moved are bytes read from the source
                with self.lock:
                    self.bytes_moved += len(data)
            return data
        return None  # pragma: no cover - the loop returns or raises

    def put(self, key: str, data: bytes) -> None:
        """Write a small blob (run.json, LATEST) to the destination; retried."""
        where = self.where(self.dst, key)
        for attempt in range(transfer.RETRIES):
            try:
                self.dst.put(key, data)
                return
            except errors.CheckpointError:
                raise
            except OSError as exc:
                if not failures.retryable(exc) or attempt == transfer.RETRIES - 1:
                    raise failures.storage_error("could not write", exc, where) from exc
                failures.sleep(attempt)

    def drop(self, key: str) -> None:
        """Delete ``key`` from the destination if it can (a leftover: failing is harmless)."""
        with contextlib.suppress(OSError):
            self.dst.delete(key, None)

    def lock_dest(self) -> base.Lock | None:
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
                f"could not lock {self.where(self.dst)}: {exc}", path=self.where(self.dst)
            ) from exc
        return lock

    # -- source files --
    def open(self, skey: str) -> base.Blob:
        """The source object ``skey``, opened (retried); missing is an IntegrityError."""
        where = self.where(self.src, skey)
        for attempt in range(transfer.RETRIES):
            try:
                return self.src.open(skey)
            except FileNotFoundError as exc:
                raise errors.IntegrityError(
                    f"{where}: listed in its manifest but missing from the source (deleted "
                    "while moving, or a damaged source); nothing of this step was committed",
                    path=where,
                ) from exc
            except OSError as exc:
                if not failures.retryable(exc) or attempt == transfer.RETRIES - 1:
                    raise failures.storage_error("could not open", exc, where) from exc
                failures.sleep(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def blob(self, skey: str, m: manifest.Manifest, name: str) -> base.Blob:
        """The source file ``name`` of ``m``, opened, of the size its manifest says."""
        blob = self.open(skey)
        if blob.size != m.files[name].size:
            blob.close()
            where = self.where(self.src, skey)
            raise errors.IntegrityError(
                f"{where}: file is {blob.size} bytes but its manifest says {m.files[name].size} "
                f"(a lying manifest, or a file replaced); nothing of step {m.step} was committed",
                path=where,
                step=m.step,
            )
        return blob
