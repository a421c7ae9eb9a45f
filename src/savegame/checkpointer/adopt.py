"""Adopting a foreign checkpoint: read it safely and load the mapped parts into live objects.

Invariant: the source is read through :func:`savegame.open` (torch files through the restricted
unpickler, never ``torch.load``); a mapping that names a path the file does not have is a
:class:`~savegame.errors.CheckpointNotFoundError`, an object refusing its part a
:class:`~savegame.errors.RestoreError`. :meth:`Checkpointer.adopt` then saves the result as a
step of the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from savegame import errors
from savegame import state as statelib

__all__ = ["load_foreign"]


def load_foreign(
    source: str | os.PathLike[str],
    state: statelib.TrainState,
    *,
    mapping: Mapping[str, str],
    metrics: Mapping[str, str] | None,
    cfg: str | None,
    partial: bool,
) -> dict[str, float]:
    """Load ``source``'s mapped parts into ``state`` (see :meth:`Checkpointer.adopt`) and return
    the metric values it names (name -> float).

    Every path is read and every metric checked before the first object is loaded, so a wrong
    mapping leaves the live objects as they were (an object refusing its part still may not).
    ``source`` may be a folder of files (a Hugging Face ``checkpoint-N/``): then each path's
    first part names a file in it (``"optimizer.pt/state"``)."""
    options: dict[str, Any] = (
        {"cfg": cfg, "partial": True} if cfg and partial else {"cfg": cfg} if cfg else {}
    )
    metrics = metrics or {}
    for dest in mapping:
        name = dest.partition("/")[0]
        if name not in state:
            raise errors.RestoreError(
                f"adopt: the TrainState has no {name!r} (mapping {dest!r})", path=source
            )
    with _Sources(source, [*mapping.values(), *metrics.values()], options) as src:
        values = {dest: src.get(path) for dest, path in mapping.items()}
        numbers = {k: _number(src.get(v), k, v, source) for k, v in metrics.items()}
        for dest, value in values.items():
            name, _, entry = dest.partition("/")
            obj = state[name]
            try:
                if entry:
                    obj[entry] = value
                else:
                    obj.load_state_dict(value)
            except (TypeError, KeyError, ValueError, RuntimeError) as exc:
                raise errors.RestoreError(
                    f"adopt {source}: loading {mapping[dest]!r} into {dest!r} failed: "
                    f"{type(exc).__name__}: {exc}",
                    path=source,
                    key=dest,
                ) from exc
        return numbers


def _number(value: Any, metric: str, path: str, source: Any) -> float:
    """A metric's value as a float (a number, or a tensor or array of one element)."""
    try:
        if isinstance(value, (str, bytes, Mapping, list, tuple)):
            raise TypeError(type(value).__name__)
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        shown = f"a {type(value).__name__}"
        shape = getattr(value, "shape", None)
        if shape is not None:
            shown += f" of shape {list(shape)}"
        elif isinstance(value, (str, bytes)):
            shown += f" {value[:40]!r}"
        raise errors.RestoreError(
            f"adopt {source}: metric {metric!r} ({path!r}) is {shown}, not a number; name a "
            "number or a one-element tensor in the file",
            path=source,
            key=metric,
        ) from exc


class _Sources:
    """The tree(s) mapping paths are read from: one file, or the files of a folder (a path's
    first part names the file). Readers are opened once and closed together."""

    def __init__(self, source: Any, paths: list[str], options: dict[str, Any]) -> None:
        self.source = source
        self.options = options
        self.readers: dict[str, Any] = {}
        self.trees: dict[str, Any] = {}
        self.folder = _is_folder_of_files(source, paths)

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.readers.values():
            r.close()

    def _reader(self, name: str) -> Any:
        from savegame import api

        if name not in self.readers:
            where = os.path.join(self.source, name) if name else self.source
            self.readers[name] = api.open(where, **self.options)
            self.trees[name] = self.readers[name].tree()
        return self.readers[name]

    def get(self, path: str) -> Any:
        parts = path.split("/") if path else []
        if self.folder:
            name, parts = parts[0], parts[1:]
            where = os.path.join(self.source, name)
        else:
            name, where = "", self.source
        r = self._reader(name)
        node: Any = self.trees[name]
        for part in parts:
            if isinstance(node, Mapping):
                # optimizer state dicts key by int: "state/0" means node[0]
                key: Any = int(part) if part not in node and part.isdigit() else part
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                key = int(part)
            else:
                raise errors.CheckpointNotFoundError(
                    f"{where}: no {path!r} in the file", path=where, key=path
                )
            try:
                node = node[key]
            except (KeyError, IndexError):
                raise errors.CheckpointNotFoundError(
                    f"{where}: no {path!r} in the file", path=where, key=path
                ) from None
        return _resolve(node, r)


def _is_folder_of_files(source: Any, paths: list[str]) -> bool:
    """A folder that is not itself a checkpoint savegame opens whole (savegame's own, a
    TensorFlow one), and whose every path starts with the name of a file directly in it."""
    from savegame.engine import reader

    if not os.path.isdir(source) or reader.is_checkpoint_dir(source):
        return False
    names = {p.split("/", 1)[0] for p in paths}
    return bool(names) and all(
        n not in ("", ".", "..") and os.path.isfile(os.path.join(source, n)) for n in names
    )


def _resolve(node: Any, rd: Any) -> Any:
    from savegame.interop import base

    if isinstance(node, base.TensorRef):
        return rd.read(node.name)
    if isinstance(node, Mapping):
        return {k: _resolve(v, rd) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, rd) for v in node]
    if isinstance(node, tuple):
        return tuple(_resolve(v, rd) for v in node)
    return node
