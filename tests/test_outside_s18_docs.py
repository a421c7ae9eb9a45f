"""Outside review R12 (s18): the docs taken literally.

Each test does what one code block or one sentence of README.md / docs/*.md shows, in a temp
folder, and checks what the docs say happens. Grouped by doc file; named after the file and the
claim. A claim that does not hold is a strict xfail whose reason quotes the doc.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import savegame as sg
from tests._outside_s18_docs import SAVEGAME, Indexed, cli, main_rc, tiny_model

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

GOLDEN = Path(__file__).parent / "golden" / "foreign"
_UID = f"{os.getpid()}-{id(object())}"  # memory:// stores live for the process: names of our own


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _state(seed=0, loader=None, **kw):
    model = tiny_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = dict(model=model, optimizer=opt, **kw)
    if loader is not None:
        parts["loader"] = loader
    return sg.TrainState(**parts), model, opt


def _train(model, opt):
    opt.zero_grad()
    model(torch.ones(2, 1)).sum().backward()
    opt.step()


def _run_with_steps(root, steps=(1, 2), **ck):
    state, model, opt = _state()
    with sg.Checkpointer(root, **ck) as ckpt:
        for s in steps:
            _train(model, opt)
            ckpt.save(state, s)
    return state, model, opt


def _flip_byte(path: Path, offset: int = -1):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


# ============================================================================== README.md


def test_readme_use_it_block_runs_and_resumes(cwd):
    """README 'Use it': the loop as shown (Every(steps=500), Keep(last=3, best=2, ...)), then a
    restart: restore returns the completed steps; a fresh run restores 0."""
    dataset = Indexed(40)
    total_steps = 7

    def session():
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        def train_one_step(batch):
            x, _ = batch
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            sched.step()

        def evaluate():
            return {"val_acc": 0.5}

        loader = StatefulDataLoader(
            sg.data.resumable(dataset), batch_size=4, shuffle=True, num_workers=0
        )
        ckpt = sg.Checkpointer(
            "runs/exp1",
            save=sg.Every(steps=500),  # or epochs=1, seconds=1800
            keep=sg.Keep(last=3, best=2, monitor="val_acc", mode="max"),
        )
        state = sg.TrainState(
            model=model,
            optimizer=opt,
            scheduler=sched,
            scaler=scaler,
            loader=loader,
            extras={"epoch": 0},
        )
        step = ckpt.restore(state)  # newest *valid* checkpoint, or 0 on a fresh run
        first = step
        while step < total_steps:
            for batch in loader:  # continues mid-epoch after a restore
                train_one_step(batch)  # forward, backward, optimizer.step(), scheduler.step()
                step += 1
                metrics = evaluate() if step % 1000 == 0 else None
                ckpt.step(state, step, metrics=metrics)  # saves when the strategy says so
                if step == total_steps:
                    break
        ckpt.save(state, step)  # a final checkpoint, whatever the schedule
        ckpt.close()
        return first

    assert session() == 0
    assert (cwd / "runs/exp1/step-000000000007/manifest.json").exists()
    total_steps = 9
    assert session() == 7


def test_readme_plain_dataloader_refused_with_hint():
    """README rule 2: a plain DataLoader cannot report its position; TrainState refuses it with
    that hint."""
    loader = torch.utils.data.DataLoader(Indexed(8), batch_size=2)
    with pytest.raises(Exception) as ei:
        sg.TrainState(model=tiny_model(), loader=loader)
    assert "StatefulDataLoader" in str(ei.value)


def _saved_after_3_batches_of_32(root):
    torch.manual_seed(123)
    ds = Indexed(200)
    loader = StatefulDataLoader(ds, batch_size=32, shuffle=True, num_workers=2)
    state, model, opt = _state(loader=loader, extras={"epoch": 0})
    seen = []
    with sg.Checkpointer(root) as ckpt:
        it = iter(loader)
        for i in range(3):
            seen += next(it)[1].tolist()
            ckpt.save(state, i + 1)
        rest = []
        for b in it:
            rest += b[1].tolist()
    return ds, seen + rest


@pytest.mark.slow
def test_readme_batch_size_change_continues_at_sample_96(cwd):
    """README 'Resuming with changes' / resume.md: saved with batch_size=32 after 3 batches;
    restored with 16: samples 96-111 of the same order, then 112-127, ..., 192-199 (8)."""
    ds, order = _saved_after_3_batches_of_32("runs/exp1")
    torch.manual_seed(999)  # another process state
    extras = {"epoch": 0}
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = StatefulDataLoader(ds, batch_size=16, shuffle=True, num_workers=2)
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras=extras)
    with sg.Checkpointer("runs/exp1") as ckpt:
        step = ckpt.restore(state)
    assert step == 3
    batches = [b[1].tolist() for b in loader]
    assert batches[0] == order[96:112]
    assert batches[1] == order[112:128]
    assert batches[-1] == order[192:200] and len(batches[-1]) == 8


def test_readme_restore_only_skip_strict_and_last_restore(cwd, capsys):
    """README: restore(only=["model"]), skip=["scheduler"], strict=False; print(ckpt.last_restore)."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    extras = {"best": 1.0, "epoch": 3}
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
    with sg.Checkpointer("runs/exp1") as ckpt:
        ckpt.save(state, 5)
    saved_w = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1)
    extras["epoch"] = 99
    with sg.Checkpointer("runs/exp1") as ckpt:
        step = ckpt.restore(state, only=["model"])  # weights only (fine-tune); the rest untouched
        assert step == 5 and torch.equal(model[0].weight, saved_w) and extras["epoch"] == 99
        step = ckpt.restore(state, skip=["scheduler"])  # everything but the scheduler
        assert extras["epoch"] == 3
        assert "scheduler" in ckpt.last_restore.skipped
        step = ckpt.restore(state, strict=False)  # an added/removed layer: restore what fits
        print(ckpt.last_restore)  # what was restored, skipped, missing, mismatched
    assert "restored" in capsys.readouterr().out
    assert isinstance(ckpt.last_restore, sg.RestoreReport)


def test_readme_every_table_names_exist():
    """README 'When to save': every Every/Keep form of the table builds."""
    sg.Every(steps=10)
    sg.Every(epochs=1)
    sg.Every(seconds=5)
    sg.Every(steps=10, epochs=1, seconds=5)
    sg.Every(samples=100)
    sg.Every(tokens=100)
    sg.Every(auto=True, mtbf=8 * 3600)
    sg.Keep(last=3)
    sg.Keep(best=2, monitor="val_acc", mode="max")
    sg.Keep(every=5)


def test_readme_checkpointer_default_keep_is_last_3(cwd):
    """README table: `sg.Keep(last=K)`: the newest K (default `Keep(last=3)`)."""
    _run_with_steps("run", steps=range(1, 7))
    steps = sorted(p.name for p in Path("run").glob("step-*"))
    assert len(steps) == 3 and steps[-1].endswith("6")


@pytest.mark.parametrize(
    "name, mode",
    [
        ("loss", "min"),
        ("val_error", "min"),
        ("mse", "min"),
        ("fid", "min"),
        ("val_acc", "max"),
        ("auc", "max"),
        ("f1", "max"),
        ("iou", "max"),
        ("bleu", "max"),
        ("map", "max"),
        ("top1", "max"),
        ("wobble", None),
    ],
)
def test_readme_keep_mode_from_words_of_the_name(name, mode):
    """README: without mode the words of the name decide (loss, error, mse, fid → min; acc, auc,
    f1, iou, bleu, map, top1 → max); any other name is refused with a ValueError asking for mode."""
    if mode is None:
        with pytest.raises(ValueError, match="mode"):
            sg.Keep(best=1, monitor=name)
    else:
        assert sg.Keep(best=1, monitor=name).mode == mode


def test_readme_keep_help_lists_the_words():
    """README: the list is in help(sg.Keep)."""
    doc = inspect.getdoc(sg.Keep) or ""
    for w in ("loss", "acc", "top1", "fid"):
        assert w in doc


def test_readme_regime_presets(cwd):
    """README: sg.Checkpointer(root, **sg.regime("short"|"normal"|"long", monitor=, mode=))."""
    for name in ("short", "normal", "long"):
        kw = sg.regime(name, monitor="val_acc", mode="max")
        with sg.Checkpointer(f"r-{name}", **kw):
            pass
    assert sg.regime("long", monitor="val_acc", mode="max")["save"].seconds == 1800
    keep = sg.regime("long", monitor="val_acc", mode="max")["keep"]
    assert (keep.last, keep.best) == (5, 3) and keep.every > 0
    assert sg.regime("normal", monitor="val_acc", mode="max")["keep"].last == 10


def test_readme_keep_best_logs_in_keras_form(cwd, caplog):
    """README: logs 'step 1200: val_acc improved from 0.9100 to 0.9300, saved step-000000001200'
    and 'step 1300: val_acc did not improve from 0.9300'."""
    state, model, opt = _state()
    caplog.set_level(logging.INFO, logger="savegame")
    with sg.Checkpointer(
        "run", save=sg.Every(steps=100), keep=sg.Keep(last=3, best=2, monitor="val_acc", mode="max")
    ) as ckpt:
        ckpt.step(state, 1100, metrics={"val_acc": 0.91})
        ckpt.step(state, 1200, metrics={"val_acc": 0.93})
        ckpt.step(state, 1300, metrics={"val_acc": 0.92})
    text = caplog.text
    assert "step 1200: val_acc improved from 0.9100 to 0.9300, saved step-000000001200" in text
    assert "step 1300: val_acc did not improve from 0.9300" in text


def test_readme_metric_improvement_saves_off_schedule(cwd):
    """README: a metric that improves triggers a save even off-schedule."""
    state, model, opt = _state()
    with sg.Checkpointer(
        "run",
        save=sg.Every(steps=1000),
        keep=sg.Keep(last=3, best=2, monitor="val_acc", mode="max"),
    ) as ckpt:
        assert ckpt.step(state, 7, metrics={"val_acc": 0.5})
    assert Path("run/step-000000000007/manifest.json").exists()


def test_readme_interval_advice_logged(cwd, caplog):
    """README / policies.md: with mtbf= given, the interval advice is logged through 'savegame'."""
    state, model, opt = _state()
    caplog.set_level(logging.INFO, logger="savegame")
    with sg.Checkpointer("run", save=sg.Every(steps=1, mtbf=8 * 3600)) as ckpt:
        for s in range(1, 4):
            ckpt.step(state, s)
    assert "interval advice: a save stalls training" in caplog.text
    assert "(Young/Daly)" in caplog.text


_PREEMPT_CHILD = textwrap.dedent("""
    import os, sys, time, signal, torch
    sys.path.insert(0, {root!r})
    import savegame as sg
    from tests._outside_s18_docs import tiny_model
    model = tiny_model(); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = sg.TrainState(model=model, optimizer=opt)
    ckpt = sg.Checkpointer(sys.argv[1], save=sg.Every(steps=10**6), exit_on_signal={exit!s})
    step = ckpt.restore(state)
    while True:
        step += 1
        if step == 3:
            os.kill(os.getpid(), signal.{sig})
        ckpt.step(state, step)
        if ckpt.preempted:
            print("PREEMPTED", step, flush=True)
            ckpt.close()
            sys.exit(0)
        if step > 50:
            print("NOSIGNAL", flush=True); sys.exit(3)
""")


