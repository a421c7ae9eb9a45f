"""Where bytes go: the :class:`~savegame.storage.base.Store` interface that owns the commit,
a local POSIX folder (:mod:`.local`), an in-memory store (:mod:`.memory`) and a store that
fails on purpose for crash tests (:mod:`.faulty`). Nothing outside this package renames,
fsyncs or deletes checkpoint data.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from savegame.storage import urls
from savegame.storage.base import Blob, Entry, Location, Lock, Staging, Store

__all__ = ["Blob", "Entry", "Location", "Lock", "Staging", "Store", "as_store", "locate"]


def as_store(root: str | os.PathLike[str] | Store) -> Store:
    """The store of a run: a :class:`Store` as is, a path or ``file://`` URL as a local folder,
    an ``s3://``, ``gs://``, ``az://``, ``http(s)://`` or ``memory://`` URL as an
    :class:`~savegame.storage.objectstore.ObjectStore` (docs/remote.md).

    Raises:
        UnsupportedURLError: a URL of a scheme savegame cannot reach (the message lists them).
        CredentialsError: credentials in the URL that the store cannot use.
        MissingDependencyError: obstore is not installed (``pip install 'savegame[remote]'``).
    """
    if isinstance(root, Store):
        return root
    from savegame.storage.local import LocalStore

    if isinstance(root, str) and urls.is_url(root):
        if urls.is_file_url(root):
            return LocalStore(urls.file_path(root))
        from savegame.storage.objectstore import ObjectStore

        return ObjectStore(urls.connect(root))
    return LocalStore(root)


def locate(where: str | os.PathLike[str] | Location) -> Location:
    """A checkpoint (or any key) as a :class:`Location`: a local path ``.../step-N`` becomes
    the key ``step-N`` in a local store of its parent folder (so it can be set aside there);
    a URL ``s3://b/run/step-N`` the key ``step-N`` in the store of ``s3://b/run``."""
    if isinstance(where, Location):
        return where
    from savegame.storage.local import LocalStore

    if isinstance(where, str) and urls.is_url(where) and not urls.is_file_url(where):
        parts = urlsplit(where)
        path = parts.path.rstrip("/")
        if "/" not in path.strip("/"):  # a bucket (or a bucket's first level): no parent key
            name = path.strip("/")
            if not name:
                return Location(as_store(where), "")
            parent_url = urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))
            return Location(as_store(parent_url), name)
        parent, _, name = path.rpartition("/")
        parent_url = urlunsplit((parts.scheme, parts.netloc, parent, parts.query, ""))
        return Location(as_store(parent_url), name)
    if isinstance(where, str) and urls.is_file_url(where):
        where = urls.file_path(where)
    path = Path(where)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if not path.name:  # the file-system root
        return Location(LocalStore(path), "")
    return Location(LocalStore(path.parent), path.name)
