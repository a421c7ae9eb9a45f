"""Hostile Keras files: links, external/virtual storage, plugin filters, bombs, zip tricks.

Each case must end in a typed savegame error carrying ``.path``, before any tensor byte is read
from outside the file, and without executing anything named by the file.
"""

from __future__ import annotations

import base64
import json
import marshal
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from h5py import h5d, h5p, h5s, h5t, h5z

from savegame import errors
from savegame.interop import keras
from savegame.interop.keras import h5index, keras3

FIXTURES = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "keras"


def _legacy(path: Path) -> h5py.File:
    """A minimal save_weights-style legacy file with one layer 'd' and weight 'd/kernel:0'."""
    f = h5py.File(path, "w")
    f.attrs["keras_version"] = "2.15.0"
    f.attrs["layer_names"] = np.array([b"d"])
    g = f.create_group("d")
    g.attrs["weight_names"] = np.array([b"d/kernel:0"])
    g.create_group("d")
    return f


def _refused(
    path: Path,
    exc: type[errors.CheckpointError] = errors.UnsafeContentError,
    match: str | None = None,
) -> errors.CheckpointError:
    with pytest.raises(exc, match=match) as info:
        with keras.open_keras(path) as r:
            for name in r.keys():
                r.read(name)
    assert info.value.path == str(path)
    return info.value


def test_external_link_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as s:
        s["x"] = np.arange(4, dtype="f4")
    path = tmp_path / "ext.h5"
    with _legacy(path) as f:
        f["d/d/kernel:0"] = h5py.ExternalLink(str(secret), "/x")
    _refused(path, match="external link")
    # Also when the link is not on any weight's path.
    path2 = tmp_path / "ext2.h5"
    with _legacy(path2) as f:
        f["d/d/kernel:0"] = np.ones(2, "f4")
        f["unused"] = h5py.ExternalLink(str(secret), "/x")
    _refused(path2, match="external link")


def test_soft_link_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "soft.h5"
    with _legacy(path) as f:
        f["elsewhere"] = np.ones(2, "f4")
        f["d/d/kernel:0"] = h5py.SoftLink("/elsewhere")
    _refused(path, match="soft link")
    dangling = tmp_path / "dangling.h5"
    with _legacy(dangling) as f:
        f["d/d/kernel:0"] = h5py.SoftLink("/../../etc/passwd")
    _refused(dangling, match="soft link")


def test_hard_link_cycle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cycle.h5"
    with _legacy(path) as f:
        f["d/d/kernel:0"] = np.ones(2, "f4")
        f["d/d/loop"] = f["d"]
    _refused(path, match="already linked")


def test_external_raw_storage_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOP SECRET" * 10)
    path = tmp_path / "external.h5"
    with _legacy(path) as f:
        f["d/d"].create_dataset(
            "kernel:0", shape=(10,), dtype="f4", external=[(str(secret), 0, 40)]
        )
    _refused(path, match="external file")


def test_virtual_dataset_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as s:
        s["x"] = np.arange(4, dtype="f4")
    path = tmp_path / "vds.h5"
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(src), "x", shape=(4,))
    with _legacy(path) as f:
        f["d/d"].create_virtual_dataset("kernel:0", layout)
    _refused(path, match="virtual")


def _dataset_with_filter(group: h5py.Group, name: str, filter_id: int) -> None:
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_chunk((4,))
    # Optional, so HDF5 lets us write it without the filter; the pipeline still names it.
    dcpl.set_filter(filter_id, h5z.FLAG_OPTIONAL, (1,))
    d = h5d.create(group.id, name.encode(), h5t.NATIVE_FLOAT, h5s.create_simple((8,)), dcpl=dcpl)
    d.write(h5s.ALL, h5s.ALL, np.arange(8, dtype="f4"))


@pytest.mark.parametrize("filter_id", [40000, 32000, 307])
def test_unknown_or_plugin_filter_is_refused(tmp_path: Path, filter_id: int) -> None:
    path = tmp_path / "filter.h5"
    with _legacy(path) as f:
        _dataset_with_filter(f["d/d"], "kernel:0", filter_id)
    _refused(path, match=f"filter {filter_id}")


