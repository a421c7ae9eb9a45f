"""The store contract (storage/base.py), run against every store: a backend opts in with a
one-line class (fsspec's ``tests/abstract`` style). Crash-safety of the commit starts here."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from savegame import errors
from savegame.storage import Store, faulty
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore

# The real S3 server (moto on loopback) of tests/remote, for TestObjectStoreS3: its fixtures
# imported here (conftest files only reach their own folder). Absent extras: those tests skip.
try:
    from tests.remote.conftest import s3_env, s3_server  # noqa: F401 - fixtures
except (ImportError, pytest.skip.Exception):
    pass


class StoreContract:
    """Every test takes ``store``: an empty store for this test."""

    #: Folders exist only while something is under them (object stores: a prefix is a folder
    #: once an object has it). Such a store cannot hold an empty folder, so a test that needs
    #: a folder to *exist* puts an object in it instead of only calling ``makedirs``; the
    #: assertions stay the same for every store.
    implicit_folders = False
    #: ``Staging.adopt`` refuses a file name already staged (a folder, memory). An object
    #: store's default adopt copies through ``write`` and cannot tell (nothing is visible
    #: before the commit either way).
    adopt_refuses = True

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        raise NotImplementedError

    # ---- put / create / read -------------------------------------------------------------
    def test_put_replaces_atomically_and_reads_back(self, store: Store) -> None:
        store.put("a", b"one")
        store.put("a", b"two!")
        assert store.read("a") == b"two!"
        assert store.size("a") == 4
        assert store.exists("a") and not store.is_dir("a")
        assert [(e.name, e.is_dir) for e in store.list("")] == [("a", False)]

    def test_a_version_token_changes_with_the_blob(self, store: Store) -> None:
        """``version`` is None (read every time) or changes whenever the blob is replaced or
        removed: readers trust an unchanged token instead of reading (cached manifests)."""
        store.put("v", b"one")
        first = store.version("v")
        if first is None:
            return
        assert store.version("v") == first  # unchanged: the same token
        store.put("v", b"two")  # same size, replaced
        second = store.version("v")
        assert second is not None and second != first
        detach = store.detach("v", "v-trash")
        detach()
        assert store.version("v") is None

    def test_ranged_reads(self, store: Store) -> None:
        store.put("r", bytes(range(100)))
        assert store.read("r", 10, 5) == bytes(range(10, 15))
        assert store.read("r", 95) == bytes(range(95, 100))
        with store.open("r") as blob:
            assert blob.size == 100
            buf = bytearray(3)
            blob.readinto(50, memoryview(buf))
            assert bytes(buf) == bytes([50, 51, 52])
            with pytest.raises(EOFError):
                blob.readinto(99, memoryview(bytearray(2)))
            mapped = blob.map()
            if mapped is not None:
                assert bytes(memoryview(mapped)[:4]) == bytes(range(4))
                if hasattr(mapped, "close"):
                    mapped.close()

    def test_create_has_exactly_one_winner(self, store: Store) -> None:
        store.create("lease", b"first")
        with pytest.raises(FileExistsError):
            store.create("lease", b"second")
        assert store.read("lease") == b"first"

    def test_create_races_have_one_winner(self, store: Store) -> None:
        wins: list[int] = []

        def go(i: int) -> None:
            try:
                store.create("race", str(i).encode())
                wins.append(i)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and store.read("race") == str(wins[0]).encode()

    def test_missing_keys_are_file_not_found(self, store: Store) -> None:
        for call in (lambda: store.size("nope"), lambda: store.open("nope"), lambda: store.read("nope"),
                     lambda: store.list("nope"), lambda: store.rename("nope", "x")):  # fmt: skip
            with pytest.raises(FileNotFoundError):
                call()
        assert not store.exists("nope") and not store.is_dir("nope")

    @pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a\\b", "a/..", "x\x00"])
    def test_hostile_keys_are_refused(self, store: Store, key: str) -> None:
        with pytest.raises(ValueError, match="invalid storage key"):
            store.put(key, b"x")

    # ---- folders, rename, detach -----------------------------------------------------------
    def test_folders_list_and_rename_refuses_to_overwrite(self, store: Store) -> None:
        store.makedirs("d/e")
        store.put("d/e/f", b"1")
        store.put("d/g", b"2")
        assert sorted((e.name, e.is_dir) for e in store.list("d")) == [("e", True), ("g", False)]
        store.makedirs("other")
        if self.implicit_folders:  # an empty folder cannot exist: give "other" content
            store.put("other/z", b"3")
        with pytest.raises(FileExistsError):
            store.rename("d", "other")
        store.rename("d", "moved")
        assert not store.exists("d")
        assert store.read("moved/e/f") == b"1"
        assert store.du("moved") == 2
        assert store.du("moved/g") == 1  # a blob counts its own bytes (a retired shared file)

    def test_detach_hides_at_once_and_frees_later(self, store: Store) -> None:
        store.makedirs("step-1")
        store.put("step-1/x", b"abc")
        free = store.detach("step-1", ".tmp-deleted-step-1-0")
        assert not store.exists("step-1")
        assert free() == []
        assert [e.name for e in store.list("")] == []
        store.put("y", b"1")
        assert store.delete("y", ".tmp-deleted-y") == [] and not store.exists("y")

    # ---- the commit ------------------------------------------------------------------------
    def _stage(self, store: Store, name: str = ".tmp-s") -> Any:
        st = store.begin(name)
        (out, size) = st.write("data.bin", lambda f: f.write(b"payload"))
        assert (out, size) == (7, 7)
        return st

    def test_staged_files_are_invisible_until_commit(self, store: Store) -> None:
        st = self._stage(store)
        assert not store.exists("step-1")
        joined = store.staging(st.name)  # another rank joins by name
        joined.write("rank1.bin", lambda f: f.write(b"xy"))
        st.commit("step-1", "manifest.json", b"{}")
        assert store.read("step-1/data.bin") == b"payload"
        assert store.read("step-1/rank1.bin") == b"xy"
        assert store.read("step-1/manifest.json") == b"{}"
        assert not store.exists(st.name)

    def test_commit_onto_an_existing_checkpoint_is_refused(self, store: Store) -> None:
        store.makedirs("step-1")
        store.put("step-1/manifest.json", b"old")
        st = self._stage(store)
        with pytest.raises(FileExistsError):
            st.commit("step-1", "manifest.json", b"new")
        assert store.read("step-1/manifest.json") == b"old"
        st.abort()
        assert not store.exists(st.name)

    def test_abort_removes_everything_and_never_raises(self, store: Store) -> None:
        st = self._stage(store)
        st.abort()
        st.abort()
        assert [e.name for e in store.list("")] == []

    # ---- adopt: a finished local file moved into the staging area --------------------------
    def _part(self, store: Store, st: Any, tmp_path: Path, data: bytes) -> Path:
        """A finished download: inside the staging folder where the store is a folder (what a
        pull does), else a local file elsewhere."""
        folder = store.local_path(st.name) or tmp_path
        path = folder / "data.bin.part"
        path.write_bytes(data)
        return path

    def test_adopt_moves_a_file_in_and_it_commits(self, store: Store, tmp_path: Path) -> None:
        st = store.begin(".tmp-a")
        part = self._part(store, st, tmp_path, b"adopted bytes")
        assert st.adopt("data.bin", part) == len(b"adopted bytes")
        assert not part.exists()  # moved (or copied and removed), never left behind
        assert not store.exists("step-1")  # staged files stay invisible
        st.commit("step-1", "manifest.json", b"{}")
        assert store.read("step-1/data.bin") == b"adopted bytes"
        assert sorted(e.name for e in store.list("step-1")) == ["data.bin", "manifest.json"]

    def test_adopt_refuses_to_overwrite(self, store: Store, tmp_path: Path) -> None:
        if not self.adopt_refuses:
            pytest.skip("an object store's default adopt copies: it cannot tell")
        st = self._stage(store)
        part = self._part(store, st, tmp_path, b"other")
        with pytest.raises(FileExistsError):
            st.adopt("data.bin", part)
        assert part.read_bytes() == b"other"  # kept: nothing was adopted
        st.commit("step-1", "manifest.json", b"{}")
        assert store.read("step-1/data.bin") == b"payload"

    def test_adopt_into_a_joined_staging_area(self, store: Store, tmp_path: Path) -> None:
        """After a crash a new process joins the staging area by name and adopts there."""
        st = store.begin(".tmp-j")
        st.write("other.bin", lambda f: f.write(b"x"))
        joined = store.staging(st.name)
        part = self._part(store, st, tmp_path, b"resumed")
        assert joined.adopt("data.bin", part) == 7
        joined.commit("step-1", "manifest.json", b"{}")
        assert store.read("step-1/data.bin") == b"resumed"

    def test_joining_a_missing_staging_area_fails(self, store: Store) -> None:
        with pytest.raises(FileNotFoundError):
            store.staging(".tmp-nothing")

    # ---- the lock --------------------------------------------------------------------------
    def test_lock_has_one_holder(self, store: Store) -> None:
        a, b = store.lock(".lock"), store.lock(".lock")
        a.acquire()
        try:
            assert a.held
            with pytest.raises(errors.LockedError):
                b.acquire()
        finally:
            a.release()
        b.acquire()
        b.release()
        assert not b.held


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return LocalStore(tmp_path)


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return MemoryStore()


class TestObjectStoreMemory(StoreContract):
    """obstore's in-memory store under the object-store commit (no rename, manifest last)."""

    implicit_folders = True
    adopt_refuses = False

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        pytest.importorskip("obstore")
        from obstore.store import MemoryStore as ObsMemoryStore

        from savegame.storage.objectstore import ObjectStore

        return ObjectStore.from_obstore(ObsMemoryStore(), "memory://conformance", prefix="run")


