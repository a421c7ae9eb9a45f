"""Hostile TensorFlow bundles: every malformation is a typed savegame error with ``.path``.

Files are built byte by byte with tests/golden/foreign/tensorflow/bundle_writer.py (or cut from
the real fixtures) in ``tmp_path``. FORMATS.md §3.6 lists the traps exercised here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from savegame import errors
from savegame.interop import tensorflow
from savegame.interop.tensorflow import proto

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "tensorflow"


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tf_bundle_writer", GOLDEN / "bundle_writer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bw = _load_writer()
W_BYTES = np.array([1.0, 2.0], np.float32).tobytes()


def good_entry(**kw: int) -> bytes:
    args = {"offset": 0, "size": 8, "crc": bw.masked_crc(W_BYTES)}
    args.update(kw)
    return bw.entry(1, [2], **args)


def write(
    tmp: Path,
    rows: list[tuple[bytes, bytes]] | None = None,
    *,
    index: bytes | None = None,
    data: bytes = W_BYTES,
    num_shards: int = 1,
) -> Path:
    """Write ``ckpt.index`` (from rows, or raw bytes) and shard 0; return the prefix."""
    if rows is None:
        rows = [(b"", bw.header(num_shards)), (b"w", good_entry())]
    prefix = tmp / "ckpt"
    (tmp / "ckpt.index").write_bytes(index if index is not None else bw.table(rows))
    (tmp / f"ckpt.data-00000-of-{num_shards:05d}").write_bytes(data)
    return prefix


@contextmanager
def bounded(seconds: float = 5.0, megabytes: int = 64) -> Iterator[None]:
    """No hang, no huge allocation (NumPy and Python allocations are traced)."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t0 < seconds
    assert peak < megabytes << 20, f"peak {peak} bytes"


def expect(
    exc: type[errors.CheckpointError], fn: Callable[[], object], *, path_endswith: str
) -> errors.CheckpointError:
    with bounded(), pytest.raises(exc) as ei:
        fn()
    assert isinstance(ei.value, errors.CheckpointError)
    assert ei.value.path is not None and ei.value.path.endswith(path_endswith), ei.value.path
    return ei.value


def open_and_read_all(prefix: Path | str) -> None:
    with tensorflow.open_tensorflow(prefix) as r:
        for k in r.keys():
            r.read(k)
        r.tree()
        r.metadata()


def block_with(raw_entries: bytes, restarts: list[int], n: int | None = None) -> bytes:
    tail = b"".join(struct.pack("<I", r) for r in restarts)
    return raw_entries + tail + struct.pack("<I", len(restarts) if n is None else n)


def raw_entry(shared: int, key_delta: bytes, value: bytes) -> bytes:
    return bw.varint(shared) + bw.varint(len(key_delta)) + bw.varint(len(value)) + key_delta + value


HEADER_ROW = raw_entry(0, b"", bw.header())


# -- the sane baseline -------------------------------------------------------------------------


def test_baseline_bundle_reads(tmp_path: Path) -> None:
    with tensorflow.open_tensorflow(write(tmp_path)) as r:
        assert r.read("w").tolist() == [1.0, 2.0]
        assert r.verify() == []


# -- SSTable: footer, handles, block trailers ---------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 8, 47])
def test_index_shorter_than_footer(tmp_path: Path, cut: int) -> None:
    good = bw.table([(b"", bw.header())])
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=good[:cut])),
        path_endswith="ckpt.index",
    )


def test_every_truncation_of_a_real_index_is_refused(tmp_path: Path) -> None:
    src = GOLDEN / "keras3"
    shutil.copytree(src, tmp_path / "k")
    index = (tmp_path / "k" / "ckpt-1.index").read_bytes()
    for cut in range(len(index)):
        (tmp_path / "k" / "ckpt-1.index").write_bytes(index[:cut])
        with pytest.raises(errors.FormatError) as ei:
            tensorflow.open_tensorflow(tmp_path / "k")
        assert ei.value.path is not None and ei.value.path.endswith("ckpt-1.index")


def test_bad_magic(tmp_path: Path) -> None:
    good = bytearray(bw.table([(b"", bw.header())]))
    good[-1] ^= 0xFF
    err = expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bytes(good))),
        path_endswith="ckpt.index",
    )
    assert "magic" in str(err)


