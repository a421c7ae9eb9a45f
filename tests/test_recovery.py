"""Recovery: damaged checkpoints never block a run, read-only runs restore, misuse is explained.

Issue 9.8: a corrupt newest checkpoint made restore fall back (right) but the next save of its
step raised StepExistsError on every restart, and retention deleted new valid checkpoints while
keeping corrupt ones. Issue 9.9: a run folder the process cannot write could not even be
restored. Issue 9.11: ``step(state, "ten")`` failed inside string formatting.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout


def _state(value: float = 0.0) -> tuple[sg.TrainState, dict[str, torch.Tensor]]:
    holder = {"w": torch.full((256,), value)}
    return sg.TrainState(rng=False, extras=holder), holder


def _corrupt(ckpt: Path) -> None:
    """Flip the last data byte of the tensor file: the manifest still parses, a hash fails."""
    data = ckpt / layout.tensor_file(0)
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))


def _set_aside(root: Path) -> list[int]:
    return sorted(s for p in root.iterdir() if (s := layout.parse_damaged_dir(p.name)) is not None)


def _steps(root: Path) -> list[int]:
    return [r.step for r in reader.list_checkpoints(root)]


def _save_steps(root: Path, steps: list[int], keep: sg.Keep | None = None, metric: dict[int, float] | None = None) -> None:
    state, holder = _state()
    with sg.Checkpointer(root, keep=keep or sg.Keep(last=10), handle_signals=False) as ckpt:
        for s in steps:
            holder["w"].fill_(float(s))
            ckpt.save(state, s, metrics={"acc": metric[s]} if metric else None)


def test_corrupt_newest_is_set_aside_and_its_step_saves_again(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1, 2])
    _corrupt(root / layout.step_dir(2))
    for restart in range(2):  # the old bug struck on every restart
        state, holder = _state()
        with sg.Checkpointer(root, handle_signals=False) as ckpt:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = ckpt.restore(state)
            assert step == (1 if restart == 0 else 2)
            assert any(issubclass(w.category, sg.CorruptCheckpointWarning) for w in caught) == (restart == 0)
            assert torch.equal(holder["w"], torch.full((256,), float(step)))
            if restart == 0:
                holder["w"].fill_(2.0)
                ckpt.save(state, 2)  # no StepExistsError
        assert _set_aside(root) == [2]  # the damaged bytes are kept for inspection
        assert _steps(root) == [1, 2]
        assert reader.verify(root / layout.step_dir(2)) == []


def test_every_checkpoint_corrupt_restarts_from_zero_and_keeps_saving(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1, 2, 3], keep=sg.Keep(last=2))
    for s in _steps(root):
        _corrupt(root / layout.step_dir(s))
    state, holder = _state()
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False) as ckpt:
        with pytest.warns(sg.CorruptCheckpointWarning):
            assert ckpt.restore(state) == 0
        for s in range(1, 5):
            holder["w"].fill_(float(s))
            assert ckpt.step(state, s)
    assert _steps(root) == [3, 4]  # retention kept the new valid ones
    assert all(reader.verify(root / layout.step_dir(s)) == [] for s in (3, 4))
    assert _set_aside(root) == [2, 3]


def test_retention_never_deletes_a_valid_checkpoint_while_keeping_a_damaged_one(tmp_path: Path) -> None:
    root = tmp_path / "run"
    keep = sg.Keep(last=1, best=1, monitor="acc", mode="max")
    _save_steps(root, [100, 200], keep=keep, metric={100: 0.9, 200: 0.5})
    assert _steps(root) == [100, 200]
    _corrupt(root / layout.step_dir(100))  # the best one, older than the one restore reads
    state, holder = _state()
    with sg.Checkpointer(root, keep=keep, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 200  # newest is fine: the damage is not seen here
        holder["w"].fill_(300.0)
        ckpt.save(state, 300, metrics={"acc": 0.4})
        # retention would have deleted 200 and kept the damaged best (100); it verified 100 first
        assert _steps(root) == [200, 300]
        assert {i.step: i.kept_for for i in ckpt.list()} == {200: ("best",), 300: ("last",)}
    assert _set_aside(root) == [100]


def test_ls_view_lists_set_aside_and_leftover_folders_but_retention_ignores_them(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1, 2])
    _corrupt(root / layout.step_dir(2))
    (root / layout.tmp_dir(3, "abc")).mkdir()  # a dead writer's temp folder
    with pytest.warns(sg.CorruptCheckpointWarning):
        sg.Checkpointer(root, handle_signals=False).restore(_state()[0])
    from savegame.checkpointer import list_run

    kinds = {(i.kind, i.step) for i in list_run(root, aside=True)}
    assert ("damaged", 2) in kinds and ("checkpoint", 1) in kinds
    assert all(i.kind == "checkpoint" for i in list_run(root))


# ---- read-only run folders (issue 9.9) ---------------------------------------------------------
_READONLY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, savegame as sg
    holder = {"w": torch.zeros(256)}
    state = sg.TrainState(rng=False, extras=holder)
    ckpt = sg.Checkpointer(sys.argv[1], handle_signals=False)
    assert not ckpt.writable
    step = ckpt.restore(state)
    assert step == 2 and torch.equal(holder["w"], torch.full((256,), 2.0)), (step, holder)
    try:
        ckpt.save(state, 3)
    except sg.StorageError as exc:
        assert "not writable" in str(exc), exc
        print("READ_ONLY_OK")
    ckpt.close()
    """
)


