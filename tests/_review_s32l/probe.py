"""Process-wide resource probes shared by the S32L review's helper scripts (run as scripts, in
their own process: they change signal handlers, rlimits and open many Checkpointers)."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def children() -> int:
    """Live child processes of this process (zombies included: a leaked Popen)."""
    me, n = str(os.getpid()), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("PPid:"):
                        n += line.split()[1] == me
                        break
        except OSError:
            continue
    return n


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def handlers() -> dict[str, str]:
    return {signal.Signals(s).name: repr(signal.getsignal(s)) for s in SIGNALS}


def snapshot() -> dict[str, Any]:
    """Everything the review checks for leaks, after a full collection."""
    gc.collect()
    chain = sys.modules.get("savegame.checkpointer.signals")
    sg_log = logging.getLogger("savegame")
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "thread_names": sorted(t.name for t in threading.enumerate()),
        "children": children(),
        "handlers": handlers(),
        "chain": len(getattr(chain, "_chain", ())),
        "atexit": atexit._ncallbacks(),  # type: ignore[attr-defined]
        "excepthook": repr(sys.excepthook),
        "threading_excepthook": repr(threading.excepthook),
        "savegame_log_handlers": len(sg_log.handlers),
        "root_log_handlers": len(logging.getLogger().handlers),
        "garbage": len(gc.garbage),
        "rss_kb": rss_kb(),
        "objects": live_objects(),
    }


#: savegame objects that must not outlive the Checkpointer that made them
_TRACKED = ("Checkpointer", "HostPool", "PreemptionSignals")


def live_objects() -> dict[str, int]:
    counts = dict.fromkeys(_TRACKED, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts and type(obj).__module__.startswith("savegame"):
            counts[name] += 1
    return counts
