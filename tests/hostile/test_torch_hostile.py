"""Hostile torch files: malicious pickles, lying tensors, zip tricks -> typed errors, no code run.

Every case asserts a savegame error with ``.path``; the code-execution cases also assert that
the command the pickle carries never ran (its marker file does not exist).
"""

from __future__ import annotations

import io
import pickle
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from savegame import errors
from savegame.interop import base, torch_pickle


def torch_zip(
    path: Path, pkl: bytes, records: dict[str, bytes] | None = None, *, prefix: str = "archive"
) -> Path:
    """A torch-style zip holding ``pkl`` as data.pkl plus ``data/<key>`` records."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for k, v in (records or {}).items():
            z.writestr(f"{prefix}/data/{k}", v)
        z.writestr(f"{prefix}/version", "3\n")
    return path


def raw_zip(
    members: list[tuple[str, bytes]], central: list[tuple[str, int, int]] | None = None
) -> bytes:
    """Hand-made zip: local entries in order; ``central`` = (name, header offset, size) rows
    (default: one per member). Lets tests build overlapping or lying directories."""
    out = bytearray()
    rows = []
    for name, data in members:
        nb = name.encode()
        rows.append((name, len(out), len(data), zlib.crc32(data)))
        out += struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            20,
            0,
            0,
            0,
            0,
            zlib.crc32(data),
            len(data),
            len(data),
            len(nb),
            0,
        )
        out += nb + data
    if central is not None:
        crcs = {r[0]: r[3] for r in rows}
        rows = [(n, off, size, crcs.get(n, 0)) for n, off, size in central]
    cd = bytearray()
    for name, off, size, crc in rows:
        nb = name.encode()
        cd += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            20,
            20,
            0,
            0,
            0,
            0,
            crc,
            size,
            size,
            len(nb),
            0,
            0,
            0,
            0,
            0,
            off,
        )
        cd += nb
    cd_off = len(out)
    out += cd
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(rows), len(rows), len(cd), cd_off, 0)
    return bytes(out)


def _open(p: Path, **kw: bool) -> errors.CheckpointError:
    with pytest.raises(errors.CheckpointError) as ei:
        torch_pickle.open_torch(p, **kw).close()
    assert ei.value.path == str(p)
    return ei.value


def _sh(marker: Path) -> bytes:
    cmd = f"touch {marker}".encode()
    return b"X" + struct.pack("<I", len(cmd)) + cmd


@pytest.mark.parametrize("module", ["os", "posix", "subprocess", "builtins"])
def test_global_reduce_of_system_never_runs(tmp_path: Path, module: str) -> None:
    marker = tmp_path / "pwned"
    name = {"builtins": b"eval", "subprocess": b"getoutput"}.get(module, b"system")
    pkl = b"\x80\x02c" + module.encode() + b"\n" + name + b"\n(" + _sh(marker) + b"tR."
    p = torch_zip(tmp_path / "evil.pt", pkl)
    err = _open(p)
    assert isinstance(err, errors.UnsafeContentError)
    assert err.key == f"{module}.{name.decode()}"
    assert not marker.exists()
    # Listing mode lists it as Opaque and still runs nothing.
    with torch_pickle.open_torch(p, listing=True) as r:
        assert r.tree() == base.Opaque(module, name.decode())
    assert not marker.exists()


def test_real_pickle_of_reduce_exploit_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> object:
            import os

            return (os.system, (f"touch {marker}",))

    for proto in (2, 4, 5):  # 4/5 use STACK_GLOBAL + FRAME + MEMOIZE
        p = torch_zip(tmp_path / f"evil{proto}.pt", pickle.dumps({"x": Exploit()}, protocol=proto))
        err = _open(p)
        assert isinstance(err, errors.UnsafeContentError) and err.key == "posix.system"
    p = tmp_path / "legacy.pt"
    buf = io.BytesIO()
    for obj in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, {"little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump(Exploit(), buf, protocol=2)
    p.write_bytes(buf.getvalue())
    assert isinstance(_open(p), errors.UnsafeContentError)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b"(ios\nsystem\nX\x04\x00\x00\x00echo.", "os.system"),  # INST
        (b"(ccollections\nOrderedDict\no.", "OBJ"),  # OBJ even on an allowed class
        (b"\x82\x01.", "EXT1"),
        (b"\x83\x01\x00.", "EXT2"),
        (b"\x84\x01\x00\x00\x00.", "EXT4"),
        (b"c__main__\nEvil\n)\x81}b.", "__main__.Evil"),  # NEWOBJ + BUILD on an arbitrary class
        (b"X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93.", "os.system"),  # STACK_GLOBAL
        (b"ccopyreg\n_reconstructor\n.", "copyreg._reconstructor"),
        (b"ctorch\nload\n.", "torch.load"),
    ],
)
def test_code_paths_refused(tmp_path: Path, body: bytes, key: str) -> None:
    err = _open(torch_zip(tmp_path / "evil.pt", b"\x80\x02" + body))
    assert isinstance(err, errors.UnsafeContentError)
    assert err.key == key


@pytest.mark.parametrize(
    "body",
    [
        b"]}b.",  # BUILD on a list
        b"X\xff\xff\xff\x7f",  # BINUNICODE claiming 2 GB
        b"\x8d" + struct.pack("<Q", 1 << 60),  # BINUNICODE8 claiming an exabyte
        b"\x8b" + struct.pack("<i", 1 << 30),  # LONG4 of a GB
        b"(" * 5000 + b".",  # MARK nesting
        b"h\x07.",  # BINGET of an unset memo slot
        b"0.",  # POP on empty stack
        b"K\x01K\x02.",  # STOP with two items
        b"I" + b"9" * 5000 + b"\n.",  # INT text line over the 4096-byte cap
        b"",  # truncated
        b"}X\x01\x00\x00\x00a]]\x86K\x01s.",  # SETITEM leaves an extra item -> unbalanced STOP
        b"}]K\x01s.",  # unhashable dict key
        b"Q.",  # BINPERSID of nothing
        b"X\x03\x00\x00\x00abcQ.",  # persistent id that is not a storage
        b"\x01.",  # unknown opcode
    ],
)
def test_malformed_pickles_are_format_errors(tmp_path: Path, body: bytes) -> None:
    p = torch_zip(tmp_path / "bad.pt", b"\x80\x02" + body)
    assert isinstance(_open(p), errors.FormatError)


def test_billion_laughs_via_memo_is_bounded(tmp_path: Path) -> None:
    # l0 = [t]*10 ; l1 = [l0]*10 ; ... l9: 10**10 paths if walked naively.
    pkl = bytearray(b"\x80\x02]q\x00")
    pkl += b"(" + b"K\x01" * 10 + b"e0"
    for i in range(1, 10):
        pkl += b"]q" + bytes([i]) + b"(" + (b"h" + bytes([i - 1])) * 10 + b"e0"
    pkl += b"h\x09."
    p = torch_zip(tmp_path / "laughs.pt", bytes(pkl))
    t0 = time.monotonic()
    err = _open(p)
    assert "billion laughs" in str(err) or "nodes" in str(err)
    assert time.monotonic() - t0 < 30


def test_deep_nesting_via_memo_is_bounded(tmp_path: Path) -> None:
    # Each level: new list, memoize, append it to the previous one: unbounded depth, flat stack.
    pkl = bytearray(b"\x80\x02]r\x00\x00\x00\x00")
    for i in range(1, 5000):
        pkl += b"j" + struct.pack("<I", i - 1) + b"]r" + struct.pack("<I", i) + b"a0"
    pkl += b"."
    err = _open(torch_zip(tmp_path / "deep.pt", bytes(pkl)))
    assert "deeper" in str(err)


def test_cyclic_containers_rejected(tmp_path: Path) -> None:
    err = _open(torch_zip(tmp_path / "cycle.pt", b"\x80\x02]q\x00h\x00a."))
    assert "cycle" in str(err)


def test_op_count_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "LIMITS", base.Limits(max_pickle_ops=1000))
    body = b"N0" * 2000 + b"N."
    err = _open(torch_zip(tmp_path / "ops.pt", b"\x80\x02" + body))
    assert "operations" in str(err)


def _tensor_pkl(
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage: str = "FloatStorage",
) -> bytes:
    def tup(xs: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"

    return (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\n"
        + storage.encode()
        + b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        b"J"
        + struct.pack("<i", numel)
        + b"tQJ"
        + struct.pack("<i", offset)
        + tup(size)
        + tup(stride)
        + b"\x89ccollections\nOrderedDict\n)RtRs."
    )


@pytest.mark.parametrize(
    ("numel", "offset", "size", "stride", "record"),
    [
        (4, 0, (5,), (1,), 16),  # view past the storage
        (4, 3, (2,), (1,), 16),  # offset pushes it past
        (4, -1, (2,), (1,), 16),  # negative offset
        (4, 0, (2,), (-1,), 16),  # negative stride
        (4, 0, (2, 2), (1,), 16),  # rank mismatch
        (1, 0, (1 << 30, 1 << 30, 1 << 30), (0, 0, 0), 4),  # stride-0 view of 2**90 elements
        (4, 0, (4,), (1,), 12),  # record shorter than numel * itemsize
        (4, 0, (4,), (1,), 20),  # record longer
        (1 << 30, 0, (4,), (1,), 16),  # storage claims 4 GB, record is 16 bytes
    ],
)
def test_lying_tensor_views(
    tmp_path: Path,
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    record: int,
) -> None:
    p = torch_zip(
        tmp_path / "view.pt", _tensor_pkl(numel, offset, size, stride), {"0": b"\0" * record}
    )
    assert isinstance(_open(p), errors.FormatError)


def test_good_handmade_tensor_reads(tmp_path: Path) -> None:
    # The builder above is right: the same pickle with honest numbers opens and reads.
    p = torch_zip(
        tmp_path / "ok.pt",
        _tensor_pkl(4, 1, (2,), (2,)),
        {"0": torch.arange(4.0).numpy().tobytes()},
    )
    with torch_pickle.open_torch(p) as r:
        assert torch.equal(r.read("w"), torch.tensor([1.0, 3.0]))


def test_missing_storage_record(tmp_path: Path) -> None:
    p = torch_zip(tmp_path / "nostore.pt", _tensor_pkl(4, 0, (4,), (1,)))
    assert "no data record" in str(_open(p))


def test_same_storage_two_dtypes(tmp_path: Path) -> None:
    a = _tensor_pkl(4, 0, (4,), (1,))
    b = a.replace(b"FloatStorage", b"IntStorage")
    # Put two tensors over storage '0' with different types into one dict.
    pkl = (
        a[:-2].replace(b"}X\x01\x00\x00\x00w", b"}X\x01\x00\x00\x00w")
        + b"X\x01\x00\x00\x00v"
        + b[b.index(b"ctorch._utils") : -2]
        + b"s."
    )
    p = torch_zip(tmp_path / "twotypes.pt", pkl, {"0": b"\0" * 16})
    assert "two different" in str(_open(p))


def test_entry_outside_prefix(tmp_path: Path) -> None:
    p = tmp_path / "escape.pt"
    torch.save({"w": torch.ones(2)}, p)
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("../../etc/evil", "x")
    assert "outside" in str(_open(p))


def test_duplicate_member_names(tmp_path: Path) -> None:
    p = tmp_path / "dup.pt"
    pkl = _tensor_pkl(1, 0, (1,), (1,))
    p.write_bytes(raw_zip([("a/data.pkl", pkl), ("a/data/0", b"\0" * 4), ("a/data/0", b"\1" * 4)]))
    err = _open(p)
    assert isinstance(err, errors.UnsafeContentError) and err.key == "a/data/0"


def test_overlapping_members(tmp_path: Path) -> None:
    # Member 'a/data/0' is declared inside the bytes of 'a/pad': an overlapping-entry zip bomb.
    inner = (
        struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 4, 4, 8, 0)
        + b"a/data/0"
        + b"\0" * 4
    )
    pkl = _tensor_pkl(1, 0, (1,), (1,))
    body = raw_zip([("a/data.pkl", pkl), ("a/pad", inner)])
    pad_off = body.index(b"a/pad") - 30
    inner_off = pad_off + 30 + len("a/pad")
    body = raw_zip(
        [("a/data.pkl", pkl), ("a/pad", inner)],
        central=[
            ("a/data.pkl", 0, len(pkl)),
            ("a/pad", pad_off, len(inner)),
            ("a/data/0", inner_off, 4),
        ],
    )
    p = tmp_path / "overlap.pt"
    p.write_bytes(body)
    assert "overlap" in str(_open(p))


def test_local_name_differs_from_central_name(tmp_path: Path) -> None:
    pkl = _tensor_pkl(1, 0, (1,), (1,))
    body = bytearray(raw_zip([("a/data.pkl", pkl), ("a/data/0", b"\0" * 4)]))
    i = body.index(b"a/data/0")  # first occurrence: the local header
    body[i : i + 8] = b"a/data/1"
    p = tmp_path / "names.pt"
    p.write_bytes(bytes(body))
    assert "different name" in str(_open(p))


def test_member_range_outside_file(tmp_path: Path) -> None:
    pkl = _tensor_pkl(1, 0, (1,), (1,))
    body = raw_zip(
        [("a/data.pkl", pkl), ("a/data/0", b"\0" * 4)],
        central=[("a/data.pkl", 0, len(pkl)), ("a/data/0", 10**9, 4)],
    )
    p = tmp_path / "oob.pt"
    p.write_bytes(body)
    assert isinstance(_open(p), errors.FormatError)


def test_too_many_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.ones(1) for i in range(20)}, p)
    monkeypatch.setattr(base, "LIMITS", base.Limits(max_entries=10))
    assert isinstance(_open(p), errors.UnsafeContentError)


def test_compressed_storage_record_refused(tmp_path: Path) -> None:
    p = tmp_path / "deflated.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a/data.pkl", _tensor_pkl(4, 0, (4,), (1,)))
        z.writestr("a/data/0", b"\0" * 16, compress_type=zipfile.ZIP_DEFLATED)
    assert isinstance(_open(p), errors.UnsupportedFormatError)


def test_zip_bomb_data_pkl_refused(tmp_path: Path) -> None:
    p = tmp_path / "bomb.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(
            "a/data.pkl",
            b"\x80\x02N" + b"0N" * 5_000_000 + b".",
            compress_type=zipfile.ZIP_DEFLATED,
        )
    assert isinstance(_open(p), errors.FormatError)


def test_torchscript_refused(tmp_path: Path) -> None:
    p = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    err = _open(p)
    assert isinstance(err, errors.UnsupportedFormatError) and "TorchScript" in str(err)


def test_legacy_storage_count_lies(tmp_path: Path) -> None:
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, p, _use_new_zipfile_serialization=False)
    raw = bytearray(p.read_bytes())
    i = len(raw) - 12 - 8  # int64 count before the 12 data bytes
    assert struct.unpack_from("<q", raw, i)[0] == 3
    struct.pack_into("<q", raw, i, 1 << 40)
    p.write_bytes(bytes(raw))
    assert "past the end" in str(_open(p))
    struct.pack_into("<q", raw, i, -1)
    p.write_bytes(bytes(raw))
    assert isinstance(_open(p), errors.FormatError)


def test_legacy_pickled_module_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    for obj in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, {"little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    buf.write(b"\x80\x02(X\x06\x00\x00\x00moduleN" + b"X\x01\x00\x00\x00fX\x03\x00\x00\x00srctQ.")
    p = tmp_path / "legacy_module.pt"
    p.write_bytes(buf.getvalue())
    err = _open(p)
    assert isinstance(err, errors.UnsafeContentError)


def _view_pkl(size: tuple[int, ...], stride: tuple[int, ...], numel: int = 0) -> bytes:
    """data.pkl of ``{"e": _rebuild_tensor_v2(FloatStorage(numel), 0, size, stride)}`` with
    arbitrary-precision ints (LONG1), written by the real pickler."""
    import collections

    marker = object()

    class View:
        def __reduce__(self) -> tuple[object, ...]:
            args = (marker, 0, size, stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is marker else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"e": View()})
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "stride"),
    [
        ((0, 2**64), (1, 1)),  # torch.empty: TypeError "Overflow when unpacking long"
        ((0, 2**63), (1, 1)),
        ((2**64 - 1, 0), (1, 1)),
        ((0,) * 65, (1,) * 65),
        ((0, 2**40, 2**40), (1, 1, 1)),
    ],
)
def test_empty_views_with_boundary_sizes_are_format_errors(
    tmp_path: Path, size: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    p = torch_zip(tmp_path / "dims.pt", _view_pkl(size, stride), {"0": b""})
    assert isinstance(_open(p), errors.FormatError)
    with pytest.raises(errors.FormatError):
        torch_pickle.load(p)
