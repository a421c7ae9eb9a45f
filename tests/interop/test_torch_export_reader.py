"""``.pt2`` archives written by ``torch.export.save``: read bitwise without unpickling anything.

The archives are written by the real torch in the venv (module-scoped: exporting takes seconds);
the hostile ones are the same archive with one record or config changed.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import savegame
from savegame import errors
from savegame.interop import detect, torch_export

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied: one storage, two names
        self.low = torch.nn.Parameter(torch.randn(3, 2).to(torch.bfloat16))
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
        self.register_buffer("scratch", torch.arange(6.0).reshape(2, 3), persistent=False)
        self.table = torch.linspace(0, 1, 4)  # a plain tensor attribute: a lifted constant

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.emb(idx)) + self.table + self.scratch.sum()
        return self.head(x) + self.low.float().sum() + self.steps


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.export.ExportedProgram]:
    torch.manual_seed(0)
    net = Net()
    net.norm.running_mean.uniform_()
    net.norm.num_batches_tracked.fill_(3)
    net.eval()
    ep = torch.export.export(net, (torch.tensor([0, 3, 1]),))
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    torch.export.save(ep, path)
    return path, ep


def _expected(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    out = {k: v.detach() for k, v in ep.state_dict.items()}
    out.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_detected_and_every_tensor_reads_bitwise(
    exported: tuple[Path, torch.export.ExportedProgram],
) -> None:
    path, ep = exported
    assert detect.detect(path) == "torch-export"
    want = _expected(ep)
    with savegame.open(path) as r:
        assert r.format == "torch-export"
        assert sorted(r.keys()) == sorted(want)
        for name, t in want.items():
            got = r.read(name)
            assert _same(got, t), name
            info = r.info(name)
            assert (info.dtype, info.shape) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
        assert not r.read("emb.weight").requires_grad  # plain tensors, as every reader gives
        assert r.metadata()["pickled"] == []
        assert r.verify() == []


def test_tied_weights_read_from_one_record(
    exported: tuple[Path, torch.export.ExportedProgram],
) -> None:
    path, ep = exported
    with savegame.open(path) as r:
        if "head.weight" in r.keys():  # torch.export keeps one name per tied parameter or both
            assert _same(r.read("head.weight"), r.read("emb.weight"))


def test_show_verify_convert_and_diff_from_the_cli(
    exported: tuple[Path, torch.export.ExportedProgram],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from savegame.cli.main import main as cli

    path, ep = exported
    assert cli(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "torch-export" in shown and "norm.running_mean" in shown
    assert cli(["verify", str(path)]) == 0
    out = tmp_path / "net.safetensors"
    assert cli(["convert", str(path), str(out), "--to", "safetensors"]) == 0
    assert cli(["diff", str(path), str(out)]) == 0, capsys.readouterr().out
    from safetensors.torch import load_file

    loaded = load_file(out)
    for name, t in _expected(ep).items():
        assert _same(loaded[name], t), name


# -- hostile and damaged archives ---------------------------------------------------------------


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    """``src`` with the members named in ``change`` (without the archive folder) replaced, or
    dropped when None; other members kept byte for byte, STORED like torch writes them."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        folder = zin.infolist()[0].filename.split("/", 1)[0]
        for info in zin.infolist():
            inner = info.filename.split("/", 1)[1]
            if inner in change:
                if change[inner] is None:
                    continue
                zout.writestr(info.filename, change[inner])  # type: ignore[arg-type]
            else:
                zout.writestr(info.filename, zin.read(info))
        for inner, body in change.items():  # new members
            if body is not None and f"{folder}/{inner}" not in zin.namelist():
                zout.writestr(f"{folder}/{inner}", body)
    return dst


def _config(src: Path) -> dict:
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        return json.loads(z.read(name))


CFG = "data/weights/model_weights_config.json"


def _with_entry(src: Path, dst: Path, edit: dict) -> Path:
    cfg = _config(src)
    entry = cfg["config"]["emb.weight"]
    for key, value in edit.items():
        if key in entry:
            entry[key] = value
        else:
            entry["tensor_meta"][key] = value
    return _rewrite(src, dst, {CFG: json.dumps(cfg).encode()})


