"""A plain IterableDataset (no ``state_dict``) that torchdata restores by replaying the stream:
resumed again and again within one epoch, with and without workers and with torchdata snapshots
every step or every few steps, every session continues exactly where the previous one stopped
(torchdata counts the replayed batches twice; savegame.state.loader undoes that)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg


class Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(range(wid, 1000, nw))


def _loader(workers: int, every: int) -> StatefulDataLoader:
    return StatefulDataLoader(
        Stream(), batch_size=3, num_workers=workers, snapshot_every_n_steps=every
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("workers", "every"), [(0, 1), (2, 1), (2, 3)], ids=["no-workers", "2-workers", "2w-snap3"]
)
def test_sessions_of_a_plain_stream_continue_where_the_last_one_stopped(
    tmp_path: Path, workers: int, every: int
) -> None:
    sessions = [2, 1, 3, 1, 2]  # batches taken by each session before it saves and ends
    total = sum(sessions)
    ref = [b.tolist() for _, b in zip(range(total), _loader(workers, every), strict=False)]
    got: list[list[int]] = []
    for n in sessions:
        loader = _loader(workers, every)
        state = sg.TrainState(loader=loader)
        with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
            start = ckpt.restore(state)
            assert start == len(got)
            it = iter(loader)
            for _ in range(n):
                got.append(next(it).tolist())
            ckpt.save(state, start + n)
            del it
    assert got == ref
