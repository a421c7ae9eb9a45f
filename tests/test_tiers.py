"""Two tiers (issue 11): saves commit into a local cache folder and upload in the background to
a remote run (any Store: here memory, local and fault-injecting ones), and starting a run from
another run (``start_from``).

What is checked: training does not wait for the upload; a failed upload is retried with backoff
and then raised, typed, at the next step()/close(); the cache never drops a checkpoint that is
not uploaded, and keeps only the newest uploaded one besides; the remote keeps the user's rule
and never loses its only complete checkpoint; restore takes the newest valid checkpoint of both
tiers (a fresh cache restores from the remote; a cache ahead of the remote resumes and uploads).
"""

from __future__ import annotations

import errno
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.checkpointer import runfile
from savegame.checkpointer.tiers import UploadRetry, merge_refs
from savegame.engine import reader, writer
from savegame.format import layout
from savegame.storage import Store, base
from savegame.storage.faulty import FaultyStore
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore

#: Upload threads of writers a test "killed" (_abandon): they never write again.
_KILLED: set[threading.Thread] = set()

FAST = UploadRetry(attempts=3, first_delay=0.01, max_delay=0.02)


def _state() -> tuple[sg.TrainState, dict[str, Any]]:
    holder: dict[str, Any] = {"w": torch.zeros(1000), "step": 0}
    return sg.TrainState(rng=False, extras=holder), holder


def _set(holder: dict[str, Any], step: int) -> None:
    holder["w"] = torch.full((1000,), float(step))
    holder["step"] = step


def _steps(store: Store | Path) -> list[int]:
    return [r.step for r in reader.list_checkpoints(store) if r.valid]


def _ckpt(remote: Any, cache: Path, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("save", sg.Every(steps=1))
    kw.setdefault("keep", sg.Keep(last=2))
    return sg.Checkpointer(remote, cache=cache, handle_signals=False, upload_retry=FAST, **kw)


def _abandon(ckpt: sg.Checkpointer) -> None:
    """What a kill -9 leaves: no close(), no upload drained, the locks dropped (as the kernel
    drops a dead process's flock and a dead writer's lease expires)."""
    ckpt.wait()
    tiers = ckpt._tiers
    assert tiers is not None
    with tiers._cond:
        tiers._stopped = True
        tiers._rounds.clear()
        tiers._cond.notify_all()
        if tiers._thread is not None:  # an upload held back by _Slow.gate never writes again
            _KILLED.add(tiers._thread)
    ckpt._signals.restore()
    ckpt._lock.release()
    tiers._lease.release()


class _Slow(FaultyStore):
    """A remote whose uploads take ``delay`` seconds each (writes can be held back)."""

    def __init__(self, inner: Store, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        self.gate.wait()
        if threading.current_thread() in _KILLED:
            raise OSError(errno.EIO, "this writer was killed")
        time.sleep(self.delay)
        return super().begin(name, final)


class _Down(FaultyStore):
    """A remote that refuses every upload while ``down`` (counts the attempts)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.down = True
        self.attempts = 0

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        self.attempts += 1
        if self.down:
            raise OSError(errno.ECONNREFUSED, "connection refused (injected)")
        return super().begin(name, final)


def _returns_while_held(gate: threading.Event, fn: Any) -> None:
    """``fn()`` returns while the remote's uploads are held at ``gate`` (no timing involved:
    an upload on the caller's thread would wait for the gate and never return)."""
    gate.clear()
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised on the test's thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    try:
        assert done.wait(60), "the training thread waited for an upload held at the remote"
    finally:
        gate.set()
    if failure:
        raise failure[0]


def test_step_returns_before_the_upload_and_close_waits_for_it(tmp_path: Path) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.2)
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache")

    def three_steps() -> None:
        for step in (1, 2, 3):
            _set(holder, step)
            assert ckpt.step(state, step)
        assert _steps(tmp_path / "cache")[-1] == 3  # committed locally at once
        assert _steps(remote.inner) == []  # nothing uploaded yet: every upload is held

    _returns_while_held(remote.gate, three_steps)
    ckpt.close()
    assert _steps(remote.inner) == [2, 3]  # Keep(last=2) on the remote run
    assert remote.inner.read(layout.LATEST) == b"step-000000000003\n"
    assert remote.inner.exists(layout.RUN_FILE)
    # The cache keeps only the newest uploaded checkpoint (for a fast local resume).
    assert _steps(tmp_path / "cache") == [3]
    assert reader.verify(sg.storage.Location(remote.inner, layout.step_dir(3))) == []


def test_async_save_with_a_slow_remote_returns_at_the_snapshot(tmp_path: Path) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.2)
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache", async_save=True) as ckpt:
        _set(holder, 1)

        def save_and_wait() -> None:
            ckpt.step(state, 1)
            ckpt.wait()  # committed in the cache; the upload goes on
            assert _steps(tmp_path / "cache") == [1] and _steps(remote.inner) == []

        _returns_while_held(remote.gate, save_and_wait)
    assert _steps(remote.inner) == [1]