@pytest.mark.parametrize(
    "index_handle",
    [(10**12, 10), (0, 10**12), (2**64 - 1, 2**64 - 1)],
    ids=["offset-past-file", "size-past-file", "u64-max"],
)
def test_index_block_handle_outside_file(tmp_path: Path, index_handle: tuple[int, int]) -> None:
    good = bw.table([(b"", bw.header())])
    bad = good[:-48] + bw.footer((0, 0), index_handle)
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_block_overlapping_the_footer(tmp_path: Path) -> None:
    good = bw.table([(b"", bw.header())])
    foot = len(good) - 48
    bad = good[:-48] + bw.footer((0, 0), (foot - 10, 8))  # trailer would run into the footer
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_footer_varint_too_long(tmp_path: Path) -> None:
    good = bw.table([(b"", bw.header())])
    bad = good[:-48] + b"\x80" * 40 + bw.MAGIC
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_data_block_handle_outside_file(tmp_path: Path) -> None:
    blocks = [bw.block_contents([(b"", bw.header())])]
    index = bw.block_contents([(b"\xff", bw.handle(10**9, 100))], restart_interval=1)
    bad = bw.sstable(blocks, index_contents=index)
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_bad_block_crc(tmp_path: Path) -> None:
    good = bytearray(bw.table([(b"", bw.header()), (b"w", good_entry())]))
    good[3] ^= 0x01  # inside the first data block
    expect(
        errors.IntegrityError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bytes(good))),
        path_endswith="ckpt.index",
    )


def test_every_single_bit_flip_in_real_index_is_refused(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "tf1", tmp_path / "t")
    p = tmp_path / "t" / "model.ckpt-3.index"
    index = p.read_bytes()
    body = len(index) - 48  # footer padding bits are not covered by any CRC (as in LevelDB)
    for pos in range(body):
        bad = bytearray(index)
        bad[pos] ^= 1 << (pos % 8)
        p.write_bytes(bytes(bad))
        with pytest.raises(errors.FormatError):
            tensorflow.open_tensorflow(tmp_path / "t")


@pytest.mark.parametrize("ctype", [1, 7])
def test_compressed_blocks(tmp_path: Path, ctype: int) -> None:
    contents = bw.block_contents([(b"", bw.header())])
    table = bytearray(bw.sstable([contents]))
    table[len(contents)] = ctype
    struct.pack_into("<I", table, len(contents) + 1, bw.masked_crc(contents, bytes((ctype,))))
    exc = errors.UnsupportedFormatError if ctype == 1 else errors.FormatError
    err = expect(
        exc,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bytes(table))),
        path_endswith="ckpt.index",
    )
    if ctype == 1:
        assert "Snappy" in str(err)


# -- block contents: varints, shared prefixes, restarts ---------------------------------------


def open_block(tmp: Path, block: bytes) -> None:
    tensorflow.open_tensorflow(write(tmp, index=bw.sstable([block])))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x80\x80\x80\x80\x01" + b"\x00\x00",  # 6-byte varint32
        b"\xff\xff\xff\xff\x1f\x00\x00",  # 5 bytes but > 2**32
        b"\x00\x05\x00ab",  # non_shared past the block
        b"\x00\x00\xff\xff\xff\xff\x0f",  # value_len 4 GiB
        b"\x00\x80",  # truncated varint
    ],
    ids=["varint-6-bytes", "varint-over-32-bits", "key-past-end", "value-len-huge", "truncated"],
)
def test_block_entry_varints(tmp_path: Path, raw: bytes) -> None:
    expect(
        errors.FormatError,
        lambda: open_block(tmp_path, block_with(raw, [0])),
        path_endswith="ckpt.index",
    )


def test_shared_longer_than_previous_key(tmp_path: Path) -> None:
    raw = HEADER_ROW + raw_entry(5, b"x", good_entry())
    err = expect(
        errors.FormatError,
        lambda: open_block(tmp_path, block_with(raw, [0])),
        path_endswith="ckpt.index",
    )
    assert "shares 5 bytes" in str(err)


@pytest.mark.parametrize("n", [0, 3, 0xFFFFFFFF, 0x40000000])
def test_restart_count_overflow(tmp_path: Path, n: int) -> None:
    expect(
        errors.FormatError,
        lambda: open_block(tmp_path, block_with(HEADER_ROW, [0], n=n)),
        path_endswith="ckpt.index",
    )


def test_restart_pointing_into_an_entry(tmp_path: Path) -> None:
    raw = HEADER_ROW + raw_entry(0, b"w", good_entry())
    expect(
        errors.FormatError,
        lambda: open_block(tmp_path, block_with(raw, [0, 2])),
        path_endswith="ckpt.index",
    )


