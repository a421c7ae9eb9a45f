"""What a whole-checkpoint operation reads: a run folder stands for its newest valid checkpoint,
and any checkpoint (savegame folder or foreign file) opens with its reader. A URL (``s3://``,
``http(s)://``, … — not ``file://``, which is a path) or a store :class:`Location` names a
savegame run or checkpoint in a store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from savegame import api, errors
from savegame.interop import base, detect
from savegame.storage import Location, urls

__all__ = ["candidates", "open_any"]

Source = str | os.PathLike[str] | Location


def _remote(path: Source) -> bool:
    return isinstance(path, Location) or (urls.is_url(path) and not urls.is_file_url(str(path)))


def _local(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    if isinstance(path, str) and urls.is_file_url(path):
        return urls.file_path(path)
    return path


def candidates(path: Source) -> list[Source]:
    """A run folder stands for its valid checkpoints, newest first; anything else for itself."""
    from savegame.engine import reader

    if _remote(path):
        return _remote_candidates(path)
    path = _local(path)
    p = Path(path)
    if not p.is_dir() or reader.is_checkpoint_dir(p) or (p / "checkpoint").is_file():
        return [path]
    refs = reader.list_checkpoints(p)
    if not refs:
        return [path]  # not a run: let the format detection say what it is
    valid = [r.path for r in reversed(refs) if r.valid]
    if not valid:
        raise errors.CheckpointNotFoundError(
            f"{p} is a run folder without a valid checkpoint; run `savegame ls {p}` to see why",
            path=p,
        )
    return list(valid)


def _remote_candidates(src: str | os.PathLike[str] | Location) -> list[Source]:
    from savegame.engine import reader
    from savegame.storage import as_store, locate

    if isinstance(src, Location):
        loc = src
        store = src.store if not src.key else None
    else:
        # The URL as typed first: a bad one (scheme, bucket, port) is named in its error as
        # typed, not as the parent folder locate() opens to tell a checkpoint from a run.
        store = as_store(str(src))
        loc = locate(str(src))
    if reader.is_checkpoint_dir(loc):
        return [loc]
    store = store or as_store(str(src))
    shown = store.describe()
    refs = reader.list_checkpoints(store)
    if not refs:
        raise errors.CheckpointNotFoundError(
            f"{shown}: no savegame checkpoint or run there (only savegame checkpoints are read "
            "from a URL; download a foreign file first)",
            path=shown,
        )
    valid = [r.location for r in reversed(refs) if r.valid]
    if not valid:
        raise errors.CheckpointNotFoundError(
            f"{shown} is a run folder without a valid checkpoint; run `savegame ls {shown}` to "
            "see why",
            path=shown,
        )
    return list(valid)


def open_any(src: Source, cfg: str | os.PathLike[str] | None = None, **options: Any) -> base.Reader:
    """Open ``src`` with the matching reader, savegame folders included (``options`` as for
    :func:`savegame.interop.detect.open`)."""
    if isinstance(src, Location):
        return api.open(src)
    if _remote(src):
        (first,) = _remote_candidates(src)[:1]
        return api.open(first)
    p = os.fspath(_local(src))
    if detect.detect(p) == "savegame":
        return api.open(p)
    if cfg is not None:
        options["cfg"] = cfg
    return detect.open(p, **options)