def test_a_failed_upload_is_retried_then_raised_typed_at_the_next_step(tmp_path: Path) -> None:
    remote = _Down(MemoryStore("remote"))
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache")
    _set(holder, 1)
    ckpt.step(state, 1)
    tiers = ckpt._tiers
    assert tiers is not None
    deadline = time.monotonic() + 10  # every attempt made and the failure recorded
    while tiers._failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # Retried, bounded: one failed upload is FAST.attempts tries. (The next step re-queues
    # the pending step 1, so its upload thread may start a fresh round before we look again.)
    assert remote.attempts == FAST.attempts
    _set(holder, 2)
    with pytest.raises(sg.StorageError) as info:
        ckpt.step(state, 2)
    err = info.value
    assert isinstance(err, OSError) and err.step == 1
    assert "memory://remote/step-000000000001" in str(err) and err.path is not None
    assert "3 attempt(s)" in str(err) and isinstance(err.__cause__, OSError)
    # Raised once; the checkpoint stayed in the cache and is uploaded when the remote is back.
    remote.down = False
    _set(holder, 2)
    ckpt.step(state, 2)
    ckpt.close()
    assert _steps(remote.inner) == [1, 2]


@pytest.mark.parametrize("call", ["step", "save", "save_async"])
def test_the_call_that_raises_an_upload_failure_has_saved_its_own_step_first(
    tmp_path: Path, call: str
) -> None:
    # A caller that catches the error and goes on (the remote is down for a while) must not
    # lose the checkpoint of the call that told it (stop 19, R15).
    remote = _Down(MemoryStore("remote"))
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=5))
    _set(holder, 1)
    ckpt.step(state, 1)
    tiers = ckpt._tiers
    assert tiers is not None
    deadline = time.monotonic() + 10  # every attempt made and the failure recorded
    while tiers._failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _set(holder, 2)
    with pytest.raises(sg.StorageError) as info:
        getattr(ckpt, call)(state, 2)
    assert info.value.step == 1
    ckpt.wait()
    assert 2 in _steps(tmp_path / "cache")  # step 2 was saved before the error was raised
    remote.down = False
    ckpt.close()
    assert _steps(remote.inner) == [1, 2]


def test_a_preemption_with_a_failed_upload_still_exits_75_with_the_step_in_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os
    import signal

    remote = _Down(MemoryStore("remote"))
    state, holder = _state()
    ckpt = sg.Checkpointer(
        remote, cache=tmp_path / "cache", save=sg.Every(steps=1), upload_retry=FAST
    )
    try:
        _set(holder, 1)
        ckpt.step(state, 1)
        os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice, while uploads fail
        time.sleep(0.05)
        _set(holder, 2)
        with caplog.at_level("ERROR", logger="savegame"), pytest.raises(SystemExit) as info:
            ckpt.step(state, 2)
        assert info.value.code == 75  # requeued, not a crash
        assert 2 in _steps(tmp_path / "cache")
        assert "an upload to the remote failed" in caplog.text
    finally:
        ckpt.close()


