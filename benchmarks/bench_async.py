"""Async and sync save, and restore, of a training state: savegame beside its peers and the floors.

Run: ``python benchmarks/bench_async.py --gb 0.25 2 --repeats 3``

Every size runs in its own fresh process (so one size's memory does not shape the next); inside
it every method runs once to warm up (first-save allocations, DCP's stager cache, savegame's
host pool: the steady state of a training run is what matters) and then ``--repeats`` times,
interleaved and in a rotating order so disk noise hits all methods alike. Medians are reported
with ratios to the floors and to the fastest peer; JSON lines go to ``bench-out/async.jsonl``
and a table to the ``async`` section of ``docs/benchmarks.md``.

The state is ``bench_save_restore.build_state``: Linear layers + AdamW moments (1/3 weights,
2/3 optimizer state), fp32. Every tensor changes before every timed method (a save where
everything changed: savegame's incremental save would otherwise write nothing).

Floors (what no method can beat):
  * ``memcpy``      every tensor copied into preallocated, pre-faulted host memory, by
                    ``memmove`` and by torch's ``copy_``; the floor is the faster of the two in
                    each repeat (the async stall floor on CPU: a snapshot copies the bytes once)
  * ``write+fsync`` the same bytes written sequentially into one file and fsynced (the persist
                    floor)
  * ``read``        that file read into preallocated memory from the page cache (restore floor)

Save (each ends with the bytes durable): ``torch.save`` + fsync, ``safetensors.save_file`` +
fsync, ``dcp.save`` (FileSystemWriter fsyncs), savegame ``Checkpointer.save``.

Async save, *stall* = until the call returns and the live state may be mutated, *total* = until
the checkpoint is durable: ``dcp.async_save`` with default options (a fresh stager per call),
``dcp.async_save`` with a reused ``DefaultStager`` (cached staging buffers; shared memory), the
same with ``use_async_staging=True`` (the call returns at once but the state may only be mutated
after ``staging_completion``: that is its stall), savegame ``Checkpointer.save_async``. Pinned
memory and non-blocking copies need an accelerator and do not apply on a CPU-only machine.

Restore (warm page cache, into the live model + optimizer): ``torch.load(mmap=True,
weights_only=True)`` + ``load_state_dict`` (+ reading every byte left memory-mapped, as in
bench_save_restore), ``safetensors.load_file`` + ``load_state_dict`` (+ the same), ``dcp.load``
in place, savegame ``Checkpointer.restore`` (every hash verified). With ``--cold`` also after
dropping the page cache (needs root).

``--device cuda`` puts the state on the GPU (the H100 run of issue 3, ~11 GB:
``python benchmarks/bench_async.py --device cuda --gb 11 --repeats 3``): the stall floor becomes
a device -> preallocated pinned host copy (plus an H2D floor row), DCP's stagers get
``use_pinned_memory`` and ``use_non_blocking_copy``, restores load onto the GPU
(``map_location``, ``load_file(device=)``), and the table goes to the ``async_gpu`` section.
That path has not been run yet (no GPU in the session that wrote it).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from bench_save_restore import (
    build_state,
    drop_caches,
    flat_state,
    fsync_path,
    load_flat,
    quiet_memory,
    state_bytes,
    touch_pages,
)
from torch.distributed.checkpoint import staging as dcp_staging
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

import savegame as sg
from savegame.engine import staging

ROOT = Path(__file__).resolve().parent.parent
SECTION = "async"
PAIRED = "floor/stall floor, right before each savegame async save"


def _live_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def run_one(
    gb: float, repeats: int, cold: bool, only: str = "", device: str = "cpu"
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sg-bench-async-"))
    model, opt = build_state(gb)
    cuda = device.startswith("cuda")
    if cuda:  # the state lives on the GPU: parameters and every optimizer moment
        model.to(device)
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(device)
    nbytes = state_bytes(model, opt)
    print(f"[{gb} GB] state {nbytes / 1e9:.2f} GB on {device}; work dir {work}", flush=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    state = sg.TrainState(model=model, optimizer=opt, rng=False)
    live = _live_tensors(model, opt)

    store = dist.FileStore(str(work / "pg-store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    # ---- floors -------------------------------------------------------------------------------
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in live]
    for h in host:
        h.fill_(0)  # pre-fault: the floor is a copy into memory that is already mapped

    def d2h() -> float:
        """One copy of the state into the preallocated host buffers: the stall floor."""
        sync()
        t0 = time.perf_counter()
        if cuda:
            for h, t in zip(host, live, strict=True):
                h.copy_(t, non_blocking=True)
            torch.cuda.synchronize()
        else:  # torch's copy on every core: the floor's own method, so the pair compares alike
            for h, t in zip(host, live, strict=True):
                h.copy_(t)
        return time.perf_counter() - t0

    def memcpy() -> None:
        if cuda:
            record("floor/D2H into pinned", d2h())
            t0 = time.perf_counter()
            for h, t in zip(host, live, strict=True):
                t.copy_(h, non_blocking=True)  # the same values back: the state is unchanged
            torch.cuda.synchronize()
            record("floor/H2D from pinned", time.perf_counter() - t0)
            return
        t0 = time.perf_counter()
        for h, t in zip(host, live, strict=True):
            ctypes.memmove(h.data_ptr(), t.data_ptr(), t.numel() * t.element_size())
        t1 = time.perf_counter()
        for h, t in zip(host, live, strict=True):
            h.copy_(t)  # torch's own copy, on its default intra-op threads
        t2 = time.perf_counter()
        record("floor/memcpy (memmove)", t1 - t0)
        record("floor/memcpy (torch copy_)", t2 - t1)
        # The floor is the faster of the two in this repeat.
        record("floor/memcpy", min(t1 - t0, t2 - t1))

    class Rotating:
        """Each save goes to a fresh path; the previous output is deleted afterwards, so every
        method keeps only its newest checkpoint, as savegame's ``Keep(last=1)`` does."""

        def __init__(self, name: str) -> None:
            self.name, self.n, self.latest = name, 0, work / f"{name}-0"

        def next(self) -> tuple[Path, Path]:
            self.n += 1
            prev, self.latest = self.latest, work / f"{self.name}-{self.n}"
            return self.latest, prev

    def delete(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    raw = Rotating("raw")

    def write_fsync() -> None:
        path, prev = raw.next()
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for h in host:
                f.write(memoryview(h.reshape(-1).view(torch.uint8).numpy()))
            os.fsync(f.fileno())
        record("floor/write+fsync", time.perf_counter() - t0)
        delete(prev)  # outside the timing: the floor is the write alone

    def read_floor() -> None:
        warm(raw.latest)
        t0 = time.perf_counter()
        with open(raw.latest, "rb", buffering=0) as f:
            for h in host:
                mv = memoryview(h.reshape(-1).view(torch.uint8).numpy())
                while mv:
                    n = f.readinto(mv)
                    mv = mv[n:]
        record("floor/read (page cache)", time.perf_counter() - t0)

    # ---- sync saves: until durable, deleting the superseded checkpoint like Keep(last=1) -------
    tpt, stf, dsync = Rotating("torch.pt"), Rotating("state.safetensors"), Rotating("dcp-sync")

    def torch_save() -> None:
        path, prev = tpt.next()
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        delete(prev)
        record("save/torch.save+fsync", time.perf_counter() - t0)

    def st_save() -> None:
        path, prev = stf.next()
        t0 = time.perf_counter()
        safetensors.torch.save_file(flat_state(model, opt), str(path))
        fsync_path(path)
        delete(prev)
        record("save/safetensors+fsync", time.perf_counter() - t0)

    def dcp_sd() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    def dcp_save() -> None:
        path, prev = dsync.next()
        t0 = time.perf_counter()
        dcp.save(dcp_sd(), checkpoint_id=str(path))  # FileSystemWriter fsyncs every file
        delete(prev)
        record("save/dcp.save", time.perf_counter() - t0)

    step = {"sync": 0, "async": 0}
    ck_sync = sg.Checkpointer(work / "sg-sync", keep=sg.Keep(last=1), handle_signals=False)
    ck_async = sg.Checkpointer(
        work / "sg-async", keep=sg.Keep(last=1), async_save=True, handle_signals=False
    )

    def sg_save() -> None:
        step["sync"] += 1
        t0 = time.perf_counter()
        ck_sync.save(state, step["sync"])
        record("save/savegame", time.perf_counter() - t0)

    # ---- async saves: stall until the state may be mutated, total until committed -------------
    # (the superseded checkpoint is deleted after "total", outside the timing, for every method:
    # savegame's retention runs on its worker after the commit; waited for before the next method)
    # Reused stagers: DCP caches one staging buffer per source storage across calls (its best
    # CPU option); shared memory is what its process-based checkpointer would hand over.
    stager_sync = dcp_staging.DefaultStager(
        dcp_staging.StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=True,
            use_async_staging=False,
            use_non_blocking_copy=cuda,
        )
    )
    stager_bg = dcp_staging.DefaultStager(
        dcp_staging.StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=True,
            use_async_staging=True,
            use_non_blocking_copy=cuda,
        )
    )
    dcp_variants = {
        "dcp.async_save default": (Rotating("dcp-async-default"), None),
        "dcp.async_save reused DefaultStager(shm)": (Rotating("dcp-async-cached"), stager_sync),
        "dcp.async_save reused DefaultStager(shm, use_async_staging)": (
            Rotating("dcp-async-bg"),
            stager_bg,
        ),
    }

    def dcp_async(name: str) -> Callable[[], None]:
        rot, stager = dcp_variants[name]

        def run() -> None:
            path, prev = rot.next()
            t0 = time.perf_counter()
            if stager is None:
                fut = dcp.async_save(dcp_sd(), checkpoint_id=str(path))
            else:
                fut = dcp.async_save(dcp_sd(), checkpoint_id=str(path), async_stager=stager)
            t_ret = time.perf_counter()
            if isinstance(fut, AsyncSaveResponse):
                # use_async_staging: the call returns before the snapshot is taken; the state may
                # only be mutated once staging_completion is done — that is its real stall.
                fut.staging_completion.result()
                t1 = time.perf_counter()
                record(
                    f"async-return/{name} (returns before the snapshot: unsafe to mutate)",
                    t_ret - t0,
                )
                fut.upload_completion.result()
            else:
                t1 = t_ret
                fut.result()
            t2 = time.perf_counter()
            record(f"async-stall/{name}", t1 - t0)
            record(f"async-total/{name}", t2 - t0)
            delete(prev)

        run.__name__ = "dcp_async_" + name.split()[-1].strip("()")
        run.__doc__ = name
        return run

    def sg_async() -> None:
        step["async"] += 1
        # The memory bandwidth of this VM drifts from second to second (writeback of earlier
        # methods' files, the other tenant): take a memcpy floor right before each stall and
        # compare the pair.
        record(PAIRED, d2h())
        t0 = time.perf_counter()
        handle = ck_async.save_async(state, step["async"])
        t1 = time.perf_counter()
        assert handle is not None
        handle.result()
        t2 = time.perf_counter()
        record("async-stall/savegame", t1 - t0)
        record("async-total/savegame", t2 - t0)
        ck_async.wait()  # retention (after the commit) done before the next method runs

    def warm(path: Path) -> None:
        # "warm" restore: the checkpoint's files are in the page cache (read them once first)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        buf = bytearray(8 << 20)
        for fp in files:
            with open(fp, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    # ---- restores (warm, into the live objects) -----------------------------------------------
    def reset_live() -> None:
        # every method starts from optimizer moments in ordinary memory (not a mapping)
        for s in opt.state.values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    s[k] = v.clone()

    def torch_restore() -> None:
        sd = torch.load(tpt.latest, mmap=True, weights_only=True, map_location=device)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        if not cuda:
            touch_pages(opt)
        sync()

    def st_restore() -> None:
        load_flat(model, opt, safetensors.torch.load_file(str(stf.latest), device=device))
        if not cuda:
            touch_pages(opt)
        sync()

    def dcp_restore() -> None:
        dcp.load(dcp_sd(), checkpoint_id=str(dsync.latest))  # in place into the live tensors
        sync()

    def sg_restore() -> None:
        ck_sync.restore(state)
        sync()

    restorers = {
        "torch.load(mmap,weights_only)": (torch_restore, lambda: tpt.latest),
        "safetensors.load_file": (st_restore, lambda: stf.latest),
        "dcp.load": (dcp_restore, lambda: dsync.latest),
        "savegame": (sg_restore, lambda: work / "sg-sync"),
    }

    rounds: dict[str, int] = {}  # restores run so far, per tag

    def restore_all(tag: str, drop: bool) -> Callable[[], None]:
        def run() -> None:
            # a rotating order: no method always runs right after the same one (the saves)
            names = list(restorers)
            k = rounds.get(tag, 0) % max(1, len(names))
            rounds[tag] = rounds.get(tag, 0) + 1
            for name in names[k:] + names[:k]:
                fn, where = restorers[name]
                reset_live()
                try:
                    if drop:
                        drop_caches()
                    else:
                        warm(where())
                    gc.collect()  # the previous method's tensors, as settle() does for saves
                    quiet_memory()
                    t0 = time.perf_counter()
                    fn()
                except (Exception, CheckpointException) as exc:  # noqa: BLE001 - as attempt()
                    failed[f"{tag}/{name}"] = f"{type(exc).__name__}: {exc}"[:400]
                    print(f"[{gb} GB] restore {name} failed: {failed[f'{tag}/{name}']}")
                    restorers.pop(name)
                    continue
                record(f"{tag}/{name}", time.perf_counter() - t0)

        return run

    methods: list[Callable[[], None]] = [
        memcpy,
        write_fsync,
        read_floor,
        torch_save,
        st_save,
        dcp_save,
        sg_save,
        *(dcp_async(name) for name in dcp_variants),
        sg_async,
    ]
    if only:  # for experiments: run a subset (matched against the function names)
        methods = [m for m in methods if re.search(only, m.__name__)]
        if not re.search(only, "restore"):
            restorers.clear()
    can_drop = cold and drop_caches()
    failed: dict[str, str] = {}

    def attempt(fn: Callable[[], None]) -> None:
        """Run one method; a peer that fails (DCP's stagers on some states and versions) is
        reported and left out of the later rounds instead of ending the whole run."""
        counts = {k: len(v) for k, v in results.items()}
        try:
            fn()
        # (DCP's CheckpointException is a BaseException, not an Exception)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported in the doc
            for k in list(results):  # what the failed call recorded before it failed goes too
                del results[k][counts.get(k, 0) :]
                if not results[k]:
                    del results[k]
            failed[fn.__doc__ or fn.__name__] = f"{type(exc).__name__}: {exc}"[:400]
            print(
                f"[{gb} GB] {fn.__doc__ or fn.__name__} failed: {failed[fn.__doc__ or fn.__name__]}"
            )
            if fn in methods:
                methods.remove(fn)

    # Warm-up (not recorded) only where a method keeps state across saves: savegame's host pool,
    # DCP's reused stagers (their first save allocates). The rest start cold in repeat 1 alike.
    for fn in list(methods):
        if fn is sg_save or fn is sg_async or "reused" in (fn.__doc__ or ""):
            attempt(fn)
    results.clear()

    def mutate() -> None:
        # Every tensor changes before every method (outside the timing), as in training: an
        # unchanged state would let savegame's incremental save write nothing at all. The
        # tensors are looked up again: a restore (and reset_live) replaced the moments.
        live[:] = _live_tensors(model, opt)
        with torch.no_grad():
            for t in live:
                t.add_(1)
        sync()

    for r in range(repeats):
        if not methods:
            break  # every method failed (each is reported)
        k = r % len(methods)
        for fn in methods[k:] + methods[:k]:
            mutate()
            settle()
            attempt(fn)
        restore_all("restore-warm", False)()
        if can_drop:
            restore_all("restore-cold", True)()
        print(f"[{gb} GB] repeat {r + 1}/{repeats} done", flush=True)

    # how savegame copied the snapshots and the restored bytes (engine/staging.py measures
    # the ways of copying host memory in this process and chooses)
    staged_bytes = sum(t.numel() * t.element_size() for t in live if t.device.type == "cpu")

    def copy_method(purpose: str) -> dict[str, Any]:
        choice = staging.copy_choice(purpose)
        return {
            "chosen": choice.chosen(staged_bytes),
            "GB/s": {m: round(r / 1e9, 2) for m, r in choice.rates(staged_bytes).items()},
        }

    ck_sync.close()
    ck_async.close()
    stager_sync.close()
    stager_bg.close()
    dist.destroy_process_group()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "bench": SECTION,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gb_arg": gb,
        "loadavg_1min_at_end": os.getloadavg()[0],
        "state_bytes": nbytes,
        "staging_copy": copy_method("stage"),
        "restore_copy": copy_method("restore"),
        "repeats": repeats,
        "failed": failed,
        "median_s": {k: statistics.median(v) for k, v in results.items()},
        "all_s": results,
    }


