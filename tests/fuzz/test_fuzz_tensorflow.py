"""Property: whatever the bytes, the TF reader either works or raises a savegame error.

Mutations start from the real TensorFlow fixtures (tests/golden/foreign/tensorflow):

* ``raw``: flips, overwrites, insertions and truncations of the ``.index`` or the shard;
* ``table``: index rows (keys and BundleEntryProto values) mutated, dropped or duplicated,
  then re-encoded with valid block CRCs, so the entry decoder and bounds checks are reached;
* ``graph``: the ``_CHECKPOINTABLE_OBJECT_GRAPH`` proto mutated and stored with a valid CRC;
* ``strings``: DT_STRING payloads with lying lengths but consistent CRCs;
* ``pointer``: arbitrary ``checkpoint`` pointer files.

The default run is short (~20 s); ``-m slow`` runs many more examples and also bounds each
case's traced allocations (64 MB). Inputs that once broke
the reader live in tests/fuzz/regressions/tensorflow/ and are replayed by
``test_regressions_replay``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savegame import errors
from savegame.interop import tensorflow
from savegame.interop.tensorflow import proto, table

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "tensorflow"
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / "tensorflow"
PREFIXES = {"tf1": "model.ckpt-3", "keras3": "ckpt-1", "tfkeras": "ckpt-1"}
SHARD = ".data-00000-of-00001"


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tf_bundle_writer", GOLDEN / "bundle_writer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bw = _load_writer()
ORIGINAL = {
    name: (
        (GOLDEN / name / f"{p}.index").read_bytes(),
        (GOLDEN / name / f"{p}{SHARD}").read_bytes(),
    )
    for name, p in PREFIXES.items()
}
ROWS = {name: table.Table(index, name).read() for name, (index, _shard) in ORIGINAL.items()}


def exercise(target: Path) -> None:
    """Use every entry point; only :class:`savegame.errors.CheckpointError` may escape it."""
    try:
        reader = tensorflow.open_tensorflow(target)
    except errors.CheckpointError as exc:
        assert exc.path is not None
        return
    with reader:
        for key in reader.keys():
            try:
                info = reader.info(key)
                value = reader.read(key)
                if info.dtype == "string":
                    assert isinstance(value, np.ndarray) and value.dtype.kind == "S"
                    reader.read_strings(key)
                else:
                    assert tuple(value.shape) == info.shape
            except errors.CheckpointError as exc:
                assert exc.path is not None
        for call in (reader.tree, reader.metadata, reader.verify):
            try:
                result: Any = call()
            except errors.CheckpointError as exc:
                assert exc.path is not None
                continue
            if call == reader.metadata:
                json.dumps(result)


@contextmanager
def memory_bounded(megabytes: int = 64) -> Iterator[None]:
    """Fail if the case allocates more than ``megabytes`` (traced; used by the slow runs)."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < megabytes << 20, f"peak allocation {peak} bytes"


def _place(tmp: Path, name: str, index: bytes, shard: bytes, pointer: bytes | None = None) -> Path:
    folder = tmp / "case"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    prefix = folder / PREFIXES[name]
    Path(f"{prefix}.index").write_bytes(index)
    Path(f"{prefix}{SHARD}").write_bytes(shard)
    if pointer is not None:
        (folder / "checkpoint").write_bytes(pointer)
        return folder
    return prefix


