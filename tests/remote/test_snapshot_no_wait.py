"""A transfer's snapshot of its source does not wait for the second listing of the run (the
markers of saves in progress) when it already read the manifest of every folder listed — a
folder with a manifest is committed, never hidden (issue 11, pull start-up: one round trip
less). Where the answer is needed (a folder without a manifest, or whose manifest was not
fetched), it still waits, and a folder a marker hides stays hidden.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest

pytest.importorskip("obstore")

from savegame.format import layout  # noqa: E402
from savegame.storage import base, objectstore  # noqa: E402

STEP1, STEP2 = layout.step_dir(1), layout.step_dir(2)
DATA = "rank-00000.safetensors"


def _store() -> objectstore.ObjectStore:
    from obstore.store import MemoryStore

    return objectstore.ObjectStore.from_obstore(MemoryStore(), "s3://bucket/run")


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def _in_thread(fn: Any, timeout: float = 5.0) -> Any:
    """``fn()`` run in a thread; fails the test if it has not returned within ``timeout``."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked on a fetch still in flight"
    return out[0]


def _run_with_folders(store: objectstore.ObjectStore) -> None:
    store.put(base.join(STEP1, DATA), b"1")
    store.put(base.join(STEP1, layout.MANIFEST), b"{}")
    store.put(base.join(STEP2, DATA), b"2")  # a save in progress: no manifest yet


def test_a_sources_listing_does_not_wait_for_the_markers_when_every_manifest_is_known() -> None:
    store = _store()
    store.put(base.join(STEP1, DATA), b"1")
    store.put(base.join(STEP1, layout.MANIFEST), b"{}")
    snap = objectstore._Snapshot(store, 10.0, held=False)  # a transfer's source
    store._snap = snap
    snap.listings[""] = _done(store._ls(""))
    mkey = base.join(STEP1, layout.MANIFEST)
    snap.small[mkey] = _done(store._get_small(mkey))
    markers: Future[Any] = Future()  # the markers' listing, still in flight
    snap.hidden[""] = markers
    try:
        entries = _in_thread(lambda: store.list(""))
    finally:
        if not markers.done():  # let a blocked thread go (the test has failed then)
            markers.set_result(set())
    assert {e.name for e in entries if e.is_dir} == {STEP1}


def test_a_folder_without_a_manifest_still_waits_for_the_markers() -> None:
    """A folder whose manifest is absent may be a save in progress: the markers' listing
    decides, as before (here it says the folder is hidden)."""
    store = _store()
    _run_with_folders(store)
    snap = objectstore._Snapshot(store, 10.0, held=False)
    store._snap = snap
    snap.listings[""] = _done(store._ls(""))
    for step in (STEP1, STEP2):
        mkey = base.join(step, layout.MANIFEST)
        snap.small[mkey] = _done(store._get_small(mkey))
    markers: Future[Any] = Future()
    snap.hidden[""] = markers
    threading.Timer(0.2, lambda: markers.set_result({STEP2})).start()
    entries = store.list("")
    assert {e.name for e in entries if e.is_dir} == {STEP1}


def test_a_folder_whose_manifest_was_not_fetched_waits_for_the_markers() -> None:
    store = _store()
    _run_with_folders(store)
    snap = objectstore._Snapshot(store, 10.0, held=False)
    store._snap = snap
    snap.listings[""] = _done(store._ls(""))
    mkey = base.join(STEP1, layout.MANIFEST)
    snap.small[mkey] = _done(store._get_small(mkey))  # STEP2's was never fetched
    markers: Future[Any] = Future()
    snap.hidden[""] = markers
    threading.Timer(0.2, lambda: markers.set_result({STEP2})).start()
    assert {e.name for e in store.list("") if e.is_dir} == {STEP1}
