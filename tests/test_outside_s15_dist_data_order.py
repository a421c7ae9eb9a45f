"""Outside review (s15, R2): the data order after a resume at *every* position, from the README's
loop as written (restore -> ``set_epoch`` -> ``for batch in loader`` -> ``ckpt.step``; the epoch
counter in ``extras`` is incremented after the epoch's last step).

The existing data-order tests resume once, mid-epoch (epoch 1, batch 2). Here a run is cut into
segments, each played by a fresh set of objects as a new process would build them (seeds reset,
a new loader, model, optimizer and Checkpointer): restore, train a few steps, save, drop
everything. With segments of one step every position is a resume point: the first batch, the
last batch of an epoch (the epoch boundary, before the loader's ``StopIteration``), the first
batch of the next epoch, and resumes of resumes. The consumed sample ids, the augmentation the
workers drew (torch, numpy and python ``random`` through ``sg.data.resumable``), the dropout
masks (global RNG) and the final parameters must equal the uninterrupted run's, bitwise.

Loaders: ``num_workers=2`` with ``persistent_workers=True``, a ``generator=``-seeded shuffle with
``drop_last=True`` (22 samples, batch 4: two dropped per epoch); a ``DistributedSampler`` (one
replica, no process group needed) with ``set_epoch``; the global-RNG shuffle with no workers; an
``IterableDataset`` with its own ``state_dict`` over 2 workers (docs/resume.md: same batch size and
workers resume exactly).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

SAMPLES, BATCH = 22, 4


class Augmented(Dataset[torch.Tensor]):
    """Item i is ``[i, torch draw, numpy draw, python draw]``: three generators in the worker."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(
            [float(i), torch.rand(()).item(), float(np.random.rand()), random.random()],
            dtype=torch.float64,
        )


class Stream(IterableDataset[torch.Tensor]):
    """An endless-per-epoch stream split over workers, with its position as its own state, and
    a private generator for augmentation (saved too, as docs say a dataset must)."""

    def __init__(self) -> None:
        self.pos = 0
        self.gen = torch.Generator().manual_seed(7)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and self.pos == 0:
            self.gen.manual_seed(7 + wid)
        while True:
            i = self.pos * nw + wid
            if i >= SAMPLES:
                return
            self.pos += 1
            yield torch.tensor(
                [float(i), torch.rand((), generator=self.gen).item(), 0.0, 0.0],
                dtype=torch.float64,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]
        self.gen.set_state(state["gen"])


