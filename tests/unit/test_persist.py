"""Persister: one background save at a time; its failure reaches the caller as a savegame error."""

from __future__ import annotations

import threading
import time

import pytest

from savegame import errors
from savegame.engine import persist


def test_result_returns_the_jobs_value() -> None:
    p = persist.Persister()
    h = p.submit(lambda: "ok", step=3)
    assert h.result(timeout=5) == "ok"
    assert h.done() and h.step == 3
    p.wait()  # nothing to raise


def test_failure_is_raised_on_wait_once_as_storage_error_with_cause() -> None:
    p = persist.Persister()

    def job() -> None:
        raise OSError(28, "No space left on device")

    p.submit(job, step=5)
    with pytest.raises(errors.StorageError) as info:
        p.wait()
    assert isinstance(info.value, OSError) and isinstance(info.value, errors.CheckpointError)
    assert info.value.step == 5
    assert "step 5" in str(info.value) and "No space left" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    p.wait()  # reported once; not again


def test_failure_is_raised_by_the_next_submit_and_the_next_job_does_not_run() -> None:
    p = persist.Persister()
    h = p.submit(lambda: 1 / 0, step=1)
    while not h.done():
        time.sleep(0.001)
    ran = []
    with pytest.raises(errors.StorageError, match="ZeroDivisionError"):
        p.submit(lambda: ran.append(1), step=2)
    assert ran == []


def test_raise_failure_is_non_blocking_and_silent_while_running() -> None:
    p = persist.Persister()
    gate = threading.Event()
    p.submit(gate.wait, step=1)
    # raise_failure must not wait for the job: run it on a thread while the job is held at the
    # gate (a blocking raise_failure would never return; no timing involved)
    returned = threading.Event()
    threading.Thread(target=lambda: (p.raise_failure(), returned.set()), daemon=True).start()
    assert returned.wait(60), "raise_failure waited for the running job"
    assert p.busy
    gate.set()
    p.wait()
    assert not p.busy


def test_checkpoint_errors_pass_through_unchanged() -> None:
    p = persist.Persister()
    err = errors.IntegrityError("boom", step=9)

    def job() -> None:
        raise err

    p.submit(job, step=9)
    with pytest.raises(errors.IntegrityError) as info:
        p.wait()
    assert info.value is err


def test_failure_seen_through_handle_result_is_not_raised_again() -> None:
    p = persist.Persister()

    def job() -> None:
        raise OSError("disk gone")

    h = p.submit(job, step=4)
    with pytest.raises(errors.StorageError, match="disk gone"):
        h.result(timeout=5)
    p.wait()  # already reported to the caller
    assert p.submit(lambda: 2, step=5).result(timeout=5) == 2


def test_wait_with_timeout_raises_while_the_save_runs() -> None:
    p = persist.Persister()
    gate = threading.Event()
    h = p.submit(gate.wait, step=1)
    with pytest.raises(TimeoutError, match="step 1"):
        p.wait(timeout=0.05)
    with pytest.raises(TimeoutError):
        h.result(timeout=0.01)
    gate.set()
    p.wait()


def test_only_one_job_in_flight() -> None:
    p = persist.Persister()
    gate = threading.Event()
    p.submit(gate.wait, step=1)
    with pytest.raises(RuntimeError, match="in flight"):
        p.submit(lambda: None, step=2)
    gate.set()
    p.wait()
    assert p.submit(lambda: 3, step=2).result(timeout=5) == 3


def test_worker_is_reused_between_saves_and_exits_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(persist, "IDLE_EXIT_S", 0.2)
    p = persist.Persister(name="sg-test-idle-worker")
    names = [
        p.submit(lambda: threading.current_thread().ident, step=i).result(timeout=5)
        for i in range(3)
    ]
    assert len(set(names)) == 1  # one worker for consecutive saves
    deadline = time.monotonic() + 5
    while (
        any(t.name == "sg-test-idle-worker" for t in threading.enumerate())
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert not any(t.name == "sg-test-idle-worker" for t in threading.enumerate())
    assert p.submit(lambda: "again", step=9).result(timeout=5) == "again"  # restarts on demand


def test_handle_resolves_before_after_work_which_wait_and_busy_still_cover() -> None:
    p = persist.Persister()
    gate = threading.Event()
    h = p.submit(lambda: "committed", step=1, after=lambda: gate.wait(timeout=10))
    assert h.result(timeout=5) == "committed"  # resolved while `after` still runs
    assert p.busy
    with pytest.raises(TimeoutError):
        p.wait(timeout=0.05)
    with pytest.raises(RuntimeError, match="in flight"):
        p.submit(lambda: None, step=2)
    gate.set()
    p.wait(timeout=5)
    assert not p.busy


def test_failure_in_after_work_is_raised_at_the_next_call() -> None:
    p = persist.Persister()

    def after() -> None:
        raise PermissionError("cannot delete old checkpoint")

    assert p.submit(lambda: "ok", step=3, after=after).result(timeout=5) == "ok"
    with pytest.raises(errors.StorageError, match="was committed.*cannot delete"):
        p.wait()
    p.wait()


def test_stop_ends_the_idle_worker_at_once_and_a_later_submit_starts_another() -> None:
    import threading

    from savegame.engine.persist import Persister

    p = Persister(name="savegame-persist-stop-test")
    assert p.submit(lambda: 1, 1).result(5) == 1
    p.wait()
    p.stop()
    assert not any(t.name == "savegame-persist-stop-test" for t in threading.enumerate())
    assert p.submit(lambda: 2, 2).result(5) == 2  # a new worker
    p.wait()
    p.stop()
    p.stop()  # idempotent
    assert not any(t.name == "savegame-persist-stop-test" for t in threading.enumerate())
