"""Async saves through the Checkpointer: never torn, bounded memory, failures reach the caller,
one save in flight, and exact resume (ANCHORS #5: Lightning #20953, pytorch #144657, #170163,
orbax #605)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.checkpointer import list_run
from savegame.engine import writer


def _listed(run: Path) -> list[int]:
    """Steps of the valid checkpoints of ``run`` (without taking its lock)."""
    return [c.step for c in list_run(run) if c.valid]


def _model_and_opt(seed: int = 0, width: int = 32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(width, 4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 16)  # global RNG: resume must restore it
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"optimizer/state/{pid}/{k}"] = v
    return out


def _saved_tensors(tree: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in tree["model"].items()}
    for pid, s in tree["optimizer"]["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"optimizer/state/{pid}/{k}"] = v
    return out


def _mutate_everything(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for t in _tensors(model, opt).values():
            t.add_(1000.0)


@pytest.fixture
def gated_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """write_rank_files that waits for ``gate`` and counts concurrent calls."""
    real = writer.write_rank_files
    ctl: dict[str, Any] = {"gate": threading.Event(), "active": 0, "max_active": 0, "calls": 0}
    lock = threading.Lock()

    def gated(*args: Any, **kwargs: Any) -> Any:
        with lock:
            ctl["active"] += 1
            ctl["calls"] += 1
            ctl["max_active"] = max(ctl["max_active"], ctl["active"])
        try:
            if not ctl["gate"].wait(timeout=30):
                raise TimeoutError("test gate never opened")
            return real(*args, **kwargs)
        finally:
            with lock:
                ctl["active"] -= 1

    monkeypatch.setattr(writer, "write_rank_files", gated)
    yield ctl
    ctl["gate"].set()


# ---- never torn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["save_async", "step"])
def test_mutating_every_tensor_after_the_call_returns_never_reaches_the_checkpoint(
    tmp_path: Path, gated_writer: dict[str, Any], how: str
) -> None:
    model, opt = _model_and_opt()
    for _ in range(2):
        _train_step(model, opt)
    before = {k: v.clone() for k, v in _tensors(model, opt).items()}
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(
        tmp_path / "run", save=sg.Every(steps=2), async_save=True, handle_signals=False
    ) as ck:
        if how == "save_async":
            handle = ck.save_async(state, 2)
            assert handle is not None and not handle.done()  # the writer is still gated
        else:
            assert ck.step(state, 2) is True
        # The save is in flight and has not written a byte: change everything in place now.
        _mutate_everything(model, opt)
        gated_writer["gate"].set()
        ck.wait()
    saved = _saved_tensors(sg.load(tmp_path / "run" / "step-000000000002"))
    assert saved.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(saved[k], v), f"{k} holds a value from after the save call"
        assert not torch.equal(saved[k], _tensors(model, opt)[k])


def test_the_first_scheduled_snapshot_goes_into_memory_reserved_at_a_step_before_it(
    tmp_path: Path, gated_writer: dict[str, Any]
) -> None:
    # The first step that does not save faults in the snapshot's memory on a background thread
    # (the first save's stall is then a copy, not its page faults); the snapshot is still a
    # copy taken at the save's call, which later in-place changes never reach.
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(
        tmp_path / "run", save=sg.Every(steps=2), async_save=True, handle_signals=False
    ) as ck:
        assert ck.step(state, 1) is False
        pool = ck._pool
        assert pool._reserving is not None or pool._arena is not None
        _train_step(model, opt)
        before = {k: v.clone() for k, v in _tensors(model, opt).items()}
        assert ck.step(state, 2) is True
        _mutate_everything(model, opt)
        gated_writer["gate"].set()
        ck.wait()
        arena = pool._arena
        assert arena is not None
        lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
        # the model's and the optimizer's tensors (the RNG states are not counted ahead)
        ours = [b for k, b in pool._buffers.items() if k.startswith(("model/", "optimizer/"))]
        assert len(ours) == len(before) and all(lo <= b.data_ptr() < hi for b in ours)
    saved = _saved_tensors(sg.load(tmp_path / "run" / "step-000000000002"))
    assert saved.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(saved[k], v), k


def test_a_restore_reserves_the_first_snapshot_of_a_resumed_run(
    tmp_path: Path, gated_writer: dict[str, Any]
) -> None:
    # A resumed run may save at its first step(): the restore itself reserves (the optimizer's
    # moments exist once restored); a fresh run's restore (nothing loaded) does not.
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt)
    gated_writer["gate"].set()
    with sg.Checkpointer(tmp_path / "run", async_save=True, handle_signals=False) as ck:
        assert ck.restore(state) == 0
        assert ck._pool._reserving is None and ck._pool._arena is None
        ck.save(state, 1)
    model, opt = _model_and_opt(seed=1)
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(
        tmp_path / "run", save=sg.Every(steps=1), async_save=True, handle_signals=False
    ) as ck:
        assert ck.restore(state) == 1
        pool = ck._pool
        assert pool._reserving is not None or pool._arena is not None
        _train_step(model, opt)
        before = {k: v.clone() for k, v in _tensors(model, opt).items()}
        assert ck.step(state, 2) is True
        _mutate_everything(model, opt)
        ck.wait()
        arena = pool._arena
        assert arena is not None
        lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
        assert all(
            lo <= b.data_ptr() < hi for k, b in pool._buffers.items() if k.startswith("model/")
        )
    saved = _saved_tensors(sg.load(tmp_path / "run" / "step-000000000002"))
    for k, v in before.items():
        assert torch.equal(saved[k], v), k


@pytest.mark.parametrize("how", ["sync", "distributed-like"])
def test_no_memory_is_reserved_where_no_snapshot_pool_is_used(tmp_path: Path, how: str) -> None:
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(
        tmp_path / "run", save=sg.Every(steps=5), async_save=how != "sync", handle_signals=False
    ) as ck:
        if how != "sync":  # a rank stages only its share: unknown before the first save
            ck._save_group.distributed = True  # type: ignore[misc]
        assert ck.step(state, 1) is False
        assert ck._pool._reserving is None and ck._pool._arena is None
        ck._save_group.distributed = False  # type: ignore[misc]


# ---- bounded memory ------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_host_memory_does_not_grow_over_100_async_saves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    opt = torch.optim.AdamW(model.parameters())
    _ = model(torch.randn(2, 512)).sum().backward()
    opt.step()
    state = sg.TrainState(model=model, optimizer=opt, rng=False)
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(model, opt).values())  # ~6.3 MB
    ck = sg.Checkpointer(
        tmp_path / "run", keep=sg.Keep(last=1), async_save=True, handle_signals=False
    )
    pool_sizes = set()
    rss_after_warmup = 0
    try:
        for step in range(1, 101):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            assert ck.save_async(state, step) is not None
            pool_sizes.add(ck._pool.nbytes)
            if step == 10:
                ck.wait()
                rss_after_warmup = _rss()
        ck.wait()
        growth = _rss() - rss_after_warmup
    finally:
        ck.close()
    assert pool_sizes == {nbytes}
    # One leaked snapshot per save (pytorch #170163) would be 90 x 6.3 MB = 570 MB; allow one
    # extra state copy for allocator noise.
    assert growth < nbytes + (4 << 20), (
        f"RSS grew {growth / 1e6:.1f} MB over 90 saves of {nbytes / 1e6:.1f} MB"
    )
    assert _listed(tmp_path / "run") == [100]


# ---- background failure ---------------------------------------------------------------------------
@pytest.mark.parametrize("surfaces_at", ["step", "save_async", "wait", "close"])
def test_background_failure_surfaces_on_the_callers_thread_and_keeps_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, surfaces_at: str
) -> None:
    run = tmp_path / "run"
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt)
    ck = sg.Checkpointer(run, save=sg.Every(steps=100), async_save=True, handle_signals=False)
    ck.save(state, 1)
    good = {k: v.clone() for k, v in _tensors(model, opt).items()}
    _train_step(model, opt)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_rank_files", broken)
    handle = ck.save_async(state, 2)
    assert handle is not None
    deadline = time.monotonic() + 30
    while not handle.done() and time.monotonic() < deadline:
        time.sleep(0.005)
    monkeypatch.undo()

    calls: dict[str, Callable[[], object]] = {
        "step": lambda: ck.step(state, 3),  # not due: the failure alone makes it raise
        "save_async": lambda: ck.save_async(state, 3),
        "wait": ck.wait,
        "close": ck.close,
    }
    with pytest.raises(sg.StorageError) as info:
        calls[surfaces_at]()
    assert isinstance(info.value, sg.CheckpointError) and info.value.step == 2
    assert "No space left" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)

    if surfaces_at != "close":
        ck.wait()  # raised once, not again
        ck.save(state, 4)  # and the checkpointer still works
        ck.close()
    listed = _listed(run)
    assert 2 not in listed and 1 in listed
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp")]
    model2, opt2 = _model_and_opt(seed=99)
    with sg.Checkpointer(run, handle_signals=False) as ck2:
        assert ck2.restore(sg.TrainState(model=model2, optimizer=opt2), step=1) == 1
    for k, v in good.items():
        assert torch.equal(_tensors(model2, opt2)[k], v), k


# ---- one save in flight: skip or wait -------------------------------------------------------------
def test_when_busy_skip_skips_and_logs(
    tmp_path: Path, gated_writer: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _model_and_opt()
    state = sg.TrainState(model=model, optimizer=opt)
    run = tmp_path / "run"
    with sg.Checkpointer(
        run, save=sg.Every(steps=1), async_save=True, when_busy="skip", handle_signals=False
    ) as ck:
        with caplog.at_level(logging.INFO, logger="savegame"):
            assert ck.step(state, 1) is True
            assert ck.step(state, 2) is False
            assert ck.save_async(state, 3) is None
        assert (
            sum(
                "skipped" in r.getMessage() and "when_busy='skip'" in r.getMessage()
                for r in caplog.records
            )
            == 2
        )
        gated_writer["gate"].set()
        ck.wait()
        assert ck.step(state, 4) is True  # not busy any more: saves again
    assert gated_writer["max_active"] == 1
    assert _listed(run) == [1, 4]


def test_when_busy_wait_waits_for_the_save_in_flight(
    tmp_path: Path, gated_writer: dict[str, Any]
) -> None:
    model, opt = _model_and_opt()
    state = sg.TrainState(model=model, optimizer=opt)
    run = tmp_path / "run"
    with sg.Checkpointer(run, save=sg.Every(steps=1), async_save=True, handle_signals=False) as ck:
        first = ck.save_async(state, 1)
        assert first is not None
        opener = threading.Timer(0.3, gated_writer["gate"].set)
        opener.start()
        t0 = time.perf_counter()
        assert ck.step(state, 2) is True
        waited = time.perf_counter() - t0
        assert first.done() and first.result().name == "step-000000000001"
        assert waited > 0.2
        ck.wait()
    assert gated_writer["max_active"] == 1 and gated_writer["calls"] == 2
    assert _listed(run) == [1, 2]


def test_saving_a_step_again_while_its_async_save_is_in_flight_is_the_same_save(
    tmp_path: Path, gated_writer: dict[str, Any]
) -> None:
    """A schedule save and an explicit one of the same step (the integrations' callbacks do
    this): the second call returns the first's handle instead of writing the step again
    (which failed with StepExistsError once the first committed)."""
    model, opt = _model_and_opt()
    state = sg.TrainState(model=model, optimizer=opt)
    run = tmp_path / "run"
    with sg.Checkpointer(run, save=sg.Every(steps=1), async_save=True, handle_signals=False) as ck:
        assert ck.step(state, 1) is True
        again = ck.save_async(state, 1)
        assert again is not None and again.step == 1 and not again.done()
        gated_writer["gate"].set()
        assert again.result().name == "step-000000000001"
        assert ck.save(state, 1).name == "step-000000000001"  # blocking: the committed one
        ck.wait()
    assert gated_writer["calls"] == 1
    assert _listed(run) == [1]


# ---- exact resume --------------------------------------------------------------------------------
def _run(
    root: Path, *, async_save: bool, until: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Train to ``until`` (a "crash" there if < 20), saving every 5 steps; resumes if possible."""
    model, opt = _model_and_opt(seed=0)
    state = sg.TrainState(model=model, optimizer=opt, extras={"seen": 0})
    with sg.Checkpointer(
        root, save=sg.Every(steps=5), async_save=async_save, handle_signals=False
    ) as ck:
        start = ck.restore(state)
        if start == 0:
            torch.manual_seed(1)  # data/dropout stream of a fresh run
        for step in range(start, until):
            _train_step(model, opt)
            state["extras"]["seen"] += 1
            ck.step(state, step + 1)
    return model, opt


def test_exact_resume_with_async_saves_matches_an_uninterrupted_sync_run(tmp_path: Path) -> None:
    ref_model, ref_opt = _run(tmp_path / "sync", async_save=False, until=20)
    _run(tmp_path / "async", async_save=True, until=13)  # "crash" after step 13; last save: 10
    model, opt = _run(tmp_path / "async", async_save=True, until=20)
    ref, got = _tensors(ref_model, ref_opt), _tensors(model, opt)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    a = sg.load(tmp_path / "sync" / "step-000000000020")
    b = sg.load(tmp_path / "async" / "step-000000000020")
    assert a["extras"] == b["extras"] == {"seen": 20}
    sa, sb = _saved_tensors(a), _saved_tensors(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
