"""Local POSIX storage primitives: durable writes, atomic renames, and the writer lock.

Invariant: a rename is only trusted after the parent directory is fsynced, and a file is only
renamed into place after its own bytes are fsynced — the order that makes a power cut leave
either the old state or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from savegame import errors

__all__ = ["RunLock", "atomic_write", "fsync_dir", "move_to_trash", "remove_tree"]


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
    os.rename(path, trash)
    fsync_dir(path.parent)
    return trash


def remove_tree(path: str | os.PathLike[str], trash_name: str) -> None:
    """Delete a checkpoint folder so that a crash mid-way never leaves a half-deleted folder
    under its real name: rename it to a temp name first (atomic), then delete."""
    shutil.rmtree(move_to_trash(path, trash_name), ignore_errors=True)


# fds of held locks. A forked child (a DataLoader worker) shares the parent's open file
# description and with it the flock, so after a SIGKILL of the trainer its orphaned workers
# would keep the run folder locked until they notice; children close their copies at fork.
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)  # never LOCK_UN here: that would unlock the parent's lock too
    _HELD_FDS.clear()


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

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            LockedError: another live process holds it.
            StorageError: the lock file cannot be opened (``__cause__`` is the OSError: EACCES,
                EPERM or EROFS mean the folder is not writable by this process).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise errors.StorageError(
                f"cannot open the lock file {self.path}: {exc}; the run folder must be writable to save into it",
                path=self.path,
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                info = json.loads(os.pread(fd, 4096, 0))
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
                holder = f"pid {info['pid']} on {info['host']} since {since}"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise errors.LockedError(
                    f"run folder {self.path.parent} is in use by another writer ({holder or 'unknown'}); "
                    "two trainings must not share a run folder — use a different folder, or stop the other process",
                    path=self.path.parent,
                ) from exc
            raise errors.StorageError(f"could not lock {self.path}: {exc}", path=self.path) from exc
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        # Who holds the lock is only for the message another writer gets: on a full disk the
        # write fails (ENOSPC), and that must not stop a run from resuming from its checkpoints.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        _HELD_FDS.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
