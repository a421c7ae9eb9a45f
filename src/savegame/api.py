"""Whole-checkpoint functions: save a state tree, load it back, open any checkpoint lazily.

``save``/``load`` work on one checkpoint folder (no run, no retention): the building blocks of
``savegame convert`` and of users who manage their own folders. ``open`` reads savegame
checkpoints and every foreign format (through :mod:`savegame.interop`), lazily and safely, and
always returns a :class:`savegame.Reader`. Operations over whole checkpoints (``convert``,
``diff``) live above this module, in :mod:`savegame.tools`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from savegame import errors
from savegame.interop import base
from savegame.storage import Location  # torch-free: open() accepts a store location

if TYPE_CHECKING:
    import torch

    from savegame.format import manifest


# The modules for savegame's own folders (engine.reader and the manifest code, storage; tree and
# engine.writer, which import torch) are imported by the functions that use them, so that
# ``open`` of a foreign file, its listing and ``verify()`` import neither them nor torch
# (issue 9.18).

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
        TypeError: ``tree`` is not a mapping (a module: pass its ``state_dict()``), or
            ``step`` is not an int.
    """
    from savegame.engine import writer
    from savegame.format import layout

    if not isinstance(tree, Mapping):
        hint = " (pass model.state_dict())" if hasattr(tree, "state_dict") else ""
        raise TypeError(
            f"sg.save takes a mapping of names to tensors and plain values{hint}, got "
            f"{type(tree).__name__}; e.g. sg.save(path, {{'model': model.state_dict(), 'step': 10}})"
        )
    layout.step_dir(step)  # a TypeError/ValueError saying what a step is
    step = int(step)
    if metrics is not None and not isinstance(metrics, Mapping):
        raise errors.EncodeError(
            f"metrics must be a mapping of name -> number, got {type(metrics).__name__}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise errors.StepExistsError(
            f"{path} already exists; choose a new path", path=path, step=step
        )
    return writer.write_checkpoint(
        path.parent,
        step,
        dict(tree),
        run_id=uuid.uuid4().hex,
        metrics=metrics,
        info={"reason": "save"},
        final=path,
    )


def load(path: str | os.PathLike[str] | Location, *, rank: int = 0) -> Any:
    """Read a whole savegame checkpoint folder (a path, a URL such as ``s3://b/run/step-…``, or
    a store location) back as a state tree of CPU tensors (verified)."""
    from savegame import tree as treelib
    from savegame.engine import reader
    from savegame.storage import locate

    loc = locate(path)
    where = str(loc)
    m = _manifest_of(loc)
    if not 0 <= rank < m.world_size:
        raise errors.CheckpointNotFoundError(
            f"{where} has ranks 0..{m.world_size - 1}, not {rank}", path=where
        )
    return treelib.decode(m.trees[rank], reader.load_tensors(loc, m), path=where)


def _manifest_of(loc: Location) -> manifest.Manifest:
    """The checkpoint's manifest; a run folder (the Checkpointer's root) passed instead of one
    of its checkpoints is named as such, not as an interrupted save."""
    from savegame.engine import reader
    from savegame.format import layout
    from savegame.storage import base as storage_base

    try:
        return reader.read_manifest(loc)
    except errors.IncompleteCheckpointError:
        try:
            run = any(
                loc.store.exists(storage_base.join(loc.key, name))
                for name in (layout.RUN_FILE, layout.LATEST)
            )
        except Exception:  # noqa: BLE001 - cannot tell: the original error stands
            run = False
        if not run:
            raise
        raise errors.CheckpointNotFoundError(
            f"{loc} is a run folder (the Checkpointer's root), not a checkpoint: load one of its "
            f"step-… folders (`savegame ls {loc}` lists them; the newest valid one is what "
            "Checkpointer.restore() would use)",
            path=str(loc),
        ) from None


