"""Review D21: restore raises on a checkpoint it could not *read* (b21ca1e, d357573).

What a user relies on (README "Damaged checkpoints", docs/tiers.md): a checkpoint that could
only not be read proves nothing about its bytes — it is never set aside as damaged, restore
never resumes an older step on a guess, and a two-tier run never removes cache work on a
guess; under torch.distributed every rank takes the same decision.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_tiers import _abandon, _ckpt, _set, _Slow, _state
from test_tiers import _steps as _valid
from test_unreadable_restore import _Flaky

import savegame as sg
from savegame import errors
from savegame.distributed import loading
from savegame.engine import reader
from savegame.format import layout
from savegame.state import overrides
from savegame.storage import Store, base
from savegame.storage.faulty import FaultyStore
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore

# ---- helpers ---------------------------------------------------------------------------------


def _damaged_names(store: Store) -> list[str]:
    return [e.name for e in store.list("") if e.name.startswith("damaged-")]


def _two_tier_run(tmp_path: Path, steps: tuple[int, ...] = (1, 2)) -> MemoryStore:
    remote = MemoryStore("remote")
    state, holder = _state()
    with sg.Checkpointer(
        remote, cache=tmp_path / "cache", keep=sg.Keep(last=5), handle_signals=False
    ) as ck:
        for s in steps:
            _set(holder, s)
            ck.save(state, s)
    return remote


# ---- 1. set-aside of a copy that was only unreadable -------------------------------------------


def test_an_unreadable_cache_copy_is_read_from_the_remote_and_never_set_aside(
    tmp_path: Path,
) -> None:
    remote = _two_tier_run(tmp_path)
    cache = LocalStore(tmp_path / "cache")
    assert 2 in _valid(cache)
    real_open = LocalStore.open

    def failing_open(self: LocalStore, key: str) -> base.Blob:  # the cache's disk: EIO (lasting)
        if key.startswith(layout.step_dir(2)) and key.endswith(".safetensors"):
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_open(self, key)

    state, holder = _state()
    mp = pytest.MonkeyPatch()
    mp.setattr(LocalStore, "open", failing_open)
    try:
        with sg.Checkpointer(
            remote, cache=tmp_path / "cache", keep=sg.Keep(last=5), handle_signals=False
        ) as ck:
            with pytest.warns(errors.CorruptCheckpointWarning):
                assert ck.restore(state) == 2
    finally:
        mp.undo()
    assert holder["step"] == 2
    # nothing is known to be wrong with the cache copy: it stays where it was
    assert _damaged_names(cache) == []
    assert 2 in _valid(cache)


# ---- 2. Tiers.restored: one failed read of the base, later the work is deleted as stale ------


class _ReadFails(_Slow):
    """A remote whose ``read()`` (not ``open()``) of step ``step``'s manifest fails (a 503
    after the store's retries) while ``down``."""

    def __init__(self, inner: Store, step: int) -> None:
        super().__init__(inner, delay=0.0)
        self.key = f"{layout.step_dir(step)}/{layout.MANIFEST}"
        self.down, self.failed = False, 0

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if self.down and key == self.key:
            self.failed += 1
            raise OSError(errno.EIO, "503 Slow Down (injected)")
        return super().read(key, start, length)


def test_one_failed_read_at_restore_never_gets_the_caches_own_work_deleted(
    tmp_path: Path,
) -> None:
    remote = _ReadFails(MemoryStore("remote"), step=1)
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5)) as a:  # machine A: step 1
        _set(holder, 1)
        a.save(state, 1)
    state_b, holder_b = _state()
    b = _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5))  # machine B, a fresh cache
    remote.down = True  # only Tiers.restored's read() of the base's manifest fails
    try:
        assert b.restore(state_b) == 1
    finally:
        remote.down = False
    # (since the fix, Tiers.restored records the base from the manifest the restore read:
    # it makes no read of its own that could fail, so remote.failed may stay 0)
    remote.gate.clear()  # B's uploads stall; it saves 2 and 3 and is killed
    for step in (2, 3):
        _set(holder_b, step)
        b.save(state_b, step)
    _abandon(b)
    remote.gate.set()
    assert _valid(remote.inner) == [1]
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache-b", keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 3  # its own newest work, not deleted as "stale"
    assert holder["step"] == 3


