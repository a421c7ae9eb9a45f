"""The darknet reader: a ``.weights`` file read by the offsets its cfg implies.

Key invariant: every byte range comes from the layer layout
(:mod:`~savegame.interop.darknet.layout`) and is checked against the file's length before it
is read; a file that does not hold exactly what the cfg needs is refused unless the caller
asks for a partial read, which then lists only the layers fully present (FORMATS.md §5, §7).
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from savegame import errors
from savegame.interop import base
from savegame.interop.darknet import cfg as cfg_file  # `cfg` is open_darknet's argument
from savegame.interop.darknet import layout

if TYPE_CHECKING:
    import torch

__all__ = ["Coverage", "DarknetHeader", "DarknetReader", "open_darknet", "read_header"]

_HEADER = struct.Struct("<iii")
_FLOAT = 4


@dataclass(frozen=True, slots=True)
class DarknetHeader:
    """The ``.weights`` header (FORMATS.md §5)."""

    major: int
    minor: int
    revision: int
    seen: int
    header_bytes: int  # 16 or 20
    transposed: bool  # [connected] weights stored (input, output)


@dataclass(frozen=True, slots=True)
class _Slot:
    offset: int
    info: base.TensorInfo
    stored_shape: tuple[int, ...]  # shape as laid out in the file (transposed variants)
    transpose: bool
    layer: int


@dataclass(frozen=True, slots=True)
class Coverage:
    """How many of the cfg's layers with weights a ``.weights`` file holds in full.

    Attributes:
        present: Layers whose every tensor is in the file.
        total: Layers of the cfg that have weights.
    """

    present: int
    total: int

    @property
    def complete(self) -> bool:
        return self.present == self.total

    def __str__(self) -> str:
        return f"{self.present} of {self.total} layers present"


class DarknetReader(base.Reader):
    """Lazy reader of one ``.weights`` file and its cfg; create it with :func:`open_darknet`.

    Attributes:
        path: The ``.weights`` file.
        cfg_path: The ``.cfg`` file.
        format: ``"darknet"``.
        header: The parsed :class:`DarknetHeader`.
        coverage: How many of the cfg's layers with weights the file holds (:class:`Coverage`;
            short of the total only for files opened with ``partial=True``).
        layers: Every layer after ``[net]`` with shapes and tensors (:class:`DarknetLayer`).
        net: The ``[net]`` options (raw strings).
    """

    def __init__(
        self,
        path: str,
        cfg_path: str,
        raw: io.RawIOBase,
        header: DarknetHeader,
        sections: list[cfg_file.CfgSection],
        layers: list[layout.DarknetLayer],
        file_size: int,
        partial: bool,
    ) -> None:
        self.path = path
        self.format = "darknet"
        self.cfg_path = cfg_path
        self.header = header
        self.layers: tuple[layout.DarknetLayer, ...] = tuple(layers)
        self.net: dict[str, str] = dict(sections[0].options)
        self._raw = raw
        self._file_size = file_size
        self._slots: dict[str, _Slot] = {}
        self._problems: list[str] = []
        offset = header.header_bytes
        loaded = 0
        weighted = 0
        cut: int | None = None
        for layer in layers:
            if not layer.tensors:
                continue
            weighted += 1
            end = offset + layer.nfloats * _FLOAT
            if end <= file_size:
                loaded += 1
                self._add_slots(layer, offset)
            elif offset < file_size and cut is None:
                cut = layer.index
                self._problems.append(
                    f"layer {layer.index} [{layer.type}] needs bytes {offset}..{end} but the "
                    f"file ends at {file_size}: the file is cut inside this layer"
                )
            offset = end
        needed = offset
        self._needed = needed
        consumed = min(needed, self._last_full_end(header.header_bytes, layers, file_size))
        self._consumed = consumed
        if file_size > needed:
            self._problems.append(
                f"{file_size - needed} trailing bytes after the last layer: the file does not "
                f"match cfg {cfg_path} (wrong cfg?)"
            )
        self._meta: dict[str, Any] = {
            "major": header.major,
            "minor": header.minor,
            "revision": header.revision,
            "seen": header.seen,
            "transposed": header.transposed,
            "cfg": cfg_path,
            "width": layers[0].in_shape[2] if layers else 0,
            "height": layers[0].in_shape[1] if layers else 0,
            "channels": layers[0].in_shape[0] if layers else 0,
            "layers": len(layers),
            "weighted_layers": weighted,
            "loaded_layers": loaded,
            "bytes_needed": needed,
            "bytes_consumed": consumed,
            "file_size": file_size,
            "complete": loaded == weighted and file_size == needed,
        }
        #: How many of the cfg's layers with weights the file holds in full.
        self.coverage = Coverage(loaded, weighted)
        if not partial and file_size < needed:
            raise errors.FormatError(
                f"{path} holds {loaded} of the {weighted} layers with weights that cfg "
                f"{cfg_path} describes (the file is {needed - file_size} bytes shorter than the "
                f"{needed} it needs); if it is partial on purpose (a backbone such as "
                "darknet53.conv.74), open it with partial=True (CLI: --partial); otherwise "
                "check that the cfg matches and the file is complete",
                path=path,
            )
        if not partial and file_size > needed:
            raise errors.FormatError(
                f"{path} is {file_size - needed} bytes longer than cfg {cfg_path} needs "
                f"({needed} bytes: header + {weighted} layers with weights): the cfg does not "
                "match the file (wrong cfg?); partial=True (CLI: --partial) opens it anyway",
                path=path,
            )

    @staticmethod
    def _last_full_end(start: int, layers: Sequence[layout.DarknetLayer], file_size: int) -> int:
        offset = start
        for layer in layers:
            end = offset + layer.nfloats * _FLOAT
            if end > file_size:
                break
            offset = end
        return offset

    def _add_slots(self, layer: layout.DarknetLayer, offset: int) -> None:
        for name, shape in layer.tensors:
            stored = shape
            transpose = False
            if layer.type == "connected" and name.endswith(".fc.weight") and self.header.transposed:
                stored, transpose = (shape[1], shape[0]), True
            elif layer.type == "convolutional" and name.endswith("conv.weight"):
                if layer.params.get("flipped"):
                    stored, transpose = (math.prod(shape[1:]), shape[0]), True
            numel = math.prod(shape)
            info = base.TensorInfo(name=name, dtype="float32", shape=shape, nbytes=numel * _FLOAT)
            self._slots[name] = _Slot(offset, info, stored, transpose, layer.index)
            offset += numel * _FLOAT

    # -- protocol -------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Names of the tensors fully present in the file, in file order. Reads no data."""
        self._check_open()
        return list(self._slots)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype (always float32), shape and size of ``name``."""
        self._check_open()
        return self._slot(name).info

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (float32, PyTorch layout) into a CPU tensor owning its memory."""
        self._check_open()
        import torch  # only here: listing and verify() need numpy alone (issue 9.18)

        return torch.from_numpy(self._read_numpy(name))

    def _read_numpy(self, name: str) -> np.ndarray:
        """One tensor as a float32 C-order numpy array owning its memory."""
        slot = self._slot(name)
        data = _read_at(self._raw, slot.offset, slot.info.nbytes)
        if len(data) != slot.info.nbytes:
            raise errors.FormatError(
                f"{self.path} ended while reading {name!r} (file changed since open?)",
                path=self.path,
                key=name,
            )
        arr = np.frombuffer(data, dtype="<f4").reshape(slot.stored_shape)
        if slot.transpose:
            arr = arr.T.reshape(slot.info.shape)
        return np.array(arr, dtype=np.float32, order="C")

    def tree(self) -> dict[str, Any]:
        """``{name: TensorRef(name)}`` in file order (darknet files have no structure)."""
        self._check_open()
        return {name: base.TensorRef(name) for name in self._slots}

    def metadata(self) -> dict[str, Any]:
        """Header and coverage facts.

        Keys: ``major``, ``minor``, ``revision``, ``seen``, ``transposed``, ``cfg``, ``width``,
        ``height``, ``channels``, ``layers``, ``weighted_layers``, ``loaded_layers`` (fully
        present), ``bytes_needed`` (what the cfg implies, header included), ``bytes_consumed``
        (through the last fully present layer), ``file_size``, ``complete``.
        """
        self._check_open()
        return dict(self._meta)

    def verify(self) -> list[str]:
        """Read every present tensor; report a layer cut mid-way and trailing bytes.

        A file that simply stops at a layer boundary (a backbone) is not a problem; see
        ``metadata()["complete"]``.
        """
        self._check_open()
        problems = list(self._problems)
        for name in self._slots:
            try:
                self._read_numpy(name)
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def __repr__(self) -> str:
        return f"DarknetReader({self.path!r}, cfg={self.cfg_path!r}, {len(self._slots)} tensors)"

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"no tensor named {name!r} in {self.path}; see keys() (layers beyond a "
                "truncated file are not listed)",
                path=self.path,
                key=name,
            ) from None

    def _release(self) -> None:
        """Close the ``.weights`` file."""
        self._raw.close()


