"""A damaged newest checkpoint of a 2-rank run (issue 9.8 under torch.distributed): every rank
falls back to the previous step, rank 0 sets the damaged one aside after all ranks read, and
the next save of that step works on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import launch

from savegame.engine import reader
from savegame.format import layout

pytestmark = pytest.mark.distributed

DAMAGED = Path(__file__).with_name("_damaged_scenario.py")


@pytest.mark.parametrize("damaged_rank", [0, 1])
def test_damaged_shard_of_one_rank_is_set_aside_and_its_step_saves_again(tmp_path: Path, damaged_rank: int) -> None:
    run = tmp_path / "run"
    launch("save", 2, {"root": str(run), "out": str(tmp_path), "phase": "save"}, worker=DAMAGED)
    shard = run / layout.step_dir(2) / layout.tensor_file(damaged_rank)
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # one rank's share of step 2 no longer matches its hash
    shard.write_bytes(bytes(raw))
    launch("resume", 2, {"root": str(run), "out": str(tmp_path), "phase": "resume"}, worker=DAMAGED)
    reports = {r: json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)}
    for rank, rep in reports.items():
        assert rep["restored"] == 1 and rep["w"] == 1.0 and rep["rank_only"] == float(rank + 10), rep
        assert rep["saved"] is True
    for rep in reports.values():  # every rank warns, naming the rank that found the damage
        assert any(f"rank {damaged_rank}:" in w and "hash" in w for w in rep["warnings"]), rep["warnings"]
    aside = [p for p in run.iterdir() if layout.parse_damaged_dir(p.name) == 2]
    assert len(aside) == 1 and (aside[0] / layout.tensor_file(damaged_rank)).read_bytes() == bytes(raw)
    assert [r.step for r in reader.list_checkpoints(run)] == [1, 2]
    assert reader.verify(run / layout.step_dir(2)) == []
