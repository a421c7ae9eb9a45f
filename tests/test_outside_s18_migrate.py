"""Outside review R13: bring months of checkpoints from other tools into savegame, then change
things between restarts (README "Resuming with changes", "Checkpoints from other tools";
docs/resume.md, docs/formats.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

HERE = Path(__file__).resolve().parent
HELPERS = HERE / "_outside_s18_migrate"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


class _Indexed(torch.utils.data.Dataset):
    """Sample i is (x_i, y_i, i): the index tells which samples a batch holds."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def _objects(seed: int = 0, batch_size: int = 4, num_workers: int = 0):
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    loader = StatefulDataLoader(
        _Indexed(), batch_size=batch_size, shuffle=True, num_workers=num_workers
    )
    return model, opt, sched, loader


def _train(
    model, opt, sched, loader, ckpt, step: int, until: int, state, seen: list[int] | None = None
) -> int:
    while step < until:
        for x, y, idx in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            step += 1
            if seen is not None:
                seen.extend(idx.tolist())
            if ckpt is not None:
                ckpt.step(state, step)
            if step == until:
                break
    return step


def _snapshot(model, opt, sched) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.state_dict().values()]
    for s in opt.state_dict()["state"].values():
        out.extend(v.clone() for v in s.values() if torch.is_tensor(v))
    out.append(torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64))
    out.append(torch.tensor(sched.last_epoch))
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _imagenet_tutorial_file(path: Path, *, dataparallel: bool = False) -> dict:
    """What pytorch/examples imagenet/main.py save_checkpoint() writes: epoch, arch, state_dict,
    best_acc1 (a 1-element tensor: top1.avg of accuracy()'s tensors), optimizer, scheduler."""
    torch.manual_seed(5)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    sched.step()
    sched.step()
    saved = torch.nn.DataParallel(model) if dataparallel else model
    blob = {
        "epoch": 2,
        "arch": "resnet18",
        "state_dict": saved.state_dict(),
        "best_acc1": torch.tensor([71.5]),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    torch.save(blob, path)
    return blob


TUTORIAL_MAPPING = {
    "model": "state_dict",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "extras/epoch": "epoch",
    "extras/arch": "arch",
    "extras/best_acc1": "best_acc1",
}
KEEP = sg.Keep(last=5, best=1, monitor="val_acc", mode="max")


def _checkpoint_names(run: Path) -> list[str]:
    return (
        sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) if run.exists() else []
    )


# ---- adopt: the ImageNet tutorial file ---------------------------------------------------------


def test_imagenet_tutorial_file_adopts_then_training_resumes_exactly_from_the_adopted_step(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    blob = _imagenet_tutorial_file(src)
    run = tmp_path / "run"
    model, opt, sched, loader = _objects()
    extras: dict = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras=extras)
    with sg.Checkpointer(run, save=sg.Every(steps=3), keep=KEEP, handle_signals=False) as ck:
        assert ck.restore(state) == 0
        path = ck.adopt(
            src, state, step=20, mapping=TUTORIAL_MAPPING, metrics={"val_acc": "best_acc1"}
        )
        assert path.name == "step-000000000020"
        for a, b in zip(model.state_dict().values(), blob["state_dict"].values(), strict=True):
            assert torch.equal(a, b)
        assert extras["epoch"] == 2 and extras["arch"] == "resnet18"
        assert torch.equal(torch.as_tensor(extras["best_acc1"]), torch.tensor([71.5]))
        assert sched.last_epoch == 2
        assert [i.metrics for i in ck.list()] == [{"val_acc": 71.5}]
        for pid, s in opt.state_dict()["state"].items():
            assert torch.equal(
                s["momentum_buffer"], blob["optimizer"]["state"][pid]["momentum_buffer"]
            )
        # train on: saves at 21 (every 3 steps: 21, 24), 26 at the end
        _train(model, opt, sched, loader, ck, 20, 26, state)
        ck.save(state, 26)
    final = _snapshot(model, opt, sched)
    assert _checkpoint_names(run)[0] == "step-000000000020"

    for from_step in (20, 24):
        m2, o2, s2, l2 = _objects(seed=99)  # other init: everything must come from the checkpoint
        ex2: dict = {}
        st2 = sg.TrainState(model=m2, optimizer=o2, scheduler=s2, loader=l2, extras=ex2)
        with sg.Checkpointer(run, keep=KEEP, handle_signals=False) as ck:
            assert ck.restore(st2, step=from_step) == from_step
        _train(m2, o2, s2, l2, None, from_step, 26, st2)
        assert _same(_snapshot(m2, o2, s2), final), (
            f"resumed from {from_step}: not the uninterrupted run"
        )
        assert ex2["arch"] == "resnet18"