def _mutate(data: bytes, ops: list[tuple[int, float, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, where, payload in ops:
        pos = int(where * len(buf)) if buf else 0
        if kind == 0 and buf:  # flip bits
            buf[min(pos, len(buf) - 1)] ^= payload[0] if payload else 1
        elif kind == 1:  # overwrite
            buf[pos : pos + len(payload)] = payload
        elif kind == 2:  # insert
            buf[pos:pos] = payload
        elif kind == 3:  # truncate
            del buf[pos:]
        else:  # delete a range
            del buf[pos : pos + max(1, len(payload))]
    return bytes(buf)


fixture_names = st.sampled_from(sorted(PREFIXES))
byte_ops = st.lists(
    st.tuples(
        st.integers(0, 4),
        st.floats(0, 1, allow_nan=False),
        st.binary(min_size=0, max_size=16),
    ),
    min_size=1,
    max_size=6,
)
string_lengths = st.lists(
    st.one_of(
        st.integers(0, 12),
        st.sampled_from([127, 128, 2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1]),
    ),
    max_size=6,
)
SETTINGS: dict[str, Any] = {
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "deadline": None,
    "derandomize": False,
}
# The default suite replays the same seeded inputs every run; the slow twins are random.
FAST_SETTINGS: dict[str, Any] = {**SETTINGS, "derandomize": True}


def _raw_case(tmp: Path, name: str, target_index: bool, ops: list[Any]) -> None:
    index, shard = ORIGINAL[name]
    if target_index:
        index = _mutate(index, ops)
    else:
        shard = _mutate(shard, ops)
    exercise(_place(tmp, name, index, shard))


def _table_case(
    tmp: Path, name: str, edits: list[tuple[int, int, list[Any]]], block_items: int
) -> None:
    rows = list(ROWS[name])
    for which, action, ops in edits:
        i = which % len(rows)
        key, value = rows[i]
        if action == 0:
            rows[i] = (key, _mutate(value, ops))
        elif action == 1:
            rows[i] = (_mutate(key, ops), value)
        elif action == 2 and len(rows) > 1:
            del rows[i]
        elif action == 3:
            rows.insert(i, (key, value))
        else:  # splice an interesting varint into the entry proto
            rows[i] = (key, _mutate(value, [(1, ops[0][1], bw.varint(2**63 + i))]))
    index = bw.table(sorted(rows) if block_items % 2 else rows, block_items=block_items)
    exercise(_place(tmp, name, index, ORIGINAL[name][1]))


def _replace_tensor(
    name: str,
    key: bytes,
    payload: bytes,
    crc: int,
    dtype: int | None = None,
    shape: list[int] | None = None,
) -> tuple[bytes, bytes]:
    """Append ``payload`` to the shard and repoint ``key``'s entry at it (valid CRC)."""
    _index, shard = ORIGINAL[name]
    rows = []
    for k, v in ROWS[name]:
        if k == key:
            e = proto.decode_entry(v)
            v = bw.entry(
                e.dtype if dtype is None else dtype,
                e.shape if shape is None else shape,
                offset=len(shard),
                size=len(payload),
                crc=crc,
            )
        rows.append((k, v))
    return bw.table(rows), shard + payload


def _graph_case(tmp: Path, name: str, ops: list[Any]) -> None:
    with tensorflow.open_tensorflow(GOLDEN / name) as r:
        graph = r.read_strings("_CHECKPOINTABLE_OBJECT_GRAPH")
    raw, crc = bw.string_bytes([_mutate(graph, ops)])
    index, shard = _replace_tensor(name, b"_CHECKPOINTABLE_OBJECT_GRAPH", raw, crc)
    exercise(_place(tmp, name, index, shard))


def _strings_case(tmp: Path, lens: list[int], inner_ok: bool, body: bytes, tail: bytes) -> None:
    name = "keras3"
    key = b"extra/strings/.ATTRIBUTES/VARIABLE_VALUE"
    # Claimed lengths may lie about the body; the CRCs are computed over them as TF does, so
    # the reader gets past the checksum to the layout checks.
    ints = b"".join(n.to_bytes(4 if n < 1 << 32 else 8, "little") for n in lens)
    inner = (bw.masked_crc(ints) if inner_ok else 0).to_bytes(4, "little")
    payload = b"".join(bw.varint(n) for n in lens) + inner + body + tail
    crc = bw.masked_crc(ints, inner, body + tail)
    index, shard = _replace_tensor(name, key, payload, crc, shape=[len(lens)])
    exercise(_place(tmp, name, index, shard))


ITEMSIZE = {1: 4, 3: 4, 9: 8, 10: 1, 14: 2, 19: 2, 18: 16}


def _numeric_case(tmp: Path, name: str, which: int, dtype: int, payload: bytes) -> None:
    keys = [k for k, v in ROWS[name][1:] if proto.decode_entry(v).dtype != 7]
    key = keys[which % len(keys)]
    size = ITEMSIZE.get(dtype, 1)
    payload = payload[: len(payload) - len(payload) % size]
    shape = [len(payload) // size]
    index, shard = _replace_tensor(name, key, payload, bw.masked_crc(payload), dtype, shape)
    exercise(_place(tmp, name, index, shard))


def _pointer_case(tmp: Path, text: bytes) -> None:
    index, shard = ORIGINAL["tfkeras"]
    exercise(_place(tmp, "tfkeras", index, shard, pointer=text))


pointer_texts = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda parts, q: f"model_checkpoint_path: {q}{''.join(parts)}{q}\n".encode(),
        st.lists(
            st.sampled_from(
                ["ckpt-1", "c", ".", "..", "/", "\\", '"', "'", "x", "\\x41", "\\0", "/etc/passwd"]
            ),
            max_size=8,
        ),
        st.sampled_from(['"', "'", ""]),
    ),
)


# The property tests. Each default run takes a few seconds; the slow twins run far longer.

FAST = 250
SLOW = int(os.environ.get("SAVEGAME_FUZZ_EXAMPLES", "10000"))


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(name=fixture_names, target_index=st.booleans(), ops=byte_ops)
def test_fuzz_raw_bytes(tmp_path: Path, name: str, target_index: bool, ops: list[Any]) -> None:
    _raw_case(tmp_path, name, target_index, ops)


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(
    name=fixture_names,
    edits=st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 4), byte_ops), min_size=1, max_size=4
    ),
    block_items=st.integers(1, 40),
)
def test_fuzz_index_rows(tmp_path: Path, name: str, edits: list[Any], block_items: int) -> None:
    _table_case(tmp_path, name, edits, block_items)


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(name=st.sampled_from(["keras3", "tfkeras"]), ops=byte_ops)
def test_fuzz_object_graph(tmp_path: Path, name: str, ops: list[Any]) -> None:
    _graph_case(tmp_path, name, ops)


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(
    lens=string_lengths,
    inner_ok=st.booleans(),
    body=st.binary(max_size=40),
    tail=st.binary(max_size=4),
)
def test_fuzz_string_payloads(
    tmp_path: Path, lens: list[int], inner_ok: bool, body: bytes, tail: bytes
) -> None:
    _strings_case(tmp_path, lens, inner_ok, body, tail)


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(
    name=fixture_names,
    which=st.integers(0, 100),
    dtype=st.sampled_from([1, 3, 7, 9, 10, 14, 18, 19, 21, 0, 99]),
    payload=st.binary(max_size=64),
)
def test_fuzz_numeric_payloads(
    tmp_path: Path, name: str, which: int, dtype: int, payload: bytes
) -> None:
    _numeric_case(tmp_path, name, which, dtype, payload)


