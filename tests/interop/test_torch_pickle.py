"""Round trips: files written by the real torch.save, read by our pickle-free reader."""

from __future__ import annotations

import collections
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from savegame import errors
from savegame.interop import base, torch_pickle


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def assert_same(ref: Any, got: Any, where: str = "") -> None:
    """Structure and values equal; tensors bitwise equal with the same dtype/shape/type."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert type(got) is type(ref), (where, type(ref), type(got))
        assert got.dtype == ref.dtype and got.shape == ref.shape, where
        assert torch.equal(_bits(got), _bits(ref)), where
        assert got.requires_grad == ref.requires_grad, where
    elif isinstance(ref, dict):
        assert isinstance(got, dict) and list(got) == list(ref), (where, list(ref), list(got))
        for k in ref:
            assert_same(ref[k], got[k], f"{where}/{k}")
    elif isinstance(ref, (list, tuple)):
        assert type(got) is type(ref) and len(got) == len(ref), where
        for i, (x, y) in enumerate(zip(ref, got, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert type(got) is type(ref) and got == ref, (where, ref, got)


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    return model, opt


def _rich_obj() -> dict[str, Any]:
    base_t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.randn(10)
    return {
        "base": base_t,
        "view": base_t[1:, ::2],
        "transposed": base_t.t(),
        "shared_a": shared[:4],
        "shared_b": shared[3:],
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "f16": torch.randn(2, 3).half(),
        "f64": torch.randn(3, dtype=torch.float64),
        "fp8": torch.randn(5).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(5).to(torch.float8_e5m2),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "c64": torch.randn(3, dtype=torch.complex64),
        "c128": torch.randn(2, dtype=torch.complex128),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "expanded": torch.ones(1).expand(6),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "nested": {"list": [torch.ones(2), 3, "x"], "tuple": (1.5, None, True)},
        "bytes": b"\x00\xffabc",
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
    }


def test_rich_object_round_trips_bitwise(tmp_path: Path) -> None:
    p = tmp_path / "rich.pt"
    torch.save(_rich_obj(), p)
    ref = torch.load(p, weights_only=True)
    assert_same(ref, torch_pickle.load(p))


def test_tutorial_checkpoint_loads_into_model_and_optimizer(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    p = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 7,
            "state_dict": model.state_dict(),
            "best_accuracy": 0.91,
            "optimizer": opt.state_dict(),
        },
        p,
    )
    ckpt = torch_pickle.load(p)
    ref = torch.load(p, weights_only=True)
    assert_same(ref, ckpt)
    assert ckpt["epoch"] == 7 and ckpt["best_accuracy"] == 0.91
    assert list(ckpt["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]  # int keys stay ints
    model2, opt2 = _model_and_optimizer()
    with torch.no_grad():
        for prm in model2.parameters():
            prm.zero_()
    model2.load_state_dict(ckpt["state_dict"])
    opt2.load_state_dict(ckpt["optimizer"])
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_names_tree_and_info_are_lazy_and_consistent(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    p = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, p)
    with torch_pickle.open_torch(p) as r:
        keys = r.keys()
        assert "state_dict/0.weight" in keys
        assert "optimizer/state/0/exp_avg" in keys
        assert r.format == "torch"
        tree = r.tree()
        assert tree["state_dict"]["0.weight"] == base.TensorRef("state_dict/0.weight")
        info = r.info("state_dict/0.weight")
        assert info == base.TensorInfo("state_dict/0.weight", "float32", (3, 4), 48)
        assert torch.equal(r.read("state_dict/0.weight"), model.state_dict()["0.weight"])
        assert r.verify() == []
        with pytest.raises(errors.CheckpointNotFoundError) as ei:
            r.read("nope")
        assert ei.value.path == str(p)


def test_state_dict_from_buffer_uses_archive_prefix(tmp_path: Path) -> None:
    buf = io.BytesIO()
    sd = {"w": torch.randn(3, 3)}
    torch.save(sd, buf)
    p = tmp_path / "odd-name.bin"
    p.write_bytes(buf.getvalue())
    assert zipfile.ZipFile(p).namelist()[0].startswith("archive/")
    assert_same(sd, torch_pickle.load(p))


def test_legacy_format_round_trips(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    obj = {k: v for k, v in _rich_obj().items() if not k.startswith(("fp8", "u16", "u32"))}
    obj["state_dict"] = model.state_dict()
    obj["optimizer"] = opt.state_dict()
    p = tmp_path / "legacy.pt"
    torch.save(obj, p, _use_new_zipfile_serialization=False)
    assert p.read_bytes()[:2] == b"\x80\x02"
    with torch_pickle.open_torch(p) as r:
        assert r.metadata()["format"] == "legacy"
    assert_same(torch.load(p, weights_only=True), torch_pickle.load(p))


def _rezip(src: Path, dst: Path, edit: Any) -> None:
    """Copy a torch zip member by member (STORED), passing each (name, bytes) through ``edit``."""
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))


def test_cuda_location_opens_on_cpu(tmp_path: Path) -> None:
    src = tmp_path / "cpu.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    p = tmp_path / "gpu.pt"

    def to_cuda(name: str, data: bytes) -> bytes:
        # Protocol 2 strings are length-prefixed (no frames), so this edit keeps a valid pickle,
        # byte-identical to what torch.save writes for a tensor on cuda:0.
        if name.endswith("data.pkl"):
            assert b"X\x03\x00\x00\x00cpu" in data
            return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        return data

    _rezip(src, p, to_cuda)
    with torch_pickle.open_torch(p) as r:
        assert r.keys() == ["w"]
        assert torch.equal(r.read("w"), torch.arange(4.0))


def test_big_endian_byteorder_is_swapped(tmp_path: Path) -> None:
    src = tmp_path / "le.pt"
    t = torch.tensor([1.0, -2.5, 3.25], dtype=torch.float32)
    c = torch.tensor([1 + 2j], dtype=torch.complex64)
    torch.save({"t": t, "c": c}, src)
    p = tmp_path / "be.pt"

    def to_big(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
        return data

    _rezip(src, p, to_big)
    with torch_pickle.open_torch(p) as r:
        assert r.metadata()["byteorder"] == "big"
        assert torch.equal(r.read("t"), t)
        assert torch.equal(r.read("c"), c)


def test_listing_mode_turns_unknown_globals_into_opaque(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), p)  # a whole pickled module: needs unknown globals
    with pytest.raises(errors.UnsafeContentError) as ei:
        torch_pickle.open_torch(p)
    assert ei.value.key == "torch.nn.modules.linear.Linear"
    assert ei.value.path == str(p)
    with torch_pickle.open_torch(p, listing=True) as r:
        tree = r.tree()
        assert tree["__opaque__"] == base.Opaque("torch.nn.modules.linear", "Linear")
        assert any(k.endswith("weight") for k in r.keys())


def test_opened_reader_reads_only_one_storage_slice(tmp_path: Path) -> None:
    big = torch.zeros(1_000_000)
    small = torch.ones(3)
    p = tmp_path / "two.pt"
    torch.save({"big": big, "small": small, "slice": big[10:12]}, p)
    with torch_pickle.open_torch(p) as r:
        reads: list[int] = []
        real = r._f

        class Spy:
            def read(self, n: int = -1) -> bytes:
                reads.append(n)
                return real.read(n)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        r._f = Spy()  # type: ignore[assignment]
        assert torch.equal(r.read("small"), small)
        assert torch.equal(r.read("slice"), big[10:12])
        assert reads and max(reads) <= 12


def test_verify_reports_corrupt_storage_bytes(tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    torch.save({"w": torch.arange(16.0)}, p)
    raw = bytearray(p.read_bytes())
    data = torch.arange(16.0).numpy().tobytes()
    i = raw.index(data)
    raw[i + 5] ^= 0xFF
    p.write_bytes(bytes(raw))
    with torch_pickle.open_torch(p) as r:
        problems = r.verify()
    assert len(problems) == 1 and "CRC" in problems[0]


def test_bare_tensor_and_list_roots(tmp_path: Path) -> None:
    t = torch.randn(3)
    torch.save(t, tmp_path / "t.pt")
    with torch_pickle.open_torch(tmp_path / "t.pt") as r:
        assert r.keys() == ["tensor"] and r.tree() == base.TensorRef("tensor")
    assert_same(t, torch_pickle.load(tmp_path / "t.pt"))
    torch.save([t, t * 2], tmp_path / "l.pt")
    with torch_pickle.open_torch(tmp_path / "l.pt") as r:
        assert r.keys() == ["0", "1"]


@pytest.mark.parametrize("protocol", [1, 3, 4, 5])
def test_other_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    # torch.save(pickle_protocol=N): FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE, BINBYTES ...
    model, opt = _model_and_optimizer()
    obj = {
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "bytes": b"\x00\x01" * 3,
        "f": 1.25,
    }
    p = tmp_path / f"p{protocol}.pt"
    torch.save(obj, p, pickle_protocol=protocol)
    # The reference load is of a file this test wrote: the full unpickler is fine (the weights-only
    # one warns on protocols other than 2).
    assert_same(torch.load(p, weights_only=False), torch_pickle.load(p))


def test_protocol_0_text_opcodes(tmp_path: Path) -> None:
    # torch.save refuses protocol 0, but hand-made files may use it: INT/LONG/STRING/UNICODE/FLOAT.
    import pickle

    obj = {"a": [True, 1, 2**70, "xé\n", 1.5, None, b"ab"], "t": ("q", -3)}
    p = tmp_path / "p0.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a/data.pkl", pickle.dumps(obj, protocol=0))
    with torch_pickle.open_torch(p) as r:
        assert r.tree() == obj and r.keys() == []


# torch 2.13's weights_only allow-list (torch/_weights_only_unpickler.py _get_allowed_globals):
# what torch.load(weights_only=True) accepts, savegame reads too, with the same values and
# types. Protocol 2 names builtins `__builtin__.set` etc.; both unpicklers map them.
WEIGHTS_ONLY_VALUES: dict[str, object] = {
    "set": {1, 2, 3},
    "set_in_tuple": (torch.ones(2), {4, 5}),
    "counter": collections.Counter(a=2, b=1),
    "ordered": collections.OrderedDict(x=1),
    "complex": 1.5 - 2j,
    "bytearray": bytearray(b"\x00\xffxy"),
    "bytes": b"\x00\xff",
    "size": torch.Size([2, 3]),
    "dtypes": [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.uint4, torch.int3],
    "quantized_dtypes": [torch.qint8, torch.quint4x2, torch.bits8],
    "qscheme": torch.per_channel_affine,
    "device": torch.device("cuda", 1),
    "layouts": [torch.strided, torch.sparse_coo, torch.sparse_csr],
}


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("case", sorted(WEIGHTS_ONLY_VALUES))
def test_what_weights_only_loads_savegame_loads(tmp_path: Path, case: str, legacy: bool) -> None:
    path = tmp_path / f"{case}.pt"
    torch.save({case: WEIGHTS_ONLY_VALUES[case]}, path, _use_new_zipfile_serialization=not legacy)
    theirs = torch.load(path, weights_only=True)[case]
    ours = torch_pickle.load(path)[case]
    assert type(ours) is type(theirs)
    if case == "set_in_tuple":
        assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]
    else:
        assert ours == theirs


def test_frozenset_and_slice_are_read_as_inert_values(tmp_path: Path) -> None:
    # Not on torch's list, but plain data that runs nothing: read rather than refused.
    path = tmp_path / "fs.pt"
    torch.save({"f": frozenset({1, 2}), "s": slice(1, 5, 2)}, path)
    assert torch_pickle.load(path) == {"f": frozenset({1, 2}), "s": slice(1, 5, 2)}
