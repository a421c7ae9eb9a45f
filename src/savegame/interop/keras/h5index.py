"""The libhdf5 side of the Keras reader: index a Keras HDF5 file with h5py, importing nothing
else (no savegame, no torch), so that it can run as a small isolation child.

Key invariant: this module is the only code that hands bytes from a Keras file to libhdf5, and
it runs in one of two places. With ``open_keras(..., isolate=True)`` (the default) it runs in a
child Python started by :func:`savegame.interop.keras.isolation.isolated_index` that imports
only this file, numpy and h5py (about 0.2 s), dies with its parent (``PR_SET_PDEATHSIG`` on
Linux, plus a parent-pid check) and is killed on timeout; the parent receives plain data (JSON
plus the bytes of the few datasets it cannot read itself) and never calls libhdf5, so a crash
or hang inside libhdf5 on a malformed file costs only the child. With ``isolate=False``
(trusted files) the same code runs in-process.

It is one file on purpose, longer than the house's ~600 lines: the child loads exactly this
file by path, so the test of the child's imports (``tests/hostile/test_keras_hostile.py``)
covers everything that runs beside libhdf5; a split would need a multi-file loader there.

The child reads the file through the file descriptor the parent opened (``pass_fds``), so both
see the same file even if the path is replaced in between; the parent compares ``fstat`` before
and after and at every read, and refuses a file that changed.

Checks (FORMATS.md §4.4): every link is a hard link visited once; no external raw storage,
virtual datasets or non-builtin filters (so libhdf5 never searches for a plugin); declared sizes
are bounded against the stored bytes; attributes are bounded before they are read; JSON
attributes are parsed as data. Errors are :class:`Problem` (kind ``format``, ``unsafe`` or
``unsupported``), which :mod:`savegame.interop.keras.isolation` turns into savegame's typed
errors.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

# Caps (FORMATS.md §4.4, §7). Keras' own nesting is < 10 levels deep. The numeric limits mirror
# savegame.interop.base.LIMITS, passed in by the caller (this module cannot import savegame).
MAX_DEPTH = 64
MAX_LINKS_PER_GROUP = 1_000_000
# One attribute (model_config, a layer_names chunk, …) may hold at most this many stored bytes
# and elements. Keras splits name lists at 64,512 bytes, and model configs are JSON text.
MAX_ATTR_BYTES = 64 << 20
MAX_ATTR_ELEMENTS = 1_000_000
MAX_ATTR_CHUNKS = 100_000  # layer_names0 … layer_namesN
# A dataset whose logical size exceeds its stored bytes by more than max_inflate_ratio is a
# fill-value or compression bomb; below this floor we do not bother (tiny fill-value tensors).
BOMB_FLOOR_BYTES = 16 << 20
MAX_JSON_CHARS = 64 << 20
MAX_RANK = 64

# Filters built into libhdf5 itself: deflate, shuffle, fletcher32, szip, nbit, scaleoffset
# (H5Zpublic.h). Anything else (h5py's LZF, hdf5plugin's Blosc, …) would go through a loaded
# or third-party filter, which we refuse.
BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6})
_LAYOUT_COMPACT, _LAYOUT_CONTIGUOUS, _LAYOUT_CHUNKED, _LAYOUT_VIRTUAL = 0, 1, 2, 3

# numpy dtype name -> torch dtype name (the same names; bfloat16 handled apart).
NUMERIC = frozenset(
    "bool uint8 int8 int16 uint16 int32 uint32 int64 uint64 float16 float32 float64 "
    "complex64 complex128".split()
)

# What h5py raises for malformed files (HDF5 errors map onto these built-ins).
H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, OverflowError)


class Problem(Exception):
    """A refusal, as data: ``kind`` is ``format``, ``unsafe`` or ``unsupported``."""

    def __init__(self, kind: str, msg: str, key: str | None = None) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg
        self.key = key


@contextmanager
def as_problem(path: str, what: str, key: str | None = None) -> Iterator[None]:
    """Turn any h5py/libhdf5 failure into a ``format`` :class:`Problem` naming ``path``."""
    try:
        yield
    except Problem:
        raise
    except H5_ERRORS as exc:
        raise Problem(
            "format", f"{path}: {what}: {exc}; the file is corrupt or not a Keras file", key
        ) from exc


class RangeFile(io.RawIOBase):
    """Read-only, seekable view of ``[start, start+size)`` of an open binary file.

    h5py's file-object driver reads through it, so HDF5 sees a zip member as a whole file and
    can never read outside the member's byte range. Reads use ``pread`` when the file has a
    descriptor, so a shared file offset is never moved.
    """

    def __init__(self, raw: Any, start: int, size: int) -> None:
        super().__init__()
        self._raw = raw
        self._start = start
        self._size = size
        self._pos = 0
        try:
            self._fd: int | None = raw.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None

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
        if self._fd is not None:
            data = os.pread(self._fd, want, self._start + self._pos)
            got = len(data)
            view[:got] = data
        else:
            self._raw.seek(self._start + self._pos)
            got = self._raw.readinto(view[:want]) or 0
        self._pos += got
        return got

    def write(self, b: Any) -> int:
        raise OSError("read-only")


def parse_json(raw: bytes | str, *, what: str, path: str, max_depth: int) -> Any:
    """Parse JSON text as plain data (dicts, lists, str, numbers); never builds objects."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Problem(
                "format", f"{what} in {path} is not UTF-8 text; the file is corrupt"
            ) from exc
    else:
        text = raw
    if len(text) > MAX_JSON_CHARS:
        raise Problem(
            "format", f"{what} in {path} is {len(text)} characters, over the {MAX_JSON_CHARS} cap"
        )
    if not _json_depth_ok(text, max_depth):
        raise Problem("format", f"{what} in {path} nests deeper than {max_depth} levels; refusing")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Problem("format", f"{what} in {path} is not valid JSON: {exc}") from exc


