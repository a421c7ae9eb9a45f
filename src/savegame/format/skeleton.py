"""Decode and check state skeletons — the tagged JSON of :mod:`savegame.tree` — without torch.

:mod:`savegame.tree` describes the format and encodes it (that needs torch). Parsing a manifest
checks every skeleton (:func:`check`), and ``savegame ls``, ``show`` and ``verify`` parse
manifests: here torch is imported only when a decoded tree really holds a ``torch.Size``,
``torch.dtype`` or ``torch.device``, or a checked name is not one savegame knows by heart.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import sys
from collections import Counter, OrderedDict
from collections.abc import Mapping
from typing import Any

from savegame import errors
from savegame.format import tensors

__all__ = ["check", "decode", "join_key", "split_key"]

JSON_SAFE_INT = 2**53
MAX_DEPTH = 200

Skeleton = Any  # JSON-compatible value


def join_key(parts: list[str]) -> str:
    """Join path components with "/"; "~" and "/" inside a component are escaped (JSON-pointer style)."""
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def split_key(key: str) -> list[str]:
    """Inverse of :func:`join_key`."""
    return [p.replace("~1", "/").replace("~0", "~") for p in key.split("/")]


def key_part(k: object) -> str:
    return str(k)


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


class _Size(tuple):  # type: ignore[type-arg]
    """What check() decodes a ``$size`` to: equal and hashed as a tuple (as ``torch.Size`` is), but
    not a plain tuple, so a ``$dict`` key check refuses it as it refuses ``torch.Size``."""

    __slots__ = ()


class _Named:
    """What check() decodes a ``$dtype`` or ``$device`` to: equal only to the same kind with the
    same canonical name (``float`` and ``float32`` are one dtype), never to a string, and not an
    allowed dict-key type — the equality and key rules of the torch object it stands for."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name

    def __eq__(self, other: object) -> bool:
        return type(other) is _Named and (other.kind, other.name) == (self.kind, self.name)

    def __hash__(self) -> int:
        return hash((_Named, self.kind, self.name))

    def __repr__(self) -> str:
        return f"{self.kind} {self.name}"


