"""The tensor bundle's index, interpreted: header checks, one entry per key, partitioned variables.

Turns the verified rows of the ``.index`` SSTable (:mod:`savegame.interop.tensorflow.table`)
into :class:`Entry` records (FORMATS.md §3.3). Key invariant: every entry is bounded before the
reader may use it: ``shard_id`` is below the header's ``num_shards``, the byte range is
non-negative and fits 63 bits, the shape is known, non-negative and at most
``LIMITS.max_tensor_numel`` elements, and the stored size matches ``numel x itemsize`` (strings:
at least one length byte per element plus the 4-byte length checksum). Only then does
:class:`BundleIndex` list the key; shard bytes themselves are checked by the reader on read.

A partitioned variable (TF1 partitioners, TF >= 2.16 ``MaxShardSizePolicy``) is kept only when
its declared extents match its OrderedCode-keyed slice entries one to one and cover it exactly;
otherwise it is skipped with the reason (and the reason reported by ``verify()``). Entries of
dtypes without a torch equivalent are skipped too, but still bounds-checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from savegame import errors
from savegame.interop import base
from savegame.interop.tensorflow import proto, table

__all__ = [
    "DTYPES",
    "DT_STRING",
    "DT_VARIANT",
    "BundleIndex",
    "Entry",
    "boxes_overlap",
    "dtype_name",
]

# DataType enum (tensorflow/core/framework/types.proto, FORMATS.md §3.3) -> torch dtype name,
# item size and byte-swap unit (complex types swap each component). Names, not torch objects:
# listing and verify() need no torch; read() imports it (issue 9.18).
DTYPES: dict[int, tuple[str, int, int]] = {
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
DT_STRING = 7
DT_VARIANT = 21
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


def dtype_name(dtype: int) -> str:
    """The torch dtype name of a TF ``DataType``, or TF's own name when torch has none."""
    if dtype in DTYPES:
        return DTYPES[dtype][0]
    return _DTYPE_NAMES.get(dtype, f"DataType {dtype}")


def boxes_overlap(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> bool:
    """Whether two boxes of ``(start, length)`` per dimension share an element."""
    return all(max(sa, sb) < min(sa + na, sb + nb) for (sa, na), (sb, nb) in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class Entry:
    """One bounded ``BundleEntryProto``: where a tensor's bytes are and what they are."""

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
    parts: tuple[tuple[Entry, tuple[tuple[int, int], ...]], ...] = ()


def _numel(shape: tuple[int, ...]) -> int | None:
    n = 1
    for d in shape:
        n *= d
        if n > base.LIMITS.max_tensor_numel:
            return None
    return n


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


class BundleIndex:
    """The parsed ``.index`` of one bundle; built once at open, read-only afterwards.

    Attributes:
        path: The ``.index`` file (named in every error).
        header: The bundle header (shard count, byte order, versions).
        entries: Readable tensors by display key, in file (sorted) order.
        other: Slice entries and entries of unsupported dtypes: checked by ``verify()`` only.
        skipped: Key -> why it is not readable (unsupported dtype, inconsistent partitions).
        problems: Inconsistencies found at open that ``verify()`` reports.
    """

    def __init__(self, data: bytes, path: str) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}
        self.other: list[Entry] = []
        self.skipped: dict[str, str] = {}
        self.problems: list[str] = []
        self._slices: dict[tuple[bytes, int], list[Entry]] = {}  # (name, rank) -> key order
        p = path
        rows = table.Table(data, p).read()
        if not rows or rows[0][0] != b"":
            raise errors.FormatError(
                f"{p} has no bundle header (key ''); not a tensor bundle, or corrupt", path=p
            )
        try:
            header = proto.decode_header(rows[0][1])
        except proto.ProtoError as exc:
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
        self.header = header
        for raw_key, value in rows[1:]:
            self._add_entry(raw_key, value)
        for key, e in list(self.entries.items()):
            if e.extents:
                self._resolve_partitioned(key, e)

    def _resolve_partitioned(self, key: str, e: Entry) -> None:
        """Match a partitioned variable's extents with its slice entries, or skip it.

        Slice keys encode (name, rank, start, length, ...) order-preservingly, so the slice
        entries of one variable, in key order, correspond to its extents sorted by
        (start, length) per dimension (a full dimension sorts as length -1).
        """

        def skip(why: str) -> None:
            del self.entries[key]
            self.skipped[key] = f"partitioned variable: {why}"
            self.problems.append(f"{key}: partitioned variable: {why}")

        if e.dtype not in DTYPES:
            del self.entries[key]
            self.skipped[key] = f"partitioned {dtype_name(e.dtype)} variable is not supported"
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
        self.entries[key] = dataclasses.replace(
            e, size=sum(p.size for p, _ in parts), parts=tuple(parts)
        )

    def _add_entry(self, raw_key: bytes, value: bytes) -> None:
        p = self.path
        # Slice keys are OrderedCode-encoded and start with the number 0 (FORMATS.md §3.3).
        is_slice = raw_key.startswith(b"\x00")
        try:
            key = repr(raw_key) if is_slice else raw_key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise errors.FormatError(f"{p}: key {raw_key[:60]!r} is not UTF-8", path=p) from exc
        try:
            pe = proto.decode_entry(value)
        except proto.ProtoError as exc:
            raise errors.FormatError(f"{p}: entry {key!r}: {exc}", path=p, key=key) from exc

        def bad(msg: str) -> errors.FormatError:
            return errors.FormatError(f"{p}: entry {key!r}: {msg}", path=p, key=key)

        if not 0 <= pe.shard_id < self.header.num_shards:
            raise bad(f"shard_id {pe.shard_id} is not below num_shards {self.header.num_shards}")
        if pe.offset < 0 or pe.size < 0 or pe.offset + pe.size >= 1 << 63:
            raise bad(f"byte range offset={pe.offset} size={pe.size} is invalid")
        if pe.unknown_rank or any(d < 0 for d in pe.shape):
            raise bad(f"shape {list(pe.shape)} has unknown or negative dimensions")
        numel = _numel(pe.shape)
        if numel is None:
            raise bad(f"shape {list(pe.shape)} exceeds {base.LIMITS.max_tensor_numel} elements")
        entry = Entry(key, pe.dtype, pe.shape, numel, pe.shard_id, pe.offset, pe.size, pe.crc32c)
        if is_slice:
            self.other.append(entry)
            ident = _slice_key_name(raw_key)
            if ident is None:
                self.problems.append(f"slice entry {key}: malformed slice key")
            else:
                self._slices.setdefault(ident, []).append(entry)
            if pe.dtype in DTYPES and pe.size != numel * DTYPES[pe.dtype][1]:
                raise bad(f"slice size {pe.size} != {numel} x {DTYPES[pe.dtype][1]} bytes")
            return
        if pe.slices:
            # Resolved against the slice entries once the whole index is read.
            self.entries[key] = dataclasses.replace(entry, extents=pe.slices)
            return
        if pe.dtype in DTYPES:
            itemsize = DTYPES[pe.dtype][1]
            if pe.size != numel * itemsize:
                raise bad(
                    f"size {pe.size} != {numel} elements x {itemsize} bytes for "
                    f"{dtype_name(pe.dtype)}{list(pe.shape)}"
                )
        elif pe.dtype == DT_STRING:
            # Each element needs >= 1 length byte, plus the 4-byte length checksum (§3.3).
            if pe.size < numel + 4:
                raise bad(f"size {pe.size} is too small for {numel} strings")
        else:
            self.other.append(entry)
            self.skipped[key] = f"dtype {dtype_name(pe.dtype)} is not supported"
            return
        self.entries[key] = entry
