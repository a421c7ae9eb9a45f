"""Incremental checkpoints seen from the outside (issue 14 part 2): what a new user may do with
a run whose checkpoints share bytes, and whether every promise of docs/incremental.md holds —
restore bitwise equal, verify clean, earlier checkpoints never damaged, shared bytes freed once
unused, typed errors. A test marked xfail(strict=True) pins a bug found here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import checkpointer as runs
from savegame.engine import reader
from savegame.format import layout, manifest

RETIRED1 = "retired-step-000000000001-rank-00000.safetensors"


class Box:
    """A Stateful holding a dict of tensors: any keys, dtypes and shapes a test wants."""

    def __init__(self, d: dict[str, torch.Tensor]) -> None:
        self.d = dict(d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.d)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.d = dict(sd)


def _state(d: dict[str, torch.Tensor]) -> tuple[sg.TrainState, Box]:
    b = Box(d)
    return sg.TrainState(box=b, rng=False), b


def _ckpt(root: Any, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("keep", sg.Keep(last=10))
    kw.setdefault("save", sg.Every(steps=1))
    return sg.Checkpointer(root, handle_signals=False, **kw)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and _bits(a[k]) == _bits(b[k])
        for k in a
    )


def _restore(root: Any, step: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    st, box = _state({})
    with _ckpt(root) as ck:
        got = ck.restore(st, step=step)
    return got, box.d


def _save_all(root: Path, states: list[dict[str, torch.Tensor]], **kw: Any) -> None:
    st, box = _state({})
    with _ckpt(root, **kw) as ck:
        for i, d in enumerate(states, start=1):
            box.d = dict(d)
            ck.save(st, i)


def _verify_all(root: Path) -> dict[int, list[str]]:
    return {r.step: reader.verify(r.path) for r in reader.list_checkpoints(root)}


def _m(root: Path, step: int) -> manifest.Manifest:
    return reader.read_manifest(root / layout.step_dir(step))


def _frozen(n: int, base_numel: int = 4096) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(base_numel, generator=g)
    return [{"base": base, "head": torch.full((8,), float(i))} for i in range(n)]


# ---- the class of tensors ----------------------------------------------------------------------
def _odd_tensors(i: int) -> dict[str, torch.Tensor]:
    return {
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7.5),
        "bf16": torch.arange(33, dtype=torch.bfloat16),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "c128": torch.tensor([0.5 + 0.25j], dtype=torch.complex128),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "i64": torch.tensor([-(2**62), 2**62]),
        "f16_nan": torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float16),
        "changes": torch.full((4,), float(i)),
    }


def test_every_dtype_empty_and_0d_tensors_round_trip_bitwise_with_shared_bytes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = [_odd_tensors(i) for i in range(3)]
    _save_all(root, states)
    m = _m(root, 3)
    assert m.refs  # everything but "changes" is shared with step 1
    shared = {k for k, e in m.tensors.items() if manifest.is_ref(e.chunks[0].file)}
    assert "box/changes" not in shared and "box/bf16" in shared and "box/scalar" in shared
    assert _verify_all(root) == {1: [], 2: [], 3: []}
    for s in (1, 2, 3):
        got, d = _restore(root, s)
        assert got == s and _same(d, states[s - 1])


def test_shape_dtype_and_value_changes_between_saves_and_back_A_B_A(tmp_path: Path) -> None:
    a = torch.arange(12, dtype=torch.float32)
    states = [
        {"t": a, "k": torch.ones(3)},
        {"t": a.reshape(3, 4), "k": torch.ones(3)},  # same bytes, another shape
        {"t": a.view(torch.int32), "k": torch.ones(3)},  # same bytes, another dtype
        {"t": a + 1, "k": torch.ones(3)},  # B
        {"t": a, "k": torch.ones(3)},  # back to A
        {"t": a, "k2": torch.ones(3)},  # same bytes under another key
        {"t": a[:6], "k2": torch.ones(3)},  # a shorter tensor (a prefix of the stored bytes)
    ]
    root = tmp_path / "run"
    _save_all(root, states)
    assert all(not v for v in _verify_all(root).values())
    for s, want in enumerate(states, start=1):
        got, d = _restore(root, s)
        assert got == s and _same(d, {f"box/{k}".split("/", 1)[1]: v for k, v in want.items()})
    # only bytes of the same key, dtype and shape are shared
    m = _m(root, 3)
    assert not manifest.is_ref(m.tensors["box/t"].chunks[0].file)
    m6 = _m(root, 6)
    assert not manifest.is_ref(m6.tensors["box/k2"].chunks[0].file)


def test_very_many_small_tensors_share_and_restore(tmp_path: Path) -> None:
    n = 3000
    one = {f"p{i:05d}": torch.full((3,), float(i)) for i in range(n)}
    two = dict(one)
    two["p00007"] = torch.zeros(3)
    root = tmp_path / "run"
    _save_all(root, [one, two])
    m = _m(root, 2)
    own = [k for k, e in m.tensors.items() if not manifest.is_ref(e.chunks[0].file)]
    assert own == ["box/p00007"]
    got, d = _restore(root)
    assert got == 2 and _same(d, two)


# ---- call orders the docs allow -----------------------------------------------------------------
def test_save_step_and_async_in_any_order_across_checkpointers_restore_bitwise(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(9)
    st, box = _state({})
    with _ckpt(root, async_save=True, keep=sg.Keep(last=2)) as ck:
        for i in (1, 2, 3):
            box.d = dict(states[i - 1])
            assert ck.step(st, i)
        box.d = dict(states[3])
        ck.save(st, 4)
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:  # a second writer, restarted
        st2, box2 = _state({})
        assert ck.restore(st2) == 4 and _same(box2.d, states[3])
        for i in (5, 6):
            box2.d = dict(states[i - 1])
            ck.save(st2, i)
    with _ckpt(root, async_save=True, keep=sg.Keep(last=2)) as ck:
        for i in (7, 8, 9):
            box.d = dict(states[i - 1])
            ck.step(st, i)
            ck.wait()
    assert [r.step for r in reader.list_checkpoints(root)] == [8, 9]
    assert _verify_all(root) == {8: [], 9: []}
    assert _m(root, 9).refs  # still incremental after restarts
    got, d = _restore(root)
    assert got == 9 and _same(d, states[8])
    got, d = _restore(root, 8)
    assert got == 8 and _same(d, states[7])
    # one copy of the base on disk, whatever was deleted
    assert len([p for p in root.iterdir() if p.name.startswith("retired-")]) <= 1


def test_keep_best_deletes_the_base_and_the_kept_ones_still_restore(tmp_path: Path) -> None:
    root = tmp_path / "run"
    states = _frozen(6)
    st, box = _state({})
    losses = [5.0, 1.0, 4.0, 3.0, 0.5, 6.0]
    with _ckpt(root, keep=sg.Keep(best=1, monitor="loss", mode="min")) as ck:
        for i, loss in enumerate(losses, start=1):
            box.d = dict(states[i - 1])
            ck.save(st, i, metrics={"loss": loss})
    steps = [r.step for r in reader.list_checkpoints(root)]
    assert 5 in steps and 6 in steps and 1 not in steps
    assert all(not v for v in _verify_all(root).values())
    for s in steps:
        got, d = _restore(root, s)
        assert _same(d, states[s - 1])
    assert (root / RETIRED1).exists()


def test_restore_an_older_step_after_newer_ones_were_deleted_then_continue(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(5)
    _save_all(root, states, keep=sg.Keep(last=3))  # steps 3, 4, 5; step 1 retired
    for s in (4, 5):
        shutil.rmtree(root / layout.step_dir(s))
    got, d = _restore(root, 3)
    assert got == 3 and _same(d, states[2])
    st, box = _state({})
    new = {"base": states[0]["base"], "head": torch.full((8,), -1.0)}
    with _ckpt(root, keep=sg.Keep(last=1)) as ck:
        assert ck.restore(st) == 3
        box.d = dict(new)
        ck.save(st, 4)  # LATEST names a deleted folder: a full save, or one sharing with 3
    assert [r.step for r in reader.list_checkpoints(root)] == [4]
    assert _verify_all(root) == {4: []}
    got, d = _restore(root)
    assert got == 4 and _same(d, new)
    # nothing shared is left behind once only step 4 remains and it stands alone or uses it
    used = set(_m(root, 4).refs)
    for p in root.glob("retired-*"):
        assert layout.parse_retired_file(p.name) in used


def test_shared_bytes_are_freed_once_no_checkpoint_uses_them(tmp_path: Path) -> None:
    root = tmp_path / "run"
    frozen = _frozen(4)
    changed = [{"base": torch.randn(4096), "head": torch.full((8,), 9.0 + i)} for i in range(3)]
    _save_all(root, frozen + changed, keep=sg.Keep(last=2))
    assert not list(root.glob("retired-*"))
    assert not list(root.glob(".tmp-*"))
    on_disk = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    infos = [i for i in runs.list_run(root) if i.kind == "checkpoint"]
    assert on_disk == sum(i.own for i in infos)


# ---- a kill at a random point: FaultyStore(crash=True) at every store operation of a save whose
# retention deletes the base --------------------------------------------------------------------
@pytest.mark.slow
def test_crash_at_every_point_of_a_save_that_retires_the_base(tmp_path: Path) -> None:
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    states = _frozen(4)

    def run(root: Path, store: Any) -> None:
        st, box = _state({})
        with _ckpt(store, keep=sg.Keep(last=2)) as ck:
            box.d = dict(states[3])
            ck.save(st, 4)

    probe = tmp_path / "probe"
    _save_all(probe, states[:3], keep=sg.Keep(last=2))
    counting = FaultyStore(LocalStore(probe))
    run(probe, counting)
    points = dict(counting.calls)
    assert points
    trials = 0
    for point, n in points.items():
        for k in range(1, n + 1):
            root = tmp_path / f"t{trials}"
            _save_all(root, states[:3], keep=sg.Keep(last=2))
            before = {r.step for r in reader.list_checkpoints(root)}
            store = FaultyStore(LocalStore(root), {point: k}, crash=True)
            try:
                run(root, store)
            except BaseException:  # noqa: BLE001 - the crash
                pass
            trials += 1
            after = _verify_all(root)
            assert all(not v for v in after.values()), (point, k, after)
            assert before - {2} <= set(after), (point, k)  # step 2 may go only by retention
            got, d = _restore(root)
            assert _same(d, states[got - 1]), (point, k)
            shutil.rmtree(root)
    assert trials > 5


@pytest.mark.parametrize("point", ["list", "open"])
def test_a_crash_at_a_read_of_prune_leaves_the_kept_checkpoints_complete(
    tmp_path: Path, point: str
) -> None:
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    states = _frozen(5)
    fired: list[str] = []
    for k in (1, 2, 3):
        root = tmp_path / f"run{k}"
        _save_all(root, states, keep=sg.Keep(last=10))
        store = FaultyStore(LocalStore(root), {point: k}, crash=True)
        try:
            plan = runs.list_run(store, sg.Keep(last=1))
            runs.delete_unkept(plan, spare=None, strict=True)
        except (sg.CheckpointError, OSError):
            pass
        fired += store.fired
        left = _verify_all(root)
        assert 5 in left and all(not v for v in left.values()), (point, k, left)
        # the next writer finishes the job: one copy of the base, no temp garbage
        with _ckpt(root, keep=sg.Keep(last=1)) as ck:
            st, box = _state({})
            assert ck.restore(st) == 5 and _same(box.d, states[4])
            box.d = dict(states[4], head=torch.full((8,), 99.0))
            ck.save(st, 6)
        assert _verify_all(root) == {6: []}
        assert [p.name for p in root.glob("retired-*")] == [RETIRED1]
        assert not list(root.glob(".tmp-*"))


def _by_step(step: int) -> dict[str, torch.Tensor]:
    """A deterministic state per step: a base that changes every 5th step, a head that always
    changes, a tensor that goes A -> B -> A, one that changes shape, and odd dtypes."""
    g = torch.Generator().manual_seed(step // 5)
    return {
        "base": torch.randn(20000, generator=g),
        "head": torch.full((16,), float(step)),
        "aba": torch.full((64,), float(step % 2)),
        "shape": torch.zeros(step % 3 + 1, 4),
        "bf16": torch.arange(40, dtype=torch.bfloat16),
        "c": torch.tensor([step + 1j]),
        "scalar": torch.tensor(1.0),
        "empty": torch.zeros(0),
    }


_KILL_CHILD = """
import sys, time
sys.path.insert(0, {here!r})
import savegame as sg
from test_incremental_outside import _by_step, _ckpt, _state
st, box = _state({{}})
with _ckpt({root!r}, keep=sg.Keep(last=2), async_save={async_!r}) as ck:
    step = ck.restore(st)
    print("ready", flush=True)
    while True:
        step += 1
        box.d = _by_step(step)
        ck.step(st, step)
