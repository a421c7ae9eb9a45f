"""The read-ahead of the lease hashes each chunk of a data file in order as its bytes arrive
(issue 11, engine/fetch.py ``ReadAhead._advance``): when the last byte lands only its own piece
is left to hash, yet a chunk is "matched" only once every byte of it arrived and was hashed,
and a late flipped byte or an object replaced mid-download never reaches a live tensor
(docs/remote.md, "Round trips").
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import fetch, reader
from savegame.format import hashing, layout
from savegame.storage import locate, objectstore

from .conftest import S3Server

# ---- the in-order hash, driven piece by piece ------------------------------------------------


def _file(data: bytes, starts: list[int]) -> fetch._AheadFile:
    f = fetch._AheadFile("step/rank-00000.safetensors", len(data), "etag")
    f.starts = starts
    f.got = [0] * len(starts)
    return f


def _chunks(data: bytes, spans: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    return sorted((o, n, hashing.digest(data[o : o + n])) for o, n in spans)


#: chunks over a 1000-byte file cut into requests at 0, 300, 600: a gap (a header) first, one
#: chunk across two requests, one across three, an empty one, one ending at the file's end
_SPANS = [(10, 200), (250, 100), (350, 400), (750, 0), (750, 250)]
_STARTS = [0, 300, 600]


def _arrive(
    ra: fetch.ReadAhead,
    f: fetch._AheadFile,
    data: bytes,
    base: memoryview,
    order: list[tuple[int, int, int]],
    chunks: list[tuple[int, int, str]] | None = None,
    parse_after: int = 0,
) -> None:
    """Deliver ``order``'s pieces (request, start, stop in the file), each request ending after
    its last piece; the manifest's chunks are set after ``parse_after`` pieces."""
    stops = [*f.starts[1:], f.size]
    for k, (i, a, b) in enumerate(order):
        if k == parse_after and chunks is not None:
            f.chunks = chunks
        base[a:b] = data[a:b]
        f.got[i] = b - f.starts[i]
        ra._advance(f, i, base, wait=False)
        if b == stops[i]:
            if f.chunks is None and chunks is not None:
                f.chunks = chunks  # (a request's end waits for the manifest's parse)
            ra._advance(f, i, base, wait=True)


def _pieces(f: fetch._AheadFile, rng: random.Random, piece: int) -> list[tuple[int, int, int]]:
    """Each request's pieces in order, the requests interleaved at random."""
    stops = [*f.starts[1:], f.size]
    queues = [
        [(i, a, min(a + piece, stops[i])) for a in range(f.starts[i], stops[i], piece)]
        for i in range(len(f.starts))
    ]
    out = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_every_chunk_is_hashed_whatever_order_the_pieces_arrive_in(seed: int) -> None:
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(1000))
    chunks = _chunks(data, _SPANS)
    ra = fetch.ReadAhead(None)
    f = _file(data, _STARTS)
    base = memoryview(bytearray(1000))
    order = _pieces(f, rng, rng.choice([7, 50, 128]))
    _arrive(ra, f, data, base, order, chunks, parse_after=rng.randrange(len(order)))
    assert f.ok == set(chunks)
    assert f.hashes is not None and all(h.done for h in f.hashes)


def test_when_the_last_piece_lands_only_its_own_bytes_are_left_to_hash() -> None:
    rng = random.Random(7)
    data = bytes(rng.randrange(256) for _ in range(1000))
    chunks = _chunks(data, _SPANS)
    ra = fetch.ReadAhead(None)
    f = _file(data, _STARTS)
    base = memoryview(bytearray(1000))
    # requests 0 and 1 first, and request 2's pieces, but its last one (950..1000) held back
    order = [(0, 0, 300), (1, 300, 600), (2, 600, 800), (2, 800, 950)]
    _arrive(ra, f, data, base, order, chunks)
    assert f.ok == {c for c in chunks if c[0] + c[1] <= 950}
    assert f.hashes is not None
    (left,) = [h for h in f.hashes if not h.done]
    assert left.chunk == max(chunks) and left.at == 950  # hashed up to the last piece
    _arrive(ra, f, data, base, [(2, 950, 1000)])
    assert f.ok == set(chunks)


