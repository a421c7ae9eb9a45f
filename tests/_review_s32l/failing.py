"""Checkpointers whose constructor or restore() raises, many times in one process: a folder
locked by another process, a damaged run.json, a checkpoint that does not fit the state
(dropped after the error, and inside `with`). Prints JSON: snapshots, the errors seen, and
whether the folders open again afterwards in this process.

usage: python failing.py ROOT
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

import savegame as sg

sys.path.insert(0, os.path.dirname(__file__))
import probe  # noqa: E402

REPEAT = 15


def main() -> None:
    root = sys.argv[1]
    locked, damaged, good = (os.path.join(root, n) for n in ("locked", "damaged", "good"))
    model = torch.nn.Linear(4, 4)
    st = sg.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    wrong = sg.TrainState(model=torch.nn.Linear(3, 3))
    for run in (locked, good):
        with sg.Checkpointer(run) as ck:
            ck.save(st, 1)
    os.makedirs(damaged)
    with open(os.path.join(damaged, "run.json"), "w") as f:
        f.write('{"run_id": ')
    del ck
    # Another writer holds the folder: the flock and holder record savegame's RunLock writes
    # (storage/local.py), taken by a small process that does not import torch.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, json, os, socket, sys, time\n"
         f"fd = os.open(os.path.join({locked!r}, '.lock'), os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
         "os.ftruncate(fd, 0)\n"
         "os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), "
         "'since': time.time()}).encode(), 0)\n"
         "print('held', flush=True)\nsys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    before = probe.snapshot()
    errors: dict[str, list[str]] = {
        "locked": [],
        "damaged": [],
        "restore_dropped": [],
        "restore_with": [],
    }
    for i in range(REPEAT):
        for name, run in (("locked", locked), ("damaged", damaged)):
            try:
                sg.Checkpointer(run, async_save=i % 2 == 0)
                errors[name].append("no error")
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors[name].append(type(exc).__name__)

        def trial(i: int = i) -> None:
            ck = sg.Checkpointer(good, async_save=i % 2 == 0)
            ck.restore(wrong)  # raises; the trial never reaches close()

        try:
            trial()
            errors["restore_dropped"].append("no error")
        except Exception as exc:  # noqa: BLE001
            errors["restore_dropped"].append(type(exc).__name__)
        gc.collect()

        def trial_with(i: int = i) -> None:
            with sg.Checkpointer(good, async_save=i % 2 == 0) as ck:
                ck.restore(wrong)

        try:
            trial_with()
            errors["restore_with"].append("no error")
        except Exception as exc:  # noqa: BLE001
            errors["restore_with"].append(type(exc).__name__)
    after = probe.snapshot()
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(timeout=60)
    os.remove(os.path.join(damaged, "run.json"))
    reopened = {}
    for name, run in (("locked", locked), ("damaged", damaged), ("good", good)):
        try:
            with sg.Checkpointer(run) as ck:
                got = ck.restore(st)
                ck.save(st, got + 1)
            reopened[name] = "ok"
        except Exception as exc:  # noqa: BLE001
            reopened[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"before": before, "after": after, "errors": errors, "reopened": reopened}))


if __name__ == "__main__":
    main()
