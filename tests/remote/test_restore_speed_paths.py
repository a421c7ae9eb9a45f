"""The fast paths of a restore from an object store (issue 11, restore at ~raw download speed)
keep their promises: bytes stream straight into fresh tensors and staging (no bounce buffer)
and are hashed on arrival; ``sg.load(url)`` opens a data file without a HEAD, yet a file of
another size, a missing one or a replaced one is still caught before anything is used; a
session that only restores writes nothing but its lease, and lets go of it with one request.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import fetch, reader
from savegame.format import hashing, layout

from .conftest import S3Server
from .test_round_trips import RecordingProxy, _counts, _kind


@pytest.fixture
def recording(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> Callable[[], RecordingProxy]:
    def start() -> RecordingProxy:
        proxy = RecordingProxy(s3_env.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    return start


def _client(server: S3Server) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


def _state(seed: int) -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return model, sg.TrainState(model=model, optimizer=opt, rng=False)


def _saved(url: str, step: int = 5) -> dict[str, torch.Tensor]:
    model, state = _state(0)
    with sg.Checkpointer(url, handle_signals=False) as ckpt:
        ckpt.save(state, step)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- the sink: scattered into homes and hashed as pieces arrive -------------------------------


class _PieceBlob:
    """A blob that streams like an object store's: ``readinto`` gives a sink the requested
    bytes in pieces of random sizes (never a whole buffer)."""

    takes_sinks = True

    def __init__(self, data: bytes, seed: int) -> None:
        self.data = data
        self.rng = random.Random(seed)
        self.plain_reads = 0

    def readinto(self, offset: int, dest: Any) -> None:
        n = len(dest)
        take = getattr(dest, "take", None)
        if take is None:
            self.plain_reads += 1
            dest[:] = self.data[offset : offset + n]
            return
        pos = offset
        while pos < offset + n:
            k = min(self.rng.randint(1, 5000), offset + n - pos)
            take(memoryview(self.data[pos : pos + k]))
            pos += k


def _chunks(size: int, rng: random.Random) -> list[tuple[int, int]]:
    out, pos = [], 64
    while pos < size:
        n = min(rng.randint(1, 9000), size - pos)
        out.append((pos, n))
        pos += n + rng.choice([0, 0, 0, 17, 3000])  # some gaps, dropped
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_sink_scatters_pieces_into_fresh_homes_and_hashes_them(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(200_000)
    chunks = _chunks(len(data), rng)
    homes = [bytearray(n) for _, n in chunks]
    header = bytearray(64)
    bad_at = chunks[len(chunks) // 2][0]
    targets = [fetch.Target(None, 0, 64, None, own=memoryview(header))]
    for (off, n), home in zip(chunks, homes, strict=True):
        digest = hashing.digest(data[off : off + n])
        if off == bad_at:
            digest = hashing.digest(b"other" + data[off : off + n])
        targets.append(fetch.Target(off, off, n, digest, own=memoryview(home)))
    blob = _PieceBlob(data, seed)
    bad: list[int] = []
    fetch.pull(
        blob.readinto, targets, lambda t: bad.append(t.ident), request=7000, in_flight=3,
        stretch=True, sinks=True,
    )  # fmt: skip
    assert blob.plain_reads == 0
    assert bad == [bad_at]  # the one whose hash does not match, and only it
    assert bytes(header) == data[:64]
    for (off, n), home in zip(chunks, homes, strict=True):
        assert bytes(home) == data[off : off + n]


def test_a_sink_hashes_chunks_without_a_home_and_split_ones_in_order() -> None:
    """``verify``'s shape: nothing has a home; chunks larger than a request are split over
    several and still hashed in file order; a damaged byte in one is reported."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(300_000))
    chunks = [(0, 100_000), (100_000, 150_000), (250_000, 50_000)]
    targets = [fetch.Target(i, off, n, hashing.digest(bytes(data[off : off + n])))
               for i, (off, n) in enumerate(chunks)]  # fmt: skip
    data[120_000] ^= 0xFF
    blob = _PieceBlob(bytes(data), 7)
    bad: list[int] = []
    fetch.pull(blob.readinto, targets, lambda t: bad.append(t.ident), request=32_000, in_flight=4,
               sinks=True)  # fmt: skip
    assert bad == [1] and blob.plain_reads == 0


# ---- sg.load: no HEAD, the first response checks size and version -------------------------------


def test_load_of_a_url_opens_its_data_without_a_head(
    s3_url: str, recording: Callable[[], RecordingProxy]
) -> None:
    saved = _saved(s3_url)
    proxy = recording()
    tree = sg.load(f"{s3_url}/{layout.step_dir(5)}")
    log = proxy.take()
    c = _counts(log)
    assert c["HEAD data"] == 0 and c["GET manifest.json"] == 1 and len(log) == 2, log
    data = [etag for m, t, etag in log if t.endswith(".safetensors")]
    assert data == [""]  # one ranged GET, its version taken from its own response
    for k, v in tree["model"].items():
        assert torch.equal(v, saved[k]), k


