"""The Keras reader and its opening: one HDF5 index, tensor bytes from one of two sources.

Key invariant: a :class:`KerasReader` holds an index built and checked by
:mod:`~savegame.interop.keras.h5index` before any tensor byte is read. Isolated (the default),
tensor bytes come from the file by offset in this process, without libhdf5, and only while the
file is the one the child checked (``fstat`` identity compared at every read); the few datasets
that are not stored contiguously come as bytes from the child. In-process (``isolate=False``,
trusted files), libhdf5 reads them.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from savegame import errors
from savegame.interop import base
from savegame.interop.keras import h5index, isolation, keras3

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_ISOLATE_TIMEOUT", "KerasReader", "open_keras"]

_ZIP_MAGIC = b"PK\x03\x04"

DEFAULT_ISOLATE_TIMEOUT = 300.0
"""Seconds the isolation child may take (it parses the structure and reads only datasets that
are not stored contiguously, so a healthy file needs well under a second plus ~0.2 s start-up)."""


class _Source:
    """Where tensor bytes come from: libhdf5 in-process, or the file by offset (isolated)."""

    def close(self) -> None:
        raise NotImplementedError


class _InProcess(_Source):
    def __init__(self, h5file: Any, indexer: h5index.Indexer, raw: io.BufferedReader | None):
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


class KerasReader(base.Reader):
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

    # -- protocol -------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order (see :mod:`savegame.interop.keras`). Reads no tensor data."""
        self._check_open()
        return list(self._entries)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and size of ``name`` without reading it."""
        self._check_open()
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
        self._check_open()
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
            with isolation.typed_errors(self.path):
                names = src.indexer.layer_names()
            if names:
                self._meta["layer_names"] = names
        return dict(self._meta)

    def verify(self) -> list[str]:
        """Read every tensor (HDF5 checks fletcher32 checksums where present); list problems."""
        self._check_open()
        problems: list[str] = []
        for name in self._entries:
            try:
                self._array(self._entry(name))  # numpy: every byte and checksum, no torch
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def __repr__(self) -> str:
        return f"KerasReader({self.path!r}, format={self.format!r}, {len(self._entries)} tensors)"

    # -- internals ------------------------------------------------------------------------

    def _release(self) -> None:
        """Close the HDF5 file (in-process) and the underlying file."""
        self._source.close()

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
            with isolation.typed_errors(self.path):
                return h5index.read_array(src.h5, entry, self.path)
        dtype = np.dtype(entry["np"])
        if not entry["nbytes"]:
            return np.empty(shape, dtype=dtype)
        if entry["raw"] is None:
            failure = entry.get("inline_error")
            if failure is not None:  # the child could not read it through libhdf5
                cls = isolation.PROBLEM_TYPES.get(failure[0], errors.FormatError)
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
        A :class:`KerasReader` (a :class:`savegame.interop.base.Reader`).

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
        raw = open(spath, "rb")  # noqa: SIM115 - owned by the reader, closed in _release()
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
        start, size, zip_meta = keras3.zip_layout(raw, spath, file_size)
    else:
        fmt, what = "keras-h5", "the file"
        start, size, zip_meta = 0, file_size, {}
    if isolate:
        isolation.need_h5py(spath)
        index, blobs = isolation.isolated_index(spath, raw, start, size, what, timeout)
        if _identity(raw) != stat:
            raise errors.FormatError(
                f"{spath} changed while it was being checked in the isolated reader; open it "
                "again once it is complete",
                path=spath,
            )
        source: _Source = _Isolated(raw, start, stat, blobs)
    else:
        h5py = isolation.import_h5py()
        with isolation.typed_errors(spath):
            if fmt == "keras3":
                h5file = h5index.open_file(h5py, h5index.RangeFile(raw, start, size), spath, what)
            else:
                h5file = h5index.open_file(h5py, spath, spath, what)
            try:
                indexer = h5index.Indexer(h5py, h5file, spath, size, isolation.limits())
                index = indexer.run({}, raw_ranges=False)
            except BaseException:
                h5file.close()
                raise
        source = _InProcess(h5file, indexer, raw if fmt == "keras3" else None)
        if fmt != "keras3":
            raw.close()
    try:
        keras3.merge_meta(zip_meta, index)
        if fmt == "keras3":
            if "layer_names" not in index["meta"] and isinstance(source, _InProcess):
                with isolation.typed_errors(spath):
                    names = source.indexer.layer_names()
                if names:
                    index["meta"]["layer_names"] = names
            keras3.check_config_shapes(spath, index)
        return KerasReader(spath, fmt, index, source)
    except BaseException:
        source.close()
        raise