def test_builtin_filters_are_read(tmp_path: Path) -> None:
    path = tmp_path / "gzip.h5"
    with _legacy(path) as f:
        f["d/d"].create_dataset(
            "kernel:0",
            data=np.arange(64, dtype="f4"),
            compression="gzip",
            shuffle=True,
            fletcher32=True,
        )
    with keras.open_keras(path) as r:
        assert r.read("d/kernel:0").tolist() == list(range(64))


def test_huge_declared_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.h5"
    with _legacy(path) as f:
        # 4 TiB declared, nothing stored (fill value): never allocate it.
        f["d/d"].create_dataset("kernel:0", shape=(1 << 20, 1 << 20), dtype="f4", chunks=(256, 256))
    _refused(path, match="bomb")


def test_compression_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zbomb.h5"
    with _legacy(path) as f:
        f["d/d"].create_dataset(
            "kernel:0", data=np.zeros((4096, 2048), "f4"), compression="gzip", chunks=(1024, 2048)
        )
    assert path.stat().st_size < 1 << 20
    _refused(path, match="bomb")


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.h5"
    with _legacy(path) as f:
        f.create_group("/".join(["g"] * 100))
        f["d/d/kernel:0"] = np.ones(2, "f4")
    _refused(path, match="nest deeper")


def test_huge_attribute_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "attr.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["layer_names"] = np.zeros(h5index.MAX_ATTR_ELEMENTS + 1, dtype="S1")
    _refused(path, match="huge")


def test_deep_json_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "json.h5"
    with _legacy(path) as f:
        f["d/d/kernel:0"] = np.ones(2, "f4")
        f.attrs["model_config"] = "[" * 10_000 + "]" * 10_000
    _refused(path, errors.FormatError, match="nests deeper")


def test_listed_weight_missing_or_absolute(tmp_path: Path) -> None:
    path = tmp_path / "missing.h5"
    with _legacy(path):
        pass
    _refused(path, errors.FormatError, match="not a dataset")
    path2 = tmp_path / "abs.h5"
    with _legacy(path2) as f:
        f["d"].attrs["weight_names"] = np.array([b"/d/kernel:0"])
    _refused(path2, errors.FormatError, match="relative")


def test_non_numeric_dataset_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "str.weights.h5"
    with h5py.File(path, "w") as f:
        f["layers/dense/vars/0"] = np.array([b"abc"])
    _refused(path, errors.UnsupportedFormatError)


def test_not_keras_not_hdf5_missing_truncated(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = np.ones(3)
    # A Keras 3 weights file has vars groups; arbitrary HDF5 is listed by path only if it
    # has datasets, and an empty one is refused.
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w"):
        pass
    _refused(empty, errors.UnsupportedFormatError)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\xff" * 100)
    _refused(junk, errors.FormatError)
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes((FIXTURES / "cnn.h5").read_bytes()[:5000])
    _refused(truncated, errors.FormatError)
    with pytest.raises(errors.CheckpointNotFoundError) as info:
        keras.open_keras(tmp_path / "nope.h5")
    assert info.value.path == str(tmp_path / "nope.h5")
    with keras.open_keras(FIXTURES / "cnn.h5") as r:
        with pytest.raises(errors.CheckpointNotFoundError) as info:
            r.read("no/such")
        assert info.value.key == "no/such"


# ---- .keras zips -----------------------------------------------------------------------------


def _members() -> dict[str, bytes]:
    with zipfile.ZipFile(FIXTURES / "cnn.keras") as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(path: Path, members: dict[str, bytes], deflate: frozenset[str] = frozenset()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return path


def test_rebuilt_keras_zip_is_read(tmp_path: Path) -> None:
    path = _zip(tmp_path / "ok.keras", _members(), frozenset({"config.json", "metadata.json"}))
    with keras.open_keras(path) as r:
        assert r.metadata()["model_config"]["class_name"] == "Sequential"
        assert r.verify() == []


def test_deflated_weights_member_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "deflated.keras", _members(), frozenset({"model.weights.h5"}))
    _refused(path, match="compressed")


def test_deflate_bomb_member_is_refused(tmp_path: Path) -> None:
    members = _members()
    members["config.json"] = b"{" + b" " * (50 << 20) + b"}"  # inflates > 200x
    path = _zip(tmp_path / "bomb.keras", members, frozenset({"config.json"}))
    assert path.stat().st_size < 1 << 20
    _refused(path, errors.FormatError, match="zip bomb")


@pytest.mark.parametrize("evil", ["../model.weights.h5", "/etc/passwd", "a/../../x", "C:\\x"])
def test_member_outside_archive_root_is_refused(tmp_path: Path, evil: str) -> None:
    members = _members()
    members[evil] = b"x"
    _refused(_zip(tmp_path / "evil.keras", members), match="outside")


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.keras"
    members = _members()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        with pytest.warns(UserWarning, match="Duplicate"):
            z.writestr("model.weights.h5", b"not hdf5")
    _refused(path, match="two zip members")


def test_central_directory_lying_about_local_header(tmp_path: Path) -> None:
    path = _zip(tmp_path / "lie.keras", _members())
    data = bytearray(path.read_bytes())
    # Point the last central-directory entry at the first local header (overlapping entries).
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 42, 0)
    path.write_bytes(bytes(data))
    _refused(path, errors.FormatError)