def _read_at(raw: io.RawIOBase, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at end of file)."""
    raw.seek(offset)
    chunks: list[bytes] = []
    left = n
    while left > 0:
        chunk = raw.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_header(raw: io.RawIOBase, path: str, file_size: int) -> DarknetHeader:
    """Parse the ``.weights`` header (FORMATS.md §5).

    Raises:
        FormatError: The file is too short for a header.
    """
    if file_size == 0:
        raise errors.FormatError(
            f"{path} is empty (0 bytes): there is no darknet header or weights to read; an "
            "interrupted download or copy? Fetch the file again",
            path=path,
        )
    head = _read_at(raw, 0, _HEADER.size)
    if len(head) < _HEADER.size:
        raise errors.FormatError(
            f"{path} is {file_size} bytes, too short for a darknet .weights header", path=path
        )
    major, minor, revision = _HEADER.unpack(head)
    # pjreddie reads a size_t `seen` only when both numbers are < 1000 (AlexeyAB drops that
    # check; the two agree for every file either writes: 0.2.0 and 0.2.5).
    wide = (major * 10 + minor) >= 2 and 0 <= major < 1000 and 0 <= minor < 1000
    n = 8 if wide else 4
    seen_raw = _read_at(raw, _HEADER.size, n)
    if len(seen_raw) != n:
        raise errors.FormatError(
            f"{path} is {file_size} bytes, too short for a darknet .weights header", path=path
        )
    seen = int.from_bytes(seen_raw, "little", signed=False)
    transposed = major > 1000 or minor > 1000
    return DarknetHeader(major, minor, revision, seen, _HEADER.size + n, transposed)


def open_darknet(
    path: str | os.PathLike[str],
    cfg: str | os.PathLike[str],
    *,
    partial: bool = False,
) -> DarknetReader:
    """Open a darknet ``.weights`` file with its ``.cfg`` for safe, lazy reading.

    Args:
        path: The ``.weights`` file.
        cfg: The ``.cfg`` describing the network (sizes come only from it).
        partial: Accept a file that does not hold exactly the weights the cfg implies,
            typically one that stops early (a backbone such as ``darknet53.conv.74``): only
            the layers fully present are listed, :attr:`DarknetReader.coverage` says how many,
            and :meth:`DarknetReader.verify` reports a layer cut mid-way or trailing bytes.
            Without it such a file raises ``FormatError``, so a file shorter than its cfg
            never loads silently.

    Returns:
        A :class:`DarknetReader` (a :class:`savegame.interop.base.Reader`).

    Raises:
        CheckpointNotFoundError: ``path`` or ``cfg`` does not exist.
        FormatError: Malformed cfg, out-of-range numbers, header too short, or (unless
            ``partial``) a file shorter or longer than the cfg needs.
        UnsupportedFormatError: Layer types whose weight layout is not modelled.
    """
    spath = os.fspath(path)
    scfg = os.fspath(cfg)
    try:
        cfg_size = os.path.getsize(scfg)
        if cfg_size > cfg_file.MAX_CFG_BYTES:
            raise errors.FormatError(
                f"cfg {scfg} is {cfg_size} bytes, over the {cfg_file.MAX_CFG_BYTES} cap", path=scfg
            )
        with open(scfg, "rb") as fh:
            cfg_bytes = fh.read(cfg_file.MAX_CFG_BYTES + 1)
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no cfg file at {scfg}", path=scfg) from exc
    except IsADirectoryError as exc:
        raise errors.FormatError(f"cfg {scfg} is a directory", path=scfg) from exc
    try:
        text = cfg_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.FormatError(f"cfg {scfg} is not UTF-8 text", path=scfg) from exc
    sections = cfg_file.parse_cfg(text, path=scfg)
    layers = layout.plan_layers(sections, path=scfg)
    try:
        # Unbuffered: each read() goes to the file, so a file changed since open is noticed.
        raw = open(spath, "rb", buffering=0)  # noqa: SIM115 - closed in DarknetReader._release()
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no weights file at {spath}", path=spath) from exc
    except IsADirectoryError as exc:
        raise errors.FormatError(f"{spath} is a directory", path=spath) from exc
    try:
        file_size = os.fstat(raw.fileno()).st_size
        header = read_header(raw, spath, file_size)
        return DarknetReader(spath, scfg, raw, header, sections, layers, file_size, partial)
    except BaseException:
        raw.close()
        raise