def test_block_too_short_for_restart_count(tmp_path: Path) -> None:
    expect(errors.FormatError, lambda: open_block(tmp_path, b"\x01"), path_endswith="ckpt.index")


def test_keys_out_of_order(tmp_path: Path) -> None:
    raw = HEADER_ROW + raw_entry(0, b"z", good_entry()) + raw_entry(0, b"a", good_entry())
    expect(
        errors.FormatError,
        lambda: open_block(tmp_path, block_with(raw, [0])),
        path_endswith="ckpt.index",
    )


def test_separator_smaller_than_block_keys(tmp_path: Path) -> None:
    blocks = [bw.block_contents([(b"", bw.header()), (b"w", good_entry())])]
    bad = bw.sstable(blocks, separators=[b"a"])
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_two_index_entries_for_one_block(tmp_path: Path) -> None:
    c = bw.block_contents([(b"", bw.header()), (b"w", good_entry())])
    index = bw.block_contents(
        [(b"x", bw.handle(0, len(c))), (b"y", bw.handle(0, len(c)))], restart_interval=1
    )
    bad = bw.sstable([c], index_contents=index)
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_index_value_with_trailing_bytes(tmp_path: Path) -> None:
    c = bw.block_contents([(b"", bw.header())])
    index = bw.block_contents([(b"x", bw.handle(0, len(c)) + b"junk")], restart_interval=1)
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(
            write(tmp_path, index=bw.sstable([c], index_contents=index))
        ),
        path_endswith="ckpt.index",
    )


# -- header and entries -------------------------------------------------------------------------


def test_missing_header(tmp_path: Path) -> None:
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, [(b"w", good_entry())])),
        path_endswith="ckpt.index",
    )


def test_future_bundle_version(tmp_path: Path) -> None:
    rows = [(b"", bw.header(min_consumer=5)), (b"w", good_entry())]
    expect(
        errors.UnsupportedFormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, rows)),
        path_endswith="ckpt.index",
    )


@pytest.mark.parametrize("num_shards", [2**31 - 1, -1, 0], ids=["huge", "negative", "zero"])
def test_bad_num_shards(tmp_path: Path, num_shards: int) -> None:
    rows = [(b"", bw.header(num_shards)), (b"w", good_entry())]
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, rows)),
        path_endswith="ckpt.index",
    )


def test_large_num_shards_is_not_preallocated(tmp_path: Path) -> None:
    n = 1_000_000  # the cap itself: allowed, and must cost nothing per shard
    rows = [(b"", bw.header(n)), (b"w", good_entry())]
    prefix = write(tmp_path, rows, num_shards=n)
    with bounded(seconds=2, megabytes=8):
        with tensorflow.open_tensorflow(prefix) as r:
            assert r.read("w").tolist() == [1.0, 2.0]
            assert r.metadata()["num_shards"] == n


def test_shard_id_not_below_num_shards(tmp_path: Path) -> None:
    rows = [(b"", bw.header(2)), (b"w", good_entry(shard_id=2))]
    err = expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, rows, num_shards=2)),
        path_endswith="ckpt.index",
    )
    assert err.key == "w"


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -5], [2**31, 2**31], [2**62, 4], [1] * 300],
    ids=["minus-one", "negative", "numel-huge", "overflow-64", "rank-300"],
)
def test_bad_shapes(tmp_path: Path, shape: list[int]) -> None:
    rows = [(b"", bw.header()), (b"w", bw.entry(1, shape, size=8))]
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, rows)),
        path_endswith="ckpt.index",
    )


def test_unknown_rank(tmp_path: Path) -> None:
    ent = bw.f_varint(1, 1) + bw.f_bytes(2, bw.shape_proto([2], unknown_rank=True))
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, [(b"", bw.header()), (b"w", ent)])),
        path_endswith="ckpt.index",
    )


@pytest.mark.parametrize("size", [7, 9, 0, 2**40])
def test_size_not_numel_times_itemsize(tmp_path: Path, size: int) -> None:
    rows = [(b"", bw.header()), (b"w", good_entry(size=size))]
    err = expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, rows)),
        path_endswith="ckpt.index",
    )
    assert err.key == "w"


@pytest.mark.parametrize("offset", [-1, 2**63 - 4])
def test_negative_or_overflowing_offset(tmp_path: Path, offset: int) -> None:
    rows = [(b"", bw.header()), (b"w", good_entry(offset=offset))]
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, rows)),
        path_endswith="ckpt.index",
    )


