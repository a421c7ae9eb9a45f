"""Safe, lazy reader of NumPy ``.npy`` and ``.npz`` files (FORMATS.md §6).

Key invariant: the ``.npy`` header is parsed as data — ``ast.literal_eval`` on a header capped
at 10,000 characters (NumPy's own cap), then checked structurally — and any dtype that could
hold Python objects (``O``, or a structured dtype containing one) is refused with
:class:`~savegame.errors.UnsafeContentError` before a single data byte is read. ``.npz``
members are inflated with a bounded budget (``LIMITS.max_inflate_bytes`` / ``max_inflate_ratio``).
"""

from __future__ import annotations

import ast
import os
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from savegame import errors
from savegame.format import tensors
from savegame.interop import _bounds, _zip, base

if TYPE_CHECKING:
    import torch

__all__ = ["NumpyReader", "open_numpy"]

MAGIC = b"\x93NUMPY"
MAX_HEADER_CHARS = 10_000  # numpy's own default cap (lib/_format_impl.py)


@dataclass(frozen=True, slots=True)
class _Array:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran: bool
    offset: int  # data start inside the member bytes / file
    nbytes: int


def parse_header(head: bytes, path: str, key: str | None = None) -> tuple[_Array, int]:
    """Parse the bytes at the start of a ``.npy``; returns (array description, data offset).

    ``head`` must hold at least the magic, version and header; it may hold more.
    """

    def bad(msg: str) -> errors.FormatError:
        return errors.FormatError(
            f"{path}: {msg}; not a valid .npy (damaged or hostile)", path=path, key=key
        )

    if len(head) < 10 or not head.startswith(MAGIC):
        raise bad("missing \\x93NUMPY magic")
    major, minor = head[6], head[7]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", head, 8)
        start = 10
    elif major in (2, 3):
        if len(head) < 12:
            raise bad("truncated header length")
        (hlen,) = struct.unpack_from("<I", head, 8)
        start = 12
    else:
        raise errors.UnsupportedFormatError(
            f"{path}: .npy version {major}.{minor} is not supported (1.0-3.0 are)",
            path=path,
            key=key,
        )
    if hlen > MAX_HEADER_CHARS:
        raise bad(f"header of {hlen} bytes exceeds the {MAX_HEADER_CHARS}-byte limit")
    if start + hlen > len(head):
        raise bad("header runs past the end of the file")
    try:
        text = head[start : start + hlen].decode("utf-8" if major == 3 else "latin1")
        d = ast.literal_eval(text)
    except (
        ValueError,
        SyntaxError,
        UnicodeDecodeError,
        MemoryError,
        RecursionError,
        TypeError,
    ) as exc:
        raise bad(f"header is not a Python literal ({type(exc).__name__})") from exc
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise bad("header must be a dict with exactly descr, fortran_order, shape")
    descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
    if not isinstance(fortran, bool):
        raise bad("fortran_order is not a bool")
    if not isinstance(shape, tuple):
        raise bad("shape must be a tuple of non-negative ints")
    problem = _bounds.shape_problem(shape)
    if problem is not None:
        # Also bounds each dimension of an empty array: numpy cannot even build (0, 2**64).
        raise bad(f"shape {str(shape)[:200]}: {problem}")
    if not isinstance(descr, str):
        # A list descr is a structured dtype; refuse it outright (may nest objects).
        raise errors.UnsupportedFormatError(
            f"{path}: structured dtypes are not supported (descr {str(descr)[:80]!r})",
            path=path,
            key=key,
        )
    if "O" in descr:
        raise errors.UnsafeContentError(
            f"{path}: .npy holds Python objects (dtype {descr!r}), stored as a pickle; refusing it. "
            "Re-save with a numeric dtype",
            path=path,
            key=key,
        )
    try:
        with warnings.catch_warnings():
            # Odd descr strings make numpy warn (deprecated aliases); treat them as invalid.
            warnings.simplefilter("error")
            dtype = np.dtype(descr)
    except (TypeError, ValueError, SyntaxError, Warning) as exc:
        raise bad(f"unknown dtype {descr!r}") from exc
    if dtype.hasobject or dtype.fields is not None:
        raise errors.UnsafeContentError(
            f"{path}: dtype {descr!r} may hold objects", path=path, key=key
        )
    if dtype.shape != () or dtype.itemsize == 0 or dtype.kind not in "biufcSUVmM":
        # Sub-array, zero-size and other exotic dtypes are not tensors.
        raise errors.UnsupportedFormatError(
            f"{path}: dtype {descr!r} is not a plain array dtype", path=path, key=key
        )
    numel = 1
    for s in shape:
        numel *= s
    return _Array(dtype, shape, fortran, start + hlen, numel * dtype.itemsize), start + hlen


def _to_torch(arr: np.ndarray, path: str, key: str) -> torch.Tensor | np.ndarray:
    code = f"{arr.dtype.kind}{arr.dtype.itemsize}"
    tdt = tensors.FROM_NUMPY.get(code)
    if tdt is None:
        return arr  # strings, datetimes: returned as numpy (never objects, checked at parse)
    # Native byte order, C order, owned and writable: torch.from_numpy shares memory otherwise.
    data = np.array(arr.astype(arr.dtype.newbyteorder("="), copy=False), order="C", copy=True)
    import torch  # only here: listing and verify() need numpy alone (issue 9.18)

    return torch.from_numpy(data)


def _torch_name(dtype: np.dtype[Any]) -> str:
    tdt = tensors.FROM_NUMPY.get(f"{dtype.kind}{dtype.itemsize}")
    return tdt if tdt is not None else dtype.str