def test_an_unreadable_cache_manifest_at_open_never_gets_pending_work_deleted(
    tmp_path: Path,
) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    state, holder = _state()
    ck = _ckpt(remote, cache, keep=sg.Keep(last=5))
    for step in (1, 2):
        _set(holder, step)
        ck.save(state, step)
    ck.wait()
    ck._tiers.drain()  # 1 and 2 uploaded
    remote.gate.clear()  # 3 is saved, its upload stalls, the process is killed
    _set(holder, 3)
    ck.save(state, 3)
    _abandon(ck)
    remote.gate.set()
    assert _valid(remote.inner) == [1, 2] and 3 in _valid(cache)
    bad = f"{layout.step_dir(2)}/{layout.MANIFEST}"
    real_open, real_version = LocalStore.open, LocalStore.version
    root = str(cache)

    def failing_open(self: LocalStore, key: str) -> base.Blob:  # EIO on the cache's disk / NFS
        if key == bad and str(self._p(key)).startswith(root):
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_open(self, key)

    def no_token(self: LocalStore, key: str) -> Any:  # a new process: nothing parsed before
        return None if key == bad else real_version(self, key)

    mp = pytest.MonkeyPatch()
    mp.setattr(LocalStore, "open", failing_open)
    mp.setattr(LocalStore, "version", no_token)
    state, holder = _state()
    try:
        with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
            again.restore(state)
    except sg.StorageError:
        pass  # refusing to open, typed, is fine: nothing decided on a failed read
    finally:
        mp.undo()
    assert 3 in _valid(cache) or 3 in _valid(remote.inner)  # never deleted on a guess
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 3


class _Denied(FaultyStore):
    """A remote where one object can never be read: 403 (an object under a KMS key these
    credentials cannot use), raised as the object stores raise it."""

    def __init__(self, inner: Store, key: str) -> None:
        super().__init__(inner)
        self.key, self.down = key, False

    def open(self, key: str) -> base.Blob:
        if self.down and key == self.key:
            raise errors.AccessDeniedError(f"403 Forbidden: {key} (injected)", path=key)
        return super().open(key)


def test_a_permanently_unreadable_old_remote_step_does_not_lock_the_run_out(
    tmp_path: Path,
) -> None:
    remote = _Denied(MemoryStore("remote"), f"{layout.step_dir(1)}/{layout.MANIFEST}")
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=5)) as ck:
        for step in (1, 2, 3):
            _set(holder, step)
            ck.save(state, step)
    assert _valid(remote.inner) == [1, 2, 3]
    remote.down = True
    # the same run without a cache opens and resumes 3: step 1 is never reached
    state, holder = _state()
    with sg.Checkpointer(remote, handle_signals=False, keep=sg.Keep(last=5)) as plain:
        assert plain.restore(state) == 3
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=5)) as ck:
        assert ck.restore(state) == 3
    assert holder["step"] == 3


class _LostAck(_Slow):
    """A remote whose uploads can be held at ``begin`` (``entered`` says one is there), and
    whose reads of step ``step``'s manifest fail (503) while ``down``."""

    def __init__(self, inner: Store, step: int) -> None:
        super().__init__(inner, delay=0.0)
        self.key = f"{layout.step_dir(step)}/{layout.MANIFEST}"
        self.down = False
        self.entered = threading.Event()

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        self.entered.set()
        return super().begin(name, final)

    def open(self, key: str) -> base.Blob:
        if self.down and key == self.key:
            raise OSError(errno.EIO, "503 Slow Down (injected)")
        return super().open(key)


