"""The distributed save and restore protocol: every rank writes its own file, the coordinator
(rank 0) commits only after every rank reported success.

Save, every rank, in lock step (DESIGN.md §3, §4)::

    every rank captures + encodes its state, hashes its tensors  (prepare, training thread)
    gather of (tensor digests | capture failure) from every rank           (training group)
      any failure -> every rank raises DistributedSaveError now; nothing was created
      else: equal on every rank -> written once by rank 0; different -> per rank (planning)
    rank 0 creates <run>/.tmp-step-…-<id>/      -> broadcast of its name   (persist: maybe a thread)
    every rank writes rank-NNNNN.safetensors     (its plan: planning.plan_save), fsyncs it
    gather of (result | failure) from every rank
    rank 0: all succeeded -> write manifest.json last, rename into place; else delete the temp
    broadcast of the decision -> every rank returns the path or raises DistributedSaveError

Invariant: ``manifest.json`` is written only after the gather showed a success from every rank,
so a failed or dead rank can never produce a listed checkpoint; earlier checkpoints are never
touched by a failed save. Every wait is bounded by :func:`collectives.timeout_s`. An error on
any rank, from capturing its state to writing its file, reaches every rank as a
:class:`~savegame.errors.DistributedSaveError` naming it, and the ranks stay in step; the
message of an error raised after the commit started says what is on disk (checked, not assumed).

One process without torch.distributed runs this same protocol over the no-op
:class:`~savegame.distributed.collectives.LocalGroup` (world size 1: no digests to compare, every
collective returns its input), and a failure there is raised as the process's own error
(``EncodeError``, ``StorageError``, ``OSError``…), never a ``DistributedSaveError``.

Wrappers (:mod:`.wrappers`): a ``DistributedDataParallel`` model is saved and restored through
its inner module, so checkpoint keys are the bare module's (no ``module.`` prefix).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from savegame import errors
from savegame import state as statelib
from savegame import tree as treelib
from savegame.distributed import collectives, planning
from savegame.distributed.wrappers import (
    extras_names,
    match_wrapper_keys,
    replicated_names,
    unwrapped,
)
from savegame.engine import reader, writer
from savegame.format import hashing, layout
from savegame.storage import Location, Staging, Store, as_store

__all__ = [
    "Prepared",
    "content_digest",
    "extras_names",
    "load_state",
    "match_wrapper_keys",
    "persist",
    "prepare",
    "replicated_names",
    "restore",
    "unwrapped",
]

INFO_KEY = "distributed"


@dataclass(slots=True)
class Prepared:
    """One rank's encoded, planned and staged share of a save (from :func:`prepare`)."""

    skeleton: Any
    staged: Mapping[str, torch.Tensor]
    chunk_meta: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    info: dict[str, Any]
    error: str | None = None
    exc: BaseException | None = None  # the error itself (raised as it is by a single process)


def _run_folder_exists(root: Store) -> bool:
    """Whether a local run folder is still there (a store without a local path: assumed)."""
    path = root.local_path("")
    return path is None or path.is_dir()


