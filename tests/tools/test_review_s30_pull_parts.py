"""S30 review: the resumable pull into a LOCAL folder (``<file>.part`` + ``<file>.part.json``,
parallel ranges over ``SPLIT``, ``Staging.adopt``), tested under two pulls at once, kill -9 at
chosen and random points, a source that changed between runs, hostile sidecars, a full disk and
edge sizes (0, SPLIT, SPLIT + 1).

The source is a remote-like store (no local path, ETags that change when a file is "re-saved",
optionally other bytes than the manifest's, a kill after N bytes) over an in-memory store, or
over the run folder itself for the tests that need a second process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from savegame import api, errors
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import Store, base
from savegame.storage import local as local_store
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore
from savegame.tools import transfer
from savegame.tools.transfer import download, endpoints

HERE = Path(__file__).resolve()
SRC = HERE.parents[2] / "src"
FILE = "rank-00000.safetensors"


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "BACKOFF", 0.0)
    monkeypatch.setattr(transfer, "BLOCK", 16 << 10)  # several blocks per file


# ---- a run, and a remote-like source ------------------------------------------------------------
def make_run(root: Path, steps: tuple[int, ...] = (1, 2, 3), n: int = 30_000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        tree = {
            "w": torch.arange(n, dtype=torch.float32) * step,
            "b": torch.tensor([step, 2 * step, 3 * step]),
            "step": step,
        }
        api.save(root / layout.step_dir(step), tree, step=step)
    (root / layout.RUN_FILE).write_text(json.dumps({"run_id": "run-" + root.name, "created": 1.0}))
    (root / layout.LATEST).write_text(layout.step_dir(max(steps)) + "\n")
    return root


def key_of(step: int) -> str:
    return f"{layout.step_dir(step)}/{FILE}"


class Killed(BaseException):
    """What a kill -9 does to the pull: nothing after it runs."""


class Remote(Store):
    """A remote-like source: no local path; data files have an ETag ``<key>-v<version>`` that
    a test bumps to "re-save" a file; ``override`` serves other bytes under a key (a damaged
    or older version); ``kill_after`` raises Killed once that many data bytes were served;
    ``hold`` (a path) makes every data GET wait while that file exists; ``delay`` sleeps per
    block."""

    def __init__(self, inner: Store, delay: float = 0.0, hold: str | None = None) -> None:
        self.inner = inner
        self.url = "https://user:s3cret@example.test/runs/exp"
        self.delay = delay
        self.hold = hold
        self.versions: collections.Counter[str] = collections.Counter()
        self.override: dict[str, bytes] = {}
        self.served: collections.Counter[str] = collections.Counter()
        self.kill_after: int | None = None
        self.total = 0
        self.lock = threading.Lock()

    def etag(self, key: str) -> str:
        return f'"{key}-v{self.versions[key]}"'

    def describe(self, key: str = "") -> str:
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def list(self, prefix: str = "") -> list[base.Entry]:
        return self.inner.list(prefix)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def is_dir(self, key: str) -> bool:
        return self.inner.is_dir(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def open(self, key: str) -> base.Blob:
        blob = self.inner.open(key)
        if key.endswith(".safetensors"):
            return _RemoteBlob(self, key, blob)
        return blob

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def create(self, key: str, data: bytes) -> None:
        self.inner.create(key, data)

    def makedirs(self, key: str = "") -> None:
        self.inner.makedirs(key)

    def detach(self, key: str, trash: str | None) -> Callable[[], list[str]]:
        return self.inner.detach(key, trash)

    def rename(self, key: str, new_key: str) -> None:
        self.inner.rename(key, new_key)

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        return self.inner.begin(name, final)

    def staging(self, name: str) -> base.Staging:
        return self.inner.staging(name)

    def lock(self, name: str) -> base.Lock:
        return self.inner.lock(name)


class _RemoteBlob(base.Blob):
    def __init__(self, src: Remote, key: str, inner: base.Blob) -> None:
        self.src, self.key, self.inner = src, key, inner
        self.size = inner.size
        self.etag = src.etag(key)

    def _bytes(self, offset: int, n: int) -> bytes:
        data = self.src.override.get(self.key)
        if data is not None:
            return data[offset : offset + n]
        return self.inner.read(offset, n)

    def readinto(self, offset: int, dest: memoryview) -> None:
        for view in self.stream(offset, len(dest), offset + len(dest)):
            n = len(view)
            dest[:n] = view
            dest = dest[n:]
            offset += n

    def stream(
        self, offset: int = 0, chunk: int = 8 << 20, end: int | None = None
    ) -> Iterator[memoryview]:
        src = self.src
        stop = self.size if end is None else min(end, self.size)
        pos = offset
        while pos < stop:
            if self.etag != src.etag(self.key):
                raise base.ChangedError(f"{self.key} changed")
            while src.hold is not None and os.path.exists(src.hold):
                time.sleep(0.01)
            if src.delay:
                time.sleep(src.delay)
            n = min(chunk, stop - pos)
            data = self._bytes(pos, n)
            with src.lock:
                if src.kill_after is not None and src.total + n > src.kill_after:
                    keep = src.kill_after - src.total
                    src.kill_after = None
                    src.total += keep
                    src.served[self.key] += keep
                    kill = True
                else:
                    keep, kill = n, False
                    src.total += n
                    src.served[self.key] += n
            if keep:
                yield memoryview(data[:keep])
            if kill:
                raise Killed()
            pos += n

    def close(self) -> None:
        self.inner.close()


def mem_remote(run: Path) -> Remote:
    mem = MemoryStore("src")
    transfer.push(run, mem)
    return Remote(mem)


def snapshot(store: Store) -> dict[str, bytes]:
    out = {}
    for ref in reader.list_checkpoints(store):
        assert ref.valid, ref.error
        key = ref.location.key
        for e in store.list(key):
            out[f"{key}/{e.name}"] = store.read(f"{key}/{e.name}")
    for name in (layout.RUN_FILE, layout.LATEST):
        if store.exists(name):
            out[name] = store.read(name)
    return out


def assert_same_and_valid(a: Path, b: Path) -> None:
    assert snapshot(LocalStore(a)) == snapshot(LocalStore(b))
    for ref in reader.list_checkpoints(LocalStore(b)):
        assert reader.verify(ref.location) == [], ref.step


def every_listed_verifies(dst: Path) -> list[int]:
    """Whatever a listing of ``dst`` shows as a checkpoint is complete and verifies."""
    if not dst.exists():
        return []
    try:
        refs = reader.list_checkpoints(LocalStore(dst))
    except errors.CheckpointNotFoundError:
        return []
    steps = []
    for ref in refs:
        if ref.error is not None:
            assert isinstance(ref.error, errors.IncompleteCheckpointError), ref.error
            continue
        assert reader.verify(ref.location) == [], ref.step
        steps.append(ref.step)
    return steps


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def size(run: Path) -> int:
    return (run / key_of(3)).stat().st_size  # every data file has this size


MODES = ["stream", "ranges"]


def set_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "ranges":
        monkeypatch.setattr(transfer, "SPLIT", 40_000)  # a 120 KB file is 4 ranges
    else:
        monkeypatch.setattr(transfer, "SPLIT", 64 << 20)


def killed_first_pull(remote: Remote, dst: Path, after: int = 60_000) -> tuple[Path, Path]:
    """Pull until ``after`` bytes, then 'kill -9': the newest step's file is half there.
    Returns its .part and sidecar."""
    remote.kill_after = after
    with pytest.raises(Killed):
        transfer.pull(remote, dst)
    (part,) = dst.glob(f".tmp-{layout.step_dir(3)}-*/{FILE}.part")
    side = part.with_name(FILE + download.SIDECAR)
    assert side.is_file() and part.is_file()
    return part, side


# ---- a second process (the source is the run folder behind the same remote-like store) ----------
_CHILD = """
import sys, importlib.util
sys.path.insert(0, {src!r})
spec = importlib.util.spec_from_file_location("s30_child", {mod!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.child_main(sys.argv[1:])
"""


def child_main(argv: list[str]) -> None:
    """A pull in a child process: ``SRC_RUN DST SPLIT DELAY [HOLD]``; waits for a line on stdin
    when asked to (``WAIT``), prints ``OK`` or ``ERR <type>: <message>``."""
    src, dst, split, delay = argv[0], argv[1], int(argv[2]), float(argv[3])
    hold = argv[4] if len(argv) > 4 and argv[4] != "-" else None
    wait = len(argv) > 5 and argv[5] == "WAIT"
    transfer.SPLIT = split
    transfer.BLOCK = 16 << 10
    transfer.BACKOFF = 0.0
    remote = Remote(LocalStore(src), delay=delay, hold=hold)
    print("ready", flush=True)
    if wait:
        sys.stdin.readline()
    try:
        rep = transfer.pull(remote, dst, progress=False)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        print(f"ERR {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    print(f"OK {rep.verified}", flush=True)


def spawn(
    run: Path,
    dst: Path,
    split: int,
    delay: float = 0.0,
    hold: Path | None = None,
    wait: bool = False,
) -> subprocess.Popen[str]:
    code = _CHILD.format(src=str(SRC), mod=str(HERE))
    args = [run, dst, str(split), str(delay), str(hold) if hold else "-"] + (
        ["WAIT"] if wait else []
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == "ready", (line, child.stderr.read() if child.stderr else "")
    return child


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


# =================================================================================================
# 1. two pulls of the same source into the same folder at once
# =================================================================================================
def test_two_pulls_at_once_the_second_is_refused_typed_and_the_first_is_untouched(
    run: Path, tmp_path: Path
) -> None:
    """Process A is held in the middle of a split file (its .part and sidecar exist, it holds
    the folder's lock); a second pull (another process: this one) gets LockedError before it
    writes anything, A's .part and sidecar are unchanged, and once A goes on the folder is an
    equal, verified run."""
    dst = tmp_path / "dst"
    hold = tmp_path / "hold"
    hold.write_text("")
    a = spawn(run, dst, split=40_000, hold=hold)
    try:
        # A creates the staging folder, the sidecar and the .part, then waits in its first GET
        wait_for(lambda: bool(list(dst.glob(".tmp-*/*.part"))))
        time.sleep(0.2)
        (part,) = dst.glob(".tmp-*/*.part")
        side = part.with_name(FILE + download.SIDECAR)
        before = (part.read_bytes(), side.read_bytes(), part.stat().st_mtime_ns)
        with pytest.raises(errors.LockedError) as info:
            transfer.pull(Remote(LocalStore(run)), dst)
        assert str(dst) in str(info.value)
        assert (part.read_bytes(), side.read_bytes(), part.stat().st_mtime_ns) == before
        # and a third, also another process, while A still holds it
        c = spawn(run, dst, split=40_000)
        out_c, err_c = c.communicate(timeout=60)
        assert c.returncode == 3 and out_c.startswith("ERR LockedError"), (out_c, err_c)
        hold.unlink()
        out_a, err_a = a.communicate(timeout=60)
    finally:
        with contextlib.suppress(FileNotFoundError):
            hold.unlink()
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 0 and out_a.strip() == "OK True", (out_a, err_a)
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))
    rep = transfer.pull(Remote(LocalStore(run)), dst)  # the refused one, run again: skips all
    assert rep.skipped == (3, 2, 1) and rep.copied == ()


@pytest.mark.slow  # CI: the refused second pull above
def test_two_pulls_started_together_end_with_one_valid_run(run: Path, tmp_path: Path) -> None:
    """Two processes released at the same instant: exactly one of them refused with
    LockedError (or both succeed one after the other), never a damaged destination."""
    dst = tmp_path / "dst"
    kids = [spawn(run, dst, split=40_000, delay=0.002, wait=True) for _ in range(2)]
    for k in kids:
        assert k.stdin is not None
        k.stdin.write("go\n")
        k.stdin.flush()
    outs = [k.communicate(timeout=60) for k in kids]
    codes = [k.returncode for k in kids]
    for (out, err), code in zip(outs, codes, strict=True):
        assert (
            code == 0
            and out.strip() == "OK True"
            or (code == 3 and out.startswith("ERR LockedError"))
        ), (out, err)
    assert 0 in codes
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))


# =================================================================================================
# 2. kill -9 at any point, then run again
# =================================================================================================
@pytest.mark.slow  # CI runs the same trials in tests/remote/test_push_pull.py
def test_kill9_at_random_points_of_a_split_pull_resumes_equal(run: Path, tmp_path: Path) -> None:
    """A real SIGKILL at random instants of a pull whose files come as parallel ranges into one
    .part (a slow source: every block takes a few ms), again and again into the same folder:
    every checkpoint listed after each kill verifies; a last pull gives a run equal to the
    source."""
    rng = random.Random(30)
    folders = [tmp_path / "dst-0"]
    mid = 0
    for _ in range(6):
        dst = folders[-1]
        child = spawn(run, dst, split=40_000, delay=0.03, wait=True)
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        t0 = time.monotonic()  # from its first .part on, its data moves in about 0.3 s
        while not list(dst.glob(".tmp-*/*.part")) and child.poll() is None:
            assert time.monotonic() - t0 < 30
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        steps = every_listed_verifies(dst)
        mid += bool(list(dst.glob(".tmp-*/*.part")))
        if len(steps) == 3 and not list(dst.glob(".tmp-*")):  # it finished: a new folder
            folders.append(tmp_path / f"dst-{len(folders)}")
    assert mid >= 2  # some kills landed while a .part was being filled
    for dst in folders:
        rep = transfer.pull(Remote(LocalStore(run)), dst)
        assert rep.verified
        assert_same_and_valid(run, dst)
        assert not list(dst.glob(".tmp-*"))


@pytest.mark.parametrize("mode", MODES)
def test_kill_between_link_and_unlink_of_adopt_resumes_without_fetching(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, size: int
) -> None:
    """Killed inside Staging.adopt after link(2), before the .part is unlinked: the file is
    there under both names; the next run fetches none of its bytes and commits it."""
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    real = local_store._LocalStaging.adopt

    def adopt(self: Any, fname: str, path: Any) -> int:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.link(path, self.path / fname)
        raise Killed()

    monkeypatch.setattr(local_store._LocalStaging, "adopt", adopt)
    with pytest.raises(Killed):
        transfer.pull(remote, dst)
    monkeypatch.setattr(local_store._LocalStaging, "adopt", real)
    (staged,) = dst.glob(f".tmp-*/{FILE}")
    assert staged.with_name(FILE + ".part").samefile(staged)
    before = remote.served[key_of(3)]
    rep = transfer.pull(remote, dst)
    assert rep.verified and sorted(rep.copied) == [1, 2, 3]
    assert remote.served[key_of(3)] == before == size  # not one byte of it again
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))


@pytest.mark.parametrize("mode", MODES)
def test_kill_after_adopt_before_the_sidecar_is_removed_fetches_nothing_again(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, size: int
) -> None:
    """adopt returned (the file is fsynced, linked, the folder fsynced: durable and verified),
    then the pull is killed before ``ends.drop(<file>.part.json)``. The next run should keep
    the staged file (it verifies) and fetch none of its bytes."""
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    real_drop = endpoints.Endpoints.drop
    fired = []

    def drop(self: Any, key: str) -> None:
        if key.endswith(download.SIDECAR) and not fired:
            fired.append(key)
            raise Killed()
        real_drop(self, key)

    monkeypatch.setattr(endpoints.Endpoints, "drop", drop)
    with pytest.raises(Killed):
        transfer.pull(remote, dst)
    monkeypatch.setattr(endpoints.Endpoints, "drop", real_drop)
    (staged,) = dst.glob(f".tmp-*/{FILE}")
    assert staged.stat().st_size == size
    assert staged.with_name(FILE + download.SIDECAR).exists()
    assert not staged.with_name(FILE + ".part").exists()
    before = remote.served[key_of(3)]
    rep = transfer.pull(remote, dst)
    assert rep.verified and sorted(rep.copied) == [1, 2, 3]
    assert_same_and_valid(run, dst)
    assert remote.served[key_of(3)] == before, "the staged, durable file was downloaded again"


def _tear_sidecar_on(
    monkeypatch: pytest.MonkeyPatch, nth: int, *, in_place: bool = True
) -> list[str]:
    """Make the ``nth`` rewrite of a ranges sidecar that counts bytes die half way: the
    process is 'killed' after writing a prefix of the JSON; nothing it does after that lands.
    ``in_place``: the prefix lands in the sidecar itself (what a power cut can leave of an
    unsynced sidecar); otherwise in the temporary file ``_write_json`` renames over it (what a
    kill mid-write leaves)."""
    real = download._write_json
    state = {"n": 0, "dead": False}
    torn: list[str] = []

    def write(path: Path, record: dict[str, object]) -> None:
        if state["dead"]:
            raise Killed()
        done = record.get("done")
        if isinstance(done, list) and sum(done) > 0:
            state["n"] += 1
            if state["n"] == nth:
                state["dead"] = True
                text = json.dumps(record)
                target = path if in_place else path.with_name(path.name + ".tmp")
                target.write_text(text[: len(text) // 2])
                torn.append(str(target))
                raise Killed()
        real(path, record)

    monkeypatch.setattr(download, "_write_json", write)
    return torn


def test_kill_while_the_sidecar_is_rewritten_never_trusts_it(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Killed half way through a sidecar rewrite (it is not written to a temp name and renamed):
    the torn JSON is never trusted, and the next run gives an equal, verified run."""
    set_mode(monkeypatch, "ranges")
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    real = download._write_json
    torn = _tear_sidecar_on(monkeypatch, 4)
    with pytest.raises(Killed):
        transfer.pull(remote, dst)
    monkeypatch.setattr(download, "_write_json", real)
    assert torn
    with pytest.raises(ValueError):
        json.loads(Path(torn[0]).read_text())
    rep = transfer.pull(remote, dst)
    assert rep.verified
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))


def test_kill_while_the_sidecar_is_rewritten_keeps_the_bytes_already_counted(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """With an atomic rewrite (temp file, fsync, rename) the previous sidecar would still be
    there: the next run continues each range from its last count."""
    set_mode(monkeypatch, "ranges")
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    real = download._write_json
    _tear_sidecar_on(monkeypatch, 4, in_place=False)
    with pytest.raises(Killed):
        transfer.pull(remote, dst)
    monkeypatch.setattr(download, "_write_json", real)
    before = remote.served[key_of(3)]
    assert before > 0
    rep = transfer.pull(remote, dst)
    assert rep.verified
    assert rep.bytes_skipped > 0, "every range of the file started over"
    assert remote.served[key_of(3)] - before < size


def test_a_kill_between_the_new_sidecar_and_the_truncate_never_resumes_old_bytes(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Run 1 got 60 KB of a damaged version of the file (other bytes, ETag v0), then was
    killed. The source is fixed (ETag v1). Run 2 sees the ETag changed and starts the file
    over: it writes the sidecar for v1 and is killed before the .part is truncated. Run 3 must
    not take the .part's 60 KB (bytes of v0) as v1's: nothing skipped, the file fetched once."""
    set_mode(monkeypatch, "stream")
    remote = mem_remote(run)
    k = key_of(3)
    good = remote.inner.read(k)
    remote.override[k] = bytes(b ^ 0x5A for b in good)  # a damaged version, same size
    dst = tmp_path / "dst"
    part, side = killed_first_pull(remote, dst)
    assert part.stat().st_size == 60_000
    del remote.override[k]
    remote.versions[k] += 1  # the source file was re-saved (fixed)

    def killed_at_open(*a: Any, **kw: Any) -> None:
        raise Killed()

    real = download._fetch_stream
    monkeypatch.setattr(download, "_fetch_stream", killed_at_open)
    with pytest.raises(Killed):
        transfer.pull(remote, dst)
    monkeypatch.setattr(download, "_fetch_stream", real)
    assert json.loads(side.read_text())["etag"] == remote.etag(k)  # names v1 ...
    assert part.stat().st_size == 0  # ... over an emptied .part: v0's bytes were dropped first
    before = remote.served[k]
    rep = transfer.pull(remote, dst)
    assert rep.verified
    assert_same_and_valid(run, dst)
    got = remote.served[k] - before
    assert rep.bytes_skipped == 0 and got == size, (rep.bytes_skipped, got)


# =================================================================================================
# 3. a sidecar of another version of the source file
# =================================================================================================
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "change", ["source-etag", "sidecar-etag", "sidecar-size", "sidecar-split", "sidecar-no-etag"]
)
def test_a_sidecar_of_another_version_restarts_the_file(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, change: str, size: int
) -> None:
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    part, side = killed_first_pull(remote, dst)
    k = key_of(3)
    record = json.loads(side.read_text())
    if change == "source-etag":
        remote.versions[k] += 1
    elif change == "sidecar-etag":
        record["etag"] = '"something-else"'
    elif change == "sidecar-size":
        record["size"] = size + 1
    elif change == "sidecar-split":
        record["split"] = record["split"] + 1
    else:
        del record["etag"]
    if change != "source-etag":
        side.write_text(json.dumps(record))
    before = remote.served[k]
    rep = transfer.pull(remote, dst)
    assert rep.verified
    assert_same_and_valid(run, dst)
    assert rep.bytes_skipped == 0
    assert remote.served[k] - before == size  # the whole file, once: nothing kept


@pytest.mark.parametrize("mode", MODES)
def test_a_source_rewritten_under_the_same_etag_is_caught_and_fetched_whole(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, size: int
) -> None:
    """A server whose ETag did not move although the bytes did (run 1 got other bytes): the
    kept bytes fail the hash, the file is fetched whole once, the run is equal and verified."""
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    k = key_of(3)
    remote.override[k] = bytes(b ^ 0x5A for b in remote.inner.read(k))
    dst = tmp_path / "dst"
    killed_first_pull(remote, dst)
    del remote.override[k]
    rep = transfer.pull(remote, dst)
    assert rep.verified
    assert_same_and_valid(run, dst)


# =================================================================================================
# 4. hostile / damaged sidecars
# =================================================================================================
def _hostile(record: dict[str, Any], kind: str) -> str:
    n = len(record.get("done") or [0, 0, 0, 0])
    done = record.get("done")
    if kind == "empty":
        return ""
    if kind == "garbage":
        return "\x00\x01 not json at all }{"
    if kind == "torn":
        text = json.dumps(record)
        return text[: len(text) // 2]
    if kind in ("null", "list", "number", "string"):
        return {"null": "null", "list": "[1, 2]", "number": "42", "string": '"x"'}[kind]
    r = dict(record)
    if kind == "negative":
        r["done"] = [-1] * n
    elif kind == "too-large":
        r["done"] = [10**6] * n
    elif kind == "too-many":
        r["done"] = [0] * (n + 1)
    elif kind == "too-few":
        r["done"] = [0] * max(0, n - 1)
    elif kind == "huge":
        r["done"] = [2**200] * n
    elif kind == "floats":
        r["done"] = [0.5] * n
    elif kind == "bools":
        r["done"] = [True] * n
    elif kind == "strings":
        r["done"] = ["1"] * n
    elif kind == "done-null":
        r["done"] = None
    elif kind == "done-dict":
        r["done"] = {"0": 1}
    elif kind == "size-float":
        r["size"] = float(r["size"])
    elif kind == "size-huge":
        r["size"] = 10**40
    elif kind == "etag-list":
        r["etag"] = [r["etag"]]
    elif kind == "claims-all":
        # counts every range whole (legal numbers) while the .part holds zeros there
        r["done"] = done and [40_000, 40_000, 40_000, r["size"] - 120_000]
    elif kind == "digits":
        return json.dumps(r)[:-1] + ', "x": 1' + "0" * 5000 + "}"  # int over Python's limit
    elif kind == "nan":
        return json.dumps(r)[:-1] + ', "y": NaN, "z": -Infinity}'
    return json.dumps(r)


HOSTILE = [
    "empty", "garbage", "torn", "null", "list", "number", "string", "negative", "too-large",
    "too-many", "too-few", "huge", "floats", "bools", "strings", "done-null", "done-dict",
    "size-float", "size-huge", "etag-list", "claims-all", "digits", "nan",
]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_sidecar_is_never_trusted_and_never_crashes(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, kind: str, size: int
) -> None:
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    part, side = killed_first_pull(remote, dst)
    record = json.loads(side.read_text())
    side.write_text(_hostile(record, kind))
    if kind == "claims-all" and mode == "ranges":
        with open(part, "r+b") as f:  # what a wrong count would take as the source's bytes
            f.write(b"\0" * size)
    rep = transfer.pull(remote, dst)
    assert rep.verified and sorted(rep.copied) == [1, 2, 3]
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))


@pytest.mark.parametrize("mode", MODES)
def test_a_deeply_nested_sidecar_is_not_a_raw_recursion_error(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    _, side = killed_first_pull(remote, dst)
    side.write_text("[" * 100_000 + "]" * 100_000)  # 200 KB of valid-looking JSON
    try:
        rep = transfer.pull(remote, dst)
    except errors.CheckpointError as exc:  # a typed error naming the sidecar would do
        assert download.SIDECAR in str(exc)
        return
    assert rep.verified
    assert_same_and_valid(run, dst)


def test_a_sidecar_that_is_a_folder_is_a_typed_error_naming_it(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_mode(monkeypatch, "ranges")
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    _, side = killed_first_pull(remote, dst)
    side.unlink()
    side.mkdir()
    with pytest.raises(errors.StorageError) as info:
        transfer.pull(remote, dst)
    assert side.name in str(info.value)
    assert every_listed_verifies(dst) == []  # the newest step failed first: nothing committed
    side.rmdir()
    assert transfer.pull(remote, dst).verified
    assert_same_and_valid(run, dst)


def _pull_in_child_with_fifo(run: Path, tmp_path: Path, which: str) -> tuple[int | None, str]:
    """Leave a killed pull's staging folder with ``which`` (sidecar or .part) replaced by a
    named pipe; then pull again in a child process (the same source, the run folder behind
    the same remote-like store). Returns its exit status (None: still running after 6 s,
    then killed; the pull itself takes well under a second) and output."""
    dst = tmp_path / "dst"
    remote = Remote(LocalStore(run))
    part, side = killed_first_pull(remote, dst)
    victim = side if which == "sidecar" else part
    victim.unlink()
    os.mkfifo(victim)
    child = spawn(run, dst, split=64 << 20)
    try:
        out, err = child.communicate(timeout=6)
        return child.returncode, out + err
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        return None, out + err


def test_a_sidecar_that_is_a_named_pipe_does_not_hang(run: Path, tmp_path: Path) -> None:
    code, out = _pull_in_child_with_fifo(run, tmp_path, "sidecar")
    assert code is not None, "the pull hung on the named pipe"
    assert code == 0 or "StorageError" in out, out


def test_a_part_that_is_a_named_pipe_does_not_hang(run: Path, tmp_path: Path) -> None:
    code, out = _pull_in_child_with_fifo(run, tmp_path, "part")
    assert code is not None, "the pull hung on the named pipe"
    assert code == 0 or "StorageError" in out, out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["part", "sidecar"])
def test_a_symlinked_part_or_sidecar_never_writes_outside_the_run(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, which: str
) -> None:
    """Someone who can write the destination's staging folder (its name is the step and the
    manifest's digest: known in advance) plants ``<file>.part`` or ``<file>.part.json`` as a
    symlink to another file. The pull must not write through it (a typed error, or the link
    replaced by a file of its own, would do)."""
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    part, side = killed_first_pull(remote, dst)
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"precious bytes, not the run's")
    link = part if which == "part" else side
    link.unlink()
    link.symlink_to(victim)
    with contextlib.suppress(errors.StorageError):
        transfer.pull(remote, dst)
    assert victim.read_bytes() == b"precious bytes, not the run's"


# =================================================================================================
# 5. the destination disk fills up
# =================================================================================================
def _enospc_pwrite(monkeypatch: pytest.MonkeyPatch, after: int) -> list[int]:
    """os.pwrite into a .part fails with ENOSPC once ``after`` bytes were written to .part
    files (other pwrites, such as the lock file's, pass)."""
    real = os.pwrite
    written = [0]
    failed: list[int] = []
    lock = threading.Lock()

    def pwrite(fd: int, data: Any, offset: int) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name.endswith(".part"):
            with lock:
                if written[0] + len(data) > after:
                    failed.append(fd)
                    raise OSError(errno.ENOSPC, "No space left on device")
                written[0] += len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return failed


def test_a_full_disk_during_pwrite_is_a_typed_error_and_keeps_earlier_checkpoints(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    set_mode(monkeypatch, "ranges")
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    real = os.pwrite
    failed = _enospc_pwrite(monkeypatch, size + 50_000)  # step 3 whole, then step 2 half-way
    with pytest.raises(errors.StorageError, match="No space left") as info:
        transfer.pull(remote, dst)
    monkeypatch.setattr(os, "pwrite", real)
    assert "step-000000000002" in str(info.value) and "s3cret" not in str(info.value)
    assert 1 <= len(failed) <= transfer.WORKERS  # not retried: a full disk is final
    assert every_listed_verifies(dst) == [3]
    rep = transfer.pull(remote, dst)
    assert rep.verified and rep.skipped == (3,) and sorted(rep.copied) == [1, 2]
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))


@pytest.mark.parametrize("mode", MODES)
def test_a_full_disk_while_writing_the_sidecar_is_a_typed_error(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    real = download._write_json
    calls = [0]

    def write(path: Path, record: dict[str, object]) -> None:
        calls[0] += 1
        if calls[0] == (3 if mode == "ranges" else 2):  # step 3 ok, then mid-way / step 2
            path.write_text("")  # O_TRUNC happened, the write did not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, record)

    monkeypatch.setattr(download, "_write_json", write)
    with pytest.raises(errors.StorageError, match="No space left"):
        transfer.pull(remote, dst)
    monkeypatch.setattr(download, "_write_json", real)
    every_listed_verifies(dst)
    assert transfer.pull(remote, dst).verified
    assert_same_and_valid(run, dst)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 200 KB tmpfs (a real full disk); skipped where this process may not mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("mode", MODES)
def test_a_real_full_disk_is_a_typed_error_and_keeps_earlier_checkpoints(
    run: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    set_mode(monkeypatch, mode)
    remote = mem_remote(run)
    dst = small_tmpfs / "dst"
    with pytest.raises(errors.StorageError, match="No space left"):
        transfer.pull(remote, dst)
    assert every_listed_verifies(dst) == [3]
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_tmpfs)], check=True)
    rep = transfer.pull(remote, dst)
    assert rep.verified and rep.skipped == (3,)
    assert_same_and_valid(run, dst)
    assert not list(dst.glob(".tmp-*"))


# =================================================================================================
# 6. sizes: exactly SPLIT, SPLIT + 1, 0
# =================================================================================================
@pytest.mark.parametrize("delta", [0, -1], ids=["size==SPLIT", "size==SPLIT+1"])
@pytest.mark.parametrize("kill", [None, 60_000, 119_000])
def test_a_file_of_exactly_split_or_split_plus_one_bytes(
    run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    delta: int,
    kill: int | None,
) -> None:
    monkeypatch.setattr(transfer, "SPLIT", size + delta)
    remote = mem_remote(run)
    dst = tmp_path / "dst"
    total = 3 * size
    if kill is not None:
        _, side = killed_first_pull(remote, dst, after=kill)
        record = json.loads(side.read_text())
        if delta == 0:
            assert "done" not in record  # one stream
        else:
            assert len(record["done"]) == 2 and sum(record["done"]) <= kill
    rep = transfer.pull(remote, dst)
    assert rep.verified and sorted(rep.copied) == [1, 2, 3]
    assert_same_and_valid(run, dst)
    # resumed: every byte came about once over both runs (a range's block in flight at most)
    assert sum(remote.served.values()) <= total + transfer.BLOCK
    assert not list(dst.glob(".tmp-*"))


class _Blob0(base.Blob):
    def __init__(self, data: bytes, etag: str | None = '"e"') -> None:
        self.data, self.size, self.etag = data, len(data), etag

    def readinto(self, offset: int, dest: memoryview) -> None:
        dest[:] = self.data[offset : offset + len(dest)]


class _Ends:
    """Just what download.download asks of its Endpoints."""

    src = None

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.moved_n = self.skipped = 0

    def blob(self, skey: str, m: Any, name: str) -> base.Blob:
        return _Blob0(self.data)

    def where(self, store: Any, key: str = "") -> str:
        return f"https://example.test/{key}"

    def moved(self, n: int) -> None:
        self.moved_n += n

    def skip(self, n: int) -> None:
        self.skipped += n


class _Check:
    def __init__(self) -> None:
        self.got = bytearray()

    def feed(self, view: memoryview) -> None:
        self.got += view


@pytest.mark.parametrize("split", [0, 1, 64 << 20])
@pytest.mark.parametrize("leftover", [None, b"junk" * 100], ids=["fresh", "stale-part"])
def test_a_zero_byte_source_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: int, leftover: bytes | None
) -> None:
    """download() of an empty source file: an empty .part, nothing fetched, the check fed
    nothing; a stale .part (even with a sidecar naming this very version) is cut to 0."""
    monkeypatch.setattr(transfer, "SPLIT", split)
    folder = tmp_path / "stage"
    folder.mkdir()
    side = folder / ("f.bin" + download.SIDECAR)
    if leftover is not None:
        (folder / "f.bin.part").write_bytes(leftover)
        side.write_text(json.dumps({"etag": '"e"', "size": 0, "split": split}))
    ends = _Ends(b"")
    path, resumed, check = download.download(
        ends,  # type: ignore[arg-type]
        "k/f.bin",
        "f.bin",
        None,  # type: ignore[arg-type]
        folder,
        side,
        _Check,  # type: ignore[arg-type]
    )
    assert path.read_bytes() == b"" and not resumed
    assert check.got == b"" and ends.moved_n == 0 and ends.skipped == 0


@pytest.mark.parametrize("kill_at", [1, 39_999, 40_000])
def test_a_split_plus_one_file_resumes_its_one_byte_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at: int
) -> None:
    """download() of a SPLIT + 1 byte file (a range of SPLIT, then one of 1 byte), cut after
    ``kill_at`` bytes, then continued: the .part holds the source exactly, and no byte is
    taken from the earlier run that it did not write."""
    monkeypatch.setattr(transfer, "SPLIT", 40_000)
    monkeypatch.setattr(transfer, "WORKERS", 1)  # the ranges in order: the cut is exact
    data = os.urandom(40_001)
    folder = tmp_path / "stage"
    folder.mkdir()
    side = folder / ("f.bin" + download.SIDECAR)
    ends = _Ends(data)

    class Cut(_Blob0):
        seen = 0

        def stream(self, offset: int = 0, chunk: int = 8 << 20, end: int | None = None) -> Any:
            for view in super().stream(offset, chunk, end):
                left = kill_at - Cut.seen
                if len(view) > left:
                    if left:
                        Cut.seen += left
                        yield view[:left]
                    raise Killed()
                Cut.seen += len(view)
                yield view

    monkeypatch.setattr(ends, "blob", lambda *a: Cut(data))
    with pytest.raises(Killed):
        download.download(ends, "k/f.bin", "f.bin", None, folder, side, _Check)  # type: ignore[arg-type]
    done = json.loads(side.read_text())["done"]
    assert len(done) == 2 and sum(done) <= kill_at
    monkeypatch.setattr(ends, "blob", lambda *a: _Blob0(data))
    path, resumed, check = download.download(
        ends,
        "k/f.bin",
        "f.bin",
        None,
        folder,
        side,
        _Check,  # type: ignore[arg-type]
    )
    assert path.read_bytes() == data
    assert bytes(check.got) == data
    assert resumed == (sum(done) > 0)