def test_a_503_after_a_commit_that_landed_is_retried_not_called_another_step(
    tmp_path: Path,
) -> None:
    remote = _LostAck(MemoryStore("remote"), step=2)
    cache = tmp_path / "cache"
    state, holder = _state()
    ck = _ckpt(remote, cache, keep=sg.Keep(last=5))
    try:
        _set(holder, 1)
        ck.save(state, 1)
        ck.wait()
        ck._tiers.drain()
        remote.gate.clear()
        remote.entered.clear()
        _set(holder, 2)
        ck.save(state, 2)
        ck.wait()
        assert remote.entered.wait(10)  # the upload of 2 found no remote copy and is held
        # an earlier attempt's commit landed after all (its answer was lost): the same bytes
        src = LocalStore(cache)
        names = [e.name for e in src.list(layout.step_dir(2))]
        remote.inner.makedirs(layout.step_dir(2))
        for name in sorted(names, key=lambda n: n == layout.MANIFEST):  # the manifest last
            key = f"{layout.step_dir(2)}/{name}"
            remote.inner.put(key, src.read(key))
        remote.down = True  # and the remote answers 503 for that manifest a while
        remote.gate.set()
        ck.wait()
        deadline = threading.Event()
        deadline.wait(0.5)  # its upload attempts run (and fail) meanwhile
        remote.down = False
    finally:
        ck.close()  # drains: with the remote answering, step 2 is found uploaded
    assert _valid(remote.inner) == [1, 2]


# ---- 3. ranks whose candidate lists differ (node-local caches) ---------------------------------


class _ThreadGroup:
    """Group for ranks run as threads of one process: max_int/gather over a barrier; a rank
    that stops calling makes the others' next collective time out (BrokenBarrierError)."""

    distributed = True

    def __init__(self, rank: int, world: int, shared: dict[str, Any]) -> None:
        self.rank, self.world, self.shared = rank, world, shared

    def _exchange(self, obj: Any) -> list[Any]:
        # one barrier per exchange; each exchange's values kept under its own number
        self.calls = getattr(self, "calls", 0) + 1
        slots = self.shared["slots"].setdefault(self.calls, [None] * self.world)
        slots[self.rank] = obj
        self.shared["barrier"].wait()
        return list(slots)

    def max_int(self, value: int, *, what: str) -> int:
        return max(self._exchange(int(value)))

    def gather(self, obj: Any, *, what: str) -> list[Any]:
        return self._exchange(obj)


def _model_state(value: float) -> tuple[sg.TrainState, torch.nn.Linear]:
    m = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return sg.TrainState(model=m, rng=False), m


def _save_steps(store: Store, steps: tuple[int, ...]) -> None:
    for s in steps:
        state, _ = _model_state(float(s))
        with sg.Checkpointer(store, keep=sg.Keep(last=10), handle_signals=False) as ck:
            ck.save(state, s)


def _run_ranks(refs_per_rank: list[list[reader.CheckpointRef]], wait: float = 20.0) -> list[Any]:
    """loading.restore on each rank (a thread); per rank: ('restored', step, weight) or
    ('raised', exception type name)."""
    world = len(refs_per_rank)
    shared: dict[str, Any] = {"barrier": threading.Barrier(world, timeout=wait), "slots": {}}
    out: list[Any] = [None] * world

    def one(rank: int) -> None:
        state, m = _model_state(0.0)
        try:
            done = loading.restore(
                _ThreadGroup(rank, world, shared),
                refs_per_rank[rank],
                state,
                per_rank="fresh",
                skip=lambda p, e: None,
                opts=overrides.EVERYTHING,
            )
        except BaseException as exc:  # noqa: BLE001 - reported per rank
            out[rank] = ("raised", type(exc).__name__)
            return
        out[rank] = ("restored", done[0].step if done else None, m.weight[0, 0].item())

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(wait + 30)
    return out


def _node_refs(damage: str) -> list[list[reader.CheckpointRef]]:
    """What Tiers.refs() (merge_refs) gives each rank of one job, whose cache is shared (a
    shared file system): rank 0 lists remote 1, remote 2 and the cache copy of 2; rank 1's
    read of that cache copy's manifest failed (EIO/ESTALE on NFS), and merge_refs silently
    leaves out a cache checkpoint that is not ``valid``, so it lists remote 1 and remote 2.
    (A node-local cache on each node, docs/tiers.md "not built", gives the same lists.)
    The cache copy of step 2 then fails on rank 0 too: unreadable, or damaged."""
    remote = MemoryStore("remote")
    _save_steps(remote, (1, 2))
    cinner = MemoryStore("cache-a")
    _save_steps(cinner, (2,))
    cache = _Flaky(cinner, f"{layout.step_dir(2)}/rank-")
    if damage == "unreadable":
        cache.down = True
    else:
        key = next(
            f"{layout.step_dir(2)}/{e.name}"
            for e in cinner.list(layout.step_dir(2))
            if e.name.endswith(".safetensors")
        )
        raw = bytearray(cinner.read(key))
        raw[-3] ^= 0xFF
        cinner.put(key, bytes(raw))
    r = reader.list_checkpoints(remote)
    c = reader.list_checkpoints(cache)
    assert [x.step for x in r] == [1, 2] and [x.step for x in c] == [2]
    return [[r[0], r[1], c[0]], [r[0], r[1]]]


