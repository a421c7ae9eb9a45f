"""The SSTable of a TensorFlow ``.index`` file (LevelDB layout, FORMATS.md §3.2).

Key invariant: the whole file is held in memory and nothing in it is parsed before it is
checked. Every block handle must lie, with its 5-byte trailer, before the 48-byte footer; every
block's masked CRC32C is verified before its bytes are decoded; entries must be prefix-compressed
in strictly increasing key order with a restart array that points at full keys; data blocks must
be disjoint and in increasing order (so the total CRC and parse work stays at most the file
size even if a hostile index points many entries at one big block); the entry count is capped
by ``LIMITS.max_entries``. Problems raise :class:`savegame.errors.FormatError`
(``IntegrityError`` for a CRC mismatch, ``UnsupportedFormatError`` for Snappy blocks) whose
``.path`` is the ``.index`` file.

:class:`Table` yields raw ``(key, value)`` rows; what the rows mean (the bundle header and
``BundleEntryProto`` values) is :mod:`savegame.interop.tensorflow.bundle`'s job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import google_crc32c

from savegame import errors
from savegame.interop import base
from savegame.interop.tensorflow import proto

__all__ = ["FOOTER_BYTES", "INDEX_MAGIC", "Table", "is_index_tail", "masked_crc"]

#: Last 8 bytes of every ``.index`` file: fixed64 LE ``0xdb4775248b80fb57`` (FORMATS.md §3.2).
INDEX_MAGIC = bytes.fromhex("57fb808b247547db")
FOOTER_BYTES = 48  # two padded BlockHandles (40 bytes) + magic (FORMATS.md §3.2)
_TRAILER_BYTES = 5  # compression type + masked CRC32C after every block


def _mask(crc: int) -> int:
    # LevelDB/TF mask so a CRC over data containing CRCs stays strong (FORMATS.md §3.2).
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


_CRC_CHUNK = 16 << 20


def masked_crc(*chunks: bytes | bytearray | memoryview) -> int:
    """The masked CRC32C of the chunks concatenated, as ``.index`` blocks and entries store it."""
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


@dataclass(frozen=True, slots=True)
class _Handle:
    offset: int
    size: int


def _decode_handle(buf: bytes, pos: int, end: int) -> tuple[_Handle, int]:
    off, pos = proto.read_varint(buf, pos, end)
    size, pos = proto.read_varint(buf, pos, end)
    return _Handle(off, size), pos


class Table:
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
        limit = len(self.data) - FOOTER_BYTES
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
        actual = masked_crc(contents, bytes((ctype,)))
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
                shared, pos = proto.read_varint(block, pos, data_end, max_bytes=5)
                non_shared, pos = proto.read_varint(block, pos, data_end, max_bytes=5)
                value_len, pos = proto.read_varint(block, pos, data_end, max_bytes=5)
            except proto.ProtoError as exc:
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
        """Every data row ``(key, value)`` in key order, after all blocks are verified."""
        data = self.data
        if not data:
            raise self._corrupt("file is empty (0 bytes)")
        if len(data) < FOOTER_BYTES:
            raise self._corrupt(f"file is {len(data)} bytes, shorter than the 48-byte footer")
        if not is_index_tail(data):
            raise errors.FormatError(
                f"{self.path}: last 8 bytes are not the tensor-bundle magic 57fb808b247547db; "
                "this is not a TensorFlow .index file (or it is truncated)",
                path=self.path,
            )
        foot = len(data) - FOOTER_BYTES
        try:
            meta_h, pos = _decode_handle(data, foot, foot + 40)
            index_h, _ = _decode_handle(data, pos, foot + 40)
        except proto.ProtoError as exc:
            raise self._corrupt(f"footer: {exc}") from exc
        # The metaindex is empty in TF bundles (observed) but is still verified.
        self.entries(self.block(meta_h, "metaindex block"), "metaindex block")
        index = self.entries(self.block(index_h, "index block"), "index block")
        out: list[tuple[bytes, bytes]] = []
        prev_end = 0
        for i, (sep, value) in enumerate(index):
            try:
                h, end = _decode_handle(value, 0, len(value))
            except proto.ProtoError as exc:
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