@pytest.mark.parametrize(
    "value",
    [
        b"\x0b\x00",  # wire type 3 (group)
        b"\x12\x05\x00",  # length past end
        b"\x08" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
        b"\x00\x01",  # field number 0
        b"\x0d\x01\x00\x00\x00",  # dtype as fixed32: wrong wire type
    ],
    ids=["group", "len-past-end", "varint-11", "field-0", "wrong-wire-type"],
)
def test_malformed_entry_proto(tmp_path: Path, value: bytes) -> None:
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, [(b"", bw.header()), (b"w", value)])),
        path_endswith="ckpt.index",
    )


def test_malformed_header_proto(tmp_path: Path) -> None:
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, [(b"", b"\x10\x07")])),  # endianness 7
        path_endswith="ckpt.index",
    )


def test_non_utf8_key(tmp_path: Path) -> None:
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(
            write(tmp_path, [(b"", bw.header()), (b"\xff\xfe", good_entry())])
        ),
        path_endswith="ckpt.index",
    )


def test_unsupported_dtypes_are_skipped_with_a_reason(tmp_path: Path) -> None:
    rows = [
        (b"", bw.header()),
        (b"q", bw.entry(11, [2], size=2)),  # qint8
        (b"v", bw.entry(21, [1], size=3)),  # variant
        (b"w", good_entry()),
        (b"z", bw.entry(99, [1], size=1)),  # from the future
    ]
    with tensorflow.open_tensorflow(write(tmp_path, rows)) as r:
        assert r.keys() == ["w"]
        skipped = r.metadata()["skipped"]
        assert set(skipped) == {"q", "v", "z"} and "DataType 99" in skipped["z"]
        with pytest.raises(errors.CheckpointNotFoundError, match="qint8"):
            r.read("q")


# -- shards and entry CRCs ---------------------------------------------------------------------


def test_bad_entry_crc(tmp_path: Path) -> None:
    rows = [(b"", bw.header()), (b"w", good_entry(crc=12345))]
    with tensorflow.open_tensorflow(write(tmp_path, rows)) as r:
        err = expect(errors.IntegrityError, lambda: r.read("w"), path_endswith="00001")
        assert err.key == "w"
        problems = r.verify()
    assert len(problems) == 1 and "CRC32C" in problems[0]


def test_flipped_shard_byte_is_caught(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "tfkeras", tmp_path / "t")
    shard = tmp_path / "t" / "ckpt-1.data-00000-of-00001"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    with tensorflow.open_tensorflow(tmp_path / "t") as r:
        problems = r.verify()
    assert len(problems) == 1 and "CRC32C" in problems[0]


@pytest.mark.parametrize("keep", [0, 4, 7])
def test_truncated_shard(tmp_path: Path, keep: int) -> None:
    with tensorflow.open_tensorflow(write(tmp_path, data=W_BYTES[:keep])) as r:
        err = expect(errors.FormatError, lambda: r.read("w"), path_endswith="00001")
        assert "truncated" in str(err)
        assert r.verify()


def test_truncated_real_shard(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "keras3", tmp_path / "k")
    shard = tmp_path / "k" / "ckpt-1.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-100])
    with tensorflow.open_tensorflow(tmp_path / "k") as r:
        problems = r.verify()
        assert problems
        with pytest.raises(errors.FormatError):
            for k in r.keys():
                r.read(k)


def test_missing_shard(tmp_path: Path) -> None:
    prefix = write(tmp_path)
    os.remove(f"{prefix}.data-00000-of-00001")
    with tensorflow.open_tensorflow(prefix) as r:
        expect(errors.CheckpointNotFoundError, lambda: r.read("w"), path_endswith="00001")


def test_bool_bytes_other_than_zero_and_one(tmp_path: Path) -> None:
    data = b"\x00\x01\x02"
    rows = [(b"", bw.header()), (b"b", bw.entry(10, [3], size=3, crc=bw.masked_crc(data)))]
    with tensorflow.open_tensorflow(write(tmp_path, rows, data=data)) as r:
        expect(errors.FormatError, lambda: r.read("b"), path_endswith="ckpt")


# -- strings ------------------------------------------------------------------------------------


def string_rows(raw: bytes, n: int, crc: int | None = None) -> list[tuple[bytes, bytes]]:
    c = bw.masked_crc(raw) if crc is None else crc
    return [(b"", bw.header()), (b"s", bw.entry(7, [n], size=len(raw), crc=c))]


