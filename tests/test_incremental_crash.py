"""Crash safety with shared bytes (issue 14 part 2): a kill at any point of a save, of
retention (retiring shared files, deleting folders) or of garbage collection leaves every
committed checkpoint complete and verifiable, and the next writer goes on."""

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

BASE_NUMEL = 1 << 20  # 4 MB frozen: shared by every checkpoint
W_NUMEL = 1 << 12  # what changes at every step


def _state() -> tuple[sg.TrainState, dict[str, Any]]:
    holder: dict[str, Any] = {
        "base": torch.arange(BASE_NUMEL, dtype=torch.float32),
        "w": torch.zeros(W_NUMEL),
        "step": 0,
    }
    return sg.TrainState(rng=False, extras=holder), holder


def _check_run(root: Path) -> list[int]:
    """Every committed checkpoint of ``root`` verifies (shared files resolved); returns them."""
    refs = reader.list_checkpoints(root)
    assert all(r.valid for r in refs), [(r.step, r.error) for r in refs]
    for r in refs:
        assert reader.verify(r.path) == [], r.step
    return [r.step for r in refs]


ZYGOTE = textwrap.dedent(
    """
    import os, sys
    import torch
    import savegame as sg

    def saver(root, progress):
        torch.set_num_threads(1)
        holder = {"base": torch.arange(__BASE__, dtype=torch.float32), "w": torch.zeros(__W__), "step": 0}
        state = sg.TrainState(rng=False, extras=holder)
        ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False)
        step = ckpt.restore(state)
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        while True:
            step += 1
            holder["w"] = torch.full((__W__,), float(step))
            holder["step"] = step
            if step % 5 == 0:  # now and then the base changes too: a full save, old files freed
                holder["base"] = holder["base"] + 1.0
            ckpt.step(state, step)  # committed (and retention applied) when this returns
            os.write(fd, f"{step} {float(holder['base'][0])}\\n".encode())

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
).replace("__BASE__", str(BASE_NUMEL)).replace("__W__", str(W_NUMEL))


def _trial(zygote: subprocess.Popen[str], root: Path, progress: Path, rng: random.Random) -> None:
    assert zygote.stdin is not None and zygote.stdout is not None
    progress.write_text("")
    zygote.stdin.write(f"fork {root} {progress}\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not progress.read_text():
            assert time.monotonic() < deadline, "saver never committed a checkpoint"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
    finally:
        os.kill(pid, signal.SIGKILL)
        zygote.stdin.write(f"reap {pid}\n")
        zygote.stdin.flush()
        status = int(zygote.stdout.readline())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    lines = [x.split() for x in progress.read_text().splitlines() if x]
    last_committed = int(lines[-1][0])

    steps = _check_run(root)
    assert steps and max(steps) in (last_committed, last_committed + 1)
    state, holder = _state()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt:
        restored = ckpt.restore(state)
    assert restored == max(steps) and holder["step"] == restored
    assert torch.equal(holder["w"], torch.full((W_NUMEL,), float(restored)))
    bumps = restored // 5
    assert torch.equal(holder["base"], torch.arange(BASE_NUMEL, dtype=torch.float32) + bumps)
    # the writer that opened the run collected what a killed one left: no temp folder, and
    # no retired file that no checkpoint uses
    assert not [p for p in root.iterdir() if p.name.startswith(layout.TMP_PREFIX)]
    used = {n for r in reader.list_checkpoints(root) if r.manifest for n in r.manifest.refs}
    for p in root.iterdir():
        ref = layout.parse_retired_file(p.name)
        if ref is not None:
            assert ref in used, p.name


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


def test_sigkill_at_random_moments_of_incremental_saves_and_retention(tmp_path: Path) -> None:
    _run_trials(tmp_path, 10, seed=11)


@pytest.mark.slow
def test_sigkill_during_incremental_saves_many_trials(tmp_path: Path) -> None:
    _run_trials(tmp_path, 100, seed=12)


# ---- a simulated crash (FaultyStore(crash=True)) at every point of save and retention ------------
POINTS = ["stage.write", "commit.seal", "commit.publish", "rename", "detach", "list", "put"]


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_any_point_of_save_retire_or_collect_leaves_every_checkpoint_complete(
    tmp_path: Path, point: str
) -> None:
    rng = random.Random(point)
    for trial in range(3):
        root = tmp_path / f"run{trial}"
        state, holder = _state()
        # a few saves first (step 1 is the base; 2, 3 share it), then a crash at the n-th
        # call of ``point`` while saving on with retention deleting (and retiring) old ones
        with sg.Checkpointer(
            root, save=sg.Every(steps=1), keep=sg.Keep(last=1), handle_signals=False
        ) as ck:
            for step in (1, 2):
                holder["w"] = torch.full((W_NUMEL,), float(step))
                holder["step"] = step
                ck.step(state, step)
        store = FaultyStore(LocalStore(root), crash=True)
        store.faults[point] = rng.randint(1, 4)
        try:
            with sg.Checkpointer(
                store, save=sg.Every(steps=1), keep=sg.Keep(last=1), handle_signals=False
            ) as ck:
                for step in range(3, 9):
                    holder["w"] = torch.full((W_NUMEL,), float(step))
                    holder["step"] = step
                    if step == 6:
                        holder["base"] = holder["base"] + 1.0
                    ck.step(state, step)
        except (sg.CheckpointError, OSError):
            pass
        steps = _check_run(root)
        assert steps, (point, trial)
        # the next writer opens the run, collects garbage, restores and saves on
        state2, holder2 = _state()
        with sg.Checkpointer(
            root, save=sg.Every(steps=1), keep=sg.Keep(last=1), handle_signals=False
        ) as ck:
            got = ck.restore(state2)
            assert got == max(steps)
            assert torch.equal(holder2["w"], torch.full((W_NUMEL,), float(got)))
            holder2["step"] = got + 1
            ck.step(state2, got + 1)
        assert _check_run(root) == [got + 1]
