"""The torch reader: names and tree from the unpickled object, then lazy reads of one tensor.

Key invariant: the tree is walked once at open under a node budget (``LIMITS.max_entries``,
against memo fan-out) and a depth cap, refusing cycles and two tensors with one name; every
storage the pickle names must have a data record of exactly ``numel x itemsize`` bytes before
the reader is returned. ``read(name)`` then reads only the byte slice of one storage that the
tensor view covers (its bounds were checked when the view was built), so memory stays at one
tensor. A closed reader raises :class:`~savegame.errors.ReaderClosedError`.

numpy is imported by ``read()``, torch by ``read()``/``load()`` only (issue 9.18).
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, BinaryIO

from savegame import errors
from savegame.interop import _zip, base
from savegame.interop.torch_pickle import container, values

if TYPE_CHECKING:
    import torch

__all__ = ["TorchReader", "load", "open_torch"]

_MAX_TREE_DEPTH = 200  # container nesting walked by keys()/tree(); real checkpoints nest < 10


def _walk(
    root: Any, path: str, *, renamed: bool = False
) -> tuple[Any, dict[str, values.TensorSpec]]:
    """Build (tree with TensorRefs, {name: spec}); bounded against memo fan-out and cycles.

    Two tensors whose names collide (``{"a/b": x, "a": {"b": y}}``, ``{0: x, "0": y}``) are an
    error for a reader of names; ``renamed`` (for :func:`load`, which returns the tree and needs
    no names) gives the later one a private name instead."""
    tensors: dict[str, values.TensorSpec] = {}
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
        if values.is_size(v):
            return v
        if isinstance(v, values.TensorSpec):
            if name in tensors:
                if not renamed:
                    raise errors.FormatError(
                        f"{path}: two tensors map to the name {name!r}", path=path, key=name
                    )
                n = len(tensors)
                while f"{name}\x00{n}" in tensors:
                    n += 1
                name = f"{name}\x00{n}"
            tensors[name] = v
            return base.TensorRef(name)
        if isinstance(v, (dict, list, tuple, set, frozenset, values.OpaqueInstance)):
            if id(v) in active:
                raise errors.FormatError(
                    f"{path}: the object graph has a cycle at {name!r}", path=path, key=name
                )
            active.add(id(v))
            try:
                if isinstance(v, dict):
                    # OrderedDict and Counter keep their type, as torch.load returns them.
                    items = {k: visit(x, _join(name, k), depth + 1) for k, x in v.items()}
                    if type(v) not in (OrderedDict, Counter):
                        return items
                    return _like(v, items)
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
        if isinstance(v, values.Global):
            if v.module == "torch" and v.name in values.VALUE_CONSTANTS:
                c = values.constant(v.name)
                if c is not None:
                    return c
            return base.Opaque(v.module, v.name)
        if isinstance(v, values.Storage):
            return base.Opaque("torch", "UntypedStorage")
        return v

    # A bare tensor (torch.save(t)) has no key; "tensor" is easier to pass around than "".
    tree = visit(root, "tensor" if isinstance(root, values.TensorSpec) else "", 0)
    return tree, tensors


def _join(prefix: str, key: Any) -> str:
    k = key if isinstance(key, str) else str(key)
    return f"{prefix}/{k}" if prefix else k


class TorchReader(base.Reader):
    """Lazy reader of one ``torch.save`` file. Open with :func:`open_torch`.

    Holds the file open between reads; ``close()`` closes it.
    """

    format = "torch"

    def __init__(self, path: str, *, listing: bool = False, _renamed: bool = False) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")
        try:
            self._size = os.fstat(self._f.fileno()).st_size
            head = self._f.read(4)
            self._f.seek(0)
            opener = container.open_zip if head == b"PK\x03\x04" else container.open_legacy
            found = opener(self._f, path, self._size, listing=listing)
            self._byteorder = found.byteorder
            self._meta = found.meta
            self._ranges = found.ranges  # storage key -> (file offset, bytes)
            self._crcs = found.crcs  # storage key -> zip CRC-32 (zip format only)
            root, storages = found.root, found.storages
            self._tree, self._tensors = _walk(root, path, renamed=_renamed)
            for s in storages.values():
                rng = self._ranges.get(s.key)
                want = s.numel * values.itemsize(s.dtype)
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

    def _release(self) -> None:
        self._f.close()

    # -- Reader -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names ("state_dict/layer.0.weight"), in pickle order. Reads no tensor data."""
        self._check_open()
        return list(self._tensors)

    def _spec(self, name: str) -> values.TensorSpec:
        try:
            return self._tensors[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"{self.path}: no tensor named {name!r}; see keys()", path=self.path, key=name
            ) from None

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and stored bytes of one tensor."""
        self._check_open()
        s = self._spec(name)
        n = 1
        for d in s.size:
            n *= d
        return base.TensorInfo(
            name, values.dtype_name(s.dtype), tuple(s.size), n * values.itemsize(s.dtype)
        )

    def _raw(self, name: str) -> tuple[values.TensorSpec, int, bytes]:
        """The spec, numel and the bytes its view covers (numpy/bytes only: verify() uses it)."""
        s = self._spec(name)
        itemsize = values.itemsize(s.dtype)
        numel = 1
        for d in s.size:
            numel *= d
        if numel == 0:
            return s, 0, b""
        lo = s.offset
        hi = s.offset + sum((d - 1) * st for d, st in zip(s.size, s.stride, strict=False)) + 1
        start, nbytes = self._ranges[s.storage.key]
        base_byte = s.storage.elem_offset * values.itemsize(s.storage.dtype)
        self._f.seek(start + base_byte + lo * itemsize)
        raw = self._f.read((hi - lo) * itemsize)
        if len(raw) != (hi - lo) * itemsize:
            raise errors.FormatError(
                f"{self.path}: storage of {name!r} is truncated", path=self.path, key=name
            )
        return s, numel, raw

    def read(self, name: str) -> torch.Tensor:
        """One tensor on CPU (owning its memory); reads only the bytes its view covers."""
        self._check_open()
        s, numel, raw = self._raw(name)
        torch = values.torch_module()
        dtype = values.torch_dtype(s.dtype, self.path)
        itemsize = values.itemsize(s.dtype)
        if numel == 0:
            return torch.empty(s.size, dtype=dtype)
        import numpy as np

        buf = np.frombuffer(raw, dtype=np.uint8)
        if self._byteorder == "big" and itemsize > 1:
            unit = itemsize // 2 if s.dtype.startswith("complex") else itemsize
            buf = buf.reshape(-1, unit)[:, ::-1].reshape(-1)
        flat = torch.from_numpy(buf.copy()).view(dtype)
        if s.conj:  # the values torch.load gives: applied to the buffer, so views stay views
            flat = flat.conj_physical()
        if s.neg:
            flat = flat.neg()
        view = torch.as_strided(flat, s.size, s.stride, 0)
        if numel * itemsize > len(raw):
            # Overlapping/expanded view (e.g. stride 0): return it as a view of its own small
            # buffer, as torch.load does, instead of materializing a possibly huge tensor
            # (FORMATS.md §1.6). The buffer belongs to this tensor alone.
            return view
        return view.clone()

    def tree(self) -> Any:
        """Object structure with tensors as TensorRef (dicts, lists, tuples, plain values)."""
        self._check_open()
        return self._tree

    def metadata(self) -> dict[str, Any]:
        """Container facts: zip or legacy, byte order, version record."""
        self._check_open()
        return {**self._meta, "byteorder": self._byteorder}

    def verify(self) -> list[str]:
        """Check every storage record's zip CRC-32 and read every tensor; returns problems."""
        self._check_open()
        problems: list[str] = []
        for key, crc in self._crcs.items():
            start, nbytes = self._ranges[key]
            if _zip.crc32_range(self._f, start, nbytes) != crc:
                problems.append(f"storage {key!r}: CRC-32 mismatch (corrupt data)")
        for name in self.keys():
            try:
                self._raw(name)  # every byte each view covers is present (no torch needed)
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems


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
    return _open(path, listing=listing)


