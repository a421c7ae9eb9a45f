"""Where a ``torch.save`` file keeps its pickle and its storages: the zip and legacy layouts.

Zip format (torch >= 1.6, FORMATS.md §1.1): one top folder holding ``data.pkl``, ``byteorder``,
``version`` and one STORED record ``data/<key>`` per storage. Legacy format (FORMATS.md §1.5):
pickled magic, protocol and sys_info, the object pickle, the storage key list, then each
storage as an int64 element count followed by its bytes.

Key invariant: only the pickles are read at open -- never storage bytes -- and every storage's
byte range is bounded by the file before the reader may use it: zip members by the bounded zip
parser (:mod:`savegame.interop._zip`), legacy counts by the file's length. TorchScript archives,
compressed ``data.pkl`` or storage records and unknown legacy protocols raise
:class:`~savegame.errors.UnsupportedFormatError`; anything inconsistent a
:class:`~savegame.errors.FormatError`.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from savegame import errors
from savegame.interop import _zip, base
from savegame.interop.torch_pickle import unpickler, values

__all__ = ["LEGACY_MAGIC", "LEGACY_PROTOCOL", "Container", "open_legacy", "open_zip"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_MAX_PKL_BYTES = 1 << 30  # data.pkl itself (it holds structure only, never tensor data)


@dataclass(slots=True)
class Container:
    """What opening found: the unpickled object and where each storage's bytes are.

    Attributes:
        root: The object ``torch.save`` was given, with tensors as ``TensorSpec`` records.
        storages: Storage key -> the storage the pickle names.
        ranges: Storage key -> (file offset, bytes); a key without one has no data record.
        crcs: Storage key -> the zip CRC-32 of its record (zip format only).
        byteorder: ``"little"`` or ``"big"``.
        meta: Container facts for ``metadata()`` (``format``, and ``version`` for zip).
    """

    root: Any
    storages: dict[str, values.Storage]
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    crcs: dict[str, int] = field(default_factory=dict)
    byteorder: str = "little"
    meta: dict[str, Any] = field(default_factory=dict)


def open_zip(f: BinaryIO, path: str, size: int, *, listing: bool) -> Container:
    """Read the zip directory and ``data.pkl`` of a zip-format file of ``size`` bytes."""
    out = Container(root=None, storages={})
    members = _zip.read_directory(f, path, size)
    if not members:
        raise errors.FormatError(f"{path}: empty zip, not a torch checkpoint", path=path)
    prefix = members[0].name.split("/", 1)[0] + "/"
    by_name: dict[str, _zip.ZipMember] = {}
    for m in members:
        if not m.name.startswith(prefix):
            raise errors.FormatError(
                f"{path}: zip member {m.name!r} lies outside the archive folder {prefix!r}",
                path=path,
                key=m.name,
            )
        by_name[m.name[len(prefix) :]] = m
    if "constants.pkl" in by_name or any(n.startswith("code/") for n in by_name):
        raise errors.UnsupportedFormatError(
            f"{path} is a TorchScript archive (torch.jit.save); it contains code and is not "
            "read by savegame. Export its state_dict() with torch.save instead",
            path=path,
        )
    pkl = by_name.get("data.pkl")
    if pkl is None:
        raise errors.UnsupportedFormatError(
            f"{path}: zip without data.pkl is not a torch checkpoint", path=path
        )
    if "byteorder" in by_name:
        bo = _zip.read_member(f, by_name["byteorder"], path, max_bytes=16)
        if bo not in (b"little", b"big"):
            raise errors.FormatError(f"{path}: byteorder record is {bo!r}", path=path)
        out.byteorder = bo.decode()
    if "version" in by_name:
        ver = _zip.read_member(f, by_name["version"], path, max_bytes=64)
        out.meta["version"] = ver.decode("ascii", "replace").strip()
    if pkl.method != _zip.STORED:
        raise errors.UnsupportedFormatError(
            f"{path}: data.pkl is compressed; torch never writes that", path=path
        )
    data = _zip.read_member(f, pkl, path, max_bytes=_MAX_PKL_BYTES, check_crc=False)
    u = unpickler.Unpickler(io.BytesIO(data), len(data), path, listing=listing, legacy=False)
    out.root = unpickler.run(u)
    for key in u.storages:
        m = by_name.get(f"data/{key}")
        if m is None:
            continue  # reported by the caller
        if m.method != _zip.STORED or m.size != m.compressed:
            raise errors.UnsupportedFormatError(
                f"{path}: storage record {m.name!r} is compressed; torch writes STORED records",
                path=path,
                key=m.name,
            )
        out.ranges[key] = (m.start, m.size)
        out.crcs[key] = m.crc
    out.meta["format"] = "zip"
    out.storages = u.storages
    return out


def open_legacy(f: BinaryIO, path: str, size: int, *, listing: bool) -> Container:
    """Read the head pickles and storage table of a legacy (pre-1.6) file of ``size`` bytes."""
    out = Container(root=None, storages={})

    def one(legacy: bool = True) -> Any:
        return unpickler.run(unpickler.Unpickler(f, size, path, listing=listing, legacy=legacy))

    try:
        magic = one()
    except errors.FormatError as exc:
        raise errors.UnsupportedFormatError(
            f"{path} is neither a zip nor a legacy torch.save file", path=path
        ) from exc
    if magic != LEGACY_MAGIC:
        raise errors.UnsupportedFormatError(
            f"{path} is not a torch.save file (bad magic)", path=path
        )
    if one() != LEGACY_PROTOCOL:
        raise errors.UnsupportedFormatError(f"{path}: unknown legacy torch protocol", path=path)
    info = one()
    if not isinstance(info, dict):
        raise errors.FormatError(f"{path}: legacy sys_info is not a dict", path=path)
    if info.get("little_endian") is False:
        out.byteorder = "big"
    u = unpickler.Unpickler(f, size, path, listing=listing, legacy=True)
    out.root = unpickler.run(u)
    keys = one()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise errors.FormatError(f"{path}: legacy storage key list is malformed", path=path)
    if len(keys) > base.LIMITS.max_entries:
        raise errors.FormatError(f"{path}: too many storages", path=path)
    pos = f.tell()
    for key in keys:
        s = u.storages.get(key)
        if s is None:
            raise errors.FormatError(
                f"{path}: legacy storage {key!r} is never used", path=path, key=key
            )
        if pos + 8 > size:
            raise errors.FormatError(
                f"{path}: legacy storage {key!r} is truncated", path=path, key=key
            )
        f.seek(pos)
        (count,) = struct.unpack("<q", f.read(8))
        nbytes = count * values.itemsize(s.dtype)
        if count < 0 or pos + 8 + nbytes > size:
            raise errors.FormatError(
                f"{path}: legacy storage {key!r} claims {count} elements past the end of the file",
                path=path,
                key=key,
            )
        out.ranges[key] = (pos + 8, nbytes)
        pos += 8 + nbytes
    out.meta["format"] = "legacy"
    out.storages = u.storages
    return out
