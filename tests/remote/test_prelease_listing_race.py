"""The run is listed *before* its lease is taken (issue 11: the listing answers "is this URL a
checkpoint?" and the newest manifests are read while the lease's PUT is in flight), yet what
a resume restores is what the run holds once the lease is held: a commit that lands between
that listing and the lease — the previous holder's last save, just before it let go — is the
one restored, and a checkpoint replaced in that window is read as it is now, never from the
manifest read before (docs/remote.md, "The lease" and "Round trips").

The window is opened deterministically: the new holder's first lease PUT first runs the
previous holder's last actions (commit, release), after the listing and the manifest reads
made before the lease have completed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import objectstore

from .conftest import S3Server


def _state(seed: int) -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return model, sg.TrainState(model=model, optimizer=opt, rng=False)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Window:
    """``arm(fn)``: the next lease PUT (a lease being taken) first waits for the reads its
    store started before the lease (``listed_first``: there were some), then calls ``fn()``."""

    def __init__(self) -> None:
        self.armed: list[Callable[[], None]] = []
        self.listed_first: bool | None = None

    def arm(self, fn: Callable[[], None]) -> None:
        self.armed.append(fn)


@pytest.fixture
def before_first_lease_put(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Window]:
    window = _Window()
    real = objectstore.Lease._put

    def put(self: objectstore.Lease, mode: Any) -> Any:
        if window.armed and mode == "create":
            fn = window.armed.pop()
            snap = self._store._snap
            window.listed_first = snap is not None and snap.before_lease
            if snap is not None and snap.before_lease:
                first = snap.listings[""].result(timeout=30)
                for d in first[0]:  # the manifests read before the lease: done (or failed)
                    fut = snap.small.get(f"{d}/{layout.MANIFEST}")
                    if fut is not None:
                        fut.exception(timeout=30)
            fn()
        return real(self, mode)

    monkeypatch.setattr(objectstore.Lease, "_put", put)
    yield window
    assert not window.armed, "the lease was never taken"


def test_a_commit_between_the_listing_and_the_lease_is_the_one_restored(
    s3_url: str, before_first_lease_put: _Window
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

    before_first_lease_put.arm(last_save_then_let_go)
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        assert before_first_lease_put.listed_first  # the window this test is about
        assert ckpt.restore(fresh_state) == 5
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, newest[k]), k


def test_a_commit_just_before_the_lease_is_restored_with_a_cache(
    s3_url: str, before_first_lease_put: _Window, tmp_path: Any
) -> None:
    model, state = _state(0)
    previous = sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False)
    previous.save(state, 3)
    for p in model.parameters():
        p.data.add_(1.0)
    newest = _params(model)

    def last_save_then_let_go() -> None:
        previous.save(state, 5)
        previous.close()

    before_first_lease_put.arm(last_save_then_let_go)
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(
        s3_url, cache=tmp_path / "cache", keep=sg.Keep(last=5), handle_signals=False
    ) as ckpt:
        assert ckpt.restore(fresh_state) == 5
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, newest[k]), k


def test_run_json_rewritten_between_the_listing_and_the_lease_is_read_as_it_is_now(
    s3_url: str, before_first_lease_put: _Window
) -> None:
    """``run.json`` read before the lease is used only if the run's listing made after the
    lease shows that version: the previous holder's last session (recorded when it closed,
    in the window) is kept when the new holder rewrites the file for its own retention rule."""
    import json

    from savegame.storage import as_store

    _, state = _state(0)
    previous = sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False)
    previous.save(state, 3)
    left: list[dict[str, Any]] = []

    def save_then_let_go() -> None:
        previous.save(state, 5)
        previous.close()
        left.append(json.loads(as_store(s3_url).read(layout.RUN_FILE)))

    before_first_lease_put.arm(save_then_let_go)
    _, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=4), handle_signals=False) as ckpt:
        assert before_first_lease_put.listed_first
        assert ckpt.restore(fresh_state) == 5
        now = json.loads(as_store(s3_url).read(layout.RUN_FILE))
    assert now["keep"]["last"] == 4  # rewritten for the new rule...
    assert now["sessions"] == left[0]["sessions"]  # ...from the version the lease holder saw
    assert left[0]["sessions"][-1]["end"] is not None


def test_a_checkpoint_replaced_between_the_listing_and_the_lease_is_read_as_it_is_now(
    s3_server: S3Server, s3_url: str, before_first_lease_put: _Window
) -> None:
    """The manifest read before the lease is of the old version; the folder's listing made
    after the lease shows another, so the manifest is read again: the new version is
    restored, whole, and nothing of the old one is mixed in."""
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
        # what a previous holder's delete and new commit of the same step leave: other
        # objects under the same names (the manifest last, as a commit writes it)
        names = [o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}-other/{step}/")["Contents"]]  # fmt: skip
        names.sort(key=lambda n: n == layout.MANIFEST)
        for name in names:
            client.copy_object(
                Bucket=bucket,
                Key=f"{prefix}/{step}/{name}",
                CopySource={"Bucket": bucket, "Key": f"{prefix}-other/{step}/{name}"},
            )

    before_first_lease_put.arm(replace_step_5)
    fresh_model, fresh_state = _state(1)
    with sg.Checkpointer(s3_url, keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        assert before_first_lease_put.listed_first
        assert ckpt.restore(fresh_state) == 5
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, replaced[k]), k
    assert reader.verify(f"{s3_url}/{step}") == []


def test_a_url_that_is_a_checkpoint_is_refused_before_anything_is_written(
    s3_server: S3Server, s3_url: str
) -> None:
    """The listing made before the lease answers "is this a checkpoint?": a Checkpointer on a
    checkpoint's URL is refused, and no lease (nor anything else) is written into it."""
    import boto3

    from savegame import errors

    _, state = _state(0)
    with sg.Checkpointer(s3_url, handle_signals=False) as ckpt:
        ckpt.save(state, 5)
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    before = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    with pytest.raises(errors.CheckpointError, match="is a checkpoint"):
        sg.Checkpointer(f"{s3_url}/{layout.step_dir(5)}", handle_signals=False)
    after = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert after == before


def test_another_live_writer_is_still_named(s3_url: str) -> None:
    """The listing before the lease changes nothing for a run in use: LockedError names the
    holder, and what was read ahead for the lease is dropped."""
    from savegame import errors

    _, state = _state(0)
    with sg.Checkpointer(s3_url, handle_signals=False) as first:
        first.save(state, 1)
        with pytest.raises(errors.LockedError, match=r"in use by another writer \(pid \d+ on "):
            sg.Checkpointer(s3_url, handle_signals=False)
