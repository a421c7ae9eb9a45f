"""Review D23: the first async save's host memory, reserved ahead at a step that does not save
(084b754: HostPool.reserve / _carve, state.host_bytes, Checkpointer._reserve_staging).

Claim under attack: with ``Checkpointer(..., async_save=True)`` in one process, the first
``step()`` that does not save starts a thread that allocates and touches about the state's CPU
tensor bytes; the first async save carves its buffers from that memory (64-byte aligned, never
overlapping). Nothing else changes: each snapshot is an exact copy taken at the call (in-place
changes after it never reach the checkpoint), sync saves do not use the reserve, the pool keeps
one copy, and what the Checkpointer holds is released when it is closed and dropped.

Every test goes through the public API (``import savegame as sg``); the pool's internals are
only read, to know that the reserved memory was really used (or released).
"""

from __future__ import annotations

import copy
import gc
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import savegame as sg
from savegame.cli.main import main as cli_main
from savegame.format import layout


# ---- helpers -------------------------------------------------------------------------------------
def _ck(root: Path, every: int = 100, **kw: Any) -> sg.Checkpointer:
    return sg.Checkpointer(
        root, save=sg.Every(steps=every), async_save=True, handle_signals=False, **kw
    )


def _model_and_opt(seed: int = 0, width: int = 64) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(width, 4),
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()


def _resolved(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().clone()


def _expected(state: sg.TrainState, names: tuple[str, ...]) -> dict[str, Any]:
    """What a checkpoint of ``state`` must hold under ``names``, cloned now (at the call)."""
    out: dict[str, Any] = {}
    for name in names:
        obj = state[name]
        if isinstance(obj, torch.nn.Module):
            out[name] = {k: _resolved(v) for k, v in obj.state_dict().items()}
        elif isinstance(obj, torch.optim.Optimizer):
            out[name] = copy.deepcopy(obj.state_dict())
        else:
            out[name] = {
                k: _resolved(v) if isinstance(v, torch.Tensor) else v for k, v in obj.items()
            }
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _same(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of two trees (tensors: dtype, shape and every byte)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), path
        assert torch.equal(_bytes(a), _bytes(b)), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), path
        bd = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            _same(v, bd[str(k)], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}/{i}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _check_saved(path: Path, expected: dict[str, Any]) -> None:
    loaded = sg.load(path)
    for name, want in expected.items():
        _same(want, loaded[name], name)
    assert cli_main(["verify", str(path)]) == 0


def _mutate(*objs: Any) -> None:
    """Change every tensor of modules / optimizers / dicts / tensors in place."""
    tensors: list[torch.Tensor] = []
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, torch.nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [
                v for st in obj.state.values() for v in st.values() if isinstance(v, torch.Tensor)
            ]
        else:
            tensors += [v for v in obj.values() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0:
                continue
            if t.dtype == torch.bool:
                t.logical_not_()
            elif t.is_floating_point() or t.is_complex():
                t.add_(1000)
            else:
                t.add_(7)


def _carved(ck: sg.Checkpointer) -> list[torch.Tensor]:
    """The pool buffers that lie in the reserved memory (read only, to know it was used)."""
    arena = ck._pool._arena
    if arena is None:
        return []
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    return [b for b in ck._pool._buffers.values() if lo <= b.data_ptr() < hi]


def _step_dir(root: Path, step: int) -> Path:
    return root / layout.step_dir(step)


# ---- every first save after the reserve ----------------------------------------------------------
@pytest.mark.parametrize("first", ["save_async", "step", "sync_save_then_step"])
def test_the_first_saves_after_a_reserving_step_are_the_state_at_their_call(
    tmp_path: Path, first: str
) -> None:
    # step(1) does not save: the reserve starts. Then the first save (save_async, a scheduled
    # step, or a sync save() that must not use the reserve, followed by a scheduled async step).
    # Everything is changed in place right after each call: never in the checkpoint.
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt, extras={"ema": torch.randn(33)})
    names = ("model", "optimizer", "extras")
    run = tmp_path / "run"
    with _ck(run, every=2) as ck:
        assert ck.step(state, 1) is False
        _train_step(model, opt)
        wants: dict[int, dict[str, Any]] = {}
        if first == "save_async":
            wants[2] = _expected(state, names)
            assert ck.save_async(state, 2) is not None
        elif first == "step":
            wants[2] = _expected(state, names)
            assert ck.step(state, 2) is True
        else:
            wants[2] = _expected(state, names)
            ck.save(state, 2)
            assert ck._pool.nbytes == 0  # a sync save stages nothing in the pool
            _mutate(model, opt, state["extras"])
            _train_step(model, opt)
            wants[4] = _expected(state, names)
            assert ck.step(state, 3) is False
            assert ck.step(state, 4) is True
        _mutate(model, opt, state["extras"])
        ck.wait()
        assert len(_carved(ck)) >= len(wants[max(wants)]["model"]), "the reserve was not used"
    for s, want in wants.items():
        _check_saved(_step_dir(run, s), want)


