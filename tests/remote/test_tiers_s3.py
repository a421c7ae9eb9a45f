"""Kill -9 a training run whose root is remote (moto's S3 on loopback) with a local cache, at
random steps; resume each time on a FRESH cache folder (another machine): the final model and
optimizer state is bitwise equal to an uninterrupted run's (issue 11, "Two tiers, no stall").

The killed writer's lease on the remote run is not released: the next job waits until it
expires. The children run with ``SAVEGAME_LEASE_SECONDS=2`` so that wait stays short (the
default is 60 s); a job retries ``LockedError`` until then, as a restarted job would.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.network

LEASE_S = 2
STEPS = 16

# The zygote imports torch and savegame once, never computes, and forks one job per run (a
# child forked from a process whose OpenMP pool ran would hang). A job appends "step\n" to its
# progress file after each step and writes its final state at the end.
ZYGOTE = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import savegame as sg

    def job(url, cache, out, progress, steps):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        state = sg.TrainState(model=model, optimizer=opt)
        deadline = time.monotonic() + 60
        while True:  # the killed job's lease expires after SAVEGAME_LEASE_SECONDS
            try:
                ckpt = sg.Checkpointer(url, cache=cache, save=sg.Every(steps=4), keep=sg.Keep(last=2),
                                       handle_signals=False, async_save=True)
                break
            except sg.LockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        start = ckpt.restore(state)
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, f"start {start}\\n".encode())
        for step in range(start, int(steps)):
            x, y = torch.randn(32, 8), torch.randn(32, 4)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(state, step + 1)
            os.write(fd, f"{step + 1}\\n".encode())
            time.sleep(0.02)
        ckpt.close()
        flat = {f"model/{k}": v for k, v in model.state_dict().items()}
        for i, s in opt.state_dict()["state"].items():
            for k, v in s.items():
                flat[f"opt/{i}/{k}"] = torch.as_tensor(v)
        torch.save(flat, out)
        os.write(fd, b"done\\n")

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "fork":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    job(*args)
                    code = 0
                finally:
                    os._exit(code)
            print(pid, flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(status, flush=True)
    """
)


class _Zygote:
    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def fork(self, *args: object) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("fork " + " ".join(str(a) for a in args) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def reap(self, pid: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"reap {pid}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def zygote(s3_env: object, s3_server: object) -> Iterator[_Zygote]:
    env = dict(os.environ)
    env.update(SAVEGAME_LEASE_SECONDS=str(LEASE_S), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    z = _Zygote(env)
    try:
        yield z
    finally:
        z.close()


def _run_to_end(z: _Zygote, url: str, cache: Path, out: Path, progress: Path, steps: int) -> None:
    pid = z.fork(url, cache, out, progress, steps)
    status = z.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, progress.read_text())


def _kill_at_random(
    z: _Zygote, url: str, cache: Path, out: Path, progress: Path, rng: random.Random, steps: int
) -> None:
    progress.write_text("")
    pid = z.fork(url, cache, out, progress, steps)
    try:
        deadline = time.monotonic() + 60
        # "start N" and a first step; or the job had nothing left to do (it resumed at the end)
        while len(progress.read_text().split("\n")) < 3 and "done" not in progress.read_text():
            assert time.monotonic() < deadline, "the job never trained a step"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
    finally:
        os.kill(pid, signal.SIGKILL)  # (a job that already exited is a zombie: no error)
        status = z.reap(pid)
    finished = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert finished or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)


def _trials(
    z: _Zygote, base_url: str, tmp_path: Path, kills: int, seed: int, steps: int = STEPS
) -> list[int]:
    """Returns the step each resumed job started from."""
    rng = random.Random(seed)
    ref = tmp_path / "reference.pt"
    # The uninterrupted run (its own remote run) goes on while the others are killed.
    ref_pid = z.fork(base_url + "-ref", tmp_path / "cache-ref", ref, tmp_path / "p-ref", steps)
    url = base_url + "-run"
    out = tmp_path / "resumed.pt"
    for i in range(kills):
        _kill_at_random(z, url, tmp_path / f"cache-{i}", out, tmp_path / f"p-{i}", rng, steps)
    status = z.reap(ref_pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (tmp_path / "p-ref").read_text()
    final = tmp_path / "p-final"
    _run_to_end(z, url, tmp_path / "cache-final", out, final, steps)  # a fresh machine, again
    assert final.read_text().split("\n")[0].startswith("start ")
    a = torch.load(ref, weights_only=True)
    b = torch.load(out, weights_only=True)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    starts = [
        int((tmp_path / name).read_text().split("\n")[0].split()[1])
        for name in [*(f"p-{i}" for i in range(kills)), "p-final"]
    ]
    assert starts == sorted(starts)  # each job resumed from the remote, never went back
    return starts


def test_kill_9_with_a_remote_root_resumes_exactly_on_a_fresh_cache(
    zygote: _Zygote, s3_url: str, tmp_path: Path
) -> None:
    _trials(zygote, s3_url, tmp_path, kills=2, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_with_a_remote_root_many_trials(
    zygote: _Zygote, s3_url: str, tmp_path: Path, seed: int
) -> None:
    starts = _trials(zygote, s3_url, tmp_path, kills=8, seed=seed, steps=40)
    assert starts[-1] > 0, starts  # eight jobs: at least one upload finished before a kill