def test_a_dataparallel_prefixed_state_dict_is_a_restore_error_naming_the_keys_and_commits_nothing(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src, dataparallel=True)
    model, opt, sched, loader = _objects()
    before = [t.clone() for t in model.state_dict().values()]
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        with pytest.raises(sg.RestoreError) as ei:
            ck.adopt(src, state, step=20, mapping={"model": "state_dict", "optimizer": "optimizer"})
        assert "module.0.weight" in str(ei.value)
        assert ei.value.key == "model"
        assert ck.list() == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True))


def test_the_dataparallel_file_adopts_once_the_prefix_is_dropped_by_hand(tmp_path: Path) -> None:
    """The documented way around a `module.` prefix: load the file safely, strip, save."""
    src = tmp_path / "checkpoint.pth.tar"
    blob = _imagenet_tutorial_file(src, dataparallel=True)
    from savegame.interop import torch_pickle

    loaded = torch_pickle.load(src)
    loaded["state_dict"] = {k.removeprefix("module."): v for k, v in loaded["state_dict"].items()}
    fixed = tmp_path / "fixed.pt"
    torch.save(loaded, fixed)
    model, opt, sched, _ = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.adopt(fixed, state, step=20, mapping=TUTORIAL_MAPPING)
    for a, b in zip(model.state_dict().values(), blob["state_dict"].values(), strict=True):
        assert torch.equal(a, b)


def test_a_torch_save_of_a_whole_module_is_refused_unsafe_and_nothing_of_it_runs(
    tmp_path: Path,
) -> None:
    src = tmp_path / "model.pt"
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(
        [sys.executable, str(HELPERS / "make_foreign.py"), "whole_module", str(src)],
        env=env,
        check=True,
        cwd=HERE,
    )
    marker = tmp_path / "marker"
    os.environ["SG18_MARK"] = str(marker)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        state = sg.TrainState(model=model, extras={})
        with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
            with pytest.raises(sg.errors.UnsafeContentError) as ei:
                ck.adopt(src, state, step=1, mapping={"model": ""})
            assert "EvilNet" in str(ei.value) or "evil_model" in str(ei.value)
            assert ck.list() == []
    finally:
        del os.environ["SG18_MARK"]
    assert not marker.exists()
    assert "_outside_s18_migrate.evil_model" not in sys.modules


