from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import layout


def make_state(seed: int = 0) -> tuple[sg.TrainState, torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    extras: dict[str, Any] = {"epoch": 0}
    return sg.TrainState(model=model, optimizer=opt, extras=extras), model, extras


def train_step(model: torch.nn.Module, state: sg.TrainState) -> None:
    loss = model(torch.randn(4, 3)).square().sum()
    loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def steps_on_disk(root: Path) -> list[int]:
    return [r.step for r in reader.list_checkpoints(root)]


def open_ckpt(root: Path, **kwargs: Any) -> sg.Checkpointer:
    kwargs.setdefault("handle_signals", False)
    return sg.Checkpointer(root, **kwargs)


def test_restore_on_a_fresh_run_returns_zero_and_changes_nothing(tmp_path: Path) -> None:
    state, model, _ = make_state()
    before = model.weight.detach().clone()
    with open_ckpt(tmp_path / "run") as ckpt:
        assert ckpt.restore(state) == 0
    assert torch.equal(model.weight, before)


def test_save_and_restore_in_a_new_checkpointer_resumes_state_and_step(tmp_path: Path) -> None:
    state, model, extras = make_state()
    with open_ckpt(tmp_path, save=sg.Every(steps=2)) as ckpt:
        for step in range(1, 5):
            train_step(model, state)
            extras["epoch"] = step
            ckpt.step(state, step)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state2, model2, extras2 = make_state(seed=1)
    with open_ckpt(tmp_path, save=sg.Every(steps=2)) as ckpt:
        assert ckpt.restore(state2) == 4
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in saved.items())
    assert extras2 == {"epoch": 4}
    assert state2["optimizer"].state_dict()["state"][0]["step"] == 4


def test_restore_a_given_step_and_a_missing_step(tmp_path: Path) -> None:
    state, model, _ = make_state()
    with open_ckpt(tmp_path, save=sg.Every(steps=1), keep=sg.Keep(last=5)) as ckpt:
        for step in (1, 2):
            train_step(model, state)
            ckpt.step(state, step)
        assert ckpt.restore(state, step=1) == 1
        with pytest.raises(sg.CheckpointNotFoundError):
            ckpt.restore(state, step=9)


def test_restore_into_different_objects_is_restore_error(tmp_path: Path) -> None:
    state, model, _ = make_state()
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(state, 1)
        with pytest.raises(sg.RestoreError, match="does not match this TrainState"):
            ckpt.restore(sg.TrainState(net=model))


def test_retention_keeps_last_and_best(tmp_path: Path) -> None:
    state, model, _ = make_state()
    keep = sg.Keep(last=2, best=1, monitor="val_acc", mode="max")
    accs = {100: 0.5, 200: 0.9, 300: 0.7, 400: 0.6, 500: 0.65}
    with open_ckpt(tmp_path, save=sg.Every(steps=100), keep=keep) as ckpt:
        for step, acc in accs.items():
            ckpt.step(state, step, metrics={"val_acc": acc})
        kept = {i.step: i.kept_for for i in ckpt.list()}
    assert steps_on_disk(tmp_path) == [200, 400, 500]
    assert kept == {200: ("best",), 400: ("last",), 500: ("last",)}


def test_best_is_rebuilt_from_manifests_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, _, _ = make_state()
    keep = sg.Keep(last=1, best=1, monitor="val_acc", mode="max")
    with open_ckpt(tmp_path, save=sg.Every(steps=100), keep=keep) as ckpt:
        ckpt.step(state, 100, metrics={"val_acc": 0.5})
        ckpt.step(state, 200, metrics={"val_acc": 0.9})
        ckpt.step(state, 300, metrics={"val_acc": 0.7})
    caplog.set_level(logging.INFO, logger="savegame")
    with open_ckpt(tmp_path, save=sg.Every(steps=100), keep=keep) as ckpt:
        assert ckpt.restore(state) == 300
        # not better than 0.9 (from before the restart), and not due: no save
        assert ckpt.step(state, 350, metrics={"val_acc": 0.8}) is False
        ckpt.step(state, 400, metrics={"val_acc": 0.85})
        ckpt.step(state, 500)
    assert "step 350: val_acc did not improve from 0.9000" in caplog.messages
    assert steps_on_disk(tmp_path) == [200, 500]


