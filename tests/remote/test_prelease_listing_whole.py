"""The lease holder lists its run once, whole (every object under it, one request for a run of
fewer than 1000 objects), and tells from that one listing what the run listing and each
checkpoint folder's listing told before: the same folders and objects, a save in progress
still hidden, each data file's size and ETag. A bigger run falls back to a listing of the run
and of each newest checkpoint folder (issue 11, start-up round trips; docs/remote.md).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("obstore")

from savegame.format import layout  # noqa: E402
from savegame.storage import base, objectstore  # noqa: E402

DATA = "rank-00000.safetensors"


def _store() -> objectstore.ObjectStore:
    from obstore.store import MemoryStore

    return objectstore.ObjectStore.from_obstore(MemoryStore(), "s3://bucket/run")


def _run(store: objectstore.ObjectStore) -> None:
    """Two checkpoints, a save in progress (marker + data, no manifest), run.json."""
    store.put(layout.RUN_FILE, b'{"run_id": "x"}')
    for step in (1, 2):
        d = layout.step_dir(step)
        store.put(base.join(d, DATA), bytes([step]) * 10)
        store.put(base.join(d, layout.MANIFEST), b"{}")
    marker = f"{layout.TMP_PREFIX}{layout.step_dir(3)}-abc"
    store.create(marker, b'{"final": "%s", "dest": "%s"}' % ((layout.step_dir(3).encode(),) * 2))
    store.put(base.join(layout.step_dir(3), DATA), b"partial")


def _view(store: objectstore.ObjectStore) -> dict[str, Any]:
    """What the start-up reads: the run's entries, and each checkpoint's data file meta."""
    entries = sorted((e.name, e.is_dir) for e in store.list(""))
    snap = store._snapshot()
    files = {}
    for step in (1, 2):
        key = base.join(layout.step_dir(step), DATA)
        blob = store.open(key)
        files[key] = (blob.size, blob.etag)
    return {"entries": entries, "files": files, "snap": snap is not None}


@pytest.mark.parametrize("deep_objects", [1000, 3])
def test_the_holders_listing_tells_what_the_folders_listings_told(
    deep_objects: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store()
    _run(store)
    expected = {
        "entries": sorted(
            [
                (layout.step_dir(1), True),
                (layout.step_dir(2), True),
                (f"{layout.TMP_PREFIX}{layout.step_dir(3)}-abc", True),
                (layout.RUN_FILE, False),
            ]
        ),  # fmt: skip
        "files": {
            base.join(layout.step_dir(s), DATA): (
                10,
                store._head(base.join(layout.step_dir(s), DATA))["e_tag"],  # type: ignore[index]
            )
            for s in (1, 2)
        },
        "snap": True,
    }
    monkeypatch.setattr(objectstore, "_DEEP_OBJECTS", deep_objects)
    calls: list[str] = []
    real_ls, real_walk = store._ls, store._walk
    monkeypatch.setattr(store, "_ls", lambda p: calls.append(f"ls {p!r}") or real_ls(p))
    monkeypatch.setattr(store, "_walk", lambda k: calls.append(f"walk {k}") or real_walk(k))
    store.begin_snapshot(held=True)
    assert _view(store) == expected  # step 3 (a save in progress) stays hidden
    if deep_objects > 10:
        assert calls == []  # one listing of the whole run: no folder listed on its own
    else:  # a big run: the run, then its newest checkpoint folders
        assert calls[0] == "ls ''" and sorted(calls[1:]) == sorted(
            f"walk {layout.step_dir(s)}" for s in (1, 2, 3)
        )
    store.end_snapshot()
    assert _view(store) == {**expected, "snap": False}  # what the store says without one


def test_reads_ahead_of_a_lease_not_taken_are_dropped() -> None:
    """Another writer holds the run: LockedError names it, and nothing read before the lease
    is served afterwards (the next reads ask the store)."""
    import json
    import time

    from savegame import errors
    from savegame.checkpointer import runfile
    from savegame.policy import Keep

    store = _store()
    _run(store)
    holder = {"holder": "pid 1 on elsewhere", "expires": time.time() + 60, "ttl": 60.0}
    store.put(layout.LOCK, json.dumps(holder).encode())
    with pytest.raises(errors.LockedError, match="pid 1 on elsewhere"):
        runfile.open_run(store, Keep(last=3), store.lock(layout.LOCK))
    assert store._snap is None


def test_a_holders_snapshot_ended_while_it_confirms_leaves_nothing_waiting() -> None:
    """The holder's snapshot is ended (a write, end_snapshot) while it still checks what was
    read before the lease: every read after asks the store, and none waits on a check."""
    store = _store()
    _run(store)
    store.before_lease()
    assert store.is_object(layout.MANIFEST) is False  # answered by the listing
    store.begin_snapshot(held=True)
    store.end_snapshot()
    names = sorted(e.name for e in store.list(""))
    assert layout.step_dir(1) in names and layout.step_dir(3) not in names
    assert store.read(base.join(layout.step_dir(2), layout.MANIFEST)) == b"{}"
    assert store.read(layout.RUN_FILE) == b'{"run_id": "x"}'


def test_a_holder_uses_what_was_read_before_its_lease_once_confirmed() -> None:
    """``run.json`` and a manifest read before the lease are served by the holder's snapshot
    (no second GET) when its listing shows the same versions; one changed in between is read
    again."""
    store = _store()
    _run(store)
    store.before_lease()
    assert store.is_object(layout.MANIFEST) is False
    before = store._snap
    assert before is not None
    for key in (layout.RUN_FILE, base.join(layout.step_dir(2), layout.MANIFEST)):
        before.small[key].result(timeout=5)
    # the previous holder rewrites step 2's manifest before it lets go (a new version),
    # straight into the in-memory store (no snapshot of ours in between)
    import obstore

    obstore.put(store._obs, base.join(layout.step_dir(2), layout.MANIFEST), b'{"new": 1}')
    gets: list[str] = []
    real = store._get_small
    store._get_small = lambda k: gets.append(k) or real(k)  # type: ignore[method-assign]
    store.begin_snapshot(held=True)
    assert store.read(layout.RUN_FILE) == b'{"run_id": "x"}'
    assert store.read(base.join(layout.step_dir(1), layout.MANIFEST)) == b"{}"
    assert store.read(base.join(layout.step_dir(2), layout.MANIFEST)) == b'{"new": 1}'
    assert gets == [base.join(layout.step_dir(2), layout.MANIFEST)]  # only the changed one
