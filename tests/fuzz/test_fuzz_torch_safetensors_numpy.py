"""Property: whatever the bytes, the torch/safetensors/numpy readers work or raise a savegame error.

Seeds are real files written at import time by torch.save (zip and legacy), safetensors and
numpy (``.npy``, ``.npz`` STORED and DEFLATED). Mutations:

* ``raw``: byte flips, overwrites, insertions, deletions, truncation and boundary integers
  (0, -1, 2**31, 2**63, 2**64-1 as 4- and 8-byte little-endian fields) over the whole file;
* ``pickle``: the same on the bytes of ``data.pkl`` only, re-zipped, so the pickle VM, the
  tensor-view checks and the storage bookkeeping are reached (not only the zip checks);
* ``member``: the same on any other member of a torch zip or an ``.npz`` (storage records,
  ``byteorder``, ``.npy`` headers and data), re-zipped STORED or DEFLATED as the seed was;
* ``st_header``: structural edits of a safetensors JSON header (dims, offsets, dtypes, fields),
  re-encoded with a correct length;
* ``npy_header``: random ``descr``/``shape``/``fortran_order`` in a correctly framed header.

Any exception that is not a :class:`savegame.errors.CheckpointError` is a bug. The default run is
short and seeded (derandomized, a few seconds per format); ``-m slow`` runs many more random examples (``SAVEGAME_FUZZ_EXAMPLES``, default 6000 per property) and bounds traced allocations per case.
Inputs that once broke a reader live in tests/fuzz/regressions/{torch,safetensors,numpy}/ and
are replayed by ``test_regressions_replay``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from savegame import errors
from savegame.interop import detect, torch_pickle
from savegame.interop import numpy as npr
from savegame.interop import safetensors as str_

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
FAST = int(os.environ.get("SAVEGAME_FUZZ_FAST_EXAMPLES", "300"))
SLOW = int(os.environ.get("SAVEGAME_FUZZ_EXAMPLES", "6000"))
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    "database": None,
}
FAST_SETTINGS: dict[str, Any] = {**SETTINGS, "derandomize": True}  # same inputs every run


def _seed_torch(legacy: bool) -> bytes:
    torch.manual_seed(0)
    base_t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    obj: dict[str, Any] = {
        "epoch": 3,
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "view": base_t[1:, ::2],
        "base": base_t,
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "exp": torch.ones(1).expand(4),
        "p": torch.nn.Parameter(torch.ones(2)),
        "b": b"\x00\x01",
        "empty": torch.empty(0, 2),
    }
    if not legacy:
        obj["fp8"] = torch.randn(3).to(torch.float8_e4m3fn)
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _seed_npz(compressed: bool) -> bytes:
    buf = io.BytesIO()
    arrays = {
        "a": np.arange(6, dtype=">f4").reshape(2, 3),
        "f": np.asfortranarray(np.ones((2, 3))),
        "s": np.array(3),
    }
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _seed_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)))
    return buf.getvalue()


SEEDS: dict[str, bytes] = {
    "torch": _seed_torch(False),
    "torch_legacy": _seed_torch(True),
    "safetensors": st_save(
        {
            "w": torch.randn(3, 4),
            "b": torch.randn(2, dtype=torch.bfloat16),
            "e": torch.empty(0),
            "s": torch.tensor(1),
        },
        metadata={"format": "pt"},
    ),
    "npy": _seed_npy(),
    "npz": _seed_npz(False),
    "npz_deflated": _seed_npz(True),
}
KIND = {
    "torch": "torch",
    "torch_legacy": "torch",
    "safetensors": "safetensors",
    "npy": "numpy",
    "npz": "numpy",
    "npz_deflated": "numpy",
}
OPENERS: dict[str, list[Callable[[Path], Any]]] = {
    "torch": [torch_pickle.open_torch, lambda p: torch_pickle.open_torch(p, listing=True)],
    "safetensors": [str_.open_safetensors],
    "numpy": [npr.open_numpy],
}


def _check(exc: errors.CheckpointError) -> None:
    assert exc.path is not None, f"{type(exc).__name__} without .path: {exc}"


def exercise(path: Path, kind: str) -> None:
    """Use every entry point; only savegame errors (with .path) may escape."""
    try:
        detect.detect(path)
    except errors.CheckpointError as exc:
        _check(exc)
    for opener in OPENERS[kind]:
        try:
            reader = opener(path)
        except errors.CheckpointError as exc:
            _check(exc)
            continue
        with reader:
            for name in reader.keys():
                try:
                    info = reader.info(name)
                    value = reader.read(name)
                    assert tuple(value.shape) == tuple(info.shape), name
                except errors.CheckpointError as exc:
                    _check(exc)
            for call in (reader.tree, reader.metadata, reader.verify):
                try:
                    call()
                except errors.CheckpointError as exc:
                    _check(exc)
        if kind == "torch":
            try:
                torch_pickle.load(path)
            except errors.CheckpointError as exc:
                _check(exc)


@contextmanager
def memory_bounded(megabytes: int = 256) -> Iterator[None]:
    """Fail if the case allocates more than ``megabytes`` (traced Python/numpy memory)."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < megabytes << 20, f"peak allocation {peak} bytes"