def test_a_transient_upload_fault_is_retried_without_an_error(tmp_path: Path) -> None:
    remote = FaultyStore(MemoryStore("remote"), {"stage.write": 1, "commit.publish": 1})
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache") as ckpt:
        _set(holder, 1)
        ckpt.step(state, 1)
    assert _steps(remote.inner) == [1]
    assert remote.fired == ["stage.write", "commit.publish"]
    assert not [e for e in remote.inner.list("") if e.name.startswith(layout.TMP_PREFIX)]


def test_an_upload_that_committed_unheard_is_not_uploaded_twice(tmp_path: Path) -> None:
    remote = FaultyStore(MemoryStore("remote"), {"commit.done": 1})  # published, then an error
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache") as ckpt:
        _set(holder, 1)
        ckpt.step(state, 1)
    assert remote.fired == ["commit.done"] and remote.calls["stage.begin"] == 1
    assert _steps(remote.inner) == [1]


def _save_then_close_raises(
    ckpt: sg.Checkpointer, state: sg.TrainState, step: int, kind: type[Exception], match: str
) -> None:
    """``save(step)`` commits to the cache; its upload fails in the background, and the failure
    is raised once on the caller's thread: by ``save()`` itself if the upload thread got there
    first (a loaded machine), else by ``close()``. Either way the lock is released."""
    try:
        ckpt.save(state, step)
    except kind as exc:
        assert re.search(match, str(exc)), exc
        ckpt.close()  # raised once: close() does not raise it again
        return
    with pytest.raises(kind, match=match):
        ckpt.close()


def test_a_different_checkpoint_of_the_step_on_the_remote_is_never_overwritten(
    tmp_path: Path,
) -> None:
    remote = MemoryStore("remote")
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=5)) as ckpt:
        for step in (1, 2):
            _set(holder, step)
            ckpt.step(state, step)
    before = remote.read(f"{layout.step_dir(2)}/{layout.MANIFEST}")
    # Back to step 1 on another machine, and a different step 2: its upload must not replace
    # the remote's step 2 (not retried: the error says to delete one of them).
    state2, holder2 = _state()
    ckpt = _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5))
    assert ckpt.restore(state2, step=1) == 1
    _set(holder2, 2)
    holder2["w"] += 0.5
    _save_then_close_raises(ckpt, state2, 2, sg.StepExistsError, "different step 2")
    assert remote.read(f"{layout.step_dir(2)}/{layout.MANIFEST}") == before
    assert 2 in _steps(tmp_path / "cache-b")  # kept in the cache


def test_no_upload_commits_once_the_remote_lease_is_lost(tmp_path: Path) -> None:
    remote = MemoryStore("remote")
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache")
    assert ckpt._tiers is not None
    ckpt._tiers._lease.release()  # as when the lease expired and another writer took it
    _set(holder, 1)
    _save_then_close_raises(ckpt, state, 1, sg.StorageError, "lease .* was lost")
    assert _steps(remote) == [] and _steps(tmp_path / "cache") == [1]


def test_close_raises_an_upload_that_keeps_failing(tmp_path: Path) -> None:
    remote = _Down(MemoryStore("remote"))
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache")
    _set(holder, 1)
    ckpt.save(state, 1)
    with pytest.raises(sg.StorageError, match="upload of step 1"):
        ckpt.close()
    # The lock and the lease are released all the same: a new writer opens the run.
    remote.down = False
    with _ckpt(remote, tmp_path / "cache") as again:
        assert again.restore(_state()[0]) == 1  # from the cache: it was never uploaded
    assert _steps(remote.inner) == [1]  # and the new writer uploaded it


