"""``convert``'s output never replaces what it must not (README "savegame convert"): a whole run
folder, the folder the user works in, or a checkpoint of a run a training holds; and a failed
conversion leaves nothing beside its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.storage import files


def _run(root: Path, steps: int) -> Path:
    state = sg.TrainState(model=torch.nn.Linear(2, 2), rng=False)
    with sg.Checkpointer(root, keep=sg.Keep(last=steps), handle_signals=False) as ck:
        for s in range(1, steps + 1):
            ck.save(state, s)
    return root / f"step-{steps:012d}"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_never_replaces_a_whole_run(tmp_path: Path) -> None:
    src = _run(tmp_path / "a", 1)
    run = tmp_path / "b"
    _run(run, 2)
    before = _tree(run)
    with pytest.raises(sg.StepExistsError, match="is a run folder"):
        sg.convert(src, run, to="savegame", overwrite=True)
    assert _tree(run) == before


def test_overwrite_never_replaces_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _run(tmp_path / "a", 1)
    here = tmp_path / "project"
    here.mkdir()
    (here / "train.py").write_text("print('mine')\n")
    monkeypatch.chdir(here)
    with pytest.raises(sg.StepExistsError, match="current folder"):
        sg.convert(src, ".", to="savegame", overwrite=True)
    with pytest.raises(sg.StepExistsError, match="current folder"):
        sg.convert(src, "..", to="safetensors", overwrite=True)
    assert [p.name for p in here.iterdir()] == ["train.py"]


def test_a_checkpoint_of_a_live_run_is_never_written_but_an_export_beside_it_is(
    tmp_path: Path,
) -> None:
    src = _run(tmp_path / "a", 1)
    live = tmp_path / "live"
    _run(live, 2)
    before = _tree(live)
    with sg.Checkpointer(live, handle_signals=False):  # a training holds it
        with pytest.raises(sg.LockedError):
            sg.convert(src, live / "step-000000000009", to="savegame")
        with pytest.raises(sg.LockedError):
            sg.convert(src, live / "step-000000000002", to="savegame", overwrite=True)
        assert _tree(live) == before
        out = sg.convert(src, live / "export.safetensors", to="safetensors")
        assert out.is_file()
    before = _tree(live)
    # not held: a checkpoint written into the run folder is fine, under the name of its step
    with pytest.raises(sg.EncodeError, match="named for step 9.*step-000000000001"):
        sg.convert(src, live / "step-000000000009", to="savegame")
    assert _tree(live) == before
    sg.convert(src, live / "step-000000000001", to="savegame", overwrite=True)
    assert sg.load(live / "step-000000000001")


def test_a_failed_publish_leaves_nothing_beside_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _run(tmp_path / "a", 1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt").mkdir()

    def refuse(tmp: Path, out: Path, *, replace: bool = False) -> None:
        raise OSError(16, "Device or resource busy", str(out))

    monkeypatch.setattr(files, "publish_dir", refuse)
    with pytest.raises(OSError, match="busy"):
        sg.convert(src, out_dir / "ckpt", to="savegame", overwrite=True)
    assert [p.name for p in out_dir.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("to", ["safetensors", "torch"])
def test_a_file_output_never_replaces_a_folder(tmp_path: Path, to: str) -> None:
    """``--overwrite`` onto a checkpoint folder with a one-file format: a typed refusal that
    names a file path, and the checkpoint stays (it was a raw IsADirectoryError, exit 2)."""
    src = _run(tmp_path / "a", 1)
    run = tmp_path / "b"
    ckpt = _run(run, 2)
    before = _tree(run)
    with pytest.raises(sg.StepExistsError, match=r"is a folder, and a .* output is one file"):
        sg.convert(src, ckpt, to=to, overwrite=True)
    assert _tree(run) == before
    from savegame.engine import reader

    assert reader.verify(ckpt) == []
