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
  file-like view of its byte range (no extraction). Weight shapes are checked against what
  ``config.json`` implies for the layers it describes (Dense, Conv, BatchNormalization, …).

Isolation (the default, ``isolate=True``): libhdf5 is a large C library that crashes or hangs on
some malformed files, so it only ever sees the file inside a small child process
(:mod:`savegame.interop._h5index`: numpy + h5py, no torch, about 0.2 s), which sends back the
index and the bytes of the few datasets the parent cannot read directly; contiguous datasets
(what Keras writes) are then read by offset in this process without libhdf5. A crash, a hang
past ``isolate_timeout`` or a file that changes meanwhile become a :class:`FormatError`; the child
dies with its parent. ``isolate=False`` runs libhdf5 in-process: only for trusted files.

Example:
    >>> with open_keras("model.keras") as r:  # doctest: +SKIP
    ...     print(r.keys()[:2], r.metadata()["keras_version"])
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from savegame import errors
from savegame.interop import _h5index, _zip, base

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_ISOLATE_TIMEOUT", "KerasReader", "open_keras"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_ATTR_ELEMENTS = _h5index.MAX_ATTR_ELEMENTS
_MAX_JSON_BYTES = _h5index.MAX_JSON_CHARS  # JSON members of a .keras zip

DEFAULT_ISOLATE_TIMEOUT = 300.0
"""Seconds the isolation child may take (it parses the structure and reads only datasets that
are not stored contiguously, so a healthy file needs well under a second plus ~0.2 s start-up)."""

_PROBLEM_TYPES: dict[str, type[errors.CheckpointError]] = {
    "format": errors.FormatError,
    "unsafe": errors.UnsafeContentError,
    "unsupported": errors.UnsupportedFormatError,
}


def _typed(exc: _h5index.Problem, path: str) -> errors.CheckpointError:
    return _PROBLEM_TYPES[exc.kind](exc.msg, path=path, key=exc.key)


@contextmanager
def _typed_errors(path: str) -> Iterator[None]:
    """Problems from :mod:`_h5index` (and stray h5py errors) become typed savegame errors."""
    try:
        with _h5index.as_problem(path, "cannot read the HDF5 file"):
            yield
    except _h5index.Problem as exc:
        raise _typed(exc, path) from exc.__cause__


def _limits() -> dict[str, int]:
    lim = base.LIMITS
    return {
        "max_entries": lim.max_entries,
        "max_tensor_numel": lim.max_tensor_numel,
        "max_inflate_ratio": lim.max_inflate_ratio,
        "max_json_depth": lim.max_json_depth,
    }


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise errors.MissingDependencyError(
            "reading Keras HDF5 files needs h5py; install it with `pip install savegame[keras]`"
        ) from exc
    return h5py


def _need_h5py(path: str) -> None:
    """Fail here, not in the child, when h5py is missing (cheap: finds, does not import)."""
    try:
        found = importlib.util.find_spec("h5py") is not None
    except (ValueError, ImportError):
        found = False
    if not found:
        raise errors.MissingDependencyError(
            f"reading Keras HDF5 files ({path}) needs h5py; install it with "
            "`pip install savegame[keras]`",
            path=path,
        )


def _parse_json(raw: bytes | str, *, what: str, path: str) -> Any:
    """Parse JSON text as plain data (dicts, lists, str, numbers); never builds objects."""
    try:
        return _h5index.parse_json(raw, what=what, path=path, max_depth=base.LIMITS.max_json_depth)
    except _h5index.Problem as exc:
        raise _typed(exc, path) from exc.__cause__


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


class _Source:
    """Where tensor bytes come from: libhdf5 in-process, or the file by offset (isolated)."""

    def close(self) -> None:
        raise NotImplementedError


class _InProcess(_Source):
    def __init__(self, h5file: Any, indexer: _h5index.Indexer, raw: io.BufferedReader | None):
        self.h5 = h5file
        self.indexer = indexer
        self.raw = raw

    def close(self) -> None:
        try:
            self.h5.close()
        finally:
            if self.raw is not None:
                self.raw.close()


