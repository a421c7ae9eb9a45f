"""Retention's listing of a run with many kept checkpoints: with and without the manifest
version cache (``Store.version``), interleaved in one run.

Run: ``python benchmarks/bench_retention.py --kept 100 300 --repeats 15``

After every save, retention lists the run (``retention.list_run``): each kept checkpoint's
manifest is looked at. A local folder tells an unchanged manifest by its inode, size and times
(one ``stat``), so it is not opened, read and digested again. The "read every time" rows make
``LocalStore.version`` return None (what an object store does), in the same process, the two
modes alternating so a disturbance hits both alike. Small states (one ``Linear(4, 4)``): the
cost measured is retention's, not the data's. Prints a Markdown table (medians, ms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import savegame as sg
from savegame.checkpointer import retention
from savegame.storage.local import LocalStore


def _run(kept: int) -> str:
    root = tempfile.mkdtemp(prefix=f"sg-retention-{kept}-")
    state = sg.TrainState(model=torch.nn.Linear(4, 4))
    with sg.Checkpointer(root, keep=sg.Keep(last=kept + 10), async_save=False) as ck:
        for step in range(1, kept + 1):
            ck.save(state, step)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    real = LocalStore.version
    print(
        "| kept checkpoints | list_run, version cache (ms) | list_run, read every time (ms) | ratio |"
    )
    print("|---:|---:|---:|---:|")
    for kept in args.kept:
        root = _run(kept)
        times: dict[str, list[float]] = {"cache": [], "read": []}
        for _ in range(args.repeats):
            for mode in ("cache", "read"):
                LocalStore.version = real if mode == "cache" else (lambda self, key: None)  # type: ignore[method-assign]
                t = time.perf_counter()
                retention.list_run(root)
                times[mode].append(time.perf_counter() - t)
        LocalStore.version = real  # type: ignore[method-assign]
        c, r = (statistics.median(times[m]) * 1e3 for m in ("cache", "read"))
        print(f"| {kept} | {c:.1f} | {r:.1f} | {c / r:.2f}× |")


if __name__ == "__main__":
    main()
