"""Whole-checkpoint functions: save a state tree, load it back, open any checkpoint lazily.

``save``/``load`` work on one checkpoint folder (no run, no retention): the building blocks of
``savegame convert`` and of users who manage their own folders. ``open`` reads savegame
checkpoints and every foreign format (through :mod:`savegame.interop`), lazily and safely.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from savegame import errors
from savegame import tree as treelib
from savegame.engine import reader, writer
from savegame.format import manifest
from savegame.interop import base

__all__ = ["SavegameReader", "load", "open", "save"]


def save(
    path: str | os.PathLike[str],
    tree: Mapping[str, Any],
    *,
    step: int = 0,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write ``tree`` (tensors and plain values, nested) as one checkpoint folder at ``path``.

    The folder appears atomically, complete, or not at all.

    Raises:
        StepExistsError: ``path`` already exists.
        EncodeError: a leaf cannot be stored without pickle (the message names its path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise errors.StepExistsError(f"{path} already exists; choose a new path", path=path, step=step)
    return writer.write_checkpoint(
        path.parent,
        step,
        dict(tree),
        run_id=uuid.uuid4().hex,
        metrics=metrics,
        info={"reason": "save"},
        final=path,
    )


def load(path: str | os.PathLike[str], *, rank: int = 0) -> Any:
    """Read a whole savegame checkpoint folder back as a state tree of CPU tensors (verified)."""
    m = reader.read_manifest(path)
    if not 0 <= rank < m.world_size:
        raise errors.CheckpointNotFoundError(f"{path} has ranks 0..{m.world_size - 1}, not {rank}", path=path)
    return treelib.decode(m.trees[rank], reader.load_tensors(path, m))


class SavegameReader:
    """Lazy, read-only access to one savegame checkpoint (the :class:`ForeignReader` contract)."""

    format = "savegame"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.manifest = reader.read_manifest(path)

    def keys(self) -> list[str]:
        return list(self.manifest.tensors)

    def info(self, name: str) -> base.TensorInfo:
        e = self._entry(name)
        return base.TensorInfo(name, e.dtype, e.shape, sum(c.length for c in e.chunks))

    def read(self, name: str) -> torch.Tensor:
        self._entry(name)
        return reader.load_tensors(self.path, self.manifest, [name])[name]

    def tree(self) -> Any:
        refs = {k: base.TensorRef(k) for k in self.manifest.tensors}
        return treelib.decode(self.manifest.trees[0], refs)  # type: ignore[arg-type]

    def metadata(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "step": m.step,
            "created": m.created,
            "world_size": m.world_size,
            "run_id": m.run_id,
            "metrics": dict(m.metrics),
            "info": dict(m.info),
            "versions": dict(m.versions),
        }

    def verify(self) -> list[str]:
        return reader.verify(self.path)

    def close(self) -> None:
        pass

    def __enter__(self) -> SavegameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, name: str) -> manifest.TensorEntry:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(f"{self.path}: no tensor named {name!r}", path=self.path, key=name) from None


def open(path: str | os.PathLike[str], **options: Any) -> Any:  # noqa: A001 - the public verb
    """Open any checkpoint lazily: a savegame checkpoint folder, or a foreign file (torch,
    safetensors, TensorFlow, Keras, darknet — pass ``cfg=`` —, numpy), detected from its bytes.

    Raises:
        UnsupportedFormatError: the format is not recognised (the message lists those that are).
    """
    if reader.is_checkpoint_dir(path):
        return SavegameReader(path)
    from savegame.interop import detect

    return detect.open(path, **options)

