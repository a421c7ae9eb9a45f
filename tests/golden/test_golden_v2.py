"""The savegame format-version-2 fixture (incremental checkpoints, written by
savegame_v2/make_golden.py) must keep restoring, exactly: a checkpoint whose frozen layer lives
in a file it shares with a deleted, earlier checkpoint (kept as a retired file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout, manifest

HERE = Path(__file__).resolve().parent / "savegame_v2"
RUN = HERE / "run"
CKPT = RUN / "step-000000000005"
SHARED = "step-000000000003/rank-00000.safetensors"
SCHEMA = Path(sg.__file__).resolve().parent / "format" / "manifest.schema.json"


def test_the_layout_is_frozen() -> None:
    names = sorted(p.name for p in RUN.iterdir())
    assert names == [
        "LATEST",
        "retired-step-000000000003-rank-00000.safetensors",
        "run.json",
        "step-000000000005",
    ]
    body = json.loads((CKPT / layout.MANIFEST).read_bytes())
    assert body["version"] == 2
    assert sorted(body["files"]) == ["rank-00000.safetensors", SHARED]
    assert body["tensors"]["model/0.weight"]["chunks"][0]["file"] == SHARED
    assert body["tensors"]["model/2.weight"]["chunks"][0]["file"] == "rank-00000.safetensors"


def test_the_schema_accepts_it_and_refuses_version_2_without_a_reference() -> None:
    schema = json.loads(SCHEMA.read_text())
    body = json.loads((CKPT / layout.MANIFEST).read_bytes())
    jsonschema.Draft202012Validator(schema).validate(body)
    body["version"] = 1  # a reference needs version 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(body)


def test_it_verifies_clean_and_a_reader_of_version_1_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert reader.verify(CKPT) == []
    monkeypatch.setattr(manifest, "VERSION", 1)
    with pytest.raises(sg.UnsupportedFormatError):
        reader.read_manifest(CKPT)


def test_it_restores_exact_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    torch.manual_seed(123)  # different from the fixture: everything must come from the files
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam([p for p in model[2].parameters()], lr=0.1)
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=model, optimizer=opt, rng=False)) == 5
    expected = json.loads((HERE / "expected_values.json").read_text())
    for name, bits in expected["model"].items():
        got = [float(x).hex() for x in model.state_dict()[name].reshape(-1).tolist()]
        assert got == bits, name