"""


@pytest.mark.slow
@pytest.mark.parametrize("async_", [False, True])
def test_sigkill_at_random_moments_then_every_kept_step_restores_exactly(
    tmp_path: Path, async_: bool
) -> None:
    import random
    import signal
    import time

    rng = random.Random(1234 + async_)
    root = tmp_path / "run"
    here = str(Path(__file__).parent)
    for trial in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD.format(here=here, root=str(root), async_=async_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        checks = _verify_all(root)
        assert checks and all(not v for v in checks.values()), (trial, checks)
        for s in checks:
            got, d = _restore(root, s)
            assert got == s and _same(d, _by_step(s)), (trial, s)
    # garbage is collected by the next writer: only files a checkpoint uses are left
    with _ckpt(root, keep=sg.Keep(last=2)):
        pass
    used = {n for r in reader.list_checkpoints(root) if r.manifest for n in r.manifest.refs}
    for p in root.glob("retired-*"):
        assert layout.parse_retired_file(p.name) in used
    assert not list(root.glob(".tmp-*"))


def test_retention_on_a_wrapped_local_store_goes_through_that_store(tmp_path: Path) -> None:
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    root = tmp_path / "run"
    _save_all(root, _frozen(5))
    store = FaultyStore(LocalStore(root))
    plan = runs.list_run(store, sg.Keep(last=1))
    deleted = runs.delete_unkept(plan, spare=None, strict=True)
    assert [i.step for i in deleted] == [1, 2, 3, 4]
    assert store.calls["rename"] + store.calls["detach"] > 0, dict(store.calls)


_EXIT_AT = """
import os, sys
sys.path.insert(0, {here!r})
import savegame as sg
from savegame.storage import local
from test_incremental_outside import _frozen, _save_all
calls = {{"n": 0}}
for name in ("rename", "detach"):
    real = getattr(local.LocalStore, name)
    def hook(self, *a, _real=real, _name=name, **k):
        calls["n"] += 1
        if calls["n"] == {n}:
            os._exit(9)  # a kill -9 right before this rename/detach
        out = _real(self, *a, **k)
        if calls["n"] == -{n}:
            os._exit(9)  # ... or right after it
        return out
    setattr(local.LocalStore, name, hook)
