"""A ``StatefulDataLoader``'s place in its epoch, counted in samples, and that place re-expressed
for a loader with another batch size or another number of worker processes.

Invariants:

- A state restored into a loader with the batch size and the number of workers it was saved
  with is returned as it is (the same object): the bit-exact resume stays torchdata's own.
- Any other state resumes at the *same sample of the same epoch order* — the sampler's state
  (its generator, the samples it has drawn) is carried over untouched and only the batch
  counters are recounted in the new batch size — or it is refused with
  :class:`~savegame.errors.RestoreError` naming what cannot be carried over. It never resumes at
  another sample.
- After a change of batch size the first batch is a full batch of the new size starting at the
  saved sample (not re-aligned to the new size's batch boundaries of the epoch); the epoch's
  last batch holds what is left (dropped when shorter, with ``drop_last=True``).

The keys below are torchdata's (0.8-0.11, ``stateful_dataloader.py``, ``worker.py`` and
``sampler.py``); tests/test_resume_batch_size.py checks them against the installed torchdata.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from savegame import errors

__all__ = [
    "UNSAVED",
    "Batching",
    "Position",
    "Unsaved",
    "batch_size_of",
    "batching",
    "read",
    "translate",
]


class _Unsaved(enum.Enum):
    UNSAVED = "UNSAVED"


#: The batch size of a checkpoint written before savegame recorded it (``None`` is a saved
#: "the loader did not say": a custom batch_sampler without a ``batch_size``).
UNSAVED: Final = _Unsaved.UNSAVED
Unsaved = Literal[_Unsaved.UNSAVED]

# single-process iterator state (and the "main" part of a multi-process snapshot)
INDEX_SAMPLER = "_index_sampler_state"
SAMPLER_ITER = "_sampler_iter_state"
SAMPLER_ITER_YIELDED = "_sampler_iter_yielded"
LEN_CALLED = "_IterableDataset_len_called"
SHARED_SEED = "_shared_seed"
FINISHED = "_iterator_finished"
NUM_YIELDED = "_num_yielded"
FETCHER = "fetcher_state"
DATASET = "dataset_state"
# multi-process iterator state
SNAPSHOT = "_snapshot"
STEPS_SINCE = "_steps_since_snapshot"
SNAPSHOT_STEP = "_snapshot_step"
LAST_WORKER = "_last_yielded_worker_id"
MAIN = "_main_snapshot"
WORKER_STATES = "_worker_snapshots"
NUM_WORKERS = "_num_workers"
BASE_SEED = "_base_seed"
# torchdata's BatchSampler iterator: the samples of the epoch's order drawn so far
SAMPLES_YIELDED = "samples_yielded"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a saved iterator is. A multi-process iterator's state is its last snapshot plus
    ``steps_since`` batches that torchdata re-reads on restore (``snapshot_every_n_steps``)."""

    workers: int  #: worker processes of the saved iterator (0: the single-process format)
    snapshot_batches: int
    snapshot_samples: int | None  #: None: a custom batch_sampler, whose state has no samples
    steps_since: int
    finished: bool  #: the iterator raised StopIteration: nothing of the epoch is left

    @property
    def batches(self) -> int:
        return self.snapshot_batches + self.steps_since

    def samples(self, batch_size: int | None, epoch_samples: int | None) -> int | None:
        """Samples of the epoch's order consumed (``batch_size``: the size saved with)."""
        if self.snapshot_samples is None or (self.steps_since and batch_size is None):
            return None
        done = self.snapshot_samples + self.steps_since * (batch_size or 0)
        return (
            done if epoch_samples is None else min(done, max(epoch_samples, self.snapshot_samples))
        )