def test_a_slow_first_request_does_not_hold_up_the_hash_of_the_chunks_after_it() -> None:
    """Requests end in any order (on S3 the first may well be the slowest): the chunks whose
    bytes all arrived are hashed by then, so a slow first request leaves only its own
    chunks' hashes for its last byte, not the whole file's."""
    rng = random.Random(11)
    data = bytes(rng.randrange(256) for _ in range(1000))
    chunks = _chunks(data, _SPANS)
    ra = fetch.ReadAhead(None)
    f = _file(data, _STARTS)
    base = memoryview(bytearray(1000))
    _arrive(ra, f, data, base, [(2, 600, 1000), (1, 300, 600), (0, 0, 290)], chunks)
    # all but the chunk across requests 0 and 1, whose bytes 290..300 are still on the way
    (waiting,) = [c for c in chunks if c[:2] == (250, 100)]
    assert f.ok == set(chunks) - {waiting}
    _arrive(ra, f, data, base, [(0, 290, 300)])
    assert f.ok == set(chunks)


def test_a_flipped_byte_in_the_last_chunk_leaves_only_that_chunk_unmatched() -> None:
    rng = random.Random(3)
    data = bytearray(rng.randrange(256) for _ in range(1000))
    chunks = _chunks(bytes(data), _SPANS)
    data[999] ^= 0x01  # the file's last byte: the last chunk's last byte
    ra = fetch.ReadAhead(None)
    f = _file(bytes(data), _STARTS)
    base = memoryview(bytearray(1000))
    _arrive(ra, f, bytes(data), base, _pieces(f, rng, 64), chunks)
    last = max(chunks)
    assert last not in f.ok
    assert f.ok == set(chunks) - {last}


def test_a_request_that_never_ends_leaves_the_chunks_it_holds_unmatched() -> None:
    """A request that failed (a stale version's 412, a cut connection) never ends: a chunk
    with a byte it never got is never matched, so never claimed; the others are."""
    rng = random.Random(5)
    data = bytes(rng.randrange(256) for _ in range(1000))
    chunks = _chunks(data, _SPANS)
    ra = fetch.ReadAhead(None)
    f = _file(data, _STARTS)
    base = memoryview(bytearray(1000))
    _arrive(ra, f, data, base, [(0, 0, 300), (2, 600, 1000), (1, 300, 450)], chunks)
    # bytes 450..600 never arrived: only the chunk over them, (350, 400), is unmatched
    assert f.ok == {c for c in chunks if c[1] == 0 or not (c[0] < 600 and c[0] + c[1] > 450)}
    assert f.ok == set(chunks) - {c for c in chunks if c[:2] == (350, 400)}


# ---- against the S3 server ------------------------------------------------------------------


