"""The command line, called in-process: exit codes and what users read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.cli.main import main


def _run(tmp_path: Path, steps: int = 4, keep: sg.Keep | None = None) -> Path:
    root = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 1})
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=keep or sg.Keep(last=10), handle_signals=False) as ck:
        for s in range(1, steps + 1):
            ck.step(state, s, metrics={"val_acc": 0.5 + s / 100})
    return root


def test_ls_lists_every_checkpoint_with_metrics_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path)
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    for s in (1, 2, 3, 4):
        assert f"│    {s} │" in out or f"│ {s} " in out or f" {s} │" in out
    assert "val_acc=0.54" in out
    assert "last" in out


def test_ls_verify_flags_a_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path)
    f = root / "step-000000000002" / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["ls", str(root)]) == 0  # a listing: the manifests are fine
    capsys.readouterr()
    assert main(["ls", str(root), "--verify"]) == 1  # a check that found a problem (README)
    out = capsys.readouterr().out
    assert "NO" in out and "step 2: " in out and "does not match its hash" in out
    assert "damaged" in out and "not ours" not in out


def test_verify_exits_nonzero_on_any_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path)
    assert main(["verify", str(root)]) == 0
    assert "all 4 verified" in capsys.readouterr().out
    (root / "step-000000000003" / "rank-00000.safetensors").unlink()
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "step-000000000003" in out and "missing" in out
    assert main(["verify", str(root / "step-000000000004")]) == 0


def test_verify_reports_truncation_and_broken_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path)
    f = root / "step-000000000001" / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    (root / "step-000000000002" / "manifest.json").write_text("{not json")
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and "not valid JSON" in out


def test_show_prints_the_state_tree_with_dtypes_and_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path)
    assert main(["show", str(root / "step-000000000004")]) == 0
    out = capsys.readouterr().out
    assert "float32[2, 3]" in out  # model weight
    assert "extras" in out and "'epoch': 1" in out
    assert "val_acc=0.54" in out


def test_show_of_a_run_shows_its_newest_valid_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path)
    assert main(["show", str(root)]) == 0
    assert "step 4" in capsys.readouterr().out


def test_missing_path_is_a_clear_error_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prune_dry_run_deletes_nothing_and_prune_applies_the_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path, steps=5)
    assert main(["prune", str(root), "--keep-last", "2", "--dry-run"]) == 0
    assert "3 would be deleted" in capsys.readouterr().out
    assert len(list(root.glob("step-*"))) == 5
    assert main(["prune", str(root), "--keep-last", "1", "--keep-best", "1", "--monitor", "val_acc", "--mode", "max"]) == 0
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000000005"]


def test_prune_uses_the_runs_own_rule_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path, steps=3, keep=sg.Keep(last=10))
    assert json.loads((root / "run.json").read_text())["keep"]["last"] == 10
    assert main(["prune", str(root), "--dry-run"]) == 0
    assert "0 would be deleted" in capsys.readouterr().out


def test_prune_refuses_while_a_training_holds_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _run(tmp_path, steps=2)
    with sg.Checkpointer(root, handle_signals=False):
        assert main(["prune", str(root), "--keep-last", "1"]) == 2
    assert "in use by another writer" in capsys.readouterr().err
    assert len(list(root.glob("step-*"))) == 2


def test_prune_never_deletes_checkpoints_of_another_run(tmp_path: Path) -> None:
    root = _run(tmp_path, steps=3)
    other = _run(tmp_path / "other", steps=1)
    os.rename(other / "step-000000000001", root / "step-000000000000")
    assert main(["prune", str(root), "--keep-last", "1"]) == 0
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000000000", "step-000000000003"]


def test_console_script_is_installed_and_reports_its_version() -> None:
    out = subprocess.run([sys.executable, "-m", "savegame", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"savegame {sg.__version__}"
