"""Outside review (s14): the ``Checkpointer`` call orders the README and docs/async.md allow, as a
new user strings them together in one process: restore before and after save, ``save_async``
then ``close()`` without ``wait()``, ``step()`` with a policy and best-K retention across a
restart, a ``with`` block left by an exception, two Checkpointers on one folder, reopen after
close, and ``sg.load`` of a checkpoint folder versus a run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import savegame as sg


class Run:
    """A tiny model + Adam; ``train()`` takes one step on data drawn from the global RNG."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.extras = {"epoch": 0}
        self.state = sg.TrainState(model=self.model, optimizer=self.opt, extras=self.extras)

    def train(self) -> None:
        self.opt.zero_grad()
        self.model(torch.randn(4, 3)).square().sum().backward()
        self.opt.step()

    def snap(self) -> list[torch.Tensor]:
        out = [p.detach().clone() for p in self.model.parameters()]
        for p in self.model.parameters():
            out += [self.opt.state[p]["exp_avg"].clone(), self.opt.state[p]["exp_avg_sq"].clone()]
        return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_restore_before_any_save_then_save_then_restore_in_the_same_checkpointer(
    tmp_path: Path,
) -> None:
    r = Run()
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.restore(r.state) == 0 and ckpt.last_restore is None  # fresh run
        r.train()
        ckpt.save(r.state, 1)
        at_1 = r.snap()
        r.train()
        r.extras["epoch"] = 5
        assert not _same(r.snap(), at_1)
        assert ckpt.restore(r.state) == 1
        assert _same(r.snap(), at_1) and r.extras == {"epoch": 0}
        assert ckpt.last_restore is not None and ckpt.last_restore.step == 1


def test_save_async_then_close_without_wait_commits_and_a_reopen_restores_it(
    tmp_path: Path,
) -> None:
    """docs/async.md: ``close()`` waits for the last save; ``result()`` returns its folder."""
    r = Run()
    ckpt = sg.Checkpointer(tmp_path / "run", async_save=True)
    r.train()
    handle = ckpt.save_async(r.state, 7)
    assert handle is not None
    want = r.snap()
    r.train()  # training goes on while it persists: the snapshot is not torn
    ckpt.close()
    assert handle.done()
    assert Path(handle.result()).name == "step-000000000007"
    r2 = Run()
    with sg.Checkpointer(tmp_path / "run") as again:
        assert again.restore(r2.state) == 7
    assert _same(r2.snap(), want)


def test_a_closed_checkpointer_refuses_saves_closes_twice_and_a_new_one_reopens(
    tmp_path: Path,
) -> None:
    r = Run()
    ckpt = sg.Checkpointer(tmp_path / "run")
    r.train()
    ckpt.save(r.state, 1)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(sg.CheckpointError, match="closed"):
        ckpt.save(r.state, 2)
    with sg.Checkpointer(tmp_path / "run") as again:  # the lock was released
        r.train()
        again.save(r.state, 2)
        assert [i.step for i in again.list()] == [1, 2]


def test_two_checkpointers_on_one_folder_in_one_process_the_second_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """README "One writer per run folder"; in one process the message says how to get out."""
    first = sg.Checkpointer(tmp_path / "run")
    try:
        with pytest.raises(sg.LockedError) as err:
            sg.Checkpointer(tmp_path / "run")
        assert str(tmp_path / "run") in str(err.value) and "close()" in str(err.value)
    finally:
        first.close()
    sg.Checkpointer(tmp_path / "run").close()


def test_a_with_block_left_by_an_exception_commits_the_save_in_flight_and_frees_the_folder(
    tmp_path: Path,
) -> None:
    """docs/policies.md: a session left by an exception through ``with Checkpointer(...)`` is
    marked failed at once; the exception is not swallowed; the async save started before it is
    committed (close waits), and the folder is free for the next process at once."""
    r = Run()
    with pytest.raises(ZeroDivisionError):
        with sg.Checkpointer(tmp_path / "run", async_save=True) as ckpt:
            r.train()
            ckpt.step(r.state, 1)  # a training session starts with the first step()
            ckpt.save_async(r.state, 2)
            want = r.snap()
            r.train()
            raise ZeroDivisionError("the user's own bug")
    sessions = json.loads((tmp_path / "run" / "run.json").read_text())["sessions"]
    assert sessions[-1]["failed"] is True
    r2 = Run()
    with sg.Checkpointer(tmp_path / "run") as again:
        assert again.restore(r2.state) == 2
    assert _same(r2.snap(), want)


