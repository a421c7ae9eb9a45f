"""The newest checkpoint's data is read while the run's lease is being taken (issue 11,
engine/fetch.py ``ReadAhead``), yet nothing of it reaches a live tensor unless the lease is
held, the holder's listing shows the very manifest and data versions read and every hash
matched (docs/remote.md, "The lease" and "Round trips").

The windows are opened deterministically: the new holder's lease PUT waits until a data GET
of the read-ahead is in flight, and first runs what the test puts there (the previous
holder's last commit), or is refused (another live writer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import fetch
from savegame.format import layout
from savegame.storage import objectstore

from .conftest import S3Server


def _state(seed: int, width: int = 32) -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return model, sg.TrainState(model=model, optimizer=opt, rng=False)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Window:
    """``arm(fn)``: the next lease PUT first waits until a data GET of the read-ahead is in
    flight, then calls ``fn()``. ``hold``: those GETs then wait (until the read-ahead is
    cancelled, or ``go`` is set) before their request is sent. ``jobs``: every read-ahead
    started."""

    def __init__(self) -> None:
        self.armed: list[Callable[[], None]] = []
        self.in_flight = threading.Event()
        self.go = threading.Event()
        self.hold = False
        self.jobs: list[fetch.ReadAhead] = []
        self.folders: list[str] = []  # the data files read ahead (store keys)

    def arm(self, fn: Callable[[], None]) -> None:
        self.armed.append(fn)


@pytest.fixture
def window(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Window]:
    w = _Window()
    real_put = objectstore.Lease._put
    real_start = fetch.ReadAhead.start.__func__  # type: ignore[attr-defined]
    real_open = objectstore.ObjectStore.open_pinned

    def start(cls: type[fetch.ReadAhead], store: Any) -> fetch.ReadAhead | None:
        job = real_start(cls, store)
        if job is not None:
            w.jobs.append(job)
        return job

    def open_pinned(self: objectstore.ObjectStore, key: str, size: int, etag: str | None) -> Any:
        blob = real_open(self, key, size, etag)
        w.folders.append(key)
        job = w.jobs[-1]
        real_readinto = blob.readinto

        def readinto(offset: int, dest: Any) -> None:
            w.in_flight.set()
            while w.hold and not w.go.wait(0.01):
                if job._stop.is_set():
                    break
            real_readinto(offset, dest)

        blob.readinto = readinto
        return blob

    def put(self: objectstore.Lease, mode: Any) -> Any:
        if w.armed and mode == "create":
            fn = w.armed.pop()
            assert w.in_flight.wait(timeout=30), "no data GET was read ahead of the lease"
            fn()
        return real_put(self, mode)

    monkeypatch.setattr(fetch.ReadAhead, "start", classmethod(start))
    monkeypatch.setattr(objectstore.ObjectStore, "open_pinned", open_pinned)
    monkeypatch.setattr(objectstore.Lease, "_put", put)
    yield w
    w.go.set()
    assert not w.armed, "the lease was never taken"


def test_a_commit_while_the_data_is_read_ahead_is_the_one_restored(
    s3_url: str, window: _Window
) -> None:
    model, state = _state(0)
    previous = sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False)
    previous.save(state, 3)
    for p in model.parameters():  # step 5 differs from step 3 in every tensor
        p.data.add_(1.0)
    newest = _params(model)

    def last_save_then_let_go() -> None:
        previous.save(state, 5)
        previous.close()

    window.arm(last_save_then_let_go)
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        # the window this test is about: step 3's data was being read when step 5 committed
        assert [k.split("/")[0] for k in window.folders] == [layout.step_dir(3)]
        assert ckpt.restore(fresh_state) == 5
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, newest[k]), k
    job = window.jobs[0]
    assert not job._thread.is_alive()  # dropped at the end of restore(), its memory freed
    assert all(f.mm is None for f in job.files.values())


def test_a_checkpoint_replaced_while_its_data_is_read_ahead_is_read_as_it_is_now(
    s3_server: S3Server, s3_url: str, window: _Window
) -> None:
    """The checkpoint being read ahead is replaced (other objects under the same names, as a
    previous holder's delete and new commit of the same step leave) while its first data GET
    is about to be sent: the GETs pinned to the old version fail, or the holder's listing
    shows another version; the new bytes are restored, bitwise, nothing of the old mixed in."""
    import boto3

    model, state = _state(0)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        ckpt.save(state, 5)
    other_url = s3_url + "-other"
    for p in model.parameters():
        p.data.mul_(-2.0)
    replaced = _params(model)
    with sg.Checkpointer(other_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        ckpt.save(state, 5)
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    step = layout.step_dir(5)

    def replace_step_5() -> None:
        names = [o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}-other/{step}/")["Contents"]]  # fmt: skip
        names.sort(key=lambda n: n == layout.MANIFEST)  # the manifest last, as a commit
        for name in names:
            client.copy_object(
                Bucket=bucket,
                Key=f"{prefix}/{step}/{name}",
                CopySource={"Bucket": bucket, "Key": f"{prefix}-other/{step}/{name}"},
            )
        window.go.set()

    window.hold = True  # the read-ahead's first GET is sent only once the step is replaced
    window.arm(replace_step_5)
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        assert [k.split("/")[0] for k in window.folders] == [step]
        assert ckpt.restore(fresh_state) == 5
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, replaced[k]), k


def test_another_live_writer_is_named_and_the_read_ahead_stops(
    s3_url: str, window: _Window
) -> None:
    """LockedError still names the holder; the data GETs read ahead of the refused lease
    (held in flight until then) stop, no thread of theirs is left and their memory is freed."""
    _, state = _state(0, width=256)
    with sg.Checkpointer(s3_url, handle_signals=False) as first:
        first.save(state, 1)
        before = set(threading.enumerate())
        window.hold = True
        window.arm(lambda: None)
        with pytest.raises(errors.LockedError, match=r"in use by another writer \(pid \d+ on "):
            sg.Checkpointer(s3_url, handle_signals=False)
        assert window.in_flight.is_set()  # a data GET was under way when the lease was refused
        job = window.jobs[-1]  # (the first writer's found nothing to read ahead)
        assert job._stop.is_set()
        # (the S3 server of the tests runs in this process: its request threads are not ours;
        # the snapshot pool is shared by the process and started once)
        left = [
            t
            for t in threading.enumerate()
            if t not in before
            and t.name.startswith(("savegame", "ThreadPoolExecutor"))
            and not t.name.startswith("savegame-snapshot")
        ]
        assert left == [], left  # the read-ahead's thread and its requests' pool are gone
        assert job.files and all(f.mm is None for f in job.files.values())
        assert first.restore(state) == 1  # the holder is untouched


def test_no_read_ahead_when_the_checkpoint_exceeds_the_staging_budget(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is read ahead is bounded by the staging budget (what the restore stages anyway):
    a checkpoint bigger than it is read the usual way, after the lease."""
    model, state = _state(0)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        ckpt.save(state, 2)
    saved = _params(model)
    monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", "1K")
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        job = ckpt.store.read_ahead()  # type: ignore[attr-defined]
        assert job is not None and job.planned.wait(timeout=30)
        assert job.files == {}
        assert ckpt.restore(fresh_state) == 2
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_the_data_read_ahead_is_what_the_restore_uses(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case: nothing changed in the window, so the bytes read ahead are used (no
    second read of the data), into live parameters and into the fresh tensors of optimizer
    moments that do not exist yet, bitwise."""
    from savegame.engine import reader

    model, state = _state(0)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        ckpt.save(state, 4)
    saved = _params(model)
    saved_opt = state["optimizer"].state_dict()
    pulls: list[str] = []
    real_pull = reader._pull
    monkeypatch.setattr(
        reader,
        "_pull",
        lambda blob, where, *a, **k: (pulls.append(where), real_pull(blob, where, *a, **k)),
    )
    torch.manual_seed(1)
    fresh_model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    )
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=1e-2)  # no moments yet
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        job = ckpt.store.read_ahead()  # type: ignore[attr-defined]
        assert job is not None
        assert ckpt.restore(sg.TrainState(model=fresh_model, optimizer=fresh_opt, rng=False)) == 4
        assert ckpt.store.read_ahead() is None  # type: ignore[attr-defined]
    assert pulls == []  # every data byte came from the read-ahead
    assert job.files and all(f.mm is None for f in job.files.values())
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    got = fresh_opt.state_dict()["state"]
    for i, moments in saved_opt["state"].items():
        for name, t in moments.items():
            assert torch.equal(got[i][name], t), (i, name)


def test_a_restore_called_after_the_snapshot_expired_still_uses_the_data_read_ahead(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``restore()`` long after the constructor (the holder's snapshot expired): the versions
    read ahead are confirmed by a HEAD made then, with the lease still held; nothing is read
    twice, and the restore is bitwise right."""
    from savegame.engine import reader

    model, state = _state(0)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        ckpt.save(state, 6)
    saved = _params(model)
    pulls: list[str] = []
    real_pull = reader._pull
    monkeypatch.setattr(
        reader,
        "_pull",
        lambda blob, where, *a, **k: (pulls.append(where), real_pull(blob, where, *a, **k)),
    )
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        ckpt.store._snap.until = 0.0  # type: ignore[attr-defined]  # (expired: 10 s later)
        assert ckpt.restore(fresh_state) == 6
    assert pulls == []
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, saved[k]), k
