"""A store that fails on purpose: crash and full-disk tests without monkeypatching ``os``.

:class:`FaultyStore` wraps any store and makes the n-th call of a named *point* fail. The
points are the places where a real save can be cut short::

    stage.begin    creating the staging area          stage.write   mid-file (part is written)
    stage.sync     after a file's bytes, before it is durable (fsync failed)
                   (``Staging.adopt`` passes ``stage.write`` then ``stage.sync``, then moves)
    commit.seal    before the manifest is written     commit.publish after it, before the rename
    commit.done    after the checkpoint is published (the writer never learns it committed)
    put, create, rename, detach, list, open, makedirs, lock   the other operations

Two modes: by default a fault raises ``error`` (ENOSPC: a full disk) and the store keeps
working, so the caller's clean-up runs — what a full disk does. With ``crash=True`` the
store dies at the fault: that call and every later one raise, nothing is cleaned up, and the
wrapped store holds exactly what a ``kill -9`` at that point leaves (open a new Checkpointer
on the wrapped store to test recovery).

``calls`` counts every point, so a test can first run a save to learn which points it
passes through and then fail each one in turn.
"""

from __future__ import annotations

import errno
import io
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TypeVar

from savegame.storage import base

__all__ = ["FaultyStore", "POINTS", "disk_full"]

T = TypeVar("T")

POINTS = (
    "stage.begin",
    "stage.write",
    "stage.sync",
    "commit.seal",
    "commit.publish",
    "commit.done",
    "put",
    "create",
    "rename",
    "detach",
    "list",
    "open",
    "makedirs",
    "lock",
)


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class _CutWriter(io.RawIOBase):
    """Passes the first write through, then fails: a file cut short part-way."""

    def __init__(self, inner: BinaryIO, fail: Callable[[], None]) -> None:
        self._inner = inner
        self._fail = fail
        self._writes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._writes += 1
        if self._writes > 1:
            self._fail()
        return self._inner.write(b)  # type: ignore[return-value]

    def fileno(self) -> int:
        return self._inner.fileno()


class _FaultyStaging(base.Staging):
    def __init__(self, owner: FaultyStore, inner: base.Staging) -> None:
        self._owner = owner
        self._inner = inner
        self.name = inner.name

    def describe(self, fname: str = "") -> str:
        return self._inner.describe(fname)

    def write(
        self, fname: str, produce: Callable[[BinaryIO], T], *, size: int | None = None
    ) -> tuple[T, int]:
        o = self._owner
        o._alive()
        cut = o._next("stage.write")

        def wrapped(f: BinaryIO) -> T:
            if cut:
                w = _CutWriter(f, lambda: o._fire("stage.write"))
                out = produce(w)  # type: ignore[arg-type]
                if w._writes <= 1:  # one write only: cut it at the end instead
                    o._fire("stage.write")
                return out
            return produce(f)

        out = self._inner.write(fname, wrapped, size=size)
        o._point("stage.sync")
        return out

    def adopt(self, fname: str, path: str | os.PathLike[str]) -> int:
        # Moving a finished file into place counts as writing it (``stage.write``) and
        # making it durable (``stage.sync``): a fault at either leaves nothing adopted.
        self._owner._point("stage.write")
        self._owner._point("stage.sync")
        return self._inner.adopt(fname, path)

    def seal(self, manifest_name: str, manifest: bytes) -> None:
        self._owner._point("commit.seal")
        self._inner.seal(manifest_name, manifest)

    def publish(self, final: str) -> None:
        self._owner._point("commit.publish")
        self._inner.publish(final)
        self._owner._point("commit.done")

    def abort(self) -> None:
        if not self._owner.dead:  # a dead process cleans nothing up
            self._inner.abort()


class FaultyStore(base.Store):
    """Wraps ``inner``; the ``faults[point]``-th call of ``point`` fails (1 = the first).

    Args:
        inner: The store that holds the bytes.
        faults: point -> which call fails (see :data:`POINTS`).
        error: Builds the exception a fault raises (default: ENOSPC).
        crash: Die at the first fault (every later call raises, nothing is cleaned up).
    """

    def __init__(
        self,
        inner: base.Store,
        faults: Mapping[str, int] | None = None,
        *,
        error: Callable[[], BaseException] = disk_full,
        crash: bool = False,
    ) -> None:
        unknown = set(faults or {}) - set(POINTS)
        if unknown:
            raise ValueError(f"unknown fault points {sorted(unknown)}; choose from {POINTS}")
        self.inner = inner
        self.url = inner.url
        self.faults = dict(faults or {})
        self.error = error
        self.crash = crash
        self.dead = False
        self.calls: Counter[str] = Counter()
        self.fired: list[str] = []
        self._locks: list[base.Lock] = []

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r}, {self.faults!r}, crash={self.crash})"

    # ---- fault plumbing --------------------------------------------------------------------
    def _alive(self) -> None:
        if self.dead:
            raise OSError(errno.EIO, "the writer is gone (simulated crash)")

    def _next(self, point: str) -> bool:
        """Count a call of ``point``; True if this call is the one to fail."""
        self.calls[point] += 1
        return self.faults.get(point) == self.calls[point]

    def _fire(self, point: str) -> None:
        self.fired.append(point)
        if self.crash:
            self.dead = True
            for lock in self._locks:  # the kernel drops a killed process's flock
                lock.release()
        raise self.error()

    def _point(self, point: str) -> None:
        self._alive()
        if self._next(point):
            self._fire(point)

    # ---- the store -------------------------------------------------------------------------
    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def local_path(self, key: str = "") -> Any:
        return self.inner.local_path(key)

    def list(self, prefix: str = "") -> list[base.Entry]:
        self._point("list")
        return self.inner.list(prefix)

    def exists(self, key: str) -> bool:
        self._alive()
        return self.inner.exists(key)

    def is_dir(self, key: str) -> bool:
        self._alive()
        return self.inner.is_dir(key)

    def size(self, key: str) -> int:
        self._alive()
        return self.inner.size(key)

    def mtime(self, key: str) -> float | None:
        return self.inner.mtime(key)

    def du(self, key: str) -> int:
        return self.inner.du(key)

    def open(self, key: str) -> base.Blob:
        self._point("open")
        return self.inner.open(key)

    def put(self, key: str, data: bytes) -> None:
        self._point("put")
        self.inner.put(key, data)

    def create(self, key: str, data: bytes) -> None:
        self._point("create")
        self.inner.create(key, data)

    def makedirs(self, key: str = "") -> None:
        self._point("makedirs")
        self.inner.makedirs(key)

    def detach(self, key: str, trash: str | None) -> Callable[[], list[str]]:
        self._point("detach")
        return self.inner.detach(key, trash)

    def rename(self, key: str, new_key: str) -> None:
        self._point("rename")
        self.inner.rename(key, new_key)

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        self._point("stage.begin")
        return _FaultyStaging(self, self.inner.begin(name, final))

    def staging(self, name: str) -> base.Staging:
        self._alive()
        return _FaultyStaging(self, self.inner.staging(name))

    def lock(self, name: str) -> base.Lock:
        self._point("lock")
        lock = self.inner.lock(name)
        self._locks.append(lock)
        return lock
