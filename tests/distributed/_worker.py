"""One rank of a distributed test scenario; started by ``conftest.launch`` with RANK/WORLD_SIZE.

Usage: python _worker.py <scenario> <json-args>. Writes its findings under args["out"].
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

# FSDP2 and what its first call imports lazily (torch._dynamo, inductor) are imported here,
# before fork_ranks forks, so the ranks share one import instead of ~3 s each on a 2-core CI box.
import torch
import torch._dynamo  # noqa: F401
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import _init_optim_state  # noqa: F401
from torch.distributed.fsdp import fully_shard

import savegame as sg

FEATURES = 8


def build(kind: str, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # same initial weights on every rank
    # 13 output rows: does not divide by 2 or 4, so FSDP2 shards are uneven (one may be empty).
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 13),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(13, 3),
    )
    if kind == "ddp" and world > 1:
        # On more than 2 ranks DDP's bucket rebuild after the first iteration changes the
        # all-reduce summation order, so a resumed run (whose first iteration uses the initial
        # buckets) differs in the last bits; find_unused_parameters=True keeps the initial
        # buckets (docs/distributed.md, "Bit-exact DDP on more than 2 ranks").
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=world > 2)
    elif kind == "fsdp" and world > 1:
        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(5, FEATURES)  # drawn from the (per-rank, checkpointed) torch RNG
    y = torch.randint(0, 3, (5,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().clone()
    return out


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # A FileStore rendezvous: no TCP port to race for with other jobs on a shared CI box; the
        # default group's own operations are bounded too.
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.environ['SG_TEST_STORE']}",
            rank=int(os.environ["RANK"]),
            world_size=world,
            timeout=timedelta(seconds=60),
        )
    rank = dist.get_rank() if world > 1 else 0
    out = Path(args["out"])
    model, opt = build(args.get("kind", "ddp"), world)
    # After build() (which seeds 0 for equal initial weights): each rank draws its own batches
    # and dropout masks, so the RNG streams differ and are kept per rank.
    torch.manual_seed(1000 + rank)
    extras: dict[str, Any] = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    ckpt = sg.Checkpointer(
        args["root"],
        save=sg.Every(steps=args.get("every", 1000)),
        keep=sg.Keep(last=10),
        handle_signals=False,
        async_save=bool(args.get("async_save")),
    )
    if scenario == "train":
        step = ckpt.restore(state, per_rank=args.get("per_rank", "strict"))
        if step != args.get("expect_start", step):
            raise SystemExit(f"rank {rank}: restored step {step}, expected {args['expect_start']}")
        for s in range(step, args["steps"]):
            train_step(model, opt)
            extras["epoch"] = s // 2
            ckpt.step(state, s + 1)
        if args.get("save_at_end") is not None:
            ckpt.save(state, args["save_at_end"])
        params = full_params(model)
        if rank == 0:
            torch.save(params, out / f"params-{args['tag']}.pt")
        if args.get("hard_exit"):
            ckpt.wait()  # (async) the step-3 save is committed; then die without close()
            os._exit(0)  # all ranks die without close(): like a kill of the whole job
        ckpt.close()
    elif scenario == "failures":
        from savegame.engine import writer

        report: dict[str, Any] = {}
        train_step(model, opt)
        ckpt.save(state, 1)
        real = writer.write_rank_files

        def broken(tmp: Path, r: int, items: Any, **kw: Any) -> Any:
            if args["mode"] == "raise":
                raise OSError(28, "No space left on device (injected)")
            if args["mode"] == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable")

        if rank == args["bad_rank"]:
            writer.write_rank_files = broken  # type: ignore[assignment]
        train_step(model, opt)
        try:
            ckpt.save(state, 2)
            report["error"] = None
        except sg.DistributedSaveError as exc:
            report["error"] = type(exc).__name__
            report["failures"] = {str(k): v for k, v in exc.failures.items()}
            report["message"] = str(exc)
        writer.write_rank_files = real  # type: ignore[assignment]
        (out / f"report-{rank}.json").write_text(json.dumps(report))
        if args["mode"] == "raise":  # every rank is alive: the next save must work
            ckpt.save(state, 3)
            ckpt.close()
        else:
            os._exit(0)  # the job is broken (a rank is dead); torchrun would restart it
    if world > 1:
        # DDP (its reducer) and the rest are freed while the process group still exists. Freed
        # after destroy_process_group, on main's return, a rank hung now and then in a C++
        # destructor: its dump showed no Python frame below `(entry or main)()` (stop 18).
        del state, model, opt, ckpt
        gc.collect()
        dist.destroy_process_group()


def destroying_after(entry: Any) -> Any:
    """``entry`` then ``destroy_process_group``, once everything ``entry`` built is freed: its
    locals (DDP's reducer among them) die when it returns. Freed after destroy_process_group, a
    rank hung now and then in a C++ destructor with no Python frame below main() (stops 18, 21)."""

    def run() -> None:
        entry()
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()

    return run


def fork_ranks(world: int, entry: Any = None) -> None:
    """Start ``world`` ranks by fork from this already-imported interpreter (importing torch
    once instead of once per rank: it dominates a launch on a 2-core CI machine) and print
    their exit codes as one JSON line. Nothing has started threads yet, so forking is safe."""
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            hang_dump = float(os.environ.get("SG_TEST_HANG_DUMP_S", "0") or 0)
            if hang_dump > 0:  # a rank that hangs says where, before the launcher kills it
                faulthandler.dump_traceback_later(hang_dump, exit=False)
            if world == 1:
                for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                    os.environ.pop(k)
            code = 0
            try:
                (entry or main)()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code not in (None, 0):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    print("EXIT-CODES " + json.dumps(codes), flush=True)


if __name__ == "__main__":
    fork_ranks(int(sys.argv[3]))
