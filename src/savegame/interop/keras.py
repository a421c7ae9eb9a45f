"""Safe, lazy reader of Keras checkpoints: legacy ``.h5``, Keras 3 ``.weights.h5`` and ``.keras``.

Key invariant: nothing in the file is ever followed, loaded or executed. HDF5 links other than
hard links, external raw storage, virtual datasets and non-builtin filters are refused before
any tensor byte is read (so HDF5 never searches for a filter plugin named by the file), every
declared size is checked against the bytes actually stored, and ``config.json`` /
``model_config`` are parsed as plain JSON data, never deserialized into Keras objects
(FORMATS.md §4.4).

Formats (FORMATS.md §4):

* ``"keras-h5"`` – any HDF5 file. Two layouts are recognised:

  - *legacy* (Keras 1/2, ``tf.keras``, Keras 3's ``model.save("m.h5")``): a weights group
    (``model_weights`` or the root for ``save_weights``) whose attribute ``layer_names`` (or the
    split form ``layer_names0``, ``layer_names1``, …) lists layer groups, each with attribute
    ``weight_names``. Tensors are listed in that order and named by their weight name
    (``dense_1/kernel:0``, ``sequential/d1/kernel``). A name that repeats is prefixed with its
    layer (``<layer>/<weight name>``). Optimizer weights follow as
    ``optimizer_weights/<weight name>``.
  - *keras3* (``model.save_weights("m.weights.h5")``): datasets at ``<path>/vars/<i>``, named by
    that HDF5 path (``layers/conv2d/vars/0``), listed depth-first in HDF5 name order with the
    ``<i>`` indices in numeric order. bfloat16 datasets (opaque 2-byte type plus attribute
    ``dtype="bfloat16"``) are returned as ``torch.bfloat16``.

* ``"keras3"`` – a ``.keras`` zip: ``metadata.json`` and ``config.json`` (data only) and the
  ``model.weights.h5`` member, which must be STORED; it is read in place through a bounded
  file-like view of its byte range (no extraction).

Example:
    >>> with open_keras("model.keras") as r:  # doctest: +SKIP
    ...     print(r.keys()[:2], r.metadata()["keras_version"])
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from savegame import errors
from savegame.interop import _zip, base

__all__ = ["KerasReader", "open_keras"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"

# Caps specific to HDF5 (FORMATS.md §4.4, §7). Keras' own nesting is < 10 levels deep.
_MAX_DEPTH = 64
_MAX_LINKS_PER_GROUP = 1_000_000
# One attribute (model_config, layer_names chunk, …) may hold at most this many stored bytes and
# elements. Keras splits name lists at 64,512 bytes, and model configs are JSON text.
_MAX_ATTR_BYTES = 64 << 20
_MAX_ATTR_ELEMENTS = 1_000_000
_MAX_ATTR_CHUNKS = 100_000  # layer_names0 … layer_namesN
# A dataset whose logical size exceeds its stored bytes by more than LIMITS.max_inflate_ratio is
# a fill-value or compression bomb; below this floor we do not bother (tiny fill-value tensors).
_BOMB_FLOOR_BYTES = 16 << 20
# JSON members of a .keras zip (metadata.json, config.json).
_MAX_JSON_BYTES = 64 << 20

# Filters built into libhdf5 itself: deflate, shuffle, fletcher32, szip, nbit, scaleoffset
# (H5Zpublic.h). Anything else (including h5py's LZF and hdf5plugin's Blosc etc.) would make a
# read go through a dynamically loaded or third-party filter, which we refuse (FORMATS.md §4.4).
_BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6})

_LAYOUT_COMPACT, _LAYOUT_CONTIGUOUS, _LAYOUT_CHUNKED, _LAYOUT_VIRTUAL = 0, 1, 2, 3

_NUMPY_TO_TORCH: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "uint32": torch.uint32,
    "int64": torch.int64,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}


# What h5py raises for malformed files (HDF5 errors map onto these built-ins). Our own errors
# subclass ValueError/OSError too, so they are re-raised untouched.
_H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, OverflowError)


@contextlib.contextmanager
def _as_format_error(path: str, what: str, key: str | None = None) -> Iterator[None]:
    """Turn any h5py/libhdf5 failure into a FormatError naming ``path`` (FORMATS.md §4.4)."""
    try:
        yield
    except errors.CheckpointError:
        raise
    except _H5_ERRORS as exc:
        raise errors.FormatError(
            f"{path}: {what}: {exc}; the file is corrupt or not a Keras file", path=path, key=key
        ) from exc


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise errors.MissingDependencyError(
            "reading Keras HDF5 files needs h5py; install it with `pip install savegame[keras]`"
        ) from exc
    return h5py


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where one tensor lives: its HDF5 path and how to decode it."""

    h5path: str
    info: base.TensorInfo
    numpy_dtype: np.dtype[Any]  # dtype to read into (native byte order)
    bfloat16: bool


