"""Restore from a URL on a fresh machine (issue 11), against a real S3 server on loopback (moto):
the newest valid checkpoint read with parallel ranged GETs, every hash checked before a byte
reaches a live tensor, an object replaced mid-read started over once, ``load``/``open``/
``verify`` of a checkpoint URL, and resharding from a URL (2 ranks -> 1 process and back).

The same cases with counted requests and a memory bound are in
``tests/test_unmappable_restore.py`` (a simulated store whose blobs cannot map).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import as_store, locate
from savegame.storage.objectstore import ObjectStore, _ObjBlob

from .conftest import S3Server

TESTS = Path(__file__).resolve().parent.parent


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))


def _train_and_save(url: str, steps: tuple[int, ...] = (5,)) -> dict[int, dict[str, torch.Tensor]]:
    """A model + Adam trained a little and saved at ``steps`` to ``url``; returns the model's
    tensors at each step."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    out = {}
    with sg.Checkpointer(url, keep=sg.Keep(last=10), handle_signals=False) as ckpt:
        for step in steps:
            opt.zero_grad()
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
            state["extras"]["epoch"] = step
            ckpt.save(state, step)
            out[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _s3_client(server: S3Server) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


def _object(server: S3Server, url: str, key: str) -> tuple[Any, str, str]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return _s3_client(server), bucket, f"{prefix}/{key}"


def _fresh_state(seed: int = 1) -> tuple[torch.nn.Module, sg.TrainState]:
    model = _model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, sg.TrainState(model=model, optimizer=opt, extras={"epoch": -1})


@pytest.fixture
def small_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of 32 KiB: even this small checkpoint takes many parallel ranged GETs."""
    monkeypatch.setattr(reader, "REQUEST_BYTES", 32 << 10)
    monkeypatch.setattr(reader, "REQUESTS_IN_FLIGHT", 8)


@pytest.mark.parametrize("budget", ["1G", "0"])
def test_restore_from_s3_on_a_fresh_machine_equals_saved(
    s3_url: str, small_requests: None, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", budget)  # 0: live bytes wait in a temp file
    saved = _train_and_save(s3_url, (3, 5))
    assert isinstance(as_store(s3_url), ObjectStore)
    model, state = _fresh_state()
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[5][k]), k
    assert state["extras"] == {"epoch": 5}


def test_corrupt_object_leaves_live_model_untouched_and_falls_back(
    s3_server: S3Server, s3_url: str, small_requests: None
) -> None:
    saved = _train_and_save(s3_url, (3, 5))
    key = f"{layout.step_dir(5)}/rank-00000.safetensors"
    client, bucket, obj = _object(s3_server, s3_url, key)
    data = bytearray(client.get_object(Bucket=bucket, Key=obj)["Body"].read())
    m = reader.read_manifest(locate(f"{s3_url}/{layout.step_dir(5)}"))
    last = max((c for t in m.tensors.values() for c in t.chunks), key=lambda c: c.offset)
    data[last.offset + last.length - 1] ^= 0xFF  # the last bytes read
    client.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
    problems = reader.verify(f"{s3_url}/{layout.step_dir(5)}")
    assert len(problems) == 1 and "does not match its hash" in problems[0], problems
    assert "secret" not in problems[0]
    # the corrupt step 5 never reaches the live model; step 3 is restored instead
    model, state = _fresh_state()
    live = dict(model.named_parameters())
    m5 = reader.read_manifest(locate(f"{s3_url}/{layout.step_dir(5)}"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def dest(k: str, entry: Any) -> torch.Tensor | None:
        t = live.get(k.removeprefix("model/"))
        return t.data if t is not None and reader.fits(t.data, entry) else None

    with pytest.raises(errors.IntegrityError):
        reader.load_tensors(locate(f"{s3_url}/{layout.step_dir(5)}"), m5, dest=dest)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.warns(errors.CorruptCheckpointWarning):
        with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
            assert ckpt.restore(state) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[3][k]), k


def _replacing_reads(
    monkeypatch: pytest.MonkeyPatch,
    server: S3Server,
    url: str,
    key: str,
    *,
    times: int,
) -> list[int]:
    """Make the object ``key`` change on the server during its first data reads (``times`` of
    them): each such read puts other bytes of the same size (a new ETag), reads (the pinned
    GET gets 412: ChangedError), then puts the original bytes back — so a restart finds the
    original, now under the original ETag, unless ``times`` > 1, when the restart's read
    finds it changed again."""
    client, bucket, obj = _object(server, url, key)
    original = client.get_object(Bucket=bucket, Key=obj)["Body"].read()
    other = bytearray(original)
    other[-1] ^= 0xFF
    real = _ObjBlob.readinto
    hits: list[int] = []

    def readinto(self: _ObjBlob, offset: int, dest: memoryview) -> None:
        if self._key.endswith(key) and offset > 4096 and len(hits) < times:
            hits.append(offset)
            client.put_object(Bucket=bucket, Key=obj, Body=bytes(other))
            try:
                real(self, offset, dest)
            finally:
                client.put_object(Bucket=bucket, Key=obj, Body=original)
            return
        real(self, offset, dest)

    monkeypatch.setattr(_ObjBlob, "readinto", readinto)
    return hits


def test_an_object_replaced_mid_restore_is_started_over_once(
    s3_server: S3Server, s3_url: str, small_requests: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _train_and_save(s3_url)
    key = f"{layout.step_dir(5)}/rank-00000.safetensors"
    hits = _replacing_reads(monkeypatch, s3_server, s3_url, key, times=1)
    model, state = _fresh_state()
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 5
    assert len(hits) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[5][k]), k


def test_an_object_that_keeps_changing_is_a_storage_error(
    s3_server: S3Server, s3_url: str, small_requests: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train_and_save(s3_url)
    key = f"{layout.step_dir(5)}/rank-00000.safetensors"
    _replacing_reads(monkeypatch, s3_server, s3_url, key, times=1000)
    loc = locate(f"{s3_url}/{layout.step_dir(5)}")
    m = reader.read_manifest(loc)
    with pytest.raises(errors.StorageError, match="changed twice"):
        reader.load_tensors(loc, m)


def test_load_open_and_verify_a_checkpoint_url(s3_url: str, small_requests: None) -> None:
    saved = _train_and_save(s3_url)
    url = f"{s3_url}/{layout.step_dir(5)}"
    tree = sg.load(url)
    for k, v in tree["model"].items():
        assert torch.equal(v, saved[5][k]), k
    assert tree["extras"] == {"epoch": 5}
    assert reader.verify(url) == []
    with sg.open(locate(url)) as r:
        assert torch.equal(r.read("model/0.weight"), saved[5]["0.weight"])
        assert r.metadata()["step"] == 5
        assert r.verify() == []


def test_open_a_checkpoint_url_string(s3_url: str) -> None:
    saved = _train_and_save(s3_url)
    with sg.open(f"{s3_url}/{layout.step_dir(5)}") as r:
        assert torch.equal(r.read("model/2.bias"), saved[5]["2.bias"])


# ---- resharding from a URL ---------------------------------------------------------------------


@pytest.fixture
def launch() -> Iterator[Callable[..., list[int]]]:
    sys.path.insert(0, str(TESTS / "distributed"))
    try:
        from _launch import launch as run

        yield run
    finally:
        sys.path.remove(str(TESTS / "distributed"))


@pytest.mark.distributed
def test_reshard_2_to_1_and_1_to_2_from_s3(
    tmp_path: Path, s3_env: S3Server, launch: Callable[..., list[int]]
) -> None:
    import os

    bucket = f"sg-reshard-{os.getpid()}"
    s3_env.make_bucket(bucket)
    two, one = f"s3://{bucket}/w2", f"s3://{bucket}/w1"
    out = str(tmp_path)
    # 2 ranks (FSDP2) save step 2 to S3 (each rank its own shard file, the manifest last)
    launch("train", 2, {"root": two, "out": out, "kind": "fsdp", "steps": 2, "tag": "w2",
                        "save_at_end": 2})  # fmt: skip
    saved = torch.load(tmp_path / "params-w2.pt")
    assert reader.read_manifest(locate(f"{two}/{layout.step_dir(2)}")).world_size == 2
    # 1 process on a "fresh machine" restores it from the URL
    sys.path.insert(0, str(TESTS / "distributed"))
    try:
        import _worker
    finally:
        sys.path.remove(str(TESTS / "distributed"))
    model, opt = _worker.build("fsdp", 1)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    with sg.Checkpointer(two, handle_signals=False) as ckpt:
        with pytest.warns(UserWarning, match="left as constructed"):
            assert ckpt.restore(state, per_rank="fresh") == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    with sg.Checkpointer(one, handle_signals=False) as ckpt:
        ckpt.save(state, 3)
    # and 2 ranks restore that 1-rank checkpoint from its URL, each its shard
    launch("train", 2, {"root": one, "out": out, "kind": "fsdp", "steps": 3, "tag": "back",
                        "per_rank": "fresh", "expect_start": 3})  # fmt: skip
    back = torch.load(tmp_path / "params-back.pt")
    assert back.keys() == saved.keys()
    for k in saved:
        assert torch.equal(back[k], saved[k]), k