def test_ranks_with_different_cache_copies_agree_on_an_unreadable_copy() -> None:
    out = _run_ranks(_node_refs("unreadable"), wait=3.0)  # a rank left waiting: 3 s
    assert out[0] is not None and out[1] is not None
    # the same decision everywhere: both restore step 2 (from the remote), or both raise
    assert out[0][:2] == out[1][:2], out
    assert out[0][0] == "raised" or out[0] == ("restored", 2, 2.0)


def test_ranks_with_different_cache_copies_resume_the_same_step_past_a_damaged_copy() -> None:
    out = _run_ranks(_node_refs("damaged"))
    assert out[0] == out[1], out


def test_same_lists_one_rank_unreadable_the_other_fine_both_raise() -> None:
    remote = MemoryStore("remote")
    _save_steps(remote, (1, 2))
    flaky = _Flaky(remote, f"{layout.step_dir(2)}/rank-")
    flaky.down = True
    ok = reader.list_checkpoints(remote)
    bad = reader.list_checkpoints(flaky)
    out = _run_ranks([ok, bad])
    assert out == [("raised", "StorageError")] * 2


def test_same_lists_one_rank_unreadable_manifest_the_other_damaged_both_go_back() -> None:
    remote = MemoryStore("remote")
    _save_steps(remote, (1, 2))
    flaky = _Flaky(remote, f"{layout.step_dir(2)}/{layout.MANIFEST}")
    flaky.down = True
    unreadable = reader.list_checkpoints(flaky)
    assert isinstance(unreadable[1].error, errors.StorageError)
    damaged = reader.list_checkpoints(remote)
    damaged[1].manifest, damaged[1].error = None, errors.IntegrityError("flipped (injected)")
    out = _run_ranks([unreadable, damaged])
    assert out == [("restored", 1, 1.0)] * 2


# ---- 4. what stays sound -----------------------------------------------------------------------


def test_a_damaged_older_remote_manifest_and_a_folder_without_one_are_skipped_at_open(
    tmp_path: Path,
) -> None:
    remote = _two_tier_run(tmp_path, (1, 2, 3))
    remote.put(f"{layout.step_dir(1)}/{layout.MANIFEST}", b"{not json")  # FormatError: skipped
    remote.makedirs(layout.step_dir(9))  # a step folder without a manifest (a killed upload)
    remote.put(f"{layout.step_dir(9)}/rank-00000.safetensors", b"x")
    state, holder = _state()
    with _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=5)) as ck:
        assert ck.restore(state) == 3
    assert holder["step"] == 3


def test_an_intact_cache_copy_of_a_step_whose_remote_manifest_is_damaged_is_kept(
    tmp_path: Path,
) -> None:
    remote = _two_tier_run(tmp_path, (1, 2, 3))
    remote.put(f"{layout.step_dir(3)}/{layout.MANIFEST}", b"{not json")  # bit rot remotely
    assert 3 in _valid(tmp_path / "cache")
    state, holder = _state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", errors.CorruptCheckpointWarning)  # the remote copy's
        with _ckpt(remote, tmp_path / "cache", keep=sg.Keep(last=5)) as ck:
            got = ck.restore(state)
    assert 3 in _valid(tmp_path / "cache") or 3 in _valid(remote)  # not the only copy deleted
    assert got == 3 and holder["step"] == 3


def test_restore_step_of_an_unreadable_checkpoint_raises_storage_error(tmp_path: Path) -> None:
    inner = MemoryStore("run")
    _save_steps(inner, (1, 2, 3))
    flaky = _Flaky(inner, f"{layout.step_dir(2)}/rank-")
    flaky.down = True
    state, m = _model_state(0.0)
    with sg.Checkpointer(flaky, handle_signals=False) as ck:
        with pytest.raises(sg.StorageError) as info:
            ck.restore(state, step=2)
        assert info.value.step == 2
        assert ck.restore(state, step=1) == 1  # an older one on purpose still works
    assert _damaged_names(inner) == [] and _valid(inner) == [1, 2, 3]


