"""A small, strict zip directory parser for reading checkpoints without trusting the archive.

Key invariant: every member returned by :func:`read_directory` has a local header whose name
equals its central-directory name, a data range ``[start, start + compressed)`` inside the file,
and no byte of any member's range (local header included) overlaps another's — so overlapping
"zip bomb" tricks and path games are refused before any data is read (FORMATS.md §1.6, §7).

Public API (also used by the Keras reader for ``.keras`` files)::

    members = read_directory(f, path, file_size)      # list[ZipMember], in directory order
    data = read_member(f, member, path, max_bytes=n)  # bytes; STORED or bounded DEFLATED

``ZipMember.start`` is taken from the LOCAL header (FORMATS.md §1.4): the central directory's
idea of where data begins is not trusted. Written by hand because :mod:`zipfile` neither checks
overlaps nor exposes the local-header data offset, and silently keeps the last of two
same-named members.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from savegame import errors
from savegame.interop import base

__all__ = ["ZipMember", "crc32_range", "read_directory", "read_member"]

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory, 22 bytes
_EOCD64_LOC = struct.Struct("<4sIQI")  # zip64 locator, 20 bytes
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # zip64 end of central directory, 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_MAX_COMMENT = 0xFFFF
STORED = 0
DEFLATED = 8


@dataclass(frozen=True, slots=True)
class ZipMember:
    """One checked zip member.

    Attributes:
        name: Member name (UTF-8 if flagged, else cp437), as in the central directory.
        header_offset: Offset of the local header.
        start: First data byte (from the local header).
        compressed: Stored (compressed) byte count.
        size: Uncompressed byte count as declared.
        method: 0 = STORED, 8 = DEFLATED (others are refused by :func:`read_member`).
        crc: Declared CRC-32 of the uncompressed data.
    """

    name: str
    header_offset: int
    start: int
    compressed: int
    size: int
    method: int
    crc: int


def _read_at(f: BinaryIO, offset: int, n: int, path: str, what: str) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise errors.FormatError(f"{path}: zip {what} is truncated; the file is damaged", path=path)
    return data


def _bad(path: str, msg: str, key: str | None = None) -> errors.FormatError:
    return errors.FormatError(
        f"{path}: {msg}; the zip archive is damaged or hostile", path=path, key=key
    )


def read_directory(
    f: BinaryIO, path: str, file_size: int, *, max_entries: int | None = None
) -> list[ZipMember]:
    """Parse and bounds-check the central directory and every local header.

    Args:
        f: The archive opened in binary mode (seekable).
        path: Path used in error messages.
        file_size: Size of the archive in bytes.
        max_entries: Cap on the number of members (default ``LIMITS.max_entries``).

    Returns:
        Members in central-directory order.

    Raises:
        FormatError: not a zip, truncated, out-of-bounds or overlapping members, name mismatch.
        UnsafeContentError: duplicate member names or too many members.
        UnsupportedFormatError: multi-disk or encrypted archives.
    """
    if max_entries is None:
        max_entries = base.LIMITS.max_entries
    if file_size < _EOCD.size:
        raise _bad(path, "file too small to be a zip")
    tail_len = min(file_size, _EOCD.size + _MAX_COMMENT)
    tail = _read_at(f, file_size - tail_len, tail_len, path, "end record")
    # Only offsets where a whole 22-byte record fits (a truncated file may end mid-record).
    pos = tail.rfind(b"PK\x05\x06", 0, tail_len - _EOCD.size + 4)
    # The EOCD may be followed by a comment; scan backwards until the comment length fits.
    while pos >= 0 and pos + _EOCD.size + struct.unpack_from("<H", tail, pos + 20)[0] != tail_len:
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    if pos < 0:
        raise _bad(path, "no end-of-central-directory record")
    eocd_off = file_size - tail_len + pos
    _, disk, cd_disk, n_disk, count, cd_size, cd_off, _ = _EOCD.unpack_from(tail, pos)
    if disk != 0 or cd_disk != 0 or n_disk != count:
        raise errors.UnsupportedFormatError(
            f"{path}: multi-disk zip archives are not supported", path=path
        )
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        if eocd_off < _EOCD64_LOC.size:
            raise _bad(path, "zip64 locator missing")
        sig, _, eocd64_off, _ = _EOCD64_LOC.unpack(
            _read_at(f, eocd_off - _EOCD64_LOC.size, _EOCD64_LOC.size, path, "zip64 locator")
        )
        if sig != b"PK\x06\x07" or eocd64_off + _EOCD64.size > eocd_off:
            raise _bad(path, "bad zip64 locator")
        rec = _EOCD64.unpack(_read_at(f, eocd64_off, _EOCD64.size, path, "zip64 end record"))
        if rec[0] != b"PK\x06\x06":
            raise _bad(path, "bad zip64 end record")
        count, cd_size, cd_off = rec[7], rec[8], rec[9]
        cd_end_limit = eocd64_off
    else:
        cd_end_limit = eocd_off
    if count > max_entries:
        raise errors.UnsafeContentError(
            f"{path}: zip declares {count} members, over the limit of {max_entries}", path=path
        )
    if cd_off + cd_size > cd_end_limit or count * _CENTRAL.size > cd_size:
        raise _bad(path, "central directory outside the file")
    cd = _read_at(f, cd_off, cd_size, path, "central directory")
    members: list[ZipMember] = []
    seen: set[str] = set()
    p = 0
    for _ in range(count):
        if p + _CENTRAL.size > len(cd):
            raise _bad(path, "central directory truncated")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, lho) = (
            _CENTRAL.unpack_from(cd, p)
        )
        if sig != b"PK\x01\x02":
            raise _bad(path, "bad central directory entry")
        p += _CENTRAL.size
        if p + nlen + xlen + clen > len(cd):
            raise _bad(path, "central directory entry truncated")
        raw_name = cd[p : p + nlen]
        extra = cd[p + nlen : p + nlen + xlen]
        p += nlen + xlen + clen
        try:
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise _bad(path, "member name is not valid UTF-8") from None
        if flags & 0x1:
            raise errors.UnsupportedFormatError(
                f"{path}: zip member {name!r} is encrypted", path=path, key=name
            )
        # Zip64 extended information: the 0xFFFFFFFF fields, in this fixed order.
        if 0xFFFFFFFF in (usize, csize, lho):
            q = 0
            vals: list[int] | None = None
            while q + 4 <= len(extra):
                tag, ln = struct.unpack_from("<HH", extra, q)
                if tag == 1:
                    body = extra[q + 4 : q + 4 + ln]
                    vals = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
                    break
                q += 4 + ln
            if vals is None:
                raise _bad(path, "zip64 sizes missing", name)
            it = iter(vals)
            try:
                if usize == 0xFFFFFFFF:
                    usize = next(it)
                if csize == 0xFFFFFFFF:
                    csize = next(it)
                if lho == 0xFFFFFFFF:
                    lho = next(it)
            except StopIteration:
                raise _bad(path, "zip64 sizes missing", name) from None
        if name in seen:
            raise errors.UnsafeContentError(
                f"{path}: two zip members are named {name!r}; refusing an ambiguous archive",
                path=path,
                key=name,
            )
        seen.add(name)
        if lho + _LOCAL.size > cd_off:
            raise _bad(path, f"member {name!r} starts outside the data area", name)
        lsig, _, _, _, _, _, _, _, _, lnlen, lxlen = _LOCAL.unpack(
            _read_at(f, lho, _LOCAL.size, path, "local header")
        )
        if lsig != b"PK\x03\x04":
            raise _bad(path, f"member {name!r} has no local header", name)
        if _read_at(f, lho + _LOCAL.size, lnlen, path, "local name") != raw_name:
            raise _bad(path, f"member {name!r} has a different name in its local header", name)
        start = lho + _LOCAL.size + lnlen + lxlen
        if start + csize > cd_off:
            raise _bad(path, f"member {name!r} extends past the data area", name)
        members.append(ZipMember(name, lho, start, csize, usize, method, crc))
    ranges = sorted((m.header_offset, m.start + m.compressed, m.name) for m in members)
    for (_, end, a), (begin, _, b) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise _bad(path, f"members {a!r} and {b!r} overlap", b)
    return members


def read_member(
    f: BinaryIO,
    member: ZipMember,
    path: str,
    *,
    max_bytes: int | None = None,
    check_crc: bool = True,
) -> bytes:
    """Return the uncompressed bytes of one member, inflating at most ``max_bytes``
    (default ``LIMITS.max_inflate_bytes``).

    DEFLATED members must also stay within ``LIMITS.max_inflate_ratio`` × their stored size and
    inflate to exactly the declared size (zip bomb protection, FORMATS.md §6).

    Raises:
        FormatError: truncated data, size or CRC mismatch, bomb-like expansion.
        UnsupportedFormatError: a compression method other than STORED/DEFLATED.
    """
    if max_bytes is None:
        max_bytes = base.LIMITS.max_inflate_bytes
    if member.method == STORED:
        if member.size != member.compressed:
            raise _bad(path, f"stored member {member.name!r} has two different sizes", member.name)
        if member.size > max_bytes:
            raise errors.FormatError(
                f"{path}: member {member.name!r} is {member.size} bytes, over the limit {max_bytes}",
                path=path,
                key=member.name,
            )
        data = _read_at(f, member.start, member.compressed, path, "member data")
    elif member.method == DEFLATED:
        limit = min(max_bytes, max(member.compressed, 1) * base.LIMITS.max_inflate_ratio)
        if member.size > limit:
            raise errors.FormatError(
                f"{path}: compressed member {member.name!r} declares {member.size} bytes "
                f"(limit {limit}: LIMITS.max_inflate_bytes/ratio); refusing a possible zip bomb",
                path=path,
                key=member.name,
            )
        comp = _read_at(f, member.start, member.compressed, path, "member data")
        d = zlib.decompressobj(-15)
        try:
            data = d.decompress(comp, member.size + 1)
        except zlib.error as exc:
            raise _bad(
                path, f"member {member.name!r} does not inflate ({exc})", member.name
            ) from exc
        if len(data) != member.size or d.unconsumed_tail:
            raise _bad(
                path,
                f"member {member.name!r} inflates to a different size than declared",
                member.name,
            )
    else:
        raise errors.UnsupportedFormatError(
            f"{path}: zip member {member.name!r} uses compression method {member.method}; "
            "only STORED and DEFLATED are supported",
            path=path,
            key=member.name,
        )
    if check_crc and zlib.crc32(data) != member.crc:
        raise errors.IntegrityError(
            f"{path}: zip member {member.name!r} fails its CRC-32 check (corrupt file)",
            path=path,
            key=member.name,
        )
    return data


def crc32_range(f: BinaryIO, start: int, nbytes: int) -> int | None:
    """CRC-32 of ``nbytes`` bytes of ``f`` from ``start``, read 16 MiB at a time (memory stays
    bounded on huge records); None if the file ends first."""
    f.seek(start)
    value, left = 0, nbytes
    while left:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            return None
        value = zlib.crc32(chunk, value)
        left -= len(chunk)
    return value