def test_the_cache_never_drops_a_checkpoint_that_is_not_uploaded(tmp_path: Path) -> None:
    remote = _Down(MemoryStore("remote"))
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=1))
    for step in range(1, 6):
        _set(holder, step)
        try:
            ckpt.step(state, step)
            ckpt.wait()
        except sg.StorageError:
            pass  # an upload's failure, reported
    assert _steps(tmp_path / "cache") == [1, 2, 3, 4, 5]  # Keep(last=1), but none uploaded
    assert _steps(remote.inner) == []
    remote.down = False
    ckpt.close()  # uploads them all, oldest first, then prunes both tiers
    assert _steps(remote.inner) == [5]
    assert _steps(tmp_path / "cache") == [5]


def test_remote_retention_keeps_the_only_complete_checkpoint(tmp_path: Path) -> None:
    remote = _Down(MemoryStore("remote"))
    remote.down = False
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=1))
    _set(holder, 1)
    ckpt.save(state, 1)
    ckpt.wait()
    deadline = time.monotonic() + 10
    while _steps(remote.inner) != [1] and time.monotonic() < deadline:
        time.sleep(0.01)
    remote.down = True  # step 2 never reaches the remote: step 1 must stay there
    _set(holder, 2)
    ckpt.save(state, 2)
    with pytest.raises(sg.StorageError):
        ckpt.close()
    assert _steps(remote.inner) == [1]
    assert _steps(tmp_path / "cache") == [1, 2]


def test_retention_never_deletes_another_runs_checkpoint_on_the_remote(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    writer.write_checkpoint(remote, 1, {"x": torch.ones(2)}, run_id="someone-else")
    state, holder = _state()
    with _ckpt(str(remote), tmp_path / "cache", keep=sg.Keep(last=1)) as ckpt:
        for step in (2, 3, 4):
            _set(holder, step)
            ckpt.step(state, step)
    refs = reader.list_checkpoints(remote)
    assert [(r.step, r.manifest.run_id == "someone-else") for r in refs if r.manifest] == [
        (1, True),
        (4, False),
    ]


def test_a_fresh_cache_restores_from_the_remote(tmp_path: Path) -> None:
    remote = MemoryStore("remote")
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-a") as ckpt:
        for step in (1, 2, 3):
            _set(holder, step)
            ckpt.step(state, step)
        run_id = ckpt.run_id
    state2, holder2 = _state()
    with _ckpt(remote, tmp_path / "cache-b") as ckpt:  # another machine
        assert ckpt.run_id == run_id
        assert ckpt.restore(state2) == 3
        assert torch.equal(holder2["w"], torch.full((1000,), 3.0))
        _set(holder2, 4)
        ckpt.step(state2, 4)
    assert _steps(remote) == [3, 4]


def test_a_cache_ahead_of_the_remote_resumes_and_uploads_the_rest(tmp_path: Path) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=3))
    _set(holder, 1)
    ckpt.save(state, 1)
    ckpt.wait()
    deadline = time.monotonic() + 10
    while _steps(remote.inner) != [1] and time.monotonic() < deadline:
        time.sleep(0.01)
    remote.gate.clear()  # uploads stall: steps 2 and 3 are only in the cache at the "crash"
    for step in (2, 3):
        _set(holder, step)
        ckpt.save(state, step)
    _abandon(ckpt)
    remote.gate.set()
    assert _steps(remote.inner) == [1]
    state2, holder2 = _state()
    with _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=3)) as again:
        assert again.restore(state2) == 3  # the newest valid one: in the cache
        assert holder2["step"] == 3
    assert _steps(remote.inner) == [1, 2, 3]  # the pending uploads were finished
    assert _steps(tmp_path / "cache") == [3]


