"""The manifest: the one file that makes a checkpoint exist.

Invariant: the manifest is written last and is the commit point. A checkpoint exists iff its
``manifest.json`` parses, validates against this module (and ``manifest.schema.json``), and its
self-hash matches. Every tensor chunk and every file it lists carries a size and a hash, so any
later damage to any byte is detected by :mod:`savegame.engine.reader`.

The self-hash (``integrity.hash``) is xxh3-128 over the canonical JSON of the manifest without
its ``integrity`` field (sorted keys, no spaces, UTF-8), so a hand-edited or bit-flipped
manifest that still parses is refused too.

Parsing is total: whatever the bytes, :meth:`Manifest.from_bytes` returns a valid manifest or
raises a :class:`~savegame.errors.FormatError` (or subclass) with ``.path`` set (and ``.step``
once the step is known). Only strict JSON is accepted: no ``NaN``/``Infinity`` tokens, no number
that overflows a double, no integer beyond ±2**64, no duplicate object keys, no lone surrogates.
Non-finite metrics are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and non-finite
tree values as ``{"$float": ...}`` (docs/format.md), so the writer never needs those tokens.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame import errors
from savegame.format import hashing, tensors
from savegame.format.skeleton import check as skeleton_check

FORMAT_NAME = "savegame"
#: The newest format version this library reads. Version 1: every file a manifest lists lives in
#: its own folder. Version 2 (incremental checkpoints, docs/incremental.md): a file may be a
#: reference ``step-…/rank-NNNNN.safetensors`` to an earlier checkpoint folder of the same run.
#: The writer writes 2 only for a manifest with references, so readers of version 1 refuse
#: exactly those (UnsupportedFormatError: they fall back to an earlier checkpoint) and keep
#: reading every full checkpoint.
VERSION = 2
#: The version of a manifest without references (what every full checkpoint is written as).
VERSION_FULL = 1
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_INT = 2**64  # no JSON integer in a manifest is larger (bigger tree ints are {"$int": "..."})
MAX_OFFSET = 2**63 - 1  # sizes, offsets, lengths and dims: what an off_t / torch size can hold
MAX_NDIM = 64
MAX_CREATED = 253402300799  # 9999-12-31T23:59:59Z: the last time datetime (and `savegame ls`) can show
_HASH = re.compile(r"[0-9a-f]{32}")
#: A reference to an earlier checkpoint's tensor file: exactly ``step-<12 digits>/rank-<5
#: digits>[-<3 digits>].safetensors`` (relative to the run folder; no other shape is accepted,
#: so a name from a file can never leave the run folder).
_REF = re.compile(r"step-([0-9]{12})/rank-[0-9]{5}(?:-[0-9]{3})?\.safetensors")


def is_ref(name: str) -> bool:
    """Whether a manifest file name refers to an earlier checkpoint folder of the run (the
    name was validated when the manifest was parsed)."""
    return "/" in name


def ref_step(name: str) -> int | None:
    """The step whose folder a reference name points into, or None if ``name`` is not one."""
    m = _REF.fullmatch(name)
    return int(m.group(1)) if m else None


def ref_folder(name: str) -> str:
    """The checkpoint folder (``step-…``) a reference name points into."""
    return name.split("/", 1)[0]

__all__ = [
    "Chunk",
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "FORMAT_NAME",
    "VERSION",
    "is_ref",
    "ref_folder",
    "ref_step",
]


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

    # ---- shared bytes (incremental checkpoints) -------------------------------------------
    @property
    def refs(self) -> dict[str, FileEntry]:
        """The files this checkpoint refers to in earlier checkpoint folders (name -> entry)."""
        return {n: f for n, f in self.files.items() if is_ref(n)}

    @property
    def own_files(self) -> dict[str, FileEntry]:
        """The files in this checkpoint's own folder."""
        return {n: f for n, f in self.files.items() if not is_ref(n)}

    # ---- encoding -------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": VERSION if any(is_ref(n) for n in self.files) else VERSION_FULL,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "run_id": self.run_id,
            "metrics": {k: _metric_json(k, v) for k, v in self.metrics.items()},
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
        try:
            body["integrity"] = {"algorithm": hashing.ALGORITHM, "hash": _self_hash(body)}
            return json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (ValueError, TypeError, RecursionError) as exc:  # e.g. a non-finite `created`
            raise errors.EncodeError(
                f"step {self.step}: the manifest cannot be written as strict JSON ({exc})", step=self.step
            ) from exc

    @staticmethod
    def versions_now() -> dict[str, str]:
        import torch

        from savegame import __version__

        return {"savegame": __version__, "torch": torch.__version__, "python": platform.python_version()}

    # ---- decoding -------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, raw: bytes, path: str | os.PathLike[str]) -> Manifest:
        """Parse and validate; every problem is a typed error naming ``path``.

        Raises:
            FormatError: not strict JSON, a field of the wrong type or out of range, a tree
                that does not decode (``.key`` names its tree path), a lie about sizes.
            IntegrityError: the self-hash does not match (edited or corrupted).
            UnsupportedFormatError: not a savegame manifest, or a newer format version.
        """
        if len(raw) > MAX_MANIFEST_BYTES:
            raise errors.FormatError(f"{path}: manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit", path=path)
        body = _parse_json(raw, path)
        if not isinstance(body, dict):
            raise errors.FormatError(f"{path}: manifest is not a JSON object", path=path)
        fmt, version = body.get("format"), body.get("version")
        if fmt != FORMAT_NAME:
            raise errors.UnsupportedFormatError(f"{path}: not a savegame manifest (format={_short(fmt)})", path=path)
        if type(version) is not int or version > VERSION or version < 1:
            raise errors.UnsupportedFormatError(
                f"{path}: savegame format version {_short(version)}, but this library reads versions 1..{VERSION}; "
                "upgrade savegame (pip install -U savegame)",
                path=path,
            )
        step = body.get("step")
        step = step if type(step) is int and 0 <= step <= MAX_OFFSET else None
        integrity = body.pop("integrity", None)
        if (
            not isinstance(integrity, dict)
            or integrity.get("algorithm", hashing.ALGORITHM) != hashing.ALGORITHM
            or integrity.get("hash") != _self_hash(body, path)
        ):
            raise errors.IntegrityError(
                f"{path}: manifest self-hash does not match (edited or corrupted); restore an earlier step",
                path=path,
                step=step,
            )
        try:
            return cls._from_body(body, _Check(path, step))
        except errors.CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
            # Defence in depth: every field is type-checked below, so this is a bug in the checks.
            raise errors.FormatError(
                f"{path}: manifest is malformed ({type(exc).__name__}: {exc})", path=path, step=step
            ) from exc

    @classmethod
    def _from_body(cls, body: dict[str, Any], c: _Check) -> Manifest:
        step = c.count(c.field(body, "step"), "step")
        world = c.count(c.field(body, "world_size"), "world_size")
        if world < 1:
            raise c.error("world_size must be >= 1")
        if c.field(body, "hash_algorithm") != hashing.ALGORITHM:
            raise errors.UnsupportedFormatError(
                f"{c.path}: hash algorithm {_short(body['hash_algorithm'])} is not {hashing.ALGORITHM}; "
                "upgrade savegame",
                path=c.path,
                step=c.step,
            )
        created = c.field(body, "created")
        if type(created) not in (int, float) or not 0 <= created <= MAX_CREATED:
            raise c.error(
                f"manifest field 'created' must be seconds since 1970 before the year 10000, got {_short(created)}"
            )
        run_id = c.field(body, "run_id")
        if type(run_id) is not str or not run_id:
            raise c.error(f"manifest field 'run_id' must be a non-empty string, got {_short(run_id)}")
        files: dict[str, FileEntry] = {}
        version = body["version"]
        for name, f in c.obj(c.field(body, "files"), "files").items():
            if type(name) is str and "/" in name and version >= 2:
                _check_ref(name, step, c)
            else:
                _check_name(name, c.path)
            f = c.obj(f, f"files[{name!r}]")
            files[name] = FileEntry(
                size=c.count(c.field(f, "size"), "size"),
                hash=c.hash(c.field(f, "hash"), f"files[{name!r}].hash"),
                header_length=c.count(c.field(f, "header_length"), "header_length"),
                rank=c.count(c.field(f, "rank"), "rank"),
            )
            if files[name].header_length > files[name].size:  # read before any chunk bounds it
                raise c.error(
                    f"file {name!r} claims a {files[name].header_length}-byte header but is {files[name].size} bytes"
                )
            if files[name].rank >= world:
                raise c.error(f"file {name!r} belongs to rank {files[name].rank} of a world of {world}")
        if version >= 2 and not any(is_ref(n) for n in files):
            # The writer writes version 2 exactly when a file is shared (so that readers of
            # version 1 refuse only those); anything else is an edited manifest.
            raise c.error("a version 2 manifest must refer to a file of an earlier checkpoint")
        entries: dict[str, TensorEntry] = {}
        for key, t in c.obj(c.field(body, "tensors"), "tensors").items():
            entries[key] = _tensor_entry(key, c.obj(t, f"tensors[{key!r}]"), files, c)
        trees = c.field(body, "trees")
        if type(trees) is not list:
            raise c.error(f"manifest field 'trees' must be a list, got {type(trees).__name__}")
        if len(trees) != world:
            raise c.error(f"{len(trees)} state trees for world size {world}")
        dtypes = {k: e.dtype for k, e in entries.items()}  # once: per rank it was O(ranks^2)
        for rank, skeleton in enumerate(trees):
            try:
                skeleton_check(skeleton, dtypes, path=c.path)
            except errors.FormatError as exc:
                exc.step = c.step
                raise
            if type(skeleton) is not dict:
                raise c.error(f"state tree of rank {rank} is {type(skeleton).__name__}, not an object")
        metrics = {}
        for k, v in c.obj(body.get("metrics", {}), "metrics").items():
            metrics[k] = _metric_value(v, k, c)
        info = c.obj(body.get("info", {}), "info")
        _check_info(info, c)
        versions = c.obj(body.get("versions", {}), "versions")
        for k, v in versions.items():
            if type(v) is not str:
                raise c.error(f"manifest field versions[{k!r}] must be a string, got {_short(v)}")
        return cls(
            step=step,
            created=float(created),
            world_size=world,
            run_id=run_id,
            trees=tuple(trees),
            tensors=entries,
            files=files,
            metrics=metrics,
            info=dict(info),
            versions=dict(versions),
        )