def test_restore_from_a_read_only_run_folder_works_and_saving_there_is_a_storage_error(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1, 2])
    (root / layout.LOCK).unlink()  # a fresh copy of someone's run: no lock file yet either
    if os.geteuid() == 0:
        # root ignores file permissions: make the folder a read-only bind mount in a private mount
        # namespace (EROFS, as on a read-only volume), visible to the child process only.
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare(1) to make a read-only mount as root")
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$1" "$1" && exec "$2" -c "$3" "$1"', "sh",
               str(root), sys.executable, _READONLY_SCRIPT]  # fmt: skip
    else:
        for dirpath, _, filenames in os.walk(root):
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o444)
            os.chmod(dirpath, 0o555)
        cmd = [sys.executable, "-c", _READONLY_SCRIPT, str(root)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, stat.S_IRWXU)
    if os.geteuid() == 0 and out.returncode != 0 and "mount" in out.stderr and "savegame" not in out.stderr:
        pytest.skip(f"no private read-only mount here: {out.stderr[-300:]}")
    assert out.returncode == 0 and "READ_ONLY_OK" in out.stdout, out.stdout + out.stderr
    assert _steps(root) == [1, 2]
    assert not (root / layout.LOCK).exists()


def test_lock_file_that_cannot_be_opened_for_writing_opens_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1])
    real_open = os.open

    def refuse(path: object, flags: int, *a: object) -> int:
        if str(path).endswith(layout.LOCK) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    state, holder = _state()
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), handle_signals=False)
    assert not ckpt.writable
    assert ckpt.restore(state) == 1
    with pytest.raises(sg.StorageError, match="not writable"):
        ckpt.step(state, 2)
    ckpt.close()


# ---- API misuse (issue 9.11) -------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["ten", 1.5, None, True, [3]])
def test_a_step_that_is_not_an_int_is_a_type_error_naming_it(tmp_path: Path, bad: object) -> None:
    state, _ = _state()
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        for call in (ckpt.step, ckpt.save, ckpt.save_async):
            with pytest.raises(TypeError, match="step must be an int"):
                call(state, bad)  # type: ignore[arg-type]
        if bad is not None:  # restore(step=None) means "the newest"
            with pytest.raises(TypeError, match="step must be an int"):
                ckpt.restore(state, step=bad)  # type: ignore[arg-type]


def test_negative_or_huge_step_is_a_value_error(tmp_path: Path) -> None:
    state, _ = _state()
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        for bad in (-1, 10**12):
            with pytest.raises(ValueError, match="step must be in"):
                ckpt.save(state, bad)


def test_numpy_and_tensor_steps_and_metrics_are_accepted(tmp_path: Path) -> None:
    state, _ = _state()
    keep = sg.Keep(last=2, best=1, monitor="acc", mode="max")
    with sg.Checkpointer(tmp_path / "run", keep=keep, handle_signals=False) as ckpt:
        ckpt.save(state, np.int64(5), metrics={"acc": torch.tensor(0.5)})  # type: ignore[arg-type]
        ckpt.save(state, 6, metrics={"acc": np.float32(0.25)})  # type: ignore[dict-item]
        assert [i.step for i in ckpt.list()] == [5, 6]
        assert ckpt.list()[0].metrics == {"acc": 0.5}


@pytest.mark.parametrize("metrics", [{"acc": "high"}, {"acc": [1, 2]}, {3: 0.5}, "acc"])
def test_a_metric_that_is_not_a_number_is_a_type_error_naming_it(tmp_path: Path, metrics: object) -> None:
    state, _ = _state()
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        with pytest.raises(TypeError, match="metric"):
            ckpt.step(state, 1, metrics=metrics)  # type: ignore[arg-type]
    assert _steps(tmp_path / "run") == []


def test_restore_reads_into_the_live_parameters_without_building_the_loader(tmp_path: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    model = torch.nn.Linear(64, 64)
    loader = StatefulDataLoader(list(range(32)), batch_size=4, shuffle=True)
    state = sg.TrainState(model=model, loader=loader)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        ckpt.save(state, 1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    fresh = StatefulDataLoader(list(range(32)), batch_size=4, shuffle=True)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        assert ckpt.restore(sg.TrainState(model=model, loader=fresh)) == 1
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs  # copied in place
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert getattr(fresh, "_iterator", None) is None  # built by the first iter(), not by restore


def test_a_failed_open_releases_the_lock_so_a_retry_in_the_same_process_works(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1])
    good = (root / layout.RUN_FILE).read_bytes()
    (root / layout.RUN_FILE).write_text("{damaged")
    with pytest.raises(sg.FormatError):
        sg.Checkpointer(root, handle_signals=False)
    (root / layout.RUN_FILE).write_bytes(good)  # the user repairs it and tries again
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        assert ckpt.restore(_state()[0]) == 1


def test_a_full_disk_does_not_stop_a_run_from_resuming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    root = tmp_path / "run"
    _save_steps(root, [1])

    def full(*_a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the lock's holder record cannot be written
    state, holder = _state()
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 1
    assert torch.equal(holder["w"], torch.full((256,), 1.0))


def test_a_metric_too_large_for_a_float_is_a_value_error(tmp_path: Path) -> None:
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        with pytest.raises(ValueError, match="does not fit a float"):
            ckpt.save(_state()[0], 1, metrics={"loss": 10**400})


def test_an_older_checkpoint_with_a_damaged_manifest_is_set_aside_after_restore(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save_steps(root, [1, 2, 3])
    (root / layout.step_dir(1) / layout.MANIFEST).write_text("{not json")  # restore never reaches it
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        assert ckpt.restore(_state()[0]) == 3
    assert _set_aside(root) == [1]
    assert _steps(root) == [2, 3]