def test_string_lengths_past_size(tmp_path: Path) -> None:
    good, crc = bw.string_bytes([b"abc", b"de"])
    bad = bw.varint(1000) + good[1:]  # first length now 1000, bytes unchanged
    with tensorflow.open_tensorflow(write(tmp_path, string_rows(bad, 2), data=bad)) as r:
        expect(errors.FormatError, lambda: r.read("s"), path_endswith="00001")
        expect(errors.FormatError, lambda: r.read_strings("s"), path_endswith="00001")


def test_string_lengths_varint_too_long(tmp_path: Path) -> None:
    bad = b"\xff" * 11 + b"\x00" * 8
    with tensorflow.open_tensorflow(write(tmp_path, string_rows(bad, 2), data=bad)) as r:
        expect(errors.FormatError, lambda: r.read("s"), path_endswith="00001")


def test_string_size_too_small_for_count(tmp_path: Path) -> None:
    raw, crc = bw.string_bytes([b"a"])
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, string_rows(raw, 10**9, crc), data=raw)),
        path_endswith="ckpt.index",
    )


def test_string_entry_crc_and_length_crc(tmp_path: Path) -> None:
    raw, crc = bw.string_bytes([b"abc", b"de"])
    with tensorflow.open_tensorflow(write(tmp_path, string_rows(raw, 2, crc ^ 1), data=raw)) as r:
        expect(errors.IntegrityError, lambda: r.read("s"), path_endswith="00001")
    # A wrong length checksum with a matching entry CRC is still caught.
    bad = bytearray(raw)
    bad[2] ^= 0xFF  # first byte of the stored length checksum (after two 1-byte varints)
    order_ints = (3).to_bytes(4, "little") + (2).to_bytes(4, "little")
    entry_crc = bw.masked_crc(order_ints, bytes(bad[2:6]), b"abcde")
    rows = string_rows(bytes(bad), 2, entry_crc)
    (tmp_path / "x").mkdir()
    with tensorflow.open_tensorflow(write(tmp_path / "x", rows, data=bytes(bad))) as r:
        err = expect(errors.IntegrityError, lambda: r.read("s"), path_endswith="00001")
        assert "length checksum" in str(err)


def test_one_huge_string_among_many_empty_does_not_pad(tmp_path: Path) -> None:
    strings = [b""] * 20_000 + [b"x" * 20_000]
    raw, crc = bw.string_bytes(strings)
    with tensorflow.open_tensorflow(
        write(tmp_path, string_rows(raw, len(strings), crc), data=raw)
    ) as r:
        # 20001 x 20000 bytes would be 400 MB as an 'S' array: refused, read_strings works.
        expect(errors.FormatError, lambda: r.read("s"), path_endswith="ckpt")
        with bounded(megabytes=32):
            assert r.read_strings("s")[-1] == b"x" * 20_000


# -- object graph -------------------------------------------------------------------------------


def graph_bundle(tmp: Path, graph: bytes, extra: dict[str, np.ndarray] | None = None) -> Path:
    tensors: dict[str, np.ndarray | bytes] = {"_CHECKPOINTABLE_OBJECT_GRAPH": graph}
    tensors.update(extra or {})
    bw.write_bundle(tmp / "ckpt", tensors)
    return tmp / "ckpt"


def node(children: Sequence[tuple[int, str]] = (), attrs: Sequence[tuple[str, str]] = ()) -> bytes:
    """One serialized TrackableObject: children (node_id, name), attributes (name, key)."""
    out = b"".join(
        bw.f_bytes(1, bw.f_varint(1, i) + bw.f_bytes(2, n.encode())) for i, n in children
    )
    out += b"".join(
        bw.f_bytes(2, bw.f_bytes(1, name.encode()) + bw.f_bytes(3, key.encode()))
        for name, key in attrs
    )
    return bw.f_bytes(1, out)


def test_object_graph_node_id_out_of_range(tmp_path: Path) -> None:
    prefix = graph_bundle(tmp_path, node([(7, "x")]), {"w": np.ones(2, np.float32)})
    with tensorflow.open_tensorflow(prefix) as r:
        # Tensors stay readable under their raw keys; the problem is reported, not hidden.
        assert r.tree()["w"].name == "w"
        assert "node_id=7" in r.metadata()["object_graph_error"]
        assert any("object graph" in p for p in r.verify())


def test_object_graph_garbage(tmp_path: Path) -> None:
    with tensorflow.open_tensorflow(graph_bundle(tmp_path, b"\xff\xff\xff")) as r:
        assert r.object_paths() == {}
        assert "varint" in r.metadata()["object_graph_error"]
        assert r.verify()


