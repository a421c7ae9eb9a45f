"""Outside review s19: two tiers (a local cache + a remote root) with incremental saves.

A frozen base and a small trained head, saved every step while the remote lags behind (a
throttled store around a local folder or moto's S3): the cache and the remote share bytes,
the upload thread's cache retention retires files while the next save re-checks them.
What a user relies on (README "Runs on object storage", docs/tiers.md, docs/incremental.md,
docs/format.md "Shared bytes"): no false damage warnings, no needless full saves,
`savegame verify` passes on both tiers, a remote-only restore is bitwise the live state,
retention never frees bytes a kept checkpoint uses, failures are typed and caught up.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.storage import Store, as_store, base
from savegame.storage.faulty import FaultyStore

pytestmark = pytest.mark.network

FAST = sg.UploadRetry(attempts=3, first_delay=0.01, max_delay=0.05)
BASE = 6  # frozen layers of 128x128 float32 (64 KiB each)


# --------------------------------------------------------------------------- helpers


class _Slow(FaultyStore):
    """A remote whose uploads lag: each staging begin and each data write sleeps ``delay``."""

    def __init__(self, inner: Store, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.down = False
        self.begins = 0

    def begin(self, name: str, final: str | None = None) -> base.Staging:
        self.begins += 1
        if self.down:
            raise OSError(errno.ECONNREFUSED, "connection refused (injected)")
        time.sleep(self.delay)
        return super().begin(name, final)


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(BASE):
        layers += [torch.nn.Linear(128, 128), torch.nn.Tanh()]
    base_ = torch.nn.Sequential(*layers)
    for p in base_.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(128, 4)
    model = torch.nn.Sequential(base_, head)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(16, 128, generator=g), torch.randn(16, 4, generator=g)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"opt/{i}/{k}"] = torch.as_tensor(v).clone()
    return out


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(
            a[k].view(torch.uint8) if a[k].dim() else a[k],
            b[k].view(torch.uint8) if b[k].dim() else b[k],
        ), k


def _cli(*args: str) -> tuple[int, str]:
    """``savegame ARGS`` in this process (the CLI's own entry point): (exit code, output)."""
    import contextlib
    import io

    from savegame.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue()


def _valid_steps(root: Any) -> list[int]:
    return sorted(r.step for r in reader.list_checkpoints(root) if r.valid)


def _verify_all(root_str: str, steps: list[int]) -> None:
    for s in steps:
        rc, out = _cli("verify", f"{root_str.rstrip('/')}/step-{s:012d}")
        assert rc == 0, (s, out)


def _manifest(root: Store, step: int) -> dict[str, Any]:
    return json.loads(root.read(f"step-{step:012d}/manifest.json"))


def _refs(man: dict[str, Any]) -> set[str]:
    return {k for k in man["files"] if "/" in k}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["folder", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Store]:
    """(the remote root as a user names it, its store)."""
    if request.param == "folder":
        p = tmp_path / "remote"
        p.mkdir()
        return str(p), as_store(str(p))
    url = request.getfixturevalue("s3_url")
    return url, as_store(url)


def _run(
    root: Any,
    cache: Path,
    steps: range,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    **kw: Any,
) -> int:
    kw.setdefault("save", sg.Every(steps=1))
    kw.setdefault("keep", sg.Keep(last=2))
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(root, cache=cache, handle_signals=False, upload_retry=FAST, **kw) as ck:
        start = ck.restore(state)
        for step in range(max(start, steps.start), steps.stop):
            _train_step(model, opt, step)
            metrics = {"loss": float((step * 7919) % 13)}
            ck.step(state, step + 1, metrics=metrics)
    return start


# --------------------------------------------------------------------------- quick saves


@pytest.mark.parametrize(
    ("keep", "async_save"),
    [
        (sg.Keep(last=1), False),
        pytest.param(sg.Keep(last=3), False, marks=pytest.mark.slow),  # CI under 20 minutes
        pytest.param(
            sg.Keep(last=1, best=2, monitor="loss", mode="min"), False, marks=pytest.mark.slow
        ),
        (sg.Keep(last=1), True),
        pytest.param(
            sg.Keep(last=2, best=1, monitor="loss", mode="min"), True, marks=pytest.mark.slow
        ),
    ],
    ids=["last1", "last3", "best2", "last1-async", "best1-async"],
)
def test_quick_saves_while_uploads_lag_share_bytes_verify_and_restore_from_remote_alone(
    remote: tuple[str, Store], tmp_path: Path, keep: sg.Keep, async_save: bool
) -> None:
    url, store = remote
    slow = _Slow(store, 0.05)
    model, opt = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(slow, tmp_path / "cache", range(0, 12), model, opt, keep=keep, async_save=async_save)
    bad = [
        str(w.message)
        for w in caught
        if "damag" in str(w.message).lower()
        or "corrupt" in str(w.message).lower()
        or "shar" in str(w.message).lower()
        or issubclass(w.category, sg.CorruptCheckpointWarning)
    ]
    assert not bad, bad
    live = _flat(model, opt)

    remote_steps = _valid_steps(store)
    cache_steps = _valid_steps(tmp_path / "cache")
    assert 12 in remote_steps and remote_steps, remote_steps
    # every checkpoint after the first full one shares the frozen base: none is written in full
    base_bytes = BASE * (128 * 128 + 128) * 4
    for root in (store, as_store(str(tmp_path / "cache"))):
        for s in _valid_steps(root):
            man = _manifest(root, s)
            if s == 1:
                continue
            assert _refs(man), (s, "written in full although it could share")
            own = root.size(f"step-{s:012d}/rank-00000.safetensors")
            assert own < base_bytes / 4, (s, own)
    _verify_all(url, remote_steps)
    _verify_all(str(tmp_path / "cache"), cache_steps)

    fresh_model, fresh_opt = _model(seed=5)
    state = sg.TrainState(model=fresh_model, optimizer=fresh_opt)
    with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
        assert ck.restore(state) == 12
    _assert_bitwise(_flat(fresh_model, fresh_opt), live)


# --------------------------------------------------------------------------- SIGKILL


JOB = Path(__file__).parent / "_outside_s19" / "job.py"
KILL_STEPS = 14


def _job_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_s19_job", JOB)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _uninterrupted(steps: int) -> dict[str, torch.Tensor]:
    mod = _job_module()
    model, opt = mod.model_and_opt()
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(16, 128, generator=g), torch.randn(16, 4, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _flat(model, opt)


def _resolve(store: Store, key: str, size: int) -> bool:
    """The file a manifest names is there at its size, in its folder or at its retired name."""
    names = [key]
    if "/" in key:
        folder, fname = key.split("/", 1)
        names.append(f"retired-{folder}-{fname}")
    for n in names:
        try:
            if store.exists(n) and store.size(n) == size:
                return True
        except FileNotFoundError:
            continue
    return False


class _Lister(threading.Thread):
    """A second reader: lists the remote again and again; every checkpoint listed as valid must
    have all its files (own and shared) at the promised size while it stays listed."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.partial: list[str] = []
        self.rounds = 0

    def _missing(self, store: Store, step: int) -> list[str]:
        folder = f"step-{step:012d}"
        try:
            man = json.loads(store.read(f"{folder}/manifest.json"))
        except (FileNotFoundError, OSError, ValueError):
            return []  # deleted since the listing
        out = []
        for key, entry in man["files"].items():
            full = key if "/" in key else f"{folder}/{key}"
            if not _resolve(store, full, int(entry["size"])):
                out.append(full)
        return out

    def run(self) -> None:
        store = as_store(self.url)
        while not self.stop.is_set():
            try:
                steps = _valid_steps(store)
            except Exception:  # a listing racing a deletion may fail: not a partial checkpoint
                continue
            self.rounds += 1
            for s in steps:
                miss = self._missing(store, s)
                if miss and s in _valid_steps(store) and self._missing(store, s):
                    self.partial.append(f"step {s} listed but lacks {miss}")
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_points_resume_on_new_and_same_cache_is_bitwise_and_never_partial(
    remote: tuple[str, Store], tmp_path: Path, seed: int
) -> None:
    import random

    url, _ = remote
    rnd = random.Random(seed)
    env = {**os.environ, "SAVEGAME_LEASE_SECONDS": "2", "OMP_NUM_THREADS": "1"}
    out, progress = tmp_path / "final.pt", tmp_path / "progress.txt"
    lister = _Lister(url)
    lister.start()
    caches = []
    try:
        for attempt in range(4):
            # alternate: a new cache folder (another VM), then the same one (same VM restarted)
            if attempt % 2 == 0 or not caches:
                caches.append(tmp_path / f"cache{attempt}")
            cache = caches[-1]
            args = [
                sys.executable,
                str(JOB),
                url,
                str(cache),
                str(out),
                str(progress),
                str(KILL_STEPS),
                "0.03",
                str(attempt % 2),
            ]
            proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
            if attempt == 3:
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
                break
            seen = progress.read_text() if progress.exists() else ""
            deadline = time.monotonic() + 60
            while (progress.read_text() if progress.exists() else "").count("start") <= seen.count(
                "start"
            ):
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(rnd.uniform(0.05, 0.6))
            proc.kill()
            proc.communicate()
    finally:
        lister.stop.set()
        lister.join(10)
    assert "done" in progress.read_text()
    assert lister.rounds > 0
    assert not lister.partial, lister.partial
    final = torch.load(out)
    _assert_bitwise({k: v for k, v in final.items()}, _uninterrupted(KILL_STEPS))
    # the remote alone (a fresh cache) restores the same state, and verifies
    for s in _valid_steps(as_store(url)):
        _verify_all(url, [s])


def test_killed_before_its_first_upload_a_fresh_cache_machine_resumes_its_own_cache_work(
    remote: tuple[str, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machine A trains to step 4 (uploaded). Machine B (a fresh cache) resumes from the remote's
    step 4, commits steps 5.. into its cache while the (slow) upload of step 5 is under way, and
    is killed. B restarts on the SAME cache: its cache checkpoints descend from the remote's
    newest (nothing newer exists remotely), were never uploaded, so they are resumed from and
    uploaded (docs/tiers.md: the cache "keeps ... every checkpoint not yet uploaded. It deletes
    a checkpoint only once it is uploaded"; "discarding them would throw away completed
    training")."""
    url, _ = remote
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", "2")  # the killed job's S3 lease expires soon
    model, opt = _model()
    _run(url, tmp_path / "A", range(0, 4), model, opt)
    assert _valid_steps(url)[-1] == 4

    progress, out = tmp_path / "progress.txt", tmp_path / "final.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # an upload that takes 60 s: B's saves commit into its cache, none reaches the remote
    proc = subprocess.Popen(
        [
            sys.executable,
            str(JOB),
            url,
            str(tmp_path / "B"),
            str(out),
            str(progress),
            "8",
            "60",
            "0",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (progress.exists() and "6\n" in progress.read_text()):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate()
    assert "start 4" in progress.read_text()
    assert _valid_steps(url)[-1] == 4  # nothing of B reached the remote
    in_cache = _valid_steps(tmp_path / "B")
    assert in_cache and in_cache[-1] >= 6, in_cache

    m2, o2 = _model(seed=7)
    state = sg.TrainState(model=m2, optimizer=o2)
    deadline = time.monotonic() + 30
    while True:
        try:
            ck = sg.Checkpointer(
                url,
                cache=tmp_path / "B",
                handle_signals=False,
                upload_retry=FAST,
                save=sg.Every(steps=1),
                keep=sg.Keep(last=2),
            )
            break
        except sg.LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    with ck:
        got = ck.restore(state)
    assert got == in_cache[-1], (got, in_cache, _valid_steps(tmp_path / "B"))
    assert in_cache[-1] in _valid_steps(url)  # uploaded at close()


# --------------------------------------------------------------------------- sizes, prune, close


def test_ls_own_and_shared_sizes_count_every_byte_once_on_both_tiers(
    remote: tuple[str, Store], tmp_path: Path
) -> None:
    url, store = remote
    model, opt = _model()
    _run(_Slow(store, 0.02), tmp_path / "cache", range(0, 7), model, opt, keep=sg.Keep(last=3))
    from savegame.checkpointer.retention import list_run

    for root in (store, as_store(str(tmp_path / "cache"))):
        infos = list_run(root, aside=True)
        ckpts = [i for i in infos if i.kind not in ("retired", "damaged", "leftover")]
        retired = [i for i in infos if i.kind == "retired"]
        assert ckpts, infos
        # what a user reads: own + shared == what a restore reads; own of the run + retired files
        # == the bytes of every tensor file on the tier
        disk = 0
        for entry in root.list(""):
            name = entry.name if hasattr(entry, "name") else str(entry)
            if name.startswith("retired-") and name.endswith(".safetensors"):
                disk += root.size(name)
            elif name.startswith("step-"):
                for f in root.list(name):
                    fname = f.name if hasattr(f, "name") else str(f)
                    fname = fname.rsplit("/", 1)[-1]
                    if fname.endswith(".safetensors"):
                        disk += root.size(f"{name}/{fname}")
        for i in ckpts:
            man = _manifest(root, i.step)
            own = sum(int(e["size"]) for k, e in man["files"].items() if "/" not in k)
            shared = sum(int(e["size"]) for k, e in man["files"].items() if "/" in k)
            assert (i.own, i.shared, i.size) == (own, shared, own + shared), (root, i)
        assert sum(i.own for i in ckpts) + sum(i.size for i in retired) == disk, (root, infos)


def test_prune_of_the_remote_while_training_holds_it_is_refused_and_deletes_nothing(
    remote: tuple[str, Store], tmp_path: Path
) -> None:
    url, store = remote
    model, opt = _model()
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(
        url,
        cache=tmp_path / "cache",
        handle_signals=False,
        upload_retry=FAST,
        save=sg.Every(steps=1),
        keep=sg.Keep(last=3),
    ) as ck:
        ck.restore(state)
        for step in range(4):
            _train_step(model, opt, step)
            ck.step(state, step + 1)
        deadline = time.monotonic() + 20
        while _valid_steps(store) != [2, 3, 4]:  # the uploads (and remote retention) settle
            assert time.monotonic() < deadline, _valid_steps(store)
            time.sleep(0.05)
        before = _valid_steps(store)
        rc, out = _cli("prune", url, "--keep-last", "1")
        assert rc == 2, out  # "a locked run" (README, exit status)
        assert "use" in out.lower() or "lock" in out.lower() or "held" in out.lower(), out
        assert _valid_steps(store) == before
        for step in range(4, 6):
            _train_step(model, opt, step)
            ck.step(state, step + 1)
    live = _flat(model, opt)
    assert _valid_steps(store)[-1] == 6
    _verify_all(url, _valid_steps(store))
    m2, o2 = _model(seed=3)
    with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2)) == 6
    _assert_bitwise(_flat(m2, o2), live)


@pytest.mark.parametrize("async_save", [False, True])
def test_close_with_uploads_pending_uploads_all_then_the_cache_keeps_only_the_newest(
    remote: tuple[str, Store], tmp_path: Path, async_save: bool
) -> None:
    url, store = remote
    slow = _Slow(store, 0.15)
    model, opt = _model()
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(
        slow,
        cache=tmp_path / "cache",
        handle_signals=False,
        upload_retry=FAST,
        save=sg.Every(steps=1),
        keep=sg.Keep(last=2),
        async_save=async_save,
    ) as ck:
        ck.restore(state)
        for step in range(6):
            _train_step(model, opt, step)
            ck.step(state, step + 1)
        assert _valid_steps(store)[-1:] != [6]  # uploads lag behind: close() has work to do
    live = _flat(model, opt)
    assert _valid_steps(store) == [5, 6]
    assert _valid_steps(tmp_path / "cache") == [6]
    _verify_all(url, [5, 6])
    _verify_all(str(tmp_path / "cache"), [6])
    m2, o2 = _model(seed=3)
    with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2)) == 6
    _assert_bitwise(_flat(m2, o2), live)


