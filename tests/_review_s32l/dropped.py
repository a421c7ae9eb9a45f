"""Checkpointers that are dropped without close() (`del ck; gc.collect()`), in one process.

usage: python dropped.py ROOT MODE
  MODE=leaks: drop a sync and an async Checkpointer (nothing in flight);
      print JSON: snapshots before/after, whether this process and another one can open the
      run folder again, and the steps restorable.
  MODE=inflight: TRIALS trials on their own folders, each dropped while its async save is
      still persisting; then one Checkpointer opened and closed normally. Print JSON:
      snapshots before/after (signal handlers, savegame's handler chain).
  MODE=deep: DEEP such trials, then SIGTERM to itself (see deep()).
  MODE=trials: TRIALS trials on one folder that end without close() (an exception skipped
      it), each deleting the previous checkpoint (Keep(last=1)) whose bytes take long to free
      (a big checkpoint: 0.6 s); print JSON: the WARNING records of the "savegame" logger, the folders
      the next trial's Checkpointer freed while the dropped one's deleter was still to free
      them (two writers in the run folder at once), the run folder's entries.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import torch

import savegame as sg

sys.path.insert(0, os.path.dirname(__file__))
import probe  # noqa: E402


def state(width: int = 8) -> tuple[torch.nn.Module, sg.TrainState]:
    model = torch.nn.Linear(width, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, sg.TrainState(model=model, optimizer=opt)


def other_process_opens(run: str) -> str:
    """Whether another process can take the run folder's lock (the flock on .lock that a
    second writer's Checkpointer takes; no torch import, to keep the test quick)."""
    code = (
        "import fcntl, os\n"
        f"fd = os.open(os.path.join({run!r}, '.lock'), os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "print('opened')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() or (r.stderr.strip().splitlines() or ["?"])[-1]


def leaks(root: str) -> dict:
    model, st = state()
    # warm-up: one closed Checkpointer, so lazily created module state exists before "before"
    with sg.Checkpointer(os.path.join(root, "warm"), async_save=True) as ck:
        ck.restore(st)
        ck.save(st, 1)
    del ck
    before = probe.snapshot()
    runs = []
    for i, async_save in enumerate([False, True]):
        run = os.path.join(root, f"run{i}")
        runs.append(run)
        ck = sg.Checkpointer(run, async_save=async_save, save=sg.Every(steps=1))
        ck.restore(st)
        ck.step(st, 1)
        ck.save(st, 2)  # blocking: nothing in flight when the reference is dropped
        del ck
        gc.collect()
    result: dict = {"before": before}
    reopen = {}
    for run in runs:
        try:
            with sg.Checkpointer(run) as ck:
                reopen[run] = ["ok", ck.restore(st)]
        except Exception as exc:  # noqa: BLE001 - reported to the test
            reopen[run] = [type(exc).__name__, str(exc)]
    del ck
    result["reopen_same_process"] = reopen
    result["other_process"] = {run: other_process_opens(run) for run in runs}
    result["after"] = probe.snapshot()
    return result


def inflight(root: str) -> dict:
    model, st = state(512)  # 1 MB of parameters: the save is still persisting at `del`
    with sg.Checkpointer(os.path.join(root, "warm"), async_save=True) as ck:
        ck.restore(st)
        ck.save(st, 1)
    del ck
    before = probe.snapshot()
    for i in range(TRIALS):
        ck = sg.Checkpointer(os.path.join(root, f"trial{i}"), async_save=True)
        ck.restore(st)
        with torch.no_grad():
            model.weight.add_(1.0)
        ck.save_async(st, 1)
        del ck  # the trial raised before close(); its save still persists
        gc.collect()
    time.sleep(1.0)  # every save has committed by now
    gc.collect()
    with sg.Checkpointer(os.path.join(root, "after")) as ck:  # a later, well-behaved trial
        ck.save(st, 1)
    del ck
    return {"before": before, "after": probe.snapshot()}


TRIALS = 8


def trials(root: str) -> dict:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("savegame").addHandler(Keep(level=logging.WARNING))
    # A big checkpoint: unlinking a multi-GB file takes 0.1-0.4 s (checkpointer/facade.py,
    # _apply_retention), so retention's background free is still at work when the trial ends.
    # A free on the main thread (the next Checkpointer's garbage collection, as lock holder)
    # notes when a background free of the same folder is still to come.
    from savegame.checkpointer import retention

    plain_free = retention.free
    pending: set[str] = set()  # steps a background free (the deleter thread) will free
    overlaps: list[str] = []

    def slow_free(freer: Any, path: str) -> None:
        found = re.search(r"step-\d{12}", path)
        step = found.group(0) if found else path
        if threading.current_thread().name.startswith("savegame-delete"):
            pending.add(step)
            time.sleep(0.6)
            plain_free(freer, path)
            pending.discard(step)
            return
        if step in pending:  # another writer is about to free the very same folder
            overlaps.append(step)
        plain_free(freer, path)

    retention.free = slow_free
    model, st = state(64)
    for _ in range(TRIALS):
        ck = sg.Checkpointer(root, keep=sg.Keep(last=1), incremental=False)
        step = ck.restore(st)
        with torch.no_grad():
            model.weight.add_(1.0)
        ck.save(st, step + 1)
        del ck  # the trial raised before close(): no `with`, no try/finally
        gc.collect()
    with sg.Checkpointer(root, keep=sg.Keep(last=1)) as ck:
        last = ck.restore(st)
    time.sleep(0.8)  # the last background frees
    return {
        "warnings": records,
        "overlaps": overlaps,
        "entries": sorted(os.listdir(root)),
        "last": last,
    }


def deep(root: str) -> dict:
    """DEEP trials dropped with their async save in flight, then a SIGTERM to this process:
    with no handler of the program's own, it must end the process (the default action)."""
    model, st = state(512)
    for i in range(DEEP):
        ck = sg.Checkpointer(os.path.join(root, f"t{i}"), async_save=True, keep=sg.Keep(last=1))
        ck.save_async(st, 1)
        del ck  # the trial raised before close(); its save still persists
    time.sleep(2.0)
    gc.collect()
    chain = sys.modules["savegame.checkpointer.signals"]._chain  # type: ignore[attr-defined]
    print(json.dumps({"chain": len(chain)}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5.0)
    return {"alive after SIGTERM": True}


DEEP = 600


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    out = {"leaks": leaks, "inflight": inflight, "trials": trials, "deep": deep}[mode](root)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
