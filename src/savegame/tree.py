"""Flatten a state tree into tensors plus a tagged-JSON skeleton, and back. No pickle, ever.

A *state tree* is nested dicts / lists / tuples whose leaves are tensors, numpy arrays or plain
values. :func:`encode` turns it into a JSON-compatible *skeleton* in which every tensor is
replaced by ``{"$tensor": "<key>"}`` and returns the tensors by key; :func:`decode` inverts it.

Invariant: ``decode(*encode(tree))`` equals ``tree`` leaf for leaf, with exact types (dict stays
dict, tuple stays tuple, int dict keys stay ints, ints above 2**53 stay exact, nan/inf survive),
and anything that cannot be represented exactly raises :class:`~savegame.errors.EncodeError`
naming its path — we never fall back to pickle (ANCHORS #6: pickled numpy objects broke
``weights_only`` loading for everyone). The one documented exception: an ``OrderedDict`` whose
keys are all plain strings is written as a JSON object (the v1 layout of every module
``state_dict()``) and comes back as a ``dict`` with the same order.

Every malformed skeleton — a bad tag, wrong arity, a missing tensor, an unknown dtype, a key that
cannot be a dict key — makes :func:`decode` raise :class:`~savegame.errors.FormatError` with
``.path`` (the manifest or checkpoint, when the caller passes it) and ``.key`` (the tree path);
it never raises anything else.

Tags (a dict whose single key starts with ``$``)::

    {"$tensor": key}            torch.Tensor          {"$ndarray": key}   numpy.ndarray
    {"$tuple": [...]}           tuple                 {"$set": [...]}     set (sorted if possible)
    {"$frozenset": [...]}       frozenset             {"$size": [...]}    torch.Size
    {"$dict": [[k, v], ...]}    dict with non-str keys, or str keys that start with "$"
    {"$odict": [[k, v], ...]}   OrderedDict with such keys
    {"$counter": [[k, v], ...]} collections.Counter (any keys; MultiStepLR's milestones)
    {"$float": "nan"|"inf"|"-inf"}                    {"$int": "123..."}  |int| > 2**53
    {"$bytes": base64}          bytes                 {"$np": [dtype, value]} numpy scalar
    {"$dtype": "float32"}       torch.dtype           {"$device": "cuda:0"} torch.device

``$frozenset``, ``$size``, ``$odict`` and ``$counter`` were added after the first v1 release (which wrote
frozensets as ``$set``, ``torch.Size`` as ``$tuple`` and decoded every ``$dict`` as an
``OrderedDict``); files of that release decode unchanged, ``$dict`` now as a plain ``dict``.
"""

from __future__ import annotations

import base64
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savegame import errors
from savegame.format.skeleton import (
    JSON_SAFE_INT,
    MAX_DEPTH,
    Skeleton,
    check,
    decode,
    join_key,
    key_part,
    split_key,
)

