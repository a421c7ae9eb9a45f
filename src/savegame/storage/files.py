"""Whole files and folders published under their final names on the local file system.

Invariant: an output appears complete under its final name or not at all. It is written under a
temporary name in the same folder (a rename never crosses file systems), its bytes are fsynced,
it is renamed into place, and then the folder is fsynced, so a crash leaves the old state or the
new one. A failure removes the temporary and only the folders made for it, never anything it did
not create. ``savegame.tools`` (convert) publishes through here: nothing above ``storage``
renames, fsyncs or deletes files itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from savegame.storage.local import fsync_dir

__all__ = [
    "discard",
    "make_parents",
    "open_plain",
    "publish_dir",
    "publish_file",
    "remove_created",
    "replace_unsynced",
    "sync_file",
    "temp_dir_beside",
    "temp_path_beside",
]


def make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_created(created: list[Path]) -> None:
    """Undo :func:`make_parents` after a failure: only folders we created, only while empty
    (another process may have put something there meanwhile)."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return


def publish_file(out: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace the file ``out`` with what ``write(f)`` writes, atomically and durably.

    The file gets the permissions of an ordinary new file (``0666`` less the umask), not the
    ``0600`` of a temporary. If ``write`` or any step after it fails, the temporary is removed
    and ``out`` is untouched.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{_stem(out.name)}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the output is an ordinary file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


def _stem(name: str, limit: int = 180) -> str:
    """``name`` cut to ``limit`` bytes for a temporary's name built from it: a name the file
    system accepts (255 bytes: 80 CJK characters and ``.safetensors``) plus a dot and a random
    tag would not be (ENAMETOOLONG). A cut mid-character keeps its bytes (surrogateescape)."""
    raw = os.fsencode(name)
    return name if len(raw) <= limit else os.fsdecode(raw[:limit])


def temp_path_beside(out: Path, tag: str = "tmp") -> Path:
    """A fresh name in ``out``'s folder for an output to be built and then published (nothing
    is created)."""
    return out.parent / f".{_stem(out.name)}.{tag}-{uuid.uuid4().hex}"


@contextmanager
def temp_dir_beside(out: Path) -> Iterator[Path]:
    """A temporary folder in ``out``'s folder, removed with whatever is left in it on exit."""
    with tempfile.TemporaryDirectory(prefix=f".{_stem(out.name)}.", dir=out.parent) as tmp:
        yield Path(tmp)


def publish_dir(tmp: Path, out: Path, *, replace: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``out`` (same folder) and make it durable.

    ``replace=True`` and an existing ``out``: the old one is first renamed aside, then the new
    one into place, then the old one deleted — so ``out`` is never missing for longer than
    between two renames, and never half-deleted.
    """
    if replace and out.exists():
        old = temp_path_beside(out, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        discard(old)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def discard(path: Path) -> None:
    """Delete a file or folder tree that is no longer referenced (best effort for folders)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


def open_plain(path: Path, flags: int) -> int:
    """``os.open`` of a working file in a folder savegame owns (a download's ``.part``), never
    through a link and never of a pipe or device: such an entry is removed first (a link could
    point outside the folder, and writing through it would write there; opening a pipe would
    block forever), and one that appears in between fails the open (``O_NOFOLLOW``, then the
    type of the open file is checked). A folder there fails the open."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.unlink(path)
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_unsynced(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` whole: written under ``<path>.tmp`` (:func:`open_plain`),
    then renamed over it, so a process killed mid-write leaves the previous content. Not
    fsynced: for bookkeeping whose loss after a power cut is caught by a hash (a download's
    sidecar); a leftover ``.tmp`` is the caller's to sweep."""
    tmp = path.with_name(path.name + ".tmp")
    with open(open_plain(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
        f.write(data)  # buffered: writes all of it or raises
    os.replace(tmp, path)


def sync_file(path: Path) -> None:
    """fsync the regular file ``path`` (not through a link): bytes just checked from the page
    cache become the disk's."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
