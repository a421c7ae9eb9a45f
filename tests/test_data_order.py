"""Exact data order after a restore, for every natural call order (issue 9, item 2).

One process plays both ranks of a 2-rank job in turn: a ``DistributedSampler(num_replicas=2,
rank=r)`` needs no process group. Each case trains for 3 epochs with dropout (the global torch
RNG) and a dataset that draws random noise per item in the workers; the interrupted run saves
mid-epoch, a fresh set of objects restores it and continues, and the sample ids it consumes and
its final parameters must equal the uninterrupted run's, bitwise. The multi-process version is
tests/distributed/test_sampler_resume.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

SAMPLES, BATCH, EPOCHS = 40, 4, 3  # 2 ranks: 20 samples, 5 batches per rank and epoch

Order = Literal["set_epoch", "no_set_epoch", "set_epoch_at_end", "set_epoch_before_restore"]


class Ids(Dataset[torch.Tensor]):
    """Item i is ``[i, noise]``: the id says which sample was consumed, the noise is drawn from
    the worker's torch RNG (restored by ``sg.data.resumable``)."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item()])


class EpochShuffle(Sampler[int]):
    """A sampler with ``set_epoch`` that is not a DistributedSampler (as in many libraries)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _run(
    root: Path,
    *,
    rank: int,
    sampler_kind: str,
    workers: int,
    persistent: bool = False,
    order: Order = "set_epoch",
    stop_at: int | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Train (or resume) to the end or to ``stop_at``; returns consumed ids and parameters."""
    torch.manual_seed(0)  # like a new process: the restore must set everything that matters
    ds = Ids()
    sampler: Sampler[int] | None
    if sampler_kind == "distributed":
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=5)
    elif sampler_kind == "epoch_shuffle":
        sampler = EpochShuffle(SAMPLES)
    else:
        sampler = None
    loader = StatefulDataLoader(
        sg.data.resumable(ds),
        batch_size=BATCH,
        sampler=sampler,
        shuffle=sampler is None,
        # the PyTorch reproducibility recipe: the loader's own generator
        generator=torch.Generator().manual_seed(1) if sampler_kind == "generator" else None,
        num_workers=workers,
        persistent_workers=persistent,
    )
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    extras = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
    ids: list[int] = []
    with sg.Checkpointer(root, save=sg.Every(steps=10_000), handle_signals=False) as ckpt:
        if order == "set_epoch_before_restore" and sampler is not None:
            sampler.set_epoch(extras["epoch"])  # type: ignore[attr-defined]  # still 0 here
        step = ckpt.restore(state)
        while extras["epoch"] < EPOCHS:
            if order == "set_epoch" and sampler is not None:
                sampler.set_epoch(extras["epoch"])  # type: ignore[attr-defined]  # the docs' order
            for x in loader:
                ids += [int(i) for i in x[:, 0]]
                loss = (model(x / torch.tensor([SAMPLES, 1.0])) - 0.5).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step == stop_at:
                    ckpt.save(state, step)
                    return ids, [p.detach().clone() for p in model.parameters()]
            extras["epoch"] += 1
            if order in ("set_epoch_at_end", "set_epoch_before_restore") and sampler is not None:
                sampler.set_epoch(extras["epoch"])  # type: ignore[attr-defined]
    return ids, [p.detach().clone() for p in model.parameters()]


CASES = [
    # sampler, workers, persistent, order
    ("distributed", 0, False, "set_epoch"),
    ("distributed", 2, False, "set_epoch"),
    ("distributed", 2, True, "set_epoch"),
    ("distributed", 0, False, "set_epoch_at_end"),  # restore -> iterate: restore sets the epoch
    ("distributed", 2, False, "set_epoch_before_restore"),
    ("epoch_shuffle", 2, False, "set_epoch"),
    ("epoch_shuffle", 0, False, "set_epoch_at_end"),
    ("none", 0, False, "no_set_epoch"),
    ("none", 2, True, "no_set_epoch"),
    ("generator", 0, False, "no_set_epoch"),
    ("generator", 2, False, "no_set_epoch"),
]


