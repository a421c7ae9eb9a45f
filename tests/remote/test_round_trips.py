"""Round trips of the start-up paths on an object store (issue 11, performance): each request
is a network latency that a small checkpoint does not amortize, so their number is pinned here
and cannot grow silently. Counted by a recording proxy between obstore and moto's S3 server.

What a fresh-machine restore, a pull and ``sg.load`` may send (docs/remote.md, "Round trips"):
``run.json`` and each manifest are read once, with one GET (no HEAD before it); the run is
listed at most twice (a restore: before the lease, which answers "is this URL a checkpoint?",
and by the lease holder after, whole: every checkpoint's files with it; a pull: the run, then
the second listing that finds markers of saves in progress, and each checkpoint folder); a
data file is opened from the size and ETag a listing gave (no HEAD), and its ranged GETs are
pinned to that ETag (``If-Match``), so an object replaced in between is still caught.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import reader
from savegame.format import layout
from savegame.tools import transfer

from .conftest import S3Server
from .servers import FaultProxy


class RecordingProxy(FaultProxy):
    """A :class:`FaultProxy` that keeps each request's line and its ``If-Match`` header."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.log: list[tuple[str, str, str]] = []  # (method, path?query, if-match)

    def _take_failure(self, client: socket.socket, reader: Any, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        if_match = next(
            (ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("if-match:")),
            "",
        )
        with self._lock:
            self.log.append((method, target, if_match))
        return super()._take_failure(client, reader, head)

    def take(self) -> list[tuple[str, str, str]]:
        with self._lock:
            out, self.log = self.log, []
        return out


def _kind(method: str, target: str) -> str:
    """``HEAD manifest.json``, ``GET run.json``, ``LIST``, ``GET data``, ``PUT .lock``..."""
    path, _, query = target.partition("?")
    if method == "GET" and "list-type=2" in query:
        return "LIST"
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".safetensors"):
        name = "data"
    if method == "POST" and "delete" in query:
        return "DELETE"
    return f"{method} {name}"


def _counts(log: list[tuple[str, str, str]]) -> collections.Counter[str]:
    return collections.Counter(_kind(m, t) for m, t, _ in log)


