"""Rank script of tests/test_outside_s19_dist_preempt.py: 2 forked ranks (gloo, CPU), two tiers.

argv: world, json args {url, cache, out, tag, total, pause, catch}. Every step saves into the
cache. ``catch``: a StorageError from step()/close() is recorded ("err N") and the loop goes on.
"""

import json
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import savegame as sg


def job(rank, world, a):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    state = sg.TrainState(model=model, optimizer=opt)
    retry = sg.UploadRetry(attempts=2, first_delay=0.05, max_delay=0.1)
    deadline = time.monotonic() + 30
    while True:  # a killed writer's lease expires after SAVEGAME_LEASE_SECONDS
        try:
            ckpt = sg.Checkpointer(
                a["url"],
                cache=a["cache"],
                save=sg.Every(steps=1),
                async_save=a.get("async", False),
                upload_retry=retry,
            )
            break
        except sg.LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    start = ckpt.restore(state)
    prog = os.open(f"{a['out']}/progress-{a['tag']}-{rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(prog, f"start {start}\n".encode())
    try:
        for step in range(start, a["total"]):
            loss = model(torch.randn(4, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            try:
                ckpt.step(state, step + 1)
            except sg.StorageError as exc:
                if not a["catch"]:
                    raise
                os.write(prog, f"err{step + 1}:{exc.step}\n".encode())
            os.write(prog, f"{step + 1}\n".encode())
            time.sleep(a["pause"])
        try:
            ckpt.close()
        except sg.StorageError as exc:
            if not a["catch"]:
                raise
            os.write(prog, f"closeerr:{exc.step}\n".encode())
    except SystemExit as exc:
        os.write(prog, f"exit {exc.code}\n".encode())
        raise
    os.write(prog, b"done\n")


def main():
    world, a = int(sys.argv[1]), json.loads(sys.argv[2])
    store = os.path.join(tempfile.mkdtemp(prefix="s19p-"), "store")
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                torch.set_num_threads(1)
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
                dist.init_process_group(
                    "gloo",
                    init_method=f"file://{store}",
                    rank=rank,
                    world_size=world,
                    timeout=timedelta(seconds=30),
                )
                job(rank, world, a)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    print("PIDS " + json.dumps(pids), flush=True)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    print("EXIT-CODES " + json.dumps(codes), flush=True)


if __name__ == "__main__":
    main()