class PlainStream(IterableDataset[torch.Tensor]):
    """A deterministic stream with no state of its own: torchdata replays it to the position."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(wid, SAMPLES, nw):
            yield torch.tensor([float(i), 0.0, 0.0, 0.0], dtype=torch.float64)


CONFIGS: dict[str, dict[str, Any]] = {
    "generator_persistent_droplast": dict(
        workers=2, persistent=True, drop_last=True, sampler=None, generator=True
    ),
    "distsampler_persistent": dict(
        workers=2, persistent=True, drop_last=False, sampler="dist", generator=False
    ),
    "global_rng_no_workers": dict(
        workers=0, persistent=False, drop_last=False, sampler=None, generator=False
    ),
    "iterable_two_workers": dict(
        workers=2, persistent=False, drop_last=False, sampler="iterable", generator=False
    ),
}


def _build(cfg: dict[str, Any]) -> tuple[Any, ...]:
    torch.manual_seed(0)  # a new process: everything that matters must come from the checkpoint
    np.random.seed(0)
    random.seed(0)
    sampler = None
    if cfg["sampler"] == "iterable":
        loader = StatefulDataLoader(Stream(), batch_size=BATCH, num_workers=cfg["workers"])
    elif cfg["sampler"] == "plain_iterable":
        loader = StatefulDataLoader(
            PlainStream(),
            batch_size=BATCH,
            num_workers=cfg["workers"],
            persistent_workers=cfg["persistent"],
        )
    else:
        ds = Augmented()
        if cfg["sampler"] == "dist":
            sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
        loader = StatefulDataLoader(
            sg.data.resumable(ds),
            batch_size=BATCH,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=cfg["drop_last"],
            num_workers=cfg["workers"],
            persistent_workers=cfg["persistent"],
            generator=torch.Generator().manual_seed(11) if cfg["generator"] else None,
        )
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return loader, sampler, model, opt


def _segment(
    root: Path, cfg: dict[str, Any], total: int, stop: int | None
) -> tuple[list[list[float]], list[torch.Tensor], int]:
    """One "process": restore, train until ``stop`` (save there) or ``total``. Returns the
    batches it consumed, the parameters, and the step it started at."""
    loader, sampler, model, opt = _build(cfg)
    extras = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
    seen: list[list[float]] = []
    with sg.Checkpointer(root, save=sg.Every(steps=10**9), keep=sg.Keep(last=2),
                         handle_signals=False) as ckpt:  # fmt: skip
        step = start = ckpt.restore(state)
        while step < total:
            if sampler is not None:
                sampler.set_epoch(extras["epoch"])  # after restore(), before iterating
            for x in loader:
                seen.append(x.flatten().tolist())
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step == stop:
                    ckpt.save(state, step)
                    return seen, [p.detach().clone() for p in model.parameters()], start
                ckpt.step(state, step)
                if step == total:
                    break
            else:
                extras["epoch"] += 1
    return seen, [p.detach().clone() for p in model.parameters()], start


def _chain(root: Path, cfg: dict[str, Any], total: int, every: int) -> tuple[Any, Any, list[int]]:
    seen: list[list[float]] = []
    starts = []
    stop = every
    while True:
        part, params, start = _segment(root, cfg, total, stop if stop < total else None)
        seen += part
        starts.append(start)
        if stop >= total:
            return seen, params, starts
        stop += every


def _per_epoch(cfg: dict[str, Any]) -> int:
    if cfg["drop_last"]:
        return SAMPLES // BATCH
    if cfg["sampler"] in ("iterable", "plain_iterable"):
        # 2 workers, 11 items each, batches of 4 per worker: 3 + 3 batches (the last of 3 items)
        return 6
    return -(-SAMPLES // BATCH)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[] if n == "generator_persistent_droplast" else [pytest.mark.slow])
        for n in sorted(CONFIGS)
    ],
)
def test_resume_at_every_step_of_two_epochs_equals_the_uninterrupted_run(
    tmp_path: Path, name: str
) -> None:
    cfg = CONFIGS[name]
    total = 2 * _per_epoch(cfg) + 1  # two whole epochs and the first batch of the third
    ref, ref_params, _ = _chain(tmp_path / "ref", cfg, total, every=10**6)
    assert len(ref) == total
    ids = [int(b[i]) for b in ref for i in range(0, len(b), 4)]
    assert len(ids) >= 2 * (SAMPLES - (2 if cfg["drop_last"] else 0))
    got, params, starts = _chain(tmp_path / "cut", cfg, total, every=1)
    assert starts == list(range(total))  # every position was a resume point
    for n, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a == b, f"{name}: batch {n} (step {n + 1}) differs after resuming at step {n}"
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q), f"{name}: parameters differ from the uninterrupted run"


class Numbers(IterableDataset[int]):
    """A plain, deterministic IterableDataset without state_dict() (the common case: a stream
    of records). torchdata restores it by replaying ("naively fast-forwarding") the stream."""

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(range(wid, 400, nw))


def _first_after_each_resume(root: Path, workers: int, resumes: int) -> list[tuple[int, int]]:
    """Each "process" restores, takes one batch, saves: (first item it got, first item the
    uninterrupted loader yields at that step)."""
    ref = [b.tolist() for _, b in zip(range(resumes + 1), StatefulDataLoader(
        Numbers(), batch_size=BATCH, num_workers=workers), strict=False)]  # fmt: skip
    out = []
    for _ in range(resumes + 1):
        loader = StatefulDataLoader(Numbers(), batch_size=BATCH, num_workers=workers)
        state = sg.TrainState(loader=loader)
        with sg.Checkpointer(root, handle_signals=False) as ckpt:
            start = ckpt.restore(state)
            batch = next(iter(loader))
            out.append((batch.tolist(), ref[start]))
            ckpt.save(state, start + 1)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_plain_iterable_dataset_resumed_twice_continues_where_it_stopped(
    tmp_path: Path,
) -> None:
    """README: the loader's position comes back and ``for batch in loader`` continues where it
    stopped; docs/resume.md: an IterableDataset is refused only with another batch size or
    number of workers. Same batch size, no workers, resumed three times in a row."""
    got = _first_after_each_resume(tmp_path / "run", workers=0, resumes=3)
    for n, (batch, want) in enumerate(got):
        assert batch == want, f"resume {n}: got samples {batch}, the uninterrupted run had {want}"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_plain_iterable_dataset_over_two_workers_resumed_twice_continues_or_is_refused_typed(
    tmp_path: Path,
) -> None:
    try:
        got = _first_after_each_resume(tmp_path / "run", workers=2, resumes=2)
    except sg.RestoreError:
        return  # a typed refusal naming what to do would be acceptable
    for n, (batch, want) in enumerate(got):
        assert batch == want, f"resume {n}: got samples {batch}, the uninterrupted run had {want}"


@pytest.mark.parametrize(
    ("kind", "workers", "persistent"),
    [("dist", 0, False), pytest.param("dist", 2, True, marks=pytest.mark.slow),
     pytest.param("generator", 2, True, marks=pytest.mark.slow)],
)  # fmt: skip
def test_every_epochs_saves_after_the_epoch_resume_into_the_next_epoch(
    tmp_path: Path, kind: str, workers: int, persistent: bool
) -> None:
    """``Every(epochs=1)`` with ``ckpt.step(..., epoch_end=True)`` called after the ``for`` loop
    ended (the loader's ``StopIteration`` already seen, the epoch counter already moved on):
    the resumed run's next epoch is the uninterrupted run's next epoch, not an empty one."""

    def run(root: Path, stop_epoch: int | None) -> list[list[float]]:
        torch.manual_seed(0)  # a new process
        np.random.seed(0)
        random.seed(0)
        ds = Augmented()
        sampler = (DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1)
                   if kind == "dist" else None)  # fmt: skip
        loader = StatefulDataLoader(
            sg.data.resumable(ds), batch_size=BATCH, sampler=sampler, shuffle=sampler is None,
            num_workers=workers, persistent_workers=persistent,
            generator=torch.Generator().manual_seed(3) if kind == "generator" else None,
        )  # fmt: skip
        model = torch.nn.Linear(4, 1).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        extras = {"epoch": 0}
        state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
        seen: list[list[float]] = []
        with sg.Checkpointer(root, save=sg.Every(epochs=1), handle_signals=False) as ckpt:
            step = ckpt.restore(state)
            for epoch in range(extras["epoch"], 4):
                if sampler is not None:
                    sampler.set_epoch(epoch)
                for x in loader:
                    seen.append(x.flatten().tolist())
                    model(x).sum().backward()
                    opt.step()
                    opt.zero_grad()
                    step += 1
                    ckpt.step(state, step)
                extras["epoch"] = epoch + 1
                ckpt.step(state, step, epoch_end=True)
                if epoch + 1 == stop_epoch:
                    return seen
        return seen

    ref = run(tmp_path / "ref", None)
    head = run(tmp_path / "cut", 2)
    tail = run(tmp_path / "cut", None)
    assert len(head) == len(tail) == len(ref) // 2
    assert head + tail == ref
