from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def _held_by_a_child(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process holding ``folder``'s run lock; SIGKILLed when the block ends."""
    code = textwrap.dedent(
        f"""
        import time
        from savegame.storage import local
        lock = local.RunLock({str(folder)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
            yield proc
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_lock_is_free_after_the_holder_is_sigkilled(tmp_path: Path) -> None:
    with _held_by_a_child(tmp_path) as proc:
        with pytest.raises(errors.LockedError, match=f"pid {proc.pid}"):
            local.RunLock(tmp_path).acquire()
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


# ---- the lock record decides where the kernel's flock cannot see (stop 32) -----------------


def test_a_live_holder_seen_only_through_its_record_still_locks(tmp_path: Path) -> None:
    """exFAT or other FUSE mounts with case-insensitive names give `runs/Exp/.lock` and
    `runs/exp/.lock` separate flocks: the record the holder wrote names it, and decides. Here
    the record of a live holder of folder A is what folder B's lock file says (as the other
    spelling's would), while B's flock itself is free."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with _held_by_a_child(a) as proc:
        (b / ".lock").write_bytes((a / ".lock").read_bytes())
        with pytest.raises(errors.LockedError, match=f"pid {proc.pid}"):
            local.RunLock(b).acquire()
    lock = local.RunLock(b)
    lock.acquire()  # the holder is gone: its record no longer locks
    lock.release()


def test_a_record_of_a_dead_or_reused_pid_or_an_old_format_does_not_lock(tmp_path: Path) -> None:
    import json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    records = [
        {"pid": dead.pid, "host": "h", "since": 1.0, "process": "x:1"},  # gone
        # a live pid (this test's parent) with another start time: a later process, same number
        {"pid": os.getppid(), "host": "h", "since": 1.0, "process": "not-its-identity"},
        {"pid": os.getpid(), "host": "h", "since": 1.0},  # written by an older savegame
        # this process, but not through a lock it holds now (released without emptying it)
        {
            "pid": os.getpid(),
            "host": "h",
            "since": 1.0,
            "process": local._process_identity(os.getpid()),
            "nonce": "none-held",
        },  # fmt: skip
    ]
    for rec in records:
        (tmp_path / ".lock").write_text(json.dumps(rec))
        lock = local.RunLock(tmp_path)
        lock.acquire()
        lock.release()
    assert (tmp_path / ".lock").read_bytes() == b""  # released: the record is emptied


def test_this_process_holding_the_lock_through_another_path_is_locked_error(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    held = local.RunLock(a)
    held.acquire()
    try:
        (b / ".lock").write_bytes((a / ".lock").read_bytes())
        with pytest.raises(errors.LockedError, match="this same process"):
            local.RunLock(b).acquire()
    finally:
        held.release()
    lock = local.RunLock(b)
    lock.acquire()
    lock.release()


# ---- folders the file system cannot rename (overlayfs lower layers: EXDEV) (stop 32) -------


class _Overlay:
    """os.rename refuses the folders in ``lower`` with EXDEV, as overlayfs does for a folder of
    a lower layer (a docker image's) without redirect_dir; files and other folders rename.
    ``moved``: the names of the files renamed."""

    def __init__(self) -> None:
        self.lower: set[str] = set()
        self.moved: list[str] = []


@pytest.fixture()
def overlay(monkeypatch: pytest.MonkeyPatch) -> _Overlay:
    import errno

    real = os.rename
    fs = _Overlay()

    def rename(src: object, dst: object) -> None:
        if os.path.abspath(str(src)) in fs.lower:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        if not os.path.isdir(str(src)):
            fs.moved.append(os.path.basename(str(src)))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(local.os, "rename", rename)
    return fs


def _checkpoint_folder(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "rank-00000.safetensors").write_bytes(b"data")
    (path / "sub" / "x").write_bytes(b"x")
    (path / "manifest.json").write_bytes(b"{}")


def test_setting_a_folder_aside_moves_its_entries_manifest_first(
    tmp_path: Path, overlay: _Overlay
) -> None:
    _checkpoint_folder(tmp_path / "step-000000000004")
    overlay.lower |= {
        str(tmp_path / "step-000000000004"),
        str(tmp_path / "step-000000000004" / "sub"),
    }
    store = local.LocalStore(tmp_path)
    store.rename("step-000000000004", "damaged-step-000000000004-x")
    assert not (tmp_path / "step-000000000004").exists()
    aside = tmp_path / "damaged-step-000000000004-x"
    assert (aside / "manifest.json").read_bytes() == b"{}"
    assert (aside / "rank-00000.safetensors").read_bytes() == b"data"
    assert (aside / "sub" / "x").read_bytes() == b"x"
    assert overlay.moved[0] == "manifest.json"


def test_detaching_a_folder_that_cannot_be_renamed_deletes_it_in_place(
    tmp_path: Path, overlay: _Overlay
) -> None:
    _checkpoint_folder(tmp_path / "step-000000000004")
    overlay.lower.add(str(tmp_path / "step-000000000004"))
    store = local.LocalStore(tmp_path)
    free = store.detach("step-000000000004", ".tmp-deleted-x")
    # out of view at once: no manifest, so no reader lists it as a checkpoint
    assert not (tmp_path / "step-000000000004" / "manifest.json").exists()
    assert free() == []
    assert not (tmp_path / "step-000000000004").exists()
    assert overlay.moved == []  # nothing was copied up to be moved


def test_retention_and_a_damaged_step_work_where_folders_cannot_be_renamed(
    tmp_path: Path, overlay: _Overlay
) -> None:
    import torch

    import savegame as sg

    model = torch.nn.Linear(2, 2)
    state = sg.TrainState(model=model)
    with sg.Checkpointer(tmp_path / "run", save=sg.Every(steps=1), keep=sg.Keep(last=2)) as ck:
        for step in range(1, 5):
            ck.step(state, step)
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == [
        "step-000000000003",
        "step-000000000004",
    ]
    # the run came in an image: its folders are in the lower layer from now on
    overlay.lower |= {str(p) for p in (tmp_path / "run").glob("step-*")}
    (tmp_path / "run" / "step-000000000004" / "manifest.json").write_bytes(b"{not json")
    with sg.Checkpointer(tmp_path / "run", save=sg.Every(steps=1), keep=sg.Keep(last=2)) as ck:
        with pytest.warns(sg.CorruptCheckpointWarning):
            assert ck.restore(state) == 3
        ck.step(state, 4)  # the damaged step 4 is set aside, never in the way
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert sum(n.startswith("damaged-step-000000000004") for n in names) == 1, names
    with sg.Checkpointer(tmp_path / "run", save=sg.Every(steps=1), keep=sg.Keep(last=1)) as ck:
        assert ck.restore(state) == 4
        ck.step(state, 5)  # retention deletes the image's step 3 and the new 4 in place
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000000000005"]