def test_state_changed_between_the_reserve_and_the_first_save_is_saved_as_it_is_then(
    tmp_path: Path,
) -> None:
    # Reserve counted one state; before the first save a tensor is added, one removed, one
    # reshaped, one changes dtype, a module goes .half(), and Adam creates its state lazily.
    torch.manual_seed(3)
    head = torch.nn.Linear(32, 32)
    body = torch.nn.Linear(32, 32)
    opt = torch.optim.Adam(body.parameters())  # no step yet: no exp_avg before the reserve
    extras: dict[str, Any] = {
        "gone": torch.randn(4096),
        "reshaped": torch.randn(6, 10),
        "retyped": torch.randn(50),
        "epoch": 1,
    }
    state = sg.TrainState(head=head, body=body, optimizer=opt, extras=extras)
    names = ("head", "body", "optimizer", "extras")
    run = tmp_path / "run"
    with _ck(run) as ck:
        assert ck.step(state, 1) is False
        del extras["gone"]
        extras["added"] = torch.randn(70, dtype=torch.float64)
        extras["reshaped"] = torch.randn(12, 7)
        extras["retyped"] = extras["retyped"].to(torch.bfloat16)
        head.half()
        body(torch.randn(3, 32)).sum().backward()
        opt.step()  # exp_avg / exp_avg_sq / step appear only now
        want2 = _expected(state, names)
        assert ck.save_async(state, 2) is not None
        _mutate(head, body, opt, extras)
        ck.wait()
        assert _carved(ck), "the reserve was not used"
        # the next save reuses the buffers: still exact
        want3 = _expected(state, names)
        ck.save_async(state, 3)
        _mutate(head, body, opt, extras)
        ck.wait()
    _check_saved(_step_dir(run, 2), want2)
    _check_saved(_step_dir(run, 3), want3)


def test_unusual_tensors_carved_from_the_reserve_are_exact_aligned_and_apart(
    tmp_path: Path,
) -> None:
    torch.manual_seed(5)
    emb = torch.nn.Embedding(20, 8)
    out = torch.nn.Linear(8, 20, bias=False)
    out.weight = emb.weight  # tied
    tied = torch.nn.Sequential(emb, out)
    base = torch.randn(6, 5, dtype=torch.complex64)
    grid = torch.randn(9, 7)
    row = torch.randn(1, 4)
    extras: dict[str, Any] = {
        "bool": torch.rand(37) > 0.5,
        "bf16": torch.randn(13, dtype=torch.bfloat16),
        "c64": torch.randn(5, dtype=torch.complex64),
        "c128": torch.randn(3, 3, dtype=torch.complex128),
        "i8": torch.randint(-100, 100, (11,), dtype=torch.int8),
        "i64": torch.randint(-(2**40), 2**40, (5,)),
        "f16": torch.randn(3, dtype=torch.float16),
        "scalar": torch.tensor(2.5),
        "iscalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.empty(0, 3),
        "empty_i": torch.empty(0, dtype=torch.int64),
        "transposed": grid.t(),
        "strided": grid[::2, 1::3],
        "conj": base.conj(),
        "neg": base.conj().imag,  # a neg view
        "expanded": row.expand(3, 4),
    }
    state = sg.TrainState(tied=tied, extras=extras)
    names = ("tied", "extras")
    run = tmp_path / "run"
    with _ck(run) as ck:
        assert ck.step(state, 1) is False
        want = _expected(state, names)
        assert ck.save_async(state, 2) is not None
        views = ("conj", "neg", "transposed", "strided", "expanded")
        _mutate(tied, base, grid, row, *(v for k, v in extras.items() if k not in views))
        ck.wait()
        carved = _carved(ck)
        assert len(carved) >= len(extras), "the reserve was not used"
        spans = sorted((b.data_ptr(), b.numel() * b.element_size()) for b in carved)
        assert all(p % 64 == 0 for p, n in spans if n)
        for (a, n), (b, _) in itertools.pairwise(spans):
            assert a + n <= b, "two carved buffers overlap"
    _check_saved(_step_dir(run, 2), want)


