"""Outside review S33C: processes and threads around a training run.

A training script is rarely alone: DataLoader workers are forked at every epoch (right after an
end-of-epoch async save started), user code forks helpers and runs evaluation jobs, frameworks
train in a worker thread, two Checkpointers share a process, and readers (`savegame ls`,
`verify`, `sg.open`, `start_from=`) run in other processes while the run writes. The contract is
README "Use it", "Preemption", "Async saves", "One writer per run folder", "Damaged
checkpoints", "Command line" and docs/async.md, docs/resume.md, docs/storage.md.

Everything that forks, signals or kills runs in a subprocess (tests/_review_s33c/job.py), with
timeouts so a hang fails the test instead of hanging the suite; every child is reaped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout

HERE = Path(__file__).resolve().parent / "_review_s33c"
JOB = HERE / "job.py"
TIMEOUT_S = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

_spec = importlib.util.spec_from_file_location("_review_s33c_common", HERE / "common.py")
assert _spec is not None and _spec.loader is not None
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


# ---- helpers ---------------------------------------------------------------------------------
def _start(*args: object, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(JOB), *map(str, args)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: what a scheduler signals
        env=ENV,
    )


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = TIMEOUT_S) -> str:
    """The first stdout line starting with ``prefix``; fails (and kills the group) on timeout."""
    assert proc.stdout is not None
    found: list[str] = []

    def scan() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        _kill_group(proc)
        err = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"the script never printed {prefix!r} within {timeout}s:\n{err[-3000:]}")
    return found[0]


def _finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT_S) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr); None when it did not exit within ``timeout`` (killed)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, "", ""
    return proc.returncode, out or "", err or ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _steps(root: Path) -> list[int]:
    return sorted(r.step for r in reader.list_checkpoints(root))


def _all_verify(root: Path) -> dict[str, list[str]]:
    return {r.path.name: reader.verify(r.path) for r in reader.list_checkpoints(root)}


def _same_params(got: dict[str, Any], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ---- 1. forks while an async save is in flight ------------------------------------------------
def test_forks_while_an_async_save_persists_neither_deadlock_nor_touch_the_run(
    tmp_path: Path,
) -> None:
    """The persist thread sits inside an fsync of step 2 while the process forks DataLoader
    workers (two epochs, persistent_workers=False), a multiprocessing fork child that reads
    step 1 with sg.load/sg.open and tries to open the run, and an os.fork child that exits.
    No child hangs; the child is refused with LockedError naming the parent; once all children
    are gone the run is still locked for another process; the save commits exactly once."""
    root = tmp_path / "run"
    proc = _start("forks", root, stdin=True)
    try:
        line = _read_until(proc, "forked ")
        report = json.loads(line.split(" ", 1)[1])
        assert report["in_flight"] and report["still_in_flight"], report
        assert report["loader"] == [2016.0, 2016.0], report
        assert report["mp_exitcode"] == 0, (report, "see the child's stderr")
        assert report["fork_status"] == 0, report
        # every child has exited: the parent (alive, save in flight) still holds the run
        with pytest.raises(sg.LockedError, match=f"pid {proc.pid}"):
            sg.Checkpointer(root, handle_signals=False).close()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        code, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert code == 0, err[-3000:]
    assert _steps(root) == [1, 2]
    assert _all_verify(root) == {layout.step_dir(1): [], layout.step_dir(2): []}
    leftovers = [p.name for p in root.iterdir() if p.name.startswith((".tmp", "damaged"))]
    assert leftovers == []
    want = common.Run().params()
    assert _same_params(sg.load(root / layout.step_dir(1))["model"], want)
    want["0.weight"] = want["0.weight"] + 1.0
    assert _same_params(sg.load(root / layout.step_dir(2))["model"], want)


# Found by this review on 57b464b: the child hung for ever waiting for the parent's persist thread.
def test_a_forked_child_using_the_inherited_checkpointer_gets_a_typed_error_not_a_hang(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    code, out, err = _finish(_start("forksave", root))
    assert code == 0, err[-3000:]
    assert "child exit 0" in out, out + err[-2000:]
    assert _steps(root) == [1, 2]
    assert all(not v for v in _all_verify(root).values())


# ---- 2. signals to the whole process group ----------------------------------------------------
TOTAL = 16  # 1.3 epochs of 12 batches: the resume forks workers for a new epoch


@pytest.fixture
def reference_params() -> dict[str, torch.Tensor]:
    return common.reference(TOTAL)


def _preempt_and_resume(
    tmp_path: Path, reference: dict[str, torch.Tensor], *, helper: bool
) -> None:
    """Train with forked non-persistent loader workers (and a forked helper process), signal
    the whole group with SIGTERM at step 4 (step 3's async save is in flight on a slow disk),
    expect exit 75 and every process of the group gone, then resume to TOTAL exactly."""
    root = tmp_path / "run"
    proc = _start("train", root, TOTAL, 0.1, int(helper))
    helper_pid = 0
    try:
        if helper:
            helper_pid = int(_read_until(proc, "helper ").split()[1])
        _read_until(proc, "step 4")
        os.killpg(proc.pid, signal.SIGTERM)  # scancel / kill -TERM -PGID
        code: int | None = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(timeout=10)
        helper_alive = bool(helper_pid) and _alive(helper_pid)
        if code is None:
            _kill_group(proc)
        err = proc.communicate()[1]
    finally:
        if proc.poll() is None or helper_pid:
            _kill_group(proc)
    assert code is not None, (
        "the preempted job did not exit within 10 s of SIGTERM to its process group "
        f"(forked helper alive: {helper_alive})"
    )
    assert code == sg.EXIT_PREEMPTED, f"exit {code}:\n{err[-3000:]}"
    assert not helper_alive, "the forked helper survived SIGTERM to the process group"
    assert "killed by signal" not in err and "Traceback" not in err, err[-3000:]
    steps = _steps(root)
    assert steps and 4 <= steps[-1] < TOTAL, steps
    assert all(not v for v in _all_verify(root).values())
    proc = _start("train", root, TOTAL, 0, 0)
    code, _, err = _finish(proc)
    assert code == 0, err[-3000:]
    got = sg.load(root / layout.step_dir(TOTAL))["model"]
    assert _same_params(got, reference)


def test_group_sigterm_during_an_async_save_with_forked_loader_workers_exits_75_and_resumes_exactly(
    tmp_path: Path, reference_params: dict[str, torch.Tensor]
) -> None:
    _preempt_and_resume(tmp_path, reference_params, helper=False)


# Found by this review on 57b464b: the helper inherited savegame's handler and survived, and the
# parent, after saving, hung at exit joining it instead of exiting 75.
def test_group_sigterm_with_a_forked_multiprocessing_helper_exits_75_and_resumes_exactly(
    tmp_path: Path, reference_params: dict[str, torch.Tensor]
) -> None:
    _preempt_and_resume(tmp_path, reference_params, helper=True)


# Found by this review on 57b464b: terminate() only made the child log 'will save at the next step
# boundary'.
def test_process_terminate_still_ends_a_fork_child_started_after_the_checkpointer(
    tmp_path: Path,
) -> None:
    code, out, err = _finish(_start("terminate", tmp_path / "run"))
    assert code == 0, err[-3000:]
    assert "terminated True" in out, out + err[-2000:]


# ---- 3. the lock and children -----------------------------------------------------------------
def test_a_sigkilled_trainers_children_do_not_keep_the_run_locked(tmp_path: Path) -> None:
    """README "One writer per run folder": the kernel releases the flock when the holder dies.
    The trainer is SIGKILLed while its persistent DataLoader workers, a multiprocessing fork
    child (sleeping 10 s) and `sleep 30` (Popen) live on: a new job gets the run at once."""
    root = tmp_path / "run"
    proc = _start("kill", root)
    try:
        children = [int(p) for p in _read_until(proc, "children ").split()[1:]]
        assert len(children) == 4
        os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer does
        proc.wait(timeout=10)
        assert all(_alive(c) for c in children)  # (the situation under test)
        try:
            ck = sg.Checkpointer(root, handle_signals=False)
        except sg.LockedError as exc:
            names_dead = f"pid {proc.pid}" in str(exc)
            pytest.fail(
                f"the dead trainer's children keep the run locked (names the dead pid: {names_dead}): {exc}"
            )
        with ck:
            run = common.Run()
            assert ck.restore(run.state) == 1
            ck.save(run.state, 2)
    finally:
        _kill_group(proc)
    assert _steps(root) == [1, 2]


@pytest.mark.parametrize("how", ["close_fds=False", "pass_fds"])
def test_the_lock_descriptor_never_leaks_into_an_execd_program(tmp_path: Path, how: str) -> None:
    root = tmp_path / "run"
    r, w = os.pipe()
    kw: dict[str, Any] = {"close_fds": False} if how == "close_fds=False" else {"pass_fds": (r,)}
    with sg.Checkpointer(root, handle_signals=False):
        child = subprocess.Popen(["sleep", "30"], **kw)
        try:
            fds = {}
            for fd in os.listdir(f"/proc/{child.pid}/fd"):
                with contextlib.suppress(OSError):
                    fds[int(fd)] = os.readlink(f"/proc/{child.pid}/fd/{fd}")
        finally:
            child.kill()
            child.wait()
            os.close(r)
            os.close(w)
    assert str(root / ".lock") not in fds.values(), fds


# ---- 4. threads -------------------------------------------------------------------------------
def test_a_checkpointer_used_entirely_in_a_worker_thread_works_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray Train, Gradio, a notebook's background thread: signals cannot be installed off the
    main thread. Saves (async and blocking), restore and close work; a warning says that
    preemption signals are not handled; the process's handlers are untouched."""
    root = tmp_path / "run"
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            run = common.Run()
            with sg.Checkpointer(root, save=sg.Every(steps=1), async_save=True) as ck:
                out["fresh"] = ck.restore(run.state)
                for step, batch in enumerate(run.loader, 1):
                    run.train_step(batch)
                    ck.step(run.state, step)
                    if step == 3:
                        break
                ck.save(run.state, 4)
            out["saved"] = run.params()
            again = common.Run(seed=5)
            with sg.Checkpointer(root) as ck:
                out["restored"] = ck.restore(again.state)
            out["params"] = again.params()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    with caplog.at_level(logging.WARNING, logger="savegame"):
        t = threading.Thread(target=work)
        t.start()
        t.join(TIMEOUT_S)
    assert not t.is_alive()
    assert "error" not in out, repr(out.get("error"))
    assert out["fresh"] == 0 and out["restored"] == 4
    assert _same_params(out["params"], out["saved"])
    assert _steps(root) == [2, 3, 4]
    assert before == {s: signal.getsignal(s) for s in before}
    assert any("not handled" in r.getMessage() for r in caplog.records), caplog.text


def test_sigterm_while_training_in_a_worker_thread_ends_the_process_and_leaves_a_valid_run(
    tmp_path: Path,
) -> None:
    """The Checkpointer warned that it handles no signals there: SIGTERM ends the process (the
    default action) promptly; every committed checkpoint verifies and the newest restores."""
    root = tmp_path / "run"
    proc = _start("thread", root)
    try:
        _read_until(proc, "step 6")
        os.killpg(proc.pid, signal.SIGTERM)
        code, _, err = _finish(proc, timeout=10)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert code is not None, "the process did not end within 10 s of SIGTERM"
    assert code == -signal.SIGTERM, f"exit {code}:\n{err[-3000:]}"
    assert "preemption signals are not handled" in err
    verified = _all_verify(root)
    assert verified and all(not v for v in verified.values()), verified
    run = common.Run()
    with sg.Checkpointer(root, handle_signals=False) as ck:
        assert ck.restore(run.state) == max(_steps(root)) >= 4


def test_two_checkpointers_closed_in_opening_order_hand_signals_back(tmp_path: Path) -> None:
    """README Preemption: with several Checkpointers the newest handles the signals; closing
    them in any order gives the program's own handlers back. Open A, B; close A; a signal then
    reaches B (it saves at its next step); close B; the program's handlers are back."""
    got: list[int] = []

    def mine(signum: int, frame: object) -> None:
        got.append(signum)

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    old = {s: signal.signal(s, mine) for s in sigs}
    try:
        run = common.Run()
        a = sg.Checkpointer(tmp_path / "A", save=sg.Every(steps=10**6), exit_on_signal=False)
        b = sg.Checkpointer(tmp_path / "B", save=sg.Every(steps=10**6), exit_on_signal=False)
        try:
            a.close()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == []  # noted by B, not passed to the program
            assert b.step(run.state, 1) is True and b.preempted
        finally:
            a.close()
            b.close()
        assert {s: signal.getsignal(s) for s in sigs} == dict.fromkeys(sigs, mine)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert got == [signal.SIGUSR1]
        assert _steps(tmp_path / "B") == [1] and _steps(tmp_path / "A") == []
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# Found by this review on 57b464b: one thread's retention freed a file the other's incremental save
# had just committed a reference to ('tensor file is missing … shares it with').
def test_concurrent_saves_from_two_threads_never_commit_a_damaged_checkpoint(
    tmp_path: Path,
) -> None:
    """Each thread saves its own state (a shared frozen base, its own head) 40 times into one
    Checkpointer (Keep(last=2), incremental) and verifies each checkpoint right after save()
    returns it, while it still exists. A typed CheckpointError would be fine; a committed
    checkpoint that does not verify is not. Up to 2 rounds (a race)."""
    logging.getLogger("savegame").disabled = True  # the race's error logs flood the output
    try:
        for attempt in range(2):
            root = tmp_path / f"run{attempt}"
            base = torch.nn.Linear(64, 64)
            heads = {1: torch.nn.Linear(8, 8), 2: torch.nn.Linear(8, 8)}
            damaged: list[tuple[str, list[str]]] = []
            raw: list[BaseException] = []
            ck = sg.Checkpointer(root, keep=sg.Keep(last=2), handle_signals=False)

            def saves(
                off: int,
                ck: sg.Checkpointer = ck,
                heads: dict[int, torch.nn.Linear] = heads,
                base: torch.nn.Linear = base,
                raw: list[BaseException] = raw,
                damaged: list[tuple[str, list[str]]] = damaged,
            ) -> None:
                head = heads[off]
                state = sg.TrainState(base=base, model=head)
                for i in range(40):
                    with torch.no_grad():
                        head.weight.add_(1.0)
                    try:
                        path = ck.save(state, off + 2 * i)
                    except sg.CheckpointError:
                        continue  # a typed refusal is fine
                    except Exception as exc:  # noqa: BLE001
                        raw.append(exc)
                        continue
                    problems = reader.verify(path)
                    # only damage of a checkpoint still committed (not one retention took away)
                    if any("shares it with" in p for p in problems) and reader.verify(path):
                        if (path / "manifest.json").exists():
                            damaged.append((path.name, problems))

            threads = [threading.Thread(target=saves, args=(o,)) for o in (1, 2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT_S)
            ck.close()
            assert raw == []
            if damaged:
                break
        final = _all_verify(root)
    finally:
        logging.getLogger("savegame").disabled = False
    assert damaged == [], damaged[:2]
    assert all(not v for v in final.values()), final


# Found by this review on 57b464b: close() returned and released the lock ~1 s before the save
# committed into the run.
def test_close_from_another_thread_waits_for_a_save_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI or supervisor thread calls close() while the training thread is inside save() (a
    slow disk). close() "waits for the save in flight ... and releases the run folder's lock":
    once it returns, this process writes nothing more into the run (another job may own it
    then) — the save has committed, or it fails with a typed error and commits nothing."""
    root = tmp_path / "run"
    run = common.Run()
    ck = sg.Checkpointer(root, save=sg.Every(steps=10**6), handle_signals=False)
    real = os.fsync
    in_save = threading.Event()

    def slow(fd: int) -> None:
        if threading.current_thread().name == "trainer" and any(
            p.name.startswith(".tmp-step") for p in root.iterdir()
        ):
            in_save.set()
            time.sleep(0.3)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow)
    result: dict[str, Any] = {}

    def train() -> None:
        try:
            result["path"] = ck.save(run.state, 5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc
        result["done"] = time.monotonic()

    t = threading.Thread(target=train, name="trainer")
    t.start()
    try:
        assert in_save.wait(TIMEOUT_S)
        ck.close()
        closed = time.monotonic()
        committed_at_close = (root / layout.step_dir(5) / "manifest.json").exists()
    finally:
        t.join(TIMEOUT_S)
    assert not t.is_alive()
    if "error" in result:
        assert isinstance(result["error"], sg.CheckpointError), repr(result["error"])
        assert _steps(root) == []
    else:
        assert committed_at_close, (
            f"close() returned (and released the lock) {result['done'] - closed:.2f}s before "
            "the save it did not wait for committed step 5 into the run"
        )


# ---- 5. readers in other processes while the run writes ---------------------------------------
def _cli(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "savegame", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _writer(root: Path, seconds: float, pause: float, table_mb: int) -> subprocess.Popen[str]:
    proc = _start("writer", root, seconds, pause, table_mb)
    _read_until(proc, "started")
    return proc


def _cli_result(name: str, cli: subprocess.Popen[str]) -> str | None:
    """None when the command ended as documented for a healthy run (exit 0, no traceback)."""
    try:
        out, err = cli.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        cli.kill()
        cli.communicate()
        return f"savegame {name} hung"
    if cli.returncode != 0 or "Traceback" in err:
        return f"savegame {name} exit {cli.returncode}: {(out + err)[-1500:]}"
    return None


def test_readers_never_see_a_partial_checkpoint_or_crash_while_the_run_saves_every_20ms(
    tmp_path: Path,
) -> None:
    """A writer saves every ~20 ms with Keep(last=2) and incremental saves (a 16 MB frozen
    table shared by all). Meanwhile, four rounds of: `savegame ls RUN` (another
    process), and here sg.open/sg.load of the newest listed checkpoint and a restore through
    `start_from=RUN` in a Checkpointer on another folder. What loads is whole and verified; no
    raw exception escapes (a checkpoint retention deleted under a reader is a typed error); no
    CorruptCheckpointWarning for a checkpoint that is not damaged; `ls` exits 0. Then SIGTERM:
    the writer saves at its next step and exits 75."""
    root = tmp_path / "run"
    proc = _writer(root, 60, 0.02, 16)
    problems: list[str] = []
    rounds = reads = restores = 0
    try:
        while proc.poll() is None and rounds < 4:
            rounds += 1
            ls = _cli("ls", root)
            for _ in range(3):
                refs = reader.list_checkpoints(root)
                if not refs:
                    continue
                newest = max(refs, key=lambda r: r.step)
                try:
                    with sg.open(newest.path) as r:
                        r.read("model/0.weight")
                    got = sg.load(newest.path)
                    assert set(got) >= {"model", "optimizer", "base", "extras"}, sorted(got)
                    assert got["extras"]["table"].numel() == 16 << 18
                    reads += 1
                except sg.CheckpointError:
                    pass  # deleted under the reader by retention: typed, fine
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"sg.open/load {newest.path.name}: {exc!r}")
            run = common.Run(seed=3)
            run.extras["table"] = torch.zeros(16 << 18)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with sg.Checkpointer(
                        tmp_path / f"fork{rounds}", start_from=root, handle_signals=False
                    ) as ck:
                        step = ck.restore(run.state)
                if step < 1:
                    problems.append(f"start_from restored step {step}")
                restores += 1
                for w in caught:
                    if issubclass(w.category, sg.CorruptCheckpointWarning):
                        problems.append(f"start_from warned: {w.message}")
            except sg.CheckpointError:
                pass
            except Exception as exc:  # noqa: BLE001
                problems.append(f"start_from restore: {exc!r}")
            if (bad := _cli_result("ls", ls)) is not None:
                problems.append(bad)
        os.kill(proc.pid, signal.SIGTERM)
        code, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert code == sg.EXIT_PREEMPTED, err[-3000:]
    assert problems == [], problems[:5]
    assert rounds == 4 and reads and restores, (rounds, reads, restores)
    assert all(not v for v in _all_verify(root).values())


# Found by this review on 57b464b: a checkpoint pruned during the verify was 'FAIL … tensor file is
# missing' / 'is not a checkpoint folder', exit 1.
def test_verify_of_a_run_that_is_saving_and_pruning_reports_no_damage_that_is_not_there(
    tmp_path: Path,
) -> None:
    """README Command line: verify exits 1 when it found a damaged checkpoint. Here nothing is
    damaged: a writer saves back to back with Keep(last=2) (each checkpoint shares a 64 MB
    frozen table, so verifying one takes a moment), and `savegame verify RUN` runs 5 times."""
    root = tmp_path / "run"
    proc = _writer(root, 8, 0, 64)
    problems: list[str] = []
    try:
        for _ in range(5):
            if proc.poll() is not None:
                break
            if (bad := _cli_result("verify", _cli("verify", root))) is not None:
                problems.append(bad)
                break
    finally:
        _kill_group(proc)
    assert all(not v for v in _all_verify(root).values())  # indeed nothing is damaged
    assert problems == [], problems[0]


# ---- 6. a spawn-context child with its own Checkpointer -------------------------------------
def test_a_spawned_child_runs_its_own_checkpointer_and_is_refused_the_parents_run(
    tmp_path: Path,
) -> None:
    """The parent holds run P (and saves in it after the child is done); a spawn-context child
    opens run C (saves, restores, closes), then is refused P with LockedError naming the
    parent's pid."""
    parent_root, child_root = tmp_path / "P", tmp_path / "C"
    proc = _start("spawn", parent_root, child_root)
    code, out, err = _finish(proc, timeout=90)
    assert code == 0, err[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("child ")), None)
    assert line is not None, out + err[-3000:]
    report = json.loads(line.split(" ", 1)[1])
    assert "error" not in report, report
    assert report["restored"] == 7
    assert report["parent_run"] == "LockedError", report
    assert report["names_parent"], report["message"]
    assert _steps(parent_root) == [1, 2] and _steps(child_root) == [7]
