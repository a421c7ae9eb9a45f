"""Training scripts for tests/test_review_s33_processes.py (run as subprocesses, never collected).

usage: job.py MODE ROOT [ARGS...]

  train ROOT TOTAL PAUSE HELPER   train to TOTAL (resuming), ``Every(steps=3)``, async saves
      (with PAUSE > 0 each step sleeps PAUSE and the persist thread's fsyncs are slowed, a slow
      disk: a save is in flight most of the time); prints ``step N`` after each step; HELPER=1 first starts a fork-context
      ``multiprocessing`` helper (daemon, sleeps in a loop; prints ``helper PID``); saves TOTAL
      at the end.
  terminate ROOT                  a fork-context helper started after the Checkpointer; the
      parent calls ``Process.terminate()``; prints ``terminated True|False``.
  forks ROOT                      saves step 1, then starts the async save of step 2 with its
      persist thread held inside an fsync, and forks: DataLoader workers (2 epochs,
      persistent_workers=False), a multiprocessing fork child that reads step 1 and tries to
      open the run, an os.fork child that calls os._exit(0); then prints ``forked ...`` and
      waits for a line on stdin before it lets the save finish, and closes.
  forksave ROOT                   while the async save of step 2 is held in an fsync, an
      os.fork child calls the inherited Checkpointer's step() (a save is due) and save();
      prints ``child exit N`` (bit 0: a call returned, bit 1: a raw exception) or ``child hung``
      (after 5 s).
  kill ROOT                       opens the run, starts persistent DataLoader workers, a fork
      Process sleeping 10 s and ``sleep 30``; prints ``children PIDS`` and waits to be killed.
  thread ROOT                     trains in a non-main thread (async saves every step, prints
      ``step N``) until killed.
  writer ROOT SECONDS [PAUSE [MB]]  saves at every step (Keep(last=2), incremental) for
      SECONDS, sleeping PAUSE (0.05 s) after each; MB: a frozen float32 table of that size in
      the extras (shared by the incremental saves).
  spawn ROOT OTHER                holds ROOT; a spawn-context child opens OTHER (saves, restores,
      closes), then tries ROOT; prints the child's report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Run  # noqa: E402

import savegame as sg  # noqa: E402

_real_fsync = os.fsync


def _slow_fsync_off_main(seconds: float) -> None:
    """A slow disk for the persist thread only (the training thread's own saves stay fast)."""

    def fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(seconds)
        _real_fsync(fd)

    os.fsync = fsync  # type: ignore[assignment]


def _helper_loop() -> None:
    while True:
        time.sleep(0.05)


def train(root: str, total: int, pause: float, helper: bool) -> None:
    torch.set_num_threads(1)
    if pause:  # the run that is signalled: its saves persist on a slow disk
        _slow_fsync_off_main(0.1)
    run = Run(workers=2)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=3), keep=sg.Keep(last=3), async_save=True)
    if helper:
        p = mp.get_context("fork").Process(target=_helper_loop, daemon=True)
        p.start()
        print(f"helper {p.pid}", flush=True)
    step = ckpt.restore(run.state)
    print(f"resumed {step}", flush=True)
    while step < total:
        for batch in run.loader:
            run.train_step(batch)
            step += 1
            time.sleep(pause)
            print(f"step {step}", flush=True)
            ckpt.step(run.state, step)  # after a signal: saves here, exits 75
            if step >= total:
                break
        else:
            run.extras["epoch"] += 1
    ckpt.save(run.state, total)
    ckpt.close()


def terminate(root: str) -> None:
    run = Run()
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=10**6))
    p = mp.get_context("fork").Process(target=_helper_loop, daemon=True)
    p.start()
    time.sleep(0.2)
    p.terminate()
    p.join(3)
    print(f"terminated {not p.is_alive()}", flush=True)
    if p.is_alive():
        os.kill(p.pid, 9)
        p.join()
    ckpt.save(run.state, 1)
    ckpt.close()


def _fork_child(root: str, step1: str, expected: float, parent: int) -> None:
    """In a fork-context child while the parent's persist thread is inside a save."""
    got = sg.load(step1)
    total = float(sum(v.double().sum() for v in got["model"].values()))
    if abs(total - expected) > 1e-9:
        print(f"child: step 1 reads {total}, expected {expected}", file=sys.stderr, flush=True)
        os._exit(3)
    with sg.open(step1) as r:
        r.read("model/0.weight")
    try:
        other = sg.Checkpointer(root, handle_signals=False)
    except sg.LockedError as exc:
        if f"pid {parent}" not in str(exc):
            print(
                f"child: LockedError does not name the parent: {exc}", file=sys.stderr, flush=True
            )
            os._exit(5)
        os._exit(0)
    other.close()
    print("child: opened the parent's run", file=sys.stderr, flush=True)
    os._exit(4)