def test_truncated_zip_and_missing_weights(tmp_path: Path) -> None:
    path = tmp_path / "trunc.keras"
    path.write_bytes((FIXTURES / "cnn.keras").read_bytes()[:-100])
    _refused(path, errors.FormatError)
    members = _members()
    del members["model.weights.h5"]
    _refused(_zip(tmp_path / "noweights.keras", members), errors.FormatError)


def test_lambda_layer_config_is_never_executed(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    def payload(x: object) -> object:
        open(sentinel, "w").close()  # noqa: SIM115 - would prove execution
        return x

    code = base64.b64encode(marshal.dumps(payload.__code__)).decode()
    config = json.loads(_members()["config.json"])
    config["config"]["layers"].append(
        {
            "module": "keras.layers",
            "class_name": "Lambda",
            "config": {
                "name": "evil",
                "function": {
                    "class_name": "__lambda__",
                    "config": {"code": code, "defaults": None, "closure": None},
                },
            },
        }
    )
    members = _members()
    members["config.json"] = json.dumps(config).encode()
    path = _zip(tmp_path / "lambda.keras", members)
    with keras.open_keras(path) as r:
        meta = r.metadata()
        for name in r.keys():
            r.read(name)
        r.verify()
    lam = meta["model_config"]["config"]["layers"][-1]
    assert lam["class_name"] == "Lambda"
    assert lam["config"]["function"]["config"]["code"] == code  # plain data, a str
    assert not sentinel.exists()
    # Same for a legacy .h5 whose model_config carries the Lambda.
    legacy = tmp_path / "lambda.h5"
    shutil.copyfile(FIXTURES / "cnn.h5", legacy)
    with h5py.File(legacy, "a") as f:
        f.attrs["model_config"] = json.dumps(config)
    with keras.open_keras(legacy) as r:
        assert r.metadata()["model_config"]["config"]["layers"][-1]["class_name"] == "Lambda"
    assert not sentinel.exists()


# ---- config.json versus the stored weights -------------------------------------------------


def _edit_layer(config: dict[str, object], name: str, **changes: object) -> None:
    for layer in config["config"]["layers"]:  # type: ignore[index]
        if layer["config"]["name"] == name:
            layer["config"].update(changes)
            return
    raise AssertionError(name)


@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize(
    ("layer", "changes", "weight", "stored", "implied"),
    [
        ("d1", {"units": 6}, "kernel", "(144, 5)", "(144, 6)"),
        ("c1", {"filters": 8}, "kernel", "(3, 3, 3, 4)", "(3, 3, 3, 8)"),
        ("c1", {"kernel_size": [5, 5]}, "kernel", "(3, 3, 3, 4)", "(5, 5, 3, 4)"),
    ],
)
def test_weights_that_contradict_config_json_are_refused(
    tmp_path: Path,
    isolate: bool,
    layer: str,
    changes: dict[str, object],
    weight: str,
    stored: str,
    implied: str,
) -> None:
    members = _members()
    config = json.loads(members["config.json"])
    _edit_layer(config, layer, **changes)
    members["config.json"] = json.dumps(config).encode()
    path = _zip(tmp_path / "mismatch.keras", members)
    with pytest.raises(errors.FormatError) as info:
        keras.open_keras(path, isolate=isolate)
    msg = str(info.value)
    assert f"layer '{layer}'" in msg and f"weight '{weight}'" in msg, msg
    assert stored in msg and implied in msg, msg
    assert info.value.path == str(path) and info.value.key is not None


def test_weight_count_that_contradicts_config_json_is_refused(tmp_path: Path) -> None:
    members = _members()
    config = json.loads(members["config.json"])
    _edit_layer(config, "d1", use_bias=False)  # the file still holds a bias
    members["config.json"] = json.dumps(config).encode()
    with pytest.raises(errors.FormatError, match=r"layer 'd1' \(Dense\) has 2 weights"):
        keras.open_keras(_zip(tmp_path / "count.keras", members))


def test_config_check_accepts_every_real_fixture() -> None:
    # The real Keras 3 archive agrees with itself (names by the vars `name` attribute and by
    # Keras' snake_case attribute names alike).
    with keras.open_keras(FIXTURES / "cnn.keras") as r:
        assert r.verify() == []
    index = {
        "meta": {"model_config": json.loads(_members()["config.json"])},
        "entries": {
            "layers/dense/vars/0": {"shape": [144, 6]},
            "layers/dense/vars/1": {"shape": [5]},
        },
    }
    with pytest.raises(errors.FormatError, match=r"\(144, 6\) but config.json implies \(144, 5\)"):
        keras3.check_config_shapes("x.keras", index)  # no layer_names: snake_case fallback


# ---- process isolation -----------------------------------------------------------------------

REGRESSIONS = Path(__file__).resolve().parents[1] / "fuzz" / "regressions" / "keras"


def test_api_open_isolates_by_default(tmp_path: Path) -> None:
    # This file segfaults libhdf5 2.0.0: in-process, it would kill the test run.
    import savegame as sg

    path = tmp_path / "segv.h5"
    shutil.copyfile(REGRESSIONS / "segv-root-attr-read.h5", path)
    with pytest.raises(errors.FormatError, match="crashed") as info:
        sg.open(path)
    assert info.value.path == str(path)
    with sg.open(FIXTURES / "cnn.keras") as r:
        assert r.isolated
    with sg.open(FIXTURES / "cnn.keras", isolate=False) as r:
        assert not r.isolated


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_hang_is_cut_by_the_timeout_and_the_child_reaped(tmp_path: Path) -> None:
    path = tmp_path / "hang.h5"
    shutil.copyfile(REGRESSIONS / "hang-vlen-name-attr.h5", path)
    before = _children(os.getpid())
    with pytest.raises(errors.FormatError, match="more than 2.0 s") as info:
        keras.open_keras(path, isolate_timeout=2.0)
    assert info.value.path == str(path)
    assert _children(os.getpid()) <= before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_isolation_child_dies_with_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "hang.h5"
    shutil.copyfile(REGRESSIONS / "hang-vlen-name-attr.h5", path)
    script = "import sys; from savegame.interop import keras; keras.open_keras(sys.argv[1])"
    parent = subprocess.Popen([sys.executable, "-c", script, str(path)])
    try:
        deadline = time.monotonic() + 60
        kids: set[int] = set()
        while not kids and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
            kids = _children(parent.pid)
        assert kids, "the isolation child never started"
        time.sleep(1.0)  # let it reach the hang inside libhdf5
        (child,) = kids
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 2.0
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child), "the isolation child outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_file_that_changes_after_the_check_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.weights.h5"
    shutil.copyfile(FIXTURES / "cnn.weights.h5", path)
    with keras.open_keras(path) as r:
        name = r.keys()[0]
        r.read(name)
        with open(path, "ab") as f:
            f.write(b"\0" * 16)
        with pytest.raises(errors.FormatError, match="changed after it was checked"):
            r.read(name)


