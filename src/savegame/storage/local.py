"""Local POSIX storage: :class:`LocalStore` (a folder), its primitives, and the writer lock.

Invariant: a rename is only trusted after the parent directory is fsynced, and a file is only
renamed into place after its own bytes are fsynced — the order that makes a power cut leave
either the old state or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import shutil
import signal
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from savegame import errors
from savegame.storage import base

__all__ = [
    "LocalStore",
    "RunLock",
    "atomic_write",
    "fsync_dir",
    "free_tree",
    "move_to_trash",
    "remove_tree",
]

T = TypeVar("T")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so renames and creations inside it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise errors.StorageError(f"could not write {path}: {exc}", path=path) from exc
    fsync_dir(path.parent)


def move_to_trash(path: str | os.PathLike[str], trash_name: str) -> Path:
    """Take a checkpoint folder out of its run atomically (rename to ``trash_name``, a temp name
    in the same folder, and fsync the folder); returns the trash path to delete later. A crash
    before the deletion leaves only a temp folder, which the next writer removes."""
    path = Path(path)
    trash = path.with_name(trash_name)
    try:
        os.rename(path, trash)
    except OSError as exc:
        if not _folder_rename_refused(exc, path):
            raise
        # Deleted where it is instead: its manifest first, so the checkpoint leaves view at
        # once (a folder without one is never restored), then the rest when freed. Moving its
        # files out one by one would copy each up into the container's layer first.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / _MANIFEST)
        fsync_dir(path)
        return path
    fsync_dir(path.parent)
    return trash


#: A checkpoint folder's manifest (format/layout.py): its presence is the commit.
_MANIFEST = "manifest.json"


def _folder_rename_refused(exc: OSError, path: Path) -> bool:
    """Whether ``exc`` from renaming the folder ``path`` means this file system cannot rename
    that folder at all: overlayfs answers EXDEV for a folder of a lower layer (one that came in
    a docker image) unless it is mounted with ``redirect_dir``."""
    return exc.errno == errno.EXDEV and path.is_dir() and not path.is_symlink()


def _rename_folder(src: Path, dest: Path) -> None:
    """``rename(2)``; where the file system refuses to rename the folder (see
    :func:`_folder_rename_refused`), its entries are moved into a new folder ``dest`` one by one
    — the manifest first, so a reader never sees a checkpoint under two names — and then the
    emptied ``src`` goes. Files of a lower layer rename fine (overlayfs copies them up)."""
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if not _folder_rename_refused(exc, src):
            raise
    dest.mkdir()
    for name in sorted(os.listdir(src), key=lambda n: n != _MANIFEST):
        _rename_folder(src / name, dest / name)
    fsync_dir(dest)
    os.rmdir(src)


def remove_tree(path: str | os.PathLike[str], trash_name: str) -> None:
    """Delete a checkpoint folder so that a crash mid-way never leaves a half-deleted folder
    under its real name: rename it to a temp name first (atomic), then delete."""
    shutil.rmtree(move_to_trash(path, trash_name), ignore_errors=True)


def free_tree(path: str | os.PathLike[str]) -> list[str]:
    """Delete a folder (or file) already out of view; returns the errors met (never raises):
    a file that cannot be unlinked must not stop the others from being freed."""
    failures: list[str] = []

    def note(_func: object, where: str, exc: object) -> None:
        failures.append(f"{where}: {exc[1] if isinstance(exc, tuple) else exc}")  # type: ignore[index]

    if not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures.append(f"{path}: {exc}")
        return failures
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=note)
    else:  # onexc is new in 3.12 (onerror is deprecated there)
        shutil.rmtree(path, onerror=note)
    return failures


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - the OS raises instead
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


class _LocalBlob(base.Blob):
    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self.size = os.fstat(fd).st_size

    def readinto(self, offset: int, dest: memoryview) -> None:
        done, total = 0, len(dest)
        while done < total:
            # Linux caps one read at 0x7ffff000 bytes; positional: threads may share the fd.
            n = os.preadv(self._fd, [dest[done : done + 0x40000000]], offset + done)
            if n == 0:
                raise EOFError(f"ends at byte {offset + done}, expected {offset + total}")
            done += n

    def map(self) -> Any | None:
        if self.size == 0:
            return bytearray()
        # Private + writable only so torch can wrap it without a read-only warning; nothing
        # ever writes to it, so no page is ever copied.
        try:
            mm = mmap.mmap(self._fd, self.size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            # Out of descriptors (mmap dup()s the fd: EMFILE) or of mappings (ENOMEM at
            # vm.max_map_count): the open file is read instead, as from an object store.
            return None
        mm.madvise(mmap.MADV_SEQUENTIAL)
        return mm

    def lease(self) -> Callable[[], None] | None:
        """A read lease on the open file (Linux ``F_SETLEASE``; no library offers one): a
        truncate or open-for-writing of it by anyone is then held back by the kernel until
        this blob is closed (at most ``/proc/sys/fs/lease-break-time``, 45 s by default) and
        shows in ``F_GETLEASE`` at once, which the returned check polls. So a mapping of the
        file is never cut short while it is read: the check raises instead, and the reader
        stops before anything reaches a live tensor. The kernel would also send a signal
        (SIGIO, which kills by default): it is redirected to SIGURG, which is ignored by
        default, and no lease is taken if the program handles SIGURG itself. None where no
        lease can be had (another process has the file open for writing, a file system or
        user that does not allow it): the caller reads instead of mapping."""
        setlease = getattr(fcntl, "F_SETLEASE", None)
        setsig = getattr(fcntl, "F_SETSIG", None)
        getlease = getattr(fcntl, "F_GETLEASE", None)
        if setlease is None or setsig is None or getlease is None:
            return None
        try:
            if signal.getsignal(signal.SIGURG) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                return None
            fcntl.fcntl(self._fd, setsig, signal.SIGURG)
            fcntl.fcntl(self._fd, setlease, fcntl.F_RDLCK)
        except (OSError, ValueError):
            return None
        fd, path = self._fd, self._path

        def check() -> None:
            try:
                held = fcntl.fcntl(fd, getlease) == fcntl.F_RDLCK
            except OSError:
                held = False
            if not held:
                raise errors._LeaseBroken(
                    f"{path}: another process is truncating or writing this file while it is "
                    "being read; the read stopped (nothing read from it reached a live tensor) — "
                    "checkpoint files are never changed after their commit: find what touches "
                    "it, then restore again",
                    path=str(path),
                )

        return check

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _LocalStaging(base.Staging):
    """A temp folder in the run folder; committed by a rename (DESIGN.md §3)."""

    def __init__(self, store: LocalStore, name: str) -> None:
        self.name = name
        self._store = store
        self.path = store.root / name

    def describe(self, fname: str = "") -> str:
        return str(self.path / fname) if fname else str(self.path)

    def write(
        self, fname: str, produce: Callable[[BinaryIO], T], *, size: int | None = None
    ) -> tuple[T, int]:
        path = self.path / base.check_key(fname)
        with open(path, "wb", buffering=0) as f:
            out = produce(f)  # type: ignore[arg-type]
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        return out, size

    def adopt(self, fname: str, path: str | os.PathLike[str]) -> int:
        # Order: the file's bytes durable, then its new name (link(2): EEXIST instead of a
        # silent replace), then the old name gone, then both folder entries durable. A crash
        # in between leaves the .part, or the file under both names (the caller removes the
        # staged one before it adopts again): never a staged file that is not durable.
        src = Path(path)
        dest = self.path / base.check_key(fname)
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "already staged", str(dest))
        try:
            inside = src.resolve().parent.is_relative_to(self.path.resolve())
        except OSError:
            inside = False
        if not inside:  # another file system, maybe: copy it
            return super().adopt(fname, path)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            os.link(src, dest)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links here (some FUSE and FAT file systems): checked above, then rename.
            os.rename(src, dest)
        else:
            os.unlink(src)
        fsync_dir(dest.parent)
        if src.parent != dest.parent:
            fsync_dir(src.parent)
        return size

    # Order: manifest durable, its folder entry durable, then the rename, then the rename
    # durable (the parent folder). A power cut before the rename leaves a temp folder no
    # reader lists; after it, a complete checkpoint.
    def seal(self, manifest_name: str, manifest: bytes) -> None:
        path = self.path / base.check_key(manifest_name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, manifest)
            os.fsync(fd)
        except BaseException:
            # (a full disk cut it short): no partial manifest stays in the staging folder, where
            # a resumed pull would find it and refuse to seal again
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        fsync_dir(self.path)

    def publish(self, final: str) -> None:
        dest = self._store.root / base.check_key(final)
        if os.path.lexists(dest):  # rename(2) would silently replace an empty folder
            raise FileExistsError(errno.EEXIST, "already exists", str(dest))
        os.rename(self.path, dest)
        fsync_dir(dest.parent)

    def abort(self) -> None:
        free_tree(self.path)


def _regular(fd: int, path: Path | str) -> None:
    """Raise a typed error unless ``fd`` is a regular file (a FIFO, socket or device blocks a
    reader or never ends: neither is a checkpoint's file)."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise errors.StorageError(
            f"{path} is not a regular file (a named pipe, socket or device); savegame reads "
            "checkpoints from files: copy it into a file first",
            path=str(path),
        )


