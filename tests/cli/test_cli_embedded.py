"""``savegame.cli.main.main()`` called from a host program (a notebook, a script) leaves the
host's streams as it found them, and still escapes what an ASCII terminal cannot show."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.cli.main import main


def test_main_escapes_for_an_ascii_stream_and_gives_its_setting_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "rün"
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.save(sg.TrainState(model=torch.nn.Linear(2, 2), rng=False), 1)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    from savegame.cli import main as cli_main

    monkeypatch.setattr(cli_main, "console", None, raising=False)
    monkeypatch.delattr(cli_main, "console")  # made anew on the replaced stdout
    assert main(["verify", str(run)]) == 0
    out.flush()
    assert "r\\xfcn" in raw.getvalue().decode("ascii")  # escaped, not an encoding error
    assert out.errors == "strict"  # the host's own setting, given back
    with pytest.raises(UnicodeEncodeError):
        out.write("ü")
