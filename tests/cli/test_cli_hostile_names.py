"""Issue 9.12: names and paths from files are printed literally by every command.

Rich markup in a name (``[/x]`` crashed ``show``/``verify`` with ``MarkupError``; ``[bold
red]fc.weight`` showed as ``fc.weight``; ``model[best].pt`` as ``model.pt``) and terminal
control bytes (ESC, CR, BEL, C1, bidi overrides) must reach the terminal as visible text.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

import savegame as sg
from savegame.cli import main as cli
from savegame.cli.main import main

# Names a hostile (or just unlucky) file can hold, and how each must appear on screen.
HOSTILE = {
    "[/x]": "[/x]",
    "[bold red]fc.weight": "[bold red]fc.weight",
    "a\x1b[2Jb": "a\\x1b[2Jb",  # ESC [2J clears the screen
    "c\rd": "c\\x0dd",  # CR rewrites the line
    "bell\x07": "bell\\x07",
    "c1\x9bx": "c1\\x9bx",  # C1 CSI: an escape sequence on some terminals
    "rtl\u202egpj.exe": "rtl\\u202egpj.exe",  # RIGHT-TO-LEFT OVERRIDE reorders what follows
    ":cat:": ":cat:",  # not an emoji code
}
RAW_CONTROL = ("\x1b", "\r", "\x07", "\x9b", "\u202e")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Long tmp paths would wrap at the default 80 columns and split the names checked here.
    monkeypatch.setattr(cli, "console", Console(width=400, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=400, stderr=True, emoji=False))


def _check(out: str) -> None:
    for raw in RAW_CONTROL:
        assert raw not in out, repr(raw)


def _flat(text: str) -> str:
    """Output with table borders and wrapping removed, for substring checks."""
    for ch in "│┃┏┓┗┛┡┩└┘┌┐━─╇┳┻┼├┤":
        text = text.replace(ch, " ")
    return " ".join(text.split())


@pytest.fixture()
def hostile_file(tmp_path: Path) -> Path:
    folder = tmp_path / "in[bold]"
    folder.mkdir()
    path = folder / "model[best].safetensors"
    save_file({name: torch.full((2,), float(i)) for i, name in enumerate(HOSTILE)}, path)
    return path


def test_show_prints_hostile_tensor_names_and_paths_literally(
    hostile_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(hostile_file)]) == 0
    out = capsys.readouterr().out
    _check(out)
    for shown in HOSTILE.values():
        assert shown in out, shown
    assert "model[best].safetensors" in out and "in[bold]" in out


def test_verify_prints_hostile_names_literally_when_it_finds_problems(
    hostile_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(hostile_file)]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert "ok" in out and "model[best].safetensors" in _flat(out)


def test_diff_and_convert_print_hostile_names_literally(
    hostile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other[i].safetensors"
    tensors = {name: torch.full((2,), float(i)) for i, name in enumerate(HOSTILE)}
    tensors["[/x]"] = torch.zeros(2) + 7  # differs
    del tensors["a\x1b[2Jb"]  # only in A
    tensors["new\x1b]0;title\x07"] = torch.ones(1)  # only in B; OSC sets the window title
    save_file(tensors, other)
    assert main(["diff", str(hostile_file), str(other), "--all"]) == 1
    out = capsys.readouterr().out
    _check(out)
    flat = _flat(out)
    assert "a\\x1b[2Jb only in A" in flat
    assert "new\\x1b]0;title\\x07 only in B" in flat
    assert "[/x] max |a-b|" in flat
    assert "[bold red]fc.weight identical" in flat
    assert "other[i].safetensors" in "".join(flat.split())  # the title wraps to the table's width

    dst = tmp_path / "out[red]" / "conv[/x]\x1b[2J.safetensors"
    assert main(["convert", str(hostile_file), str(dst), "--to", "safetensors"]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert "out[red]/conv[/x]\\x1b[2J.safetensors" in out
    assert main(["show", str(dst)]) == 0
    _check(capsys.readouterr().out)


def test_errors_on_stderr_quote_paths_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope[/x]\x1b[2J.pt"
    for argv in (
        ["show", str(missing)],
        ["verify", str(missing)],
        ["ls", str(missing)],
        ["prune", str(missing)],
    ):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        _check(captured.err + captured.out)
        assert "nope[/x]\\x1b[2J.pt" in captured.err, argv
    bad = tmp_path / "[bold]x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["show", str(bad)]) == 2
    assert (
        "[bold]x.safetensors: safetensors header length 16 runs past the end"
        in capsys.readouterr().err
    )


def _hostile_run(tmp_path: Path) -> Path:
    root = tmp_path / "run[bold red]\x1b[2J"
    model = torch.nn.Linear(2, 2)
    extras = {"note[/x]": "v[bold]\x1b[31m", "[/y]": 1, "t[/x]\x1b[2J": torch.ones(3)}
    state = sg.TrainState(model=model, extras=extras)
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=1), handle_signals=False
    ) as ck:
        for s in (1, 2, 3):
            ck.step(state, s, metrics={"acc[/x]": 0.5})
    return root


def test_ls_verify_show_prune_on_a_run_whose_path_and_contents_hold_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _hostile_run(tmp_path)
    shown_root = "run[bold red]\\x1b[2J"
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert shown_root in _flat(out) and "acc[/x]=0.5" in _flat(out)

    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert shown_root in out and "all 1 verified" in out

    assert main(["show", str(root)]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert (
        "note[/x]" in out and "v[bold]\\x1b[31m" in out and "[/y]" in out and "acc[/x]=0.5" in out
    )

    # A step folder that another run left behind, to give prune something to print.
    assert main(["prune", str(root), "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert "step-000000000003" in out


def test_verify_and_ls_report_damage_with_hostile_tensor_names_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _hostile_run(tmp_path)
    (ckpt,) = root.glob("step-*")
    f = ckpt / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # the last tensor in the file
    f.write_bytes(bytes(data))
    for argv in (["verify", str(root)], ["verify", str(ckpt)], ["ls", "--verify", str(root)]):
        assert main(argv) == 1, argv
        out = capsys.readouterr().out
        _check(out)
        assert "does not match its hash" in out and "run[bold red]\\x1b[2J" in out, argv


def test_undecodable_path_bytes_are_shown_as_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bad\xff\x1b.safetensors"))
    save_file({"w": torch.ones(1)}, path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    _check(out)
    assert "bad\\xff\\x1b.safetensors" in out


def test_clean_and_lit() -> None:
    from savegame.cli._text import clean, lit, text

    assert clean("plain name.weight") == "plain name.weight"
    assert clean("é中文 ok") == "é中文 ok"  # printable non-ASCII stays as it is
    assert clean("a\tb\nc\x00\x7f\x85") == "a\\x09b\\x0ac\\x00\\x7f\\x85"
    assert clean("\u2066iso\u2069\u200b\u2028") == "\\u2066iso\\u2069\\u200b\\u2028"
    assert clean("\U000e0041tag") == "\\U000e0041tag"
    assert lit("[bold red]x[/]") == "\\[bold red]x\\[/]"
    assert lit("model[best].pt") == "model\\[best].pt"
    assert text("[/x]\x1b").plain == "[/x]\\x1b"
