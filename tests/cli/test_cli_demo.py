"""The README's first set-up command ends in ``savegame demo``: it must work as a user runs it.

The demo trains a small CNN on scikit-learn's bundled digits, SIGKILLs a second run at a random
step, resumes it, and exits 0 only if the resumed run is bitwise equal to the uninterrupted one.
This runs the installed console script in a fresh process (about 25 s on 2 CPU cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def _savegame_command() -> list[str]:
    script = Path(sys.executable).with_name("savegame")
    if script.exists():  # the console script pip installed, as the README runs it
        return [str(script)]
    found = shutil.which("savegame")
    return [found] if found else [sys.executable, "-m", "savegame"]


def test_savegame_demo_kills_resumes_and_proves_the_run_identical(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    proc = subprocess.run(
        [*_savegame_command(), "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "identical" in out and "MISMATCH" not in out, out
    # the demo's run folders are real savegame runs: the interrupted one kept verified checkpoints
    listed = subprocess.run(
        [*_savegame_command(), "verify", str(tmp_path / "interrupted")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
