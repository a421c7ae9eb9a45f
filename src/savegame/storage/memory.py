"""An in-memory store: the reference implementation of the store contract, for tests.

Everything lives in one process's memory (nothing is durable, so "durable" is trivially
true). Folders are explicit, as on a POSIX file system, so the same code paths (staging
folders, set-aside, listing) run unchanged. One lock guards the whole map: every operation is
atomic with respect to the others, which is exactly what the contract promises and no more.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from savegame import errors
from savegame.storage import base

__all__ = ["MemoryStore"]

T = TypeVar("T")


def _missing(key: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "no such key", key)


class _MemoryBlob(base.Blob):
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def readinto(self, offset: int, dest: memoryview) -> None:
        end = offset + len(dest)
        if end > self.size:
            raise EOFError(f"ends at byte {self.size}, expected {end}")
        dest[:] = self._data[offset:end]

    def map(self) -> Any | None:
        return bytearray(self._data)  # private: writes never reach the store


class _Writer(io.RawIOBase):
    """An unbuffered binary file whose bytes land in the store only when the write is done."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.buf += view
        return len(view)


class _MemoryStaging(base.Staging):
    def __init__(self, store: MemoryStore, name: str) -> None:
        self.name = name
        self._store = store

    def describe(self, fname: str = "") -> str:
        return self._store.describe(base.join(self.name, fname))

    def write(
        self, fname: str, produce: Callable[[BinaryIO], T], *, size: int | None = None
    ) -> tuple[T, int]:
        w = _Writer()
        out = produce(w)  # type: ignore[arg-type]
        key = base.join(self.name, base.check_key(fname))
        with self._store._lock:
            if self.name not in self._store._dirs:
                raise _missing(self.name)
            self._store._files[key] = bytes(w.buf)
            self._store._times[key] = time.time()
            return out, len(self._store._files[key])

    def adopt(self, fname: str, path: str | os.PathLike[str]) -> int:
        with self._store._lock:
            if base.join(self.name, base.check_key(fname)) in self._store._files:
                raise FileExistsError(errno.EEXIST, "already staged", self.describe(fname))
        return super().adopt(fname, path)

    def seal(self, manifest_name: str, manifest: bytes) -> None:
        s = self._store
        with s._lock:
            if self.name not in s._dirs:
                raise _missing(self.name)
            s._files[base.join(self.name, base.check_key(manifest_name))] = bytes(manifest)

    def publish(self, final: str) -> None:
        s = self._store
        with s._lock:
            if self.name not in s._dirs:
                raise _missing(self.name)
            if s._exists(base.check_key(final)):
                raise FileExistsError(errno.EEXIST, "already exists", final)
            s._move(self.name, final)

    def abort(self) -> None:
        with self._store._lock:
            self._store._drop(self.name)


class _MemoryLock:
    def __init__(self, store: MemoryStore, name: str) -> None:
        self._store = store
        self._name = name
        self._held = False

    def acquire(self) -> None:
        with self._store._lock:
            if self._name in self._store._locks:
                raise errors.LockedError(
                    f"run {self._store.url} is in use by another writer (in this process); two trainings "
                    "must not share a run — use a different one, or close the other Checkpointer",
                    path=self._store.url,
                )
            self._store._locks.add(self._name)
            self._held = True

    def release(self) -> None:
        if self._held:
            with self._store._lock:
                self._store._locks.discard(self._name)
            self._held = False

    @property
    def held(self) -> bool:
        return self._held


