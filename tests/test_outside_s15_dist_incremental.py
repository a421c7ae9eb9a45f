"""Outside review (s15, R2): incremental checkpoints (docs/incremental.md) with ``Keep(last=3)``,
a frozen base whose bytes are changed *in place through ``.data``* now and then (torch's version
counter does not move: a wrong "unchanged" would be silent corruption), killed with SIGKILL at
random moments of saves and retention, then ``savegame prune`` and a resume.

The child trains and, after each save returned (committed), appends the step and a digest of
the saved state to a log. After each kill: every valid checkpoint left restores to exactly the
state logged for its step; ``savegame verify RUN`` passes; ``savegame prune RUN --keep-last 1``
keeps the newest and it still restores exactly; the next run resumes from it.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.engine import reader

TIMEOUT_S = 120

CHILD = textwrap.dedent(
    """
    import hashlib, os, sys, time
    import torch
    import savegame as sg

    def digest(model, opt):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode()); h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
        for i, s in sorted(opt.state_dict()["state"].items()):
            for k, v in sorted(s.items()):
                h.update(f"{i}{k}".encode())
                h.update(torch.as_tensor(v).reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 4))
        model[0].requires_grad_(False)           # the frozen base (256 KB)
        opt = torch.optim.Adam(model[1].parameters(), lr=1e-2)
        return model, opt

    def main(root, log, steps, async_save):
        torch.set_num_threads(1)
        model, opt = build()
        state = sg.TrainState(model=model, optimizer=opt)
        with sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=3),
                             async_save=async_save == "1", handle_signals=False) as ckpt:
            start = ckpt.restore(state)
            for step in range(start, steps):
                x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 4 == 3:   # the "frozen" base moves, behind torch's back
                    v = model[0].weight._version
                    model[0].weight.data.mul_(1.001)
                    assert model[0].weight._version == v
                d = digest(model, opt)
                ckpt.step(state, step + 1)
                ckpt.wait()
                with open(log, "a") as f:
                    f.write(f"{step + 1} {d}\\n")
                    f.flush()
                    os.fsync(f.fileno())
                time.sleep(0.01)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
    """
)


def _digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    for i, s in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(s.items()):
            h.update(f"{i}{k}".encode())
            h.update(
                torch.as_tensor(v).reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            )
    return h.hexdigest()


def _build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 4))
    model[0].requires_grad_(False)
    # a different start than the child's, so a restore that misses a tensor shows
    torch.nn.init.zeros_(model[0].weight)
    return model, torch.optim.Adam(model[1].parameters(), lr=1e-2)


def _restored_digest(root: Path, step: int) -> str:
    model, opt = _build()
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        assert ckpt.restore(sg.TrainState(model=model, optimizer=opt), step=step) == step
    return _digest(model, opt)


def _logged(log: Path) -> dict[int, str]:
    out = {}
    if log.exists():
        for line in log.read_text().splitlines():
            step, d = line.split()
            out[int(step)] = d
    return out


def _child(tmp: Path, root: Path, log: Path, steps: int, async_save: bool) -> subprocess.Popen:
    script = tmp / "s15_incr_child.py"
    if not script.exists():
        script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(root), str(log), str(steps), "1" if async_save else "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def _check_run(root: Path, log: Path) -> list[int]:
    logged = _logged(log)
    valid = [c.step for c in reader.list_checkpoints(root) if c.valid]
    for step in valid:
        if step in logged:  # a save that committed just before the kill may be unlogged
            assert _restored_digest(root, step) == logged[step], f"step {step} restores wrong"
    return valid


def _trial(tmp: Path, seed: int, async_save: bool, kills: int) -> None:
    rng = random.Random(seed)
    root, log = tmp / "run", tmp / "log.txt"
    steps = 40
    for _ in range(kills):
        before = len(_logged(log))
        proc = _child(tmp, root, log, steps, async_save)
        deadline = time.monotonic() + TIMEOUT_S
        target = before + rng.randint(2, 8)
        while len(_logged(log)) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.005)
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the child ended early ({proc.returncode}): {err[-3000:]}")
        time.sleep(rng.uniform(0, 0.05))  # into the next save / retention
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        _check_run(root, log)
    from savegame.cli.main import main as cli

    assert cli(["verify", str(root)]) == 0
    valid = _check_run(root, log)
    assert cli(["prune", str(root), "--keep-last", "1"]) == 0
    left = [c.step for c in reader.list_checkpoints(root) if c.valid]
    assert left == [max(valid)]
    assert cli(["verify", str(root)]) == 0
    _check_run(root, log)
    proc = _child(tmp, root, log, steps, async_save)  # resumes from the pruned run, to the end
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    assert max(_logged(log)) == steps
    _check_run(root, log)
    # the uninterrupted run logs the same digests for every step
    ref_log = tmp / "ref.txt"
    proc = _child(tmp, tmp / "ref", ref_log, steps, async_save)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    ref = _logged(ref_log)
    for step, d in _logged(log).items():
        assert ref[step] == d, f"step {step}: the killed-and-resumed run differs"


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "async_save"), [(1, False), (2, True), (3, False), (4, True)])
def test_kill_9_during_incremental_saves_with_in_place_base_writes_then_prune_and_resume(
    tmp_path: Path, seed: int, async_save: bool
) -> None:
    _trial(tmp_path, seed, async_save, kills=4)