class SavegameReader(base.Reader):
    """Lazy, read-only access to one savegame checkpoint (the :class:`~savegame.Reader` contract).

    Opening reads and checks the manifest only; ``read`` loads (and hash-checks) one tensor.
    The reader holds no open file between calls, so ``close()`` only marks it closed.
    """

    def __init__(self, path: str | os.PathLike[str] | Location) -> None:
        from savegame.storage import locate

        self._loc = locate(path)
        self.path = str(self._loc)
        self.format = "savegame"
        self.manifest = _manifest_of(self._loc)
        self._names = _display_names(self.manifest.tensors)

    def keys(self) -> list[str]:
        self._check_open()
        return list(self._names)

    def info(self, name: str) -> base.TensorInfo:
        self._check_open()
        e = self.manifest.tensors[self._key(name)]
        return base.TensorInfo(name, e.dtype, e.shape, sum(c.length for c in e.chunks))

    def read(self, name: str) -> torch.Tensor:
        from savegame.engine import reader

        self._check_open()
        key = self._key(name)
        return reader.load_tensors(self._loc, self.manifest, [key])[key]

    def tree(self) -> Any:
        from savegame.format import skeleton

        self._check_open()
        refs = {k: base.TensorRef(n) for n, k in self._names.items()}
        return skeleton.decode(self.manifest.trees[0], refs, path=self.path)  # type: ignore[arg-type]

    def metadata(self) -> dict[str, Any]:
        self._check_open()
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

        self._check_open()
        return reader.verify(self._loc)

    def __enter__(self) -> SavegameReader:
        super().__enter__()
        return self

    def _key(self, name: str) -> str:
        """The manifest key of the tensor called ``name`` (its display name, or the key)."""
        key = self._names.get(name)
        if key is None and name in self.manifest.tensors:
            key = name  # the escaped key itself, as older versions listed it
        if key is None:
            raise errors.CheckpointNotFoundError(
                f"{self.path}: no tensor named {name!r}", path=self.path, key=name
            )
        return key


def _display_names(keys: Iterable[str]) -> dict[str, str]:
    """{name: manifest key}. A manifest key is the tensor's path in the saved tree with a "/"
    inside a component escaped (``tree.join_key``): the name unescapes it, so a converted
    Keras/TensorFlow/numpy file keeps its own names ("layers/dense/vars/0", not
    "layers~1dense~1vars~10"), as ``sg.load`` gives them. Where two keys would get the same name
    (a component "a/b" beside a nested a → b), both keep their escaped keys."""
    from savegame.format.skeleton import split_key

    by_name: dict[str, list[str]] = {}
    for key in keys:
        by_name.setdefault("/".join(split_key(key)), []).append(key)
    out: dict[str, str] = {}
    for name, found in by_name.items():
        if len(found) == 1:
            out[name] = found[0]
        else:
            out.update({k: k for k in found})
    return out


def open(  # noqa: A001 - the public verb
    path: str | os.PathLike[str] | Location, *, format: str | None = None, **options: Any
) -> base.Reader:
    """Open any checkpoint lazily: a savegame checkpoint folder, or a foreign file (torch,
    safetensors, TensorFlow, Keras, darknet — pass ``cfg=`` —, numpy), detected from its bytes.

    Keras/HDF5 files are parsed in a small child process by default, because libhdf5 can crash
    or hang on malformed files: that costs about 0.2 s per open and turns a crash into a
    :class:`FormatError`. Options (each ignored by the formats it does not concern):
    ``isolate=False`` parses trusted Keras/HDF5 files in this process instead;
    ``isolate_timeout=`` seconds before a hanging child is killed and the file refused (300);
    ``cfg=`` the Darknet ``.cfg``; ``listing=True`` lists torch files with unknown globals.

    Args:
        path: A savegame checkpoint folder, or a foreign checkpoint (file, TensorFlow prefix
            or folder).
        format: Open ``path`` as this format and skip detection: ``"savegame"`` or a name in
            ``savegame.interop.detect.FORMATS`` (a format added with
            :func:`savegame.register_format` is opened this way).
        **options: The reader options above.

    Returns:
        A :class:`savegame.Reader` (a context manager; close it, or use ``with``).

    Raises:
        UnsupportedFormatError: the format is not recognised (the message lists those that are),
            or ``format`` names no registered format.
        FormatError: the file is damaged (or, isolated, crashed or hung libhdf5).
    """

    from savegame.storage import urls

    if isinstance(path, str) and urls.is_url(path):
        if urls.is_file_url(path):
            path = urls.file_path(path)
        else:  # a checkpoint in a remote store: savegame's own format only
            from savegame.storage import locate

            path = locate(path)
    if isinstance(path, Location):  # e.g. what Checkpointer.save() returns for a non-local store
        if format not in (None, "savegame"):
            raise errors.UnsupportedFormatError(
                f"{path}: only savegame checkpoints are read from a store location", path=str(path)
            )
        return SavegameReader(path)
    if format == "savegame" or (format is None and _is_checkpoint_dir(path)):
        return SavegameReader(path)
    from savegame.interop import detect

    return detect.open(path, format=format, **options)


def _is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """``reader.is_checkpoint_dir``, or a savegame run folder (which the savegame reader then
    names as such: "open one of its step-… folders"); the manifest code is imported for folders
    only (a file is never a checkpoint folder)."""
    if not os.path.isdir(path):
        return False
    from savegame.engine import reader
    from savegame.format import layout

    if reader.is_checkpoint_dir(path):
        return True
    run = any(os.path.isfile(os.path.join(path, n)) for n in (layout.RUN_FILE, layout.LATEST))
    return run and not os.path.isfile(os.path.join(path, "checkpoint"))  # (TensorFlow's index)