def test_isolated_reads_equal_in_process_reads(tmp_path: Path) -> None:
    # Contiguous datasets are read by offset without libhdf5; chunked/compressed, compact,
    # big-endian, bool and complex ones come from the child. Both must equal h5py's reading.
    path = tmp_path / "mixed.weights.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w", userblock_size=512) as f:  # HDF5 data after a user block
        g = f.create_group("layers/dense/vars")
        g["0"] = rng.normal(size=(3, 4)).astype(">f4")
        g.create_dataset("1", data=rng.normal(size=(64,)), compression="gzip", shuffle=True)
        g.create_dataset("2", data=np.arange(7, dtype="<i2"), chunks=(3,), fletcher32=True)
        g["3"] = np.array([True, False, True])
        g["4"] = (rng.normal(size=3) + 1j * rng.normal(size=3)).astype("c8")
        g["5"] = np.float64(2.5)
        g["6"] = np.zeros((0, 3), "f4")
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_layout(h5d.COMPACT)
        space = h5s.create_simple((4,))
        h5d.create(g.id, b"7", h5t.NATIVE_INT32, space, dcpl=dcpl).write(
            h5s.ALL, h5s.ALL, np.arange(4, dtype="i4")
        )
    with keras.open_keras(path) as iso, keras.open_keras(path, isolate=False) as inproc:
        assert iso.isolated and not inproc.isolated
        assert iso.keys() == inproc.keys() and len(iso.keys()) == 8
        raw = [iso._entries[k]["raw"] is not None for k in iso.keys()]
        assert raw == [True, False, False, False, False, True, False, False]
        for name in iso.keys():
            a, b = iso.read(name), inproc.read(name)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
            assert iso.info(name) == inproc.info(name)


