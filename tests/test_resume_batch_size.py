"""Resuming with another batch size or number of loader workers (issue 13, first item).

A run at batch size 32 saves mid-epoch; new objects (or a new process, after a SIGKILL) restore
it with batch size 16 or 64, and the sample ids the whole run consumes over two epochs must be
the uninterrupted run's: every sample once per epoch, in the same order. Where the position
cannot be carried over, restore's first iteration raises ``RestoreError`` saying what to do.
The unchanged-batch-size exactness is tests/test_data_order.py's and tests/test_exact_resume.py's.

Run as a script (``python test_resume_batch_size.py ROOT BATCH WORKERS KILL_AT TRACE``) it is the
training process of the SIGKILL test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
)
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg
from savegame.state import position

SAMPLES, BATCH, EPOCHS = 200, 32, 2  # 7 batches of 32 per epoch, the last one of 8
STOP = 3  # save after 3 batches of epoch 0: sample 96, no multiple of 64


class Ids(Dataset[int]):
    def __init__(self, n: int = SAMPLES) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Noisy(Ids):
    """Draws from the worker's torch RNG: wrapped in ``sg.data.resumable``, every worker has
    dataset state in the loader's checkpoint."""

    def __getitem__(self, i: int) -> int:
        torch.rand(())
        return i


class Stream(IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(SAMPLES))


def _loader(
    batch: int, workers: int, kind: str = "generator", ds: Dataset[int] | None = None, **kw: Any
) -> StatefulDataLoader[Any]:
    ds = Ids() if ds is None else ds
    if kind == "distributed":
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
        return StatefulDataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, **kw)
    gen = torch.Generator().manual_seed(7) if kind == "generator" else None
    return StatefulDataLoader(
        ds, batch_size=batch, shuffle=True, generator=gen, num_workers=workers, **kw
    )


def _ids(batch: Any) -> list[int]:
    return [int(i) for i in batch]


def _train(
    root: Path,
    *,
    batch: int,
    workers: int,
    kind: str = "generator",
    stop: int | None = None,
    **kw: Any,
) -> tuple[list[int], list[int]]:
    """Consume EPOCHS epochs (or resume them) like a training loop; save and return after
    ``stop`` batches. Returns the ids consumed and the size of every batch."""
    torch.manual_seed(0)  # like a new process: restore must set what matters
    loader = _loader(batch, workers, kind, **kw)
    extras = {"epoch": 0}
    state = sg.TrainState(loader=loader, extras=extras)
    ids: list[int] = []
    sizes: list[int] = []
    with sg.Checkpointer(root, save=sg.Every(steps=10_000), handle_signals=False) as ckpt:
        step = ckpt.restore(state)
        while extras["epoch"] < EPOCHS:
            if kind == "distributed":
                loader.sampler.set_epoch(extras["epoch"])  # type: ignore[attr-defined]
            for b in loader:
                ids += _ids(b)
                sizes.append(len(b))
                step += 1
                if step == stop:
                    ckpt.save(state, step)
                    return ids, sizes
            extras["epoch"] += 1
    return ids, sizes


