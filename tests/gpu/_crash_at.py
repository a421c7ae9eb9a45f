"""Run an example script, SIGKILLing this process right after its checkpoint at step K committed.

    torchrun ... tests/gpu/_crash_at.py K examples/ddp_digits.py --backend nccl ...

Every rank kills itself at the same step (a power cut of the whole job, deterministic where a
timed ``kill -9`` from outside races a GPU loop that runs 145 steps in a second). K 0: no kill.
"""

from __future__ import annotations

import os
import random
import runpy
import signal
import sys

import numpy as np

import savegame as sg


def main() -> None:
    crash_at, script, *rest = sys.argv[1:]
    k = int(crash_at)
    # The examples leave Python's and numpy's generators unseeded (OS entropy), and savegame
    # saves them: seeded here so that two runs can be compared whole.
    rank = int(os.environ.get("RANK", 0))
    random.seed(rank)
    np.random.seed(rank)
    real = sg.Checkpointer.step

    def step(self: sg.Checkpointer, state: object, step: int, **kw: object) -> object:
        out = real(self, state, step, **kw)
        if k and step == k:
            self.wait()  # its save committed (a sync save already has; an async one now)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    sg.Checkpointer.step = step  # type: ignore[method-assign]
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
