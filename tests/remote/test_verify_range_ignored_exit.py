"""`savegame verify <http URL>` on a server that ignores ``Range`` (``python -m http.server``):
the checkpoint is intact, the server cannot serve it piecewise. README "exit status": 1 means a
damaged checkpoint, 2 an error reaching it — so this is 2, with a message saying what to do,
never a FAIL line that calls an intact checkpoint damaged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.cli.main import main
from savegame.format import layout


def test_verify_over_a_server_ignoring_range_exits_2(
    http_server: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    with sg.Checkpointer(run, handle_signals=False) as ckpt:
        ckpt.save(sg.TrainState(model=torch.nn.Linear(3000, 3000), rng=False), 20)
    shutil.copytree(run, Path(http_server.root) / "run")  # type: ignore[attr-defined]
    url = f"{http_server.url}/run/{layout.step_dir(20)}"  # type: ignore[attr-defined]
    assert main(["verify", url]) == 0  # the server honours Range: verified
    capsys.readouterr()
    http_server.ignore_range = True  # type: ignore[attr-defined]
    code = main(["verify", url])
    out = capsys.readouterr()
    assert code == 2, out
    assert "FAIL" not in out.out and "Range" in out.err, out
