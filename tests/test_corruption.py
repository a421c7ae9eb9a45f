"""Damage to a committed checkpoint is reported by verify() and skipped by restore()."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout

TENSOR_FILE = "rank-00000.safetensors"


def _run(root: Path) -> tuple[Path, Path]:
    """Two checkpoints (steps 1 and 2) whose model weights equal their step."""
    model = torch.nn.Linear(64, 64)
    state = sg.TrainState(model=model)
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=5), handle_signals=False
    ) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.fill_(step)
            ckpt.step(state, step)
    return root / layout.step_dir(1), root / layout.step_dir(2)


def _flip_tensor_byte(ckpt: Path) -> None:
    m = reader.read_manifest(ckpt)
    c = m.tensors["model/weight"].chunks[0]
    f = ckpt / c.file
    data = bytearray(f.read_bytes())
    data[c.offset + c.length // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _flip_header_byte(ckpt: Path) -> None:
    f = ckpt / TENSOR_FILE
    data = bytearray(f.read_bytes())
    i = data.index(b'"dtype"') + 2
    data[i] ^= 0x20
    f.write_bytes(bytes(data))


def _truncate(ckpt: Path) -> None:
    f = ckpt / TENSOR_FILE
    f.write_bytes(f.read_bytes()[:-100])


def _delete(ckpt: Path) -> None:
    (ckpt / TENSOR_FILE).unlink()


def _delete_manifest(ckpt: Path) -> None:
    (ckpt / layout.MANIFEST).unlink()


def _manifest_invalid_json(ckpt: Path) -> None:
    p = ckpt / layout.MANIFEST
    p.write_bytes(p.read_bytes()[:-10])


def _manifest_valid_json_edit(ckpt: Path) -> None:
    p = ckpt / layout.MANIFEST
    body = json.loads(p.read_bytes())
    body["tensors"]["model/weight"]["shape"] = [64, 64]
    body["metrics"] = {"val_acc": 1.0}
    p.write_text(json.dumps(body))


def _manifest_empty(ckpt: Path) -> None:
    (ckpt / layout.MANIFEST).write_bytes(b"")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flip_tensor_byte": _flip_tensor_byte,
    "flip_header_byte": _flip_header_byte,
    "truncate_file": _truncate,
    "delete_file": _delete,
    "delete_manifest": _delete_manifest,
    "manifest_invalid_json": _manifest_invalid_json,
    "manifest_valid_json_edit": _manifest_valid_json_edit,
    "manifest_empty": _manifest_empty,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_reports_damage_and_restore_falls_back_with_a_warning(
    tmp_path: Path, damage: str
) -> None:
    first, second = _run(tmp_path)
    assert reader.verify(second) == []
    DAMAGE[damage](second)
    problems = reader.verify(second)
    assert problems and all(str(second) in p for p in problems), problems
    model = torch.nn.Linear(64, 64)
    with sg.Checkpointer(tmp_path, handle_signals=False) as ckpt:
        with pytest.warns(sg.CorruptCheckpointWarning, match=f"skipping checkpoint {second}"):
            assert ckpt.restore(sg.TrainState(model=model)) == 1
    assert torch.equal(model.weight, torch.ones(64, 64))
    assert reader.verify(first) == []


def test_junk_file_in_a_checkpoint_is_reported_by_verify(tmp_path: Path) -> None:
    _, second = _run(tmp_path)
    (second / "junk.bin").write_bytes(b"hello")
    problems = reader.verify(second)
    assert len(problems) == 1 and "junk.bin" in problems[0] and "not listed" in problems[0]


def test_corrupt_checkpoint_leaves_live_objects_untouched(tmp_path: Path) -> None:
    _, second = _run(tmp_path)
    for ckpt in reader.list_checkpoints(tmp_path):
        _flip_tensor_byte(ckpt.path)
    model = torch.nn.Linear(64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with sg.Checkpointer(tmp_path, handle_signals=False) as ckpt:
        with pytest.warns(sg.CorruptCheckpointWarning):
            ckpt.restore(sg.TrainState(model=model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_all_checkpoints_corrupt_warns_and_returns_zero(tmp_path: Path) -> None:
    first, second = _run(tmp_path)
    _truncate(first)
    _manifest_invalid_json(second)
    with sg.Checkpointer(tmp_path, handle_signals=False) as ckpt:
        with pytest.warns(sg.CorruptCheckpointWarning) as record:
            assert ckpt.restore(sg.TrainState(model=torch.nn.Linear(64, 64))) == 0
    messages = [str(w.message) for w in record]
    assert any(str(first) in m for m in messages) and any(str(second) in m for m in messages)
    assert any("no valid checkpoint" in m for m in messages)


def test_restoring_a_named_corrupt_step_is_restore_error(tmp_path: Path) -> None:
    _, second = _run(tmp_path)
    _flip_tensor_byte(second)
    with sg.Checkpointer(tmp_path, handle_signals=False) as ckpt:
        with pytest.warns(sg.CorruptCheckpointWarning), pytest.raises(sg.RestoreError):
            ckpt.restore(sg.TrainState(model=torch.nn.Linear(64, 64)), step=2)


def test_load_of_a_corrupt_checkpoint_is_integrity_error(tmp_path: Path) -> None:
    _, second = _run(tmp_path)
    _flip_tensor_byte(second)
    with pytest.raises(sg.IntegrityError, match="does not match its hash") as info:
        sg.load(second)
    assert info.value.path == str(second / TENSOR_FILE) and info.value.key == "model/weight"
