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
    the metric values it names (name -> float)."""
    from savegame import api
    from savegame.interop import base

    options: dict[str, Any] = (
        {"cfg": cfg, "partial": True} if cfg and partial else {"cfg": cfg} if cfg else {}
    )
    with api.open(source, **options) as r:
        tree = r.tree()

        def get(path: str) -> Any:
            node: Any = tree
            for part in path.split("/") if path else []:
                if isinstance(node, Mapping):
                    # optimizer state dicts key by int: "state/0" means node[0]
                    key: Any = int(part) if part not in node and part.isdigit() else part
                elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                    key = int(part)
                else:
                    raise errors.CheckpointNotFoundError(
                        f"{source}: no {path!r} in the file", path=source, key=path
                    )
                try:
                    node = node[key]
                except (KeyError, IndexError):
                    raise errors.CheckpointNotFoundError(
                        f"{source}: no {path!r} in the file", path=source, key=path
                    ) from None
            return _resolve(node, r)

        def _resolve(node: Any, rd: Any) -> Any:
            if isinstance(node, base.TensorRef):
                return rd.read(node.name)
            if isinstance(node, Mapping):
                return {k: _resolve(v, rd) for k, v in node.items()}
            if isinstance(node, list):
                return [_resolve(v, rd) for v in node]
            if isinstance(node, tuple):
                return tuple(_resolve(v, rd) for v in node)
            return node

        for dest, src in mapping.items():
            name, _, entry = dest.partition("/")
            if name not in state:
                raise errors.RestoreError(
                    f"adopt: the TrainState has no {name!r} (mapping {dest!r})", path=source
                )
            obj = state[name]
            value = get(src)
            try:
                if entry:
                    obj[entry] = value
                else:
                    obj.load_state_dict(value)
            except (TypeError, KeyError, ValueError, RuntimeError) as exc:
                raise errors.RestoreError(
                    f"adopt {source}: loading {src!r} into {dest!r} failed: {type(exc).__name__}: {exc}",
                    path=source,
                    key=dest,
                ) from exc
        return {k: float(get(v)) for k, v in (metrics or {}).items()}
