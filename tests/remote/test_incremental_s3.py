"""Incremental checkpoints on an object store (moto's S3 on loopback): saving straight to it,
the two-tier upload, and push/pull of a run whose checkpoints share bytes (issue 14 part 2)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import Location, as_store

pytestmark = pytest.mark.network

SHARED = "step-000000000001/rank-00000.safetensors"


def _objects() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    base, head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 2)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, head, torch.optim.Adam(head.parameters(), lr=1e-2)


def _train(root: Any, steps: int, **kw: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    base, head, opt = _objects()
    state = sg.TrainState(base=base, head=head, optimizer=opt)
    with sg.Checkpointer(root, save=sg.Every(steps=1), handle_signals=False, **kw) as ck:
        for step in range(1, steps + 1):
            head(base(torch.ones(4, 32))).sum().backward()
            opt.step()
            opt.zero_grad()
            ck.save(state, step)
    return base, head


def _restored(root: Any, **kw: Any) -> tuple[int, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(9)
    base, head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sg.CorruptCheckpointWarning)
        with sg.Checkpointer(root, handle_signals=False, **kw) as ck:
            got = ck.restore(sg.TrainState(base=base, head=head, optimizer=opt))
    return got, base, head


def _verified(url: str) -> list[int]:
    store = as_store(url)
    refs = reader.list_checkpoints(store)
    assert all(r.valid for r in refs), [(r.step, r.error) for r in refs]
    for r in refs:
        assert reader.verify(Location(store, r.location.key)) == [], r.step
    return [r.step for r in refs]


def test_saving_to_s3_shares_bytes_and_retention_retires_them(s3_url: str) -> None:
    base, head = _train(s3_url, 4, keep=sg.Keep(last=2))
    assert _verified(s3_url) == [3, 4]
    store = as_store(s3_url)
    assert store.exists(layout.retired_file(SHARED))
    assert SHARED in reader.read_manifest(Location(store, layout.step_dir(4))).refs
    got, b2, h2 = _restored(s3_url)
    assert got == 4 and torch.equal(b2.weight, base.weight) and torch.equal(h2.weight, head.weight)


def test_the_two_tier_upload_with_shared_bytes(s3_url: str, tmp_path: Path) -> None:
    base, head = _train(s3_url, 4, keep=sg.Keep(last=2), cache=tmp_path / "cache")
    assert _verified(s3_url) == [3, 4]
    got, b2, h2 = _restored(s3_url, cache=tmp_path / "fresh-cache")
    assert got == 4 and torch.equal(b2.weight, base.weight) and torch.equal(h2.weight, head.weight)


def test_push_and_pull_a_run_with_shared_bytes(s3_url: str, tmp_path: Path) -> None:
    local = tmp_path / "run"
    base, head = _train(local, 4, keep=sg.Keep(last=2))
    report = sg.push(local, s3_url)
    assert sorted(report.copied) == [3, 4]
    assert _verified(s3_url) == [3, 4]
    assert sorted(sg.push(local, s3_url).skipped) == [3, 4]  # a re-run moves nothing again
    back = tmp_path / "back"
    sg.pull(s3_url, back)
    got, b2, h2 = _restored(back)
    assert got == 4 and torch.equal(b2.weight, base.weight) and torch.equal(h2.weight, head.weight)
