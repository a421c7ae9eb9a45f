"""Safe, lazy reader of TensorFlow tensor-bundle checkpoints, without TensorFlow.

Reads what ``tf.compat.v1.train.Saver`` (V2 format) and ``tf.train.Checkpoint`` /
``CheckpointManager`` write: ``P.index`` (a LevelDB-style SSTable of ``BundleEntryProto``),
``P.data-SSSSS-of-NNNNN`` shards, and the folder's ``checkpoint`` pointer file (FORMATS.md §3).

Key invariant: nothing in the files is trusted before it is checked. Every block of the
``.index`` is bounds-checked against the file and its masked CRC32C verified before it is
parsed; every varint, length, offset, shape and shard id is bounded (FORMATS.md §3.6, §7);
tensor bytes are read one tensor at a time by ``(shard, offset, size)`` and their entry CRC32C
is verified before they are returned; the pointer file is parsed as data and may only name a
checkpoint inside its own folder. Malformed input raises a typed
:class:`savegame.errors.FormatError` (``IntegrityError`` for checksum mismatches,
``UnsupportedFormatError`` for valid-but-unsupported features, ``UnsafeContentError`` for a
pointer that escapes its folder) whose ``.path`` names the offending file.

Names: ``keys()`` are the raw bundle keys (``dense/kernel`` for TF1;
``model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`` for TF2). For TF2 checkpoints
the ``_CHECKPOINTABLE_OBJECT_GRAPH`` is decoded and each key is given a readable object path
(``model/layer_with_weights-0/kernel``), used by :meth:`TensorFlowReader.tree` and listed in
``metadata()["object_paths"]``.

Partitioned variables (TF1 partitioners, TF >= 2.16 ``MaxShardSizePolicy``) are listed under
their full name and reassembled from their slice entries on read; the OrderedCode-keyed slice
entries themselves are not listed. Skipped (listed in ``metadata()["skipped"]`` with the
reason): inconsistent partitions, DT_VARIANT / DT_RESOURCE / quantized / 4-bit and other dtypes
without a torch equivalent. Snappy-compressed index blocks (TF <= 1.1 era) and Saver V1 files
raise :class:`~savegame.errors.UnsupportedFormatError`.

Example:
    >>> with open_tensorflow("runs/ckpts") as r:  # doctest: +SKIP
    ...     kernel = r.read(r.keys()[1])
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import google_crc32c

from savegame import errors
from savegame.interop import _tfproto, base

if TYPE_CHECKING:
    import numpy as np
    import torch

# numpy is imported where tensor values are built or checked (read(), bool/byte-order checks,
# partitioned variables) and torch only by read(): opening, listing and verifying a bundle of
# plain tensors check CRCs on bytes alone (issue 9.18).

__all__ = ["INDEX_MAGIC", "TensorFlowReader", "is_index_tail", "open_tensorflow", "sniff"]

#: Last 8 bytes of every ``.index`` file: fixed64 LE ``0xdb4775248b80fb57`` (FORMATS.md §3.2).
INDEX_MAGIC = bytes.fromhex("57fb808b247547db")
_FOOTER_BYTES = 48  # two padded BlockHandles (40 bytes) + magic (FORMATS.md §3.2)
_TRAILER_BYTES = 5  # compression type + masked CRC32C after every block
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_POINTER_FILE = "checkpoint"
_VARIABLE_VALUE = "VARIABLE_VALUE"

# Caps (FORMATS.md §3.6, §7). The index is read whole: a 1M-variable model's index is ~100 MB.
_MAX_INDEX_BYTES = 1 << 30
_MAX_POINTER_BYTES = 1 << 20
# A single 'S' array from read() may allocate at most max(this, 8 x stored bytes); beyond it
# (one long string among many short ones) use read_strings(), which has no padding.
_MAX_STRING_ARRAY_BYTES = 64 << 20
# A TrackableObjectGraph is a few hundred bytes per variable; decoding expands it ~30x in
# Python objects, so it is capped well below LIMITS.max_header_bytes.
_MAX_OBJECT_GRAPH_BYTES = 64 << 20
# Object paths: real Keras graphs are < 20 edges deep; a deeper node keeps its raw key.
_MAX_PATH_DEPTH = 256
_MAX_PATH_TEXT = 64 << 20
_SHARD_RE = re.compile(r"\.data-\d{5,}-of-\d{5,}$")

# DataType enum (tensorflow/core/framework/types.proto, FORMATS.md §3.3) -> torch dtype name,
# item size and byte-swap unit (complex types swap each component). Names, not torch objects:
# listing and verify() need no torch; read() imports it (issue 9.18).
_DTYPES: dict[int, tuple[str, int, int]] = {
    1: ("float32", 4, 4),
    2: ("float64", 8, 8),
    3: ("int32", 4, 4),
    4: ("uint8", 1, 1),
    5: ("int16", 2, 2),
    6: ("int8", 1, 1),
    8: ("complex64", 8, 4),
    9: ("int64", 8, 8),
    10: ("bool", 1, 1),
    14: ("bfloat16", 2, 2),
    17: ("uint16", 2, 2),
    18: ("complex128", 16, 8),
    19: ("float16", 2, 2),
    22: ("uint32", 4, 4),
    23: ("uint64", 8, 8),
    24: ("float8_e5m2", 1, 1),
    25: ("float8_e4m3fn", 1, 1),
    26: ("float8_e4m3fnuz", 1, 1),
    28: ("float8_e5m2fnuz", 1, 1),
}
_DT_STRING = 7
_DT_VARIANT = 21
_DTYPE_NAMES = {
    0: "invalid",
    7: "string",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
    27: "float8_e4m3b11fnuz",
    29: "int4",
    30: "uint4",
    31: "int2",
    32: "uint2",
    33: "float4_e2m1fn",
}


def _dtype_name(dtype: int) -> str:
    if dtype in _DTYPES:
        return _DTYPES[dtype][0]
    return _DTYPE_NAMES.get(dtype, f"DataType {dtype}")


# verify() checks the slices of a partitioned variable for overlap box against box up to this
# many slices (no numpy needed); more slices use a mask of the variable, like read().
_PAIRWISE_MAX_SLICES = 256


def _boxes_overlap(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> bool:
    """Whether two boxes of ``(start, length)`` per dimension share an element."""
    return all(max(sa, sb) < min(sa + na, sb + nb) for (sa, na), (sb, nb) in zip(a, b, strict=True))


def _mask(crc: int) -> int:
    # LevelDB/TF mask so a CRC over data containing CRCs stays strong (FORMATS.md §3.2).
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


_CRC_CHUNK = 16 << 20


def _masked_crc(*chunks: bytes | bytearray | memoryview) -> int:
    crc = 0
    for c in chunks:
        if isinstance(c, bytes):
            crc = google_crc32c.extend(crc, c)
            continue
        # google_crc32c takes only immutable bytes: copy in bounded pieces, not the whole tensor.
        mv = memoryview(c)
        for i in range(0, len(mv), _CRC_CHUNK):
            crc = google_crc32c.extend(crc, bytes(mv[i : i + _CRC_CHUNK]))
    return _mask(crc)


def is_index_tail(tail: bytes) -> bool:
    """True if ``tail`` (the last bytes of a file, at least 8) ends with the ``.index`` magic."""
    return len(tail) >= 8 and tail[-8:] == INDEX_MAGIC


def sniff(path: str | os.PathLike[str]) -> bool:
    """Cheap detection: is ``path`` a TF checkpoint this module can try to open?

    True for a ``.index`` file (or any file) whose last 8 bytes are the SSTable magic, a prefix
    whose ``<prefix>.index`` has it, and a folder holding a ``checkpoint`` pointer file. Never
    raises for I/O problems (returns False); reads at most 8 bytes.
    """
    p = os.fspath(path)
    try:
        if os.path.isdir(p):
            return os.path.isfile(os.path.join(p, _POINTER_FILE))
        for cand in (p, p + ".index"):
            if os.path.isfile(cand) and os.path.getsize(cand) >= _FOOTER_BYTES:
                with open(cand, "rb") as f:
                    f.seek(-8, os.SEEK_END)
                    if is_index_tail(f.read(8)):
                        return True
    except OSError:
        return False
    return False


# ---------------------------------------------------------------------------------------------
# SSTable (.index), FORMATS.md §3.2


@dataclass(frozen=True, slots=True)
class _Handle:
    offset: int
    size: int


def _decode_handle(buf: bytes, pos: int, end: int) -> tuple[_Handle, int]:
    off, pos = _tfproto.read_varint(buf, pos, end)
    size, pos = _tfproto.read_varint(buf, pos, end)
    return _Handle(off, size), pos


class _Table:
    """Parse a whole ``.index`` file held in memory, verifying every block on the way."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data = data
        self.path = path
        self.ranges: list[tuple[int, int, str]] = []
        self.count = 0

    def _corrupt(self, msg: str) -> errors.FormatError:
        return errors.FormatError(
            f"{self.path}: {msg}; the .index file is corrupt or truncated (re-copy it from "
            "the source)",
            path=self.path,
        )

    def block(self, h: _Handle, what: str) -> bytes:
        limit = len(self.data) - _FOOTER_BYTES
        # The 5-byte trailer must also fit before the footer (FORMATS.md §3.6: handles outside
        # the file or overlapping the footer).
        if h.offset > limit or h.size > limit - h.offset - _TRAILER_BYTES:
            raise self._corrupt(
                f"{what} handle (offset {h.offset}, size {h.size}) lies outside the "
                f"{limit} bytes before the footer"
            )
        end = h.offset + h.size
        contents = self.data[h.offset : end]
        ctype = self.data[end]
        (stored,) = struct.unpack_from("<I", self.data, end + 1)
        actual = _masked_crc(contents, bytes((ctype,)))
        if actual != stored:
            raise errors.IntegrityError(
                f"{self.path}: {what} at byte {h.offset} has CRC32C {actual:#010x}, the file "
                f"says {stored:#010x}; the .index file is corrupt (re-copy it)",
                path=self.path,
            )
        if ctype == 1:
            raise errors.UnsupportedFormatError(
                f"{self.path}: {what} is Snappy-compressed (TF <= 1.1 era); savegame reads "
                "only uncompressed bundles: re-save the checkpoint with a recent TensorFlow",
                path=self.path,
            )
        if ctype != 0:
            raise self._corrupt(f"{what} has unknown compression type {ctype}")
        self.ranges.append((h.offset, end + _TRAILER_BYTES, what))
        return contents

    def entries(self, block: bytes, what: str) -> list[tuple[bytes, bytes]]:
        """Decode a block's prefix-compressed entries and check its restart array."""
        size = len(block)
        if size < 4:
            raise self._corrupt(f"{what} is {size} bytes, too short for a restart count")
        (n,) = struct.unpack_from("<I", block, size - 4)
        # n restarts of 4 bytes plus the count itself must fit (FORMATS.md §3.6).
        if n == 0 or n > (size - 4) // 4:
            raise self._corrupt(f"{what} declares {n} restart points, impossible in {size} bytes")
        data_end = size - 4 - 4 * n
        restarts = struct.unpack_from(f"<{n}I", block, data_end)
        starts: dict[int, int] = {}
        out: list[tuple[bytes, bytes]] = []
        key = b""
        pos = 0
        while pos < data_end:
            start = pos
            try:
                shared, pos = _tfproto.read_varint(block, pos, data_end, max_bytes=5)
                non_shared, pos = _tfproto.read_varint(block, pos, data_end, max_bytes=5)
                value_len, pos = _tfproto.read_varint(block, pos, data_end, max_bytes=5)
            except _tfproto.ProtoError as exc:
                raise self._corrupt(f"{what} entry at byte {start}: {exc}") from exc
            if shared > len(key):
                raise self._corrupt(
                    f"{what} entry at byte {start} shares {shared} bytes with a previous key "
                    f"of {len(key)} bytes"
                )
            if non_shared > data_end - pos or value_len > data_end - pos - non_shared:
                raise self._corrupt(f"{what} entry at byte {start} runs past the block")
            new_key = key[:shared] + block[pos : pos + non_shared]
            pos += non_shared
            if out and new_key <= key:
                raise self._corrupt(f"{what} keys are not in strictly increasing order")
            key = new_key
            out.append((key, block[pos : pos + value_len]))
            pos += value_len
            starts[start] = shared
            self.count += 1
            if self.count > base.LIMITS.max_entries:
                raise self._corrupt(f"more than {base.LIMITS.max_entries} index entries")
        prev = -1
        for r in restarts:
            ok = (r in starts and starts[r] == 0) or (not out and r == 0)
            if not ok or r <= prev:
                raise self._corrupt(f"{what} restart point {r} is not the start of a full key")
            prev = r
        if out and restarts[0] != 0:
            raise self._corrupt(f"{what} does not start with a restart point")
        return out

    def read(self) -> list[tuple[bytes, bytes]]:
        data = self.data
        if not data:
            raise self._corrupt("file is empty (0 bytes)")
        if len(data) < _FOOTER_BYTES:
            raise self._corrupt(f"file is {len(data)} bytes, shorter than the 48-byte footer")
        if not is_index_tail(data):
            raise errors.FormatError(
                f"{self.path}: last 8 bytes are not the tensor-bundle magic 57fb808b247547db; "
                "this is not a TensorFlow .index file (or it is truncated)",
                path=self.path,
            )
        foot = len(data) - _FOOTER_BYTES
        try:
            meta_h, pos = _decode_handle(data, foot, foot + 40)
            index_h, _ = _decode_handle(data, pos, foot + 40)
        except _tfproto.ProtoError as exc:
            raise self._corrupt(f"footer: {exc}") from exc
        # The metaindex is empty in TF bundles (observed) but is still verified.
        self.entries(self.block(meta_h, "metaindex block"), "metaindex block")
        index = self.entries(self.block(index_h, "index block"), "index block")
        out: list[tuple[bytes, bytes]] = []
        prev_end = 0
        for i, (sep, value) in enumerate(index):
            try:
                h, end = _decode_handle(value, 0, len(value))
            except _tfproto.ProtoError as exc:
                raise self._corrupt(f"index entry {i}: {exc}") from exc
            if end != len(value):
                raise self._corrupt(f"index entry {i} has {len(value) - end} trailing bytes")
            what = f"data block {i}"
            # Data blocks are written back to back: requiring increasing, disjoint ranges
            # before reading keeps the total CRC and parse work <= the file size even if a
            # hostile index points many entries at one big block.
            if i > 0 and h.offset < prev_end:
                raise self._corrupt(f"{what} starts inside or before the previous data block")
            prev_end = h.offset + h.size + _TRAILER_BYTES
            rows = self.entries(self.block(h, what), what)
            if not rows:
                raise self._corrupt(f"{what} is empty")
            if out and rows[0][0] <= out[-1][0]:
                raise self._corrupt(f"{what} keys do not follow the previous block's")
            # The index key separates blocks: last key <= separator < next block's first key.
            if rows[-1][0] > sep or (out and out[-1][0] >= rows[0][0]):
                raise self._corrupt(f"index key of {what} does not bound its keys")
            if i > 0 and rows[0][0] <= index[i - 1][0]:
                raise self._corrupt(f"index key of data block {i - 1} exceeds {what}'s keys")
            out.extend(rows)
        spans = sorted(self.ranges)
        for (_a0, a1, aw), (b0, _b1, bw) in zip(spans, spans[1:], strict=False):
            if b0 < a1:
                raise self._corrupt(f"{aw} and {bw} overlap")
        return out


