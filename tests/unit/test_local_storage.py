from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from savegame import errors
from savegame.storage import local


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "LATEST"
    local.atomic_write(target, b"one")
    local.atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]


def test_atomic_write_failure_is_storage_error_and_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    local.atomic_write(target, b"old")

    def boom(*a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(errors.StorageError, match="No space") as info:
        local.atomic_write(target, b"new")
    assert info.value.path == str(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_remove_tree_deletes_folder(tmp_path: Path) -> None:
    d = tmp_path / "step-000000000001"
    d.mkdir()
    (d / "x").write_bytes(b"1")
    local.remove_tree(d, ".tmp-deleted-x")
    assert list(tmp_path.iterdir()) == []


def test_second_lock_on_same_folder_is_locked_error_naming_the_holder(tmp_path: Path) -> None:
    first = local.RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(errors.LockedError, match=f"pid {os.getpid()}") as info:
            local.RunLock(tmp_path).acquire()
        assert info.value.path == str(tmp_path)
        assert "different folder" in str(info.value)
    finally:
        first.release()
    again = local.RunLock(tmp_path)
    again.acquire()
    assert again.held
    again.release()
    assert not again.held


def test_lock_is_free_after_the_holder_is_sigkilled(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from savegame.storage import local
        lock = local.RunLock({str(tmp_path)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
            with pytest.raises(errors.LockedError, match=f"pid {proc.pid}"):
                local.RunLock(tmp_path).acquire()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    deadline = time.monotonic() + 5
    lock = local.RunLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead holder's flock
    assert time.monotonic() < deadline
    lock.release()


def test_lock_is_free_after_sigkill_even_while_forked_children_live(tmp_path: Path) -> None:
    # DataLoader workers are forked children of the trainer: they must not keep its lock alive.
    code = textwrap.dedent(
        f"""
        import os, time
        from savegame.storage import local
        lock = local.RunLock({str(tmp_path)!r})
        lock.acquire()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(w, b"x")  # os.fork() returned here: the at-fork hooks have run in the child
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)  # on a loaded machine the child may not have run at all yet
        print(child, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            os.kill(child, 0)  # the orphaned child is still alive
            lock = local.RunLock(tmp_path)
            lock.acquire()
            lock.release()
        finally:
            os.kill(child, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
