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
    {"$float": "nan"|"inf"|"-inf"}                    {"$int": "123..."}  |int| > 2**53
    {"$bytes": base64}          bytes                 {"$np": [dtype, value]} numpy scalar
    {"$dtype": "float32"}       torch.dtype           {"$device": "cuda:0"} torch.device

``$frozenset``, ``$size`` and ``$odict`` were added after the first v1 release (which wrote
frozensets as ``$set``, ``torch.Size`` as ``$tuple`` and decoded every ``$dict`` as an
``OrderedDict``); files of that release decode unchanged, ``$dict`` now as a plain ``dict``.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
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
    if kind is dict or kind is OrderedDict:
        plain = all(type(k) is str and not k.startswith("$") for k in obj)
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
            pairs.append([ek, _encode(v, [*path, _key_part(k)], tensors, depth + 1)])
        return {"$dict" if kind is dict else "$odict": pairs}
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


def decode(
    skeleton: Skeleton,
    tensors: Mapping[str, Any],
    *,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Rebuild a state tree from its skeleton and tensors (inverse of :func:`encode`).

    Args:
        skeleton: The tagged-JSON skeleton (one entry of a manifest's ``trees``).
        tensors: Tensor key -> tensor (or a placeholder, which ``$ndarray`` passes through).
        path: The manifest or checkpoint the skeleton came from; set as ``.path`` on errors.

    Raises:
        FormatError: the skeleton is malformed or names a tensor that is not in ``tensors``;
            ``.key`` is the tree path of the bad node, ``.path`` is ``path``. Nothing else.
    """
    try:
        return _Decoder(tensors, path).node(skeleton, [], 0)
    except RecursionError as exc:  # a deep caller stack: the depth cap could not be reached
        raise errors.FormatError(
            f"{_where(path)}state skeleton nested too deeply to decode", path=path
        ) from exc


def check(skeleton: Skeleton, dtypes: Mapping[str, str], *, path: str | os.PathLike[str] | None = None) -> None:
    """Validate a skeleton against the tensors a manifest lists (key -> dtype name), without
    reading them: every tag, arity and tensor reference, and that each ``$ndarray`` names a
    tensor whose dtype numpy has. A skeleton that passes decodes with those tensors.

    Raises:
        FormatError: exactly what :func:`decode` would raise for this skeleton.
    """
    decode(skeleton, _Placeholders(dtypes), path=path)


class _Placeholders(Mapping[str, str]):
    """Key -> dtype name, read by the decoder in place of tensors (see :func:`check`)."""

    def __init__(self, dtypes: Mapping[str, str]) -> None:
        self.dtypes = dtypes

    def __getitem__(self, key: str) -> str:
        return self.dtypes[key]

    def __contains__(self, key: object) -> bool:
        return key in self.dtypes

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.dtypes)

    def __len__(self) -> int:
        return len(self.dtypes)


# torch dtypes a numpy array can hold (a "$ndarray" of another dtype cannot be rebuilt).
NUMPY_DTYPES = frozenset(
    {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64",
     "bool", "complex64", "complex128"}
)


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_INT_TEXT = re.compile(r"-?[0-9]{1,4300}")
_NP_DTYPE = re.compile(r"[<>|=]?[biuf][0-9]{1,2}")
_TORCH_DTYPES = {name: dt for name, dt in vars(torch).items() if isinstance(dt, torch.dtype)}
_MAX_TEXT = 1 << 16


def _where(path: str | os.PathLike[str] | None) -> str:
    return "" if path is None else f"{os.fspath(path)}: "


class _Decoder:
    def __init__(self, tensors: Mapping[str, Any], path: str | os.PathLike[str] | None) -> None:
        self.tensors = tensors
        self.path = path

    def fail(self, parts: list[str], what: str) -> errors.FormatError:
        key = join_key(parts)
        return errors.FormatError(
            f"{_where(self.path)}state skeleton at {key or '<root>'!r}: {what}; the checkpoint is "
            "damaged or was written by a newer savegame — restore an earlier step or upgrade savegame",
            path=self.path,
            key=key,
        )

    def node(self, node: Skeleton, parts: list[str], depth: int) -> Any:
        if depth > _MAX_DEPTH + 2:
            raise self.fail(parts, f"nested deeper than {_MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, str):
            return node
        if type(node) is float:
            if not math.isfinite(node):  # only from a caller that parsed NaN tokens itself
                raise self.fail(parts, f"non-finite number {node!r} (write it as $float)")
            return node
        if type(node) is list:
            return [self.node(v, [*parts, str(i)], depth + 1) for i, v in enumerate(node)]
        if type(node) is not dict:
            raise self.fail(parts, f"unexpected node of type {type(node).__name__}")
        if len(node) == 1:
            ((tag, value),) = node.items()
            if type(tag) is str and tag.startswith("$"):
                return self.tag(tag, value, parts, depth)
        out: dict[str, Any] = {}
        for k, v in node.items():
            if type(k) is not str:
                raise self.fail(parts, f"object key {k!r} is not a string")
            out[k] = self.node(v, [*parts, k], depth + 1)
        return out

    def items(self, value: Any, parts: list[str], depth: int, tag: str) -> list[Any]:
        if type(value) is not list:
            raise self.fail(parts, f"{tag} holds {type(value).__name__}, not a list")
        return [self.node(v, [*parts, str(i)], depth + 1) for i, v in enumerate(value)]

    def text(self, value: Any, parts: list[str], tag: str) -> str:
        if type(value) is not str or len(value) > _MAX_TEXT:
            raise self.fail(parts, f"{tag} holds {type(value).__name__}, not a short string")
        return value

    def tag(self, tag: str, value: Any, parts: list[str], depth: int) -> Any:
        if tag in ("$tensor", "$ndarray"):
            name = self.text(value, parts, tag)
            if name not in self.tensors:
                raise self.fail(parts, f"names tensor {name!r}, which is not stored")
            t = self.tensors[name]
            if isinstance(self.tensors, _Placeholders):
                if tag == "$ndarray" and t not in NUMPY_DTYPES:
                    raise self.fail(parts, f"tensor {name!r} is {t}, which cannot be a numpy array")
                return None
            if tag == "$ndarray" and isinstance(t, torch.Tensor):  # placeholders (show) pass through
                try:
                    return t.numpy()
                except (TypeError, RuntimeError) as exc:
                    raise self.fail(parts, f"tensor {name!r} ({t.dtype}) cannot be a numpy array: {exc}") from exc
            return t
        if tag == "$tuple":
            return tuple(self.items(value, parts, depth, tag))
        if tag in ("$set", "$frozenset"):
            members = self.items(value, parts, depth, tag)
            try:
                return set(members) if tag == "$set" else frozenset(members)
            except TypeError as exc:
                raise self.fail(parts, f"{tag} member cannot be in a set ({exc})") from exc
        if tag in ("$dict", "$odict"):
            return self.mapping(tag, value, parts, depth)
        if tag == "$size":
            if type(value) is not list or not all(type(d) is int and d >= 0 for d in value):
                raise self.fail(parts, "$size holds something other than a list of non-negative ints")
            try:
                return torch.Size(value)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise self.fail(parts, f"bad $size ({exc})") from exc
        if tag == "$float":
            if type(value) is not str or value not in _FLOATS:
                raise self.fail(parts, f"$float holds {value!r}, not 'nan', 'inf' or '-inf'")
            return _FLOATS[value]
        if tag == "$int":
            if type(value) is not str or not _INT_TEXT.fullmatch(value):
                raise self.fail(parts, f"$int holds {_short(value)}, not a decimal integer of at most 4300 digits")
            return int(value)
        if tag == "$bytes":
            if type(value) is not str:
                raise self.fail(parts, f"$bytes holds {type(value).__name__}, not a base64 string")
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise self.fail(parts, f"$bytes is not base64 ({exc})") from exc
        if tag == "$np":
            return self.np_scalar(value, parts, depth)
        if tag == "$dtype":
            name = self.text(value, parts, tag)
            if name not in _TORCH_DTYPES:
                raise self.fail(parts, f"unknown torch dtype {name!r}")
            return _TORCH_DTYPES[name]
        if tag == "$device":
            name = self.text(value, parts, tag)
            if len(name) > 64:
                raise self.fail(parts, "device name longer than 64 characters")
            try:
                return torch.device(name)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise self.fail(parts, f"bad device {name!r} ({exc})") from exc
        raise self.fail(parts, f"unknown tag {tag!r}")

    def mapping(self, tag: str, value: Any, parts: list[str], depth: int) -> dict[Any, Any]:
        if type(value) is not list:
            raise self.fail(parts, f"{tag} holds {type(value).__name__}, not a list of [key, value] pairs")
        out: dict[Any, Any] = {} if tag == "$dict" else OrderedDict()
        for i, pair in enumerate(value):
            if type(pair) is not list or len(pair) != 2:
                raise self.fail(parts, f"{tag} entry {i} is not a [key, value] pair")
            k = self.node(pair[0], parts, depth + 1)
            if type(k) not in (str, int, float, bool, tuple) and k is not None:
                raise self.fail(parts, f"{tag} key {_short(k)} of type {type(k).__name__} cannot be a dict key")
            try:
                duplicate = k in out
            except TypeError as exc:
                raise self.fail(parts, f"{tag} key {_short(k)} cannot be a dict key ({exc})") from exc
            if duplicate:
                raise self.fail(parts, f"{tag} repeats the key {_short(k)}")
            out[k] = self.node(pair[1], [*parts, _key_part(k)], depth + 1)
        return out

    def np_scalar(self, value: Any, parts: list[str], depth: int) -> np.generic:
        if type(value) is not list or len(value) != 2 or type(value[0]) is not str:
            raise self.fail(parts, "$np is not a [dtype, value] pair")
        if not _NP_DTYPE.fullmatch(value[0]):
            raise self.fail(parts, f"$np has dtype {_short(value[0])}, not a numeric numpy dtype")
        try:
            dtype = np.dtype(value[0])
        except (TypeError, ValueError) as exc:
            raise self.fail(parts, f"$np has unknown dtype {value[0]!r}") from exc
        item = self.node(value[1], parts, depth + 1)
        want = {"b": (bool,), "i": (int,), "u": (int,), "f": (float,)}[dtype.kind]
        if type(item) not in want:
            raise self.fail(parts, f"$np {dtype} holds {type(item).__name__}")
        if dtype.kind == "f" and math.isfinite(item) and abs(item) > float(np.finfo(dtype).max):
            raise self.fail(parts, f"$np value {item!r} does not fit {dtype}")
        try:
            return dtype.type(item)  # type: ignore[no-any-return]
        except (OverflowError, ValueError, TypeError) as exc:
            raise self.fail(parts, f"$np value {_short(item)} does not fit {dtype}") from exc


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