states = _frozen(7)
_save_all({root!r}, states, keep=sg.Keep(last=2))
"""


@pytest.mark.slow
def test_a_kill_at_every_rename_and_detach_of_saves_with_retention(tmp_path: Path) -> None:
    """A real kill (os._exit) at the n-th LocalStore rename/detach, before or after it, of a run
    whose retention retires and collects the base: every committed checkpoint verifies, and the
    next writer leaves one copy of what is used and no temp garbage."""
    states = _frozen(7)
    here = str(Path(__file__).parent)
    n = 1
    while True:
        ends = []
        for sign in (1, -1):
            root = tmp_path / f"run{n}{'a' if sign > 0 else 'b'}"
            code = _EXIT_AT.format(here=here, root=str(root), n=sign * n)
            rc = subprocess.run([sys.executable, "-c", code], timeout=120).returncode
            ends.append(rc)
            checks = _verify_all(root)
            assert all(not v for v in checks.values()), (n, sign, checks)
            st, box = _state({})
            with _ckpt(root, keep=sg.Keep(last=2)) as ck:
                got = ck.restore(st)
                assert got in checks or (got == 0 and not checks)
                if got:
                    assert _same(box.d, states[got - 1]), (n, sign, got)
                box.d = dict(states[0], head=torch.full((8,), 42.0))
                ck.save(st, 8)
            assert all(not v for v in _verify_all(root).values())
            used = {x for r in reader.list_checkpoints(root) if r.manifest for x in r.manifest.refs}
            for p in root.glob("retired-*"):
                assert layout.parse_retired_file(p.name) in used, (n, sign, p.name)
            assert not list(root.glob(".tmp-*")), (n, sign)
            shutil.rmtree(root)
        if ends == [0, 0]:  # past the last rename/detach of the run
            break
        n += 1
    assert n > 5


# ---- the CLI on incremental checkpoints --------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``savegame ARGS`` in this process (a subprocess costs ~3 s of imports per call)."""
    import contextlib
    import io

    from savegame.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def test_cli_verify_ls_diff_convert_and_prune_on_a_run_with_retired_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(4)
    _save_all(root, states, keep=sg.Keep(last=3))  # 2, 3, 4; step 1 retired
    assert (root / RETIRED1).exists()
    out = _cli("verify", str(root / layout.step_dir(3)))
    assert out.returncode == 0, out.stdout + out.stderr
    out = _cli("verify", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    out = _cli("ls", str(root))
    assert out.returncode == 0 and "retired" in out.stdout, out.stdout + out.stderr
    out = _cli("diff", str(root / layout.step_dir(2)), str(root / layout.step_dir(4)))
    assert out.returncode in (0, 1), out.stdout + out.stderr
    assert "head" in out.stdout and "Traceback" not in out.stderr
    flat = tmp_path / "flat.safetensors"
    out = _cli("convert", str(root / layout.step_dir(4)), str(flat), "--to", "safetensors")
    assert out.returncode == 0, out.stdout + out.stderr
    import safetensors.torch

    assert _bits(safetensors.torch.load_file(str(flat))["box/base"]) == _bits(states[0]["base"])
    out = _cli("prune", str(root), "--keep-last", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r.step for r in reader.list_checkpoints(root)] == [4]
    assert _verify_all(root) == {4: []}
    got, d = _restore(root)
    assert got == 4 and _same(d, states[3])
    # the writer that opens the run next leaves exactly one copy of the base
    with _ckpt(root):
        pass
    assert [p.name for p in root.glob("retired-*")] == [RETIRED1]


def test_verify_names_a_hand_deleted_retired_file_for_every_checkpoint_using_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(4), keep=sg.Keep(last=2))
    (root / RETIRED1).unlink()
    for s in (3, 4):
        problems = reader.verify(root / layout.step_dir(s))
        assert problems and "missing" in problems[0] and "step-000000000001" in problems[0]
    out = _cli("verify", str(root / layout.step_dir(4)))
    assert out.returncode != 0 and "missing" in (out.stdout + out.stderr)
    with pytest.raises(sg.IntegrityError, match="missing"):
        sg.load(root / layout.step_dir(4))


