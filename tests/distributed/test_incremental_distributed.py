"""Incremental saves under torch.distributed (issue 14 part 2): every rank compares its own
tensors with the previous checkpoint and writes only what changed; shared tensors, per-rank
keys (``@rankNNNNN/…``) and retention work the same, and a resume restores every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import launch

from savegame.engine import reader
from savegame.format import layout

pytestmark = pytest.mark.distributed

INCREMENTAL = Path(__file__).with_name("_incremental_scenario.py")


def test_two_ranks_share_unchanged_bytes_and_resume_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch("save", 2, {"root": str(run), "out": str(tmp_path), "phase": "save"}, worker=INCREMENTAL)
    refs = reader.list_checkpoints(run)
    assert [r.step for r in refs] == [3, 4] and all(r.valid for r in refs)
    m = refs[-1].manifest
    assert m is not None and m.world_size == 2
    for r in refs:
        assert reader.verify(r.path) == []
    # the frozen model (stored once, by rank 0) and each rank's unchanging tensor refer to
    # step 1's files; what moves is in step 4's own files
    assert m.tensors["frozen/weight"].chunks[0].file == "step-000000000001/rank-00000.safetensors"
    mine = [k for k in m.tensors if k.endswith("extras/mine")]
    assert len(mine) == 2, sorted(m.tensors)
    for key in mine:
        rank = int(key.split("/")[0].removeprefix("@rank"))
        assert m.tensors[key].chunks[0].file == f"step-000000000001/{layout.tensor_file(rank)}"
    for key in (k for k in m.tensors if k.endswith("extras/moving")):
        assert "/" not in m.tensors[key].chunks[0].file
    assert {p.name for p in run.iterdir() if p.name.startswith("retired-")} == {
        "retired-step-000000000001-rank-00000.safetensors",
        "retired-step-000000000001-rank-00001.safetensors",
    }
    launch("resume", 2, {"root": str(run), "out": str(tmp_path), "phase": "resume"}, worker=INCREMENTAL)
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"report-{rank}.json").read_text())
        assert rep == {
            "restored": 4,
            "frozen_equal": True,
            "mine": float(rank + 1),
            "moving": float(100 * rank + 4),
        }, rep
