"""Samplers without a state, resumed mid-epoch: torchdata draws the epoch again and skips what
was consumed, and savegame makes that draw start from the random state the epoch started from
(state/loader.py, ``BUILD_RNG_KEY``), with and without workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_outside_s16_loops_samplers import (
    KILLS,
    TOTAL,
    Ids,
    N,
    check_resume,
    scramble_rngs,
    simple_loop,
    train,
)
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class LazyOwnGenerator(Sampler[int]):
    """A user's sampler holding its own generator and drawing inside a generator function."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.g = torch.Generator().manual_seed(5)

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.g).tolist()

    def __len__(self) -> int:
        return self.n


def test_a_lazy_custom_sampler_with_its_own_generator_resumes_mid_epoch(tmp_path: Path) -> None:
    def make() -> Any:
        return StatefulDataLoader(Ids(), batch_size=8, sampler=LazyOwnGenerator(N))

    check_resume(tmp_path, lambda: simple_loop(make), TOTAL, KILLS)


@pytest.mark.parametrize("replacement", [False, True])
def test_random_sampler_with_two_workers_resumes_mid_epoch(
    tmp_path: Path, replacement: bool
) -> None:
    def make() -> Any:
        sampler = RandomSampler(Ids(), replacement=replacement)
        return StatefulDataLoader(Ids(), batch_size=8, sampler=sampler, num_workers=2)

    check_resume(tmp_path, lambda: simple_loop(make), TOTAL, KILLS)


def test_weighted_sampler_resumed_at_an_epochs_end_draws_a_new_epoch(tmp_path: Path) -> None:
    # Saves every 5 steps = at the end of each 5-batch epoch: the next epoch is a fresh draw,
    # from the RNG as the checkpoint left it (not the finished epoch's recorded start).
    def loop() -> Any:
        return simple_loop(
            lambda: StatefulDataLoader(
                Ids(), batch_size=8, sampler=WeightedRandomSampler(torch.ones(N), N)
            )
        )

    ref = train(tmp_path / "ref", loop, TOTAL, every=5)
    got: dict[int, str] = {}
    for k in [5, 10]:
        got.update(train(tmp_path / "run", loop, TOTAL, stop_at=k, every=5))
        scramble_rngs()
    got.update(train(tmp_path / "run", loop, TOTAL, every=5))
    assert got == ref


def test_a_build_record_torch_refuses_is_skipped_not_raised() -> None:
    # A record from a file that torch's setters refuse (another size): the resume goes on as
    # one without a record would, instead of a raw RuntimeError from iter(loader).
    import savegame as sg
    from savegame.state import loader as loaderlib

    def make() -> Any:
        return StatefulDataLoader(Ids(), batch_size=8, sampler=RandomSampler(Ids()))

    live = make()
    sg.TrainState(loader=live)
    it = iter(live)
    next(it)
    sd = loaderlib.state_dict(live)
    sd[loaderlib.BUILD_RNG_KEY] = {
        "torch": torch.zeros(3, dtype=torch.uint8),
        "generators": {"sampler.generator": torch.zeros(2, dtype=torch.int64)},
    }
    again = make()
    sg.TrainState(loader=again)
    loaderlib.load(again, sd, name="loader", where="test")
    assert len(list(again)) == len(live) - 1