def content_digest(t: torch.Tensor) -> str:
    """xxh3-128 over a tensor's dtype, shape and bytes: equal digests on two ranks mean the
    tensor is written once. Non-CPU tensors are copied to the host for it (one transient copy).
    ``t`` passed :func:`savegame.tree.check_storable`."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    h = hashing.new()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        flat = t.reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _raise_alone(
    group: collectives.Group | collectives.LocalGroup, exc: BaseException | None
) -> None:
    """In a process without torch.distributed (:class:`~collectives.LocalGroup`) a failure is
    this process's own and no other rank must hear of it: raise it as it is (an
    ``EncodeError``, a ``StorageError``, the ``OSError``...), as a plain function call would,
    not wrapped in a :class:`~savegame.errors.DistributedSaveError`."""
    if exc is not None and not group.distributed:
        raise exc


def prepare(
    group: collectives.Group | collectives.LocalGroup,
    state: statelib.TrainState,
    info: Mapping[str, Any],
    stage: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    *,
    root: Path,
    step: int,
) -> Prepared:
    """Capture, compare, plan and stage this rank's share. Every rank, on the training thread,
    with the training-thread coordination group (one gather of per-tensor digests).

    Capturing happens here, inside the protocol: a ``state_dict()`` that raises or an
    unsupported leaf (:class:`~savegame.errors.EncodeError`) on any rank is reported to every
    rank by the gather, and every rank raises the same error at once, nothing created on disk;
    the ranks stay in step, so the next save works. A failure while staging is carried to
    :func:`persist` (reported to the coordinator there).

    World size 1 compares nothing, so it computes no digests (every tensor is written, once).
    A single process (:class:`~collectives.LocalGroup`) raises its own error, whatever it is.

    Raises:
        DistributedSaveError: capturing the state failed on some rank (``.failures`` names it
            with its error), or a rank died or hung (timeout).
    """
    rank, alone = group.rank, group.world == 1
    where = f"distributed save of step {step} in {root}"
    full_info = dict(info)
    if group.distributed:
        full_info[INFO_KEY] = {"replicated": replicated_names(state), "extras": extras_names(state)}
    own_exc: BaseException | None = None
    try:
        skeleton, live = treelib.encode(statelib.capture(unwrapped(state)))
        shards = {
            k: collectives.shard_info(t) for k, t in live.items() if collectives.is_dtensor(t)
        }
        for k, t in live.items():
            if k not in shards:
                treelib.check_storable(t, k)
        if alone:  # nothing to compare: every tensor is "shared" (written once, by rank 0)
            digests: dict[str, str] = {}
            shared: set[str] = {k for k in live if k not in shards}
        else:
            digests = {k: content_digest(t) for k, t in live.items() if k not in shards}
        mine: tuple[str, Any] = ("ok", digests)
    except Exception as exc:  # noqa: BLE001 - any capture failure must reach every rank
        _raise_alone(group, exc)
        own_exc = exc
        mine = ("fail", f"{type(exc).__name__}: {exc}")
    try:
        reports = group.gather(mine, what=where)
    except errors.DistributedSaveError as exc:
        raise errors.DistributedSaveError(
            f"{exc.message}. Nothing was written for step {step}; earlier checkpoints are intact.",
            failures=exc.failures,
            path=root,
            step=step,
        ) from exc
    failures = {r: str(msg) for r, (status, msg) in enumerate(reports) if status != "ok"}
    if failures:
        raise errors.DistributedSaveError(
            f"{where} failed while capturing the state on rank(s) {sorted(failures)}: "
            + "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
            + " — nothing was written or committed (no temp folder), earlier checkpoints are "
            "intact, and every rank is still in step: fix the cause and save again.",
            failures=failures,
            path=root,
            step=step,
        ) from own_exc
    if not alone:
        shared = planning.shared_keys([digests for _, digests in reports])
    try:
        plan = planning.plan_save(rank, skeleton, list(live), shared=shared, shards=shards)
        local = {
            key: collectives.local_tensor(live[src]) if src in shards else live[src]
            for key, src in plan.sources.items()
        }
        return Prepared(plan.skeleton, stage(local), plan.chunk_meta, full_info)
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator by persist()
        _raise_alone(group, exc)  # one process: staged on this thread, raised here as before
        return Prepared(None, {}, {}, full_info, f"{type(exc).__name__}: {exc}", exc)


def on_disk(root: Path | Store, step: int, run_id: str) -> Path | Location | None:
    """The committed checkpoint of ``step`` of this run if its manifest is on disk and valid."""
    store = as_store(root)
    final = Location(store, layout.step_dir(step))
    try:
        m = reader.read_manifest(final)
    except (errors.CheckpointError, OSError):
        return None
    return (final.local or final) if m.step == step and m.run_id == run_id else None


def _disk_status(root: Path | Store, step: int, run_id: str) -> str:
    """What a failed save left, read from the disk (not assumed from where it failed)."""
    final = on_disk(root, step, run_id)
    if final is not None:
        return (
            f"step {step} IS committed at {final} (its manifest is on disk and valid; "
            f"`savegame verify {final}` checks every byte) and a restart resumes from it"
        )
    return f"nothing was committed for step {step}; earlier checkpoints are intact"


def _discard(staging: Staging) -> None:
    """Remove an uncommitted staging area, best effort (never listed: a leftover is collected
    by the next writer anyway). The protocol's only deletion."""
    staging.abort()


