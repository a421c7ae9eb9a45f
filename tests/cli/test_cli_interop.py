"""`savegame show / verify / convert / diff` on foreign files, called in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import savegame as sg
from savegame.cli.main import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "foreign"


class _Marker:
    """Unpickling this would create a file; savegame must never do it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def _tutorial(path: Path) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ckpt = {"epoch": 7, "state_dict": model.state_dict(), "best_accuracy": 0.91, "optimizer": opt.state_dict()}
    torch.save(ckpt, path)
    return ckpt


def test_show_lists_a_malicious_pickle_without_running_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": _Marker(str(marker))}, tmp_path / "evil.pt")
    assert main(["show", str(tmp_path / "evil.pt")]) == 0
    out = capsys.readouterr().out
    assert "opaque" in out and "float32[2]" in out
    assert main(["verify", str(tmp_path / "evil.pt")]) == 2
    err = capsys.readouterr().err
    assert "not on the allow-list" in err and "savegame show" in err
    assert main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "x.safetensors"), "--to", "safetensors"]) == 2
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def test_convert_tutorial_checkpoint_to_every_format_keeps_values(tmp_path: Path) -> None:
    src = tmp_path / "tut.pth"
    ckpt = _tutorial(src)
    sd = ckpt["state_dict"]
    assert isinstance(sd, dict)
    for to, dst in (("safetensors", "t.safetensors"), ("torch", "t.pt"), ("savegame", "t-sg")):
        assert main(["convert", str(src), str(tmp_path / dst), "--to", to]) == 0
    flat = load_file(tmp_path / "t.safetensors")
    weights_only = torch.load(tmp_path / "t.pt", weights_only=True)
    tree = sg.load(tmp_path / "t-sg")
    for name, value in sd.items():
        assert torch.equal(flat[f"state_dict/{name}"], value), name
        assert torch.equal(weights_only[f"state_dict/{name}"], value), name
        assert torch.equal(tree["state_dict"][name], value), name
    assert tree["epoch"] == 7 and tree["best_accuracy"] == 0.91
    assert sg.open(tmp_path / "t-sg").metadata()["step"] == 7  # the epoch becomes the step
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    # A conversion always yields the same tensors: diff says identical, exit 0.
    assert main(["diff", str(src), str(tmp_path / "t-sg")]) == 0
    assert main(["diff", str(tmp_path / "t.safetensors"), str(tmp_path / "t.pt")]) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_convert_never_replaces_an_existing_output_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "tut.pth"
    _tutorial(src)
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    assert main(["convert", str(src), str(dst), "--to", "safetensors"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert dst.read_bytes() == b"precious"
    assert main(["convert", str(src), str(dst), "--to", "safetensors", "--overwrite"]) == 0
    assert "state_dict/0.weight" in load_file(dst)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_convert_a_run_folder_takes_its_newest_valid_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = torch.nn.Linear(3, 2)
    state = sg.TrainState(model=model, extras={"epoch": 0})
    saved = {}
    with sg.Checkpointer(tmp_path / "run", save=sg.Every(steps=1), handle_signals=False) as ck:
        for s in (1, 2):
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.step(state, s)
            saved[s] = model.weight.detach().clone()
    newest = tmp_path / "run" / "step-000000000002" / "rank-00000.safetensors"
    newest.write_bytes(newest.read_bytes()[:-1])  # the newest is broken: step 1 is used
    # The CLI prints savegame's warnings itself, literally, as part of its output (issue 9.12).
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "w.safetensors"), "--to", "safetensors"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: skipping checkpoint" in err and "step-000000000002" in err
    assert torch.equal(load_file(tmp_path / "w.safetensors")["model/weight"], saved[1])


def test_diff_names_what_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    a = {"same": torch.arange(4.0), "moved": torch.zeros(3), "reshaped": torch.zeros(2, 3), "gone": torch.ones(1)}
    b = {"same": torch.arange(4.0), "moved": torch.tensor([0.0, 0.5, 0.0]), "reshaped": torch.zeros(3, 2), "new": torch.ones(1)}
    save_file(a, tmp_path / "a.safetensors")
    torch.save(b, tmp_path / "b.pt")
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt")]) == 1
    out = capsys.readouterr().out
    assert "only in A" in out and "gone" in out
    assert "only in B" in out and "new" in out
    assert "[2, 3] -> float32[3, 2]" in out
    assert "moved" in out and "0.5" in out
    assert "1 identical, 1 differ in value, 1 differ in dtype/shape, 1 only in A, 1 only in B" in " ".join(out.split())


def test_keras_files_are_read_in_a_child_process_unless_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("h5py")
    from savegame.interop.keras import isolation

    calls: list[str] = []
    real = isolation.isolated_index
    monkeypatch.setattr(isolation, "isolated_index", lambda path, *a: (calls.append(path), real(path, *a))[1])
    src = GOLDEN / "keras" / "cnn.weights.h5"
    assert main(["show", str(src)]) == 0
    assert calls == [str(src)]
    assert main(["show", "--no-isolate", str(src)]) == 0
    assert calls == [str(src)]
    assert main(["convert", str(src), str(tmp_path / "k.safetensors"), "--to", "safetensors"]) == 0
    assert len(calls) == 2
    capsys.readouterr()
    assert main(["diff", str(src), str(tmp_path / "k.safetensors")]) == 0


def test_darknet_needs_its_cfg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "yolo.weights"
    weights.write_bytes(b"\0" * 64)
    assert main(["show", str(weights)]) == 2
    assert "cfg" in capsys.readouterr().err


def _darknet_files(tmp_path: Path, layers: int | None = None) -> tuple[Path, Path]:
    """yolov3-tiny-small weights (random values), cut after ``layers`` cfg layers if given."""
    from savegame.interop import darknet

    cfg = GOLDEN / "darknet" / "yolov3-tiny-small.cfg"
    plan = darknet.plan_layers(darknet.parse_cfg(cfg.read_text()))
    n = sum(layer.nfloats for layer in (plan if layers is None else plan[:layers]))
    weights = tmp_path / ("full.weights" if layers is None else "backbone.weights")
    data = torch.arange(n, dtype=torch.float32).numpy().tobytes()
    weights.write_bytes(b"\0\0\0\0\2\0\0\0\5\0\0\0" + b"\0" * 8 + data)
    return weights, cfg


def test_darknet_file_shorter_than_its_cfg_needs_partial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 9.15: it used to load silently (convert exited 0 with most layers missing).
    cut, cfg = _darknet_files(tmp_path, layers=9)
    full, _ = _darknet_files(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(cut), str(out), "--to", "safetensors", "--cfg", str(cfg)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds 5 of the 13 layers" in err and "--partial" in err
    assert not out.exists()
    assert main(["convert", str(cut), str(out), "--to", "safetensors", "--cfg", str(cfg), "--partial"]) == 0
    assert "5 of 13 layers present" in capsys.readouterr().out
    assert len(load_file(out)) == 5 * 5  # 5 conv layers with BN: bias, 3 BN tensors, weight

    assert main(["show", str(cut), "--cfg", str(cfg)]) == 0  # listing: always, with the count
    assert "5 of 13 layers present (a partial file" in " ".join(capsys.readouterr().out.split())
    assert main(["show", str(full), "--cfg", str(cfg)]) == 0
    assert "13 of 13 layers present" in capsys.readouterr().out

    assert main(["verify", str(cut), "--cfg", str(cfg)]) == 1
    assert "add --partial" in " ".join(capsys.readouterr().out.split())
    assert main(["verify", str(cut), "--cfg", str(cfg), "--partial"]) == 0
    assert main(["verify", str(full), "--cfg", str(cfg)]) == 0
    capsys.readouterr()

    assert main(["diff", str(cut), str(out), "--cfg-a", str(cfg)]) == 2
    assert main(["diff", str(cut), str(out), "--cfg-a", str(cfg), "--partial"]) == 0


def test_tf2_checkpoint_converts_from_any_of_its_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Issues 9.13 and 9.14: the object graph string stopped every conversion, and the
    # .data-00000-of-00001 path was "unrecognised".
    tf = GOLDEN / "tensorflow" / "keras3"
    shard = tf / "ckpt-1.data-00000-of-00001"
    assert main(["show", str(shard)]) == 0
    assert "(tensorflow)" in capsys.readouterr().out
    assert main(["verify", str(shard)]) == 0
    capsys.readouterr()
    for src in (tf, tf / "ckpt-1", tf / "ckpt-1.index", shard):
        out = tmp_path / f"{src.name}.safetensors"
        assert main(["convert", str(src), str(out), "--to", "safetensors"]) == 0, src
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert "warning:" in err and "left out 2 string tensor(s)" in err, src
        assert "_CHECKPOINTABLE_OBJECT_GRAPH" in err and "extra/strings/.ATTRIBUTES/VARIABLE_VALUE" in err
        assert "wrote" in captured.out and "_CHECKPOINTABLE_OBJECT_GRAPH" not in load_file(out)
    for to, dst in (("torch", "k.pt"), ("savegame", "k-sg")):
        assert main(["convert", str(shard), str(tmp_path / dst), "--to", to]) == 0
        assert "warning" not in capsys.readouterr().err  # strings kept: nothing left out
    flat = torch.load(tmp_path / "k.pt", weights_only=True)
    assert isinstance(flat["_CHECKPOINTABLE_OBJECT_GRAPH"], bytes)
    assert sg.load(tmp_path / "k-sg")["_CHECKPOINTABLE_OBJECT_GRAPH"] == flat["_CHECKPOINTABLE_OBJECT_GRAPH"]
    # Numbers are identical; the strings, values rather than tensors there, are "only in A".
    assert main(["diff", str(tf), str(tmp_path / "k.pt")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "26 identical, 0 differ in value, 0 differ in dtype/shape, 2 only in A, 0 only in B" in out


def test_failed_convert_removes_the_folders_it_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    dst = tmp_path / "new" / "deeper" / "out.safetensors"
    assert main(["convert", str(empty), str(dst), "--to", "safetensors"]) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt"]