def test_retention_never_deletes_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    state, _, _ = make_state()
    with open_ckpt(tmp_path / "other") as other:
        other.save(state, 5)
    root = tmp_path / "run"
    root.mkdir()
    shutil.copytree(tmp_path / "other" / layout.step_dir(5), root / layout.step_dir(5))
    with open_ckpt(root, save=sg.Every(steps=10), keep=sg.Keep(last=1)) as ckpt:
        for step in (10, 20, 30):
            ckpt.step(state, step)
        infos = {i.step: i for i in ckpt.list()}
    assert steps_on_disk(root) == [5, 30]
    assert not infos[5].ours and infos[5].kept_for == ("not ours",)


def test_log_lines_for_improved_and_not_improved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, _, _ = make_state()
    caplog.set_level(logging.INFO, logger="savegame")
    keep = sg.Keep(last=3, best=1, monitor="val_acc", mode="max")
    with open_ckpt(tmp_path, save=sg.Every(steps=100), keep=keep) as ckpt:
        ckpt.step(state, 1100, metrics={"val_acc": 0.91})
        ckpt.step(state, 1200, metrics={"val_acc": 0.93})
        ckpt.step(state, 1300, metrics={"val_acc": 0.92})
    assert (
        "step 1100: val_acc improved from -inf to 0.9100, saved step-000000001100"
        in caplog.messages
    )
    assert (
        "step 1200: val_acc improved from 0.9100 to 0.9300, saved step-000000001200"
        in caplog.messages
    )
    assert "step 1300: val_acc did not improve from 0.9300" in caplog.messages


