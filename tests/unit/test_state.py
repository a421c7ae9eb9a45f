from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from savegame import errors
from savegame import state as statelib
from savegame.state import TrainState


def test_plain_dataloader_gets_the_stateful_dataloader_hint() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4)), batch_size=2)
    with pytest.raises(TypeError, match="StatefulDataLoader"):
        TrainState(loader=loader)


def test_non_stateful_object_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"TrainState\(thing=...\).*int"):
        TrainState(thing=3)  # type: ignore[arg-type]


def test_rng_name_is_reserved() -> None:
    with pytest.raises(TypeError, match="reserved"):
        TrainState(rng={})  # type: ignore[arg-type]


def test_capture_includes_objects_extras_and_rng() -> None:
    model = torch.nn.Linear(2, 2)
    extras = {"epoch": 3}
    tree = statelib.capture(TrainState(model=model, extras=extras))
    assert set(tree) == {"model", "extras", "rng"}
    assert tree["extras"] == {"epoch": 3} and tree["extras"] is not extras
    assert set(statelib.capture(TrainState(rng=False, model=model))) == {"model"}


def test_apply_restores_objects_and_updates_extras_in_place() -> None:
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    extras: dict[str, Any] = {"epoch": 0, "stale": 1}
    tree = statelib.capture(TrainState(model=src, extras={"epoch": 7}))
    statelib.apply(TrainState(model=dst, extras=extras), tree)
    assert torch.equal(dst.weight, src.weight)
    assert extras == {"epoch": 7}


def test_apply_with_different_object_names_is_restore_error_and_changes_nothing() -> None:
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = dst.weight.detach().clone()
    tree = statelib.capture(TrainState(model=src, extras={}))
    with pytest.raises(
        errors.RestoreError, match=r"missing \['net'\].*unexpected \['model'\]"
    ) as info:
        statelib.apply(TrainState(net=dst, extras={}), tree, where="ckpt-7")
    assert info.value.path == "ckpt-7"
    assert torch.equal(dst.weight, before)


def test_apply_translates_load_state_dict_failure_to_restore_error() -> None:
    # An object that refuses its state, which savegame cannot check beforehand
    class Picky:
        def state_dict(self) -> dict:
            return {"v": 1}

        def load_state_dict(self, sd: dict) -> None:
            raise ValueError("not mine")

    tree = statelib.capture(TrainState(obj=Picky()))
    with pytest.raises(errors.RestoreError, match="obj.load_state_dict") as info:
        statelib.apply(TrainState(obj=Picky()), tree)
    assert info.value.key == "obj"
    assert isinstance(info.value.__cause__, ValueError)


def test_apply_refuses_an_optimizer_over_other_parameters_before_anything_is_loaded() -> None:
    m2, m3 = (
        torch.nn.Linear(2, 2),
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)),
    )
    src = torch.nn.Linear(2, 2)
    tree = statelib.capture(TrainState(model=src, opt=torch.optim.SGD(m2.parameters(), lr=0.1)))
    dst = torch.nn.Linear(2, 2)
    before = dst.weight.detach().clone()
    with pytest.raises(errors.RestoreError, match="group 0 has 2 parameters") as info:
        statelib.apply(TrainState(model=dst, opt=torch.optim.SGD(m3.parameters(), lr=0.1)), tree)
    assert info.value.key == "opt"
    assert torch.equal(dst.weight, before)  # the model before it: as it was


def test_a_module_that_does_not_fit_is_refused_before_anything_is_loaded() -> None:
    # torch's strict load_state_dict copies the keys that fit before it raises: checked first,
    # every object of the state, so a refused restore leaves all of them as they were.
    saved = TrainState(extras={"epoch": 3}, model=torch.nn.Linear(2, 2))
    tree = statelib.capture(saved)
    live = TrainState(extras={"epoch": 0}, model=torch.nn.Linear(3, 3))
    before = live["model"].weight.detach().clone()
    with pytest.raises(errors.RestoreError, match="model.load_state_dict.*size mismatch") as info:
        statelib.apply(live, tree)
    assert info.value.key == "model"
    assert live["extras"] == {"epoch": 0} and torch.equal(live["model"].weight, before)


# ---- loaders (savegame.state.loader) -------------------------------------------------------

_SEEN_INIT: list[int] = []


def _user_init(worker_id: int) -> None:
    _SEEN_INIT.append(worker_id)  # in the worker: its dataset reads it back


