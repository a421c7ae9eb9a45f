"""The storage seam: where checkpoint bytes live, and who owns the commit.

A :class:`Store` is a folder of named blobs (keys are ``/``-separated, relative, never ``..``)
with the few operations a crash-safe checkpoint needs: a durable write, an atomic replace, a
conditional create, ranged reads, listing, deletion, and the commit of a staged checkpoint.
The store owns the commit because how to make N files appear at once differs by backend: a
POSIX folder renames a temp folder into place (:class:`~savegame.storage.local.LocalStore`);
an object store, which has no rename, writes the data objects first and the manifest last
with a create-only put, and readers only believe a manifest.

Invariants every implementation keeps (``tests/conformance/test_store_conformance.py`` checks
them on each):

- After :meth:`Staging.commit` returns, the checkpoint is complete and durable; before it, no
  listing shows it under its final name. A failure (or a crash) at any point leaves the old
  state or the new one, never a mix, and never damages another key.
- :meth:`Store.put` replaces a small blob atomically (readers see the old bytes or the new).
- :meth:`Store.create` fails with :class:`FileExistsError` if the key exists (one winner).
- :meth:`Store.detach` takes a key out of view atomically; freeing its bytes may come later.
- Nothing outside ``storage/`` renames, fsyncs or deletes checkpoint data (a test enforces it).

Errors: a missing key is :class:`FileNotFoundError`; other backend failures are
:class:`OSError` (the callers in ``engine/`` turn them into typed savegame errors with context).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

__all__ = [
    "Blob",
    "ChangedError",
    "RangeNotSupportedError",
    "Entry",
    "Location",
    "Lock",
    "Staging",
    "Store",
    "VanishedError",
    "check_key",
    "check_name",
    "join",
]

T = TypeVar("T")


def check_key(key: str) -> str:
    """``key`` if it is a safe relative key, else ValueError (a name from a file must never
    address something outside the store: no absolute paths, no ``..``, no empty parts)."""
    if not isinstance(key, str):
        raise TypeError(f"storage key must be str, got {type(key).__name__}")
    if key == "":
        return key
    parts = key.split("/")
    if (
        key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\x00" in key
        or "\\" in key
    ):
        raise ValueError(
            f"invalid storage key {key!r}: keys are relative, '/'-separated, without '..'"
        )
    return key


def check_name(key: str) -> str:
    """``key`` if it is a safe, non-empty key: what a rename, detach or lock may name (the
    empty key is the store itself, which no operation may move or lock by name)."""
    if check_key(key) == "":
        raise ValueError("invalid storage key '': name an entry inside the store")
    return key


def join(*parts: str) -> str:
    """Join key parts with ``/`` (empty parts are skipped: ``join("", "x") == "x"``)."""
    return "/".join(p for p in parts if p)


class ChangedError(OSError):
    """The blob changed while it was being read: its ETag (or modification time) is not the
    one it had when it was opened. A reader starts that blob over; it never mixes versions."""


class VanishedError(ChangedError, FileNotFoundError):
    """The blob was removed since it was opened (or listed): a change to a reader that starts
    it over (and then finds it moved or missing), a missing file to everyone else."""


class RangeNotSupportedError(OSError):
    """The server answered a ranged read with the whole object (HTTP 200, not 206): a
    resumable transfer must fetch that blob from its start instead."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One child of a listed prefix."""

    name: str
    is_dir: bool


def _unchangeable() -> None:
    """:meth:`Blob.lease` of a blob that nothing else can change: nothing to check."""


