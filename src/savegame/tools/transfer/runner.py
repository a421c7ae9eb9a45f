"""One transfer from start to end: what to move, each checkpoint through the destination's
commit, then ``run.json`` and ``LATEST``.

Invariants: a destination that holds another run is refused before anything is written; a
checkpoint's manifest is sealed only after every one of its files was staged and verified, and
the staging area is published atomically; a source that lies has its staging area aborted.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from savegame import errors
from savegame.engine import reader, shared
from savegame.format import hashing, layout, manifest
from savegame.storage import Location, Staging, Store, base, objectstore
from savegame.tools import transfer
from savegame.tools.transfer import endpoints, failures, files
from savegame.tools.transfer.check import FileCheck
from savegame.tools.transfer.progress import Progress

log = logging.getLogger(__name__)

_Todo = list[tuple[str, bytes, manifest.Manifest]]
#: Listings of a source run again when every checkpoint listed vanished before it was read.
_RELISTS = 3


class Transfer:
    """The state of one :func:`~savegame.tools.transfer.push` or ``pull``; :meth:`run` once."""

    def __init__(
        self,
        src: str | os.PathLike[str] | Store | Location,
        dst: str | os.PathLike[str] | Store,
        steps: Iterable[int] | None,
        progress: bool | None,
    ) -> None:
        src_store, self.one = endpoints.source(src)
        dst_store = endpoints.dest(dst)
        self.steps = None if steps is None else {int(s) for s in steps}
        self.ends = endpoints.Endpoints(src_store, dst_store, Progress(progress, "transfer"))
        self.src, self.dst = src_store, dst_store
        self.copied: list[int] = []
        self.skipped: list[int] = []
        self.ignored: list[int] = []
        self.problems: list[str] = []
        # A local destination fed from a remote source keeps resumable .part files.
        self.parts = self.dst.local_path() is not None and self.src.local_path() is None
        self._src_run: Future[bytes | None] | None = None
        self._src_latest: Future[bytes | None] | None = None

    def _where(self, store: Store, key: str = "") -> str:
        return self.ends.where(store, key)

    # -- the run --
    def run(self) -> transfer.TransferReport:
        if getattr(self.dst, "read_only", False):
            where = self._where(self.dst)
            raise errors.StorageError(
                f"{where} is read-only (an http(s) URL can only be read); push to s3://, gs://, "
                "az:// or a folder",
                path=where,
            )
        # The source's small files are fetched while its checkpoints are listed (each is one
        # request's latency over the network). LATEST is read now, with the listing that decides
        # what moves, and still written last. On an object store one snapshot (its listing,
        # run.json, manifests and checkpoint listings, fetched once and concurrently) serves the
        # plan, the manifests' bytes and the files' sizes and ETags: nothing is read twice.
        objectstore.begin_snapshot(self.src)
        try:
            pre = ThreadPoolExecutor(max_workers=2)
            try:
                self._src_run = pre.submit(self._read_hint, self.src, layout.RUN_FILE)
                self._src_latest = (
                    pre.submit(self._read_hint, self.src, layout.LATEST)
                    if self.one is None
                    else None
                )
            finally:
                pre.shutdown(wait=False)
            todo = self._plan()
            if todo:
                # (with nothing to move — ``steps=[]``, or only damaged or uncommitted source
                # steps — the destination is left as it was: not created, no run.json)
                self._move(todo)
        finally:
            objectstore.end_snapshot(self.src)
        return self._report()

    def _move(self, todo: _Todo) -> None:
        lock = self.ends.lock_dest()
        progress = self.ends.progress
        try:
            progress.start(sum(reader.total_bytes(m) for _, _, m in todo))
            self._run_file()
            failed: list[errors.IntegrityError] = []
            for key, raw, m in _sharers_first(todo):
                progress.describe(f"step {m.step}")
                try:
                    self._checkpoint(key, raw, m)
                except errors.IntegrityError as exc:
                    failed.append(exc)
            if failed:
                self._raise_integrity(failed)
            self._latest()
        finally:
            progress.stop()
            if lock is not None:
                lock.release()

    def _report(self) -> transfer.TransferReport:
        return transfer.TransferReport(
            source=self._where(self.src, self.one or ""),
            dest=self._where(self.dst),
            copied=tuple(self.copied),
            skipped=tuple(self.skipped),
            bytes_moved=self.ends.bytes_moved,
            bytes_skipped=self.ends.bytes_skipped,
            ignored=tuple(self.ignored),
            problems=tuple(self.problems),
        )

    def _raise_integrity(self, failed: list[errors.IntegrityError]) -> None:
        first = failed[0]
        more = "; ".join(str(f) for f in failed[1:])
        done = f"; the other checkpoints were moved and verified ({len(self.copied)} copied, {len(self.skipped)} already there)"
        raise errors.IntegrityError(
            str(first) + (f"; also: {more}" if more else "") + done,
            path=first.path,
            step=first.step,
            key=first.key,
        ) from first

    # -- what to move --
    def _plan(self) -> _Todo:
        """What to move. A live source run's retention can delete every checkpoint listed
        before their manifests are read (a push of a run saving every few seconds with
        ``Keep(last=2)``): then the run is listed again, a few times, rather than reported
        empty while it holds committed checkpoints."""
        for attempt in range(_RELISTS + 1):
            ignored, problems = list(self.ignored), list(self.problems)
            todo, vanished = self._plan_once()
            if todo or self.problems != problems or not vanished or attempt == _RELISTS:
                break
            self.ignored, self.problems = ignored, problems  # this listing is not the answer
        if not todo and not self.problems and self.steps is None:
            raise errors.CheckpointNotFoundError(
                f"{self._where(self.src)} holds no committed checkpoint to move; run "
                f"`savegame ls {self._where(self.src)}` to see what is there",
                path=self._where(self.src),
            )
        self._check_run(todo)
        return todo

    def _plan_once(self) -> tuple[_Todo, bool]:
        """One listing's plan, and whether a listed checkpoint vanished before it was read."""
        vanished = False
        if self.one is not None:
            key = self.one
            ref = reader.CheckpointRef(0, Location(self.src, key), loc=Location(self.src, key))
            ref.manifest = reader.read_manifest(Location(self.src, key))  # raises if not one
            ref.step = ref.manifest.step
            refs = [ref]
        else:
            refs = reader.list_checkpoints(self.src)
        if self.steps is not None:
            missing = self.steps - {r.step for r in refs}
            if missing:
                raise errors.CheckpointNotFoundError(
                    f"{self._where(self.src)} has no step {', '.join(map(str, sorted(missing)))}; "
                    f"run `savegame ls {self._where(self.src)}` to see its checkpoints",
                    path=self._where(self.src),
                    step=min(missing),
                )
            refs = [r for r in refs if r.step in self.steps]
        todo = []
        valid = []
        for ref in sorted(refs, key=lambda r: r.step, reverse=True):
            if not ref.valid:
                # No manifest (a save in progress, a killed writer's leftovers), or the folder
                # vanished since it was listed (the source's retention): not in the source.
                if isinstance(
                    ref.error, (errors.IncompleteCheckpointError, errors.CheckpointNotFoundError)
                ):
                    self.ignored.append(ref.step)
                    vanished = vanished or isinstance(ref.error, errors.CheckpointNotFoundError)
                else:
                    self.problems.append(
                        f"step {ref.step} is damaged in the source and was not moved: {ref.error}"
                    )
                continue
            valid.append(ref)

        def read_manifest(ref: reader.CheckpointRef) -> bytes | None:
            return self.ends.read(self.src, base.join(ref.location.key, layout.MANIFEST))

        with ThreadPoolExecutor(max_workers=max(1, min(transfer.WORKERS, len(valid)))) as pool:
            raws = list(pool.map(read_manifest, valid))  # one request's latency, not N
        for ref, raw in zip(valid, raws, strict=True):
            key = ref.location.key
            where = self._where(self.src, base.join(key, layout.MANIFEST))
            if raw is None:  # deleted by the source's retention since it was listed
                self.ignored.append(ref.step)
                vanished = True
                continue
            try:
                m = manifest.Manifest.from_bytes(raw, where)
            except errors.FormatError as exc:
                self.problems.append(f"step {ref.step} is damaged in the source: {exc}")
                continue
            todo.append((key, raw, m))
        return todo, vanished

    def _run_id(
        self, store: Store, fetched: Future[bytes | None] | None = None
    ) -> tuple[bytes | None, str | None]:
        raw = fetched.result() if fetched is not None else self._read_hint(store, layout.RUN_FILE)
        if raw is None:
            return None, None
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            return raw, None
        rid = record.get("run_id") if isinstance(record, dict) else None
        return raw, (rid if isinstance(rid, str) and rid else None)

    def _check_run(self, todo: _Todo) -> None:
        """Refuse a destination that holds another run (before anything is written)."""
        self.src_run, src_id = self._run_id(self.src, self._src_run)  # read while listing
        if self.src_run is not None and src_id is None:
            self.problems.append(
                f"{self._where(self.src, layout.RUN_FILE)} is damaged (not a JSON object with a "
                "run_id) and was not copied"
            )
            self.src_run = None
        self.src_id = src_id
        ours = {src_id} if src_id else {m.run_id for _, _, m in todo}
        try:
            _, dst_id = self._run_id(self.dst)
        except errors.StorageError:
            raise
        if dst_id is None:
            try:
                theirs = {r.manifest.run_id for r in reader.list_checkpoints(self.dst) if r.valid}  # type: ignore[union-attr]
            except errors.CheckpointNotFoundError:
                theirs = set()
        else:
            theirs = {dst_id}
        if theirs and ours and not (theirs & ours):
            raise errors.CheckpointError(
                f"{self._where(self.dst)} holds another run (run id {errors.quoted(sorted(theirs)[0])}, "
                f"not {errors.quoted(sorted(ours)[0])}); move this run into an empty folder or a new URL — savegame "
                "never mixes two runs in one folder",
                path=self._where(self.dst),
            )
        self.dst_id = dst_id

    # -- run.json and LATEST --
    def _run_file(self) -> None:
        if self.src_run is None:
            return
        if self.one is not None and self.dst_id is not None:
            return  # one checkpoint into an existing run of the same id: keep its run.json
        if self._read_hint(self.dst, layout.RUN_FILE) == self.src_run:
            return
        self.ends.put(layout.RUN_FILE, self.src_run)

    def _read_hint(self, store: Store, key: str) -> bytes | None:
        """``run.json`` or ``LATEST``: None if absent, ``b""`` (damaged) if over
        ``_HINT_BYTES`` — not read, whatever size a server claims."""
        try:
            return self.ends.read(store, key, _HINT_BYTES)
        except errors.FormatError:
            return b""

    def _latest(self) -> None:
        """The source's ``LATEST`` hint, copied only when the destination now holds the step it
        names (``--step`` may leave it out, or it may be damaged in the source) and the
        destination's own hint names no newer step (older steps moved into a newer copy)."""
        if self.one is not None:
            return
        if self._src_latest is not None:
            raw = self._src_latest.result()  # fetched while the source was listed
        else:  # pragma: no cover - always prefetched when a whole run moves
            raw = self._read_hint(self.src, layout.LATEST)
        named = _hint_step(raw)
        if raw is None or named is None or named not in {*self.copied, *self.skipped}:
            return
        current = self._read_hint(self.dst, layout.LATEST)
        have = _hint_step(current)
        if current == raw or (have is not None and have > named):
            return
        self.ends.put(layout.LATEST, raw)

    # -- one checkpoint --
    def _checkpoint(self, key: str, raw: bytes, m: manifest.Manifest) -> None:
        final = layout.step_dir(m.step)
        state = self._dest_state(final, raw)
        if state == "same":
            self.skipped.append(m.step)
            self.ends.skip(reader.total_bytes(m))
            return
        if state == "different":
            where = self._where(self.dst, final)
            raise errors.StepExistsError(
                f"{where} holds a different valid checkpoint of step {m.step}; it is never "
                "overwritten — move it away (or choose another destination) and run again",
                path=where,
                step=m.step,
            )
        if state in ("damaged", "incomplete-local"):
            self._replace_damaged(final, m.step)
        tmp = layout.tmp_dir(m.step, hashing.digest(raw)[:16])
        try:
            try:
                staging = self.dst.begin(tmp, final)
            except FileExistsError:  # a killed transfer's staging area: continue it
                staging = self.dst.staging(tmp)
        except OSError as exc:
            where = self._where(self.dst, tmp)
            raise failures.storage_error("could not create the staging area", exc, where) from exc
        names = sorted(m.own_files, key=lambda n: -m.files[n].size)
        try:
            self._shared(key, m)
            with ThreadPoolExecutor(max_workers=max(1, min(transfer.WORKERS, len(names)))) as pool:
                futures = [
                    pool.submit(
                        files.copy_file, self.ends, key, name, m, staging, tmp, final, self.parts
                    )
                    for name in names
                ]
            for f in futures:  # every file finished (or failed) before anything is judged
                f.result()
            self._commit(staging, tmp, final, raw, m)
        except errors.IntegrityError:
            staging.abort()  # the source lies: nothing of it is worth resuming
            if self._vanished(key):
                log.info("step %d was deleted from the source while it was moved", m.step)
                self.ignored.append(m.step)
                return
            raise
        self.copied.append(m.step)

    def _vanished(self, key: str) -> bool:
        """The source checkpoint is gone (its run's retention deleted it meanwhile): not a
        lie, nothing to move."""
        try:
            return not self.src.exists(base.join(key, layout.MANIFEST))
        except OSError:
            return False

    def _dest_state(self, final: str, raw: bytes) -> str:
        """What the destination holds under ``final``: absent, same (skip), different (refuse),
        damaged (replaced), incomplete (no manifest)."""
        try:
            if not self.dst.is_dir(final):
                return "absent"
        except OSError as exc:
            where = self._where(self.dst, final)
            raise failures.storage_error("could not read", exc, where) from exc
        there = self.ends.read(self.dst, base.join(final, layout.MANIFEST))
        if there is None:
            # An object store stages in place: a killed transfer's files, continued in place.
            return "incomplete-local" if self.dst.local_path() is not None else "incomplete"
        loc = Location(self.dst, final)
        if there == raw:
            return "same" if not self._damage(loc) else "damaged"
        return "different" if not reader.damage(loc) else "damaged"

    def _damage(self, loc: Location) -> list[str]:
        """Problems of a destination checkpoint: every byte read where the destination is a
        local folder; over the network the sizes and headers (a full re-read of a remote run
        on every re-run would cost as much as the transfer; `savegame verify URL` does it)."""
        if loc.store.local_path() is not None:
            return reader.verify(loc)
        try:
            m = reader.read_manifest(loc)
        except errors.CheckpointError as exc:
            return [str(exc)]
        problems = []
        for name, entry in m.files.items():
            try:
                with loc.store.open(reader.resolve(loc, name)) as blob:
                    if blob.size != entry.size:
                        problems.append(f"{name}: {blob.size} bytes, expected {entry.size}")
                        continue
                    if manifest.is_ref(name):
                        continue  # shared with an earlier checkpoint: its size is what is checked
                    check = FileCheck(m, name, self._where(loc.store, loc.sub(name)))
                    header = blob.read(0, entry.header_length)
                    got = hashing.file_hash(header, [s[2] for s in check.spans])
                    if got != entry.hash:
                        problems.append(f"{name}: header does not match its hash")
            except (OSError, EOFError, errors.CheckpointError) as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def _shared(self, key: str, m: manifest.Manifest) -> None:
        """The files checkpoint ``key`` shares with earlier checkpoints (incremental saves)
        must be in the destination run, at the same place relative to the run, before its
        manifest is committed there. One the destination lacks (or holds at another size) is
        copied from the source, every chunk the checkpoint uses verified on the way, under its
        retired name (``retired-step-…-rank-….safetensors``: a transfer killed before the
        commit leaves a file the next writer collects, never a folder that looks damaged)."""
        src_ckpt = Location(self.src, key)
        for name, entry in sorted(m.refs.items()):
            where = self._where(self.dst, name)
            there = reader.resolve(Location(self.dst, manifest.ref_folder(name)), name)
            try:
                present = self.dst.exists(there) and self.dst.size(there) == entry.size
                if present and self._shared_intact(there, name, m):
                    self.ends.skip(entry.size)
                    continue
            except OSError as exc:
                raise failures.storage_error("could not read", exc, where) from exc
            if not present:
                there = layout.retired_file(name)
            skey = reader.resolve(src_ckpt, name)
            blob = self.ends.blob(skey, m, name)
            check = FileCheck(m, name, self._where(self.src, skey))
            data = bytearray()
            try:
                for view in blob.stream(0, transfer.BLOCK):
                    check.feed(view)
                    data += view
                    self.ends.moved(len(view))
            except OSError as exc:
                where_src = self._where(self.src, skey)
                raise failures.storage_error("could not read", exc, where_src) from exc
            finally:
                blob.close()
            check.finish()
            try:
                # Its folder holds no checkpoint here: the file goes where references find
                # it once a folder is gone (its retired name), in one atomic put; a shared
                # file is held in memory once (docs/incremental.md).
                self.dst.put(there, bytes(data))
            except OSError as exc:
                raise failures.storage_error("could not write", exc, where) from exc

    def _shared_intact(self, there: str, name: str, m: manifest.Manifest) -> bool:
        """Whether the destination's copy of shared file ``name`` (at ``there``) holds every
        chunk checkpoint ``m`` uses from it. Read and hashed where the destination is a local
        folder (as :meth:`_damage` checks whole checkpoints there); over the network its size
        is what is checked (``savegame verify URL`` reads everything)."""
        if self.dst.local_path() is None:
            return True
        with self.dst.open(there) as blob:
            for t in m.tensors.values():
                for c in t.chunks:
                    if c.file != name:
                        continue
                    h = hashing.new()
                    pos, end = c.offset, c.offset + c.length
                    while pos < end:
                        n = min(transfer.BLOCK, end - pos)
                        h.update(blob.read(pos, n))
                        pos += n
                    if h.hexdigest() != c.hash:
                        return False
        return True

    def _replace_damaged(self, final: str, step: int) -> None:
        """Take a damaged (or manifest-less) destination copy out of view atomically and free
        it: the source holds the good bytes, which are copied in its place."""
        trash = f"{layout.TMP_PREFIX}deleted-{final}-{uuid.uuid4().hex[:8]}"
        where = self._where(self.dst, final)
        try:  # files of it that checkpoints here share are moved aside first
            used, sure = shared.references(
                r for r in reader.list_checkpoints(self.dst) if r.location.key != final
            )
            shared.retire(Location(self.dst, final), used, sure)
        except (OSError, errors.CheckpointError) as exc:
            raise failures.storage_error(
                "could not move aside the files other checkpoints share", exc, where
            ) from exc
        try:
            free = self.dst.detach(final, trash)
        except OSError as exc:
            raise failures.storage_error(
                "could not remove the damaged copy of this step (move it away and run again)",
                exc,
                where,
            ) from exc
        for problem in free():
            log.warning("damaged copy %s taken out of the run; freeing it: %s", where, problem)

    def _is_retired(self, m: manifest.Manifest, name: str, retired: str) -> bool:
        """Whether staged file ``name`` may stand in front of the retired file: this very
        checkpoint, of which a later one was moved first (``--step``), bringing its shared file
        as retired. Every range of it that a checkpoint of the destination reads (its
        manifest's chunks in ``step-…/name``) must be a chunk of ``m`` in ``name`` with the
        same offset, length and hash, and the sizes equal: then every reference resolves to
        the same bytes, whichever file it finds."""
        entry = m.files[name]
        mine = {
            (c.offset, c.length): c.hash
            for t in m.tensors.values()
            for c in t.chunks
            if c.file == name
        }
        shared_name = f"{layout.step_dir(m.step)}/{name}"
        try:
            if self.dst.size(retired) != entry.size:
                return False
            used = [
                c
                for r in reader.list_checkpoints(self.dst)
                if r.manifest is not None
                for t in r.manifest.tensors.values()
                for c in t.chunks
                if c.file == shared_name
            ]
        except (OSError, errors.CheckpointError):
            return False
        return all(mine.get((c.offset, c.length)) == c.hash for c in used)

    def _commit(
        self, staging: Staging, tmp: str, final: str, raw: bytes, m: manifest.Manifest
    ) -> None:
        where = self._where(self.dst, final)
        self._sweep(tmp, m)
        try:
            shared.refuse_shadowing(
                self.dst, final, m.own_files, m.step, lambda n, r: self._is_retired(m, n, r)
            )
            try:
                staging.seal(layout.MANIFEST, raw)
            except FileExistsError:  # a killed transfer sealed it; it holds these bytes?
                if self.ends.read(self.dst, base.join(tmp, layout.MANIFEST)) != raw:
                    if self.dst.local_path(tmp) is None:
                        raise
                    # A local staging folder is this transfer's own and unpublished: a manifest
                    # cut short there (a kill or a full disk mid-write) is written again.
                    self.ends.drop(base.join(tmp, layout.MANIFEST))
                    staging.seal(layout.MANIFEST, raw)
            try:
                staging.publish(final)
            except FileExistsError:
                if self._dest_state(final, raw) == "same":
                    return  # published by a killed run that never heard of it
                raise errors.StepExistsError(
                    f"{where} appeared while step {m.step} was being moved (another writer?); "
                    "nothing was overwritten — check it and run again",
                    path=where,
                    step=m.step,
                ) from None
        except errors.CheckpointError:
            raise
        except OSError as exc:
            raise failures.storage_error(f"could not commit step {m.step}", exc, where) from exc

    def _sweep(self, tmp: str, m: manifest.Manifest) -> None:
        """Remove from a local staging folder what is not the checkpoint's (a killed run's
        ``.part`` files): a committed folder holds exactly the manifest's files."""
        folder = self.dst.local_path(tmp)
        if folder is None or not folder.is_dir():
            return
        for e in self.dst.list(tmp):
            if e.name not in m.files and e.name != layout.MANIFEST:
                self.ends.drop(base.join(tmp, e.name))


#: run.json and LATEST hold a few hundred bytes: one over this is damaged, and not read.
_HINT_BYTES = 1 << 20


def _hint_step(raw: bytes | None) -> int | None:
    """The step a ``LATEST`` file names, or None."""
    if raw is None:
        return None
    return layout.parse_step_dir(raw.decode("utf-8", "replace").strip())


def _sharers_first(todo: _Todo) -> _Todo:
    """``todo`` (newest first) with every checkpoint moved right before the first one that
    refers to its files (incremental saves): the shared files then arrive with their own
    checkpoint, verified, before a manifest that uses them is committed."""
    by_key = {key: (key, raw, m) for key, raw, m in todo}
    out: _Todo = []
    done: set[str] = set()

    def add(key: str) -> None:
        if key in done:
            return
        done.add(key)
        _, _, m = by_key[key]
        for name in sorted(m.refs):  # older steps only (the manifest says so): no cycle
            folder = manifest.ref_folder(name)
            if folder in by_key:
                add(folder)
        out.append(by_key[key])

    for key, _, _ in todo:
        add(key)
    return out