class _WorkerProbe(torch.utils.data.Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        import os

        return torch.tensor([i, os.getpid(), len(_SEEN_INIT)])


def _stateful_loader(**kw: Any) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(_WorkerProbe(), batch_size=2, **kw)


def test_loader_workers_run_the_users_init_and_pickle_for_spawn() -> None:
    import pickle

    loader = _stateful_loader(num_workers=2, worker_init_fn=_user_init)
    TrainState(loader=loader)
    assert loader.worker_init_fn.__wrapped__ is _user_init
    TrainState(loader=loader)  # idempotent: not wrapped twice
    assert loader.worker_init_fn.__wrapped__ is _user_init
    assert pickle.loads(pickle.dumps(loader.worker_init_fn)).__wrapped__ is _user_init
    batch = next(iter(loader))
    assert batch[:, 2].tolist() == [1, 1]  # the user's init ran once in that worker


def test_loader_workers_ignore_group_signals_from_others_but_exit_when_their_loader_terminates_them() -> (
    None
):
    import os
    import signal
    import subprocess
    import time

    loader = _stateful_loader(num_workers=2, persistent_workers=True)
    TrainState(loader=loader)
    it = iter(loader)
    next(it)
    workers = it._workers
    for signame in ("TERM", "USR1", "INT"):  # sent by another process, like a scheduler's kill
        for w in workers:
            subprocess.run(["kill", f"-{signame}", str(w.pid)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    assert len([b for b in it]) == 31  # the epoch completes
    os.kill(workers[0].pid, signal.SIGTERM)  # from the loader's own process: Process.terminate()
    workers[0].join(timeout=10)
    assert workers[0].exitcode == 0
    del it, loader


def test_trainstate_warns_about_loader_workers_started_before_it() -> None:
    loader = _stateful_loader(num_workers=2, persistent_workers=True)
    it = iter(loader)
    next(it)
    with pytest.warns(
        UserWarning,
        match=r"TrainState\(loader=...\): .*already runs 2 worker.*persistent_workers=True.*before iterating",
    ):
        TrainState(loader=loader)


def test_capture_records_the_sampler_epoch_and_apply_restores_it_without_passing_it_on() -> None:
    from torch.utils.data import DistributedSampler

    from savegame.state import loader as loaderlib

    def make() -> tuple[Any, Any]:
        sampler = DistributedSampler(_WorkerProbe(), num_replicas=2, rank=1)
        return _stateful_loader(sampler=sampler), sampler

    loader, sampler = make()
    sampler.set_epoch(4)
    it = iter(loader)
    next(it)
    tree = statelib.capture(TrainState(loader=loader, rng=False))
    assert tree["loader"][loaderlib.SAMPLER_EPOCH_KEY] == 4
    loader2, sampler2 = make()
    statelib.apply(TrainState(loader=loader2, rng=False), tree)
    assert sampler2.epoch == 4
    assert loaderlib.SAMPLER_EPOCH_KEY not in loader2.next_iter_state
    assert torch.equal(next(iter(loader2)), next(it))


def test_damaged_rng_snapshot_is_restore_error_and_nothing_is_touched() -> None:
    import random

    model = torch.nn.Linear(2, 2)
    state = TrainState(model=model, extras={"epoch": 3})
    tree = statelib.capture(state)
    tree["model"] = {k: torch.zeros_like(v) for k, v in tree["model"].items()}
    tree["extras"] = {"epoch": 9}
    tree["rng"]["python"] = (3, ("x",) * 625, None)  # an edited (re-signed) snapshot
    before = {k: v.clone() for k, v in model.state_dict().items()}
    py_state = random.getstate()
    with pytest.raises(errors.RestoreError, match="random-generator state is damaged") as info:
        statelib.apply(state, tree, where="ckpt")
    assert info.value.key == "rng"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert state["extras"] == {"epoch": 3}
    assert random.getstate() == py_state


def test_host_bytes_counts_modules_optimizers_and_dict_tensors_once_each() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one storage
    bn = torch.nn.BatchNorm1d(3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.arange(3)).sum().backward()
    opt.step()
    extras = {"w": torch.zeros(5, dtype=torch.float64), "epoch": 3, "note": "x"}
    state = statelib.TrainState(model=model, bn=bn, optimizer=opt, extras=extras)
    params = 10 * 4 * 4
    bn_bytes = 3 * 4 * 4 + 8  # weight, bias, running mean/var, num_batches_tracked (int64)
    adam = 2 * params + 4  # exp_avg, exp_avg_sq, step (a float32 scalar)
    assert statelib.host_bytes(state) == params + bn_bytes + adam + 5 * 8
    assert statelib.host_bytes(statelib.TrainState(extras={"epoch": 1})) == 0
