"""Read and verify checkpoints: manifests, tensors into destinations, full verification.

Invariant: no byte reaches the caller unverified. Each file's size and header hash are checked
before any of its chunks is trusted, and every chunk's hash is checked before its bytes are
used. Any mismatch is an :class:`IntegrityError` naming the file, tensor and step.

The promise of :func:`load_tensors` to live tensors is **per call, i.e. per checkpoint**: every
chunk it reads, of every file, is hashed and matched before the first byte is copied into any
``dest`` tensor (and, in a distributed restore, before every rank agreed in ``before_copy``).
Tensors without a destination get fresh memory, which nobody sees before the call returns, so
their bytes are read straight into it and hashed there.

Where the bytes wait between "read" and "verified" depends on the store:

- **A blob that maps** (a local file): the page cache. The file is mapped, hashed in place and
  copied from the mapping.
- **A blob that cannot map** (an object store, HTTP): parallel ranged reads
  (:mod:`savegame.engine.fetch`; :data:`REQUEST_BYTES` each, at most
  :data:`REQUESTS_IN_FLIGHT` at once; small neighbouring tensors share one request), each
  straight into where its bytes wait, hashed in file order while later requests are still in
  flight. Bytes for fresh tensors land in the tensors; bytes for live tensors are *staged*: in
  anonymous memory up to :func:`~savegame.engine.fetch.staging_budget` bytes per call
  (``SAVEGAME_STAGING_MEMORY``, default 1 GiB), beyond it in an unnamed temporary file in
  the OS temp folder (``TMPDIR``; freed when the call returns, or by the kernel if the process
  dies), mapped like a local file. So the extra memory of a restore from a URL is bounded by
  the budget plus the requests in flight, never the whole checkpoint again.
- A blob that changes while it is read (:class:`~savegame.storage.base.ChangedError`: its ETag
  moved) is started over once, from its manifest checks; a second change is a
  :class:`StorageError`. Versions are never mixed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from savegame import errors
from savegame.format import hashing, layout, manifest, tensors
from savegame.storage import Blob, Entry, Location, Store, as_store, locate
from savegame.storage.base import ChangedError, RangeNotSupportedError, check_key, join

#: Phase timings of every restore at DEBUG (benchmarks/bench_async.py --only prints them).
log = logging.getLogger("savegame.reader")

if TYPE_CHECKING:  # imported by the functions that use them: listing needs neither
    import torch

    from savegame.engine import fetch

__all__ = [
    "CheckpointRef",
    "damage",
    "file_key",
    "list_checkpoints",
    "load_tensors",
    "read_manifest",
    "resolve",
    "retired_key",
    "verify",
]


@dataclass(slots=True)
class CheckpointRef:
    """A step folder in a run, with its manifest if it parsed (``error`` says why not)."""

    step: int
    path: Path | Location  # a Path for local runs (what users and the CLI get), else the Location
    manifest: manifest.Manifest | None = None
    error: errors.CheckpointError | None = None
    problems: list[str] = field(default_factory=list)
    loc: Location | None = None

    @property
    def location(self) -> Location:
        return self.loc if self.loc is not None else locate(self.path)

    @property
    def valid(self) -> bool:
        return self.manifest is not None and self.error is None


def read_manifest(ckpt: str | os.PathLike[str] | Location) -> manifest.Manifest:
    """Parse and validate ``<ckpt>/manifest.json``.

    Raises:
        CheckpointNotFoundError: ``ckpt`` is not a folder.
        IncompleteCheckpointError: the folder has no manifest (an interrupted save).
        FormatError: the manifest is damaged, lies, or is of an unsupported version.
    """
    loc = locate(ckpt)
    store = loc.store
    mkey = loc.sub(layout.MANIFEST)
    mpath = store.describe(mkey)

    def not_a_folder() -> None:
        try:
            is_dir = store.is_dir(loc.key)
        except OSError as exc:
            raise errors.StorageError(f"could not read {loc}: {exc}", path=str(loc)) from exc
        if not is_dir:
            raise errors.CheckpointNotFoundError(
                f"{loc} is not a checkpoint folder (expected a folder like step-000000001200 holding manifest.json)",
                path=str(loc),
            )

    # A manifest seen before and unchanged since (the store's version token: a local file's
    # inode, size and times) is not read again: retention lists every kept checkpoint after
    # each save (300 kept: 300 opens, reads and digests, ~60 ms per save).
    version = store.version(mkey)
    if version is not None:
        with _parsed_lock:
            key = _versions.get((mpath, version, manifest.VERSION))
            m = _parsed.get(key) if key is not None else None
            if m is not None:
                _parsed.move_to_end(key)  # type: ignore[arg-type]
        if m is not None:
            return _check_step(loc, m)
    # The manifest is opened first: if it opens, its folder is one (on an object store that
    # saves a listing and a HEAD per call: two round trips of the four). Only a failure asks
    # whether the folder exists, to say which error it is.
    try:
        blob = store.open(mkey)
    except OSError:
        not_a_folder()
        blob = None
    try:
        if blob is None:
            blob = store.open(mkey)
        with blob:
            if blob.size > manifest.MAX_MANIFEST_BYTES:  # refuse before reading (and allocating) it
                raise errors.FormatError(
                    f"{mpath}: manifest is {blob.size} bytes, over the {manifest.MAX_MANIFEST_BYTES} limit; "
                    "the checkpoint is damaged — restore an earlier step",
                    path=mpath,
                )
            raw = blob.read(0, blob.size)
    except FileNotFoundError as exc:
        raise errors.IncompleteCheckpointError(
            f"{loc} has no manifest.json (interrupted save?); it was never committed — restore an earlier step",
            path=str(loc),
        ) from exc
    except (OSError, EOFError) as exc:
        raise errors.StorageError(f"could not read {mpath}: {exc}", path=mpath) from exc
    m = _parse(raw, mpath, version)
    return _check_step(loc, m)


def _check_step(loc: Location, m: manifest.Manifest) -> manifest.Manifest:
    step = layout.parse_step_dir(loc.name)
    if step is not None and step != m.step:
        raise errors.FormatError(
            f"{loc}: folder name says step {step} but the manifest says {m.step}",
            path=str(loc),
            step=step,
        )
    return m


#: Manifests parsed before, by (where, digest of the exact bytes): parsing and validating is a
#: pure function of the bytes, and committed manifests never change, but retention, listing and
#: restore read every kept one after each save (26 parses per save at Keep(last=8); 0.5 s each at
#: 10,000 tensors — docs/scale.md). The bytes are still read and hashed every time, so a file
#: replaced or edited on disk is parsed (and refused) anew; only successes are kept.
_parsed: OrderedDict[tuple[str, str, int], manifest.Manifest] = OrderedDict()
_PARSED_BYTES = (
    32 << 20
)  # raw manifest bytes the cache stands for, at most (parsed: several times that)
_parsed_sizes: dict[tuple[str, str, int], int] = {}
_parsed_lock = threading.Lock()
#: The same, found without reading: (where, the store's version token taken before the read,
#: the format version this reader accepts)
#: → the key in ``_parsed`` of what that read parsed. A file changed during the read has
#: another token when it is next looked at, so it is read again.
_versions: dict[tuple[str, Hashable, int], tuple[str, str, int]] = {}


def forget(ckpt: Location | Path) -> None:
    """Drop what the manifest cache holds of the checkpoint ``ckpt`` (retention deleted it): a
    run of weeks would otherwise keep every deleted checkpoint's parsed manifest until the
    cache's byte bound (tens of MB of parsed objects for a small state)."""
    where = str(ckpt).rstrip("/") + "/"
    with _parsed_lock:
        for key in [k for k in _parsed if k[0].startswith(where)]:
            del _parsed[key]
            del _parsed_sizes[key]
        for k in [k for k, v in _versions.items() if v[0].startswith(where)]:
            del _versions[k]


