"""What the integration tests look at in a run folder, as a user would: the committed steps,
``savegame verify`` from the shell, and whether another writer can open the folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def steps(root: Path) -> list[int]:
    """The steps of the committed checkpoint folders (``step-NNNNNNNNNNNN``), in order."""
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*"))


def verify(root: Path) -> None:
    """``savegame verify ROOT`` exits 0 (every checkpoint of the run verifies)."""
    out = subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def free(root: Path) -> None:
    """No lock is left behind: another writer opens the folder at once."""
    import savegame as sg

    sg.Checkpointer(root, handle_signals=False).close()