@pytest.mark.parametrize("kind", ["generator", "own_generator", "distributed"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("new_batch", [16, 64])
def test_resume_with_another_batch_size_consumes_every_sample_once_per_epoch_in_order(
    tmp_path: Path, kind: str, workers: int, new_batch: int
) -> None:
    ref, _ = _train(tmp_path / "ref", batch=BATCH, workers=workers, kind=kind)
    assert len(ref) == EPOCHS * SAMPLES
    assert all(sorted(ref[e * SAMPLES : (e + 1) * SAMPLES]) == list(range(SAMPLES)) for e in (0, 1))
    head, _ = _train(tmp_path / "run", batch=BATCH, workers=workers, kind=kind, stop=STOP)
    tail, sizes = _train(tmp_path / "run", batch=new_batch, workers=workers, kind=kind)
    assert head + tail == ref
    # the documented rule: a full batch of the new size from the saved sample; the epoch's
    # last batch holds the rest
    left = SAMPLES - STOP * BATCH
    first_epoch = -(-left // new_batch)
    assert sizes[:first_epoch] == [new_batch] * (left // new_batch) + (
        [left % new_batch] if left % new_batch else []
    )
    assert sum(sizes[first_epoch:]) == SAMPLES


@pytest.mark.parametrize(("workers", "new_workers"), [(2, 0), (0, 2), (2, 1)])
def test_resume_with_another_number_of_workers_and_batch_size_keeps_the_sample_order(
    tmp_path: Path, workers: int, new_workers: int
) -> None:
    ref, _ = _train(tmp_path / "ref", batch=BATCH, workers=workers, kind="distributed")
    head, _ = _train(tmp_path / "run", batch=BATCH, workers=workers, kind="distributed", stop=STOP)
    tail, _ = _train(tmp_path / "run", batch=16, workers=new_workers, kind="distributed")
    assert head + tail == ref  # set_epoch decides every epoch's order


def test_another_number_of_workers_with_generator_shuffle_keeps_this_epochs_order(
    tmp_path: Path,
) -> None:
    ref, _ = _train(tmp_path / "ref", batch=BATCH, workers=2)
    head, _ = _train(tmp_path / "run", batch=BATCH, workers=2, stop=STOP)
    tail, _ = _train(tmp_path / "run", batch=BATCH, workers=0)
    # the interrupted epoch goes on in its order; the next epoch is drawn as a loader with the
    # new number of workers draws it (torch takes the workers' seed from the same generator)
    assert (head + tail)[:SAMPLES] == ref[:SAMPLES]
    assert sorted(tail[-SAMPLES:]) == list(range(SAMPLES))


def test_drop_last_resumes_at_the_sample_and_drops_the_tail_left_at_the_new_size(
    tmp_path: Path,
) -> None:
    order, _ = _train(tmp_path / "order", batch=BATCH, workers=0)
    head, _ = _train(tmp_path / "run", batch=BATCH, workers=0, stop=STOP, drop_last=True)
    tail, sizes = _train(tmp_path / "run", batch=64, workers=0, drop_last=True)
    assert set(sizes) == {64}
    left = SAMPLES - STOP * BATCH
    assert head + tail[: left // 64 * 64] == order[: STOP * BATCH + left // 64 * 64]


def _save_mid_epoch(root: Path, loader: StatefulDataLoader[Any], batches: int = STOP) -> None:
    state = sg.TrainState(loader=loader, rng=False)  # before the workers start (README)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        ckpt.save(state, batches)


def _restore(root: Path, loader: StatefulDataLoader[Any]) -> StatefulDataLoader[Any]:
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        ckpt.restore(sg.TrainState(loader=loader, rng=False))
    return loader


def _custom(batch: int) -> StatefulDataLoader[Any]:
    return StatefulDataLoader(
        Ids(), batch_sampler=BatchSampler(SequentialSampler(range(SAMPLES)), batch, False)
    )


@pytest.mark.parametrize(
    ("saved", "restored"),
    [
        (lambda: _custom(32), lambda: _custom(16)),
        (lambda: _custom(32), lambda: _loader(16, 0)),
        (lambda: _loader(32, 0), lambda: _custom(32)),
    ],
    ids=["custom->custom", "custom->batch_size", "batch_size->custom"],
)
def test_a_custom_batch_sampler_with_another_batch_size_is_refused_mid_epoch(
    tmp_path: Path, saved: Any, restored: Any
) -> None:
    _save_mid_epoch(tmp_path / "run", saved())
    loader = _restore(tmp_path / "run", restored())
    with pytest.raises(sg.RestoreError, match=r"custom batch_sampler.*batch size 32") as info:
        iter(loader)
    assert info.value.key == "loader"


def test_a_custom_batch_sampler_with_the_same_batch_size_resumes_as_before(
    tmp_path: Path,
) -> None:
    ref = [i for b in _custom(32) for i in _ids(b)]
    saved = _custom(32)
    it = iter(saved)
    head = [i for _ in range(STOP) for i in _ids(next(it))]
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        ckpt.save(sg.TrainState(loader=saved, rng=False), STOP)
    loader = _restore(tmp_path / "run", _custom(32))
    assert head + [i for b in loader for i in _ids(b)] == ref


@pytest.mark.parametrize(
    ("workers", "new_workers", "new_batch"), [(0, 0, 16), (2, 2, 16), (2, 0, 32)]
)
def test_an_iterable_dataset_with_another_batch_size_or_workers_is_refused(
    tmp_path: Path, workers: int, new_workers: int, new_batch: int
) -> None:
    _save_mid_epoch(
        tmp_path / "run", StatefulDataLoader(Stream(), batch_size=BATCH, num_workers=workers)
    )
    loader = StatefulDataLoader(Stream(), batch_size=new_batch, num_workers=new_workers)
    _restore(tmp_path / "run", loader)
    with pytest.raises(sg.RestoreError, match=r"IterableDataset.*batch_size=32 and num_workers="):
        iter(loader)


@pytest.mark.parametrize("workers", [2, 0])
def test_another_number_of_workers_mid_epoch_is_refused_when_the_dataset_has_state(
    tmp_path: Path, workers: int
) -> None:
    _save_mid_epoch(tmp_path / "run", _loader(BATCH, workers, ds=sg.data.resumable(Noisy())))
    loader = _restore(tmp_path / "run", _loader(BATCH, 2 - workers, ds=sg.data.resumable(Noisy())))
    with pytest.raises(
        sg.RestoreError, match=rf"dataset state.*sg\.data\.resumable.*num_workers={workers}"
    ):
        iter(loader)


def test_another_number_of_workers_at_an_epochs_end_is_allowed_with_dataset_state(
    tmp_path: Path,
) -> None:
    saved = _loader(BATCH, 2, ds=sg.data.resumable(Noisy()))
    _save_mid_epoch(tmp_path / "run", saved, batches=len(saved))  # every batch, not finished
    loader = _restore(tmp_path / "run", _loader(BATCH, 0, ds=sg.data.resumable(Noisy())))
    assert list(loader) == []  # nothing of epoch 0 is left
    assert sorted(i for b in loader for i in _ids(b)) == list(range(SAMPLES))


def test_a_position_beyond_the_new_loaders_epoch_is_refused(tmp_path: Path) -> None:
    _save_mid_epoch(tmp_path / "run", _loader(BATCH, 0), batches=5)  # sample 160
    loader = _restore(tmp_path / "run", _loader(16, 0, ds=Ids(100)))
    with pytest.raises(sg.RestoreError, match=r"sample 160 of the epoch.*epoch of 100 samples"):
        iter(loader)


@pytest.mark.parametrize(("new_batch", "ok"), [(16, True), (64, False)])
def test_batches_since_a_snapshot_are_recounted_or_refused(
    tmp_path: Path, new_batch: int, ok: bool
) -> None:
    ref = [i for b in _loader(BATCH, 2, snapshot_every_n_steps=4) for i in _ids(b)]
    saved = _loader(BATCH, 2, snapshot_every_n_steps=4)
    state = sg.TrainState(loader=saved, rng=False)
    it = iter(saved)
    head = [i for _ in range(STOP) for i in _ids(next(it))]  # 3 batches past the snapshot at 0
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        ckpt.save(state, STOP)
    loader = _restore(tmp_path / "run", _loader(new_batch, 2, snapshot_every_n_steps=4))
    if ok:
        assert head + [i for b in loader for i in _ids(b)] == ref
    else:
        with pytest.raises(sg.RestoreError, match=r"96 samples.*snapshot_every_n_steps=1"):
            iter(loader)


def test_a_batch_size_of_zero_is_torchs_own_error() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        _loader(0, 0)


def test_an_unchanged_loader_gets_its_saved_state_back_untouched() -> None:
    loader = _loader(BATCH, 0)
    it = iter(loader)
    next(it)
    sd = loader.state_dict()
    live = position.batching(_loader(BATCH, 0))
    for saved in (BATCH, position.UNSAVED):
        got = position.translate(sd, saved, live, name="l", where="w", draw_seed=lambda: 0)
        assert got is sd


def test_the_state_keys_are_torchdatas() -> None:
    from torchdata.stateful_dataloader import sampler as tsampler
    from torchdata.stateful_dataloader import stateful_dataloader as tdl
    from torchdata.stateful_dataloader import worker as tworker

    multi = tdl._StatefulMultiProcessingDataLoaderIter
    assert (tdl._INDEX_SAMPLER_STATE, tdl._SAMPLER_ITER_STATE, tdl._SAMPLER_ITER_YIELDED) == (
        position.INDEX_SAMPLER,
        position.SAMPLER_ITER,
        position.SAMPLER_ITER_YIELDED,
    )
    assert (tdl._ITERABLEDATASET_LEN_CALLED, tdl._SHARED_SEED, tdl._ITERATOR_FINISHED) == (
        position.LEN_CALLED,
        position.SHARED_SEED,
        position.FINISHED,
    )
    assert tdl._StatefulSingleProcessDataLoaderIter._NUM_YIELDED == position.NUM_YIELDED
    assert (tworker._FETCHER_STATE, tworker._DATASET_STATE) == (position.FETCHER, position.DATASET)
    assert (multi._SNAPSHOT, multi._STEPS_SINCE_SNAPSHOT, multi._SNAPSHOT_STEP) == (
        position.SNAPSHOT,
        position.STEPS_SINCE,
        position.SNAPSHOT_STEP,
    )
    assert (multi._LAST_YIELDED_WORKER_ID, multi._MAIN_SNAPSHOT, multi._WORKER_SNAPSHOTS) == (
        position.LAST_WORKER,
        position.MAIN,
        position.WORKER_STATES,
    )
    assert (multi._NUM_WORKERS, multi._BASE_SEED) == (position.NUM_WORKERS, position.BASE_SEED)
    assert tsampler._BatchSamplerIterator._SAMPLES_YIELDED == position.SAMPLES_YIELDED


# ---- a new process after a SIGKILL ----------------------------------------------------------


@pytest.mark.slow  # CI under 20 minutes
def test_resume_after_a_sigkill_with_half_the_batch_size_sees_the_uninterrupted_order(
    tmp_path: Path,
) -> None:
    def run(root: Path, batch: int, kill_at: int, trace: Path) -> int:
        args = [sys.executable, __file__, str(root), str(batch), "2", str(kill_at), str(trace)]
        return subprocess.run(args, capture_output=True, text=True, timeout=120).returncode

    assert run(tmp_path / "ref", BATCH, -1, tmp_path / "ref.trace") == 0
    assert run(tmp_path / "run", BATCH, STOP, tmp_path / "run.trace") == -signal.SIGKILL
    assert run(tmp_path / "run", 16, -1, tmp_path / "run.trace") == 0
    ref = (tmp_path / "ref.trace").read_text().split()
    assert (tmp_path / "run.trace").read_text().split() == ref
    assert len(ref) == EPOCHS * SAMPLES


def _main(root: str, batch: int, workers: int, kill_at: int, trace: str) -> None:
    torch.manual_seed(0)
    loader = _loader(batch, workers, kind="own_generator")
    extras = {"epoch": 0}
    state = sg.TrainState(loader=loader, extras=extras)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=STOP))
    step = ckpt.restore(state)
    with open(trace, "a") as out:
        while extras["epoch"] < EPOCHS:
            for b in loader:
                out.write("".join(f"{i}\n" for i in _ids(b)))
                out.flush()
                step += 1
                ckpt.step(state, step)
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            extras["epoch"] += 1
    ckpt.close()


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