# --------------------------------------------------------------------------- failures, switch


def test_remote_down_is_a_typed_error_the_cache_keeps_what_the_remote_lacks_then_catches_up(
    remote: tuple[str, Store], tmp_path: Path
) -> None:
    url, store = remote
    slow = _Slow(store, 0.0)
    model, opt = _model()
    state = sg.TrainState(model=model, optimizer=opt)
    cache = tmp_path / "cache"
    failures: list[sg.StorageError] = []
    at_close: list[sg.StorageError] = []
    ck = sg.Checkpointer(
        slow,
        cache=cache,
        handle_signals=False,
        upload_retry=FAST,
        save=sg.Every(steps=1),
        keep=sg.Keep(last=1),
    )
    try:
        ck.restore(state)
        for step in range(8):
            if step == 3:
                deadline = time.monotonic() + 20
                while _valid_steps(store) != [3]:  # step 3 uploaded, then the remote goes down
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                slow.down = True
            _train_step(model, opt, step)
            try:
                ck.step(state, step + 1)
            except sg.StorageError as e:
                failures.append(e)
            time.sleep(0.1)
    finally:
        try:
            ck.close()
        except sg.StorageError as e:
            failures.append(e)
            at_close.append(e)
    live = _flat(model, opt)
    assert failures, "an upload that keeps failing is raised"
    assert at_close, "close() waits for the pending uploads and raises the one that failed"
    for e in failures:
        assert isinstance(e, OSError) and e.step is not None and e.step >= 4, e
        assert "step-" in str(e.path), e.path
    assert _valid_steps(store) == [3]
    held = _valid_steps(cache)
    assert held[-1] == 8 and 3 in held, (
        held
    )  # every checkpoint not uploaded, and the newest uploaded
    _verify_all(str(cache), held)

    # the remote comes back: the next run catches up (resumes from the cache, uploads the rest)
    m2, o2 = _model(seed=3)
    with sg.Checkpointer(
        url,
        cache=cache,
        handle_signals=False,
        upload_retry=FAST,
        save=sg.Every(steps=1),
        keep=sg.Keep(last=1),
    ) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2)) == 8
    _assert_bitwise(_flat(m2, o2), live)
    assert _valid_steps(store) == [8]
    assert _valid_steps(cache) == [8]
    _verify_all(url, [8])
    m3, o3 = _model(seed=4)
    with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m3, optimizer=o3)) == 8
    _assert_bitwise(_flat(m3, o3), live)


