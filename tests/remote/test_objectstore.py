"""The object-store backend (storage/objectstore.py) against a real S3 server on loopback
(moto) and a real HTTP server: the commit without rename, the lease, pinned ranged reads,
writes that leave nothing when they fail, read-only HTTP, and redacted messages.

The store contract itself (the same tests as every store) is in
tests/conformance/test_store_conformance.py (TestObjectStoreS3, TestObjectStoreMemory).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import savegame as sg
from savegame.checkpointer import retention
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import as_store, base, locate
from savegame.storage.local import LocalStore
from savegame.storage.objectstore import Lease, ObjectStore

from .conftest import S3Server
from .servers import HTTPFileServer, NginxServer


def _s3(url: str) -> ObjectStore:
    store = as_store(url)
    assert isinstance(store, ObjectStore)
    return store


def store_target(url: str) -> Any:
    from savegame.storage import urls

    return urls.connect(url)


def _keys(server: S3Server, url: str) -> list[str]:
    """Every object key under the run, straight from the server (not through savegame)."""
    import boto3

    bucket, _, prefix = url[len("s3://") :].partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/"
    ):
        out += [o["Key"][len(prefix) + 1 :] for o in page.get("Contents", [])]
    return sorted(out)


def _uploads(server: S3Server, url: str) -> list[str]:
    import boto3

    bucket = url[len("s3://") :].split("/", 1)[0]
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


# ---- URLs -> stores ------------------------------------------------------------------------
def test_urls_pick_the_store(s3_url: str, tmp_path: Any) -> None:
    assert isinstance(as_store(s3_url), ObjectStore)
    assert isinstance(as_store(f"file://{tmp_path}"), LocalStore)
    assert as_store(f"file://{tmp_path}").local_path() == tmp_path
    loc = locate(f"{s3_url}/step-000000000001")
    assert isinstance(loc.store, ObjectStore) and loc.key == "step-000000000001"
    assert loc.store.url == s3_url and str(loc) == f"{s3_url}/step-000000000001"
    assert isinstance(as_store("memory://conf/run"), ObjectStore)


# ---- the commit: data straight to the final name, hidden until the manifest ----------------
def test_a_save_in_progress_is_hidden_and_appears_with_its_manifest(s3_url: str) -> None:
    store, other = _s3(s3_url), _s3(s3_url)  # `other`: another process's view
    st = store.begin(".tmp-step-1-ab", "step-1")
    assert st.write("rank-0.bin", lambda f: f.write(b"x" * 100)) == (100, 100)
    assert "step-1/rank-0.bin" in _keys_of(store)  # written in place: no copy at commit
    assert {(e.name, e.is_dir) for e in other.list("")} == {(".tmp-step-1-ab", True)}
    assert not other.exists("step-1") and not other.is_dir("step-1")
    joined = other.staging(".tmp-step-1-ab")  # another rank joins: learns where to write
    joined.write("rank-1.bin", lambda f: f.write(b"y"))
    st.seal(layout.MANIFEST, b"{}")
    assert not other.exists("step-1")  # sealed is not committed
    st.publish("step-1")
    assert {(e.name, e.is_dir) for e in other.list("")} == {("step-1", True)}
    assert other.read("step-1/rank-1.bin") == b"y"


def test_part_plan_stays_under_the_part_limit_and_the_memory_bound() -> None:
    from savegame.storage import objectstore

    mib = 1 << 20
    assert objectstore.part_plan(None) == (objectstore.PART_BYTES, objectstore.PART_CONCURRENCY)
    assert objectstore.part_plan(1 << 30) == (objectstore.PART_BYTES, objectstore.PART_CONCURRENCY)
    for size in (9_000 * objectstore.PART_BYTES + 1, 100 << 30, 1 << 40, 5 << 40):
        part, flight = objectstore.part_plan(size)
        assert part % mib == 0 and part >= objectstore.PART_BYTES
        assert -(-size // part) <= 9_000  # S3 allows 10,000 parts: a margin for the header
        assert part <= 5 << 30  # S3's largest part
        assert flight >= 2
        assert part * flight <= max(2 * part, objectstore.PART_BYTES * objectstore.PART_CONCURRENCY)


def test_a_large_file_goes_up_in_larger_parts_and_reads_back_whole(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the part limit scaled down, a 30 MiB file is over the 5 MiB-part budget: it goes
    up in larger parts (the arithmetic of a 100 GiB file), multipart and whole."""
    from savegame.storage import objectstore

    monkeypatch.setattr(objectstore, "_MAX_PARTS", 1_003)  # 3 parts of 5 MiB before scaling
    seen: list[tuple[int | None, tuple[int, int]]] = []
    real = objectstore.part_plan

    def spy(size: int | None) -> tuple[int, int]:
        seen.append((size, real(size)))
        return seen[-1][1]

    monkeypatch.setattr(objectstore, "part_plan", spy)
    data = bytes(range(256)) * (30 * 4096)  # 30 MiB
    store = _s3(s3_url)
    st = store.begin(".tmp-step-3-ef", "step-3")
    assert st.write("rank-0.bin", lambda f: f.write(data), size=len(data)) == (len(data), len(data))
    assert seen == [(len(data), (10 << 20, 6))]
    assert store.read("step-3/rank-0.bin") == data
    st.abort()