@settings(max_examples=FAST, **FAST_SETTINGS)
@given(text=pointer_texts)
def test_fuzz_pointer_file(tmp_path: Path, text: bytes) -> None:
    _pointer_case(tmp_path, text)


# -- slow twins -----------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(name=fixture_names, target_index=st.booleans(), ops=byte_ops)
def test_fuzz_raw_bytes_slow(tmp_path: Path, name: str, target_index: bool, ops: list[Any]) -> None:
    with memory_bounded():
        _raw_case(tmp_path, name, target_index, ops)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(
    name=fixture_names,
    edits=st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 4), byte_ops), min_size=1, max_size=4
    ),
    block_items=st.integers(1, 40),
)
def test_fuzz_index_rows_slow(
    tmp_path: Path, name: str, edits: list[Any], block_items: int
) -> None:
    with memory_bounded():
        _table_case(tmp_path, name, edits, block_items)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(name=st.sampled_from(["keras3", "tfkeras"]), ops=byte_ops)
def test_fuzz_object_graph_slow(tmp_path: Path, name: str, ops: list[Any]) -> None:
    with memory_bounded():
        _graph_case(tmp_path, name, ops)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(
    lens=string_lengths,
    inner_ok=st.booleans(),
    body=st.binary(max_size=40),
    tail=st.binary(max_size=4),
)
def test_fuzz_string_payloads_slow(
    tmp_path: Path, lens: list[int], inner_ok: bool, body: bytes, tail: bytes
) -> None:
    with memory_bounded():
        _strings_case(tmp_path, lens, inner_ok, body, tail)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(
    name=fixture_names,
    which=st.integers(0, 100),
    dtype=st.sampled_from([1, 3, 7, 9, 10, 14, 18, 19, 21, 0, 99]),
    payload=st.binary(max_size=64),
)
def test_fuzz_numeric_payloads_slow(
    tmp_path: Path, name: str, which: int, dtype: int, payload: bytes
) -> None:
    with memory_bounded():
        _numeric_case(tmp_path, name, which, dtype, payload)


@pytest.mark.slow
@settings(max_examples=SLOW, **SETTINGS)
@given(text=pointer_texts)
def test_fuzz_pointer_file_slow(tmp_path: Path, text: bytes) -> None:
    with memory_bounded():
        _pointer_case(tmp_path, text)


# -- regressions ----------------------------------------------------------------------------------


def _regression_cases() -> list[Path]:
    return sorted(p for p in REGRESSIONS.iterdir() if p.is_dir()) if REGRESSIONS.is_dir() else []


@pytest.mark.parametrize("case", _regression_cases(), ids=lambda p: p.name)
def test_regressions_replay(tmp_path: Path, case: Path) -> None:
    work = tmp_path / case.name
    shutil.copytree(case, work)
    target = work if (work / "checkpoint").exists() else work / "ckpt"
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        exercise(target)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t0 < 10
    assert peak < 64 << 20
