"""The only module that talks to ``torch.distributed``: rank detection, a dedicated gloo
coordination group, and the few collectives a distributed save and restore need.

Invariant: every collective here runs on :class:`Group`'s own gloo group, created with a
timeout (:data:`DEFAULT_TIMEOUT_S`, or ``SAVEGAME_DIST_TIMEOUT_S`` in the environment), so
checkpoint coordination never queues behind (or blocks) the training group (NCCL on GPU), and
no coordination step waits longer than that timeout. When a collective fails because a rank
died or hung, the surviving ranks learn which ranks reported in through the rendezvous store
and raise :class:`~savegame.errors.DistributedSaveError` naming the others.

One process without ``torch.distributed`` runs the same save protocol over :class:`LocalGroup`,
the no-op group of world size 1 (a broadcast or gather returns its input), so a single process
and many take one code path.

Objects sent between ranks (write results, failure messages) travel with
``all_gather_object`` / ``broadcast_object_list``: process-to-process messages within one job,
never written to a file.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from savegame import errors
from savegame.distributed import planning

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Group",
    "LocalGroup",
    "dtensor_like",
    "group",
    "init_optimizer_state",
    "initialized",
    "is_dtensor",
    "local_tensor",
    "rank_and_world",
    "shard_info",
]

#: Seconds any coordination step (broadcast of the temp folder, gather of write results,
#: broadcast of the commit decision) may wait for the slowest rank before the save is declared
#: failed. Override with the ``SAVEGAME_DIST_TIMEOUT_S`` environment variable (same value on
#: every rank). It bounds a *hung* rank; a *dead* rank (its sockets closed) fails at once.
DEFAULT_TIMEOUT_S = 300.0

# After a collective failed: how long to wait for the other ranks' check-in keys in the store
# before naming the missing ones as failed (they were alive moments ago or never will be).
_GRACE_S = 2.0


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name`` (``default`` if unset);
    ValueError naming the variable otherwise."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def timeout_s() -> float:
    """The coordination timeout in force (see :data:`DEFAULT_TIMEOUT_S`)."""
    return seconds_from_env("SAVEGAME_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def initialized() -> bool:
    """True when a default process group exists (under torchrun), whatever its size."""
    return bool(dist.is_available() and dist.is_initialized())


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Group:
    """The checkpoint coordination group: every rank creates one, in the same order.

    Creating it is itself a collective (``new_group``) on the default group: every rank must
    construct its :class:`~savegame.Checkpointer` at the same point of the program.

    Args:
        timeout: Seconds per coordination step; default :func:`timeout_s`.
    """

    _created = 0
    #: Backed by a torch.distributed process group (False only for :class:`LocalGroup`).
    distributed = True

    def __init__(self, timeout: float | None = None) -> None:
        self.rank, self.world = rank_and_world()
        self.timeout = timeout_s() if timeout is None else float(timeout)
        self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        self._seq = 0
        # Groups are created in the same order on every rank, so this count names the same
        # group everywhere and keeps the check-in keys of two groups apart.
        Group._created += 1
        try:
            store = dist.distributed_c10d._get_default_store()
            self._store: Any = dist.PrefixStore(f"savegame/{Group._created}", store)
        except Exception:  # noqa: BLE001 - attribution is best effort; collectives still work
            self._store = None

    # ---- collectives (every rank) --------------------------------------------------------------
    def broadcast(self, obj: Any, *, what: str) -> Any:
        """Rank 0's ``obj`` on every rank (every rank calls; others pass anything)."""
        box = [obj]
        self._run(lambda: dist.broadcast_object_list(box, src=0, group=self._pg), what)
        return box[0]

    def gather(self, obj: Any, *, what: str) -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank."""
        out: list[Any] = [None] * self.world
        self._run(lambda: dist.all_gather_object(out, obj, group=self._pg), what)
        return out

    def gather_to_root(self, obj: Any, *, what: str) -> list[Any] | None:
        """Every rank's ``obj``, by rank, on rank 0 only (None elsewhere): what only the
        coordinator reads is not sent to, and unpickled by, every rank (docs/scale.md)."""
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self._run(lambda: dist.gather_object(obj, out, dst=0, group=self._pg), what)
        return out

    def broadcast_ints(self, values: list[int], *, what: str) -> list[int]:
        """Rank 0's small int vector on every rank (cheap: one gloo broadcast of a tensor)."""
        t = torch.tensor(values, dtype=torch.int64)
        self._run(lambda: dist.broadcast(t, src=0, group=self._pg), what)
        return [int(v) for v in t.tolist()]

    def max_int(self, value: int, *, what: str) -> int:
        """The largest of every rank's ``value`` (one all-reduce of one int)."""
        return self.max_ints([value], what=what)[0]

    def max_ints(self, values: list[int], *, what: str) -> list[int]:
        """Element-wise largest of every rank's small int vector (one all-reduce): what any
        rank raises reaches all of them, at the cost of one broadcast."""
        t = torch.tensor(values, dtype=torch.int64)
        self._run(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._pg), what)
        return [int(v) for v in t.tolist()]

    def _run(self, fn: Any, what: str) -> None:
        self._seq += 1
        seq = self._seq
        self._check_in(seq)
        try:
            fn()
        except (RuntimeError, ValueError) as exc:  # gloo raises RuntimeError / DistBackendError
            failures = self._missing(seq, exc)
            raise errors.DistributedSaveError(
                f"{what}: rank(s) {sorted(failures)} did not report within the coordination timeout "
                f"({self.timeout:g}s, SAVEGAME_DIST_TIMEOUT_S) or died. Restart the job (torchrun "
                f"restarts all ranks) to resume from the newest complete checkpoint. "
                f"Cause on rank {self.rank}: {type(exc).__name__}: {exc}",
                failures=failures,
            ) from exc

    def _check_in(self, seq: int) -> None:
        if self._store is None:
            return
        try:
            self._store.set(f"{seq}/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - a dead store shows up in the collective itself
            pass

    def _missing(self, seq: int, exc: BaseException) -> dict[int, str]:
        """Ranks that never checked in to step ``seq`` (dead or hung), by the store."""
        others = [r for r in range(self.world) if r != self.rank]
        if self._store is None:
            return {r: f"unknown (no store to tell who failed): {exc}" for r in others}
        deadline = time.monotonic() + _GRACE_S
        missing = list(others)
        while missing:
            try:
                missing = [r for r in missing if not self._store.check([f"{seq}/{r}"])]
            except Exception:  # noqa: BLE001 - the store lives on a rank that is gone
                return {r: f"unreachable (the rendezvous store is gone): {exc}" for r in missing}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not missing:  # everyone checked in, then a connection broke: blame is unknowable
            return {r: f"connection lost during the collective: {exc}" for r in others}
        return {r: "did not report (process died or hung)" for r in missing}

    def destroy(self) -> None:
        """Release the gloo group (every rank; optional — process exit does it too)."""
        try:
            dist.destroy_process_group(self._pg)
        except Exception:  # noqa: BLE001 - teardown after a failed rank may fail; nothing to do
            pass


class LocalGroup:
    """The no-op coordination group of a process without torch.distributed (world size 1).

    It has :class:`Group`'s methods, each returning what this one rank contributed, so one
    process runs the distributed save protocol unchanged: nothing to wait for, nothing that can
    time out. The protocol raises a failure here as it is (there is no other rank to tell).
    """

    distributed = False
    rank = 0
    world = 1
    timeout = 0.0

    def broadcast(self, obj: Any, *, what: str) -> Any:
        return obj

    def gather(self, obj: Any, *, what: str) -> list[Any]:
        return [obj]

    def gather_to_root(self, obj: Any, *, what: str) -> list[Any] | None:
        return [obj]

    def broadcast_ints(self, values: list[int], *, what: str) -> list[int]:
        return [int(v) for v in values]

    def max_int(self, value: int, *, what: str) -> int:
        return int(value)

    def max_ints(self, values: list[int], *, what: str) -> list[int]:
        return [int(v) for v in values]

    def destroy(self) -> None:
        pass


def group() -> Group | LocalGroup:
    """A coordination group: :class:`Group` under torch.distributed (a collective: every rank
    calls it at the same point), else :class:`LocalGroup`."""
    return Group() if initialized() else LocalGroup()


# ---- DTensor / FSDP2 -----------------------------------------------------------------------------
def is_dtensor(t: Any) -> bool:
    # No DTensor can exist before its module was imported: a plain process never pays that
    # import (or the isinstance) on its save path.
    if "torch.distributed.tensor" not in sys.modules:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def shard_info(t: Any) -> planning.ShardInfo:
    """Global shape, this rank's offset and local shape of a DTensor.

    Raises:
        EncodeError: a ``Partial`` placement (pending reduction) cannot be checkpointed.
    """
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = t.device_mesh
    if any(isinstance(p, Partial) for p in t.placements):
        raise errors.EncodeError(
            f"a DTensor with a Partial placement {t.placements} holds unreduced values; reduce it "
            "(redistribute to Shard/Replicate) before saving"
        )
    shape, start = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    coord = mesh.get_coordinate() or []
    writer = all(coord[i] == 0 for i, p in enumerate(t.placements) if isinstance(p, Replicate))
    return planning.ShardInfo(
        tuple(t.shape), tuple(int(s) for s in start), tuple(int(s) for s in shape), writer
    )


def local_tensor(t: Any) -> torch.Tensor:
    """This rank's local piece of a DTensor (a plain tensor, no copy)."""
    local: torch.Tensor = t.to_local()
    return local


def dtensor_like(template: Any, local: torch.Tensor) -> Any:
    """A DTensor with ``template``'s mesh and placements around ``local`` (this rank's piece)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.to(template.device), template.device_mesh, template.placements,
        run_check=False, shape=template.shape, stride=template.stride(),
    )  # fmt: skip


def init_optimizer_state(optimizer: Any) -> None:
    """Materialize an optimizer's lazily created state (Adam moments) with the right DTensor
    placements, so a restore has live tensors to reshard into. Every rank."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)