class NumpyReader(base.Reader):
    """Lazy reader of one ``.npy`` (one tensor named ``"array"`` … see :func:`open_numpy`) or
    ``.npz`` (one tensor per member, named without ``.npy``)."""

    format = "numpy"

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")
        try:
            self._size = os.fstat(self._f.fileno()).st_size
            self._arrays: dict[str, _Array] = {}
            self._members: dict[str, _zip.ZipMember] = {}
            head = self._f.read(8)
            if head.startswith(MAGIC):
                self._f.seek(0)
                arr, _ = parse_header(self._f.read(12 + MAX_HEADER_CHARS), path)
                if arr.offset + arr.nbytes != self._size:
                    raise errors.FormatError(
                        f"{path}: .npy holds {self._size - arr.offset} data bytes, header says {arr.nbytes}",
                        path=path,
                    )
                self.kind = "npy"
                self._arrays["array"] = arr
            elif head.startswith(b"PK\x03\x04"):
                self.kind = "npz"
                self._open_npz()
            else:
                raise errors.UnsupportedFormatError(f"{path} is neither .npy nor .npz", path=path)
        except BaseException:
            self._f.close()
            raise

    def _open_npz(self) -> None:
        members = _zip.read_directory(self._f, self.path, self._size)
        if members and not any(m.name.endswith(".npy") for m in members):
            raise errors.UnsupportedFormatError(
                f"{self.path} is a zip file without .npy members, not a numpy .npz "
                f"(first member: {members[0].name!r}); open it without format= to detect its format",
                path=self.path,
            )
        for m in members:
            if not m.name.endswith(".npy"):
                continue  # np.savez writes only .npy members; others are ignored
            name = m.name[:-4]
            # Only the header is needed now; a STORED member's header is read in place,
            # a DEFLATED one is inflated at open (bounded), which also validates the member.
            if m.method == _zip.STORED:
                self._f.seek(m.start)
                head = self._f.read(min(m.size, 12 + MAX_HEADER_CHARS))
            else:
                head = self._inflate(m)[: 12 + MAX_HEADER_CHARS]
            arr, _ = parse_header(head, self.path, key=name)
            if arr.offset + arr.nbytes != m.size:
                raise errors.FormatError(
                    f"{self.path}: member {m.name!r} holds {m.size - arr.offset} data bytes, header says {arr.nbytes}",
                    path=self.path,
                    key=name,
                )
            self._arrays[name] = arr
            self._members[name] = m

    def _inflate(self, m: _zip.ZipMember) -> bytes:
        return _zip.read_member(self._f, m, self.path)

    def keys(self) -> list[str]:
        """``["array"]`` for ``.npy``; member names without ``.npy`` for ``.npz``."""
        self._check_open()
        return list(self._arrays)

    def _arr(self, name: str) -> _Array:
        try:
            return self._arrays[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"{self.path}: no array named {name!r}; see keys()", path=self.path, key=name
            ) from None

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and byte size of one array."""
        self._check_open()
        a = self._arr(name)
        return base.TensorInfo(name, _torch_name(a.dtype), a.shape, a.nbytes)

    def read_numpy(self, name: str) -> np.ndarray:
        """One array as numpy (C or Fortran order as stored, native values)."""
        self._check_open()
        a = self._arr(name)
        if self.kind == "npy":
            self._f.seek(a.offset)
            raw = self._f.read(a.nbytes)
        else:
            m = self._members[name]
            if m.method == _zip.STORED:
                self._f.seek(m.start + a.offset)
                raw = self._f.read(a.nbytes)
            else:
                raw = self._inflate(m)[a.offset :]
        if len(raw) != a.nbytes:
            raise errors.FormatError(
                f"{self.path}: array {name!r} is truncated", path=self.path, key=name
            )
        flat = np.frombuffer(raw, dtype=a.dtype)
        return flat.reshape(a.shape, order="F" if a.fortran else "C")

    def read(self, name: str) -> torch.Tensor | np.ndarray:
        """One array as a CPU torch tensor in C order (numpy array for dtypes torch lacks)."""
        self._check_open()
        return _to_torch(self.read_numpy(name), self.path, name)

    def tree(self) -> dict[str, base.TensorRef]:
        """Flat ``{name: TensorRef(name)}``."""
        self._check_open()
        return {k: base.TensorRef(k) for k in self._arrays}

    def metadata(self) -> dict[str, Any]:
        """``{"kind": "npy"|"npz", "fortran_order": {name: bool}}``."""
        self._check_open()
        return {"kind": self.kind, "fortran_order": {k: a.fortran for k, a in self._arrays.items()}}

    def verify(self) -> list[str]:
        """Read every array (inflating and CRC-checking compressed members)."""
        self._check_open()
        problems = []
        for k in self._arrays:
            try:
                if self.kind == "npz":
                    _zip.read_member(self._f, self._members[k], self.path)
                self.read_numpy(k)
            except errors.CheckpointError as exc:
                problems.append(f"{k}: {exc}")
        return problems

    def _release(self) -> None:
        self._f.close()


def open_numpy(path: str | os.PathLike[str]) -> NumpyReader:
    """Open a ``.npy`` (one tensor named ``"array"``) or ``.npz`` file; reads headers only.

    Raises:
        UnsafeContentError: an object dtype (pickled data).
        FormatError: malformed header, size mismatch, zip damage or zip bomb.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise errors.CheckpointNotFoundError(f"{p} does not exist or is not a file", path=p)
    return NumpyReader(p)