def test_cache_checkpoints_the_remote_went_on_without_are_dropped(tmp_path: Path) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    state, holder = _state()
    ckpt = _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5))
    _set(holder, 1)
    ckpt.save(state, 1)
    ckpt.wait()
    deadline = time.monotonic() + 10
    while _steps(remote.inner) != [1] and time.monotonic() < deadline:
        time.sleep(0.01)
    remote.gate.clear()
    _set(holder, 5)
    ckpt.save(state, 5)  # machine A: step 5 never leaves its cache
    _abandon(ckpt)
    remote.gate.set()
    # Machine B resumes from the remote (step 1) and gets to step 3.
    state_b, holder_b = _state()
    with _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5)) as b:
        assert b.restore(state_b) == 1
        for step in (2, 3):
            _set(holder_b, step)
            b.step(state_b, step)
    # Machine A comes back: its step 5 is of a history the remote no longer follows.
    refs, uploaded, pending, stale = merge_refs(
        remote.inner, LocalStore(tmp_path / "cache-a"), b.run_id
    )
    assert (uploaded, pending, stale) == ([1], [], [5])
    state_a, holder_a = _state()
    with _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5)) as a:
        assert a.restore(state_a) == 3
    assert 5 not in _steps(tmp_path / "cache-a")
    assert _steps(remote.inner) == [1, 2, 3]


def _fresh_cache_machine_dies_before_its_uploads(remote: Any, cache: Path) -> str:
    """Machine A saves 1 and uploads it; machine B, on the fresh ``cache``, restores 1 from the
    remote and saves 2 and 3 there while the uploads stall, then dies. Returns the run id."""
    state, holder = _state()
    with _ckpt(remote, cache.with_name("cache-a"), keep=sg.Keep(last=5)) as a:
        _set(holder, 1)
        a.save(state, 1)
    state_b, holder_b = _state()
    b = _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert b.restore(state_b) == 1
    remote.gate.clear()
    for step in (2, 3):
        _set(holder_b, step)
        b.save(state_b, step)
    _abandon(b)
    remote.gate.set()
    assert _steps(remote.inner) == [1]
    return b.run_id


def test_a_fresh_cache_machine_killed_before_its_uploads_resumes_its_own_work(
    tmp_path: Path,
) -> None:
    # The cache held no copy of the remote's step 1 it resumed from: its steps 2 and 3 are
    # still this run's own work (the remote did not go on), never "stale" (stop 19, R15).
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    run_id = _fresh_cache_machine_dies_before_its_uploads(remote, tmp_path / "cache-b")
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(tmp_path / "cache-b"), run_id)
    assert (uploaded, pending, stale) == ([], [2, 3], [])
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 3
        assert holder["step"] == 3
    assert _steps(remote.inner) == [1, 2, 3]


def test_the_cache_copy_of_a_step_damaged_remotely_is_resumed_and_the_work_after_it_uploaded(
    tmp_path: Path,
) -> None:
    # Steps 1-3 uploaded; then the remote's manifest of 3 rots. The cache's copy of 3 is the
    # newest intact checkpoint of the run: kept and restored, never uploaded over the remote's
    # copy. Step 4, saved after it and cut off before its upload, is this run's own work: pending
    # at the next open, restored and uploaded — not removed as stale.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as first:
        for s in (1, 2, 3):
            _set(holder, s)
            first.save(state, s)
        run_id = first.run_id
    rotten = f"{layout.step_dir(3)}/{layout.MANIFEST}"
    remote.inner.put(rotten, b"{not json")
    assert merge_refs(remote.inner, LocalStore(cache), run_id)[1:] == ([], [], [])
    state, holder = _state()
    b = _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert b.restore(state) == 3 and holder["step"] == 3
    remote.gate.clear()
    _set(holder, 4)
    b.save(state, 4)
    _abandon(b)
    remote.gate.set()
    assert 4 not in _steps(remote.inner)
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(cache), run_id)
    assert stale == [] and 4 in pending and 3 in uploaded + pending  # 3's upload may have run
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 4 and holder["step"] == 4
    assert _steps(remote.inner) == [1, 2, 3, 4]
    # The remote's own copy of 3 was set aside, not overwritten; 3 was uploaded again.
    aside = [e.name for e in remote.inner.list("") if layout.parse_damaged_dir(e.name) == 3]
    assert len(aside) == 1 and remote.inner.read(f"{aside[0]}/{layout.MANIFEST}") == b"{not json"
    assert merge_refs(remote.inner, LocalStore(cache), run_id)[1:3] == ([4], [])