def test_best_k_with_a_sparse_schedule_saves_improvements_and_keeps_them_across_a_restart(
    tmp_path: Path,
) -> None:
    """README: "a metric that improves triggers a save even off-schedule, so the best model is
    always on disk"; "Retention is rebuilt from the manifests on disk at every start, so "best"
    survives restarts"."""
    r = Run()

    def ckpt() -> sg.Checkpointer:
        return sg.Checkpointer(
            tmp_path / "run", save=sg.Every(steps=100),
            keep=sg.Keep(last=1, best=2, monitor="val", mode="max"),
        )  # fmt: skip

    c = ckpt()
    saved = []
    for step, val in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        r.train()
        saved.append(c.step(r.state, step, metrics={"val": val}))
    c.close()
    assert saved == [True, True, False]
    c = ckpt()
    assert c.restore(r.state) == 2
    saved = []
    for step, val in [(4, 0.6), (5, float("nan")), (6, 0.95), (7, 0.1)]:
        r.train()
        saved.append(c.step(r.state, step, metrics={"val": val}))
    assert saved == [False, False, True, False], "only a real improvement on 0.9 saves"
    assert [(i.step, i.metrics["val"]) for i in c.list()] == [(2, 0.9), (6, 0.95)]
    c.close()


def test_load_of_a_checkpoint_folder_returns_the_tree(tmp_path: Path) -> None:
    r = Run()
    with sg.Checkpointer(tmp_path / "run") as c:
        r.train()
        path = c.save(r.state, 3)
    tree = sg.load(path)
    assert set(tree) >= {"model", "optimizer", "extras"}
    assert torch.equal(tree["model"]["weight"], r.model.weight.detach())
    assert tree["extras"] == {"epoch": 0}


def test_load_of_a_run_folder_says_it_is_a_run_folder(tmp_path: Path) -> None:
    """A new user passes the run folder they gave the Checkpointer. Loading its newest
    checkpoint, or an error saying "this is a run folder: load one of its step-… folders", are
    both fine; "has no manifest.json (interrupted save?); it was never committed — restore an
    earlier step" points at damage that does not exist."""
    r = Run()
    with sg.Checkpointer(tmp_path / "run") as c:
        r.train()
        c.save(r.state, 3)
    try:
        tree = sg.load(tmp_path / "run")
    except sg.CheckpointError as exc:
        msg = str(exc)
        assert "never committed" not in msg and "interrupted" not in msg, msg
        assert "run folder" in msg or "step-" in msg, msg
    else:
        assert torch.equal(tree["model"]["weight"], r.model.weight.detach())
    # sg.open, the lazy reader, says the same (it said "unrecognised checkpoint format")
    with pytest.raises(sg.CheckpointNotFoundError, match=r"is a run folder .*step-"):
        sg.open(tmp_path / "run")


def test_two_checkpointers_closed_in_opening_order_give_the_signals_back(tmp_path: Path) -> None:
    """Two runs in one process (a training run and a second one read or written alongside,
    docs/tiers.md / docs/resume.md), closed in the order they were opened. Once both are
    closed no checkpointer can save any more, so Ctrl-C must raise KeyboardInterrupt again and
    SIGTERM must reach the program's own handler, as before the first one was opened."""
    import os
    import signal
    import time

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    a = sg.Checkpointer(tmp_path / "a")
    b = sg.Checkpointer(tmp_path / "b")
    a.close()
    b.close()
    after = {s: signal.getsignal(s) for s in before}
    try:
        assert after == before, f"handlers left installed after both were closed: {after}"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_two_checkpointers_closed_in_reverse_order_give_the_signals_back(tmp_path: Path) -> None:
    """The nested (``with`` inside ``with``) order: works today."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with sg.Checkpointer(tmp_path / "a"), sg.Checkpointer(tmp_path / "b"):
        pass
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("value", ["0.8", None, [1.0]], ids=["str", "None", "list"])
def test_a_metric_that_is_not_a_number_is_an_encode_error_naming_it(
    tmp_path: Path, value: object
) -> None:
    """docs/format.md: "A metric that is not a number at all is an `EncodeError` naming it";
    README "Errors": every error derives from `sg.CheckpointError`."""
    r = Run()
    with sg.Checkpointer(tmp_path / "run") as c:
        with pytest.raises(sg.EncodeError, match="val"):
            c.save(r.state, 1, metrics={"val": value})  # type: ignore[dict-item]
        assert c.list() == []


@pytest.mark.parametrize(
    "value", [0.25, 3, float("nan"), float("-inf")], ids=["float", "int", "nan", "-inf"]
)
def test_numeric_metrics_of_any_kind_are_kept(tmp_path: Path, value: float) -> None:
    r = Run()
    with sg.Checkpointer(tmp_path / "run") as c:
        c.save(r.state, 1, metrics={"val": value})
        (got,) = [i.metrics["val"] for i in c.list()]
    assert got == value or (got != got and value != value)
