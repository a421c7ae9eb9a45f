"""Minimal, bounded protobuf decoding for TensorFlow checkpoints (no TensorFlow, no protobuf).

Why hand-written: TensorFlow's generated ``*_pb2`` modules (``tensor_bundle_pb2``,
``trackable_object_graph_pb2``) ship only inside the TensorFlow wheel, and the checkpoint needs
just a handful of tiny messages (``BundleHeaderProto``, ``BundleEntryProto`` with
``TensorShapeProto``/``TensorSliceProto``, ``TrackableObjectGraph``) plus the text-format
``CheckpointState``. A ~200-line decoder of the wire format is smaller than a dependency on
``protobuf`` plus vendored generated code, and lets every length be bounded explicitly.

Key invariant: every decoder works on an in-memory ``bytes`` object and never reads past its
end; every varint is at most 10 bytes (5 for 32-bit fields) and every length is checked against
the bytes that remain before it is used (FORMATS.md §3.6). Problems raise :class:`ProtoError`,
which the table, bundle, graph and locate modules turn into a
:class:`savegame.errors.FormatError` carrying the path.

Field numbers follow tensorflow/core/protobuf/tensor_bundle.proto,
tensorflow/core/framework/tensor_shape.proto, tensor_slice.proto, versions.proto and
tensorflow/core/protobuf/trackable_object_graph.proto (FORMATS.md §3.3, §3.4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "BundleEntry",
    "BundleHeader",
    "CheckpointState",
    "ProtoError",
    "TrackableGraph",
    "TrackableNode",
    "decode_entry",
    "decode_header",
    "decode_object_graph",
    "parse_checkpoint_state",
    "read_varint",
]

# Wire types (protobuf encoding spec). Groups (3, 4) are deprecated and never used by TF.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# A rank above this is refused by TF itself (TensorShape::MaxDimensions() == 254).
MAX_RANK = 254
# Fields per message; the largest real message is the object graph (one field per node).
# Each decoded field costs ~100 bytes of Python objects, so this also bounds memory.
_MAX_FIELDS = 1_000_000


class ProtoError(ValueError):
    """Malformed protobuf bytes; the message says what and where (byte offset)."""


def read_varint(buf: bytes, pos: int, end: int, *, max_bytes: int = 10) -> tuple[int, int]:
    """Decode one unsigned LEB128 varint from ``buf[pos:end]``.

    Args:
        buf: The bytes.
        pos: Where the varint starts.
        end: Exclusive bound the varint must not cross.
        max_bytes: 10 for 64-bit values, 5 for 32-bit ones (FORMATS.md §3.6).

    Returns:
        ``(value, position after the varint)``.

    Raises:
        ProtoError: Truncated, longer than ``max_bytes``, or wider than the field.
    """
    result = 0
    shift = 0
    for i in range(max_bytes):
        if pos + i >= end:
            raise ProtoError(f"varint at byte {pos} runs past the end of its buffer")
        b = buf[pos + i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            limit_bits = 64 if max_bytes == 10 else 32
            if result >> limit_bits:
                raise ProtoError(f"varint at byte {pos} does not fit in {limit_bits} bits")
            return result, pos + i + 1
        shift += 7
    raise ProtoError(f"varint at byte {pos} is longer than {max_bytes} bytes")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _int32(v: int, what: str) -> int:
    # int32 fields are varints sign-extended to 64 bits when negative.
    s = _signed64(v)
    if not -(1 << 31) <= s < 1 << 31:
        raise ProtoError(f"{what}={s} does not fit in int32")
    return s


Fields = dict[int, list[tuple[int, int | bytes]]]


def _fields(buf: bytes) -> Fields:
    """Split a message into ``{field number: [(wire type, value), ...]}`` in wire order."""
    out: Fields = {}
    pos, end, count = 0, len(buf), 0
    while pos < end:
        tag, pos = read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0 or number >= 1 << 29:
            raise ProtoError(f"invalid field number {number}")
        value: int | bytes
        if wire == _VARINT:
            value, pos = read_varint(buf, pos, end)
        elif wire == _I64:
            if pos + 8 > end:
                raise ProtoError(f"fixed64 field {number} runs past the end")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == _I32:
            if pos + 4 > end:
                raise ProtoError(f"fixed32 field {number} runs past the end")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif wire == _LEN:
            n, pos = read_varint(buf, pos, end)
            if n > end - pos:
                raise ProtoError(f"field {number} declares {n} bytes but only {end - pos} remain")
            value = bytes(buf[pos : pos + n])
            pos += n
        else:
            raise ProtoError(f"unsupported wire type {wire} for field {number}")
        count += 1
        if count > _MAX_FIELDS:
            raise ProtoError(f"more than {_MAX_FIELDS} fields in one message")
        out.setdefault(number, []).append((wire, value))
    return out


def _scalar(f: Fields, number: int, wire: int, what: str, default: int = 0) -> int:
    """Last occurrence wins, as in protobuf; a wrong wire type is an error."""
    vals = f.get(number)
    if not vals:
        return default
    w, v = vals[-1]
    if w != wire or not isinstance(v, int):
        raise ProtoError(f"{what} has wire type {w}, expected {wire}")
    return v


def _message(f: Fields, number: int, what: str) -> bytes:
    """A singular embedded message; repeated occurrences merge (= concatenate), as in protobuf."""
    parts = []
    for w, v in f.get(number, []):
        if w != _LEN or not isinstance(v, bytes):
            raise ProtoError(f"{what} has wire type {w}, expected {_LEN}")
        parts.append(v)
    return b"".join(parts)


def _repeated(f: Fields, number: int, what: str) -> list[bytes]:
    out = []
    for w, v in f.get(number, []):
        if w != _LEN or not isinstance(v, bytes):
            raise ProtoError(f"{what} has wire type {w}, expected {_LEN}")
        out.append(v)
    return out


def _string(f: Fields, number: int, what: str) -> str:
    vals = _repeated(f, number, what)  # singular string: last occurrence wins
    raw = vals[-1] if vals else b""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtoError(f"{what} is not valid UTF-8") from exc


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """``BundleHeaderProto`` (key ``""``): shard count, byte order, format version."""

    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int
    bad_consumers: tuple[int, ...]


def decode_header(buf: bytes) -> BundleHeader:
    """Decode ``BundleHeaderProto {int32 num_shards=1; Endianness endianness=2; VersionDef version=3}``."""
    f = _fields(buf)
    num_shards = _int32(_scalar(f, 1, _VARINT, "num_shards"), "num_shards")
    endianness = _int32(_scalar(f, 2, _VARINT, "endianness"), "endianness")
    if endianness not in (0, 1):
        raise ProtoError(f"unknown endianness {endianness} (0 = little, 1 = big)")
    v = _fields(_message(f, 3, "version"))
    bad: list[int] = []
    for w, val in v.get(3, []):
        if w == _VARINT and isinstance(val, int):
            bad.append(_int32(val, "bad_consumers"))
        elif w == _LEN and isinstance(val, bytes):  # packed repeated int32
            p = 0
            while p < len(val):
                x, p = read_varint(val, p, len(val))
                bad.append(_int32(x, "bad_consumers"))
        else:
            raise ProtoError(f"bad_consumers has wire type {w}")
        if len(bad) > 1000:
            raise ProtoError("more than 1000 bad_consumers")
    return BundleHeader(
        num_shards=num_shards,
        big_endian=endianness == 1,
        producer=_int32(_scalar(v, 1, _VARINT, "producer"), "producer"),
        min_consumer=_int32(_scalar(v, 2, _VARINT, "min_consumer"), "min_consumer"),
        bad_consumers=tuple(bad),
    )


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """``BundleEntryProto``: where one tensor's bytes are and what they are.

    ``slices`` holds one tuple of ``(start, length or None)`` extents per slice; a non-empty
    ``slices`` marks the full-tensor entry of a partitioned variable (FORMATS.md §3.3).
    """

    dtype: int
    shape: tuple[int, ...]
    unknown_rank: bool
    shard_id: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[tuple[tuple[int, int | None], ...], ...]


def _decode_shape(buf: bytes) -> tuple[tuple[int, ...], bool]:
    f = _fields(buf)
    dims = []
    for d in _repeated(f, 2, "shape.dim"):
        df = _fields(d)
        dims.append(_signed64(_scalar(df, 1, _VARINT, "dim.size")))
        if len(dims) > MAX_RANK:
            raise ProtoError(f"shape has more than {MAX_RANK} dimensions")
    unknown_rank = bool(_scalar(f, 3, _VARINT, "unknown_rank"))
    return tuple(dims), unknown_rank


def _decode_slice(buf: bytes) -> tuple[tuple[int, int | None], ...]:
    f = _fields(buf)
    extents: list[tuple[int, int | None]] = []
    for e in _repeated(f, 1, "slice.extent"):
        ef = _fields(e)
        start = _signed64(_scalar(ef, 1, _VARINT, "extent.start"))
        length = _signed64(_scalar(ef, 2, _VARINT, "extent.length")) if 2 in ef else None
        extents.append((start, length))
        if len(extents) > MAX_RANK:
            raise ProtoError(f"slice has more than {MAX_RANK} extents")
    return tuple(extents)


def decode_entry(buf: bytes) -> BundleEntry:
    """Decode ``BundleEntryProto`` (fields 1-7, FORMATS.md §3.3). Bounds are checked by the caller."""
    f = _fields(buf)
    shape, unknown_rank = _decode_shape(_message(f, 2, "shape"))
    return BundleEntry(
        dtype=_int32(_scalar(f, 1, _VARINT, "dtype"), "dtype"),
        shape=shape,
        unknown_rank=unknown_rank,
        shard_id=_int32(_scalar(f, 3, _VARINT, "shard_id"), "shard_id"),
        offset=_signed64(_scalar(f, 4, _VARINT, "offset")),
        size=_signed64(_scalar(f, 5, _VARINT, "size")),
        crc32c=_scalar(f, 6, _I32, "crc32c"),
        slices=tuple(_decode_slice(s) for s in _repeated(f, 7, "slices")),
    )


@dataclass(frozen=True, slots=True)
class TrackableNode:
    """One ``TrackableObjectGraph.TrackableObject``.

    Attributes:
        children: ``(node_id, local_name)`` edges in file order.
        attributes: ``(name, full_name, checkpoint_key)`` per serialized tensor.
        slot_variables: ``(original_variable_node_id, slot_name, slot_variable_node_id)``.
    """

    children: tuple[tuple[int, str], ...]
    attributes: tuple[tuple[str, str, str], ...]
    slot_variables: tuple[tuple[int, str, int], ...]


TrackableGraph = tuple[TrackableNode, ...]


def decode_object_graph(buf: bytes, *, max_nodes: int, max_refs: int) -> TrackableGraph:
    """Decode a ``TrackableObjectGraph`` (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` string tensor).

    Node ids are checked to be in range so callers can index without further checks.
    ``max_refs`` caps children + attributes + slot variables over all nodes, bounding the
    Python objects built from a small but dense hostile graph.
    """
    f = _fields(buf)
    raw_nodes = _repeated(f, 1, "nodes")
    if len(raw_nodes) > max_nodes:
        raise ProtoError(f"object graph has {len(raw_nodes)} nodes, more than {max_nodes}")
    n = len(raw_nodes)

    def node_id(v: int, what: str) -> int:
        i = _int32(v, what)
        if not 0 <= i < n:
            raise ProtoError(f"{what}={i} is outside the graph's {n} nodes")
        return i

    nodes = []
    refs = 0
    for raw in raw_nodes:
        nf = _fields(raw)
        refs += sum(len(nf.get(i, ())) for i in (1, 2, 3))
        if refs > max_refs:
            raise ProtoError(f"object graph has more than {max_refs} references")
        children = []
        for c in _repeated(nf, 1, "children"):
            cf = _fields(c)
            children.append(
                (
                    node_id(_scalar(cf, 1, _VARINT, "node_id"), "node_id"),
                    _string(cf, 2, "local_name"),
                )
            )
        attributes = []
        for a in _repeated(nf, 2, "attributes"):
            af = _fields(a)
            attributes.append(
                (
                    _string(af, 1, "name"),
                    _string(af, 2, "full_name"),
                    _string(af, 3, "checkpoint_key"),
                )
            )
        slots = []
        for s in _repeated(nf, 3, "slot_variables"):
            sf = _fields(s)
            slots.append(
                (
                    node_id(
                        _scalar(sf, 1, _VARINT, "original_variable_node_id"),
                        "original_variable_node_id",
                    ),
                    _string(sf, 2, "slot_name"),
                    node_id(
                        _scalar(sf, 3, _VARINT, "slot_variable_node_id"), "slot_variable_node_id"
                    ),
                )
            )
        nodes.append(TrackableNode(tuple(children), tuple(attributes), tuple(slots)))
    return tuple(nodes)


@dataclass(frozen=True, slots=True)
class CheckpointState:
    """The ``checkpoint`` pointer file (``CheckpointState``, protobuf text format, FORMATS.md §3.1)."""

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...]


_FIELD_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$")
_SIMPLE_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}


def _unquote(token: str) -> str:
    """Decode one text-format string literal (C escapes, octal and ``\\x`` bytes, UTF-8)."""
    if len(token) < 2 or token[0] not in "\"'" or token[-1] != token[0]:
        raise ProtoError(f"expected a quoted string, got {token[:40]!r}")
    body, out, i = token[1:-1], bytearray(), 0
    while i < len(body):
        ch = body[i]
        if ch == token[0]:
            raise ProtoError("unescaped quote inside a string")
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ProtoError("string ends with a lone backslash")
        e = body[i + 1]
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e].encode()
            i += 2
        elif e in "01234567":
            j = i + 1
            while j < len(body) and j < i + 4 and body[j] in "01234567":
                j += 1
            out.append(int(body[i + 1 : j], 8) & 0xFF)
            i = j
        elif e == "x":
            j = i + 2
            while j < len(body) and j < i + 4 and body[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 2:
                raise ProtoError("\\x escape without hex digits")
            out.append(int(body[i + 2 : j], 16))
            i = j
        else:
            raise ProtoError(f"unknown escape \\{e}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtoError("path is not valid UTF-8") from exc


def parse_checkpoint_state(text: str) -> CheckpointState:
    """Parse the ``checkpoint`` file as data (one ``field: value`` per line, as TF writes it).

    Only ``model_checkpoint_path`` (1) and ``all_model_checkpoint_paths`` (2) are used;
    timestamps (3, 4) and unknown fields are skipped. Comments (``#``) and blank lines are
    allowed.
    """
    model: str | None = None
    all_paths: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _FIELD_RE.fullmatch(line)
        if not m:
            raise ProtoError(f"line {lineno} is not 'field: value'")
        name, value = m.group(1), m.group(2)
        if name == "model_checkpoint_path":
            model = _unquote(value)
        elif name == "all_model_checkpoint_paths":
            all_paths.append(_unquote(value))
            if len(all_paths) > 100_000:
                raise ProtoError("more than 100000 all_model_checkpoint_paths")
    if model is None:
        raise ProtoError("no model_checkpoint_path")
    return CheckpointState(model, tuple(all_paths))