def test_every_uploader_tells_the_store_the_file_size(
    s3_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save to a URL, a push and a tiered upload each pass the file's size (the part sizing
    of files over 44 GiB depends on it)."""
    import torch

    from savegame.storage import objectstore
    from savegame.tools import transfer

    sizes: list[int | None] = []
    real = objectstore.part_plan
    monkeypatch.setattr(objectstore, "part_plan", lambda n: (sizes.append(n), real(n))[1])
    model = torch.nn.Linear(64, 64)
    state = sg.TrainState(model=model, rng=False)
    data = 64 * 64 * 4 + 64 * 4
    with sg.Checkpointer(f"{s3_url}/direct", handle_signals=False) as c:
        c.save(state, 1)
    with sg.Checkpointer(tmp_path / "local", handle_signals=False) as c:
        c.save(state, 1)
    transfer.push(tmp_path / "local", f"{s3_url}/pushed", progress=False)
    with sg.Checkpointer(f"{s3_url}/tiered", cache=tmp_path / "cache", handle_signals=False) as c:
        c.save(state, 1)
    assert len(sizes) == 3 and None not in sizes, sizes
    assert all(data <= n <= data + 4096 for n in sizes if n is not None), sizes


def _keys_of(store: ObjectStore) -> set[str]:
    return {rel for rel, _ in store._walk("")}


def test_a_failed_write_leaves_nothing_not_even_an_upload(s3_env: S3Server, s3_url: str) -> None:
    store = _s3(s3_url)
    st = store.begin(".tmp-step-2-cd", "step-2")

    def produce(f: Any) -> None:
        f.write(b"a" * (11 << 20))  # past one part: a multipart upload is under way
        f.write(b"b" * (11 << 20))
        raise RuntimeError("the producer failed mid-file")

    with pytest.raises(RuntimeError, match="mid-file"):
        st.write("rank-0.bin", produce)
    assert not store.exists("step-2/rank-0.bin")
    assert _uploads(s3_env, s3_url) == []  # the multipart upload was aborted
    st.abort()
    assert _keys(s3_env, s3_url) == []


def test_a_killed_writers_leftovers_are_hidden_then_collected(s3_url: str) -> None:
    dead = _s3(s3_url)
    st = dead.begin(layout.tmp_dir(3, "ef"), layout.step_dir(3))  # as a save names them
    st.write("rank-0.bin", lambda f: f.write(b"partial"))
    # the writer is killed here: no abort, the marker and a data object stay
    store = _s3(s3_url)
    assert reader.list_checkpoints(s3_url) == []
    assert [e.name for e in store.list("") if not e.name.startswith(".tmp-")] == []
    retention.collect_garbage(store)
    assert _keys_of(store) == set()


def test_leftovers_under_the_final_name_are_cleared_before_a_new_save(s3_url: str) -> None:
    store = _s3(s3_url)
    store.put("step-4/rank-9.bin", b"stale")  # a killed writer's object whose marker is gone
    st = store.begin(".tmp-step-4-aa", "step-4")
    st.write("rank-0.bin", lambda f: f.write(b"new"))
    st.commit("step-4", layout.MANIFEST, b"{}")
    assert sorted(e.name for e in store.list("step-4")) == ["manifest.json", "rank-0.bin"]


def test_a_committed_final_name_makes_the_save_stage_aside(s3_url: str) -> None:
    store = _s3(s3_url)
    store.put("step-5/manifest.json", b"old")
    store.put("step-5/rank-0.bin", b"old data")
    st = store.begin(".tmp-step-5-bb", "step-5")
    st.write("rank-0.bin", lambda f: f.write(b"new data"))
    assert store.read("step-5/rank-0.bin") == b"old data"  # the committed one is untouched
    with pytest.raises(FileExistsError):
        st.commit("step-5", layout.MANIFEST, b"new")
    st.abort()
    assert (
        store.read("step-5/rank-0.bin") == b"old data"
        and store.read("step-5/manifest.json") == b"old"
    )
    assert _keys_of(store) == {"step-5/manifest.json", "step-5/rank-0.bin"}


def test_abort_after_publish_never_deletes_the_checkpoint(s3_url: str) -> None:
    store = _s3(s3_url)
    st = store.begin(".tmp-step-6-cc", "step-6")
    st.write("rank-0.bin", lambda f: f.write(b"data"))
    st.commit("step-6", layout.MANIFEST, b"{}")
    st.abort()  # the engine's clean-up after an error that came after the commit
    assert store.read("step-6/rank-0.bin") == b"data"


def test_a_deletion_killed_half_way_is_finished_by_the_next_writer(s3_url: str) -> None:
    store = _s3(s3_url)
    st = store.begin(".tmp-step-7-dd", "step-7")
    st.write("rank-0.bin", lambda f: f.write(b"data"))
    st.commit("step-7", layout.MANIFEST, b"{}")
    store.detach("step-7", ".tmp-deleted-step-7-01")  # killed before the freer runs
    assert not store.exists("step-7")  # the manifest went first: no reader sees it
    assert [e.name for e in store.list("")] == [".tmp-deleted-step-7-01"]
    retention.collect_garbage(_s3(s3_url))
    assert _keys_of(store) == set()


def test_a_pending_deletion_ends_before_the_same_name_is_written(s3_url: str) -> None:
    store = _s3(s3_url)
    for data in (b"first", b"second"):
        st = store.begin(".tmp-step-8-" + data.decode(), "step-8")
        st.write("rank-0.bin", lambda f, d=data: f.write(d))
        st.commit("step-8", layout.MANIFEST, b"{}")
        if data == b"first":
            freer = store.detach("step-8", ".tmp-deleted-step-8-02")
            threading.Timer(0.3, freer).start()  # freed on a background thread, late
    time.sleep(0.5)
    assert store.read("step-8/rank-0.bin") == b"second"


def test_rename_copies_manifest_last_and_refuses_to_overwrite(s3_url: str) -> None:
    store = _s3(s3_url)
    store.put("step-9/rank-0.bin", b"r")
    store.put("step-9/manifest.json", b"{}")
    store.put("other/x", b"1")
    with pytest.raises(FileExistsError):
        store.rename("step-9", "other")
    store.rename("step-9", "damaged-step-9-ab")
    assert not store.exists("step-9")
    assert sorted(e.name for e in store.list("damaged-step-9-ab")) == [
        "manifest.json",
        "rank-0.bin",
    ]


# ---- reads -----------------------------------------------------------------------------------
def test_reads_are_pinned_to_the_opened_version(s3_url: str) -> None:
    store = _s3(s3_url)
    store.put("blob", bytes(range(256)) * 64)
    with store.open("blob") as blob:
        assert blob.etag and blob.size == 256 * 64
        store.put("blob", b"replaced")
        with pytest.raises(base.ChangedError):
            blob.read(0, 10)
        with pytest.raises(base.ChangedError):
            list(blob.stream(0))


def test_parallel_ranged_reads_and_one_streaming_get(s3_url: str) -> None:
    store = _s3(s3_url)
    data = bytes(range(256)) * 4096  # 1 MiB
    store.put("big", data)
    with store.open("big") as blob:
        out = bytearray(len(data))
        view = memoryview(out)
        step = len(data) // 16
        threads = [
            threading.Thread(target=blob.readinto, args=(i, view[i : i + step]))
            for i in range(0, len(data), step)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bytes(out) == data
        pieces = list(blob.stream(1000, chunk=100_000))
        assert all(len(p) <= 100_000 for p in pieces)
        assert b"".join(bytes(p) for p in pieces) == data[1000:]
        assert blob.map() is None
        with pytest.raises(EOFError):
            blob.readinto(len(data) - 1, memoryview(bytearray(2)))


# ---- the lease -------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(s3_url: str) -> None:
    a, b = _s3(s3_url).lock(".lock"), _s3(s3_url).lock(".lock")
    a.acquire()
    try:
        with pytest.raises(sg.LockedError, match=r"pid \d+ on .*expires at") as info:
            b.acquire()
        assert "s3://" in str(info.value)
    finally:
        a.release()
    b.acquire()
    b.release()
    assert not b.held


def test_an_expired_lease_is_taken_over(s3_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = _s3(s3_url)
    dead = {"holder": "pid 1 on gone-host", "expires": time.time() - 1, "ttl": 60}
    store.put(".lock", json.dumps(dead).encode())
    lease = store.lock(".lock")
    with caplog.at_level(logging.WARNING, logger="savegame.storage.objectstore"):
        lease.acquire()
    try:
        assert lease.held and "gone-host" in caplog.text
        assert "gone-host" not in store.read(".lock").decode()
    finally:
        lease.release()
    assert not store.exists(".lock")


def test_the_lease_is_renewed_while_held(s3_url: str) -> None:
    store = ObjectStore(store_target(s3_url), lease_seconds=0.6)
    lease = store.lock(".lock")
    lease.acquire()
    try:
        first = json.loads(store.read(".lock"))["expires"]
        time.sleep(1.0)  # past the first expiry: renewed every ttl/3
        assert lease.held
        assert json.loads(store.read(".lock"))["expires"] > first
        with pytest.raises(sg.LockedError):
            store.lock(".lock").acquire()
    finally:
        lease.release()


def test_a_lost_lease_is_noticed_and_never_released_from_under_the_new_holder(
    s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = ObjectStore(store_target(s3_url), lease_seconds=0.5)
    a = store.lock(".lock")
    assert isinstance(a, Lease)
    a.acquire()
    a._stop.set()  # a's process stalls: no renewal
    time.sleep(0.7)
    assert not a.held  # expired: a knows it may not commit any more
    b = ObjectStore(store_target(s3_url), lease_seconds=30).lock(".lock")
    b.acquire()  # takes over the expired lease
    with caplog.at_level(logging.ERROR, logger="savegame.storage.objectstore"):
        assert a.renew() is False  # a wakes up: the lease is someone else's
    assert "lost the writer lease" in caplog.text and a.lost
    a.release()
    assert b.held and store.exists(".lock")
    b.release()


def test_a_writer_that_lost_its_lease_cannot_change_the_run(s3_url: str) -> None:
    store = ObjectStore(store_target(s3_url), lease_seconds=0.5)
    store.put("run.json", b"{}")
    a = store.lock(".lock")
    a.acquire()
    staging = store.begin(".tmp-step-000000000001-ab", "step-000000000001")
    staging.write("data.bin", lambda f: f.write(b"x"))
    staging.seal("manifest.json", b"{}")
    a._stop.set()  # the process stalls past its lease
    time.sleep(0.7)
    b = ObjectStore(store_target(s3_url), lease_seconds=30).lock(".lock")
    b.acquire()  # another writer owns the run now
    try:
        for change in (
            lambda: staging.publish("step-000000000001"),
            lambda: store.put("LATEST", b"step-000000000001\n"),
            lambda: store.detach("run.json", ".tmp-deleted-run-1"),
        ):
            with pytest.raises(sg.LockedError, match="lost the run's writer lease"):
                change()
        assert not store.exists("step-000000000001")
        a.release()  # closing the old writer lets the store object be used again
        staging.abort()
    finally:
        b.release()


def test_the_lease_time_comes_from_the_environment(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", "7.5")
    assert _s3(s3_url).lock(".lock").ttl == 7.5
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", "soon")
    with pytest.raises(sg.StorageError, match="SAVEGAME_LEASE_SECONDS"):
        as_store(s3_url)


# ---- errors and redaction ----------------------------------------------------------------------
def test_messages_never_show_credentials(s3_env: S3Server, s3_url: str) -> None:
    url = "s3://some-key:very-secret@no-such-bucket-here/runs/exp"
    store = as_store(url)
    assert "very-secret" not in store.url and "***@" in store.url
    for call in (lambda: store.put("x", b"1"), lambda: store.list(""), lambda: store.open("x")):
        with pytest.raises(OSError) as info:
            call()
        text = f"{info.value} {info.value!r}"
        assert "very-secret" not in text and "no-such-bucket-here" in text


# ---- HTTP(S): read-only, listed from the server's index ------------------------------------------
@pytest.fixture
def www(http_server: HTTPFileServer) -> Iterator[HTTPFileServer]:
    http_server.put("run/step-000000000001/manifest.json", b"{}")
    http_server.put("run/step-000000000001/rank-00000.safetensors", b"0123456789")
    http_server.put("run/run.json", b"{}")
    yield http_server


@pytest.mark.parametrize("listing", ["json", "html"])
def test_an_http_run_is_read_only_and_listed(www: HTTPFileServer, listing: str) -> None:
    www.listing = listing
    store = as_store(www.url_for("run"))
    assert isinstance(store, ObjectStore) and store.read_only
    assert sorted((e.name, e.is_dir) for e in store.list("")) == [
        ("run.json", False), ("step-000000000001", True)
    ]  # fmt: skip
    assert store.read("step-000000000001/rank-00000.safetensors", 2, 3) == b"234"
    for write in (lambda: store.put("x", b"1"), lambda: store.begin(".tmp-x", "x"),
                  lambda: store.lock(".lock").acquire()):  # fmt: skip
        with pytest.raises(sg.StorageError, match="read-only: http"):
            write()


def test_an_http_server_that_ignores_range_is_told_apart(www: HTTPFileServer) -> None:
    www.ignore_range = True
    store = as_store(www.url_for("run"))
    with store.open("step-000000000001/rank-00000.safetensors") as blob:
        with pytest.raises(base.RangeNotSupportedError):
            blob.read(2, 3)
        with pytest.raises(base.RangeNotSupportedError):
            list(blob.stream(2))
        assert b"".join(bytes(p) for p in blob.stream(0)) == b"0123456789"  # from 0: fine


def test_a_run_served_by_nginx_lists_verifies_and_restores(nginx_server: NginxServer) -> None:
    import torch

    holder: dict[str, Any] = {"w": torch.arange(10_000, dtype=torch.float32), "step": 0}
    state = sg.TrainState(rng=False, extras=holder)
    with sg.Checkpointer(
        nginx_server.root / "run", save=sg.Every(steps=1), handle_signals=False
    ) as ckpt:
        for step in (1, 2):
            holder["w"] = holder["w"] + 1
            holder["step"] = step
            ckpt.step(state, step)
    url = nginx_server.url_for("run")
    refs = reader.list_checkpoints(url)
    assert [(r.step, r.valid) for r in refs] == [(1, True), (2, True)]
    assert all(reader.verify(r.location) == [] for r in refs)
    holder2: dict[str, Any] = {"w": torch.zeros(10_000), "step": -1}
    with sg.Checkpointer(url, handle_signals=False) as ckpt:
        assert ckpt.restore(sg.TrainState(rng=False, extras=holder2)) == 2
    assert holder2["step"] == 2
    assert torch.equal(holder2["w"], torch.arange(10_000, dtype=torch.float32) + 2)
