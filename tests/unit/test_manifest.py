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


# ---- parsing is total (issue 9, item 17) ----------------------------------------------------
MPATH = "/run/step-000000000005/manifest.json"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "1" * 5000])
@pytest.mark.parametrize("field", ["metric", "created", "step", "tree"])
def test_non_json_or_overflowing_numbers_are_format_errors_with_path(
    tmp_path: Path, token: str, field: str
) -> None:
    ckpt = _write(tmp_path)
    raw = (ckpt / "manifest.json").read_text()
    body = json.loads(raw)
    needle = {
        "metric": '"val_acc": 0.5',
        "created": f'"created": {json.dumps(body["created"])}',
        "step": '"step": 5',
        "tree": '"x": {\n    "$int"',
    }[field]
    assert needle in raw
    key = needle.split(":")[0]
    edited = raw.replace(needle, f"{key}: {token}" + (', "y": {\n    "$int"' if field == "tree" else ""), 1)
    with pytest.raises(errors.FormatError) as info:
        manifest.Manifest.from_bytes(edited.encode(), MPATH)
    assert info.value.path == MPATH


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    raw = (_write(tmp_path) / "manifest.json").read_text()
    edited = raw.replace('"step": 5,', '"step": 5, "step": 6,', 1)
    with pytest.raises(errors.FormatError, match="duplicate key 'step'"):
        manifest.Manifest.from_bytes(edited.encode(), MPATH)