@dataclass(frozen=True, slots=True)
class Batching:
    """What a live loader does with a position: the facts :func:`translate` needs."""

    batch_size: int | None  #: None: a custom batch_sampler without a ``batch_size``
    workers: int
    drop_last: bool
    in_samples: bool  #: torchdata's own BatchSampler, whose iterator continues at a sample
    iterable: bool  #: an IterableDataset: its position is the dataset iterator's own state
    epoch_samples: int | None  #: ``len(loader.sampler)``, when it has one
    epoch_batches: int | None  #: ``len(loader)``, when it has one


def batch_size_of(loader: Any) -> int | None:
    """The size of the loader's batches: ``batch_size=``, or a custom ``batch_sampler``'s
    ``batch_size`` attribute; None when neither says."""
    for size in (
        getattr(loader, "batch_size", None),
        getattr(getattr(loader, "batch_sampler", None), "batch_size", None),
    ):
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def batching(loader: Any) -> Batching:
    from torch.utils.data import IterableDataset

    sampler = getattr(loader, "batch_sampler", None)
    kind = type(sampler)
    return Batching(
        batch_size=batch_size_of(loader),
        workers=int(getattr(loader, "num_workers", 0)),
        drop_last=bool(getattr(loader, "drop_last", False)),
        # exactly torchdata's: a subclass may batch differently from what its state counts
        in_samples=kind.__module__ == "torchdata.stateful_dataloader.sampler"
        and kind.__name__ == "BatchSampler",
        iterable=isinstance(getattr(loader, "dataset", None), IterableDataset),
        epoch_samples=_len(getattr(loader, "sampler", None)),
        epoch_batches=_len(loader),
    )


def _len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:  # no __len__ (an infinite or unsized sampler)
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _samples_of(sampler_iter_state: Any) -> int | None:
    if isinstance(sampler_iter_state, Mapping):
        return _int(sampler_iter_state.get(SAMPLES_YIELDED))
    return None


def read(sd: Any) -> Position | None:
    """The position in a torchdata iterator state; None for a state of another shape."""
    if not isinstance(sd, Mapping):
        return None
    finished = bool(sd.get(FINISHED, False))
    if _int(sd.get(NUM_YIELDED)) is not None:
        return Position(0, sd[NUM_YIELDED], _samples_of(sd.get(SAMPLER_ITER)), 0, finished)
    snap = sd.get(SNAPSHOT)
    if not isinstance(snap, Mapping) or _int(snap.get(SNAPSHOT_STEP)) is None:
        return None
    main = snap.get(MAIN)
    main = main if isinstance(main, Mapping) else {}
    workers = _int(main.get(NUM_WORKERS))
    if workers is None:
        return None
    since = _int(sd.get(STEPS_SINCE)) or 0
    return Position(
        workers, snap[SNAPSHOT_STEP], _samples_of(main.get(SAMPLER_ITER)), since, finished
    )


def _per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def _batches_done(samples: int, live: Batching) -> int:
    """Batches of the new size counted as done, so that ``len(loader)`` minus them is the
    number of batches left (what a count of done batches means to a training loop)."""
    size = live.batch_size or 1
    if live.epoch_samples is None:
        return samples // size
    left = max(live.epoch_samples - samples, 0)
    return _per_epoch(live.epoch_samples, size, live.drop_last) - _per_epoch(
        left, size, live.drop_last
    )


