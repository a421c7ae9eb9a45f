"""Flatten a state tree into tensors plus a tagged-JSON skeleton, and back. No pickle, ever.

A *state tree* is nested dicts / lists / tuples whose leaves are tensors, numpy arrays or plain
values. :func:`encode` turns it into a JSON-compatible *skeleton* in which every tensor is
replaced by ``{"$tensor": "<key>"}`` and returns the tensors by key; :func:`decode` inverts it.

Invariant: ``decode(*encode(tree))`` equals ``tree`` leaf for leaf, with exact types (tuple stays
tuple, int dict keys stay ints, ints above 2**53 stay exact, nan/inf survive), and anything that
cannot be represented raises :class:`~savegame.errors.EncodeError` naming its path — we never fall
back to pickle (ANCHORS #6: pickled numpy objects broke ``weights_only`` loading for everyone).

Tags (a dict whose single key starts with ``$``)::

    {"$tensor": key}            torch.Tensor          {"$ndarray": key}   numpy.ndarray
    {"$tuple": [...]}           tuple                 {"$set": [...]}     set (sorted if possible)
    {"$dict": [[k, v], ...]}    dict with non-str keys, or str keys that start with "$"
    {"$float": "nan"|"inf"|"-inf"}                    {"$int": "123..."}  |int| > 2**53
    {"$bytes": base64}          bytes                 {"$np": [dtype, value]} numpy scalar
    {"$dtype": "float32"}       torch.dtype           {"$device": "cuda:0"} torch.device
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savegame import errors

__all__ = ["decode", "encode", "join_key", "split_key"]

JSON_SAFE_INT = 2**53
_MAX_DEPTH = 200

Skeleton = Any  # JSON-compatible value


def join_key(parts: list[str]) -> str:
    """Join path components with "/"; "~" and "/" inside a component are escaped (JSON-pointer style)."""
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def split_key(key: str) -> list[str]:
    """Inverse of :func:`join_key`."""
    return [p.replace("~1", "/").replace("~0", "~") for p in key.split("/")]


def _key_part(k: object) -> str:
    return str(k)


def encode(tree: Any) -> tuple[Skeleton, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON skeleton and ``{key: tensor}``.

    Keys are the "/"-joined paths of the tensors in the tree, so they are stable across saves
    and readable in ``savegame show`` and ``safetensors.safe_open``. numpy arrays are stored as
    tensors and come back as numpy arrays.

    Raises:
        EncodeError: a leaf is not a tensor, numpy value or plain Python value; the message
            names its path and type.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, [], tensors, 0)
    return skeleton, tensors


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], depth: int) -> Skeleton:
    if depth > _MAX_DEPTH:
        raise errors.EncodeError(
            f"state tree is nested deeper than {_MAX_DEPTH} levels at {join_key(path)!r}; "
            "is there a reference cycle?",
            key=join_key(path),
        )
    # numpy scalars before float: np.float64 is a subclass of float and would lose its type.
    if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
        if obj.dtype.kind not in "biuf":
            raise errors.EncodeError(
                f"numpy scalar at {join_key(path)!r} has dtype {obj.dtype}; cannot store it",
                key=join_key(path),
            )
        item = obj.item()
        return {"$np": [obj.dtype.str, _encode(item, path, tensors, depth + 1)]}
    # bool before int: bool is a subclass of int.
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        value = int(obj)
        if abs(value) > JSON_SAFE_INT:
            return {"$int": str(value)}
        return value
    if isinstance(obj, float):
        if math.isnan(obj):
            return {"$float": "nan"}
        if math.isinf(obj):
            return {"$float": "inf" if obj > 0 else "-inf"}
        return float(obj)
    if isinstance(obj, torch.Tensor):
        key = join_key(path) if path else "$root"
        if key in tensors:
            raise errors.EncodeError(f"two tensors map to the same key {key!r}", key=key)
        tensors[key] = obj
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or obj.dtype.kind not in "biufc":
            raise errors.EncodeError(
                f"numpy array at {join_key(path)!r} has dtype {obj.dtype}, which cannot be stored "
                "without pickle; convert it to a numeric array or a list",
                key=join_key(path),
            )
        key = join_key(path) if path else "$root"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"$ndarray": key}
    if isinstance(obj, bytes):
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    if isinstance(obj, tuple):
        # torch.Size and namedtuples come back as plain tuples.
        return {"$tuple": [_encode(v, [*path, str(i)], tensors, depth + 1) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, [*path, str(i)], tensors, depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        items = list(obj)
        try:
            items.sort()
        except TypeError:
            pass
        return {"$set": [_encode(v, [*path, str(i)], tensors, depth + 1) for i, v in enumerate(items)]}
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("$") for k in obj)
        if plain:
            return {k: _encode(v, [*path, k], tensors, depth + 1) for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                raise errors.EncodeError(
                    f"dict at {join_key(path)!r} has a key of type {type(k).__name__}; "
                    "only str, int, float, bool, None and tuples of them can be stored",
                    key=join_key(path),
                )
            pairs.append([_encode(k, path, {}, depth + 1), _encode(v, [*path, _key_part(k)], tensors, depth + 1)])
        return {"$dict": pairs}
    raise errors.EncodeError(
        f"cannot store {type(obj).__module__}.{type(obj).__qualname__} at "
        f"{join_key(path) or '<root>'!r} without pickle; give the object state_dict()/"
        "load_state_dict() returning tensors and plain values (see savegame.Stateful)",
        key=join_key(path),
    )


def decode(skeleton: Skeleton, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild a state tree from its skeleton and tensors (inverse of :func:`encode`).

    Raises:
        FormatError: the skeleton is malformed or names a tensor that is not in ``tensors``.
    """
    return _decode(skeleton, tensors, 0)