class _Isolated(_Source):
    def __init__(
        self, raw: io.BufferedReader, start: int, stat: tuple[int, ...], blobs: dict[str, bytes]
    ):
        self.raw = raw
        self.start = start  # where the HDF5 bytes begin in the file (zip member offset)
        self.stat = stat
        self.blobs = blobs  # name -> bytes the child read through libhdf5

    def close(self) -> None:
        self.raw.close()


def _identity(raw: io.BufferedReader) -> tuple[int, ...]:
    st = os.fstat(raw.fileno())
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KerasReader:
    """Lazy reader of one Keras file; create it with :func:`open_keras`.

    Attributes:
        path: The file opened.
        format: ``"keras-h5"`` (HDF5 file) or ``"keras3"`` (``.keras`` zip).
        layout: ``"legacy"`` (``layer_names``/``weight_names``) or ``"keras3"`` (``vars/<i>``).
        isolated: Whether libhdf5 ran in a child process (``open_keras(isolate=True)``).
    """

    path: str
    format: str
    layout: str
    isolated: bool

    def __init__(self, path: str, fmt: str, index: dict[str, Any], source: _Source) -> None:
        self.path = path
        self.format = fmt
        self.layout = index["layout"]
        self.isolated = isinstance(source, _Isolated)
        self._source = source
        self._meta: dict[str, Any] = index["meta"]
        self._entries: dict[str, dict[str, Any]] = index["entries"]
        self._tree_paths: list[list[str]] = index["tree"]
        self._infos = {
            name: base.TensorInfo(name, e["dtype"], tuple(e["shape"]), e["nbytes"])
            for name, e in self._entries.items()
        }
        self._closed = False

    # -- protocol -------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order (see the module docstring). Reads no tensor data."""
        return list(self._entries)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and size of ``name`` without reading it."""
        self._entry(name)
        return self._infos[name]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a CPU torch tensor that owns its memory."""
        self._check_open()
        entry = self._entry(name)
        arr = self._array(entry)
        import torch  # only here: listing and verify() need numpy alone (issue 9.18)

        if entry["bf16"]:
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        # The array is new, C-contiguous and owned (0-d stays 0-d).
        return torch.from_numpy(arr)

    def tree(self) -> dict[str, Any]:
        """Nested dict by layer (legacy) or by HDF5 path (keras3) with :class:`TensorRef` leaves."""
        out: dict[str, Any] = {}
        for *parts, name in self._tree_paths:
            node = out
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = base.TensorRef(name)
        return out

    def metadata(self) -> dict[str, Any]:
        """``keras_version``, ``backend``, the model config (parsed JSON data) and more.

        Always: ``keras_version``, ``backend``, ``model_config`` (``None`` when the file does not
        record them; a legacy file without ``keras_version`` is Keras 1), ``layout``. When the
        file has them: ``training_config``, ``date_saved`` (``.keras``), ``layer_names``
        (keras3 layout: HDF5 path -> user-given layer name).
        """
        self._check_open()
        src = self._source
        if (
            self.layout == "keras3"
            and "layer_names" not in self._meta
            and isinstance(src, _InProcess)
        ):
            with _typed_errors(self.path):
                names = src.indexer.layer_names()
            if names:
                self._meta["layer_names"] = names
        return dict(self._meta)

    def verify(self) -> list[str]:
        """Read every tensor (HDF5 checks fletcher32 checksums where present); list problems."""
        problems: list[str] = []
        for name in self._entries:
            try:
                self._check_open()
                self._array(self._entry(name))  # numpy: every byte and checksum, no torch
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def close(self) -> None:
        """Close the HDF5 file and the underlying file; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._source.close()

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

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"no tensor named {name!r} in {self.path}; see keys() for the names",
                path=self.path,
                key=name,
            ) from None

    def _array(self, entry: dict[str, Any]) -> np.ndarray:
        src = self._source
        shape = tuple(entry["shape"])
        if isinstance(src, _InProcess):
            with _typed_errors(self.path):
                return _h5index.read_array(src.h5, entry, self.path)
        dtype = np.dtype(entry["np"])
        if not entry["nbytes"]:
            return np.empty(shape, dtype=dtype)
        if entry["raw"] is None:
            failure = entry.get("inline_error")
            if failure is not None:  # the child could not read it through libhdf5
                cls = _PROBLEM_TYPES.get(failure[0], errors.FormatError)
                raise cls(str(failure[1]), path=self.path, key=entry["name"])
            blob = src.blobs[entry["name"]]
            return np.frombuffer(blob, dtype=dtype).reshape(shape).copy()
        offset, nbytes = entry["raw"]
        if _identity(src.raw) != src.stat:
            raise errors.FormatError(
                f"{self.path} changed after it was checked in the isolated reader; open it again",
                path=self.path,
                key=entry["name"],
            )
        buf = np.empty(nbytes, dtype=np.uint8)
        src.raw.seek(src.start + offset)
        view = memoryview(buf)
        got = 0
        while got < nbytes:  # readinto may return short counts (> 2 GiB, signals)
            n = src.raw.readinto(view[got:])
            if not n:
                raise errors.FormatError(
                    f"{self.path}: tensor {entry['name']!r} is truncated (file changed?)",
                    path=self.path,
                    key=entry["name"],
                )
            got += n
        stored = buf.view(np.dtype(entry["file"])).reshape(shape)
        return stored if stored.dtype == dtype else stored.astype(dtype)


# --------------------------------------------------------------------------------------------
# config.json versus the stored weights (.keras)
# --------------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    """Keras' ``naming.to_snake_case``: the attribute name a layer's weights are saved under."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _dims(value: Any) -> list[int | None] | None:
    if not isinstance(value, list) or not all(v is None or type(v) is int for v in value):
        return None
    return list(value)