def test_a_lost_remote_copy_of_the_caches_upload_is_uploaded_again_unless_the_remote_went_on(
    tmp_path: Path,
) -> None:
    # Machine A uploads 1-3 (its cache keeps 3 only). The remote then loses 3's manifest; the
    # next open removes the rest of 3 as an interrupted upload. Machine B, on a fresh cache,
    # resumes from 2 and saves its own 3, uploaded. A's 3 is not the run's 3 any more: stale,
    # and A resumes B's 3 — the record of A's upload never forks the run.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5)) as a:
        for s in (1, 2, 3):
            _set(holder, s)
            a.save(state, s)
        run_id = a.run_id
    remote.inner.delete(f"{layout.step_dir(3)}/{layout.MANIFEST}", None)
    state_b, holder_b = _state()
    with _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5)) as b:
        assert b.restore(state_b) == 2
        holder_b["w"] = torch.full((1000,), 33.0)
        holder_b["step"] = 3
        b.save(state_b, 3)
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(tmp_path / "cache-a"), run_id)
    assert (uploaded, pending, stale) == ([], [], [3])
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 3 and float(holder["w"][0]) == 33.0


class _NoRename(_Slow):
    """A remote that refuses to move anything (a bucket policy without DeleteObject, say)."""

    def rename(self, key: str, new_key: str) -> None:
        raise OSError(errno.EACCES, "AccessDenied (injected)")


def test_a_damaged_remote_copy_that_cannot_be_moved_keeps_the_cache_copy_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    remote = _NoRename(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as first:
        for s in (1, 2, 3):
            _set(holder, s)
            first.save(state, s)
        run_id = first.run_id
    rotten = f"{layout.step_dir(3)}/{layout.MANIFEST}"
    remote.inner.put(rotten, b"{not json")
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as b:
        assert b.restore(state) == 3 and holder["step"] == 3
        assert 3 in _steps(cache)  # kept: neither uploaded over the remote's copy nor stale
        _set(holder, 4)
        b.save(state, 4)
    assert remote.inner.read(rotten) == b"{not json"
    assert _steps(remote.inner) == [1, 2, 4]
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 4 and holder["step"] == 4
    assert merge_refs(remote.inner, LocalStore(cache), run_id)[1:3] == ([4], [])


def test_the_cache_copy_of_a_step_damaged_remotely_is_stale_once_the_remote_went_on(
    tmp_path: Path,
) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5)) as a:
        for s in (1, 2):
            _set(holder, s)
            a.save(state, s)
        run_id = a.run_id
    state_c, holder_c = _state()
    with _ckpt(remote, tmp_path / "cache-c", keep=sg.Keep(last=5)) as c:  # another machine
        assert c.restore(state_c) == 2
        for s in (3, 4):
            _set(holder_c, s)
            c.save(state_c, s)
    remote.inner.put(f"{layout.step_dir(2)}/{layout.MANIFEST}", b"{not json")
    # Machine A's copy of 2 is older than the remote's readable 4: the remote went on.
    assert merge_refs(remote.inner, LocalStore(tmp_path / "cache-a"), run_id)[1:] == ([], [], [2])


def test_a_fresh_cache_machines_work_is_dropped_once_the_remote_went_on(tmp_path: Path) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    run_id = _fresh_cache_machine_dies_before_its_uploads(remote, tmp_path / "cache-b")
    state_c, holder_c = _state()
    with _ckpt(remote, tmp_path / "cache-c", keep=sg.Keep(last=5)) as c:  # a third machine
        assert c.restore(state_c) == 1
        _set(holder_c, 2)
        c.step(state_c, 2)
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(tmp_path / "cache-b"), run_id)
    assert (uploaded, pending, stale) == ([], [], [2, 3])
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5)) as b:
        assert b.restore(state) == 2  # the remote's step 2, machine C's
        assert holder["step"] == 2
    assert 3 not in _steps(tmp_path / "cache-b")