def _decode(node: Skeleton, tensors: Mapping[str, torch.Tensor], depth: int) -> Any:
    if depth > _MAX_DEPTH + 2:
        raise errors.FormatError(f"state skeleton nested deeper than {_MAX_DEPTH} levels")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise errors.FormatError(f"unexpected node of type {type(node).__name__} in the state skeleton")
    if len(node) == 1:
        (tag, value), = node.items()
        if tag.startswith("$"):
            return _decode_tag(tag, value, tensors, depth)
    out: dict[str, Any] = {}
    for k, v in node.items():
        out[k] = _decode(v, tensors, depth + 1)
    return out


def _decode_tag(tag: str, value: Any, tensors: Mapping[str, torch.Tensor], depth: int) -> Any:
    try:
        if tag == "$tensor":
            return tensors[value]
        if tag == "$ndarray":
            t = tensors[value]
            return t.numpy() if isinstance(t, torch.Tensor) else t  # placeholders (show) pass through
        if tag == "$tuple":
            return tuple(_decode(v, tensors, depth + 1) for v in value)
        if tag == "$set":
            return {_decode(v, tensors, depth + 1) for v in value}
        if tag == "$dict":
            return OrderedDict(
                (_hashable(_decode(k, tensors, depth + 1)), _decode(v, tensors, depth + 1))
                for k, v in value
            )
        if tag == "$float":
            return float(value)
        if tag == "$int":
            return int(value)
        if tag == "$bytes":
            return base64.b64decode(value, validate=True)
        if tag == "$np":
            dtype, item = value
            return np.dtype(dtype).type(_decode(item, tensors, depth + 1))
        if tag == "$dtype":
            dt = getattr(torch, value)
            if not isinstance(dt, torch.dtype):
                raise ValueError(value)
            return dt
        if tag == "$device":
            return torch.device(value)
    except KeyError as exc:
        raise errors.FormatError(f"the state skeleton names tensor {value!r}, which is not stored", key=str(value)) from exc
    except (TypeError, ValueError) as exc:
        raise errors.FormatError(f"malformed {tag} node in the state skeleton: {exc}") from exc
    raise errors.FormatError(f"unknown tag {tag!r} in the state skeleton (written by a newer savegame?)")


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(_hashable(v) for v in k)
    return k