# op = (position as a fraction of the length, action, payload)
OPS = st.lists(
    st.tuples(
        st.floats(0, 1, allow_nan=False),
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "interesting"]),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=6,
)
# Boundary values plus pickle opcodes (MARK, BINGET, STOP, REDUCE, BUILD, BINPERSID, SETITEMS,
# APPENDS, TUPLE, STACK_GLOBAL, text INT/STRING/UNICODE) so the VM's stack rules get exercised.
INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f\xff\xff\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x80",
    b"(",
    b"h",
    b".",
    b"R",
    b"b",
    b"Q",
    b"u",
    b"e",
    b"t",
    b"\x93",
    b"I01\n",
    b"S'x'\n",
    b"V\\u00e9\n",
    # Boundary integers in 4- and 8-byte size/shape/offset fields.
    *(struct.pack("<I", v) for v in (0, 1 << 31, (1 << 32) - 1)),
    *(struct.pack("<Q", v) for v in (0, 1 << 31, 1 << 63, (1 << 64) - 1)),
]


def mutate(data: bytes, ops: list[tuple[float, str, bytes]]) -> bytes:
    buf = bytearray(data)
    for frac, action, payload in ops:
        i = min(int(frac * len(buf)), max(len(buf) - 1, 0))
        if action == "flip" and buf:
            buf[i] ^= payload[0] or 1
        elif action == "set":
            buf[i : i + len(payload)] = payload
        elif action == "insert":
            buf[i:i] = payload
        elif action == "delete":
            del buf[i : i + len(payload)]
        elif action == "truncate":
            del buf[i:]
        elif action == "interesting":
            v = INTERESTING[payload[0] % len(INTERESTING)]
            buf[i : i + len(v)] = v
    return bytes(buf)


def _rezip_pickle(seed: bytes, ops: list[tuple[float, str, bytes]]) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(seed))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = mutate(data, ops)
            zout.writestr(info.filename, data)
    return out.getvalue()


def _rezip_member(seed: bytes, which: int, ops: list[tuple[float, str, bytes]]) -> bytes:
    """Mutate one member of a zip (chosen by ``which``), keep the others and each method."""
    zin = zipfile.ZipFile(io.BytesIO(seed))
    infos = zin.infolist()
    target = infos[which % len(infos)].filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in infos:
            data = zin.read(info)
            if info.filename == target:
                data = mutate(data, ops)
            zout.writestr(info.filename, data, info.compress_type)
    return out.getvalue()


ZIP_SEEDS = st.sampled_from(["torch", "npz", "npz_deflated"])