def _json_depth_ok(text: str, max_depth: int) -> bool:
    # A copy of savegame.interop.base.json_depth_ok (this module cannot import savegame).
    depth = 0
    in_str = escape = False
    for ch in text:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _natural_order(names: list[str]) -> list[str]:
    """HDF5 order, but ``vars/10`` after ``vars/9`` (Keras numbers variables, FORMATS.md §4.2)."""
    if names and all(n.isdigit() and n.isascii() for n in names):
        return sorted(names, key=lambda n: (len(n), n))
    return names


def shape_problem(shape: tuple[int, ...], max_numel: int) -> str | None:
    """Same rule as ``savegame.interop._bounds.shape_problem`` (numpy must accept the shape)."""
    if len(shape) > MAX_RANK:
        return f"rank {len(shape)} exceeds {MAX_RANK}"
    product = 1
    for dim in shape:
        if dim < 0 or dim > max_numel:
            return f"dimension {dim} is out of range"
        if dim:
            product *= dim
            if product > max_numel:
                return f"shape {shape} has more than {max_numel} elements"
    return None


class Indexer:
    """Walk one open HDF5 file and describe every Keras tensor in it (see :meth:`run`)."""

    def __init__(
        self, h5py: Any, h5file: Any, path: str, stored_limit: int, limits: dict[str, int]
    ):
        self.h5py = h5py
        self.h5 = h5file
        self.path = path
        self.stored_limit = stored_limit  # bytes HDF5 can possibly hold (file or member size)
        self.limits = limits  # max_entries, max_tensor_numel, max_inflate_ratio, max_json_depth
        self.entries: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, Any] = {}  # h5path -> h5py.Dataset
        self.tree: list[list[str]] = []  # [*path parts, tensor name]
        self.meta: dict[str, Any] = {}
        self.layout = "keras3"
        self.vars_groups: list[str] = []

    # -- errors -------------------------------------------------------------------------------

    def unsafe(self, msg: str) -> Problem:
        return Problem("unsafe", f"{self.path}: {msg}; refusing to read it")

    def corrupt(self, msg: str) -> Problem:
        return Problem("format", f"{self.path}: {msg}")

    # -- entry point --------------------------------------------------------------------------

    def run(self, zip_meta: dict[str, Any], *, raw_ranges: bool) -> dict[str, Any]:
        """Index the file. Returns plain, JSON-serialisable data:

        ``layout``, ``meta``, ``tree`` and ``entries`` (name -> h5path, dtype, shape, nbytes,
        ``np``: numpy dtype to read into, ``file``: stored numpy dtype, ``bf16``, and with
        ``raw_ranges`` ``raw``: ``[offset, nbytes]`` of the stored bytes when the dataset is
        contiguous, unfiltered and of a standard type, so it can be read without libhdf5).
        """
        self.meta = dict(zip_meta)
        with as_problem(self.path, "cannot index the HDF5 file"):
            self.datasets = self._walk()
            if self._is_legacy():
                self.layout = "legacy"
                self._index_legacy()
            else:
                self._index_keras3()
            for key in ("keras_version", "backend", "model_config"):
                self.meta.setdefault(key, None)
            if raw_ranges:
                for entry in self.entries.values():
                    entry["raw"] = self._raw_range(entry)
        return {
            "layout": self.layout,
            "meta": self.meta,
            "tree": self.tree,
            "entries": self.entries,
            "vars_groups": self.vars_groups,
        }

    # -- walking ------------------------------------------------------------------------------

    def _walk(self) -> dict[str, Any]:
        """Visit every link once; refuse non-hard links, cycles, deep trees; check datasets.

        Returns HDF5 path -> dataset, depth-first, HDF5 name order (numeric names numerically).
        """
        h5py = self.h5py
        visited: set[int] = set()
        datasets: dict[str, Any] = {}
        count = 0
        # Explicit stack: a hostile file must not be able to exhaust Python's recursion limit.
        stack: list[tuple[str, Any, int]] = [("", self.h5, 0)]
        visited.add(h5py.h5o.get_info(self.h5.id).addr)
        while stack:
            prefix, group, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise self.unsafe(f"groups nest deeper than {MAX_DEPTH} levels at {prefix!r}")
            try:
                names = list(group.keys())
            except H5_ERRORS as exc:
                raise self.corrupt(f"cannot list group {prefix or '/'!r}: {exc}") from exc
            if len(names) > MAX_LINKS_PER_GROUP:
                raise self.unsafe(f"group {prefix or '/'!r} has {len(names)} links")
            children: list[tuple[str, Any, int]] = []
            for name in _natural_order(names):
                count += 1
                if count > self.limits["max_entries"]:
                    raise self.unsafe(f"more than {self.limits['max_entries']} HDF5 objects")
                full = f"{prefix}/{name}" if prefix else name
                try:
                    link = group.get(name, getlink=True)
                except H5_ERRORS as exc:
                    raise self.corrupt(f"cannot read link {full!r}: {exc}") from exc
                if isinstance(link, h5py.ExternalLink):
                    raise self.unsafe(
                        f"{full!r} is an external link to {link.filename!r}:{link.path!r}"
                    )
                if isinstance(link, h5py.SoftLink):
                    # Keras never writes soft links; following one could alias or dangle, and
                    # Keras 3's own loader refuses them too (FORMATS.md §4.2).
                    raise self.unsafe(f"{full!r} is a soft link to {link.path!r}")
                if not isinstance(link, h5py.HardLink):
                    raise self.unsafe(f"{full!r} is a link of unsupported type")
                try:
                    obj = group[name]
                    addr = h5py.h5o.get_info(obj.id).addr
                except H5_ERRORS as exc:
                    raise self.corrupt(f"cannot open {full!r}: {exc}") from exc
                if addr in visited:
                    # A second hard link to one object: a cycle, or a fan-out that would make
                    # one stored tensor count many times. Keras never writes these.
                    raise self.unsafe(f"{full!r} links to an object already linked elsewhere")
                visited.add(addr)
                if isinstance(obj, h5py.Group):
                    children.append((full, obj, depth + 1))
                elif isinstance(obj, h5py.Dataset):
                    self._check_dataset(obj, full)
                    datasets[full] = obj
                else:
                    raise self.unsafe(f"{full!r} is an object of unsupported type")
            stack.extend(reversed(children))  # so the stack pops children in order
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
        except H5_ERRORS as exc:
            raise self.corrupt(f"cannot inspect dataset {name!r}: {exc}") from exc
        if layout == _LAYOUT_VIRTUAL:
            raise self.unsafe(f"dataset {name!r} is a virtual dataset (data in other files)")
        if n_external:
            raise self.unsafe(f"dataset {name!r} keeps its data in {n_external} external file(s)")
        if layout not in (_LAYOUT_COMPACT, _LAYOUT_CONTIGUOUS, _LAYOUT_CHUNKED):
            raise self.unsafe(f"dataset {name!r} has unknown storage layout {layout}")
        for fid in filters:
            if fid not in BUILTIN_FILTERS:
                raise self.unsafe(
                    f"dataset {name!r} needs HDF5 filter {fid}, which is not built into libhdf5 "
                    "(reading it could load a plugin)"
                )
        if shape is None:  # null dataspace: no data at all
            return
        problem = shape_problem(tuple(int(d) for d in shape), self.limits["max_tensor_numel"])
        if problem is not None:
            raise self.unsafe(f"dataset {name!r}: {problem}")
        declared = math.prod(int(d) for d in shape) * itemsize
        if stored > self.stored_limit:
            raise self.corrupt(
                f"dataset {name!r} claims {stored} stored bytes, more than the file holds"
            )
        if offset is not None and offset + stored > self.stored_limit:
            raise self.corrupt(f"dataset {name!r} lies beyond the end of the file (truncated?)")
        ratio = self.limits["max_inflate_ratio"]
        if declared > BOMB_FLOOR_BYTES and declared > ratio * stored:
            raise self.unsafe(
                f"dataset {name!r} declares {declared} bytes but stores only {stored} "
                "(fill-value or compression bomb)"
            )

    def _raw_range(self, entry: dict[str, Any]) -> list[int] | None:
        """``[offset, nbytes]`` when the parent may read the stored bytes directly."""
        if entry["nbytes"] == 0:
            return None
        h5t = self.h5py.h5t
        dset = self.datasets[entry["h5path"]]
        with as_problem(self.path, f"cannot inspect dataset {entry['h5path']!r}", entry["name"]):
            dcpl = dset.id.get_create_plist()
            if dcpl.get_layout() != _LAYOUT_CONTIGUOUS or dcpl.get_nfilters():
                return None
            offset = dset.id.get_offset()
            stored = dset.id.get_storage_size()
            tid = dset.id.get_type()
            cls = tid.get_class()
            if cls == h5t.OPAQUE:
                standard = entry["bf16"]  # two opaque bytes, copied as they are
            elif cls in (h5t.INTEGER, h5t.FLOAT) and entry["dtype"] != "bool":
                # Only the standard IEEE/two's-complement types: a custom float of the same size
                # would need libhdf5's conversion.
                standard = tid.equal(h5t.py_create(np.dtype(entry["file"])))
            else:
                standard = False  # enums (bool), compounds (complex): libhdf5 converts them
        if not standard or offset is None or stored != entry["nbytes"]:
            return None
        if offset < 0 or offset + stored > self.stored_limit:
            raise self.corrupt(f"dataset {entry['h5path']!r} lies beyond the end of the file")
        return [int(offset), int(stored)]

    # -- attributes ---------------------------------------------------------------------------

    def attr(self, obj: Any, name: str) -> Any:
        """Read one attribute after bounding its size; ``None`` when absent."""
        h5py = self.h5py
        try:
            if name not in obj.attrs:
                return None
            aid = h5py.h5a.open(obj.id, name.encode())
            shape = aid.shape
            # H5Aget_storage_size fails on empty attributes; the type size is what HDF5 will
            # allocate per element (for variable-length strings: the heap reference, and the
            # heap object itself is bounded by the file's size).
            item = aid.get_type().get_size()
        except H5_ERRORS as exc:
            raise self.corrupt(f"cannot inspect attribute {name!r}: {exc}") from exc
        if shape is not None and shape_problem(tuple(shape), MAX_ATTR_ELEMENTS) is not None:
            raise self.unsafe(f"attribute {name!r} of {obj.name!r} has shape {shape}")
        numel = math.prod(shape) if shape is not None else 0
        stored = numel * item
        if numel > MAX_ATTR_ELEMENTS or stored > MAX_ATTR_BYTES:
            raise self.unsafe(
                f"attribute {name!r} of {obj.name!r} is huge ({numel} elements, {stored} bytes)"
            )
        try:
            return obj.attrs[name]
        except H5_ERRORS as exc:
            raise self.corrupt(f"cannot read attribute {name!r}: {exc}") from exc

    def str_attr(self, obj: Any, name: str) -> str | None:
        value = self.attr(obj, name)
        if value is None:
            return None
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value[()]
        if isinstance(value, bytes | np.bytes_):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.corrupt(f"attribute {name!r} is not UTF-8") from exc
        if isinstance(value, str):
            return value
        raise self.corrupt(f"attribute {name!r} is not a string")

    def _name_list(self, obj: Any, name: str) -> list[str] | None:
        """A list-of-names attribute, joining the split form ``name0``, ``name1``, … (§4.1)."""
        chunks: list[Any] = []
        value = self.attr(obj, name)
        if value is not None:
            chunks.append(value)
        else:
            for i in range(MAX_ATTR_CHUNKS + 1):
                if i == MAX_ATTR_CHUNKS:
                    raise self.unsafe(f"attribute {name!r} is split into too many chunks")
                part = self.attr(obj, f"{name}{i}")
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
                raise self.corrupt(f"attribute {name!r} is not a list of names")
            for item in arr.reshape(-1).tolist():
                if isinstance(item, bytes):
                    try:
                        item = item.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise self.corrupt(f"attribute {name!r} holds non-UTF-8 names") from exc
                if not isinstance(item, str):
                    raise self.corrupt(f"attribute {name!r} holds a non-string name")
                out.append(item)
        return out

    # -- layouts ------------------------------------------------------------------------------

    def _is_legacy(self) -> bool:
        if "model_weights" in self.h5:
            return True
        return self._name_list(self.h5, "layer_names") is not None

    def _tensor_entry(self, name: str, h5path: str, dset: Any) -> dict[str, Any]:
        dtype = dset.dtype
        bf16 = False
        if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
            if self.str_attr(dset, "dtype") != "bfloat16":
                raise Problem(
                    "unsupported",
                    f"dataset {h5path!r} in {self.path} has an opaque 2-byte type without "
                    'attribute dtype="bfloat16"; cannot interpret it',
                    name,
                )
            bf16 = True
            np_dtype: np.dtype[Any] = np.dtype("V2")
            dtype_name = "bfloat16"
        else:
            np_dtype = dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype
            dtype_name = np_dtype.name
            if np_dtype.fields is not None or dtype_name not in NUMERIC:
                raise Problem(
                    "unsupported",
                    f"dataset {h5path!r} in {self.path} has dtype {dtype}, which is not a "
                    "numeric tensor type",
                    name,
                )
            np_dtype = np.dtype(np_dtype.str)
        if dset.shape is None:
            raise self.corrupt(f"dataset {h5path!r} has a null dataspace (no data)")
        shape = [int(d) for d in dset.shape]
        return {
            "name": name,
            "h5path": h5path,
            "dtype": dtype_name,
            "shape": shape,
            "nbytes": math.prod(shape) * np_dtype.itemsize,
            "np": np_dtype.str,
            "file": dtype.str,
            "bf16": bf16,
            "raw": None,
        }

    def _root_meta(self, obj: Any) -> None:
        for key in ("keras_version", "backend"):
            if key not in self.meta:
                value = self.str_attr(obj, key)
                if value is not None:
                    self.meta[key] = value
        for key in ("model_config", "training_config"):
            text = self.str_attr(obj, key)
            if text is not None:
                self.meta[key] = parse_json(
                    text,
                    what=f"attribute {key}",
                    path=self.path,
                    max_depth=self.limits["max_json_depth"],
                )

    def _index_legacy(self) -> None:
        self._root_meta(self.h5)
        wroot_path = "model_weights" if "model_weights" in self.h5 else ""
        wroot = self.h5[wroot_path] if wroot_path else self.h5
        self._root_meta(wroot)
        if "keras_version" not in self.meta:
            self.meta["keras_version"] = None  # FORMATS.md §4.1: absent means Keras 1
        self.meta["layout"] = "legacy"
        layer_names = self._name_list(wroot, "layer_names") or []
        if "top_level_model_weights" in wroot and "top_level_model_weights" not in layer_names:
            layer_names = [*layer_names, "top_level_model_weights"]
        for layer in layer_names:
            lpath = _join(wroot_path, self._component_path(layer, "layer name"))
            lgroup = self._group_at(lpath, f"layer {layer!r}")
            for wname in self._name_list(lgroup, "weight_names") or []:
                dpath = _join(lpath, self._component_path(wname, "weight name"))
                self._add_legacy(dpath, layer, wname, layer)
        if "optimizer_weights" in self.h5:
            ogroup = self._group_at("optimizer_weights", "optimizer_weights")
            for wname in self._name_list(ogroup, "weight_names") or []:
                dpath = _join("optimizer_weights", self._component_path(wname, "weight name"))
                self._add_legacy(
                    dpath, "optimizer_weights", wname, "optimizer_weights", prefix=True
                )

    def _add_legacy(
        self, dpath: str, layer: str, wname: str, tree_key: str, *, prefix: bool = False
    ) -> None:
        if dpath not in self.datasets:
            raise self.corrupt(
                f"layer {layer!r} lists weight {wname!r} but {dpath!r} is not a dataset"
            )
        name = f"{layer}/{wname}" if prefix else wname
        if name in self.entries:
            name = f"{layer}/{wname}"
            if name in self.entries:
                raise self.corrupt(f"weight {wname!r} of layer {layer!r} is listed twice")
        self.entries[name] = self._tensor_entry(name, dpath, self.datasets[dpath])
        self.tree.append([tree_key, wname, name])

    def _component_path(self, name: str, what: str) -> str:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise self.corrupt(f"{what} {name!r} is not a relative HDF5 path")
        return name

    def _group_at(self, h5path: str, what: str) -> Any:
        obj = self.h5[h5path] if h5path in self.h5 else None
        if not isinstance(obj, self.h5py.Group):
            raise self.corrupt(f"{what} is listed but {h5path!r} is not a group")
        return obj

    def _index_keras3(self) -> None:
        self.meta["layout"] = "keras3"
        self._root_meta(self.h5)
        if not self.datasets and "vars" not in self.h5 and "layers" not in self.h5:
            raise Problem(
                "unsupported",
                f"{self.path} is an HDF5 file but neither a legacy Keras file (no layer_names) "
                "nor a Keras 3 weights file (no vars groups)",
            )
        seen_groups: set[str] = set()
        for h5path, dset in self.datasets.items():
            self.entries[h5path] = self._tensor_entry(h5path, h5path, dset)
            parts = h5path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in self.entries:
                    raise self.corrupt(f"{'/'.join(parts[:i])!r} is both a tensor and a group")
            self.tree.append([*parts, h5path])
            parent = h5path.rpartition("/")[0]
            if parent.endswith("vars") and parent not in seen_groups:
                seen_groups.add(parent)
                self.vars_groups.append(parent)

    def layer_names(self) -> dict[str, str]:
        """Attribute path -> user-given layer name, from each ``vars`` group's ``name``.

        These are variable-length string attributes, the kind on which fuzzing made libhdf5
        hang; in-process readers read them only when ``metadata()`` asks.
        """
        names: dict[str, str] = {}
        with as_problem(self.path, "cannot read layer names"):
            for group in self.vars_groups:
                label = self.str_attr(self.h5[group], "name")
                if label is not None:
                    names[group.removesuffix("/vars").removesuffix("vars")] = label
        return names