def test_a_reserve_far_from_the_first_snapshot_still_gives_exact_ones(tmp_path: Path) -> None:
    for how in ("far_too_small", "far_too_large"):
        extras: dict[str, Any] = {}
        if how == "far_too_small":
            extras["tiny"] = torch.tensor(1.0)
        else:
            extras.update({f"big{i}": torch.randn(1 << 16) for i in range(8)})  # 2 MB counted
        state = sg.TrainState(extras=extras)
        run = tmp_path / how
        with _ck(run) as ck:
            assert ck.step(state, 1) is False
            extras.clear()
            if how == "far_too_small":  # 4 MB where ~1 MB was reserved
                extras.update({f"w{i}": torch.randn(1 << 16) for i in range(16)})
            else:
                extras.update({"small": torch.arange(10, dtype=torch.int16), "n": 3})
            want = _expected(state, ("extras",))
            ck.save_async(state, 2)
            _mutate(extras)
            ck.wait()
            assert _carved(ck), how
            want3 = _expected(state, ("extras",))
            ck.save_async(state, 3)
            _mutate(extras)
            ck.wait()
        _check_saved(_step_dir(run, 2), want)
        _check_saved(_step_dir(run, 3), want3)


# ---- call orders ---------------------------------------------------------------------------------
def test_save_async_first_then_steps_and_restore_after_a_reserve_started(tmp_path: Path) -> None:
    # (a) save_async before any step: nothing is reserved later, saves stay exact;
    # (b) a new session: a non-saving step starts the reserve, then restore() rewinds the live
    #     state; the first async save is the restored state (plus what changed after), exactly.
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt, extras={"t": torch.arange(5.0)})
    names = ("model", "optimizer", "extras")
    run = tmp_path / "run"
    with _ck(run, every=4) as ck:
        want2 = _expected(state, names)
        ck.save_async(state, 2)
        _mutate(model, opt, state["extras"])
        assert ck.step(state, 3) is False
        assert ck._pool._reserving is None and ck._pool._arena is None
        want4 = _expected(state, names)
        assert ck.step(state, 4) is True
        _mutate(model, opt, state["extras"])
        ck.wait()
    _check_saved(_step_dir(run, 2), want2)
    _check_saved(_step_dir(run, 4), want4)

    state["extras"]["t"] = torch.zeros(9)  # a different shape than saved
    with _ck(run, every=100) as ck:
        assert ck.step(state, 5) is False  # reserve counts the current (wrong) state
        assert ck.restore(state) == 4
        _same(want4["extras"], state["extras"], "restored")
        _train_step(model, opt)
        want5 = _expected(state, names)
        ck.save_async(state, 5)
        _mutate(model, opt, state["extras"])
        ck.wait()
        assert _carved(ck), "the reserve was not used"
    _check_saved(_step_dir(run, 5), want5)


def test_two_checkpointers_in_one_process_keep_their_own_reserves_and_snapshots(
    tmp_path: Path,
) -> None:
    m1, o1 = _model_and_opt(seed=1)
    m2, o2 = _model_and_opt(seed=2, width=48)
    _train_step(m1, o1)
    _train_step(m2, o2)
    s1 = sg.TrainState(model=m1, optimizer=o1)
    s2 = sg.TrainState(model=m2, optimizer=o2)
    names = ("model", "optimizer")
    with _ck(tmp_path / "a", every=2) as a, _ck(tmp_path / "b", every=3) as b:
        assert a.step(s1, 1) is False and b.step(s2, 1) is False
        assert a._pool is not b._pool
        _train_step(m1, o1)
        w1 = _expected(s1, names)
        assert a.step(s1, 2) is True
        _mutate(m1, o1)
        assert b.step(s2, 2) is False
        _train_step(m2, o2)
        w2 = _expected(s2, names)
        assert b.step(s2, 3) is True
        _mutate(m2, o2)
        a.wait()
        b.wait()
        ra, rb = a._pool._arena, b._pool._arena
        assert ra is not None and rb is not None and ra.data_ptr() != rb.data_ptr()
    _check_saved(_step_dir(tmp_path / "a", 2), w1)
    _check_saved(_step_dir(tmp_path / "b", 3), w2)