def test_a_wrong_source_path_is_not_found_and_a_partial_mapping_adopts_only_what_it_names(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    blob = _imagenet_tutorial_file(src)
    run = tmp_path / "run"
    model, opt, sched, loader = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        with pytest.raises(sg.CheckpointNotFoundError) as ei:
            ck.adopt(src, state, step=20, mapping={"optimizer": "optimizer_state"})
        assert ei.value.key == "optimizer_state"
        with pytest.raises(sg.RestoreError):  # a destination the TrainState lacks
            ck.adopt(src, state, step=20, mapping={"ema": "state_dict"})
        assert ck.list() == []
        fresh_opt = {k: v for k, v in opt.state_dict().items()}
        ck.adopt(src, state, step=20, mapping={"model": "state_dict"})
        assert opt.state_dict()["state"] == fresh_opt["state"] == {}
        _train(model, opt, sched, loader, ck, 20, 23, state)
        ck.save(state, 23)
    final = _snapshot(model, opt, sched)
    m2, o2, s2, l2 = _objects(seed=7)
    st2 = sg.TrainState(model=m2, optimizer=o2, scheduler=s2, loader=l2, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(st2, step=20) == 20
    for a, b in zip(m2.state_dict().values(), blob["state_dict"].values(), strict=True):
        assert torch.equal(a, b)
    _train(m2, o2, s2, l2, None, 20, 23, st2)
    assert _same(_snapshot(m2, o2, s2), final)


def test_a_mapping_that_points_an_object_at_the_wrong_subtree_is_a_restore_error_naming_it(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src)
    model, opt, sched, _ = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        # (a scheduler takes any dict: torch's LRScheduler.load_state_dict is a __dict__.update)
        for mapping, key in (
            ({"optimizer": "state_dict"}, "optimizer"),
            ({"model": "best_acc1"}, "model"),
        ):
            with pytest.raises(sg.RestoreError) as ei:
                ck.adopt(src, state, step=20, mapping=mapping)
            assert ei.value.key == key and mapping[key] in str(ei.value)
        assert ck.list() == []
    assert not _checkpoint_names(tmp_path / "run")


def test_the_adopted_metric_keeps_the_adopted_checkpoint_as_best_across_restarts(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src)
    run = tmp_path / "run"
    keep = sg.Keep(last=1, best=1, monitor="val_acc", mode="max")
    model, opt, sched, loader = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras={})
    with sg.Checkpointer(run, keep=keep, handle_signals=False) as ck:
        ck.adopt(src, state, step=20, mapping=TUTORIAL_MAPPING, metrics={"val_acc": "best_acc1"})
        _train(model, opt, sched, loader, None, 20, 22, state)
        ck.save(state, 22, metrics={"val_acc": 60.0})
    with sg.Checkpointer(run, keep=keep, handle_signals=False) as ck:
        ck.save(state, 23, metrics={"val_acc": 65.0})
        ck.save(state, 24)
    assert _checkpoint_names(run) == ["step-000000000020", "step-000000000024"]


def test_a_legacy_pre_1_6_tutorial_file_and_another_runs_checkpoint_adopt_alike(
    tmp_path: Path,
) -> None:
    blob = _imagenet_tutorial_file(tmp_path / "zip.pth.tar")
    legacy = tmp_path / "legacy.pth.tar"
    torch.save(blob, legacy, _use_new_zipfile_serialization=False)
    model, opt, sched, _ = _objects()
    extras: dict = {}
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
    with sg.Checkpointer(tmp_path / "r1", keep=KEEP, handle_signals=False) as ck:
        ck.adopt(legacy, state, step=20, mapping=TUTORIAL_MAPPING, metrics={"val_acc": "best_acc1"})
        assert ck.list()[0].metrics == {"val_acc": 71.5}
    for a, b in zip(model.state_dict().values(), blob["state_dict"].values(), strict=True):
        assert torch.equal(a, b)
    # a savegame checkpoint is a source too: its tree is the TrainState's names
    m2, o2, s2, _ = _objects(seed=9)
    ex2: dict = {}
    st2 = sg.TrainState(model=m2, optimizer=o2, scheduler=s2, extras=ex2)
    with sg.Checkpointer(tmp_path / "r2", handle_signals=False) as ck:
        ck.adopt(
            tmp_path / "r1" / "step-000000000020",
            st2,
            step=7,
            mapping={"model": "model", "optimizer": "optimizer", "extras/arch": "extras/arch"},
        )
    assert ex2 == {"arch": "resnet18"}
    assert _same(_snapshot(m2, o2, sched)[:-2], _snapshot(model, opt, sched)[:-2])


def test_a_metric_path_that_is_not_a_number_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    """README "Errors": every error derives from sg.CheckpointError and carries .path/.key."""
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src)
    model, opt, sched, _ = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        for path in ("arch", "optimizer", "state_dict/0.weight"):
            with pytest.raises(sg.CheckpointError) as ei:  # ValueError / TypeError today
                ck.adopt(
                    src, state, step=20, mapping={"model": "state_dict"}, metrics={"val_acc": path}
                )
            assert "val_acc" in str(ei.value) or ei.value.key in ("val_acc", path)
        assert ck.list() == []