def test_incremental_off_then_on_between_runs_on_the_same_run_and_cache(
    remote: tuple[str, Store], tmp_path: Path
) -> None:
    url, store = remote
    model, opt = _model()
    cache = tmp_path / "cache"
    plan = [(True, 4), (False, 7), (True, 10), (False, 12), (True, 14)]
    for i, (inc, stop) in enumerate(plan):
        _run(
            _Slow(store, 0.02),
            cache,
            range(0, stop),
            model,
            opt,
            keep=sg.Keep(last=3),
            incremental=inc,
            async_save=i % 2 == 1,
        )
        newest = _valid_steps(store)[-1]
        assert newest == stop
        man = _manifest(store, newest)
        if inc:
            assert _refs(man), (stop, "incremental on: the save shares the frozen base")
            assert man["version"] == 2
        else:
            assert not _refs(man) and man["version"] == 1, (stop, sorted(man["files"]))
    live = _flat(model, opt)
    _verify_all(url, _valid_steps(store))
    _verify_all(str(cache), _valid_steps(cache))
    m2, o2 = _model(seed=3)
    with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2)) == 14
    _assert_bitwise(_flat(m2, o2), live)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_s3_server_stopped_mid_run_is_typed_and_the_next_run_catches_up(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real outage: the S3 server itself stops (connections refused) while uploads lag."""
    import dataclasses

    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = dataclasses.replace(s3_server, endpoint=f"http://127.0.0.1:{port}")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    # close() cannot release the lease of a server that is down: keep its expiry short
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", "3")
    bucket = f"sg-s19-stop-{os.getpid()}"
    s3.make_bucket(bucket)
    url = f"s3://{bucket}/runs/exp"
    cache = tmp_path / "cache"
    model, opt = _model()
    state = sg.TrainState(model=model, optimizer=opt)
    failures: list[BaseException] = []
    stopped = False
    try:
        ck = sg.Checkpointer(
            url,
            cache=cache,
            handle_signals=False,
            upload_retry=FAST,
            save=sg.Every(steps=1),
            keep=sg.Keep(last=2),
        )
        try:
            ck.restore(state)
            for step in range(6):
                if step == 3:
                    deadline = time.monotonic() + 20
                    while _valid_steps(as_store(url))[-1:] != [3]:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                    server.stop()
                    stopped = True
                _train_step(model, opt, step)
                try:
                    ck.step(state, step + 1)
                except sg.StorageError as e:
                    failures.append(e)
        finally:
            try:
                ck.close()
            except sg.StorageError as e:
                failures.append(e)
    finally:
        if not stopped:
            server.stop()
    assert failures and all(isinstance(e, sg.StorageError) for e in failures), failures
    live = _flat(model, opt)
    assert _valid_steps(cache)[-1] == 6
    _verify_all(str(cache), _valid_steps(cache))
    # the server comes back (moto keeps its buckets in this process) on the same port
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        m2, o2 = _model(seed=3)
        deadline = time.monotonic() + 30
        while True:  # the unreleased lease expires after SAVEGAME_LEASE_SECONDS
            try:
                ck = sg.Checkpointer(
                    url,
                    cache=cache,
                    handle_signals=False,
                    upload_retry=FAST,
                    save=sg.Every(steps=1),
                    keep=sg.Keep(last=2),
                )
                break
            except sg.LockedError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with ck:
            assert ck.restore(sg.TrainState(model=m2, optimizer=o2)) == 6
        _assert_bitwise(_flat(m2, o2), live)
        assert _valid_steps(as_store(url))[-1] == 6
        _verify_all(url, _valid_steps(as_store(url)))
        m3, o3 = _model(seed=4)
        with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
            assert ck.restore(sg.TrainState(model=m3, optimizer=o3)) == 6
        _assert_bitwise(_flat(m3, o3), live)
    finally:
        server.stop()


# --------------------------------------------------------------------------- remote crashes


def _crash_run(
    remote: Store, cache: Path, faults: dict[str, int] | None
) -> tuple[FaultyStore, dict[str, torch.Tensor] | None]:
    faulty = FaultyStore(
        remote,
        faults,
        crash=True,
        error=lambda: OSError(errno.EIO, "remote writer killed (simulated)"),
    )
    model, opt = _model()
    state = sg.TrainState(model=model, optimizer=opt)
    retry = sg.UploadRetry(attempts=1, first_delay=0.0, max_delay=0.0)
    try:
        ck = sg.Checkpointer(
            faulty,
            cache=cache,
            handle_signals=False,
            upload_retry=retry,
            save=sg.Every(steps=1),
            keep=sg.Keep(last=1),
        )
    except OSError:
        return faulty, None  # died while opening the run: nothing trained
    try:
        ck.restore(state)
        for step in range(6):
            _train_step(model, opt, step)
            try:
                ck.step(state, step + 1)
            except sg.StorageError:  # an upload failure, raised before this step's save:
                ck.step(state, step + 1)  # raised once, so the step is saved now
            time.sleep(0.01)
    finally:
        try:
            ck.close()
        except (sg.StorageError, OSError):
            pass
    return faulty, _flat(model, opt)


@pytest.mark.slow
def test_a_crash_at_every_remote_operation_leaves_no_partial_checkpoint_and_the_next_run_catches_up(
    remote: tuple[str, Store], tmp_path: Path
) -> None:
    """The remote side dies (every later call fails, nothing cleaned up) at each of its
    operations in turn — staging, commit, LATEST/run.json, retiring a shared file, deleting a
    checkpoint — while the cache keeps training. Every checkpoint the remote lists verifies;
    the next run on the same cache resumes the newest step and uploads it; a fresh cache then
    restores it from the remote, bitwise."""
    base_url = remote[0]

    def fresh(k: str) -> str:  # an empty run location on the same kind of remote
        if base_url.startswith("s3://"):
            return f"{base_url}-{k}"
        (tmp_path / k).mkdir()
        return str(tmp_path / k)

    counted, _ = _crash_run(as_store(fresh("clean")), tmp_path / "clean-cache", None)
    points = {
        p: n for p, n in counted.calls.items() if p not in ("list", "open", "lock", "makedirs")
    }
    assert points.get("rename"), points  # retention retired the shared base on the remote
    trials = [(p, i) for p, n in sorted(points.items()) for i in range(1, n + 1)]
    failures = []
    for k, (point, nth) in enumerate(trials):
        rdir, cache = fresh(f"r{k}"), tmp_path / f"c{k}"
        faulty, live = _crash_run(as_store(rdir), cache, {point: nth})
        if not faulty.fired or live is None:
            continue
        try:
            store = as_store(rdir)
            for s in _valid_steps(store):
                rc, out = _cli("verify", f"{rdir}/step-{s:012d}")
                assert rc == 0, ("listed but does not verify", s, out)
            m2, o2 = _model(seed=3)
            with sg.Checkpointer(
                rdir,
                cache=cache,
                handle_signals=False,
                upload_retry=FAST,
                save=sg.Every(steps=1),
                keep=sg.Keep(last=1),
            ) as ck:
                assert ck.restore(sg.TrainState(model=m2, optimizer=o2)) == 6
            _assert_bitwise(_flat(m2, o2), live)
            assert _valid_steps(store)[-1] == 6, _valid_steps(store)
            for s in _valid_steps(store):
                rc, out = _cli("verify", f"{rdir}/step-{s:012d}")
                assert rc == 0, ("after catching up", s, out)
            m3, o3 = _model(seed=4)
            with sg.Checkpointer(rdir, cache=tmp_path / f"f{k}", handle_signals=False) as ck:
                assert ck.restore(sg.TrainState(model=m3, optimizer=o3)) == 6
            _assert_bitwise(_flat(m3, o3), live)
        except AssertionError as e:
            failures.append(f"{point}#{nth}: {e}"[:400])
    assert not failures, "\n".join(failures)


def test_bit_rot_in_the_caches_shared_file_falls_back_to_the_remote_copy_and_heals(
    remote: tuple[str, Store], tmp_path: Path
) -> None:
    """A flipped byte in the cache's copy of the shared base: restore skips the cache copy
    (a warning), takes the same step from the remote, and the run goes on with good bytes on
    both tiers (docs/tiers.md "Restore"; docs/incremental.md bit rot)."""
    url, store = remote
    cache = tmp_path / "cache"
    model, opt = _model()
    _run(url, cache, range(0, 5), model, opt, keep=sg.Keep(last=2))
    shared = [p for p in cache.iterdir() if p.name.startswith("retired-")]
    assert shared, sorted(p.name for p in cache.iterdir())
    raw = bytearray(shared[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shared[0].write_bytes(bytes(raw))
    m2, o2 = _model(seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = _run(url, cache, range(0, 9), m2, o2, keep=sg.Keep(last=2))
    assert start == 5
    assert any(issubclass(w.category, sg.CorruptCheckpointWarning) for w in caught), caught
    live = _flat(m2, o2)
    for root, root_str in ((store, url), (as_store(str(cache)), str(cache))):
        _verify_all(root_str, _valid_steps(root))
    m3, o3 = _model(seed=6)
    with sg.Checkpointer(url, cache=tmp_path / "fresh", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m3, optimizer=o3)) == 9
    _assert_bitwise(_flat(m3, o3), live)
    m4, o4 = _model(seed=7)
    with sg.Checkpointer(url, cache=tmp_path / "fresh2", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m4, optimizer=o4), step=8) == 8
