"""Where bytes go: the :class:`~savegame.storage.base.Store` interface that owns the commit,
a local POSIX folder (:mod:`.local`), an in-memory store (:mod:`.memory`) and a store that
fails on purpose for crash tests (:mod:`.faulty`). Nothing outside this package renames,
fsyncs or deletes checkpoint data.
"""

from __future__ import annotations

import os
from pathlib import Path

from savegame import errors
from savegame.storage.base import Blob, Entry, Location, Lock, Staging, Store

__all__ = ["Blob", "Entry", "Location", "Lock", "Staging", "Store", "as_store", "locate"]


def as_store(root: str | os.PathLike[str] | Store) -> Store:
    """The store of a run: a :class:`Store` as is, a path or ``file://`` URL as a local folder.

    Raises:
        StorageError: a URL of a scheme this version cannot reach.
    """
    if isinstance(root, Store):
        return root
    from savegame.storage.local import LocalStore

    if isinstance(root, str) and "://" in root:
        scheme, _, rest = root.partition("://")
        if scheme == "file":
            return LocalStore(rest)
        raise errors.StorageError(
            f"{scheme}:// is not supported by this version of savegame; use a local folder "
            "(or a Store object)",
            path=scheme + "://",
        )
    return LocalStore(root)


def locate(where: str | os.PathLike[str] | Location) -> Location:
    """A checkpoint (or any key) as a :class:`Location`: a local path ``.../step-N`` becomes
    the key ``step-N`` in a local store of its parent folder (so it can be set aside there)."""
    if isinstance(where, Location):
        return where
    from savegame.storage.local import LocalStore

    path = Path(where)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if not path.name:  # the file-system root
        return Location(LocalStore(path), "")
    return Location(LocalStore(path.parent), path.name)
