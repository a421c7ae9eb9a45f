from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from savegame import data


class Augmented(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(
            [float(i), torch.rand(1).item(), float(np.random.rand()), random.random()]
        )


class WithOwnState(Augmented):
    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.calls = sd["calls"]


def test_resumable_delegates_items_len_and_attributes() -> None:
    base = TensorDataset(torch.arange(4.0))
    ds = data.resumable(base)
    assert len(ds) == 4  # type: ignore[arg-type]
    assert ds[2] == (torch.tensor(2.0),)
    assert ds.tensors is base.tensors  # type: ignore[attr-defined]


def test_resumable_state_restores_worker_rng_streams() -> None:
    ds = data.resumable(Augmented())
    sd = ds.state_dict()  # type: ignore[attr-defined]
    a = [ds[0] for _ in range(3)]
    ds.load_state_dict(sd)  # type: ignore[attr-defined]
    b = [ds[0] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resumable_includes_the_wrapped_datasets_own_state() -> None:
    inner = WithOwnState()
    inner.calls = 5
    ds = data.resumable(inner)
    sd = ds.state_dict()  # type: ignore[attr-defined]
    assert sd["dataset"] == {"calls": 5}
    inner.calls = 0
    ds.load_state_dict(sd)  # type: ignore[attr-defined]
    assert inner.calls == 5


def _batches(loader: StatefulDataLoader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_stateful_loader_with_two_workers_resumes_augmentation_bitwise() -> None:
    def make() -> StatefulDataLoader:
        torch.manual_seed(0)
        return StatefulDataLoader(
            data.resumable(Augmented()), batch_size=3, shuffle=True, num_workers=2
        )

    full = make()
    reference = _batches(full, 6)
    first = make()
    it = iter(first)
    for _ in range(2):
        next(it)
    sd = first.state_dict()
    del it, first
    resumed = make()
    resumed.load_state_dict(sd)
    rest = _batches(resumed, 4)
    assert all(torch.equal(x, y) for x, y in zip(rest, reference[2:], strict=True))


def test_quiet_workers_covers_a_plain_dataloader_outside_the_trainstate() -> None:
    import subprocess
    import time

    from torch.utils.data import DataLoader

    loader = data.quiet_workers(
        DataLoader(TensorDataset(torch.arange(40.0)), batch_size=2, num_workers=2)
    )
    assert data.quiet_workers(loader) is loader  # idempotent
    it = iter(loader)
    next(it)
    for w in it._workers:  # type: ignore[attr-defined]
        subprocess.run(
            ["kill", "-TERM", str(w.pid)], check=True
        )  # a scheduler's kill, not the loader's
    time.sleep(0.5)
    assert len(list(it)) == 19