def persist(
    group: collectives.Group | collectives.LocalGroup,
    root: Path | Store,
    step: int,
    prepared: Prepared,
    *,
    run_id: str,
    metrics: Mapping[str, float],
    incremental: bool = False,
    previous: str | None = None,
) -> Path | Location:
    """Write this rank's file and take part in the commit. Every rank; may run on a
    background thread (``group`` must then be used by that thread only).

    ``incremental``: every rank compares its own tensors with the earlier checkpoint
    (``previous``, the folder this process committed last, else the one ``LATEST`` names; see
    :func:`savegame.engine.writer.find_previous`) and writes only those whose bytes changed.

    Returns:
        The committed checkpoint folder (on every rank).

    Raises:
        DistributedSaveError: some rank failed or died (``.failures`` names them); nothing
            was committed and the temp folder was removed (by rank 0, if it survived).
            A single process (:class:`~collectives.LocalGroup`) raises its own error instead
            (``StorageError``, ``StepExistsError``, ``OSError``...), after the same clean-up.
    """
    rank = group.rank
    root = as_store(root)
    where = f"distributed save of step {step} in {root.describe()}"
    opened: tuple[str, str] = ("ok", "")
    mine: Staging | None = None
    if rank == 0:
        try:
            mine = writer.begin(root, step, layout.step_dir(step))  # where commit publishes
            opened = ("ok", mine.name)
        except OSError as exc:
            why = f"could not create the temp folder in {root.describe()}: {exc}"
            gone = isinstance(exc, FileNotFoundError) and not _run_folder_exists(root)
            after = (
                "the run folder itself is gone (deleted or moved while the run was open): "
                "its checkpoints went with it; close this Checkpointer and open the folder again"
                if gone
                else "earlier checkpoints are intact"
            )
            err = errors.StorageError(
                f"{why}; nothing was committed for step {step}, {after}",
                path=root.describe(),
                step=step,
            )
            err.__cause__ = exc
            _raise_alone(group, err)
            opened = ("fail", why)
    try:
        status, name = group.broadcast(opened, what=where)
    except errors.DistributedSaveError as exc:
        if mine is not None:
            _discard(mine)
        raise _with_disk_status(exc, root, step, run_id) from exc
    if status != "ok":
        raise errors.DistributedSaveError(
            f"{where} failed on rank 0: {name}", failures={0: name}, path=root.describe(), step=step
        )
    tmp = mine
    if tmp is None:
        try:
            tmp = writer.join(root, name)
        except OSError as exc:  # reported to the coordinator like a failed write
            prepared = replace(prepared, error=f"could not join {name}: {exc}", exc=exc)
    try:
        prev = (
            writer.find_previous(root, step, run_id, previous, group.rank) if incremental else None
        )
        return _write_and_commit(
            group, root, tmp, step, prepared, run_id=run_id, metrics=metrics, previous=prev
        )
    except BaseException:
        if mine is not None:  # an interrupt (or a bug) mid-save: no temp folder stays behind
            _discard(mine)
        raise