@pytest.mark.parametrize(
    "sig",
    [
        "SIGTERM",
        pytest.param("SIGUSR1", marks=pytest.mark.slow),
        pytest.param("SIGINT", marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow  # CI under 20 minutes; runs with -m slow
def test_readme_preemption_signal_saves_and_exits_75(tmp_path, sig):
    """README 'Preemption': on SIGTERM, SIGUSR1 or SIGINT the checkpointer saves at the next step
    boundary, then the process exits with status 75 (sg.EXIT_PREEMPTED)."""
    assert sg.EXIT_PREEMPTED == 75
    script = tmp_path / "child.py"
    script.write_text(
        _PREEMPT_CHILD.format(root=str(Path(__file__).parent.parent), exit=True, sig=sig)
    )
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 75, p.stderr[-2000:]
    assert (tmp_path / "run" / "step-000000000003" / "manifest.json").exists()


@pytest.mark.slow
def test_readme_exit_on_signal_false_sets_preempted(tmp_path):
    """README: with exit_on_signal=False, ckpt.preempted becomes True and your loop decides."""
    script = tmp_path / "child.py"
    script.write_text(
        _PREEMPT_CHILD.format(root=str(Path(__file__).parent.parent), exit=False, sig="SIGTERM")
    )
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PREEMPTED 3" in p.stdout


def test_readme_quiet_workers_exists():
    """README: sg.data.quiet_workers(loader) for a loader outside the TrainState."""
    loader = StatefulDataLoader(Indexed(8), batch_size=2, num_workers=1)
    sg.data.quiet_workers(loader)


def test_readme_async_block_and_save_async_handle(cwd):
    """README 'Async saves': async_save=True, when_busy="wait"; save_async() returns a handle;
    save() blocks until committed."""
    state, model, opt = _state()
    ckpt = sg.Checkpointer(
        "runs/exp1", save=sg.Every(steps=500), async_save=True, when_busy="wait"
    )  # or "skip": drop a save while one still persists
    try:
        h = ckpt.save_async(state, 1)
        assert isinstance(h, sg.SaveHandle)
        folder = h.result(timeout=30)
        assert (Path(folder) / "manifest.json").exists() and h.done()
        ckpt.save(state, 2)
        assert Path("runs/exp1/step-000000000002/manifest.json").exists()
    finally:
        ckpt.close()


def test_readme_async_snapshot_not_torn(cwd):
    """README: changing parameters right after step() returns does not change what is saved."""
    state, model, opt = _state()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with sg.Checkpointer("run", save=sg.Every(steps=1), async_save=True) as ckpt:
        ckpt.step(state, 1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0).add_(7)
    got = sg.load("run/step-000000000001")["model"]
    for k, v in want.items():
        assert torch.equal(got[k], v)


def test_readme_incremental_false_writes_in_full(cwd):
    """README 'Incremental saves': unchanged tensors are shared; incremental=False writes every
    save in full; `savegame ls` shows own and shared bytes."""
    state, model, opt = _state()
    with sg.Checkpointer("inc") as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
    with sg.Checkpointer("full", incremental=False) as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
    m_inc = json.loads(Path("inc/step-000000000002/manifest.json").read_text())
    m_full = json.loads(Path("full/step-000000000002/manifest.json").read_text())
    assert m_inc["version"] == 2 and any("/" in f for f in m_inc["files"])
    assert m_full["version"] == 1 and not any("/" in f for f in m_full["files"])
    with sg.Checkpointer("inc") as ckpt:
        infos = ckpt.list()
    assert infos[-1].shared > 0 if infos[-1].step == 2 else infos[0].shared > 0


def test_readme_second_writer_gets_locked_error(tmp_path):
    """README 'One writer per run folder': a second process gets sg.LockedError naming the
    holder (pid, host)."""
    root = tmp_path / "run"
    with sg.Checkpointer(root):
        code = (
            f"import savegame as sg\ntry:\n sg.Checkpointer({str(root)!r})\nexcept sg.LockedError as e:\n"
            f" print('LOCKED', e)\n"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "LOCKED" in p.stdout, p.stderr[-2000:]
    assert str(os.getpid()) in p.stdout


def test_readme_damaged_checkpoint_skipped_and_set_aside(cwd):
    """README 'Damaged checkpoints': skipped with CorruptCheckpointWarning, the run resumes from
    the newest intact one; the writer renames it to damaged-step-…-<id>/."""
    _run_with_steps("run", steps=(1, 2))
    _flip_byte(Path("run/step-000000000002/rank-00000.safetensors"))
    state, model, opt = _state(seed=5)
    with pytest.warns(sg.CorruptCheckpointWarning):
        with sg.Checkpointer("run") as ckpt:
            assert ckpt.restore(state) == 1
    assert list(Path("run").glob("damaged-step-000000000002-*"))
    assert not Path("run/step-000000000002").exists()


def test_readme_format_layout(cwd):
    """README 'The format (v1)': run.json, LATEST, step-…/manifest.json, rank-00000.safetensors
    that opens with plain safetensors.safe_open."""
    from safetensors import safe_open

    _run_with_steps("runs/exp1", steps=(1200,))
    run = Path("runs/exp1")
    assert "run_id" in json.loads((run / "run.json").read_text())
    assert (run / "LATEST").read_text().strip() == "step-000000001200"
    f = run / "step-000000001200" / "rank-00000.safetensors"
    with safe_open(str(f), "pt") as r:
        assert any(k.startswith("model/") for k in r.keys())


def test_readme_save_load_open(cwd):
    """README: sg.save(path, tree), sg.load(path); sg.open(path).read(name)."""
    tree = {"w": torch.arange(6.0).reshape(2, 3), "n": 3}
    sg.save("one", tree)
    back = sg.load("one")
    assert torch.equal(back["w"], tree["w"]) and back["n"] == 3
    with sg.open("one") as r:
        assert torch.equal(r.read("w"), tree["w"])


def test_readme_faulty_store_block(cwd):
    """README 'Where the bytes go': FaultyStore(MemoryStore(), {"commit.publish": 1}, crash=True)
    dies before the publish: nothing committed."""
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.memory import MemoryStore

    inner = MemoryStore()
    store = FaultyStore(inner, {"commit.publish": 1}, crash=True)  # dies before the publish
    state, model, opt = _state()
    ckpt = sg.Checkpointer(store)
    try:
        with pytest.raises((OSError, sg.CheckpointError)):
            ckpt.save(state, 1)
    finally:
        try:
            ckpt.close()
        except BaseException:
            pass
    with sg.Checkpointer(inner) as again:
        assert again.restore(_state()[0]) == 0


def test_readme_error_tree():
    """README 'Errors': every error derives from sg.CheckpointError and carries .path .step .key;
    the listed subclass relations hold."""
    E = sg
    pairs = [
        (E.CheckpointNotFoundError, E.CheckpointError),
        (E.StepExistsError, E.CheckpointError),
        (E.FormatError, E.CheckpointError),
        (E.IntegrityError, E.FormatError),
        (E.IncompleteCheckpointError, E.FormatError),
        (E.UnsupportedFormatError, E.FormatError),
        (E.UnsafeContentError, E.FormatError),
        (E.EncodeError, E.CheckpointError),
        (E.StorageError, E.CheckpointError),
        (E.LockedError, E.StorageError),
        (E.UnsupportedURLError, E.StorageError),
        (E.CredentialsError, E.StorageError),
        (E.AccessDeniedError, E.StorageError),
        (E.MissingDependencyError, E.CheckpointError),
        (E.RestoreError, E.CheckpointError),
        (E.DistributedSaveError, E.CheckpointError),
    ]
    for sub, base in pairs:
        assert issubclass(sub, base), (sub, base)
    e = sg.RestoreError("x")
    for a in ("path", "step", "key"):
        assert hasattr(e, a)
    assert issubclass(sg.StorageError, OSError)  # async.md
    assert issubclass(sg.UnsupportedURLError, ValueError)  # remote.md
    assert issubclass(sg.AccessDeniedError, PermissionError)  # remote.md


@pytest.mark.slow
def test_readme_integration_names_exist():
    """README: SavegameCallback, transformers.attach, accelerate.attach, keras.SavegameCheckpoint."""
    from savegame.integrations.accelerate import attach as a2  # noqa: F401
    from savegame.integrations.lightning import SavegameCallback  # noqa: F401
    from savegame.integrations.transformers import attach as a1  # noqa: F401

    p = subprocess.run(
        [sys.executable, "-c", "from savegame.integrations.keras import SavegameCheckpoint"],
        env={**os.environ, "KERAS_BACKEND": "torch"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for name in (
        "lightning_train.py",
        "hf_trainer_train.py",
        "accelerate_train.py",
        "keras_train.py",
        "ddp_digits.py",
        "fsdp_toy.py",
    ):
        assert (Path(__file__).parent.parent / "examples" / name).exists(), name


def test_readme_tutorial_checkpoint_adopt(cwd):
    """README 'Resume from the tutorial checkpoint': adopt a torch.save dict as step e."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    torch.save(
        {
            "epoch": 4,
            "state_dict": model.state_dict(),
            "best_accuracy": 0.75,
            "optimizer": opt.state_dict(),
        },
        "checkpoint.pth.tar",
    )
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = tiny_model(9)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    extras = {"epoch": 0, "best_acc": 0.0}
    state = sg.TrainState(model=model2, optimizer=opt2, extras=extras)
    epoch_steps, old_epoch = 10, 4
    ckpt = sg.Checkpointer("runs/exp1", keep=sg.Keep(best=1, monitor="val_acc", mode="max"))
    try:
        if ckpt.restore(state) == 0:  # nothing saved yet: import the old file once
            ckpt.adopt(
                "checkpoint.pth.tar",
                state,
                step=epoch_steps * old_epoch,
                mapping={
                    "model": "state_dict",
                    "optimizer": "optimizer",
                    "extras/epoch": "epoch",
                    "extras/best_acc": "best_accuracy",
                },
                metrics={"val_acc": "best_accuracy"},
            )
    finally:
        ckpt.close()
    with sg.Checkpointer("runs/exp1") as ckpt:
        assert ckpt.restore(state) == 40
    assert extras == {"epoch": 4, "best_acc": 0.75}
    for k, v in want.items():
        assert torch.equal(model2.state_dict()[k], v)


def test_readme_foreign_open_convert_diff(cwd):
    """README 'Checkpoints from other tools': sg.convert(...to="safetensors"), sg.diff(...)."""
    model = tiny_model()
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, "checkpoint.pth.tar")
    sg.convert(
        "checkpoint.pth.tar", "model.safetensors", to="safetensors"
    )  # or "torch", "savegame"
    torch.save({"state_dict": model.state_dict()}, "a.pt")
    with sg.open("model.safetensors") as r:
        assert "state_dict/0.weight" in r.keys()
    print(sg.diff("a.pt", "model.safetensors").max_abs_diff)
    d = sg.diff("a.pt", "model.safetensors")
    assert d.identical and not d.changed


def test_readme_torch_pickle_global_is_unsafe_content(cwd):
    """README: any other global raises UnsafeContentError naming it (nothing imported or
    called); `savegame show` still lists the file with `<opaque module.name>`."""
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"w": torch.ones(2)}, "ok.pt")
    # replace data.pkl with one holding os.system
    with zipfile.ZipFile("ok.pt") as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    pkl = [n for n in names if n.endswith("data.pkl")][0]
    members[pkl] = pickle.dumps({"w": Evil()}, protocol=2)
    with zipfile.ZipFile("evil.pt", "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, members[n])
    with pytest.raises(sg.UnsafeContentError) as ei:
        with sg.open("evil.pt") as r:
            r.keys()
    assert "system" in str(ei.value)
    assert not Path("PWNED").exists()
    p = cli("show", "evil.pt")
    assert "<opaque" in p.stdout and "system" in p.stdout, p.stdout + p.stderr
    assert not Path("PWNED").exists()


def test_readme_lossy_conversion_warning_has_left_out():
    """README: sg.LossyConversionWarning with .left_out."""
    assert issubclass(sg.LossyConversionWarning, Warning)
    assert "left_out" in inspect.signature(sg.LossyConversionWarning).parameters or hasattr(
        sg.LossyConversionWarning, "left_out"
    )


def test_readme_cli_commands_and_flags():
    """README 'Command line': every command and flag shown exists."""
    want = {
        "ls": ["--verify", "--mtbf"],
        "prune": ["--dry-run", "--keep-last", "--keep-best", "--monitor", "--mode"],
        "convert": ["--to", "--cfg", "--partial", "--overwrite", "--no-isolate"],
        "diff": ["--all"],
        "plot": ["--out"],
        "push": ["--step"],
        "pull": ["--step"],
        "show": [],
        "verify": [],
        "demo": [],
    }
    for cmd, flags in want.items():
        h = cli(cmd, "--help")
        assert h.returncode == 0, cmd
        for f in flags:
            assert f in h.stdout, (cmd, f)


def test_readme_cli_exit_codes(cwd):
    """README: 0 success; 1 a check found problems (verify damaged, diff differences); 2 bad input
    (nothing at the path); a plain ls exits 0."""
    _run_with_steps("run", steps=(1, 2), incremental=False)
    assert main_rc("verify", "run") == 0
    assert main_rc("ls", "run") == 0
    assert main_rc("verify", "nothing-here") == 2
    assert main_rc("show", "nothing-here") == 2
    torch.save({"w": torch.ones(2)}, "a.pt")
    torch.save({"w": torch.zeros(2)}, "b.pt")
    assert main_rc("diff", "a.pt", "a.pt") == 0
    assert main_rc("diff", "a.pt", "b.pt") == 1
    _flip_byte(Path("run/step-000000000002/rank-00000.safetensors"))
    assert main_rc("verify", "run") == 1
    assert main_rc("ls", "run", "--verify") == 1
    assert main_rc("ls", "run") == 0


def test_readme_cli_locked_run_exit_2(cwd):
    """README: 2 … a locked run (with a message on stderr) — prune of a run a live process holds."""
    _run_with_steps("run", steps=(1, 2))
    with sg.Checkpointer("run"):
        p = cli("prune", "run", "--keep-last", "1")
    assert p.returncode == 2 and p.stderr.strip()


def test_readme_cli_pipe_closed_exits_141(cwd):
    """README: output into a pipe whose reader has gone ends quietly with 141."""
    _run_with_steps("run", steps=range(1, 4), keep=sg.Keep(last=5))
    p = subprocess.run(
        f"{SAVEGAME} verify run | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    # a short output may fit the pipe buffer; the claim is 'never 1'
    assert p.stdout.strip() in ("0", "141"), p.stdout + p.stderr


def test_readme_cli_file_url(cwd):
    """README: file:///abs/run names an absolute path; file://exp1 is refused."""
    _run_with_steps("exp1", steps=(1,))
    assert main_rc("ls", f"file://{cwd / 'exp1'}") == 0
    assert main_rc("ls", "file://exp1") == 2


def test_readme_cli_verify_rank_file(cwd):
    """README: `verify CKPT/rank-00000.safetensors` checks that file's checkpoint against its
    manifest."""
    _run_with_steps("run", steps=(1,))
    f = "run/step-000000000001/rank-00000.safetensors"
    assert main_rc("verify", f) == 0
    _flip_byte(Path(f))
    assert main_rc("verify", f) == 1


def test_readme_cli_verify_empty_run_says_no_checkpoints_yet(cwd):
    """README: on a run with nothing committed yet verify says "no checkpoints yet"."""
    with sg.Checkpointer("run"):
        pass
    p = cli("verify", "run")
    assert "no checkpoints yet" in (p.stdout + p.stderr)


def test_readme_prune_keep_best_needs_direction(cwd):
    """README: prune --keep-best ranks by run.json's metric; a direction nobody gave is refused
    (exit 2)."""
    state, model, opt = _state()
    with sg.Checkpointer("run") as ckpt:
        for s in (1, 2, 3):
            ckpt.save(state, s)
    p = cli("prune", "run", "--keep-best", "1", "--monitor", "score")
    assert p.returncode == 2


def test_readme_keep_float_is_type_error():
    """README: Keep(last=2.0) is a TypeError at once."""
    with pytest.raises(TypeError):
        sg.Keep(last=2.0)


def test_readme_version_flag():
    p = cli("--version")
    assert p.returncode == 0 and "savegame" in p.stdout


def test_readme_ascii_encoding_escapes(cwd):
    """README: what the output's encoding cannot show (PYTHONIOENCODING=ascii) is escaped."""
    torch.save({"wé…": torch.ones(2)}, "a.pt")
    p = cli("show", "a.pt", env={"PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0, p.stderr
    assert "\\u2026" in p.stdout or "\\xe9" in p.stdout


def test_readme_hostile_names_printed_literally(cwd):
    """README: rich markup such as [bold] in a tensor name is shown as typed; terminal escapes
    are shown as escapes (\\x1b)."""
    from safetensors.torch import save_file

    save_file({"[bold]x[/x]": torch.ones(1), "a\x1b[2Jb": torch.ones(1)}, "h.safetensors")
    p = cli("show", "h.safetensors")
    assert "[bold]x[/x]" in p.stdout
    assert "\x1b" not in p.stdout and "\\x1b" in p.stdout


def test_readme_plot_out(cwd):
    """README: savegame plot RUN [--out F.png]."""
    pytest.importorskip("matplotlib")
    state, model, opt = _state()
    with sg.Checkpointer(
        "run", keep=sg.Keep(last=5, best=1, monitor="val_acc", mode="max")
    ) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(state, s, metrics={"val_acc": s / 10}) if "metrics" in inspect.signature(
                ckpt.save
            ).parameters else ckpt.step(state, s, metrics={"val_acc": s / 10})
    p = cli("plot", "run", "--out", "f.png")
    assert p.returncode == 0, p.stderr
    assert Path("f.png").stat().st_size > 0


def test_readme_convert_overwrite_and_existing_kept(cwd):
    """README 'Convert': an existing output is kept unless --overwrite."""
    torch.save({"w": torch.ones(2)}, "a.pt")
    assert main_rc("convert", "a.pt", "o.safetensors", "--to", "safetensors") == 0
    before = Path("o.safetensors").read_bytes()
    torch.save({"w": torch.zeros(2)}, "a.pt")
    assert main_rc("convert", "a.pt", "o.safetensors", "--to", "safetensors") == 2
    assert Path("o.safetensors").read_bytes() == before
    assert main_rc("convert", "a.pt", "o.safetensors", "--to", "safetensors", "--overwrite") == 0
    assert Path("o.safetensors").read_bytes() != before


def test_readme_convert_to_torch_loads_weights_only(cwd):
    """README: `--to torch` output loads with torch.load(weights_only=True)."""
    torch.save({"sd": tiny_model().state_dict()}, "a.pt")
    assert main_rc("convert", "a.pt", "o.pt", "--to", "torch") == 0
    d = torch.load("o.pt", weights_only=True)
    assert "sd/0.weight" in d


def test_readme_file_not_regular_refused(cwd):
    """README: a pipe or device is refused as not a regular file rather than waited on."""
    os.mkfifo("fifo")
    p = cli("show", "fifo", timeout=30)
    assert p.returncode == 2 and "regular" in p.stderr


def test_readme_empty_and_short_safetensors_messages(cwd):
    """README: an empty file, or a safetensors header length past the end of the file, is
    reported as exactly that."""
    Path("empty.bin").write_bytes(b"")
    with pytest.raises(sg.FormatError, match="empty"):
        sg.open("empty.bin")
    import struct

    Path("short.safetensors").write_bytes(struct.pack("<Q", 1000) + b'{"a":1}')
    with pytest.raises(sg.FormatError, match="past the end"):
        sg.open("short.safetensors")


# ============================================================================== docs/resume.md


def test_resume_overrides_only_extras_entry(cwd):
    """resume.md: only=["extras/epoch"] sets that entry and leaves the dict's other entries."""
    extras = {"epoch": 3, "best": 0.5}
    state = sg.TrainState(model=tiny_model(), extras=extras)
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
    extras.update(epoch=9, best=0.9)
    with sg.Checkpointer("run") as ckpt:
        ckpt.restore(state, only=["extras/epoch"])
    assert extras == {"epoch": 3, "best": 0.9}


def test_resume_skip_extras_entry_keeps_live_value(cwd):
    """resume.md: skip=["extras/best"] replaces the rest of extras and keeps the live best."""
    extras = {"epoch": 3, "best": 0.5}
    state = sg.TrainState(model=tiny_model(), extras=extras)
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
    extras.update(epoch=9, best=0.9)
    with sg.Checkpointer("run") as ckpt:
        ckpt.restore(state, skip=["extras/best"])
    assert extras == {"epoch": 3, "best": 0.9}


def test_resume_skip_new_object_and_rng(cwd):
    """resume.md: skip=["scheduler", "rng"]; skip=["ema"] for a new object."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched)
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
    ema = tiny_model(3)
    state2 = sg.TrainState(model=model, optimizer=opt, scheduler=sched, ema=ema)
    with sg.Checkpointer("run") as ckpt:
        assert ckpt.restore(state, skip=["scheduler", "rng"]) == 1
        assert ckpt.restore(state2, skip=["ema"]) == 1
        with pytest.raises(sg.RestoreError):
            ckpt.restore(state2)


def test_resume_strict_default_refuses_resized_layer_nothing_restored(cwd):
    """resume.md: a model with a layer resized gets RestoreError ("... nothing was restored"),
    and every object is as it was."""
    state = sg.TrainState(model=nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)), extras={"e": 1})
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
    new = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in new.state_dict().items()}
    extras = {"e": 7}
    with sg.Checkpointer("run") as ckpt:
        with pytest.raises(sg.RestoreError, match="nothing was restored"):
            ckpt.restore(sg.TrainState(extras=extras, model=new))
    assert extras == {"e": 7}
    for k, v in before.items():
        assert torch.equal(new.state_dict()[k], v)


def test_resume_strict_false_report_table(cwd, caplog):
    """resume.md strict=False table: missing / unexpected / mismatched named as shown."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={"a": 1}), 1)
    new = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ema = tiny_model()
    extras = {"a": 0, "new": 5}
    state = sg.TrainState(model=new, extras=extras, ema=ema)
    caplog.set_level(logging.WARNING, logger="savegame")
    with sg.Checkpointer("run") as ckpt:
        step = ckpt.restore(state, strict=False)
        r = ckpt.last_restore
    assert step == 1 and r.step == 1
    assert "ema" in r.missing and "extras/new" in r.missing and "model/4.weight" in r.missing
    assert "scheduler" in r.unexpected and "optimizer" in r.unexpected
    assert r.mismatched["model/2.weight"] == "[2, 4] in the checkpoint, [4, 4] here"
    assert extras == {"a": 1, "new": 5}
    assert not r.complete
    assert caplog.records, "a restore that left something out logs a warning"
    if r.mismatched or r.missing:
        print(r)


def test_resume_optimizer_mismatch_reported(cwd):
    """resume.md: an optimizer over another set of parameters is mismatched
    ("group 0 has 4 parameters in the checkpoint, 6 here")."""
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(sg.TrainState(model=m, optimizer=opt), 1)
    m2 = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    opt2 = torch.optim.Adam(m2.parameters())
    with sg.Checkpointer("run") as ckpt:
        ckpt.restore(sg.TrainState(model=m2, optimizer=opt2), strict=False)
        assert (
            ckpt.last_restore.mismatched["optimizer"]
            == "group 0 has 4 parameters in the checkpoint, 6 here"
        )


def test_resume_last_restore_none_on_fresh_run(cwd):
    """resume.md: last_restore is None when restore() restored nothing (a fresh run)."""
    with sg.Checkpointer("run") as ckpt:
        assert ckpt.restore(sg.TrainState(model=tiny_model())) == 0
        assert ckpt.last_restore is None


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(only=["model"], skip=["rng"]), ValueError),
        (dict(only=[]), ValueError),
        (dict(only="model"), TypeError),
        (dict(only=[1]), TypeError),
        (dict(skip=["extras/"]), ValueError),
    ],
)
def test_resume_bad_override_input_refused_on_fresh_run(cwd, kw, exc):
    """resume.md 'Bad input': refused before anything is read, on a fresh run too:
    ValueError/TypeError."""
    with sg.Checkpointer("run") as ckpt:
        with pytest.raises((ValueError, TypeError)):
            ckpt.restore(sg.TrainState(model=tiny_model(), extras={}), **kw)


def test_resume_unknown_name_is_restore_error_with_key(cwd):
    """resume.md: a name that does not exist raises RestoreError (.key = the name)."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
        with pytest.raises(sg.RestoreError) as ei:
            ckpt.restore(state, only=["modle"])
    assert ei.value.key == "modle"


def test_resume_finetune_from_weights_only_block(cwd):
    """resume.md 'Fine-tuning from weights only' block as shown."""
    src = sg.TrainState(model=tiny_model(1))
    with sg.Checkpointer("runs/pretrain") as c:
        c.save(src, 100)
    model = tiny_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer("runs/pretrain") as old:  # opens read-only where it cannot write
        old.restore(state, only=["model"])  # the new optimizer, scheduler, loader stay
    ckpt = sg.Checkpointer("runs/finetune", save=sg.Every(steps=500))
    try:
        step = ckpt.restore(state)  # 0 the first time, then the fine-tune's own
        assert step == 0
        assert torch.equal(model[0].weight, tiny_model(1)[0].weight)
    finally:
        ckpt.close()


def test_resume_new_lr_same_schedule_recipe(cwd):
    """resume.md 'A new learning rate', first recipe: the same schedule as if from new_lr."""

    def build(lr):
        m = tiny_model()
        o = torch.optim.SGD(m.parameters(), lr=lr)
        s = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        return m, o, s

    m, optimizer, scheduler = build(0.1)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(sg.TrainState(model=m, optimizer=optimizer, scheduler=scheduler), 3)
    m, optimizer, scheduler = build(0.1)
    new_lr = 0.4
    with sg.Checkpointer("run") as ckpt:
        assert ckpt.restore(sg.TrainState(model=m, optimizer=optimizer, scheduler=scheduler)) == 3
    factor = new_lr / scheduler.base_lrs[0]
    scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor  # what a scheduler built later starts from
    _, ro, rs = build(new_lr)
    for _ in range(3):
        ro.step()
        rs.step()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        ro.step()
        rs.step()
        assert math.isclose(
            optimizer.param_groups[0]["lr"], ro.param_groups[0]["lr"], rel_tol=1e-12
        )


def test_resume_rollback_step_exists_and_warns(cwd):
    """resume.md 'Limits': restore(step=N) of an older checkpoint, then saving a step that
    exists is StepExistsError; the first save after such a restore warns."""
    state, model, opt = _state()
    with sg.Checkpointer("run", keep=sg.Keep(last=5)) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(state, s)
    with sg.Checkpointer("run", keep=sg.Keep(last=5)) as ckpt:
        assert ckpt.restore(state, step=1) == 1
        with pytest.raises(sg.StepExistsError):
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                ckpt.save(state, 2)


def test_resume_workers_change_mid_epoch_with_resumable_dataset_refused(cwd):
    """resume.md: another number of workers mid-epoch while the dataset keeps state in them
    (sg.data.resumable) raises RestoreError (.key = the loader's name) at the first iter()."""
    ds = sg.data.resumable(Indexed(40))
    loader = StatefulDataLoader(ds, batch_size=4, shuffle=True, num_workers=1)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    with sg.Checkpointer("run") as ckpt:
        it = iter(loader)
        next(it)
        next(it)
        ckpt.save(state, 2)
        del it
    loader2 = StatefulDataLoader(
        sg.data.resumable(Indexed(40)), batch_size=4, shuffle=True, num_workers=0
    )
    state2 = sg.TrainState(model=tiny_model(), loader=loader2)
    with sg.Checkpointer("run") as ckpt:
        ckpt.restore(state2)
    with pytest.raises(sg.RestoreError) as ei:
        iter(loader2)
    assert ei.value.key == "loader"


def test_resume_batch_size_zero_is_torch_value_error():
    """resume.md: a batch size of 0 is torch's own ValueError when the loader is built."""
    with pytest.raises(ValueError):
        StatefulDataLoader(Indexed(4), batch_size=0)


# ============================================================================== docs/policies.md


def test_policies_samples_counter_block(cwd):
    """policies.md: Every(samples=N) saves at the first step whose counter reaches a multiple of
    N; counters in ckpt.samples_seen and the manifest's info.samples_seen (savegame.open(ckpt)
    .metadata()["info"]); restore sets them back."""
    ds = Indexed(64)
    loader = StatefulDataLoader(ds, batch_size=8)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    root = "run"
    saved = []
    with sg.Checkpointer(root, save=sg.Every(samples=20)) as ckpt:
        step = 0
        for step, (x, _y) in enumerate(loader, start=step + 1):  # noqa: B020 - the README's loop
            if ckpt.step(state, step, samples=x.size(0)):  # or tokens=int(mask.sum())
                saved.append(step)
            if step == 5:
                break
        assert ckpt.samples_seen == 40
    assert saved == [3, 5]  # 24 >= 20, 40 >= 40
    with sg.open("run/step-000000000005") as r:
        assert r.metadata()["info"]["samples_seen"] == 40
    with sg.Checkpointer(root, save=sg.Every(samples=20)) as ckpt:
        ckpt.restore(state)
        assert ckpt.samples_seen == 40


def test_policies_samples_bad_counts(cwd):
    """policies.md: passing neither while the schedule counts one is a ValueError; a negative
    count a ValueError, a float or bool a TypeError."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", save=sg.Every(samples=20)) as ckpt:
        with pytest.raises(ValueError):
            ckpt.step(state, 1)
        with pytest.raises(ValueError):
            ckpt.step(state, 1, samples=-1)
        with pytest.raises(TypeError):
            ckpt.step(state, 1, samples=2.0)
        with pytest.raises(TypeError):
            ckpt.step(state, 1, samples=True)
        assert ckpt.samples_seen == 0


def test_policies_auto_bounds_constants():
    """policies.md: bounded to 1 minute .. 6 hours (AUTO_MIN_SECONDS, AUTO_MAX_SECONDS)."""
    from savegame.policy import advice

    assert advice.AUTO_MIN_SECONDS == 60 and advice.AUTO_MAX_SECONDS == 6 * 3600
    sg.Every(auto=True, seconds=600)
    sg.Every(auto=True, epochs=1)


def test_policies_young_formula_example():
    """policies.md: C = 2 s, M = 1 h: τ* = 120 s, overhead 3.3 %."""
    C, M = 2.0, 3600.0
    tau = math.sqrt(2 * C * M)
    assert tau == 120.0 and round(100 * math.sqrt(2 * C / M), 1) == 3.3


def test_policies_sessions_recorded_in_run_json(cwd):
    """policies.md: each Checkpointer that trains adds a session to run.json
    ("sessions": [{"start","end","failed"}]); one opened only to restore records none."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
    with sg.Checkpointer("run") as ckpt:
        ckpt.restore(state)
    sessions = json.loads(Path("run/run.json").read_text())["sessions"]
    assert len(sessions) == 1 and {"start", "end", "failed"} <= set(sessions[0])
    assert sessions[0]["failed"] is False


def test_policies_exception_through_with_marks_failed(cwd):
    """policies.md: one left by an exception through `with Checkpointer(...)` is marked failed."""
    state = sg.TrainState(model=tiny_model())
    with pytest.raises(KeyError):
        with sg.Checkpointer("run") as ckpt:
            ckpt.save(state, 1)
            raise KeyError("boom")
    sessions = json.loads(Path("run/run.json").read_text())["sessions"]
    assert sessions[-1]["failed"] is True


def test_policies_ls_mtbf_prints_advice(cwd, capsys):
    """policies.md: `savegame ls RUN` prints the advice line from the newest checkpoint
    (--mtbf SECONDS to try another MTBF)."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", save=sg.Every(steps=1)) as ckpt:
        for s in (1, 2, 3):
            ckpt.step(state, s)
    capsys.readouterr()
    assert main_rc("ls", "run", "--mtbf", "3600") == 0
    out = capsys.readouterr().out
    assert "interval advice" in out


# ============================================================================== docs/async.md


def test_async_block_as_shown(cwd):
    """async.md 'Using it' block; close() waits for the last save."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    loader = StatefulDataLoader(Indexed(8), batch_size=2)
    total_steps = 4

    def train_one_step(*a):
        _train(model, opt)

    ckpt = sg.Checkpointer(
        "runs/exp1", save=sg.Every(steps=2), keep=sg.Keep(last=3), async_save=True
    )  # scheduled saves (step) become async
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader)
    start = ckpt.restore(state)
    for step in range(start, total_steps):
        train_one_step(...)
        ckpt.step(state, step + 1)  # returns once the snapshot is taken
    ckpt.close()  # waits for the last save; raises its error
    assert Path("runs/exp1/step-000000000004/manifest.json").exists()


def test_async_handle_cancel_and_wait(cwd):
    """async.md: SaveHandle done()/result(timeout=None)/cancel(); ckpt.wait()."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", async_save=True) as ckpt:
        h = ckpt.save_async(state, 1)
        for m in ("done", "result", "cancel"):
            assert callable(getattr(h, m))
        ckpt.wait()
        assert h.done()
        assert "timeout" in inspect.signature(h.result).parameters
        assert Path(h.result()).name == "step-000000000001"


def test_async_failure_raised_as_storage_error_once(tmp_path):
    """async.md 'Failures': a background failure is raised on your thread at the next call as
    savegame.StorageError (a CheckpointError and an OSError) with .step and __cause__; raised once;
    the failed save commits nothing."""
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    store = FaultyStore(LocalStore(tmp_path), {"stage.write": 1})
    state = sg.TrainState(model=tiny_model())
    ckpt = sg.Checkpointer(store, async_save=True)
    try:
        ckpt.save_async(state, 1)
        with pytest.raises(sg.StorageError) as ei:
            ckpt.wait()
        assert (
            isinstance(ei.value, OSError) and ei.value.step == 1 and ei.value.__cause__ is not None
        )
        ckpt.wait()  # raised once
        ckpt.save(state, 2)
    finally:
        ckpt.close()
    assert not (tmp_path / "step-000000000001").exists()
    assert not list(tmp_path.glob(".tmp-step-*"))


def test_async_when_busy_skip_returns_false_and_none(tmp_path, caplog):
    """async.md: when_busy="skip": step() returns False, save_async() returns None, INFO line
    "step N: previous save still persisting; skipped (when_busy='skip')"."""
    import threading

    from savegame.storage.local import LocalStore

    gate = threading.Event()

    class Slow(LocalStore):
        def begin(self, *a, **k):
            gate.wait(20)
            return super().begin(*a, **k)

    caplog.set_level(logging.INFO, logger="savegame")
    state = sg.TrainState(model=tiny_model())
    ckpt = sg.Checkpointer(
        Slow(tmp_path), save=sg.Every(steps=1), async_save=True, when_busy="skip"
    )
    try:
        assert ckpt.step(state, 1) is True
        assert ckpt.step(state, 2) is False
        assert ckpt.save_async(state, 3) is None
        gate.set()
        ckpt.wait()
    finally:
        gate.set()
        ckpt.close()
    assert "step 2: previous save still persisting; skipped (when_busy='skip')" in caplog.text


# ============================================================================== docs/incremental.md


def test_incremental_list_own_shared_and_size(cwd):
    """incremental.md 'Listing sizes': CheckpointInfo.own and .shared, .size = own + shared."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer("runs/ft", keep=sg.Keep(last=3)) as ckpt:
        ckpt.save(state, 1)
        model(torch.ones(1, 64)).sum().backward()
        opt.step()
        ckpt.save(state, 2)
        infos = {i.step: i for i in ckpt.list()}
    i2 = infos[2]
    assert i2.shared >= 64 * 64 * 4 and i2.size == i2.own + i2.shared
    assert infos[1].shared == 0


def test_incremental_retired_file_after_retention(cwd):
    """incremental.md: deleting a checkpoint whose bytes a kept one uses moves the file to
    retired-step-…-rank-….safetensors; restore still works."""
    model = nn.Linear(32, 32)
    state = sg.TrainState(model=model)
    with sg.Checkpointer("run", keep=sg.Keep(last=1)) as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
    assert list(Path("run").glob("retired-step-000000000001-rank-00000.safetensors"))
    assert not Path("run/step-000000000001").exists()
    with sg.Checkpointer("run") as ckpt:
        assert ckpt.restore(sg.TrainState(model=nn.Linear(32, 32))) == 2
    assert main_rc("verify", "run") == 0


def test_incremental_copied_alone_names_missing_shared_file(cwd, capsys):
    """incremental.md: a checkpoint folder copied alone misses the files it refers to: verify
    reports "tensor file is missing (… shares it with step-… of its run …)"."""
    import shutil

    state = sg.TrainState(model=nn.Linear(8, 8))
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
    os.makedirs("other")
    shutil.copytree("run/step-000000000002", "other/step-000000000002")
    capsys.readouterr()
    assert main_rc("verify", "other/step-000000000002") == 1
    out = " ".join((capsys.readouterr().out).split())
    assert "tensor file is missing" in out and "shares it with step-000000000001" in out


# ============================================================================== docs/tiers.md


def test_tiers_upload_retry_defaults():
    """tiers.md: UploadRetry(attempts=5, first_delay=1.0, max_delay=60.0) by default."""
    r = sg.UploadRetry()
    assert (r.attempts, r.first_delay, r.max_delay) == (5, 1.0, 60.0)


def test_tiers_folder_root_with_cache(cwd):
    """tiers.md: root is the run of record (an object-store URL, or any Store, or a folder);
    cache is a local folder. close() waits for the uploads; a fresh cache restores from root."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer(
        "remote", cache="cache1", save=sg.Every(steps=1), keep=sg.Keep(last=3), async_save=True
    ) as ckpt:
        for s in (1, 2):
            ckpt.step(state, s)
    assert Path("remote/step-000000000002/manifest.json").exists()
    with sg.Checkpointer("remote", cache="cache2") as ckpt:
        assert ckpt.restore(sg.TrainState(model=tiny_model(4))) == 2


def test_tiers_start_from_block(cwd):
    """tiers.md 'Start from another run': restore() loads the source's newest valid checkpoint
    while the run has none; nothing there is written; own run id; ignored once the run saved."""
    state = sg.TrainState(model=tiny_model(1))
    with sg.Checkpointer("runs/job1") as c:
        c.save(state, 5)
    before = sorted(p.name for p in Path("runs/job1").iterdir())
    st2 = sg.TrainState(model=tiny_model(2))
    ckpt = sg.Checkpointer("runs/job2", start_from="runs/job1")  # or a step-… checkpoint
    try:
        start = ckpt.restore(st2)  # job1's newest valid checkpoint while job2 has none
        assert start == 5
        ckpt.save(st2, 6)
    finally:
        ckpt.close()
    assert sorted(p.name for p in Path("runs/job1").iterdir()) == before
    assert (
        json.loads(Path("runs/job1/run.json").read_text())["run_id"]
        != json.loads(Path("runs/job2/run.json").read_text())["run_id"]
    )
    with sg.Checkpointer("runs/job2", start_from="runs/job1/step-000000000005") as c:
        assert c.restore(st2) == 6


@pytest.mark.slow
def test_tiers_integrations_take_cache():
    """tiers.md: SavegameCallback(root, cache=...), attach(..., cache=...)."""
    from savegame.integrations import accelerate, transformers
    from savegame.integrations.lightning import SavegameCallback

    for f in (SavegameCallback, transformers.attach, accelerate.attach):
        sig = inspect.signature(f)
        assert "cache" in sig.parameters or any(
            p.kind == p.VAR_KEYWORD for p in sig.parameters.values()
        ), f


# ============================================================================== docs/storage.md


def test_storage_block_crash_then_resume(tmp_path):
    """storage.md block: FaultyStore(LocalStore(tmp_path), {"commit.publish": 1}, crash=True);
    the save dies before the rename; a new writer resumes from the last good one."""
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    state, model, opt = _state()
    with sg.Checkpointer(LocalStore(tmp_path)) as c:
        c.save(state, 1)
    store = FaultyStore(LocalStore(tmp_path), {"commit.publish": 1}, crash=True)
    ckpt = sg.Checkpointer(store)
    try:
        with pytest.raises((OSError, sg.CheckpointError)):
            ckpt.save(state, 2)
    finally:
        try:
            ckpt.close()
        except BaseException:
            pass
    again = sg.Checkpointer(LocalStore(tmp_path))
    try:
        assert again.restore(state) == 1  # a new writer resumes from the last good one
    finally:
        again.close()


def test_storage_keys_refused(tmp_path):
    """storage.md: `..`, absolute keys, empty parts, backslashes and NUL are refused (ValueError)."""
    from savegame.storage.local import LocalStore
    from savegame.storage.memory import MemoryStore

    for store in (LocalStore(tmp_path), MemoryStore()):
        for key in ("../x", "/abs", "a//b", "a\\b", "a\0b"):
            with pytest.raises(ValueError):
                store.put(key, b"x")


def test_storage_faulty_default_is_enospc(tmp_path):
    """storage.md: by default a fault is a full disk (ENOSPC) and the store keeps working."""
    import errno

    from savegame.storage.faulty import FaultyStore
    from savegame.storage.memory import MemoryStore

    store = FaultyStore(MemoryStore(), {"put": 1})
    with pytest.raises(OSError) as ei:
        store.put("k", b"x")
    assert ei.value.errno == errno.ENOSPC
    store.put("k", b"y")


# ============================================================================== docs/format.md


def test_format_run_json_lock_and_manifest_fields(cwd):
    """format.md: run.json {"run_id","created","keep","sessions"}; .lock holds pid/host/since;
    manifest fields."""
    state = sg.TrainState(model=tiny_model(), extras={"epoch": 3})
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1200)
        lock = json.loads(Path("run/.lock").read_text())
        assert {"pid", "host", "since"} <= set(lock) and lock["pid"] == os.getpid()
    rj = json.loads(Path("run/run.json").read_text())
    assert {"run_id", "created", "keep", "sessions"} <= set(rj)
    m = json.loads(Path("run/step-000000001200/manifest.json").read_text())
    assert m["format"] == "savegame" and m["step"] == 1200 and m["hash_algorithm"] == "xxh3-128"
    for k in (
        "created",
        "world_size",
        "run_id",
        "metrics",
        "info",
        "versions",
        "files",
        "tensors",
        "trees",
        "integrity",
    ):
        assert k in m, k
    assert m["trees"][0]["extras"] == {"epoch": 3}
    assert m["trees"][0]["model"]["0.weight"] == {"$tensor": "model/0.weight"}


def test_format_nan_metric_saves_and_non_number_is_encode_error(cwd):
    """format.md: Checkpointer.step(..., metrics={"loss": float("nan")}) saves (written "nan")
    and comes back as that float; a metric that is not a number is an EncodeError naming it."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", save=sg.Every(steps=1)) as ckpt:
        ckpt.step(state, 1, metrics={"loss": float("nan")})
        with pytest.raises(sg.EncodeError, match="acc"):
            ckpt.step(state, 2, metrics={"acc": "high"})
    m = json.loads(Path("run/step-000000000001/manifest.json").read_text())
    assert m["metrics"]["loss"] == "nan"
    with sg.Checkpointer("run") as ckpt:
        info = [i for i in ckpt.list() if i.step == 1][0]
    assert math.isnan(info.metrics["loss"])


def test_format_tree_codec_round_trip(cwd):
    """format.md tree codec table: every listed value comes back as the same type."""
    tree = {
        "none": None,
        "b": True,
        "s": "x",
        "i": 3,
        "f": 1.5,
        "big": 2**70,
        "nan": float("nan"),
        "inf": float("-inf"),
        "bytes": b"\x00\x01",
        "list": [1, 2],
        "tuple": (1, "a"),
        "set": {1, 2},
        "fset": frozenset({"a"}),
        "idict": {1: "a", None: 2, (1, 2): 3, "$x": 4},
        "odict": OrderedDict([(2, "b"), (1, "a")]),
        "sodict": OrderedDict([("b", 1), ("a", 2)]),
        "t": torch.arange(3),
        "nd": np.arange(3, dtype=np.int16),
        "np": np.float32(1.5),
        "dtype": torch.bfloat16,
        "dev": torch.device("cpu"),
        "size": torch.Size([2, 3]),
    }
    sg.save("c", tree)
    back = sg.load("c")
    for k in (
        "none",
        "b",
        "s",
        "i",
        "f",
        "big",
        "bytes",
        "list",
        "tuple",
        "set",
        "fset",
        "idict",
        "dtype",
        "dev",
        "size",
    ):
        assert back[k] == tree[k] and type(back[k]) is type(tree[k]), k
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    assert type(back["odict"]) is OrderedDict and list(back["odict"].items()) == [
        (2, "b"),
        (1, "a"),
    ]
    assert type(back["sodict"]) is dict and list(back["sodict"]) == ["b", "a"]
    assert torch.equal(back["t"], tree["t"])
    assert isinstance(back["nd"], np.ndarray) and back["nd"].dtype == np.int16
    assert type(back["np"]) is np.float32 and back["np"] == 1.5


@pytest.mark.parametrize(
    "value",
    [
        namedtuple("P", "a b")(1, 2),
        defaultdict(int),
        bytearray(b"x"),
        np.str_("x"),
        "\ud800",
        object(),
    ],
)
def test_format_tree_codec_refuses_with_path(cwd, value):
    """format.md 'Exact or refused': namedtuples, defaultdict, bytearray, numpy.str_, lone
    surrogates, other objects: EncodeError naming the tree path."""
    with pytest.raises(sg.EncodeError) as ei:
        sg.save("c", {"outer": {"bad": value}})
    assert "bad" in str(ei.value)


def test_format_version_3_refused_falls_back(cwd):
    """format.md 'Versions': version > 2 is refused with UnsupportedFormatError; restore falls
    back to an earlier checkpoint."""
    _run_with_steps("run", steps=(1, 2))
    with pytest.warns(sg.CorruptCheckpointWarning):
        p = Path("run/step-000000000002/manifest.json")
        m = json.loads(p.read_text())
        m["version"] = 3
        p.write_text(json.dumps(m))
        with sg.Checkpointer("run") as ckpt:
            assert ckpt.restore(_state()[0]) == 1
    with pytest.raises(sg.FormatError):
        sg.load("run/step-000000000002") if Path("run/step-000000000002").exists() else sg.load(
            next(Path("run").glob("damaged-step-000000000002-*"))
        )


def test_format_step_exists_error_on_valid_step_next_process(cwd):
    """format.md commit protocol: if step-<step>/ exists and is valid the save fails with
    StepExistsError (a later Checkpointer on the run)."""
    state, model, opt = _state()
    with sg.Checkpointer("run") as ckpt:
        ckpt.save(state, 1)
    with sg.Checkpointer("run") as ckpt:
        with pytest.raises(sg.StepExistsError):
            ckpt.save(state, 1)


def test_format_a_second_save_of_the_last_step_is_that_same_save(cwd):
    """format.md commit protocol: a valid step-N is StepExistsError for another writer; in the
    process that saved N last, a second save of N is that same save (nothing written)."""
    state, model, opt = _state()
    with sg.Checkpointer("run") as ckpt:
        first = ckpt.save(state, 1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _train(model, opt)
        assert ckpt.save(state, 1) == first
    got = sg.load("run/step-000000000001")["model"]
    assert all(torch.equal(got[k], v) for k, v in before.items())
    with sg.Checkpointer("run") as ckpt:  # another process: the step exists
        with pytest.raises(sg.StepExistsError):
            ckpt.save(state, 1)


def test_format_leftover_tmp_removed_at_next_start(cwd):
    """format.md / README: leftovers from killed saves (.tmp-step-…) are removed at the next start."""
    _run_with_steps("run", steps=(1,))
    Path("run/.tmp-step-000000000002-abc").mkdir()
    with sg.Checkpointer("run"):
        pass
    assert not Path("run/.tmp-step-000000000002-abc").exists()


# ============================================================================== docs/transfer.md


def test_transfer_push_pull_block_local_and_memory(cwd):
    """transfer.md: push(run, url) / pull(url, run): report.verified; re-run skips; run id kept."""
    from savegame.tools.transfer import pull, push

    _run_with_steps("runs/exp1", steps=(1, 2))
    report = push("runs/exp1", f"memory://s18-bucket-{_UID}/runs/exp1")  # the whole run
    assert report.verified and sorted(report.copied) == [1, 2]
    again = push("runs/exp1", f"memory://s18-bucket-{_UID}/runs/exp1")
    assert sorted(again.skipped) == [1, 2] and not again.copied
    report = pull(f"memory://s18-bucket-{_UID}/runs/exp1", "pulled")
    assert report.verified
    assert (
        json.loads(Path("pulled/run.json").read_text())["run_id"]
        == json.loads(Path("runs/exp1/run.json").read_text())["run_id"]
    )
    r1 = pull("runs/exp1/step-000000000001", "one")  # one checkpoint
    assert r1.copied == [1] or list(r1.copied) == [1]
    with sg.Checkpointer("pulled") as ckpt:
        assert ckpt.restore(_state()[0]) == 2


def test_transfer_into_another_run_refused(cwd):
    """transfer.md: a destination holding another run is refused before anything is written:
    CheckpointError "holds another run"."""
    from savegame.tools.transfer import push

    _run_with_steps("a", steps=(1,))
    _run_with_steps("b", steps=(5,))
    with pytest.raises(sg.CheckpointError, match="holds another run"):
        push("a", "b")
    assert not Path("b/step-000000000001").exists()


def test_transfer_same_step_different_content_refused(cwd):
    """transfer.md: the same step with different valid content: StepExistsError."""
    import shutil

    from savegame.tools.transfer import push

    _run_with_steps("a", steps=(1,))
    shutil.copytree("a", "b")
    shutil.rmtree("b/step-000000000001")
    state = sg.TrainState(model=tiny_model(7))
    with sg.Checkpointer("b") as c:
        c.save(state, 1)
    with pytest.raises(sg.StepExistsError):
        push("a", "b")


def test_transfer_http_destination_read_only(cwd):
    """transfer.md: an http(s):// destination is refused: read-only (StorageError)."""
    from savegame.tools.transfer import push

    _run_with_steps("a", steps=(1,))
    with pytest.raises(sg.StorageError):
        push("a", "http://127.0.0.1:9/runs/x")


def test_transfer_ignored_tmp_and_problems(cwd):
    """transfer.md: a source folder without a manifest is listed in report.ignored; a source
    checkpoint whose manifest does not parse is in report.problems and verified is false."""
    from savegame.tools.transfer import push

    _run_with_steps("a", steps=(1, 2, 3), keep=sg.Keep(last=5))
    Path("a/step-000000000002/manifest.json").unlink()
    Path("a/step-000000000003/manifest.json").write_text("{not json")
    report = push("a", f"memory://s18-b-{_UID}/x")
    assert 2 in report.ignored
    assert report.problems and not report.verified
    assert list(report.copied) == [1]


def test_transfer_cli_exit_status(cwd):
    """transfer.md: the CLI exits 0 only when verified."""
    _run_with_steps("a", steps=(1,))
    assert main_rc("push", "a", "b", "--no-progress") == 0
    assert main_rc("pull", "b", "c", "--no-progress") == 0
    _run_with_steps("d", steps=(1, 2), keep=sg.Keep(last=5))
    Path("d/step-000000000002/manifest.json").write_text("{not json")
    assert main_rc("push", "d", "e", "--no-progress") == 1


# ============================================================================== docs/remote.md


def test_remote_as_store_and_locate():
    """remote.md: savegame.storage.as_store(url) picks the store; locate("s3://b/run/step-…")."""
    from savegame import storage
    from savegame.storage.local import LocalStore

    assert isinstance(storage.as_store("/tmp/x"), LocalStore)
    assert isinstance(storage.as_store("file:///tmp/x"), LocalStore)
    assert type(storage.as_store("memory://n/p")).__name__ == "ObjectStore"
    loc = storage.locate(f"memory://s18-b-{_UID}/run/step-000000000001")
    assert "step-000000000001" in str(loc)


def test_remote_unsupported_scheme():
    """remote.md: any other scheme is an UnsupportedURLError (a StorageError and a ValueError)
    listing these."""
    with pytest.raises(sg.UnsupportedURLError) as ei:
        sg.Checkpointer("ftp://host/run")
    assert isinstance(ei.value, ValueError) and "s3://" in str(ei.value)


def test_remote_memory_url_train_and_restore(cwd):
    """remote.md: memory://name (obstore's in-memory store, for tests) as a run root."""
    state = sg.TrainState(model=tiny_model(1))
    with sg.Checkpointer(f"memory://s18-t1-{_UID}/runs/exp1", save=sg.Every(steps=1)) as ckpt:
        ckpt.step(state, 1)
        ckpt.step(state, 2)
        infos = ckpt.list()
    assert [i.step for i in infos][-1] == 2 or sorted(i.step for i in infos) == [1, 2]


def test_remote_credentials_redacted_in_messages():
    """remote.md: every URL in a message is shown with user:password@ replaced by ***@ and every
    query value by ***."""
    with pytest.raises(sg.CheckpointError) as ei:
        sg.Checkpointer("ftp://alice:hunter2@host/run?sig=SECRET")
    text = str(ei.value)
    assert "hunter2" not in text and "SECRET" not in text


# ============================================================================== docs/formats.md


def test_formats_intro_block(cwd):
    """formats.md intro block: detect from the bytes; sg.open keys/info/read; torch_pickle.load
    gives real CPU tensors with int optimizer keys; convert; diff."""
    from safetensors.torch import save_file

    from savegame.interop import detect, torch_pickle

    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt)
    torch.save(
        {"epoch": 2, "state_dict": model.state_dict(), "optimizer": opt.state_dict()},
        "checkpoint.pth.tar",
    )
    torch.save(model.state_dict(), "model.weights")  # any name: detection is from the bytes
    os.replace("model.weights", "model.pt")
    save_file({"w": torch.arange(4.0)}, "model.safetensors")
    assert detect.detect("model.pt") == "torch"  # "torch" — from the bytes, not the name
    with sg.open("model.safetensors") as r:  # any format, savegame folders included
        r.keys()
        r.info("w")
        r.read("w")  # one tensor, one byte range
    ckpt = torch_pickle.load("checkpoint.pth.tar")  # tutorial dict with real CPU tensors
    assert set(ckpt["optimizer"]["state"]) == {0, 1, 2, 3}
    m2 = tiny_model(5)
    m2.load_state_dict(ckpt["state_dict"])
    o2 = torch.optim.Adam(m2.parameters())
    o2.load_state_dict(ckpt["optimizer"])
    sg.convert("model.pt", "out.safetensors", to="safetensors")
    assert sg.diff("model.pt", "out.safetensors").identical


def test_formats_detect_by_bytes_not_name(cwd):
    """formats.md: format decided from the bytes (a safetensors file named .pt is safetensors);
    a savegame folder is "savegame"; .npy is numpy; other bytes UnsupportedFormatError."""
    from safetensors.torch import save_file

    from savegame.interop import detect

    save_file({"w": torch.ones(1)}, "x.pt")
    assert detect.detect("x.pt") == "safetensors"
    np.save("a.npy", np.arange(3))
    assert detect.detect("a.npy") == "numpy"
    sg.save("ck", {"w": torch.ones(1)})
    assert detect.detect("ck") == "savegame"
    Path("junk.bin").write_bytes(b"hello")
    with pytest.raises(sg.UnsupportedFormatError):
        detect.detect("junk.bin")


def test_formats_darknet_needs_cfg(cwd):
    """formats.md: a .weights name → darknet; open() requires cfg= and says so."""
    Path("m.weights").write_bytes(b"\0" * 64)
    with pytest.raises(sg.CheckpointError, match="cfg"):
        sg.open("m.weights")


def test_formats_torch_listing_mode_opaque(cwd):
    """formats.md: open_torch(path, listing=True) turns unknown globals into Opaque markers."""
    import pickle
    import zipfile

    from savegame.interop.torch_pickle import open_torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": torch.ones(2)}, "ok.pt")
    with zipfile.ZipFile("ok.pt") as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = [n for n in members if n.endswith("data.pkl")][0]
    members[pkl] = pickle.dumps({"w": Evil()}, protocol=2)
    with zipfile.ZipFile("evil.pt", "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with open_torch("evil.pt", listing=True) as r:
        assert "Opaque" in repr(r.tree())
    with pytest.raises(sg.UnsafeContentError) as ei:
        with open_torch("evil.pt") as r:
            r.tree()
    assert ei.value.key in ("posix.system", "os.system")


def test_formats_numpy_object_dtype_unsafe_and_npz_names(cwd):
    """formats.md: .npy one tensor named "array"; .npz names without .npy; object dtypes →
    UnsafeContentError."""
    np.save("a.npy", np.arange(3))
    with sg.open("a.npy") as r:
        assert r.keys() == ["array"]
    np.savez_compressed("b.npz", x=np.ones(2), y=np.zeros(3))
    with sg.open("b.npz") as r:
        assert sorted(r.keys()) == ["x", "y"]
    np.save("o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(sg.UnsafeContentError):
        with sg.open("o.npy") as r:
            r.read("array")


def test_formats_safetensors_duplicate_names_refused(cwd):
    """formats.md: duplicate names in a safetensors header → FormatError, .key names it."""
    import struct

    hdr = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    Path("d.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 4)
    with pytest.raises(sg.FormatError) as ei:
        with sg.open("d.safetensors") as r:
            r.keys()
    assert ei.value.key == "a"


def test_formats_convert_existing_dst_step_exists_and_diff_fields(cwd):
    """formats.md: an existing dst is kept unless overwrite=True (StepExistsError); DiffResult
    (added, removed, changed, max_abs_diff, identical); int differences exact."""
    torch.save({"w": torch.ones(2), "i": torch.tensor([0], dtype=torch.int64)}, "a.pt")
    torch.save(
        {"w": torch.ones(2), "i": torch.tensor([2**62], dtype=torch.int64), "n": torch.ones(1)},
        "b.pt",
    )
    sg.convert("a.pt", "o.safetensors", to="safetensors")
    with pytest.raises(sg.StepExistsError):
        sg.convert("a.pt", "o.safetensors", to="safetensors")
    sg.convert("a.pt", "o.safetensors", to="safetensors", overwrite=True)
    d = sg.diff("a.pt", "b.pt")
    assert list(d.added) == ["n"] and not d.removed
    assert "w" in d.identical and "i" not in d.identical
    assert d.max_abs_diff["i"] == 2**62


def test_formats_diff_integer_difference_exact(cwd):
    """formats.md: Integer differences are exact (no overflow)."""
    torch.save({"i": torch.tensor([0])}, "a.pt")
    torch.save({"i": torch.tensor([2**62 + 1])}, "b.pt")
    assert sg.diff("a.pt", "b.pt").max_abs_diff["i"] == 2**62 + 1


def test_formats_convert_savegame_takes_step_from_epoch(cwd):
    """formats.md: savegame output keeps a torch file's structure, taking the step from a
    top-level int step, global_step or epoch."""
    torch.save({"epoch": 7, "state_dict": {"w": torch.ones(1)}}, "a.pt")
    out = sg.convert("a.pt", "out", to="savegame")
    m = json.loads((Path(out) / "manifest.json").read_text())
    assert m["step"] == 7


def test_formats_limits_table():
    """formats.md 'Limits' table values."""
    from savegame.interop.base import LIMITS

    assert (
        LIMITS.max_header_bytes,
        LIMITS.max_json_depth,
        LIMITS.max_entries,
        LIMITS.max_pickle_ops,
        LIMITS.max_pickle_depth,
        LIMITS.max_tensor_numel,
        LIMITS.max_inflate_bytes,
        LIMITS.max_inflate_ratio,
    ) == (100_000_000, 64, 1_000_000, 50_000_000, 1_000, 2**40, 2**34, 200)


def test_formats_pt2_export(cwd):
    """formats.md: torch.export .pt2: names are the state-dict names; read() gives tensors."""
    golden = GOLDEN / "torch" / "model.pt2"
    with sg.open(golden) as r:
        keys = r.keys()
        assert keys and all(not k.startswith("data/") for k in keys)
        t = r.read(keys[0])
        assert isinstance(t, torch.Tensor)


# ============================================================================== docs/formats-tensorflow.md


def test_tensorflow_first_block_golden(cwd):
    """formats-tensorflow.md first block, on the golden tfkeras folder."""
    from savegame.interop.tensorflow import open_tensorflow

    with open_tensorflow(GOLDEN / "tensorflow" / "tfkeras") as r:  # folder with a `checkpoint` file
        print(r.keys()[:3])  # raw bundle keys
        paths = r.metadata()["object_paths"]  # key -> model/layer_with_weights-0/kernel
        kernel = r.read("model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
        assert r.verify() == []  # every block CRC, every entry CRC, bounds
    assert isinstance(kernel, torch.Tensor) and paths


def test_tensorflow_mapping_block_golden(monkeypatch):
    """formats-tensorflow.md mapping block, exactly: left == ["bn.num_batches_tracked"]."""
    from savegame.adapters import mapping
    from savegame.interop.tensorflow import open_tensorflow

    monkeypatch.chdir(Path(__file__).parent.parent)

    net = nn.Sequential()  # conv (2→3, 3×3, padding=1), bn, relu, flatten, fc (108→4)
    net.conv = nn.Conv2d(2, 3, 3, padding=1)
    net.bn = nn.BatchNorm2d(3, eps=1e-3, momentum=0.01)
    net.relu = nn.ReLU()
    net.flat = nn.Flatten()
    net.fc = nn.Linear(3 * 6 * 6, 4)

    def k(layer, var):
        return f"model/layer_with_weights-{layer}/{var}/.ATTRIBUTES/VARIABLE_VALUE"

    with open_tensorflow("tests/golden/foreign/tensorflow/tfkeras") as r:
        left = mapping.apply_mappings(
            net,
            [
                *mapping.conv2d("conv", kernel=k(0, "kernel"), bias=k(0, "bias")),
                *mapping.batch_norm(
                    "bn",
                    gamma=k(1, "gamma"),
                    beta=k(1, "beta"),
                    moving_mean=k(1, "moving_mean"),
                    moving_variance=k(1, "moving_variance"),
                ),
                *mapping.dense(
                    "fc", kernel=k(2, "kernel"), bias=k(2, "bias"), flatten_from=(3, 6, 6)
                ),
            ],
            r,
        )
    assert left == ["bn.num_batches_tracked"]


def test_tensorflow_paths_all_work(cwd):
    """formats-tensorflow.md: path may be the prefix, the .index file, a .data-* shard, the folder;
    the same tensors each time."""
    d = GOLDEN / "tensorflow" / "tf1"
    forms = [
        d,
        d / "model.ckpt-3",
        d / "model.ckpt-3.index",
        d / "model.ckpt-3.data-00000-of-00001",
    ]
    keysets = []
    for f in forms:
        with sg.open(f) as r:
            keysets.append(sorted(r.keys()))
    assert all(k == keysets[0] for k in keysets)


def test_tensorflow_pointer_file_only_through_open_tensorflow(cwd, capsys):
    """formats-tensorflow.md: the pointer file itself through open_tensorflow only; sg.open,
    detect and the CLI take its folder (and refuse the file with a typed error)."""
    from savegame.interop.tensorflow import open_tensorflow

    folder = GOLDEN / "tensorflow" / "tf1"
    with sg.open(folder) as r:
        want = sorted(r.keys())
    with open_tensorflow(folder / "checkpoint") as r:
        assert sorted(r.keys()) == want
    with pytest.raises(sg.UnsupportedFormatError):
        sg.open(folder / "checkpoint")
    assert main_rc("show", folder) == 0 and main_rc("verify", folder) == 0


def test_tensorflow_pointer_file_through_open_tensorflow(cwd):
    """formats-tensorflow.md: the pointer file opens with open_tensorflow."""
    from savegame.interop.tensorflow import open_tensorflow

    with open_tensorflow(GOLDEN / "tensorflow" / "tf1" / "checkpoint") as r:
        assert r.keys()


def test_tensorflow_empty_index_message(cwd):
    """formats-tensorflow.md: an empty .index or checkpoint file is reported as '... is empty (0 bytes)'."""
    import shutil

    shutil.copytree(GOLDEN / "tensorflow" / "tf1", "tf1")
    Path("tf1/model.ckpt-3.index").write_bytes(b"")
    with pytest.raises(sg.FormatError, match=r"is empty \(0 bytes\)"):
        sg.open("tf1/model.ckpt-3.index")


def test_tensorflow_readme_open_prefix_and_read(cwd):
    """README: with sg.open("model.ckpt-100") as r: r.keys(); r.read(...) — a TF1 prefix."""
    with sg.open(GOLDEN / "tensorflow" / "tf1" / "model.ckpt-3") as r:
        keys = r.keys()
        w = r.read(keys[0])
    assert isinstance(w, (torch.Tensor, np.ndarray))


# ============================================================================== docs/formats-keras-darknet.md


def test_keras_block_golden(cwd):
    """formats-keras-darknet.md: open_keras("model.keras"): r.format, keys, keras_version;
    read("layers/conv2d/vars/0") a torch.Tensor in Keras layout (kh, kw, in, out)."""
    from savegame.interop.keras import open_keras

    with open_keras(GOLDEN / "keras" / "cnn.keras") as r:  # or .h5 / .weights.h5
        print(r.format, r.keys()[:3], r.metadata()["keras_version"])
        assert r.format == "keras3"
        kernel = r.read("layers/conv2d/vars/0")  # torch.Tensor, Keras layout (kh, kw, in, out)
    assert isinstance(kernel, torch.Tensor) and kernel.dim() == 4
    with open_keras(GOLDEN / "keras" / "cnn.weights.h5") as r:
        assert r.format == "keras-h5" and "layers/conv2d/vars/0" in r.keys()


def test_keras_bfloat16(cwd):
    """formats-keras-darknet.md: bfloat16 returned as torch.bfloat16."""
    with sg.open(GOLDEN / "keras" / "bf16.weights.h5") as r:
        dts = {r.read(k).dtype for k in r.keys()}
    assert torch.bfloat16 in dts


def _darknet_small_weights(path, n_floats=None, seed=0):
    cfg = GOLDEN / "darknet" / "yolov3-tiny-small.cfg"
    total = (142_056 - 20) // 4
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(total if n_floats is None else n_floats).astype("<f4")
    data = np.abs(data) + 0.5  # BN variances positive
    header = np.array([0, 2, 0], "<i4").tobytes() + np.array([0], "<i8").tobytes()
    Path(path).write_bytes(header + data.tobytes())
    return cfg


def test_darknet_load_and_forward(cwd):
    """formats-keras-darknet.md: load_darknet(cfg, weights, bn="pjreddie"); model(x) gives the
    two yolo heads."""
    from savegame.adapters import darknet_torch
    from savegame.interop.darknet import open_darknet

    cfg = _darknet_small_weights("small.weights")
    model = darknet_torch.load_darknet(cfg, "small.weights", bn="pjreddie")
    with torch.no_grad():
        heads = model(torch.rand(1, 3, 64, 64))
    assert [tuple(h.shape) for h in heads] == [(1, 18, 2, 2), (1, 18, 4, 4)]
    with open_darknet("small.weights", cfg=cfg) as r:
        info = r.info("layers.0.conv.weight")
    assert tuple(info.shape) == (1, 3, 3, 3)


def test_darknet_partial_refused_unless_said(cwd, capsys):
    """README / formats-keras-darknet.md: a darknet file shorter than its cfg is refused unless
    partial=True / --partial; load_darknet(..., partial=True) sets model.coverage "N of M layers
    present"; show prints it."""
    from savegame.adapters import darknet_torch
    from savegame.interop.darknet import open_darknet

    cfg = _darknet_small_weights("part.weights", n_floats=31)  # the first conv layer only
    with pytest.raises(sg.FormatError):
        darknet_torch.load_darknet(cfg, "part.weights")
    model = darknet_torch.load_darknet(cfg, "part.weights", partial=True)
    assert "layers present" in str(model.coverage)
    model = darknet_torch.build_model(cfg)
    with open_darknet("part.weights", cfg=cfg, partial=True) as r:
        missing = darknet_torch.load_weights(model, r)  # names left at their defaults
    assert missing
    capsys.readouterr()
    main_rc("show", "part.weights", "--cfg", str(cfg))
    assert "layers present" in capsys.readouterr().out
    assert main_rc("verify", "part.weights", "--cfg", str(cfg)) != 0
    assert main_rc("verify", "part.weights", "--cfg", str(cfg), "--partial") == 0


# ============================================================================== docs/distributed.md


def test_distributed_consolidate_block(cwd):
    """distributed.md: consolidate("runs/exp1/step-…", "exp1-full"); savegame.load(...)["model"]
    is a plain whole state_dict (one process, no process group)."""
    from savegame.distributed import consolidate

    state, model, opt = _state()
    with sg.Checkpointer("runs/exp1") as c:
        c.save(state, 1200)
    consolidate("runs/exp1/step-000000001200", "exp1-full")  # one process, no process group
    sd = sg.load("exp1-full")["model"]  # a plain, whole state_dict
    model.load_state_dict(sd)


def test_distributed_per_rank_fresh_keyword():
    """README 'Scaling out': restore(state, per_rank="fresh")."""
    assert "per_rank" in inspect.signature(sg.Checkpointer.restore).parameters


# ============================================================================== docs/integrations.md


@pytest.mark.slow  # CI under 20 minutes; runs with -m slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_integrations_lightning_block(cwd):
    """integrations.md first block: SavegameCallback with Keep(best=…, monitor="val_loss",
    mode="min"), Trainer(enable_checkpointing=False), fit with a StatefulDataLoader."""
    L = pytest.importorskip("lightning.pytorch")
    from savegame.integrations.lightning import SavegameCallback

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def training_step(self, batch, i):
            x, _ = batch
            return self.net(x).pow(2).mean()

        def validation_step(self, batch, i):
            x, _ = batch
            self.log("val_loss", self.net(x).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    ds = Indexed(16)
    ckpt = SavegameCallback(
        "runs/exp1",
        save=sg.Every(steps=2),
        keep=sg.Keep(last=3, best=2, monitor="val_loss", mode="min"),
    )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[ckpt],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(
        M(),
        train_dataloaders=StatefulDataLoader(ds, batch_size=4, shuffle=True),
        val_dataloaders=StatefulDataLoader(ds, batch_size=8),
    )
    assert list(Path("runs/exp1").glob("step-*"))


def test_integrations_missing_dependency_is_import_error():
    """integrations.md: a wrong version is refused with savegame.MissingDependencyError (an
    ImportError)."""
    assert issubclass(sg.MissingDependencyError, ImportError)


@pytest.mark.slow
def test_integrations_keras_default_keep_last_1_and_async(tmp_path):
    """integrations.md: without keep= the Keras callback keeps the newest checkpoint only
    (Keep(last=1)); saves are asynchronous by default in all four integrations."""
    code = textwrap.dedent(f"""
        import os; os.environ["KERAS_BACKEND"] = "torch"
        import inspect
        from savegame.integrations.keras import SavegameCheckpoint
        from savegame.integrations.lightning import SavegameCallback
        from savegame.integrations import transformers as t, accelerate as a
        sig = inspect.signature(SavegameCheckpoint)
        print("ASYNC", [inspect.signature(f).parameters["async_save"].default
                        for f in (SavegameCheckpoint, SavegameCallback, t.attach, a.attach)])
        print("KEEPDEFAULT", sig.parameters["keep"].default)
        import keras, numpy as np, savegame as sg
        from torchdata.stateful_dataloader import StatefulDataLoader
        import torch
        ds = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
        loader = StatefulDataLoader(ds, batch_size=4)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        ckpt = SavegameCheckpoint({str(tmp_path / "k")!r}, loader=loader, save=sg.Every(steps=1))
        model.fit(loader, epochs=1, callbacks=[ckpt], shuffle=False, verbose=0)
        print("STEPS", sorted(p.name for p in __import__("pathlib").Path({str(tmp_path / "k")!r}).glob("step-*")))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ASYNC [True, True, True, True]" in p.stdout
    steps = [ln for ln in p.stdout.splitlines() if ln.startswith("STEPS")][0]
    assert steps.count("step-") == 1, p.stdout


@pytest.mark.slow
def test_integrations_hf_attach_signature_and_newest_valid(cwd):
    """integrations-hf.md API: attach(trainer, root, *, save, keep, async_save=True,
    handle_signals=True, exit_on_signal=True, resume=True, save_on_train_end=True, cache=None);
    newest_valid_checkpoint(root) → CheckpointInfo or None."""
    from savegame.integrations import transformers as t

    sig = inspect.signature(t.attach)
    want = dict(
        save=None,
        keep=None,
        async_save=True,
        handle_signals=True,
        exit_on_signal=True,
        resume=True,
        save_on_train_end=True,
        cache=None,
    )
    for k, v in want.items():
        assert sig.parameters[k].default == v, k
    assert t.newest_valid_checkpoint("nothing") is None
    _run_with_steps("run", steps=(3,))
    assert t.newest_valid_checkpoint("run").step == 3


@pytest.mark.slow
def test_readme_demo_runs_and_says_identical(tmp_path):
    """README 'Set up': `savegame demo` trains, SIGKILLs, resumes, compares: ends 'identical'
    and exits 0."""
    pytest.importorskip("sklearn")
    p = cli("demo", "--dir", tmp_path / "demo", timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "identical" in p.stdout


# ---------------------------------------------------------------- README, more sentences


def test_readme_pipe_closed_exits_141_large_output(cwd):
    """README: output into a pipe whose reader has gone ends quietly with 141, never 1."""
    from safetensors.torch import save_file

    save_file(
        {f"tensor_with_a_long_name_{i:05d}": torch.zeros(1) for i in range(4000)}, "big.safetensors"
    )
    p = subprocess.run(
        f"{SAVEGAME} show --max-items 100000 big.safetensors | head -1 >/dev/null; "
        "echo ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.strip() == "141", p.stdout + p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_readme_plot_without_out_needs_no_matplotlib(cwd, capsys):
    """README: `savegame plot RUN [--out F.png]` — only --out needs matplotlib."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer(
        "run", save=sg.Every(steps=1), keep=sg.Keep(last=5, best=1, monitor="val_acc", mode="max")
    ) as ckpt:
        for s in (1, 2, 3):
            ckpt.step(state, s, metrics={"val_acc": s / 10})
    assert main_rc("plot", "run") == 0


def test_readme_ls_and_verify_show_damaged_and_tmp_folders(cwd, capsys):
    """README: ls shows a set-aside damaged-step-… and a leftover .tmp-step-…; verify RUN lists
    them without counting them as failures."""
    _run_with_steps("run", steps=(1, 2))
    _flip_byte(Path("run/step-000000000002/rank-00000.safetensors"))
    with pytest.warns(sg.CorruptCheckpointWarning):
        with sg.Checkpointer("run") as ckpt:
            ckpt.restore(_state()[0])
    Path("run/.tmp-step-000000000003-dead").mkdir()
    capsys.readouterr()
    assert main_rc("ls", "run") == 0
    out = capsys.readouterr().out
    assert "damaged-step-000000000002" in out and ".tmp-step-000000000003" in out
    assert main_rc("verify", "run") == 0
    out = capsys.readouterr().out
    assert "damaged-step-000000000002" in out


def test_readme_prune_refuses_checkpoint_folder(cwd):
    """README: prune takes a run folder (never a checkpoint folder)."""
    _run_with_steps("run", steps=(1, 2))
    assert main_rc("prune", "run/step-000000000001", "--keep-last", "1") == 2
    assert Path("run/step-000000000001").exists()


def test_readme_prune_dry_run_and_keep_last(cwd):
    """README: savegame prune RUN [--dry-run]: apply the run's retention rule (or --keep-last)."""
    _run_with_steps("run", steps=(1, 2, 3, 4), keep=sg.Keep(last=5))
    assert main_rc("prune", "run", "--keep-last", "2", "--dry-run") == 0
    assert len(list(Path("run").glob("step-*"))) == 4
    assert main_rc("prune", "run", "--keep-last", "2") == 0
    assert sorted(p.name[-1] for p in Path("run").glob("step-*")) == ["3", "4"]


def test_readme_run_json_rule_edited_ls_prune_exit_2(cwd, capsys):
    """README: a run.json whose rule was edited into something that is not a Keep makes
    ls/prune exit 2 naming it."""
    _run_with_steps("run", steps=(1,))
    rj = json.loads(Path("run/run.json").read_text())
    rj["keep"] = {"last": "three"}
    Path("run/run.json").write_text(json.dumps(rj))
    capsys.readouterr()
    assert main_rc("ls", "run") == 2
    assert main_rc("prune", "run") == 2
    assert "run.json" in capsys.readouterr().err


def test_readme_foreign_show_verify_never_import_torch(cwd):
    """README: --version, and show/verify of a foreign file never import torch."""
    from safetensors.numpy import save_file

    save_file({"w": np.ones(2, np.float32)}, "a.safetensors")
    code = (
        "import sys\nfrom savegame.cli.main import main\n"
        "main(['show','a.safetensors']); main(['verify','a.safetensors'])\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "TORCH False" in p.stdout, p.stdout + p.stderr[-2000:]


def test_readme_retention_never_deletes_another_runs_checkpoint(cwd, capsys):
    """README: retention never deletes a checkpoint another run wrote; ls shows "not ours"."""
    import shutil

    _run_with_steps("other", steps=(1,))
    _run_with_steps("run", steps=(2,))
    shutil.copytree("other/step-000000000001", "run/step-000000000001")
    _run_with_steps("run", steps=(3, 4, 5), keep=sg.Keep(last=1))
    assert Path("run/step-000000000001/manifest.json").exists()
    capsys.readouterr()
    main_rc("ls", "run")
    assert "not ours" in capsys.readouterr().out


def _symlinked_run(caplog):
    _run_with_steps("run", steps=(1,), keep=sg.Keep(last=1))
    os.rename("run/step-000000000001", "moved")
    os.symlink(os.path.abspath("moved"), "run/step-000000000001")
    caplog.set_level(logging.WARNING, logger="savegame")
    _run_with_steps("run", steps=(2, 3), keep=sg.Keep(last=1))


def test_readme_symlinked_step_left_alone(cwd, caplog, capsys):
    """README: a symlinked step-… folder is left, and the folder it points to; ls says why."""
    _symlinked_run(caplog)
    assert os.path.islink("run/step-000000000001") and Path("moved/manifest.json").exists()
    capsys.readouterr()
    main_rc("ls", "run")
    assert "symlink" in capsys.readouterr().out


def test_readme_symlinked_step_is_left_and_ls_says_so(cwd, caplog):
    """README: a symlinked step-… folder is left, with the folder it points to, to you;
    `savegame ls` says so in its "kept" column."""
    _symlinked_run(caplog)
    from savegame.checkpointer import list_run

    linked = [i for i in list_run("run") if any("symlink" in k for k in i.kept_for)]
    assert [i.step for i in linked] == [1]
    assert Path("run/step-000000000001").is_symlink() and Path("run/step-000000000001").exists()


def test_readme_keep_every_forever(cwd):
    """README: sg.Keep(every=N): every Nth saved checkpoint, forever."""
    _run_with_steps("run", steps=range(1, 8), keep=sg.Keep(last=1, every=3))
    kept = sorted(int(p.name[5:]) for p in Path("run").glob("step-*"))
    assert 7 in kept and len(kept) >= 3


def test_readme_best_survives_restarts(cwd):
    """README: retention is rebuilt from the manifests at every start, so "best" survives
    restarts."""
    state = sg.TrainState(model=tiny_model())
    keep = sg.Keep(last=1, best=1, monitor="val_acc", mode="max")
    with sg.Checkpointer("run", save=sg.Every(steps=1), keep=keep) as c:
        c.step(state, 1, metrics={"val_acc": 0.9})
        c.step(state, 2, metrics={"val_acc": 0.1})
    with sg.Checkpointer("run", save=sg.Every(steps=1), keep=keep) as c:
        c.step(state, 3, metrics={"val_acc": 0.2})
        c.step(state, 4, metrics={"val_acc": 0.3})
    kept = sorted(int(p.name[5:]) for p in Path("run").glob("step-*"))
    assert kept == [1, 4]


def test_readme_tf2_string_tensors_left_out_of_safetensors(cwd):
    """README: string tensors (every TF2 checkpoint holds _CHECKPOINTABLE_OBJECT_GRAPH) are left
    out of safetensors: convert names them (LossyConversionWarning with .left_out)."""
    with pytest.warns(sg.LossyConversionWarning) as rec:
        sg.convert(GOLDEN / "tensorflow" / "tfkeras", "o.safetensors", to="safetensors")
    w = [r.message for r in rec if isinstance(r.message, sg.LossyConversionWarning)][0]
    assert any("_CHECKPOINTABLE_OBJECT_GRAPH" in n for n in w.left_out)


def test_readme_convert_into_live_run_locked_exit_2(cwd):
    """README: a step-… output inside a run is written under that run's lock (a live training's
    run gives LockedError, exit 2)."""
    _run_with_steps("run", steps=(1,))
    torch.save({"step": 5, "w": torch.ones(1)}, "a.pt")
    with sg.Checkpointer("run"):
        assert main_rc("convert", "a.pt", "run/step-000000000005", "--to", "savegame") == 2


def test_readme_distributed_sampler_set_epoch_after_restore(cwd):
    """README rule 2: with a DistributedSampler, set_epoch goes after restore(); the saved epoch
    is restored too; a different epoch mid-epoch is refused with RestoreError."""
    from torch.utils.data.distributed import DistributedSampler

    ds = Indexed(32)

    def build():
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = StatefulDataLoader(ds, batch_size=4, sampler=sampler)
        return sampler, loader, sg.TrainState(model=tiny_model(), loader=loader)

    sampler, loader, state = build()
    sampler.set_epoch(3)
    it = iter(loader)
    _first = [next(it)[1].tolist() for _ in range(2)]  # two batches consumed before the save
    with sg.Checkpointer("run") as c:
        c.save(state, 2)
    rest = [b[1].tolist() for b in it]
    sampler, loader, state = build()
    with sg.Checkpointer("run") as c:
        c.restore(state)
    assert sampler.epoch == 3
    sampler.set_epoch(3)
    assert [b[1].tolist() for b in loader] == rest
    sampler, loader, state = build()
    with sg.Checkpointer("run") as c:
        c.restore(state)
    sampler.set_epoch(4)
    with pytest.raises(sg.RestoreError):
        list(loader)


def test_readme_handlers_given_back_on_close(cwd):
    """README: closing Checkpointers in any order gives your program's own handlers back."""

    def mine(*a):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        a = sg.Checkpointer("a")
        b = sg.Checkpointer("b")
        assert signal.getsignal(signal.SIGTERM) is not mine
        a.close()
        b.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


class _Aug(torch.utils.data.Dataset):
    """A dataset that draws random numbers in __getitem__ (augmentation)."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.rand(1) + i, i


@pytest.mark.slow
def test_readme_resumable_dataset_restores_worker_random_streams(cwd):
    """README rule 3: wrap a dataset that draws random numbers with sg.data.resumable: the loader
    restores each worker's random streams, so augmentation after resume is the uninterrupted one."""

    def build():
        torch.manual_seed(0)
        loader = StatefulDataLoader(
            sg.data.resumable(_Aug()), batch_size=4, shuffle=True, num_workers=2
        )
        return loader, sg.TrainState(model=tiny_model(), loader=loader)

    loader, state = build()
    with sg.Checkpointer("run") as c:
        it = iter(loader)
        for _ in range(2):
            next(it)
        c.save(state, 2)
        want = [b[0] for b in it]
        del it
    loader, state = build()
    torch.manual_seed(12345)
    with sg.Checkpointer("run") as c:
        c.restore(state)
    got = [b[0] for b in loader]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_readme_trainstate_after_first_iteration_warns(cwd):
    """README: build the TrainState before the loader's first iteration: workers already running
    cannot be changed (a UserWarning says so)."""
    loader = StatefulDataLoader(Indexed(8), batch_size=2, num_workers=1, persistent_workers=True)
    it = iter(loader)
    next(it)
    try:
        with pytest.warns(UserWarning):
            sg.TrainState(model=tiny_model(), loader=loader)
    finally:
        del it


def test_readme_ls_shows_shared_bytes(cwd, capsys):
    """README: `savegame ls` shows each checkpoint's own and shared bytes."""
    state = sg.TrainState(model=nn.Linear(64, 64))
    with sg.Checkpointer("run") as c:
        c.save(state, 1)
        c.save(state, 2)
    capsys.readouterr()
    main_rc("ls", "run")
    assert "shared" in capsys.readouterr().out.lower()


def test_readme_prune_refuses_when_kept_checkpoint_damaged(cwd):
    """README: prune exits 1 when a checkpoint it would keep is damaged, and deletes nothing."""
    _run_with_steps("run", steps=(1, 2, 3), keep=sg.Keep(last=5), incremental=False)
    _flip_byte(Path("run/step-000000000003/rank-00000.safetensors"))
    assert main_rc("prune", "run", "--keep-last", "1") == 1
    assert len(list(Path("run").glob("step-*"))) == 3


def test_readme_verify_checks_run_json(cwd):
    """README: verify RUN checks every hash (and a run's run.json): a damaged run.json exits 1."""
    _run_with_steps("run", steps=(1,))
    Path("run/run.json").write_text("{broken")
    assert main_rc("verify", "run") == 1


def test_readme_compiled_model_keys_without_orig_mod(cwd):
    """README 'Scaling out': a torch.compiled model is saved without `_orig_mod.`; the checkpoint
    restores into the compiled or the plain model."""
    m = tiny_model(3)
    cm = torch.compile(m)
    with sg.Checkpointer("run") as c:
        c.save(sg.TrainState(model=cm), 1)
    m_json = json.loads(Path("run/step-000000000001/manifest.json").read_text())
    assert not any("_orig_mod" in k for k in m_json["tensors"])
    plain = tiny_model(4)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=plain))
        c.restore(sg.TrainState(model=torch.compile(tiny_model(5))))
    assert torch.equal(plain[0].weight, m[0].weight)


def test_readme_diff_all_flag(cwd):
    """README: savegame diff A B [--all]."""
    torch.save({"w": torch.ones(2)}, "a.pt")
    assert main_rc("diff", "a.pt", "a.pt", "--all") == 0


# ---------------------------------------------------------------- docs/resume.md, refusals


def test_resume_iterable_dataset_changed_batch_size_refused(cwd):
    """resume.md: an IterableDataset with a changed batch size raises RestoreError at the first
    iter(loader) after restore()."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(40))

    loader = StatefulDataLoader(Stream(), batch_size=4)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    it = iter(loader)
    next(it)
    next(it)
    with sg.Checkpointer("run") as c:
        c.save(state, 2)
    loader2 = StatefulDataLoader(Stream(), batch_size=8)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    with pytest.raises(sg.RestoreError):
        iter(loader2)


def test_resume_custom_batch_sampler_changed_size_refused(cwd):
    """resume.md: a custom batch_sampler= with a changed batch size mid-epoch: RestoreError."""
    from torch.utils.data import BatchSampler, SequentialSampler

    ds = Indexed(40)
    loader = StatefulDataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, False))
    state = sg.TrainState(model=tiny_model(), loader=loader)
    it = iter(loader)
    next(it)
    next(it)
    with sg.Checkpointer("run") as c:
        c.save(state, 2)
    loader2 = StatefulDataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 8, False))
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    with pytest.raises(sg.RestoreError):
        iter(loader2)


def _saved_6_batches_of_4():
    loader = StatefulDataLoader(Indexed(40), batch_size=4)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    it = iter(loader)
    for _ in range(6):
        next(it)
    with sg.Checkpointer("run") as c:
        c.save(state, 6)


def test_resume_position_beyond_smaller_dataset_refused_changed_batch(cwd):
    """resume.md: the saved position lies beyond the new loader's epoch (a smaller dataset):
    RestoreError at the first iter() (batch size changed 4 → 2)."""
    _saved_6_batches_of_4()
    loader2 = StatefulDataLoader(Indexed(8), batch_size=2)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    with pytest.raises(sg.RestoreError, match="lies beyond"):
        iter(loader2)


def test_resume_position_beyond_smaller_dataset_refused_same_batch(cwd):
    """resume.md table row 4, with the batch size it was saved with."""
    _saved_6_batches_of_4()
    loader2 = StatefulDataLoader(Indexed(8), batch_size=4)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    with pytest.raises(sg.RestoreError):
        iter(loader2)


def test_resume_drop_last_changed_batch_size(cwd):
    """resume.md: drop_last=True is not refused: continues at the saved sample in full batches
    of B' and drops what is left."""
    torch.manual_seed(1)
    loader = StatefulDataLoader(Indexed(50), batch_size=8, shuffle=True, drop_last=True)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    it = iter(loader)
    done = next(it)[1].tolist() + next(it)[1].tolist()
    with sg.Checkpointer("run") as c:
        c.save(state, 2)
    rest = [i for b in it for i in b[1].tolist()]
    loader2 = StatefulDataLoader(Indexed(50), batch_size=6, shuffle=True, drop_last=True)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    got = [b[1].tolist() for b in loader2]
    assert all(len(b) == 6 for b in got)
    order = done + rest  # the uninterrupted order (its last 2 samples dropped by bs 8)
    flat = [i for b in got for i in b]
    assert flat == order[16 : 16 + len(flat)] and len(flat) == (50 - 16) // 6 * 6


# ---------------------------------------------------------------- docs/format.md, more


def test_format_complex128_real_view_and_name_escapes(cwd):
    """format.md: complex128 stored as its real view (F64, trailing dim 2), the manifest keeps
    the true dtype; `~` → `~0` and `/` → `~1` inside a component."""
    from safetensors import safe_open

    sg.save(
        "c",
        {
            "a/b": torch.ones(1),
            "x~y": torch.zeros(1),
            "z": torch.tensor([1 + 2j], dtype=torch.complex128),
        },
    )
    m = json.loads(Path("c/manifest.json").read_text())
    assert "a~1b" in m["tensors"] and "x~0y" in m["tensors"]
    assert m["tensors"]["z"]["dtype"] == "complex128"
    with safe_open("c/rank-00000.safetensors", "pt") as r:
        assert tuple(r.get_slice("z").get_shape()) == (1, 2)
    assert sg.load("c")["z"].dtype == torch.complex128


def test_format_info_advice_recorded(cwd):
    """policies.md: each checkpoint records the estimates of the saves before it (info.advice)."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", save=sg.Every(steps=1, mtbf=3600)) as c:
        for s in (1, 2, 3):
            c.step(state, s)
    m = json.loads(Path("run/step-000000000003/manifest.json").read_text())
    assert "advice" in m["info"]


def test_tiers_cache_of_another_run_refused(cwd):
    """tiers.md: a cache whose run.json names another run is refused, typed."""
    _run_with_steps("other", steps=(1,))
    with pytest.raises(sg.CheckpointError):
        with sg.Checkpointer("remote", cache="other"):
            pass


def test_transfer_report_frozen(cwd):
    """transfer.md: TransferReport (frozen)."""
    import dataclasses

    from savegame.tools.transfer import push

    _run_with_steps("a", steps=(1,))
    r = push("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.copied = []


def test_readme_every_epochs_with_epoch_end(cwd):
    """README table: Every(epochs=N) needs ckpt.step(..., epoch_end=True)."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", save=sg.Every(epochs=2)) as c:
        saved = [c.step(state, s, epoch_end=(s % 3 == 0)) for s in range(1, 13)]
    assert [i + 1 for i, x in enumerate(saved) if x] == [6, 12]


@pytest.mark.slow
def test_readme_changed_workers_same_sample(cwd):
    """README/resume.md: a changed number of loader workers (0 included) continues the epoch at
    the same sample, in the same order, when the dataset keeps no state in the workers."""
    torch.manual_seed(3)
    loader = StatefulDataLoader(Indexed(40), batch_size=4, shuffle=True, num_workers=2)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    it = iter(loader)
    [next(it) for _ in range(3)]
    with sg.Checkpointer("run") as c:
        c.save(state, 3)
    rest = [b[1].tolist() for b in it]
    del it
    loader2 = StatefulDataLoader(Indexed(40), batch_size=4, shuffle=True, num_workers=0)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    assert [b[1].tolist() for b in loader2] == rest


def test_resume_changed_batch_size_after_epoch_end_not_refused(cwd):
    """resume.md: a changed batch size after the epoch's end (its StopIteration) is not refused."""
    from torch.utils.data import BatchSampler, SequentialSampler

    ds = Indexed(12)
    loader = StatefulDataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, False))
    state = sg.TrainState(model=tiny_model(), loader=loader)
    assert len(list(loader)) == 3
    with sg.Checkpointer("run") as c:
        c.save(state, 3)
    loader2 = StatefulDataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 6, False))
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=loader2))
    assert [b[1].tolist() for b in loader2] == [list(range(6)), list(range(6, 12))]


def test_async_close_raises_after_releasing_lock(tmp_path):
    """async.md: close() raises the background failure too, after releasing the lock."""
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    state = sg.TrainState(model=tiny_model())
    ckpt = sg.Checkpointer(FaultyStore(LocalStore(tmp_path), {"stage.write": 1}), async_save=True)
    ckpt.save_async(state, 1)
    with pytest.raises(sg.StorageError):
        ckpt.close()
    with sg.Checkpointer(tmp_path) as again:
        again.save(state, 2)


def test_async_result_error_not_raised_twice(tmp_path):
    """async.md: if you already received it from handle.result(), it is not raised a second time."""
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    state = sg.TrainState(model=tiny_model())
    ckpt = sg.Checkpointer(FaultyStore(LocalStore(tmp_path), {"stage.write": 1}), async_save=True)
    try:
        h = ckpt.save_async(state, 1)
        with pytest.raises(sg.StorageError):
            h.result(timeout=30)
        ckpt.wait()
        ckpt.save(state, 2)
    finally:
        ckpt.close()


def test_transfer_into_live_run_locked(cwd):
    """transfer.md: a local destination is locked for the whole transfer: a training run writing
    the folder gets / gives LockedError."""
    from savegame.tools.transfer import push

    _run_with_steps("a", steps=(1,))
    import shutil

    shutil.copytree("a", "b")
    shutil.rmtree("b/step-000000000001")
    with sg.Checkpointer("b"):
        with pytest.raises(sg.LockedError):
            push("a", "b")


def test_transfer_push_step_flag_and_run_json_kept(cwd):
    """README/transfer.md: push RUN URL --step N; one checkpoint moved into an existing run of the
    same id keeps that run's run.json."""
    _run_with_steps("a", steps=(1, 2, 3), keep=sg.Keep(last=5))
    assert main_rc("push", "a", "b", "--step", "2", "--no-progress") == 0
    assert sorted(p.name for p in Path("b").glob("step-*")) == ["step-000000000002"]
    rj = json.loads(Path("b/run.json").read_text())
    rj["marker"] = 1
    Path("b/run.json").write_text(json.dumps(rj))
    assert main_rc("push", "a/step-000000000003", "b", "--no-progress") == 0
    assert json.loads(Path("b/run.json").read_text()).get("marker") == 1


def test_transfer_missing_older_step_added_after_step_push(cwd):
    """transfer.md 'The destination': the same run (same run id), other steps: the missing steps
    are added — an incremental run pushed one step first, then whole."""
    _run_with_steps("a", steps=(1, 2, 3), keep=sg.Keep(last=5))
    assert main_rc("push", "a", "b", "--step", "2", "--no-progress") == 0
    assert main_rc("push", "a", "b", "--no-progress") == 0
    assert sorted(p.name for p in Path("b").glob("step-*")) == [
        "step-000000000001",
        "step-000000000002",
        "step-000000000003",
    ]


def test_storage_create_one_winner():
    """storage.md: create(key, data): exactly one creator wins; the others FileExistsError."""
    from savegame.storage.memory import MemoryStore

    st = MemoryStore()
    st.create("lease", b"a")
    with pytest.raises(FileExistsError):
        st.create("lease", b"b")


def test_readme_show_run_and_checkpoint(cwd):
    """README: savegame show CKPT|RUN|FILE."""
    _run_with_steps("run", steps=(1, 2))
    assert main_rc("show", "run") == 0
    assert main_rc("show", "run/step-000000000001") == 0


def test_remote_cli_on_memory_url(cwd, capsys):
    """remote.md / README: every command takes a path or a URL (memory:// in one process)."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer(f"memory://s18-clitest-{_UID}/runs/x") as c:
        c.save(state, 1)
    assert main_rc("ls", f"memory://s18-clitest-{_UID}/runs/x") == 0
    assert main_rc("verify", f"memory://s18-clitest-{_UID}/runs/x") == 0
    assert main_rc("pull", f"memory://s18-clitest-{_UID}/runs/x", "local", "--no-progress") == 0
    assert Path("local/step-000000000001/manifest.json").exists()


def test_incremental_nothing_changed_writes_header_only_file(cwd):
    """incremental.md: a save in which nothing changed still writes its own file, holding only a
    header."""
    from safetensors import safe_open

    state = sg.TrainState(model=nn.Linear(8, 8))
    with sg.Checkpointer("run", handle_signals=False) as c:
        c.save(state, 1)
        c.save(state, 2)
    f = Path("run/step-000000000002/rank-00000.safetensors")
    assert f.exists()
    with safe_open(str(f), "pt") as r:
        names = list(r.keys())
    assert not any(n.startswith("model/") for n in names)


def test_readme_pickle_needing_object_refused_naming_where(cwd):
    """README rule 4: objects that would need pickle are refused with an error naming where."""

    class Cfg:
        pass

    state = sg.TrainState(model=tiny_model(), extras={"cfg": Cfg()})
    with sg.Checkpointer("run") as c:
        with pytest.raises(sg.EncodeError) as ei:
            c.save(state, 1)
    assert "cfg" in str(ei.value)


def test_readme_regime_short_and_long_details():
    """README: short = each epoch, keep newest + best; long = every 30 min, keep 5 + best 3 + one
    in 48 forever."""
    short = sg.regime("short", monitor="val_acc", mode="max")
    assert short["save"].epochs == 1 and (short["keep"].last, short["keep"].best) == (1, 1)
    long = sg.regime("long", monitor="val_acc", mode="max")
    assert long["keep"].every == 48


def test_format_manifest_info_fields(cwd):
    """format.md: info {"reason", "index", "epochs_completed"}."""
    _run_with_steps("run", steps=(1,))
    info = json.loads(Path("run/step-000000000001/manifest.json").read_text())["info"]
    assert {"reason", "index", "epochs_completed"} <= set(info)


def test_formats_convert_tf_strings_left_out_of_safetensors(cwd):
    """formats.md 'Conversion': TF string tensors are left out of a safetensors output with a
    LossyConversionWarning naming them."""
    with pytest.warns(sg.LossyConversionWarning) as got:
        sg.convert(GOLDEN / "tensorflow" / "tfkeras", "o.safetensors", to="safetensors")
    assert any("_CHECKPOINTABLE_OBJECT_GRAPH" in str(w.message) for w in got)
    assert Path("o.safetensors").is_file()


def _f4_safetensors(path):
    import struct

    hdr = json.dumps(
        {
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "q": {"dtype": "F4", "shape": [2], "data_offsets": [4, 5]},
        }
    ).encode()
    hdr += b" " * (-len(hdr) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 5)


def test_formats_convert_f4_unsupported_and_cleans_up(cwd):
    """formats.md: F4 entries are listed but read raises UnsupportedFormatError; convert of a
    tensor the target cannot hold raises it; README: a failed conversion removes the folders it
    created for the output."""
    _f4_safetensors("f4.safetensors")
    with sg.open("f4.safetensors") as r:
        assert "q" in r.keys()
        with pytest.raises(sg.UnsupportedFormatError):
            r.read("q")
    with pytest.raises(sg.UnsupportedFormatError):
        sg.convert("f4.safetensors", "new/deep/out.pt", to="torch")
    assert not Path("new").exists()


def test_readme_overwrite_never_a_run_folder_or_cwd(cwd):
    """README: --overwrite replaces one file or one checkpoint, never a whole run folder nor the
    folder you work in."""
    _run_with_steps("run", steps=(1, 2))
    torch.save({"w": torch.ones(1)}, "a.pt")
    assert main_rc("convert", "a.pt", "run", "--to", "savegame", "--overwrite") == 2
    assert len(list(Path("run").glob("step-*"))) == 2
    assert main_rc("convert", "a.pt", ".", "--to", "savegame", "--overwrite") == 2
    assert Path("a.pt").exists()


def test_readme_convert_step_output_must_carry_step(cwd):
    """README: a step-… output inside a run must carry the converted checkpoint's step."""
    _run_with_steps("run", steps=(1,))
    torch.save({"step": 5, "w": torch.ones(1)}, "a.pt")
    assert main_rc("convert", "a.pt", "run/step-000000000007", "--to", "savegame") == 2
    assert main_rc("convert", "a.pt", "run/step-000000000005", "--to", "savegame") == 0


def test_readme_locked_error_names_host(tmp_path):
    """README: LockedError naming the holder (pid, host)."""
    import socket

    root = tmp_path / "run"
    with sg.Checkpointer(root):
        from savegame.storage.local import LocalStore

        try:
            other = sg.Checkpointer(LocalStore(root))
        except sg.LockedError as e:
            text = str(e)
        else:
            other.close()
            pytest.skip("same-process second open is not refused; covered by the subprocess test")
    assert str(os.getpid()) in text and socket.gethostname() in text


def test_remote_lease_object_and_second_writer(cwd):
    """remote.md 'The lease': <run>/.lock {"holder": "pid N on host", "expires", "ttl": 60.0};
    a second writer gets LockedError naming the holder and when the lease expires."""
    from savegame import storage

    url = f"memory://s18-leasetest-{_UID}/runs/x"
    c = sg.Checkpointer(url)
    try:
        st = storage.as_store(url)
        blob = st.open(".lock")
        buf = bytearray(blob.size) if hasattr(blob, "size") and not callable(blob.size) else None
        raw = bytes(blob.map()) if buf is None and hasattr(blob, "map") else None
        if buf is not None:
            blob.readinto(0, memoryview(buf))
            raw = bytes(buf)
        lease = json.loads(raw)
        assert lease["holder"] == f"pid {os.getpid()} on {__import__('socket').gethostname()}"
        assert lease["ttl"] == 60.0 and lease["expires"] > 0
        with pytest.raises(sg.LockedError, match="expires"):
            sg.Checkpointer(url)
    finally:
        c.close()
    with sg.Checkpointer(url):
        pass  # released at close


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_integrations_hf_accelerate_block(cwd):
    """integrations-hf.md 'Accelerate' block as shown (tiny model, data, ema, 3 steps), then a
    second session: load_state() returns the saved step; save_state(other folder) is ValueError."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator, DataLoaderConfiguration

    from savegame.integrations.accelerate import DirectRandomSampler, attach

    def session(n_steps):
        data = Indexed(24)
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
        ema = tiny_model(8)
        loader = StatefulDataLoader(
            data,
            batch_size=4,
            sampler=DirectRandomSampler(data, seed=0),
            generator=torch.Generator().manual_seed(1),
        )
        accelerator = Accelerator(
            dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True), cpu=True
        )
        model, optimizer, loader, scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        accelerator.register_for_checkpointing(ema)  # anything with state_dict()/load_state_dict()
        ckpt = attach(accelerator, "runs/exp", save=sg.Every(steps=500), keep=sg.Keep(last=3))
        try:
            step = accelerator.load_state()  # newest valid checkpoint, or 0
            first = step
            for x, _ in loader:
                optimizer.zero_grad()
                accelerator.backward(model(x).sum())
                optimizer.step()
                scheduler.step()
                step += 1
                ckpt.step(step)
                if step >= n_steps:
                    break
            accelerator.save_state()  # a final checkpoint
            with pytest.raises(ValueError):
                accelerator.save_state("elsewhere")
        finally:
            ckpt.close()
        return first

    assert session(3) == 0
    assert Path("runs/exp/step-000000000003/manifest.json").exists()
    assert session(5) == 3


_WORKER_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    sys.path.insert(0, {root!r})
    import savegame as sg
    from torchdata.stateful_dataloader import StatefulDataLoader
    from tests._outside_s18_docs import Indexed, tiny_model

    def init(wid):
        print("WORKER", os.getpid(), flush=True)

    loader = StatefulDataLoader(Indexed(16), batch_size=2, num_workers=1, worker_init_fn=init,
                                persistent_workers=True)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    with sg.Checkpointer(sys.argv[1]) as ckpt:
        it = iter(loader)
        got = [next(it)[1].tolist()]
        print("READY", flush=True)
        for _ in range(100):
            if os.path.exists(sys.argv[2]):
                break
            time.sleep(0.05)
        time.sleep(0.5)
        got += [b[1].tolist() for b in it]
        print("BATCHES", len(got), flush=True)
""")