# ---- adopt twice / into a run that already has checkpoints ------------------------------------


def test_a_second_adopt_at_the_same_step_is_saved_or_refused_never_dropped(tmp_path: Path) -> None:
    """Two files make one state (HF: model.safetensors + optimizer.pt). The second adopt loads
    its part into the live objects; then it must either be in the checkpoint of that step or be
    refused (StepExistsError) — not silently left out of the run."""
    src = tmp_path / "checkpoint.pth.tar"
    blob = _imagenet_tutorial_file(src)
    model, opt, sched, _ = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.adopt(src, state, step=20, mapping={"model": "state_dict"})
        try:
            ck.adopt(src, state, step=20, mapping={"optimizer": "optimizer"})
        except sg.StepExistsError:
            return  # refused: fine
    m2, o2, s2, _ = _objects(seed=3)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2, scheduler=s2, extras={})) == 20
    assert o2.state_dict()["state"], (
        "the second adopt said nothing, yet its optimizer state is not in step 20"
    )
    assert torch.equal(
        o2.state_dict()["state"][0]["momentum_buffer"],
        blob["optimizer"]["state"][0]["momentum_buffer"],
    )


def test_adopt_at_a_step_the_run_already_has_is_step_exists_and_the_checkpoint_is_unchanged(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src)
    run = tmp_path / "run"
    model, opt, sched, loader = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={"epoch": 0})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.save(state, 20)
    manifest = (run / "step-000000000020" / "manifest.json").read_bytes()
    with sg.Checkpointer(run, handle_signals=False) as ck:  # a later process; restore not called
        with pytest.raises(sg.StepExistsError):
            ck.adopt(src, state, step=20, mapping=TUTORIAL_MAPPING)
    assert (run / "step-000000000020" / "manifest.json").read_bytes() == manifest
    r = subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(run)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_adopt_at_the_step_restore_just_returned_is_step_exists_not_a_silent_no_op(
    tmp_path: Path,
) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src)
    run = tmp_path / "run"
    model, opt, sched, loader = _objects()
    extras = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.save(state, 20)
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(state) == 20
        with pytest.raises(sg.StepExistsError):
            ck.adopt(
                src, state, step=20, mapping=TUTORIAL_MAPPING
            )  # returns step-…20 unchanged today


def test_adopt_into_a_run_with_checkpoints_below_the_newest_keeps_the_newest_for_restarts(
    tmp_path: Path,
) -> None:
    """An adopt at a step below the run's newest is saved, and a restart resumes the newest
    (retention and restore rank by step, as docs/resume.md "Limits" says of rollbacks)."""
    src = tmp_path / "checkpoint.pth.tar"
    _imagenet_tutorial_file(src)
    run = tmp_path / "run"
    model, opt, sched, loader = _objects()
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={"epoch": 0})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.save(state, 50)
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.adopt(src, state, step=20, mapping=TUTORIAL_MAPPING)
    assert _checkpoint_names(run) == ["step-000000000020", "step-000000000050"]
    ex: dict = {}
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=_net(), extras=ex), only=["extras"]) == 50
    assert ex == {"epoch": 0}


# ---- adopt: Lightning and Hugging Face files written by the real tools ---------------------------


