"""A reader of an incremental checkpoint on an object store while another process's retention
deletes the earlier checkpoint whose file it shares (outside review R10): retention copies the
shared file to its retired name, then deletes the original; a read that finds the original
gone starts the file over from the retired copy (engine/shared.py), never fails."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader, shared
from savegame.format import layout
from savegame.storage import Location, as_store, objectstore

pytestmark = pytest.mark.network

SHARED = "step-000000000001/rank-00000.safetensors"


def _train(url: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 2)
    for p in base.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    state = sg.TrainState(base=base, head=head, optimizer=opt)
    with sg.Checkpointer(url, keep=sg.Keep(last=5), handle_signals=False) as ck:
        for step in (1, 2):
            head(base(torch.ones(4, 64))).sum().backward()
            opt.step()
            opt.zero_grad()
            ck.save(state, step)
    return {"base": base.weight.detach().clone(), "head": head.weight.detach().clone()}


def _retire_step_1_on_first_read(monkeypatch: pytest.MonkeyPatch, url: str) -> list[str]:
    """Another process's retention, between the reader's open and its first read of the
    shared file: copy it aside, then delete step 1."""
    store = as_store(url)
    done: list[str] = []
    real = objectstore._ObjBlob.readinto

    def readinto(self: Any, offset: int, dest: Any) -> None:
        if self._key.endswith(SHARED) and not done:
            done.append(self._key)
            refs = reader.list_checkpoints(store)
            used, sure = shared.references(r for r in refs if r.step != 1)
            assert SHARED in used
            shared.retire(Location(store, layout.step_dir(1)), used, sure)
            store.detach(layout.step_dir(1), f"{layout.TMP_PREFIX}deleted-test")()
        real(self, offset, dest)

    monkeypatch.setattr(objectstore._ObjBlob, "readinto", readinto)
    return done


def test_a_restore_reads_the_retired_copy_when_the_shared_file_moves_during_it(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _train(s3_url)
    store = as_store(s3_url)
    assert SHARED in reader.read_manifest(Location(store, layout.step_dir(2))).refs
    moved = _retire_step_1_on_first_read(monkeypatch, s3_url)
    torch.manual_seed(9)
    base, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sg.CorruptCheckpointWarning)  # step 2, not a fallback
        with sg.Checkpointer(s3_url, handle_signals=False) as ck:
            assert ck.restore(sg.TrainState(base=base, head=head, optimizer=opt)) == 2
    assert moved, "the shared file was not read through an object-store blob"
    assert not store.exists(SHARED) and store.exists(layout.retired_file(SHARED))
    assert torch.equal(base.weight, want["base"]) and torch.equal(head.weight, want["head"])


def test_verify_of_the_later_checkpoint_passes_while_the_shared_file_moves(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(s3_url)
    moved = _retire_step_1_on_first_read(monkeypatch, s3_url)
    store = as_store(s3_url)
    assert reader.verify(Location(store, layout.step_dir(2))) == []
    assert moved