class _Check:
    """Typed field checks; every failure is a FormatError with the manifest path and step."""

    def __init__(self, path: str | os.PathLike[str], step: int | None) -> None:
        self.path = path
        self.step = step

    def error(self, what: str, key: str | None = None) -> errors.FormatError:
        return errors.FormatError(
            f"{self.path}: {what}; the manifest is damaged or edited — restore an earlier step",
            path=self.path,
            step=self.step,
            key=key,
        )

    def field(self, obj: dict[str, Any], name: str) -> Any:
        if name not in obj:
            raise self.error(f"manifest field {name!r} is missing")
        return obj[name]

    def obj(self, v: Any, what: str) -> dict[str, Any]:
        if type(v) is not dict:
            raise self.error(f"manifest field {what} must be an object, got {type(v).__name__}")
        return v

    def count(self, v: Any, what: str, key: str | None = None) -> int:
        if type(v) is not int or not 0 <= v <= MAX_OFFSET:
            raise self.error(f"manifest field {what!r} must be an integer in [0, 2**63), got {_short(v)}", key)
        return v

    def hash(self, v: Any, what: str, key: str | None = None) -> str:
        if type(v) is not str or not _HASH.fullmatch(v):
            raise self.error(f"manifest field {what} must be 32 lowercase hex digits (xxh3-128), got {_short(v)}", key)
        return v

    def dims(self, v: Any, what: str, key: str) -> tuple[int, ...]:
        if type(v) is not list or len(v) > MAX_NDIM:
            raise self.error(f"{what} of tensor {key!r} must be a list of at most {MAX_NDIM} integers", key)
        dims = tuple(self.count(d, what, key) for d in v)
        # torch multiplies the sizes before it looks for a zero: [2**40, 2**40, 0] overflows.
        if math.prod(d for d in dims if d) * 16 > MAX_OFFSET:
            raise self.error(f"{what} {list(dims)} of tensor {key!r} is larger than any tensor can be", key)
        return dims


