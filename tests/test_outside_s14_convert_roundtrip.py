"""Outside review (s14): what a new user does right after ``savegame convert``: check the result
with ``savegame diff SRC DST`` and read a tensor of DST by the name ``show SRC`` printed.

README "Checkpoints from other tools": "Convert keeps names, dtypes and values bit for bit";
docs/formats.md: ``diff(a, b)`` works "across any two formats" and exits 0 when equal; "Flat
sources are saved as {name: tensor} (a / inside a flat name is escaped by savegame's key
scheme)" -- the escaping is the format's business, the names a user sees are the source's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import savegame as sg
from savegame.cli.main import main

GOLDEN = Path(__file__).parent / "golden" / "foreign"
SOURCES = {
    "keras3": GOLDEN / "keras" / "cnn.keras",
    "keras-h5": GOLDEN / "keras" / "cnn.h5",
    "tf1": GOLDEN / "tensorflow" / "tf1" / "model.ckpt-3",
}


def _npz_with_slashes(tmp_path: Path) -> Path:
    src = tmp_path / "flat.npz"
    np.savez(src, **{"enc/w": np.arange(3.0), "enc~1w": np.arange(2.0), "plain": np.ones(2)})
    return src


@pytest.mark.parametrize("to", ["safetensors", "torch"])
@pytest.mark.parametrize("name", ["keras3", "keras-h5"])  # tf1 holds a string tensor (lossy)
def test_convert_to_flat_formats_then_diff_is_equal(
    tmp_path: Path, name: str, to: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Works today: the flat targets keep the names as they are."""
    src = SOURCES[name]
    dst = tmp_path / ("out.safetensors" if to == "safetensors" else "out.pt")
    assert main(["convert", str(src), str(dst), "--to", to]) == 0
    capsys.readouterr()
    assert main(["diff", str(src), str(dst)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("name", ["keras3", "keras-h5", "npz-with-slashes"])
def test_convert_to_savegame_then_diff_is_equal(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _npz_with_slashes(tmp_path) if name == "npz-with-slashes" else SOURCES[name]
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--to", "savegame"]) == 0
    capsys.readouterr()
    code = main(["diff", str(src), str(dst)])
    assert code == 0, f"diff of a faithful conversion exits {code}:\n{capsys.readouterr().out}"


def test_a_converted_savegame_checkpoint_is_read_by_the_source_names(tmp_path: Path) -> None:
    src = SOURCES["keras3"]
    dst = tmp_path / "out"
    sg.convert(src, dst, to="savegame")
    with sg.open(src) as a:
        names = a.keys()
        first = a.read(names[0])
    assert sorted(sg.load(dst)) == sorted(names)  # sg.load has the source's names (works)
    with sg.open(dst) as b:
        assert sorted(b.keys()) == sorted(names)
        assert b.read(names[0]).equal(first)