class MemoryStore(base.Store):
    """A store held in a dict (``memory://<name>``). Not shared between processes."""

    def __init__(self, name: str = "store") -> None:
        self.url = f"memory://{name}"
        self._files: dict[str, bytes] = {}
        self._times: dict[str, float] = {}
        self._dirs: set[str] = {""}
        self._locks: set[str] = set()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    # ---- helpers (call with the lock held) ------------------------------------------------
    def _exists(self, key: str) -> bool:
        return key in self._files or key in self._dirs

    def _parent_dir(self, key: str) -> None:
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        if parent not in self._dirs:
            raise _missing(parent)

    def _under(self, key: str) -> tuple[list[str], list[str]]:
        pre = key + "/"
        return [k for k in self._files if k.startswith(pre)], [
            d for d in self._dirs if d.startswith(pre)
        ]

    def _move(self, key: str, new: str) -> None:
        self._parent_dir(new)
        if key in self._files:
            self._files[new] = self._files.pop(key)
            self._times[new] = self._times.pop(key, time.time())
            return
        files, dirs = self._under(key)
        for k in files:
            nk = new + k[len(key) :]
            self._files[nk] = self._files.pop(k)
            self._times[nk] = self._times.pop(k, time.time())
        for d in dirs:
            self._dirs.discard(d)
            self._dirs.add(new + d[len(key) :])
        self._dirs.discard(key)
        self._dirs.add(new)

    def _drop(self, key: str) -> None:
        files, dirs = self._under(key)
        for k in [*files, key]:
            self._files.pop(k, None)
            self._times.pop(k, None)
        for d in [*dirs, key]:
            if d:
                self._dirs.discard(d)

    # ---- reading -------------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[base.Entry]:
        base.check_key(prefix)
        with self._lock:
            if prefix not in self._dirs:
                raise _missing(prefix)
            pre = prefix + "/" if prefix else ""
            out: dict[str, bool] = {}
            for k in self._files:
                if k.startswith(pre) and "/" not in k[len(pre) :]:
                    out[k[len(pre) :]] = False
            for d in self._dirs:
                if d and d.startswith(pre) and "/" not in d[len(pre) :]:
                    out[d[len(pre) :]] = True
            return [base.Entry(n, is_dir) for n, is_dir in out.items()]

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._exists(base.check_key(key))

    def is_dir(self, key: str) -> bool:
        with self._lock:
            return base.check_key(key) in self._dirs

    def size(self, key: str) -> int:
        with self._lock:
            if key not in self._files:
                raise _missing(key)
            return len(self._files[key])

    def mtime(self, key: str) -> float | None:
        return self._times.get(key)

    def open(self, key: str) -> base.Blob:
        with self._lock:
            if base.check_key(key) not in self._files:
                raise _missing(key)
            return _MemoryBlob(self._files[key])

    # ---- writing -------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._parent_dir(base.check_key(key))
            if key in self._dirs:
                raise IsADirectoryError(errno.EISDIR, "is a folder", key)
            self._files[key] = bytes(data)
            self._times[key] = time.time()

    def create(self, key: str, data: bytes) -> None:
        with self._lock:
            if self._exists(base.check_key(key)):
                raise FileExistsError(errno.EEXIST, "already exists", key)
            self.put(key, data)

    def makedirs(self, key: str = "") -> None:
        parts = base.check_key(key).split("/") if key else []
        with self._lock:
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d in self._files:
                    raise NotADirectoryError(errno.ENOTDIR, "is a file", d)
                self._dirs.add(d)

    def detach(self, key: str, trash: str | None) -> Callable[[], list[str]]:
        with self._lock:
            if not self._exists(base.check_name(key)):
                raise _missing(key)
            self._drop(key)
        return list

    def rename(self, key: str, new_key: str) -> None:
        with self._lock:
            if not self._exists(base.check_name(key)):
                raise _missing(key)
            if self._exists(base.check_name(new_key)):
                raise FileExistsError(errno.EEXIST, "already exists", new_key)
            self._move(key, new_key)

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        with self._lock:
            if self._exists(base.check_name(name)):
                raise FileExistsError(errno.EEXIST, "already exists", name)
            self._parent_dir(name)
            self._dirs.add(name)
        return _MemoryStaging(self, name)

    def staging(self, name: str) -> base.Staging:
        with self._lock:
            if base.check_key(name) not in self._dirs:
                raise _missing(name)
        return _MemoryStaging(self, name)

    def lock(self, name: str) -> _MemoryLock:
        return _MemoryLock(self, base.check_name(name))