def _tensor_entry(key: str, t: dict[str, Any], files: Mapping[str, FileEntry], c: _Check) -> TensorEntry:
    dtype = c.field(t, "dtype")
    if type(dtype) is not str or dtype not in tensors.DTYPES:
        raise c.error(f"tensor {key!r} has unknown dtype {_short(dtype)}", key)
    itemsize = tensors.DTYPES[dtype][1]
    shape = c.dims(c.field(t, "shape"), "shape", key)
    raw_chunks = c.field(t, "chunks")
    if type(raw_chunks) is not list:
        raise c.error(f"chunks of tensor {key!r} must be a list", key)
    chunks = []
    covered = 0
    for ch in raw_chunks:
        ch = c.obj(ch, f"chunk of {key!r}")
        file = c.field(ch, "file")
        if type(file) is not str or file not in files:
            raise c.error(f"tensor {key!r} lives in unlisted file {_short(file)}", key)
        cshape = c.dims(c.field(ch, "shape"), "chunk shape", key)
        start = c.dims(c.field(ch, "start"), "chunk start", key)
        if len(cshape) != len(shape) or len(start) != len(shape) or any(
            s + n > g for s, n, g in zip(start, cshape, shape, strict=True)
        ):
            raise c.error(f"chunk of {key!r} lies outside the tensor", key)
        length = c.count(c.field(ch, "length"), "length", key)
        if length != math.prod(cshape) * itemsize:
            raise c.error(
                f"chunk of {key!r} claims {length} bytes but shape {list(cshape)} of {dtype} needs "
                f"{math.prod(cshape) * itemsize}",
                key,
            )
        offset = c.count(c.field(ch, "offset"), "offset", key)
        if offset + length > files[file].size or offset < files[file].header_length:
            raise c.error(f"chunk of {key!r} at bytes [{offset}, {offset + length}) lies outside the data of {file}", key)
        covered += math.prod(cshape)
        chunks.append(Chunk(file, offset, length, c.hash(c.field(ch, "hash"), f"hash of {key!r}", key), start, cshape))
    if covered != math.prod(shape):
        raise c.error(f"chunks of {key!r} cover {covered} of {math.prod(shape)} elements", key)
    if len(chunks) > 1:
        _check_disjoint(key, chunks, c)
    return TensorEntry(dtype, shape, tuple(chunks))