def _parse(raw: bytes, mpath: str, version: Hashable | None = None) -> manifest.Manifest:
    key = (mpath, hashing.digest(raw), manifest.VERSION)  # what this reader accepts, too
    with _parsed_lock:
        m = _parsed.get(key)
        if m is not None:
            _parsed.move_to_end(key)
    if m is None:
        m = manifest.Manifest.from_bytes(raw, mpath)
    with _parsed_lock:
        if key not in _parsed:
            _parsed[key] = m
            _parsed_sizes[key] = len(raw)
        while sum(_parsed_sizes.values()) > _PARSED_BYTES and len(_parsed) > 1:
            old, _ = _parsed.popitem(last=False)
            del _parsed_sizes[old]
        if version is not None:
            _versions[(mpath, version, manifest.VERSION)] = key
        if len(_versions) > 2 * len(_parsed) + 64:  # tokens of evicted or replaced manifests
            live = set(_parsed)
            for k in [k for k, v in _versions.items() if v not in live]:
                del _versions[k]
            if len(_versions) > 2 * len(_parsed) + 64:  # one file touched over and over
                _versions.clear()
    return m


def list_checkpoints(root: str | os.PathLike[str] | Store) -> list[CheckpointRef]:
    """Every ``step-*`` folder of a run (a folder or a store), oldest first, each with its
    parsed manifest or error.

    Only manifests are read (cheap); tensor data is checked by :func:`verify` / on load.
    """
    store = as_store(root)
    refs = []
    for entry in list_run_folder(store):
        step = layout.parse_step_dir(entry.name)
        if step is None or not entry.is_dir:
            continue
        loc = Location(store, entry.name)
        ref = CheckpointRef(step, store.local_path(entry.name) or loc, loc=loc)
        try:
            ref.manifest = read_manifest(loc)
        except errors.CheckpointError as exc:
            ref.error = exc
        refs.append(ref)
    refs.sort(key=lambda r: r.step)
    return refs


def list_run_folder(store: Store) -> list[Entry]:
    """The entries of a run folder, or a typed error: no folder, a file, or a storage failure."""
    try:
        return store.list("")
    except errors.CheckpointError:
        raise  # already typed and worded (a missing bucket says so)
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(
            f"run folder {store.describe()} does not exist", path=store.describe()
        ) from exc
    except NotADirectoryError as exc:
        raise errors.CheckpointNotFoundError(
            f"{store.describe()} is a file, not a run folder", path=store.describe()
        ) from exc
    except OSError as exc:
        raise errors.StorageError(
            f"could not list run folder {store.describe()}: {exc}", path=store.describe()
        ) from exc


def file_key(loc: Location, name: str) -> str:
    """The store key of file ``name`` of the checkpoint at ``loc``: a bare name lives in the
    checkpoint's own folder; a reference ``step-…/rank-….safetensors`` (format version 2,
    validated when the manifest was parsed) in an earlier checkpoint folder of the same run,
    i.e. beside ``loc``."""
    if not manifest.is_ref(name):
        return loc.sub(name)
    parent = loc.key.rsplit("/", 1)[0] if "/" in loc.key else ""
    return join(parent, check_key(name))


def _check_file(
    loc: Location, name: str, entry: manifest.FileEntry, m: manifest.Manifest, blob: Blob
) -> None:
    _check_size(loc, name, entry, m, blob)
    if manifest.is_ref(name):
        return  # see _check_header
    header = bytearray(entry.header_length)
    _read_into(blob, 0, memoryview(header), loc.store.describe(file_key(loc, name)))
    _check_header(loc, name, entry, m, header)


def _check_size(
    loc: Location, name: str, entry: manifest.FileEntry, m: manifest.Manifest, blob: Blob
) -> None:
    if blob.size != entry.size:
        path = _where(loc, name)
        raise errors.IntegrityError(
            f"{path}: file is {blob.size} bytes but the manifest says {entry.size} (truncated or replaced)",
            path=path,
            step=m.step,
        )


def _check_header(
    loc: Location, name: str, entry: manifest.FileEntry, m: manifest.Manifest, header: Any
) -> None:
    if manifest.is_ref(name):
        # A file shared with an earlier checkpoint also holds tensors this manifest does not
        # list (those that changed since), so its file hash cannot be recomputed from this
        # manifest. Nothing of its header is used: offsets come from this manifest, and every
        # chunk used is checked against its own hash, so every byte that reaches a tensor is
        # verified exactly as from a full checkpoint; the size is checked like any file's.
        return
    path = loc.store.describe(file_key(loc, name))
    # File order = offset order; an empty tensor shares its offset with the next one and comes
    # first (it was written first), hence length before hash in the key.
    digests = sorted(
        (c.offset, c.length, c.hash) for t in m.tensors.values() for c in t.chunks if c.file == name
    )
    if hashing.file_hash(header, [h for _, _, h in digests], path=path) != entry.hash:
        raise errors.IntegrityError(
            f"{path}: header or tensor list does not match its hash", path=path, step=m.step
        )


