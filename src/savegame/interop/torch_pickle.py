"""Read ``torch.save`` files (zip and legacy formats) without ``pickle.load`` and without imports.

Key invariant: nothing named by the file is ever imported or called. ``data.pkl`` is run by a
small pickle interpreter written here on purpose — no library offers a pickle VM that cannot
import — that maps the few allowed ``GLOBAL`` names (FORMATS.md §1.3, the same idea as torch's
``weights_only`` unpickler) to inert markers. Any other global raises
:class:`~savegame.errors.UnsafeContentError`, or, in listing mode, becomes an
:class:`~savegame.interop.base.Opaque` marker that is never instantiated.

Opening reads only ``data.pkl`` (zip) or the pickles at the head of a legacy file; ``read(name)``
reads the byte slice of one storage that the tensor view covers.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import struct
import sys
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from savegame import errors
from savegame.interop import _bounds, _zip, base

if TYPE_CHECKING:
    import torch

__all__ = ["TorchReader", "load", "open_torch"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_MAX_TREE_DEPTH = 200  # container nesting walked by keys()/tree(); real checkpoints nest < 10
_MAX_LONG_BYTES = 1024  # LONG1/LONG4 payloads: bigger ints have no business in a checkpoint
_MAX_PKL_BYTES = 1 << 30  # data.pkl itself (it holds structure only, never tensor data)

# FORMATS.md §1.2: storage class -> dtype name. Dtypes are kept as names (str) and torch is
# imported only by read()/load() and for the few torch value objects a pickle may hold
# (torch.Size, torch.device, dtype constants, layouts): listing and verifying a file of plain
# tensors needs numpy only (issue 9.18).
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
# Tensor dtype name -> element size in bytes (torch's element_size()).
_ITEMSIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex32": 4, "complex64": 8,
    "complex128": 16, "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}  # fmt: skip
_DTYPE_NAMES = tuple(_ITEMSIZES)
_DTYPES = frozenset(_DTYPE_NAMES)
# Inert constants torch's weights_only unpickler also accepts as plain values (torch 2.13
# torch/_weights_only_unpickler.py `_get_allowed_globals`): every dtype it lists (quantized,
# bit and sub-byte ones included; tensors of these are still refused), and the qschemes.
# They come back as the real torch objects (resolved by _constant, which imports torch only
# when a file holds one): comparing or printing them runs no file code.
_VALUE_CONSTANTS: frozenset[str] = frozenset(
    [
        *_DTYPE_NAMES,
        *(f"uint{i}" for i in range(1, 8)),
        *(f"int{i}" for i in range(1, 8)),
        *"qint8 quint8 qint32 quint4x2 quint2x4 bits1x8 bits2x4 bits4x2 bits8 bits16".split(),
        "float4_e2m1fn_x2",
        *"per_tensor_affine per_tensor_symmetric per_channel_affine per_channel_symmetric".split(),
        "per_channel_affine_float_qparams",
    ]
)
# Layouts named by torch.serialization._get_layout("torch.<name>").
_LAYOUTS: frozenset[str] = frozenset(
    f"torch.{n}"
    for n in "strided sparse_coo sparse_csr sparse_csc sparse_bsr sparse_bsc _mkldnn jagged".split()
)


def _torch() -> Any:
    """torch, imported on first need (a tensor read, or a torch value object in the pickle)."""
    import torch

    return torch


def _constant(name: str) -> Any:
    """The torch dtype/qscheme constant ``torch.<name>``, or None if this torch lacks it."""
    torch = _torch()
    c = getattr(torch, name, None)
    return c if isinstance(c, (torch.dtype, torch.qscheme)) else None


def _layout(name: str) -> Any:
    """The torch layout named ``"torch.<name>"``, or None if this torch lacks it."""
    torch = _torch()
    c = getattr(torch, name.removeprefix("torch."), None)
    return c if isinstance(c, torch.layout) else None


def _torch_dtype(name: str, path: str) -> Any:
    """The torch dtype for a dtype name from the file (read time)."""
    torch = _torch()
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise errors.UnsupportedFormatError(
            f"{path}: dtype {name!r} is not available in this torch ({torch.__version__}); "
            "upgrade torch",
            path=path,
        )
    return dt


def _is_size(v: Any) -> bool:
    """Whether ``v`` is a torch.Size (only possible once torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Size)


