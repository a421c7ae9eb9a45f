"""Who writes what, and who reads what: pure functions over plain data, no collectives.

Save rule ("written once" is decided by content, not by type):

* **Sharded** tensors (DTensor, e.g. FSDP2 parameters and their optimizer moments) are written
  by the ranks that own a piece, as chunks of one manifest entry with their global offsets.
  A piece replicated over a mesh dimension (HSDP) is written by coordinate 0 of that dimension.
* Every other tensor whose bytes (dtype, shape and content hash) are **equal on every rank** is
  written **once, by rank 0**, under its plain key (DDP parameters, optimizer moments, an RNG
  state seeded alike); the ranks agree on that set before anything is written
  (:func:`shared_keys` over the gathered digests).
* A tensor that **differs** between ranks (BatchNorm running statistics under DDP, per-rank RNG
  streams, loader positions) is written by every rank under the key prefix ``@rankNNNNN/``; each
  rank's manifest tree points at its own keys.

Restore rule: on the same world size every rank gets back its own tree (its own per-rank
tensors, the shared ones, its pieces). On a different world size, sharded and shared state is
resharded from the chunks' offsets; an extras dict that was equal on every saved rank restores
everywhere; per-rank state cannot be mapped (4 loader positions do not describe 2 ranks' data,
4 sets of BatchNorm statistics are not one) and raises :class:`~savegame.errors.RestoreError`,
unless the caller passes ``per_rank="fresh"``: per-rank *objects* (RNG, loaders, custom
``Stateful``) are then left as the program constructed them, and per-rank *tensors inside* a
model, optimizer, scheduler or scaler are taken from rank 0 (a module must be loaded whole; any
rank's statistics are a valid estimate, and DDP itself broadcasts rank 0's buffers); a warning
names both.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from savegame import errors
from savegame import tree as treelib
from savegame.engine import reader

__all__ = [
    "RANK_PREFIX",
    "RestorePlan",
    "SavePlan",
    "ShardInfo",
    "chunks_for_region",
    "plan_restore",
    "plan_save",
    "rank_key",
    "rename_tensors",
    "shared_keys",
    "source_key",
    "strip_wrapper_prefix",
    "tensor_refs",
    "unwritten_keys",
]

RANK_PREFIX = "@rank"
#: The key prefix ``DistributedDataParallel.state_dict()`` adds to its module's keys.
WRAPPER_PREFIX = "module."
PerRankMode = Literal["strict", "fresh"]


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """Where this rank's local piece of a sharded tensor lies in the global tensor.

    ``writer`` is False on ranks holding a *replica* of a piece another rank also holds (a
    ``Replicate`` mesh dimension): only one copy is written.
    """

    global_shape: tuple[int, ...]
    start: tuple[int, ...]
    shape: tuple[int, ...]
    writer: bool


@dataclass(frozen=True, slots=True)
class SavePlan:
    """One rank's part of a save.

    Attributes:
        skeleton: This rank's state tree as the manifest stores it (per-rank keys renamed).
        sources: Manifest key -> key of the encoded state, for the tensors this rank writes.
        chunk_meta: Manifest key -> (global shape, start) for the sharded tensors it writes.
    """

    skeleton: Any
    sources: dict[str, str]
    chunk_meta: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """One rank's part of a restore.

    Attributes:
        skeleton: The tree to decode: ``{name: subtree}`` for the names restored.
        keys: Manifest tensor keys the skeleton refers to.
        fresh: Names left as constructed (``per_rank="fresh"`` on a world-size change).
        from_rank0: Per-rank tensors inside replicated objects (state keys) read from rank 0's
            share (``per_rank="fresh"`` on a world-size change).
    """

    skeleton: dict[str, Any]
    keys: tuple[str, ...]
    fresh: tuple[str, ...]
    from_rank0: tuple[str, ...] = ()


def rank_key(rank: int, key: str) -> str:
    """Manifest key of a per-rank tensor."""
    return f"{RANK_PREFIX}{rank:05d}/{key}"


def source_key(key: str) -> str:
    """The state key of a manifest key (``@rank00001/rng/torch`` -> ``rng/torch``)."""
    if key.startswith(RANK_PREFIX) and "/" in key:
        return key.split("/", 1)[1]
    return key


def top_name(key: str) -> str:
    return treelib.split_key(key)[0]


def shared_keys(digests: Sequence[Mapping[str, str]]) -> set[str]:
    """Keys whose digest is the same on every rank (written once); ``digests`` by rank.

    A key missing on some rank (e.g. optimizer state created on one rank only) is not shared.
    """
    if not digests:
        return set()
    first, rest = digests[0], digests[1:]
    return {k for k, d in first.items() if all(other.get(k) == d for other in rest)}


def plan_save(
    rank: int,
    skeleton: Any,
    keys: Sequence[str],
    *,
    shared: Collection[str],
    shards: Mapping[str, ShardInfo],
) -> SavePlan:
    """Which of this rank's encoded tensors it writes, under which manifest keys.

    Args:
        rank: This rank.
        skeleton: Its encoded state tree (:func:`savegame.tree.encode`).
        keys: Keys of its encoded tensors.
        shared: Keys equal on every rank (:func:`shared_keys`; the same set on every rank):
            written once, by rank 0. Every other non-sharded key is written per rank.
        shards: For sharded (DTensor) keys, this rank's piece.
    """
    sources: dict[str, str] = {}
    chunk_meta: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    renames: dict[str, str] = {}
    for key in keys:
        if key in shards:
            info = shards[key]
            if info.writer:
                sources[key] = key
                chunk_meta[key] = (info.global_shape, info.start)
        elif key in shared:
            if rank == 0:
                sources[key] = key
        else:
            renames[key] = rank_key(rank, key)
            sources[renames[key]] = key
    return SavePlan(rename_tensors(skeleton, renames), sources, chunk_meta)


def rename_tensors(skeleton: Any, renames: Mapping[str, str]) -> Any:
    """``skeleton`` with its ``$tensor``/``$ndarray`` references renamed."""
    if not renames:
        return skeleton
    if isinstance(skeleton, dict):
        if len(skeleton) == 1:
            ((tag, value),) = skeleton.items()
            if tag in ("$tensor", "$ndarray") and isinstance(value, str):
                return {tag: renames.get(value, value)}
        return {k: rename_tensors(v, renames) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [rename_tensors(v, renames) for v in skeleton]
    return skeleton


def tensor_refs(skeleton: Any) -> list[str]:
    """Every tensor key a skeleton refers to."""
    out: list[str] = []
    stack = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if len(node) == 1:
                ((tag, value),) = node.items()
                if tag in ("$tensor", "$ndarray") and isinstance(value, str):
                    out.append(value)
                    continue
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def unwritten_keys(trees: Sequence[Any], written: Collection[str]) -> dict[int, list[str]]:
    """Rank -> tensor keys its tree refers to that no rank wrote (coordinator's last check)."""
    out: dict[int, list[str]] = {}
    # One set for every rank (it grows with the ranks' keys: rebuilt per rank it was O(N^2),
    # 2 s of the coordinator's commit at 4,096 ranks — docs/scale.md).
    written = written if isinstance(written, (set, frozenset)) else set(written)
    for rank, tree in enumerate(trees):
        missing = sorted(k for k in set(tensor_refs(tree)) if k not in written)
        if missing:
            out[rank] = missing
    return out


def plan_restore(
    trees: Sequence[Any],
    *,
    rank: int,
    world: int,
    replicated: Collection[str],
    extras: Collection[str],
    per_rank: PerRankMode,
    where: str,
) -> RestorePlan:
    """This rank's tree and tensor keys, for a checkpoint of ``len(trees)`` ranks.

    Raises:
        RestoreError: the world size changed and per-rank state cannot be mapped
            (``per_rank="strict"``); the message lists the objects and the way out.
    """
    if per_rank not in ("strict", "fresh"):
        raise ValueError(f"per_rank={per_rank!r}: use 'strict' or 'fresh'")
    saved_world = len(trees)
    if saved_world == world:
        tree = trees[rank]
        return RestorePlan(dict(tree), tuple(dict.fromkeys(tensor_refs(tree))), ())
    base = trees[0]
    skeleton: dict[str, Any] = {}
    blocked: list[str] = []
    mixed: list[str] = []  # per-rank tensors inside replicated objects (state keys)
    for name, sub in base.items():
        if name in replicated:
            skeleton[name] = sub
            mixed += [source_key(k) for k in tensor_refs(sub) if k.startswith(RANK_PREFIX)]
        elif name in extras and all(_same(t.get(name), sub) for t in trees):
            # Equal skeletons on every rank: any tensor in it is shared (a per-rank key would
            # differ by its rank prefix), so it restores anywhere.
            skeleton[name] = sub
        else:
            blocked.append(name)
    mixed = sorted(set(mixed))
    if (blocked or mixed) and per_rank == "strict":
        parts = []
        if blocked:
            parts.append(
                f"per-rank state {blocked} (RNG streams, data-loader positions, custom Stateful "
                "objects, extras that differ per rank)"
            )
        if mixed:
            shown = ", ".join(mixed[:5]) + (f" and {len(mixed) - 5} more" if len(mixed) > 5 else "")
            parts.append(
                f"{len(mixed)} tensor(s) that differed between the saved ranks ({shown}; e.g. "
                "BatchNorm running statistics under DDP)"
            )
        raise errors.RestoreError(
            f"{where} was saved by {saved_world} ranks and this job has {world}: "
            + " and ".join(parts)
            + " cannot be mapped onto a different number of ranks. Restore with the original "
            f"world size ({saved_world}), or pass per_rank='fresh' to restore the model, optimizer, "
            "scheduler and equal extras (tensors that differed per rank taken from rank 0) and "
            "leave per-rank objects as your program constructed them (re-seed and rebuild "
            "loaders for the new world size).",
            path=where,
        )
    return RestorePlan(
        skeleton, tuple(dict.fromkeys(tensor_refs(skeleton))), tuple(blocked), tuple(mixed)
    )


def strip_wrapper_prefix(sub: Any, prefix: str = WRAPPER_PREFIX) -> Any:
    """A module state tree saved through a wrapper (DDP's ``module.``) as the bare module's.

    ``sub`` is a skeleton (or state dict) of one object; when it is a dict whose keys *all*
    start with ``prefix`` the prefix is removed, otherwise it is returned unchanged (an
    optimizer's ``state``/``param_groups`` never match).
    """
    if (
        isinstance(sub, dict)
        and sub
        and all(isinstance(k, str) and k.startswith(prefix) for k in sub)
    ):
        return {k[len(prefix) :]: v for k, v in sub.items()}
    return sub


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def chunks_for_region(
    chunks: Sequence[Any], start: Sequence[int], shape: Sequence[int]
) -> list[Any]:
    """The chunks of a tensor entry that overlap the region ``start``/``shape`` (read plan)."""
    return [c for c in chunks if reader.overlap(c.start, c.shape, start, shape) is not None]