class TestObjectStoreS3(StoreContract):
    """A real S3-compatible server (moto) on loopback, through an ``s3://`` URL."""

    implicit_folders = True
    adopt_refuses = False

    @pytest.fixture
    def store(self, request: pytest.FixtureRequest) -> Store:
        pytest.importorskip("obstore")
        pytest.importorskip("moto.server")
        from savegame.storage import as_store

        # A bucket of its own (not ``s3_url``'s counter: this module imports the fixtures
        # under a second module name, and moto's buckets are shared by the whole process).
        server = request.getfixturevalue("s3_env")
        bucket = f"sg-conformance-{uuid.uuid4().hex[:16]}"
        server.make_bucket(bucket)
        return as_store(f"s3://{bucket}/runs/exp")


class TestFaultyStoreWithoutFaults(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return faulty.FaultyStore(MemoryStore())


# ---- the fault-injecting store itself ----------------------------------------------------------
@pytest.mark.parametrize("inner", ["local", "memory"])
@pytest.mark.parametrize("point", ["stage.write", "stage.sync", "commit.seal", "commit.publish"])
def test_a_fault_before_publish_leaves_nothing_under_the_final_name(
    tmp_path: Path, inner: str, point: str
) -> None:
    base_store: Store = LocalStore(tmp_path) if inner == "local" else MemoryStore()
    store = faulty.FaultyStore(base_store, {point: 1})
    st = store.begin(".tmp-x")
    with pytest.raises(OSError) as info:
        st.write("f", lambda f: (f.write(b"a" * 10), f.write(b"b" * 10)))
        st.commit("step-1", "manifest.json", b"{}")
    assert info.value.errno == errno.ENOSPC and store.fired == [point]
    assert not base_store.exists("step-1")
    st.abort()
    assert [e.name for e in base_store.list("")] == []


def test_a_crash_leaves_the_staging_area_and_kills_the_store(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path)
    store = faulty.FaultyStore(inner, {"commit.publish": 1}, crash=True)
    st = store.begin(".tmp-x")
    st.write("f", lambda f: f.write(b"abc"))
    with pytest.raises(OSError):
        st.commit("step-1", "manifest.json", b"{}")
    st.abort()  # a dead writer cleans nothing up
    assert store.dead and inner.read(".tmp-x/manifest.json") == b"{}" and not inner.exists("step-1")
    with pytest.raises(OSError, match="simulated crash"):
        store.put("x", b"1")


def test_commit_done_fault_happens_after_the_checkpoint_is_published(tmp_path: Path) -> None:
    inner = MemoryStore()
    store = faulty.FaultyStore(inner, {"commit.done": 1})
    st = store.begin(".tmp-x")
    with pytest.raises(OSError):
        st.commit("step-1", "manifest.json", b"{}")
    assert inner.read("step-1/manifest.json") == b"{}"


def test_unknown_fault_point_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown fault points"):
        faulty.FaultyStore(MemoryStore(), {"fsync": 1})


# ---- LocalStore's adopt: a rename, made durable first ----------------------------------------
def test_local_adopt_renames_without_copying_and_fsyncs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from savegame.storage import local

    store = LocalStore(tmp_path)
    st = store.begin(".tmp-a")
    part = tmp_path / ".tmp-a" / "data.bin.part"
    part.write_bytes(b"z" * 1000)
    inode = part.stat().st_ino
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link
    monkeypatch.setattr(local.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(local.os, "link", lambda a, b: (events.append("link"), real_link(a, b))[1])
    assert st.adopt("data.bin", part) == 1000
    assert events[:2] == ["fsync", "link"] and events.count("fsync") >= 2  # file, then folder
    assert (tmp_path / ".tmp-a" / "data.bin").stat().st_ino == inode  # moved, not copied
    assert not part.exists()


def test_local_adopt_of_a_file_outside_the_staging_folder_copies(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "run")
    store.makedirs("")
    st = store.begin(".tmp-a")
    outside = tmp_path / "elsewhere.part"
    outside.write_bytes(b"abc")
    assert st.adopt("data.bin", outside) == 3
    assert not outside.exists() and store.read(".tmp-a/data.bin") == b"abc"


def test_local_adopt_after_a_crash_between_link_and_unlink(tmp_path: Path) -> None:
    """A kill after the new name and before the old one is gone leaves both: adopting again
    is refused (never a silent replace), and the caller removes the staged copy first."""
    store = LocalStore(tmp_path)
    store.begin(".tmp-a")
    part = tmp_path / ".tmp-a" / "data.bin.part"
    part.write_bytes(b"abc")
    os.link(part, tmp_path / ".tmp-a" / "data.bin")  # the crash point
    again = store.staging(".tmp-a")
    with pytest.raises(FileExistsError):
        again.adopt("data.bin", part)
    store.delete(".tmp-a/data.bin", None)
    assert again.adopt("data.bin", part) == 3
    again.commit("step-1", "manifest.json", b"{}")
    assert store.read("step-1/data.bin") == b"abc"


@pytest.mark.parametrize("point", ["stage.write", "stage.sync"])
def test_a_crash_in_adopt_keeps_the_part_and_a_new_writer_adopts_it(
    tmp_path: Path, point: str
) -> None:
    inner = LocalStore(tmp_path)
    store = faulty.FaultyStore(inner, {point: 1}, crash=True)
    st = store.begin(".tmp-a")
    part = tmp_path / ".tmp-a" / "data.bin.part"
    part.write_bytes(b"abc")
    with pytest.raises(OSError):
        st.adopt("data.bin", part)
    assert store.fired == [point] and part.exists() and not inner.exists(".tmp-a/data.bin")
    resumed = inner.staging(".tmp-a")  # the next process
    assert resumed.adopt("data.bin", part) == 3
    resumed.commit("step-1", "manifest.json", b"{}")
    assert inner.read("step-1/data.bin") == b"abc"
