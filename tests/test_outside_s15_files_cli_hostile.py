"""Outside review (s15): strings from hostile files of every format reach the terminal escaped,
and a run folder with a symlink pointing outside it.

README "Command line": "Names, paths and messages that come from files are printed literally
... control characters, terminal escapes and bidi overrides are shown as escapes (\\x1b,
\\u202e), so a hostile file cannot restyle, hide or clear what you read." The earlier review
(tests/cli/test_cli_hostile_names.py) used safetensors names; here the strings come from torch
pickles (dict keys, a global's name quoted in an error), safetensors error messages, .npz member
names, .npy headers, Keras HDF5 weight names and darknet cfg sections, and include newlines
that would forge extra lines of a listing.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame.cli import main as cli
from savegame.cli.main import main

EVIL = "\x1b[2J\x1b]0;owned\x07X\r\u202e\x9b"
FORGED = "w\n└── forged: float32[999] 4 B"
RAW = ("\x1b", "\r", "\x07", "\u202e", "\x9b")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=400, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=400, stderr=True, emoji=False))


def _torch_keys(d: Path) -> Path:
    p = d / "keys.pt"
    torch.save(
        {"a" + EVIL: torch.ones(2), "n": {"k" + EVIL: torch.zeros(1)}, FORGED: torch.ones(1)}, p
    )
    return p


def _torch_global(d: Path) -> Path:
    """A pickle naming a global whose module and name carry escapes (no newline: GLOBAL is a line)."""
    bad = EVIL.replace("\r", "")
    pk = (
        b"\x80\x02}q\x00X\x01\x00\x00\x00xq\x01c"
        + ("ev" + bad).encode()
        + b"\n"
        + ("cls" + bad).encode()
        + b"\n)\x81s."
    )
    p = d / "global.pt"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pk)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return p


def _safetensors_duplicate(d: Path) -> Path:
    k = json.dumps("d" + EVIL)
    entry = '{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}'
    hdr = ("{" + f"{k}:{entry.format(0, 4)},{k}:{entry.format(4, 8)}" + "}").encode()
    p = d / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(8))
    return p


def _npz_names(d: Path) -> Path:
    p = d / "m.npz"
    np.savez(p, **{"w" + EVIL: np.ones(2), FORGED: np.zeros(1)})
    return p


def _npy_descr(d: Path) -> Path:
    hdr = "{'descr': '<f4" + EVIL.replace("\r", "") + "', 'fortran_order': False, 'shape': (1,), }"
    hdr = hdr + " " * (-(len(hdr.encode()) + 11) % 64) + "\n"
    p = d / "d.npy"
    p.write_bytes(
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr.encode())) + hdr.encode() + bytes(4)
    )
    return p


def _keras2_h5(d: Path) -> Path:
    h5py = pytest.importorskip("h5py")
    p = d / "l.h5"
    layer = "L" + EVIL
    with h5py.File(p, "w") as f:  # the attribute layout Keras 2 wrote (bytes arrays)
        f.attrs["layer_names"] = np.array([layer.encode()])
        f.attrs["keras_version"] = b"2.4.0"
        f.attrs["backend"] = b"tensorflow"
        g = f.create_group(layer)
        g.attrs["weight_names"] = np.array([(layer + "/kernel:0").encode()])
        g.create_dataset(layer + "/kernel:0", data=np.ones((2, 2), "f4"))
    return p


def _tensorflow_names(d: Path) -> Path:
    """A TF bundle (built with the tests' bundle writer: no TensorFlow here) whose variable
    names and string values carry escapes."""
    import importlib.util

    writer = Path(__file__).parent / "golden" / "foreign" / "tensorflow" / "bundle_writer.py"
    spec = importlib.util.spec_from_file_location("_s15_bundle_writer", writer)
    assert spec is not None and spec.loader is not None
    bw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bw)
    prefix = d / "model.ckpt-1"
    bw.write_bundle(
        prefix,
        {
            "dense/kernel" + EVIL: np.ones((2, 2), "f4"),
            FORGED: np.zeros(2, "f4"),
            "names" + EVIL: [b"a\x1b[31m", b"b"],
        },
    )
    return prefix


FILES = {
    "torch-keys": _torch_keys,
    "torch-global": _torch_global,
    "safetensors-duplicate": _safetensors_duplicate,
    "npz-names": _npz_names,
    "npy-descr": _npy_descr,
    "keras2-h5-names": _keras2_h5,
    "tensorflow-names": _tensorflow_names,
}


@pytest.mark.parametrize("kind", list(FILES))
def test_strings_from_hostile_files_never_reach_the_terminal_raw(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = FILES[kind](tmp_path)
    for argv in (["show", str(src)], ["verify", str(src)], ["diff", str(src), str(src)]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code)
        assert "Traceback" not in err
        for raw in RAW:
            assert raw not in out + err, (argv, repr(raw), out + err)
        if code == 2:
            assert err.startswith("error:") and "\\x1b" in err, err  # named, escaped
        # a newline in a name must not start a line of its own
        assert "\n└── forged" not in out and "\nforged" not in out


def test_a_darknet_cfg_section_name_is_escaped_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "x.cfg"
    cfg.write_text(
        "[net]\nwidth=8\nheight=8\nchannels=3\n[" + EVIL.replace("\r", "") + "]\nfoo=1\n"
    )
    weights = tmp_path / "x.weights"
    weights.write_bytes(struct.pack("<iiiq", 0, 2, 0, 0))
    assert main(["show", str(weights), "--cfg", str(cfg)]) == 2
    out, err = capsys.readouterr()
    for raw in RAW:
        assert raw not in out + err, repr(raw)
    assert "unknown layer type" in err


def test_names_with_newlines_tabs_and_invisible_characters_are_shown_as_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "nl.safetensors"
    save_file(
        {
            FORGED: torch.ones(1),
            "tab\there": torch.ones(1),
            "zw\u200bsp": torch.ones(1),
            "ls\u2028x": torch.ones(1),
        },
        src,
    )
    assert main(["show", str(src)]) == 0
    out = capsys.readouterr().out
    assert "w\\x0a└── forged: float32[999] 4 B" in out
    assert "tab\\x09here" in out and "zw\\u200bsp" in out and "ls\\u2028x" in out
    assert len(out.splitlines()) == 6  # title, 4 tensors, total: nothing forged


# ------------------------------------------------------------ symlinks out of a run folder


def _run_with_symlinked_base(tmp_path: Path) -> tuple[Path, Path]:
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    outside.mkdir()
    model = torch.nn.Linear(2, 2)
    with sg.Checkpointer(run, keep=sg.Keep(last=10)) as ck:
        for step in (1, 2, 3):
            ck.save(sg.TrainState(model=model), step)
    # the user moved the oldest checkpoint to another disk and left a symlink in its place
    target = outside / "step-000000000001"
    shutil.move(run / "step-000000000001", target)
    os.symlink(target, run / "step-000000000001")
    return run, target


def test_a_symlinked_checkpoint_is_listed_verified_and_restored_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _run_with_symlinked_base(tmp_path)
    assert main(["verify", str(run)]) == 0
    assert main(["ls", str(run)]) == 0
    capsys.readouterr()
    model = torch.nn.Linear(2, 2)
    with sg.Checkpointer(run, keep=sg.Keep(last=10)) as ck:
        assert ck.restore(sg.TrainState(model=model)) == 3


def test_prune_never_changes_a_folder_outside_the_run_through_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, target = _run_with_symlinked_base(tmp_path)
    before = sorted(p.name for p in target.iterdir())
    code = main(["prune", str(run), "--keep-last", "1"])
    capsys.readouterr()
    assert sorted(p.name for p in target.iterdir()) == before, (
        "prune changed a folder outside the run"
    )
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-deleted-")]
    assert code in (0, 2)
    assert main(["verify", str(run)]) == 0


def test_the_lossy_conversion_warning_names_string_tensors_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: convert names the string tensors it leaves out of safetensors; the names come
    from the file."""
    src = _tensorflow_names(tmp_path)
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst), "--to", "safetensors"]) == 0
    out, err = capsys.readouterr()
    for raw in RAW:
        assert raw not in out + err, repr(raw)
    assert "names\\x1b[2J" in out + err


def test_prune_and_ls_say_a_symlinked_checkpoint_is_kept_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan prune prints (and ls's "kept because") says the linked checkpoint is kept, and
    the count of deleted checkpoints leaves it out."""
    run, target = _run_with_symlinked_base(tmp_path)
    assert main(["prune", str(run), "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "step-000000000001" in x)
    assert line.startswith("keep") and "symlink" in line, out
    assert "1 would be deleted" in out
    assert main(["ls", str(run)]) == 0
    assert "symlink" in capsys.readouterr().out
    assert main(["prune", str(run), "--keep-last", "1"]) == 0
    assert "deleted 1 checkpoints" in capsys.readouterr().out
    assert (run / "step-000000000001").is_symlink() and (target / "manifest.json").exists()
