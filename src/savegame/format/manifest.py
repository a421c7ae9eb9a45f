"""The manifest: the one file that makes a checkpoint exist.

Invariant: the manifest is written last and is the commit point. A checkpoint exists iff its
``manifest.json`` parses, validates against this module (and ``manifest.schema.json``), and its
self-hash matches. Every tensor chunk and every file it lists carries a size and a hash, so any
later damage to any byte is detected by :mod:`savegame.engine.reader`.

The self-hash (``integrity.hash``) is xxh3-128 over the canonical JSON of the manifest without
its ``integrity`` field (sorted keys, no spaces, UTF-8), so a hand-edited or bit-flipped
manifest that still parses is refused too.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame import errors
from savegame.format import hashing, tensors

FORMAT_NAME = "savegame"
VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024 * 1024

__all__ = ["Chunk", "FileEntry", "Manifest", "TensorEntry", "FORMAT_NAME", "VERSION"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored piece of a tensor: ``shape`` elements starting at ``start`` in the global tensor."""

    file: str
    offset: int
    length: int
    hash: str
    start: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True, slots=True)
class FileEntry:
    size: int
    hash: str
    header_length: int
    rank: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest. Build with :meth:`create`, parse with :meth:`from_bytes`."""

    step: int
    created: float
    world_size: int
    run_id: str
    trees: tuple[Any, ...]  # one state skeleton per rank (savegame.tree)
    tensors: Mapping[str, TensorEntry]
    files: Mapping[str, FileEntry]
    metrics: Mapping[str, float] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)  # reason, epochs_completed, user notes
    versions: Mapping[str, str] = field(default_factory=dict)

    # ---- encoding -------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": VERSION,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "run_id": self.run_id,
            "metrics": {k: _metric_json(v) for k, v in self.metrics.items()},
            "info": dict(self.info),
            "versions": dict(self.versions),
            "hash_algorithm": hashing.ALGORITHM,
            "files": {
                name: {"size": f.size, "hash": f.hash, "header_length": f.header_length, "rank": f.rank}
                for name, f in self.files.items()
            },
            "tensors": {
                key: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "chunks": [
                        {
                            "file": c.file,
                            "offset": c.offset,
                            "length": c.length,
                            "hash": c.hash,
                            "start": list(c.start),
                            "shape": list(c.shape),
                        }
                        for c in t.chunks
                    ],
                }
                for key, t in self.tensors.items()
            },
            "trees": list(self.trees),
        }

    def to_bytes(self) -> bytes:
        body = self.body()
        body["integrity"] = {"algorithm": hashing.ALGORITHM, "hash": _self_hash(body)}
        return json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")

    @staticmethod
    def versions_now() -> dict[str, str]:
        import torch

        from savegame import __version__

        return {"savegame": __version__, "torch": torch.__version__, "python": platform.python_version()}

    # ---- decoding -------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, raw: bytes, path: str | os.PathLike[str]) -> Manifest:
        """Parse and validate; every problem is a typed error naming ``path``."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise errors.FormatError(f"{path}: manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit", path=path)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise errors.FormatError(
                f"{path}: manifest is not valid JSON ({exc}); the checkpoint is damaged — restore an earlier step",
                path=path,
            ) from exc
        if not isinstance(body, dict):
            raise errors.FormatError(f"{path}: manifest is not a JSON object", path=path)
        fmt, version = body.get("format"), body.get("version")
        if fmt != FORMAT_NAME:
            raise errors.UnsupportedFormatError(f"{path}: not a savegame manifest (format={fmt!r})", path=path)
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise errors.UnsupportedFormatError(
                f"{path}: savegame format version {version!r}, but this library reads versions 1..{VERSION}; "
                "upgrade savegame (pip install -U savegame)",
                path=path,
            )
        integrity = body.pop("integrity", None)
        if not isinstance(integrity, dict) or integrity.get("hash") != _self_hash(body):
            raise errors.IntegrityError(
                f"{path}: manifest self-hash does not match (edited or corrupted); restore an earlier step",
                path=path,
            )
        try:
            return cls._from_body(body, path)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, errors.CheckpointError):
                raise
            raise errors.FormatError(f"{path}: manifest is malformed ({type(exc).__name__}: {exc})", path=path) from exc

    @classmethod
    def _from_body(cls, body: dict[str, Any], path: str | os.PathLike[str]) -> Manifest:
        step = _nonneg_int(body["step"], "step", path)
        world = _nonneg_int(body["world_size"], "world_size", path)
        if world < 1:
            raise errors.FormatError(f"{path}: world_size must be >= 1", path=path)
        files: dict[str, FileEntry] = {}
        for name, f in body["files"].items():
            _check_name(name, path)
            files[name] = FileEntry(
                size=_nonneg_int(f["size"], "size", path),
                hash=str(f["hash"]),
                header_length=_nonneg_int(f["header_length"], "header_length", path),
                rank=_nonneg_int(f["rank"], "rank", path),
            )
            if files[name].header_length > files[name].size:  # read before any chunk bounds it
                raise errors.FormatError(
                    f"{path}: file {name!r} claims a {files[name].header_length}-byte header but is "
                    f"{files[name].size} bytes",
                    path=path,
                )
        entries: dict[str, TensorEntry] = {}
        for key, t in body["tensors"].items():
            dtype = str(t["dtype"])
            if dtype not in tensors.DTYPES:
                raise errors.FormatError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}", path=path, key=key)
            itemsize = tensors.DTYPES[dtype][1]
            shape = tuple(_nonneg_int(d, "shape", path) for d in t["shape"])
            chunks = []
            covered = 0
            for c in t["chunks"]:
                file = str(c["file"])
                if file not in files:
                    raise errors.FormatError(f"{path}: tensor {key!r} lives in unlisted file {file!r}", path=path, key=key)
                cshape = tuple(_nonneg_int(d, "shape", path) for d in c["shape"])
                start = tuple(_nonneg_int(d, "start", path) for d in c["start"])
                if len(cshape) != len(shape) or len(start) != len(shape) or any(
                    s + n > g for s, n, g in zip(start, cshape, shape, strict=True)
                ):
                    raise errors.FormatError(f"{path}: chunk of {key!r} lies outside the tensor", path=path, key=key)
                length = _nonneg_int(c["length"], "length", path)
                if length != math.prod(cshape) * itemsize:
                    raise errors.FormatError(
                        f"{path}: chunk of {key!r} claims {length} bytes but shape {list(cshape)} of {dtype} needs "
                        f"{math.prod(cshape) * itemsize}",
                        path=path,
                        key=key,
                    )
                offset = _nonneg_int(c["offset"], "offset", path)
                if offset + length > files[file].size or offset < files[file].header_length:
                    raise errors.FormatError(
                        f"{path}: chunk of {key!r} at bytes [{offset}, {offset + length}) lies outside the data of {file}",
                        path=path,
                        key=key,
                    )
                covered += math.prod(cshape)
                chunks.append(Chunk(file, offset, length, str(c["hash"]), start, cshape))
            if covered != math.prod(shape):
                raise errors.FormatError(
                    f"{path}: chunks of {key!r} cover {covered} of {math.prod(shape)} elements", path=path, key=key
                )
            entries[key] = TensorEntry(dtype, shape, tuple(chunks))
        trees = tuple(body["trees"])
        if len(trees) != world:
            raise errors.FormatError(f"{path}: {len(trees)} state trees for world size {world}", path=path)
        metrics = {str(k): _metric_value(v) for k, v in body.get("metrics", {}).items()}
        return cls(
            step=step,
            created=float(body["created"]),
            world_size=world,
            run_id=str(body["run_id"]),
            trees=trees,
            tensors=entries,
            files=files,
            metrics=metrics,
            info=dict(body.get("info", {})),
            versions={str(k): str(v) for k, v in body.get("versions", {}).items()},
        )


def _self_hash(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashing.digest(canonical.encode("utf-8"))


def _nonneg_int(v: Any, what: str, path: str | os.PathLike[str]) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise errors.FormatError(f"{path}: manifest field {what!r} must be a non-negative integer, got {v!r}", path=path)
    return v


def _check_name(name: str, path: str | os.PathLike[str]) -> None:
    # File names come from the manifest: never let them leave the checkpoint folder.
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise errors.FormatError(f"{path}: manifest lists an illegal file name {name!r}", path=path)


def _metric_json(v: float) -> float | str:
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        return repr(v)
    return v


def _metric_value(v: Any) -> float:
    return float(v)
