"""Outside review (s14): the command line on files it has never seen, as a new user would hand
them over (README "Command line": exit 2 on bad input "with a message on stderr saying what to
do"; "Reads anything, safely"; formats.md and formats-keras-darknet.md, "Refused").

Every hostile or damaged file goes through ``show``, ``verify``, ``convert`` and ``diff``: each
must end with a one-line ``error:`` message and exit 2 (never a traceback, never exit 0 for a
refused file), never run anything the file names (a marker file must not appear), leave no
output behind on a refused ``convert``, and never hang (the last tests run the real CLI in a
subprocess with a time limit).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from savegame.cli.main import main

MARKER = "PWNED-s14"


def _pickle_calling_system(marker: Path) -> bytes:
    """Protocol 2: ``{"w": posix.system("touch <marker>")}`` (GLOBAL + REDUCE)."""
    cmd = f"touch {marker}".encode()
    return (
        b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01cposix\nsystem\nq\x02X"
        + struct.pack("<I", len(cmd)) + cmd + b"q\x03\x85q\x04Rq\x05u."
    )  # fmt: skip


def _safetensors(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _keras(path: Path, config: bytes) -> None:
    import h5py

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("config.json", config)
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.0", "date_saved": "x"}))
        bio = io.BytesIO()
        with h5py.File(bio, "w") as f:
            f.create_group("layers/dense/vars").create_dataset("0", data=np.ones((2, 2), "f4"))
        z.writestr("model.weights.h5", bio.getvalue())


def _legacy_h5(path: Path, **dataset: object) -> None:
    """A Keras 2 ``save_weights`` file: layer ``d`` with one weight ``d/kernel:0``."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["layer_names"] = [b"d"]
        layer = f.create_group("d")
        layer.attrs["weight_names"] = [b"d/kernel:0"]
        layer.create_group("d").create_dataset("kernel:0", **dataset)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import h5py

    d = tmp_path_factory.mktemp("hostile")
    marker = d / MARKER
    out: dict[str, Path] = {}

    good = d / "good.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32), "epoch": 3}, good)
    out["good"] = good
    raw = good.read_bytes()
    for cut in (10, 100, len(raw) // 2, len(raw) - 22, len(raw) - 1):
        out[f"torch-truncated-{cut}"] = d / f"trunc{cut}.pt"
        out[f"torch-truncated-{cut}"].write_bytes(raw[:cut])

    evil = d / "evil.pt"  # a real torch zip whose data.pkl calls posix.system
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                body = _pickle_calling_system(marker)
            zout.writestr(info, body)
    out["torch-global-os-system"] = evil
    out["raw-pickle-os-system"] = d / "evil.pkl"
    out["raw-pickle-os-system"].write_bytes(_pickle_calling_system(marker))

    st = {
        "offsets-past-end": _safetensors(
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
        ),
        "header-len-2pow63": struct.pack("<Q", 2**63) + b"{}",
        "negative-dim": _safetensors(
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "unknown-dtype": _safetensors(
            {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "huge-shape": _safetensors(
            {"a": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "size-not-shape": _safetensors(
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
    }
    for name, body in st.items():
        out[f"safetensors-{name}"] = d / f"{name}.safetensors"
        out[f"safetensors-{name}"].write_bytes(body)

    for name, config in {
        "not-json": b"{not json",
        "not-utf8": b"\xff\xfe{}",
        "nested-100000": b"[" * 100_000 + b"]" * 100_000,
        "dense-contradicts-weights": json.dumps({
            "class_name": "Sequential",
            "config": {"layers": [{"class_name": "Dense", "config": {"name": "dense", "units": 3},
                                   "build_config": {"input_shape": [None, 2]}}]},
        }).encode(),
    }.items():  # fmt: skip
        out[f"keras-config-{name}"] = d / f"{name}.keras"
        _keras(out[f"keras-config-{name}"], config)

    for name, kw in {
        "compound": {"data": np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")])},
        "bytes": {"data": np.array([b"abc"])},
        "vlen": {"shape": (2,), "dtype": h5py.vlen_dtype(np.float32)},
        "reference": {"shape": (1,), "dtype": h5py.ref_dtype},
        "opaque": {"data": np.void(b"abcd")},
        "float128": {"data": np.ones(3, np.longdouble)},
        "subarray": {"shape": (2,), "dtype": np.dtype(("<f4", (3,)))},
        "null-dataspace": {"shape": None, "dtype": "f4"},
    }.items():
        out[f"h5-{name}"] = d / f"{name}.h5"
        _legacy_h5(out[f"h5-{name}"], **kw)

    cfg = d / "net.cfg"
    cfg.write_text(
        "[net]\nwidth=8\nheight=8\nchannels=3\n\n[convolutional]\nbatch_normalize=1\n"
        "filters=4\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
    )
    floats = np.ones(4 * 3 + 4 * 3 * 3 * 3, np.float32).tobytes()
    out["darknet-header-too-short"] = d / "short.weights"
    out["darknet-header-too-short"].write_bytes(b"\0" * 7)
    # major.minor 0.2 says ``seen`` is 8 bytes; this header has a 4-byte one: 4 bytes short
    out["darknet-header-wrong-seen-size"] = d / "seen4.weights"
    out["darknet-header-wrong-seen-size"].write_bytes(struct.pack("<iiii", 0, 2, 0, 32) + floats)
    out["darknet-trailing-bytes"] = d / "long.weights"
    out["darknet-trailing-bytes"].write_bytes(
        struct.pack("<iiiq", 0, 2, 0, 32) + floats + b"\0" * 400
    )

    np.save(d / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    out["npy-object"] = d / "object.npy"
    np.savez(d / "object.npz", a=np.array([{"a": 1}], dtype=object), b=np.arange(3))
    out["npz-object-member"] = d / "object.npz"
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    out["npy-object-with-os-system"] = d / "object-evil.npy"
    out["npy-object-with-os-system"].write_bytes(
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
        + _pickle_calling_system(marker)
    )  # fmt: skip
    header = b"{'descr': __import__('os').system('touch " + str(marker).encode() + b"'), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    out["npy-header-calls-os-system"] = d / "expr.npy"
    out["npy-header-calls-os-system"].write_bytes(
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 8
    )
    out["cfg"] = cfg
    return out


REFUSED = [
    "torch-truncated-10", "torch-truncated-100", "torch-truncated-half", "torch-truncated-eocd",
    "torch-truncated-last-byte", "raw-pickle-os-system",
    "safetensors-offsets-past-end", "safetensors-header-len-2pow63", "safetensors-negative-dim",
    "safetensors-unknown-dtype", "safetensors-huge-shape", "safetensors-size-not-shape",
    "keras-config-not-json", "keras-config-not-utf8", "keras-config-nested-100000",
    "keras-config-dense-contradicts-weights",
    "h5-compound", "h5-bytes", "h5-vlen", "h5-reference", "h5-opaque", "h5-float128",
    "h5-subarray", "h5-null-dataspace",
    "darknet-header-too-short", "darknet-header-wrong-seen-size", "darknet-trailing-bytes",
    "npy-object", "npz-object-member", "npy-object-with-os-system", "npy-header-calls-os-system",
]  # fmt: skip


def _path(files: dict[str, Path], name: str) -> Path:
    if name.startswith("torch-truncated-"):
        cuts = sorted(int(k.rsplit("-", 1)[1]) for k in files if k.startswith("torch-truncated-"))
        which = {"10": 0, "100": 1, "half": 2, "eocd": 3, "last-byte": 4}[name[16:]]
        return files[f"torch-truncated-{cuts[which]}"]
    return files[name]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _cfg(files: dict[str, Path], path: Path, flag: str = "--cfg") -> list[str]:
    return [flag, str(files["cfg"])] if path.suffix == ".weights" else []


@pytest.mark.parametrize("name", REFUSED)
def test_every_command_refuses_a_hostile_file_with_exit_2_and_one_clear_line(
    files: dict[str, Path], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _path(files, name)
    dst = tmp_path / "out" / "model.safetensors"
    runs = {
        "show": ["show", str(src), *_cfg(files, src)],
        "verify": ["verify", str(src), *_cfg(files, src)],
        "convert": ["convert", str(src), str(dst), "--to", "safetensors", *_cfg(files, src)],
        "diff": ["diff", str(src), str(files["good"]), *_cfg(files, src, "--cfg-a")],
    }
    for cmd, argv in runs.items():
        code, text = _cli(argv, capsys)
        assert "Traceback" not in text, text
        if name.startswith("darknet-") and name != "darknet-header-too-short" and cmd != "convert":
            # formats-keras-darknet.md: `show` always lists what the file holds and prints
            # "N of M layers present"; `verify` fails such a file (exit 1: a check found
            # problems, or 2); convert and diff refuse it.
            if cmd == "show":
                assert code == 0 and "layers present" in text, (cmd, code, text)
            elif cmd == "verify":
                assert code in (1, 2), (cmd, code, text)
            else:
                assert code == 2, (cmd, code, text)
            continue
        assert code == 2, f"savegame {cmd} {name}: exit {code}, expected 2\n{text}"
        assert "error:" in text and str(src.name) in text, (cmd, text)
    assert not (src.parent / MARKER).exists(), "the file ran a command"
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), (
        "a refused convert left files behind"
    )


def test_show_lists_a_pickle_calling_os_system_as_opaque_and_the_rest_refuse_it(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: "`savegame show` still lists such a file, with the unknown objects shown as
    `<opaque module.name>`"; everything that reads tensors raises UnsafeContentError (exit 2)."""
    src = files["torch-global-os-system"]
    code, text = _cli(["show", str(src)], capsys)
    assert code == 0 and "<opaque posix.system>" in text, text
    for argv in (
        ["verify", str(src)],
        ["convert", str(src), str(tmp_path / "x.safetensors"), "--to", "safetensors"],
        ["diff", str(src), str(files["good"])],
    ):
        code, text = _cli(argv, capsys)
        assert code == 2 and "posix.system" in text and "Traceback" not in text, (argv, text)
    assert not (src.parent / MARKER).exists()
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "dtype",
    ["i1", ">f8", "u8", "f2", "c8", "?"],
    ids=["int8", "f8-big", "u64", "f16", "c64", "bool"],
)
def test_odd_but_numeric_h5_dtypes_show_verify_and_convert_bit_exact(
    tmp_path: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """formats-keras-darknet.md: bool, (u)int8-64, float16/32/64, complex64/128; big-endian
    datasets are converted. Values survive ``convert --to torch`` bit for bit."""
    values = (
        np.array([0, 1, 0, 1, 1, 1]).astype(dtype)
        if dtype == "?"
        else (np.array([0, 1, 2, 3, 100, 127]).astype(dtype))
    )
    src = tmp_path / "odd.h5"
    _legacy_h5(src, data=values)
    assert _cli(["show", str(src)], capsys)[0] == 0
    assert _cli(["verify", str(src)], capsys)[0] == 0
    dst = tmp_path / "odd.pt"
    code, text = _cli(["convert", str(src), str(dst), "--to", "torch"], capsys)
    assert code == 0, text
    (t,) = torch.load(dst, weights_only=True).values()
    assert np.array_equal(t.numpy(), values.astype(values.dtype.newbyteorder("=")))


def _run_cli(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [sys.executable, "-m", "savegame", *argv], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("cmd", ["show", "verify"])
def test_a_named_pipe_is_refused_not_waited_on(tmp_path: Path, cmd: str) -> None:
    """A FIFO with nothing writing to it (`mkfifo model.pt`, a stale pipe in a shared folder):
    the CLI must say it is not a regular file and exit 2, not block forever."""
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    done = _run_cli(cmd, str(fifo), timeout=6)
    assert done is not None, f"savegame {cmd} on a FIFO did not end in 6 s"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("fifo", ["step-000000000001/manifest.json", "run.json"])
def test_a_run_folder_with_a_named_pipe_in_it_does_not_hang_ls(tmp_path: Path, fifo: str) -> None:
    """A hostile (or oddly copied) run folder: `savegame ls` must end, with exit 0, 1 or 2."""
    run = tmp_path / "run"
    if fifo == "run.json":
        import savegame as sg

        with sg.Checkpointer(run) as c:
            c.save(sg.TrainState(extras={"a": 1}), 1)
        (run / "run.json").unlink()
    (run / fifo).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(run / fifo)
    done = _run_cli("ls", str(run), timeout=10)
    assert done is not None, f"savegame ls on a run folder with a FIFO {fifo} did not end in 10 s"
    assert "Traceback" not in done.stderr, done.stderr


def test_a_piped_torch_file_is_not_called_a_damaged_zip(tmp_path: Path) -> None:
    """`savegame show <(curl …)` / `show /dev/stdin`: a pipe holds the bytes of a good file.
    Reading it or refusing it as "not a regular file" are both fine (exit 0 or 2); calling the
    good file a damaged or hostile zip archive sends the user after a problem they do not have."""
    src = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, src)
    done = subprocess.run(
        [sys.executable, "-m", "savegame", "show", "/dev/stdin"], input=src.read_bytes(),
        capture_output=True, timeout=60,
    )  # fmt: skip
    err = done.stderr.decode(errors="replace")
    assert done.returncode in (0, 2), err
    assert "Traceback" not in err
    if done.returncode == 2:
        assert "damaged or hostile" not in err, err
