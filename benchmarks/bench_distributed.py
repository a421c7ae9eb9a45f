"""Distributed save/restore: savegame vs torch.distributed.checkpoint (DCP), same state, same run.

For 1, 2 and 4 processes (gloo on CPU, loopback) each rank holds an FSDP2-sharded model of
``--mb`` MB in total (float32). Per world size and per library, in the same processes:

* save: wall time of a blocking save (barrier before, the call returns on every rank after the
  commit), aggregate throughput = checkpoint bytes / time;
* restore: wall time of loading it back into the live sharded model;
* coordination: save time of a tiny (4 KB) state — what is left is the protocol's overhead.

The best of ``--reps`` repetitions is reported (both libraries read from the page cache; the
machine cannot drop it). Writes a markdown table with ratios to the ``distributed`` section of
docs/benchmarks.md.

    python benchmarks/bench_distributed.py --mb 128 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    import savegame as sg

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(args.root)

    def build(mb: float) -> torch.nn.Module:
        torch.manual_seed(0)
        width = 1024
        rows = max(1, int(mb * 2**20 / 4 / width / 4))
        model = torch.nn.Sequential(*[torch.nn.Linear(width, rows, bias=False) for _ in range(4)])
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        return model

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    results: dict[str, float] = {}
    for label, mb in (("big", args.mb), ("tiny", 4 / 1024)):
        model = build(mb)
        state = sg.TrainState(model=model, rng=False)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        results[f"{label}_bytes"] = float(nbytes)
        ckpt = sg.Checkpointer(root / f"sg-{label}", keep=sg.Keep(last=1000), handle_signals=False)
        sg_save, sg_load, dcp_save, dcp_load = [], [], [], []
        for rep in range(args.reps):
            sg_save.append(timed(lambda c=ckpt, st=state, rep=rep: c.save(st, rep + 1)))
            sg_load.append(timed(lambda c=ckpt, st=state, rep=rep: c.restore(st, step=rep + 1)))
            path = root / f"dcp-{label}-{rep}"
            sd = model.state_dict()
            dcp_save.append(timed(lambda path=path, sd=sd: dcp.save(sd, checkpoint_id=str(path))))
            sd = model.state_dict()
            dcp_load.append(timed(lambda path=path, sd=sd: dcp.load(sd, checkpoint_id=str(path))))
        ckpt.close()
        results.update(
            {
                f"{label}_sg_save": min(sg_save),
                f"{label}_sg_load": min(sg_load),
                f"{label}_dcp_save": min(dcp_save),
                f"{label}_dcp_load": min(dcp_load),
            }
        )
    if rank == 0:
        results["world"] = world
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


def launch(world: int, mb: float, reps: int, root: Path, out: Path) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), PYTHONWARNINGS="ignore")  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", "--mb", str(mb), "--reps", str(reps),
               "--root", str(root), "--out", str(out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=900) != 0:
            raise SystemExit(f"world {world}: a rank failed")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=128.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--root")
    ap.add_argument("--out")
    ap.add_argument("--no-doc", action="store_true", help="print the table, leave docs/ alone")
    ap.add_argument("--notes", default="", help="markdown appended under the table")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        base = Path(tempfile.mkdtemp(prefix=f"bench-dist-{world}-"))
        try:
            r = launch(world, args.mb, args.reps, base / "ckpt", base / "result.json")
        finally:
            shutil.rmtree(base, ignore_errors=True)
        rows.append(r)
        print(json.dumps(r))
    gb = 1e9
    lines = [
        "<!-- distributed:begin -->",
        "### Distributed save and restore: savegame vs torch.distributed.checkpoint (CPU, gloo)",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine {platform.machine()} "
        f"{os.cpu_count()} CPU cores, {platform.platform()}; torch {torch.__version__}; gloo on loopback; "
        f"FSDP2-sharded float32 model of {args.mb:g} MB in total; best of {args.reps}; same processes, "
        "same state, same file system, alternating savegame and DCP in each repetition. Both read from "
        "the page cache on restore. Ratio = savegame time / DCP time (< 1: savegame faster).",
        "",
        f"Command: `python benchmarks/bench_distributed.py --mb {args.mb:g} --reps {args.reps} --worlds {args.worlds}`",
        "",
        "| ranks | savegame save s (GB/s) | DCP save s (GB/s) | save ratio | savegame restore s | DCP restore s | restore ratio | coordination: savegame / DCP save of 4 KB, ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["big_bytes"]
        lines.append(
            f"| {int(r['world'])} | {r['big_sg_save']:.3f} ({b / r['big_sg_save'] / gb:.2f}) "
            f"| {r['big_dcp_save']:.3f} ({b / r['big_dcp_save'] / gb:.2f}) | {r['big_sg_save'] / r['big_dcp_save']:.2f} "
            f"| {r['big_sg_load']:.3f} | {r['big_dcp_load']:.3f} | {r['big_sg_load'] / r['big_dcp_load']:.2f} "
            f"| {r['tiny_sg_save'] * 1e3:.1f} / {r['tiny_dcp_save'] * 1e3:.1f} |"
        )
    lines += [
        "",
        "savegame's save includes fsync of every file, the manifest and the folder, and per-tensor "
        "hashing; its restore verifies every hash of the chunks a rank reads. DCP fsyncs its files "
        "by default too, and verifies nothing.",
        "",
    ]
    if args.notes:
        lines += [args.notes, ""]
    lines.append("<!-- distributed:end -->")
    print("\n".join(lines))
    if not args.no_doc:
        from bench_async import replace_section  # the shared writer of docs/benchmarks.md sections

        replace_section("distributed", "\n".join(lines))


if __name__ == "__main__":
    main()
