from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from savegame import errors
from savegame.engine import writer
from savegame.format import manifest


def _write(tmp_path: Path) -> Path:
    tree = {
        "w": torch.arange(10, dtype=torch.float32),
        "n": {"i": torch.ones(3, dtype=torch.int64)},
        "x": 2**60,
    }
    return writer.write_checkpoint(
        tmp_path, 5, tree, run_id="r1", metrics={"val_acc": 0.5, "loss": float("nan")}
    )


def _body(ckpt: Path) -> dict[str, Any]:
    body = json.loads((ckpt / "manifest.json").read_bytes())
    body.pop("integrity")
    return body


def _signed(body: dict[str, Any]) -> bytes:
    """Re-sign an edited body so only the lie under test is wrong."""
    body = dict(body)
    body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    return json.dumps(body).encode()


def test_manifest_round_trips_through_bytes(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    raw = (ckpt / "manifest.json").read_bytes()
    m = manifest.Manifest.from_bytes(raw, ckpt)
    assert m.step == 5 and m.run_id == "r1" and m.world_size == 1
    assert m.metrics["val_acc"] == 0.5
    assert set(m.tensors) == {"w", "n/i"}
    assert m.tensors["w"].dtype == "float32" and m.tensors["w"].shape == (10,)
    again = manifest.Manifest.from_bytes(m.to_bytes(), ckpt)
    assert again.tensors == m.tensors and again.files == m.files and again.trees == m.trees
    assert again.metrics["val_acc"] == 0.5


def test_nan_metric_is_stored_as_strict_json(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    raw = (ckpt / "manifest.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    m = manifest.Manifest.from_bytes(raw.encode(), ckpt)
    assert m.metrics["loss"] != m.metrics["loss"]  # nan


def test_self_hash_catches_an_edited_metric(tmp_path: Path) -> None:
    ckpt = _write(tmp_path)
    raw = (ckpt / "manifest.json").read_text()
    edited = raw.replace('"val_acc": 0.5', '"val_acc": 0.99')
    assert edited != raw
    with pytest.raises(errors.IntegrityError, match="self-hash") as info:
        manifest.Manifest.from_bytes(edited.encode(), ckpt / "manifest.json")
    assert info.value.path == str(ckpt / "manifest.json")


def test_future_version_is_unsupported_format_error_asking_to_upgrade(tmp_path: Path) -> None:
    body = _body(_write(tmp_path))
    body["version"] = manifest.VERSION + 1
    with pytest.raises(errors.UnsupportedFormatError, match="upgrade savegame"):
        manifest.Manifest.from_bytes(_signed(body), "m.json")


def test_other_format_name_is_unsupported(tmp_path: Path) -> None:
    body = _body(_write(tmp_path))
    body["format"] = "orbax"
    with pytest.raises(errors.UnsupportedFormatError):
        manifest.Manifest.from_bytes(_signed(body), "m.json")


def _first_chunk(body: dict[str, Any]) -> dict[str, Any]:
    return body["tensors"]["w"]["chunks"][0]


LIES = {
    "length_vs_shape": lambda b: _first_chunk(b).__setitem__("length", 41),
    "offset_past_file": lambda b: _first_chunk(b).__setitem__(
        "offset", b["files"]["rank-00000.safetensors"]["size"]
    ),
    "offset_inside_header": lambda b: _first_chunk(b).__setitem__("offset", 0),
    "negative_offset": lambda b: _first_chunk(b).__setitem__("offset", -8),
    "unknown_dtype": lambda b: b["tensors"]["w"].__setitem__("dtype", "float128"),
    "shape_too_big": lambda b: b["tensors"]["w"].__setitem__("shape", [11]),
    "chunk_outside_tensor": lambda b: _first_chunk(b).__setitem__("start", [5]),
    "rank_mismatch": lambda b: _first_chunk(b).__setitem__("shape", [10, 1]),
    "unlisted_file": lambda b: _first_chunk(b).__setitem__("file", "other.safetensors"),
    "file_size_string": lambda b: b["files"]["rank-00000.safetensors"].__setitem__("size", "12"),
    "header_past_file": lambda b: b["files"]["rank-00000.safetensors"].__setitem__(
        "header_length", 2**40
    ),
    "bool_step": lambda b: b.__setitem__("step", True),
    "world_size_zero": lambda b: b.__setitem__("world_size", 0),
    "trees_vs_world": lambda b: b.__setitem__("world_size", 2),
    "missing_tensors": lambda b: b.pop("tensors"),
    "tensors_not_a_dict": lambda b: b.__setitem__("tensors", [1, 2]),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lies_about_sizes_offsets_dtype_shape_are_format_errors(tmp_path: Path, lie: str) -> None:
    body = _body(_write(tmp_path))
    LIES[lie](body)
    with pytest.raises(errors.FormatError) as info:
        manifest.Manifest.from_bytes(_signed(body), tmp_path / "manifest.json")
    assert info.value.path == str(tmp_path / "manifest.json")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", ".hidden", "..\\x", "/etc/passwd"])
def test_illegal_file_names_are_refused(tmp_path: Path, name: str) -> None:
    body = _body(_write(tmp_path))
    body["files"][name] = body["files"].pop("rank-00000.safetensors")
    _first_chunk(body)["file"] = name
    body["tensors"]["n/i"]["chunks"][0]["file"] = name
    with pytest.raises(errors.FormatError):
        manifest.Manifest.from_bytes(_signed(body), "m.json")


def test_invalid_json_and_non_object_are_format_errors() -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'):
        with pytest.raises(errors.FormatError):
            manifest.Manifest.from_bytes(raw, "m.json")


def test_oversized_manifest_is_refused_before_parsing() -> None:
    raw = b" " * (manifest.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(errors.FormatError, match="limit"):
        manifest.Manifest.from_bytes(raw, "m.json")