def open_file(h5py: Any, source: Any, path: str, what: str) -> Any:
    """``h5py.File(source, "r")``; ``what`` names the HDF5 part in messages."""
    try:
        return h5py.File(source, "r")
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise Problem("format", f"{path}: {what} is not a valid HDF5 file: {exc}") from exc


def read_array(h5file: Any, entry: dict[str, Any], path: str) -> np.ndarray:
    """Read one dataset through libhdf5 into a new native-order array (bfloat16 as ``V2``)."""
    arr = np.empty(tuple(entry["shape"]), dtype=np.dtype(entry["np"]))
    if arr.size:
        with as_problem(path, f"cannot read tensor {entry['name']!r}", entry["name"]):
            h5file[entry["h5path"]].read_direct(arr)
    return arr


# ---------------------------------------------------------------------------------------------
# The isolation child
# ---------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Make the kernel kill this process when its parent dies (Linux), then make sure the
    parent is still the one that started us (it may have died before prctl)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != parent_pid:
        os._exit(70)


def _write_frame(out: Any, doc: dict[str, Any], blobs: list[bytes]) -> None:
    data = json.dumps(doc).encode("utf-8")
    out.write(struct.pack("<Q", len(data)))
    out.write(data)
    for blob in blobs:
        out.write(blob)
    out.flush()


