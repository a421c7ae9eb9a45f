"""Whole-checkpoint functions: save a state tree, load it back, open any checkpoint lazily.

``save``/``load`` work on one checkpoint folder (no run, no retention): the building blocks of
``savegame convert`` and of users who manage their own folders. ``open`` reads savegame
checkpoints and every foreign format (through :mod:`savegame.interop`), lazily and safely.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from savegame import errors
from savegame.interop import base

if TYPE_CHECKING:
    import torch

    from savegame.format import manifest
    from savegame.interop.diff import DiffResult

# The modules for savegame's own folders (engine.reader and the manifest code, storage; tree and
# engine.writer, which import torch) are imported by the functions that use them, so that
# ``open`` of a foreign file, its listing and ``verify()`` import neither them nor torch
# (issue 9.18).

__all__ = ["SavegameReader", "convert", "diff", "load", "open", "save"]


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
    from savegame.engine import writer

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
    from savegame import tree as treelib
    from savegame.engine import reader

    m = reader.read_manifest(path)
    if not 0 <= rank < m.world_size:
        raise errors.CheckpointNotFoundError(f"{path} has ranks 0..{m.world_size - 1}, not {rank}", path=path)
    return treelib.decode(m.trees[rank], reader.load_tensors(path, m), path=path)


class SavegameReader:
    """Lazy, read-only access to one savegame checkpoint (the :class:`ForeignReader` contract)."""

    format = "savegame"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from savegame.engine import reader

        self.path = os.fspath(path)
        self.manifest = reader.read_manifest(path)

    def keys(self) -> list[str]:
        return list(self.manifest.tensors)

    def info(self, name: str) -> base.TensorInfo:
        e = self._entry(name)
        return base.TensorInfo(name, e.dtype, e.shape, sum(c.length for c in e.chunks))

    def read(self, name: str) -> torch.Tensor:
        from savegame.engine import reader

        self._entry(name)
        return reader.load_tensors(self.path, self.manifest, [name])[name]

    def tree(self) -> Any:
        from savegame import tree as treelib

        refs = {k: base.TensorRef(k) for k in self.manifest.tensors}
        return treelib.decode(self.manifest.trees[0], refs, path=self.path)  # type: ignore[arg-type]

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
        from savegame.engine import reader

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

    Keras/HDF5 files are parsed in a small child process by default, because libhdf5 can crash
    or hang on malformed files: that costs about 0.2 s per open and turns a crash into a
    :class:`FormatError`. Options (each ignored by the formats it does not concern):
    ``isolate=False`` parses trusted Keras/HDF5 files in this process instead;
    ``isolate_timeout=`` seconds before a hanging child is killed and the file refused (300);
    ``cfg=`` the Darknet ``.cfg``; ``listing=True`` lists torch files with unknown globals.

    Raises:
        UnsupportedFormatError: the format is not recognised (the message lists those that are).
        FormatError: the file is damaged (or, isolated, crashed or hung libhdf5).
    """
    if _is_checkpoint_dir(path):
        return SavegameReader(path)
    from savegame.interop import detect

    return detect.open(path, **options)



def _is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """``reader.is_checkpoint_dir``; the manifest code is imported for folders only (a file is
    never a checkpoint folder)."""
    if not os.path.isdir(path):
        return False
    from savegame.engine import reader

    return reader.is_checkpoint_dir(path)


def _candidates(path: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
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


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Literal["savegame", "safetensors", "torch"],
    cfg: str | os.PathLike[str] | None = None,
    partial: bool = False,
    overwrite: bool = False,
    isolate: bool = True,
) -> Path:
    """Convert any readable checkpoint into a savegame folder, a safetensors file or a
    weights-only torch file, keeping names, dtypes and values bit for bit.

    ``src`` may be a run folder: its newest checkpoint is used, or if that one turns out to be
    damaged, the one before it (with a :class:`CorruptCheckpointWarning`). A checkpoint written by
    several ranks is first consolidated into one rank (sharded tensors reassembled whole; see
    :func:`savegame.distributed.consolidate`), so the output is what an inference user needs.
    ``dst`` appears atomically or not at all; an existing ``dst`` is kept unless ``overwrite``.
    A Keras/HDF5 ``src`` is parsed in a child process (``isolate=False``: in this process, for
    trusted files only).
    ``partial=True`` accepts a darknet ``.weights`` file holding fewer layers than its ``cfg``.
    String tensors (TensorFlow) are kept as ``bytes`` in torch and savegame outputs and left
    out of safetensors with a :class:`LossyConversionWarning` naming them.

    Raises:
        StepExistsError: ``dst`` exists and ``overwrite`` is False.
        UnsupportedFormatError: unknown ``to``, or a tensor the target cannot hold.
        FormatError, IntegrityError: ``src`` is damaged.
    """
    candidates = _candidates(src)
    for i, ckpt in enumerate(candidates):
        try:
            return _convert_one(ckpt, Path(dst), to=to, cfg=cfg, partial=partial, overwrite=overwrite, isolate=isolate)
        except errors.FormatError as exc:  # damaged (every byte is verified while converting)
            if i + 1 == len(candidates):
                raise
            warnings.warn(
                f"skipping checkpoint {ckpt}: {exc}; converting the one before it",
                errors.CorruptCheckpointWarning,
                stacklevel=2,
            )
    raise AssertionError("unreachable: _candidates never returns an empty list")


def _convert_one(
    src: str | os.PathLike[str], out: Path, *, to: str, cfg: Any, partial: bool, overwrite: bool, isolate: bool
) -> Path:
    from savegame.engine import reader
    from savegame.interop import convert as interop_convert

    if not (reader.is_checkpoint_dir(src) and reader.read_manifest(src).world_size > 1):
        return interop_convert.convert(src, out, to=to, cfg=cfg, partial=partial, overwrite=overwrite, isolate=isolate)  # type: ignore[arg-type]
    import tempfile

    from savegame.distributed import consolidate
    from savegame.storage import local

    if out.exists() and not overwrite:
        raise errors.StepExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it", path=out)
    created = interop_convert.make_parents(out.parent)  # removed again if the conversion fails
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            single = consolidate(src, Path(tmp) / "single")
            if to == "savegame" and not out.exists():
                os.replace(single, out)  # consolidate committed it; the rename is the publish step
                local.fsync_dir(out.parent)
                return out
            return interop_convert.convert(single, out, to=to, overwrite=overwrite)  # type: ignore[arg-type]
    except BaseException:
        interop_convert.remove_created(created)
        raise


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    cfg_a: str | os.PathLike[str] | None = None,
    cfg_b: str | os.PathLike[str] | None = None,
    partial: bool = False,
    isolate: bool = True,
) -> DiffResult:
    """Compare the tensors of two checkpoints of any formats (run folders: newest valid manifest).

    Returns a :class:`savegame.interop.diff.DiffResult`: names added and removed, dtype/shape
    changes, the max absolute difference per common tensor, and which are bitwise identical.
    Memory holds one tensor pair at a time. ``partial=True`` accepts darknet ``.weights``
    files holding fewer layers than their cfg.
    """
    from savegame.interop import diff as interop_diff

    return interop_diff.diff(
        _candidates(a)[0], _candidates(b)[0], cfg_a=cfg_a, cfg_b=cfg_b, partial=partial, isolate=isolate
    )