class Blob(abc.ABC):
    """An open blob for positional reads (several threads may read one blob).

    A remote blob is pinned to the version it had when opened (``etag``): a read that finds a
    newer version raises :class:`ChangedError` instead of mixing the two.
    """

    size: int
    #: The version the reads are pinned to (an HTTP ETag), or None where the store has none.
    etag: str | None = None

    @abc.abstractmethod
    def readinto(self, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` with the bytes at ``offset``; EOFError if the blob ends first."""

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def stream(
        self, offset: int = 0, chunk: int = 8 << 20, end: int | None = None
    ) -> Iterator[memoryview]:
        """The bytes from ``offset`` to ``end`` (default: the end), in pieces of at most
        ``chunk`` bytes, for a transfer that keeps what arrived when a connection is cut. A
        remote store overrides this with one streaming GET; the default reads ``chunk``-sized
        ranges."""
        pos, stop = offset, self.size if end is None else min(end, self.size)
        while pos < stop:
            buf = bytearray(min(chunk, stop - pos))
            self.readinto(pos, memoryview(buf))
            pos += len(buf)
            yield memoryview(buf)

    def map(self) -> Any | None:
        """The whole blob as a writable zero-copy buffer (private: writes never reach the
        store), or None where the backend cannot map. The caller closes it if it has close()."""
        return None

    def lease(self) -> Callable[[], None] | None:
        """Guard :meth:`map`'s buffer against the blob being cut short or rewritten while it is
        read (a truncated file under a live mapping kills the process with SIGBUS): a check to
        call before each use of the buffer, which raises a typed error once that is under way
        (until the blob is closed nobody else can complete it), or None where the blob cannot
        be guarded — then it must not be mapped. Default: a blob whose mapping is private
        memory cannot change under it."""
        return _unchangeable

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the blob."""

    def __enter__(self) -> Blob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lock(Protocol):
    """The one-writer-per-run lock (``acquire`` raises ``LockedError`` naming the holder)."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    @property
    def held(self) -> bool: ...


class Staging(abc.ABC):
    """A checkpoint being written under a temporary name; invisible until :meth:`commit`.

    Several processes (ranks) may write files into one staging area: the coordinator creates
    it with :meth:`Store.begin` and the others join it by name with :meth:`Store.staging`.
    """

    name: str

    @abc.abstractmethod
    def describe(self, fname: str = "") -> str:
        """Where ``fname`` in the staging area is, for messages."""

    @abc.abstractmethod
    def write(
        self, fname: str, produce: Callable[[BinaryIO], T], *, size: int | None = None
    ) -> tuple[T, int]:
        """Create file ``fname``, let ``produce`` write it (an unbuffered binary file: check
        every write's count), make it durable, and return ``produce``'s result and the size
        the store now holds (the caller checks it against what it meant to write).

        ``size``, when the caller knows it, is about how many bytes ``produce`` will write (at
        most): an object store sizes its multipart parts by it (an upload has at most 10,000
        parts). A store may ignore it; nothing is checked against it."""

    def adopt(self, fname: str, path: str | os.PathLike[str]) -> int:
        """Make the local file ``path`` (complete, already checked by the caller) the staged
        file ``fname``, durable when it returns, and return the size the store now holds.
        ``path`` is gone afterwards.

        A store whose staging area is a local folder moves ``path`` there (fsync, then a
        rename within the file system) when ``path`` already lives inside that folder: no
        byte is copied. This default, for stores that cannot rename, copies ``path`` through
        :meth:`write` and then removes it.

        Raises:
            FileExistsError: ``fname`` is already staged, where the store can tell (a folder,
                memory); nothing is replaced. (An object store's default copy cannot tell:
                it writes the unpublished object again.)
            OSError: nothing was adopted; ``path`` is kept.
        """
        block = 8 << 20

        def produce(f: BinaryIO) -> None:
            buf = bytearray(block)
            view = memoryview(buf)
            with open(path, "rb", buffering=0) as src:
                while n := src.readinto(buf):
                    rest = view[:n]
                    while rest:
                        w = f.write(rest)
                        if not w:
                            raise OSError(f"write made no progress on {self.describe(fname)}")
                        rest = rest[w:]

        _, size = self.write(fname, produce)
        os.unlink(path)
        return size

    def commit(self, final: str, manifest_name: str, manifest: bytes) -> None:
        """Write ``manifest`` last, durably (:meth:`seal`), then publish the staged files under
        ``final`` (:meth:`publish`): the two halves of the commit protocol.

        Raises:
            FileExistsError: ``final`` exists (the caller decides whether to set it aside).
            OSError: the commit failed; nothing is published under ``final``.
        """
        self.seal(manifest_name, manifest)
        self.publish(final)

    @abc.abstractmethod
    def seal(self, manifest_name: str, manifest: bytes) -> None:
        """Make the manifest (and every staged file) durable inside the staging area."""

    @abc.abstractmethod
    def publish(self, final: str) -> None:
        """Make the sealed checkpoint appear under ``final`` atomically; FileExistsError if
        ``final`` exists."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove the staging area and everything in it (best effort; never raises)."""


class Store(abc.ABC):
    """A folder of blobs with a commit. See the module docstring for the invariants."""

    #: Where the store is, for messages (a path, or a URL with credentials removed).
    url: str

    # ---- naming --------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.describe()

    def describe(self, key: str = "") -> str:
        """A human-readable location of ``key`` (a file path for local stores)."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def local_path(self, key: str = "") -> Path | None:
        """The file-system path of ``key`` when the store is a local folder, else None."""
        return None

    # ---- reading -------------------------------------------------------------------------
    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[Entry]:
        """Direct children of ``prefix`` ("" = the store's root), in no particular order.
        FileNotFoundError if ``prefix`` is not a folder."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def is_dir(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Bytes in blob ``key``; FileNotFoundError if it is absent."""

    @abc.abstractmethod
    def open(self, key: str) -> Blob:
        """Open blob ``key`` for ranged reads; FileNotFoundError if it is absent."""

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[start, start + length)`` of ``key`` (to the end if ``length`` is None)."""
        with self.open(key) as blob:
            n = blob.size - start if length is None else length
            return blob.read(start, max(0, min(n, blob.size - start)))

    def mtime(self, key: str) -> float | None:
        """Last modification time of ``key`` if the backend knows it."""
        return None

    def version(self, key: str) -> Hashable | None:
        """A token that changes whenever blob ``key`` is replaced, rewritten or removed, got
        without reading it (a local file's inode, size and times), or None where the backend
        cannot tell cheaply: then readers read the blob every time."""
        return None

    def du(self, key: str) -> int:
        """Total bytes under ``key`` (a blob or a folder)."""
        if not self.is_dir(key):
            return self.size(key) if self.exists(key) else 0
        total = 0
        for e in self.list(key):
            total += self.du(join(key, e.name))
        return total

    # ---- writing -------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Durably replace blob ``key`` with ``data``, atomically."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> None:
        """Durably create blob ``key``; FileExistsError if it exists (exactly one creator wins)."""

    @abc.abstractmethod
    def makedirs(self, key: str = "") -> None:
        """Make sure folder ``key`` exists (a no-op where folders are implicit)."""

    @abc.abstractmethod
    def detach(self, key: str, trash: str | None) -> Callable[[], list[str]]:
        """Take ``key`` (a blob or folder) out of view atomically under the temporary name
        ``trash``, and return a function that frees its bytes (it returns the problems it
        met: freeing may be slow, so callers may run it on another thread). ``trash=None``:
        ``key`` already has a temporary name (a leftover staging area); free it in place."""

    def delete(self, key: str, trash: str | None) -> list[str]:
        """Remove ``key`` now (via :meth:`detach`); returns problems freeing the bytes."""
        return self.detach(key, trash)()

    @abc.abstractmethod
    def rename(self, key: str, new_key: str) -> None:
        """Move ``key`` to ``new_key`` in the same folder (set a damaged checkpoint aside).
        FileExistsError if ``new_key`` exists."""

    @abc.abstractmethod
    def begin(self, name: str, final: str | None = None) -> Staging:
        """Create the staging area ``name`` (a temporary name) for a new checkpoint that is
        meant to be published as ``final`` (a hint: an object store, which cannot rename,
        writes the data objects under ``final`` directly and commits by putting the manifest
        last; a folder store ignores it). Publishing under another name stays allowed."""

    @abc.abstractmethod
    def staging(self, name: str) -> Staging:
        """Join the staging area ``name`` that another process created with :meth:`begin`."""

    @abc.abstractmethod
    def lock(self, name: str) -> Lock:
        """The writer lock of this store (not yet acquired)."""


@dataclass(frozen=True, slots=True)
class Location:
    """A key inside a store: a run folder (``key == ""``) or a checkpoint in it."""

    store: Store
    key: str = ""

    @property
    def name(self) -> str:
        if self.key:
            return self.key.rsplit("/", 1)[-1]
        local = self.store.local_path()
        return local.name if local is not None else self.store.url.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> Location:
        return Location(self.store, join(self.key, check_key(name)))

    def __truediv__(self, name: str) -> Location:
        """``loc / "manifest.json"``: the child location (as for a Path)."""
        return self.child(name)

    def sub(self, name: str) -> str:
        """The key of ``name`` inside this location."""
        return join(self.key, check_key(name))

    @property
    def local(self) -> Path | None:
        return self.store.local_path(self.key)

    def __str__(self) -> str:
        return self.store.describe(self.key)

    def __fspath__(self) -> str:
        local = self.local
        if local is None:
            raise TypeError(f"{self} is not on the local file system")
        return os.fspath(local)