def retired_key(key: str) -> str | None:
    """Where the file at ``key`` (``…step-…/rank-….safetensors``) lives once its checkpoint
    folder was deleted while later checkpoints still used it (incremental saves: moved to
    ``retired-step-…-rank-….safetensors`` beside the folder), or None if it is no such file."""
    parent, _, rest = key.rpartition("/")
    parent, _, folder = parent.rpartition("/")
    ref = f"{folder}/{rest}"
    if manifest.ref_step(ref) is None:
        return None
    return join(parent, layout.retired_file(ref))


def resolve(loc: Location, name: str) -> str:
    """The store key to read for file ``name`` of the checkpoint at ``loc``: :func:`file_key`,
    or the retired copy of a shared file whose folder was deleted (:func:`retired_key`)."""
    key = file_key(loc, name)
    try:
        if loc.store.exists(key):
            return key
        alt = retired_key(key)
        if alt is not None and loc.store.exists(alt):
            return alt
    except OSError:
        pass
    return key


def _where(loc: Location, name: str) -> str:
    """The file an error about ``name`` names: for a shared file, the one actually read (its
    folder's, or the retired copy once that folder was deleted)."""
    return loc.store.describe(resolve(loc, name) if manifest.is_ref(name) else file_key(loc, name))


def _open(loc: Location, name: str, step: int, size: int | None = None) -> Blob:
    """Open file ``name``; ``size`` (the manifest's): an object store may open it without a
    request (``open_expecting``: the first read checks the size and pins the version)."""
    where = loc.store.describe(file_key(loc, name))
    expecting = getattr(loc.store, "open_expecting", None)
    try:
        try:
            if size is not None and expecting is not None and not manifest.is_ref(name):
                return expecting(file_key(loc, name), size)
            return loc.store.open(file_key(loc, name))
        except FileNotFoundError:
            # A shared file (or this checkpoint's own, while it is being deleted) whose folder
            # was deleted: it was moved aside first, so it is there (engine/shared.py).
            alt = retired_key(file_key(loc, name))
            if alt is None:
                raise
            return loc.store.open(alt)
    except FileNotFoundError as exc:
        shared = (
            f" (step {step} shares it with {manifest.ref_folder(name)} of its run: a checkpoint "
            "folder copied or moved without the folders it refers to is incomplete)"
            if manifest.is_ref(name)
            else ""
        )
        raise errors.IntegrityError(
            f"{where}: tensor file is missing{shared}", path=where, step=step
        ) from exc
    except OSError as exc:
        raise errors.StorageError(f"could not open {where}: {exc}", path=where, step=step) from exc


def _read_into(blob: Blob, offset: int, dest: memoryview, where: str) -> None:
    try:
        blob.readinto(offset, dest)
    except (ChangedError, errors.CheckpointError):
        raise  # a change: the caller starts the blob over (once); a typed error: as it is
    except EOFError as exc:
        raise errors.IntegrityError(f"{where}: file {exc} (truncated?)", path=where) from exc
    except RangeNotSupportedError as exc:
        raise _RangeIgnored(
            f"could not read {where}: {exc}; the server sends whole files only (it ignores "
            "HTTP Range, as `python -m http.server` does): pull the run or checkpoint to a "
            "folder first (`savegame pull URL DIR` restarts such files whole) or serve it with "
            "nginx",
            path=where,
        ) from exc
    except OSError as exc:
        raise errors.StorageError(f"could not read {where}: {exc}", path=where) from exc


class _RangeIgnored(errors.StorageError):
    """A read failed because the server ignores Range: nothing is known about the checkpoint's
    bytes, so :func:`verify` raises it instead of reporting the checkpoint damaged."""


# ---- reads from a blob that cannot map (object stores, HTTP): engine/fetch.py -------------

#: Bytes per ranged read from a blob that cannot map (a large chunk is split into several).
#: A restore cuts each contiguous run of needed bytes into the nearest whole number of
#: requests of this size, of equal size (0.75-1.5x this; one GET under 1.5x): S3 recommends
#: 8-16 MiB ranges (they fill a connection), and a small tail request would cost a round trip
#: (on moto, a whole-object copy) for a few bytes. ``verify`` never exceeds it (its memory bound).
REQUEST_BYTES = 16 << 20
#: Ranged reads in flight at once per file (threads; each waits on the network).
REQUESTS_IN_FLIGHT = 16


def _pull(
    blob: Blob,
    where: str,
    targets: Sequence[fetch.Target],
    bad: Callable[[fetch.Target], None],
    request: int,
    stretch: bool = False,
) -> None:
    """:func:`savegame.engine.fetch.pull` from ``blob`` with this module's knobs, read at call
    time, and its typed read errors (``stretch``: requests of 0.75-1.5 ``request`` bytes, of
    equal size, rather than at most ``request``: see :func:`savegame.engine.fetch._parts`)."""
    from savegame.engine import fetch  # only a store that cannot map loads the machinery

    fetch.pull(
        lambda offset, into: _read_into(blob, offset, into, where),
        targets,
        bad,
        request=request,
        in_flight=REQUESTS_IN_FLIGHT,
        stretch=stretch,
        sinks=bool(getattr(blob, "takes_sinks", False)),  # an object store's: no bounce buffers
    )


def _open_checked(
    loc: Location, name: str, m: manifest.Manifest, restarts: dict[str, int], header: bool = True
) -> Blob:
    """Open ``name`` and check its size and (``header``) its header; a change while doing so
    starts it over (counted in ``restarts``, shared with the data reads). Without ``header``
    (the data reads check it) a first open may send no request; a start-over asks the store."""
    while True:
        unseen = not header and not restarts.get(name)
        blob = _open(loc, name, m.step, m.files[name].size if unseen else None)
        try:
            if header:
                _check_file(loc, name, m.files[name], m, blob)
            else:
                _check_size(loc, name, m.files[name], m, blob)
            return blob
        except ChangedError as exc:
            blob.close()
            _restart(loc, name, m, restarts, exc)
        except BaseException:
            blob.close()
            raise


def _restart(
    loc: Location, name: str, m: manifest.Manifest, restarts: dict[str, int], exc: ChangedError
) -> None:
    """Count one start-over of ``name``; the second change is a StorageError."""
    restarts[name] = restarts.get(name, 0) + 1
    if restarts[name] > 1:
        where = loc.store.describe(file_key(loc, name))
        raise errors.StorageError(
            f"{where} changed twice while it was being read ({exc}); something is rewriting "
            f"step {m.step} — restore an earlier step, or stop the other writer",
            path=where,
            step=m.step,
        ) from exc


