"""Review D20 of the lead's fixes since e8d3831: the cache's ``remote-base.json`` (a fresh cache
restored from the remote records that checkpoint) and upload failures raised after the call's
own save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.checkpointer.tiers import BASE_FILE, UploadRetry
from savegame.engine import reader
from savegame.format import layout
from savegame.storage.memory import MemoryStore
from tests.test_tiers import _Down

FAST = UploadRetry(attempts=3, first_delay=0.01, max_delay=0.02)


def _state() -> tuple[sg.TrainState, dict[str, Any]]:
    holder: dict[str, Any] = {"w": torch.zeros(100), "step": 0}
    return sg.TrainState(rng=False, extras=holder), holder


def _set(holder: dict[str, Any], step: int) -> None:
    holder["w"] = torch.full((100,), float(step))
    holder["step"] = step


def _steps(store: Any) -> list[int]:
    return [r.step for r in reader.list_checkpoints(store) if r.valid]


def _ckpt(remote: Any, cache: Path, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("save", sg.Every(steps=1))
    kw.setdefault("keep", sg.Keep(last=5))
    return sg.Checkpointer(remote, cache=cache, handle_signals=False, upload_retry=FAST, **kw)


def _delete_then_reopen(tmp_path: Path, cache: Path) -> tuple[int, list[int]]:
    """The user drops remote step 20 (docs: "to drop the newer ones, delete their step-…
    folders"); the machine with ``cache`` reopens the run and restores."""
    remote = tmp_path / "remote"
    assert _steps(remote) == [10, 20]
    assert 20 in _steps(cache)  # the cache keeps the newest uploaded
    shutil.rmtree(remote / layout.step_dir(20))
    s, _ = _state()
    with _ckpt(remote, cache) as c:
        got = c.restore(s)
    return got, _steps(remote)


def test_control_a_deleted_remote_step_is_dropped_from_a_cache_that_saved_the_base(
    tmp_path: Path,
) -> None:
    # Before remote-base.json: a cache that saved 10 and 20 itself (10 left the cache once 20
    # was uploaded) treats its 20 as stale once the user deleted it remotely.
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    s, h = _state()
    with _ckpt(remote, cache) as a:
        for step in (10, 20):
            _set(h, step)
            a.save(s, step)
    assert _steps(cache) == [20]
    assert _delete_then_reopen(tmp_path, cache) == (10, [10])


def test_a_deleted_remote_step_is_not_resurrected_by_a_fresh_caches_base_marker(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote"
    s, h = _state()
    with _ckpt(remote, tmp_path / "cache-a") as a:
        _set(h, 10)
        a.save(s, 10)
    cache = tmp_path / "cache-b"
    s, h = _state()
    with _ckpt(remote, cache) as b:  # a fresh cache: restores 10 from the remote
        assert b.restore(s) == 10
        _set(h, 20)
        b.save(s, 20)  # uploaded (close drains)
    assert not (cache / BASE_FILE).exists()  # cleared by the first upload from this cache
    # Same history as the control: 20 was uploaded, then deleted remotely by the user.
    assert _delete_then_reopen(tmp_path, cache) == (10, [10])


def test_the_base_file_does_not_disturb_ls_verify_prune_of_the_cache(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    s, h = _state()
    with _ckpt(remote, tmp_path / "cache-a") as a:
        _set(h, 10)
        a.save(s, 10)
    cache = tmp_path / "cache-b"
    s, h = _state()
    with _ckpt(remote, cache) as b:
        assert b.restore(s) == 10
        for step in (20, 30):
            _set(h, step)
            b.save(s, step)
    # (the first upload cleared it: a stale one, as a crash before any upload would leave)
    (cache / BASE_FILE).write_text(json.dumps({"step": 10, "manifest_sha256": "0" * 64}))
    dest = tmp_path / "copy"
    for args in (
        ["ls", str(cache)],
        ["verify", str(cache)],
        ["push", "--no-progress", str(cache), dest.as_uri()],
        ["verify", str(dest)],
        ["prune", str(cache), "--keep-last", "1"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "savegame", *args], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, (args, out.stdout, out.stderr)
    # a reopen still works and resumes the newest
    s, _ = _state()
    with _ckpt(remote, cache) as c:
        assert c.restore(s) == 30


def test_a_signal_save_with_exit_on_signal_false_is_saved_and_preempted_then_the_upload_error_raised(
    tmp_path: Path,
) -> None:
    # README: "With exit_on_signal=False, ckpt.preempted becomes True and your loop decides";
    # exit_on_signal=True logs a failed upload rather than turning the preemption into a crash.
    remote = _Down(MemoryStore("remote"))
    s, h = _state()
    ckpt = sg.Checkpointer(
        remote,
        cache=tmp_path / "cache",
        save=sg.Every(steps=1),
        upload_retry=FAST,
        exit_on_signal=False,
    )
    try:
        _set(h, 1)
        ckpt.step(s, 1)
        deadline = time.monotonic() + 10
        while remote.attempts < FAST.attempts and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        _set(h, 2)
        raised: BaseException | None = None
        try:
            ckpt.step(s, 2)
        except sg.StorageError as exc:
            raised = exc
        assert ckpt.preempted
        assert 2 in _steps(tmp_path / "cache")
        # tiers.md: raised by the next step(), after its own save (here: the signal's save).
        assert raised is not None and raised.step == 1
    finally:
        remote.down = False
        ckpt.close()


def test_a_rollback_killed_before_its_upload_does_not_resurrect_the_deleted_branch(
    tmp_path: Path,
) -> None:
    from savegame.storage.local import LocalStore
    from tests.test_tiers import _abandon, _Slow

    rdir, cache = tmp_path / "remote", tmp_path / "cache"
    remote = _Slow(LocalStore(rdir), 0.0)
    s, h = _state()
    with _ckpt(remote, cache) as a:
        for step in (10, 20):
            _set(h, step)
            a.save(s, step)
    assert _steps(cache) == [20]
    s, h = _state()
    b = _ckpt(remote, cache)
    with pytest.warns(UserWarning, match="newer checkpoints"):
        assert b.restore(s, step=10) == 10
        shutil.rmtree(rdir / layout.step_dir(20))  # the warning's advice: drop the newer ones
        remote.gate.clear()
        _set(h, 15)
        b.save(s, 15)
    _abandon(b)  # killed before 15's upload
    remote.gate.set()
    s, h = _state()
    with _ckpt(remote, cache) as c:
        assert c.restore(s) == 15  # got 20: the branch the user deleted
    assert 20 not in _steps(rdir)
