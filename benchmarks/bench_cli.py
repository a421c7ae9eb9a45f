"""Inspection speed of the command line (issue 9.18), measured side by side with its floor.

Each sample is a fresh process, as a user runs it: ``python -c pass`` (the floor: interpreter
start), ``savegame --version``, and ``savegame show`` / ``verify`` of small files written by
the real tools (the golden files under tests/golden/foreign: a safetensors file, the tutorial
torch checkpoint, a TF1 checkpoint), a Keras ``.h5`` file read with and without the isolation
child, and ``ls`` / ``verify`` / ``show`` of a savegame run (three checkpoints of a small
model with Adam, written once by this script). Samples are interleaved (one of each per round) so a disturbance hits every
row alike; the table gives the median and the best, and each row minus the floor's median.

Bytecode: savegame's modules are compiled once and their ``.pyc`` files reused, as for an
installed package (pip compiles at install; an editable checkout writes ``__pycache__`` on first
run). An environment with ``PYTHONDONTWRITEBYTECODE=1`` would otherwise recompile them in every
sample (about 30 ms more per savegame row); the children get ``PYTHONPYCACHEPREFIX=
bench-out/pycache`` instead, so nothing is written into the source tree. ``--no-pyc`` measures
without it (the environment as given).

Writes ``bench-out/cli.jsonl`` and the ``cli`` section of ``docs/benchmarks.md``.

    python benchmarks/bench_cli.py --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "foreign"

# Targets of issue 9.18, in seconds over the floor.
BARS = {"version": 0.15, "show": 0.4, "verify": 0.4, "isolation": 0.3}


def _savegame() -> list[str]:
    exe = shutil.which("savegame")
    return [exe] if exe else [sys.executable, "-m", "savegame"]


def _savegame_run() -> Path:
    """A small savegame run to list and verify: a model with Adam, three checkpoints."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    import savegame

    root = ROOT / "bench-out" / "cli-run"
    shutil.rmtree(root, ignore_errors=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters())
    state = savegame.TrainState(model=model, optimizer=opt)
    with savegame.Checkpointer(root) as ck:
        for step in (1, 2, 3):
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
            ck.save(state, step)
    return root


def cases(run: Path) -> dict[str, list[str]]:
    sg = _savegame()
    st = str(GOLDEN / "torch" / "model.safetensors")
    pt = str(GOLDEN / "torch" / "tutorial.pth")
    tf = str(GOLDEN / "tensorflow" / "tf1" / "model.ckpt-3")
    h5 = str(GOLDEN / "keras" / "cnn.h5")
    return {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "savegame --version": [*sg, "--version"],
        "show model.safetensors": [*sg, "show", st],
        "verify model.safetensors": [*sg, "verify", st],
        "show tutorial.pth (torch)": [*sg, "show", pt],
        "verify tutorial.pth (torch)": [*sg, "verify", pt],
        "show model.ckpt-3 (TF1)": [*sg, "show", tf],
        "verify model.ckpt-3 (TF1)": [*sg, "verify", tf],
        "show cnn.h5 --no-isolate": [*sg, "show", "--no-isolate", h5],
        "show cnn.h5 (isolated)": [*sg, "show", h5],
        "ls run (savegame, 3 checkpoints)": [*sg, "ls", str(run)],
        "verify run (savegame)": [*sg, "verify", str(run)],
        "show step-3 (savegame)": [*sg, "show", str(run / "step-000000000003")],
    }


def _bar(name: str) -> tuple[str, float] | None:
    if name.startswith("savegame --version"):
        return "version", BARS["version"]
    if name.startswith("show cnn.h5 (isolated)"):
        return "isolation", BARS["isolation"]  # over the --no-isolate row
    if name.startswith(("show", "verify", "ls")) and "cnn.h5" not in name:
        return "show/verify", BARS["show"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--no-pyc", action="store_true", help="keep the environment's bytecode settings")
    args = ap.parse_args()
    runs = cases(_savegame_run())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not args.no_pyc:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(ROOT / "bench-out" / "pycache")
    load_before = os.getloadavg()
    for argv in runs.values():  # warm the page cache and pyc files once
        subprocess.run(argv, capture_output=True, env=env, check=False)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    failures: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, argv in runs.items():
            t0 = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            samples[name].append(time.perf_counter() - t0)
            if out.returncode != 0:
                failures[name] = (out.stderr or out.stdout)[-300:]
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in samples.items()}
    floor = med["python -c pass (floor)"]
    out_dir = ROOT / "bench-out"
    out_dir.mkdir(exist_ok=True)
    with open(out_dir / "cli.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "time": time.time(),
                    "samples": samples,
                    "failures": failures,
                    "pyc": not args.no_pyc,
                    "load": [load_before, load_after],
                }
            )
            + "\n"
        )
    lines = [
        "<!-- cli:begin -->",
        "### Inspection speed of the command line (issue 9.18)",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine {platform.machine()} "
        f"{os.cpu_count()} CPU cores, {platform.platform()}; Python {platform.python_version()}. "
        f"{args.rounds} rounds, each one fresh process per row, rows interleaved within a round; "
        "files are the golden files of tests/golden/foreign (written by the real tools) and a "
        "three-checkpoint savegame run. "
        + ("Bytecode cached, as installed. " if not args.no_pyc else "No bytecode cache (`--no-pyc`). ")
        + f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after: the machine "
        "was shared, so the best-of column is the less disturbed figure.",
        "",
        f"Command: `python benchmarks/bench_cli.py --rounds {args.rounds}{' --no-pyc' if args.no_pyc else ''}`",
        "",
        "| command | median s | best s | median over the floor s | bar over the floor s | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in runs:
        over = med[name] - floor
        bar = _bar(name)
        if bar and bar[0] == "isolation":
            over = med[name] - med["show cnn.h5 --no-isolate"]
        bar_s = f"{bar[1]:.2f}" + (" (over --no-isolate)" if bar and bar[0] == "isolation" else "") if bar else "-"
        met = ("yes" if over <= bar[1] else "**no**") if bar else "-"
        if name in failures:
            met = "**failed**"
        lines.append(f"| `{name}` | {med[name]:.3f} | {min(samples[name]):.3f} | {over:+.3f} | {bar_s} | {met} |")
    lines += [
        "",
        "None of these commands imports torch (tests/cli/test_cli_speed.py checks every foreign "
        "format and a savegame run in a fresh process; `show` of a savegame checkpoint imports "
        "torch only to print a `torch.Size`, `dtype` or `device` kept in the state); listing and "
        "verifying safetensors, torch and TF files need no "
        "numpy either (only reading values does), Keras files need numpy and h5py (h5py in the "
        "child process when isolated). `--version` imports neither rich nor the readers.",
        "",
    ]
    if failures:
        lines += ["Failures: " + "; ".join(f"`{k}`: {v!r}" for k, v in failures.items()), ""]
    lines += ["<!-- cli:end -->"]
    block = "\n".join(lines)
    print(block)
    if not args.no_doc:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_async import replace_section  # the shared writer of docs/benchmarks.md sections

        replace_section("cli", block)


if __name__ == "__main__":
    main()