def translate(
    sd: Any,
    saved_batch_size: int | None | Unsaved,
    live: Batching,
    *,
    name: str,
    where: str,
    draw_seed: Callable[[], int],
) -> Any:
    """``sd`` (a loader's saved iterator state) re-expressed for the loader ``live`` describes.

    ``saved_batch_size`` is the batch size it was saved with (:data:`UNSAVED` for a checkpoint of
    an older savegame: only a change of workers is then translated). ``draw_seed`` gives the
    workers' base seed when a single-process state moves to worker processes.

    Raises:
        RestoreError: what was saved cannot be carried over to this loader (the message names
            it and what to do).
    """
    pos = read(sd)
    if pos is None:
        return sd
    resized = saved_batch_size is not UNSAVED and (
        saved_batch_size != live.batch_size or (pos.snapshot_samples is not None) != live.in_samples
    )
    rewired = pos.workers != live.workers
    if not resized and not rewired:
        samples = pos.samples(live.batch_size, live.epoch_samples)
        if (
            pos.batches > 0
            and not pos.finished
            and not live.iterable
            and live.epoch_samples is not None
            and samples is not None
            and samples > live.epoch_samples
        ):
            # torchdata would skip past the epoch's end and end iter() with a bare StopIteration
            raise errors.RestoreError(
                f"{where}: loader {name!r} was saved {pos.batches} batches into an epoch, at "
                f"sample {samples}, which lies beyond this loader's epoch of "
                f"{live.epoch_samples} samples (a smaller dataset, or another sampler?). "
                "Restore it into a loader over the data and sampler it was saved with",
                path=where,
                key=name,
            )
        return sd
    old_size = saved_batch_size if saved_batch_size is not UNSAVED else live.batch_size
    saved_in_samples = pos.snapshot_samples is not None
    if saved_in_samples == live.in_samples:
        resize = f"batch size {old_size} -> {live.batch_size}"
    else:
        resize = f"{_batching(old_size, saved_in_samples)} -> {_batching(live.batch_size, live.in_samples)}"
    change = ", ".join(
        ([resize] if resized else [])
        + ([f"{pos.workers} -> {live.workers} workers"] if rewired else [])
    )
    head = f"{where}: loader {name!r} was saved {pos.batches} batches into an epoch and is restored with {change}"
    if live.iterable:
        raise errors.RestoreError(
            f"{head}, but it reads an IterableDataset: its position is each worker's own dataset iterator, "
            "counted in that iterator's items, which savegame cannot move to another batch size or number of "
            f"workers. Resume with batch_size={old_size} and num_workers={pos.workers}, as it was saved",
            path=where,
            key=name,
        )
    samples = pos.samples(old_size, live.epoch_samples)
    started = pos.batches > 0 and not pos.finished
    if (
        started
        and live.epoch_samples is not None
        and samples is not None
        and samples > live.epoch_samples
    ):
        raise errors.RestoreError(
            f"{head}, but its position, sample {samples} of the epoch, lies beyond this loader's epoch of "
            f"{live.epoch_samples} samples (a smaller dataset, or another sampler?). Restore it into a loader over "
            "the data and sampler it was saved with",
            path=where,
            key=name,
        )
    mid = started and (
        samples < live.epoch_samples
        if samples is not None and live.epoch_samples is not None
        else live.epoch_batches is None or pos.batches < live.epoch_batches
    )
    snap_batches, since = pos.snapshot_batches, pos.steps_since
    if resized:
        if (
            samples is None
            or pos.snapshot_samples is None
            or not live.in_samples
            or live.batch_size is None
        ):
            if started:
                raise errors.RestoreError(
                    f"{head}, but a custom batch_sampler (or batch_size=None) on either side keeps its position "
                    "in its own batches, not in samples, so it cannot move to another batch size. Resume with the batching it was "
                    f"saved with ({_batching(old_size, saved_in_samples)}) until this epoch ends, or use "
                    "batch_size=/shuffle=/sampler= instead of batch_sampler=",
                    path=where,
                    key=name,
                )
        else:
            snap_batches = _batches_done(pos.snapshot_samples, live)
            if since:
                # torchdata re-reads the batches after its last snapshot (snapshot_every_n_steps):
                # in the new size they must end at the saved sample, or at the epoch's end.
                gap = samples - pos.snapshot_samples
                if gap % live.batch_size and samples != live.epoch_samples:
                    raise errors.RestoreError(
                        f"{head}, but it was saved {pos.steps_since} batches ({gap} samples) after its last "
                        f"snapshot (snapshot_every_n_steps > 1), which is no whole number of batches of "
                        f"{live.batch_size}. Resume with a batch size that divides {gap}, or save with "
                        "snapshot_every_n_steps=1 (the default)",
                        path=where,
                        key=name,
                    )
                since = -(-gap // live.batch_size)
    if rewired:
        if since and live.workers == 0:
            raise errors.RestoreError(
                f"{head}, but it was saved {since} batches after its last snapshot (snapshot_every_n_steps > 1), "
                "which only a loader with worker processes re-reads. Resume with num_workers > 0, or save with "
                "snapshot_every_n_steps=1 (the default)",
                path=where,
                key=name,
            )
        if mid and _holds_dataset_state(sd, pos):
            raise errors.RestoreError(
                f"{head}, but the dataset state of {_processes(pos.workers)} (sg.data.resumable's random "
                f"streams, or your dataset's own state_dict()) cannot be moved to {_processes(live.workers)} "
                "mid-epoch. "
                f"Resume with num_workers={pos.workers} until this epoch ends (a checkpoint saved at an epoch's "
                "end resumes with any number of workers)",
                path=where,
                key=name,
            )
    return _build(sd, pos, live, snap_batches, since, rewired, draw_seed)


def _processes(workers: int) -> str:
    return f"{workers} worker process(es)" if workers else "the main process (num_workers=0)"


def _batching(batch_size: int | None, in_samples: bool) -> str:
    if in_samples:
        return f"batch_size={batch_size}"
    if batch_size is None:
        return "a custom batch_sampler (or batch_size=None)"
    return f"a custom batch_sampler (batch size {batch_size})"


def _holds_dataset_state(sd: Mapping[str, Any], pos: Position) -> bool:
    if pos.workers == 0:
        return sd.get(DATASET) is not None or sd.get(FETCHER) is not None
    states = sd[SNAPSHOT].get(WORKER_STATES)
    return isinstance(states, Mapping) and any(
        isinstance(s, Mapping) and (s.get(DATASET) is not None or s.get(FETCHER) is not None)
        for s in states.values()
    )


def _build(
    sd: Mapping[str, Any],
    pos: Position,
    live: Batching,
    batches: int,
    since: int,
    rewired: bool,
    draw_seed: Callable[[], int],
) -> dict[str, Any]:
    """The state in the live loader's format, with the sampler's state carried over as is.
    Worker (or single-process dataset) states are dropped when the worker count changed:
    :func:`translate` refused that already where they mattered."""
    if pos.workers == 0:
        main: dict[str, Any] = {
            k: sd.get(k) for k in (SAMPLER_ITER, INDEX_SAMPLER, LEN_CALLED, SHARED_SEED)
        }
    else:
        main = dict(sd[SNAPSHOT][MAIN])
    main[SAMPLER_ITER_YIELDED] = batches
    if live.workers == 0:
        out = {
            INDEX_SAMPLER: main.get(INDEX_SAMPLER),
            SAMPLER_ITER: main.get(SAMPLER_ITER),
            SAMPLER_ITER_YIELDED: batches,
            NUM_YIELDED: batches,
            LEN_CALLED: main.get(LEN_CALLED),
            SHARED_SEED: main.get(SHARED_SEED),
            FETCHER: None if rewired else sd.get(FETCHER),
            DATASET: None if rewired else sd.get(DATASET),
            FINISHED: pos.finished,
        }
        return out
    main[NUM_WORKERS] = live.workers
    if BASE_SEED not in main:  # from a single-process state: seed the workers as a fresh epoch does
        main[BASE_SEED] = draw_seed()
    snapshot = (
        dict(sd[SNAPSHOT]) if not rewired else {WORKER_STATES: {}, LAST_WORKER: live.workers - 1}
    )
    snapshot.update({SNAPSHOT_STEP: batches, MAIN: main})
    return {SNAPSHOT: snapshot, STEPS_SINCE: since, FINISHED: pos.finished}