class _Stored:
    """What check() decodes a ``$tensor`` (one object per name, hashed by identity, as the tensor
    is) or a ``$ndarray`` (unhashable, as the array is) to."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"tensor {self.name!r}"


class _Array(_Stored):
    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]


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
# Names a checked ``$dtype`` or ``$device`` may have without asking torch (see _Decoder.tag);
# anything else is looked up in torch itself.
_KNOWN_DTYPES = frozenset(name for name, _, _, _ in tensors.TABLE if name)
_KNOWN_DEVICE = re.compile(r"(cpu|cuda|meta|mps|xpu)(:(0|[1-9][0-9]?|1[01][0-9]|12[0-7]))?")
_MAX_TEXT = 1 << 16


def _where(path: str | os.PathLike[str] | None) -> str:
    return "" if path is None else f"{os.fspath(path)}: "


class _Decoder:
    def __init__(self, tensors: Mapping[str, Any], path: str | os.PathLike[str] | None) -> None:
        self.tensors = tensors
        self.path = path
        # check(): the tensors are dtype names, and $size/$dtype/$device need not become torch
        # objects, so a manifest is checked without importing torch (about 1.5 s). Each becomes a
        # stand-in with the equality, hashing and key rules of the object decode() would build
        # (_Size, _Named, _Stored, _Array), so that check() refuses exactly what decode() refuses.
        self.checking = isinstance(tensors, _Placeholders)
        self.stored: dict[str, _Stored] = {}

    def fail(self, parts: list[str], what: str) -> errors.FormatError:
        key = join_key(parts)
        return errors.FormatError(
            f"{_where(self.path)}state skeleton at {key or '<root>'!r}: {what}; the checkpoint is "
            "damaged or was written by a newer savegame — restore an earlier step or upgrade savegame",
            path=self.path,
            key=key,
        )

    def node(self, node: Skeleton, parts: list[str], depth: int) -> Any:
        if depth > MAX_DEPTH + 2:
            raise self.fail(parts, f"nested deeper than {MAX_DEPTH} levels")
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
            if self.checking:
                if tag == "$tensor":
                    return self.stored.setdefault(name, _Stored(name))
                if t not in NUMPY_DTYPES:
                    raise self.fail(parts, f"tensor {name!r} is {t}, which cannot be a numpy array")
                return _Array(name)
            torch = sys.modules.get("torch")  # no torch imported: no torch tensor to convert
            if tag == "$ndarray" and torch is not None and isinstance(t, torch.Tensor):
                # placeholders (show) pass through
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
        if tag in ("$dict", "$odict", "$counter"):
            return self.mapping(tag, value, parts, depth)
        if tag == "$size":
            if type(value) is not list or not all(type(d) is int and d >= 0 for d in value):
                raise self.fail(parts, "$size holds something other than a list of non-negative ints")
            if self.checking:
                return _Size(value)
            import torch

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
                raise self.fail(parts, f"$int holds {short(value)}, not a decimal integer of at most 4300 digits")
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
            if self.checking and name in _KNOWN_DTYPES:  # canonical names: str(dtype) is "torch." + name
                return _Named("dtype", name)
            import torch

            # vars(), not getattr(): getattr(torch, "_dynamo") imports a submodule (seconds)
            dtype = vars(torch).get(name)
            if not isinstance(dtype, torch.dtype):
                raise self.fail(parts, f"unknown torch dtype {name!r}")
            return _Named("dtype", str(dtype).removeprefix("torch.")) if self.checking else dtype
        if tag == "$device":
            name = self.text(value, parts, tag)
            if len(name) > 64:
                raise self.fail(parts, "device name longer than 64 characters")
            if self.checking and _KNOWN_DEVICE.fullmatch(name):  # str(torch.device(name)) == name
                return _Named("device", name)
            import torch

            try:
                device = torch.device(name)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise self.fail(parts, f"bad device {name!r} ({exc})") from exc
            return _Named("device", str(device)) if self.checking else device
        raise self.fail(parts, f"unknown tag {tag!r}")

    def mapping(self, tag: str, value: Any, parts: list[str], depth: int) -> dict[Any, Any]:
        if type(value) is not list:
            raise self.fail(parts, f"{tag} holds {type(value).__name__}, not a list of [key, value] pairs")
        out: dict[Any, Any] = {"$dict": dict, "$odict": OrderedDict, "$counter": Counter}[tag]()
        for i, pair in enumerate(value):
            if type(pair) is not list or len(pair) != 2:
                raise self.fail(parts, f"{tag} entry {i} is not a [key, value] pair")
            k = self.node(pair[0], parts, depth + 1)
            if type(k) not in (str, int, float, bool, tuple) and k is not None:
                raise self.fail(parts, f"{tag} key {short(k)} of type {type(k).__name__} cannot be a dict key")
            try:
                duplicate = k in out
            except TypeError as exc:
                raise self.fail(parts, f"{tag} key {short(k)} cannot be a dict key ({exc})") from exc
            if duplicate:
                raise self.fail(parts, f"{tag} repeats the key {short(k)}")
            out[k] = self.node(pair[1], [*parts, key_part(k)], depth + 1)
        return out

    def np_scalar(self, value: Any, parts: list[str], depth: int) -> Any:
        import numpy as np

        if type(value) is not list or len(value) != 2 or type(value[0]) is not str:
            raise self.fail(parts, "$np is not a [dtype, value] pair")
        if not _NP_DTYPE.fullmatch(value[0]):
            raise self.fail(parts, f"$np has dtype {short(value[0])}, not a numeric numpy dtype")
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
            raise self.fail(parts, f"$np value {short(item)} does not fit {dtype}") from exc


def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