class _RangeFile(io.RawIOBase):
    """Read-only, seekable view of ``[start, start+size)`` of an open binary file.

    h5py's file-object driver reads through it, so HDF5 sees the zip member as a whole file and
    can never read outside the member's byte range.
    """

    def __init__(self, raw: io.BufferedReader, start: int, size: int) -> None:
        super().__init__()
        self._raw = raw
        self._start = start
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self._size - self._pos))
        if want == 0:
            return 0
        self._raw.seek(self._start + self._pos)
        got = self._raw.readinto(view[:want])
        got = got or 0
        self._pos += got
        return got

    def write(self, b: Any) -> int:
        raise OSError("read-only")


# --------------------------------------------------------------------------------------------
# JSON as data
# --------------------------------------------------------------------------------------------


def _parse_json(raw: bytes | str, *, what: str, path: str) -> Any:
    """Parse JSON text as plain data (dicts, lists, str, numbers); never builds objects."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise errors.FormatError(
                f"{what} in {path} is not UTF-8 text; the file is corrupt", path=path
            ) from exc
    else:
        text = raw
    if len(text) > _MAX_JSON_BYTES:
        raise errors.FormatError(
            f"{what} in {path} is {len(text)} characters, over the {_MAX_JSON_BYTES} cap",
            path=path,
        )
    if not base.json_depth_ok(text, base.LIMITS.max_json_depth):
        raise errors.FormatError(
            f"{what} in {path} nests deeper than {base.LIMITS.max_json_depth} levels; refusing",
            path=path,
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise errors.FormatError(f"{what} in {path} is not valid JSON: {exc}", path=path) from exc


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


class KerasReader:
    """Lazy reader of one Keras file; create it with :func:`open_keras`.

    Attributes:
        path: The file opened.
        format: ``"keras-h5"`` (HDF5 file) or ``"keras3"`` (``.keras`` zip).
        layout: ``"legacy"`` (``layer_names``/``weight_names``) or ``"keras3"`` (``vars/<i>``).
    """

    path: str
    format: str
    layout: str

    def __init__(
        self,
        path: str,
        fmt: str,
        h5file: Any,
        raw: io.BufferedReader | None,
        stored_limit: int,
        zip_meta: dict[str, Any],
    ) -> None:
        self.path = path
        self.format = fmt
        self._h5 = h5file
        self._raw = raw
        self._stored_limit = stored_limit  # bytes HDF5 can possibly hold (file or member size)
        self._entries: dict[str, _Entry] = {}
        self._tree: dict[str, Any] = {}
        self._meta: dict[str, Any] = dict(zip_meta)
        self.layout = "keras3"
        self._vars_groups: list[str] = []
        self._closed = False
        try:
            with _as_format_error(path, "cannot index the HDF5 file"):
                self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> None:
        datasets = self._walk()
        if self._is_legacy():
            self.layout = "legacy"
            self._index_legacy(datasets)
        else:
            self._index_keras3(datasets)
        # Always present, None when the file does not say (Keras 3 records no backend).
        for key in ("keras_version", "backend", "model_config"):
            self._meta.setdefault(key, None)

    # -- protocol -------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order (see the module docstring). Reads no tensor data."""
        return list(self._entries)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and size of ``name`` without reading it."""
        return self._entry(name).info

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a CPU torch tensor that owns its memory."""
        self._check_open()
        entry = self._entry(name)
        shape = entry.info.shape
        arr = np.empty(shape, dtype=entry.numpy_dtype)
        if arr.size:
            with _as_format_error(self.path, f"cannot read tensor {name!r}", key=name):
                self._h5[entry.h5path].read_direct(arr)
        if entry.bfloat16:
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        # np.empty is C-contiguous and owned; ascontiguousarray would turn 0-d into 1-d.
        return torch.from_numpy(arr)

    def tree(self) -> dict[str, Any]:
        """Nested dict by layer (legacy) or by HDF5 path (keras3) with :class:`TensorRef` leaves."""
        return copy.deepcopy(self._tree)

    def metadata(self) -> dict[str, Any]:
        """``keras_version``, ``backend``, the model config (parsed JSON data) and more.

        Always: ``keras_version``, ``backend``, ``model_config`` (``None`` when the file does not
        record them; a legacy file without ``keras_version`` is Keras 1), ``layout``. When the
        file has them: ``training_config``, ``date_saved`` (``.keras``), ``layer_names``
        (keras3 layout: HDF5 path -> user-given layer name).
        """
        self._check_open()
        if self.layout == "keras3" and "layer_names" not in self._meta:
            names = self._layer_names()
            if names:
                self._meta["layer_names"] = names
        return dict(self._meta)

    def verify(self) -> list[str]:
        """Read every tensor (HDF5 checks fletcher32 checksums where present); list problems."""
        problems: list[str] = []
        for name in self._entries:
            try:
                self.read(name)
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def close(self) -> None:
        """Close the HDF5 file and the underlying file; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._h5 is not None:
                self._h5.close()
        finally:
            if self._raw is not None:
                self._raw.close()

    def __enter__(self) -> KerasReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KerasReader({self.path!r}, format={self.format!r}, {len(self._entries)} tensors)"

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise errors.FormatError(f"reader for {self.path} is closed", path=self.path)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"no tensor named {name!r} in {self.path}; see keys() for the names",
                path=self.path,
                key=name,
            ) from None

    def _unsafe(self, msg: str) -> errors.UnsafeContentError:
        return errors.UnsafeContentError(f"{self.path}: {msg}; refusing to read it", path=self.path)

    def _corrupt(self, msg: str) -> errors.FormatError:
        return errors.FormatError(f"{self.path}: {msg}", path=self.path)

    def _walk(self) -> dict[str, Any]:
        """Visit every link once; refuse non-hard links, cycles, deep trees; check datasets.

        Returns HDF5 path -> dataset (already checked by :meth:`_check_dataset`), in visiting
        order (depth-first, HDF5 name order, numeric names in numeric order).
        """
        h5py = _import_h5py()
        visited: set[int] = set()
        datasets: dict[str, Any] = {}
        count = 0
        # Explicit stack: a hostile file must not be able to exhaust Python's recursion limit.
        stack: list[tuple[str, Any, int]] = [("", self._h5, 0)]
        root_addr = h5py.h5o.get_info(self._h5.id).addr
        visited.add(root_addr)
        while stack:
            prefix, group, depth = stack.pop()
            if depth > _MAX_DEPTH:
                raise self._unsafe(f"groups nest deeper than {_MAX_DEPTH} levels at {prefix!r}")
            try:
                names = list(group.keys())
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                raise self._corrupt(f"cannot list group {prefix or '/'!r}: {exc}") from exc
            if len(names) > _MAX_LINKS_PER_GROUP:
                raise self._unsafe(f"group {prefix or '/'!r} has {len(names)} links")
            children: list[tuple[str, Any, int]] = []
            for name in _natural_order(names):
                count += 1
                if count > base.LIMITS.max_entries:
                    raise self._unsafe(f"more than {base.LIMITS.max_entries} HDF5 objects")
                full = f"{prefix}/{name}" if prefix else name
                try:
                    link = group.get(name, getlink=True)
                except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
                    raise self._corrupt(f"cannot read link {full!r}: {exc}") from exc
                if isinstance(link, h5py.ExternalLink):
                    raise self._unsafe(
                        f"{full!r} is an external link to {link.filename!r}:{link.path!r}"
                    )
                if isinstance(link, h5py.SoftLink):
                    # Keras never writes soft links; following one could alias or dangle, and
                    # Keras 3's own loader refuses them too (FORMATS.md §4.2).
                    raise self._unsafe(f"{full!r} is a soft link to {link.path!r}")
                if not isinstance(link, h5py.HardLink):
                    raise self._unsafe(f"{full!r} is a link of unsupported type")
                try:
                    obj = group[name]
                    addr = h5py.h5o.get_info(obj.id).addr
                except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
                    raise self._corrupt(f"cannot open {full!r}: {exc}") from exc
                if addr in visited:
                    # A second hard link to the same object: a cycle or a fan-out that would
                    # make one stored tensor count many times. Keras never writes these.
                    raise self._unsafe(f"{full!r} links to an object already linked elsewhere")
                visited.add(addr)
                if isinstance(obj, h5py.Group):
                    children.append((full, obj, depth + 1))
                elif isinstance(obj, h5py.Dataset):
                    self._check_dataset(obj, full)
                    datasets[full] = obj
                else:
                    raise self._unsafe(f"{full!r} is an object of unsupported type")
            # Reverse so the stack pops children in order.
            stack.extend(reversed(children))
        return datasets

    def _check_dataset(self, dset: Any, name: str) -> None:
        """Refuse external storage, virtual layouts, non-builtin filters and size bombs."""
        try:
            dcpl = dset.id.get_create_plist()
            layout = dcpl.get_layout()
            n_external = dcpl.get_external_count()
            filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
            shape = dset.shape
            itemsize = dset.dtype.itemsize
            stored = dset.id.get_storage_size()
            offset = dset.id.get_offset() if layout == _LAYOUT_CONTIGUOUS else None
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(f"cannot inspect dataset {name!r}: {exc}") from exc
        if layout == _LAYOUT_VIRTUAL:
            raise self._unsafe(f"dataset {name!r} is a virtual dataset (data in other files)")
        if n_external:
            raise self._unsafe(f"dataset {name!r} keeps its data in {n_external} external file(s)")
        if layout not in (_LAYOUT_COMPACT, _LAYOUT_CONTIGUOUS, _LAYOUT_CHUNKED):
            raise self._unsafe(f"dataset {name!r} has unknown storage layout {layout}")
        for fid in filters:
            if fid not in _BUILTIN_FILTERS:
                raise self._unsafe(
                    f"dataset {name!r} needs HDF5 filter {fid}, which is not built into libhdf5 "
                    "(reading it could load a plugin)"
                )
        if shape is None:  # null dataspace: no data at all
            return
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if numel > base.LIMITS.max_tensor_numel:
            raise self._unsafe(f"dataset {name!r} declares {numel} elements")
        declared = numel * itemsize
        if stored > self._stored_limit:
            raise self._corrupt(
                f"dataset {name!r} claims {stored} stored bytes, more than the file holds"
            )
        if offset is not None and offset + stored > self._stored_limit:
            raise self._corrupt(f"dataset {name!r} lies beyond the end of the file (truncated?)")
        if declared > _BOMB_FLOOR_BYTES and declared > base.LIMITS.max_inflate_ratio * stored:
            raise self._unsafe(
                f"dataset {name!r} declares {declared} bytes but stores only {stored} "
                "(fill-value or compression bomb)"
            )

    def _attr(self, obj: Any, name: str) -> Any:
        """Read one attribute after bounding its size; ``None`` when absent."""
        h5py = _import_h5py()
        try:
            if name not in obj.attrs:
                return None
            aid = h5py.h5a.open(obj.id, name.encode())
            shape = aid.shape
            # H5Aget_storage_size fails on empty attributes; the type size is what HDF5 will
            # allocate per element (for variable-length strings: the heap reference, and the
            # heap object itself is bounded by the file's size).
            item = aid.get_type().get_size()
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(f"cannot inspect attribute {name!r}: {exc}") from exc
        numel = math.prod(shape) if shape is not None else 0
        stored = numel * item
        if numel > _MAX_ATTR_ELEMENTS or stored > _MAX_ATTR_BYTES:
            raise self._unsafe(
                f"attribute {name!r} of {obj.name!r} is huge ({numel} elements, {stored} bytes)"
            )
        try:
            return obj.attrs[name]
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(f"cannot read attribute {name!r}: {exc}") from exc

    def _str_attr(self, obj: Any, name: str) -> str | None:
        value = self._attr(obj, name)
        if value is None:
            return None
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value[()]
        if isinstance(value, bytes | np.bytes_):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self._corrupt(f"attribute {name!r} is not UTF-8") from exc
        if isinstance(value, str):
            return value
        raise self._corrupt(f"attribute {name!r} is not a string")

    def _name_list(self, obj: Any, name: str) -> list[str] | None:
        """A list-of-names attribute, joining the split form ``name0``, ``name1``, … (§4.1)."""
        chunks: list[Any] = []
        value = self._attr(obj, name)
        if value is not None:
            chunks.append(value)
        else:
            for i in range(_MAX_ATTR_CHUNKS + 1):
                if i == _MAX_ATTR_CHUNKS:
                    raise self._unsafe(f"attribute {name!r} is split into too many chunks")
                part = self._attr(obj, f"{name}{i}")
                if part is None:
                    break
                chunks.append(part)
            if not chunks:
                return None
        out: list[str] = []
        for chunk in chunks:
            arr = np.asarray(chunk)
            if arr.size == 0:
                continue  # Keras writes an empty float64 array for "no weights"
            if arr.ndim > 1:
                raise self._corrupt(f"attribute {name!r} is not a list of names")
            for item in arr.reshape(-1).tolist():
                if isinstance(item, bytes):
                    try:
                        item = item.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise self._corrupt(f"attribute {name!r} holds non-UTF-8 names") from exc
                if not isinstance(item, str):
                    raise self._corrupt(f"attribute {name!r} holds a non-string name")
                out.append(item)
        return out

    def _is_legacy(self) -> bool:
        if "model_weights" in self._h5:
            return True
        return self._name_list(self._h5, "layer_names") is not None

    def _tensor_entry(self, name: str, h5path: str, dset: Any) -> _Entry:
        dtype = dset.dtype
        bf16 = False
        if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
            if self._str_attr(dset, "dtype") != "bfloat16":
                raise errors.UnsupportedFormatError(
                    f"dataset {h5path!r} in {self.path} has an opaque 2-byte type without "
                    'attribute dtype="bfloat16"; cannot interpret it',
                    path=self.path,
                    key=name,
                )
            bf16 = True
            np_dtype: np.dtype[Any] = np.dtype("V2")
            dtype_name = "bfloat16"
        else:
            np_dtype = dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype
            dtype_name = np_dtype.name
            if np_dtype.fields is not None or dtype_name not in _NUMPY_TO_TORCH:
                raise errors.UnsupportedFormatError(
                    f"dataset {h5path!r} in {self.path} has dtype {dtype}, which is not a "
                    "numeric tensor type",
                    path=self.path,
                    key=name,
                )
            np_dtype = np.dtype(np_dtype.str)
            dtype_name = str(_NUMPY_TO_TORCH[dtype_name]).removeprefix("torch.")
        if dset.shape is None:
            raise self._corrupt(f"dataset {h5path!r} has a null dataspace (no data)")
        shape = tuple(int(d) for d in dset.shape)
        nbytes = math.prod(shape) * np_dtype.itemsize
        info = base.TensorInfo(name=name, dtype=dtype_name, shape=shape, nbytes=nbytes)
        return _Entry(h5path=h5path, info=info, numpy_dtype=np_dtype, bfloat16=bf16)

    def _root_meta(self, obj: Any) -> None:
        for key in ("keras_version", "backend"):
            if key not in self._meta:
                value = self._str_attr(obj, key)
                if value is not None:
                    self._meta[key] = value
        for key in ("model_config", "training_config"):
            text = self._str_attr(obj, key)
            if text is not None:
                self._meta[key] = _parse_json(text, what=f"attribute {key}", path=self.path)

    def _index_legacy(self, datasets: dict[str, Any]) -> None:
        self._root_meta(self._h5)
        wroot_path = "model_weights" if "model_weights" in self._h5 else ""
        wroot = self._h5[wroot_path] if wroot_path else self._h5
        self._root_meta(wroot)
        if "keras_version" not in self._meta:
            self._meta["keras_version"] = None  # FORMATS.md §4.1: absent means Keras 1
        self._meta["layout"] = "legacy"
        layer_names = self._name_list(wroot, "layer_names") or []
        if "top_level_model_weights" in wroot and "top_level_model_weights" not in layer_names:
            layer_names = [*layer_names, "top_level_model_weights"]
        for layer in layer_names:
            lpath = _join(wroot_path, self._component_path(layer, "layer name"))
            lgroup = self._group_at(lpath, f"layer {layer!r}")
            for wname in self._name_list(lgroup, "weight_names") or []:
                dpath = _join(lpath, self._component_path(wname, "weight name"))
                self._add_legacy(datasets, dpath, layer, wname, layer)
        if "optimizer_weights" in self._h5:
            ogroup = self._group_at("optimizer_weights", "optimizer_weights")
            for wname in self._name_list(ogroup, "weight_names") or []:
                dpath = _join("optimizer_weights", self._component_path(wname, "weight name"))
                self._add_legacy(
                    datasets, dpath, "optimizer_weights", wname, "optimizer_weights", prefix=True
                )

    def _add_legacy(
        self,
        datasets: dict[str, Any],
        dpath: str,
        layer: str,
        wname: str,
        tree_key: str,
        *,
        prefix: bool = False,
    ) -> None:
        if dpath not in datasets:
            raise self._corrupt(
                f"layer {layer!r} lists weight {wname!r} but {dpath!r} is not a dataset"
            )
        name = f"{layer}/{wname}" if prefix else wname
        if name in self._entries:
            name = f"{layer}/{wname}"
            if name in self._entries:
                raise self._corrupt(f"weight {wname!r} of layer {layer!r} is listed twice")
        self._entries[name] = self._tensor_entry(name, dpath, datasets[dpath])
        self._tree.setdefault(tree_key, {})[wname] = base.TensorRef(name)

    def _component_path(self, name: str, what: str) -> str:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise self._corrupt(f"{what} {name!r} is not a relative HDF5 path")
        return name

    def _group_at(self, h5path: str, what: str) -> Any:
        h5py = _import_h5py()
        obj = self._h5[h5path] if h5path in self._h5 else None
        if not isinstance(obj, h5py.Group):
            raise self._corrupt(f"{what} is listed but {h5path!r} is not a group")
        return obj

    def _index_keras3(self, datasets: dict[str, Any]) -> None:
        self._meta["layout"] = "keras3"
        self._root_meta(self._h5)
        if not datasets and "vars" not in self._h5 and "layers" not in self._h5:
            raise errors.UnsupportedFormatError(
                f"{self.path} is an HDF5 file but neither a legacy Keras file (no layer_names) "
                "nor a Keras 3 weights file (no vars groups)",
                path=self.path,
            )
        for h5path, dset in datasets.items():
            self._entries[h5path] = self._tensor_entry(h5path, h5path, dset)
            node = self._tree
            parts = h5path.split("/")
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise self._corrupt(f"{h5path!r} is both a tensor and a group")
                node = child
            node[parts[-1]] = base.TensorRef(h5path)
            parent = h5path.rpartition("/")[0]
            if parent.endswith("vars") and parent not in self._vars_groups:
                self._vars_groups.append(parent)

    def _layer_names(self) -> dict[str, str]:
        """Attribute path -> user-given layer name, from each ``vars`` group's ``name``.

        Read only when ``metadata()`` asks: these are variable-length string attributes, the
        kind on which fuzzing made libhdf5 hang, so listing and reading tensors avoid them.
        """
        names: dict[str, str] = {}
        with _as_format_error(self.path, "cannot read layer names"):
            for group in self._vars_groups:
                label = self._str_attr(self._h5[group], "name")
                if label is not None:
                    names[group.removesuffix("/vars").removesuffix("vars")] = label
        return names


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _natural_order(names: list[str]) -> list[str]:
    """HDF5 order, but ``vars/10`` after ``vars/9`` (Keras numbers variables, FORMATS.md §4.2)."""
    if names and all(n.isdigit() and n.isascii() for n in names):
        return sorted(names, key=lambda n: (len(n), n))
    return names


# --------------------------------------------------------------------------------------------
# .keras zip
# --------------------------------------------------------------------------------------------


def _zip_members(raw: io.BufferedReader, path: str, file_size: int) -> dict[str, _zip.ZipMember]:
    """Checked zip directory (``_zip``: local headers, ranges, overlaps, duplicates), plus
    member names that stay inside the archive root (FORMATS.md §1.6)."""
    members: dict[str, _zip.ZipMember] = {}
    for member in _zip.read_directory(raw, path, file_size):
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts or ":" in name:
            raise errors.UnsafeContentError(
                f"{path} has zip member {name!r} outside the archive root", path=path, key=name
            )
        members[name] = member
    return members


def _read_member(raw: io.BufferedReader, member: _zip.ZipMember, path: str) -> bytes:
    """Bytes of a small JSON member: STORED, or DEFLATED with a bounded inflate."""
    return _zip.read_member(raw, member, path, max_bytes=_MAX_JSON_BYTES)


def _open_zip(path: str) -> KerasReader:
    h5py = _import_h5py()
    raw = open(path, "rb")  # noqa: SIM115 - owned by the reader, closed in close()
    try:
        file_size = os.fstat(raw.fileno()).st_size
        members = _zip_members(raw, path, file_size)
        meta: dict[str, Any] = {}
        if "metadata.json" in members:
            data = _parse_json(
                _read_member(raw, members["metadata.json"], path), what="metadata.json", path=path
            )
            if isinstance(data, dict):
                for key in ("keras_version", "date_saved", "backend"):
                    if key in data:
                        meta[key] = data[key]
        if "config.json" in members:
            # Data only: a Lambda layer's bytecode stays a string (FORMATS.md §4.4).
            meta["model_config"] = _parse_json(
                _read_member(raw, members["config.json"], path), what="config.json", path=path
            )
        if "model.weights.h5" not in members:
            if "model.weights.npz" in members:
                raise errors.UnsupportedFormatError(
                    f"{path} stores its weights as model.weights.npz, which this reader does not "
                    "support; open that member with the numpy reader",
                    path=path,
                )
            raise errors.FormatError(
                f"{path} is a zip without model.weights.h5; not a .keras file", path=path
            )
        member = members["model.weights.h5"]
        if member.method != _zip.STORED or member.compressed != member.size:
            raise errors.UnsafeContentError(
                f"{path}: model.weights.h5 is compressed (method {member.method}); Keras stores "
                "it uncompressed and we read it in place, so refusing",
                path=path,
            )
        view = _RangeFile(raw, member.start, member.size)
        try:
            h5file = h5py.File(view, "r")
        except (OSError, ValueError, RuntimeError) as exc:
            raise errors.FormatError(
                f"{path}: model.weights.h5 is not a valid HDF5 file: {exc}", path=path
            ) from exc
        return KerasReader(path, "keras3", h5file, raw, member.size, meta)
    except BaseException:
        raw.close()
        raise


def _open_h5(path: str) -> KerasReader:
    h5py = _import_h5py()
    file_size = os.path.getsize(path)
    try:
        h5file = h5py.File(path, "r")
    except (OSError, ValueError, RuntimeError) as exc:
        raise errors.FormatError(f"{path} is not a valid HDF5 file: {exc}", path=path) from exc
    return KerasReader(path, "keras-h5", h5file, None, file_size, {})


def open_keras(
    path: str | os.PathLike[str], *, isolate: bool = False, isolate_timeout: float = 300.0
) -> KerasReader:
    """Open a Keras ``.h5``, ``.weights.h5`` or ``.keras`` file for safe, lazy reading.

    Args:
        path: The file. Its first bytes decide the format (zip -> ``.keras``, else HDF5).
        isolate: First open and read the whole file in a child process, so that a crash or
            hang inside libhdf5 on a malicious file becomes a :class:`FormatError` here instead
            of killing this process. Costs one Python start-up plus one extra read of the file;
            recommended for files from untrusted sources (libhdf5 does crash on some corrupt
            files: see docs/formats-keras-darknet.md). The file must not change in between.
        isolate_timeout: Seconds the child may take before the file is refused.

    Returns:
        A :class:`KerasReader` (a :class:`savegame.interop.base.ForeignReader`).

    Raises:
        CheckpointNotFoundError: Nothing at ``path``.
        MissingDependencyError: h5py is not installed (``pip install savegame[keras]``).
        UnsafeContentError: Links, external or virtual storage, plugin filters, bombs.
        UnsupportedFormatError: An HDF5 file that is not a Keras file, or unsupported dtypes.
        FormatError: Corrupt or truncated data.
    """
    spath = os.fspath(path)
    if isolate:
        _preflight(spath, isolate_timeout)
    try:
        with open(spath, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no file at {spath}", path=spath) from exc
    except IsADirectoryError as exc:
        raise errors.FormatError(f"{spath} is a directory, not a Keras file", path=spath) from exc
    with _as_format_error(spath, "cannot open"):
        if head.startswith(_ZIP_MAGIC):
            return _open_zip(spath)
        return _open_h5(spath)


# --------------------------------------------------------------------------------------------
# Process isolation (open_keras(..., isolate=True))
# --------------------------------------------------------------------------------------------

_CHILD_OK = 0
_CHILD_TYPED_ERROR = 3
_CHILD_NO_IMPORT = 4


def _preflight(path: str, timeout: float) -> None:
    """Open, list, read and verify ``path`` in a child Python; refuse if the child dies.

    A typed error in the child is not raised here: the in-process open that follows runs the
    same code on the same bytes and raises it itself, with its proper class and attributes.
    """
    # The child gets this process's sys.path, so it imports the same savegame.
    code = (
        "import json, sys\n"
        "sys.path[:0] = json.loads(sys.argv[2])\n"
        "try:\n"
        "    import savegame.interop.keras as k\n"
        "except ImportError:\n"
        f"    sys.exit({_CHILD_NO_IMPORT})\n"
        "k._child_main()\n"
    )
    cmd = [sys.executable, "-c", code, path, json.dumps(sys.path)]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise errors.FormatError(
            f"{path}: reading it in an isolated process took more than {timeout} s; refusing "
            "(a hang inside libhdf5 on a malformed file?)",
            path=path,
        ) from exc
    if done.returncode in (_CHILD_OK, _CHILD_TYPED_ERROR):
        return
    if done.returncode == _CHILD_NO_IMPORT:
        raise errors.MissingDependencyError(
            f"isolate=True could not start a child Python ({sys.executable}) that imports "
            f"savegame, so {path} was not checked; install savegame into that interpreter or "
            "open without isolate",
            path=path,
        )
    tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
    if done.returncode < 0:
        what = f"libhdf5 crashed (signal {-done.returncode})"
    else:
        what = f"the isolated reader failed (exit status {done.returncode})"
    raise errors.FormatError(
        f"{path}: {what} while parsing the file; it is corrupt or malicious, refusing it. "
        f"Child said: {' | '.join(tail) or '(nothing)'}",
        path=path,
    )


def _child_main() -> None:  # pragma: no cover - runs in the child process of _preflight
    path = sys.argv[1]
    try:
        with open_keras(path) as reader:
            reader.metadata()
            reader.tree()
            for name in reader.keys():
                reader.read(name)
    except errors.CheckpointError:
        sys.exit(_CHILD_TYPED_ERROR)
    sys.exit(_CHILD_OK)
