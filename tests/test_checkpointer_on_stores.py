"""The Checkpointer over the store interface: an in-memory run, and a writer that dies at every
point of a save (FaultyStore(crash=True) leaves exactly what a kill -9 there leaves).

Whatever the point, a new Checkpointer on the same bytes restores a complete, verified
checkpoint — the one being written if (and only if) it was published — removes what the dead
writer left, and saves again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import Location, Store
from savegame.storage.faulty import FaultyStore
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore


def _state(seed: float = 0.0) -> tuple[sg.TrainState, dict[str, Any]]:
    holder: dict[str, Any] = {
        "w": torch.full((1000,), seed),
        "b": torch.zeros(3, dtype=torch.int64),
        "step": 0,
    }
    return sg.TrainState(rng=False, extras=holder), holder


def _train(
    ckpt: sg.Checkpointer, state: sg.TrainState, holder: dict[str, Any], steps: range
) -> None:
    for step in steps:
        holder["w"] = torch.full((1000,), float(step))
        holder["b"] = torch.tensor([step, 2 * step, 3 * step])
        holder["step"] = step
        ckpt.step(state, step)


def _steps(store: Store) -> list[int]:
    return [r.step for r in reader.list_checkpoints(store) if r.valid]


def test_a_run_in_memory_saves_keeps_and_resumes_exactly() -> None:
    store = MemoryStore("run")
    state, holder = _state()
    with sg.Checkpointer(
        store, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt:
        _train(ckpt, state, holder, range(1, 6))
        infos = ckpt.list()
        assert [i.step for i in infos] == [4, 5]
        assert all(
            isinstance(i.path, Location) and str(i.path).startswith("memory://run/") for i in infos
        )
        path = ckpt.save(state, 6)
        assert isinstance(path, Location) and path.key == layout.step_dir(6)
    assert _steps(store) == [5, 6]
    assert not [e.name for e in store.list("") if e.name.startswith(layout.TMP_PREFIX)]
    state2, holder2 = _state(-1.0)
    with sg.Checkpointer(store, handle_signals=False) as ckpt:
        assert ckpt.restore(state2) == 6
    assert torch.equal(holder2["w"], torch.full((1000,), 5.0))  # step 6 saved the state of step 5
    assert holder2["step"] == 5 and torch.equal(holder2["b"], torch.tensor([5, 10, 15]))


def test_a_second_writer_on_a_memory_run_is_locked_out() -> None:
    store = MemoryStore()
    with sg.Checkpointer(store, handle_signals=False):
        with pytest.raises(sg.LockedError):
            sg.Checkpointer(store, handle_signals=False)
    sg.Checkpointer(store, handle_signals=False).close()  # released with close()


def test_a_damaged_newest_checkpoint_in_memory_is_skipped_and_set_aside() -> None:
    store = MemoryStore()
    state, holder = _state()
    with sg.Checkpointer(
        store, save=sg.Every(steps=1), keep=sg.Keep(last=3), handle_signals=False
    ) as ckpt:
        _train(ckpt, state, holder, range(1, 4))
    key = f"{layout.step_dir(3)}/{layout.tensor_file(0)}"
    data = bytearray(store.read(key))
    data[-1] ^= 0xFF
    store.put(key, bytes(data))
    state2, holder2 = _state(-1.0)
    with (
        pytest.warns(sg.CorruptCheckpointWarning),
        sg.Checkpointer(store, handle_signals=False) as ckpt,
    ):
        assert ckpt.restore(state2) == 2
    assert holder2["step"] == 2
    names = [e.name for e in store.list("")]
    assert layout.step_dir(3) not in names and any(layout.parse_damaged_dir(n) == 3 for n in names)


CRASH_POINTS = [
    "stage.begin",
    "stage.write",
    "stage.sync",
    "commit.seal",
    "commit.publish",
    "commit.done",
]


@pytest.mark.parametrize("inner", ["local", "memory"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_writer_killed_at_any_point_of_a_save_loses_at_most_that_save(
    tmp_path: Path, inner: str, point: str
) -> None:
    disk: Store = LocalStore(tmp_path) if inner == "local" else MemoryStore()
    store = FaultyStore(disk, crash=True)
    state, holder = _state()
    ckpt = sg.Checkpointer(
        store, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    )
    _train(ckpt, state, holder, range(1, 3))
    store.faults[point] = store.calls[point] + 1  # the save of step 3 dies there
    with pytest.raises(sg.CheckpointError):
        _train(ckpt, state, holder, range(3, 4))
    assert store.fired == [point] and store.dead
    # no close(): the writer is dead (FaultyStore dropped its lock, as the kernel drops a flock)
    published = point == "commit.done"
    assert _steps(disk) == ([1, 2, 3] if published else [1, 2])
    # a new process on the same bytes
    state2, holder2 = _state(-1.0)
    with sg.Checkpointer(
        disk, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt2:
        assert not [
            e.name for e in disk.list("") if e.name.startswith(layout.TMP_PREFIX)
        ]  # collected
        resumed = ckpt2.restore(state2)
        assert resumed == (3 if published else 2)
        assert holder2["step"] == resumed and torch.equal(
            holder2["w"], torch.full((1000,), float(resumed))
        )
        _train(ckpt2, state2, holder2, range(resumed + 1, resumed + 3))
    for r in reader.list_checkpoints(disk):
        assert reader.verify(r.location) == []
    assert _steps(disk)[-1] == resumed + 2
