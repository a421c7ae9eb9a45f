"""A pickle VM that cannot import: runs ``data.pkl`` (and legacy pickles) into inert values.

Key invariant: nothing named by the file is ever imported or called. This interpreter is
written here on purpose -- no library offers a pickle VM that cannot import -- and maps the
few allowed ``GLOBAL`` names (:data:`~savegame.interop.torch_pickle.values.ALLOWED`,
FORMATS.md §1.3, the same idea as torch's ``weights_only`` unpickler) to inert markers. Any
other global raises :class:`~savegame.errors.UnsafeContentError`, or, in listing mode, becomes
an :class:`~savegame.interop.base.Opaque` marker that is never instantiated; opcodes that can
run code (INST, OBJ, NEWOBJ_EX, EXT*) are refused outright.

Every read is bounded by the pickle's own end, and the operation count, stack size, MARK
nesting, memo size and integer width are capped (``LIMITS``), so hostile bytes end in a
:class:`~savegame.errors.FormatError` (see :func:`run`), never a hang or an exhausted memory.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import struct
from collections import Counter, OrderedDict
from typing import Any, BinaryIO

from savegame import errors
from savegame.interop import base
from savegame.interop.torch_pickle import values

__all__ = ["Unpickler", "run"]

_MAX_LONG_BYTES = 1024  # LONG1/LONG4 payloads: bigger ints have no business in a checkpoint


class Unpickler:
    """A pickle VM over a bounded byte source; see the module docstring for the invariant.

    Args:
        f: The file, positioned at the pickle's first byte.
        end: The offset no read may cross (the pickle's or the file's end).
        path: The file, named in errors.
        listing: Disallowed globals become :class:`~savegame.interop.base.Opaque` markers
            instead of raising ``UnsafeContentError``.
        legacy: The pre-1.6 format, whose persistent ids may name a pickled ``nn.Module``.

    After :meth:`load`, ``storages`` maps every storage key the pickle named to its
    :class:`~savegame.interop.torch_pickle.values.Storage`.
    """

    def __init__(self, f: BinaryIO, end: int, path: str, *, listing: bool, legacy: bool) -> None:
        self.f = f
        self.end = end
        self.path = path
        self.listing = listing
        self.legacy = legacy
        self.storages: dict[str, values.Storage] = {}
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
        if (module, name) in values.ALLOWED:
            return values.Global(module, name)
        if (module, name) in values.UNSUPPORTED:
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
            return values.OpaqueInstance(func)
        if not isinstance(func, values.Global):
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
            return values.torch_module().Size(dims)
        if (m, n) == ("torch", "device"):
            if not all(isinstance(a, (str, int)) for a in args):
                raise self._err("torch.device with unexpected arguments")
            try:
                return values.torch_module().device(
                    *args
                )  # a plain descriptor: 'cuda:0' needs no GPU
            except (RuntimeError, ValueError, TypeError) as exc:
                raise self._err(f"names an invalid device {args!r}") from exc
        if (m, n) == ("torch.serialization", "_get_layout"):
            layout = (
                values.layout(args[0]) if len(args) == 1 and args[0] in values.LAYOUTS else None
            )
            if layout is None:
                raise self._err(f"_get_layout of an unknown layout {args!r:.80}")
            return layout
        if n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self._rebuild_tensor(n, args)
        if n in ("_rebuild_parameter", "_rebuild_parameter_with_state") or (m, n) == (
            "torch.nn.parameter",
            "Parameter",
        ):
            if not args or not isinstance(args[0], values.TensorSpec):
                raise self._err("Parameter rebuilt from a non-tensor")
            t = args[0]
            t.parameter = True
            if len(args) > 1 and isinstance(args[1], bool):
                t.requires_grad = args[1]
            return t
        if n == "_rebuild_from_type_v2":
            # (func, new_type, args, state): only plain Tensor/Parameter types are accepted.
            if len(args) != 4 or args[1] not in (
                values.Global("torch", "Tensor"),
                values.Global("torch.nn.parameter", "Parameter"),
            ):
                raise errors.UnsupportedFormatError(
                    f"{self.path} holds a tensor subclass; savegame reads only plain tensors",
                    path=self.path,
                )
            return self._call(args[0], args[2])
        raise self._err(f"calls {m}.{n}, which cannot be called")

    def _rebuild_tensor(self, n: str, args: tuple[Any, ...]) -> values.TensorSpec:
        want = {"_rebuild_tensor": 4, "_rebuild_tensor_v2": 6, "_rebuild_tensor_v3": 7}[n]
        if len(args) < want:
            raise self._err(f"{n} has {len(args)} arguments, expected {want}")
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, values.Storage):
            raise self._err(f"{n} without a storage")
        if n == "_rebuild_tensor_v3":
            dt = args[6]
            if not (
                isinstance(dt, values.Global) and dt.module == "torch" and dt.name in values.DTYPES
            ):
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
        spec = values.TensorSpec(storage, dtype, offset, size, stride, requires_grad)
        at = {"_rebuild_tensor_v2": 6, "_rebuild_tensor_v3": 7}.get(n)
        meta = args[at] if at is not None and len(args) > at else None
        if meta is not None:
            # torch.utils.get_tensor_metadata: {"conj": True} / {"neg": True} on lazy views;
            # ignoring them would return the unconjugated / unnegated values silently.
            if not isinstance(meta, dict) or not all(
                k in ("conj", "neg") and isinstance(v, bool) for k, v in meta.items()
            ):
                raise self._err(f"{n} with tensor metadata savegame does not know: {meta!r:.80}")
            spec.conj, spec.neg = meta.get("conj", False), meta.get("neg", False)
            if spec.conj and not dtype.startswith("complex"):
                raise self._err(f"{n}: a conjugate view of a {dtype} tensor")
        values.check_view(spec, self.path)
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
        if not isinstance(stype, values.Global) or stype.name not in values.STORAGE_DTYPES:
            if isinstance(stype, values.Global) and stype.name in values.DTYPES:
                dtype = stype.name  # newer writers may pass a dtype
            else:
                raise self._err("storage of an unknown type")
        else:
            dtype = values.STORAGE_DTYPES[stype.name]
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
            root = values.Storage(key, dtype, numel, location)
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
        return values.Storage(key, dtype, vsize, location, elem_offset=voff)

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
                if isinstance(target, values.OpaqueInstance):
                    target.state = state
                elif not isinstance(target, (values.TensorSpec, dict)):
                    raise self._err(f"BUILD on a {type(target).__name__}")
                elif isinstance(target, OrderedDict) and _module_versions(state):
                    # a state_dict's per-module versions, which load_state_dict passes on (a
                    # BatchNorm of version < 2 is upgraded): kept, as torch.load keeps them.
                    target._metadata = state["_metadata"]  # type: ignore[attr-defined]
                # Other Tensor/dict state (hooks) carries no weights: ignored.
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


def run(u: Unpickler) -> Any:
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


def _module_versions(state: Any) -> bool:
    """``state`` is ``{"_metadata": {module: {"version": int, ...}}}`` of plain values."""
    meta = state.get("_metadata") if isinstance(state, dict) else None
    return isinstance(meta, dict) and all(
        isinstance(k, str)
        and isinstance(v, dict)
        and all(isinstance(a, str) and type(b) in (int, str, bool) for a, b in v.items())
        for k, v in meta.items()
    )
