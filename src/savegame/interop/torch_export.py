"""Read the weights of a ``torch.export`` archive (``.pt2``, ``torch.export.save``) without torch.

A ``.pt2`` is a zip (FORMATS.md §1.7) whose tensors are raw storage bytes described by JSON:
``data/weights/<model>_weights_config.json`` (parameters and buffers) and
``data/constants/<model>_constants_config.json`` (lifted tensor constants, non-persistent
buffers, script objects) map each fully qualified name to ``{"path_name": "weight_0",
"use_pickle": bool, "is_param": bool, "tensor_meta": {dtype, sizes, strides, storage_offset,
layout, ...}}``; the record ``data/weights/weight_0`` holds the whole storage (tensors that share
a storage share a record, so tied weights stay tied). Nothing else in the archive is read: the
graph (``models/<model>.json``), the sample inputs (a pickle) and any compiled code
(``data/aotinductor/``) are left alone. Entries saved with ``use_pickle`` (tensor subclasses,
script objects) are pickles that ``torch.export.load`` unpickles with ``weights_only=False``;
here they are never opened: they appear in ``tree()`` as :class:`~savegame.interop.base.Opaque`
and in ``metadata()["pickled"]``, not in ``keys()``.

Written by hand because torch's own loader (``torch.export.pt2_archive._package``) needs torch,
loads the whole archive, and unpickles pickled entries with ``weights_only=False``.

Tensor names are the state-dict names (``layer.0.weight``); an archive holding several models
prefixes each with ``<model>/``. Every size, stride and offset is checked against its record's
length before anything is read (the checks of FORMATS.md §1.6 for torch views).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from savegame import errors
from savegame.interop import _bounds, _zip, base
from savegame.interop.torch_pickle import values

if TYPE_CHECKING:
    import torch

__all__ = ["TorchExportReader", "open_torch_export"]

# torch._export.serde.schema.ScalarType (torch 2.13; the values are part of the serialized
# format and only ever get new members) -> dtype names of values.ITEMSIZES.
SCALAR_TYPES: dict[int, str] = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
    8: "float64", 9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16",
    28: "uint16", 29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz", 33: "float8_e8m0fnu", 34: "uint32", 35: "uint64",
}  # fmt: skip
_STRIDED = 7  # schema.Layout.Strided
_WEIGHTS = ("data/weights/", "_weights_config.json")
_CONSTANTS = ("data/constants/", "_constants_config.json")
_MAX_CONFIG_BYTES = 64 << 20  # a config names each tensor once: 64 MiB is ~500k entries


@dataclass(frozen=True, slots=True)
class _Entry:
    record: _zip.ZipMember
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements


def is_torch_export(inner: set[str]) -> bool:
    """Whether the member names (archive folder stripped) are a ``torch.export`` archive's."""
    return "archive_format" in inner and any(
        n.startswith(_WEIGHTS[0]) and n.endswith(_WEIGHTS[1]) for n in inner
    )