def forks(root: str) -> None:
    torch.set_num_threads(1)
    run = Run()
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=10**6), async_save=True)
    step1 = ckpt.save(run.state, 1)
    expected = float(sum(v.double().sum() for v in run.model.state_dict().values()))
    in_fsync, release = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread() and not release.is_set():
            in_fsync.set()
            release.wait(60)
        _real_fsync(fd)

    os.fsync = fsync  # type: ignore[assignment]
    with torch.no_grad():
        run.model[0].weight.add_(1.0)
    handle = ckpt.save_async(run.state, 2)
    assert handle is not None
    assert in_fsync.wait(30), "the persist thread never reached an fsync"
    report: dict[str, object] = {"in_flight": not handle.done()}
    # (a) an evaluation loader whose workers are forked again at every epoch
    data = TensorDataset(torch.arange(64, dtype=torch.float32))
    loader = DataLoader(data, batch_size=8, num_workers=2, persistent_workers=False)
    report["loader"] = [float(sum(b[0].sum() for b in loader)) for _ in range(2)]
    # (b) a multiprocessing fork child that reads an earlier checkpoint and tries the run
    p = mp.get_context("fork").Process(
        target=_fork_child, args=(root, str(step1), expected, os.getpid())
    )
    p.start()
    p.join(60)
    report["mp_exitcode"] = p.exitcode
    if p.is_alive():
        p.kill()
        p.join()
    # (c) a bare os.fork child
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    report["fork_status"] = os.waitpid(pid, 0)[1]
    report["still_in_flight"] = not handle.done()
    print("forked " + json.dumps(report), flush=True)
    sys.stdin.readline()  # the test checks the lock from another process meanwhile
    release.set()
    print(f"committed {handle.result(timeout=60)}", flush=True)
    ckpt.close()
    print("closed", flush=True)


def forksave(root: str) -> None:
    torch.set_num_threads(1)
    run = Run()
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), async_save=True)
    ckpt.save(run.state, 1)
    release = threading.Event()

    def fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread() and not release.is_set():
            release.wait(60)
        _real_fsync(fd)

    os.fsync = fsync  # type: ignore[assignment]
    handle = ckpt.save_async(run.state, 2)
    assert handle is not None
    pid = os.fork()
    if pid == 0:  # code that reaches the Checkpointer from a forked child
        code = 0
        for call in (lambda: ckpt.step(run.state, 3), lambda: ckpt.save(run.state, 4)):
            try:
                call()
                code |= 1  # it saved (or said it did) from the child
            except sg.CheckpointError:
                pass
            except BaseException as exc:  # noqa: BLE001
                print(f"child: {exc!r}", file=sys.stderr, flush=True)
                code |= 2
        os._exit(code)
    outcome = "hung"
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            outcome = f"exit {os.waitstatus_to_exitcode(status)}"
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(f"child {outcome}", flush=True)
    release.set()
    handle.result(timeout=60)
    ckpt.close()


def kill(root: str) -> None:
    run = Run(workers=2, persistent=True)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=10**6))
    ckpt.save(run.state, 1)
    it = iter(run.loader)
    next(it)  # the persistent workers are up
    p = mp.get_context("fork").Process(target=time.sleep, args=(10,))
    p.start()
    sleeper = subprocess.Popen(["sleep", "30"])
    pids = [w.pid for w in it._workers] + [p.pid, sleeper.pid]  # type: ignore[attr-defined]
    print("children " + " ".join(map(str, pids)), flush=True)
    time.sleep(120)


def thread(root: str) -> None:
    torch.set_num_threads(1)

    def work() -> None:
        run = Run()
        ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=3), async_save=True)
        step = ckpt.restore(run.state)
        for _ in range(2000):
            for batch in run.loader:
                run.train_step(batch)
                step += 1
                ckpt.step(run.state, step)
                time.sleep(0.02)
                print(f"step {step}", flush=True)

    t = threading.Thread(target=work, name="trainer")
    t.start()
    t.join()


def writer(root: str, seconds: float, pause: float = 0.05, table_mb: int = 0) -> None:
    torch.set_num_threads(1)
    run = Run()
    if table_mb:  # a large frozen table (an embedding): shared by every incremental save
        run.extras["table"] = torch.randn(table_mb << 18)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=2), incremental=True)
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        for batch in run.loader:
            run.train_step(batch)
            step += 1
            ckpt.step(run.state, step)
            if step == 1:
                print("started", flush=True)
            time.sleep(pause)
            if time.monotonic() >= end:
                break
    ckpt.close()
    print(f"done {step}", flush=True)


def _spawn_child(parent_root: str, other: str, parent: int, out: mp.Queue) -> None:
    report: dict[str, object] = {}
    try:
        run = Run()
        with sg.Checkpointer(other, save=sg.Every(steps=10**6)) as ck:
            ck.save(run.state, 7)
        with sg.Checkpointer(other) as ck:
            report["restored"] = ck.restore(Run(seed=1).state)
        try:
            sg.Checkpointer(parent_root, handle_signals=False).close()
            report["parent_run"] = "opened"
        except sg.LockedError as exc:
            report["parent_run"] = "LockedError"
            report["names_parent"] = f"pid {parent}" in str(exc)
            report["message"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(exc).__name__}: {exc}"
    out.put(report)


def spawn(root: str, other: str) -> None:
    run = Run()
    with sg.Checkpointer(root, save=sg.Every(steps=10**6)) as ck:
        ck.save(run.state, 1)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_spawn_child, args=(root, other, os.getpid(), q))
        p.start()
        report = q.get(timeout=90)
        p.join(30)
        ck.save(run.state, 2)  # the parent still holds its run
    print("child " + json.dumps(report), flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "train":
        train(args[0], int(args[1]), float(args[2]), args[3] == "1")
    elif mode == "terminate":
        terminate(args[0])
    elif mode == "forks":
        forks(args[0])
    elif mode == "forksave":
        forksave(args[0])
    elif mode == "kill":
        kill(args[0])
    elif mode == "thread":
        thread(args[0])
    elif mode == "writer":
        writer(args[0], float(args[1]), *(float(args[2]), int(args[3]))[: len(args) - 2])
    elif mode == "spawn":
        spawn(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