@pytest.mark.parametrize(("sampler_kind", "workers", "persistent", "order"), CASES)
def test_resume_mid_epoch_consumes_the_same_samples_and_ends_bitwise_equal(
    tmp_path: Path, sampler_kind: str, workers: int, persistent: bool, order: Order
) -> None:
    distributed = sampler_kind == "distributed"
    for rank in (0, 1) if distributed else (0,):
        kw: dict[str, Any] = dict(
            rank=rank,
            sampler_kind=sampler_kind,
            workers=workers,
            persistent=persistent,
            order=order,
        )
        ref_ids, ref_params = _run(tmp_path / f"ref{rank}", **kw)
        assert len(ref_ids) == EPOCHS * (SAMPLES // 2 if distributed else SAMPLES)
        per_epoch = len(ref_ids) // EPOCHS // BATCH
        head, _ = _run(tmp_path / f"run{rank}", stop_at=per_epoch + 2, **kw)  # epoch 1, batch 2
        tail, params = _run(tmp_path / f"run{rank}", **kw)
        assert head + tail == ref_ids, (
            f"rank {rank}: consumed samples differ from the uninterrupted run"
        )
        for p, q in zip(params, ref_params, strict=True):
            assert torch.equal(p.view(torch.int32), q.view(torch.int32)), (
                f"rank {rank}: parameters differ from the uninterrupted run"
            )


def _loader(workers: int = 0) -> tuple[StatefulDataLoader[Any], DistributedSampler[Any]]:
    sampler = DistributedSampler(Ids(), num_replicas=2, rank=0, shuffle=True, seed=5)
    return StatefulDataLoader(
        Ids(), batch_size=BATCH, sampler=sampler, num_workers=workers
    ), sampler


def test_a_different_epoch_set_before_a_mid_epoch_resume_is_refused_naming_the_order(
    tmp_path: Path,
) -> None:
    loader, sampler = _loader()
    sampler.set_epoch(3)
    it = iter(loader)
    next(it), next(it)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        ckpt.save(sg.TrainState(loader=loader), 2)
        loader2, sampler2 = _loader()
        ckpt.restore(sg.TrainState(loader=loader2))
    assert sampler2.epoch == 3  # restored with the loader's position
    sampler2.set_epoch(4)
    with pytest.raises(
        sg.RestoreError,
        match=r"mid-epoch.*set_epoch\(3\).*ckpt\.restore\(state\), then sampler\.set_epoch",
    ) as info:
        iter(loader2)
    assert info.value.key == "loader"
    sampler2.set_epoch(3)  # the right epoch: the same loader now resumes
    assert [int(i) for b in loader2 for i in b[:, 0]] == [int(i) for b in it for i in b[:, 0]]


def test_a_new_epoch_after_a_resume_at_the_end_of_an_epoch_is_allowed(tmp_path: Path) -> None:
    loader, sampler = _loader()
    it = iter(loader)
    for _ in range(len(loader)):  # every batch, but not yet the StopIteration: "not finished"
        next(it)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        ckpt.save(sg.TrainState(loader=loader), len(loader))
        loader2, sampler2 = _loader()
        ckpt.restore(sg.TrainState(loader=loader2))
    sampler2.set_epoch(1)  # the saved iterator is exhausted: nothing of epoch 0 is left
    assert list(iter(loader2)) == []  # what was left of epoch 0
    sampler.set_epoch(1)
    assert [int(i) for b in loader2 for i in b[:, 0]] == [int(i) for b in loader for i in b[:, 0]]


def test_restoring_a_loader_draws_nothing_from_the_global_torch_rng(tmp_path: Path) -> None:
    loader, _ = _loader(workers=2)
    saved = sg.TrainState(loader=loader, rng=False)
    it = iter(loader)
    next(it)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        ckpt.save(saved, 1)
        loader2, _ = _loader(workers=2)
        state = sg.TrainState(loader=loader2, rng=False)
        torch.manual_seed(123)
        ckpt.restore(state)
        before = torch.get_rng_state()
        next(iter(loader2))  # the first build after restore resumes and must not draw
        assert torch.equal(torch.get_rng_state(), before)