def test_after_a_shared_file_is_lost_the_next_save_stands_alone(tmp_path: Path) -> None:
    """Restore skips the checkpoints that used the lost file (warning, nothing half-applied);
    the next save must not refer to the lost bytes again."""
    root = tmp_path / "run"
    states = _frozen(4)
    _save_all(root, states, keep=sg.Keep(last=2))
    (root / RETIRED1).unlink()
    st, box = _state({"base": states[0]["base"], "head": torch.zeros(8)})
    with pytest.warns(sg.CorruptCheckpointWarning):
        with _ckpt(root, keep=sg.Keep(last=2)) as ck:
            assert ck.restore(st) == 0
            ck.save(st, 5)
    assert _verify_all(root) == {5: []}
    assert not _m(root, 5).refs


# ---- one checkpoint by path; transfers --------------------------------------------------------
def test_open_and_load_one_checkpoint_path_whose_base_is_retired(tmp_path: Path) -> None:
    root = tmp_path / "run"
    states = _frozen(3)
    _save_all(root, states, keep=sg.Keep(last=1))
    ck = root / layout.step_dir(3)
    loaded = sg.load(ck)
    assert _bits(loaded["box"]["base"]) == _bits(states[0]["base"])
    with sg.open(ck) as r:
        assert _bits(r.read("box/head")) == _bits(states[2]["head"])


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_push_to_a_url_and_pull_back_restores_bitwise(tmp_path: Path, scheme: str) -> None:
    root = tmp_path / "run"
    states = _frozen(4)
    _save_all(root, states, keep=sg.Keep(last=2))
    url = (
        f"memory://outside-{tmp_path.name}/run"
        if scheme == "memory"
        else (tmp_path / "remote").as_uri()
    )
    rep = sg.push(root, url)
    assert rep.verified and sorted(rep.copied) == [3, 4]
    back = tmp_path / "back"
    rep = sg.pull(url, back)
    assert rep.verified
    assert _verify_all(back) == {3: [], 4: []}
    assert (back / RETIRED1).exists()
    for s in (3, 4):
        got, d = _restore(back, s)
        assert _same(d, states[s - 1])
    # the pulled run goes on incrementally and its retention frees the base once unused
    st, box = _state({})
    with _ckpt(back, keep=sg.Keep(last=1)) as ck:
        ck.restore(st)
        box.d = {"base": torch.zeros(4096), "head": torch.ones(8)}
        ck.save(st, 5)
    assert not list(back.glob("retired-*"))
    assert _verify_all(back) == {5: []}


