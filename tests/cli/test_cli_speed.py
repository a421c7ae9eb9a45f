"""Inspection without torch (issue 9.18): ``savegame --version``, and ``show``/``verify`` of
every foreign format, must not import torch (about 1 s of start-up); reading foreign files
needs numpy only. Each case runs in a fresh interpreter and looks at ``sys.modules`` after the
command. Timings are not asserted here: benchmarks/bench_cli.py measures them.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "foreign"
SMALL_CFG = GOLDEN / "darknet" / "yolov3-tiny-small.cfg"

# (in channels, filters, kernel size, batch_normalize) of yolov3-tiny-small.cfg's conv layers
# (the same list as tests/interop/test_darknet.py).
_SMALL_CONVS = [
    (3, 1, 3, True), (1, 2, 3, True), (2, 4, 3, True), (4, 8, 3, True), (8, 16, 3, True),
    (16, 32, 3, True), (32, 64, 3, True), (64, 16, 1, True), (16, 32, 3, True),
    (32, 18, 1, False), (16, 8, 1, True), (24, 16, 3, True), (16, 18, 1, False),
]  # fmt: skip

# Runs the command in-process through main(), then reports which heavy modules were imported.
_PROBE = """
import json, sys
from savegame.cli.main import main
argv = json.loads(sys.argv[1])
try:
    rc = main(argv)
except SystemExit as exc:
    rc = exc.code
mods = sys.modules
print(json.dumps({"rc": rc, "torch": "torch" in mods, "rich": "rich" in mods, "numpy": "numpy" in mods}))
"""


def _run(argv: list[str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _darknet(tmp: Path) -> Path:
    floats = sum(n * (4 if bn else 1) + n * cin * k * k for cin, n, k, bn in _SMALL_CONVS)
    path = tmp / "small.weights"
    path.write_bytes(struct.pack("<iiiQ", 0, 2, 5, 0) + np.zeros(floats, "<f4").tobytes())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    tmp = tmp_path_factory.mktemp("nontorch")
    npy = tmp / "a.npy"
    np.save(npy, np.arange(12, dtype=np.float32).reshape(3, 4))
    return {
        "safetensors": [str(GOLDEN / "torch" / "model.safetensors")],
        "torch-zip": [str(GOLDEN / "torch" / "tutorial.pth")],
        "torch-legacy": [str(GOLDEN / "torch" / "legacy.pt")],
        "tf1": [str(GOLDEN / "tensorflow" / "tf1" / "model.ckpt-3")],
        "tf2": [str(GOLDEN / "tensorflow" / "tfkeras" / "ckpt-1")],
        "tf-sharded": [str(GOLDEN / "tensorflow" / "sharded" / "ckpt")],
        "npy": [str(npy)],
        "npz": [str(GOLDEN / "torch" / "arrays.npz")],
        "darknet": ["--cfg", str(SMALL_CFG), str(_darknet(tmp))],
        "keras-h5": [str(GOLDEN / "keras" / "cnn.h5")],
        "keras-h5-in-process": ["--no-isolate", str(GOLDEN / "keras" / "cnn.h5")],
        "keras3": [str(GOLDEN / "keras" / "cnn.keras")],
    }


def test_version_imports_neither_torch_nor_rich() -> None:
    res = _run(["--version"])
    assert res == {"rc": 0, "torch": False, "rich": False, "numpy": False}


@pytest.mark.parametrize("command", ["show", "verify"])
@pytest.mark.parametrize(
    "fmt",
    [
        "safetensors",
        "torch-zip",
        "torch-legacy",
        "tf1",
        "tf2",
        "tf-sharded",
        "npy",
        "npz",
        "darknet",
        "keras-h5",
        "keras-h5-in-process",
        "keras3",
    ],
)
def test_show_and_verify_of_foreign_files_do_not_import_torch(
    files: dict[str, list[str]], command: str, fmt: str
) -> None:
    res = _run([command, *files[fmt]])
    assert res["rc"] == 0, res
    assert res["torch"] is False, f"`savegame {command}` of a {fmt} file imported torch"
    if fmt.startswith(("safetensors", "torch", "tf")):
        # Their listing and checks work on bytes: numpy is for reading values only.
        assert res["numpy"] is False, f"`savegame {command}` of a {fmt} file imported numpy"


def test_open_lists_and_verifies_without_torch_and_read_still_returns_a_tensor() -> None:
    """The reader contract: listing and verify() on numpy/bytes; read() gives a torch tensor."""
    code = """
import json, sys
import savegame as sg
out = {}
for p in sys.argv[1:]:
    with sg.open(p) as r:
        r.tree(); r.metadata(); [r.info(k) for k in r.keys()]
        assert r.verify() == [], p
out["after_listing"] = "torch" in sys.modules
with sg.open(sys.argv[1]) as r:
    t = r.read(r.keys()[0])
import torch
out["read_is_tensor"] = isinstance(t, torch.Tensor)
print(json.dumps(out))
"""
    paths = [
        GOLDEN / "torch" / "model.safetensors",
        GOLDEN / "torch" / "tutorial.pth",
        GOLDEN / "torch" / "legacy.pt",
        GOLDEN / "tensorflow" / "tf1" / "model.ckpt-3",
        GOLDEN / "torch" / "arrays.npz",
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "after_listing": False,
        "read_is_tensor": True,
    }


def test_ls_show_and_verify_of_a_savegame_run_do_not_import_torch(tmp_path: Path) -> None:
    """A run's manifests are JSON and its files are checked as bytes: inspecting a run (the
    commands a user types while training runs, or on a machine without torch) needs no torch.
    (``show`` builds a ``torch.Size`` or ``torch.dtype`` kept in the state to print it; ``ls``
    and ``verify`` only check them.)"""
    import torch

    import savegame as sg

    root = tmp_path / "run"
    extras: dict[str, object] = {"lr": 0.1, "b": b"x"}
    state = sg.TrainState(model=torch.nn.Linear(3, 2), extras=extras)
    with sg.Checkpointer(root) as ck:
        ck.save(state, 1)
        ck.save(state, 2)
    step = str(root / "step-000000000002")
    for argv in (["ls", str(root)], ["verify", str(root)], ["show", step], ["ls", "--verify", str(root)]):
        res = _run(argv)
        assert res["rc"] == 0, (argv, res)
        assert res["torch"] is False, f"`savegame {' '.join(argv[:-1])}` of a savegame run imported torch"
    with sg.Checkpointer(root) as ck:
        extras.update(shape=torch.Size([2, 3]), dtype=torch.bfloat16, device=torch.device("cuda:1"))
        ck.save(state, 3)
    for argv in (["ls", str(root)], ["verify", str(root)]):
        res = _run(argv)
        assert res["rc"] == 0 and res["torch"] is False, (argv, res)