def _check_disjoint(key: str, chunks: list[Chunk], c: _Check) -> None:
    """Chunks must not overlap: with the element count equal, that means they tile the tensor
    (overlapping chunks would leave a hole of uninitialised memory). A sweep along the
    dimension with the most distinct starts — the sharded one, rows or columns — keeps this
    near-linear (on dim 0 alone, column shards all start at row 0: O(ranks^2), 22 s per tensor at
    4,096 ranks; docs/scale.md)."""
    live = [(ch.start, ch.shape) for ch in chunks if math.prod(ch.shape)]
    if not live:
        return
    ndim = len(live[0][0])
    if ndim == 0:
        if len(live) > 1:
            raise c.error(f"chunks of {key!r} overlap (a 0-d tensor has one chunk)", key)
        return
    d = max(range(ndim), key=lambda i: len({start[i] for start, _ in live}))
    boxes = sorted(live, key=lambda b: (b[0][d], b[0]))
    for i, (a_start, a_shape) in enumerate(boxes):
        for b_start, b_shape in boxes[i + 1 :]:
            if b_start[d] >= a_start[d] + a_shape[d]:
                break
            if all(
                max(sa, sb) < min(sa + na, sb + nb)
                for sa, na, sb, nb in zip(a_start, a_shape, b_start, b_shape, strict=True)
            ):
                raise c.error(f"chunks of {key!r} overlap at {list(a_start)} and {list(b_start)}", key)