@pytest.fixture
def recording(
    s3_env: S3Server, fault_proxy: Callable[[str], FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> Callable[[], RecordingProxy]:
    """``start()``: from now on this process's S3 requests go through a recording proxy."""

    def start() -> RecordingProxy:
        proxy = RecordingProxy(s3_env.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    yield start


def _state(seed: int) -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    return model, sg.TrainState(model=model, optimizer=opt, rng=False)


def _saved_run(url: str, steps: tuple[int, ...] = (3, 5)) -> dict[str, torch.Tensor]:
    model, state = _state(0)
    with sg.Checkpointer(url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        for s in steps:
            for p in model.parameters():  # every tensor changes: each step has its own data
                p.data.add_(1.0)
            state["optimizer"].step()
            ckpt.save(state, s)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_restore_requests(log: list[tuple[str, str, str]]) -> collections.Counter[str]:
    c = _counts(log)
    assert c["GET run.json"] == 1, log  # once, no HEAD before it
    assert c["HEAD run.json"] == 0, log
    assert c["GET manifest.json"] == 2, log  # each checkpoint's manifest once (steps 3 and 5)
    assert c["LIST"] <= 2, log  # the run before the lease, and whole once the lease is held
    assert c["HEAD data"] == 0, log  # opened from the listing's size and ETag
    # "is this a checkpoint, not a run?" is answered by the run's listing made before the
    # lease (docs/remote.md, "Round trips"): no HEAD
    assert c["HEAD manifest.json"] == 0, log
    data = [(m, t, etag) for m, t, etag in log if _kind(m, t) == "GET data"]
    assert data and all(etag for _, _, etag in data), data  # pinned: If-Match on every GET
    assert all(layout.step_dir(5) in t for _, t, _ in data), data  # only the newest is read
    return c


def test_fresh_machine_restore_round_trips(
    s3_url: str, recording: Callable[[], RecordingProxy]
) -> None:
    saved = _saved_run(s3_url)
    proxy = recording()
    model, state = _state(1)
    # a resume with the run's own retention rule (another rule is written into run.json)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 5
    log = proxy.take()
    c = _check_restore_requests(log)
    # the lease: taken, and at close checked and deleted; nothing else is written
    assert c["PUT .lock"] == 1 and c["DELETE"] + c["DELETE .lock"] == 1, log
    assert not [x for x in log if x[0] == "PUT" and not x[1].endswith("/.lock")], log
    assert len(log) <= 8, log
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_fresh_machine_restore_with_a_cache_round_trips(
    s3_url: str, recording: Callable[[], RecordingProxy], tmp_path: Path
) -> None:
    saved = _saved_run(s3_url)
    proxy = recording()
    model, state = _state(1)
    with sg.Checkpointer(
        s3_url, cache=tmp_path / "cache", keep=sg.Keep(last=5), handle_signals=False
    ) as ckpt:
        assert ckpt.restore(state) == 5
    log = proxy.take()
    _check_restore_requests(log)
    assert len(log) <= 7, log
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_pull_round_trips(
    s3_url: str, recording: Callable[[], RecordingProxy], tmp_path: Path
) -> None:
    _saved_run(s3_url)
    proxy = recording()
    report = transfer.pull(s3_url, tmp_path / "run", progress=False)
    assert report.verified and sorted(report.copied) == [3, 5]
    log = proxy.take()
    c = _counts(log)
    assert c["GET manifest.json"] == 2, log  # each manifest once: parsed and copied from one read
    assert c["HEAD manifest.json"] == 0 and c["HEAD data"] == 0, log
    assert c["GET run.json"] == 1 and c["GET LATEST"] == 1, log
    assert c["LIST"] <= 4, log
    assert c["GET data"] == 2, log  # one streaming GET per file
    assert len(log) <= 10, log
    assert reader.verify(tmp_path / "run" / layout.step_dir(5)) == []


def test_load_of_a_checkpoint_url_round_trips(
    s3_url: str, recording: Callable[[], RecordingProxy]
) -> None:
    saved = _saved_run(s3_url, (5,))
    proxy = recording()
    tree = sg.load(f"{s3_url}/{layout.step_dir(5)}")
    log = proxy.take()
    c = _counts(log)
    assert c["GET manifest.json"] == 1 and c["HEAD manifest.json"] == 0, log
    assert c["HEAD data"] <= 1, log
    assert len(log) <= 3, log
    for k, v in tree["model"].items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("read_ahead", [False, True], ids=["plain", "read-ahead"])
def test_an_object_replaced_after_the_listing_never_reaches_live_tensors(
    s3_server: S3Server, s3_url: str, read_ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore opens the data file from the listing taken with the lease; the object is
    replaced before it is read: the pinned GET fails (412), the file is opened anew and its
    new bytes fail their hashes, so the older checkpoint is restored and nothing of the
    replaced one reaches the live model. With the data read ahead of the lease (the default,
    engine/fetch.py ``ReadAhead``) and replaced only after it was read: the bytes read are
    those of the version the holder's listing shows, every hash matched, so step 5 is
    restored as it was committed, and still nothing of the replaced object is used."""
    import boto3

    from savegame.engine import fetch

    monkeypatch.setattr(fetch, "READ_AHEAD", read_ahead)
    saved = _saved_run(s3_url, (3,))
    model, state = _state(0)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        ckpt.restore(state)
        for p in model.parameters():
            p.data.add_(1.0)
        ckpt.save(state, 5)
        saved_5 = {k: v.clone() for k, v in model.state_dict().items()}
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    key = f"{prefix}/{layout.step_dir(5)}/rank-00000.safetensors"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    m = reader.read_manifest(f"{s3_url}/{layout.step_dir(5)}")
    ours = [c for t in m.tensors.values() for c in t.chunks if c.file == "rank-00000.safetensors"]
    last = max(ours, key=lambda c: c.offset)
    model, state = _state(1)
    ckpt = sg.Checkpointer(s3_url, handle_signals=False)  # the lease: the run is listed now
    try:
        ahead = ckpt.store.read_ahead()  # type: ignore[attr-defined]
        assert (ahead is not None) == read_ahead
        if ahead is not None:  # replaced once read: the restore uses what the listing showed
            assert ahead.planned.wait(timeout=60) and ahead.files
            for f in ahead.files.values():
                assert f.done.wait(timeout=60)
        data[last.offset + last.length - 1] ^= 0xFF  # same size, other bytes: a new ETag
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
        if read_ahead:
            assert ckpt.restore(state) == 5
        else:
            with pytest.warns(errors.CorruptCheckpointWarning):
                assert ckpt.restore(state) == 3
    finally:
        ckpt.close()
    expected = saved_5 if read_ahead else saved  # never a byte of the replaced object
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