def test_saver_v1_single_file_is_refused_clearly(tmp_path: Path) -> None:
    v1 = tmp_path / "model.ckpt"
    v1.write_bytes(bw.table([(b"", b"\x0a\x00")]))
    err = expect(
        errors.UnsupportedFormatError,
        lambda: tensorflow.open_tensorflow(v1),
        path_endswith="model.ckpt",
    )
    assert "V1" in str(err)


def test_object_graph_cycles_and_long_chains_terminate(tmp_path: Path) -> None:
    n = 2_000  # far deeper than the 256-edge path cap
    nodes = [node([(1, "a"), (0, "root")])]
    nodes += [node([(i + 1, "n"), (0, "back"), (i, "self")]) for i in range(1, n - 1)]
    nodes.append(node([(0, "back")], [("VARIABLE_VALUE", "w")]))
    w = np.ones(2, np.float32)
    prefix = graph_bundle(tmp_path, b"".join(nodes), {"w": w})
    with bounded(seconds=10, megabytes=64), tensorflow.open_tensorflow(prefix) as r:
        # The chain is deeper than the path cap: the variable keeps its raw key.
        assert "w" not in r.object_paths()
        assert r.tree()["w"].name == "w"


def test_object_graph_key_missing_from_index_is_reported(tmp_path: Path) -> None:
    g = node([(1, "v")]) + node([], [("VARIABLE_VALUE", "v/.ATTRIBUTES/VARIABLE_VALUE")])
    with tensorflow.open_tensorflow(graph_bundle(tmp_path, g)) as r:
        assert r.object_paths() == {"v/.ATTRIBUTES/VARIABLE_VALUE": "v"}
        assert any("not in the index" in p for p in r.verify())


# -- pointer file -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["../outside/ckpt", "/etc/passwd", "sub/../../outside/ckpt", ".", ""],
    ids=["dotdot", "absolute", "nested-dotdot", "the-folder", "empty"],
)
def test_pointer_escaping_the_folder(tmp_path: Path, target: str) -> None:
    write_dir = tmp_path / "outside"
    write_dir.mkdir()
    write(write_dir)  # a valid bundle the pointer would reach
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "checkpoint").write_text(f'model_checkpoint_path: "{target}"\n')
    exc = errors.FormatError if target == "" else errors.UnsafeContentError
    expect(exc, lambda: tensorflow.open_tensorflow(folder), path_endswith="checkpoint")