def _check_info(info: dict[str, Any], c: _Check) -> None:
    # Fields the library reads back; anything else in info is free-form JSON.
    for name in ("index", "epochs_completed"):
        if name in info:
            c.count(info[name], f"info.{name}")
    if "reason" in info and type(info["reason"]) is not str:
        raise c.error(f"manifest field info.reason must be a string, got {_short(info['reason'])}")
    dist = info.get("distributed")
    if dist is not None:
        dist = c.obj(dist, "info.distributed")
        for name in ("replicated", "extras"):
            names = dist.get(name, [])
            if type(names) is not list or not all(type(n) is str for n in names):
                raise c.error(f"manifest field info.distributed.{name} must be a list of strings")


def _parse_json(raw: bytes, path: str | os.PathLike[str]) -> Any:
    """Strict JSON: what ``json.dumps(allow_nan=False)`` can write, and nothing else."""

    def bad(what: str) -> errors.FormatError:
        return errors.FormatError(
            f"{path}: manifest is not strict JSON ({what}); the checkpoint is damaged — restore an earlier step",
            path=path,
        )

    def constant(token: str) -> float:
        raise bad(f"{token} is not a JSON number")

    def number(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise bad(f"{text[:40]} overflows a double")
        return v

    def integer(text: str) -> int:
        if len(text) > 21 or abs(v := int(text)) > MAX_INT:
            raise bad(f"integer {text[:40]}{'...' if len(text) > 40 else ''} is beyond ±2**64")
        return v

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            dup = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise bad(f"duplicate key {dup[:60]!r}")
        return out

    try:
        return json.loads(raw, parse_constant=constant, parse_float=number, parse_int=integer, object_pairs_hook=pairs)
    except errors.FormatError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError, TypeError) as exc:
        raise errors.FormatError(
            f"{path}: manifest is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); the checkpoint is "
            "damaged — restore an earlier step",
            path=path,
        ) from exc


def _self_hash(body: dict[str, Any], path: str | os.PathLike[str] | None = None) -> str:
    try:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return hashing.digest(canonical.encode("utf-8"))
    except (ValueError, TypeError, RecursionError) as exc:
        # Lone surrogates (not UTF-8), nesting too deep to serialise, or a non-finite float
        # from a caller's body: none of it can match a hash the writer computed.
        if path is None:
            raise
        raise errors.FormatError(
            f"{path}: manifest cannot be canonicalised ({type(exc).__name__}: {str(exc)[:200]}); "
            "the checkpoint is damaged — restore an earlier step",
            path=path,
        ) from exc


def _nonneg_int(v: Any, what: str, path: str | os.PathLike[str]) -> int:
    return _Check(path, None).count(v, what)


def _check_name(name: str, path: str | os.PathLike[str]) -> None:
    # File names come from the manifest: never let them leave the checkpoint folder, and never
    # hand the OS a name it refuses (NUL) or one that prints as something else.
    if (
        not name
        or len(name) > 255
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or name.startswith(".")
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    ):
        raise errors.FormatError(f"{path}: manifest lists an illegal file name {_short(name)}", path=path)


def _check_ref(name: str, step: int, c: _Check) -> None:
    # A reference comes from a file: hostile input. Only the exact shape of a tensor file in
    # an older step folder of the same run is accepted (no "..", no absolute path, no other
    # folder, never this step or a newer one: references only point back, so they form no
    # cycle and an older reader's fallback order stays meaningful).
    ref = ref_step(name)
    if ref is None:
        raise c.error(
            f"manifest refers to {_short(name)}, which is not a tensor file of an earlier checkpoint "
            "(expected step-<12 digits>/rank-<5 digits>.safetensors)"
        )
    if ref >= step:
        raise c.error(f"manifest refers to {_short(name)}, which is not older than step {step}")


def _metric_json(name: str, v: Any) -> float | str:
    """A metric as strict JSON: finite floats as numbers, nan/inf/-inf as those strings."""
    try:
        v = float(v)
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.EncodeError(
            f"metric {name!r} is {_short(v)}, which is not a number; pass a float", key=name
        ) from exc
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _metric_value(v: Any, name: str, c: _Check) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)  # |v| <= 2**64 (the parser), so this cannot overflow
    if type(v) is str and v in _NONFINITE:
        return _NONFINITE[v]
    raise c.error(f"metric {name!r} is {_short(v)}, not a number or 'nan'/'inf'/'-inf'", name)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
