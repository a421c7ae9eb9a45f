"""A fresh process, from its start to the first completed training step: savegame and its peers.

Run: ``python benchmarks/bench_fresh.py --gb 1 --repeats 7``

What a user feels after a preemption: a new Python process starts, imports, builds the model and
optimizer, restores the newest checkpoint, and runs one training step. Every trial is a new
interpreter (``subprocess``), methods interleaved so disturbances hit all of them alike; the clock
starts just before the parent spawns the child and stops when the child has finished
``optimizer.step()`` (the child reports that instant; interpreter teardown is not counted). Import
cost counts: each method's child imports only what that method needs (``import savegame`` is
inside savegame's time).

Methods (each ends with the live model and optimizer holding the checkpoint's values, every byte
read, then one AdamW step):
  * savegame     ``Checkpointer(run).restore(state)`` (every hash verified before anything is
    applied)
  * safetensors  ``load_file`` + ``load_state_dict`` (no integrity check)
  * torch        ``torch.load(mmap=True, weights_only=True)`` + ``load_state_dict`` (no check)

The model is built on the meta device and materialised with ``to_empty`` (no random init: that
is the same for everyone and would drown the differences), so the restore pays the first touch of
every page of the live tensors, as after a real restart. With ``--cold`` (root), the page cache
is dropped before every trial.

Every child also reports its phases (import, build, restore, step), so a bimodal method shows
where its slow trials lose the time. Writes the section ``fresh`` of ``docs/benchmarks.md``
unless ``--no-doc``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 4096
METHODS = ("savegame", "safetensors", "torch")


def _layers(gb: float) -> int:
    # weights (with bias) + 2 AdamW moments = 3 x params x 4 bytes
    return max(1, int(gb * (1 << 30) / 12) // (WIDTH * WIDTH))


# --------------------------------------------------------------------------------------- child
def child(method: str, work: Path, layers: int) -> None:
    marks = {}
    import torch

    if method == "savegame":
        import savegame as sg
    elif method == "safetensors":
        import safetensors.torch
    marks["import"] = time.time()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    model.to_empty(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    marks["build"] = time.time()
    if method == "savegame":
        state = sg.TrainState(model=model, optimizer=opt, rng=False)
        with sg.Checkpointer(work / "sg-run", handle_signals=False) as ck:
            ck.restore(state)
    elif method == "safetensors":
        _load_flat(model, opt, safetensors.torch.load_file(str(work / "state.safetensors")))
    else:
        sd = torch.load(work / "torch.pt", mmap=True, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
    marks["restore"] = time.time()
    # The first step: gradients exist (a forward/backward is the same for every method and is
    # left out), the optimizer reads and writes every moment — memory-mapped state pays here.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    marks["step"] = time.time()
    print("MARKS " + json.dumps(marks), flush=True)


def _load_flat(model, opt, flat) -> None:  # type: ignore[no-untyped-def]
    model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
    sd = opt.state_dict()
    for pid in range(len(list(model.parameters()))):
        sd["state"][pid] = {
            k.rsplit(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"opt.{pid}.")
        }
    opt.load_state_dict(sd)


# -------------------------------------------------------------------------------------- parent
def prepare(work: Path, layers: int) -> int:
    import safetensors.torch
    import torch

    import savegame as sg

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with sg.Checkpointer(work / "sg-run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model, optimizer=opt, rng=False), step=1)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, work / "torch.pt")
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            flat[f"opt.{pid}.{k}"] = v.contiguous() if isinstance(v, torch.Tensor) else torch.tensor(v)
    safetensors.torch.save_file(flat, str(work / "state.safetensors"))
    os.sync()
    return sum(v.numel() * v.element_size() for v in flat.values())


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def trial(method: str, work: Path, layers: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    start = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--dir", str(work), "--layers", str(layers)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    line = [x for x in out.stdout.splitlines() if x.startswith("MARKS ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"{method} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    marks = json.loads(line[-1][6:])
    phases = {"total": marks["step"] - start, "start+import": marks["import"] - start}
    prev = marks["import"]
    for name in ("build", "restore", "step"):
        phases[name] = marks[name] - prev
        prev = marks[name]
    return phases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each trial")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--child", choices=METHODS)
    ap.add_argument("--layers", type=int)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.dir), args.layers)
        return

    layers = _layers(args.gb)
    work = Path(args.dir or tempfile.mkdtemp(prefix="sg-fresh-"))
    work.mkdir(parents=True, exist_ok=True)
    nbytes = prepare(work, layers)
    cold = args.cold and drop_caches()
    print(f"state {nbytes / 1e9:.2f} GB, {layers} layers, {'cold' if cold else 'warm'} cache; {work}")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for i in range(args.repeats):
        order = METHODS[i % 3 :] + METHODS[: i % 3]  # rotate who goes first
        for m in order:
            if cold:
                drop_caches()
            runs[m].append(trial(m, work, layers))
            print(f"  {m:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[m][-1].items()), flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    best = min((m for m in METHODS if m != "savegame"), key=lambda m: med[m]["total"])
    ratio = med["savegame"]["total"] / med[best]["total"]
    print("median total: " + ", ".join(f"{m} {med[m]['total']:.3f}s" for m in METHODS))
    print(f"savegame / fastest peer ({best}): {ratio:.3f}")
    record = {
        "bench": "fresh",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "load": os.getloadavg()[0],
        "gb": args.gb,
        "state_bytes": nbytes,
        "cold": cold,
        "repeats": args.repeats,
        "median": med,
        "runs": runs,
        "ratio": ratio,
        "best_peer": best,
    }
    (ROOT / "bench-out").mkdir(exist_ok=True)
    with open(ROOT / "bench-out" / "fresh.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if not args.no_doc:
        write_doc(record)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


def write_doc(record: dict) -> None:  # type: ignore[type-arg]
    key = f"fresh-{record['gb']:g}gb-{'cold' if record['cold'] else 'warm'}"
    lines = [
        f"<!-- {key}:begin -->",
        f"### Fresh process → first training step, {record['state_bytes'] / 1e9:.2f} GB state, "
        f"{'cold' if record['cold'] else 'warm'} page cache",
        "",
        f"{record['date']} · {record['machine']} · load {record['load']:.1f} · median of "
        f"{record['repeats']} interleaved processes · `python benchmarks/bench_fresh.py --gb "
        f"{record['gb']:g} --repeats {record['repeats']}{' --cold' if record['cold'] else ''}`",
        "",
        "| method | total s | start+import | build | restore | step | ratio to fastest peer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    best = record["median"][record["best_peer"]]["total"]
    for m, ph in record["median"].items():
        r = ph["total"] / best
        lines.append(
            f"| {m} | {ph['total']:.3f} | {ph['start+import']:.3f} | {ph['build']:.3f} | "
            f"{ph['restore']:.3f} | {ph['step']:.3f} | {f'**{r:.2f}**' if m == 'savegame' else f'{r:.2f}'} |"
        )
    totals = {m: sorted(round(r["total"], 2) for r in rs) for m, rs in record["runs"].items()}
    lines += ["", "Every trial's total (s): " + "; ".join(f"{m} {v}" for m, v in totals.items()), f"<!-- {key}:end -->"]
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    block = "\n".join(lines)
    if f"<!-- {key}:begin -->" in text:
        text = text.split(f"<!-- {key}:begin -->")[0] + block + text.split(f"<!-- {key}:end -->")[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
