"""The cost of a distributed save at scale: measurements at 1-16 ranks and a simulation of the
coordinator's work for up to 4,096 ranks (issue 14 part 3; the model is in docs/scale.md).

Two parts:

``real``: W processes (gloo on CPU, loopback), each holding ``T`` FSDP-style sharded tensors
(DTensors, ``Shard(0)`` on a 1-D mesh of W ranks: every tensor has W chunks, 64 bytes each),
plus the process RNGs (per-rank keys). Every rank runs ``Checkpointer.save`` (blocking); the
benchmark wraps the protocol's functions to time each phase per rank, in wall time and in the
CPU time of the calling thread (``time.thread_time``), so the work can be told apart from the
waiting that oversubscription (16 processes on 2 cores) adds. Rank 0 also times the commit
(``writer.commit``: merge + manifest build + serialise + fsync/publish), the manifest's size and
the time to parse and validate it (``Manifest.from_bytes``, best of 3, one process).

``sim``: one process, no collectives: N ranks' write results (``writer.RankResult``) and state
trees are built synthetically as the protocol would gather them, and the coordinator's code is
called on them (``planning.unwritten_keys``, ``writer.commit`` into a temp folder with its
fsyncs, ``Manifest.from_bytes``), plus the pickle/unpickle of the gathered payload. It reaches
512 and 4,096 ranks for real. ``--profile`` prints a cProfile of the commit of the largest case.
``--patched`` times the proposed linear replacements next to the current code (scratch copies
of the hot loops, the library is not changed).

    python benchmarks/bench_scale.py real --worlds 1,2,4,8,16 --tensors 100,1000,10000 --reps 2
    python benchmarks/bench_scale.py sim --ranks 1,2,4,8,16,64,256,512,1024,4096 --tensors 10,100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ELEMS = 16  # float32 elements per chunk: small state, many tensors


# ---- timing helpers ---------------------------------------------------------------------------
class Phases:
    """Accumulated wall and thread-CPU seconds per named phase."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c0

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            with self.time(name):
                return fn(*a, **kw)

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()


def best(fn: Callable[[], Any], reps: int = 3) -> tuple[float, float]:
    """Best (wall, thread CPU) seconds of ``reps`` calls."""
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
    return min(walls), min(cpus)