# ---- report ----------------------------------------------------------------------------------------
def table(rec: dict[str, Any]) -> list[str]:
    med: dict[str, float] = rec["median_s"]
    nbytes = rec["state_bytes"]
    memcpy = med[stall_floor(med)]
    wf = med["floor/write+fsync"]
    lines = [
        f"#### {nbytes / 1e9:.2f} GB state",
        "",
        "| group | method | median s | GB/s | ratio to floor | ratio to fastest peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    floors = {"async-stall": memcpy, "async-total": wf, "save": wf, "floor": None}
    for group in (
        "floor",
        "async-stall",
        "async-return",
        "async-total",
        "save",
        "restore-warm",
        "restore-cold",
    ):
        names = [k for k in med if k.startswith(group + "/")]
        if not names:
            continue
        peers = [k for k in names if not k.endswith("/savegame")]
        best = (
            min((med[k] for k in peers), default=None)
            if group not in ("floor", "async-return")
            else None
        )
        floor = floors.get(group)
        if group.startswith("restore"):
            floor = (
                med.get("floor/read (page cache)") if group == "restore-warm" and memcpy else None
            )
            if rec.get("device", "cpu") != "cpu":
                floor = None  # a GPU restore's floor is read + H2D; see the floor rows
        for k in sorted(names, key=lambda k: med[k]):
            name = k.split("/", 1)[1]
            ours = name == "savegame"
            r_floor = f"{med[k] / floor:.2f}" if floor else ""
            r_peer = f"{med[k] / best:.2f}" if best else ""
            if ours:
                name, r_floor, r_peer = (
                    f"**{name}**",
                    f"**{r_floor}**" if r_floor else "",
                    f"**{r_peer}**",
                )
            lines.append(
                f"| {group} | {name} | {med[k]:.3f} | {nbytes / med[k] / 1e9:.2f} | {r_floor} | {r_peer} |"
            )
    lines.append("")
    return lines


def settle(limit_s: float = 20.0) -> None:
    """Let the previous method's writeback finish before the next one is timed.

    A peer that does not fsync (``dcp.async_save``, ``torch.save`` without ``--fsync``) leaves
    dirty pages that the kernel writes back while the next method runs, taking memory bandwidth
    and a core from it. Every method starts on a machine without pending writeback, so none is
    measured under another's disturbance (the floors included).

    Garbage is collected too: ``dcp.async_save`` leaves its staging copy (the whole state) in
    reference cycles, about 5,900 objects per call, so the memory is freed only by the next
    cyclic collection. Left to itself that collection (0.14–0.38 s, freeing ~1 GB) fires inside
    whichever method allocates next, and with the fixed rotation that was nearly always the
    savegame async save listed right after the DCP variants.
    """
    gc.collect()
    os.sync()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        pending = sum(int(info.get(k, "0 kB").split()[0]) for k in ("Dirty", "Writeback"))
        if pending < 16 << 10:  # kB
            break
        time.sleep(0.05)
    quiet_memory()


def stall_floor(med: dict[str, float]) -> str:
    return "floor/D2H into pinned" if "floor/D2H into pinned" in med else "floor/memcpy"


def bars(rec: dict[str, Any]) -> list[str]:
    med = rec["median_s"]
    gpu = rec.get("device", "cpu") != "cpu"
    floor_name = "pinned D2H" if gpu else "memcpy"
    stall_bar = 1.25 if gpu else 1.2

    def peer_best(group: str) -> tuple[str, float]:
        k = min(
            (k for k in med if k.startswith(group + "/") and not k.endswith("/savegame")),
            key=lambda k: med[k],
        )
        return k.split("/", 1)[1], med[k]

    paired = rec["all_s"][PAIRED]
    paired_ratio = statistics.median(
        s / f for s, f in zip(rec["all_s"]["async-stall/savegame"], paired, strict=True)
    )
    # The floor is the best copy of the same bytes the machine did in this run (issue 14): the
    # paired copy right before each save is a diagnostic only (it shares our disturbance).
    # Like is compared with like: our median stall with the median of the fastest copy method
    # (torch copy_ or memmove), and our best stall with the best single copy. A median against
    # one best sample is not the same statistic: on this VM memcpy's own median is 1.1-1.2x its
    # best, so that ratio is kept as a diagnostic. The bar is met only when both ratios are.
    stalls = rec["all_s"]["async-stall/savegame"]
    methods = [k for k in med if k.startswith("floor/memcpy (") or k == "floor/D2H into pinned"]
    fastest = min(methods, key=lambda k: med[k])
    best = min(rec["all_s"][stall_floor(med)])
    stall = max(med["async-stall/savegame"] / med[fastest], min(stalls) / best)
    sp, sv = peer_best("save")
    rp, rv = peer_best("restore-warm")
    out = [
        f"- async stall {med['async-stall/savegame']:.3f} s (median) = "
        f"**{med['async-stall/savegame'] / med[fastest]:.2f} x the median of the fastest {floor_name}** "
        f"({fastest.split('/', 1)[1]}, {med[fastest]:.3f} s); best stall {min(stalls):.3f} s = "
        f"**{min(stalls) / best:.2f} x the best single {floor_name}** ({best:.3f} s) in this run "
        f"(bar <= {stall_bar} on both): "
        + ("met" if stall <= stall_bar else "missed")
        + f"; diagnostics: {med['async-stall/savegame'] / best:.2f} x (median stall / best single copy), "
        f"{paired_ratio:.2f} x a {'pinned D2H' if gpu else 'torch copy_'} of the same bytes taken right "
        "before each save"
        + (
            f"; host-pool copy: {rec['staging_copy']['chosen']} (measured GB/s "
            f"{rec['staging_copy']['GB/s']})"
            if not gpu and rec.get("staging_copy")
            else ""
        ),
        f"- sync save {med['save/savegame']:.3f} s = **{med['save/savegame'] / sv:.2f} x** fastest peer ({sp}, "
        f"{sv:.3f} s) (bar <= 1.05): " + ("met" if med["save/savegame"] <= 1.05 * sv else "missed"),
        f"- restore (warm) {med['restore-warm/savegame']:.3f} s = **{med['restore-warm/savegame'] / rv:.2f} x** "
        f"fastest peer ({rp}, {rv:.3f} s) (bar <= 1.1): "
        + ("met" if med["restore-warm/savegame"] <= 1.1 * rv else "missed")
        + (
            f"; copy into the live tensors: {rec['restore_copy']['chosen']} (measured GB/s "
            f"{rec['restore_copy']['GB/s']})"
            if not gpu and rec.get("restore_copy")
            else ""
        ),
    ]
    if gpu:
        wf = med["floor/write+fsync"]
        out.append(
            f"- async total {med['async-total/savegame']:.3f} s = **{med['async-total/savegame'] / wf:.2f} x** "
            f"write+fsync (bar <= 1.1)"
        )
    if "restore-cold/savegame" in med:
        cp, cv = peer_best("restore-cold")
        out.append(
            f"- restore (cold) {med['restore-cold/savegame']:.3f} s = **{med['restore-cold/savegame'] / cv:.2f} x** "
            f"fastest peer ({cp}, {cv:.3f} s)"
        )
    return out


def safe_bars(rec: dict[str, Any]) -> list[str]:
    """The bar lines, or why they cannot be computed (a method they need failed)."""
    try:
        return bars(rec)
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        return [f"- bars not computed: {type(exc).__name__} {exc} (a method they need failed)"]


def write_doc(records: list[dict[str, Any]], command: str, notes: str) -> None:
    first = records[0]
    gpu = first.get("device", "cpu") != "cpu"
    section = f"{SECTION}_gpu" if gpu else SECTION
    where = f"GPU: {first['device']}" if gpu else "CPU"
    loads = ", ".join(f"{r['loadavg_1min_at_end']:.1f}" for r in records)
    lines = [
        f"<!-- {section}:begin -->",
        f"### Async save, sync save and restore side by side, with the floors ({where})",
        "",
        f"{first['date']} · {first['machine']} · torch {first['torch']} · medians of {first['repeats']} "
        f"interleaved runs (savegame and DCP's reused stagers after one warm-up save) · one process per "
        f"size · 1-min load average at the end {loads} "
        + ("" if gpu else "(other jobs shared this 2-vCPU VM) ")
        + f"· `{command}`",
        "",
        "Stall = until the call returns and the state may be mutated; total = until the checkpoint is "
        "durable. Ratios: stall to memcpy, save and total to write+fsync, warm restore to a plain read "
        "from the page cache.",
        "",
    ]
    for rec in records:
        lines += table(rec)
        lines += [
            f"Bars ({'issue 15, ' + rec['device'] if gpu else 'issue 14, CPU'}), "
            f"{rec['state_bytes'] / 1e9:.2f} GB:",
            "",
        ]
        lines += safe_bars(rec) + [""]
        for name, why in rec.get("failed", {}).items():
            lines.append(f"- failed in this run, left out: {name}: `{why}`")
        lines += [""] if rec.get("failed") else []
    if notes:
        lines += [notes, ""]
    lines.append(f"<!-- {section}:end -->")
    replace_section(section, "\n".join(lines))


def replace_section(name: str, block: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin in text and end in text:
        text = text.split(begin)[0] + block + text.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, nargs="+", default=[0.25, 2.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cold", action="store_true", help="also restore after dropping the page cache (root)"
    )
    ap.add_argument("--device", default="cpu", help="where the training state lives: cpu or cuda")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--notes", default="", help="markdown appended under the tables")
    ap.add_argument("--only", default="", help="regex: run only matching methods (experiments)")
    ap.add_argument("--record-to", help=argparse.SUPPRESS)  # internal: child process mode
    args = ap.parse_args()
    if args.record_to:
        warnings.simplefilter("ignore", FutureWarning)
        if args.only:  # experiments: the reader's phase timings too
            import logging

            logging.basicConfig(format="%(name)s: %(message)s")
            logging.getLogger("savegame.reader").setLevel(logging.DEBUG)
        rec = run_one(args.gb[0], args.repeats, args.cold, args.only, args.device)
        Path(args.record_to).write_text(json.dumps(rec))
        return
    records = []
    for gb in args.gb:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = Path(tmp.name)
        cmd = [
            sys.executable,
            __file__,
            "--gb",
            str(gb),
            "--repeats",
            str(args.repeats),
            "--record-to",
            str(out),
        ]
        cmd += ["--only", args.only] if args.only else []
        cmd += ["--device", args.device]
        subprocess.run(cmd + (["--cold"] if args.cold else []), check=True)
        rec = json.loads(out.read_text())
        out.unlink()
        records.append(rec)
        if args.only:
            print(json.dumps({k: round(v, 4) for k, v in rec["median_s"].items()}, indent=1))
            continue
        print("\n".join(table(rec) + safe_bars(rec)), flush=True)
    if args.only:
        return
    (ROOT / "bench-out").mkdir(exist_ok=True)
    with open(ROOT / "bench-out" / f"{SECTION}.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if not args.no_doc:
        command = "python benchmarks/bench_async.py --gb " + " ".join(f"{g:g}" for g in args.gb)
        command += f" --device {args.device}" if args.device != "cpu" else ""
        command += f" --repeats {args.repeats}" + (" --cold" if args.cold else "")
        write_doc(records, command, args.notes)


if __name__ == "__main__":
    main()