class LocalStore(base.Store):
    """A folder on the local file system: fsync for durability, rename for atomicity, flock
    for the writer lock."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _p(self, key: str) -> Path:
        return self.root / base.check_key(key) if key else self.root

    def describe(self, key: str = "") -> str:
        return str(self._p(key))

    def local_path(self, key: str = "") -> Path | None:
        return self._p(key)

    def list(self, prefix: str = "") -> list[base.Entry]:
        with os.scandir(self._p(prefix)) as it:
            return [base.Entry(e.name, e.is_dir()) for e in it]

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def is_dir(self, key: str) -> bool:
        return self._p(key).is_dir()

    def size(self, key: str) -> int:
        return self._p(key).stat().st_size

    def mtime(self, key: str) -> float | None:
        try:
            return self._p(key).stat().st_mtime
        except OSError:
            return None

    def version(self, key: str) -> Hashable | None:
        try:
            st = os.stat(self._p(key))
        except OSError:
            return None
        # ctime too: it moves on every write and rename, and cannot be set back by a user
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def du(self, key: str) -> int:
        path = self._p(key)
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):  # a blob (os.walk below only walks folders)
                return st.st_size
        total = 0
        for dirpath, _, files in os.walk(path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def open(self, key: str) -> base.Blob:
        path = self._p(key)
        # O_NONBLOCK: a named pipe in a run folder (hostile, or a stale one) opens at once
        # instead of waiting forever for a writer; it is then refused as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            _regular(fd, path)
            os.set_blocking(fd, True)
            return _LocalBlob(fd, path)
        except BaseException:
            os.close(fd)
            raise

    def put(self, key: str, data: bytes) -> None:
        atomic_write(self._p(key), data)

    def create(self, key: str, data: bytes) -> None:
        # Write a temp file, then link(2) it to the key: link fails with EEXIST when the key
        # exists, so exactly one creator wins and the key never holds a partial blob.
        path = self._p(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        fsync_dir(path.parent)

    def makedirs(self, key: str = "") -> None:
        self._p(key).mkdir(parents=True, exist_ok=True)

    def detach(self, key: str, trash: str | None) -> Callable[[], list[str]]:
        base.check_name(key)
        if trash is None:
            path = self._p(key)
            return lambda: free_tree(path)
        moved = move_to_trash(self._p(key), base.check_name(trash))
        return lambda: free_tree(moved)

    def rename(self, key: str, new_key: str) -> None:
        src, dest = self._p(base.check_name(key)), self._p(base.check_name(new_key))
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "already exists", str(dest))
        _rename_folder(src, dest)
        fsync_dir(dest.parent)

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        (self.root / base.check_name(name)).mkdir()
        return _LocalStaging(self, name)

    def staging(self, name: str) -> base.Staging:
        staging = _LocalStaging(self, base.check_key(name))
        if not staging.path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such staging folder", str(staging.path))
        return staging

    def lock(self, name: str) -> RunLock:
        if "/" in base.check_name(name):
            raise ValueError(f"invalid lock name {name!r}: a file name in the store's folder")
        return RunLock(self.root, name)


def _process_identity(pid: int) -> str | None:
    """Who process ``pid`` is, for as long as it lives: the boot it runs in and its start time
    (``/proc``; a pid reused later, or the same number in another container's pid namespace,
    has another start time). None where there is no ``/proc`` or no such process."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat_line = f.read()
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip().decode("ascii")
        # field 22, counted after the command name in parentheses (which may hold spaces)
        started = int(stat_line.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    return f"{boot}:{started}"


def _recorded_holder_lives(fd: int) -> bool:
    """Whether the lock file's record (written by :meth:`RunLock.acquire`, emptied by
    :meth:`RunLock.release`) names a process of this machine that is still alive — the very
    process, not a later one with its number — and, when that is this process, whether one of
    its own locks holds it now."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        pid, process = info["pid"], info["process"]
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(process, str):
            return False
    except (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError):
        return False  # empty (released), unreadable, or written by an older savegame
    if pid <= 0 or _process_identity(pid) != process:
        return False  # gone (killed: its flock went with it), or never of this machine
    if pid == os.getpid():
        return info.get("nonce") in _HELD_NONCES  # this process holds it, through another path
    return True


#: The record ``nonce`` of each run lock this process holds (see above).
_HELD_NONCES: set[str] = set()


# fds of held locks. A forked child (a DataLoader worker) shares the parent's open file
# description and with it the flock, so after a SIGKILL of the trainer its orphaned workers
# would keep the run folder locked until they notice; children close their copies at fork.
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)  # never LOCK_UN here: that would unlock the parent's lock too
    _HELD_FDS.clear()
    _HELD_NONCES.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """Exclusive writer lock on a run folder.

    Uses ``flock`` on ``<run>/.lock``: the kernel drops it when the holder dies (``kill -9``,
    OOM, power cut), so a crashed writer never leaves it stuck; forked children (loader
    workers) do not keep it. The file also records who holds it, for the error message. On
    file systems without working ``flock`` (some NFS setups) the lock is advisory per host;
    run one writer per run folder there.
    """

    def __init__(self, root: str | os.PathLike[str], name: str = ".lock") -> None:
        self.path = Path(root) / name
        self._fd: int | None = None
        self._nonce = ""

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            LockedError: another live process holds it.
            StorageError: the lock file cannot be opened (``__cause__`` is the OSError: EACCES,
                EPERM or EROFS mean the folder is not writable by this process).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise errors.StorageError(
                f"cannot open the lock file {self.path}: {exc}; the run folder must be writable to save into it",
                path=self.path,
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _recorded_holder_lives(fd):
                # The kernel granted the flock, yet the process the lock file names is alive
                # and still the one that wrote it. A lock taken through another spelling of
                # the path is not seen on some file systems (exFAT or other FUSE mounts with
                # case-insensitive names: `runs/Exp` and `runs/exp` are different nodes to
                # the kernel): the record decides, or two trainings would write one run.
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise BlockingIOError(errno.EWOULDBLOCK, "held through another path")
        except OSError as exc:
            holder, ours = "", False
            with contextlib.suppress(
                OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError
            ):
                info = json.loads(os.pread(fd, 4096, 0))
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
                pid, host = errors.quoted(info["pid"], 20), errors.quoted(info["host"], 100)
                holder = f"pid {pid} on {host} since {since}"
                ours = info["pid"] == os.getpid() and info["host"] == socket.gethostname()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN) and ours:
                raise errors.LockedError(
                    f"run folder {self.path.parent} is in use by another writer in this same "
                    f"process ({holder}): a Checkpointer that was never closed (an exception skipped "
                    "its close()?); "
                    "close() it first (or use `with sg.Checkpointer(...)`), or use a different folder",
                    path=self.path.parent,
                ) from exc
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise errors.LockedError(
                    f"run folder {self.path.parent} is in use by another writer ({holder or 'unknown'}); "
                    "two trainings must not share a run folder — use a different folder, or stop the other process",
                    path=self.path.parent,
                ) from exc
            raise errors.StorageError(f"could not lock {self.path}: {exc}", path=self.path) from exc
        nonce = uuid.uuid4().hex
        info = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.time(),
                "process": _process_identity(os.getpid()),
                "nonce": nonce,
            }
        )
        # Who holds the lock is only for the message another writer gets: on a full disk the
        # write fails (ENOSPC), and that must not stop a run from resuming from its checkpoints.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        self._fd, self._nonce = fd, nonce
        _HELD_FDS.add(fd)
        _HELD_NONCES.add(nonce)

    def release(self) -> None:
        if self._fd is not None and self._fd not in _HELD_FDS:
            self._fd = None  # a forked child's copy: the fd was closed at the fork (and its
            return  # number may be another file's now); the parent's lock is not ours to drop
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            _HELD_NONCES.discard(self._nonce)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