def test_lone_surrogate_and_deep_nesting_are_format_errors(tmp_path: Path) -> None:
    raw = (_write(tmp_path) / "manifest.json").read_text()
    for edited in (
        raw.replace('"run_id": "r1"', '"run_id": "\\ud800"', 1),
        raw.replace('"info": {', '"info": {"deep": ' + "[" * 50_000 + "]" * 50_000 + ",", 1),
        raw.replace('"info": {', '"info": {"deep": ' + "[" * 990 + "]" * 990 + ",", 1),
    ):
        with pytest.raises(errors.FormatError) as info:
            manifest.Manifest.from_bytes(edited.encode(), MPATH)
        assert info.value.path == MPATH


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every JSON path of a manifest body, trees excluded (tree.py has its own tests)."""
    out = [prefix] if prefix else []
    if prefix[:1] == ("trees",) and len(prefix) > 1:
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


SWAPS: list[Any] = [None, True, "x", "", 1.5, 0, -1, 2**63, 2**64, [], [1], {}, {"a": 1}, "0" * 32, "g" * 32]
DELETE = object()


def test_every_field_swapped_to_every_type_or_deleted_parses_or_is_format_error(tmp_path: Path) -> None:
    """Re-signed edits (the self-hash matches): each must give a Manifest or a FormatError with
    .path and .step; never a raw ValueError/OverflowError/TypeError/KeyError."""
    base = _body(_write(tmp_path))
    outcomes = {"ok": 0, "error": 0}
    for where in _paths(base):
        for value in [*SWAPS, DELETE]:
            body = json.loads(json.dumps(base))
            parent = body
            for part in where[:-1]:
                parent = parent[part]
            if value is DELETE:
                del parent[where[-1]]
            else:
                parent[where[-1]] = value
            try:
                m = manifest.Manifest.from_bytes(_signed(body), MPATH)
            except errors.FormatError as exc:
                assert exc.path == MPATH, (where, value)
                if where != ("step",) and not isinstance(exc, errors.UnsupportedFormatError):
                    assert exc.step == 5, (where, value, exc)
                outcomes["error"] += 1
            else:
                assert isinstance(m, manifest.Manifest)
                outcomes["ok"] += 1
    assert outcomes["error"] > 300 and outcomes["ok"] > 10


@pytest.mark.parametrize("bad", ["zz" * 16, "ABCDEF" * 5 + "AB", "0" * 31, "0" * 33, "", 12])
def test_hash_that_is_not_32_lowercase_hex_digits_is_format_error(tmp_path: Path, bad: Any) -> None:
    base = _body(_write(tmp_path))
    for edit in (
        lambda b: b["files"]["rank-00000.safetensors"].__setitem__("hash", bad),
        lambda b: _first_chunk(b).__setitem__("hash", bad),
    ):
        body = json.loads(json.dumps(base))
        edit(body)
        with pytest.raises(errors.FormatError, match="hex") as info:
            manifest.Manifest.from_bytes(_signed(body), MPATH)
        assert info.value.path == MPATH and info.value.step == 5


def test_overlapping_chunks_that_add_up_are_refused(tmp_path: Path) -> None:
    body = _body(_write(tmp_path))
    c = _first_chunk(body)
    half = dict(c, shape=[5], length=20)
    body["tensors"]["w"]["chunks"] = [half, dict(half)]  # both at start 0: elements 5..9 never read
    with pytest.raises(errors.FormatError, match="overlap"):
        manifest.Manifest.from_bytes(_signed(body), MPATH)


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b["files"]["rank-00000.safetensors"].__setitem__("rank", 1),
        lambda b: b.__setitem__("hash_algorithm", "md5"),
        lambda b: b["info"].__setitem__("epochs_completed", "3"),
        lambda b: b["info"].__setitem__("index", -1),
        lambda b: b["info"].__setitem__("distributed", {"replicated": 5}),
        lambda b: b["tensors"]["w"].__setitem__("shape", [1] * 65),
        lambda b: b["tensors"]["w"].__setitem__("shape", [2**40, 2**40, 0]),
        lambda b: b["trees"].__setitem__(0, [1]),
        lambda b: b["trees"][0].__setitem__("w", {"$tensor": "nope"}),
        lambda b: b["metrics"].__setitem__("val_acc", "0.5"),
        lambda b: b["metrics"].__setitem__("val_acc", "NaN"),
        lambda b: b.__setitem__("created", 1e19),
        lambda b: b.__setitem__("created", -1.0),
    ],
)
def test_semantic_lies_are_format_errors_with_path_and_step(tmp_path: Path, edit: Any) -> None:
    body = _body(_write(tmp_path))
    edit(body)
    with pytest.raises(errors.FormatError) as info:
        manifest.Manifest.from_bytes(_signed(body), MPATH)
    assert info.value.path == MPATH and info.value.step == 5


@pytest.mark.parametrize("name", ["a\x00b", "tab\tname", "x" * 256])
def test_file_names_the_os_would_refuse_are_format_errors(tmp_path: Path, name: str) -> None:
    body = _body(_write(tmp_path))
    body["files"][name] = body["files"].pop("rank-00000.safetensors")
    for t in body["tensors"].values():
        t["chunks"][0]["file"] = name
    with pytest.raises(errors.FormatError, match="illegal file name"):
        manifest.Manifest.from_bytes(_signed(body), MPATH)


def test_non_finite_metrics_save_as_strings_and_round_trip(tmp_path: Path) -> None:
    import math

    ckpt = writer.write_checkpoint(
        tmp_path, 1, {"w": torch.zeros(1)}, run_id="r", metrics={"a": math.inf, "b": -math.inf, "c": math.nan, "d": 2}
    )
    raw = (ckpt / "manifest.json").read_text()
    body = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert body["metrics"] == {"a": "inf", "b": "-inf", "c": "nan", "d": 2.0}
    m = manifest.Manifest.from_bytes(raw.encode(), ckpt)
    assert m.metrics["a"] == math.inf and m.metrics["b"] == -math.inf and math.isnan(m.metrics["c"])
    assert m.metrics["d"] == 2.0


@pytest.mark.parametrize("bad", ["fast", None, [1], 10**400])
def test_metric_that_is_not_a_number_is_an_encode_error_naming_it(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(errors.EncodeError) as info:
        writer.write_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, run_id="r", metrics={"acc": bad})
    assert info.value.key == "acc"


def test_golden_v1_manifest_still_parses() -> None:
    golden = Path(__file__).resolve().parents[1] / "golden" / "savegame_v1" / "step-000000000007" / "manifest.json"
    m = manifest.Manifest.from_bytes(golden.read_bytes(), golden)
    assert m.step == 7 and m.metrics["val_loss"] == 0.25
    assert m.metrics["val_acc"] != m.metrics["val_acc"]