class TorchExportReader(base.Reader):
    """Lazy reader of the weights and tensor constants of a ``.pt2`` archive."""

    format = "torch-export"

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")
        try:
            self._size = os.fstat(self._f.fileno()).st_size
            self._entries: dict[str, _Entry] = {}
            self._tree: dict[str, Any] = {}
            self._pickled: list[str] = []
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, msg: str, key: str | None = None) -> errors.FormatError:
        return errors.FormatError(f"{self.path}: {msg}", path=self.path, key=key)

    def _open(self) -> None:
        members = _zip.read_directory(self._f, self.path, self._size)
        if not members:
            raise self._bad("empty zip, not a torch.export archive")
        prefix = members[0].name.split("/", 1)[0] + "/"
        by_name: dict[str, _zip.ZipMember] = {}
        for m in members:
            if not m.name.startswith(prefix):
                raise self._bad(
                    f"zip member {m.name!r} lies outside the archive folder {prefix!r}", m.name
                )
            by_name[m.name[len(prefix) :]] = m
        self._by_name = by_name
        fmt = by_name.get("archive_format")
        found = fmt and _zip.read_member(self._f, fmt, self.path, max_bytes=64).strip()
        if found != b"pt2":
            raise errors.UnsupportedFormatError(
                f"{self.path}: not a torch.export archive (its archive_format record is "
                f"{found!r}, expected b'pt2')",
                path=self.path,
            )
        self._byteorder = "little"
        if "byteorder" in by_name:
            bo = _zip.read_member(self._f, by_name["byteorder"], self.path, max_bytes=16)
            if bo not in (b"little", b"big"):
                raise self._bad(f"byteorder record is {bo!r}")
            self._byteorder = bo.decode()
        models = sorted(
            n[len(_WEIGHTS[0]) : -len(_WEIGHTS[1])]
            for n in by_name
            if n.startswith(_WEIGHTS[0]) and n.endswith(_WEIGHTS[1])
        )
        if not models:
            legacy = [n for n in by_name if n.startswith(_WEIGHTS[0]) and n.endswith(".pt")]
            raise errors.UnsupportedFormatError(
                f"{self.path}: a .pt2 archive without a weights config"
                + (
                    f" (its weights are a torch.save file inside it, {legacy[0]!r}: the format "
                    "of torch < 2.7; load and re-save it with torch.export.save)"
                    if legacy
                    else " (an AOTInductor package? its weights are inside compiled code)"
                ),
                path=self.path,
            )
        self._models = models
        for model in models:
            tree: dict[str, Any] = {}
            for dir_, suffix in (_WEIGHTS, _CONSTANTS):
                cfg = by_name.get(f"{dir_}{model}{suffix}")
                if cfg is not None:
                    self._read_config(cfg, dir_, model, tree)
            if len(models) == 1:
                self._tree = tree
            else:
                self._tree[model] = tree

    def _read_config(
        self, cfg: _zip.ZipMember, dir_: str, model: str, tree: dict[str, Any]
    ) -> None:
        raw = _zip.read_member(self._f, cfg, self.path, max_bytes=_MAX_CONFIG_BYTES)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._bad(f"{cfg.name!r} is not UTF-8 JSON", cfg.name) from exc
        if not base.json_depth_ok(text):
            raise self._bad(f"{cfg.name!r} nests deeper than {base.LIMITS.max_json_depth}")
        try:
            body = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            raise self._bad(f"{cfg.name!r} is not valid JSON ({exc})", cfg.name) from exc
        config = body.get("config") if isinstance(body, dict) else None
        if not isinstance(config, dict):
            raise self._bad(f"{cfg.name!r} has no 'config' object", cfg.name)
        if len(config) > base.LIMITS.max_entries:
            raise self._bad(f"{cfg.name!r} names more than {base.LIMITS.max_entries} tensors")
        for fqn, meta in config.items():
            name = fqn if len(self._models) == 1 else f"{model}/{fqn}"
            if fqn in tree:
                raise self._bad(f"{name!r} is named twice (weights and constants)", name)
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                raise self._bad(f"{cfg.name!r}: entry {fqn!r} has no path_name", name)
            if meta.get("use_pickle") is not False:
                # A pickle torch would load with weights_only=False: never opened here.
                self._pickled.append(name)
                tree[fqn] = base.Opaque("torch.export", "pickled " + meta["path_name"])
                continue
            record = self._by_name.get(dir_ + meta["path_name"])
            if record is None or "/" in meta["path_name"]:
                raise self._bad(
                    f"{name!r} names the record {meta['path_name']!r}, which is not in "
                    f"{dir_!r}; the archive is incomplete",
                    name,
                )
            self._entries[name] = self._entry(name, meta, record)
            tree[fqn] = base.TensorRef(name)

    def _entry(self, name: str, meta: dict[str, Any], record: _zip.ZipMember) -> _Entry:
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise self._bad(f"{name!r} has no tensor_meta", name)
        if tm.get("layout", _STRIDED) != _STRIDED:
            raise errors.UnsupportedFormatError(
                f"{self.path}: {name!r} has layout {tm.get('layout')!r} (sparse or mkldnn); "
                "only strided tensors are read",
                path=self.path,
                key=name,
            )
        code = tm.get("dtype")
        dtype = SCALAR_TYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise errors.UnsupportedFormatError(
                f"{self.path}: {name!r} has dtype code {code!r}, which savegame does not know "
                f"(known: {sorted(SCALAR_TYPES)})",
                path=self.path,
                key=name,
            )
        size = self._ints(tm.get("sizes"), name, "sizes")
        stride = self._ints(tm.get("strides"), name, "strides")
        offset = self._ints([tm.get("storage_offset")], name, "storage_offset")[0]
        problem = _bounds.shape_problem(size)
        if problem is not None:
            raise self._bad(f"{name!r}: {problem}", name)
        if len(stride) != len(size) or offset < 0 or any(s < 0 for s in stride):
            raise self._bad(f"{name!r}: strides {stride} / offset {offset} do not fit {size}", name)
        width = values.itemsize(dtype)
        numel = 1
        for d in size:
            numel *= d
        if numel and record.size == 0:
            raise self._bad(
                f"{name!r} ({size}) has an empty record: exported with fake tensors? "
                "It holds no values to read",
                name,
            )
        if numel:
            end = offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True)) + 1
            if end * width > record.size:
                raise self._bad(
                    f"{name!r} ({dtype}{list(size)}, offset {offset}) reaches byte {end * width} "
                    f"of a {record.size}-byte record",
                    name,
                )
        return _Entry(record, dtype, size, stride, offset)

    def _ints(self, items: Any, name: str, what: str) -> tuple[int, ...]:
        # Each dimension is {"as_int": n}; a symbolic one ({"as_expr": ...}) has no size here.
        if not isinstance(items, list) or len(items) > _bounds.MAX_RANK:
            raise self._bad(f"{name!r}: {what} is not a list of at most {_bounds.MAX_RANK}", name)
        out = []
        for item in items:
            n = item.get("as_int") if isinstance(item, dict) else None
            if type(n) is not int:
                raise self._bad(f"{name!r}: {what} holds {item!r}, not a fixed integer", name)
            out.append(n)
        return tuple(out)

    def _release(self) -> None:
        self._f.close()

    # -- Reader -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names (the state-dict names), weights first, then tensor constants."""
        self._check_open()
        return list(self._entries)

    def _get(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            hint = " (a pickled entry: never read)" if name in self._pickled else "; see keys()"
            raise errors.CheckpointNotFoundError(
                f"{self.path}: no tensor named {name!r}{hint}", path=self.path, key=name
            ) from None

    def info(self, name: str) -> base.TensorInfo:
        """Dtype, shape and bytes of one tensor."""
        self._check_open()
        e = self._get(name)
        numel = 1
        for d in e.size:
            numel *= d
        return base.TensorInfo(name, e.dtype, e.size, numel * values.itemsize(e.dtype))

    def _raw(self, name: str) -> tuple[_Entry, bytes]:
        """The entry and the bytes its view covers (bytes only: verify() uses it)."""
        e = self._get(name)
        if not all(e.size):
            return e, b""
        width = values.itemsize(e.dtype)
        end = e.offset + sum((d - 1) * s for d, s in zip(e.size, e.stride, strict=True)) + 1
        if e.record.method == _zip.STORED:
            self._f.seek(e.record.start + e.offset * width)
            raw = self._f.read((end - e.offset) * width)
        else:
            raw = _zip.read_member(self._f, e.record, self.path)[e.offset * width : end * width]
        if len(raw) != (end - e.offset) * width:
            raise self._bad(f"the record of {name!r} is truncated", name)
        return e, raw

    def read(self, name: str) -> torch.Tensor:
        """One tensor on CPU, owning its memory; reads only the bytes its view covers."""
        self._check_open()
        e, raw = self._raw(name)
        torch = values.torch_module()
        dtype = values.torch_dtype(e.dtype, self.path)
        if not raw:
            return torch.empty(e.size, dtype=dtype)
        import numpy as np

        buf = np.frombuffer(raw, dtype=np.uint8)
        width = values.itemsize(e.dtype)
        if self._byteorder == "big" and width > 1:
            unit = width // 2 if e.dtype.startswith("complex") else width
            buf = buf.reshape(-1, unit)[:, ::-1].reshape(-1)
        flat = torch.from_numpy(buf.copy()).view(dtype)
        view = torch.as_strided(flat, e.size, e.stride, 0)
        numel = 1
        for d in e.size:
            numel *= d
        if numel * width > len(raw):
            # An expanded view (stride 0): a view of its own small buffer, as torch gives it,
            # not a possibly huge materialized tensor (FORMATS.md §1.6).
            return view
        return view.clone()

    def tree(self) -> dict[str, Any]:
        """``{name: TensorRef}`` (``{model: {...}}`` for several models); pickled entries are
        :class:`~savegame.interop.base.Opaque`."""
        self._check_open()
        return self._tree

    def metadata(self) -> dict[str, Any]:
        """The models, the byte order and the entries saved as pickles (never read)."""
        self._check_open()
        return {
            "models": list(self._models),
            "byteorder": self._byteorder,
            "pickled": self._pickled,
        }

    def verify(self) -> list[str]:
        """Check every record's zip CRC-32 and read every tensor's bytes; returns problems."""
        self._check_open()
        problems: list[str] = []
        seen: set[str] = set()
        for name, e in self._entries.items():
            try:
                if e.record.name not in seen:
                    seen.add(e.record.name)
                    self._check_crc(e.record)
                self._raw(name)
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def _check_crc(self, m: _zip.ZipMember) -> None:
        if m.method != _zip.STORED:
            _zip.read_member(self._f, m, self.path)  # bounded inflate + CRC-32
            return
        if _zip.crc32_range(self._f, m.start, m.size) != m.crc:
            raise errors.IntegrityError(
                f"{self.path}: record {m.name!r} fails its CRC-32 check (corrupt file)",
                path=self.path,
                key=m.name,
            )


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def open_torch_export(path: str | os.PathLike[str]) -> TorchExportReader:
    """Open a ``.pt2`` archive (``torch.export.save``) lazily; reads its JSON configs only.

    Raises:
        UnsupportedFormatError: not a torch.export archive, an archive without a weights config
            (torch < 2.7's, or an AOTInductor package), sparse tensors or unknown dtypes.
        FormatError: a config that is not JSON, names a missing record, or a view that does not
            fit its record; zip damage.
        CheckpointNotFoundError: the file does not exist.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise errors.CheckpointNotFoundError(f"{p} does not exist or is not a file", path=p)
    return TorchExportReader(p)