class _NoMap(FaultyStore):
    """An object store's blobs: read in ranges, never mapped (so restore stages them)."""

    def open(self, key: str) -> base.Blob:
        inner = super().open(key)
        data = inner.read(0, inner.size) if hasattr(inner, "read") else None
        blob = type(inner)(data if data is not None else inner._data)  # type: ignore[attr-defined]
        blob.map = lambda: None  # type: ignore[method-assign]
        return blob


@pytest.mark.parametrize("fault", ["bad setting", "no room to stage"])
def test_a_staging_failure_at_restore_is_a_typed_error_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    inner = MemoryStore("run")
    _save_steps(inner, (1, 2))
    if fault == "bad setting":
        monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", "lots")
        hint = "SAVEGAME_STAGING_MEMORY"
    else:
        monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", "0")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
        hint = "TMPDIR"
    state, m = _model_state(0.0)
    with sg.Checkpointer(_NoMap(inner), handle_signals=False) as ck:
        with pytest.raises(sg.StorageError) as info:
            ck.restore(state)
    assert hint in str(info.value) and info.value.step == 2
    assert m.weight[0, 0].item() == 0.0  # nothing older restored on a guess
    assert _damaged_names(inner) == [] and _valid(inner) == [1, 2]


# ---- 5. two-tier under torch.distributed: one rank's failed read at refs() -------------------

_TIER_RANKS = textwrap.dedent(
    """
    import errno, sys
    import torch, torch.distributed as dist
    import savegame as sg
    from savegame.storage import local

    rank = int(sys.argv[1]); remote = sys.argv[2]; cache = sys.argv[3]; phase = sys.argv[4]
    dist.init_process_group("gloo", init_method="file://" + sys.argv[5], rank=rank, world_size=2)
    holder = {"w": torch.zeros(64) + rank, "step": 0}
    state = sg.TrainState(rng=False, extras=holder)
    if phase == "save":
        with sg.Checkpointer(remote, cache=cache, save=sg.Every(steps=1),
                             handle_signals=False) as ck:
            for s in (1, 2):
                holder["w"] = torch.full((64,), float(s)); holder["step"] = s
                ck.step(state, s)
    else:
        ck = sg.Checkpointer(remote, cache=cache, handle_signals=False)
        if rank == 1:  # from now on only this rank's reads of the REMOTE step 2 manifest fail
            real = local.LocalStore.open
            def failing(self, key):
                if key == "step-000000000002/manifest.json" and str(self.root) == remote:
                    raise OSError(errno.EIO, "503 Slow Down (injected)")
                return real(self, key)
            local.LocalStore.open = failing
        try:
            got = ck.restore(state)
        except Exception as exc:
            print(f"RAISED {type(exc).__name__}", flush=True)
        else:
            print(f"RESTORED {got}", flush=True)
        finally:
            try:
                ck.close()
            except Exception:
                pass
    dist.destroy_process_group()
    """
)


def _tier_ranks(tmp_path: Path, phase: str, timeout_s: int) -> tuple[list[str], float]:
    script = tmp_path / "tier_ranks.py"
    script.write_text(_TIER_RANKS)
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        SAVEGAME_DIST_TIMEOUT_S=str(timeout_s),
    )
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    init = tmp_path / f"init-{phase}"
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(remote), str(cache), phase, str(init)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in (0, 1)
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout_s + 120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        outs.append(out.strip().splitlines()[-1] if out.strip() else f"rc={p.returncode}")
    return outs, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_tiers_one_ranks_unreadable_remote_manifest_stops_every_rank_alike(
    tmp_path: Path,
) -> None:
    outs, _ = _tier_ranks(tmp_path, "save", 60)
    assert outs == ["rc=0", "rc=0"], outs
    outs, took = _tier_ranks(tmp_path, "restore", 15)
    assert outs == ["RAISED StorageError", "RAISED StorageError"] or outs == ["RESTORED 2"] * 2, (
        outs
    )
    assert took < 15, took  # promptly, not after the collective's timeout
