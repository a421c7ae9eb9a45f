"""What a whole-checkpoint operation reads: a run folder stands for its newest valid checkpoint,
and any checkpoint (savegame folder or foreign file) opens with its reader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from savegame import api, errors
from savegame.interop import base, detect

__all__ = ["candidates", "open_any"]


def candidates(path: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    """A run folder stands for its valid checkpoints, newest first; anything else for itself."""
    from savegame.engine import reader

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


def open_any(
    src: str | os.PathLike[str], cfg: str | os.PathLike[str] | None = None, **options: Any
) -> base.Reader:
    """Open ``src`` with the matching reader, savegame folders included (``options`` as for
    :func:`savegame.interop.detect.open`)."""
    p = os.fspath(src)
    if detect.detect(p) == "savegame":
        return api.open(p)
    if cfg is not None:
        options["cfg"] = cfg
    return detect.open(p, **options)
