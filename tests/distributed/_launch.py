"""Launch N local ranks of ``_worker.py`` over gloo on loopback, always bounded by a timeout
(a plain module, not a conftest: another conftest.py elsewhere must not shadow it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("_worker.py")
#: Coordination timeout for the ranks (SAVEGAME_DIST_TIMEOUT_S): short, so a bug fails fast.
RANK_TIMEOUT_S = 30
#: Wall-clock limit for one launch; a hang fails the test instead of CI.
LAUNCH_TIMEOUT_S = 120
#: A rank still running this long before the launch timeout prints every thread's stack, so a
#: hang says where it is stuck (the launcher then kills the ranks and reports their output).
HANG_DUMP_BEFORE_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    scenario: str,
    world: int,
    args: dict[str, Any],
    *,
    expect_ok: bool = True,
    worker: Path = WORKER,
) -> list[int]:
    """Run ``world`` ranks; returns their exit codes (asserting 0 unless ``expect_ok`` is False).

    One interpreter imports torch, then forks the ranks (``_worker.fork_ranks``); it runs in its
    own session so a timeout kills every rank.
    """
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        SG_TEST_STORE=os.path.join(tempfile.mkdtemp(prefix="sg-store-"), "store"),
        SAVEGAME_DIST_TIMEOUT_S=str(RANK_TIMEOUT_S),
        SG_TEST_HANG_DUMP_S=str(LAUNCH_TIMEOUT_S - HANG_DUMP_BEFORE_S),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.Popen(
        [sys.executable, str(worker), scenario, json.dumps(args), str(world)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        # every rank dumped its threads' stacks shortly before (faulthandler, _worker.py)
        pytest.fail(
            f"{scenario} on {world} ranks did not finish in {LAUNCH_TIMEOUT_S}s (hang); their "
            f"output, with the stacks of every rank {HANG_DUMP_BEFORE_S}s before the kill:\n"
            f"{(out or '')[-12000:]}"
        )
    marker = [line for line in out.splitlines() if line.startswith("EXIT-CODES ")]
    if proc.returncode != 0 or not marker:
        pytest.fail(
            f"launcher for {scenario} on {world} ranks failed ({proc.returncode}):\n{out[-6000:]}"
        )
    codes: list[int] = json.loads(marker[-1].removeprefix("EXIT-CODES "))
    if expect_ok and any(codes):
        pytest.fail(f"{scenario} on {world} ranks failed: exit codes {codes}\n{out[-6000:]}")
    return codes
