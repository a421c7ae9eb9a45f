"""Review D22: the intact cache copy of a step whose remote copy is damaged (88c9e73).

Claim under attack: when the remote copy of a step is proven damaged (its manifest does not
parse, or is missing) and the cache holds an intact copy newer than every readable remote
checkpoint of the run, the cache copy is restored and never deleted as stale; at open the lock
holder sets the remote copy aside (``damaged-step-…``) and uploads the cache copy in its place;
the cache's later work counts as pending. A remote copy that cannot be moved stays, and the
cache copy is kept and restored, never uploaded over it.

What every test checks in the end: no intact checkpoint is lost, and the run resumes from the
newest intact work.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_tiers import _abandon, _ckpt, _NoRename, _set, _Slow, _state, _steps

import savegame as sg
from savegame.checkpointer.tiers import merge_refs
from savegame.engine import reader, writer
from savegame.format import layout
from savegame.storage import Store, base
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::savegame.errors.CorruptCheckpointWarning")


def _manifest(step: int) -> str:
    return f"{layout.step_dir(step)}/{layout.MANIFEST}"


def _aside(store: Store) -> list[int]:
    """The steps set aside as damaged in ``store`` (one entry per folder)."""
    return sorted(s for e in store.list("") if (s := layout.parse_damaged_dir(e.name)) is not None)


def _intact(store: Store | Path, step: int) -> bool:
    """Whether ``store`` holds step ``step`` whole: its manifest reads and every byte verifies."""
    root = LocalStore(store) if isinstance(store, Path) else store
    try:
        reader.read_manifest(reader.Location(root, layout.step_dir(step)))
    except sg.CheckpointError:
        return False
    return reader.verify(reader.Location(root, layout.step_dir(step))) == []


def _save_steps(remote: Store, cache: Path, steps: tuple[int, ...], keep: sg.Keep) -> str:
    """A first session that saves ``steps`` and closes (every step uploaded)."""
    state, holder = _state()
    with _ckpt(remote, cache, keep=keep) as first:
        for s in steps:
            _set(holder, s)
            first.save(state, s)
        return first.run_id


def _data_file(store: Store, step: int) -> str:
    names = [e.name for e in store.list(layout.step_dir(step)) if e.name != layout.MANIFEST]
    assert names, f"no data file in step {step}"
    return f"{layout.step_dir(step)}/{sorted(names)[0]}"


# ---- kill between the set-aside and the upload; a second machine in between ----------------------
def test_a_kill_after_the_set_aside_before_the_upload_loses_nothing_and_the_next_open_uploads(
    tmp_path: Path,
) -> None:
    # Steps 1-3 uploaded; the remote manifest of 3 rots. B opens (sets the remote copy aside)
    # and is killed before any upload ran. Then a second machine C (fresh cache) opens the
    # remote, restores what it can (2) and closes without saving. A's cache still holds the
    # only intact 3: the next open there resumes it and uploads it in place.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    run_id = _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=5))
    remote.inner.put(_manifest(3), b"{not json")
    state, holder = _state()
    b = _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert _aside(remote.inner) == [3]  # set aside at open
    assert 3 not in _steps(remote.inner) and _intact(cache, 3)
    _abandon(b)  # killed: no step(), no close(), no upload
    assert _steps(remote.inner) == [1, 2] and _intact(cache, 3)

    state_c, holder_c = _state()
    with _ckpt(remote, tmp_path / "cache-c", keep=sg.Keep(last=5)) as c:
        assert c.restore(state_c) == 2  # the remote alone: 3 is not there
    assert _aside(remote.inner) == [3] and _intact(cache, 3)

    # Back on A: the set-aside step is pending work, not stale.
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(cache), run_id)
    assert stale == [] and pending == [3]
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 3 and holder["step"] == 3
        _set(holder, 4)
        again.save(state, 4)
    assert _steps(remote.inner) == [1, 2, 3, 4] and _intact(remote.inner, 3)
    assert _aside(remote.inner) == [3]  # the damaged copy is kept for inspection, once


def test_a_second_machine_saving_after_the_set_aside_wins_and_the_first_resumes_from_it(
    tmp_path: Path,
) -> None:
    # A sets the damaged remote 3 aside at open and is killed before the upload; machine C
    # (fresh cache) resumes from 2 and saves and uploads 3', 4'. The remote went on: A's own
    # copy of 3 is stale there (documented), and A resumes from C's newest — never a fork.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache_a = tmp_path / "cache-a"
    run_id = _save_steps(remote, cache_a, (1, 2, 3), sg.Keep(last=5))
    remote.inner.put(_manifest(3), b"{not json")
    _abandon(_ckpt(remote, cache_a, keep=sg.Keep(last=5)))
    state_c, holder_c = _state()
    with _ckpt(remote, tmp_path / "cache-c", keep=sg.Keep(last=5)) as c:
        assert c.restore(state_c) == 2
        for s in (3, 4):
            _set(holder_c, s)
            holder_c["w"] += 100.0  # C's own work, told apart from A's
            c.save(state_c, s)
    assert _steps(remote.inner) == [1, 2, 3, 4]
    assert merge_refs(remote.inner, LocalStore(cache_a), run_id)[1:] == ([], [], [3])
    state, holder = _state()
    with _ckpt(remote, cache_a, keep=sg.Keep(last=5)) as a:
        assert a.restore(state) == 4 and float(holder["w"][0]) == 104.0
    assert 3 not in _steps(cache_a)  # A's stale 3 went; C's 3 and 4 are intact remotely
    assert all(_intact(remote.inner, s) for s in (1, 2, 3, 4))


# ---- restore(step=N) of the damaged step ---------------------------------------------------------
@pytest.mark.parametrize("movable", [True, False], ids=["set-aside", "cannot-move"])
def test_restore_step_n_of_the_damaged_step_reads_the_cache_copy(
    tmp_path: Path, movable: bool
) -> None:
    inner = MemoryStore("remote")
    remote = _Slow(inner, delay=0.0) if movable else _NoRename(inner, delay=0.0)
    cache = tmp_path / "cache"
    _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=5))
    inner.put(_manifest(3), b"{not json")
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as b:
        assert b.restore(state, step=3) == 3 and holder["step"] == 3
        assert float(holder["w"][0]) == 3.0
        # and an explicit rollback to 2 is still possible, without losing 3
        state2, holder2 = _state()
        assert b.restore(state2, step=2) == 2 and holder2["step"] == 2
    assert _intact(cache, 3) or _intact(inner, 3)
    if movable:
        assert _steps(inner) == [1, 2, 3] and _intact(inner, 3)
    else:
        assert inner.read(_manifest(3)) == b"{not json"  # never uploaded over


# ---- several damaged steps -----------------------------------------------------------------------
def test_several_damaged_remote_steps_the_cache_holding_the_newest_and_pending_work(
    tmp_path: Path,
) -> None:
    # Remote 1-4; the manifests of 3 and 4 rot. The cache holds 4 (the newest uploaded) and 5
    # (saved after it, killed before its upload). 4 and 5 are resumed and uploaded; the
    # damaged 3 is out of the way (restore never reaches it), nothing intact is lost.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    _save_steps(remote, cache, (1, 2, 3, 4), sg.Keep(last=5))
    state, holder = _state()
    b = _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert b.restore(state) == 4
    remote.gate.clear()
    _set(holder, 5)
    b.save(state, 5)
    _abandon(b)
    remote.gate.set()
    assert _steps(remote.inner) == [1, 2, 3, 4] and _steps(cache) == [4, 5]
    remote.inner.put(_manifest(3), b"\x00garbage")
    remote.inner.delete(_manifest(4), None)
    remote.inner.put(_manifest(4), b'{"format": "savegame"')  # truncated
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 5 and holder["step"] == 5
    assert _steps(remote.inner) == [1, 2, 4, 5]
    assert all(_intact(remote.inner, s) for s in (1, 2, 4, 5))
    assert 4 in _aside(remote.inner)


# ---- a fresh cache, the newest remote step damaged -----------------------------------------------
def test_a_fresh_cache_with_a_damaged_newest_remote_step_resumes_from_the_one_before_and_uploads(
    tmp_path: Path,
) -> None:
    # No copy anywhere of the damaged 3: the run resumes from 2; the new 3 and 4 are this
    # machine's work even when it is killed before uploading them (not stale at the next open),
    # and they upload in place of the damaged copy.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    run_id = _save_steps(remote, tmp_path / "cache-a", (1, 2, 3), sg.Keep(last=5))
    remote.inner.put(_manifest(3), b"{not json")
    cache = tmp_path / "cache-b"
    state, holder = _state()
    b = _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert b.restore(state) == 2
    remote.gate.clear()
    for s in (3, 4):
        _set(holder, s)
        b.save(state, s)
    _abandon(b)
    remote.gate.set()
    assert 3 not in _steps(remote.inner) and _steps(cache) == [3, 4]
    _, _, pending, stale = merge_refs(remote.inner, LocalStore(cache), run_id)
    assert stale == [] and pending == [3, 4]
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
        assert again.restore(state) == 4 and holder["step"] == 4
    assert _steps(remote.inner) == [1, 2, 3, 4] and _intact(remote.inner, 3)


# ---- the manifest missing (not: unparseable) ---------------------------------------------------
def test_a_missing_remote_manifest_on_an_object_store_keeps_the_cache_copy(
    tmp_path: Path,
) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=5))
    assert _steps(cache) == [3]  # the newest uploaded only
    remote.inner.delete(_manifest(3), None)  # a lifecycle rule, a hand, a cut deletion
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as b:
        got = b.restore(state)
    assert _intact(cache, 3) or _intact(remote.inner, 3), "the only intact copy of 3 is gone"
    assert got == 3


def test_a_missing_remote_manifest_on_a_local_remote_keeps_the_cache_copy_and_ls_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same on a folder remote (a NAS): the step folder without manifest stays (never
    # garbage there), is set aside at open, and the cache copy is uploaded in its place.
    # `savegame ls` of the remote afterwards shows the three checkpoints and the set-aside one.
    remote_dir = tmp_path / "remote"
    remote = LocalStore(remote_dir)
    cache = tmp_path / "cache"
    _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=5))
    (remote_dir / layout.step_dir(3) / layout.MANIFEST).unlink()
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=5)) as b:
        assert b.restore(state) == 3 and holder["step"] == 3
    assert _steps(remote_dir) == [1, 2, 3] and _intact(remote, 3)
    assert _aside(remote) == [3]
    from savegame.cli.main import main

    capsys.readouterr()
    assert main(["ls", str(remote_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 checkpoints" in out and "1 damaged set aside" in out, out


# ---- damage in a data file (the manifest reads) + retention --------------------------------------
def test_a_remote_copy_damaged_in_a_data_file_is_not_the_reason_the_intact_cache_copy_goes(
    tmp_path: Path,
) -> None:
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=2))
    key = _data_file(remote.inner, 3)
    raw = bytearray(remote.inner.read(key))
    raw[-1] ^= 0xFF
    remote.inner.put(key, bytes(raw))
    assert not _intact(remote.inner, 3) and _intact(cache, 3)
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=2)) as b:
        assert b.restore(state) == 3 and holder["step"] == 3  # the cache copy: intact
        _set(holder, 4)
        b.save(state, 4)
    assert _intact(remote.inner, 4)
    # Keep(last=2): 3 and 4. An intact 3 must still exist somewhere.
    assert _intact(remote.inner, 3) or _intact(cache, 3), (
        f"remote {_steps(remote.inner)} aside {_aside(remote.inner)}, cache {_steps(cache)}"
    )
    # One process: the cache copy was uploaded again in place of the set-aside one.
    assert _steps(remote.inner) == [3, 4] and _intact(remote.inner, 3)


# ---- retention: Keep(last=1), the damaged copy the only remote one --------------------------------
@pytest.mark.parametrize("movable", [True, False], ids=["set-aside", "cannot-move"])
def test_keep_last_1_with_the_only_remote_checkpoint_damaged_never_loses_the_intact_copy(
    tmp_path: Path, movable: bool
) -> None:
    inner = MemoryStore("remote")
    remote = _Slow(inner, delay=0.0) if movable else _NoRename(inner, delay=0.0)
    cache = tmp_path / "cache"
    run_id = _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=1))
    assert _steps(inner) == [3] and _steps(cache) == [3]
    inner.put(_manifest(3), b"{not json")
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=1)) as b:
        assert _intact(cache, 3)
        assert b.restore(state) == 3 and holder["step"] == 3
        b.step(state, 3)  # the first step: what an earlier session left pending uploads
        b.wait()
        assert _intact(cache, 3) or _intact(inner, 3)
        _set(holder, 4)
        b.save(state, 4)
        b.wait()
        assert _intact(cache, 4) or _intact(inner, 4)
    assert _steps(inner) == [4] and _intact(inner, 4)
    if not movable:
        assert inner.read(_manifest(3)) == b"{not json"
    # reopened: the run resumes from 4 and nothing is pending
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=1)) as again:
        assert again.restore(state) == 4
    assert merge_refs(inner, LocalStore(cache), run_id)[2] == []


# ---- a remote step of a newer format version is not damage -----------------------------------------
def test_a_remote_step_of_a_newer_format_version_is_not_taken_for_damage(
    tmp_path: Path,
) -> None:
    # A saves 1, 2 (uploaded) and 3 (killed before its upload). Another writer, with a newer
    # savegame, resumed from 2 and committed its own 3 (a format this library cannot read).
    # A's 3 is not the run's 3: it must not be resumed as if the remote copy were damaged.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    _save_steps(remote, cache, (1, 2), sg.Keep(last=5))
    state, holder = _state()
    a = _ckpt(remote, cache, keep=sg.Keep(last=5))
    assert a.restore(state) == 2
    remote.gate.clear()
    _set(holder, 3)
    a.save(state, 3)
    _abandon(a)
    remote.gate.set()
    assert _steps(remote.inner) == [1, 2] and _steps(cache) == [2, 3]
    # The other writer's step 3: A's files, a manifest of format version 99 (its own).
    remote.inner.makedirs(layout.step_dir(3))
    for e in LocalStore(cache).list(layout.step_dir(3)):
        key = f"{layout.step_dir(3)}/{e.name}"
        data = LocalStore(cache).read(key)
        if e.name == layout.MANIFEST:
            doc = json.loads(data)
            doc["version"] = 99
            data = json.dumps(doc).encode()
        remote.inner.put(key, data)
    with pytest.raises(sg.UnsupportedFormatError):  # a newer format: not damage
        reader.read_manifest(reader.Location(remote.inner, layout.step_dir(3)))
    assert reader.damage(reader.Location(remote.inner, layout.step_dir(3))) == []
    state, holder = _state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _ckpt(remote, cache, keep=sg.Keep(last=5)) as again:
            got = again.restore(state)
    assert _aside(remote.inner) == []  # the other writer's 3 stays where it is
    assert got != 3, "A's own 3 was resumed in place of the remote's (newer-format) 3"


class _Hold(_Slow):
    """A remote whose uploads of the folder ``held`` wait (until the gate is set again)."""

    held: str | None = None

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        if self.held is not None and self.held in f"{name} {final}":
            self.gate.clear()
        return super().begin(name, final)


def test_a_copy_set_aside_for_rotted_data_is_uploaded_again_at_the_next_open(
    tmp_path: Path,
) -> None:
    # As above, but the process dies right after retention set the remote 3 aside (before it
    # could upload the cache copy again) — what a torch.distributed run, which never re-uploads
    # in the same process, also leaves. The next open finds the remote's set-aside copy with the
    # same manifest as the cache's: the same checkpoint, so the cache copy is pending, not stale.
    remote = _Hold(MemoryStore("remote"), delay=0.0)
    cache = tmp_path / "cache"
    run_id = _save_steps(remote, cache, (1, 2, 3), sg.Keep(last=2))
    key = _data_file(remote.inner, 3)
    raw = bytearray(remote.inner.read(key))
    raw[-1] ^= 0xFF
    remote.inner.put(key, bytes(raw))
    state, holder = _state()
    b = _ckpt(remote, cache, keep=sg.Keep(last=2))
    assert b.restore(state) == 3
    remote.held = layout.step_dir(3)  # the re-upload of 3 never gets through
    _set(holder, 4)
    b.save(state, 4)  # uploaded; retention sets the remote 3 aside
    deadline = time.monotonic() + 20
    while _aside(remote.inner) != [3] and time.monotonic() < deadline:
        time.sleep(0.02)
    _abandon(b)
    remote.held = None
    remote.gate.set()
    assert _aside(remote.inner) == [3] and _intact(cache, 3)
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(cache), run_id)
    assert 3 in pending and stale == []
    state, holder = _state()
    with _ckpt(remote, cache, keep=sg.Keep(last=2)) as again:
        assert again.restore(state) == 4
    assert _steps(remote.inner) == [3, 4] and _intact(remote.inner, 3)


def test_a_set_aside_copy_of_another_machines_step_never_brings_the_caches_back(
    tmp_path: Path,
) -> None:
    # The cache's 3 and the remote's (set aside) 3 are different checkpoints: the remote went on
    # from 2 on another machine. The cache's 3 stays stale.
    remote = _Slow(MemoryStore("remote"), delay=0.0)
    run_id = _save_steps(remote, tmp_path / "cache-a", (1, 2), sg.Keep(last=5))
    state, holder = _state()
    a = _ckpt(remote, tmp_path / "cache-a", keep=sg.Keep(last=5))
    assert a.restore(state) == 2
    remote.gate.clear()
    _set(holder, 3)
    a.save(state, 3)
    _abandon(a)  # A's 3: never uploaded
    remote.gate.set()
    state_c, holder_c = _state()
    with _ckpt(remote, tmp_path / "cache-c", keep=sg.Keep(last=5)) as c:
        assert c.restore(state_c) == 2
        for s in (3, 4):
            holder_c["w"] = torch.full((1000,), 100.0 + s)
            holder_c["step"] = s
            c.save(state_c, s)
    key = _data_file(remote.inner, 3)  # C's 3 rots in a data file, and is set aside
    raw = bytearray(remote.inner.read(key))
    raw[-1] ^= 0xFF
    remote.inner.put(key, bytes(raw))
    inner_aside = writer.set_aside_damaged(
        reader.Location(remote.inner, layout.step_dir(3)), 3, "test"
    )
    assert inner_aside is not None and _aside(remote.inner) == [3]
    _, uploaded, pending, stale = merge_refs(remote.inner, LocalStore(tmp_path / "cache-a"), run_id)
    assert 3 in stale and 3 not in pending
