"""Restore, load, open and verify from a store whose blobs cannot map (issue 11: "restore from
a URL on a fresh machine"), simulated by :class:`SlowStore`: it delegates to a local or memory
store, but its blobs' ``map()`` is None and every ``readinto`` is a counted request that waits
a little (latency), as a ranged GET does. ``tests/remote/test_restore_remote.py`` repeats the
important cases against a real S3 server on loopback.

What is held: every hash is checked before a byte reaches a live tensor (per checkpoint, also
when the live bytes wait in a temporary file), reads run in parallel in bounded requests, the
extra memory is bounded, a blob replaced mid-read is started over once, and resharding works.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import fetch, reader
from savegame.format import layout
from savegame.storage import Blob, Entry, Location, Lock, Staging, Store
from savegame.storage.base import ChangedError
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore

HERE = Path(__file__).resolve().parent


class Stats:
    """What the blobs of a :class:`SlowStore` were asked for (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.largest = 0
        self.running = 0
        self.most_running = 0
        self.opens: dict[str, int] = {}

    def start(self, n: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n
            self.largest = max(self.largest, n)
            self.running += 1
            self.most_running = max(self.most_running, self.running)

    def end(self) -> None:
        with self.lock:
            self.running -= 1


class _SlowBlob(Blob):
    def __init__(self, inner: Blob, store: SlowStore, key: str) -> None:
        self._inner = inner
        self._store = store
        self._key = key
        self.size = inner.size
        self.etag = f"v{store.stats.opens[key]}"

    def readinto(self, offset: int, dest: memoryview) -> None:
        self._store.stats.start(len(dest))
        try:
            time.sleep(self._store.latency)
            if self._store.change is not None and self._store.change(self._key, offset):
                raise ChangedError(f"{self._key}: ETag changed since {self.etag}")
            self._inner.readinto(offset, dest)
        finally:
            self._store.stats.end()

    def map(self) -> Any | None:
        return None  # an object store cannot map

    def close(self) -> None:
        self._inner.close()


class SlowStore(Store):
    """``inner``, seen as an object store: blobs that cannot map, requests that take
    ``latency`` seconds, and an optional ``change(key, offset) -> bool`` that makes a read
    find a new version (ChangedError)."""

    def __init__(self, inner: Store, latency: float = 0.002) -> None:
        self.inner = inner
        self.url = "slow+" + inner.url
        self.latency = latency
        self.stats = Stats()
        self.change: Callable[[str, int], bool] | None = None

    def open(self, key: str) -> Blob:
        blob = self.inner.open(key)
        with self.stats.lock:
            self.stats.opens[key] = self.stats.opens.get(key, 0) + 1
        return _SlowBlob(blob, self, key)

    def list(self, prefix: str = "") -> list[Entry]:
        return self.inner.list(prefix)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def is_dir(self, key: str) -> bool:
        return self.inner.is_dir(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

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

    def begin(self, name: str, final: str | None = None) -> Staging:
        return self.inner.begin(name, final)

    def staging(self, name: str) -> Staging:
        return self.inner.staging(name)

    def lock(self, name: str) -> Lock:
        return self.inner.lock(name)


# ---- helpers ----------------------------------------------------------------------------------


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64), torch.nn.Linear(64, 3)
    )


def _saved_run(tmp_path: Path, *, big: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run folder with one checkpoint (step 5) of a trained model + Adam (+ a ``big`` float32
    vector in extras); returns it and the saved tensors."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
    extras: dict[str, Any] = {"epoch": 3}
    if big:
        extras["big"] = torch.randn(big)
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    run = tmp_path / "run"
    with sg.Checkpointer(run, handle_signals=False) as ckpt:
        ckpt.save(state, 5)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    if big:
        saved["big"] = extras["big"].clone()
    return run, saved


def _ckpt(run: Path) -> Path:
    return run / layout.step_dir(5)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _live(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def small_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of 64 KiB, 8 in flight: a small checkpoint still takes many parallel requests."""
    monkeypatch.setattr(reader, "REQUEST_BYTES", 64 << 10)
    monkeypatch.setattr(reader, "REQUESTS_IN_FLIGHT", 8)


# ---- restore ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["1G", "0"])
def test_restore_into_live_model_in_parallel_requests_equals_saved(
    tmp_path: Path, small_requests: None, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", budget)
    spooled: list[int] = []
    real_new = fetch.Staging.new

    def spy(self: Any, size: int, staged: int) -> Any:
        before = self.spooled
        out = real_new(self, size, staged)
        spooled.append(self.spooled - before)
        return out

    monkeypatch.setattr(fetch.Staging, "new", spy)
    run, saved = _saved_run(tmp_path)
    store = SlowStore(LocalStore(run))
    model = _model(seed=1)  # other weights: the restore must replace every one
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    with sg.Checkpointer(store, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert state["extras"] == {"epoch": 3}
    stats = store.stats
    # bounded requests (a restore's are of equal size, 0.75-1.5x REQUEST_BYTES: no small tail) ...
    assert stats.largest <= 1.5 * (64 << 10)
    assert stats.most_running > 1  # ... in parallel
    assert stats.most_running <= 8
    file_bytes = sum(f.size for f in reader.read_manifest(_ckpt(run)).files.values())
    assert stats.bytes <= 1.05 * file_bytes  # every byte about once (header check: a little)
    # the live parameters waited in memory (budget 1G) or in a temporary file (budget 0)
    assert spooled and (all(s == 0 for s in spooled) if budget == "1G" else sum(spooled) > 0)


@pytest.mark.parametrize("budget", ["1G", "0"])
def test_corrupt_last_chunk_leaves_live_tensors_untouched(
    tmp_path: Path, small_requests: None, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    """The damage is in the last bytes read: everything before it was already pulled (into
    staging, never into the live tensors), and nothing is copied."""
    monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", budget)
    run, _ = _saved_run(tmp_path)
    m = reader.read_manifest(_ckpt(run))
    last = max((c for t in m.tensors.values() for c in t.chunks), key=lambda c: c.offset)
    _flip(_ckpt(run) / last.file, last.offset + last.length - 1)
    model = _model(seed=1)
    before = _live(model)
    live = dict(model.named_parameters())

    def dest(key: str, entry: Any) -> torch.Tensor | None:
        t = live.get(key.removeprefix("model/"))
        return t.data if t is not None and reader.fits(t.data, entry) else None

    store = SlowStore(LocalStore(run))
    with pytest.raises(errors.IntegrityError, match="does not match its hash") as info:
        reader.load_tensors(Location(store, layout.step_dir(5)), m, dest=dest)
    assert info.value.step == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # A Checkpointer skips it (no earlier step: nothing restored) and leaves the model alone.
    # (The same objects as saved: a TrainState of other names is refused before any read.)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0}, rng=False)
    with pytest.warns(errors.CorruptCheckpointWarning):
        with sg.Checkpointer(SlowStore(LocalStore(run)), handle_signals=False) as ckpt:
            assert ckpt.restore(state) == 0  # nothing to restore: a fresh start
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spooled_restore_of_live_tensors_has_bounded_extra_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """128 MiB bound for live tensors, staging budget 0: the bytes wait in a temporary file, so
    the process's anonymous memory grows by the requests in flight, not by the checkpoint."""
    rss_anon = Path("/proc/self/status")
    if not rss_anon.exists():
        pytest.skip("needs /proc (Linux)")
    monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", "0")
    monkeypatch.setattr(reader, "REQUEST_BYTES", 4 << 20)
    monkeypatch.setattr(reader, "REQUESTS_IN_FLIGHT", 4)
    n = 32 << 20  # float32: 128 MiB
    holder = {"w": torch.randn(n)}
    run = tmp_path / "run"
    with sg.Checkpointer(run, handle_signals=False) as ckpt:
        ckpt.save(sg.TrainState(rng=False, extras=holder), 5)
    m = reader.read_manifest(_ckpt(run))
    target = torch.zeros(n)

    def anon() -> int:
        for line in rss_anon.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
        raise AssertionError("no RssAnon")

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)

    base = anon()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reader.load_tensors(
            Location(SlowStore(LocalStore(run), latency=0), layout.step_dir(5)),
            m,
            dest=lambda key, entry: target if key == "extras/w" else None,
        )
    finally:
        done.set()
        sampler.join()
    assert torch.equal(target, holder["w"])
    extra = peak[0] - base
    assert extra < 48 << 20, f"{extra >> 20} MiB extra anonymous memory for a 128 MiB restore"


def test_a_blob_replaced_mid_read_is_started_over_once(
    tmp_path: Path, small_requests: None
) -> None:
    run, saved = _saved_run(tmp_path)
    store = SlowStore(LocalStore(run))
    fname = "rank-00000.safetensors"
    tripped = []

    def change_once(key: str, offset: int) -> bool:
        if key.endswith(fname) and offset > 4096 and not tripped:
            tripped.append(offset)
            return True
        return False

    store.change = change_once
    model = _model(seed=1)
    opt = torch.optim.Adam(model.parameters())
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    with sg.Checkpointer(store, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 5
    assert tripped
    assert store.stats.opens[f"{layout.step_dir(5)}/{fname}"] == 2  # started over, once
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_a_blob_that_keeps_changing_is_a_typed_error_and_nothing_is_copied(
    tmp_path: Path, small_requests: None
) -> None:
    run, _ = _saved_run(tmp_path)
    store = SlowStore(LocalStore(run))
    store.change = lambda key, offset: key.endswith(".safetensors") and offset > 4096
    m = reader.read_manifest(_ckpt(run))
    model = _model(seed=1)
    before = _live(model)
    live = dict(model.named_parameters())

    def dest(key: str, entry: Any) -> torch.Tensor | None:
        t = live.get(key.removeprefix("model/"))
        return t.data if t is not None and reader.fits(t.data, entry) else None

    with pytest.raises(errors.StorageError, match="changed twice") as info:
        reader.load_tensors(Location(store, layout.step_dir(5)), m, dest=dest)
    assert info.value.step == 5 and "rank-00000.safetensors" in str(info.value.path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # verify reports it instead of raising
    problems = reader.verify(Location(store, layout.step_dir(5)))
    assert any("changed twice" in p for p in problems)


def test_a_change_while_checking_the_header_is_started_over_too(tmp_path: Path) -> None:
    run, saved = _saved_run(tmp_path)
    store = SlowStore(LocalStore(run))
    tripped: list[int] = []

    def change_at_header(key: str, offset: int) -> bool:
        if offset == 0 and key.endswith(".safetensors") and not tripped:
            tripped.append(0)
            return True
        return False

    store.change = change_at_header
    loaded = sg.load(Location(store, layout.step_dir(5)))  # type: ignore[arg-type]
    assert tripped
    for k, v in loaded["model"].items():
        assert torch.equal(v, saved[k]), k


# ---- open, load, verify -----------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["local", "memory"])
def test_load_open_and_verify_from_a_store_that_cannot_map(
    tmp_path: Path, small_requests: None, inner: str
) -> None:
    run, saved = _saved_run(tmp_path, big=100_000)
    if inner == "local":
        base: Store = LocalStore(run)
    else:  # the same bytes in a MemoryStore
        base = MemoryStore("copy")
        base.makedirs(layout.step_dir(5))
        for p in _ckpt(run).iterdir():
            base.put(f"{layout.step_dir(5)}/{p.name}", p.read_bytes())
    store = SlowStore(base)
    loc = Location(store, layout.step_dir(5))
    tree = sg.load(loc)  # type: ignore[arg-type]
    for k, v in tree["model"].items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(tree["extras"]["big"], saved["big"])
    # a load's requests are of equal size, 0.75-1.5x REQUEST_BYTES (no small tail) ...
    assert store.stats.largest <= 1.5 * (64 << 10)
    with sg.open(loc) as r:
        assert torch.equal(r.read("model/0.weight"), saved["0.weight"])
        assert r.verify() == []
    store.stats = Stats()
    assert reader.verify(loc) == []
    assert reader.verify(loc, chunk_bytes=1 << 10) == []
    assert 0 < store.stats.largest <= 64 << 10  # ... verify's never exceed it (its memory bound)


def test_verify_from_a_store_that_cannot_map_finds_damage(
    tmp_path: Path, small_requests: None
) -> None:
    run, _ = _saved_run(tmp_path, big=100_000)
    m = reader.read_manifest(_ckpt(run))
    c = m.tensors["extras/big"].chunks[0]
    _flip(_ckpt(run) / c.file, c.offset + c.length // 2)
    (_ckpt(run) / "stray.bin").write_bytes(b"x")
    store = SlowStore(LocalStore(run))
    problems = reader.verify(Location(store, layout.step_dir(5)))
    assert len(problems) == 2, problems
    assert "'extras/big' does not match its hash" in problems[0]
    assert "stray.bin: file not listed" in problems[1]
    # a truncated file: the size check says so before any data is read
    f = _ckpt(run) / c.file
    f.write_bytes(f.read_bytes()[:-10])
    problems = reader.verify(Location(store, layout.step_dir(5)))
    assert any("manifest says" in p for p in problems), problems


def test_regions_from_a_store_that_cannot_map_read_only_the_overlapping_chunks(
    tmp_path: Path, small_requests: None
) -> None:
    run, saved = _saved_run(tmp_path, big=1 << 20)  # 4 MiB vector
    store = SlowStore(LocalStore(run))
    m = reader.read_manifest(_ckpt(run))
    out = reader.load_tensors(
        Location(store, layout.step_dir(5)),
        m,
        ["extras/big", "model/0.weight"],
        regions={"extras/big": ((1000,), (5000,)), "model/0.weight": ((100, 0), (50, 256))},
    )
    assert torch.equal(out["extras/big"], saved["big"][1000:6000])
    assert torch.equal(out["model/0.weight"], saved["0.weight"][100:150])
    # (one chunk per tensor in a 1-rank checkpoint: the overlapping chunks are whole tensors)


# ---- resharding -------------------------------------------------------------------------------

_WORKER = """
import os
import sys
from pathlib import Path
sys.path[:0] = [{dist!r}, {tests!r}]
import _worker
import savegame as sg
from savegame.storage.local import LocalStore
from test_unmappable_restore import SlowStore

_real = sg.Checkpointer

def _slow(root, **kw):
    (Path(root).parent / f"slow-store-used-{{os.getpid()}}").touch()
    return _real(SlowStore(LocalStore(root)), **kw)

sg.Checkpointer = _slow
_worker.fork_ranks(int(sys.argv[3]))
"""


@pytest.fixture
def launch() -> Iterator[Callable[..., list[int]]]:
    sys.path.insert(0, str(HERE / "distributed"))
    try:
        from _launch import launch as run

        yield run
    finally:
        sys.path.remove(str(HERE / "distributed"))


@pytest.mark.distributed
@pytest.mark.slow  # CI under 20 minutes (the S3 reshard stays: tests/remote/test_restore_remote.py)
def test_reshard_2_to_1_and_1_to_2_from_a_store_that_cannot_map(
    tmp_path: Path, launch: Callable[..., list[int]]
) -> None:
    out = str(tmp_path)
    worker = tmp_path / "slow_worker.py"
    worker.write_text(_WORKER.format(dist=str(HERE / "distributed"), tests=str(HERE)))
    # 2 ranks (FSDP2: sharded parameters and moments) save step 2 to a folder
    launch("train", 2, {"root": str(tmp_path / "w2"), "out": out, "kind": "fsdp", "steps": 2,
                        "tag": "w2", "save_at_end": 2})  # fmt: skip
    saved = torch.load(tmp_path / "params-w2.pt")
    # 1 process restores it from a store that cannot map (whole tensors from the shards' chunks)
    sys.path.insert(0, str(HERE / "distributed"))
    try:
        import _worker
    finally:
        sys.path.remove(str(HERE / "distributed"))
    model, opt = _worker.build("fsdp", 1)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    store = SlowStore(LocalStore(tmp_path / "w2"))
    # incremental=False: step 3's folder is moved to a run of its own below, by hand, so it
    # must not share bytes with step 2 (docs/incremental.md: moving one checkpoint)
    with sg.Checkpointer(store, handle_signals=False, incremental=False) as ckpt:
        with pytest.warns(UserWarning, match="left as constructed"):
            assert ckpt.restore(state, per_rank="fresh") == 2
        ckpt.save(state, 3)  # a 1-rank checkpoint for the way back
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert store.stats.requests > 0
    one = tmp_path / "w1"
    one.mkdir()
    (tmp_path / "w2" / layout.step_dir(3)).rename(one / layout.step_dir(3))
    assert reader.read_manifest(one / layout.step_dir(3)).world_size == 1
    # 2 ranks restore the 1-rank checkpoint, each its shard, through the slow store
    launch("train", 2, {"root": str(one), "out": out, "kind": "fsdp", "steps": 3, "tag": "back",
                        "per_rank": "fresh", "expect_start": 3}, worker=worker)  # fmt: skip
    assert len(list(tmp_path.glob("slow-store-used-*"))) == 2  # both ranks read through it
    back = torch.load(tmp_path / "params-back.pt")
    assert back.keys() == saved.keys()
    for k in saved:
        assert torch.equal(back[k], saved[k]), k


# ---- the request plan ---------------------------------------------------------------------------


@pytest.mark.parametrize("stretch", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_request_plan_covers_every_byte_once_within_the_request_size(
    seed: int, stretch: bool
) -> None:
    """Random layouts of fresh (own home), staged and hash-only chunks, with gaps: every byte of
    every chunk is in exactly one segment, in file order; no request is over the size (1.5x
    with ``stretch``, a restore's, and then never more requests than without); a request read
    straight somewhere is exactly its length there."""
    import random

    rng = random.Random(seed)
    request = rng.choice([7, 64, 1000])
    size = 20_000
    staging = memoryview(bytearray(size))
    targets, pos = [], 0
    while True:
        pos += rng.choice([0, 0, 0, 3, 50, 2000])
        n = rng.choice([0, 1, 5, 63, 64, 65, 999, 1000, 1001, 3000])
        if pos + n > size:
            break
        kind = rng.choice(["own", "base", "none"])
        t = fetch.Target(len(targets), pos, n, "")
        if kind == "own":
            t.own = memoryview(bytearray(n))
        elif kind == "base":
            t.base = staging
        targets.append(t)
        pos += n
    plan = fetch._plan_requests(targets, request, stretch)
    if stretch:
        assert len(plan) <= len(fetch._plan_requests(targets, request))
    covered: dict[int, list[tuple[int, int]]] = {}
    last = -1
    for req in plan:
        assert 0 < req.length <= (1.5 * request if stretch else request)
        assert req.offset > last
        last = req.offset + req.length - 1
        if req.into is not None:
            assert len(req.into) == req.length
        for s in req.segs:
            assert req.offset <= s.offset and s.offset + s.length <= req.offset + req.length
            covered.setdefault(s.target.ident, []).append((s.offset, s.length))
            if s.home is not None:
                assert len(s.home) == s.length
    for t in targets:
        pieces = covered.get(t.ident, [])
        if t.length == 0:
            assert not pieces
            continue
        at = t.offset
        for off, n in pieces:
            assert off == at
            at += n
        assert at == t.offset + t.length


def test_a_restore_cuts_a_span_into_equal_requests_without_a_small_tail() -> None:
    """48 MiB + a 25 KiB tail in 16 MiB requests: three of equal size, not a fourth of 25 KiB
    (each request is a round trip; on moto a whole-object copy); a span under 1.5x is one GET."""
    mib = 1 << 20
    whole = [fetch.Target(0, 0, 48 * mib + 25_000, "")]
    sizes = [r.length for r in fetch._plan_requests(whole, 16 * mib, stretch=True)]
    assert len(sizes) == 3 and max(sizes) - min(sizes) < 3 and sum(sizes) == 48 * mib + 25_000
    assert len(fetch._plan_requests(whole, 16 * mib)) == 4  # verify: never over the size
    small = [fetch.Target(0, 0, 23 * mib, "")]
    assert [r.length for r in fetch._plan_requests(small, 16 * mib, stretch=True)] == [23 * mib]
    assert len(fetch._plan_requests([fetch.Target(0, 0, 25 * mib, "")], 16 * mib, True)) == 2


def test_a_damaged_header_is_refused_before_anything_is_copied(
    tmp_path: Path, small_requests: None
) -> None:
    """The header arrives with the first data request (no request of its own); it is still
    checked against the manifest before any byte is used."""
    run, _ = _saved_run(tmp_path)
    _flip(_ckpt(run) / "rank-00000.safetensors", 20)  # inside the JSON header
    m = reader.read_manifest(_ckpt(run))
    model = _model(seed=1)
    before = _live(model)
    live = dict(model.named_parameters())

    def dest(key: str, entry: Any) -> torch.Tensor | None:
        t = live.get(key.removeprefix("model/"))
        return t.data if t is not None and reader.fits(t.data, entry) else None

    loc = Location(SlowStore(LocalStore(run)), layout.step_dir(5))
    with pytest.raises(errors.IntegrityError, match="header or tensor list"):
        reader.load_tensors(loc, m, dest=dest)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    problems = reader.verify(loc)
    assert len(problems) == 1 and "header or tensor list" in problems[0], problems


def _resident(mm: Any) -> int:
    """Bytes of ``mm`` resident in this process (its mapping's ``Rss`` in /proc/self/smaps)."""
    import ctypes

    c = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(c)
    del c  # the export would keep ``mm`` from closing
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_spooled_staging_leaves_memory_once_hashed_and_keeps_its_bytes() -> None:
    """Bytes staged in a temporary file (over SAVEGAME_STAGING_MEMORY) do not stay resident once
    written and hashed: peak memory is the bytes in flight, not the checkpoint; they are still
    all there for the copy phase, and released again after it reads them."""
    import hashlib
    import random

    mib = 1 << 20
    size = 24 * mib + 12_345
    data = random.Random(0).randbytes(size)
    staging = fetch.Staging(0)
    mm = staging.new(size, size)
    assert staging.spool(mm) is mm and staging.spooled == size
    base = memoryview(mm)
    from savegame.format import hashing

    targets, pos = [], 0
    for n in [5, 3 * mib + 7, 10 * mib, 1000, 11 * mib - 1000 + 12_333]:
        digest = hashing.digest(data[pos : pos + n])
        targets.append(fetch.Target(len(targets), pos, n, digest, base=base, spool=mm))
        pos += n
    assert pos == size

    def read(offset: int, into: memoryview) -> None:
        into[:] = data[offset : offset + len(into)]

    bad: list[Any] = []
    fetch.pull(read, targets, lambda t: bad.append(t.ident), request=mib, in_flight=2,
               stretch=True)  # fmt: skip
    assert not bad
    assert _resident(mm) < 2 * mib  # a few boundary pages, not 24 MiB
    assert hashlib.sha256(mm[:]).digest() == hashlib.sha256(data).digest()  # faulted back in
    fetch.release(mm, 0, size)
    assert _resident(mm) < mib
    # anonymous staging (under the budget) is never given to release: it would lose the bytes
    memory = fetch.Staging(1 << 30)
    anon = memory.new(mib, mib)
    assert memory.spool(anon) is None
    base.release()
    mm.close()
    anon.close()
