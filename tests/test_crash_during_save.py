"""Crash safety: SIGKILL at random moments during saves, and injected disk-full errors.

Whatever happens, a new Checkpointer restores a complete, verified checkpoint (never a
partial one), and at most the checkpoint being written is lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout
from savegame.storage.faulty import FaultyStore
from savegame.storage.local import LocalStore

NUMEL = 1 << 20  # 4 MB of float32 per save


def _state() -> tuple[sg.TrainState, dict[str, Any]]:
    holder: dict[str, Any] = {
        "w": torch.zeros(NUMEL),
        "b": torch.zeros(7, dtype=torch.int64),
        "step": 0,
    }
    return sg.TrainState(rng=False, extras=holder), holder


# A zygote process imports torch and savegame once and forks one saver per trial (torch's
# OpenMP pool would hang a child forked from a process that already computed, like pytest's;
# the zygote never computes). Each saver appends "step\n" to its progress file once a save
# has committed, and is SIGKILLed by the test.
ZYGOTE = textwrap.dedent(
    """
    import os, sys
    import torch
    import savegame as sg

    NUMEL = __NUMEL__

    def saver(root, progress):
        torch.set_num_threads(1)
        holder = {"w": torch.zeros(NUMEL), "b": torch.zeros(7, dtype=torch.int64), "step": 0}
        state = sg.TrainState(rng=False, extras=holder)
        ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False)
        step = ckpt.restore(state)
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        while True:
            step += 1
            holder["w"] = torch.full((NUMEL,), float(step))
            holder["b"] = torch.full((7,), step, dtype=torch.int64)
            holder["step"] = step
            ckpt.step(state, step)  # committed when this returns
            os.write(fd, f"{step}\\n".encode())

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    saver(*args)
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(status, flush=True)
    """
).replace("__NUMEL__", str(NUMEL))


def _trial(zygote: subprocess.Popen[str], root: Path, progress: Path, rng: random.Random) -> None:
    assert zygote.stdin is not None and zygote.stdout is not None
    progress.write_text("")
    zygote.stdin.write(f"fork {root} {progress}\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not progress.read_text():  # the first committed save of this trial
            assert time.monotonic() < deadline, "saver never committed a checkpoint"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
    finally:
        os.kill(pid, signal.SIGKILL)
        zygote.stdin.write(f"reap {pid}\n")
        zygote.stdin.flush()
        status = int(zygote.stdout.readline())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    last_committed = max(int(x) for x in progress.read_text().split())

    # Every listed step folder is complete: never a partial checkpoint.
    refs = reader.list_checkpoints(root)
    assert refs and all(r.valid for r in refs), [(r.step, r.error) for r in refs]
    state, holder = _state()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt:
        restored = ckpt.restore(state)
    # at most the checkpoint being written is lost (it may have committed just before the kill)
    assert restored in (last_committed, last_committed + 1)
    assert holder["step"] == restored
    assert torch.equal(holder["w"], torch.full((NUMEL,), float(restored)))
    assert torch.equal(holder["b"], torch.full((7,), restored, dtype=torch.int64))
    assert reader.verify(root / layout.step_dir(restored)) == []
    assert not [
        p for p in root.iterdir() if p.name.startswith(layout.TMP_PREFIX)
    ]  # collected on open


def _run_trials(tmp_path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with subprocess.Popen(
        [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as zygote:
        try:
            for _ in range(n):
                _trial(zygote, tmp_path / "run", tmp_path / "progress", rng)
        finally:
            assert zygote.stdin is not None
            zygote.stdin.close()
            zygote.wait(timeout=30)


def test_sigkill_at_random_moments_during_saves_never_loses_more_than_the_save_in_flight(
    tmp_path: Path,
) -> None:
    _run_trials(tmp_path, 12, seed=1)


@pytest.mark.slow
def test_sigkill_during_saves_many_trials(tmp_path: Path) -> None:
    _run_trials(tmp_path, 120, seed=2)


# ---- fault injection: disk full at various points --------------------------------------------
# The store fails on purpose (savegame.storage.faulty): no monkeypatching of os. Each point is
# where a real save can be cut short; a full disk (ENOSPC) raises there and clean-up runs.
FAULTS = {
    "mid_tensor_write": "stage.write",
    "tensor_fsync": "stage.sync",
    "before_manifest_durable": "commit.seal",
    "rename": "commit.publish",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_disk_full_during_save_is_storage_error_and_leaves_earlier_checkpoints_intact(
    tmp_path: Path, fault: str
) -> None:
    state, holder = _state()
    store = FaultyStore(LocalStore(tmp_path))
    with sg.Checkpointer(
        store, save=sg.Every(steps=1), keep=sg.Keep(last=3), handle_signals=False
    ) as ckpt:
        for step in (1, 2):
            holder["w"] = torch.full((NUMEL,), float(step))
            holder["step"] = step
            ckpt.step(state, step)
        holder["w"] = torch.full((NUMEL,), 3.0)
        holder["step"] = 3
        store.faults[FAULTS[fault]] = store.calls[FAULTS[fault]] + 1  # the next one fails
        with pytest.raises(sg.StorageError, match="No space left") as info:
            ckpt.step(state, 3)
        assert store.fired == [FAULTS[fault]]
        assert info.value.step in (3, None)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(layout.TMP_PREFIX)]
        refs = reader.list_checkpoints(tmp_path)
        assert [r.step for r in refs] == [1, 2] and all(r.valid for r in refs)
        for r in refs:
            assert reader.verify(r.path) == []
    state2, holder2 = _state()
    with sg.Checkpointer(tmp_path, handle_signals=False) as ckpt:
        assert ckpt.restore(state2) == 2
    assert torch.equal(holder2["w"], torch.full((NUMEL,), 2.0))
    # and the next save works once space is back
    with sg.Checkpointer(tmp_path, handle_signals=False) as ckpt:
        ckpt.save(state, 3)
    assert reader.verify(tmp_path / layout.step_dir(3)) == []