def test_close_while_the_reserve_thread_runs_and_exit_right_after(tmp_path: Path) -> None:
    # 128 MB to fault in: close() and the interpreter's exit come while the thread still
    # touches it. The process must exit cleanly at once, the lock released, the run intact.
    script = textwrap.dedent(
        """
        import sys, threading, torch, savegame as sg
        extras = {"n": 1}
        state = sg.TrainState(model=torch.nn.Linear(4, 4), extras=extras)
        ck = sg.Checkpointer(sys.argv[1], save=sg.Every(steps=5), async_save=True,
                             handle_signals=False)
        ck.save(state, 1)
        extras["big"] = torch.zeros(128 << 20, dtype=torch.uint8)  # counted, never saved
        assert ck.step(state, 2) is False
        ck.close()
        print("reserving" if any(t.name == "savegame-reserve" for t in threading.enumerate())
              else "done", flush=True)
        """
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Meanwhile, in this process: close while reserving, reopen the same folder at once;
        # the new Checkpointer's first async save is exact (the old thread touches only its own).
        here = tmp_path / "here"
        extras: dict[str, Any] = {"big": torch.zeros(64 << 20, dtype=torch.uint8)}
        model, opt = _model_and_opt()
        _train_step(model, opt)
        state = sg.TrainState(model=model, optimizer=opt, extras=extras)
        first = _ck(here)
        assert first.step(state, 1) is False
        first.close()
        del extras["big"]
        extras["w"] = torch.randn(1000)
        with _ck(here) as second:
            assert second.step(state, 1) is False
            want = _expected(state, ("model", "optimizer", "extras"))
            second.save_async(state, 2)
            _mutate(model, opt, extras)
            second.wait()
            assert _carved(second), "the reserve was not used"
        _check_saved(_step_dir(here, 2), want)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    print(out)  # "reserving": the thread was still touching memory at close()
    assert "Fatal" not in err and "Segmentation" not in err
    assert cli_main(["verify", str(_step_dir(run, 1))]) == 0
    with _ck(run) as again:  # the lock is free
        assert [c.step for c in again.list() if c.valid] == [1]


# ---- exact resume --------------------------------------------------------------------------------
def _run(root: Path, *, async_save: bool, until: int, abandon: bool) -> dict[str, Any]:
    """Train to ``until`` saving every 4 steps; resumes if possible. ``abandon``: leave like a
    kill -9 (no close(); the lock dropped as the kernel drops a dead process's flock)."""
    model, opt = _model_and_opt(seed=0)
    extras = {"seen": 0, "hist": torch.zeros(4, dtype=torch.bfloat16)}
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    ck = sg.Checkpointer(root, save=sg.Every(steps=4), async_save=async_save, handle_signals=False)
    start = ck.restore(state)
    if start == 0:
        torch.manual_seed(1)
    for step in range(start, until):
        _train_step(model, opt)
        extras["seen"] += 1
        extras["hist"][step % 4] += 1
        ck.step(state, step + 1)
    if abandon:
        ck.wait()
        ck._signals.restore()
        ck._lock.release()
    else:
        ck.close()
    return _expected(state, ("model", "optimizer", "extras"))


def test_exact_resume_after_an_abandoned_async_run_is_bitwise_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    # the abandoned session reserved at step 1 and saved 4 and 8 from it; the resumed one
    # reserves at step 9 (after restore) and saves 12 from it
    ref = _run(tmp_path / "sync", async_save=False, until=12, abandon=False)
    _run(tmp_path / "async", async_save=True, until=10, abandon=True)  # last save: 8
    got = _run(tmp_path / "async", async_save=True, until=12, abandon=False)
    _same(ref, got, "live")
    _same(sg.load(_step_dir(tmp_path / "sync", 12)), sg.load(_step_dir(tmp_path / "async", 12)))
    assert cli_main(["verify", str(_step_dir(tmp_path / "async", 12))]) == 0


# ---- memory --------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _held(ck: sg.Checkpointer) -> int:
    """Host bytes the pool holds: the reserved memory plus the buffers outside it."""
    arena = ck._pool._arena
    inside = {b.data_ptr() for b in _carved(ck)}
    outside = sum(
        b.numel() * b.element_size()
        for b in ck._pool._buffers.values()
        if b.data_ptr() not in inside
    )
    return (0 if arena is None else arena.numel()) + outside


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_stays_one_copy_over_many_saves_after_the_reserve(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    state = sg.TrainState(model=model, optimizer=opt, rng=False)
    nbytes = sum(
        t.numel() * t.element_size()
        for t in [*model.parameters(), *(v for st in opt.state.values() for v in st.values())]
    )  # ~6.3 MB
    run = tmp_path / "run"
    held = set()
    with _ck(run, every=2, keep=sg.Keep(last=1)) as ck:
        rss0 = 0
        for step in range(1, 31):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            ck.step(state, step)
            if step >= 2:
                held.add(_held(ck))
            if step == 10:
                ck.wait()
                rss0 = _rss()
        ck.wait()
        growth = _rss() - rss0
        assert _carved(ck), "the reserve was not used"
    assert len(held) == 1 and held.pop() <= nbytes + nbytes // 100 + (2 << 20)
    assert growth < nbytes + (4 << 20), f"RSS grew {growth / 1e6:.1f} MB over 10 saves"


def test_a_closed_and_dropped_checkpointer_releases_its_reserved_memory(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = sg.TrainState(model=model, optimizer=opt)
    ck = _ck(tmp_path / "run", every=2)
    assert ck.step(state, 1) is False
    assert ck.step(state, 2) is True
    ck.wait()
    arena = ck._pool._arena
    assert arena is not None
    gone = StorageWeakRef(arena.untyped_storage())
    del arena
    ck.close()
    del ck
    gc.collect()
    assert gone.expired(), "the reserved memory is still held after close() and del"


# ---- what the reserve counts ---------------------------------------------------------------------
def test_a_step_that_does_not_save_never_fails_on_a_lazy_module_not_yet_initialized(
    tmp_path: Path,
) -> None:
    # An auxiliary head built lazily, used (and so initialized) only from step 3 on. The first
    # save (step 4) is valid; the steps before it must not raise.
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(8, 8)
            self.aux = torch.nn.LazyLinear(2)

    torch.manual_seed(0)
    net = Net()
    state = sg.TrainState(model=net)
    run = tmp_path / "run"
    with _ck(run, every=4) as ck:
        for step in range(1, 5):
            if step == 3:
                net.aux(torch.randn(1, 5))
            if step == 4:
                want = _expected(state, ("model",))
            assert ck.step(state, step) is (step == 4)
    _check_saved(_step_dir(run, 4), want)


def test_the_reserve_is_not_sized_by_tensors_that_no_snapshot_holds(tmp_path: Path) -> None:
    # A common pattern (full-batch GNNs, precomputed masks/tables): data registered as a
    # non-persistent buffer so .to(device) moves it, never saved. The pool's held memory must
    # stay about one snapshot, as without the reserve.
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)
            self.register_buffer("table", torch.ones(8 << 20), persistent=False)  # 32 MB

    net = Net()
    state = sg.TrainState(model=net, rng=False)
    run = tmp_path / "run"
    with _ck(run, every=2) as ck:
        assert ck.step(state, 1) is False
        want = _expected(state, ("model",))
        assert "table" not in want["model"]
        assert ck.step(state, 2) is True
        ck.wait()
        snapshot = sum(b.numel() * b.element_size() for b in ck._pool._buffers.values())
        held = _held(ck)
    _check_saved(_step_dir(run, 2), want)
    assert held <= snapshot + snapshot // 100 + (2 << 20), (
        f"the pool holds {held / 1e6:.1f} MB for a {snapshot / 1e3:.1f} KB snapshot"
    )