def test_min_mode_log_starts_from_inf(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state, _, _ = make_state()
    caplog.set_level(logging.INFO, logger="savegame")
    keep = sg.Keep(last=1, best=1, monitor="val_loss", mode="min")
    with open_ckpt(tmp_path, save=sg.Every(steps=1000), keep=keep) as ckpt:
        ckpt.step(state, 7, metrics={"val_loss": 0.25})
    assert (
        "step 7: val_loss improved from inf to 0.2500, saved step-000000000007" in caplog.messages
    )


def test_improving_metric_at_a_non_save_step_triggers_a_save(tmp_path: Path) -> None:
    state, _, _ = make_state()
    keep = sg.Keep(last=1, best=1, monitor="val_acc", mode="max")
    with open_ckpt(tmp_path, save=sg.Every(steps=100), keep=keep) as ckpt:
        assert ckpt.step(state, 100, metrics={"val_acc": 0.5}) is True
        assert ckpt.step(state, 150) is False
        assert ckpt.step(state, 170, metrics={"val_acc": 0.4}) is False
        assert ckpt.step(state, 180, metrics={"val_acc": 0.6}) is True
    m = reader.read_manifest(tmp_path / layout.step_dir(180))
    assert m.info["reason"] == "best" and m.metrics["val_acc"] == 0.6


def test_nan_metric_never_counts_as_best(tmp_path: Path) -> None:
    state, _, _ = make_state()
    keep = sg.Keep(last=1, best=1, monitor="loss", mode="min")
    with open_ckpt(tmp_path, save=sg.Every(steps=100), keep=keep) as ckpt:
        assert ckpt.step(state, 10, metrics={"loss": float("nan")}) is False
        assert ckpt.step(state, 20, metrics={"loss": 1.0}) is True


def test_second_writer_on_the_same_folder_is_locked_error(tmp_path: Path) -> None:
    with open_ckpt(tmp_path):
        with pytest.raises(sg.LockedError, match=f"pid {os.getpid()}") as info:
            open_ckpt(tmp_path)
        assert info.value.path == str(tmp_path)
    open_ckpt(tmp_path).close()  # free again after close


def test_leftover_temp_folders_are_removed_on_open(tmp_path: Path) -> None:
    state, _, _ = make_state()
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(state, 1)
    junk = tmp_path / layout.tmp_dir(2, "deadbeef")
    junk.mkdir()
    (junk / "rank-00000.safetensors").write_bytes(b"partial")
    with open_ckpt(tmp_path) as ckpt:
        assert not junk.exists()
        assert ckpt.restore(state) == 1


def test_closed_checkpointer_refuses_to_save(tmp_path: Path) -> None:
    state, _, _ = make_state()
    ckpt = open_ckpt(tmp_path)
    ckpt.close()
    with pytest.raises(sg.CheckpointError, match="closed"):
        ckpt.save(state, 1)


def test_explicit_save_of_a_step_already_saved_by_schedule_is_idempotent(tmp_path: Path) -> None:
    state, _, _ = make_state()
    with open_ckpt(tmp_path, save=sg.Every(steps=5)) as ckpt:
        ckpt.step(state, 5)
        assert ckpt.save(state, 5) == tmp_path / layout.step_dir(5)


def test_epoch_schedule_saves_at_epoch_ends(tmp_path: Path) -> None:
    state, _, _ = make_state()
    with open_ckpt(tmp_path, save=sg.Every(epochs=2), keep=sg.Keep(last=10)) as ckpt:
        for step in range(1, 13):
            ckpt.step(state, step, epoch_end=step % 3 == 0)
    assert steps_on_disk(tmp_path) == [6, 12]
    assert reader.read_manifest(tmp_path / layout.step_dir(12)).info["epochs_completed"] == 4


def test_signal_without_exit_sets_preempted_and_saves_at_next_step(tmp_path: Path) -> None:
    state, _, _ = make_state()
    with sg.Checkpointer(tmp_path, save=sg.Every(steps=1000), exit_on_signal=False) as ckpt:
        assert ckpt.step(state, 1) is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not ckpt.preempted
        assert ckpt.step(state, 2) is True
        assert ckpt.preempted
    assert steps_on_disk(tmp_path) == [2]
    assert reader.read_manifest(tmp_path / layout.step_dir(2)).info["reason"] == "signal SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored on close


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, savegame as sg
    root = sys.argv[1]
    model = torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(model.weight)
    state = sg.TrainState(model=model)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=10_000))
    step = ckpt.restore(state)
    while True:
        with torch.no_grad():
            model.weight.add_(1.0)
        step += 1
        ckpt.step(state, step)
        print(step, flush=True)
        time.sleep(0.02)
    """
)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow), signal.SIGINT]
)  # CI < 20 min
def test_preemption_signal_saves_at_next_step_boundary_and_exits_75(
    tmp_path: Path, signum: int
) -> None:
    root = tmp_path / "run"
    with subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(root)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        try:
            while int(proc.stdout.readline()) < 3:
                pass
            proc.send_signal(signum)
            rest = proc.stdout.read()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == sg.EXIT_PREEMPTED
    [saved] = steps_on_disk(root)
    m = reader.read_manifest(root / layout.step_dir(saved))
    assert m.info["reason"] == f"signal {signal.Signals(signum).name}"
    # the step was complete when saved: the weights count exactly `saved` increments,
    # and the process stopped right there (nothing printed after the saving step)
    tree = sg.load(root / layout.step_dir(saved))
    assert torch.equal(tree["model"]["weight"], torch.full((2, 2), float(saved)))
    assert saved > 3 and all(int(x) < saved for x in rest.split())
    assert reader.verify(root / layout.step_dir(saved)) == []


def test_retention_frees_space_off_the_save_path_and_close_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    started, release = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path: str, *args: Any, **kwargs: Any) -> None:
        started.set()
        release.wait(10)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    state = sg.TrainState(model=torch.nn.Linear(4, 4))
    ck = sg.Checkpointer(
        tmp_path, save=sg.Every(steps=1), keep=sg.Keep(last=1), handle_signals=False
    )
    try:
        ck.step(state, 1)
        ck.step(state, 2)  # step 1 leaves the run at once; its bytes are freed in the background
        assert started.wait(10)
        assert [r.step for r in reader.list_checkpoints(tmp_path)] == [2]
        assert any(p.name.startswith(".tmp-deleted-step-000000000001") for p in tmp_path.iterdir())
        closer = threading.Thread(target=ck.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive()  # close() waits for the deletion
    finally:
        release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_what_retention_knows_intact_does_not_grow_with_the_saves(tmp_path: Path) -> None:
    """A run of weeks saves tens of thousands of times: the set of folders known intact in
    this process, and the parsed-manifest cache, hold the kept checkpoints only, not one entry
    per save ever made."""
    import torch

    state = sg.TrainState(model=torch.nn.Linear(2, 2))
    with sg.Checkpointer(tmp_path / "run", save=sg.Every(steps=1), keep=sg.Keep(last=2)) as ck:
        for step in range(1, 41):
            ck.step(state, step)
        assert len(ck._verified) <= 3
    from savegame.engine import reader

    cached = [k for k in reader._parsed if k[0].startswith(str(tmp_path / "run"))]
    assert len(cached) <= 3, cached  # nor does the manifest cache keep the deleted ones


@pytest.mark.parametrize("call", ["restore", "step", "save", "save_async", "adopt"])
@pytest.mark.parametrize(
    "bad",
    [{"model": torch.nn.Linear(2, 2)}, torch.nn.Linear(2, 2).state_dict(), None],
    ids=["dict_of_objects", "state_dict", "none"],
)
def test_a_state_that_is_not_a_train_state_is_refused_at_the_first_call(
    tmp_path: Path, call: str, bad: object
) -> None:
    """``ckpt.step({"model": model}, step)`` must not train for hours and fail when the first
    save falls due: every call that takes the state refuses anything but a TrainState at once,
    with a TypeError saying how to wrap the objects, and writes nothing."""
    kwargs: dict[str, Any] = {}
    args: tuple[Any, ...] = (bad, 1)
    if call == "restore":
        args = (bad,)
    elif call == "adopt":
        args, kwargs = (tmp_path / "foreign.pt", bad), {"step": 1, "mapping": {"model": "m"}}
    with sg.Checkpointer(tmp_path / "run", save=sg.Every(steps=100)) as ck:
        with pytest.raises(TypeError, match=r"takes a savegame\.TrainState.*sg\.TrainState\("):
            getattr(ck, call)(*args, **kwargs)
    assert steps_on_disk(tmp_path / "run") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"root": 5}, TypeError, r"root=5: pass a folder path or a URL"),
        ({"root": ""}, ValueError, r"root='' is empty"),
        ({"root": "  "}, ValueError, r"root='  ' is empty"),
        ({"save": 500}, TypeError, r"save=500: pass a schedule, e\.g\. save=sg\.Every"),
        ({"keep": 3}, TypeError, r"keep=3: pass a rule, e\.g\. keep=sg\.Keep"),
        ({"cache": ""}, ValueError, r"cache='' is empty"),
        ({"start_from": 7}, TypeError, r"start_from=7: pass a folder path"),
    ],
)
def test_checkpointer_arguments_of_the_wrong_kind_are_refused_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], error: type, match: str
) -> None:
    """``Checkpointer(os.environ.get("RUN", ""))`` must not make the working directory a run
    folder (retention deletes step-… folders there); ``save=500`` is not an AttributeError
    deep inside. Nothing is created."""
    monkeypatch.chdir(tmp_path)
    kwargs = {"root": str(tmp_path / "run"), **kwargs}
    with pytest.raises(error, match=match):
        sg.Checkpointer(**kwargs)
    assert list(tmp_path.iterdir()) == []


def test_restore_refuses_an_unknown_per_rank_choice(tmp_path: Path) -> None:
    """``per_rank="fersh"`` must not pass silently on a fresh run and mean "strict" later."""
    state, _, _ = make_state()
    with sg.Checkpointer(tmp_path / "run") as ck:
        with pytest.raises(ValueError, match=r"per_rank='fersh': use 'strict' or 'fresh'"):
            ck.restore(state, per_rank="fersh")  # type: ignore[arg-type]


def test_a_forked_child_cannot_save_through_the_parents_checkpointer(tmp_path: Path) -> None:
    """A forked child (a multiprocessing fork Process) inherits the Checkpointer but not its
    threads: with an async save in flight at the fork, a save there waited for ever. It is
    refused at once; the child's close() neither waits nor gives back the parent's lock."""
    state, _, _ = make_state()
    root = tmp_path / "run"
    ck = sg.Checkpointer(root, async_save=True, handle_signals=False)
    try:
        ck.save(state, 1)
        ck.save_async(state, 2)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 3
            try:
                ck.save(state, 3)
            except sg.CheckpointError as exc:
                code = 0 if "forked child" in str(exc) else 4
            except BaseException:  # noqa: BLE001
                code = 5
            try:
                ck.close()
            except BaseException:  # noqa: BLE001
                code = 6
            os.write(w, bytes([code]))
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)  # (a hang here is the bug; the suite's timeout ends it)
        assert os.read(r, 1) == b"\x00" and status == 0
        os.close(r)
        with pytest.raises(sg.LockedError):  # the parent still holds the run
            sg.Checkpointer(root, handle_signals=False)
        ck.wait()
    finally:
        ck.close()
    assert steps_on_disk(root) == [1, 2]
