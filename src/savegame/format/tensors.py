"""Tensor <-> bytes in safetensors layout (FORMATS.md §2).

A savegame tensor file is a valid safetensors file: ``u64 LE N``, an N-byte JSON header padded
with spaces so the data starts on a 64-byte boundary, then the tensors back to back, largest
element size first so every tensor is naturally aligned. ``safetensors.safe_open`` reads it.

Invariant: the writer computes each tensor's digest from the very buffer it hands to the OS, so
a digest can never describe bytes other than the ones written.

This module holds savegame's one dtype table (``TABLE``: torch, safetensors and numpy names of
every dtype, by name, so importing it needs no torch) and its one safetensors writer
(:func:`write_tensor_stream`), which ``savegame.tools.convert`` also writes through.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from savegame import errors
from savegame.format import hashing

if TYPE_CHECKING:  # torch is imported by the functions that need tensors (issue 9.18)
    import torch

__all__ = [
    "DTYPES",
    "FROM_NUMPY",
    "SAFETENSORS_DTYPES",
    "TABLE",
    "TO_SAFETENSORS",
    "TensorSpec",
    "WrittenTensor",
    "byte_view",
    "dtype_from_name",
    "read_into",
    "write_all",
    "write_tensor_file",
    "write_tensor_stream",
]

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("savegame supports little-endian hosts only")

# The one dtype table (issue 10): every dtype a tensor file, a safetensors file or a numpy file
# may hold, as (torch dtype name, safetensors dtype code, numpy kind + itemsize, bits per
# element). Names, not torch or numpy objects, so that listing and verifying foreign files need
# neither (issue 9.18). ``None``: that library has no such dtype — torch lacks the sub-byte
# floats, numpy lacks bfloat16 and the float8s, safetensors lacks complex128 and complex32.
TABLE: tuple[tuple[str | None, str | None, str | None, int], ...] = (
    ("float64", "F64", "f8", 64),
    ("float32", "F32", "f4", 32),
    ("float16", "F16", "f2", 16),
    ("bfloat16", "BF16", None, 16),
    ("int64", "I64", "i8", 64),
    ("int32", "I32", "i4", 32),
    ("int16", "I16", "i2", 16),
    ("int8", "I8", "i1", 8),
    ("uint8", "U8", "u1", 8),
    ("uint16", "U16", "u2", 16),
    ("uint32", "U32", "u4", 32),
    ("uint64", "U64", "u8", 64),
    ("bool", "BOOL", "b1", 8),
    ("complex64", "C64", "c8", 64),
    ("complex128", None, "c16", 128),
    ("complex32", None, None, 32),
    ("float8_e4m3fn", "F8_E4M3", None, 8),
    ("float8_e5m2", "F8_E5M2", None, 8),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ", None, 8),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ", None, 8),
    ("float8_e8m0fnu", "F8_E8M0", None, 8),
    (None, "F4", None, 4),
    (None, "F6_E2M3", None, 6),
    (None, "F6_E3M2", None, 6),
)

#: safetensors dtype code -> (torch dtype name, or None when torch has no such dtype; bits per
#: element). What a safetensors reader accepts.
SAFETENSORS_DTYPES: dict[str, tuple[str | None, int]] = {
    st: (name, bits) for name, st, _, bits in TABLE if st is not None
}
#: torch dtype name -> safetensors dtype code, for dtypes safetensors holds exactly.
TO_SAFETENSORS: dict[str, str] = {name: st for name, st, _, _ in TABLE if name and st}
#: numpy kind + itemsize ("f4", "c16", "b1") -> torch dtype name.
FROM_NUMPY: dict[str, str] = {np_code: name for name, _, np_code, _ in TABLE if name and np_code}

# What savegame's own tensor files store: torch dtype name -> (safetensors dtype, element size,
# trailing dims added in the file). complex128/complex32 have no safetensors dtype: stored as
# their real parts' dtype with a trailing dimension of 2 (what torch.view_as_real gives); the
# manifest keeps the true dtype.
_AS_REAL_PAIRS = {"complex128": "float64", "complex32": "float16"}
DTYPES: dict[str, tuple[str, int, int]] = {
    name: (TO_SAFETENSORS[_AS_REAL_PAIRS.get(name, name)], bits // 8, int(name in _AS_REAL_PAIRS))
    for name, _, _, bits in TABLE
    if name is not None
}

ALIGN = 64
MAX_HEADER = 100_000_000


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype for a manifest dtype name; FormatError if unknown."""
    if name not in DTYPES:
        raise errors.FormatError(f"unknown tensor dtype {name!r} in manifest")
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise errors.UnsupportedFormatError(
            f"dtype {name!r} is not available in this torch ({torch.__version__}); upgrade torch"
        )
    return dt


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying (but a lazy conjugate or negative
    view, ``x.conj()`` / ``x.conj().imag``, is resolved into the values it means first)."""
    import torch

    flat = t.resolve_conj().resolve_neg().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if t.dtype in (torch.complex128, torch.complex32, torch.complex64):
        flat = torch.view_as_real(flat).reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = DTYPES[dtype_name(dtype)][1]
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor's header entry, known before its data is read: key, torch dtype name, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, key: str, t: torch.Tensor) -> TensorSpec:
        return cls(key, dtype_name(t.dtype), tuple(t.shape))


@dataclass(frozen=True, slots=True)
class WrittenTensor:
    key: str
    offset: int  # absolute, in the file
    length: int
    hash: str


def _header(
    specs: Sequence[TensorSpec], metadata: dict[str, str], align: int
) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {"__metadata__": metadata}
    begin = 0
    begins = []
    for s in specs:
        st_dtype, size, extra = DTYPES[s.dtype]
        shape = list(s.shape) + ([2] if extra else [])
        length = math.prod(s.shape) * size
        header[s.key] = {"dtype": st_dtype, "shape": shape, "data_offsets": [begin, begin + length]}
        begins.append(begin)
        begin += length
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (-(8 + len(raw))) % align
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw, begins


def order_for_file(items: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Largest element size first, then by key: natural alignment of every tensor."""
    return sorted(items, key=lambda kv: (-kv[1].element_size(), kv[0]))


