"""Retention in one place (issue 10): the plan (``list_run``/``unkept``), the damage check of
what is kept instead (``find_damage``), the Checkpointer's rule for a damaged kept checkpoint
(``plan_retention``: set aside, plan again) and applying a plan (``delete_unkept``), shared by
the Checkpointer and ``savegame prune``."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import checkpointer as runs
from savegame.checkpointer import retention
from savegame.engine import reader
from savegame.format import layout
from savegame.storage import local


def _run(root: Path, steps: int = 4, keep: sg.Keep | None = None) -> Path:
    state = sg.TrainState(model=torch.nn.Linear(3, 2), extras={"epoch": 1})
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=keep or sg.Keep(last=10), handle_signals=False
    ) as ck:
        for s in range(1, steps + 1):
            ck.step(state, s, metrics={"acc": s / 10})
    return root


def _corrupt(ckpt: Path) -> None:
    f = ckpt / layout.tensor_file(0)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _steps(root: Path) -> list[int]:
    return [r.step for r in reader.list_checkpoints(root)]


def test_the_public_run_folder_functions_import_no_torch() -> None:
    code = "import sys, savegame.checkpointer as c; c.list_run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_package_exports_what_callers_import() -> None:
    names = ("Checkpointer", "CheckpointInfo", "EXIT_PREEMPTED", "list_run", "plan_retention")
    for name in (*names, "read_run_file"):
        assert name in runs.__all__ and getattr(runs, name) is not None
    assert runs.Checkpointer is sg.Checkpointer and runs.CheckpointInfo is sg.CheckpointInfo


def test_unkept_spares_the_given_step_and_only_deletes_valid_checkpoints_of_this_run(
    tmp_path: Path,
) -> None:
    root = _run(tmp_path / "run")
    plan = runs.list_run(root, sg.Keep(last=1))
    assert [i.step for i in runs.unkept(plan, spare=None)] == [1, 2, 3]
    assert [i.step for i in runs.unkept(plan, spare=2)] == [1, 3]
    other = runs.list_run(root, sg.Keep(last=1), run_id="someone else")
    assert runs.unkept(other, spare=None) == []


def test_delete_unkept_moves_out_then_releases_and_returns_what_it_deleted(tmp_path: Path) -> None:
    root = _run(tmp_path / "run")
    released: list[tuple[Any, str]] = []
    plan = runs.list_run(root, sg.Keep(last=2))
    deleted = runs.delete_unkept(
        plan, spare=4, release=lambda freer, name: released.append((freer, name))
    )
    assert [i.step for i in deleted] == [1, 2]
    assert _steps(root) == [3, 4]
    assert [name for _, name in released] == [str(root / layout.step_dir(s)) for s in (1, 2)]
    trash = sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-deleted-step-"))
    assert len(trash) == 2  # out of the run, bytes still there: freed by the caller's release
    for freer, name in released:
        retention.free(freer, name)
    runs.delete_unkept(runs.list_run(root, sg.Keep(last=1)), spare=4)  # default release: now
    assert _steps(root) == [4] and not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_delete_unkept_logs_and_goes_on_when_a_checkpoint_cannot_be_moved_or_raises_when_strict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _run(tmp_path / "run", steps=3)
    plan = runs.list_run(root, sg.Keep(last=1))
    real = local.move_to_trash

    def refuse_first(path: Any, name: str) -> Path:
        if Path(path).name == layout.step_dir(1):
            raise PermissionError(13, "Permission denied")
        return real(path, name)

    monkeypatch.setattr(local, "move_to_trash", refuse_first)
    with pytest.raises(PermissionError):
        runs.delete_unkept(plan, spare=3, strict=True)
    assert _steps(root) == [1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="savegame"):
        deleted = runs.delete_unkept(plan, spare=3)
    assert [i.step for i in deleted] == [2]
    assert any("could not delete" in m and layout.step_dir(1) in m for m in caplog.messages)
    assert _steps(root) == [1, 3]


def test_find_damage_reads_what_is_kept_only_when_something_would_be_deleted(
    tmp_path: Path,
) -> None:
    root = _run(tmp_path / "run")
    _corrupt(root / layout.step_dir(4))
    verified: set[str] = set()
    assert runs.find_damage(runs.list_run(root, sg.Keep(last=10)), spare=4, verified=verified) == {}
    assert verified == set()  # nothing would be deleted: nothing read
    found = runs.find_damage(runs.list_run(root, sg.Keep(last=2)), spare=4, verified=verified)
    assert list(found) == [root / layout.step_dir(4)]
    assert verified == {str(root / layout.step_dir(3))}  # the intact kept one, read once


def test_plan_retention_sets_a_damaged_kept_checkpoint_aside_and_plans_again(
    tmp_path: Path,
) -> None:
    root = _run(tmp_path / "run")
    _corrupt(root / layout.step_dir(3))
    plan = runs.plan_retention(root, sg.Keep(last=2), None, verified=set(), spare=4)
    assert [(i.step, i.kept_for) for i in plan] == [(1, ()), (2, ("last",)), (4, ("last",))]
    aside = [p.name for p in root.iterdir() if p.name.startswith("damaged")]
    assert len(aside) == 1 and aside[0].startswith("damaged-step-000000000003")
    assert [i.step for i in runs.delete_unkept(plan, spare=4)] == [1]
    assert _steps(root) == [2, 4]


def test_plan_retention_keeps_everything_if_the_damaged_one_cannot_be_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from savegame.engine import writer

    root = _run(tmp_path / "run")
    _corrupt(root / layout.step_dir(3))

    def refuse(*a: Any, **k: Any) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writer, "set_aside_damaged", refuse)
    plan = runs.plan_retention(root, sg.Keep(last=2), None, verified=set(), spare=4)
    assert runs.unkept(plan, spare=4) == []
    assert all(i.kept_for for i in plan)


def test_the_checkpointer_and_prune_delete_alike(tmp_path: Path) -> None:
    """The same rule on the same run leaves the same checkpoints, by the Checkpointer or prune."""
    from savegame.cli.main import main

    a = _run(tmp_path / "a", steps=6, keep=sg.Keep(last=2, best=1, monitor="acc", mode="min"))
    b = _run(tmp_path / "b", steps=6)
    rule = ["--keep-last", "2", "--keep-best", "1", "--monitor", "acc", "--mode", "min"]
    assert main(["prune", str(b), *rule]) == 0
    assert _steps(a) == _steps(b) == [1, 5, 6]


def test_collect_garbage_and_free_remove_temp_folders_and_warn_about_what_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ".tmp-step-000000000001-abc").mkdir()
    (tmp_path / ".tmp-step-000000000001-abc" / "x").write_bytes(b"x")
    (tmp_path / "step-000000000002").mkdir()
    retention.collect_garbage(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000002"]

    def failing_rmtree(path: Any, onexc: Any = None, onerror: Any = None) -> None:
        exc = PermissionError(13, "Permission denied")
        if onexc is not None:
            onexc(os.unlink, f"{path}/f", exc)
        else:
            onerror(os.unlink, f"{path}/f", (PermissionError, exc, None))

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with caplog.at_level(logging.WARNING, logger="savegame"):
        path = tmp_path / "step-000000000002"
        retention.free(lambda: local.free_tree(path), str(path))
    assert any("could not delete" in m and "Permission denied" in m for m in caplog.messages)