def _state(seed: int, width: int = 256) -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return model, sg.TrainState(model=model, optimizer=opt, rng=False)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def small_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of 8 KiB: the data file is read ahead in several parallel ranged GETs."""
    monkeypatch.setattr(reader, "REQUEST_BYTES", 8 << 10)
    monkeypatch.setattr(reader, "REQUESTS_IN_FLIGHT", 4)


def _client(s3_server: S3Server) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )


def _jobs(monkeypatch: pytest.MonkeyPatch) -> list[fetch.ReadAhead]:
    jobs: list[fetch.ReadAhead] = []
    real_start = fetch.ReadAhead.start.__func__  # type: ignore[attr-defined]

    def start(cls: type[fetch.ReadAhead], store: Any) -> fetch.ReadAhead | None:
        job = real_start(cls, store)
        if job is not None:
            jobs.append(job)
        return job

    monkeypatch.setattr(fetch.ReadAhead, "start", classmethod(start))
    return jobs


def test_a_flipped_byte_in_a_late_chunk_read_ahead_never_reaches_the_live_model(
    s3_server: S3Server, s3_url: str, small_requests: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest checkpoint's last byte is flipped: the read-ahead reads every request of it,
    yet its claim is refused; the usual read then finds the mismatch before anything is
    copied: at that moment the live model is bitwise as it was, and the older checkpoint is
    what gets restored."""
    model, state = _state(0)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        ckpt.save(state, 3)
        older = _params(model)
        model(torch.randn(4, 16)).sum().backward()  # every tensor changes, moments too
        state["optimizer"].step()
        ckpt.save(state, 5)
    step5 = f"{s3_url}/{layout.step_dir(5)}"
    m = reader.read_manifest(locate(step5))
    chunks = [c for t in m.tensors.values() for c in t.chunks]
    assert all("/" not in c.file for c in chunks), {c.file for c in chunks}  # all step 5's own
    last = max(chunks, key=lambda c: c.offset)
    client = _client(s3_server)
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    key = f"{prefix}/{layout.step_dir(5)}/{last.file}"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert len(data) > 3 * (8 << 10)  # several requests
    data[last.offset + last.length - 1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    jobs = _jobs(monkeypatch)
    claims: list[bool] = []
    real_claim = fetch.ReadAhead.claim

    def claim(self: fetch.ReadAhead, key: str, wanted: Any) -> Any:
        got = real_claim(self, key, wanted)
        claims.append(got is not None)
        return got

    monkeypatch.setattr(fetch.ReadAhead, "claim", claim)
    fresh_model, fresh_state = _state(1)
    before = _params(fresh_model)
    at_mismatch: list[dict[str, torch.Tensor]] = []
    real_load = reader.load_tensors

    def load_tensors(*a: Any, **k: Any) -> Any:
        try:
            return real_load(*a, **k)
        except errors.IntegrityError:
            at_mismatch.append(_params(fresh_model))
            raise

    monkeypatch.setattr(reader, "load_tensors", load_tensors)
    with pytest.warns(errors.CorruptCheckpointWarning):
        with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
            assert ckpt.restore(fresh_state) == 3
    assert jobs and claims[0] is False  # read ahead, then refused
    read = jobs[0].files[last.file]
    assert len(read.starts) > 1 and read.hashes is not None
    assert all(h.done for h in read.hashes)  # every byte was read and hashed
    assert (last.offset, last.length, last.hash) not in read.ok
    assert len(at_mismatch) == 1
    for k, v in at_mismatch[0].items():
        assert torch.equal(v, before[k]), k
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, older[k]), k


def test_an_object_replaced_mid_download_of_the_read_ahead_restores_the_new_one(
    s3_server: S3Server, s3_url: str, small_requests: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest checkpoint is replaced (other objects under the same names) after the
    read-ahead's first request arrived and before its others are sent: those, pinned to the
    old version, fail; what arrived (hashed already) is never claimed, and the new bytes are
    restored, bitwise, nothing of the old mixed in."""
    model, state = _state(0)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        ckpt.save(state, 5)
    for p in model.parameters():
        p.data.mul_(-2.0)
    replaced = _params(model)
    with sg.Checkpointer(s3_url + "-other", keep=sg.Keep(last=5), handle_signals=False) as c:
        c.save(state, 5)
    client = _client(s3_server)
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

    # The window, deterministic: the read-ahead's first request arrives; the new holder's
    # lease PUT then waits for it and first replaces the step (as the previous holder's last
    # commit of the same step would, before the new holder's listing); the read-ahead's other
    # requests are sent only after that.
    jobs = _jobs(monkeypatch)
    first_done = threading.Event()
    replaced_now = threading.Event()
    real_open = objectstore.ObjectStore.open_pinned
    real_put = objectstore.Lease._put

    def open_pinned(self: objectstore.ObjectStore, key: str, size: int, etag: str | None) -> Any:
        blob = real_open(self, key, size, etag)
        real_readinto = blob.readinto

        def readinto(offset: int, dest: Any) -> None:
            if offset == 0:
                real_readinto(offset, dest)
                first_done.set()
                return
            assert replaced_now.wait(timeout=30)
            real_readinto(offset, dest)

        blob.readinto = readinto  # type: ignore[method-assign]
        return blob

    def put(self: objectstore.Lease, mode: Any) -> Any:
        if mode == "create" and not replaced_now.is_set():
            assert first_done.wait(timeout=30), "no data was read ahead of the lease"
            replace_step_5()
            replaced_now.set()
        return real_put(self, mode)

    monkeypatch.setattr(objectstore.Lease, "_put", put)
    monkeypatch.setattr(objectstore.ObjectStore, "open_pinned", open_pinned)
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        assert ckpt.restore(fresh_state) == 5
    assert replaced_now.is_set() and jobs
    (read,) = jobs[0].files.values()
    assert len(read.starts) > 1 and read.failed  # its later requests met the new version
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, replaced[k]), k