#: Most bytes handed to one ``write`` call. Linux transfers at most 0x7ffff000 bytes per call
#: anyway; smaller calls keep each one well inside every kernel's limit.
MAX_WRITE = 1 << 30


def write_all(f: BinaryIO, data: memoryview) -> None:
    """Write every byte of ``data`` to ``f`` or raise.

    ``write`` on an unbuffered file is one ``write(2)``, which may write fewer bytes than asked:
    Linux stops at 0x7ffff000 bytes (just under 2 GiB), and a full disk or a file-size limit
    also end in a short count before the error. Ignoring the count silently truncated every
    tensor over 2 GiB (issue 9.1), so the count is checked and the rest written; a call that
    writes nothing is an error (the OS would otherwise have raised one).

    Raises:
        OSError: the OS refused the write (ENOSPC, EFBIG, EIO, ...) or made no progress.
    """
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    total = len(view)
    while done < total:
        n = f.write(view[done : done + MAX_WRITE])
        if not n:  # None (non-blocking file) or 0: no progress; never loop forever
            raise OSError(
                errno.EIO,
                f"write made no progress after {done} of {total} bytes (disk full or file-size limit?)",
            )
        done += n


def _check_staged(items: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Every tensor is of a storable dtype and staged to contiguous CPU memory."""
    for key, t in items:
        if dtype_name(t.dtype) not in DTYPES:
            raise errors.EncodeError(
                f"tensor {key!r} has dtype {t.dtype}, which savegame cannot store", key=key
            )
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"internal: tensor {key!r} must be staged to contiguous CPU memory first"
            )


def write_tensor_file(
    f: BinaryIO,
    items: Sequence[tuple[str, torch.Tensor]],
    *,
    metadata: dict[str, str] | None = None,
) -> tuple[bytes, list[WrittenTensor]]:
    """Write ``items`` (contiguous CPU tensors, already in file order) to ``f``.

    Returns the header bytes and where each tensor landed with its digest. The caller fsyncs.
    """
    _check_staged(items)
    return write_tensor_stream(
        f, [TensorSpec.of(k, t) for k, t in items], (t for _, t in items), metadata=metadata
    )


def write_tensor_stream(
    f: BinaryIO,
    specs: Sequence[TensorSpec],
    tensors: Iterable[torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
    align: int = ALIGN,
) -> tuple[bytes, list[WrittenTensor]]:
    """Write a tensor file whose header is ``specs`` and whose data is ``tensors``, taken one at a
    time in the same order (a generator keeps one tensor in memory: ``convert`` streams with it).

    The one safetensors writer: savegame's own tensor files (through :func:`write_tensor_file`)
    and ``convert``'s output. ``align``: the data section starts at a multiple of it (64 for
    savegame; 8, the reference writer's padding, for ``convert``). Every tensor must be
    contiguous, on the CPU and match its spec. Returns the header bytes and where each tensor
    landed with its digest. The caller fsyncs.

    Raises:
        ValueError: a tensor does not match its spec, or there are more or fewer tensors than
            specs (the file would not match its header).
        OSError: the write failed.
    """
    header, begins = _header(specs, {"format": "pt", **(metadata or {})}, align)
    write_all(f, memoryview(header))
    base = len(header)
    written: list[tuple[TensorSpec, int, int, Future[str]]] = []
    # Hash on a second thread while this one writes: both release the GIL, so the hash (about
    # 8 % of a save's time when done in line) leaves the critical path.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-hash") as pool:
        for spec, begin, t in zip(specs, begins, tensors, strict=True):
            if (
                dtype_name(t.dtype) != spec.dtype
                or tuple(t.shape) != spec.shape
                or t.device.type != "cpu"
                or not t.is_contiguous()
            ):
                raise ValueError(
                    f"internal: tensor {spec.key!r} is not the contiguous CPU {spec} its header names"
                )
            view = byte_view(t)
            digest = pool.submit(hashing.digest, view)
            write_all(f, view)
            written.append((spec, begin, len(view), digest))
            del t, view  # streamed: let the tensor go once it is written and hashed
        return header, [
            WrittenTensor(s.key, base + begin, n, d.result()) for s, begin, n, d in written
        ]


def write_changed_tensor_file(
    f: BinaryIO,
    items: Sequence[tuple[str, torch.Tensor]],
    stored: Mapping[str, str],
    still_stored: Callable[[str], bool] | None = None,
) -> tuple[bytes, list[WrittenTensor], dict[str, str]]:
    """Write to ``f`` only those of ``items`` whose bytes differ from what is stored already.

    ``stored``: key -> the digest of the bytes an earlier checkpoint holds for that key (same
    dtype and shape). Each tensor is hashed — the bytes actually staged, never a guess from
    the tensor's history — and written only if its digest is not ``stored[key]``, or if
    ``still_stored(key)`` (asked only for a matching digest) says the stored bytes are no
    longer intact. One pass over memory: a second thread hashes tensor i+1 while this one
    writes tensor i.

    Which tensors are written is known only at the end, so a seekable ``f`` gets its data
    first, after room reserved for the header of *every* tensor; the real header (only the
    written tensors, packed, largest element size first as always) is written last into that
    room, padded with spaces — still a valid safetensors file (safetensors pads with spaces
    too). A stream that cannot seek (an object store upload) has every tensor hashed first.

    Returns the header bytes, where each written tensor landed (file order) and the digest of
    every tensor (``key -> digest``). The caller fsyncs.
    """
    _check_staged(items)

    def same(key: str, digest: str) -> bool:
        if key not in stored or digest != stored[key]:
            return False
        return still_stored is None or still_stored(key)

    specs = [TensorSpec.of(k, t) for k, t in items]
    metadata = {"format": "pt"}
    seekable = False
    try:
        seekable = bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False
    # Hash threads run ahead of the writes, in file order (submitted in that order). Several:
    # a mostly-unchanged save is all hashing (xxhash releases the GIL), and in a save where
    # everything changed the writes, not the hashes, set the pace.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="savegame-hash") as pool:
        digests = [pool.submit(hashing.digest, byte_view(t)) for _, t in items]
        if not seekable:
            keep = [not same(k, d.result()) for (k, _), d in zip(items, digests, strict=True)]
            chosen = [s for s, k in zip(specs, keep, strict=True) if k]
            header, begins = _header(chosen, metadata, ALIGN)
            write_all(f, memoryview(header))
            written = []
            it = iter(begins)
            for (key, t), k, d in zip(items, keep, digests, strict=True):
                if k:
                    view = byte_view(t)
                    write_all(f, view)
                    written.append(WrittenTensor(key, len(header) + next(it), len(view), d.result()))
            return header, written, {k: d.result() for (k, _), d in zip(items, digests, strict=True)}
        reserved = len(_header(specs, metadata, ALIGN)[0])
        f.seek(reserved)
        chosen = []
        lengths = []
        hashes = []
        for (key, t), spec, d in zip(items, specs, digests, strict=True):
            if same(key, d.result()):
                continue  # the same bytes are stored: the manifest refers to them
            view = byte_view(t)
            write_all(f, view)
            chosen.append(spec)
            lengths.append(len(view))
            hashes.append(d)
            del view
        header, begins = _header(chosen, metadata, ALIGN)
        if len(header) > reserved:  # cannot happen: fewer entries, offsets no larger
            raise AssertionError("internal: the header outgrew the room reserved for it")
        # Pad inside the JSON length (spaces after the object), so the data starts at
        # ``reserved`` exactly as it was written.
        body = header[8:] + b" " * (reserved - len(header))
        header = struct.pack("<Q", len(body)) + body
        f.seek(0)
        write_all(f, memoryview(header))
        written = [
            WrittenTensor(s.key, reserved + b, n, d.result())
            for s, b, n, d in zip(chosen, begins, lengths, hashes, strict=True)
        ]
        return header, written, {k: d.result() for (k, _), d in zip(items, digests, strict=True)}


def read_header(
    f: BinaryIO, path: str | os.PathLike[str], file_size: int
) -> tuple[bytes, dict[str, dict[str, object]]]:
    """Read and validate a tensor file's header; returns its raw bytes and parsed entries."""
    head = f.read(8)
    if len(head) != 8:
        raise errors.IntegrityError(f"{path}: tensor file is truncated (no header)", path=path)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > file_size:
        raise errors.IntegrityError(
            f"{path}: tensor file header claims {n} bytes but the file has {file_size}", path=path
        )
    raw = f.read(n)
    if len(raw) != n:
        raise errors.IntegrityError(
            f"{path}: tensor file is truncated inside its {n}-byte header", path=path
        )
    try:
        parsed = json.loads(raw)
    except (
        UnicodeDecodeError,
        json.JSONDecodeError,
        RecursionError,
        ValueError,
    ) as exc:  # ValueError: >4300-digit ints
        raise errors.IntegrityError(
            f"{path}: tensor file header is not valid JSON ({exc})", path=path
        ) from exc
    if not isinstance(parsed, dict):
        raise errors.IntegrityError(f"{path}: tensor file header is not a JSON object", path=path)
    parsed.pop("__metadata__", None)
    return head + raw, parsed


def read_into(fd: int, offset: int, dest: memoryview, path: str | os.PathLike[str]) -> None:
    """Fill ``dest`` from ``fd`` at ``offset`` (positional reads; no shared file position, so
    several threads may read one file)."""
    done = 0
    total = len(dest)
    while done < total:
        # Linux caps one read at 0x7ffff000 bytes.
        n = os.preadv(fd, [dest[done : done + 0x40000000]], offset + done)
        if n == 0:
            raise errors.IntegrityError(
                f"{path}: file ends at byte {offset + done}, expected {offset + total} (truncated?)",
                path=path,
            )
        done += n
