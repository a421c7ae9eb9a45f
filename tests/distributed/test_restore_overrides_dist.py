"""Restore's overrides under torch.distributed (issue 13): ``only=``, a misspelt name and
``strict=False`` on 2 gloo ranks, every rank passing the same arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _launch import launch

pytestmark = pytest.mark.distributed

OVERRIDES = Path(__file__).with_name("_overrides_scenario.py")


def test_only_typo_and_non_strict_surgery_on_two_ranks(tmp_path: Path) -> None:
    args = {"root": str(tmp_path / "run"), "out": str(tmp_path)}
    launch("save", 2, {**args, "phase": "save"}, worker=OVERRIDES)
    launch("resume", 2, {**args, "phase": "resume"}, worker=OVERRIDES)
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)]
    saved = torch.load(tmp_path / "saved.pt")
    restored = torch.load(tmp_path / "restored.pt")
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    for rank, report in enumerate(reports):
        assert report["only"]["restored"] == ["model"], rank
        assert report["only"]["skipped"] == ["optimizer", "extras", "rng"], rank
        assert report["opt_state_empty"] and report["epoch"] == 0, rank  # left as they were
        assert "skip='optimiser'" in report["typo"] and "'optimizer'" in report["typo"], rank
        surgery = report["surgery"]
        assert sorted(surgery["mismatched"]) == ["model/2.bias", "model/2.weight", "optimizer"]
        assert surgery["missing"] == ["model/4.weight", "model/4.bias"], rank
        assert report["layer0_equal"], rank
