"""Training runs whose root is an object store (``Checkpointer("s3://…")``), against a real S3
server on loopback (moto): save, list, restore bitwise, retention, and the promise that the
object-store writer never leaves a visible partial checkpoint — whatever kills it (an
exception mid-write, a writer dying at each point of the commit, SIGKILL at random moments),
a listing from another process shows only complete checkpoints that verify.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import as_store
from savegame.storage.faulty import FaultyStore

from .conftest import S3Server

ROOT = Path(__file__).resolve().parents[2]


def _state(seed: float = 0.0) -> tuple[sg.TrainState, dict[str, Any]]:
    holder: dict[str, Any] = {"w": torch.full((5000,), seed), "b": torch.zeros(3, dtype=torch.int64),
                              "step": 0}  # fmt: skip
    return sg.TrainState(rng=False, extras=holder), holder


def _train(
    ckpt: sg.Checkpointer, state: sg.TrainState, holder: dict[str, Any], steps: range
) -> None:
    for step in steps:
        holder["w"] = torch.linspace(0, 1, 5000) * step
        holder["b"] = torch.tensor([step, 2 * step, 3 * step])
        holder["step"] = step
        ckpt.step(state, step)


def _valid_steps(url: str) -> list[int]:
    return [r.step for r in reader.list_checkpoints(url) if r.valid]


def test_a_run_on_s3_saves_lists_restores_bitwise_and_prunes(s3_url: str) -> None:
    state, holder = _state()
    with sg.Checkpointer(
        s3_url, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt:
        _train(ckpt, state, holder, range(1, 6))
        assert [i.step for i in ckpt.list()] == [4, 5]
        assert all(str(i.path).startswith(s3_url + "/step-") for i in ckpt.list())
    store = as_store(s3_url)
    names = sorted(e.name for e in store.list(""))
    assert names == [layout.LATEST, layout.RUN_FILE, layout.step_dir(4), layout.step_dir(5)]
    assert not store.exists(layout.step_dir(3))
    objects = {rel.split("/", 1)[0] for rel, _ in store._walk("")}  # type: ignore[attr-defined]
    assert objects == {layout.LATEST, layout.RUN_FILE, layout.step_dir(4), layout.step_dir(5)}
    for r in reader.list_checkpoints(s3_url):
        assert reader.verify(r.location) == []
    state2, holder2 = _state(-1.0)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        assert ckpt.restore(state2) == 5
    assert torch.equal(holder2["w"], torch.linspace(0, 1, 5000) * 5)
    assert holder2["step"] == 5 and torch.equal(holder2["b"], torch.tensor([5, 10, 15]))


def test_a_second_checkpointer_on_the_same_url_is_locked_out(s3_url: str) -> None:
    with sg.Checkpointer(s3_url, handle_signals=False):
        with pytest.raises(sg.LockedError, match="pid"):
            sg.Checkpointer(s3_url, handle_signals=False)
    sg.Checkpointer(s3_url, handle_signals=False).close()


# Three points in the default run (cut mid-file, after the data before the manifest, after
# the manifest); every point with -m slow.
CRASH_POINTS = [
    pytest.param("stage.begin", marks=pytest.mark.slow),
    "stage.write",
    pytest.param("stage.sync", marks=pytest.mark.slow),
    pytest.param("commit.seal", marks=pytest.mark.slow),
    "commit.publish",
    "commit.done",
]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_writer_killed_at_any_point_leaves_garbage_the_next_one_removes(
    s3_url: str, point: str
) -> None:
    disk = as_store(s3_url)
    store = FaultyStore(disk, crash=True)
    state, holder = _state()
    ckpt = sg.Checkpointer(
        store, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    )
    _train(ckpt, state, holder, range(1, 3))
    store.faults[point] = store.calls[point] + 1  # the save of step 3 dies there
    with pytest.raises(sg.CheckpointError):
        _train(ckpt, state, holder, range(3, 4))
    published = point == "commit.done"
    assert _valid_steps(s3_url) == ([1, 2, 3] if published else [1, 2])
    assert [r.step for r in reader.list_checkpoints(s3_url)] == _valid_steps(s3_url)
    state2, holder2 = _state(-1.0)
    with sg.Checkpointer(
        s3_url, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ckpt2:
        assert not [e.name for e in disk.list("") if e.name.startswith(layout.TMP_PREFIX)]
        resumed = ckpt2.restore(state2)
        assert resumed == (3 if published else 2) and holder2["step"] == resumed
        _train(ckpt2, state2, holder2, range(resumed + 1, resumed + 3))
    for r in reader.list_checkpoints(s3_url):
        assert reader.verify(r.location) == []
    keys = {rel.split("/", 1)[0] for rel, _ in disk._walk("")}  # type: ignore[attr-defined]
    assert not [k for k in keys if k.startswith(layout.TMP_PREFIX)]  # nothing left over
    assert {k for k in keys if k.startswith("step-")} == {
        layout.step_dir(resumed + 1),
        layout.step_dir(resumed + 2),
    }


_LISTER = textwrap.dedent(
    """
    import json, sys
    from savegame.engine import reader
    for url in sys.stdin:
        out = []
        for r in reader.list_checkpoints(url.strip()):
            out.append([r.step, r.valid, reader.verify(r.location) if r.valid else [str(r.error)]])
        print(json.dumps(out), flush=True)
    """
)


class Lister:
    """A second process that lists and verifies a run on request (started once: importing
    torch costs seconds)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LISTER], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def __call__(self, url: str) -> list[tuple[int, bool, list[str]]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(url + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the listing process died"
        return [tuple(x) for x in json.loads(line)]  # type: ignore[misc]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def lister(s3_server: S3Server) -> Iterator[Lister]:
    proc = Lister(_child_env(s3_server))
    try:
        yield proc
    finally:
        proc.close()


def _child_env(server: S3Server, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(server.env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def test_a_save_that_raises_mid_write_shows_nothing_to_another_process(
    lister: Lister, s3_url: str
) -> None:
    disk = as_store(s3_url)
    state, holder = _state()
    with sg.Checkpointer(disk, save=sg.Every(steps=1), handle_signals=False) as ckpt:
        _train(ckpt, state, holder, range(1, 3))
    store = FaultyStore(disk, {"stage.write": 1})  # the next save's file is cut mid-way
    ckpt = sg.Checkpointer(store, save=sg.Every(steps=1), handle_signals=False)
    with pytest.raises(sg.StorageError):
        _train(ckpt, state, holder, range(3, 4))
    listed = lister(s3_url)
    assert listed == [(1, True, []), (2, True, [])]
    left = {rel.split("/", 1)[0] for rel, _ in disk._walk("")}  # type: ignore[attr-defined]
    assert not [k for k in left if k.startswith((layout.TMP_PREFIX, layout.step_dir(3)))]
    ckpt.close()


_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    import savegame as sg
    url = sys.argv[1]
    holder = {"w": torch.zeros(400_000), "step": 0}
    state = sg.TrainState(rng=False, extras=holder)
    while True:  # the previous (killed) writer's lease expires after SAVEGAME_LEASE_SECONDS
        try:
            ckpt = sg.Checkpointer(url, save=sg.Every(steps=1), keep=sg.Keep(last=3),
                                   handle_signals=False)
            break
        except sg.LockedError:
            time.sleep(0.1)
    step = ckpt.restore(state) or 0
    while True:
        step += 1
        holder["w"] = torch.arange(400_000, dtype=torch.float32) * step
        holder["step"] = step
        ckpt.step(state, step)
        print("saved", step, flush=True)  # the kill comes during a later save
    """
)


def _kill_trials(s3_server: S3Server, s3_url: str, lister: Lister, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    env = _child_env(s3_server, SAVEGAME_LEASE_SECONDS="1")

    def spawn() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", _WRITER, s3_url], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    child = spawn()
    for trial in range(trials):
        nxt = None
        try:
            assert child.stdout is not None
            watchdog = threading.Timer(120, child.kill)  # never hang the suite
            watchdog.start()
            line = child.stdout.readline()
            watchdog.cancel()
            assert line.startswith("saved"), child.stderr.read() if child.stderr else ""
            # It holds the lease now. The next writer starts here, so its imports overlap
            # this trial; it waits for the lease of the one killed below to expire.
            nxt = spawn() if trial + 1 < trials else None
            deadline = time.monotonic() + rng.uniform(0.05, 1.0)
            while time.monotonic() < deadline:  # list while the writer saves and prunes
                _only_complete(lister, s3_url, f"trial {trial}, writer alive", live=True)
        except BaseException:
            _kill(nxt)
            raise
        finally:
            _kill(child)
        listed = _only_complete(lister, s3_url, f"trial {trial}, writer killed", live=False)
        assert listed, f"trial {trial}: the first save was committed, yet nothing is listed"
        if nxt is not None:
            child = nxt


def _kill(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _only_complete(lister: Lister, url: str, when: str, *, live: bool) -> list[int]:
    """The steps listed; fails if one is incomplete or does not verify. With a live writer,
    a checkpoint its retention deletes while it is being verified is not a failure: it is
    gone from the next listing (the deletion removes the manifest first)."""
    listed = lister(url)
    bad = [(step, problems) for step, valid, problems in listed if not valid or problems]
    if bad and live:
        again = {step for step, _, _ in lister(url)}
        bad = [b for b in bad if b[0] in again]
    assert not bad, f"{when}: listed but incomplete or damaged: {bad}"
    return [step for step, _, _ in listed]


def test_sigkill_at_random_moments_never_shows_a_partial_checkpoint(
    s3_server: S3Server, s3_url: str, lister: Lister
) -> None:
    _kill_trials(s3_server, s3_url, lister, trials=2, seed=1)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_shows_a_partial_checkpoint_many_trials(
    s3_server: S3Server, s3_url: str, lister: Lister
) -> None:
    _kill_trials(s3_server, s3_url, lister, trials=20, seed=2)