def child_main(argv: list[str]) -> None:  # pragma: no cover - runs in the isolation child
    """``argv``: parent pid, fd, start, size, path label, JSON options. Writes one frame."""
    parent_pid, fd, start, size = (int(a) for a in argv[:4])
    path = argv[4]
    opts = json.loads(argv[5])
    _die_with_parent(parent_pid)
    out = sys.stdout.buffer
    try:
        import h5py
    except ImportError:
        _write_frame(out, {"error": "import", "msg": "h5py is not importable"}, [])
        return
    blobs: list[bytes] = []
    try:
        raw = os.fdopen(fd, "rb", closefd=False)
        view = RangeFile(raw, start, size)
        h5file = open_file(h5py, view, path, opts["what"])
        with h5file:
            idx = Indexer(h5py, h5file, path, size, opts["limits"])
            doc = idx.run({}, raw_ranges=True)
            if doc["layout"] == "keras3":
                names = idx.layer_names()
                if names:
                    doc["meta"]["layer_names"] = names
            # Datasets the parent cannot read without libhdf5 are read here, once.
            # A dataset that fails to read (a fletcher32 mismatch, a broken chunk) fails only
            # its own read() in the parent, as it would in-process.
            for entry in doc["entries"].values():
                if entry["raw"] is None and entry["nbytes"]:
                    try:
                        blob = read_array(h5file, entry, path).tobytes()
                    except Problem as exc:
                        entry["inline_error"] = [exc.kind, exc.msg]
                        continue
                    entry["inline"] = len(blob)
                    blobs.append(blob)
    except Problem as exc:
        _write_frame(out, {"error": exc.kind, "msg": exc.msg, "key": exc.key}, [])
        return
    _write_frame(out, doc, blobs)