def _write_and_commit(
    group: collectives.Group | collectives.LocalGroup,
    root: Store,
    tmp: Staging | None,
    step: int,
    prepared: Prepared,
    *,
    run_id: str,
    metrics: Mapping[str, float],
    previous: writer.Previous | None = None,
) -> Path | Location:
    rank = group.rank
    where = f"distributed save of step {step} in {root.describe()}"
    report: tuple[str, Any, Any]
    own_exc = prepared.exc
    if prepared.error is not None or tmp is None:
        report = ("fail", prepared.error, None)
    else:
        try:
            result = writer.write_rank_files(
                tmp,
                rank,
                prepared.staged,
                chunk_meta=prepared.chunk_meta,
                previous=previous,
                scrub_turn=int(prepared.info.get("index", 0)),
            )
            report = ("ok", result, prepared.skeleton)
        except Exception as exc:  # noqa: BLE001 - any failure on this rank must reach the coordinator
            own_exc = exc
            report = ("fail", f"{type(exc).__name__}: {exc}", None)
    try:
        reports = group.gather_to_root(report, what=where)  # only the coordinator reads them
    except errors.DistributedSaveError as exc:
        if tmp is not None and rank == 0:
            _discard(tmp)
        raise _with_disk_status(exc, root, step, run_id) from exc
    decision: tuple[str, Any] = ("ok", "")
    if rank == 0:
        assert tmp is not None and reports is not None  # rank 0 created it; it gathers
        failures = {r: str(rep[1]) for r, rep in enumerate(reports) if rep[0] != "ok"}
        decision, commit_exc = _commit(
            root, tmp, step, reports, failures, run_id=run_id, metrics=metrics, info=prepared.info
        )
        own_exc = own_exc or commit_exc
    try:
        status, payload = group.broadcast(decision, what=where)
    except errors.DistributedSaveError as exc:
        # A rank died after reporting, while rank 0 committed: the step may well be on disk.
        raise _with_disk_status(exc, root, step, run_id) from exc
    if status == "ok":
        if report[0] == "ok":
            writer.committed(root, payload, run_id, report[1])
        return root.local_path(payload) or Location(root, payload)
    _raise_alone(group, own_exc)
    failed: dict[int, str] = dict(payload)
    raise errors.DistributedSaveError(
        f"{where} failed on rank(s) {sorted(failed)}: "
        + "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        + f" — {_disk_status(root, step, run_id)}. Fix the cause and save again.",
        failures=failed,
        path=root.describe(),
        step=step,
    )


def _with_disk_status(
    exc: errors.DistributedSaveError, root: Store, step: int, run_id: str
) -> errors.DistributedSaveError:
    """``exc`` (a lost or hung rank) re-worded with what the disk holds for ``step``."""
    return errors.DistributedSaveError(
        f"{exc.message}. On disk: {_disk_status(root, step, run_id)}.",
        failures=exc.failures,
        path=root.describe(),
        step=step,
    )


def _commit(
    root: Store,
    tmp: Staging,
    step: int,
    reports: Sequence[tuple[str, Any, Any]],
    failures: dict[int, str],
    *,
    run_id: str,
    metrics: Mapping[str, float],
    info: Mapping[str, Any],
) -> tuple[tuple[str, Any], errors.CheckpointError | None]:
    """Rank 0 only: commit if every rank succeeded, else remove the temp folder. Returns the
    decision to broadcast and the commit's own error, if it failed."""
    commit_exc: errors.CheckpointError | None = None
    if not failures:
        results = [rep[1] for rep in reports]
        trees = [rep[2] for rep in reports]
        written = {k for r in results for k in r.tensors}
        for r, keys in planning.unwritten_keys(trees, written).items():
            failures[r] = (
                f"its state refers to tensors no rank wrote: {keys[:5]} (state differs between ranks?)"
            )
    if not failures:
        try:
            writer.commit(
                root, tmp, step, results, trees=trees, run_id=run_id, metrics=metrics, info=info
            )
            return ("ok", layout.step_dir(step)), None
        except errors.CheckpointError as exc:
            commit_exc = exc
            failures[0] = f"commit failed: {exc}"
    _discard(tmp)
    return ("fail", failures), commit_exc


from savegame.distributed.loading import load_state, restore  # noqa: E402 - the restore half
