"""Bit-exact resume across a SIGKILL, with every source of randomness in play.

The script (tests/_resume_script.py) trains with dropout, AdamW, warm-up + cosine LR and a
shuffled two-worker StatefulDataLoader whose dataset draws torch / numpy / python random
numbers per item. Each interrupted run is killed with SIGKILL right after ``ckpt.step`` at
step k, resumed in a new process, and must end bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import savegame as sg
from savegame.format import layout

SCRIPT = Path(__file__).with_name("_resume_script.py")
TOTAL = 18  # 3 epochs of 6 batches; saves every 4 steps
SAVE_EVERY = 4

# Kills, in turn, of one run: 6 = an epoch end between saves (resumes mid-epoch from 4);
# 8 = right after a save; 9 = mid-epoch; 11 = right before a save (at 12);
# 12 = exactly at an epoch end that is also a save.
KILL_STEPS = [6, 8, 9, 11, 12]


def _start(root: Path, kill_at: int, trace: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root), str(TOTAL), str(kill_at), str(trace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], expect: int) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{err}"
    return out


def _assert_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _trace(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().split("\n"):
        if line:
            step, rest = line.split(" ", 1)
            out[int(step)] = rest  # a resumed run rewrites the steps after its checkpoint
    return out


def test_resume_after_repeated_sigkills_is_bitwise_equal_to_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """One run folder, killed at every k in turn and resumed in a new process each time; the
    reference run goes alongside. Every step's loss/batch/LR and the final state must match."""
    ref_root, ref_trace = tmp_path / "ref", tmp_path / "ref.trace"
    root, trace = tmp_path / "run", tmp_path / "run.trace"
    started: list[subprocess.Popen[str]] = []
    try:
        ref = _start(ref_root, -1, ref_trace)
        started.append(ref)
        resumed_from = 0
        for k in [*KILL_STEPS, -1]:
            proc = _start(root, k, trace)
            started.append(proc)
            out = _finish(proc, -signal.SIGKILL if k > 0 else 0)
            assert f"resumed {resumed_from}" in out, (k, out)
            resumed_from = k - k % SAVE_EVERY
            # the steps up to k equal the reference run's, bit for bit: compared after each
            # kill, so a failure names the kill that broke it (and the first diverging step)
            if k > 0:
                _finish(ref, 0) if ref.poll() is None else None
                got, want = _trace(trace), _trace(ref_trace)
                assert {s: got[s] for s in range(1, k + 1)} == {
                    s: want[s] for s in range(1, k + 1)
                }, f"after kill at {k}"
        assert _trace(trace) == _trace(ref_trace)
        assert sorted(_trace(ref_trace)) == list(range(1, TOTAL + 1))
        # parameters, optimizer moments, schedulers, loader position, RNGs, extras
        _assert_equal(
            sg.load(root / layout.step_dir(TOTAL)), sg.load(ref_root / layout.step_dir(TOTAL))
        )
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_kill_steps_cover_the_required_cases() -> None:
    steps_per_epoch = 6
    assert KILL_STEPS == sorted(KILL_STEPS)
    assert any(s % SAVE_EVERY == 0 for s in KILL_STEPS)  # right after a save
    assert any(s % SAVE_EVERY == SAVE_EVERY - 1 for s in KILL_STEPS)  # right before one
    assert any(s % steps_per_epoch == 0 for s in KILL_STEPS)  # exactly at an epoch end
    assert any(s % steps_per_epoch not in (0, steps_per_epoch - 1) for s in KILL_STEPS)  # mid-epoch
