"""``savegame ls`` prints the interval advice (docs/policies.md) from the newest checkpoint's
measured save cost and the run's MTBF: given when training, ``--mtbf``, or learned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame.cli import main as cli
from savegame.cli.main import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=400, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=400, stderr=True, emoji=False))


def _train(root: Path, last: int, *, mtbf: float | None = None, crash: bool = False) -> None:
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    ck = sg.Checkpointer(root, save=sg.Every(steps=1, mtbf=mtbf), handle_signals=False)
    for s in range(ck.restore(state) + 1, last + 1):
        ck.step(state, s)
    if crash:
        ck._lock.release()  # died without close()
    else:
        ck.close()


def _advice(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("interval advice"))


def test_ls_shows_the_advice_with_the_mtbf_the_run_was_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _train(root, 3, mtbf=8 * 3600)
    assert main(["ls", str(root)]) == 0
    line = _advice(capsys.readouterr().out)
    assert "a save stalls training" in line and "MTBF of 8.0 h (given)" in line
    assert main(["ls", str(root), "--mtbf", "86400"]) == 0
    assert "MTBF of 24.0 h (given)" in _advice(capsys.readouterr().out)


def test_ls_without_a_failure_says_what_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _train(root, 3)
    assert main(["ls", str(root)]) == 0
    line = _advice(capsys.readouterr().out)
    assert "no failure recorded" in line and "--mtbf SECONDS" in line


def test_ls_learns_the_mtbf_from_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _train(root, 3, crash=True)
    _train(root, 5)
    assert main(["ls", str(root)]) == 0
    assert "(learned from 1 failure)" in _advice(capsys.readouterr().out)


def test_ls_refuses_a_bad_mtbf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    _train(root, 2)
    with pytest.raises(SystemExit) as exc:  # refused as the command line is read
        main(["ls", str(root), "--mtbf", "-5"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "mtbf" in err and out == ""  # nothing listed first


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "RUN", "--keep-best", "0", "--monitor", "loss", "--mode", "min"],
        ["prune", "RUN", "--keep-every", "0"],
        ["show", "RUN", "--max-items", "-1"],
    ],
)
def test_a_count_of_zero_or_less_is_refused_as_the_command_line_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """``--keep-best 0`` quietly became "keep the newest only" and pruned every other
    checkpoint; a count below 1 is refused before anything is read or deleted."""
    root = tmp_path / "run"
    _train(root, 3)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(SystemExit) as exc:
        main([str(root) if a == "RUN" else a for a in argv])
    assert exc.value.code == 2
    assert "must be 1 or more" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.parametrize("name", ["run.json", "LATEST"])
def test_show_of_a_run_file_points_to_ls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    root = tmp_path / "run"
    _train(root, 2)
    assert (root / name).is_file()
    assert main(["show", str(root / name)]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "savegame ls" in err


def test_a_broken_pipe_anywhere_in_a_command_exits_141(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BrokenPipeError not seen by rich (a plain write) is the closed pipe too, not "error"."""
    from savegame.cli import commands

    def closed(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(commands, "cmd_ls", closed)
    with pytest.raises(SystemExit) as exc:
        main(["ls", str(tmp_path)])
    assert exc.value.code == 141
    assert "error" not in capsys.readouterr().err
