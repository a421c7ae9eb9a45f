from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from savegame import errors
from savegame import tree as treelib
from savegame.engine import reader, writer
from savegame.format import layout


def _tree() -> dict[str, object]:
    return {
        "model": {
            "w": torch.randn(4, 5),
            "b": torch.arange(3, dtype=torch.int64),
            "h": torch.ones(2, dtype=torch.bfloat16),
        },
        "np": np.arange(6, dtype=np.uint32),
        "seed": 2**63 + 5,
        "empty": torch.empty(0),
    }


def test_write_then_load_round_trips_every_tensor_and_value(tmp_path: Path) -> None:
    tree = _tree()
    path = writer.write_checkpoint(
        tmp_path, 3, tree, run_id="r", metrics={"acc": 0.5}, info={"reason": "t"}
    )
    assert path == tmp_path / layout.step_dir(3)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank-00000.safetensors"]
    m = reader.read_manifest(path)
    out = treelib.decode(m.trees[0], reader.load_tensors(path, m))
    for k in ("w", "b", "h"):
        assert torch.equal(out["model"][k], tree["model"][k])  # type: ignore[index]
    np.testing.assert_array_equal(out["np"], tree["np"])  # type: ignore[arg-type]
    assert out["seed"] == 2**63 + 5 and out["empty"].shape == (0,)
    assert reader.verify(path) == []
    assert (tmp_path / layout.LATEST).read_text().strip() == path.name


def test_commit_leaves_no_temp_folder(tmp_path: Path) -> None:
    writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(layout.TMP_PREFIX)]


def test_writing_a_committed_step_again_is_step_exists_error(tmp_path: Path) -> None:
    writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    with pytest.raises(errors.StepExistsError) as info:
        writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    assert info.value.step == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(layout.TMP_PREFIX)]


def test_an_invalid_folder_at_the_step_is_replaced(tmp_path: Path) -> None:
    (tmp_path / layout.step_dir(1)).mkdir()  # e.g. a half-copied folder without manifest
    path = writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    assert reader.verify(path) == []
    (aside,) = [p for p in tmp_path.iterdir() if layout.parse_damaged_dir(p.name) == 1]  # kept, not deleted


def test_a_committed_folder_with_corrupt_data_is_set_aside_by_a_new_save(tmp_path: Path) -> None:
    first = writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    data = first / layout.tensor_file(0)
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # the manifest still parses; a tensor hash no longer matches
    data.write_bytes(bytes(raw))
    path = writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    assert reader.verify(path) == []
    (aside,) = [p for p in tmp_path.iterdir() if layout.parse_damaged_dir(p.name) == 1]
    assert (aside / layout.tensor_file(0)).read_bytes() == bytes(raw)  # the damaged bytes are kept
    assert [r.step for r in reader.list_checkpoints(tmp_path)] == [1]


def test_load_into_destination_tensors(tmp_path: Path) -> None:
    w = torch.randn(4, 5)
    path = writer.write_checkpoint(tmp_path, 1, {"w": w}, run_id="r")
    m = reader.read_manifest(path)
    dest = torch.zeros(4, 5)
    out = reader.load_tensors(path, m, dest=lambda key, entry: dest)
    assert out["w"] is dest and torch.equal(dest, w)


def test_load_subset_of_keys_and_unknown_key(tmp_path: Path) -> None:
    path = writer.write_checkpoint(tmp_path, 1, _tree(), run_id="r")
    m = reader.read_manifest(path)
    assert set(reader.load_tensors(path, m, ["model/b"])) == {"model/b"}
    with pytest.raises(errors.CheckpointNotFoundError):
        reader.load_tensors(path, m, ["nope"])


def test_corrupt_tensor_never_reaches_destination(tmp_path: Path) -> None:
    path = writer.write_checkpoint(
        tmp_path, 1, {"a": torch.ones(8), "z": torch.ones(8)}, run_id="r"
    )
    m = reader.read_manifest(path)
    f = path / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[m.tensors["z"].chunks[0].offset] ^= 0xFF
    f.write_bytes(bytes(data))
    dest = {"a": torch.zeros(8), "z": torch.zeros(8)}
    with pytest.raises(errors.IntegrityError, match="'z'") as info:
        reader.load_tensors(path, m, dest=lambda key, entry: dest[key])
    assert info.value.key == "z" and info.value.step == 1
    assert torch.equal(dest["a"], torch.zeros(8))  # nothing applied before all hashes matched


def test_list_checkpoints_orders_by_step_and_ignores_other_names(tmp_path: Path) -> None:
    for s in (20, 3, 100):
        writer.write_checkpoint(tmp_path, s, {"x": torch.zeros(1)}, run_id="r")
    (tmp_path / ".tmp-step-000000000200-abc").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / layout.step_dir(7)).mkdir()  # never committed
    refs = reader.list_checkpoints(tmp_path)
    assert [r.step for r in refs] == [3, 7, 20, 100]
    assert [r.valid for r in refs] == [True, False, True, True]
    assert isinstance(refs[1].error, errors.IncompleteCheckpointError)


def test_list_checkpoints_of_missing_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errors.CheckpointNotFoundError):
        reader.list_checkpoints(tmp_path / "nope")


def test_manifest_step_must_match_folder_name(tmp_path: Path) -> None:
    path = writer.write_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, run_id="r")
    path.rename(tmp_path / layout.step_dir(2))
    with pytest.raises(errors.FormatError, match="folder name says step 2"):
        reader.read_manifest(tmp_path / layout.step_dir(2))


def test_write_failure_removes_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.tensors, "write_tensor_file", boom)
    with pytest.raises(errors.StorageError, match="No space"):
        writer.write_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, run_id="r")
    assert list(tmp_path.iterdir()) == []


def test_non_cpu_layouts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.EncodeError, match="sparse"):
        writer.write_checkpoint(tmp_path, 1, {"s": torch.eye(3).to_sparse()}, run_id="r")
