"""Strict, lazy reader of ``.safetensors`` files (FORMATS.md §2).

Key invariant: a file is accepted only if its header is a bounded, duplicate-free JSON object
whose tensors tile the byte buffer exactly — first offset 0, each begin = previous end, sizes =
checked shape product × itemsize, last end = end of file. Stricter than the reference reader,
which accepts duplicate names, a leading space and unknown entry fields (FORMATS.md §2).
``read(name)`` seeks to and reads that tensor's range only.
"""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING, Any, BinaryIO

from savegame import errors
from savegame.format import tensors
from savegame.interop import _bounds, base

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "SafetensorsReader", "open_safetensors"]

# safetensors dtype -> (torch dtype name or None when torch has no such dtype, bits per
# element): format.tensors' one dtype table. Names, not torch objects: listing and verifying
# need no torch (issue 9.18).
DTYPES = tensors.SAFETENSORS_DTYPES
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; a strict reader must see both.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class SafetensorsReader(base.Reader):
    """Lazy reader of one safetensors file; open with :func:`open_safetensors`."""

    format = "safetensors"

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, msg: str, key: str | None = None) -> errors.FormatError:
        return errors.FormatError(
            f"{self.path}: {msg}; not a valid safetensors file (damaged or hostile)",
            path=self.path,
            key=key,
        )

    def _parse(self) -> None:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise self._bad("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > base.LIMITS.max_header_bytes:
            raise self._bad(
                f"header length {n} exceeds the limit of {base.LIMITS.max_header_bytes} bytes"
            )
        if 8 + n > size:
            raise self._bad(f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
        if not raw.startswith(b"{"):
            raise self._bad("header does not start with '{'")
        try:
            text = raw.decode("utf-8").rstrip(" ")
        except UnicodeDecodeError as exc:
            raise self._bad("header is not UTF-8") from exc
        if not base.json_depth_ok(text, base.LIMITS.max_json_depth):
            raise self._bad(f"header JSON nests deeper than {base.LIMITS.max_json_depth}")
        try:
            header = json.loads(text, object_pairs_hook=_pairs)
        except _DuplicateKey as exc:
            raise errors.FormatError(
                f"{self.path}: header names {exc.key!r} twice; refusing an ambiguous file",
                path=self.path,
                key=exc.key,
            ) from None
        except (ValueError, RecursionError) as exc:
            raise self._bad(f"header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("__metadata__ must map strings to strings")
        self._meta: dict[str, str] = meta
        if len(header) > base.LIMITS.max_entries:
            raise self._bad(f"more than {base.LIMITS.max_entries} tensors")
        entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
        for name, e in header.items():
            if not isinstance(e, dict) or set(e) != _ENTRY_FIELDS:
                raise self._bad(
                    f"entry {name!r} must have exactly dtype, shape, data_offsets", name
                )
            dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dt, str) or dt not in DTYPES:
                raise self._bad(f"entry {name!r} has unknown dtype {dt!r}", name)
            if not isinstance(shape, list):
                raise self._bad(f"entry {name!r} has a malformed shape", name)
            problem = _bounds.shape_problem(shape)
            if problem is not None:
                # Bounds every dimension, even of an empty tensor: torch cannot build
                # (0, 2**64) (TypeError converting it to a C integer).
                raise self._bad(f"entry {name!r} has a malformed shape ({problem})", name)
            if not (
                isinstance(offs, list)
                and len(offs) == 2
                and all(type(o) is int and o >= 0 for o in offs)
            ):
                raise self._bad(f"entry {name!r} has malformed data_offsets", name)
            numel = 1
            for d in shape:
                numel *= d  # bounded by shape_problem above
            bits = numel * DTYPES[dt][1]
            if bits % 8:
                raise self._bad(f"entry {name!r}: sub-byte tensor does not fill whole bytes", name)
            begin, end = offs
            if end < begin or end - begin != bits // 8:
                raise self._bad(
                    f"entry {name!r} spans {end - begin} bytes but shape x dtype needs {bits // 8}",
                    name,
                )
            entries.append((begin, end, name, dt, tuple(shape)))
        entries.sort()
        pos = 0
        for begin, end, name, _, _ in entries:
            if begin != pos:
                raise self._bad(
                    f"tensor {name!r} starts at {begin}, expected {pos} (gap or overlap)", name
                )
            pos = end
        if 8 + n + pos != size:
            raise self._bad(
                f"tensors end at byte {8 + n + pos} but the file has {size} bytes (trailing or missing data)"
            )
        self._data_start = 8 + n
        # Keep the header's order for keys(); torch-style users expect it.
        self._entries = {name: (begin, end, dt, shape) for begin, end, name, dt, shape in entries}
        self._order = list(header)

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        self._check_open()
        return list(self._order)

    def _entry(self, name: str) -> tuple[int, int, str, tuple[int, ...]]:
        try:
            return self._entries[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"{self.path}: no tensor named {name!r}; see keys()", path=self.path, key=name
            ) from None

    def info(self, name: str) -> base.TensorInfo:
        """Dtype (torch name), shape and byte size of one tensor."""
        self._check_open()
        begin, end, dt, shape = self._entry(name)
        return base.TensorInfo(name, DTYPES[dt][0] or dt.lower(), shape, end - begin)

    def _raw(self, name: str) -> tuple[str, tuple[int, ...], bytes]:
        """(torch dtype name, shape, the tensor's bytes): numpy/bytes only, for verify()."""
        begin, end, dt, shape = self._entry(name)
        tdt = DTYPES[dt][0]
        if tdt is None:
            raise errors.UnsupportedFormatError(
                f"{self.path}: tensor {name!r} has dtype {dt}, which this torch cannot represent",
                path=self.path,
                key=name,
            )
        self._f.seek(self._data_start + begin)
        raw = self._f.read(end - begin)
        if len(raw) != end - begin:
            raise self._bad(f"tensor {name!r} is truncated (file changed?)", name)
        return tdt, shape, raw

    def read(self, name: str) -> torch.Tensor:
        """One tensor (reads only its byte range)."""
        self._check_open()
        tdt, shape, raw = self._raw(name)
        import numpy as np
        import torch

        dtype = getattr(torch, tdt, None)
        if not isinstance(dtype, torch.dtype):
            raise errors.UnsupportedFormatError(
                f"{self.path}: tensor {name!r} has dtype {tdt}, which this torch "
                f"({torch.__version__}) cannot represent; upgrade torch",
                path=self.path,
                key=name,
            )
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return (
            torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype).reshape(shape)
        )

    def tree(self) -> dict[str, base.TensorRef]:
        """Flat ``{name: TensorRef(name)}`` (safetensors has no structure)."""
        self._check_open()
        return {k: base.TensorRef(k) for k in self._order}

    def metadata(self) -> dict[str, Any]:
        """The ``__metadata__`` string map."""
        self._check_open()
        return {"__metadata__": dict(self._meta)}

    def verify(self) -> list[str]:
        """Read every tensor; structure was already checked at open."""
        self._check_open()
        problems = []
        for k in self._order:
            try:
                self._raw(k)  # every byte present; no torch needed
            except errors.CheckpointError as exc:
                problems.append(f"{k}: {exc}")
        return problems

    def _release(self) -> None:
        self._f.close()


def open_safetensors(path: str | os.PathLike[str]) -> SafetensorsReader:
    """Open and validate a safetensors file; reads only the header.

    Raises:
        FormatError: any violation of FORMATS.md §2 (the message says which).
        CheckpointNotFoundError: the file does not exist.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise errors.CheckpointNotFoundError(f"{p} does not exist or is not a file", path=p)
    return SafetensorsReader(p)
