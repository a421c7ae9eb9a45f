"""A preemption signal sent to the whole process group (issue 9, item 7).

``scancel``, ``kill -TERM -PGID``, Ctrl-C and torchrun's forwarding signal the DataLoader workers
too. The training script (tests/_preempt_script.py) runs in its own session with two workers;
the test signals the whole group mid-run and expects what a signal to the main process alone
gives: a save at the next step boundary, exit status 75, and a resume that ends bitwise equal
to an uninterrupted run. The torchrun variant is tests/distributed/test_preemption_torchrun.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout

SCRIPT = Path(__file__).with_name("_preempt_script.py")
TOTAL = 24  # 2 epochs of 12 batches
PAUSE_S = 0.15  # per step while the test signals: the run must still be going
TIMEOUT_S = 120


def _start(
    root: Path, trace: Path, *, pause: float, context: str = "default", persistent: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            str(root),
            str(TOTAL),
            str(pause),
            str(trace),
            context,
            str(int(persistent)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: what a scheduler signals
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for_step(proc: subprocess.Popen[str], step: int) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + TIMEOUT_S
    for line in proc.stdout:
        if line.strip() == f"step {step}":
            return
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the training script never reached step {step}: {proc.communicate()[1][-3000:]}")


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(
            f"the training script did not exit in {TIMEOUT_S}s after the signal:\n{err[-3000:]}"
        )
    return proc.returncode, err


def _trace(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, ids = line.split(" ", 1)
        out[int(step)] = ids  # a resumed run rewrites the steps after its checkpoint
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], tuple[Path, Path]]:
    """The uninterrupted run of a configuration (start method, persistent workers), run once."""
    done: dict[tuple[str, bool], tuple[Path, Path]] = {}

    def get(context: str, persistent: bool) -> tuple[Path, Path]:
        if (context, persistent) not in done:
            tmp = tmp_path_factory.mktemp("reference")
            code, err = _finish(
                _start(tmp / "run", tmp / "trace", pause=0, context=context, persistent=persistent)
            )
            assert code == 0, err[-3000:]
            done[context, persistent] = tmp / "run", tmp / "trace"
        return done[context, persistent]

    return get


@pytest.mark.parametrize(
    ("signum", "context", "persistent"),
    [
        (signal.SIGTERM, "default", False),
        pytest.param(signal.SIGUSR1, "default", False, marks=pytest.mark.slow),  # CI: TERM
        pytest.param(signal.SIGINT, "default", False, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, "default", True, marks=pytest.mark.slow),
        # The start methods that exec a fresh interpreter, and the forkserver process (Python
        # 3.14's default on Linux) that is itself in the group: slow, each worker imports torch.
        pytest.param(signal.SIGUSR1, "spawn", False, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, "forkserver", False, marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, "forkserver", True, marks=pytest.mark.slow),
    ],
    ids=[
        "SIGTERM",
        "SIGUSR1",
        "SIGINT",
        "SIGTERM-persistent",
        "SIGUSR1-spawn",
        "SIGTERM-forkserver",
        "SIGUSR1-forkserver-persistent",
    ],
)
def test_group_signal_with_workers_saves_at_a_step_boundary_exits_75_and_resumes_exactly(
    tmp_path: Path,
    reference: Callable[[str, bool], tuple[Path, Path]],
    signum: int,
    context: str,
    persistent: bool,
) -> None:
    root, trace = tmp_path / "run", tmp_path / "trace"
    proc = _start(root, trace, pause=PAUSE_S, context=context, persistent=persistent)
    try:
        _wait_for_step(proc, 3)
        os.killpg(proc.pid, signum)  # the main process and both workers
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == sg.EXIT_PREEMPTED, f"exit {code}, expected {sg.EXIT_PREEMPTED}:\n{err[-3000:]}"
    assert "killed by signal" not in err and "exited unexpectedly" not in err, err[-3000:]
    assert "worker process(es), started before" not in err, err[-3000:]  # savegame's warning
    refs = reader.list_checkpoints(root)
    assert len(refs) == 1 and refs[0].valid, refs
    saved = refs[0].step
    assert 3 <= saved < TOTAL and max(_trace(trace)) == saved  # at the boundary after the last step
    assert reader.verify(refs[0].path) == []

    proc = _start(root, trace, pause=0, context=context, persistent=persistent)
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    ref_root, ref_trace = reference(context, persistent)
    assert _trace(trace) == _trace(ref_trace)
    got, want = sg.load(root / layout.step_dir(TOTAL)), sg.load(ref_root / layout.step_dir(TOTAL))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key


_HELPERS_PROBE = """
import multiprocessing.forkserver, multiprocessing.resource_tracker, os, subprocess, sys, time
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
import savegame as sg

loader = StatefulDataLoader(TensorDataset(torch.arange(40.0)), batch_size=2, num_workers=2,
                            multiprocessing_context=sys.argv[1])
sg.TrainState(loader=loader)
it = iter(loader)
next(it)
time.sleep(0.3)  # every thread of the workers is up
helpers = [multiprocessing.resource_tracker._resource_tracker._pid]
if sys.argv[1] == "forkserver":
    helpers.append(multiprocessing.forkserver._forkserver._forkserver_pid)
for pid in helpers + [w.pid for w in it._workers]:
    # From another process, like a scheduler. SIGTERM first: the kernel hands a signal to the
    # first thread after the last one that took a signal, so an earlier one would steer it.
    for sig in ("-TERM", "-INT", "-USR1"):
        subprocess.run(["kill", sig, str(pid)], check=True)
time.sleep(0.5)
assert len(list(it)) == 19
print("helpers alive", all(os.waitpid(p, os.WNOHANG)[0] == 0 for p in helpers))
"""


# CI under 20 minutes: both run with -m slow (~25 s each); the default suite keeps the SIGTERM
# group test above, whose workers are forked
@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_and_multiprocessing_helpers_survive_group_signals(method: str) -> None:
    """The start methods that exec a new interpreter. multiprocessing also runs helper processes
    in the job's process group: the resource tracker, and the forkserver (Python 3.14's default
    on Linux), whose children the workers are (they exit when it dies). All of them start while
    savegame blocks the signals, and keep them blocked or ignored."""
    proc = subprocess.run(
        [sys.executable, "-c", _HELPERS_PROBE, method],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        # (no OMP_NUM_THREADS=1: the threads torch starts in a new interpreter are the ones a
        # signal must not reach before worker_init_fn runs)
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "helpers alive True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