def test_a_cache_of_another_run_is_refused(tmp_path: Path) -> None:
    state, holder = _state()
    with _ckpt(MemoryStore("one"), tmp_path / "cache") as ckpt:
        _set(holder, 1)
        ckpt.step(state, 1)
    with pytest.raises(sg.CheckpointError, match="use an empty cache folder"):
        _ckpt(MemoryStore("two"), tmp_path / "cache")


def test_a_second_writer_of_the_remote_run_is_locked_out(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    with _ckpt(str(remote), tmp_path / "cache-a"):
        with pytest.raises(sg.LockedError):
            _ckpt(str(remote), tmp_path / "cache-b")


# ---- start_from: the next job starts from the previous job's output ------------------------------
def _train_run(root: Any, steps: range) -> None:
    state, holder = _state()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt:
        ckpt.restore(state)
        for step in steps:
            _set(holder, step)
            ckpt.step(state, step)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_start_from_loads_the_other_runs_newest_checkpoint_read_only(tmp_path: Path) -> None:
    source = tmp_path / "job1"
    _train_run(source, range(1, 4))
    before = _snapshot(source)
    record = runfile.read_run_file(source)
    assert record is not None
    source_id = record["run_id"]
    state, holder = _state()
    with sg.Checkpointer(
        tmp_path / "job2", save=sg.Every(steps=1), start_from=source, handle_signals=False
    ) as ckpt:
        assert ckpt.restore(state) == 3
        assert torch.equal(holder["w"], torch.full((1000,), 3.0))
        assert ckpt.run_id != source_id
        _set(holder, 4)
        ckpt.step(state, 4)
    assert _snapshot(source) == before  # never written, locked or set aside
    # A restart of job 2 resumes from its own run, not from job 1.
    state2, holder2 = _state()
    with sg.Checkpointer(tmp_path / "job2", start_from=source, handle_signals=False) as ckpt:
        assert ckpt.restore(state2) == 4


def test_start_from_works_while_the_other_run_is_being_written(tmp_path: Path) -> None:
    source = tmp_path / "job1"
    _train_run(source, range(1, 3))
    with sg.Checkpointer(source, handle_signals=False):  # job 1 holds its lock
        state, _ = _state()
        with sg.Checkpointer(tmp_path / "job2", start_from=source, handle_signals=False) as c:
            assert c.restore(state) == 2


def test_start_from_one_checkpoint_or_a_store(tmp_path: Path) -> None:
    source = tmp_path / "job1"
    _train_run(source, range(1, 4))
    state, holder = _state()
    one = source / layout.step_dir(2)
    with sg.Checkpointer(tmp_path / "a", start_from=one, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 2 and holder["step"] == 2
    mem = MemoryStore("job1")
    _train_run(mem, range(1, 3))
    state, holder = _state()
    with _ckpt(MemoryStore("job2"), tmp_path / "cache", start_from=mem) as ckpt:
        assert ckpt.restore(state) == 2 and holder["step"] == 2


def test_start_from_skips_a_damaged_checkpoint_without_touching_it(tmp_path: Path) -> None:
    source = tmp_path / "job1"
    _train_run(source, range(1, 4))
    damaged = source / layout.step_dir(3) / layout.tensor_file(0)
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    state, holder = _state()
    with sg.Checkpointer(tmp_path / "job2", start_from=source, handle_signals=False) as ckpt:
        with pytest.warns(sg.CorruptCheckpointWarning, match="start_from"):
            assert ckpt.restore(state) == 2
    assert (source / layout.step_dir(3)).is_dir()  # left where it was


class _Unreadable(_Slow):
    """A remote whose reads of step ``step``'s manifest fail (a 503 after the store's own
    retries) from the ``after``-th read on, while ``down``."""

    def __init__(self, inner: Store, step: int, after: int) -> None:
        super().__init__(inner, delay=0.0)
        self.key = f"{layout.step_dir(step)}/{layout.MANIFEST}"
        self.after, self.reads, self.down = after, 0, False

    def open(self, key: str) -> base.Blob:
        if self.down and key == self.key:
            self.reads += 1
            if self.reads >= self.after:
                raise OSError(errno.EIO, "503 Slow Down (injected)")
        return super().open(key)


@pytest.mark.parametrize("after", [1, 2, 3, 4])
def test_an_unreadable_remote_manifest_never_makes_the_caches_own_work_stale(
    tmp_path: Path, after: int
) -> None:
    # Machine B restored step 1 from the remote into a fresh cache, saved 2 and 3 and died
    # before uploading them. When it comes back, the remote fails to read step 1's manifest
    # (the base its work descends from): it must not guess "the remote went on" and delete 2
    # and 3 (stop 19, left alone then). Either the run refuses to open, typed, or it resumes 3.
    remote = _Unreadable(MemoryStore("remote"), step=1, after=after)
    cache = tmp_path / "cache-b"
    _fresh_cache_machine_dies_before_its_uploads(remote, cache)
    remote.down = True
    state, holder = _state()
    try:
        with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
            got = again.restore(state)
    except sg.errors.StorageError as exc:
        assert "503 Slow Down" in str(exc) and "none was removed" in str(exc)
        got = None
        # nothing lost: each of 2 and 3 is in the cache, or uploaded (the pending uploads may
        # have run before the restore read the remote again)
        assert {2, 3} <= set(_steps(cache)) | set(_steps(remote.inner))
    else:  # resumed its own work and uploaded it
        assert got == 3 and holder["step"] == 3
        assert _steps(remote.inner) == [1, 2, 3]
    remote.down = False
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 3
        assert holder["step"] == 3
    assert _steps(remote.inner) == [1, 2, 3]
    assert got is not None or remote.reads >= after  # the fault did fire


class _RunFileDown(_Slow):
    """A remote whose reads of run.json fail (a 503 after the store's retries) while ``down``."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner, delay=0.0)
        self.down = False

    def open(self, key: str) -> base.Blob:
        if self.down and key == layout.RUN_FILE:
            raise OSError(errno.EIO, "503 Slow Down (injected)")
        return super().open(key)


@pytest.mark.parametrize("cache_state", ["fresh", "with pending work"])
def test_an_unreadable_remote_run_file_never_makes_the_run_a_new_one(
    tmp_path: Path, cache_state: str
) -> None:
    # Before: run.json unreadable counted as absent. A fresh cache then started a new run id
    # and replaced the remote's run.json with it; a cache holding this run's pending work was
    # refused as "another run" with the advice to use an empty cache folder.
    remote = _RunFileDown(MemoryStore("remote"))
    if cache_state == "fresh":
        state, holder = _state()
        with _ckpt(remote, tmp_path / "cache-a") as a:
            _set(holder, 1)
            a.save(state, 1)
        cache = tmp_path / "cache-b"
    else:
        _fresh_cache_machine_dies_before_its_uploads(remote, tmp_path / "cache-b")
        cache = tmp_path / "cache-b"
    before = remote.inner.read(layout.RUN_FILE)
    cached = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    remote.down = True
    with pytest.raises(sg.StorageError, match="503 Slow Down"):
        _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert remote.inner.read(layout.RUN_FILE) == before
    assert (sorted(p.name for p in cache.iterdir()) if cache.exists() else []) == cached
    remote.down = False
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:  # the store answers again
        assert again.restore(state) == (1 if cache_state == "fresh" else 3)
        assert again.run_id == json.loads(before)["run_id"]  # the same run, not a new one