def _legacy_pickle(seed: bytes, ops: list[tuple[float, str, bytes]]) -> bytes:
    # Mutate only the object pickle region (roughly the first half, before the raw storages).
    cut = len(seed) // 2
    return mutate(seed[:cut], ops) + seed[cut:]


ST_HEADER_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["dim", "offset", "dtype", "drop", "extra", "rename", "dup", "meta"]),
        st.integers(0, 3),
        st.one_of(
            st.sampled_from([0, -1, 2**31, 2**63, 2**64 - 1, 2**64]),
            st.integers(-(2**64), 2**64),
            st.sampled_from(["F32", "BF16", "F4", "X", "", None, 1.5, [], {}]),
        ),
    ),
    min_size=1,
    max_size=4,
)


def _st_edit(seed: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    (n,) = struct.unpack_from("<Q", seed)
    header = json.loads(seed[8 : 8 + n])
    data = seed[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    extra_text = ""
    for action, idx, value in edits:
        name = names[idx % len(names)]
        e = header.get(name)
        if not isinstance(e, dict):
            continue
        shape = e.get("shape")
        offs = e.get("data_offsets")
        if action == "dim":
            e["shape"] = [*shape[:-1], value] if isinstance(shape, list) and shape else [value]
        elif action == "offset":
            if isinstance(offs, list) and len(offs) == 2:
                offs[idx % 2] = value
            else:
                e["data_offsets"] = [0, value]
        elif action == "dtype":
            e["dtype"] = value
        elif action == "drop":
            e.pop(["dtype", "shape", "data_offsets"][idx % 3], None)
        elif action == "extra":
            e["x"] = value
        elif action == "rename":
            header[str(value)] = header.pop(name)
        elif action == "dup":
            extra_text = "," + json.dumps(name) + ":" + json.dumps(e)
        elif action == "meta":
            header["__metadata__"] = {"k": value}
    text = json.dumps(header)
    if extra_text:
        text = text[:-1] + extra_text + "}"
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


NPY_HEADER = st.fixed_dictionaries(
    {
        "descr": st.one_of(
            st.sampled_from(
                ["<f4", ">f8", "|b1", "<c16", "|O", "<U3", "|S2", "<M8[s]", "V8", "<f2", "f4", "x"]
            ),
            st.text(max_size=6),
        ),
        "fortran_order": st.one_of(st.booleans(), st.integers(0, 1)),
        "shape": st.one_of(
            st.lists(st.integers(-2, 2**40), max_size=4).map(tuple),
            st.lists(
                st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64]), max_size=4
            ).map(tuple),
            st.lists(st.integers(0, 5), max_size=3).map(tuple),
        ),
    }
)


def _npy_with_header(seed: bytes, header: dict[str, Any], version: int) -> bytes:
    (hlen,) = struct.unpack_from("<H", seed, 8)
    data = seed[10 + hlen :]
    text = repr(header).encode("latin1", "replace") + b"\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text)) + text + data


COUNTS: dict[str, int] = {}


def _run(tmp_path: Path, data: bytes, kind: str, bounded: bool = False) -> None:
    p = tmp_path / "case.bin"
    p.write_bytes(data)
    save = os.environ.get("SAVEGAME_FUZZ_SAVE")  # campaigns: keep counts and failing inputs
    try:
        if bounded:
            with memory_bounded():
                exercise(p, kind)
        else:
            exercise(p, kind)
    except BaseException:
        if save:
            Path(save).mkdir(parents=True, exist_ok=True)
            (Path(save) / f"fail-{kind}-{abs(hash(data)):x}").write_bytes(data)
        raise
    finally:
        COUNTS[kind] = COUNTS.get(kind, 0) + 1
        if save and COUNTS[kind] % 100 == 0:
            Path(save).mkdir(parents=True, exist_ok=True)
            (Path(save) / f"count-{kind}.txt").write_text(f"{COUNTS[kind]}\n")