def test_a_run_copied_with_cp_r_works_and_goes_on_independently(tmp_path: Path) -> None:
    root = tmp_path / "run"
    states = _frozen(4)
    _save_all(root, states, keep=sg.Keep(last=2))
    copy = tmp_path / "elsewhere" / "copy"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(root), str(copy)], check=True)
    assert _verify_all(copy) == {3: [], 4: []}
    got, d = _restore(copy)
    assert got == 4 and _same(d, states[3])
    # the copy and the original run side by side, each saving on
    for where, val in ((copy, 1.0), (root, 2.0)):
        st, box = _state({})
        with _ckpt(where, keep=sg.Keep(last=1)) as ck:
            ck.restore(st)
            box.d = {"base": states[0]["base"], "head": torch.full((8,), val)}
            ck.save(st, 5)
    for where, val in ((copy, 1.0), (root, 2.0)):
        assert _verify_all(where) == {5: []}
        got, d = _restore(where)
        assert got == 5 and torch.equal(d["head"], torch.full((8,), val))
        m = _m(where, 5)
        assert list(m.refs) == ["step-000000000001/rank-00000.safetensors"]
        assert (where / RETIRED1).exists()


def test_a_push_cut_by_a_crash_at_any_point_leaves_the_destination_verifying_and_resumes(
    tmp_path: Path,
) -> None:
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    root = tmp_path / "run"
    states = _frozen(6)
    _save_all(root, states, keep=sg.Keep(last=2))  # 5, 6 refer to retired step 1
    counting = FaultyStore(LocalStore(tmp_path / "count"))
    sg.push(root, counting)
    trials = 0
    for point, n in dict(counting.calls).items():
        for k in range(1, n + 1):
            dst = tmp_path / f"dst-{point}-{k}"
            try:
                sg.push(root, FaultyStore(LocalStore(dst), {point: k}, crash=True))
            except (sg.CheckpointError, OSError):
                pass
            if dst.exists():
                assert all(not v for v in _verify_all(dst).values()), (point, k)
            rep = sg.push(root, dst)  # a re-run finishes the job
            assert rep.verified, (point, k)
            assert _verify_all(dst) == {5: [], 6: []}, (point, k)
            shutil.rmtree(dst)
            trials += 1
    assert trials > 10
    back = tmp_path / "back"
    sg.pull(root, back)
    got, d = _restore(back)
    assert got == 6 and _same(d, states[5])


