"""Ranks for tests/test_outside_s18_dist_refusals.py, started by tests/distributed/_launch.launch
(worker=this file). Phase "save" trains a small DDP or FSDP2 model 3 steps over a
DistributedSampler loader and saves steps 2 and 3, writing every rank's full state next to them.
Phase "try" runs a list of cases: each builds a (possibly changed) TrainState, trains one step so
every object differs from the checkpoint, snapshots it, calls restore() and reports what it
raised or returned and which parts changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _worker import fork_ranks  # noqa: E402

import savegame as sg  # noqa: E402


def build(spec: dict[str, Any], rank: int, world: int) -> tuple[sg.TrainState, dict[str, Any]]:
    mine = rank in spec.get("ranks", list(range(world)))
    model_kind = spec.get("model", "base") if mine else "base"
    opt_kind = spec.get("opt", "sgd") if mine else "sgd"
    torch.manual_seed(0)  # same weights on every rank
    hidden = 7 if model_kind == "resized" else 6
    if model_kind == "renamed":
        net: torch.nn.Module = torch.nn.Sequential(
            OrderedDict(fc1=torch.nn.Linear(4, 6), act=torch.nn.ReLU(), fc2=torch.nn.Linear(6, 2))
        )
    else:
        net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
        )
    if spec.get("kind", "ddp") == "fsdp":
        for layer in (net[0], net[2]):
            fully_shard(layer)
        fully_shard(net)
        model = net
    else:
        model = torch.nn.parallel.DistributedDataParallel(net)
    params = list(model.parameters())
    if opt_kind == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=0.01)
    elif opt_kind == "groups":
        opt = torch.optim.SGD(
            [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1, momentum=0.9
        )
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ds = TensorDataset(torch.arange(40, dtype=torch.float32).reshape(40, 1).repeat(1, 4))
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = StatefulDataLoader(ds, batch_size=2, sampler=sampler, num_workers=0)
    extras: dict[str, Any] = {"epoch": 0}
    objs: dict[str, Any] = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "loader": loader,
        "extras": extras,
    }
    if mine and spec.get("no_scheduler"):
        del objs["scheduler"]
    if mine and spec.get("rename_optimizer"):
        objs["opt"] = objs.pop("optimizer")
    if mine and spec.get("extra_object"):
        objs["ema"] = {"decay": torch.tensor([0.5])}
    return sg.TrainState(**objs), {
        "model": model,
        "opt": opt,
        "sched": sched,
        "loader": loader,
        "extras": extras,
    }


def plain(x: Any) -> Any:
    if hasattr(x, "full_tensor"):
        return x.full_tensor().detach().clone()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    return x


def snapshot(o: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": plain(o["model"].state_dict()),
        "optimizer": plain(o["opt"].state_dict()),
        "scheduler": plain(o["sched"].state_dict()),
        "loader": plain(o["loader"].state_dict()),
        "epoch_of_sampler": o["loader"].sampler.epoch,
        "extras": plain(dict(o["extras"])),
        "rng": {
            "torch": torch.get_rng_state().clone(),
            "python": random.getstate(),
            "numpy": plain(list(np.random.get_state())),
        },
    }


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if ok else [path]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}{{keys}}"]
        return [p for k in a for p in diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}[len]"]
        return [
            p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in diff(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path]


def parts_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[str]]:
    return {k: diff(a[k], b[k], k)[:5] for k in a}


def train_one(o: dict[str, Any], it: Any) -> None:
    (x,) = next(it)
    loss = o["model"](x).square().mean() + torch.randn(()) * 0
    o["opt"].zero_grad()
    loss.backward()
    o["opt"].step()
    o["sched"].step()
    random.random()
    np.random.rand()


def main() -> None:
    args = json.loads(sys.argv[2])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.environ['SG_TEST_STORE']}",
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    rank = dist.get_rank()
    out = Path(args["out"])
    kind = args.get("kind", "ddp")
    if args["phase"] == "save":
        state, o = build({"kind": kind}, rank, world)
        torch.manual_seed(1000 + rank)
        random.seed(1000 + rank)
        np.random.seed(1000 + rank)
        it = iter(o["loader"])
        with sg.Checkpointer(args["root"], handle_signals=False) as ckpt:
            for s in (1, 2, 3):
                train_one(o, it)
                o["extras"]["epoch"] = s
                ckpt.save(state, s)
                if s >= 2:
                    torch.save(snapshot(o), out / f"saved-{s}-{rank}.pt")
        dist.destroy_process_group()
        return
    src = rank if (out / f"saved-3-{rank}.pt").exists() else 0  # a new rank: compare to rank 0
    saved = {s: torch.load(out / f"saved-{s}-{src}.pt", weights_only=False) for s in (2, 3)}
    report: dict[str, Any] = {}
    for case in args["cases"]:
        spec = {"kind": kind, **case.get("spec", {})}
        state, o = build(spec, rank, world)
        torch.manual_seed(500 + rank)
        random.seed(500 + rank)
        np.random.seed(500 + rank)
        it = iter(o["loader"])
        train_one(o, it)
        o["extras"]["epoch"] = 99
        before = snapshot(o)
        res: dict[str, Any] = {}
        kw = case.get("kw", {})
        with sg.Checkpointer(args["root"], handle_signals=False) as ckpt:
            try:
                import warnings

                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    res["step"] = ckpt.restore(state, **kw)
                res["warnings"] = [f"{x.category.__name__}: {x.message}" for x in w][:5]
                r = ckpt.last_restore
                res["report"] = (
                    None
                    if r is None
                    else json.loads(json.dumps(dataclasses.asdict(r), default=str))
                )
            except Exception as exc:  # noqa: BLE001
                res["raised"] = type(exc).__name__
                res["msg"] = str(exc)[:1500]
            after = snapshot(o)
            res["vs_before"] = parts_diff(after, before)
            res["vs_saved3"] = parts_diff(after, saved[3])
            res["vs_saved2"] = parts_diff(after, saved[2])
            then = case.get("then")
            if then is not None:  # a second restore into the same objects
                try:
                    res["then_step"] = ckpt.restore(state, **then)
                    r = ckpt.last_restore
                    res["then_report"] = (
                        None
                        if r is None
                        else json.loads(json.dumps(dataclasses.asdict(r), default=str))
                    )
                except Exception as exc:  # noqa: BLE001
                    res["then_raised"] = type(exc).__name__
                    res["then_msg"] = str(exc)[:1500]
                res["then_vs_saved3"] = parts_diff(snapshot(o), saved[3])
        report[case["name"]] = res
        (out / f"report-{args['tag']}-{rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    fork_ranks(int(sys.argv[3]), main)
