"""``savegame plot RUN``: the monitored metrics over a run's checkpoints, restarts marked, in the
terminal and as a PNG (``--out``, with matplotlib; a clear error without it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame.cli import main as cli
from savegame.cli import plot
from savegame.cli.main import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=200, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=200, stderr=True, emoji=False))


def _train(root: Path, steps: range, *, crash: bool = False) -> None:
    """One session of a run: steps with a loss and an accuracy; ``crash`` leaves it without
    ``close()`` (as SIGKILL would: the lock file stays, its holder is gone)."""
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    ck = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=50), handle_signals=False)
    ck.restore(state)
    for s in steps:
        ck.step(state, s, metrics={"loss": 1.0 / s, "val_acc": 0.5 + s / 100})
    if crash:
        ck._lock.release()  # the process "died": no close(), so run.json's session stays open
    else:
        ck.close()


def test_plot_prints_a_sparkline_and_a_table_per_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _train(root, range(1, 6))
    assert main(["plot", str(root)]) == 0
    out = capsys.readouterr().out
    assert "5 checkpoints, steps 1..5" in out
    loss = next(line for line in out.splitlines() if line.strip().startswith("loss"))
    assert "█▄▂▁▁" in loss and "1 → 0.2" in loss
    acc = next(line for line in out.splitlines() if line.strip().startswith("val_acc"))
    assert "▁▃▅▆█" in acc and "0.51 → 0.55" in acc
    assert "0.53" in out and "0.3333" in out  # the table: step 3's values


def test_plot_marks_restarts_and_crashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _train(root, range(1, 4), crash=True)  # dies after step 3
    _train(root, range(4, 7))  # resumes from 3, closes cleanly
    _train(root, range(7, 9))  # resumes from 6
    sessions = json.loads((root / "run.json").read_text())["sessions"]
    assert [s["failed"] for s in sessions] == [True, False, False]
    assert main(["plot", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 restarts, 1 after a crash" in out
    ruler = out.splitlines()[2]  # under the first sparkline: x at step 4, | at step 7
    assert ruler.strip() == "x  |" and ruler.index("x") + 3 == ruler.index("|")
    lines = out.splitlines()
    row3 = next(n for n, line in enumerate(lines) if line.strip("│ ").startswith("3 "))
    assert "restart (crash)" in lines[row3 + 1]
    row6 = next(n for n, line in enumerate(lines) if line.strip("│ ").startswith("6 "))
    assert "restart" in lines[row6 + 1] and "crash" not in lines[row6 + 1]


def test_restarts_are_placed_after_the_newest_checkpoint_before_them() -> None:
    def info(step: int, created: float) -> sg.CheckpointInfo:
        return sg.CheckpointInfo(step, Path(f"s{step}"), True, created, 0, {}, True, (), None)

    ckpts = [info(10, 100.0), info(20, 200.0), info(30, 300.0)]
    record = {
        "sessions": [
            {"start": 50.0, "end": 210.0, "failed": True},
            {"start": 250.0, "end": 400.0, "failed": False},
            "junk",
            {"start": 500.0, "end": None, "failed": False},
        ]
    }
    marks = plot.restarts(record, ckpts)
    assert marks == [plot.Restart(250.0, 20, True), plot.Restart(500.0, 30, False)]
    assert plot.restarts(None, ckpts) == [] and plot.restarts({"sessions": 3}, ckpts) == []


def test_plot_out_without_matplotlib_names_the_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    _train(root, range(1, 3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "not installed", installed or not
    out = tmp_path / "metrics.png"
    assert main(["plot", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err
    assert not out.exists()


def test_plot_out_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    root = tmp_path / "run"
    _train(root, range(1, 3), crash=True)
    _train(root, range(3, 5))
    out = tmp_path / "metrics.png"
    assert main(["plot", str(root), "--out", str(out), "--metric", "loss"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_bad_input_exits_2_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _train(root, range(1, 3))
    assert main(["plot", str(root), "--metric", "bleu"]) == 2
    err = capsys.readouterr().err
    assert "no metric 'bleu'" in err and "recorded: loss, val_acc" in err
    assert main(["plot", str(root / "step-000000000001")]) == 2
    assert "one checkpoint, not a run folder" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_plot_of_a_run_without_metrics_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    with sg.Checkpointer(root, save=sg.Every(steps=1), handle_signals=False) as ck:
        ck.step(state, 1)
    assert main(["plot", str(root)]) == 0
    assert "no checkpoint records metrics" in capsys.readouterr().out
    assert main(["plot", str(root), "--out", str(tmp_path / "x.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_plot_takes_a_file_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    _train(root, range(1, 4))
    assert main(["plot", root.as_uri()]) == 0
    assert "3 checkpoints, steps 1..3" in capsys.readouterr().out