def test_a_second_push_after_the_source_retired_its_base(tmp_path: Path) -> None:
    root = tmp_path / "run"
    states = _frozen(6)
    _save_all(root, states[:3])
    dst = tmp_path / "dst"
    assert sorted(sg.push(root, dst).copied) == [1, 2, 3]
    st, box = _state({})
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:
        ck.restore(st)
        for i in (4, 5, 6):
            box.d = dict(states[i - 1])
            ck.save(st, i)
    assert (root / RETIRED1).exists()
    rep = sg.push(root, dst)
    assert rep.verified and sorted(rep.copied) == [5, 6]
    assert all(not v for v in _verify_all(dst).values())
    got, d = _restore(dst)
    assert got == 6 and _same(d, states[5])


def test_switching_incremental_off_and_on_frees_the_shared_base(tmp_path: Path) -> None:
    root = tmp_path / "run"
    states = _frozen(6)
    st, box = _state({})
    for incremental, steps in ((True, (1, 2)), (False, (3, 4)), (True, (5, 6))):
        with _ckpt(root, keep=sg.Keep(last=2), incremental=incremental) as ck:
            for i in steps:
                box.d = dict(states[i - 1])
                ck.save(st, i)
            if not incremental:
                assert not list(root.glob("retired-*"))  # 1, 2 gone, nothing uses step 1
                assert all(not _m(root, i).refs for i in steps)
    assert list(_m(root, 6).refs) == ["step-000000000004/rank-00000.safetensors"]
    assert _verify_all(root) == {5: [], 6: []}
    got, d = _restore(root)
    assert got == 6 and _same(d, states[5])


