"""A tiny tensor-bundle WRITER used only by the tests to build synthetic and hostile bundles.

Not part of savegame: the reader must never share code with the thing that checks it. Layouts
follow FORMATS.md §3 (SSTable blocks with masked CRC32C trailers, BundleHeaderProto /
BundleEntryProto wire format, DT_STRING layout). Every knob a hostile test needs is exposed:
raw block contents, explicit handles, wrong CRCs, any header/entry field value.

Loaded by the tests with ``importlib`` (see ``load()`` in the test modules).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import google_crc32c
import numpy as np

MAGIC = bytes.fromhex("57fb808b247547db")

DTYPES = {
    "float32": 1,
    "float64": 2,
    "int32": 3,
    "uint8": 4,
    "int16": 5,
    "int8": 6,
    "complex64": 8,
    "int64": 9,
    "bool": 10,
    "uint16": 17,
    "complex128": 18,
    "float16": 19,
    "uint32": 22,
    "uint64": 23,
}


def masked_crc(*chunks: bytes) -> int:
    crc = 0
    for c in chunks:
        crc = google_crc32c.extend(crc, bytes(c))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v)


def f_bytes(num: int, b: bytes) -> bytes:
    return varint((num << 3) | 2) + varint(len(b)) + b


def f_fixed32(num: int, v: int) -> bytes:
    return varint((num << 3) | 5) + struct.pack("<I", v)


def header(num_shards: int = 1, endianness: int = 0, min_consumer: int = 0) -> bytes:
    version = f_varint(1, 1) + (f_varint(2, min_consumer) if min_consumer else b"")
    out = f_varint(1, num_shards) if num_shards != 0 else b""
    if endianness:
        out += f_varint(2, endianness)
    return out + f_bytes(3, version)


def shape_proto(shape: Sequence[int], unknown_rank: bool = False) -> bytes:
    out = b"".join(f_bytes(2, f_varint(1, d) if d else b"") for d in shape)
    return out + (f_varint(3, 1) if unknown_rank else b"")


def entry(
    dtype: int,
    shape: Sequence[int],
    *,
    shard_id: int = 0,
    offset: int = 0,
    size: int = 0,
    crc: int = 0,
    slices: Sequence[Sequence[tuple[int, int]]] = (),
) -> bytes:
    out = f_varint(1, dtype) + f_bytes(2, shape_proto(shape))
    if shard_id:
        out += f_varint(3, shard_id)
    if offset:
        out += f_varint(4, offset)
    if size:
        out += f_varint(5, size)
    out += f_fixed32(6, crc)
    for sl in slices:
        ext = b"".join(f_bytes(1, f_varint(1, s) + f_varint(2, n)) for s, n in sl)
        out += f_bytes(7, ext)
    return out


def block_contents(items: Sequence[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    """LevelDB block: prefix-compressed entries + restart array + count."""
    out = bytearray()
    restarts = [0]
    prev = b""
    for i, (key, value) in enumerate(items):
        if i and i % restart_interval == 0:
            restarts.append(len(out))
            prev = b""
        shared = 0
        while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
            shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        prev = key
    for r in restarts:
        out += struct.pack("<I", r)
    return bytes(out + struct.pack("<I", len(restarts)))


def handle(offset: int, size: int) -> bytes:
    return varint(offset) + varint(size)


def footer(meta: tuple[int, int], index: tuple[int, int]) -> bytes:
    h = handle(*meta) + handle(*index)
    return h + b"\0" * (40 - len(h)) + MAGIC


def trailer(contents: bytes, ctype: int = 0, crc: int | None = None) -> bytes:
    c = masked_crc(contents, bytes((ctype,))) if crc is None else crc
    return bytes((ctype,)) + struct.pack("<I", c)


def sstable(
    data_blocks: Sequence[bytes],
    *,
    separators: Sequence[bytes] | None = None,
    index_contents: bytes | None = None,
) -> bytes:
    """Assemble a table from raw data-block contents (each gets a valid trailer).

    ``separators`` are the index keys (default: ``b"\\xff" * 8`` stand-ins made unique);
    ``index_contents`` replaces the whole index block (handles then are up to the caller).
    """
    out = bytearray()
    handles = []
    for c in data_blocks:
        handles.append((len(out), len(c)))
        out += c + trailer(c)
    meta = block_contents([])
    meta_h = (len(out), len(meta))
    out += meta + trailer(meta)
    if index_contents is None:
        seps = list(separators) if separators is not None else []
        if not seps:
            seps = [b"\xff" * 8 + bytes((i,)) for i in range(len(data_blocks))]
        index_contents = block_contents(
            [(s, handle(*h)) for s, h in zip(seps, handles, strict=True)], restart_interval=1
        )
    index_h = (len(out), len(index_contents))
    out += index_contents + trailer(index_contents)
    return bytes(out + footer(meta_h, index_h))


def table(items: Sequence[tuple[bytes, bytes]], block_items: int = 1 << 30) -> bytes:
    """A valid table of sorted ``items``, ``block_items`` entries per data block."""
    chunks = [items[i : i + block_items] for i in range(0, len(items), block_items)] or [[]]
    blocks = [block_contents(c) for c in chunks]
    # Separator = the block's last key (a valid, if unshortened, separator).
    seps = [c[-1][0] if c else b"" for c in chunks]
    return sstable(blocks, separators=seps)


def string_bytes(strings: Sequence[bytes], big_endian: bool = False) -> tuple[bytes, int]:
    """DT_STRING layout (FORMATS.md §3.3) and its entry CRC."""
    order = "big" if big_endian else "little"
    lens = b"".join(varint(len(s)) for s in strings)
    ints = b"".join(len(s).to_bytes(4 if len(s) < 1 << 32 else 8, order) for s in strings)
    inner = struct.pack("<I", masked_crc(ints))
    body = b"".join(strings)
    return lens + inner + body, masked_crc(ints, inner, body)


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray | list[bytes] | bytes],
    *,
    big_endian: bool = False,
    num_shards: int = 1,
    extra: Sequence[tuple[bytes, bytes]] = (),
    block_items: int = 1 << 30,
) -> None:
    """Write a bundle: numeric arrays in the header's byte order, ``list[bytes]`` as a string
    vector, ``bytes`` as a scalar string.

    Every tensor goes to shard 0; ``extra`` index rows (raw key, raw value) are merged in.
    """
    data = bytearray()
    rows: list[tuple[bytes, bytes]] = [(b"", header(num_shards, 1 if big_endian else 0))]
    for name, value in tensors.items():
        if isinstance(value, (list, bytes)):
            items = [value] if isinstance(value, bytes) else value
            raw, crc = string_bytes(items, big_endian)
            shape = [] if isinstance(value, bytes) else [len(value)]
            ent = entry(7, shape, offset=len(data), size=len(raw), crc=crc)
        else:
            arr = np.ascontiguousarray(value)
            arr = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<"))
            raw = arr.tobytes()
            ent = entry(
                DTYPES[arr.dtype.name],
                arr.shape,
                offset=len(data),
                size=len(raw),
                crc=masked_crc(raw),
            )
        rows.append((name.encode(), ent))
        data += raw
    rows.extend(extra)
    rows.sort()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.index").write_bytes(table(rows, block_items))
    Path(f"{prefix}.data-00000-of-{num_shards:05d}").write_bytes(bytes(data))


def oc_string(b: bytes) -> bytes:
    """OrderedCode string: 0x00 -> 00 ff, 0xff -> ff 00, terminated by 00 01."""
    out = bytearray()
    for c in b:
        out += b"\x00\xff" if c == 0 else b"\xff\x00" if c == 0xFF else bytes((c,))
    return bytes(out + b"\x00\x01")


def oc_num(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((len(raw),)) + raw


def oc_signed(v: int) -> bytes:
    """OrderedCode signed number, 1-byte form only (-64 <= v < 64), enough for the tests."""
    if not -64 <= v < 64:
        raise ValueError("test writer supports only small slice coordinates")
    return bytes(((0x80 ^ v) & 0xFF,))


def slice_key(name: bytes, extents: Sequence[tuple[int, int | None]]) -> bytes:
    """Key of one slice entry of a partitioned variable (FORMATS.md §3.3)."""
    out = b"\x00" + oc_string(name) + oc_num(len(extents))
    for start, length in extents:
        out += oc_signed(start) + oc_signed(-1 if length is None else length)
    return out