def _make(kind: str, out: Path) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONWARNINGS="ignore",
    )
    r = subprocess.run(
        [sys.executable, str(HELPERS / "make_foreign.py"), kind, str(out)],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_a_lightning_ckpt_from_a_real_trainer_adopts_into_the_module_and_resumes(
    tmp_path: Path,
) -> None:
    src = tmp_path / "last.ckpt"
    _make("lightning", src)
    ref = torch.load(src, weights_only=False)  # our own file: the reference values

    class Plain(torch.nn.Module):  # the LightningModule's own attribute layout: keys net.*
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

    model = Plain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    extras: dict = {}
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras)
    run = tmp_path / "run"
    with sg.Checkpointer(run, handle_signals=False) as ck:
        path = ck.adopt(
            src,
            state,
            step=ref["global_step"],
            mapping={
                "model": "state_dict",
                "optimizer": "optimizer_states/0",
                "scheduler": "lr_schedulers/0",
                "extras/epoch": "epoch",
            },
        )
    assert path.name == "step-000000000006"
    for k, v in ref["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert sched.last_epoch == ref["lr_schedulers"][0]["last_epoch"]
    assert [g["lr"] for g in opt.param_groups] == [
        g["lr"] for g in ref["optimizer_states"][0]["param_groups"]
    ]
    assert extras == {"epoch": ref["epoch"]}
    m2 = Plain()
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert (
            ck.restore(
                sg.TrainState(
                    model=m2,
                    optimizer=o2,
                    scheduler=torch.optim.lr_scheduler.StepLR(o2, 2, 0.5),
                    extras={},
                )
            )
            == 6
        )
    for pid, s in o2.state_dict()["state"].items():
        assert torch.equal(
            s["momentum_buffer"], ref["optimizer_states"][0]["state"][pid]["momentum_buffer"]
        )
    # convert --to savegame takes global_step (6) over epoch as the step
    dst = tmp_path / "converted"
    r = subprocess.run(
        [sys.executable, "-m", "savegame", "convert", str(src), str(dst), "--to", "savegame"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    with sg.open(dst) as rd:
        assert rd.keys()
    import json

    assert json.loads((dst / "manifest.json").read_text())["step"] == ref["global_step"] == 6


@pytest.mark.slow
def test_an_hf_trainer_checkpoint_folder_adopts_file_by_file_into_one_step(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    _make("hf", out)
    folder = out / "checkpoint-4"
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    } <= {p.name for p in folder.iterdir()}
    sys.path.insert(0, str(HELPERS))
    try:
        from make_foreign import HFData, HFNet, hf_args
    finally:
        sys.path.remove(str(HELPERS))
    from transformers import Trainer

    model = HFNet()
    trainer = Trainer(model=model, args=hf_args(str(tmp_path / "hf2")), train_dataset=HFData())
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    opt = getattr(opt, "optimizer", opt)
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched)
    ref_opt = torch.load(folder / "optimizer.pt", weights_only=True)
    run = tmp_path / "run"
    with sg.Checkpointer(run, handle_signals=False) as ck:
        with pytest.raises(
            sg.errors.UnsafeContentError
        ) as ei:  # numpy RNG state is a pickled ndarray
            ck.adopt(
                folder / "rng_state.pth",
                sg.TrainState(model=model, extras={}),  # a destination it has: the file decides
                step=4,
                mapping={"extras/rng": ""},
            )
        assert "numpy" in str(ei.value)
        ck.adopt(folder / "model.safetensors", state, step=4, mapping={"model": ""})
        try:
            ck.adopt(folder / "optimizer.pt", state, step=4, mapping={"optimizer": ""})
            ck.adopt(folder / "scheduler.pt", state, step=4, mapping={"scheduler": ""})
        except sg.StepExistsError:
            return  # refused rather than dropped: acceptable
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt["param_groups"]]
    m2 = HFNet()
    t2 = Trainer(model=m2, args=hf_args(str(tmp_path / "hf3")), train_dataset=HFData())
    t2.create_optimizer_and_scheduler(num_training_steps=8)
    o2 = getattr(t2.optimizer, "optimizer", t2.optimizer)
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2, scheduler=t2.lr_scheduler)) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    assert t2.lr_scheduler.last_epoch == sched.last_epoch == 4
    for pid, s in o2.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], ref_opt["state"][pid]["exp_avg"])