def _expected_weights(
    cls: str, cfg: dict[str, Any], in_shape: list[int | None]
) -> list[tuple[str, list[int | None]]] | None:
    """(weight name, shape) in variable order for the layers whose weights follow from their
    config and input shape (keras/src/layers/…); ``None`` for any other layer."""
    last = in_shape[-1] if in_shape else None
    if cls == "Dense":
        units = cfg.get("units")
        if type(units) is not int:
            return None
        out = [("kernel", [last, units])]
        return out + [("bias", [units])] if cfg.get("use_bias", True) else out
    match = re.fullmatch(r"Conv([123])D", cls)
    if match:
        rank = int(match.group(1))
        filters, size = cfg.get("filters"), _dims(cfg.get("kernel_size"))
        groups = cfg.get("groups", 1)
        if type(filters) is not int or size is None or len(size) != rank:
            return None
        if type(groups) is not int or groups < 1:
            return None
        channels = (
            last
            if cfg.get("data_format", "channels_last") == "channels_last"
            else (in_shape[1] if len(in_shape) > 1 else None)
        )
        per_group = channels // groups if channels is not None and channels % groups == 0 else None
        out = [("kernel", [*size, per_group, filters])]
        return out + [("bias", [filters])] if cfg.get("use_bias", True) else out
    if cls in ("BatchNormalization", "LayerNormalization"):
        axis = cfg.get("axis", -1)
        if isinstance(axis, list) and len(axis) == 1:
            axis = axis[0]
        if type(axis) is not int or not -len(in_shape) <= axis < len(in_shape):
            return None
        n = in_shape[axis]
        names = (["gamma"] if cfg.get("scale", True) else []) + (
            ["beta"] if cfg.get("center", True) else []
        )
        if cls == "BatchNormalization":
            names += ["moving_mean", "moving_variance"]
        return [(w, [n]) for w in names]
    if cls == "Embedding":
        dim_in, dim_out = cfg.get("input_dim"), cfg.get("output_dim")
        if type(dim_in) is not int or type(dim_out) is not int:
            return None
        return [("embeddings", [dim_in, dim_out])]
    return None


