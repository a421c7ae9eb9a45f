"""A Checkpointer that is garbage-collected without close() — an exception skipped it and there
was no ``with`` (a failed sweep trial, a notebook cell) — gives back what close() would: the run
folder's lock (the next trial opens the folder) and the preemption signals (SIGTERM ends the
process again, Ctrl-C interrupts at once, instead of waiting for a step boundary that never
comes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_TRIAL = textwrap.dedent(
    """
    import gc, os, shutil, signal, sys, time
    import torch
    import savegame as sg

    root = sys.argv[1]

    def trial(async_save):
        model = torch.nn.Linear(3, 3)
        ck = sg.Checkpointer(root, save=sg.Every(steps=1), async_save=async_save)
        ck.restore(sg.TrainState(model=model))
        ck.step(sg.TrainState(model=model), 1)
        raise RuntimeError("the trial failed")  # no close(), no `with`

    for async_save in (False, True):
        try:
            trial(async_save)
        except RuntimeError:
            pass
        time.sleep(0.5 if async_save else 0)  # an async save in flight keeps it alive until done
        gc.collect()
        # the folder can be opened again: the lock went with the collected Checkpointer
        with sg.Checkpointer(root) as again:
            assert again.restore(sg.TrainState(model=torch.nn.Linear(3, 3))) == 1
        shutil.rmtree(os.path.join(root, "step-000000000001"))  # the next trial starts afresh
    # (the handler may still be installed when the collector ran on another thread: it then
    # passes the next signal on)
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still alive after SIGTERM", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_collected_checkpointer_gives_back_the_lock_and_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "trial.py"
    script.write_text(_TRIAL)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ready" in proc.stdout, proc.stderr
    assert "still alive" not in proc.stdout
    assert proc.returncode == -15, (proc.returncode, proc.stderr[-2000:])