@pytest.mark.slow
def test_an_hf_trainer_checkpoint_folder_adopts_whole_in_one_call(tmp_path: Path) -> None:
    """The folder is the source; each path's first part names its file (docs/resume.md)."""
    out = tmp_path / "hf"
    _make("hf", out)
    folder = out / "checkpoint-4"
    sys.path.insert(0, str(HELPERS))
    try:
        from make_foreign import HFData, HFNet, hf_args
    finally:
        sys.path.remove(str(HELPERS))
    from transformers import Trainer

    def objects(tag: str):
        model = HFNet()
        trainer = Trainer(model=model, args=hf_args(str(tmp_path / tag)), train_dataset=HFData())
        trainer.create_optimizer_and_scheduler(num_training_steps=8)
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        return model, opt, trainer.lr_scheduler

    model, opt, sched = objects("hf2")
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched)
    ref_opt = torch.load(folder / "optimizer.pt", weights_only=True)
    run = tmp_path / "run"
    mapping = {
        "model": "model.safetensors",
        "optimizer": "optimizer.pt",
        "scheduler": "scheduler.pt",
    }
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.adopt(folder, state, step=4, mapping=mapping)
        with pytest.raises(sg.StepExistsError, match="adopt commits a step per call"):
            ck.adopt(folder, state, step=4, mapping=mapping)
    m2, o2, s2 = objects("hf3")
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=o2, scheduler=s2)) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    assert s2.last_epoch == sched.last_epoch == 4
    for pid, s in o2.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], ref_opt["state"][pid]["exp_avg"])