def test_load_of_a_url_whose_data_file_is_shorter_says_so(s3_server: S3Server, s3_url: str) -> None:
    _saved(s3_url)
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    key = f"{prefix}/{layout.step_dir(5)}/rank-00000.safetensors"
    client = _client(s3_server)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[:-10])
    with pytest.raises(errors.IntegrityError, match="manifest says"):
        sg.load(f"{s3_url}/{layout.step_dir(5)}")


def test_load_of_a_url_whose_data_file_is_missing_says_so(s3_server: S3Server, s3_url: str) -> None:
    _saved(s3_url)
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    _client(s3_server).delete_object(
        Bucket=bucket, Key=f"{prefix}/{layout.step_dir(5)}/rank-00000.safetensors"
    )
    with pytest.raises(errors.IntegrityError, match="tensor file is missing"):
        sg.load(f"{s3_url}/{layout.step_dir(5)}")


def test_an_unseen_blob_refuses_a_second_version(s3_server: S3Server, s3_url: str) -> None:
    """Reads sent before the first response (no If-Match yet) are checked against the version
    it pinned: a replaced object is a ChangedError, never a mix of two versions."""
    from savegame.storage import locate
    from savegame.storage.base import ChangedError

    _saved(s3_url)
    loc = locate(f"{s3_url}/{layout.step_dir(5)}")
    m = reader.read_manifest(loc)
    name = next(iter(m.files))
    blob = loc.store.open_expecting(loc.sub(name), m.files[name].size)
    blob.readinto(0, memoryview(bytearray(16)))  # pins the version
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    key = f"{prefix}/{loc.sub(name)}"
    client = _client(s3_server)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(ChangedError):
        blob.readinto(100, memoryview(bytearray(16)))


# ---- a restore-only session: the lease, nothing else written, one request to let go -----------


def test_a_restore_only_session_writes_only_its_lease(
    s3_url: str, recording: Callable[[], RecordingProxy], tmp_path: Path
) -> None:
    saved = _saved(s3_url)
    for cache in (None, tmp_path / "cache"):
        proxy = recording()
        model, state = _state(1)
        where = {} if cache is None else {"cache": cache}
        with sg.Checkpointer(s3_url, handle_signals=False, **where) as ckpt:
            assert ckpt.restore(state) == 5
        log = proxy.take()
        c = _counts(log)
        writes = [_kind(m, t) for m, t, _ in log if m in ("PUT", "POST", "DELETE")]
        # the lease: put once, deleted at close with no HEAD first (it was just put: no one
        # can have taken it over); run.json is not put again with the same bytes
        assert writes == ["PUT .lock", "DELETE"], log
        assert c["HEAD .lock"] == 0, log
        # the lease holder lists the run once, whole (the markers and every checkpoint's files
        # are in that listing: no folder is listed on its own); without a cache, one listing
        # before the lease answers "is this URL a checkpoint?" in place of a HEAD of
        # manifest.json (and lets run.json and the manifests be read while the lease is taken)
        run_prefix = s3_url.split("/", 3)[3] + "/"
        lease = next(i for i, (m, t, _) in enumerate(log) if _kind(m, t) == "PUT .lock")
        runs = [
            i
            for i, (m, t, _) in enumerate(log)
            if _kind(m, t) == "LIST" and parse_qs(urlsplit(t).query).get("prefix") == [run_prefix]
        ]
        assert len([i for i in runs if i > lease]) == 1, log
        assert len([i for i in runs if i < lease]) == (1 if cache is None else 0), log
        assert c["LIST"] == len(runs), log
        assert c["HEAD manifest.json"] == 0, log
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), k


def test_a_session_that_saves_still_publishes_run_json(
    s3_url: str, tmp_path: Path, s3_server: S3Server
) -> None:
    _saved(s3_url)
    model, state = _state(2)
    with sg.Checkpointer(s3_url, cache=tmp_path / "cache", keep=sg.Keep(last=4),
                         handle_signals=False) as ckpt:  # fmt: skip
        ckpt.restore(state)
        ckpt.save(state, 6)
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    remote = _client(s3_server).get_object(Bucket=bucket, Key=f"{prefix}/{layout.RUN_FILE}")
    assert remote["Body"].read() == (tmp_path / "cache" / layout.RUN_FILE).read_bytes()
    assert collections.Counter(r.step for r in reader.list_checkpoints(s3_url))[6] == 1
