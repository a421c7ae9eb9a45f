from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from savegame import errors
from savegame.format import hashing, tensors

# Dtypes this torch build has; DTYPES may list some it lacks (e.g. float8_e8m0fnu on old torch).
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")

AVAILABLE = [name for name in tensors.DTYPES if isinstance(getattr(torch, name, None), torch.dtype)]


def _sample(name: str, n: int = 7) -> torch.Tensor:
    dtype = getattr(torch, name)
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    raw = torch.randint(0, 256, (n * tensors.DTYPES[name][1],), dtype=torch.uint8, generator=g)
    if name == "bool":
        return raw[:n] % 2 == 1
    # arbitrary bit patterns (incl. NaN payloads) must round-trip bitwise
    return raw.view(dtype)


def _write(path: Path, items: dict[str, torch.Tensor]) -> tuple[bytes, list[tensors.WrittenTensor]]:
    ordered = tensors.order_for_file(items.items())
    with open(path, "wb") as f:
        return tensors.write_tensor_file(f, ordered)


def _bits(t: torch.Tensor) -> bytes:
    return bytes(tensors.byte_view(t.contiguous()))


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_dtype_round_trips_bitwise_through_write_and_read_into(
    tmp_path: Path, name: str
) -> None:
    t = _sample(name)
    path = tmp_path / "t.safetensors"
    _header, written = _write(path, {"x": t, "pad": torch.zeros(3, dtype=torch.uint8)})
    w = next(w for w in written if w.key == "x")
    assert w.length == t.numel() * tensors.DTYPES[name][1]
    back = torch.empty_like(t)
    fd = os.open(path, os.O_RDONLY)
    try:
        tensors.read_into(fd, w.offset, tensors.byte_view(back), path)
    finally:
        os.close(fd)
    assert _bits(back) == _bits(t)
    assert hashing.digest(tensors.byte_view(back)) == w.hash


@pytest.mark.parametrize("name", AVAILABLE)
def test_file_opens_with_plain_safetensors(tmp_path: Path, name: str) -> None:
    t = _sample(name).reshape(7, 1)
    path = tmp_path / "t.safetensors"
    _write(path, {"x": t, "y": torch.arange(5, dtype=torch.int64)})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"x", "y"}
        got = f.get_tensor("x")
        assert torch.equal(f.get_tensor("y"), torch.arange(5))
    if tensors.DTYPES[name][2]:
        # complex128/complex32 have no safetensors dtype: plain safetensors sees their real view
        # (trailing dimension 2); savegame's manifest keeps the true dtype.
        assert got.shape == (7, 1, 2)
        assert _bits(got) == _bits(torch.view_as_real(t))
    else:
        assert got.dtype == t.dtype and got.shape == t.shape
        assert _bits(got) == _bits(t)


def test_data_starts_aligned_and_tensors_naturally_aligned(tmp_path: Path) -> None:
    items = {
        "a": torch.zeros(3, dtype=torch.uint8),
        "b": torch.zeros(5, dtype=torch.float64),
        "c": torch.zeros(2, dtype=torch.float16),
    }
    header, written = _write(tmp_path / "t", items)
    assert len(header) % tensors.ALIGN == 0
    for w in written:
        assert w.offset % items[w.key].element_size() == 0


def test_empty_and_scalar_tensors_round_trip(tmp_path: Path) -> None:
    items = {"e": torch.empty(0, 3), "s": torch.tensor(3.5)}
    _h, written = _write(tmp_path / "t", items)
    with safe_open(str(tmp_path / "t"), framework="pt") as f:
        assert f.get_tensor("e").shape == (0, 3)
        assert f.get_tensor("s").item() == 3.5
    assert {w.key: w.length for w in written} == {"e": 0, "s": 4}


def test_unsupported_dtype_is_encode_error() -> None:
    bits = torch.zeros(2, dtype=torch.uint8).view(torch.bits8)
    with pytest.raises(errors.EncodeError, match="bits8"):
        tensors.write_tensor_file(io.BytesIO(), [("q", bits)])


def test_read_into_past_end_of_file_is_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(errors.IntegrityError, match="truncated") as info:
            tensors.read_into(fd, 4, memoryview(bytearray(16)), path)
    finally:
        os.close(fd)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01\x02",
        (10**9).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"\xff\xfe",
        (2).to_bytes(8, "little") + b"[]",
    ],
)
def test_read_header_refuses_truncated_oversized_or_garbled_headers(
    tmp_path: Path, blob: bytes
) -> None:
    path = tmp_path / "f"
    path.write_bytes(blob)
    with open(path, "rb") as f, pytest.raises(errors.IntegrityError):
        tensors.read_header(f, path, len(blob))


def test_dtype_from_name_rejects_unknown_names() -> None:
    assert tensors.dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(errors.FormatError):
        tensors.dtype_from_name("object")