def test_a_folder_source_path_cannot_leave_the_folder(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    model, opt, sched, _ = _objects()
    torch.save(model.state_dict(), tmp_path / "outside.pt")
    torch.save(model.state_dict(), src / "model.pt")
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        with pytest.raises(sg.CheckpointError):
            ck.adopt(src, state, step=1, mapping={"model": "../outside.pt"})
        ck.adopt(src, state, step=1, mapping={"model": "model.pt"})
        assert [i.step for i in ck.list()] == [1]


# ---- savegame convert --to savegame, then start_from ------------------------------------------


@pytest.mark.slow  # CI under 20 minutes; runs with -m slow
def test_convert_the_tutorial_file_then_start_from_it_and_resume_exactly(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint.pth.tar"
    blob = _imagenet_tutorial_file(src)
    dst = tmp_path / "converted"
    r = subprocess.run(
        [sys.executable, "-m", "savegame", "convert", str(src), str(dst), "--to", "savegame"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    dst_files = {p.name: p.read_bytes() for p in dst.iterdir()}
    run = tmp_path / "run"

    def objects(seed: int):
        model, opt, sched, loader = _objects(seed)
        extras: dict = {}
        # the converted tree keeps the file's own names: state_dict, optimizer, scheduler, ...
        state = sg.TrainState(
            state_dict=model, optimizer=opt, scheduler=sched, loader=loader, extras=extras
        )
        return model, opt, sched, loader, state

    model, opt, sched, loader, state = objects(0)
    with sg.Checkpointer(run, start_from=dst, save=sg.Every(steps=2), handle_signals=False) as ck:
        step = ck.restore(state, skip=["epoch", "arch", "best_acc1", "loader", "extras"])
        assert step == 2  # the file's epoch
        for a, b in zip(model.state_dict().values(), blob["state_dict"].values(), strict=True):
            assert torch.equal(a, b)
        assert sched.last_epoch == 2
        _train(model, opt, sched, loader, ck, step, 7, state)
        ck.save(state, 7)
    final = _snapshot(model, opt, sched)
    assert _checkpoint_names(run)[0] == "step-000000000004"
    m2, o2, s2, l2, st2 = objects(1)
    with sg.Checkpointer(run, start_from=dst, handle_signals=False) as ck:
        assert ck.restore(st2, step=4) == 4
    _train(m2, o2, s2, l2, None, 4, 7, st2)
    assert _same(_snapshot(m2, o2, s2), final)
    assert {
        p.name: p.read_bytes() for p in dst.iterdir()
    } == dst_files  # the source is never written


# ---- resuming with changes -------------------------------------------------------------------


def _saved_run(tmp_path: Path, *, steps: int = 3, batch_size: int = 4) -> tuple[Path, list[int]]:
    run = tmp_path / "run"
    model, opt, sched, loader = _objects(batch_size=batch_size)
    state = sg.TrainState(
        model=model, optimizer=opt, scheduler=sched, loader=loader, extras={"epoch": 0}
    )
    seen: list[int] = []
    with sg.Checkpointer(run, handle_signals=False) as ck:
        _train(model, opt, sched, loader, None, 0, steps, state, seen)
        ck.save(state, steps)
    return run, seen


def _epoch_order(batch_size: int = 4) -> list[int]:
    """The uninterrupted run's sample order over the first epoch."""
    model, opt, sched, loader = _objects(batch_size=batch_size)
    return [i for _, _, idx in loader for i in idx.tolist()]


def test_after_an_adopt_a_restart_with_half_the_batch_size_and_a_new_lr_continues_at_the_same_sample(
    tmp_path: Path,
) -> None:
    order = _epoch_order()
    run, seen = _saved_run(tmp_path)
    assert seen == order[:12]
    model, opt, sched, loader = _objects(seed=4, batch_size=2)
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(state) == 3
    assert [g["lr"] for g in opt.param_groups] == [0.1]  # the checkpoint's rate comes back
    factor = 0.01 / sched.base_lrs[0]
    sched.base_lrs = [b * factor for b in sched.base_lrs]
    for g in opt.param_groups:
        g["lr"] *= factor
        g["initial_lr"] *= factor
    got: list[int] = []
    _train(model, opt, sched, loader, None, 3, 6, state, got)
    assert got == order[12:18]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_restart_with_more_workers_at_the_same_sample(tmp_path: Path) -> None:
    order = _epoch_order()
    run, _ = _saved_run(tmp_path)
    model, opt, sched, loader = _objects(seed=4, num_workers=2)
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(state) == 3
    got: list[int] = []
    _train(model, opt, sched, loader, None, 3, 5, state, got)
    assert got == order[12:20]


def _unchanged(run: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(run)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert _checkpoint_names(run) == ["step-000000000003"]


def _two_group_state(seed: int = 4):
    model, _, _, loader = _objects(seed=seed)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
    )
    return model, opt, sg.TrainState(model=model, optimizer=opt, loader=loader, extras={})


def test_a_new_param_group_or_a_frozen_layer_is_refused_strictly_and_reported_with_strict_false(
    tmp_path: Path,
) -> None:
    run, _ = _saved_run(tmp_path)
    # a new parameter group (the head at its own rate)
    model, opt, state = _two_group_state()
    with sg.Checkpointer(run, handle_signals=False) as ck:
        with pytest.raises(sg.RestoreError) as ei:
            ck.restore(state, skip=["scheduler"])
        assert "group" in str(ei.value) and ei.value.key == "optimizer"
    model, opt, state = _two_group_state()
    with sg.Checkpointer(run, handle_signals=False) as ck:
        assert ck.restore(state, skip=["scheduler"], strict=False) == 3
        assert "optimizer" in ck.last_restore.mismatched and "model" in ck.last_restore.restored
    assert opt.param_groups[1]["lr"] == 0.01 and opt.state_dict()["state"] == {}
    # a frozen first layer, the optimizer over what still trains
    model, _, _, loader = _objects(seed=4)
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        with pytest.raises(sg.RestoreError) as ei:
            ck.restore(state, skip=["scheduler"])
        assert "optimizer" in str(ei.value)
        assert ck.restore(state, skip=["scheduler"], strict=False) == 3
        assert "optimizer" in ck.last_restore.mismatched and "model" in ck.last_restore.restored
    _unchanged(run)


def test_a_strict_restore_refused_by_the_optimizer_leaves_the_model_as_it_was(
    tmp_path: Path,
) -> None:
    """docs/resume.md: strict restore of a checkpoint that does not fit raises RestoreError and
    "every object, the ones before it included, is as it was" (savegame can tell beforehand:
    strict=False reports the same optimizer as mismatched without touching it)."""
    run, _ = _saved_run(tmp_path)
    model, opt, state = _two_group_state()
    before = [t.clone() for t in model.state_dict().values()]
    with sg.Checkpointer(run, handle_signals=False) as ck:
        with pytest.raises(sg.RestoreError):
            ck.restore(state, skip=["scheduler"])
    assert all(
        torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True)
    ), "RestoreError, yet the model now holds the checkpoint's weights"


def test_a_changed_shape_or_renamed_layer_is_a_restore_error_naming_it_and_the_run_is_unharmed(
    tmp_path: Path,
) -> None:
    run, _ = _saved_run(tmp_path)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    renamed = torch.nn.Sequential()
    renamed.add_module("fc1", torch.nn.Linear(4, 8))
    renamed.add_module("act", torch.nn.ReLU())
    renamed.add_module("fc2", torch.nn.Linear(8, 2))
    for model, word in ((wider, "size mismatch"), (renamed, "fc1.weight")):
        before = [t.clone() for t in model.state_dict().values()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        ex = {"epoch": -1}
        state = sg.TrainState(
            model=model,
            optimizer=opt,
            scheduler=torch.optim.lr_scheduler.StepLR(opt, 30, 0.1),
            loader=StatefulDataLoader(_Indexed(), batch_size=4, shuffle=True),
            extras=ex,
        )
        with sg.Checkpointer(run, handle_signals=False) as ck:
            with pytest.raises(sg.RestoreError) as ei:
                ck.restore(state)
        assert word in str(ei.value)
        assert all(
            torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True)
        )
        assert ex == {"epoch": -1}
    _unchanged(run)


def test_a_different_optimizer_class_is_a_restore_error(tmp_path: Path) -> None:
    run, _ = _saved_run(tmp_path)
    model, _, _, loader = _objects(seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        with pytest.raises(sg.RestoreError) as ei:
            ck.restore(state, skip=["scheduler"])
        assert ei.value.key == "optimizer" or "optimizer" in str(ei.value)
    _unchanged(run)


def test_an_optimizer_of_another_class_is_left_as_it_was_when_refused(tmp_path: Path) -> None:
    """SGD saved, Adam now. docs/resume.md: strict=False "restores every part that fits and
    leaves every other one as it was". Here Adam.load_state_dict raises (KeyError 'step') after
    taking SGD's param groups, so the live Adam has no 'betas' and its next step() raises
    KeyError; the user's retry with skip=["optimizer"] trains with a broken optimizer."""
    run, _ = _saved_run(tmp_path)
    model, _, _, loader = _objects(seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = sg.TrainState(model=model, optimizer=opt, loader=loader, extras={})
    with sg.Checkpointer(run, handle_signals=False) as ck:
        try:
            ck.restore(state, skip=["scheduler"], strict=False)
        except sg.RestoreError:
            pass
        ck.restore(state, skip=["scheduler", "optimizer"])
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ] == groups_before
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # KeyError: 'betas' today