@pytest.mark.parametrize(
    "edit, error, words",
    [
        ({"storage_offset": {"as_int": 10**6}}, errors.FormatError, "reaches byte"),
        ({"sizes": [{"as_int": 5}, {"as_int": 40}]}, errors.FormatError, "reaches byte"),
        ({"strides": [{"as_int": -1}, {"as_int": 1}]}, errors.FormatError, "strides"),
        ({"sizes": [{"as_expr": {"expr_str": "s0"}}, {"as_int": 4}]}, errors.FormatError, "fixed"),
        ({"sizes": [{"as_int": 2**62}, {"as_int": 4}]}, errors.FormatError, "max_tensor_numel"),
        ({"dtype": 99}, errors.UnsupportedFormatError, "dtype code 99"),
        ({"layout": 1}, errors.UnsupportedFormatError, "sparse"),
        ({"path_name": "../../etc/passwd"}, errors.FormatError, "not in"),
        ({"path_name": "weight_999"}, errors.FormatError, "incomplete"),
    ],
)
def test_a_config_that_lies_is_refused_at_open(
    exported: tuple[Path, torch.export.ExportedProgram],
    tmp_path: Path,
    edit: dict,
    error: type[Exception],
    words: str,
) -> None:
    bad = _with_entry(exported[0], tmp_path / "bad.pt2", edit)
    with pytest.raises(error, match=words) as caught:
        savegame.open(bad)
    assert caught.value.path == str(bad)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body, words",
    [
        (b"\xff\xfe", "UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, "nests deeper"),
        (b'{"config": {"a": NaN}}', "not valid JSON"),
        (b'{"other": 1}', "no 'config'"),
    ],
)
def test_a_config_that_is_not_the_schema_is_a_format_error(
    exported: tuple[Path, torch.export.ExportedProgram], tmp_path: Path, body: bytes, words: str
) -> None:
    bad = _rewrite(exported[0], tmp_path / "bad.pt2", {CFG: body})
    with pytest.raises(errors.FormatError, match=words):
        savegame.open(bad)


def test_a_pickled_entry_is_never_unpickled(
    exported: tuple[Path, torch.export.ExportedProgram], tmp_path: Path
) -> None:
    # torch.export.load would torch.load(weights_only=False) this record: here it is listed as
    # opaque and its bytes are never parsed. The pickle would create a file if it ran.
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    import pickle

    cfg = _config(exported[0])
    cfg["config"]["evil"] = {"path_name": "weight_evil", "is_param": False, "use_pickle": True}
    bad = tmp_path / "bad.pt2"
    _rewrite(exported[0], bad, {CFG: json.dumps(cfg).encode()})
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("net/data/weights/weight_evil", pickle.dumps(Boom()))
    with savegame.open(bad) as r:
        assert "evil" not in r.keys()
        assert r.metadata()["pickled"] == ["evil"]
        assert r.tree()["evil"].module == "torch.export"
        with pytest.raises(errors.CheckpointNotFoundError, match="pickled"):
            r.read("evil")
        assert r.verify() == []
    assert not marker.exists()


def test_a_flipped_byte_in_a_record_fails_verify(
    exported: tuple[Path, torch.export.ExportedProgram], tmp_path: Path
) -> None:
    bad = tmp_path / "flipped.pt2"
    data = bytearray(exported[0].read_bytes())
    record = _config(exported[0])["config"]["emb.weight"]["path_name"]
    with zipfile.ZipFile(exported[0]) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/" + record)))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # local header
    start = info.header_offset + 30 + name_len + extra_len
    data[start] ^= 0x01
    bad.write_bytes(bytes(data))
    with savegame.open(bad) as r:
        problems = r.verify()
    assert problems and "CRC-32" in problems[0]


def test_not_a_pt2_and_a_weightless_archive_are_typed(
    exported: tuple[Path, torch.export.ExportedProgram], tmp_path: Path
) -> None:
    other = _rewrite(exported[0], tmp_path / "other.pt2", {"archive_format": b"zip"})
    with pytest.raises(errors.UnsupportedFormatError, match="archive_format"):
        torch_export.open_torch_export(other)
    legacy = _rewrite(
        exported[0], tmp_path / "legacy.pt2", {CFG: None, "data/weights/model.pt": b"x"}
    )
    with pytest.raises(errors.UnsupportedFormatError, match="torch < 2.7"):
        torch_export.open_torch_export(legacy)
    with pytest.raises(errors.CheckpointNotFoundError):
        torch_export.open_torch_export(tmp_path / "missing.pt2")


def test_torchscript_is_still_refused_as_torchscript(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    assert detect.detect(p) == "torchscript"