SEED_NAMES = st.sampled_from(sorted(SEEDS))


# -- default (short) runs ---------------------------------------------------------------------


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(name=SEED_NAMES, ops=OPS)
def test_fuzz_raw_bytes(tmp_path: Path, name: str, ops: list[Any]) -> None:
    _run(tmp_path, mutate(SEEDS[name], ops), KIND[name])


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(legacy=st.booleans(), ops=OPS)
def test_fuzz_pickle(tmp_path: Path, legacy: bool, ops: list[Any]) -> None:
    data = (
        _legacy_pickle(SEEDS["torch_legacy"], ops) if legacy else _rezip_pickle(SEEDS["torch"], ops)
    )
    _run(tmp_path, data, "torch")


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(edits=ST_HEADER_EDITS)
def test_fuzz_safetensors_header(tmp_path: Path, edits: list[Any]) -> None:
    _run(tmp_path, _st_edit(SEEDS["safetensors"], edits), "safetensors")


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(header=NPY_HEADER, version=st.sampled_from([1, 2, 3]))
def test_fuzz_npy_header(tmp_path: Path, header: dict[str, Any], version: int) -> None:
    _run(tmp_path, _npy_with_header(SEEDS["npy"], header, version), "numpy")


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(seed=ZIP_SEEDS, which=st.integers(0, 64), ops=OPS)
def test_fuzz_zip_members(tmp_path: Path, seed: str, which: int, ops: list[Any]) -> None:
    _run(tmp_path, _rezip_member(SEEDS[seed], which, ops), KIND[seed])


# -- slow runs: many more examples, bounded allocations ----------------------------------------


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(seed=ZIP_SEEDS, which=st.integers(0, 64), ops=OPS)
def test_fuzz_zip_members_slow(tmp_path: Path, seed: str, which: int, ops: list[Any]) -> None:
    _run(tmp_path, _rezip_member(SEEDS[seed], which, ops), KIND[seed], bounded=True)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(name=SEED_NAMES, ops=OPS)
def test_fuzz_raw_bytes_slow(tmp_path: Path, name: str, ops: list[Any]) -> None:
    _run(tmp_path, mutate(SEEDS[name], ops), KIND[name], bounded=True)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(legacy=st.booleans(), ops=OPS)
def test_fuzz_pickle_slow(tmp_path: Path, legacy: bool, ops: list[Any]) -> None:
    data = (
        _legacy_pickle(SEEDS["torch_legacy"], ops) if legacy else _rezip_pickle(SEEDS["torch"], ops)
    )
    _run(tmp_path, data, "torch", bounded=True)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(edits=ST_HEADER_EDITS)
def test_fuzz_safetensors_header_slow(tmp_path: Path, edits: list[Any]) -> None:
    _run(tmp_path, _st_edit(SEEDS["safetensors"], edits), "safetensors", bounded=True)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(header=NPY_HEADER, version=st.sampled_from([1, 2, 3]))
def test_fuzz_npy_header_slow(tmp_path: Path, header: dict[str, Any], version: int) -> None:
    _run(tmp_path, _npy_with_header(SEEDS["npy"], header, version), "numpy", bounded=True)


# -- regressions ---------------------------------------------------------------------------------

_REG_KIND = {"torch": "torch", "safetensors": "safetensors", "numpy": "numpy"}
CASES = sorted(
    p for d in _REG_KIND for p in (REGRESSIONS / d).glob("*") if p.is_file() and p.suffix != ".md"
)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_regressions_replay(tmp_path: Path, case: Path) -> None:
    _run(tmp_path, case.read_bytes(), _REG_KIND[case.parent.name], bounded=True)


def test_regression_folders_hold_cases() -> None:
    assert CASES, "tests/fuzz/regressions/{torch,safetensors,numpy} should hold replayable inputs"
