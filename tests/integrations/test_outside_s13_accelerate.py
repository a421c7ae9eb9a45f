"""Outside review (s13): Accelerate with ``attach`` (async saves by default) when the user's
loop dies of an uncaught exception right after a scheduled save started (the save in flight):
the committed checkpoints verify, nothing half-written is listed, and the script run again
resumes and ends bitwise equal to the uninterrupted run (examples/accelerate_train.py, with its
SIGKILL replaced by an exception). A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_train.py"


def _script(tmp_path: Path) -> Path:
    src = EXAMPLE.read_text()
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    assert kill in src
    out = tmp_path / "train_raising.py"
    out.write_text(src.replace(kill, 'raise RuntimeError("a bug in the training loop")'))
    return out


def _start(script: Path, root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", str(script), "--run", str(root), "--steps", "40", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(script: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = _start(script, root, *extra)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow  # CI under 20 minutes
def test_an_uncaught_exception_right_after_a_save_started_then_the_script_again(
    tmp_path: Path,
) -> None:
    script = _script(tmp_path)
    root = tmp_path / "run with space ✓"
    ref_proc = _start(script, tmp_path / "ref")  # the uninterrupted run, alongside
    died = _run(script, root, "--kill-at", "31")  # step 30's async save is in flight
    ref_out, ref_err = ref_proc.communicate(timeout=180)
    assert ref_proc.returncode == 0, ref_err[-3000:]
    want = re.search(r"parameters sha256 (\w+)", ref_out).group(1)  # type: ignore[union-attr]
    assert died.returncode == 1 and "a bug in the training loop" in died.stderr, died.stderr[-3000:]
    assert "Traceback" in died.stderr and died.stderr.count("Traceback") == 1, died.stderr[-3000:]
    v = subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert v.returncode == 0, v.stdout + v.stderr

    again = _run(script, root)
    assert again.returncode == 0, again.stderr[-3000:]
    start = int(re.search(r"starting at step (\d+)", again.stdout).group(1))  # type: ignore[union-attr]
    assert start in (20, 30), again.stdout
    assert f"parameters sha256 {want}" in again.stdout, again.stdout
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]