@pytest.mark.slow  # CI under 20 minutes; runs with -m slow
def test_readme_workers_ignore_sigterm_from_others(tmp_path):
    """README 'Preemption': workers of a loader in a TrainState ignore SIGTERM from anyone but
    their own loader (savegame wraps worker_init_fn; yours still runs)."""
    script = tmp_path / "child.py"
    script.write_text(_WORKER_CHILD.format(root=str(Path(__file__).parent.parent)))
    flag = tmp_path / "go"
    p = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), str(flag)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = None
        for line in p.stdout:
            if line.startswith("WORKER"):
                worker = int(line.split()[1])
            if line.startswith("READY"):
                break
        assert worker is not None
        os.kill(worker, signal.SIGTERM)
        flag.write_text("1")
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    assert "BATCHES 8" in out


def test_readme_ls_would_be_pruned(cwd, capsys):
    """README: ls shows each checkpoint for what it is: kept (and why), "would be pruned"."""
    _run_with_steps("run", steps=(1, 2, 3), keep=sg.Keep(last=5))
    capsys.readouterr()
    assert main_rc("ls", "run", "--keep-last", "1") == 0
    out = capsys.readouterr().out
    assert "would be pruned" in out


def test_formats_numpy_fortran_and_big_endian(cwd):
    """formats.md: Fortran arrays come back with the right values in C order; big-endian arrays
    are converted to native order."""
    a = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.save("f.npy", a)
    np.save("b.npy", np.arange(4, dtype=">i4"))
    with sg.open("f.npy") as r:
        assert torch.equal(r.read("array"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    with sg.open("b.npy") as r:
        assert r.read("array").tolist() == [0, 1, 2, 3]


def test_formats_diff_nan_equal_bits_identical(cwd):
    """formats.md: NaNs with equal bits count as identical."""
    t = torch.tensor([float("nan"), 1.0])
    torch.save({"w": t}, "a.pt")
    torch.save({"w": t.clone()}, "b.pt")
    d = sg.diff("a.pt", "b.pt")
    assert "w" in d.identical
    assert main_rc("diff", "a.pt", "b.pt") == 0


def test_formats_torch_bare_tensor_and_parameter(cwd):
    """formats.md: a bare saved tensor is named `tensor`; Parameters keep requires_grad."""
    from savegame.interop import torch_pickle

    torch.save(torch.arange(3), "t.pt")
    with sg.open("t.pt") as r:
        assert r.keys() == ["tensor"]
    torch.save({"p": nn.Parameter(torch.ones(2))}, "p.pt")
    loaded = torch_pickle.load("p.pt")
    assert isinstance(loaded["p"], nn.Parameter) and loaded["p"].requires_grad


def test_formats_legacy_torch_golden(cwd):
    """formats.md: the legacy format (pre-1.6) is read; golden legacy.pt."""
    with sg.open(GOLDEN / "torch" / "legacy.pt") as r:
        keys = r.keys()
        assert keys
        r.read(keys[0])
        assert r.verify() == []


# ============================================================================== every doc: names


_DOCS = [Path(__file__).parent.parent / "README.md"] + sorted(
    p
    for p in (Path(__file__).parent.parent / "docs").glob("*.md")
    if p.name not in ("benchmarks.md", "scale.md")
)


def _resolve(dotted: str) -> bool:
    import importlib

    obj = importlib.import_module("savegame")
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        if hasattr(obj, p):
            obj = getattr(obj, p)
            continue
        try:
            obj = importlib.import_module("savegame." + ".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


@pytest.mark.parametrize("doc", _DOCS, ids=lambda p: p.name)
def test_every_doc_sg_and_savegame_names_exist(doc, monkeypatch):
    """Every `sg.…` / `savegame.…` name a doc uses exists (module attribute or submodule)."""
    import re

    monkeypatch.setenv("KERAS_BACKEND", "torch")
    missing = []
    for m in re.finditer(r"\b(?:sg|savegame)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", doc.read_text()):
        name = m.group(1)
        if name.split(".")[-1] in ("md", "py", "json", "safetensors", "weights", "cfg"):
            continue
        if name.startswith(("integrations.keras",)):
            continue  # needs KERAS_BACKEND before keras' first import: checked in a subprocess
        if not _resolve(name):
            missing.append(name)
    assert not missing, f"{doc.name}: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", _DOCS, ids=lambda p: p.name)
def test_every_doc_named_files_exist(doc):
    """Every source, test, example and benchmark file a doc names exists ({a,b} expanded)."""
    import re

    root = Path(__file__).parent.parent
    missing = []
    pat = r"(?:src/)?savegame/[\w/]+\.(?:py|json)|tests/[\w/.{},-]+\.py|examples/\w+\.py|benchmarks/\w+\.py"
    for m in re.finditer(pat, doc.read_text()):
        p = m.group(0)
        b = re.search(r"\{([^}]*)\}", p)
        for q in [p.replace(b.group(0), x) for x in b.group(1).split(",")] if b else [p]:
            if not ((root / q).exists() or (root / "src" / q).exists()):
                missing.append(q)
    assert not missing, f"{doc.name}: {missing}"


@pytest.mark.slow
def test_every_doc_from_savegame_imports_work():
    """Every `from savegame… import …` line in the docs imports (KERAS_BACKEND=torch)."""
    import re

    lines = sorted(
        {
            m.group(0).strip()
            for d in _DOCS
            for m in re.finditer(r"from savegame[\w.]* import [\w, ]+", d.read_text())
        }
    )
    code = "import os; os.environ['KERAS_BACKEND'] = 'torch'\n" + "\n".join(lines)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_every_doc_cli_flags_exist():
    """Every `savegame CMD … --flag` the docs show is a flag of that command."""
    import re

    from savegame.cli.main import build_parser

    p = build_parser()
    sub = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    flags = {c: {s for a in sp._actions for s in a.option_strings} for c, sp in sub.choices.items()}
    bad = []
    for d in _DOCS:
        for i, line in enumerate(d.read_text().splitlines(), 1):
            for m in re.finditer(
                r"savegame (ls|show|verify|prune|convert|diff|plot|push|pull|demo)\b([^`\n]*)", line
            ):
                bad += [
                    f"{d.name}:{i} {m.group(1)} {fl}"
                    for fl in re.findall(r"(--[a-z][a-z-]*)", m.group(2))
                    if fl not in flags[m.group(1)]
                ]
    assert not bad


def test_readme_keras_isolation_options(cwd):
    """README: sg.open(path, isolate=False) for files you trust; isolate_timeout (300 s)."""
    with sg.open(GOLDEN / "keras" / "cnn.h5", isolate=False) as r:
        assert r.keys()
    with sg.open(GOLDEN / "keras" / "cnn.h5", isolate_timeout=60) as r:
        assert r.keys()
    assert main_rc("show", GOLDEN / "keras" / "cnn.h5", "--no-isolate") == 0


def test_resume_snapshot_every_n_steps_changed_batch_refused_with_workers(cwd):
    """resume.md: snapshot_every_n_steps=k > 1 and a changed batch size, when the batches since
    the last snapshot are no whole number of batches of B': RestoreError (1 batch of 4 → B'=3)."""
    loader = StatefulDataLoader(Indexed(40), batch_size=4, snapshot_every_n_steps=2, num_workers=1)
    state = sg.TrainState(model=tiny_model(), loader=loader)
    it = iter(loader)
    for _ in range(3):
        next(it)
    with sg.Checkpointer("run") as c:
        c.save(state, 3)
    del it
    l2 = StatefulDataLoader(Indexed(40), batch_size=3, snapshot_every_n_steps=2, num_workers=1)
    with sg.Checkpointer("run") as c:
        c.restore(sg.TrainState(model=tiny_model(), loader=l2))
    with pytest.raises(sg.RestoreError, match="snapshot"):
        iter(l2)


def test_async_failure_raised_by_a_step_that_does_not_save(tmp_path):
    """async.md: the failure is raised by the next call to step() — every step, even one that
    does not save."""
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    state = sg.TrainState(model=tiny_model())
    ckpt = sg.Checkpointer(
        FaultyStore(LocalStore(tmp_path), {"stage.write": 1}),
        save=sg.Every(steps=100),
        async_save=True,
    )
    try:
        ckpt.save_async(state, 1)
        import time

        deadline = time.time() + 30
        with pytest.raises(sg.StorageError):
            while time.time() < deadline:
                ckpt.step(state, 2)  # not due: does not save
                time.sleep(0.05)
    finally:
        ckpt.close()


def test_format_latest_is_only_a_hint(cwd):
    """README/format.md: LATEST is a hint only; the truth is the newest valid manifest."""
    _run_with_steps("run", steps=(1, 2))
    Path("run/LATEST").write_text("step-000000000001\n")
    with sg.Checkpointer("run") as c:
        assert c.restore(_state()[0]) == 2


def test_format_edited_manifest_refused(cwd):
    """format.md: a manifest edited by hand is refused even if it still parses (self-hash)."""
    _run_with_steps("run", steps=(1, 2))
    p = Path("run/step-000000000002/manifest.json")
    m = json.loads(p.read_text())
    m["metrics"] = {"x": 1.0}
    p.write_text(json.dumps(m))
    with pytest.warns(sg.CorruptCheckpointWarning, match="self-hash"):
        with sg.Checkpointer("run") as c:
            assert c.restore(_state()[0]) == 1


_DDP_CHILD = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import savegame as sg
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tests._outside_s18_docs import tiny_model
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    model = DDP(tiny_model(1))
    with sg.Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(sg.TrainState(model=model), 7)
    dist.destroy_process_group()
    print("DONE")
""")


@pytest.mark.slow  # CI under 20 minutes; runs with -m slow
def test_distributed_ddp_saved_through_inner_module(tmp_path):
    """distributed.md 'Restore without the wrapper' / README: a DDP model is saved through its
    inner module (keys without module.); a 1-rank checkpoint restores into the bare module in a
    plain process; savegame.load(ckpt)["model"] loads into the bare module."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_CHILD.format(root=str(Path(__file__).parent.parent)))
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, str(script), str(run), str(tmp_path / "rdzv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "DONE" in p.stdout, p.stderr[-2000:]
    m = json.loads((run / "step-000000000007" / "manifest.json").read_text())
    assert "model/0.weight" in m["tensors"] and not any("module." in k for k in m["tensors"])
    bare = tiny_model(2)
    with sg.Checkpointer(run) as c:
        assert c.restore(sg.TrainState(model=bare)) == 7
    assert torch.equal(bare[0].weight, tiny_model(1)[0].weight)
    tiny_model(3).load_state_dict(sg.load(run / "step-000000000007")["model"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_integrations_hf_trainer_block(cwd):
    """integrations-hf.md first block: TrainingArguments(save_strategy="no"), attach(trainer,
    "runs/exp", save=, keep=Keep(last=3, best=1, monitor="eval_loss")); trainer.train() is a fresh
    run, then resumes from the newest valid checkpoint; train(resume_from_checkpoint=...) with
    savegame attached is refused with a ValueError."""
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from savegame.integrations.transformers import attach

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(1, 1)

        def forward(self, x, labels=None):
            out = self.l(x)
            return {"loss": (out - labels).pow(2).mean(), "logits": out}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "labels": torch.tensor([1.0])}

    def session(max_steps):
        torch.manual_seed(0)
        args = TrainingArguments(
            output_dir="out",
            save_strategy="no",
            max_steps=max_steps,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            eval_strategy="steps",
            eval_steps=2,
        )
        trainer = Trainer(model=M(), args=args, train_dataset=DS(), eval_dataset=DS())
        cb = attach(
            trainer,
            "runs/exp",
            save=sg.Every(steps=2),
            keep=sg.Keep(last=3, best=1, monitor="eval_loss"),
        )
        trainer.train()  # a fresh run, or resumed from the newest *valid* checkpoint of runs/exp
        return cb

    session(3)
    assert Path("runs/exp/step-000000000003/manifest.json").exists()
    assert session(5).resumed_step == 3
    args = TrainingArguments(
        output_dir="out",
        save_strategy="no",
        max_steps=6,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    t = Trainer(model=M(), args=args, train_dataset=DS())
    attach(t, "runs/exp", save=sg.Every(steps=2))
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        t.train(resume_from_checkpoint="out/checkpoint-2")


_CTRL_C_CHILD = textwrap.dedent("""
    import os, sys, time, signal, torch
    sys.path.insert(0, {root!r})
    import savegame as sg
    from tests._outside_s18_docs import tiny_model
    ckpt = sg.Checkpointer(sys.argv[1])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    t0 = time.time()
    while time.time() - t0 < 20:   # a long step: no step boundary
        time.sleep(0.05)
    print("NOT STOPPED", flush=True)
""")


@pytest.mark.slow  # CI under 20 minutes; runs with -m slow
def test_readme_second_ctrl_c_stops_at_once(tmp_path):
    """README 'Preemption': a second Ctrl-C stops at once (no wait for the step boundary)."""

    script = tmp_path / "child.py"
    script.write_text(_CTRL_C_CHILD.format(root=str(Path(__file__).parent.parent)))
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "NOT STOPPED" not in p.stdout and p.returncode != 0, p.stdout + p.stderr[-1500:]


def test_policies_samples_and_tokens_combined(cwd):
    """policies.md: samples= and tokens= may be passed together and combined in one Every (any
    rule due saves); a step that crosses two multiples saves once."""
    state = sg.TrainState(model=tiny_model())
    with sg.Checkpointer("run", save=sg.Every(samples=10, tokens=1000)) as c:
        got = [
            c.step(state, 1, samples=4, tokens=100),
            c.step(state, 2, samples=4, tokens=950),
            c.step(state, 3, samples=25, tokens=10),
        ]
        assert (c.samples_seen, c.tokens_seen) == (33, 1060)
    assert got == [False, True, True]


# ============================================================================== real servers on loopback


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback for one test, credentials in the environment (as a user
    sets them); yields a function making a fresh bucket."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("obstore")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ALLOW_HTTP": "true",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
    )
    try:
        yield lambda name: client.create_bucket(Bucket=name)
    finally:
        server.stop()


@pytest.mark.network
def test_readme_object_storage_block_and_push_pull(cwd, s3, capsys):
    """README 'Runs on object storage': Checkpointer("s3://…", cache=…, save=, keep=); restore on
    a fresh machine (empty cache) takes the newest valid remote checkpoint; savegame push / pull;
    a bucket that does not exist is CheckpointNotFoundError naming it (remote.md)."""
    s3("bucket")
    state = sg.TrainState(model=tiny_model(1))
    ckpt = sg.Checkpointer(
        "s3://bucket/runs/exp1",  # also gs://, az://; http(s):// to read
        cache="local_nvme/exp1",  # commit locally, upload in the background (optional)
        save=sg.Every(steps=500),
        keep=sg.Keep(last=3),
    )
    try:
        ckpt.save(state, 500)
    finally:
        ckpt.close()
    fresh_model = tiny_model(2)
    with sg.Checkpointer("s3://bucket/runs/exp1", cache="other_machine/exp1") as c:
        step = c.restore(
            sg.TrainState(model=fresh_model)
        )  # on a fresh machine: the newest valid remote checkpoint
    assert step == 500 and torch.equal(fresh_model[0].weight, tiny_model(1)[0].weight)
    _run_with_steps("runs/exp1", steps=(1, 2))
    assert (
        main_rc("push", "runs/exp1", "s3://bucket/runs/exp2", "--no-progress") == 0
    )  # resumable: re-run to continue, verified
    assert main_rc("push", "runs/exp1", "s3://bucket/runs/exp2", "--no-progress") == 0
    assert main_rc("pull", "s3://bucket/runs/exp2", "pulled/exp2", "--no-progress") == 0
    assert main_rc("verify", "s3://bucket/runs/exp2") == 0
    with pytest.raises(sg.CheckpointNotFoundError, match="no-such-bucket"):
        with sg.Checkpointer("s3://no-such-bucket/run") as c:
            c.restore(sg.TrainState(model=tiny_model()))
    capsys.readouterr()
    main_rc("ls", "s3://KEYID:SUPERSECRET@bucket/runs/exp2")
    cap = capsys.readouterr()
    assert "SUPERSECRET" not in cap.out + cap.err


@pytest.mark.network
def test_readme_pull_from_http(cwd):
    """README: savegame pull … also from https:// (a plain web server; HTTP Range resume)."""
    import shutil

    from tests.remote.servers import HTTPFileServer

    _run_with_steps("runs/exp1", steps=(1, 2))
    server = HTTPFileServer(cwd / "www")
    try:
        shutil.copytree("runs/exp1", cwd / "www" / "exp1", ignore=shutil.ignore_patterns(".lock"))
        assert main_rc("pull", f"{server.url}/exp1", "pulled", "--no-progress") == 0
        assert main_rc("ls", f"{server.url}/exp1") == 0
    finally:
        server.close()
    with sg.Checkpointer("pulled") as c:
        assert c.restore(_state()[0]) == 2


def test_readme_converted_keras_and_numpy_diff_matches(cwd):
    """README: one converted from a Keras or numpy file keeps that file's names, and diff of the
    source against it matches (exit 0)."""
    for src in (GOLDEN / "keras" / "cnn.keras", GOLDEN / "torch" / "arrays.npz"):
        out = cwd / ("o_" + src.name.replace(".", "_"))
        sg.convert(src, out, to="savegame")
        assert main_rc("diff", src, out) == 0, src


def test_readme_tf2_strings_kept_as_bytes_in_savegame(cwd):
    """README: string tensors are kept as bytes in torch and savegame outputs."""
    sg.convert(GOLDEN / "tensorflow" / "tfkeras", "o", to="savegame")
    assert isinstance(sg.load("o")["_CHECKPOINTABLE_OBJECT_GRAPH"], bytes)


@pytest.mark.parametrize("src", ["tfkeras", "tf1"])
def test_readme_converted_tensorflow_diff_matches(cwd, src):
    """README: … one converted from a … TensorFlow … file keeps that file's names, and diff of
    the source against it matches in every numeric tensor (string tensors: only in A)."""
    from savegame.tools.diff import diff

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.convert(GOLDEN / "tensorflow" / src, "o", to="savegame")
    res = diff(GOLDEN / "tensorflow" / src, "o")
    with sg.open(GOLDEN / "tensorflow" / src) as r:
        strings = {n for n in r.keys() if "str" in str(r.info(n).dtype).lower()}
    assert strings and set(res.removed) == strings and not res.added and not res.changed
    assert all(v == 0 for v in res.max_abs_diff.values())


def test_readme_convert_run_folder_to_one_file(cwd):
    """README 'Scaling out': `savegame convert RUN model.safetensors --to safetensors` turns the
    run's (newest) checkpoint into one file."""
    from safetensors.torch import load_file

    m = nn.Linear(2, 2)
    with sg.Checkpointer("RUN") as c:
        c.save(sg.TrainState(model=m), 1)
        with torch.no_grad():
            m.weight.add_(1)
        c.save(sg.TrainState(model=m), 2)
    assert main_rc("convert", "RUN", "model.safetensors", "--to", "safetensors") == 0
    assert torch.equal(load_file("model.safetensors")["model/weight"], m.weight.detach())


def test_readme_set_up_packaging_claims():
    """README 'Set up': Python ≥ 3.10, torch>=2.4, the `savegame` command, and every extra the
    docs name (demo, test, remote, lightning, transformers, keras3, keras)."""
    import tomllib

    proj = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert proj["requires-python"] == ">=3.10"
    assert "torch>=2.4" in proj["dependencies"]
    assert proj["scripts"]["savegame"] == "savegame.cli.main:main"
    assert {"demo", "test", "remote", "lightning", "transformers", "keras3", "keras"} <= set(
        proj["optional-dependencies"]
    )


@pytest.mark.slow
def test_integrations_keras_block_and_log_lines(tmp_path):
    """integrations.md Keras block (KERAS_BACKEND=torch, SavegameCheckpoint(loader=, save=, keep=
    Keep(last=2, best=3, monitor="val_loss", mode="min")), model.fit(..., validation_data=)) logs
    'Epoch 1: val_loss improved from inf to …, saving checkpoint to runs/exp1/step-…'."""
    code = textwrap.dedent("""
        import os; os.environ["KERAS_BACKEND"] = "torch"
        import keras, savegame as sg, torch
        from savegame.integrations.keras import SavegameCheckpoint
        from torchdata.stateful_dataloader import StatefulDataLoader
        dataset = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        x_val, y_val = torch.randn(8, 3).numpy(), torch.randn(8, 1).numpy()
        loader = StatefulDataLoader(dataset, batch_size=32, shuffle=True)
        ckpt = SavegameCheckpoint("runs/exp1", loader=loader, save=sg.Every(steps=200),
                                  keep=sg.Keep(last=2, best=3, monitor="val_loss", mode="min"))
        model.fit(loader, epochs=2, validation_data=(x_val, y_val), callbacks=[ckpt], shuffle=False)
    """)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout + p.stderr
    assert "Epoch 1: val_loss improved from inf to " in text
    assert ", saving checkpoint to runs/exp1/step-000000000002" in text