def test_prune_dry_run_changes_nothing_and_ls_survives_a_lost_retired_file(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(4), keep=sg.Keep(last=10))
    before = sorted(p.name for p in root.rglob("*"))
    out = _cli("prune", str(root), "--keep-last", "1", "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in root.rglob("*")) == before
    out = _cli("prune", str(root), "--keep-last", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    (root / RETIRED1).unlink()
    out = _cli("ls", str(root))
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr
    out = _cli("verify", str(root))
    assert out.returncode != 0 and "missing" in out.stdout + out.stderr


def test_two_runs_saving_interleaved_in_one_process_stay_apart(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    sa, sb = _frozen(5), [dict(d, base=d["base"] + 1) for d in _frozen(5)]
    st_a, box_a = _state({})
    st_b, box_b = _state({})
    with (
        _ckpt(a, keep=sg.Keep(last=2)) as ca,
        _ckpt(b, keep=sg.Keep(last=2), async_save=True, when_busy="skip") as cb,
    ):
        for i in range(1, 6):
            box_a.d = dict(sa[i - 1])
            ca.save(st_a, i)
            box_b.d = dict(sb[i - 1])
            cb.step(st_b, i)
    for root, states in ((a, sa), (b, sb)):
        checks = _verify_all(root)
        assert checks and all(not v for v in checks.values())
        for s in checks:
            got, d = _restore(root, s)
            assert _same(d, states[s - 1])
        for r in reader.list_checkpoints(root):
            assert r.manifest is not None
            assert all(manifest.ref_step(n) is not None for n in r.manifest.refs)


def test_a_checkpoint_folder_copied_alone_says_what_it_misses(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(3), keep=sg.Keep(last=1))
    alone = tmp_path / "elsewhere" / layout.step_dir(3)
    shutil.copytree(root / layout.step_dir(3), alone)
    with pytest.raises(sg.IntegrityError, match="shares it with step-000000000001") as info:
        sg.load(alone)
    assert "step-000000000001" in str(info.value.path)
    problems = reader.verify(alone)
    assert problems and "missing" in problems[0]
    out = _cli("verify", str(alone))
    assert out.returncode != 0 and "shares it with" in " ".join((out.stdout + out.stderr).split())
    # savegame push is the way to copy one checkpoint with what it shares
    dst = tmp_path / "pushed"
    assert sg.push(root / layout.step_dir(3), dst).verified
    assert _verify_all(dst) == {3: []}


# ---- hostile manifests ------------------------------------------------------------------------
def _resign(body: dict[str, Any]) -> bytes:
    body = dict(body)
    body.pop("integrity", None)
    body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    return json.dumps(body).encode()


def _edit(root: Path, step: int, fn: Any) -> None:
    path = root / layout.step_dir(step) / layout.MANIFEST
    body = json.loads(path.read_bytes())
    fn(body)
    path.write_bytes(_resign(body))


REF1 = "step-000000000001/rank-00000.safetensors"


def test_a_reference_whose_size_disagrees_with_the_file_is_an_integrity_error(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(2))

    def grow(body: dict[str, Any]) -> None:
        body["files"][REF1]["size"] += 64

    _edit(root, 2, grow)
    problems = reader.verify(root / layout.step_dir(2))
    assert problems and "bytes but the manifest says" in problems[0]
    with pytest.raises(sg.IntegrityError):
        sg.load(root / layout.step_dir(2))
    assert _verify_all(root)[1] == []  # the file itself is untouched


def test_a_reference_whose_chunk_hash_or_offset_is_edited_never_reaches_a_tensor(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(2)
    _save_all(root, states)

    def shift(body: dict[str, Any]) -> None:
        for t in body["tensors"].values():
            for c in t["chunks"]:
                if c["file"] == REF1:
                    c["offset"] += 4  # still inside the file: only the chunk hash can tell

    _edit(root, 2, shift)
    with pytest.raises((sg.IntegrityError, sg.FormatError)):
        sg.load(root / layout.step_dir(2))
    with pytest.warns(sg.CorruptCheckpointWarning):
        got, d = _restore(root)
    assert got == 1 and _same(d, states[0])


def test_a_reference_to_a_rank_the_run_does_not_have_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(2))
    other = "step-000000000001/rank-00001.safetensors"

    def rerank(body: dict[str, Any]) -> None:
        body["files"][other] = body["files"].pop(REF1)
        for t in body["tensors"].values():
            for c in t["chunks"]:
                if c["file"] == REF1:
                    c["file"] = other

    _edit(root, 2, rerank)
    with pytest.raises((sg.FormatError, sg.IntegrityError)):
        sg.load(root / layout.step_dir(2))


def test_a_retired_name_written_directly_in_a_manifest_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(3), keep=sg.Keep(last=2))
    assert (root / RETIRED1).exists()
    for bad in (RETIRED1, f"../{RETIRED1}"):

        def point(body: dict[str, Any], bad: str = bad) -> None:
            body["files"][bad] = body["files"].pop(REF1)
            for t in body["tensors"].values():
                for c in t["chunks"]:
                    if c["file"] == REF1:
                        c["file"] = bad

        shutil.copytree(root, tmp_path / "edit", dirs_exist_ok=False)
        _edit(tmp_path / "edit", 3, point)
        with pytest.raises((sg.FormatError, sg.IntegrityError)):
            sg.load(tmp_path / "edit" / layout.step_dir(3))
        shutil.rmtree(tmp_path / "edit")


def test_an_edited_hash_of_a_referenced_file_entry_is_not_used_and_bytes_still_verify(
    tmp_path: Path,
) -> None:
    """docs/format.md: a shared file's header and file hash are not checked through a reference
    (only its size and every chunk used): pinned, so a change of that rule is deliberate."""
    root = tmp_path / "run"
    states = _frozen(2)
    _save_all(root, states)

    def rehash(body: dict[str, Any]) -> None:
        body["files"][REF1]["hash"] = "0" * 32

    _edit(root, 2, rehash)
    assert reader.verify(root / layout.step_dir(2)) == []
    got, d = _restore(root)
    assert got == 2 and _same(d, states[1])


def test_the_two_tiers_on_a_memory_url_and_a_fork_of_an_incremental_run(tmp_path: Path) -> None:
    url = f"memory://outside-tiers-{tmp_path.name}/run"
    states = _frozen(4)
    st, box = _state({})
    with _ckpt(url, cache=tmp_path / "cache", keep=sg.Keep(last=1)) as ck:
        for i, d in enumerate(states, start=1):
            box.d = dict(d)
            ck.save(st, i)
    shutil.rmtree(tmp_path / "cache")
    got, d = _restore_tiers(url, tmp_path / "cache2")
    assert got == 4 and _same(d, states[3])
    # a new run forked from it: its first save stands alone (no reference into another run)
    fork = tmp_path / "fork"
    st2, box2 = _state({})
    with _ckpt(fork, start_from=url) as ck:
        assert ck.restore(st2) == 4 and _same(box2.d, states[3])
        ck.save(st2, 5)
        box2.d = dict(box2.d, head=torch.zeros(8))
        ck.save(st2, 6)
    assert not _m(fork, 5).refs
    assert list(_m(fork, 6).refs) == ["step-000000000005/rank-00000.safetensors"]
    assert _verify_all(fork) == {5: [], 6: []}


def _restore_tiers(url: str, cache: Path) -> tuple[int, dict[str, torch.Tensor]]:
    st, box = _state({})
    with _ckpt(url, cache=cache) as ck:
        got = ck.restore(st)
    return got, box.d


def test_regime_short_with_a_monitor_keeps_newest_and_best_across_shared_bytes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(5)
    st, box = _state({})
    accs = [0.1, 0.9, 0.2, 0.3, 0.4]
    with sg.Checkpointer(
        root, handle_signals=False, **sg.regime("short", monitor="acc", mode="max")
    ) as ck:
        for i, acc in enumerate(accs, start=1):
            box.d = dict(states[i - 1])
            ck.step(st, i, metrics={"acc": acc}, epoch_end=True)
    assert [r.step for r in reader.list_checkpoints(root)] == [2, 5]
    assert _verify_all(root) == {2: [], 5: []}
    for s in (2, 5):
        got, d = _restore(root, s)
        assert _same(d, states[s - 1])
    assert [p.name for p in root.glob("retired-*")] == [RETIRED1]


# ---- bugs ---------------------------------------------------------------------------------------
def test_saving_again_a_step_whose_file_is_retired_never_damages_later_checkpoints(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(3)
    _save_all(root, states, keep=sg.Keep(last=2))  # 2, 3 refer to retired step 1
    assert (root / RETIRED1).exists()
    st, box = _state({"base": torch.randn(4096), "head": torch.zeros(8)})
    with _ckpt(root, keep=sg.Keep(last=10)) as ck:
        try:
            ck.save(st, 1)  # a step counter reset; the library may refuse it (typed) ...
        except sg.CheckpointError:
            pass
    # ... but whatever it does, the committed checkpoints 2 and 3 must stay intact
    checks = _verify_all(root)
    assert checks[2] == [] and checks[3] == [], checks


def test_a_checkpoint_replaced_by_another_process_is_never_referred_to_from_a_stale_cache(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    base = torch.arange(1000.0)
    _save_all(root, [{"base": base, "h": torch.zeros(3)}, {"base": base * 2, "h": torch.zeros(3)}])
    # another process discards step 2 and writes a different step 2 (same run, same values of
    # "base", but an extra tensor moves it to another offset in the file)
    code = textwrap.dedent(
        f"""
        import shutil, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_incremental_outside import _ckpt, _state
        shutil.rmtree({str(root / layout.step_dir(2))!r})
        st, box = _state({{}})
        with _ckpt({str(root)!r}) as ck:
            ck.restore(st)
            box.d = {{"a0": torch.ones(4000), "h": torch.ones(3), "base": torch.arange(1000.0) * 2}}
            ck.save(st, 2)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert _verify_all(root) == {1: [], 2: []}
    st, box = _state({})
    with _ckpt(root) as ck:
        assert ck.restore(st) == 2
        ck.save(st, 3)
    assert _verify_all(root)[3] == []


def test_an_error_in_a_retired_file_names_the_file_that_was_read(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(3), keep=sg.Keep(last=2))
    f = root / RETIRED1
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 1
    f.write_bytes(bytes(raw))
    problems = reader.verify(root / layout.step_dir(3))
    assert problems and RETIRED1 in problems[0], problems
    with pytest.raises(sg.IntegrityError) as info:
        sg.load(root / layout.step_dir(3))
    assert RETIRED1 in str(info.value) and RETIRED1 in str(info.value.path)


def test_bit_rot_in_a_shared_file_does_not_spread_to_every_later_checkpoint(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    states = _frozen(6)
    st, box = _state({})
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:
        for i in (1, 2, 3):
            box.d = dict(states[i - 1])
            ck.save(st, i)
        f = root / RETIRED1
        raw = bytearray(f.read_bytes())
        raw[-100] ^= 1
        f.write_bytes(bytes(raw))
        for i in (4, 5, 6):
            box.d = dict(states[i - 1])
            ck.save(st, i)
    checks = _verify_all(root)
    assert any(not v for v in checks.values()), checks  # some checkpoint still restores


def test_a_push_rerun_never_reports_verified_over_damaged_shared_bytes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_all(root, _frozen(4), keep=sg.Keep(last=2))
    dst = tmp_path / "dst"
    assert sg.push(root, dst).verified
    f = dst / RETIRED1
    raw = bytearray(f.read_bytes())
    raw[-50] ^= 1
    f.write_bytes(bytes(raw))
    rep = sg.push(root, dst)
    checks = _verify_all(dst)
    assert not rep.verified or all(not v for v in checks.values()), (rep, checks)
