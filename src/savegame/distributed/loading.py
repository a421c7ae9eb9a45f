"""The distributed restore: every rank reads and verifies its own share of a checkpoint, and
the ranks agree that every share verified before any byte reaches a live tensor.

Split from :mod:`.protocol` (the save) to keep each half readable; ``protocol.load_state`` and
``protocol.restore`` remain the entry points.

Invariant: a rank copies into its live tensors only after every rank reported that its share
read and verified (a corrupt shard on one rank leaves every rank's state untouched, and every
rank falls back to the same earlier checkpoint).
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from savegame import errors
from savegame import state as statelib
from savegame import tree as treelib
from savegame.distributed import collectives, planning, wrappers
from savegame.distributed.wrappers import (
    extras_names,
    match_wrapper_keys,
    replicated_names,
    unwrapped,
)
from savegame.engine import reader
from savegame.format import manifest
from savegame.state import overrides

__all__ = ["load_state", "restore", "skip_or_raise"]


def load_state(
    path: Path,
    m: manifest.Manifest,
    state: statelib.TrainState,
    *,
    rank: int,
    world: int,
    per_rank: planning.PerRankMode,
    before_copy: Callable[[], None] | None = None,
    opts: overrides.RestoreOptions = overrides.EVERYTHING,
) -> Callable[[], tuple[planning.RestorePlan, overrides.RestoreReport]]:
    """Read and verify this rank's share of a checkpoint; returns a function that applies it
    (and says what it applied). Only the parts ``opts`` selects are read and applied.

    ``before_copy`` runs once this rank's share is verified and before any byte is copied
    into a live tensor (shards are filled in place): :func:`restore` makes every rank agree
    there, so a share that fails on one rank never leaves another rank half-restored.

    Raises:
        FormatError, StorageError: the checkpoint is damaged (try an earlier one).
        RestoreError: it does not fit ``state`` (world size change with per-rank state, shapes),
            or ``opts`` names a part that does not exist.
    """
    from savegame.distributed.protocol import INFO_KEY  # protocol imports this module

    dinfo = m.info.get(INFO_KEY) if isinstance(m.info.get(INFO_KEY), dict) else {}
    replicated = dinfo.get("replicated", replicated_names(state))
    extras = dinfo.get("extras", extras_names(state))
    plan = planning.plan_restore(
        m.trees,
        rank=rank,
        world=world,
        replicated=replicated,
        extras=extras,
        per_rank=per_rank,
        where=str(path),
    )
    view = unwrapped(state)
    sel = overrides.select(opts, view, plan.skeleton, where=str(path), ignore=plan.fresh)
    chosen = sel.skeleton(plan.skeleton)
    keys = plan.keys if opts.default else tuple(dict.fromkeys(planning.tensor_refs(chosen)))
    names = [n for n in state if n in chosen]
    if opts.default:  # the objects by name, before anything is read (an extra live one too)
        statelib.check_names(
            [n for n in state if n not in plan.fresh],
            {n: None for n in plan.skeleton if n not in plan.fresh},
            where=str(path),
        )
    sub: Any = wrappers.View({n: view[n] for n in names}, state.rng and statelib.RNG_KEY in chosen)
    captured = statelib.capture(sub, loaders=False)  # live tensors only: no loader iterator built
    skeleton = match_wrapper_keys(sub, chosen)
    in_place = {n for n in names if sel.in_place(n, view[n])}
    _, live = treelib.encode(captured)
    regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    templates: dict[str, Any] = {}

    def optimizer_part(key: str) -> bool:
        name = planning.top_name(planning.source_key(key))
        return name in names and isinstance(view[name], torch.optim.Optimizer)

    # Modules before optimizers: a resized layer is refused under its own name, not under the
    # name of the first Adam moment of that layer (stop 18, R14).
    for key in sorted(keys, key=optimizer_part):
        t = live.get(planning.source_key(key))
        if t is None or not collectives.is_dtensor(t):
            continue
        info = collectives.shard_info(t)
        stored = m.tensors[key].shape if key in m.tensors else None
        if stored is not None and tuple(stored) != info.global_shape:
            # (strict=False cannot skip it: this rank's region of a tensor of another shape
            # is undefined, and the reader is already planning to read it.)
            raise errors.RestoreError(
                f"{path}: tensor {key!r} is {list(stored)} in the checkpoint but {list(info.global_shape)} "
                "in this model; build the same model before restoring (a sharded tensor of another "
                "shape is refused even with strict=False: skip=[...] its object instead)",
                path=path,
                key=key,
            )
        regions[key] = (info.start, info.shape)
        templates[key] = t
    if opts.strict:
        # Every module's keys and shapes and every optimizer's groups, from the manifest, before
        # a byte is read into a live tensor (the reader fills them in place): a RestoreError here
        # reaches every rank through the agreement, and no rank is half-restored.
        check_fit(sub, skeleton, m, where=str(path))

    def dest(key: str, entry: manifest.TensorEntry) -> torch.Tensor | None:
        t = live.get(planning.source_key(key))
        if planning.top_name(planning.source_key(key)) not in in_place:
            return None  # a part left alone (or that may not fit) is never read into
        if key in templates:  # this rank's shard: read straight into the live local tensor
            local = collectives.local_tensor(t)
            return local if local.is_contiguous() and not local.requires_grad else None
        ok = t is not None and not collectives.is_dtensor(t) and reader.fits(t, entry)
        return t if ok else None

    tensors = reader.load_tensors(
        path, m, keys, dest=dest, regions=regions, before_copy=before_copy
    )
    for key, template in templates.items():
        if tensors[key].data_ptr() == collectives.local_tensor(template).data_ptr():
            tensors[key] = template  # filled in place: loading it is a copy onto itself (no-op)
        else:
            tensors[key] = collectives.dtensor_like(template, tensors[key])
    tree = treelib.decode(skeleton, tensors)

    def apply() -> tuple[planning.RestorePlan, overrides.RestoreReport]:
        return plan, overrides.apply(sub, tree, sel, where=str(path))

    return apply


def check_fit(
    state: statelib.TrainState, skeleton: dict[str, Any], manifest: Any, *, where: str
) -> None:
    """Each module of ``state`` against its saved keys and shapes, and each optimizer against
    its saved groups and moments (from the manifest: shapes only, nothing read)."""
    names = set(state)
    skeleton = match_wrapper_keys(state, skeleton)  # as restore_whole applies it
    for name, part in skeleton.items():
        if name not in names or not isinstance(part, dict):
            continue
        if isinstance(statelib.bare(state[name]), torch.optim.Optimizer):
            shapes = {
                k: torch.empty(tuple(manifest.tensors[k].shape), device="meta")
                for k in planning.tensor_refs(part)
                if k in manifest.tensors
            }
            try:
                saved = treelib.decode(part, shapes, path=where)
            except errors.FormatError:
                raise  # a damaged skeleton: as the read below would say
            except (TypeError, ValueError, RuntimeError):  # a numpy moment of a custom
                continue  # optimizer, say: torch's own check, after the read
            statelib.check_optimizer_fits(state[name], saved, name=name, where=where)
            continue
        entries = {
            k: manifest.tensors.get(v["$tensor"], v)
            if isinstance(v, dict) and "$tensor" in v
            else v
            for k, v in part.items()
        }
        statelib.check_module_fits(state[name], entries, name=name, where=where)


_OTHER_RANK = "another rank could not use its share of this checkpoint"


def skip_or_raise(
    refs: Sequence[reader.CheckpointRef],
    i: int,
    exc: BaseException | None,
    skip: Callable[[Path, BaseException | None], None],
) -> None:
    """Restore could not use ``refs[i]``: go on to the next older candidate (``skip``), unless
    the checkpoint could not be *read* — a :class:`~savegame.errors.StorageError` (a 503 after
    the store's retries, EIO, access denied, no room to stage) says nothing about its bytes —
    and no other copy of its step comes next (a two-tier run lists the remote copy before the
    cache copy). Falling back to an older step then would resume behind the run's newest work
    (and refuse to save that step later): raise instead, so the job fails and is retried.
    Damage (:class:`~savegame.errors.FormatError`) is proven, so restore falls back past it."""
    ref = refs[i]
    if isinstance(exc, errors.StorageError) and not (i > 0 and refs[i - 1].step == ref.step):
        raise errors.StorageError(
            f"could not read checkpoint {ref.path} (step {ref.step}): {exc}. Nothing was "
            "restored: falling back to an older step would lose the training since. Try again "
            "once the storage answers; to resume from an older checkpoint on purpose, pass "
            "restore(step=...)",
            path=ref.path,
            step=ref.step,
        ) from exc
    skip(ref.path, exc)


def restore(
    group: collectives.Group | collectives.LocalGroup | None,
    refs: Sequence[reader.CheckpointRef],
    state: statelib.TrainState,
    *,
    per_rank: planning.PerRankMode,
    skip: Callable[[Path, BaseException | None], None],
    opts: overrides.RestoreOptions = overrides.EVERYTHING,
) -> tuple[reader.CheckpointRef, overrides.RestoreReport] | None:
    """Restore the newest checkpoint of ``refs`` that every rank read and verified. Every rank.

    ``group`` is None in a single process reading a multi-rank checkpoint. ``opts``
    (``only=``/``skip=``/``strict=``, the same on every rank) selects the parts to restore.

    Returns:
        The restored checkpoint and this rank's report of what it applied, or None if none
        was valid.

    Raises:
        RestoreError: a valid checkpoint does not fit the state on some rank (see the message).
        DistributedSaveError: a rank died or hung during the agreement (timeout).
    """
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    refs, unlisted = _agreed_candidates(group, refs)
    initialized = _init_sharded_optimizers(state) if refs else []
    try:
        for i in reversed(range(len(refs))):
            ref = refs[i]
            outcome: tuple[str, str] = ("ok", "")
            own: BaseException | None = None  # this rank's reason not to use ref
            apply: Callable[[], tuple[planning.RestorePlan, overrides.RestoreReport]] | None = None
            what = f"restore of {ref.path}"
            # Exactly one agreement per candidate on every rank: inside the reader (after this
            # rank verified its share, before it copies anything) or, if it failed before
            # getting there, right after.
            agreed: list[int] = []

            def agree(code: int = 0, what: str = what, box: list[int] = agreed) -> None:
                box.append(group.max_int(code, what=what) if group is not None else code)
                if box[0]:
                    raise errors.FormatError(_OTHER_RANK)

            if ref.error is not None or ref.manifest is None:
                # Agreed on like any other failure: a manifest one rank could not read (a 503)
                # while the others could must not send the ranks to different checkpoints.
                own = ref.error or errors.IncompleteCheckpointError(f"{ref.path}: no manifest")
                outcome = (_kind(own), str(own))
            else:
                try:
                    apply = load_state(
                        ref.path,
                        ref.manifest,
                        state,
                        rank=rank,
                        world=world,
                        per_rank=per_rank,
                        before_copy=agree,
                        opts=opts,
                    )
                except errors.CheckpointError as exc:  # damaged, unreadable, missing tensor
                    own, outcome = exc, (_kind(exc), str(exc))
            if not agreed:
                code = {"ok": 0, "unreadable": 1, "skip": 1, "fatal": 2}[outcome[0]]
                agreed.append(group.max_int(code, what=what) if group is not None else code)
            outcomes = [outcome] * world
            if agreed[0] and group is not None:  # something failed somewhere: learn what
                outcomes = group.gather(outcome, what=what)
            fatal = {r: msg for r, (kind, msg) in enumerate(outcomes) if kind == "fatal"}
            if fatal:
                r, msg = min(fatal.items())
                raise errors.RestoreError(
                    msg if r == rank else f"rank {r}: {msg}", path=ref.path, step=ref.step
                )
            bad = {r: (kind, msg) for r, (kind, msg) in enumerate(outcomes) if kind != "ok"}
            if bad:
                # Damage found by any rank is proven (skip); otherwise every rank failed to read
                # (no older step on a guess: skip_or_raise). Name the rank that found it, not
                # one that only heard of it.
                kinds = {kind for kind, msg in bad.values() if msg != _OTHER_RANK}
                kind = "skip" if "skip" in kinds or not kinds else "unreadable"
                r, (_, msg) = min(
                    ((r, km) for r, km in bad.items() if km[0] == kind or km[1] == _OTHER_RANK),
                    key=lambda kv: (kv[1][1] == _OTHER_RANK, kv[0]),
                )
                cls: type[errors.CheckpointError] = errors.FormatError
                if kind == "unreadable":
                    cls = errors.StorageError
                elif r == rank and isinstance(own, errors.FormatError):
                    cls = type(own)  # e.g. a newer format version: never set aside as damage
                quiet = skip if id(ref) not in unlisted else (lambda path, exc: None)
                skip_or_raise(refs, i, cls(f"rank {r}: {msg}", path=ref.path), quiet)
                continue
            assert apply is not None
            plan, report = apply()
            initialized = []
            if plan.fresh or plan.from_rank0:
                said = []
                if plan.fresh:
                    said.append(f"{list(plan.fresh)} left as constructed (not restored)")
                if plan.from_rank0:
                    shown = list(plan.from_rank0[:5])
                    more = len(plan.from_rank0) - len(shown)
                    said.append(
                        f"{len(plan.from_rank0)} tensor(s) that differed between the saved ranks "
                        f"taken from rank 0: {shown}{f' and {more} more' if more else ''}"
                    )
                warnings.warn(
                    f"restored {ref.path} (saved by {ref.manifest.world_size} ranks) on {world} rank(s) with "
                    f"per_rank='fresh': {'; '.join(said)}",
                    UserWarning,
                    stacklevel=3,
                )
            return ref, report
        return None
    finally:
        for opt in initialized:  # nothing was restored: undo the materialized optimizer state
            opt.state = collections.defaultdict(dict)


def _slot(ref: reader.CheckpointRef) -> tuple[int, str]:
    return (ref.step, str(ref.path))


def _agreed_candidates(
    group: collectives.Group | collectives.LocalGroup | None, refs: Sequence[reader.CheckpointRef]
) -> tuple[list[reader.CheckpointRef], set[int]]:
    """The candidates every rank walks, in the same order: the ranks' lists merged by (step,
    where). Ranks list for themselves, and their lists can differ (a manifest one rank could
    not read, a cache copy only some nodes hold); walked by position, the ranks would agree on
    different checkpoints. A candidate this rank did not list is a placeholder that it cannot
    use: unread, so the others go past it only to another copy of its step. Returns the list
    and the ids of the placeholders."""
    refs = list(refs)
    if group is None or not group.distributed:
        return refs, set()
    mine = [_slot(r) for r in refs]
    every = group.gather(mine, what="restore: the checkpoints each rank lists")
    if all(keys == mine for keys in every):
        return refs, set()
    # Order: by step, then by the earliest place a rank lists it among that step's copies (a
    # two-tier run lists the remote copy before the cache copy).
    place: dict[tuple[int, str], int] = {}
    for keys in every:
        for key in keys:
            nth = sum(1 for k in keys[: keys.index(key)] if k[0] == key[0])
            place[key] = min(place.get(key, nth), nth)
    have = {_slot(r): r for r in refs}
    merged, unlisted = [], set()
    for key in sorted(place, key=lambda k: (k[0], place[k], k[1])):
        ref = have.get(key)
        if ref is None:
            ref = reader.CheckpointRef(key[0], Path(key[1]))
            # Unread, not damaged: the others skip it only for another copy of its step
            # (skip_or_raise), never for an older step.
            ref.error = errors.StorageError(
                f"{key[1]} is not among the checkpoints rank {group.rank} lists (a listing "
                "that is not consistent yet, or a copy this node does not hold)",
                path=key[1],
            )
            unlisted.add(id(ref))
        merged.append(ref)
    return merged, unlisted


def _kind(exc: BaseException) -> str:
    """How restore treats a failure: ``fatal`` (does not fit: raised on every rank), ``unreadable``
    (storage failed, nothing known about the checkpoint) or ``skip`` (damaged: the next older)."""
    if isinstance(exc, errors.RestoreError):
        return "fatal"
    return "unreadable" if isinstance(exc, errors.StorageError) else "skip"


def _init_sharded_optimizers(state: statelib.TrainState) -> list[Any]:
    """Materialize empty optimizer state over DTensor parameters so restore has placements."""
    out = []
    for name in state:
        opt = state[name]
        if (
            isinstance(opt, torch.optim.Optimizer)
            and not opt.state
            and any(collectives.is_dtensor(p) for g in opt.param_groups for p in g["params"])
        ):
            with contextlib.suppress(Exception):  # best effort: falls back to plain tensors
                collectives.init_optimizer_state(opt)
                out.append(opt)
    return out