__all__ = ["check", "decode", "encode", "join_key", "split_key"]


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
    if depth > MAX_DEPTH:
        raise errors.EncodeError(
            f"state tree is nested deeper than {MAX_DEPTH} levels at {join_key(path)!r}; "
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
    # Exact types only: a subclass (IntEnum, StrEnum, np.str_, a namedtuple) would come back as
    # its base type, so it is refused with a hint rather than silently changed.
    kind = type(obj)
    if obj is None or kind is bool:
        return obj
    if kind is str:
        _check_text(obj, path)
        return obj
    if kind is int:
        if abs(obj) > JSON_SAFE_INT:
            return {"$int": str(obj)}
        return obj
    if kind is float:
        if math.isnan(obj):
            return {"$float": "nan"}
        if math.isinf(obj):
            return {"$float": "inf" if obj > 0 else "-inf"}
        return obj
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
    if kind is bytes:
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    if kind is torch.Size:
        return {"$size": [int(d) for d in obj]}
    if kind is tuple:
        return {"$tuple": [_encode(v, [*path, str(i)], tensors, depth + 1) for i, v in enumerate(obj)]}
    if kind is list:
        return [_encode(v, [*path, str(i)], tensors, depth + 1) for i, v in enumerate(obj)]
    if kind is set or kind is frozenset:
        items = list(obj)
        try:
            items.sort()
        except TypeError:
            pass
        tag = "$set" if kind is set else "$frozenset"
        return {tag: [_encode(v, [*path, str(i)], tensors, depth + 1) for i, v in enumerate(items)]}
    if kind is dict or kind is OrderedDict or kind is Counter:
        # A Counter is always a pair list: as a JSON object it would come back a plain dict,
        # and a scheduler's milestones[epoch] of a missing key would raise instead of giving 0.
        plain = kind is not Counter and all(type(k) is str and not k.startswith("$") for k in obj)
        if plain:
            # An OrderedDict with plain keys keeps the v1 layout (a JSON object) and comes back
            # as a dict: module state_dicts stay readable and the golden layout holds.
            for k in obj:
                _check_text(k, path)
            return {k: _encode(v, [*path, k], tensors, depth + 1) for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if k is not None and type(k) not in (str, int, float, bool, tuple):
                raise errors.EncodeError(
                    f"dict at {join_key(path) or '<root>'!r} has a key of type {type(k).__name__}; "
                    "only str, int, float, bool, None and tuples of them can be stored",
                    key=join_key(path),
                )
            in_key: dict[str, torch.Tensor] = {}
            ek = _encode(k, path, in_key, depth + 1)
            if in_key:
                raise errors.EncodeError(
                    f"dict at {join_key(path) or '<root>'!r} has a key holding a tensor; keys must be plain values",
                    key=join_key(path),
                )
            pairs.append([ek, _encode(v, [*path, key_part(k)], tensors, depth + 1)])
        return {{dict: "$dict", OrderedDict: "$odict", Counter: "$counter"}[kind]: pairs}
    hint = _subclass_hint(obj)
    if hint:
        raise errors.EncodeError(
            f"cannot store {type(obj).__module__}.{type(obj).__qualname__} at {join_key(path) or '<root>'!r} "
            f"exactly: it would come back as a plain {hint[0]}; {hint[1]}",
            key=join_key(path),
        )
    where = join_key(path) or "<root>"
    stateful = callable(getattr(obj, "state_dict", None))
    if stateful and callable(getattr(obj, "load_state_dict", None)):
        # A stateful object inside a dict extra: only TrainState's own entries get their
        # state_dict() called (a dict is stored as plain values).
        name = path[-1] if path else "name"
        fix = (
            f"it has state_dict()/load_state_dict(): pass it to TrainState under its own name "
            f"(TrainState(..., {name}=obj)) instead of inside a dict"
        )
    else:
        fix = (
            "give the object state_dict()/load_state_dict() returning tensors and plain values "
            "and pass it to TrainState under its own name (see savegame.Stateful)"
        )
    raise errors.EncodeError(
        f"cannot store {type(obj).__module__}.{type(obj).__qualname__} at {where!r} without "
        f"pickle; {fix}",
        key=join_key(path),
    )


def check_storable(t: torch.Tensor, key: str) -> None:
    """Refuse, naming it, a tensor whose values are not one strided block of bytes a checkpoint
    can hold: sparse, nested, or a meta tensor (no data at all).

    Raises:
        EncodeError: with ``key`` and what to store instead.
    """
    if t.is_nested:
        what, fix = "a nested tensor", "store its parts (t.unbind()) as a list"
    elif t.layout != torch.strided:
        what, fix = f"a {t.layout} tensor", "store t.to_dense(), or its indices and values"
    elif t.device.type == "meta":
        what, fix = (
            "a meta tensor (it has no data)",
            "materialize the module before saving (to_empty() and initialize, or load weights)",
        )
    else:
        return
    raise errors.EncodeError(f"cannot store the tensor at {key!r}: it is {what}; {fix}", key=key)


def _check_text(text: str, path: list[str]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise errors.EncodeError(
            f"string at {join_key(path) or '<root>'!r} is not valid Unicode text ({exc.reason}: a lone "
            "surrogate?); store it as bytes",
            key=join_key(path),
        ) from exc


def _subclass_hint(obj: object) -> tuple[str, str] | None:
    """For a subclass of a type the codec stores: (base name, what to do instead)."""
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return "tuple", "store tuple(x) or x._asdict() and rebuild the namedtuple after loading"
    for base, fix in (
        (bool, "bool(x)"),
        (int, "int(x)"),
        (float, "float(x)"),
        (str, "str(x)"),
        (bytes, "bytes(x)"),
        (tuple, "tuple(x)"),
        (list, "list(x)"),
        (set, "set(x)"),
        (frozenset, "frozenset(x)"),
        (dict, "dict(x)"),
    ):
        if isinstance(obj, base):
            return base.__name__, f"store {fix} instead, or give the object state_dict()/load_state_dict()"
    if isinstance(obj, Mapping):
        return "dict", "store dict(x) instead, or give the object state_dict()/load_state_dict()"
    return None
