"""``ls`` / ``verify`` / ``prune`` on runs in every state: exit codes (issue 9.10), damaged
checkpoints and leftover temp folders (issue 9.6, 9.8)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame.cli import main as cli
from savegame.cli.main import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=300, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=300, stderr=True, emoji=False))


def _run(tmp_path: Path, steps: int = 4, keep: sg.Keep | None = None) -> Path:
    root = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    state = sg.TrainState(model=model, extras={"epoch": 1})
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=keep or sg.Keep(last=10), handle_signals=False
    ) as ck:
        for s in range(1, steps + 1):
            ck.step(state, s, metrics={"val_acc": 0.5 + s / 100})
    return root


def _corrupt_data(ckpt: Path) -> None:
    f = ckpt / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _row(out: str, first_cell: str) -> str:
    """The table row whose first cell is ``first_cell``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if cells and cells[0] == first_cell:
            return " | ".join(cells)
    raise AssertionError(f"no row {first_cell!r} in:\n{out}")


# ---- issue 9.10: exit codes --------------------------------------------------------------------


def test_verify_of_a_run_with_a_damaged_run_json_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _run(tmp_path, steps=2)
    (root / "run.json").write_text("{broken")
    with pytest.raises(sg.FormatError, match="run.json"):  # what the verify result must agree with
        sg.Checkpointer(root, handle_signals=False)
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "run.json is damaged" in out and "refuses this run folder" in out
    assert main(["ls", str(root)]) == 0  # a listing, with the problem said
    out = capsys.readouterr().out
    assert "run.json is damaged" in out and "not ours" not in out
    assert "unknown: run.json damaged" in out
    assert main(["ls", "--verify", str(root)]) == 1
    capsys.readouterr()
    assert main(["prune", str(root), "--keep-last", "1"]) == 2  # retention cannot tell whose
    assert "run.json is damaged" in capsys.readouterr().err
    assert len(list(root.glob("step-*"))) == 2


def test_verify_and_ls_of_a_run_with_nothing_committed_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    sg.Checkpointer(root, handle_signals=False).close()  # run.json, nothing saved yet
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "no checkpoints yet" in out and "unrecognised" not in out
    assert main(["ls", str(root)]) == 0
    assert "no checkpoints yet" in capsys.readouterr().out
    assert main(["show", str(root)]) == 2
    assert "no checkpoints yet" in capsys.readouterr().err
    # The first save was killed: only its temp folder is there.
    (root / ".tmp-step-000000000005-abc123").mkdir()
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert (
        "no checkpoints yet" in out and "leftover" in out and ".tmp-step-000000000005-abc123" in out
    )


def test_exit_codes_match_the_documented_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _run(tmp_path, steps=2)
    assert main(["verify", str(root)]) == 0
    assert main(["ls", "--verify", str(root)]) == 0
    _corrupt_data(root / "step-000000000001")
    assert main(["verify", str(root)]) == 1  # a check found problems
    assert main(["ls", "--verify", str(root)]) == 1
    assert main(["ls", str(root)]) == 0  # listing only: manifests are fine
    assert main(["verify", str(tmp_path / "missing")]) == 2  # bad input
    assert main(["ls", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    doc = cli.__doc__ or ""
    assert "0: success" in doc and "1: a check found problems" in doc and "2: bad input" in doc
    readme = Path(__file__).resolve().parents[2] / "README.md"
    assert "same exit status: 0 success" in " ".join(readme.read_text().split())


# ---- issue 9.6 (third bullet) and 9.8: damaged and leftover folders ----------------------------


def test_ls_shows_set_aside_damaged_and_leftover_folders_for_what_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _run(tmp_path, steps=4)
    os.rename(root / "step-000000000002", root / "damaged-step-000000000002-0a1b2c3d")
    (root / ".tmp-step-000000000005-deadbeef").mkdir()
    (root / ".tmp-step-000000000005-deadbeef" / "rank-00000.safetensors").write_bytes(b"x" * 10)
    (root / "step-000000000003" / "manifest.json").write_text("{not json")  # damaged in place
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert "not ours" not in out
    assert "1damagedsetaside,1leftovertempfolder" in "".join(out.split())  # title wraps
    assert "damaged, set aside" in _row(out, "2") and "NO" in _row(out, "2")
    assert "would be pruned" not in _row(out, "2")
    assert "damaged (not restorable" in _row(out, "3")
    assert "temp folder" in _row(out, "-")
    assert "damaged-step-000000000002-0a1b2c3d: set aside" in out
    assert ".tmp-step-000000000005-deadbeef: temp folder" in out
    assert "last" in _row(out, "4") and "yes" in _row(out, "4")

    assert main(["verify", str(root)]) == 1  # step 3's manifest is broken
    out = capsys.readouterr().out
    assert "set aside" in out and "damaged-step-000000000002-0a1b2c3d" in out
    assert "leftover" in out and ".tmp-step-000000000005-deadbeef" in out
    assert "1 of 3 checkpoints have problems" in out  # the set-aside one is not counted

    # prune never touches set-aside or temp folders, nor the checkpoint damaged in place.
    assert main(["prune", str(root), "--keep-last", "1"]) == 0
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == [
        ".tmp-step-000000000005-deadbeef",
        "damaged-step-000000000002-0a1b2c3d",
        "step-000000000003",
        "step-000000000004",
    ]


def test_prune_never_deletes_a_valid_checkpoint_while_keeping_a_damaged_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _run(tmp_path, steps=4)
    _corrupt_data(root / "step-000000000004")  # the newest: kept by any rule, but unusable
    before = sorted(p.name for p in root.glob("step-*"))
    for argv in (
        ["prune", str(root), "--keep-last", "1", "--dry-run"],
        ["prune", str(root), "--keep-last", "1"],
    ):
        assert main(argv) == 1, argv
        out = capsys.readouterr().out
        assert "deleted nothing" in out and "DAMAGED" in out and "step-000000000004" in out
        assert sorted(p.name for p in root.glob("step-*")) == before
    # Once the damaged one is gone (here: moved away), prune applies the rule.
    shutil.move(root / "step-000000000004", tmp_path / "inspect-me")
    assert main(["prune", str(root), "--keep-last", "1"]) == 0
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000000003"]
