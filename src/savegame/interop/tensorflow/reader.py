"""The TensorFlow bundle reader: lazy, CRC-checked reads of one tensor at a time.

Key invariant: tensor bytes are read one tensor at a time by ``(shard, offset, size)``, the
range checked against the shard's real size first, and the entry's masked CRC32C verified
before the bytes are returned (string tensors: the length checksum too); a partitioned
variable is assembled only after every slice range is bounded by its shard and the slices are
shown not to overlap. The index itself was bounded entry by entry at open
(:mod:`savegame.interop.tensorflow.bundle`). Malformed input raises a typed
:class:`savegame.errors.FormatError` whose ``.path`` names the offending file; a closed reader
raises :class:`savegame.errors.ReaderClosedError`.

numpy is imported where tensor values are built or checked (read(), bool/byte-order checks,
partitioned variables) and torch only by read(): opening, listing and verifying a bundle of
plain tensors check CRCs on bytes alone (issue 9.18).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

from savegame import errors
from savegame.interop import base
from savegame.interop.tensorflow import bundle, graph, locate, proto, table

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["TensorFlowReader", "open_tensorflow"]

# Caps (FORMATS.md §3.6, §7). The index is read whole: a 1M-variable model's index is ~100 MB.
_MAX_INDEX_BYTES = 1 << 30
# A single 'S' array from read() may allocate at most max(this, 8 x stored bytes); beyond it
# (one long string among many short ones) use read_strings(), which has no padding.
_MAX_STRING_ARRAY_BYTES = 64 << 20
# verify() checks the slices of a partitioned variable for overlap box against box up to this
# many slices (no numpy needed); more slices use a mask of the variable, like read().
_PAIRWISE_MAX_SLICES = 256


def _nest(flat: list[bytes], shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


class TensorFlowReader(base.Reader):
    """A TF tensor bundle opened by :func:`open_tensorflow` (see the package docstring).

    Files are opened per read, so a reader holds no file handle and ``close()`` only marks it
    closed.

    Attributes:
        path: The checkpoint prefix (``.../ckpt-1``), without ``.index``.
        format: ``"tensorflow"``.
    """

    format = "tensorflow"

    def __init__(self, prefix: str, state: proto.CheckpointState | None) -> None:
        self.path = prefix
        self._index_path = prefix + ".index"
        self._state = state
        index = bundle.BundleIndex(self._read_index_file(), self._index_path)
        self._header = index.header
        self._entries = index.entries
        self._other = index.other  # slice entries and unsupported dtypes: verify() only
        self._problems = index.problems  # found at open, reported by verify()
        self._skipped = index.skipped
        self._graph_paths: dict[str, str] | None = None
        self._full_names: dict[str, str] = {}
        self._graph_keys: set[str] = set()
        self._graph_error: str | None = None

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

    # -- protocol ----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Raw bundle keys of readable tensors, in file (sorted) order. Reads no tensor data."""
        self._check_open()
        return list(self._entries)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype (torch name, or ``"string"``), shape and stored bytes of one tensor."""
        self._check_open()
        e = self._entry(name)
        return base.TensorInfo(name, bundle.dtype_name(e.dtype), e.shape, e.size)

    def read(self, name: str) -> torch.Tensor | np.ndarray:
        """Read one tensor, verifying its CRC32C; big-endian bundles are byte-swapped.

        Numeric tensors come back as CPU torch tensors owning their memory (a partitioned
        variable is assembled from its slices, each CRC-checked, overlaps refused). String tensors
        come back as a NumPy array of dtype ``S<n>`` (fixed-width bytes, never ``object``);
        NumPy strips trailing NUL bytes from ``S`` items, so use :meth:`read_strings` when
        strings may end in ``\\x00``.
        """
        self._check_open()
        e = self._entry(name)
        if e.parts:
            whole = self._read_partitioned(e)
            assert whole is not None  # assemble=True always builds the tensor
            return whole
        buf = self._read_bytes(e, check_crc=e.dtype != bundle.DT_STRING)
        if e.dtype == bundle.DT_STRING:
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

    def _check_values(self, e: bundle.Entry, buf: bytearray, name: str) -> None:
        """The value check of :meth:`_check_numeric` on bytes alone (verify: no byte swap)."""
        if e.dtype == 10 and bytes(buf).translate(None, b"\x00\x01"):
            raise errors.FormatError(
                f"bool tensor {name!r} holds bytes other than 0 and 1", path=self.path, key=name
            )

    def _check_numeric(self, e: bundle.Entry, buf: bytearray, name: str) -> None:
        """Byte-swap ``buf`` in place for a big-endian bundle and check bool bytes (numpy)."""
        import numpy as np

        unit = bundle.DTYPES[e.dtype][2]
        if self._header.big_endian and unit > 1:
            np.frombuffer(buf, dtype=f"u{unit}").byteswap(inplace=True)
        if e.dtype == 10 and int(np.frombuffer(buf, dtype=np.uint8).max()) > 1:
            raise errors.FormatError(
                f"bool tensor {name!r} holds bytes other than 0 and 1", path=self.path, key=name
            )

    def _numeric(self, e: bundle.Entry, buf: bytearray, name: str) -> torch.Tensor:
        import torch

        tdtype = getattr(torch, bundle.DTYPES[e.dtype][0])
        if e.numel == 0:
            return torch.empty(e.shape, dtype=tdtype)
        self._check_numeric(e, buf, name)
        return torch.frombuffer(buf, dtype=tdtype).reshape(e.shape)

    def _read_partitioned(self, e: bundle.Entry, *, assemble: bool = True) -> torch.Tensor | None:
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

            out = torch.empty(e.shape, dtype=getattr(torch, bundle.DTYPES[e.dtype][0]))
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
                overlap = any(bundle.boxes_overlap(box, other) for _, other in e.parts[:j])
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
        self._check_open()
        e = self._entry(name)
        if e.dtype != bundle.DT_STRING:
            raise errors.FormatError(
                f"{name!r} is {bundle.dtype_name(e.dtype)}, not a string tensor; use read()",
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
        self._check_open()
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
        self._check_open()
        paths = self.object_paths()
        meta: dict[str, Any] = {
            "prefix": self.path,
            "layout": "tf2-object-graph"
            if graph.OBJECT_GRAPH_KEY in self._entries
            else "tf1-names",
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
            table.Table(self._read_index_file(), self._index_path).read()
        except errors.CheckpointError as exc:
            return [str(exc)]
        problems.extend(self._problems)
        for e in [*self._entries.values(), *self._other]:
            try:
                if e.parts:
                    self._read_partitioned(e, assemble=False)  # bounds, overlap, parts' CRCs
                    continue
                if e.dtype == bundle.DT_STRING:
                    self._decode_strings(e, self._read_bytes(e, check_crc=False))
                elif e.dtype == bundle.DT_VARIANT:
                    self._read_bytes(e, check_crc=False)
                else:
                    self._read_bytes(e, check_crc=True)
            except errors.CheckpointError as exc:
                problems.append(f"{e.key}: {exc}")
        if graph.OBJECT_GRAPH_KEY in self._entries:
            try:
                self._resolve_graph()
            except errors.CheckpointError as exc:
                problems.append(f"{graph.OBJECT_GRAPH_KEY}: {exc}")
            known = set(self._entries) | set(self._skipped)
            for key in sorted(self._graph_keys - known):
                problems.append(f"object graph names {key!r}, which is not in the index")
        return problems

    # -- internals ---------------------------------------------------------------------------

    def _entry(self, name: str) -> bundle.Entry:
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

    def _read_bytes(self, e: bundle.Entry, *, check_crc: bool) -> bytearray:
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
            actual = table.masked_crc(buf)
            if actual != e.crc:
                raise errors.IntegrityError(
                    f"{sp}: tensor {e.key!r} has CRC32C {actual:#010x}, the index says "
                    f"{e.crc:#010x}; the shard is corrupt (re-copy it)",
                    path=sp,
                    key=e.key,
                )
        return buf

    def _decode_strings(self, e: bundle.Entry, buf: bytearray) -> list[bytes]:
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
                n, pos = proto.read_varint(raw, pos, end)
                lengths.append(n)
        except proto.ProtoError as exc:
            raise bad(str(exc)) from exc
        total = sum(lengths)
        if pos + 4 > end or total != end - pos - 4:
            raise bad(f"string lengths sum to {total} but {max(end - pos - 4, 0)} bytes follow")
        order: Literal["big", "little"] = "big" if self._header.big_endian else "little"
        # The lengths' checksum is over each length as uint32 (uint64 if it does not fit).
        len_bytes = b"".join(n.to_bytes(4 if n < 1 << 32 else 8, order) for n in lengths)
        stored = raw[pos : pos + 4]
        body = memoryview(raw)[pos + 4 :]
        entry_crc = table.masked_crc(len_bytes, stored, body)
        if entry_crc != e.crc:
            raise errors.IntegrityError(
                f"{sp}: string tensor {e.key!r} has CRC32C {entry_crc:#010x}, the index says "
                f"{e.crc:#010x}; the shard is corrupt (re-copy it)",
                path=sp,
                key=e.key,
            )
        if table.masked_crc(len_bytes) != int.from_bytes(stored, "little"):
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
        entry = self._entries.get(graph.OBJECT_GRAPH_KEY)
        if entry is None or entry.dtype != bundle.DT_STRING or entry.shape != ():
            return {}
        raw = self._decode_strings(entry, self._read_bytes(entry, check_crc=False))[0]
        names = graph.resolve(raw, self.path)
        self._full_names = names.full_names
        self._graph_keys = names.keys
        return names.paths


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
    prefix, state = locate.resolve(os.fspath(path))
    return TensorFlowReader(prefix, state)