# ---- real: gloo processes -----------------------------------------------------------------------
def root_gather(group_cls: Any) -> None:
    """Scratch experiment: the result gather (a 3-tuple report) goes to rank 0 only
    (``gather_object``) instead of to every rank (``all_gather_object``); other ranks get a
    list of placeholders they never read (only rank 0 decides; the decision is broadcast)."""
    import torch.distributed as dist

    orig = group_cls.gather

    def gather(self: Any, obj: Any, *, what: str) -> list[Any]:
        if not (isinstance(obj, tuple) and len(obj) == 3):
            return orig(self, obj, what=what)
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self._run(lambda: dist.gather_object(obj, out, dst=0, group=self._pg), what)
        return out if out is not None else [("ok", None, None)] * self.world

    group_cls.gather = gather


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import savegame as sg
    from savegame.distributed import collectives, planning, protocol
    from savegame.engine import writer
    from savegame.format import layout, manifest

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    if args.root_gather:
        root_gather(collectives.Group)
    ph = Phases()
    ph.wrap(protocol, "prepare", "prepare")
    ph.wrap(protocol, "persist", "persist")
    if os.environ.get("SCALE_PROFILE_RANK") == str(rank):  # cProfile of this rank's persist
        import cProfile
        import pstats

        timed_persist = protocol.persist

        def profiled(*a: Any, **kw: Any) -> Any:
            prof = cProfile.Profile(time.thread_time)  # CPU of this thread, not waiting
            try:
                return prof.runcall(timed_persist, *a, **kw)
            finally:
                print(f"## cProfile of protocol.persist on rank {rank} of {world}", file=sys.stderr)
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(10)
                pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(
                    "savegame|distributed_c10d", 14
                )

        protocol.persist = profiled
    ph.wrap(writer, "write_rank_files", "write_rank_file")
    ph.wrap(writer, "commit", "commit")
    ph.wrap(planning, "unwritten_keys", "unwritten_keys")
    ph.wrap(manifest.Manifest, "to_bytes", "manifest_to_bytes")
    ph.wrap(collectives.Group, "gather", "gathers")
    ph.wrap(collectives.Group, "broadcast", "broadcasts")
    from savegame.checkpointer import facade

    ph.wrap(facade.Checkpointer, "_apply_retention", "retention")  # rank 0, after the commit
    out: list[dict[str, Any]] = []
    for n in [int(t) for t in args.tensors.split(",")]:
        torch.manual_seed(rank)
        shards = {
            f"p{i:05d}": DTensor.from_local(
                torch.randn(ELEMS),
                mesh,
                [Shard(0)],
                run_check=False,
                shape=torch.Size([ELEMS * world]),
                stride=(1,),
            )  # fmt: skip
            for i in range(n)
        }
        state = sg.TrainState(model=shards, rng=True)
        root = Path(args.root) / f"t{n}"
        # Full saves by default (every byte written each time); --incremental measures the
        # default Checkpointer, whose second save of an unchanged state writes nothing new.
        kw = {} if args.incremental else {"incremental": False}
        ckpt = sg.Checkpointer(root, keep=sg.Keep(last=1000), handle_signals=False, **kw)
        reps = []
        for rep in range(args.reps):
            ph.reset()
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            ckpt.save(state, rep + 1)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            reps.append({"save_wall": wall, "save_proc_cpu": cpu,
                         "wall": dict(ph.wall), "cpu": dict(ph.cpu)})  # fmt: skip
        ckpt.close()
        dist.barrier()
        extra: dict[str, Any] = {}
        if rank == 0:
            raw = (root / layout.step_dir(args.reps) / "manifest.json").read_bytes()
            if not raw:
                raise SystemExit("no manifest")
            extra["manifest_bytes"] = len(raw)
            extra["parse_wall"], extra["parse_cpu"] = best(
                lambda raw=raw: manifest.Manifest.from_bytes(raw, "m")
            )
        everyone = [None] * world
        dist.all_gather_object(everyone, reps)
        if rank == 0:
            out.append({"world": world, "tensors": n, "ranks": everyone, **extra})
        shutil.rmtree(root, ignore_errors=True) if rank == 0 else None
        dist.barrier()
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace, root: Path, out: Path) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [sys.executable, __file__, "worker", "--tensors", args.tensors, "--reps", str(args.reps),
               "--root", str(root), "--out", str(out)] + (["--root-gather"] if args.root_gather else [])  # fmt: skip
        cmd += ["--incremental"] if args.incremental else []
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"world {world}: a rank failed")
    return json.loads(out.read_text())


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """Per (world, tensors): the last repetition (warm) of each rank, worst and median rank."""
    last = [reps[-1] for reps in r["ranks"]]
    walls = [x["save_wall"] for x in last]
    r0 = last[0]
    g = lambda d, k: d.get(k, 0.0)  # noqa: E731
    return {
        "world": r["world"],
        "tensors": r["tensors"],
        "chunks": r["world"] * r["tensors"],
        "save_wall_max": max(walls),
        "save_wall_median": statistics.median(walls),
        "prepare_cpu_median": statistics.median(g(x["cpu"], "prepare") for x in last),
        "persist_cpu_nonroot_median": statistics.median(g(x["cpu"], "persist") for x in last[1:])
        if len(last) > 1
        else 0.0,
        "gathers_cpu_nonroot_median": statistics.median(g(x["cpu"], "gathers") for x in last[1:])
        if len(last) > 1
        else 0.0,
        "write_cpu_median": statistics.median(g(x["cpu"], "write_rank_file") for x in last),
        "broadcasts_cpu_nonroot_median": statistics.median(
            g(x["cpu"], "broadcasts") for x in last[1:]
        )
        if len(last) > 1
        else 0.0,
        "broadcasts_wall_nonroot_median": statistics.median(
            g(x["wall"], "broadcasts") for x in last[1:]
        )
        if len(last) > 1
        else 0.0,
        "retention_cpu": g(r0["cpu"], "retention"),
        "proc_cpu_median": statistics.median(x["save_proc_cpu"] for x in last),
        "root_gathers_wall": g(r0["wall"], "gathers"),
        "root_gathers_cpu": g(r0["cpu"], "gathers"),
        "commit_wall": g(r0["wall"], "commit"),
        "commit_cpu": g(r0["cpu"], "commit"),
        "to_bytes_cpu": g(r0["cpu"], "manifest_to_bytes"),
        "unwritten_cpu": g(r0["cpu"], "unwritten_keys"),
        "manifest_bytes": r["manifest_bytes"],
        "parse_cpu": r["parse_cpu"],
    }