def _check_config_shapes(path: str, index: dict[str, Any]) -> None:
    """Refuse a ``.keras`` whose weights disagree with the shapes its ``config.json`` implies."""
    config = index["meta"].get("model_config")
    inner = config.get("config") if isinstance(config, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(layers, list):
        return
    labels = index["meta"].get("layer_names") or {}
    by_label = {label: group for group, label in labels.items()}
    used: dict[str, int] = {}
    entries = index["entries"]
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
            continue
        cls = layer["class_name"]
        cfg = layer.get("config")
        if cls == "InputLayer" or not isinstance(cfg, dict):
            continue
        # Keras saves each layer under layers/<snake_case class>[_N] (FORMATS.md §4.2); newer
        # versions also record the user-given name, which is preferred when present.
        snake = _snake(cls)
        if snake in used:
            used[snake] += 1
            snake = f"{snake}_{used[snake]}"
        else:
            used[snake] = 0
        label = cfg.get("name")
        group = by_label.get(label) if isinstance(label, str) else None
        group = group if group is not None else f"layers/{snake}"
        build = layer.get("build_config")
        in_shape = _dims(build.get("input_shape")) if isinstance(build, dict) else None
        if in_shape is None:
            continue
        expected = _expected_weights(cls, cfg, in_shape)
        if expected is None:
            continue
        stored = [k for k in entries if k.rpartition("/")[0] == f"{group}/vars"]
        if not stored:
            continue  # nothing saved under that name: nothing to contradict
        who = f"layer {label if isinstance(label, str) else group!r} ({cls})"
        if len(stored) != len(expected):
            raise errors.FormatError(
                f"{path}: {who} has {len(stored)} weights under {group}/vars but config.json "
                f"implies {len(expected)} ({', '.join(w for w, _ in expected)}); the archive is "
                "inconsistent (edited or damaged)",
                path=path,
                key=f"{group}/vars",
            )
        for i, (wname, shape) in enumerate(expected):
            key = f"{group}/vars/{i}"
            got = entries.get(key, {}).get("shape")
            if (
                got is None
                or len(got) != len(shape)
                or any(
                    want is not None and want != have
                    for want, have in zip(shape, got, strict=False)
                )
            ):
                want_s = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
                raise errors.FormatError(
                    f"{path}: {who} weight {wname!r} ({key}) has shape {tuple(got or ())} but "
                    f"config.json implies {want_s}; the archive is inconsistent (edited or "
                    "damaged)",
                    path=path,
                    key=key,
                )


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


def _zip_layout(
    raw: io.BufferedReader, path: str, file_size: int
) -> tuple[int, int, dict[str, Any]]:
    """(start, size) of the STORED ``model.weights.h5`` member and the JSON metadata."""
    members = _zip_members(raw, path, file_size)
    meta: dict[str, Any] = {}
    if "metadata.json" in members:
        data = _parse_json(
            _zip.read_member(raw, members["metadata.json"], path, max_bytes=_MAX_JSON_BYTES),
            what="metadata.json",
            path=path,
        )
        if isinstance(data, dict):
            for key in ("keras_version", "date_saved", "backend"):
                if key in data:
                    meta[key] = data[key]
    if "config.json" in members:
        # Data only: a Lambda layer's bytecode stays a string (FORMATS.md §4.4).
        meta["model_config"] = _parse_json(
            _zip.read_member(raw, members["config.json"], path, max_bytes=_MAX_JSON_BYTES),
            what="config.json",
            path=path,
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
    return member.start, member.size, meta


def _merge_meta(zip_meta: dict[str, Any], index: dict[str, Any]) -> None:
    # metadata.json's version and backend win over HDF5 attributes; config.json is the config
    # unless the HDF5 file carries its own model_config attribute.
    meta = index["meta"]
    for key, value in zip_meta.items():
        if key == "model_config" and meta.get("model_config") is not None:
            continue
        meta[key] = value


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------


def open_keras(
    path: str | os.PathLike[str],
    *,
    isolate: bool = True,
    isolate_timeout: float = DEFAULT_ISOLATE_TIMEOUT,
) -> KerasReader:
    """Open a Keras ``.h5``, ``.weights.h5`` or ``.keras`` file for safe, lazy reading.

    Args:
        path: The file. Its first bytes decide the format (zip -> ``.keras``, else HDF5).
        isolate: Run libhdf5 only in a child process (the default): a crash or hang inside
            libhdf5 on a malformed or malicious file becomes a :class:`FormatError` here instead
            of killing or blocking this process. Costs about 0.2 s per open (a small Python that
            imports numpy and h5py, not torch). ``False`` parses the file in this process:
            faster by that much, for files you trust (libhdf5 does crash on some corrupt files:
            see docs/formats-keras-darknet.md).
        isolate_timeout: Seconds the child may take before the file is refused
            (:data:`DEFAULT_ISOLATE_TIMEOUT`, 300 s).

    Returns:
        A :class:`KerasReader` (a :class:`savegame.interop.base.ForeignReader`).

    Raises:
        CheckpointNotFoundError: Nothing at ``path``.
        MissingDependencyError: h5py is not installed (``pip install savegame[keras]``).
        UnsafeContentError: Links, external or virtual storage, plugin filters, bombs.
        UnsupportedFormatError: An HDF5 file that is not a Keras file, or unsupported dtypes.
        FormatError: Corrupt or truncated data, weights that contradict ``config.json``, a
            child that crashed, timed out, or saw a file that changed under it.
    """
    spath = os.fspath(path)
    try:
        raw = open(spath, "rb")  # noqa: SIM115 - owned by the reader, closed in close()
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no file at {spath}", path=spath) from exc
    except IsADirectoryError as exc:
        raise errors.FormatError(f"{spath} is a directory, not a Keras file", path=spath) from exc
    except OSError as exc:
        raise errors.FormatError(f"{spath}: cannot open: {exc}", path=spath) from exc
    try:
        return _open(spath, raw, isolate=isolate, timeout=isolate_timeout)
    except BaseException:
        raw.close()
        raise


def _open(spath: str, raw: io.BufferedReader, *, isolate: bool, timeout: float) -> KerasReader:
    stat = _identity(raw)
    head = raw.read(8)
    file_size = stat[2]
    if head.startswith(_ZIP_MAGIC):
        fmt, what = "keras3", "model.weights.h5"
        start, size, zip_meta = _zip_layout(raw, spath, file_size)
    else:
        fmt, what = "keras-h5", "the file"
        start, size, zip_meta = 0, file_size, {}
    if isolate:
        _need_h5py(spath)
        index, blobs = _isolated_index(spath, raw, start, size, what, timeout)
        if _identity(raw) != stat:
            raise errors.FormatError(
                f"{spath} changed while it was being checked in the isolated reader; open it "
                "again once it is complete",
                path=spath,
            )
        source: _Source = _Isolated(raw, start, stat, blobs)
    else:
        h5py = _import_h5py()
        with _typed_errors(spath):
            if fmt == "keras3":
                h5file = _h5index.open_file(h5py, _h5index.RangeFile(raw, start, size), spath, what)
            else:
                h5file = _h5index.open_file(h5py, spath, spath, what)
            try:
                indexer = _h5index.Indexer(h5py, h5file, spath, size, _limits())
                index = indexer.run({}, raw_ranges=False)
            except BaseException:
                h5file.close()
                raise
        source = _InProcess(h5file, indexer, raw if fmt == "keras3" else None)
        if fmt != "keras3":
            raw.close()
    try:
        _merge_meta(zip_meta, index)
        if fmt == "keras3":
            if "layer_names" not in index["meta"] and isinstance(source, _InProcess):
                with _typed_errors(spath):
                    names = source.indexer.layer_names()
                if names:
                    index["meta"]["layer_names"] = names
            _check_config_shapes(spath, index)
        return KerasReader(spath, fmt, index, source)
    except BaseException:
        source.close()
        raise


# --------------------------------------------------------------------------------------------
# Process isolation
# --------------------------------------------------------------------------------------------

# The child imports only _h5index (by file path, so `import savegame` and torch never run),
# with this process's sys.path so that it finds the same numpy and h5py. -I -S: no user site,
# no environment-driven imports, no .pth processing (start-up ~10 ms).
_CHILD_CODE = (
    "import sys, json, importlib.util as u\n"
    "sys.path[:0] = json.loads(sys.argv[1])\n"
    "s = u.spec_from_file_location('_savegame_h5index', sys.argv[2])\n"
    "m = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m.child_main(sys.argv[3:])\n"
)


def _isolated_index(
    path: str, raw: io.BufferedReader, start: int, size: int, what: str, timeout: float
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Index ``path`` in a child process that reads it through ``raw``'s descriptor.

    Returns the index (plain data) and the bytes of datasets the child read for us.
    """
    fd = raw.fileno()
    if fd > 2:
        return _run_child(path, fd, start, size, what, timeout)
    # A process started with stdio closed can get the file as fd 0-2, which the child's own
    # stdio would shadow: hand the child a duplicate numbered 3 or above.
    import fcntl

    dup = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    try:
        return _run_child(path, dup, start, size, what, timeout)
    finally:
        os.close(dup)


def _run_child(
    path: str, fd: int, start: int, size: int, what: str, timeout: float
) -> tuple[dict[str, Any], dict[str, bytes]]:
    opts = json.dumps({"limits": _limits(), "what": what})
    cmd = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _CHILD_CODE,
        json.dumps([p for p in sys.path if p]),
        _h5index.__file__,
        str(os.getpid()),
        str(fd),
        str(start),
        str(size),
        path,
        opts,
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
        )
    except (OSError, ValueError) as exc:  # ValueError: no pass_fds (Windows)
        raise errors.FormatError(
            f"{path}: cannot start the isolated HDF5 reader ({exc}); open it with isolate=False "
            "only if you trust the file",
            path=path,
        ) from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise errors.FormatError(
            f"{path}: reading it in an isolated process took more than {timeout} s; refusing "
            "(a hang inside libhdf5 on a malformed file?). Raise isolate_timeout for huge files",
            path=path,
        ) from exc
    except BaseException:
        proc.kill()  # KeyboardInterrupt and the like: never leave the child behind
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        if proc.returncode < 0:
            why = f"libhdf5 crashed (signal {-proc.returncode})"
        else:
            why = f"the isolated reader failed (exit status {proc.returncode})"
        raise errors.FormatError(
            f"{path}: {why} while parsing the file; it is corrupt or malicious, refusing it. "
            f"Child said: {' | '.join(tail) or '(nothing)'}",
            path=path,
        )
    return _decode_frame(path, out)


def _decode_frame(path: str, out: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    def broken(why: str) -> errors.FormatError:
        return errors.FormatError(
            f"{path}: the isolated HDF5 reader sent a malformed answer ({why})", path=path
        )

    if len(out) < 8:
        raise broken("too short")
    (n,) = struct.unpack_from("<Q", out)
    if 8 + n > len(out):
        raise broken("truncated")
    try:
        doc = json.loads(out[8 : 8 + n])
    except ValueError as exc:
        raise broken("not JSON") from exc
    if "error" in doc:
        kind = doc["error"]
        if kind == "import":
            raise errors.MissingDependencyError(
                f"the isolated reader for {path} could not import h5py ({sys.executable}); "
                "install savegame[keras] into that interpreter",
                path=path,
            )
        cls = _PROBLEM_TYPES.get(kind, errors.FormatError)
        raise cls(str(doc.get("msg")), path=path, key=doc.get("key"))
    blobs: dict[str, bytes] = {}
    pos = 8 + n
    for name, entry in doc["entries"].items():
        length = entry.pop("inline", None)
        if length is None:
            if entry["raw"] is None and entry["nbytes"] and "inline_error" not in entry:
                raise broken(f"no bytes for {name!r}")
            continue
        if length != entry["nbytes"] or pos + length > len(out):
            raise broken(f"bytes of {name!r}")
        blobs[name] = out[pos : pos + length]
        pos += length
    if pos != len(out):
        raise broken("trailing bytes")
    return doc, blobs
