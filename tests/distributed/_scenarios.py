"""Ranks for the "written once by content", wrapper and save-failure scenarios (issue 9, items
3, 4, 6); started by ``_launch.launch(..., worker=SCENARIOS)`` like ``_worker.py``.

Usage: python _scenarios.py <scenario> <json-args> <world>. Findings go under args["out"].
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _worker import destroying_after, fork_ranks

import savegame as sg
from savegame.distributed import protocol
from savegame.engine import writer

FEATURES = 8


def build_bn(
    world: int, *, ddp: bool, broadcast_buffers: bool
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, broadcast_buffers=broadcast_buffers
        )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(6, FEATURES)  # per-rank RNG: each rank normalises its own batches
    y = torch.randint(0, 3, (6,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def dump(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    inner = model.module if hasattr(model, "module") else model
    state = {f"model/{k}": v.detach().clone() for k, v in inner.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            state[f"optimizer/{idx}/{name}"] = v.detach().clone()
    state["rng/torch"] = torch.get_rng_state()
    torch.save(state, path)


class Flaky:
    """A Stateful whose ``state_dict()`` raises while armed (on the failing rank)."""

    armed = False

    def state_dict(self) -> dict[str, Any]:
        if self.armed:
            raise RuntimeError("state_dict of the flaky object failed (injected)")
        return {"n": 1}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pg = world > 1 or bool(args.get("force_pg"))
    if pg:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.environ['SG_TEST_STORE']}",
            rank=int(os.environ.get("RANK", "0")),
            world_size=world,
            timeout=timedelta(seconds=60),
        )
    rank = dist.get_rank() if pg else 0
    out = Path(args["out"])
    if args.get("old_format"):  # save the way savegame did before it unwrapped DDP
        protocol.unwrapped = lambda state: state  # type: ignore[assignment]
    model, opt = build_bn(
        world, ddp=pg, broadcast_buffers=bool(args.get("broadcast_buffers", True))
    )
    torch.manual_seed(1000 + rank)  # after build(): per-rank batches and RNG streams
    extras: dict[str, Any] = {"epoch": 0}
    objects: dict[str, Any] = {"model": model, "optimizer": opt, "extras": extras}
    flaky = Flaky()
    if scenario == "capture_fail" and args["mode"] == "state_dict":
        objects["flaky"] = flaky
    state = sg.TrainState(**objects)
    ckpt = sg.Checkpointer(
        args["root"],
        save=sg.Every(steps=args.get("every", 1000)),
        keep=sg.Keep(last=10),
        handle_signals=False,
        async_save=bool(args.get("async_save")),
    )
    if scenario == "bn":
        step = ckpt.restore(state)
        if step != args.get("expect_start", step):
            raise SystemExit(f"rank {rank}: restored step {step}, expected {args['expect_start']}")
        for s in range(step, args["steps"]):
            train_step(model, opt)
            extras["epoch"] = s // 2
            ckpt.step(state, s + 1)
        dump(model, opt, out / f"final-{args['tag']}-{rank}.pt")
        if args.get("hard_exit"):
            ckpt.wait()
            os._exit(0)  # every rank dies without close(): like a kill of the whole job
        ckpt.close()
    elif scenario == "capture_fail":
        # Save 1 works; save 2 fails while rank bad_rank captures its state; saves 3 and 4 work.
        report: dict[str, Any] = {}
        train_step(model, opt)
        ckpt.save(state, 1)
        train_step(model, opt)
        if rank == args["bad_rank"]:
            if args["mode"] == "state_dict":
                flaky.armed = True
            else:
                extras["handle"] = object()  # an unsupported leaf: EncodeError
        t0 = time.monotonic()
        try:
            if args.get("async_save"):  # the scheduled (background) path: step() with every=2
                ckpt.step(state, 2)
                ckpt.wait()
            else:
                ckpt.save(state, 2)
            report["error"] = None
        except sg.DistributedSaveError as exc:
            report.update(
                error=type(exc).__name__,
                failures={str(k): v for k, v in exc.failures.items()},
                message=str(exc),
                cause=type(exc.__cause__).__name__ if exc.__cause__ else None,
            )
        except Exception as exc:  # noqa: BLE001 - the raw error escaping is what is tested
            report.update(error=type(exc).__name__, message=str(exc))
        report["seconds"] = time.monotonic() - t0
        flaky.armed = False
        extras.pop("handle", None)
        (out / f"report-{rank}.json").write_text(json.dumps(report))
        train_step(model, opt)
        ckpt.save(state, 3)  # the ranks are still in step: the next saves work
        train_step(model, opt)
        ckpt.step(state, 4)
        ckpt.close()
    elif scenario == "die_after_report":
        # Rank bad_rank reports success for step 2, then dies while rank 0 commits.
        report = {}
        train_step(model, opt)
        ckpt.save(state, 1)
        train_step(model, opt)
        group = ckpt._save_group
        assert group is not None
        if rank == args["bad_rank"]:
            real_gather = group.gather_to_root  # the save's report to the coordinator

            def gather_then_die(obj: Any, *, what: str) -> list[Any] | None:
                real_gather(obj, what=what)
                os._exit(7)

            group.gather_to_root = gather_then_die  # type: ignore[method-assign]
        if rank == 0:
            real_commit = writer.commit

            def slow_commit(*a: Any, **kw: Any) -> Path:
                time.sleep(1.5)  # the dead rank's sockets are closed by the time we broadcast
                return real_commit(*a, **kw)

            writer.commit = slow_commit  # type: ignore[assignment]
        try:
            ckpt.save(state, 2)
            report["error"] = None
        except sg.DistributedSaveError as exc:
            report.update(
                error=type(exc).__name__,
                failures={str(k): v for k, v in exc.failures.items()},
                message=str(exc),
            )
        (out / f"report-{rank}.json").write_text(json.dumps(report))
        os._exit(0)  # the job is broken (a rank is dead); torchrun would restart it


if __name__ == "__main__":
    fork_ranks(int(sys.argv[3]), destroying_after(main))