def real(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for world in [int(w) for w in args.worlds.split(",")]:
        base = Path(tempfile.mkdtemp(prefix=f"bench-scale-{world}-"))
        try:
            t0 = time.perf_counter()
            res = launch(world, args, base / "ckpt", base / "result.json")
            print(
                f"# world {world}: {time.perf_counter() - t0:.1f}s, load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
            )
        finally:
            shutil.rmtree(base, ignore_errors=True)
        raw.extend(res)
        for r in res:
            s = summarize(r)
            rows.append(s)
            print(json.dumps(s), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        Path(args.json).with_suffix(".raw.json").write_text(json.dumps(raw))
    print()
    print("| ranks | tensors | chunks | save wall max / median ms | prepare CPU ms | write CPU ms | "
          "non-root gathers CPU ms | rank-0 commit CPU ms (wall) | to_bytes CPU ms | manifest KB | parse CPU ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in rows:
        print(
            f"| {s['world']} | {s['tensors']} | {s['chunks']} | {s['save_wall_max'] * 1e3:.0f} / {s['save_wall_median'] * 1e3:.0f} "
            f"| {s['prepare_cpu_median'] * 1e3:.0f} | {s['write_cpu_median'] * 1e3:.0f} | {s['gathers_cpu_nonroot_median'] * 1e3:.0f} "
            f"| {s['commit_cpu'] * 1e3:.0f} ({s['commit_wall'] * 1e3:.0f}) | {s['to_bytes_cpu'] * 1e3:.0f} "
            f"| {s['manifest_bytes'] / 1024:.0f} | {s['parse_cpu'] * 1e3:.0f} |"
        )


# ---- sim: the coordinator's work for N synthetic ranks ------------------------------------------
RNG_KEYS = ("rng/python", "rng/numpy", "rng/torch")  # per-rank tensors (differ between ranks)


def synthetic(world: int, n: int) -> tuple[list[Any], list[Any]]:
    """The gathered (RankResult, tree) of ``world`` ranks, each holding a 1/world chunk of ``n``
    sharded float32 tensors (``Shard(0)``) and 3 per-rank RNG tensors, as the protocol builds them."""
    from savegame.distributed import planning
    from savegame.engine.writer import RankResult
    from savegame.format import layout, manifest

    length = ELEMS * 4
    results, trees = [], []
    header = 64 * (n + 4)
    for r in range(world):
        name = layout.tensor_file(r)
        h = f"{r:032x}"
        entries: dict[str, manifest.TensorEntry] = {}
        off = header
        for i in range(n):
            key = f"model/p{i:05d}"
            c = manifest.Chunk(name, off, length, h, (r * ELEMS,), (ELEMS,))
            entries[key] = manifest.TensorEntry("float32", (world * ELEMS,), (c,))
            off += length
        for k in RNG_KEYS:
            key = planning.rank_key(r, k)
            entries[key] = manifest.TensorEntry(
                "uint8", (length,), (manifest.Chunk(name, off, length, h, (0,), (length,)),)
            )
            off += length
        files = {name: manifest.FileEntry(size=off, hash=h, header_length=header, rank=r)}
        results.append(RankResult(r, files, entries))
        trees.append({
            "model": {f"p{i:05d}": {"$tensor": f"model/p{i:05d}"} for i in range(n)},
            "rng": {k.split("/")[1]: {"$tensor": planning.rank_key(r, k)} for k in RNG_KEYS},
        })  # fmt: skip
    return results, trees


def merge_current(results: list[Any]) -> dict[str, Any]:
    """Verbatim copy of the merge loop in writer.commit (tuple concatenation per chunk)."""
    from savegame.format import manifest

    entries: dict[str, Any] = {}
    for r in sorted(results, key=lambda r: r.rank):
        for key, e in r.tensors.items():
            if key in entries:
                prev = entries[key]
                entries[key] = manifest.TensorEntry(prev.dtype, prev.shape, prev.chunks + e.chunks)
            else:
                entries[key] = e
    return entries


def merge_linear(results: list[Any]) -> dict[str, Any]:
    """Proposed: collect the chunks in a list per key, build each entry once."""
    from savegame.format import manifest

    first: dict[str, Any] = {}
    chunks: dict[str, list[Any]] = {}
    for r in sorted(results, key=lambda r: r.rank):
        for key, e in r.tensors.items():
            if key in first:
                chunks[key].extend(e.chunks)
            else:
                first[key] = e
                chunks[key] = list(e.chunks)
    return {k: e if len(chunks[k]) == len(e.chunks) else manifest.TensorEntry(e.dtype, e.shape, tuple(chunks[k]))
            for k, e in first.items()}  # fmt: skip


def unwritten_linear(trees: list[Any], written: Any) -> dict[int, list[str]]:
    """Proposed planning.unwritten_keys: the set of written keys built once, not per rank."""
    from savegame.distributed.planning import tensor_refs

    written = written if isinstance(written, (set, frozenset)) else set(written)
    out: dict[int, list[str]] = {}
    for rank, tree in enumerate(trees):
        missing = sorted(k for k in set(tensor_refs(tree)) if k not in written)
        if missing:
            out[rank] = missing
    return out


def trees_check(trees: list[Any], entries: dict[str, Any], hoisted: bool) -> None:
    """The per-rank tree check of Manifest._from_body: current (key->dtype dict rebuilt per
    rank) vs proposed (built once)."""
    from savegame import tree as treelib

    dtypes = {k: e.dtype for k, e in entries.items()} if hoisted else None
    for skeleton in trees:
        treelib.check(
            skeleton, dtypes if hoisted else {k: e.dtype for k, e in entries.items()}, path="m"
        )


def sim_one(world: int, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from savegame.distributed import planning
    from savegame.engine import writer
    from savegame.format import layout, manifest

    results, trees = synthetic(world, n)
    reps = 1 if world * n > 100_000 else args.reps
    row: dict[str, Any] = {"world": world, "tensors": n, "chunks": world * n}
    # What one rank sends to the gather, and what every rank unpickles from an all_gather.
    payloads = [pickle.dumps(("ok", r, t)) for r, t in zip(results, trees, strict=True)]
    row["payload_bytes_per_rank"] = len(payloads[0])
    row["unpickle_all_cpu"] = best(lambda: [pickle.loads(p) for p in payloads], reps)[1]
    written = {k for r in results for k in r.tensors}
    row["unwritten_cpu"] = best(lambda: planning.unwritten_keys(trees, written), reps)[1]
    row["merge_cpu"] = best(lambda: merge_current(results), reps)[1]
    if args.patched:
        row["unwritten_linear_cpu"] = best(lambda: unwritten_linear(trees, written), reps)[1]
        row["merge_linear_cpu"] = best(lambda: merge_linear(results), reps)[1]
    ph = Phases()
    orig_to_bytes = manifest.Manifest.to_bytes

    def to_bytes(self: Any) -> bytes:
        with ph.time("to_bytes"):
            raw = orig_to_bytes(self)
        row["manifest_bytes"] = len(raw)
        return raw

    manifest.Manifest.to_bytes = to_bytes  # type: ignore[method-assign]
    commits = []
    try:
        for rep in range(reps):
            ph.reset()
            st = writer.begin(tmp, rep + 1)
            with ph.time("commit"):
                writer.commit(tmp, st, rep + 1, results, trees=trees, run_id="sim")
            commits.append((ph.wall["commit"], ph.cpu["commit"], ph.cpu["to_bytes"]))
    finally:
        manifest.Manifest.to_bytes = orig_to_bytes  # type: ignore[method-assign]
    row["commit_wall"], row["commit_cpu"], row["to_bytes_cpu"] = min(commits, key=lambda c: c[1])
    raw = (tmp / layout.step_dir(reps) / "manifest.json").read_bytes()
    row["parse_cpu"] = best(lambda: manifest.Manifest.from_bytes(raw, "m"), reps)[1]
    entries = merge_linear(results)
    row["trees_check_cpu"] = best(lambda: trees_check(trees, entries, False), reps)[1]
    if args.patched:
        row["trees_check_hoisted_cpu"] = best(lambda: trees_check(trees, entries, True), reps)[1]
    if args.profile and world * n >= args.profile:
        import cProfile
        import pstats

        st = writer.begin(tmp, 999)
        prof = cProfile.Profile()
        prof.enable()
        writer.commit(tmp, st, 999, results, trees=trees, run_id="sim")
        prof.disable()
        print(f"## cProfile of writer.commit, {world} ranks x {n} tensors", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(8)
        prof = cProfile.Profile()
        prof.enable()
        manifest.Manifest.from_bytes(raw, "m")
        prof.disable()
        print(f"## cProfile of Manifest.from_bytes, {world} ranks x {n} tensors", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(8)
    for p in tmp.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return row


def sim(args: argparse.Namespace) -> None:
    import savegame  # noqa: F401 - import cost outside the timings

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-sim-"))
    try:
        for n in [int(t) for t in args.tensors.split(",")]:
            for world in [int(w) for w in args.ranks.split(",")]:
                if world * n > args.max_chunks:
                    continue
                row = sim_one(world, n, args, tmp)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    cols = ["commit CPU ms", "merge ms", "unwritten ms", "to_bytes ms", "manifest MB", "parse ms",
            "tree check ms", "payload KB/rank", "unpickle all ms"]  # fmt: skip
    if args.patched:
        cols += ["merge linear ms", "unwritten linear ms", "tree check hoisted ms"]
    print("| ranks | tensors | chunks | " + " | ".join(cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for r in rows:
        vals = [r["commit_cpu"] * 1e3, r["merge_cpu"] * 1e3, r["unwritten_cpu"] * 1e3, r["to_bytes_cpu"] * 1e3,
                r["manifest_bytes"] / 1e6, r["parse_cpu"] * 1e3, r["trees_check_cpu"] * 1e3,
                r["payload_bytes_per_rank"] / 1e3, r["unpickle_all_cpu"] * 1e3]  # fmt: skip
        if args.patched:
            vals += [
                r["merge_linear_cpu"] * 1e3,
                r["unwritten_linear_cpu"] * 1e3,
                r["trees_check_hoisted_cpu"] * 1e3,
            ]
        print(
            f"| {r['world']} | {r['tensors']} | {r['chunks']} | "
            + " | ".join(f"{v:.1f}" for v in vals)
            + " |"
        )


# ---- fit: the cost model of docs/scale.md ------------------------------------------------------
def lstsq(
    rows: list[dict[str, Any]], y: str, terms: dict[str, Callable[[dict[str, Any]], float]]
) -> dict[str, float]:
    """Least squares of ``y`` on ``terms`` (no intercept unless a term is constant), weighted by
    1/y so that the small cases count as much as the large ones (relative error)."""
    import numpy as np

    a = np.array([[f(r) / r[y] for f in terms.values()] for r in rows if r[y] > 0])
    b = np.ones(len(a))
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    worst = float(np.max(np.abs(a @ coef - 1))) if len(a) else 0.0
    return {**{k: float(c) for k, c in zip(terms, coef, strict=True)}, "max_rel_err": worst}


def fit(args: argparse.Namespace) -> None:
    # A Llama-2-70B-shaped run (docs/scale.md): 723 parameters x (bf16 weight, fp32 master, Adam
    # exp_avg, exp_avg_sq) = 2,892 sharded tensors; 14 bytes of state per parameter.
    T70, PARAMS, BYTES_PER_PARAM = 2892, 70e9, 14
    models: dict[str, Any] = {}
    if args.real:
        real_rows = json.loads(Path(args.real).read_text())
        multi = [r for r in real_rows if r["world"] > 1]
        models["real.manifest_bytes"] = lstsq(
            real_rows,
            "manifest_bytes",
            {"per_rank": lambda r: r["world"], "per_chunk": lambda r: r["chunks"]},
        )
        models["real.parse_cpu"] = lstsq(
            real_rows,
            "parse_cpu",
            {
                "const": lambda r: 1.0,
                "per_rank": lambda r: r["world"],
                "per_chunk": lambda r: r["chunks"],
            },
        )
        models["real.commit_cpu"] = lstsq(
            real_rows,
            "commit_cpu",
            {
                "const": lambda r: 1.0,
                "per_rank": lambda r: r["world"],
                "per_chunk": lambda r: r["chunks"],
            },
        )
        models["real.prepare_cpu"] = lstsq(
            real_rows,
            "prepare_cpu_median",
            {"const": lambda r: 1.0, "per_tensor": lambda r: r["tensors"]},
        )
        models["real.write_cpu"] = lstsq(
            real_rows,
            "write_cpu_median",
            {"const": lambda r: 1.0, "per_tensor": lambda r: r["tensors"]},
        )
        models["real.nonroot_gather_cpu"] = lstsq(
            multi,
            "gathers_cpu_nonroot_median",
            {"const": lambda r: 1.0, "per_gathered_chunk": lambda r: r["chunks"]},
        )
    if args.sim:
        # Below ~5,000 chunks fixed costs (fsyncs, imports warm-up) dominate: fit the growth above.
        sim_rows = [r for r in json.loads(Path(args.sim).read_text()) if r["chunks"] >= 5000]
        models["sim.merge_cpu"] = lstsq(
            sim_rows,
            "merge_cpu",
            {
                "per_chunk": lambda r: r["chunks"],
                "per_chunk_x_rank": lambda r: r["chunks"] * r["world"],
            },
        )
        models["sim.to_bytes_cpu"] = lstsq(
            sim_rows, "to_bytes_cpu", {"per_chunk": lambda r: r["chunks"]}
        )
        models["sim.parse_cpu"] = lstsq(
            sim_rows,
            "parse_cpu",
            {"per_chunk": lambda r: r["chunks"], "per_rank_x_rank": lambda r: r["world"] ** 2},
        )
        models["sim.unwritten_cpu"] = lstsq(
            sim_rows,
            "unwritten_cpu",
            {"per_chunk": lambda r: r["chunks"], "per_rank_x_rank": lambda r: r["world"] ** 2},
        )
        models["sim.commit_cpu"] = lstsq(
            sim_rows,
            "commit_cpu",
            {
                "per_chunk": lambda r: r["chunks"],
                "per_chunk_x_rank": lambda r: r["chunks"] * r["world"],
            },
        )
        models["sim.manifest_bytes"] = lstsq(
            sim_rows,
            "manifest_bytes",
            {"per_rank": lambda r: r["world"], "per_chunk": lambda r: r["chunks"]},
        )
        models["sim.unpickle_all_cpu"] = lstsq(
            sim_rows, "unpickle_all_cpu", {"per_chunk": lambda r: r["chunks"]}
        )
    print(json.dumps(models, indent=1))
    for n in (512, 4096):
        c = n * T70
        print(
            f"# {n} ranks: {c:,} chunks, {BYTES_PER_PARAM * PARAMS / n / 1e9:.2f} GB of state per rank"
        )
        for name, m in models.items():
            terms = {"const": 1, "per_rank": n, "per_chunk": c, "per_tensor": T70, "per_gathered_chunk": c,
                     "per_chunk_x_rank": c * n, "per_rank_x_rank": n * n}  # fmt: skip
            v = sum(m[k] * terms[k] for k in m if k != "max_rel_err")
            print(f"  {name}: {v:,.3g}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("real")
    a.add_argument("--worlds", default="1,2,4,8,16")
    a.add_argument("--tensors", default="100,1000,10000")
    a.add_argument("--reps", type=int, default=2)
    a.add_argument(
        "--root-gather", action="store_true", help="scratch: gather results to rank 0 only"
    )
    a.add_argument("--incremental", action="store_true", help="the default (incremental) saves")
    a.add_argument("--json")
    w = sub.add_parser("worker")
    w.add_argument("--tensors")
    w.add_argument("--reps", type=int)
    w.add_argument("--root")
    w.add_argument("--out")
    w.add_argument("--root-gather", action="store_true")
    w.add_argument("--incremental", action="store_true")
    s = sub.add_parser("sim")
    s.add_argument("--ranks", default="1,2,4,8,16,64,256,512,1024,4096")
    s.add_argument("--tensors", default="10,100")
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--max-chunks", type=int, default=500_000)
    s.add_argument("--patched", action="store_true", help="also time the proposed linear loops")
    s.add_argument(
        "--profile", type=int, default=0, help="cProfile commit + parse from this many chunks on"
    )
    s.add_argument("--json")
    f = sub.add_parser("fit")
    f.add_argument("--real", help="JSON written by `real --json`")
    f.add_argument("--sim", help="JSON written by `sim --json`")
    args = ap.parse_args()
    {"real": real, "worker": worker, "sim": sim, "fit": fit}[args.mode](args)


if __name__ == "__main__":
    main()
