"""Write one checkpoint folder with the commit protocol (DESIGN.md §3).

Order, and why: (1) every rank writes its tensor file into ``<run>/.tmp-step-…-<id>/`` and
fsyncs it; (2) the coordinator writes ``manifest.json`` last and fsyncs it and the temp folder;
(3) the temp folder is renamed to ``step-…`` and the run folder fsynced. A crash before (3)
leaves only a ``.tmp-`` folder, which no reader lists; after (3) the checkpoint is complete.
The manifest is the commit point; ``LATEST`` is written afterwards as a hint only.

The steps above are the local store's; how a checkpoint is made to appear at once belongs to
the store (:class:`savegame.storage.Staging`): this module decides *what* is written and in
which order, the store *how*. Every function takes a run folder path or a
:class:`~savegame.storage.Store`.

Single process = world size 1 through the same functions :func:`write_rank_files` (every rank)
and :func:`commit` (coordinator only).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from savegame import errors
from savegame.format import hashing, layout, manifest, tensors
from savegame.storage import Location, Staging, Store, as_store, locate

__all__ = [
    "Previous",
    "RankResult",
    "begin",
    "commit",
    "find_previous",
    "join",
    "new_tmp_dir",
    "set_aside_damaged",
    "write_checkpoint",
    "write_rank_files",
]

Where = str | os.PathLike[str] | Store

log = logging.getLogger("savegame")


@dataclass(frozen=True, slots=True)
class RankResult:
    """What one rank wrote: returned by :func:`write_rank_files`, gathered by the coordinator."""

    rank: int
    files: dict[str, manifest.FileEntry]
    tensors: dict[str, manifest.TensorEntry]


@dataclass(frozen=True, slots=True)
class Previous:
    """The committed checkpoint a save may share bytes with (incremental checkpoints,
    docs/incremental.md): its folder in the run (``step-…``) and its manifest."""

    key: str
    #: Its tensors and files: the whole manifest's, or (a rank other than the coordinator) only
    #: what this rank wrote or referred to in it — all that a rank compares with.
    tensors: Mapping[str, manifest.TensorEntry]
    files: Mapping[str, manifest.FileEntry]
    #: The run's store (the shared bytes are re-read from it now and then: :class:`_Scrub`).
    store: Store | None = None


def find_previous(
    root: Where, step: int, run_id: str, hint: str | None = None, rank: int = 0
) -> Previous | None:
    """The checkpoint a save of ``step`` shares unchanged bytes with: ``hint`` (the folder this
    process committed last) or else the one ``LATEST`` names — if its manifest reads and
    validates, belongs to ``run_id`` and is older than ``step``; else None (a full save).

    Never raises: any doubt means a full save, which is always correct. (Only manifests are
    read here; the bytes a save refers to are re-read in rounds while it is written:
    :class:`_Scrub`.)
    """
    from savegame.engine import reader  # reader imports nothing from here; avoid a cycle at import

    store = as_store(root)
    key = hint
    try:
        if key is None:
            key = store.read(layout.LATEST).decode("utf-8", "replace").strip()
        prev_step = layout.parse_step_dir(key)
        if prev_step is None or prev_step >= step:
            return None
        mine = _recent_rank.get((store.describe(key), rank))
        if mine is not None and mine[0] == run_id and store.exists(f"{key}/{layout.MANIFEST}"):
            # What this rank itself wrote there, kept from its last commit: a rank other than
            # the coordinator need not read and parse the whole manifest (O(ranks x tensors)
            # per rank per save — docs/scale.md) to compare its own pieces.
            return Previous(key, mine[1].tensors, mine[1].files, store)
        m = _recent.get(store.describe(key))
        if m is None or not store.exists(f"{key}/{layout.MANIFEST}"):
            m = reader.read_manifest(Location(store, key))
    except (errors.CheckpointError, OSError, ValueError) as exc:
        log.debug("step %d: no earlier checkpoint to share bytes with (%s); writing all of it", step, exc)
        return None
    if m.run_id != run_id or m.step != prev_step:
        return None
    return Previous(key, m.tensors, m.files, store)


#: The manifest this process committed last (its folder's description -> manifest): the next
#: incremental save compares with it without reading and parsing it again (one per process;
#: a folder that no longer holds a manifest is read instead, i.e. refused).
_recent: dict[str, manifest.Manifest] = {}
#: (folder's description, rank) -> (run id, what that rank wrote in the checkpoint committed
#: there): set on every rank once the coordinator reports the commit (:func:`committed`).
_recent_rank: dict[tuple[str, int], tuple[str, RankResult]] = {}


def forget_recent() -> None:
    """Forget the checkpoints this process committed last (a new Checkpointer opens its run:
    another process may have replaced them since; the next save reads what is there)."""
    _recent.clear()
    _recent_rank.clear()


# ---- re-reading shared bytes (bit rot must not spread: docs/incremental.md) -------------------
#
# A save that refers to stored bytes takes them on the manifest's word; if the file rotted on
# disk since, every later save that shares it would be damaged too, and retention would in the
# end keep only damaged checkpoints. So each incremental save re-reads part of the bytes it is
# about to refer to and hashes them (a rolling "scrub", like a file system's): a piece whose
# bytes no longer match is written in full instead, which heals the run from that save on.
#
# Which part: the rank's tensors, in file order, are cut by their byte offsets into R windows of
# B = max(SCRUB_MIN_BYTES, SCRUB_SHARE x state) bytes; the save with index i (the run's save
# counter, kept in every manifest, so it goes on across restarts) re-reads the shared pieces that
# start in window i mod R. The windows depend only on the state's layout, not on which pieces
# changed, so every shared piece is re-read at least once every R <= 1/SCRUB_SHARE saves, however
# often the job restarts and whatever else changes. On average a save reads at most B; a tensor
# larger than B is read whole in the save whose turn it is. Only local folders are scrubbed: an
# object store checks its objects' integrity itself, and reading the bytes back from it would
# cost a download per save.

#: The part of a rank's state whose shared bytes one save re-reads (on average, at most).
SCRUB_SHARE = 1 / 8
#: ...but at least this many bytes (a small state is re-read whole on every save).
SCRUB_MIN_BYTES = 64 << 20
#: run (its LATEST file's description) -> the damaged shared files the scrub found there and
#: the coordinator's retention has not yet heard of (:func:`take_scrub_damage`).
_scrub_damage: dict[str, list[str]] = {}
_scrub_lock = threading.Lock()


def take_scrub_damage(root: Where) -> list[str]:
    """The damaged shared files the scrub found in the run at ``root`` since the last call (and
    forget them): its retention then verifies the kept checkpoints again."""
    with _scrub_lock:
        return _scrub_damage.pop(as_store(root).describe(layout.LATEST), [])


class _Scrub:
    """The ``still_stored`` check of one rank's incremental save: see the comment above."""

    def __init__(
        self,
        previous: Previous,
        stored: Mapping[str, tuple[str, manifest.Chunk, manifest.FileEntry]],
        ordered: Sequence[tuple[str, torch.Tensor]],
        turn: int,
    ) -> None:
        store = previous.store
        local = store is not None and store.local_path(previous.key) is not None
        self.loc = Location(store, previous.key) if store is not None and local else None
        self.stored = stored
        total = sum(t.nbytes for _, t in ordered)
        budget = max(SCRUB_MIN_BYTES, int(total * SCRUB_SHARE), 1)
        windows = max(1, -(-total // budget))
        at, self.due = 0, set()
        for key, t in ordered:
            if at // budget == turn % windows:
                self.due.add(key)
            at += t.nbytes
        #: shared file -> its size is what the manifest says (checked once per save, every
        #: file: a file of the wrong size fails verification of every checkpoint using it)
        self.sized: dict[str, bool] = {}
        #: shared file -> the store key it is read from (its folder's, or the retired copy):
        #: resolved once per save, not once per tensor (each resolve is up to two lookups)
        self.keys: dict[str, str] = {}

    def __call__(self, key: str) -> bool:
        if self.loc is None:
            return True
        name, c, fentry = self.stored[key]
        if name not in self.sized:
            self.sized[name] = self._intact(name, key, None, fentry.size)
        if not self.sized[name]:
            return False
        return key not in self.due or self._intact(name, key, c)

    def _intact(self, name: str, key: str, c: manifest.Chunk | None, size: int = -1) -> bool:
        """Whether chunk ``c`` (tensor ``key``) of shared file ``name`` still holds its bytes
        (with ``c`` None: whether the file still has ``size`` bytes). False is logged."""
        # reader imports nothing from here: imported here to avoid a cycle at import
        from savegame.engine import reader

        assert self.loc is not None
        store = self.loc.store
        fkey = name
        try:
            if name not in self.keys:
                self.keys[name] = reader.resolve(self.loc, name)
            fkey = self.keys[name]
            try:
                blob = store.open(fkey)
            except FileNotFoundError:
                # Retention (the two-tier upload thread's cache retention runs beside the save)
                # retired the file between resolve and open: it was moved, not lost.
                alt = reader.retired_key(reader.file_key(self.loc, name))
                if alt is None or alt == fkey:
                    raise
                blob = store.open(alt)
                fkey = self.keys[name] = alt
            if c is None:
                try:
                    if blob.size == size:
                        return True
                    why = f"it is {blob.size} bytes, its manifest says {size} (truncated or replaced)"
                finally:
                    blob.close()
                return self._damaged(f"shared file {store.describe(fkey)}", why, "every tensor it holds")
            h = hashing.new()
            try:
                buf = bytearray(min(c.length, 16 << 20) or 1)
                done = 0
                while done < c.length:
                    view = memoryview(buf)[: min(len(buf), c.length - done)]
                    blob.readinto(c.offset + done, view)
                    h.update(view)
                    done += len(view)
            finally:
                blob.close()
            if h.hexdigest() == c.hash:
                return True
            why = "its bytes no longer match their hash (bit rot?)"
        except (OSError, EOFError, errors.CheckpointError) as exc:
            why = f"it cannot be read ({exc})"
        where = store.describe(fkey)
        if c is None:
            return self._damaged(f"shared file {where}", why, "every tensor it holds")
        return self._damaged(
            f"shared bytes of tensor {key!r} at offset {c.offset} of {where}", why, "that tensor"
        )

    def _damaged(self, what_is: str, why: str, what: str) -> bool:
        assert self.loc is not None
        log.warning(
            "%s: %s; this save writes %s in full, and the checkpoints that refer to those bytes "
            "are damaged (`savegame verify` names them)",
            what_is, why, what,
        )  # fmt: skip
        with _scrub_lock:
            _scrub_damage.setdefault(self.loc.store.describe(layout.LATEST), []).append(what_is)
        return False


def committed(root: Where, key: str, run_id: str, result: RankResult) -> None:
    """This rank's part ``result`` of the checkpoint just committed at ``key`` (the next
    incremental save of this rank compares with it)."""
    _recent_rank.clear()
    _recent_rank[(as_store(root).describe(key), result.rank)] = (run_id, result)


def _stored(
    previous: Previous,
    rank: int,
    ordered: Sequence[tuple[str, torch.Tensor]],
    chunk_meta: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None,
) -> dict[str, tuple[str, manifest.Chunk, manifest.FileEntry]]:
    """key -> (reference name, chunk, file entry) of the earlier checkpoint's chunk that holds
    the same piece of the same tensor (same key, dtype, global shape, start and shape) in a
    file of this rank: the candidates whose bytes may be shared if their digests match."""
    out: dict[str, tuple[str, manifest.Chunk, manifest.FileEntry]] = {}
    for key, t in ordered:
        e = previous.tensors.get(key)
        if e is None or e.dtype != tensors.dtype_name(t.dtype) or not t.numel():
            continue
        shape = tuple(t.shape)
        gshape, start = (chunk_meta or {}).get(key, (shape, (0,) * len(shape)))
        if tuple(e.shape) != tuple(gshape):
            continue
        for c in e.chunks:
            if tuple(c.start) != tuple(start) or tuple(c.shape) != shape:
                continue
            fentry = previous.files[c.file]
            # Always the folder that physically holds the bytes: a reference of the earlier
            # manifest is copied as it is, never chained through that manifest.
            name = c.file if manifest.is_ref(c.file) else f"{previous.key}/{c.file}"
            if fentry.rank == rank and manifest.ref_step(name) is not None:
                out[key] = (name, c, fentry)
            break
    return out


def begin(root: Where, step: int, final: str | os.PathLike[str] | None = None) -> Staging:
    """Coordinator: create the staging area of a new save of ``step`` (a temp name no reader
    lists). ``final`` is where :func:`commit` will publish it (default ``step-…``): an object
    store writes the data objects there directly (it has no rename)."""
    return as_store(root).begin(
        layout.tmp_dir(step, uuid.uuid4().hex[:12]), _final_key(step, final)
    )


def _final_key(step: int, final: str | os.PathLike[str] | None) -> str:
    """The checkpoint's key in the store: ``step-…`` of the run, or the folder name a path
    names (its parent is the store)."""
    if final is None:
        return layout.step_dir(step)
    return final if isinstance(final, str) else Path(final).name


def join(root: Where, name: str) -> Staging:
    """Every other rank: the staging area the coordinator created (its name was broadcast)."""
    return as_store(root).staging(name)


def new_tmp_dir(root: Path, step: int) -> Path:
    """The local staging folder of a new save (kept for callers that work with paths)."""
    st = begin(root, step)
    return Path(st.describe())


def _staging(tmp: Path | Staging) -> Staging:
    if isinstance(tmp, Staging):
        return tmp
    tmp = Path(tmp)
    return join(tmp.parent, tmp.name)


def write_rank_files(
    tmp: Path | Staging,
    rank: int,
    items: Mapping[str, torch.Tensor],
    *,
    chunk_meta: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    previous: Previous | None = None,
    scrub_turn: int = 0,
) -> RankResult:
    """Write this rank's tensors (contiguous CPU) into one safetensors-layout file, durably.

    Args:
        tmp: The save's staging area (shared by all ranks), or its local temp folder.
        rank: This process's rank.
        items: key -> tensor. Keys are unique across ranks, except chunks of one sharded tensor.
        chunk_meta: For sharded tensors, key -> (global shape, start offsets of this chunk).
        previous: The committed checkpoint to share bytes with (incremental save): a tensor
            whose staged bytes hash to the digest that checkpoint stores for the same piece of
            the same tensor is not written; the manifest refers to the stored bytes instead.
        scrub_turn: The run's save counter (manifest ``info["index"]``): which part of the
            shared bytes this save re-reads (:class:`_Scrub`).
    """
    name = layout.tensor_file(rank)
    staging = _staging(tmp)
    path = staging.describe(name)
    ordered = tensors.order_for_file(items.items())
    stored = _stored(previous, rank, ordered, chunk_meta) if previous is not None else {}
    # the data's bytes: the header and padding are a rounding error the part sizing allows for
    data_bytes = sum(t.nbytes for _, t in ordered)
    try:
        if stored:
            assert previous is not None
            digests = {k: c.hash for k, (_, c, _) in stored.items()}
            scrub = _Scrub(previous, stored, ordered, scrub_turn)
            (header, written, _), size = staging.write(
                name,
                lambda f: tensors.write_changed_tensor_file(f, ordered, digests, scrub),
                size=data_bytes,
            )
        else:
            (header, written), size = staging.write(
                name, lambda f: tensors.write_tensor_file(f, ordered), size=data_bytes
            )
    except OSError as exc:
        hint = {
            errno.ENOSPC: "the disk is full; free space or save elsewhere",
            errno.EDQUOT: "the disk quota is exhausted; free space or save elsewhere",
            errno.EFBIG: "the file is over the file-size limit (ulimit -f, or the file system's maximum)",
        }.get(exc.errno or 0, "")
        raise errors.StorageError(
            f"could not write {path}: {exc}{'; ' + hint if hint else ''}; nothing was committed, "
            "earlier checkpoints are intact",
            path=path,
        ) from exc
    # The manifest will promise these bytes: make sure the file on disk holds every one of them
    # before it is written (a short write that went unnoticed must never be committed).
    expected = len(header) + sum(w.length for w in written)
    if size != expected:
        raise errors.StorageError(
            f"could not write {path}: the file has {size} bytes after writing, expected {expected}; "
            "nothing was committed, earlier checkpoints are intact",
            path=path,
        )
    entries: dict[str, manifest.TensorEntry] = {}
    files: dict[str, manifest.FileEntry] = {}
    landed = {w.key: w for w in written}
    for key, t in ordered:
        shape = tuple(t.shape)
        gshape, start = (chunk_meta or {}).get(key, (shape, (0,) * len(shape)))
        w = landed.get(key)
        if w is not None:
            chunk = manifest.Chunk(name, w.offset, w.length, w.hash, tuple(start), shape)
        else:  # unchanged: refer to the bytes the earlier checkpoint stores
            ref, c, ref_entry = stored[key]
            chunk = manifest.Chunk(ref, c.offset, c.length, c.hash, tuple(start), shape)
            files[ref] = ref_entry
        entries[key] = manifest.TensorEntry(tensors.dtype_name(t.dtype), tuple(gshape), (chunk,))
    fhash = hashing.file_hash(header, [w.hash for w in written])
    files[name] = manifest.FileEntry(size=size, hash=fhash, header_length=len(header), rank=rank)
    return RankResult(rank, files, entries)


def commit(
    root: Where,
    tmp: Path | Staging,
    step: int,
    results: Sequence[RankResult],
    *,
    trees: Sequence[Any],
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    final: str | os.PathLike[str] | None = None,
) -> Path | Location:
    """Coordinator only: write the manifest last, then publish the checkpoint (the store's commit).

    ``final`` is the checkpoint's key in the store, default ``step-…`` of the run;
    :func:`savegame.save` passes its own folder name. Returns the checkpoint: its local path
    for a local store, else its :class:`~savegame.storage.Location`.

    Raises:
        StepExistsError: a valid checkpoint for ``step`` is already committed (an invalid one is
            set aside as ``damaged-step-…`` and replaced).
    """
    store = as_store(root)
    staging = _staging(tmp)
    files: dict[str, manifest.FileEntry] = {}
    first: dict[str, manifest.TensorEntry] = {}
    chunks: dict[str, list[manifest.Chunk]] = {}
    for r in sorted(results, key=lambda r: r.rank):
        files.update(r.files)
        for key, e in r.tensors.items():
            if key in first:  # another chunk of a sharded tensor
                chunks[key].extend(e.chunks)
            else:
                first[key] = e
                chunks[key] = list(e.chunks)
    # Each entry built once: extending a tuple per rank was O(ranks^2) per sharded tensor
    # (20 s of the coordinator's commit at 4,096 ranks x 100 tensors; docs/scale.md).
    entries = {
        key: e if len(chunks[key]) == len(e.chunks) else manifest.TensorEntry(
            e.dtype, e.shape, tuple(chunks[key])
        )
        for key, e in first.items()
    }
    m = manifest.Manifest(
        step=step,
        # a wall clock set before 1970 (a board without an RTC) must not write a time the
        # reader refuses: that would set every checkpoint aside as damaged
        created=min(max(time.time(), 0.0), manifest.MAX_CREATED),
        world_size=len(trees),
        run_id=run_id,
        trees=tuple(trees),
        tensors=entries,
        files=files,
        metrics=dict(metrics or {}),
        info=dict(info or {}),
        versions=manifest.Manifest.versions_now(),
    )
    raw = m.to_bytes()
    if len(raw) > manifest.MAX_MANIFEST_BYTES:
        # No reader would open it: refuse before anything is committed (earlier checkpoints
        # stay the newest), and say what made it that large.
        n_chunks = sum(len(c) for c in chunks.values())
        raise errors.EncodeError(
            f"step {step}: the manifest would be {len(raw)} bytes, over the "
            f"{manifest.MAX_MANIFEST_BYTES}-byte limit every reader enforces "
            f"({len(trees)} ranks x {len(entries)} tensors = {n_chunks} chunks); nothing was "
            "committed. Save fewer, larger tensors (flatten parameter groups), or fewer shards "
            "per tensor; docs/scale.md"
        )
    in_run = final is None
    # A path names a folder in the store's root (the callers pass its parent as ``root``).
    key = _final_key(step, final)
    where = store.describe(key)
    publishing = False  # (an error before the publish call never published anything)
    try:
        from savegame.engine import shared  # imports the reader; not at import time

        shared.refuse_shadowing(store, key, [n for n in files if not manifest.is_ref(n)], step)
        staging.seal(layout.MANIFEST, raw)
        if store.exists(key):
            if not in_run:
                raise errors.StepExistsError(
                    f"{where} already exists; choose a new path", path=where, step=step
                )
            _move_aside_if_invalid(Location(store, key), step)
        publishing = True
        staging.publish(key)
    except errors.CheckpointError:
        raise
    except FileExistsError as exc:  # appeared between the check and the publish
        raise errors.StepExistsError(
            f"{where} already exists; choose a new path", path=where, step=step
        ) from exc
    except OSError as exc:
        published = False
        with contextlib.suppress(OSError):
            published = (
                publishing and store.exists(key) and store.exists(f"{key}/{layout.MANIFEST}")
            )
        if published:  # the publish happened; what failed after it (its fsync) may not have
            raise errors.StorageError(
                f"step {step} was published at {where}, but the commit did not complete ({exc}); "
                "it may not survive a power cut — restore verifies it before using it",
                path=where,
                step=step,
            ) from exc
        raise errors.StorageError(
            f"could not commit step {step} in {store.describe()}: {exc}; nothing was committed, "
            "earlier checkpoints are intact",
            path=where,
            step=step,
        ) from exc
    if in_run:
        _recent.clear()
        _recent[where] = m
        with contextlib.suppress(OSError):
            store.put(layout.LATEST, f"{layout.step_dir(step)}\n".encode())
    return store.local_path(key) or Location(store, key)


def _move_aside_if_invalid(final: Location, step: int) -> None:
    """A committed folder is in the way of a new save of ``step``: set it aside if it is damaged
    (it is kept, renamed, for inspection), refuse if it is a valid checkpoint (or one of a
    newer format version)."""
    from savegame.engine import reader  # reader imports nothing from here; avoid a cycle at import

    problems = reader.damage(final)
    if problems:
        set_aside_damaged(final, step, problems[0])
        return
    raise errors.StepExistsError(
        f"step {step} is already committed at {final}; refusing to overwrite it — delete it first "
        "or save under a new step",
        path=str(final),
        step=step,
    )


def set_aside_damaged(path: Path | Location, step: int, why: object) -> Path | Location:
    """Rename a damaged checkpoint folder to ``damaged-step-…-<id>`` in the same run folder.

    Its bytes are kept for inspection, but under that name no reader lists it, retention never
    counts it, and a new save of its step is never in its way (issue 9.8). Only the writer that
    holds the run folder's lock calls this.
    """
    loc = locate(path)
    from savegame.engine import reader, shared  # reader imports nothing from here

    # Later checkpoints may refer to its files (incremental saves): those are moved aside to
    # their retired names first, so renaming the folder breaks no reference.
    try:
        others = [r for r in reader.list_checkpoints(loc.store) if r.location.key != loc.key]
        used, sure = shared.references(others)
    except errors.CheckpointError:
        used, sure = set(), False
    shared.retire(loc, used, sure)
    name = layout.damaged_dir(step, uuid.uuid4().hex[:8])
    parent = loc.key.rsplit("/", 1)[0] if "/" in loc.key else ""
    dest = Location(loc.store, f"{parent}/{name}" if parent else name)
    loc.store.rename(loc.key, dest.key)
    log.warning(
        "set aside damaged checkpoint %s as %s (%s); it is kept for inspection — delete it when done",
        loc, name, why,
    )  # fmt: skip
    return dest.local or dest


def write_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    tree: Any,
    *,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    final: str | os.PathLike[str] | None = None,
) -> Path | Location:
    """World-size-1 save of a state tree: encode, stage to CPU, write, commit."""
    from savegame import tree as treelib

    skeleton, tensors_by_key = treelib.encode(tree)
    staged = {k: stage_cpu(t, k) for k, t in tensors_by_key.items()}
    return write_staged(
        root, step, skeleton, staged, run_id=run_id, metrics=metrics, info=info, final=final
    )


def write_staged(
    root: Where,
    step: int,
    skeleton: Any,
    staged: Mapping[str, torch.Tensor],
    *,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    final: str | os.PathLike[str] | None = None,
    previous: Previous | None = None,
) -> Path | Location:
    """World-size-1 write + commit of an encoded, staged state (may run on a background thread)."""
    store = as_store(root)
    try:
        staging = begin(store, step, final)
    except OSError as exc:
        raise errors.StorageError(
            f"could not start saving step {step} in {store.describe()}: {exc}; nothing was committed, earlier "
            "checkpoints are intact",
            path=store.describe(),
            step=step,
        ) from exc
    try:
        result = write_rank_files(staging, 0, staged, previous=previous)
        return commit(
            store,
            staging,
            step,
            [result],
            trees=[skeleton],
            run_id=run_id,
            metrics=metrics,
            info=info,
            final=final,
        )
    except BaseException:
        staging.abort()
        raise


def stage_cpu(t: torch.Tensor, key: str) -> torch.Tensor:
    """A contiguous CPU tensor with ``t``'s values (no copy if it already is one)."""
    from savegame import tree as treelib

    treelib.check_storable(t, key)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()