def test_isolation_child_imports_neither_torch_nor_savegame() -> None:
    import ast

    tree = ast.parse(Path(h5index.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {
        "__future__",
        "collections",
        "contextlib",
        "ctypes",
        "h5py",
        "io",
        "json",
        "math",
        "numpy",
        "os",
        "signal",
        "struct",
        "sys",
        "typing",
    }, imported


@pytest.mark.parametrize("isolate", [True, False])
def test_checksum_failure_fails_only_that_tensor(tmp_path: Path, isolate: bool) -> None:
    path = tmp_path / "crc.h5"
    with _legacy(path) as f:
        f["d"].attrs["weight_names"] = np.array([b"d/kernel:0", b"d/bias:0"])
        f["d/d"].create_dataset("kernel:0", data=np.arange(64, dtype="f4"), fletcher32=True)
        f["d/d/bias:0"] = np.ones(2, "f4")
    with h5py.File(path, "r") as f:
        chunk = f["d/d/kernel:0"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[chunk + 8] ^= 0xFF  # one stored byte of the checksummed chunk
    path.write_bytes(bytes(data))
    with keras.open_keras(path, isolate=isolate) as r:
        assert r.read("d/bias:0").tolist() == [1.0, 1.0]
        with pytest.raises(errors.FormatError) as info:
            r.read("d/kernel:0")
        assert info.value.key == "d/kernel:0" and info.value.path == str(path)
        (problem,) = r.verify()
        assert problem.startswith("d/kernel:0:")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors")
def test_isolation_works_when_the_file_lands_on_fd_0() -> None:
    # A daemon started with stdio closed gets the file as fd 0, which the child's own stdin
    # would shadow; the child must still read the right file.
    saved = os.dup(0)
    os.close(0)
    try:
        with keras.open_keras(FIXTURES / "cnn.keras") as r:
            assert r._source.raw.fileno() == 0  # type: ignore[attr-defined]
            problems, count = r.verify(), len(r.keys())
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert problems == [] and count == 10
