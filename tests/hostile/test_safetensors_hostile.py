"""Hostile safetensors headers -> FormatError with .path; no big allocation, no hang."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest

from savegame import errors
from savegame.interop import safetensors as st


def _write(
    path: Path, header: bytes | dict[str, object], data: bytes = b"", *, n: int | None = None
) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _e(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _fails(p: Path) -> errors.FormatError:
    tracemalloc.start()
    try:
        with pytest.raises(errors.FormatError) as ei:
            st.open_safetensors(p).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes while rejecting a hostile file"
    assert ei.value.path == str(p)
    return ei.value


CASES: dict[str, tuple[bytes | dict[str, object], bytes, int | None]] = {
    "offsets_out_of_bounds": ({"a": _e("F32", [1], 0, 4)}, b"", None),
    "end_before_begin": ({"a": _e("F32", [0], 4, 0)}, b"\0" * 4, None),
    "overlap": ({"a": _e("F32", [2], 0, 8), "b": _e("F32", [2], 4, 12)}, b"\0" * 12, None),
    "gap": ({"a": _e("F32", [1], 0, 4), "b": _e("F32", [1], 8, 12)}, b"\0" * 12, None),
    "not_from_zero": ({"a": _e("F32", [1], 4, 8)}, b"\0" * 8, None),
    "size_mismatch": ({"a": _e("F32", [3], 0, 8)}, b"\0" * 8, None),
    "absurd_shape": ({"a": _e("F32", [2**40, 2**40, 2**40], 0, 4)}, b"\0" * 4, None),
    "negative_dim": ({"a": _e("F32", [-1], 0, 4)}, b"\0" * 4, None),
    "float_dim": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "bool_offset": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}},
        b"\0" * 4,
        None,
    ),
    "unknown_dtype": ({"a": _e("F128", [1], 0, 16)}, b"\0" * 16, None),
    "trailing_bytes": ({"a": _e("F32", [1], 0, 4)}, b"\0" * 5, None),
    "missing_field": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None),
    "extra_field": ({"a": {**_e("F32", [1], 0, 4), "x": 1}}, b"\0" * 4, None),
    "metadata_not_strings": ({"__metadata__": {"k": 1}}, b"", None),
    "entry_not_object": ({"a": [1, 2]}, b"", None),
    "header_is_list": (b"[1,2,3]", b"", None),
    "leading_space": (b' {"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, None),
    "not_utf8": (b'{"\xff":1}', b"", None),
    "not_json": (b"{nope", b"", None),
    "deep_json": (b'{"__metadata__":' + b"[" * 10_000 + b"]" * 10_000 + b"}", b"", None),
    "duplicate": (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0",
        None,
    ),
    "huge_header_len": ({"a": _e("U8", [1], 0, 1)}, b"\0", 200_000_000),
    "header_past_eof": ({"a": _e("U8", [1], 0, 1)}, b"\0", 5000),
    "sub_byte_partial": ({"a": _e("F4", [3], 0, 1)}, b"\0", None),
    "nan_json": (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"\0" * 4, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lying_headers_rejected(tmp_path: Path, case: str) -> None:
    header, data, n = CASES[case]
    _fails(_write(tmp_path / f"{case}.safetensors", header, data, n=n))


def test_tiny_files(tmp_path: Path) -> None:
    for i, raw in enumerate([b"", b"\x01", b"\x02\0\0\0\0\0\0\0{"]):
        p = tmp_path / f"t{i}.safetensors"
        p.write_bytes(raw)
        _fails(p)


def test_duplicate_key_is_named(tmp_path: Path) -> None:
    header, data, _ = CASES["duplicate"]
    err = _fails(_write(tmp_path / "d.safetensors", header, data))
    assert err.key == "a"


def test_empty_and_scalar_are_fine(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "ok.safetensors",
        {"e": _e("F32", [0, 3], 0, 0), "s": _e("F64", [], 0, 8)},
        b"\0" * 8,
    )
    with st.open_safetensors(p) as r:
        assert r.read("e").shape == (0, 3) and r.read("s").shape == ()


# Boundary dimensions, also on empty tensors: torch cannot build (0, 2**64) (TypeError
# "Overflow when unpacking long") and numpy refuses (0, 2**63 - 1).
@pytest.mark.parametrize(
    "shape",
    [[0, 2**64], [0, 2**63], [0, 2**63 - 1], [0, 2**62, 2**62], [2**64 - 1], [0] * 65],
)
def test_boundary_dimensions_are_refused(tmp_path: Path, shape: list[int]) -> None:
    _fails(_write(tmp_path / "dims.safetensors", {"e": _e("F32", shape, 0, 0)}))