# Torch globals we recognise but do not rebuild (quantized, sparse, nested, meta, subclasses).
_UNSUPPORTED = {
    ("torch._utils", n)
    for n in (
        "_rebuild_qtensor",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_wrapper_subclass",
        "_rebuild_nested_tensor",
        "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_xla_tensor",
        "_rebuild_mps_tensor",
    )
} | {
    (("torch", n))
    for n in (
        "QInt8Storage",
        "QUInt8Storage",
        "QInt32Storage",
        "QUInt4x2Storage",
        "QUInt2x4Storage",
    )
}


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` (or ``"float32"``) -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Inert values produced by the interpreter
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Global:
    """An allow-listed global: a marker, never the real object."""

    module: str
    name: str


@dataclass(eq=False, slots=True)
class _Storage:
    key: str
    dtype: str  # torch dtype name ("float32")
    numel: int
    location: str
    elem_offset: int = 0  # legacy view_metadata: view into a root storage


@dataclass(eq=False, slots=True)
class _TensorSpec:
    storage: _Storage
    dtype: str  # torch dtype name ("float32")
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    parameter: bool = False


@dataclass(eq=False, slots=True)
class _OpaqueInstance:
    cls: base.Opaque
    state: Any = None


class _Mark:
    __slots__ = ()


_MARK = _Mark()

_ALLOWED: set[tuple[str, str]] = (
    {
        ("collections", "OrderedDict"),
        ("collections", "Counter"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("_codecs", "encode"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.serialization", "_get_layout"),
        ("torch", "strided"),
    }
    | {("torch", n) for n in _STORAGE_DTYPES}
    | {("torch", n) for n in _DTYPES}
    | {("torch", n) for n in _VALUE_CONSTANTS}
    | {
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
    }
)


class _Unpickler:
    """A pickle VM over a bounded byte source; see the module docstring for the invariant."""

    def __init__(self, f: BinaryIO, end: int, path: str, *, listing: bool, legacy: bool) -> None:
        self.f = f
        self.end = end
        self.path = path
        self.listing = listing
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}
        self.ops = 0

    # -- byte access ----------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        if n < 0 or n > self.end - self.f.tell():
            raise self._err(f"claims {n} bytes but the pickle has fewer left (truncated or lying)")
        return self.f.read(n)

    def _line(self) -> bytes:
        out = bytearray()
        while True:
            c = self._read(1)
            if c == b"\n":
                return bytes(out)
            out += c
            if len(out) > 4096:
                raise self._err("text line longer than 4096 bytes")

    def _err(self, msg: str) -> errors.FormatError:
        return errors.FormatError(
            f"{self.path}: pickle {msg}; the file is damaged or hostile", path=self.path
        )

    # -- globals --------------------------------------------------------------------------
    def _global(self, module: str, name: str) -> Any:
        # Protocol 2 writes Python 2 names (`__builtin__ set`); pickle and torch's weights_only
        # unpickler translate them with these stdlib tables (plain dicts: nothing is imported).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _ALLOWED:
            return _Global(module, name)
        if (module, name) in _UNSUPPORTED:
            raise errors.UnsupportedFormatError(
                f"{self.path} uses {module}.{name} (quantized/sparse/nested/subclass tensors), "
                "which savegame does not read; re-save with plain dense tensors",
                path=self.path,
                key=f"{module}.{name}",
            )
        if self.listing:
            return base.Opaque(module, name)
        raise errors.UnsafeContentError(
            f"{self.path} asks for the global {module}.{name}, which is not on the allow-list; "
            "nothing was executed. If you trust the file, load it with torch.load; to see what it "
            f"holds, run `savegame show {self.path}` (or open it with listing=True)",
            path=self.path,
            key=f"{module}.{name}",
        )

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise self._err("REDUCE arguments are not a tuple")
        if isinstance(func, base.Opaque):
            return _OpaqueInstance(func)
        if not isinstance(func, _Global):
            raise self._err(f"calls a non-callable {type(func).__name__}")
        m, n = func.module, func.name
        if (m, n) == ("collections", "OrderedDict"):
            return OrderedDict(*args) if args else OrderedDict()
        if (m, n) == ("collections", "Counter"):
            return Counter(*args) if args else Counter()
        if (m, n) == ("builtins", "set"):
            return set(*args)
        if (m, n) == ("builtins", "frozenset"):
            return frozenset(*args)
        if (m, n) == ("builtins", "bytearray"):
            # Protocol 2: bytearray(str, 'latin-1'); protocol 3+: bytearray(bytes).
            if not args:
                return bytearray()
            if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
                return bytearray(args[0])
            if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin-1", "latin1"):
                return bytearray(args[0].encode("latin1"))
            raise self._err("bytearray() called with unexpected arguments")
        if (m, n) == ("builtins", "complex"):
            if not all(isinstance(a, (int, float)) for a in args):
                raise self._err("complex() with non-numeric arguments")
            return complex(*args)
        if (m, n) == ("builtins", "slice"):
            return slice(*args)
        if (m, n) == ("_codecs", "encode"):
            # Protocol 2 stores bytes as _codecs.encode(str, 'latin1').
            if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
                raise self._err("_codecs.encode called with unexpected arguments")
            return args[0].encode("latin1")
        if (m, n) == ("torch", "Size"):
            dims = tuple(*args)
            if not all(type(d) is int for d in dims):
                raise self._err("torch.Size with non-integer dimensions")
            return _torch().Size(dims)
        if (m, n) == ("torch", "device"):
            if not all(isinstance(a, (str, int)) for a in args):
                raise self._err("torch.device with unexpected arguments")
            try:
                return _torch().device(*args)  # a plain descriptor: 'cuda:0' needs no GPU
            except (RuntimeError, ValueError, TypeError) as exc:
                raise self._err(f"names an invalid device {args!r}") from exc
        if (m, n) == ("torch.serialization", "_get_layout"):
            layout = _layout(args[0]) if len(args) == 1 and args[0] in _LAYOUTS else None
            if layout is None:
                raise self._err(f"_get_layout of an unknown layout {args!r:.80}")
            return layout
        if n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self._rebuild_tensor(n, args)
        if n in ("_rebuild_parameter", "_rebuild_parameter_with_state") or (m, n) == (
            "torch.nn.parameter",
            "Parameter",
        ):
            if not args or not isinstance(args[0], _TensorSpec):
                raise self._err("Parameter rebuilt from a non-tensor")
            t = args[0]
            t.parameter = True
            if len(args) > 1 and isinstance(args[1], bool):
                t.requires_grad = args[1]
            return t
        if n == "_rebuild_from_type_v2":
            # (func, new_type, args, state): only plain Tensor/Parameter types are accepted.
            if len(args) != 4 or args[1] not in (
                _Global("torch", "Tensor"),
                _Global("torch.nn.parameter", "Parameter"),
            ):
                raise errors.UnsupportedFormatError(
                    f"{self.path} holds a tensor subclass; savegame reads only plain tensors",
                    path=self.path,
                )
            return self._call(args[0], args[2])
        raise self._err(f"calls {m}.{n}, which cannot be called")

    def _rebuild_tensor(self, n: str, args: tuple[Any, ...]) -> _TensorSpec:
        want = {"_rebuild_tensor": 4, "_rebuild_tensor_v2": 6, "_rebuild_tensor_v3": 7}[n]
        if len(args) < want:
            raise self._err(f"{n} has {len(args)} arguments, expected {want}")
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, _Storage):
            raise self._err(f"{n} without a storage")
        if n == "_rebuild_tensor_v3":
            dt = args[6]
            if not (isinstance(dt, _Global) and dt.module == "torch" and dt.name in _DTYPES):
                raise self._err(f"{n} with an unknown dtype")
            dtype = dt.name
        else:
            dtype = storage.dtype
        ints = (
            (offset, *size, *stride)
            if isinstance(size, tuple) and isinstance(stride, tuple)
            else None
        )
        if ints is None or not all(type(i) is int for i in ints):
            raise self._err(f"{n} with non-integer offset/size/stride")
        if len(size) != len(stride) or len(size) > 64:
            raise self._err(f"{n} with mismatched size/stride")
        requires_grad = bool(args[4]) if len(args) > 4 and isinstance(args[4], bool) else False
        spec = _TensorSpec(storage, dtype, offset, size, stride, requires_grad)
        _check_view(spec, self.path)
        return spec

    def _persistent(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module" and self.legacy:
            if self.listing:
                return base.Opaque("torch.nn", "Module")
            raise errors.UnsafeContentError(
                f"{self.path} contains a pickled nn.Module class (source code); refusing it",
                path=self.path,
                key="module",
            )
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) in (5, 6)):
            raise self._err("has a persistent id that is not a storage")
        _, stype, key, location, numel = pid[:5]
        if not isinstance(stype, _Global) or stype.name not in _STORAGE_DTYPES:
            if isinstance(stype, _Global) and stype.name in _DTYPES:
                dtype = stype.name  # newer writers may pass a dtype
            else:
                raise self._err("storage of an unknown type")
        else:
            dtype = _STORAGE_DTYPES[stype.name]
        if (
            not isinstance(key, str)
            or type(numel) is not int
            or numel < 0
            or not isinstance(location, str)
        ):
            raise self._err("storage with a bad key, location or size")
        view = pid[5] if len(pid) == 6 else None
        root = self.storages.get(key)
        if root is None:
            root = _Storage(key, dtype, numel, location)
            self.storages[key] = root
        elif root.dtype != dtype or root.numel != numel:
            # FORMATS.md §1.6: one storage with two dtypes -> reject.
            raise self._err(f"uses storage {key!r} with two different types/sizes")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise self._err("bad legacy storage view")
        vkey, voff, vsize = view
        if (
            type(voff) is not int
            or type(vsize) is not int
            or voff < 0
            or vsize < 0
            or voff + vsize > numel
        ):
            raise self._err("legacy storage view outside its storage")
        return _Storage(key, dtype, vsize, location, elem_offset=voff)

    # -- the VM -----------------------------------------------------------------------------
    def load(self) -> Any:  # noqa: C901 - one dispatch loop is the clearest form here
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        lim = base.LIMITS
        read = self._read

        def pop_mark() -> list[Any]:
            nonlocal stack
            if not marks:
                raise self._err("pops a MARK that was never set")
            items = stack
            stack = marks.pop()
            return items

        def push(v: Any) -> None:
            if len(stack) >= lim.max_pickle_depth * 1000:
                raise self._err("stack grows beyond the limit")
            stack.append(v)

        def pop() -> Any:
            if not stack:
                raise self._err("pops an empty stack")
            return stack.pop()

        def put(i: int) -> None:
            if not stack:
                raise self._err("memoizes an empty stack")
            if len(memo) >= lim.max_entries and i not in memo:
                raise self._err("memo grows beyond the limit")
            memo[i] = stack[-1]

        def get(i: int) -> None:
            if i not in memo:
                raise self._err(f"references memo slot {i} that was never set")
            push(memo[i])

        while True:
            self.ops += 1
            if self.ops > lim.max_pickle_ops:
                raise self._err(f"runs more than {lim.max_pickle_ops} operations")
            op = read(1)
            if op == b"\x80":  # PROTO
                read(1)
            elif op == b".":  # STOP
                if len(stack) != 1 or marks:
                    raise self._err("stops with an unbalanced stack")
                return stack[0]
            elif op == b"\x95":  # FRAME (protocol 4): just a length hint
                read(8)
            elif op == b"(":  # MARK
                if len(marks) >= lim.max_pickle_depth:
                    raise self._err(f"nests MARKs deeper than {lim.max_pickle_depth}")
                marks.append(stack)
                stack = []
            elif op == b"0":  # POP
                pop()
            elif op == b"1":  # POP_MARK
                pop_mark()
            elif op == b"2":  # DUP
                if not stack:
                    raise self._err("DUP on an empty stack")
                push(stack[-1])
            elif op == b"t":
                push(tuple(pop_mark()))
            elif op == b")":
                push(())
            elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
                k = op[0] - 0x84
                if len(stack) < k:
                    raise self._err("TUPLE on a short stack")
                items = tuple(stack[-k:])
                del stack[-k:]
                push(items)
            elif op == b"]":
                push([])
            elif op == b"}":
                push({})
            elif op == b"\x8f":  # EMPTY_SET
                push(set())
            elif op == b"l":  # LIST
                push(pop_mark())
            elif op == b"d":  # DICT
                items = pop_mark()
                if len(items) % 2:
                    raise self._err("DICT with an odd number of items")
                push(dict(zip(items[::2], items[1::2], strict=False)))
            elif op == b"\x91":  # FROZENSET
                push(frozenset(pop_mark()))
            elif op == b"\x90":  # ADDITEMS
                items = pop_mark()
                target = stack[-1] if stack else None
                if not isinstance(target, set):
                    raise self._err("ADDITEMS on a non-set")
                target.update(items)
            elif op == b"N":
                push(None)
            elif op == b"\x88":
                push(True)
            elif op == b"\x89":
                push(False)
            elif op == b"J":
                push(struct.unpack("<i", read(4))[0])
            elif op == b"K":
                push(read(1)[0])
            elif op == b"M":
                push(struct.unpack("<H", read(2))[0])
            elif op in (b"\x8a", b"\x8b"):  # LONG1, LONG4
                n = read(1)[0] if op == b"\x8a" else struct.unpack("<i", read(4))[0]
                if n < 0 or n > _MAX_LONG_BYTES:
                    raise self._err(f"has a {n}-byte integer")
                push(int.from_bytes(read(n), "little", signed=True))
            elif op == b"I":  # INT (text)
                line = self._line()
                # Protocol 0 spells booleans as INT 00 / 01.
                push(line == b"01" if line in (b"00", b"01") else int(line))
            elif op == b"L":  # LONG (text)
                push(int(self._line().rstrip(b"L")))
            elif op == b"G":
                push(struct.unpack(">d", read(8))[0])
            elif op == b"F":
                push(float(self._line()))
            elif op == b"V":  # UNICODE (protocol 0)
                push(self._line().decode("raw-unicode-escape"))
            elif op == b"S":  # STRING (protocol 0): a quoted, escaped literal
                line = self._line()
                if len(line) < 2 or line[:1] not in (b"'", b'"') or line[-1:] != line[:1]:
                    raise self._err("STRING without matching quotes")
                push(codecs.escape_decode(line[1:-1])[0].decode("latin1"))
            elif op == b"X":
                push(read(struct.unpack("<I", read(4))[0]).decode("utf-8", "surrogatepass"))
            elif op == b"\x8c":  # SHORT_BINUNICODE
                push(read(read(1)[0]).decode("utf-8", "surrogatepass"))
            elif op == b"\x8d":  # BINUNICODE8
                push(read(struct.unpack("<Q", read(8))[0]).decode("utf-8", "surrogatepass"))
            elif op == b"U":  # SHORT_BINSTRING
                push(read(read(1)[0]).decode("latin1"))
            elif op == b"T":  # BINSTRING
                push(read(struct.unpack("<i", read(4))[0]).decode("latin1"))
            elif op == b"B":  # BINBYTES
                push(read(struct.unpack("<I", read(4))[0]))
            elif op == b"C":
                push(read(read(1)[0]))
            elif op == b"\x8e":  # BINBYTES8
                push(read(struct.unpack("<Q", read(8))[0]))
            elif op == b"\x96":  # BYTEARRAY8
                push(bytearray(read(struct.unpack("<Q", read(8))[0])))
            elif op == b"q":
                put(read(1)[0])
            elif op == b"r":
                put(struct.unpack("<I", read(4))[0])
            elif op == b"p":  # PUT (text)
                put(int(self._line()))
            elif op == b"\x94":  # MEMOIZE
                put(len(memo))
            elif op == b"h":
                get(read(1)[0])
            elif op == b"j":
                get(struct.unpack("<I", read(4))[0])
            elif op == b"g":
                get(int(self._line()))
            elif op == b"a":  # APPEND
                v = pop()
                if not stack or not isinstance(stack[-1], list):
                    raise self._err("APPEND on a non-list")
                stack[-1].append(v)
            elif op == b"e":  # APPENDS
                items = pop_mark()
                if not stack or not isinstance(stack[-1], list):
                    raise self._err("APPENDS on a non-list")
                stack[-1].extend(items)
            elif op == b"s":  # SETITEM
                v = pop()
                k = pop()
                if not stack or not isinstance(stack[-1], dict):
                    raise self._err("SETITEM on a non-dict")
                stack[-1][k] = v
            elif op == b"u":  # SETITEMS
                items = pop_mark()
                if len(items) % 2 or not stack or not isinstance(stack[-1], dict):
                    raise self._err("SETITEMS on a non-dict or with an odd item count")
                for i in range(0, len(items), 2):
                    stack[-1][items[i]] = items[i + 1]
            elif op == b"c":  # GLOBAL
                module = self._line().decode("utf-8")
                name = self._line().decode("utf-8")
                push(self._global(module, name))
            elif op == b"\x93":  # STACK_GLOBAL: same allow-list, names come from the stack
                name = pop()
                module = pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise self._err("STACK_GLOBAL with non-string names")
                push(self._global(module, name))
            elif op == b"R":  # REDUCE
                args = pop()
                func = pop()
                push(self._call(func, args))
            elif op == b"\x81":  # NEWOBJ
                args = pop()
                cls = pop()
                push(self._call(cls, args))
            elif op == b"b":  # BUILD
                state = pop()
                if not stack:
                    raise self._err("BUILD on an empty stack")
                target = stack[-1]
                if isinstance(target, _OpaqueInstance):
                    target.state = state
                elif not isinstance(target, (_TensorSpec, dict)):
                    raise self._err(f"BUILD on a {type(target).__name__}")
                # Tensor/OrderedDict state (hooks, _metadata) carries no weights: ignored.
            elif op == b"Q":  # BINPERSID
                push(self._persistent(pop()))
            elif op == b"P":  # PERSID (text ids are never storages)
                raise self._err("uses a text persistent id")
            elif op in (b"i", b"o", b"\x92", b"\x82", b"\x83", b"\x84"):
                what = {
                    b"i": "INST",
                    b"o": "OBJ",
                    b"\x92": "NEWOBJ_EX",
                    b"\x82": "EXT1",
                    b"\x83": "EXT2",
                    b"\x84": "EXT4",
                }[op]
                if op == b"i":
                    module = self._line().decode("utf-8", "replace")
                    name = self._line().decode("utf-8", "replace")
                    key = f"{module}.{name}"
                else:
                    key = what
                raise errors.UnsafeContentError(
                    f"{self.path}: pickle opcode {what} ({key}) can run code and is refused; nothing was executed",
                    path=self.path,
                    key=key,
                )
            else:
                raise self._err(f"has unsupported opcode {op!r}")


def _check_view(spec: _TensorSpec, path: str) -> None:
    """FORMATS.md §1.6: bounds of a strided view inside its storage; logical numel capped."""
    itemsize = _itemsize(spec.dtype)
    if spec.offset < 0 or any(s < 0 for s in spec.size) or any(s < 0 for s in spec.stride):
        raise errors.FormatError(f"{path}: tensor view with negative offset/size/stride", path=path)
    problem = _bounds.shape_problem(spec.size)
    if problem is not None:
        # Even an empty view: torch cannot build size (0, 2**64) (overflow converting it).
        raise errors.FormatError(f"{path}: tensor size {problem}", path=path)
    numel = 1
    for s in spec.size:
        numel *= s
    if numel > base.LIMITS.max_tensor_numel:
        raise errors.FormatError(
            f"{path}: tensor of {numel} elements exceeds LIMITS.max_tensor_numel", path=path
        )
    storage_bytes = spec.storage.numel * _itemsize(spec.storage.dtype)
    if numel:
        last = spec.offset + sum(
            (s - 1) * st for s, st in zip(spec.size, spec.stride, strict=False)
        )
        if (last + 1) * itemsize > storage_bytes:
            raise errors.FormatError(
                f"{path}: tensor view reaches byte {(last + 1) * itemsize} of a "
                f"{storage_bytes}-byte storage {spec.storage.key!r}",
                path=path,
                key=spec.storage.key,
            )


def _itemsize(dtype: str) -> int:
    return _ITEMSIZES[dtype]


# ---------------------------------------------------------------------------------------------
# Walk: names and tree
# ---------------------------------------------------------------------------------------------


def _walk(root: Any, path: str) -> tuple[Any, dict[str, _TensorSpec]]:
    """Build (tree with TensorRefs, {name: spec}); bounded against memo fan-out and cycles."""
    tensors: dict[str, _TensorSpec] = {}
    budget = [base.LIMITS.max_entries]
    active: set[int] = set()

    def visit(v: Any, name: str, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise errors.FormatError(
                f"{path}: object graph expands to more than {base.LIMITS.max_entries} nodes "
                "(memo fan-out, 'billion laughs'); refusing it",
                path=path,
            )
        if depth > _MAX_TREE_DEPTH:
            raise errors.FormatError(
                f"{path}: containers nest deeper than {_MAX_TREE_DEPTH}", path=path
            )
        if _is_size(v):
            return v
        if isinstance(v, _TensorSpec):
            if name in tensors:
                raise errors.FormatError(
                    f"{path}: two tensors map to the name {name!r}", path=path, key=name
                )
            tensors[name] = v
            return base.TensorRef(name)
        if isinstance(v, (dict, list, tuple, set, frozenset, _OpaqueInstance)):
            if id(v) in active:
                raise errors.FormatError(
                    f"{path}: the object graph has a cycle at {name!r}", path=path, key=name
                )
            active.add(id(v))
            try:
                if isinstance(v, dict):
                    # OrderedDict and Counter keep their type, as torch.load returns them.
                    items = {k: visit(x, _join(name, k), depth + 1) for k, x in v.items()}
                    return type(v)(items) if type(v) in (OrderedDict, Counter) else items
                if isinstance(v, list):
                    return [visit(x, _join(name, i), depth + 1) for i, x in enumerate(v)]
                if isinstance(v, tuple):
                    return tuple(visit(x, _join(name, i), depth + 1) for i, x in enumerate(v))
                if isinstance(v, (set, frozenset)):
                    return v
                state = v.state
                if state is None:
                    return v.cls
                if isinstance(state, dict):
                    return {"__opaque__": v.cls, **visit(state, name, depth + 1)}
                return {"__opaque__": v.cls, "state": visit(state, _join(name, "state"), depth + 1)}
            finally:
                active.discard(id(v))
        if isinstance(v, _Global):
            if v.module == "torch" and v.name in _VALUE_CONSTANTS:
                c = _constant(v.name)
                if c is not None:
                    return c
            return base.Opaque(v.module, v.name)
        if isinstance(v, _Storage):
            return base.Opaque("torch", "UntypedStorage")
        return v

    # A bare tensor (torch.save(t)) has no key; "tensor" is easier to pass around than "".
    tree = visit(root, "tensor" if isinstance(root, _TensorSpec) else "", 0)
    return tree, tensors


def _join(prefix: str, key: Any) -> str:
    k = key if isinstance(key, str) else str(key)
    return f"{prefix}/{k}" if prefix else k


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


class TorchReader:
    """Lazy reader of one ``torch.save`` file. Open with :func:`open_torch`."""

    format = "torch"

    def __init__(self, path: str, *, listing: bool = False) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")
        try:
            self._size = os.fstat(self._f.fileno()).st_size
            self._byteorder = "little"
            self._meta: dict[str, Any] = {}
            self._ranges: dict[str, tuple[int, int]] = {}  # storage key -> (file offset, bytes)
            self._crcs: dict[str, int] = {}  # storage key -> zip CRC-32 (zip format only)
            head = self._f.read(4)
            self._f.seek(0)
            if head == b"PK\x03\x04":
                root, storages = self._open_zip(listing)
            else:
                root, storages = self._open_legacy(listing)
            self._tree, self._tensors = _walk(root, path)
            for s in storages.values():
                rng = self._ranges.get(s.key)
                want = s.numel * _itemsize(s.dtype)
                if rng is None:
                    raise errors.FormatError(
                        f"{path}: storage {s.key!r} has no data record; the file is incomplete",
                        path=path,
                        key=s.key,
                    )
                if rng[1] != want:
                    raise errors.FormatError(
                        f"{path}: storage {s.key!r} holds {rng[1]} bytes, expected {want} "
                        "(numel x itemsize, FORMATS.md §1.6)",
                        path=path,
                        key=s.key,
                    )
        except BaseException:
            self._f.close()
            raise

    # -- opening ------------------------------------------------------------------------------
    def _open_zip(self, listing: bool) -> tuple[Any, dict[str, _Storage]]:
        path = self.path
        members = _zip.read_directory(self._f, path, self._size)
        if not members:
            raise errors.FormatError(f"{path}: empty zip, not a torch checkpoint", path=path)
        prefix = members[0].name.split("/", 1)[0] + "/"
        by_name: dict[str, _zip.ZipMember] = {}
        for m in members:
            if not m.name.startswith(prefix):
                raise errors.FormatError(
                    f"{path}: zip member {m.name!r} lies outside the archive folder {prefix!r}",
                    path=path,
                    key=m.name,
                )
            by_name[m.name[len(prefix) :]] = m
        if "constants.pkl" in by_name or any(n.startswith("code/") for n in by_name):
            raise errors.UnsupportedFormatError(
                f"{path} is a TorchScript archive (torch.jit.save); it contains code and is not "
                "read by savegame. Export its state_dict() with torch.save instead",
                path=path,
            )
        pkl = by_name.get("data.pkl")
        if pkl is None:
            raise errors.UnsupportedFormatError(
                f"{path}: zip without data.pkl is not a torch checkpoint", path=path
            )
        if "byteorder" in by_name:
            bo = _zip.read_member(self._f, by_name["byteorder"], path, max_bytes=16)
            if bo not in (b"little", b"big"):
                raise errors.FormatError(f"{path}: byteorder record is {bo!r}", path=path)
            self._byteorder = bo.decode()
        if "version" in by_name:
            ver = _zip.read_member(self._f, by_name["version"], path, max_bytes=64)
            self._meta["version"] = ver.decode("ascii", "replace").strip()
        if pkl.method != _zip.STORED:
            raise errors.UnsupportedFormatError(
                f"{path}: data.pkl is compressed; torch never writes that", path=path
            )
        data = _zip.read_member(self._f, pkl, path, max_bytes=_MAX_PKL_BYTES, check_crc=False)
        u = _Unpickler(io.BytesIO(data), len(data), path, listing=listing, legacy=False)
        root = _run(u)
        for key in u.storages:
            m = by_name.get(f"data/{key}")
            if m is None:
                continue  # reported by the caller
            if m.method != _zip.STORED or m.size != m.compressed:
                raise errors.UnsupportedFormatError(
                    f"{path}: storage record {m.name!r} is compressed; torch writes STORED records",
                    path=path,
                    key=m.name,
                )
            self._ranges[key] = (m.start, m.size)
            self._crcs[key] = m.crc
        self._meta["format"] = "zip"
        return root, u.storages

    def _open_legacy(self, listing: bool) -> tuple[Any, dict[str, _Storage]]:
        path = self.path
        f = self._f

        def one(legacy: bool = True) -> Any:
            return _run(_Unpickler(f, self._size, path, listing=listing, legacy=legacy))

        try:
            magic = one()
        except errors.FormatError as exc:
            raise errors.UnsupportedFormatError(
                f"{path} is neither a zip nor a legacy torch.save file", path=path
            ) from exc
        if magic != LEGACY_MAGIC:
            raise errors.UnsupportedFormatError(
                f"{path} is not a torch.save file (bad magic)", path=path
            )
        if one() != LEGACY_PROTOCOL:
            raise errors.UnsupportedFormatError(f"{path}: unknown legacy torch protocol", path=path)
        info = one()
        if not isinstance(info, dict):
            raise errors.FormatError(f"{path}: legacy sys_info is not a dict", path=path)
        if info.get("little_endian") is False:
            self._byteorder = "big"
        u = _Unpickler(f, self._size, path, listing=listing, legacy=True)
        root = _run(u)
        keys = one()
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise errors.FormatError(f"{path}: legacy storage key list is malformed", path=path)
        if len(keys) > base.LIMITS.max_entries:
            raise errors.FormatError(f"{path}: too many storages", path=path)
        pos = f.tell()
        for key in keys:
            s = u.storages.get(key)
            if s is None:
                raise errors.FormatError(
                    f"{path}: legacy storage {key!r} is never used", path=path, key=key
                )
            if pos + 8 > self._size:
                raise errors.FormatError(
                    f"{path}: legacy storage {key!r} is truncated", path=path, key=key
                )
            f.seek(pos)
            (count,) = struct.unpack("<q", f.read(8))
            nbytes = count * _itemsize(s.dtype)
            if count < 0 or pos + 8 + nbytes > self._size:
                raise errors.FormatError(
                    f"{path}: legacy storage {key!r} claims {count} elements past the end of the file",
                    path=path,
                    key=key,
                )
            self._ranges[key] = (pos + 8, nbytes)
            pos += 8 + nbytes
        self._meta["format"] = "legacy"
        return root, u.storages

    # -- ForeignReader ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names ("state_dict/layer.0.weight"), in pickle order. Reads no tensor data."""
        return list(self._tensors)

    def _spec(self, name: str) -> _TensorSpec:
        try:
            return self._tensors[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"{self.path}: no tensor named {name!r}; see keys()", path=self.path, key=name
            ) from None

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and stored bytes of one tensor."""
        s = self._spec(name)
        n = 1
        for d in s.size:
            n *= d
        return base.TensorInfo(name, dtype_name(s.dtype), tuple(s.size), n * _itemsize(s.dtype))

    def _raw(self, name: str) -> tuple[_TensorSpec, int, bytes]:
        """The spec, numel and the bytes its view covers (numpy/bytes only: verify() uses it)."""
        s = self._spec(name)
        itemsize = _itemsize(s.dtype)
        numel = 1
        for d in s.size:
            numel *= d
        if numel == 0:
            return s, 0, b""
        lo = s.offset
        hi = s.offset + sum((d - 1) * st for d, st in zip(s.size, s.stride, strict=False)) + 1
        start, nbytes = self._ranges[s.storage.key]
        base_byte = s.storage.elem_offset * _itemsize(s.storage.dtype)
        self._f.seek(start + base_byte + lo * itemsize)
        raw = self._f.read((hi - lo) * itemsize)
        if len(raw) != (hi - lo) * itemsize:
            raise errors.FormatError(
                f"{self.path}: storage of {name!r} is truncated", path=self.path, key=name
            )
        return s, numel, raw

    def read(self, name: str) -> torch.Tensor:
        """One tensor on CPU (owning its memory); reads only the bytes its view covers."""
        s, numel, raw = self._raw(name)
        torch = _torch()
        dtype = _torch_dtype(s.dtype, self.path)
        itemsize = _itemsize(s.dtype)
        if numel == 0:
            return torch.empty(s.size, dtype=dtype)
        import numpy as np

        buf = np.frombuffer(raw, dtype=np.uint8)
        if self._byteorder == "big" and itemsize > 1:
            unit = itemsize // 2 if s.dtype.startswith("complex") else itemsize
            buf = buf.reshape(-1, unit)[:, ::-1].reshape(-1)
        flat = torch.from_numpy(buf.copy()).view(dtype)
        view = torch.as_strided(flat, s.size, s.stride, 0)
        if numel * itemsize > len(raw):
            # Overlapping/expanded view (e.g. stride 0): return it as a view of its own small
            # buffer, as torch.load does, instead of materializing a possibly huge tensor
            # (FORMATS.md §1.6). The buffer belongs to this tensor alone.
            return view
        return view.clone()

    def tree(self) -> Any:
        """Object structure with tensors as TensorRef (dicts, lists, tuples, plain values)."""
        return self._tree

    def metadata(self) -> dict[str, Any]:
        """Container facts: zip or legacy, byte order, version record."""
        return {**self._meta, "byteorder": self._byteorder}

    def verify(self) -> list[str]:
        """Check every storage record's zip CRC-32 and read every tensor; returns problems."""
        problems: list[str] = []
        for key, crc in self._crcs.items():
            start, nbytes = self._ranges[key]
            self._f.seek(start)
            value = 0
            left = nbytes
            while left:  # stream in 16 MiB chunks: memory stays bounded on huge storages
                chunk = self._f.read(min(left, 1 << 24))
                if not chunk:
                    break
                value = zlib.crc32(chunk, value)
                left -= len(chunk)
            if left or value != crc:
                problems.append(f"storage {key!r}: CRC-32 mismatch (corrupt data)")
        for name in self.keys():
            try:
                self._raw(name)  # every byte each view covers is present (no torch needed)
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TorchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(u: _Unpickler) -> Any:
    """Run the VM, turning Python-level failures on hostile bytes into FormatError."""
    try:
        return u.load()
    except errors.CheckpointError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        struct.error,
        RecursionError,
        MemoryError,
    ) as exc:
        raise errors.FormatError(
            f"{u.path}: malformed pickle ({type(exc).__name__}: {exc}); the file is damaged or hostile",
            path=u.path,
        ) from exc


def open_torch(path: str | os.PathLike[str], *, listing: bool = False) -> TorchReader:
    """Open a ``torch.save`` file lazily, reading only its pickle.

    Args:
        path: The file (zip format or legacy pre-1.6 format).
        listing: If True, globals outside the allow-list become :class:`Opaque` markers in
            ``tree()`` instead of raising (for ``savegame show``); nothing is ever imported.

    Raises:
        UnsafeContentError: the pickle names a disallowed global (``.key`` = ``module.qualname``).
        UnsupportedFormatError: TorchScript, quantized/sparse tensors, or not a torch file.
        FormatError: anything corrupt, truncated or out of bounds.
    """
    p = os.fspath(path)
    try:
        return TorchReader(p, listing=listing)
    except FileNotFoundError as exc:
        if isinstance(exc, errors.CheckpointError):
            raise
        raise errors.CheckpointNotFoundError(f"{p} does not exist", path=p) from exc


def load(path: str | os.PathLike[str]) -> Any:
    """The object saved by ``torch.save``, with real CPU tensors, without running pickle.

    Dict keys keep their types (an optimizer's ``state`` keys stay ints), so the result of the
    classic tutorial checkpoint can be fed to ``model.load_state_dict(ckpt["state_dict"])`` and
    ``optimizer.load_state_dict(ckpt["optimizer"])``. Tensors saved as views of one storage
    become independent copies.

    Raises:
        The same errors as :func:`open_torch`.
    """
    with open_torch(path) as r:
        return _materialize(r.tree(), r)


def _materialize(v: Any, r: TorchReader) -> Any:
    if isinstance(v, base.TensorRef):
        t = r.read(v.name)
        spec = r._tensors[v.name]
        # Only float/complex tensors can require grad; a file claiming otherwise is ignored.
        grad = spec.requires_grad and (t.is_floating_point() or t.is_complex())
        if spec.parameter:
            return _torch().nn.Parameter(t, requires_grad=grad)
        return t.requires_grad_(True) if grad else t
    if _is_size(v):
        return v
    if isinstance(v, dict):
        return type(v)({k: _materialize(x, r) for k, x in v.items()})  # Counter counts pairs
    if isinstance(v, list):
        return [_materialize(x, r) for x in v]
    if isinstance(v, tuple):
        return tuple(_materialize(x, r) for x in v)
    return v