def _mismatch(loc: Location, fname: str, key: str, step: int) -> None:
    where = _where(loc, fname)
    raise errors.IntegrityError(
        f"{where}: tensor {key!r} does not match its hash (corrupted data) in step {step}",
        path=where,
        step=step,
        key=key,
    )


def _pull_unmapped(
    loc: Location,
    m: manifest.Manifest,
    unmapped: dict[str, Blob],
    restarts: dict[str, int],
    wanted: Sequence[str],
    needed: Callable[[str], list[manifest.Chunk]],
    fresh: Mapping[str, torch.Tensor],
    maps: dict[str, tuple[Any, memoryview, torch.Tensor]],
    spools: dict[str, Any],
) -> None:
    """Phase 1 for the files that cannot map: pull every needed chunk with parallel ranged
    reads — a fresh tensor's bytes straight into it, the rest into staging (memory up to
    :func:`~savegame.engine.fetch.staging_budget`, then temporary files) — hashing each as it
    arrives. Adds each
    file's staging to ``maps`` (the copy phase reads it like a mapped file), and each staged in
    a temporary file to ``spools`` (the copy phase releases its pages as it goes: see
    :func:`~savegame.engine.fetch.release`). ``unmapped`` holds the open, checked blobs; one
    that changes mid-read is replaced there and started over."""
    import torch

    from savegame.engine import fetch

    staging = fetch.Staging(fetch.staging_budget())
    by_file: dict[str, list[tuple[str, manifest.Chunk]]] = {n: [] for n in unmapped}
    for key in wanted:
        for c in needed(key):
            if c.file in by_file:
                by_file[c.file].append((key, c))
    ahead = getattr(loc.store, "read_ahead", lambda: None)()
    for name, chunks in by_file.items():
        if ahead is not None and _take_ahead(loc, m, name, chunks, ahead, fresh, maps):
            continue
        staged = sum(c.length for key, c in chunks if key not in fresh)
        base: memoryview | None = None
        spool = None
        if staged:
            mm = staging.new(m.files[name].size, staged)
            base = memoryview(mm)
            maps[name] = (mm, base, torch.frombuffer(mm, dtype=torch.uint8))
            spool = staging.spool(mm)
            if spool is not None:
                spools[name] = spool
        else:
            maps[name] = (None, memoryview(b""), torch.empty(0, dtype=torch.uint8))
        header = bytearray(m.files[name].header_length)
        targets = [fetch.Target(None, 0, len(header), None, own=memoryview(header))]
        for key, c in chunks:
            if key in fresh:
                own = tensors.byte_view(fresh[key])
                assert len(own) == c.length, (key, len(own), c.length)
                targets.append(fetch.Target(key, c.offset, c.length, c.hash, own=own))
            else:
                targets.append(
                    fetch.Target(key, c.offset, c.length, c.hash, base=base, spool=spool)
                )
        where = loc.store.describe(file_key(loc, name))

        def bad(t: fetch.Target, name: str = name) -> None:
            _mismatch(loc, name, t.ident, m.step)

        while True:
            try:
                _pull(unmapped[name], where, targets, bad, REQUEST_BYTES, stretch=True)
                break
            except ChangedError as exc:
                unmapped.pop(name).close()
                _restart(loc, name, m, restarts, exc)
                unmapped[name] = _open_checked(loc, name, m, restarts, header=False)
        _check_header(loc, name, m.files[name], m, header)  # before any of it is used


def _take_ahead(
    loc: Location,
    m: manifest.Manifest,
    name: str,
    chunks: Sequence[tuple[str, manifest.Chunk]],
    ahead: fetch.ReadAhead,
    fresh: Mapping[str, torch.Tensor],
    maps: dict[str, tuple[Any, memoryview, torch.Tensor]],
) -> bool:
    """Phase 1 for a file the store read ahead of its lease (engine/fetch.py, ``ReadAhead``):
    used only if the lease holder's listing shows the versions read and every chunk wanted
    here matched its hash then (``claim`` checks both); its header is checked as a pulled
    one's; fresh tensors get their bytes from it (the live ones in phase 2, as from a
    staging). False: pull the file as usual."""
    import numpy as np
    import torch

    if manifest.is_ref(name):
        return False
    mm = ahead.claim(file_key(loc, name), [(c.offset, c.length, c.hash) for _, c in chunks])
    if mm is None:
        return False
    view = memoryview(mm)
    maps[name] = (mm, view, torch.frombuffer(mm, dtype=torch.uint8))  # closed by the caller
    _check_header(loc, name, m.files[name], m, view[: m.files[name].header_length])
    src = np.frombuffer(mm, dtype=np.uint8)
    for key, c in chunks:
        if key in fresh:  # numpy's copy releases the GIL
            dst = np.frombuffer(tensors.byte_view(fresh[key]).cast("B"), dtype=np.uint8)
            np.copyto(dst, src[c.offset : c.offset + c.length])
    return True