def _open(
    path: str | os.PathLike[str], *, listing: bool = False, renamed: bool = False
) -> TorchReader:
    p = os.fspath(path)
    try:
        return TorchReader(p, listing=listing, _renamed=renamed)
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
    with _open(path, renamed=True) as r:  # names may collide: the tree needs none
        return _materialize(r.tree(), r)


def _like(v: dict[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    """``items`` as a dict of ``v``'s type (OrderedDict, Counter: a Counter counts the pairs),
    keeping a state dict's ``_metadata`` (its module versions, set by the unpickler)."""
    out = type(v)(items)
    if hasattr(v, "_metadata"):
        out._metadata = v._metadata  # type: ignore[attr-defined]
    return out


def _materialize(v: Any, r: TorchReader) -> Any:
    if isinstance(v, base.TensorRef):
        t = r.read(v.name)
        spec = r._tensors[v.name]
        # Only float/complex tensors can require grad; a file claiming otherwise is ignored.
        grad = spec.requires_grad and (t.is_floating_point() or t.is_complex())
        if spec.parameter:
            return values.torch_module().nn.Parameter(t, requires_grad=grad)
        return t.requires_grad_(True) if grad else t
    if values.is_size(v):
        return v
    if isinstance(v, dict):
        return _like(v, {k: _materialize(x, r) for k, x in v.items()})
    if isinstance(v, list):
        return [_materialize(x, r) for x in v]
    if isinstance(v, tuple):
        return tuple(_materialize(x, r) for x in v)
    return v
