"""Files written by real torch / safetensors / numpy (tests/golden/foreign/torch, see
make_fixtures.py and VERSIONS.txt) keep opening, with the values they were written with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import savegame as sg

HERE = Path(__file__).resolve().parent / "foreign" / "torch"


def _expected() -> dict[str, np.ndarray]:
    with np.load(HERE / "expected.npz", allow_pickle=False) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def test_tutorial_checkpoint_opens_with_every_value() -> None:
    want = _expected()
    with sg.open(HERE / "tutorial.pth") as r:
        assert r.format == "torch" and r.verify() == []
        assert sorted(r.keys()) == sorted(want)
        for name, value in want.items():
            assert np.array_equal(r.read(name).numpy(), value), name
        tree = r.tree()
    assert tree["epoch"] == 7 and tree["best_accuracy"] == 0.91
    assert tree["optimizer"]["param_groups"][0]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("name", "key", "expected_key"),
    [
        ("legacy.pt", "weight", "state_dict/0.weight"),
        ("model.safetensors", "1.running_var", "state_dict/1.running_var"),
        ("arrays.npz", "2_weight", "state_dict/2.weight"),
        ("model.pt2", "0.weight", "state_dict/0.weight"),
        ("model.pt2", "1.num_batches_tracked", "state_dict/1.num_batches_tracked"),
    ],
)
def test_other_formats_open_with_their_values(name: str, key: str, expected_key: str) -> None:
    want = _expected()[expected_key]
    with sg.open(HERE / name) as r:
        assert r.verify() == []
        assert np.array_equal(r.read(key).numpy(), want)


def test_legacy_half_tensor_keeps_its_dtype() -> None:
    with sg.open(HERE / "legacy.pt") as r:
        half = r.read("half")
    assert half.dtype == torch.float16
    assert torch.equal(half, torch.from_numpy(_expected()["state_dict/0.weight"]).half())


def test_tutorial_converts_to_savegame_and_back_bit_for_bit(tmp_path: Path) -> None:
    sg.convert(HERE / "tutorial.pth", tmp_path / "sg", to="savegame")
    sg.convert(tmp_path / "sg", tmp_path / "back.pt", to="torch")
    assert sg.diff(HERE / "tutorial.pth", tmp_path / "back.pt").equal
    flat = torch.load(tmp_path / "back.pt", weights_only=True)
    for name, value in _expected().items():
        assert np.array_equal(flat[name].numpy(), value), name


def test_torch_export_archive_holds_the_state_dict_and_nothing_is_unpickled() -> None:
    want = {k.removeprefix("state_dict/"): v for k, v in _expected().items() if "state_dict" in k}
    with sg.open(HERE / "model.pt2") as r:
        assert r.format == "torch-export"
        assert sorted(r.keys()) == sorted(want)
        for name, value in want.items():
            assert np.array_equal(r.read(name).detach().numpy(), value), name
        assert r.metadata()["pickled"] == []