def test_pointer_through_symlink_leaving_the_folder(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    write(tmp_path / "outside")
    folder = tmp_path / "ckpts"
    folder.mkdir()
    os.symlink(tmp_path / "outside", folder / "link")
    (folder / "checkpoint").write_text('model_checkpoint_path: "link/ckpt"\n')
    expect(
        errors.UnsafeContentError,
        lambda: tensorflow.open_tensorflow(folder),
        path_endswith="checkpoint",
    )


@pytest.mark.parametrize(
    "text",
    [
        b"garbage without colon\n",
        b'model_checkpoint_path: "unterminated\n',
        b"model_checkpoint_path: ckpt-1\n",
        b'model_checkpoint_path: "a\\q"\n',
        b"\xff\xfe\n",
        b'all_model_checkpoint_paths: "x"\n',
        b'model_checkpoint_path: "' + b"a" * (2 << 20) + b'"\n',
    ],
    ids=["no-colon", "unterminated", "unquoted", "bad-escape", "not-utf8", "no-model-path", "huge"],
)
def test_malformed_pointer_file(tmp_path: Path, text: bytes) -> None:
    write(tmp_path)
    (tmp_path / "checkpoint").write_bytes(text)
    expect(
        errors.FormatError, lambda: tensorflow.open_tensorflow(tmp_path), path_endswith="checkpoint"
    )


def test_pointer_escapes_are_decoded(tmp_path: Path) -> None:
    bw.write_bundle(tmp_path / 'c"k', {"a": np.zeros(1, np.int8)})
    (tmp_path / "checkpoint").write_text('# comment\n\nmodel_checkpoint_path: "c\\"\\153"\n')
    with tensorflow.open_tensorflow(tmp_path) as r:
        assert r.keys() == ["a"]


def test_folder_without_pointer_and_missing_prefix(tmp_path: Path) -> None:
    expect(
        errors.CheckpointNotFoundError,
        lambda: tensorflow.open_tensorflow(tmp_path),
        path_endswith=tmp_path.name,
    )
    expect(
        errors.CheckpointNotFoundError,
        lambda: tensorflow.open_tensorflow(tmp_path / "nope"),
        path_endswith="nope.index",
    )


def test_many_index_entries_pointing_at_one_big_block_fail_fast(tmp_path: Path) -> None:
    big = bw.block_contents(
        [(b"", bw.header())] + [(b"k%06d" % i, b"x" * 100) for i in range(2000)]
    )
    index = bw.block_contents(
        [(b"\xff" * 4 + b"%06d" % i, bw.handle(0, len(big))) for i in range(20_000)],
        restart_interval=16,
    )
    bad = bw.sstable([big], index_contents=index)
    expect(
        errors.FormatError,
        lambda: tensorflow.open_tensorflow(write(tmp_path, index=bad)),
        path_endswith="ckpt.index",
    )


def test_dense_object_graph_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many empty child references in few bytes: refused before they are all materialised. The
    # real cap (1M fields, ~2 s and ~66 MB untraced) is scaled down so the test stays fast.
    monkeypatch.setattr(proto, "_MAX_FIELDS", 10_000)
    graph = bw.f_bytes(1, b"\x0a\x00" * 11_000)
    prefix = graph_bundle(tmp_path, graph, {"w": np.ones(2, np.float32)})
    with tensorflow.open_tensorflow(prefix) as r, bounded(seconds=5, megabytes=8):
        assert r.object_paths() == {}
        assert "fields" in r.metadata()["object_graph_error"]
        assert r.read("w").tolist() == [1.0, 1.0]


# -- partitioned variables ----------------------------------------------------------------------


def partitioned(
    tmp: Path,
    full_shape: list[int],
    declared: list[list[tuple[int, int]]],
    slices: list[tuple[list[tuple[int, int | None]], np.ndarray]],
    **entry_kw: int,
) -> Path:
    """Full entry ``p`` declaring ``declared`` extents + one slice entry per ``slices`` item."""
    data = bytearray()
    rows = [(b"", bw.header()), (b"p", bw.entry(1, full_shape, slices=declared, **entry_kw))]
    for ext, arr in slices:
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        ent = bw.entry(1, arr.shape, offset=len(data), size=len(raw), crc=bw.masked_crc(raw))
        rows.append((bw.slice_key(b"p", ext), ent))
        data += raw
    return write(tmp, sorted(rows), data=bytes(data))


def test_synthetic_partition_along_columns_is_reassembled(tmp_path: Path) -> None:
    full = np.arange(12, dtype=np.float32).reshape(3, 4)
    prefix = partitioned(
        tmp_path,
        [3, 4],
        [[(0, 3), (0, 1)], [(0, 3), (1, 3)]],
        [([(0, None), (0, 1)], full[:, :1]), ([(0, None), (1, 3)], full[:, 1:])],
    )
    with tensorflow.open_tensorflow(prefix) as r:
        assert r.keys() == ["p"]
        np.testing.assert_array_equal(r.read("p").numpy(), full)
        assert r.verify() == []


@pytest.mark.parametrize(
    "case",
    ["missing-slice", "shape-mismatch", "outside-dim", "wrong-rank"],
)
def test_inconsistent_partitions_are_skipped_and_reported(tmp_path: Path, case: str) -> None:
    a = np.ones((2, 2), np.float32)
    declared = [[(0, 2), (0, 2)], [(2, 2), (0, 2)]]
    slices: list[tuple[list[tuple[int, int | None]], np.ndarray]] = [
        ([(0, 2), (0, 2)], a),
        ([(2, 2), (0, 2)], a),
    ]
    if case == "missing-slice":
        slices = slices[:1]
    elif case == "shape-mismatch":
        slices[1] = ([(2, 2), (0, 2)], np.ones((2, 1), np.float32))
    elif case == "outside-dim":
        declared[1] = [(3, 2), (0, 2)]
        slices[1] = ([(3, 2), (0, 2)], a)
    else:
        declared[1] = [(2, 2)]
    with tensorflow.open_tensorflow(partitioned(tmp_path, [4, 2], declared, slices)) as r:
        assert r.keys() == []
        assert "partitioned" in r.metadata()["skipped"]["p"]
        with pytest.raises(errors.CheckpointNotFoundError, match="partitioned"):
            r.read("p")
        assert any(p.startswith("p: partitioned") for p in r.verify())


def test_overlapping_slices_are_refused_on_read(tmp_path: Path) -> None:
    a = np.ones((2, 2), np.float32)
    # (0..2) and (1..3) overlap on row 1, leaving row 3 empty: element counts still add up.
    prefix = partitioned(
        tmp_path,
        [4, 2],
        [[(0, 2), (0, 2)], [(1, 2), (0, 2)]],
        [([(0, 2), (0, 2)], a), ([(1, 2), (0, 2)], a)],
    )
    with tensorflow.open_tensorflow(prefix) as r:
        err = expect(errors.FormatError, lambda: r.read("p"), path_endswith="ckpt")
        assert "overlap" in str(err)
        assert any("overlap" in p for p in r.verify())


def test_huge_partitioned_shape_is_not_allocated_before_bounds_check(tmp_path: Path) -> None:
    # One slice claims 2**30 floats (4 GiB) that the 8-byte shard does not hold.
    rows = [
        (b"", bw.header()),
        (b"p", bw.entry(1, [2**30], slices=[[(0, 2**30)]])),
        (bw.slice_key(b"p", [(0, None)]), bw.entry(1, [2**30], size=4 * 2**30, crc=1)),
    ]
    with tensorflow.open_tensorflow(write(tmp_path, sorted(rows))) as r:
        expect(errors.FormatError, lambda: r.read("p"), path_endswith="00001")


def test_malformed_slice_key_is_reported(tmp_path: Path) -> None:
    rows = [(b"", bw.header()), (b"\x00p-no-terminator", good_entry()), (b"w", good_entry())]
    with tensorflow.open_tensorflow(write(tmp_path, rows)) as r:
        assert r.keys() == ["w"]
        assert any("malformed slice key" in p for p in r.verify())


def test_slices_sharing_bytes_cannot_claim_more_than_the_shard(tmp_path: Path) -> None:
    # 32 slices of 2x2 floats all pointing at the same 16 bytes: the full 64x2 tensor would
    # need 512 bytes from a 16-byte shard. Refused before allocating.
    raw = np.ones((2, 2), "<f4").tobytes()
    extents = [[(2 * i, 2), (0, 2)] for i in range(32)]
    rows = [(b"", bw.header()), (b"p", bw.entry(1, [64, 2], slices=extents))]
    for ext in extents:
        ent = bw.entry(1, [2, 2], size=16, crc=bw.masked_crc(raw))
        rows.append((bw.slice_key(b"p", ext), ent))
    with tensorflow.open_tensorflow(write(tmp_path, sorted(rows), data=raw)) as r:
        err = expect(errors.FormatError, lambda: r.read("p"), path_endswith="ckpt")
        assert "more than their shards" in str(err)


def test_partition_with_missing_shard(tmp_path: Path) -> None:
    a = np.ones((2, 2), np.float32)
    prefix = partitioned(tmp_path, [2, 2], [[(0, 2), (0, 2)]], [([(0, 2), (0, 2)], a)])
    os.remove(f"{prefix}.data-00000-of-00001")
    with tensorflow.open_tensorflow(prefix) as r:
        expect(errors.CheckpointNotFoundError, lambda: r.read("p"), path_endswith="00001")


def test_empty_index_and_empty_shard_say_what_they_are(tmp_path: Path) -> None:
    from savegame.interop import detect

    (tmp_path / "ckpt.index").write_bytes(b"")
    for path in (tmp_path / "ckpt", tmp_path / "ckpt.index"):
        with pytest.raises(errors.FormatError, match=r"empty \(0 bytes\)") as ei:
            detect.open(path)
        assert ei.value.path == str(tmp_path / "ckpt.index")
    # A valid index whose only data shard is empty: named by the shard path, the bundle opens
    # (through its index) and the tensor's bytes are reported missing, never read past the end.
    bw.write_bundle(tmp_path / "b", {"w": np.arange(4, dtype=np.float32)})
    shard = tmp_path / "b.data-00000-of-00001"
    shard.write_bytes(b"")
    with detect.open(shard) as r:
        assert r.keys() == ["w"]
        with pytest.raises(errors.FormatError) as ei:
            r.read("w")
        assert ei.value.path == str(shard)
        assert r.verify()


def test_empty_checkpoint_pointer_file_says_it_is_empty(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").write_bytes(b"")
    with pytest.raises(errors.FormatError, match=r"checkpoint is empty \(0 bytes\)") as ei:
        tensorflow.open_tensorflow(tmp_path)
    assert ei.value.path == str(tmp_path / "checkpoint")