def load_tensors(
    ckpt: str | os.PathLike[str] | Location,
    m: manifest.Manifest,
    keys: Iterable[str] | None = None,
    *,
    dest: Callable[[str, manifest.TensorEntry], torch.Tensor | None] | None = None,
    regions: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    before_copy: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``keys``) as CPU tensors, verifying every hash first: see
    :func:`_load_tensors`. A local file is read through a memory mapping under a read lease;
    when another process opens it for writing (a backup tool, an editor: most change
    nothing) or truncates it meanwhile, the lease breaks and the mapped read stops before
    anything reached a live tensor. The checkpoint is then read once more without mapping
    (positional reads, every hash checked), so an intact checkpoint is never skipped because
    something looked at it; a file that did change fails that read with a typed error."""
    ran = [False]

    def first_time() -> None:
        ran[0] = True
        if before_copy is not None:
            before_copy()

    try:
        return _load_tensors(
            ckpt, m, keys, dest=dest, regions=regions, before_copy=first_time, mapped=True
        )
    except errors._LeaseBroken as broken:
        try:
            return _load_tensors(
                ckpt, m, keys, dest=dest, regions=regions,
                before_copy=None if ran[0] else first_time, mapped=False,
            )  # fmt: skip
        except errors.CheckpointError as again:
            raise errors.StorageError(
                f"{broken} Read again without mapping it: {again}", path=broken.path, step=m.step
            ) from again


def _load_tensors(
    ckpt: str | os.PathLike[str] | Location,
    m: manifest.Manifest,
    keys: Iterable[str] | None = None,
    *,
    dest: Callable[[str, manifest.TensorEntry], torch.Tensor | None] | None = None,
    regions: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    before_copy: Callable[[], None] | None = None,
    mapped: bool = True,
) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``keys``) as CPU tensors, verifying every hash first.

    Two phases: every file is memory-mapped and every chunk's hash checked against the mapped
    bytes; only when all of them match are the bytes copied into their destinations. So a
    corrupt checkpoint never writes into ``dest`` tensors (live parameters stay untouched).
    Tensors without a destination are read straight into fresh memory and hashed there. For
    the others, mapping instead of ``read()`` avoids a copy through a bounce buffer: hashing
    1 GB from the page cache took 0.05 s mapped vs 0.6 s read into fresh memory on the CI
    machine (2026-11-23). The mappings are closed before returning, so no tensor keeps a
    checkpoint file (or its disk space) alive.

    A blob that cannot map (an object store) is pulled with parallel ranged reads instead and
    hashed as it arrives; what is bound for ``dest`` tensors waits in memory up to
    :func:`~savegame.engine.fetch.staging_budget`, then in a temporary file (the module
    docstring says how). The
    promise is the same: nothing reaches a ``dest`` tensor before every chunk of the call
    verified.

    Args:
        ckpt: The checkpoint folder.
        m: Its manifest (from :func:`read_manifest`).
        keys: Tensor keys to read; default all.
        dest: Optional ``(key, entry) -> tensor`` giving a contiguous CPU tensor of the right
            dtype and shape to fill (e.g. a live parameter), or None to allocate one.
        regions: key -> (start, shape): read only that box of the global tensor (a rank's
            shard when resharding); only the chunks overlapping it are read and verified, and
            the result has the region's shape (``dest`` may give a tensor of that shape).
        before_copy: Called once everything read is verified and before anything is copied
            into ``dest`` tensors; it may raise to stop (a distributed restore uses it to
            agree with the other ranks that every share verified).

    Raises:
        IntegrityError: a file is missing, has the wrong size, or a hash does not match.
        StorageError: a file could not be read, or changed twice while it was read.
    """
    import torch

    loc = locate(ckpt)
    wanted = list(m.tensors) if keys is None else list(keys)
    for key in wanted:
        if key not in m.tensors:
            raise errors.CheckpointNotFoundError(
                f"{loc}: no tensor {key!r} in step {m.step}", path=str(loc), key=key
            )
    regions = regions or {}

    def needed(key: str) -> list[manifest.Chunk]:
        chunks = m.tensors[key].chunks
        if key not in regions:
            return list(chunks)
        start, shape = regions[key]
        return [c for c in chunks if overlap(c.start, c.shape, start, shape) is not None]

    read_from = {c.file for key in wanted for c in needed(key)}
    if keys is None and not regions:
        # A whole checkpoint: every file of its own is checked, also one no tensor is read
        # from (an incremental save of an unchanged state writes a file that is only a header,
        # every tensor referring to an earlier file): its header is checked against its hash,
        # as verify does, so a restore accepts exactly the checkpoints verify passes.
        read_from |= {name for name in m.files if not manifest.is_ref(name)}
    files = sorted(read_from)
    maps: dict[str, tuple[Any, memoryview, torch.Tensor]] = {}
    blobs: dict[str, Blob] = {}
    unmapped: dict[str, Blob] = {}
    spools: dict[str, Any] = {}  # file -> its staging in a temporary file (pulled files only)
    guards: dict[str, Callable[[], None]] = {}  # mapped file -> its lease's check

    def guarded() -> None:
        """Every mapped file is still whole and unchanged (see ``blob.lease()``)."""
        for g in guards.values():
            g()

    def done(c: manifest.Chunk) -> None:
        """Chunk ``c`` is copied: its spooled staging pages leave this process's memory."""
        if c.file in spools:
            from savegame.engine import fetch

            fetch.release(spools[c.file], c.offset, c.length)

    try:
        # A whole tensor in one chunk with no destination gets fresh memory: its bytes are read
        # straight into it and hashed there (one kernel copy, page faults taken in the kernel)
        # instead of mapped, hashed and copied again. Nothing live is written before every
        # hash matched, so verify-before-apply holds. This is the common case of a resume in a
        # fresh process (optimizer moments): it took 1.17 s for a 1 GB state vs 0.82 s for
        # safetensors + first step, before (2026-11-23, bench_save_restore).
        fresh: dict[str, torch.Tensor] = {}
        # ``dest`` is asked once per key (here or in phase 2): at thousands of tensors each
        # call (a lookup and a fit check in the Checkpointer) was a measurable share.
        targets: dict[str, torch.Tensor | None] = {}

        def target_of(key: str, entry: manifest.TensorEntry) -> torch.Tensor | None:
            if key not in targets:
                targets[key] = dest(key, entry) if dest is not None else None
            return targets[key]

        for key in wanted:
            entry = m.tensors[key]
            if (
                key not in regions
                and len(entry.chunks) == 1
                and entry.chunks[0].shape == entry.shape
            ):
                if target_of(key, entry) is None:
                    fresh[key] = torch.empty(
                        entry.shape, dtype=tensors.dtype_from_name(entry.dtype)
                    )
        # Phase 1: map (or pull) and verify everything.
        began = time.perf_counter()
        restarts: dict[str, int] = {}
        for name in files:
            blob = _open_checked(loc, name, m, restarts, header=False)
            keep = False
            try:
                if not m.files[name].size:
                    maps[name] = (None, memoryview(b""), torch.empty(0, dtype=torch.uint8))
                    continue
                # A file is mapped only under a lease (storage/local.py): one truncated under
                # a live mapping would kill the process (SIGBUS) instead of raising.
                guard = blob.lease() if mapped else None
                mm = blob.map() if guard is not None else None
                if mm is None:
                    # an object store, or a file that cannot be guarded: parallel ranged reads,
                    # header included, below
                    unmapped[name] = blob
                    keep = True
                    continue
                guards[name] = guard  # type: ignore[assignment]
                keep = True  # closing the blob ends the lease: at the very end
                blobs[name] = blob
                try:
                    _check_header(loc, name, m.files[name], m, mm[: m.files[name].header_length])
                except BaseException:
                    if hasattr(mm, "close"):
                        mm.close()
                    raise
                # (direct reads of ``name`` use the same blob that was checked: not a replacement)
                maps[name] = (mm, memoryview(mm), torch.frombuffer(mm, dtype=torch.uint8))
            finally:
                if not keep:
                    blob.close()
        if unmapped:
            _pull_unmapped(loc, m, unmapped, restarts, wanted, needed, fresh, maps, spools)
        work = [
            (key, c)
            for key in wanted
            for c in needed(key)
            if c.file not in unmapped  # pulled files were hashed as they arrived
        ]
        work.sort(key=lambda w: (w[1].file, w[1].offset))
        threads = _hash_threads()
        runs = _runs(work, max(_RUN_BYTES, sum(c.length for _, c in work) // (threads * 16)))

        def check(run: Sequence[tuple[str, manifest.Chunk]]) -> int | None:
            """Hash a run of chunks (file order); the index of the first that does not match.
            The lease of a mapped file is checked before the run touches its pages."""
            leased = None
            for i, (key, c) in enumerate(run):
                if key in fresh:
                    view = tensors.byte_view(fresh[key])
                    _read_into(
                        blobs[c.file], c.offset, view, loc.store.describe(file_key(loc, c.file))
                    )
                else:
                    if c.file != leased:
                        guards[c.file]()
                        leased = c.file
                    view = maps[c.file][1][c.offset : c.offset + c.length]
                try:
                    if hashing.digest(view) != c.hash:
                        return i
                finally:
                    view.release()
            return None

        # xxhash releases the GIL: two threads hash two runs at once. A run is a task of the
        # pool rather than a chunk: one task per chunk cost ~90 us of pool overhead each, half
        # of a 1 GB restore in 4,000 tensors (2026-11-30).
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for run, bad in zip(runs, pool.map(check, runs), strict=True):
                if bad is not None:
                    key, c = run[bad]
                    _mismatch(loc, c.file, key, m.step)
        guarded()  # (also before the other ranks are told this one verified its share)
        if before_copy is not None:
            before_copy()
        guarded()
        # Phase 2: everything verified; copy into destinations (torch copies use all cores).
        verified = time.perf_counter()
        # The leases stay held to the end: a truncation asked for now waits until it is done.
        # Chunks bound for a contiguous region of a live CPU tensor are collected and copied
        # in one batch by ``memmove`` on every core (engine/staging.py, copy_choice("restore")
        # says why): on the 2-vCPU CI VM this copy was 2/3 of a warm restore, and torch's
        # ``copy_`` of the mapped bytes half as fast. A spooled (pulled) file's chunks are
        # copied one by one as before, so each one's pages are released right after it.
        out: dict[str, torch.Tensor] = {}
        # (file, offset, (dest address, source address, bytes)) of each batched chunk
        batch: list[tuple[str, int, tuple[int, int, int]]] = []
        # (dest bytes on a GPU, source address, bytes): through pinned buffers, all at once
        to_device: list[tuple[torch.Tensor, int, int]] = []
        bases = {name: (t.data_ptr(), t.numel()) for name, (_, _, t) in maps.items()}
        for key in wanted:
            entry = m.tensors[key]
            if key in regions:
                into = target_of(key, entry)
                out[key] = _read_region(entry, regions[key], needed(key), maps, into, done)
                continue
            if key in fresh:
                out[key] = fresh[key]
                continue
            target = target_of(key, entry)
            live = target is not None
            if target is None:
                target = torch.empty(entry.shape, dtype=tensors.dtype_from_name(entry.dtype))
            for c in entry.chunks:
                batched = live and c.file not in spools
                if batched and _copy_to_device_later(target, entry, c, bases[c.file], to_device):
                    continue
                if not (batched and _copy_later(target, entry, c, bases[c.file], batch)):
                    _copy_chunk(target, entry, c, maps[c.file][2][c.offset : c.offset + c.length])
                    done(c)
            out[key] = target
        if batch or to_device:
            from savegame.engine import staging

            if to_device:
                staging.copy_to_device(to_device)
            # Last hashed, first copied: the tail of phase 1 may still be in the CPU's cache.
            batch.sort(key=lambda b: (b[0], b[1]), reverse=True)
            staging.copy_choice("restore").copy_segments([seg for _, _, seg in batch])
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "restore of step %d: map and verify %.3f s (%d hash threads), copy %.3f s "
                "(%d chunks to a GPU, %d batched on the host)",
                m.step, verified - began, threads, time.perf_counter() - verified,
                len(to_device), len(batch),
            )  # fmt: skip
        return out
    finally:
        for mm, view, t in maps.values():  # unmapped before the leases end (closing the blobs)
            del t
            view.release()
            if mm is not None and hasattr(mm, "close"):
                try:
                    mm.close()
                except BufferError:  # a tensor view is still referenced; GC closes it
                    pass
        for blob in [*blobs.values(), *unmapped.values()]:
            blob.close()


def overlap(
    start_a: Sequence[int], shape_a: Sequence[int], start_b: Sequence[int], shape_b: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Intersection (global start, shape) of two boxes, or None if they do not overlap."""
    lo = tuple(max(a, b) for a, b in zip(start_a, start_b, strict=True))
    hi = tuple(
        min(a + n, b + k) for a, n, b, k in zip(start_a, shape_a, start_b, shape_b, strict=True)
    )
    if any(h <= a for a, h in zip(lo, hi, strict=True)):
        return None
    return lo, tuple(h - a for a, h in zip(lo, hi, strict=True))


def _read_region(
    entry: manifest.TensorEntry,
    region: tuple[tuple[int, ...], tuple[int, ...]],
    chunks: Sequence[manifest.Chunk],
    maps: Mapping[str, tuple[Any, memoryview, torch.Tensor]],
    into: torch.Tensor | None = None,
    done: Callable[[manifest.Chunk], None] | None = None,
) -> torch.Tensor:
    """The box ``region`` of a (possibly chunked) tensor, from verified mapped bytes
    (``done(chunk)`` is called once a chunk's bytes are copied)."""
    import torch

    start, shape = region
    dtype = tensors.dtype_from_name(entry.dtype)
    if into is not None and (
        tuple(into.shape) != tuple(shape) or into.dtype != dtype or into.device.type != "cpu"
    ):
        into = None
    target = torch.empty(shape, dtype=dtype) if into is None else into
    for c in chunks:
        box = overlap(c.start, c.shape, start, shape)
        if box is None:
            continue
        lo, size = box
        raw = maps[c.file][2][c.offset : c.offset + c.length]
        try:  # a typed view of the mapped bytes: one copy, of the overlap only
            piece = raw.view(dtype).reshape(c.shape)
        except RuntimeError:  # misaligned offset or a dtype without a byte view: copy it whole
            piece = torch.empty(c.shape, dtype=dtype)
            if piece.numel():
                _as_bytes(piece).copy_(raw)
        src, dst = piece, target
        for dim, (first, n) in enumerate(zip(lo, size, strict=True)):
            src = src.narrow(dim, first - c.start[dim], n)
            dst = dst.narrow(dim, first - start[dim], n)
        dst.copy_(src)
        if done is not None:
            done(c)
    return target


def _hash_threads() -> int:
    # Up to 8: a GPU machine's restore hashes gigabytes from the page cache before the copy
    # (4 left most of a 16-core H200 VM idle); 2 on the CI VM, as before. The cores this
    # process may run on (8 ranks of one 16-core node get 2 each under a launcher that pins).
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


#: Chunks are hashed in runs of at least this many bytes (a task of the hashing pool each).
_RUN_BYTES = 1 << 20


def _runs(
    work: Sequence[tuple[str, manifest.Chunk]], target: int
) -> list[list[tuple[str, manifest.Chunk]]]:
    """``work`` cut, in order, into runs of about ``target`` bytes (a larger chunk alone)."""
    runs: list[list[tuple[str, manifest.Chunk]]] = []
    run: list[tuple[str, manifest.Chunk]] = []
    size = 0
    for w in work:
        if run and size + w[1].length > target:
            runs.append(run)
            run, size = [], 0
        run.append(w)
        size += w[1].length
    if run:
        runs.append(run)
    return runs


def _region(target: torch.Tensor, entry: manifest.TensorEntry, c: manifest.Chunk) -> torch.Tensor:
    """The view of ``target`` (the whole tensor of ``entry``) that chunk ``c`` fills."""
    region = target
    if c.shape != entry.shape:
        for dim, (s, n) in enumerate(zip(c.start, c.shape, strict=True)):
            region = region.narrow(dim, s, n)
    return region


def _copy_later(
    target: torch.Tensor,
    entry: manifest.TensorEntry,
    c: manifest.Chunk,
    base: tuple[int, int],
    batch: list[tuple[str, int, tuple[int, int, int]]],
) -> bool:
    """Add chunk ``c``'s copy to ``batch`` as raw addresses (``base``: the address and length
    of the mapping its bytes are in, at ``c.offset``) if its region of ``target`` is one
    contiguous block of host memory of exactly ``c.length`` bytes; False: copy it otherwise."""
    address, length = base
    if c.offset + c.length > length:
        return False  # (never, for a checked file; the copy below then fails loudly)
    if target.device.type != "cpu" or target.is_conj() or target.is_neg():
        return False
    region = _region(target, entry, c)
    n = region.numel() * region.element_size()
    if n != c.length or not region.is_contiguous():
        return False
    if n:
        batch.append((c.file, c.offset, (region.data_ptr(), address + c.offset, n)))
    return True


def _copy_to_device_later(
    target: torch.Tensor,
    entry: manifest.TensorEntry,
    c: manifest.Chunk,
    base: tuple[int, int],
    copies: list[tuple[torch.Tensor, int, int]],
) -> bool:
    """Add chunk ``c``'s copy to ``copies`` (engine/staging.py ``copy_to_device``) if ``target``
    is a CUDA tensor whose region for ``c`` is one contiguous block of exactly ``c.length``
    bytes; False: copy it otherwise."""
    address, length = base
    if target.device.type != "cuda" or target.is_conj() or target.is_neg() or not gpu_direct():
        return False
    if c.offset + c.length > length:
        return False
    region = _region(target, entry, c)
    if region.numel() * region.element_size() != c.length or not region.is_contiguous():
        return False
    if c.length:
        copies.append((_as_bytes(region), address + c.offset, c.length))
    return True


def _copy_chunk(
    target: torch.Tensor, entry: manifest.TensorEntry, c: manifest.Chunk, src: torch.Tensor
) -> None:
    """Copy chunk ``c``'s verified bytes ``src`` into its region of ``target``."""
    import torch

    region = _region(target, entry, c)
    if region.numel() == 0:
        return
    if region.is_contiguous():
        _as_bytes(region).copy_(src)
    else:
        tmp = torch.empty(region.shape, dtype=region.dtype)
        _as_bytes(tmp).copy_(src)
        region.copy_(tmp)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    import torch

    flat = t.reshape(-1)
    if t.dtype in (torch.complex128, torch.complex64, torch.complex32):
        flat = torch.view_as_real(flat).reshape(-1)
    return flat.view(torch.uint8)


def verify(ckpt: str | os.PathLike[str] | Location, *, chunk_bytes: int = 64 << 20) -> list[str]:
    """Check everything about one checkpoint; returns problems (empty = valid).

    Reads every byte once with bounded memory (``chunk_bytes`` at a time; from a store that
    is not a local folder, with parallel ranged reads, at most ``REQUESTS_IN_FLIGHT + 4`` of
    ``min(chunk_bytes, REQUEST_BYTES)`` bytes held at once).
    """
    loc = locate(ckpt)
    try:
        m = read_manifest(loc)
    except errors.CheckpointError as exc:
        return [_problem(exc)]
    problems = []
    foreign = {n: why for n in m.files if (why := _foreign_ref(loc, n, m)) is not None}
    problems += foreign.values()
    if loc.store.local_path(loc.key) is None:  # a remote store: parallel ranged reads
        for name in m.files:
            if name not in foreign:
                problems += _verify_pulled(loc, name, m, chunk_bytes)
        return problems + _unlisted(loc, m)
    for name, fentry in m.files.items():
        if name in foreign:
            continue
        where = _where(loc, name)
        try:
            blob = _open(loc, name, m.step)
        except errors.CheckpointError as exc:
            problems.append(_problem(exc))
            continue
        try:
            _check_file(loc, name, fentry, m, blob)
            for key, t in m.tensors.items():
                for c in t.chunks:
                    if c.file != name:
                        continue
                    h = hashing.new()
                    buf = bytearray(min(chunk_bytes, max(c.length, 1)))
                    done = 0
                    while done < c.length:
                        n = min(len(buf), c.length - done)
                        view = memoryview(buf)[:n]
                        _read_into(blob, c.offset + done, view, where)
                        h.update(view)
                        done += n
                    if h.hexdigest() != c.hash:
                        problems.append(
                            f"{where}: tensor {key!r} does not match its hash (corrupted data)"
                        )
        except errors.CheckpointError as exc:
            problems.append(_problem(exc))
        finally:
            blob.close()
    return problems + _unlisted(loc, m)


def _foreign_ref(loc: Location, name: str, m: manifest.Manifest) -> str | None:
    """Why shared file ``name`` (a reference into an earlier folder of the run) is not this
    checkpoint's to read: the folder it names holds a checkpoint of another run (the checkpoint
    was copied into a run that has a folder of that step). None when it is, or cannot be told."""
    if not manifest.is_ref(name):
        return None
    folder = file_key(loc, name).rsplit("/", 1)[0]
    try:
        other = read_manifest(Location(loc.store, folder))
    except (errors.CheckpointError, OSError):
        return None  # deleted (the retired copy is read) or damaged: checked as before
    if other.run_id == m.run_id:
        return None
    return (
        f"{_where(loc, name)}: step {m.step} shares this file with {manifest.ref_folder(name)} of "
        f"its run ({errors.quoted(m.run_id)}), but {manifest.ref_folder(name)} here is a "
        f"checkpoint of another run ({errors.quoted(other.run_id)}): the checkpoint was copied without its run. Copy a checkpoint "
        "with the files it shares by `savegame push` (docs/incremental.md)"
    )


def _unlisted(loc: Location, m: manifest.Manifest) -> list[str]:
    """Files in the checkpoint folder that its manifest does not list."""
    listed = set(m.files) | {layout.MANIFEST}
    try:
        names = sorted(e.name for e in loc.store.list(loc.key))
    except OSError as exc:
        return [f"could not list {loc}: {exc}"]
    out = []
    for extra in names:
        if extra in listed:
            continue
        try:
            where = loc.store.describe(loc.sub(extra))
        except ValueError:  # a name no key can hold (``..``, a backslash): shown as text
            where = f"{loc} entry {extra!r}"
        out.append(f"{where}: file not listed in the manifest")
    return out


def _verify_pulled(loc: Location, name: str, m: manifest.Manifest, chunk_bytes: int) -> list[str]:
    """:func:`verify` of one file of a store without local paths: parallel ranged reads of
    at most ``min(chunk_bytes, REQUEST_BYTES)`` bytes, hashed in order as they arrive (memory:
    the requests in flight); a file that changes mid-read is started over once."""
    from savegame.engine import fetch

    where = _where(loc, name)
    header = bytearray(m.files[name].header_length)
    targets = [fetch.Target(None, 0, len(header), None, own=memoryview(header))]
    targets += [
        fetch.Target(key, c.offset, c.length, c.hash)
        for key, t in m.tensors.items()
        for c in t.chunks
        if c.file == name
    ]
    problems: list[str] = []

    def bad(t: fetch.Target) -> None:
        problems.append(f"{where}: tensor {t.ident!r} does not match its hash (corrupted data)")

    restarts: dict[str, int] = {}
    try:
        while True:
            problems.clear()
            blob = _open_checked(loc, name, m, restarts, header=False)
            try:
                _pull(blob, where, targets, bad, max(1, min(chunk_bytes, REQUEST_BYTES)))
                _check_header(loc, name, m.files[name], m, header)
                return problems
            except ChangedError as exc:
                _restart(loc, name, m, restarts, exc)
            finally:
                blob.close()
    except _RangeIgnored:
        raise  # the server, not the checkpoint: an error reaching it (exit 2), not damage
    except errors.CheckpointError as exc:
        return [*problems, _problem(exc)]


#: Inside :func:`damage`: a read that fails (StorageError) raises instead of being a problem.
_proving: ContextVar[bool] = ContextVar("savegame_proving_damage", default=False)


def _problem(exc: errors.CheckpointError) -> str:
    """What :func:`verify` reports for ``exc`` — or, inside :func:`damage`, a read that failed
    is re-raised: it says nothing about the bytes, and damage is what gets a checkpoint set
    aside or replaced."""
    if _proving.get() and isinstance(exc, errors.StorageError):
        raise exc
    return str(exc)


def damage(ckpt: str | os.PathLike[str] | Location) -> list[str]:
    """What is proven wrong with a checkpoint folder (empty: intact, or not readable now),
    reading every byte like :func:`verify` — except that a checkpoint of a newer format
    version is not damage (it is refused elsewhere, never set aside or replaced), and neither
    is a read that fails (EIO, a 503 after the store's retries): only what was read and found
    wrong is."""
    token = _proving.set(True)
    try:
        try:
            read_manifest(ckpt)
        except (errors.UnsupportedFormatError, errors.StorageError):
            return []
        except errors.CheckpointError as exc:
            return [str(exc)]
        return verify(ckpt)
    except errors.StorageError:
        return []
    finally:
        _proving.reset(token)


def gpu_direct() -> bool:
    """Whether a restore reads verified bytes straight into live CUDA tensors, through pinned
    bounce buffers (engine/staging.py ``copy_to_device``), instead of into host memory that
    ``load_state_dict`` then copies to the GPU. Off until it has run on a GPU (issue 15: the
    session that wrote it had no device time left): ``SAVEGAME_GPU_DIRECT_RESTORE=1`` turns it
    on, and tests/gpu/test_gpu_restore.py checks it bit for bit."""
    return os.environ.get("SAVEGAME_GPU_DIRECT_RESTORE") == "1"


def fits(t: torch.Tensor, entry: manifest.TensorEntry) -> bool:
    """Whether ``t`` can be a ``dest`` of :func:`load_tensors` for ``entry``: read straight into
    (contiguous CPU memory — or CUDA memory with :func:`gpu_direct` — of the stored dtype and
    shape, outside autograd)."""
    from torch.nn.parameter import UninitializedTensorMixin

    if isinstance(t, UninitializedTensorMixin):  # a lazy module's, built by load_state_dict
        return False
    return (
        (t.device.type == "cpu" or (t.device.type == "cuda" and gpu_direct()))
        and t.is_contiguous()
        and tuple(t.shape) == tuple(entry.shape)
        and str(t.dtype).removeprefix("torch.") == entry.dtype
        and not t.requires_grad
    )


def is_checkpoint_dir(path: str | os.PathLike[str] | Location) -> bool:
    loc = locate(path)
    key = loc.sub(layout.MANIFEST)
    try:
        return loc.store.exists(key) and not loc.store.is_dir(key)
    except OSError:
        return False


def total_bytes(m: manifest.Manifest) -> int:
    return sum(f.size for f in m.files.values())