# ---------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True, slots=True)
class _Entry:
    key: str  # display name (repr of the raw key for binary slice keys)
    dtype: int
    shape: tuple[int, ...]
    numel: int
    shard_id: int
    offset: int
    size: int
    crc: int
    # Partitioned variables: the full entry's declared extents, then (once matched with the
    # slice entries) the parts as (slice entry, ((start, length) per dim)).
    extents: tuple[tuple[tuple[int, int | None], ...], ...] = ()
    parts: tuple[tuple[_Entry, tuple[tuple[int, int], ...]], ...] = ()


def _numel(shape: tuple[int, ...]) -> int | None:
    n = 1
    for d in shape:
        n *= d
        if n > base.LIMITS.max_tensor_numel:
            return None
    return n


def _nest(flat: list[bytes], shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _slice_key_name(raw: bytes) -> tuple[bytes, int] | None:
    """Name and rank from an OrderedCode slice key, or None if it is malformed.

    Layout [tensorflow/core/util/saved_tensor_slice_util.cc ``EncodeTensorNameSlice``,
    FORMATS.md §3.3]: number 0 (byte 0x00), the name as an OrderedCode string (0x00 escaped as
    00 ff, 0xff as ff 00, terminated by 00 01), the rank as an OrderedCode number (length
    byte + big-endian bytes), then order-preserving signed (start, length) per dimension.
    """
    if not raw.startswith(b"\x00"):
        return None
    out = bytearray()
    i = 1
    while i + 1 < len(raw):
        b, nxt = raw[i], raw[i + 1]
        if b == 0x00:
            if nxt == 0x01:
                i += 2
                break
            if nxt != 0xFF:
                return None
            out.append(0x00)
            i += 2
        elif b == 0xFF:
            if nxt != 0x00:
                return None
            out.append(0xFF)
            i += 2
        else:
            out.append(b)
            i += 1
    else:
        return None
    if i >= len(raw) or raw[i] > 8 or i + 1 + raw[i] > len(raw):
        return None
    return bytes(out), int.from_bytes(raw[i + 1 : i + 1 + raw[i]], "big")


class TensorFlowReader:
    """A TF tensor bundle opened by :func:`open_tensorflow` (see the module docstring).

    Attributes:
        path: The checkpoint prefix (``.../ckpt-1``), without ``.index``.
        format: ``"tensorflow"``.
    """

    format = "tensorflow"

    def __init__(self, prefix: str, state: _tfproto.CheckpointState | None) -> None:
        self.path = prefix
        self._index_path = prefix + ".index"
        self._state = state
        self._closed = False
        self._entries: dict[str, _Entry] = {}
        self._other: list[_Entry] = []  # slice entries and unsupported dtypes: verify() only
        self._slices: dict[tuple[bytes, int], list[_Entry]] = {}  # (name, rank) -> key order
        self._problems: list[str] = []  # found at open, reported by verify()
        self._skipped: dict[str, str] = {}
        self._graph_paths: dict[str, str] | None = None
        self._full_names: dict[str, str] = {}
        self._graph_keys: set[str] = set()
        self._graph_error: str | None = None
        self._load_index()

    # -- opening -----------------------------------------------------------------------------

    def _read_index_file(self) -> bytes:
        p = self._index_path
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > _MAX_INDEX_BYTES:
                    raise errors.FormatError(
                        f"{p} is {size} bytes, above the {_MAX_INDEX_BYTES}-byte cap for an index",
                        path=p,
                    )
                # read(n) preallocates n bytes: ask for the stat size, not the cap.
                return f.read(size)
        except FileNotFoundError as exc:
            raise errors.CheckpointNotFoundError(
                f"{p} does not exist; pass the checkpoint prefix, its .index file or the "
                "folder holding the 'checkpoint' file",
                path=p,
            ) from exc
        except IsADirectoryError as exc:
            raise errors.CheckpointNotFoundError(f"{p} is a folder, not an index", path=p) from exc
        except OSError as exc:
            raise errors.StorageError(f"cannot read {p}: {exc}", path=p) from exc

    def _load_index(self) -> None:
        p = self._index_path
        rows = _Table(self._read_index_file(), p).read()
        if not rows or rows[0][0] != b"":
            raise errors.FormatError(
                f"{p} has no bundle header (key ''); not a tensor bundle, or corrupt", path=p
            )
        try:
            header = _tfproto.decode_header(rows[0][1])
        except _tfproto.ProtoError as exc:
            raise errors.FormatError(f"{p}: bundle header: {exc}", path=p) from exc
        # TF's own check: consumer version 1 must be >= min_consumer and not a bad consumer.
        if header.min_consumer > 1 or 1 in header.bad_consumers:
            raise errors.UnsupportedFormatError(
                f"{p} needs bundle reader version >= {header.min_consumer} "
                f"(bad: {list(header.bad_consumers)}); savegame implements version 1",
                path=p,
            )
        # Huge num_shards is legal-looking but is never preallocated (FORMATS.md §3.6).
        if not 1 <= header.num_shards <= base.LIMITS.max_entries:
            raise errors.FormatError(f"{p}: num_shards={header.num_shards} is out of range", path=p)
        self._header = header
        for raw_key, value in rows[1:]:
            self._add_entry(raw_key, value)
        for key, e in list(self._entries.items()):
            if e.extents:
                self._resolve_partitioned(key, e)

    def _resolve_partitioned(self, key: str, e: _Entry) -> None:
        """Match a partitioned variable's extents with its slice entries, or skip it.

        Slice keys encode (name, rank, start, length, ...) order-preservingly, so the slice
        entries of one variable, in key order, correspond to its extents sorted by
        (start, length) per dimension (a full dimension sorts as length -1).
        """

        def skip(why: str) -> None:
            del self._entries[key]
            self._skipped[key] = f"partitioned variable: {why}"
            self._problems.append(f"{key}: partitioned variable: {why}")

        if e.dtype not in _DTYPES:
            del self._entries[key]
            self._skipped[key] = f"partitioned {_dtype_name(e.dtype)} variable is not supported"
            return
        slices = self._slices.get((key.encode("utf-8"), len(e.shape)), [])
        if len(slices) != len(e.extents):
            skip(f"{len(e.extents)} slices declared, {len(slices)} slice entries found")
            return
        order = sorted(
            e.extents, key=lambda ext: [v for s, n in ext for v in (s, -1 if n is None else n)]
        )
        parts = []
        covered = 0
        for ext, part in zip(order, slices, strict=True):
            if len(ext) != len(e.shape) or part.dtype != e.dtype:
                skip(f"slice {part.key} does not match rank {len(e.shape)} / dtype")
                return
            box = []
            for (start, length), dim in zip(ext, e.shape, strict=True):
                n = dim - start if length is None else length
                if start < 0 or n < 0 or start + n > dim:
                    skip(f"extent ({start}, {length}) lies outside dimension {dim}")
                    return
                box.append((start, n))
            if tuple(n for _, n in box) != part.shape:
                skip(f"slice {part.key} has shape {list(part.shape)}, extent says {box}")
                return
            covered += part.numel
            parts.append((part, tuple(box)))
        # With no overlap (checked on read) equal element counts mean full coverage.
        if covered != e.numel:
            skip(f"slices hold {covered} elements, the variable has {e.numel}")
            return
        self._entries[key] = dataclasses.replace(
            e, size=sum(p.size for p, _ in parts), parts=tuple(parts)
        )

    def _add_entry(self, raw_key: bytes, value: bytes) -> None:
        p = self._index_path
        # Slice keys are OrderedCode-encoded and start with the number 0 (FORMATS.md §3.3).
        is_slice = raw_key.startswith(b"\x00")
        try:
            key = repr(raw_key) if is_slice else raw_key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise errors.FormatError(f"{p}: key {raw_key[:60]!r} is not UTF-8", path=p) from exc
        try:
            pe = _tfproto.decode_entry(value)
        except _tfproto.ProtoError as exc:
            raise errors.FormatError(f"{p}: entry {key!r}: {exc}", path=p, key=key) from exc

        def bad(msg: str) -> errors.FormatError:
            return errors.FormatError(f"{p}: entry {key!r}: {msg}", path=p, key=key)

        if not 0 <= pe.shard_id < self._header.num_shards:
            raise bad(f"shard_id {pe.shard_id} is not below num_shards {self._header.num_shards}")
        if pe.offset < 0 or pe.size < 0 or pe.offset + pe.size >= 1 << 63:
            raise bad(f"byte range offset={pe.offset} size={pe.size} is invalid")
        if pe.unknown_rank or any(d < 0 for d in pe.shape):
            raise bad(f"shape {list(pe.shape)} has unknown or negative dimensions")
        numel = _numel(pe.shape)
        if numel is None:
            raise bad(f"shape {list(pe.shape)} exceeds {base.LIMITS.max_tensor_numel} elements")
        entry = _Entry(key, pe.dtype, pe.shape, numel, pe.shard_id, pe.offset, pe.size, pe.crc32c)
        if is_slice:
            self._other.append(entry)
            ident = _slice_key_name(raw_key)
            if ident is None:
                self._problems.append(f"slice entry {key}: malformed slice key")
            else:
                self._slices.setdefault(ident, []).append(entry)
            if pe.dtype in _DTYPES and pe.size != numel * _DTYPES[pe.dtype][1]:
                raise bad(f"slice size {pe.size} != {numel} x {_DTYPES[pe.dtype][1]} bytes")
            return
        if pe.slices:
            # Resolved against the slice entries once the whole index is read.
            self._entries[key] = dataclasses.replace(entry, extents=pe.slices)
            return
        if pe.dtype in _DTYPES:
            itemsize = _DTYPES[pe.dtype][1]
            if pe.size != numel * itemsize:
                raise bad(
                    f"size {pe.size} != {numel} elements x {itemsize} bytes for "
                    f"{_dtype_name(pe.dtype)}{list(pe.shape)}"
                )
        elif pe.dtype == _DT_STRING:
            # Each element needs >= 1 length byte, plus the 4-byte length checksum (§3.3).
            if pe.size < numel + 4:
                raise bad(f"size {pe.size} is too small for {numel} strings")
        else:
            self._other.append(entry)
            self._skipped[key] = f"dtype {_dtype_name(pe.dtype)} is not supported"
            return
        self._entries[key] = entry

    # -- protocol ----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Raw bundle keys of readable tensors, in file (sorted) order. Reads no tensor data."""
        return list(self._entries)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype (torch name, or ``"string"``), shape and stored bytes of one tensor."""
        e = self._entry(name)
        return base.TensorInfo(name, _dtype_name(e.dtype), e.shape, e.size)

    def read(self, name: str) -> torch.Tensor | np.ndarray:
        """Read one tensor, verifying its CRC32C; big-endian bundles are byte-swapped.

        Numeric tensors come back as CPU torch tensors owning their memory (a partitioned
        variable is assembled from its slices, each CRC-checked, overlaps refused). String tensors
        come back as a NumPy array of dtype ``S<n>`` (fixed-width bytes, never ``object``);
        NumPy strips trailing NUL bytes from ``S`` items, so use :meth:`read_strings` when
        strings may end in ``\\x00``.
        """
        e = self._entry(name)
        if e.parts:
            whole = self._read_partitioned(e)
            assert whole is not None  # assemble=True always builds the tensor
            return whole
        buf = self._read_bytes(e, check_crc=e.dtype != _DT_STRING)
        if e.dtype == _DT_STRING:
            import numpy as np

            flat = self._decode_strings(e, buf)
            width = max((len(s) for s in flat), default=0)
            cap = max(_MAX_STRING_ARRAY_BYTES, 8 * e.size)
            if e.numel * max(width, 1) > cap:
                raise errors.FormatError(
                    f"string tensor {name!r}: {e.numel} items padded to {width} bytes exceed "
                    f"{cap} bytes; use read_strings() for an unpadded list",
                    path=self.path,
                    key=name,
                )
            return np.array(flat, dtype=f"S{max(width, 1)}").reshape(e.shape)
        return self._numeric(e, buf, name)

    def _check_values(self, e: _Entry, buf: bytearray, name: str) -> None:
        """The value check of :meth:`_check_numeric` on bytes alone (verify: no byte swap)."""
        if e.dtype == 10 and bytes(buf).translate(None, b"\x00\x01"):
            raise errors.FormatError(
                f"bool tensor {name!r} holds bytes other than 0 and 1", path=self.path, key=name
            )

    def _check_numeric(self, e: _Entry, buf: bytearray, name: str) -> None:
        """Byte-swap ``buf`` in place for a big-endian bundle and check bool bytes (numpy)."""
        import numpy as np

        unit = _DTYPES[e.dtype][2]
        if self._header.big_endian and unit > 1:
            np.frombuffer(buf, dtype=f"u{unit}").byteswap(inplace=True)
        if e.dtype == 10 and int(np.frombuffer(buf, dtype=np.uint8).max()) > 1:
            raise errors.FormatError(
                f"bool tensor {name!r} holds bytes other than 0 and 1", path=self.path, key=name
            )

    def _numeric(self, e: _Entry, buf: bytearray, name: str) -> torch.Tensor:
        import torch

        tdtype = getattr(torch, _DTYPES[e.dtype][0])
        if e.numel == 0:
            return torch.empty(e.shape, dtype=tdtype)
        self._check_numeric(e, buf, name)
        return torch.frombuffer(buf, dtype=tdtype).reshape(e.shape)

    def _read_partitioned(self, e: _Entry, *, assemble: bool = True) -> torch.Tensor | None:
        """The whole variable from its slices; ``assemble=False`` (verify) checks the same
        bounds, overlaps, CRCs and values with numpy alone and returns None."""
        # Every slice range must lie in its shard, and all slices together may not claim more
        # bytes than their shards hold (slices could all point at the same bytes), before the
        # full tensor is allocated: the allocation is bounded by real bytes (FORMATS.md §7).
        shard_sizes: dict[int, int] = {}
        for part, _box in e.parts:
            sp = self._shard_path(part.shard_id)
            if part.shard_id not in shard_sizes:
                try:
                    shard_sizes[part.shard_id] = os.path.getsize(sp)
                except FileNotFoundError as exc:
                    raise errors.CheckpointNotFoundError(
                        f"shard {sp} is missing (slice of {e.key!r}); copy every .data-* file "
                        "of the checkpoint",
                        path=sp,
                        key=e.key,
                    ) from exc
                except OSError as exc:
                    raise errors.StorageError(f"cannot read {sp}: {exc}", path=sp) from exc
            if part.offset + part.size > shard_sizes[part.shard_id]:
                raise errors.FormatError(
                    f"{sp}: slice of {e.key!r} needs bytes up to {part.offset + part.size} but "
                    f"the shard has {shard_sizes[part.shard_id]}; the shard is truncated or "
                    "the index lies",
                    path=sp,
                    key=e.key,
                )
        if e.size > sum(shard_sizes.values()):
            raise errors.FormatError(
                f"{self.path}: slices of {e.key!r} claim {e.size} bytes, more than their shards "
                "hold; the index is corrupt",
                path=self.path,
                key=e.key,
            )
        out = None
        if assemble:
            import torch

            out = torch.empty(e.shape, dtype=getattr(torch, _DTYPES[e.dtype][0]))
        # Overlap: a mask of the variable, or (verify, few slices) box against box, which finds
        # the same first overlap without numpy.
        pairwise = out is None and len(e.parts) <= _PAIRWISE_MAX_SLICES
        seen = None
        if not pairwise:
            import numpy as np

            seen = np.zeros(e.shape, dtype=np.bool_)
        for j, (part, box) in enumerate(e.parts):
            region = tuple(slice(s, s + n) for s, n in box)
            if seen is not None:
                overlap = bool(seen[region].any())
                seen[region] = True
            else:
                overlap = any(_boxes_overlap(box, other) for _, other in e.parts[:j])
            if overlap:
                raise errors.FormatError(
                    f"{self.path}: slices of {e.key!r} overlap", path=self.path, key=e.key
                )
            buf = self._read_bytes(part, check_crc=True)
            if out is not None:
                out[region] = self._numeric(part, buf, e.key)
            elif part.numel:
                self._check_values(part, buf, e.key)
        return out

    def read_strings(self, name: str) -> Any:
        """A string tensor as nested lists of ``bytes`` (a ``bytes`` for a scalar), lossless."""
        e = self._entry(name)
        if e.dtype != _DT_STRING:
            raise errors.FormatError(
                f"{name!r} is {_dtype_name(e.dtype)}, not a string tensor; use read()",
                path=self.path,
                key=name,
            )
        return _nest(self._decode_strings(e, self._read_bytes(e, check_crc=False)), e.shape)

    def tree(self) -> dict[str, Any]:
        """Nested dict of :class:`~savegame.interop.base.TensorRef` by readable object path.

        TF2 keys are placed by their object path (``model/layer_with_weights-0/kernel``),
        TF1 keys by their ``/``-separated name. A name that is both a tensor and a prefix of
        other names (TF1 ``dense/kernel`` and ``dense/kernel/Adam``) keeps the tensor under
        the key ``"."``.
        """
        paths = self.object_paths()
        root: dict[str, Any] = {}
        for key in self._entries:
            parts = [s for s in paths.get(key, key).split("/") if s] or [key]
            node = root
            for part in parts[:-1]:
                nxt = node.get(part)
                if isinstance(nxt, base.TensorRef):
                    nxt = node[part] = {".": nxt}
                elif nxt is None:
                    nxt = node[part] = {}
                node = nxt
            leaf = parts[-1]
            if isinstance(node.get(leaf), dict):
                node[leaf]["."] = base.TensorRef(key)
            elif leaf in node:  # two keys with one readable path: fall back to the raw key
                root[key] = base.TensorRef(key)
            else:
                node[leaf] = base.TensorRef(key)
        return root

    def object_paths(self) -> dict[str, str]:
        """Raw key -> readable object path for TF2 checkpoints (empty for TF1).

        Resolved through the ``_CHECKPOINTABLE_OBJECT_GRAPH`` (FORMATS.md §3.4), not by
        string patterns: each variable is named by its shortest path from the root that does
        not go through an edge called ``optimizer`` when another path exists (Keras 3 lists
        model weights under the optimizer first); slot variables are
        ``<variable path>/.OPTIMIZER_SLOT/<optimizer path>/<slot name>``; attributes other
        than ``VARIABLE_VALUE`` add ``/<attribute name>``.

        A corrupt object graph does not make the tensors unreadable: the paths are then empty,
        ``metadata()["object_graph_error"]`` says why, and :meth:`verify` reports it.
        """
        self._check_open()
        if self._graph_paths is None:
            try:
                self._graph_paths = self._resolve_graph()
            except errors.FormatError as exc:
                self._graph_error = str(exc)
                self._graph_paths = {}
        return dict(self._graph_paths)

    def metadata(self) -> dict[str, Any]:
        """JSON-compatible facts: layout, shards, byte order, versions, names, skipped keys.

        Keys: ``prefix``, ``layout`` (``"tf2-object-graph"`` or ``"tf1-names"``),
        ``num_shards``, ``byte_order``, ``version`` (``producer``, ``min_consumer``),
        ``object_paths`` (raw key -> object path), ``variable_names`` (raw key -> the
        variable's own ``full_name`` from the object graph), ``skipped`` (key -> reason), and
        ``checkpoint_state`` when opened through a ``checkpoint`` file, and
        ``object_graph_error`` when the TF2 object graph could not be decoded.
        """
        paths = self.object_paths()
        meta: dict[str, Any] = {
            "prefix": self.path,
            "layout": "tf2-object-graph" if _OBJECT_GRAPH_KEY in self._entries else "tf1-names",
            "num_shards": self._header.num_shards,
            "byte_order": "big" if self._header.big_endian else "little",
            "version": {
                "producer": self._header.producer,
                "min_consumer": self._header.min_consumer,
            },
            "object_paths": paths,
            "variable_names": dict(self._full_names),
            "skipped": dict(self._skipped),
        }
        if self._graph_error is not None:
            meta["object_graph_error"] = self._graph_error
        if self._state is not None:
            meta["checkpoint_state"] = {
                "model_checkpoint_path": self._state.model_checkpoint_path,
                "all_model_checkpoint_paths": list(self._state.all_model_checkpoint_paths),
            }
        return meta

    def verify(self) -> list[str]:
        """Re-read the index (every block CRC) and every entry (bounds and CRC32C).

        Slice entries and entries of unsupported dtypes are checked too (bounds, and the CRC
        except for DT_VARIANT, whose checksum is per element). Returns the problems found;
        empty means the checkpoint is intact.
        """
        self._check_open()
        problems: list[str] = []
        try:
            _Table(self._read_index_file(), self._index_path).read()
        except errors.CheckpointError as exc:
            return [str(exc)]
        problems.extend(self._problems)
        for e in [*self._entries.values(), *self._other]:
            try:
                if e.parts:
                    self._read_partitioned(e, assemble=False)  # bounds, overlap, parts' CRCs
                    continue
                if e.dtype == _DT_STRING:
                    self._decode_strings(e, self._read_bytes(e, check_crc=False))
                elif e.dtype == _DT_VARIANT:
                    self._read_bytes(e, check_crc=False)
                else:
                    self._read_bytes(e, check_crc=True)
            except errors.CheckpointError as exc:
                problems.append(f"{e.key}: {exc}")
        if _OBJECT_GRAPH_KEY in self._entries:
            try:
                self._resolve_graph()
            except errors.CheckpointError as exc:
                problems.append(f"{_OBJECT_GRAPH_KEY}: {exc}")
            known = set(self._entries) | set(self._skipped)
            for key in sorted(self._graph_keys - known):
                problems.append(f"object graph names {key!r}, which is not in the index")
        return problems

    def close(self) -> None:
        """Mark the reader closed (files are opened per read, so nothing stays open)."""
        self._closed = True

    def __enter__(self) -> TensorFlowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFlowReader({self.path!r}, {len(self._entries)} tensors)"

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise errors.CheckpointError(f"reader for {self.path} is closed", path=self.path)

    def _entry(self, name: str) -> _Entry:
        self._check_open()
        try:
            return self._entries[name]
        except KeyError:
            why = self._skipped.get(name)
            raise errors.CheckpointNotFoundError(
                f"{self.path} has no readable tensor {name!r}"
                + (f" ({why})" if why else "; see keys()"),
                path=self.path,
                key=name,
            ) from None

    def _shard_path(self, shard: int) -> str:
        return f"{self.path}.data-{shard:05d}-of-{self._header.num_shards:05d}"

    def _read_bytes(self, e: _Entry, *, check_crc: bool) -> bytearray:
        sp = self._shard_path(e.shard_id)
        try:
            with open(sp, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if e.offset > size or e.size > size - e.offset:
                    raise errors.FormatError(
                        f"{sp}: tensor {e.key!r} needs bytes [{e.offset}, {e.offset + e.size}) "
                        f"but the shard has {size}; the shard is truncated or the index lies",
                        path=sp,
                        key=e.key,
                    )
                buf = bytearray(e.size)
                f.seek(e.offset)
                got = f.readinto(buf)
        except FileNotFoundError as exc:
            raise errors.CheckpointNotFoundError(
                f"shard {sp} is missing (tensor {e.key!r}); copy every .data-* file of the "
                "checkpoint",
                path=sp,
                key=e.key,
            ) from exc
        except OSError as exc:
            raise errors.StorageError(f"cannot read {sp}: {exc}", path=sp, key=e.key) from exc
        if got != e.size:
            raise errors.FormatError(f"{sp}: short read for {e.key!r}", path=sp, key=e.key)
        if check_crc:
            actual = _masked_crc(buf)
            if actual != e.crc:
                raise errors.IntegrityError(
                    f"{sp}: tensor {e.key!r} has CRC32C {actual:#010x}, the index says "
                    f"{e.crc:#010x}; the shard is corrupt (re-copy it)",
                    path=sp,
                    key=e.key,
                )
        return buf

    def _decode_strings(self, e: _Entry, buf: bytearray) -> list[bytes]:
        """DT_STRING layout (FORMATS.md §3.3): varint lengths, masked CRC, concatenated bytes."""
        sp = self._shard_path(e.shard_id)

        def bad(msg: str) -> errors.FormatError:
            return errors.FormatError(f"{sp}: string tensor {e.key!r}: {msg}", path=sp, key=e.key)

        raw = bytes(buf)
        end = len(raw)
        lengths: list[int] = []
        pos = 0
        try:
            for _ in range(e.numel):  # numel <= size - 4 was checked at open
                n, pos = _tfproto.read_varint(raw, pos, end)
                lengths.append(n)
        except _tfproto.ProtoError as exc:
            raise bad(str(exc)) from exc
        total = sum(lengths)
        if pos + 4 > end or total != end - pos - 4:
            raise bad(f"string lengths sum to {total} but {max(end - pos - 4, 0)} bytes follow")
        order: Literal["big", "little"] = "big" if self._header.big_endian else "little"
        # The lengths' checksum is over each length as uint32 (uint64 if it does not fit).
        len_bytes = b"".join(n.to_bytes(4 if n < 1 << 32 else 8, order) for n in lengths)
        stored = raw[pos : pos + 4]
        body = memoryview(raw)[pos + 4 :]
        entry_crc = _masked_crc(len_bytes, stored, body)
        if entry_crc != e.crc:
            raise errors.IntegrityError(
                f"{sp}: string tensor {e.key!r} has CRC32C {entry_crc:#010x}, the index says "
                f"{e.crc:#010x}; the shard is corrupt (re-copy it)",
                path=sp,
                key=e.key,
            )
        if _masked_crc(len_bytes) != int.from_bytes(stored, "little"):
            raise errors.IntegrityError(
                f"{sp}: string tensor {e.key!r}: length checksum mismatch", path=sp, key=e.key
            )
        out: list[bytes] = []
        p = pos + 4
        for n in lengths:
            out.append(raw[p : p + n])
            p += n
        return out

    def _resolve_graph(self) -> dict[str, str]:
        """Read the object graph and name every checkpoint key by its object path (§3.4)."""
        entry = self._entries.get(_OBJECT_GRAPH_KEY)
        if entry is None or entry.dtype != _DT_STRING or entry.shape != ():
            return {}
        raw = self._decode_strings(entry, self._read_bytes(entry, check_crc=False))[0]
        if len(raw) > _MAX_OBJECT_GRAPH_BYTES:
            raise errors.FormatError(
                f"{self.path}: object graph is {len(raw)} bytes, above the "
                f"{_MAX_OBJECT_GRAPH_BYTES}-byte cap",
                path=self.path,
                key=_OBJECT_GRAPH_KEY,
            )
        try:
            nodes = _tfproto.decode_object_graph(
                raw, max_nodes=base.LIMITS.max_entries, max_refs=2 * base.LIMITS.max_entries
            )
        except _tfproto.ProtoError as exc:
            raise errors.FormatError(
                f"{self.path}: object graph: {exc}", path=self.path, key=_OBJECT_GRAPH_KEY
            ) from exc
        try:
            node_path = _node_paths(nodes)
        except _tfproto.ProtoError as exc:
            raise errors.FormatError(
                f"{self.path}: object graph: {exc}", path=self.path, key=_OBJECT_GRAPH_KEY
            ) from exc
        # Slot variables are not children; they hang off (variable, optimizer) pairs.
        budget = _MAX_PATH_TEXT
        for opt_id, node in enumerate(nodes):
            for var_id, slot, slot_id in node.slot_variables:
                if slot_id not in node_path and var_id in node_path and opt_id in node_path:
                    p = f"{node_path[var_id]}/.OPTIMIZER_SLOT/{node_path[opt_id]}/{slot}"
                    budget -= len(p)
                    if budget < 0:
                        raise errors.FormatError(
                            f"{self.path}: object graph: slot variable paths exceed "
                            f"{_MAX_PATH_TEXT} characters",
                            path=self.path,
                            key=_OBJECT_GRAPH_KEY,
                        )
                    node_path[slot_id] = p
        out: dict[str, str] = {}
        full: dict[str, str] = {}
        keys: set[str] = set()
        for node_id, node in enumerate(nodes):
            for name, full_name, ckey in node.attributes:
                keys.add(ckey)
                if node_id not in node_path or ckey in out:
                    continue
                p = node_path[node_id]
                if name != _VARIABLE_VALUE:
                    p = f"{p}/{name}"
                    budget -= len(p)
                    if budget < 0:
                        raise errors.FormatError(
                            f"{self.path}: object graph: attribute paths exceed "
                            f"{_MAX_PATH_TEXT} characters",
                            path=self.path,
                            key=_OBJECT_GRAPH_KEY,
                        )
                out[ckey] = p
                if full_name:
                    full[ckey] = full_name
        self._full_names = full
        self._graph_keys = keys
        return out


def _node_paths(nodes: _tfproto.TrackableGraph) -> dict[int, str]:
    """Best path from the root (node 0) to every reachable node.

    Dijkstra on (edges named ``optimizer``, depth, discovery order): the shortest path, but a
    path through an optimizer only when there is no other (FORMATS.md §3.4: Keras 3 puts model
    weights under ``optimizer/_trainable_variables`` first). Each node is finalised once and
    its path built from its parent's, so the work is linear in the edges; nodes deeper than
    ``_MAX_PATH_DEPTH`` stay unnamed and the total path text is capped, so a hostile graph
    (long chains, cycles, many paths) cannot blow up time or memory.
    """
    if not nodes:
        return {}
    best: dict[int, tuple[int, int, int]] = {0: (0, 0, 0)}
    parent: dict[int, tuple[int, str]] = {}
    heap: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    paths: dict[int, str] = {}
    seq = 0
    total = 0
    while heap:
        demoted, depth, _order, nid = heapq.heappop(heap)
        if nid in paths:
            continue
        if nid == 0:
            paths[0] = ""
        else:
            up, name = parent[nid]
            paths[nid] = f"{paths[up]}/{name}" if paths[up] else name
            total += len(paths[nid])
            if total > _MAX_PATH_TEXT:
                raise _tfproto.ProtoError(f"object paths exceed {_MAX_PATH_TEXT} characters")
        if depth >= _MAX_PATH_DEPTH:
            continue
        for child, name in nodes[nid].children:
            if child in paths:
                continue
            seq += 1
            cost = (demoted + (name == "optimizer"), depth + 1, seq)
            if child not in best or cost < best[child]:
                best[child] = cost
                parent[child] = (nid, name)
                heapq.heappush(heap, (*cost, child))
    return paths


def _inside(root: str, target: str) -> bool:
    return os.path.commonpath([root, target]) == root and target != root


def _prefix_from_folder(folder: str) -> tuple[str, _tfproto.CheckpointState]:
    pointer = os.path.join(folder, _POINTER_FILE)
    try:
        with open(pointer, "rb") as f:
            raw = f.read(min(os.fstat(f.fileno()).st_size, _MAX_POINTER_BYTES + 1))
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(
            f"{folder} has no '{_POINTER_FILE}' file; pass the checkpoint prefix "
            "(e.g. .../ckpt-1) or its .index file instead",
            path=folder,
        ) from exc
    except OSError as exc:
        raise errors.StorageError(f"cannot read {pointer}: {exc}", path=pointer) from exc
    if len(raw) > _MAX_POINTER_BYTES:
        raise errors.FormatError(
            f"{pointer} is larger than {_MAX_POINTER_BYTES} bytes", path=pointer
        )
    if not raw:
        raise errors.FormatError(
            f"{pointer} is empty (0 bytes): it names no checkpoint; pass the checkpoint prefix "
            "(e.g. .../ckpt-1) or its .index file instead",
            path=pointer,
        )
    try:
        state = _tfproto.parse_checkpoint_state(raw.decode("utf-8"))
    except (UnicodeDecodeError, _tfproto.ProtoError) as exc:
        raise errors.FormatError(
            f"{pointer} is not a valid CheckpointState text file: {exc}", path=pointer
        ) from exc
    target = state.model_checkpoint_path
    if not target or "\x00" in target:
        raise errors.FormatError(f"{pointer}: model_checkpoint_path is empty", path=pointer)
    root = os.path.realpath(folder)
    # Resolve symlinks and '..' before comparing: the pointer may only name a checkpoint in its
    # own folder (FORMATS.md §3.6). TF1 writes absolute paths by default; those are accepted
    # only when they still point inside this folder.
    resolved = os.path.realpath(target if os.path.isabs(target) else os.path.join(root, target))
    if not _inside(root, resolved):
        raise errors.UnsafeContentError(
            f"{pointer} points to {target!r}, outside {root}; savegame only follows pointers "
            f"inside the folder. Open the checkpoint prefix directly (e.g. "
            f"{os.path.join(folder, os.path.basename(target))!r}) if that is what you want",
            path=pointer,
        )
    return resolved, state


def open_tensorflow(path: str | os.PathLike[str]) -> TensorFlowReader:
    """Open a TensorFlow tensor-bundle checkpoint lazily, without TensorFlow.

    Args:
        path: The checkpoint prefix (``.../ckpt-1``), its ``.index`` or a ``.data-*`` file, a
            folder holding a ``checkpoint`` pointer file (the latest checkpoint is opened), or
            that pointer file itself.

    Returns:
        A :class:`TensorFlowReader`; the index is parsed and verified, no tensor is read.

    Raises:
        savegame.errors.CheckpointNotFoundError: No ``.index`` at the resolved prefix.
        savegame.errors.FormatError: The index or pointer file is corrupt (subclasses:
            ``IntegrityError`` for CRC mismatches, ``UnsupportedFormatError`` for Snappy or
            future bundle versions, ``UnsafeContentError`` for a pointer leaving its folder).
    """
    p = os.fspath(path)
    state: _tfproto.CheckpointState | None = None
    if os.path.isdir(p):
        prefix, state = _prefix_from_folder(p)
    elif os.path.basename(p) == _POINTER_FILE and os.path.isfile(p):
        prefix, state = _prefix_from_folder(os.path.dirname(p) or ".")
    elif p.endswith(".index"):
        prefix = p[: -len(".index")]
    elif _SHARD_RE.search(p):
        prefix = _SHARD_RE.sub("", p)
    else:
        prefix = p
        if not os.path.exists(p + ".index") and os.path.isfile(p) and sniff(p):
            # A single SSTable file that is not a bundle index: the pre-2017 Saver V1 format
            # (SavedTensorSlices), which has a different entry layout.
            raise errors.UnsupportedFormatError(
                f"{p} is a TensorFlow Saver V1 checkpoint (one SSTable file, no .index); "
                "savegame reads only the V2 tensor-bundle format: re-save it with "
                "tf.compat.v1.train.Saver() in TF >= 1.2 (the default writes V2)",
                path=p,
            )
    return TensorFlowReader(prefix, state)
