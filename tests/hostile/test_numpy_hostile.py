"""Hostile .npy/.npz: object dtypes, lying headers, huge shapes, zip bombs -> typed errors."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from savegame import errors
from savegame.interop import numpy as npr


def _npy(header: str, data: bytes = b"", *, version: int = 1) -> bytes:
    h = header.encode("latin1")
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(h)) + h + data


def _fails(
    p: Path, kind: type[errors.CheckpointError] = errors.FormatError
) -> errors.CheckpointError:
    tracemalloc.start()
    try:
        with pytest.raises(kind) as ei:
            npr.open_numpy(p).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    assert ei.value.path == str(p)
    return ei.value


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '|O', 'fortran_order': False, 'shape': (2,)}",
        "{'descr': '<O8', 'fortran_order': False, 'shape': (2,)}",
    ],
)
def test_object_dtype_refused(tmp_path: Path, header: str) -> None:
    p = tmp_path / "obj.npy"
    p.write_bytes(_npy(header, b"\x80\x02cos\nsystem\n."))
    _fails(p, errors.UnsafeContentError)


def test_real_object_array_refused(tmp_path: Path) -> None:
    p = tmp_path / "real.npy"
    np.save(p, np.array([1, "a", None], dtype=object), allow_pickle=True)
    _fails(p, errors.UnsafeContentError)
    z = tmp_path / "obj.npz"
    np.savez(z, ok=np.ones(2), bad=np.array([None], dtype=object))
    _fails(z, errors.UnsafeContentError)


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (10**12, 10**12)}",  # huge shape
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",  # data too short (4 bytes)
        "{'descr': '<f4', 'fortran_order': False, 'shape': ()}  ",  # fine header, size ok -> see below
        "__import__('os').system('touch pwned')",
        "{'descr': 'not-a-dtype', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
        "[" * 5000,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,)}",
    ],
)
def test_lying_headers(tmp_path: Path, header: str) -> None:
    p = tmp_path / "bad.npy"
    p.write_bytes(_npy(header, b"\0" * 4 + b"\0"))
    _fails(p)
    assert not (tmp_path / "pwned").exists()


def test_header_length_over_cap(tmp_path: Path) -> None:
    p = tmp_path / "long.npy"
    p.write_bytes(_npy("{" + " " * 200_000 + "}", version=2))
    _fails(p)


def test_header_length_past_eof(tmp_path: Path) -> None:
    p = tmp_path / "short.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00\xff\x00{")
    _fails(p)


def test_unknown_version(tmp_path: Path) -> None:
    p = tmp_path / "v9.npy"
    p.write_bytes(b"\x93NUMPY\x09\x00" + b"\0" * 20)
    _fails(p, errors.UnsupportedFormatError)


def test_npz_zip_bomb(tmp_path: Path) -> None:
    p = tmp_path / "bomb.npz"
    arr = np.zeros(20_000_000, dtype=np.uint8)  # 20 MB of zeros -> ~20 KB deflated (ratio ~1000)
    np.savez_compressed(p, a=arr)
    err = _fails(p)
    assert "bomb" in str(err)


def test_npz_member_declares_wrong_size(tmp_path: Path) -> None:
    p = tmp_path / "lie.npz"
    good = tmp_path / "g.npy"
    np.save(good, np.ones(4))
    data = good.read_bytes()
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.npy", data[:-8])  # truncated member
    _fails(p)


def test_npz_crc_mismatch_caught_for_deflated(tmp_path: Path) -> None:
    p = tmp_path / "crc.npz"
    np.savez_compressed(p, a=np.arange(1000.0))
    raw = bytearray(p.read_bytes())
    i = raw.index(b"a.npy") - 30 + 14  # CRC field of the local header is not used; patch central
    j = raw.rindex(b"a.npy") - 46 + 16
    raw[j] ^= 0xFF
    del i
    p.write_bytes(bytes(raw))
    _fails(p, errors.IntegrityError)


@pytest.mark.parametrize("descr", ["a", "V0", "U0", "(2,)f4", "x"])
def test_exotic_descr_is_a_typed_error(tmp_path: Path, descr: str) -> None:
    p = tmp_path / "odd.npy"
    p.write_bytes(_npy(f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': (1,)}}", b"\0" * 8))
    _fails(p)


# Boundary dimensions, also on empty arrays: numpy cannot even build (0, 2**64) ("Maximum
# allowed dimension exceeded") or (0, 2**63 - 1) ("array is too big").
@pytest.mark.parametrize(
    "shape",
    [(0, 2**64), (0, 2**63), (0, 2**63 - 1), (0, 2**62, 2**62), (2**64 - 1,), (0,) * 65],
)
def test_boundary_dimensions_are_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    p = tmp_path / "dims.npy"
    p.write_bytes(_npy(repr({"descr": "<f4", "fortran_order": False, "shape": shape}) + "\n"))
    _fails(p)
    z = tmp_path / "dims.npz"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.npy", p.read_bytes())
    _fails(z)


def test_empty_arrays_with_ordinary_shapes_still_open(tmp_path: Path) -> None:
    p = tmp_path / "empty.npy"
    np.save(p, np.zeros((0, 7, 3), "f4"))
    with npr.open_numpy(p) as r:
        assert tuple(r.read("array").shape) == (0, 7, 3)
