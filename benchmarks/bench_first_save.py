"""The stall of a process's *first* async save, against its later saves and the copy floors.

A training loop calls the checkpointer every step; every ``--every`` steps a save is due. Each
method runs in a fresh process (its first save is the one a user meets after every start or
restart), ``--repeats`` processes per method, interleaved:

  * ``savegame``             ``Checkpointer(async_save=True)``, ``step()`` every step: the first
                             step that does not save reserves the snapshot's memory
                             (``HostPool.reserve``) on a background thread;
  * ``savegame-no-reserve``  the same with the reserve switched off in that process (what every
                             first save cost before it);
  * ``dcp.async_save``       ``torch.distributed.checkpoint.async_save`` (gloo, world size 1),
                             called on the same steps.

Between saves each process does what training does to memory: every tensor changes in place,
then ``--step-s`` seconds pass (the compute of a step). A save's stall is the time until the
call returns; the save is then waited for outside the timing, so a later stall never includes
the previous save's write. Floors, in each process after its saves: one ``copy_`` of the state
into memory already touched (the best of 3), and into freshly allocated memory (its page faults
included).

    python benchmarks/bench_first_save.py --gb 1 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from bench_async import _live_tensors, replace_section
from bench_save_restore import build_state, quiet_memory, state_bytes

import savegame as sg
from savegame.engine import staging

ROOT = Path(__file__).resolve().parent.parent
SECTION = "first-save"
METHODS = ("savegame", "savegame-no-reserve", "dcp.async_save")


def child(method: str, gb: float, every: int, saves: int, step_s: float) -> dict[str, Any]:
    model, opt = build_state(gb)
    live = _live_tensors(model, opt)
    work = Path(tempfile.mkdtemp(prefix="sg-bench-first-"))
    stalls: list[float] = []

    def mutate() -> None:
        with torch.no_grad():
            for t in live:
                t.add_(1)

    if method == "savegame-no-reserve":
        staging.HostPool.reserve = lambda self, nbytes: None  # type: ignore[method-assign]
    if method.startswith("savegame"):
        state = sg.TrainState(model=model, optimizer=opt, rng=False)
        ck = sg.Checkpointer(
            work / "run",
            save=sg.Every(steps=every),
            keep=sg.Keep(last=1),
            async_save=True,
            handle_signals=False,
        )
        ck.restore(state)
        for step in range(1, every * saves + 1):
            mutate()
            time.sleep(step_s)
            t0 = time.perf_counter()
            saved = ck.step(state, step)
            took = time.perf_counter() - t0
            if saved:
                stalls.append(took)
                ck.wait()  # not timed: the next stall never waits for this write
        ck.close()
    else:
        dist.init_process_group(
            "gloo", store=dist.FileStore(str(work / "pg"), 1), rank=0, world_size=1
        )
        for step in range(1, every * saves + 1):
            mutate()
            time.sleep(step_s)
            if step % every:
                continue
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            t0 = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=str(work / f"dcp-{step}"))
            stalls.append(time.perf_counter() - t0)
            fut.result()
        dist.destroy_process_group()
    # floors, in this process: the same bytes copied into touched and into fresh memory
    quiet_memory()
    host = [torch.empty_like(t) for t in live]
    t0 = time.perf_counter()
    for h, t in zip(host, live, strict=True):
        h.copy_(t)
    fresh = time.perf_counter() - t0
    touched = []
    for _ in range(3):
        t0 = time.perf_counter()
        for h, t in zip(host, live, strict=True):
            h.copy_(t)
        touched.append(time.perf_counter() - t0)
    return {
        "stalls": stalls,
        "floor_touched": min(touched),
        "floor_fresh": fresh,
        "bytes": state_bytes(model, opt),
    }


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    med = statistics.median
    touched = med(r["floor_touched"] for rs in results.values() for r in rs)
    fresh = med(r["floor_fresh"] for rs in results.values() for r in rs)
    lines = [
        "| method | first save's stall | later saves' stall | first / copy into touched memory |",
        "|---|---:|---:|---:|",
    ]
    for method, rs in results.items():
        first = med(r["stalls"][0] for r in rs)
        later = med(s for r in rs for s in r["stalls"][1:])
        lines.append(f"| {method} | {first:.3f} s | {later:.3f} s | {first / touched:.2f}x |")
    lines += [
        "",
        f"Floors (medians over every process): one `copy_` of the state into touched memory "
        f"{touched:.3f} s; into freshly allocated memory {fresh:.3f} s.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=5, help="steps between saves")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=0.3, help="seconds of 'compute' per step")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one process, one method
    ap.add_argument("--record-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        warnings.simplefilter("ignore", FutureWarning)
        rec = child(args.child, args.gb, args.every, args.saves, args.step_s)
        Path(args.record_to).write_text(json.dumps(rec))
        return
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        for method in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                out = Path(tmp.name)
            cmd = [sys.executable, __file__, "--child", method, "--record-to", str(out)]
            cmd += ["--gb", str(args.gb), "--every", str(args.every), "--saves", str(args.saves)]
            cmd += ["--step-s", str(args.step_s)]
            subprocess.run(cmd, check=True)
            rec = json.loads(out.read_text())
            out.unlink()
            results[method].append(rec)
            stalls = ", ".join(f"{s:.3f}" for s in rec["stalls"])
            print(f"[{r + 1}/{args.repeats}] {method}: stalls {stalls} s", flush=True)
    lines = table(results)
    print("\n".join(lines))
    if args.no_doc:
        return
    nbytes = results[METHODS[0]][0]["bytes"]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    command = "python benchmarks/bench_first_save.py " + " ".join(sys.argv[1:])
    block = "\n".join(
        [
            f"<!-- {SECTION}:begin -->",
            f"### The first async save of a process ({when}, {machine}, torch {torch.__version__})",
            "",
            f"`{command}`: a {nbytes / 1e9:.2f} GB Adam state on the CPU, a save every "
            f"{args.every} steps of {args.step_s} s, {args.saves} saves per process, "
            f"{args.repeats} fresh processes per method, interleaved. Medians.",
            "",
            *lines,
            f"<!-- {SECTION}:end -->",
        ]
    )
    replace_section(SECTION, block)


if __name__ == "__main__":
    main()
