"""The savegame v1 fixture written by make_golden.py must keep restoring, exactly."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout

HERE = Path(__file__).resolve().parent / "savegame_v1"
GOLDEN = HERE / "step-000000000007"
SCHEMA = Path(sg.__file__).resolve().parent / "format" / "manifest.schema.json"


def _make_golden() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fresh_state() -> tuple[sg.TrainState, torch.nn.Module, Any, Any, dict[str, Any]]:
    torch.manual_seed(123)  # different from the fixture: everything must come from the files
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    extras: dict[str, Any] = {}
    return (
        sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras),
        model,
        opt,
        sched,
        extras,
    )


def test_golden_checkpoint_verifies_clean() -> None:
    assert reader.verify(GOLDEN) == []


def test_golden_checkpoint_is_tiny() -> None:
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 100_000


def test_golden_checkpoint_restores_exact_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    import shutil

    shutil.copytree(GOLDEN, run / GOLDEN.name)
    state, model, opt, sched, extras = _fresh_state()
    with sg.Checkpointer(run, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 7
    expected = json.loads((HERE / "expected_values.json").read_text())
    for name, bits in expected["model"].items():
        got = [float(x).hex() for x in model.state_dict()[name].reshape(-1).tolist()]
        assert got == bits, name
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == expected[
        "optimizer_steps"
    ]
    assert sched.last_epoch == expected["scheduler_last_epoch"] == 7
    assert float(opt.param_groups[0]["lr"]).hex() == expected["lr"]
    _assert_extras(extras)


def _assert_extras(extras: dict[str, Any]) -> None:
    plain = {k: v for k, v in extras.items() if k not in {"nan", "np_array", "tensor"}}
    assert plain == {
        "epoch": 2,
        "big_int": 2**63 + 11,
        "neg_big_int": -(2**60) - 3,
        "float": 0.1,
        "inf": math.inf,
        "ninf": -math.inf,
        "none": None,
        "flag": True,
        "text": "héllo / ~ $",
        "bytes": b"\x00\x01\xfe\xff",
        "tuple": (1, "a", (2.5, None)),
        "set": {1, 2, 3},
        "int_keys": {1: "one", 2: "two"},
        "dollar_keys": {"$tensor": "not a tensor", "$x": [1]},
        "np_scalar_f32": np.float32(1.5),
        "np_scalar_u32": np.uint32(4_000_000_000),
        "np_scalar_i64": np.int64(-7),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
    }
    assert type(extras["tuple"]) is tuple and type(extras["np_scalar_u32"]) is np.uint32
    assert type(extras["np_scalar_f32"]) is np.float32
    assert math.isnan(extras["nan"])
    assert extras["np_array"].dtype == np.uint32
    np.testing.assert_array_equal(extras["np_array"], np.array([1, 2**32 - 1], dtype=np.uint32))
    assert torch.equal(extras["tensor"], torch.tensor([[1, 2], [3, 4]], dtype=torch.int16))


def test_golden_tensors_open_with_plain_safetensors() -> None:
    from safetensors import safe_open

    tree = sg.load(GOLDEN)
    with safe_open(str(GOLDEN / layout.tensor_file(0)), framework="pt") as f:
        assert torch.equal(f.get_tensor("model/0.weight"), tree["model"]["0.weight"])


def test_golden_manifest_structure_matches_the_checked_in_expectation() -> None:
    mg = _make_golden()
    body = json.loads((GOLDEN / layout.MANIFEST).read_bytes())
    expected = json.loads((HERE / "expected_manifest_keys.json").read_text())
    assert mg.manifest_structure(body) == expected


def test_freshly_written_manifest_has_the_golden_structure(tmp_path: Path) -> None:
    """A format change (a new field, a renamed tag, another layout) fails here until the
    fixture and expected_manifest_keys.json are regenerated: a deliberate diff."""
    mg = _make_golden()
    ckpt = mg.write(tmp_path / "run")
    body = json.loads((ckpt / layout.MANIFEST).read_bytes())
    expected = json.loads((HERE / "expected_manifest_keys.json").read_text())
    assert mg.manifest_structure(body) == expected


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    s = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def test_golden_manifest_validates_against_the_schema(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema).validate(
        json.loads((GOLDEN / layout.MANIFEST).read_bytes())
    )


def test_fresh_manifests_validate_against_the_schema(
    schema: dict[str, Any], tmp_path: Path
) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    a = sg.save(
        tmp_path / "a",
        {"x": torch.zeros(2, 3, dtype=torch.complex128), "e": torch.empty(0), "v": 2**70},
    )
    b = _make_golden().write(tmp_path / "run")
    for ckpt in (a, b):
        validator.validate(json.loads((ckpt / layout.MANIFEST).read_bytes()))


def test_schema_rejects_a_broken_manifest(schema: dict[str, Any]) -> None:
    body = json.loads((GOLDEN / layout.MANIFEST).read_bytes())
    body["files"]["../escape"] = body["files"].pop(layout.tensor_file(0))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(body)
    body = json.loads((GOLDEN / layout.MANIFEST).read_bytes())
    body["version"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(body)
