"""Where the time of a fresh-machine restore from S3 goes (issue 11): a timeline of one
``Checkpointer(url).restore(state)`` against moto on loopback, next to the raw parallel
download of the same bytes, in the same process.

Run: ``python benchmarks/trace_remote_restore.py --mb 64 --repeats 5``

Every obstore call savegame makes (``get``, ``put``, ``head``, ``list``, ``list_with_delimiter``,
``delete``) is wrapped to record its start and end (for a GET: until its headers arrived; a
data range's body is the ``readinto`` span around it), with the thread it ran on; the Python
phases of the start-up and of the restore (lease, ``run.json``, garbage collection, listing,
planning, the pull, the copy into live tensors, decoding) are wrapped the same way. Prints,
per repeat, the construction + ``restore()`` time and the same-shape raw download's (a pool of
ranged ``obstore.get`` cut as savegame cuts them, as ``bench_remote.py`` does), then the
timeline of the median repeat and a table of median phase times over the repeats.

Only a measuring tool: the wrappers cost a few microseconds per call.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_remote as br  # noqa: E402

import savegame as sg  # noqa: E402
from savegame.engine import reader  # noqa: E402
from savegame.format import layout  # noqa: E402
from savegame.storage import locate  # noqa: E402

#: (label, start, end, thread name, depth) of every span recorded since the last ``take``.
_SPANS: list[tuple[str, float, float, str, int]] = []
_LOCK = threading.Lock()
_DEPTH = threading.local()
_ON = [False]


def _record(label: str, start: float, end: float, depth: int) -> None:
    if _ON[0]:
        with _LOCK:
            _SPANS.append((label, start, end, threading.current_thread().name, depth))


def _wrap(owner: Any, attr: str, label: Callable[..., str] | str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def traced(*args: Any, **kw: Any) -> Any:
        depth = getattr(_DEPTH, "d", 0)
        _DEPTH.d = depth + 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            _DEPTH.d = depth
            name = label(*args, **kw) if callable(label) else label
            _record(name, t0, time.perf_counter(), depth)

    setattr(owner, attr, traced)


def _key(path: Any) -> str:
    p = str(path)
    parts = p.split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else p


def install() -> None:
    """Wrap obstore's calls and savegame's phases (module attributes: every caller looks them
    up at call time)."""
    import obstore

    from savegame.checkpointer import facade, restoring, retention, runfile, tiers
    from savegame.engine import fetch, staging
    from savegame.storage import objectstore

    def req(kind: str) -> Callable[..., str]:
        def label(store: Any, path: Any = None, *a: Any, **kw: Any) -> str:
            opts = kw.get("options") or {}
            rng = opts.get("range") if isinstance(opts, dict) else None
            mode = kw.get("mode")
            extra = f" range={rng}" if rng else ""
            extra += f" mode={mode}" if isinstance(mode, str) else (" if-match" if mode else "")
            if isinstance(path, list):
                return f"HTTP {kind} [{len(path)} keys]"
            return f"HTTP {kind} {_key(path) if path else '/'}{extra}"

        return label

    for name in ("get", "put", "head", "delete", "list_with_delimiter"):
        _wrap(obstore, name, req(name.upper() if name != "list_with_delimiter" else "LIST/"))

    # obstore.list returns a stream: time until the whole listing was read
    real_list = obstore.list

    def traced_list(store: Any, prefix: Any = None, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        chunks = list(real_list(store, prefix, *a, **kw))
        where = _key(prefix) if prefix else "/ (every object)"
        _record(f"HTTP LIST {where}", t0, time.perf_counter(), getattr(_DEPTH, "d", 0))
        return iter(chunks)

    obstore.list = traced_list

    _wrap(objectstore._ObjBlob, "readinto",
          lambda self, off, dest: f"readinto {_key(self._key)} @{off >> 20}M +{len(dest) >> 20}M")  # fmt: skip
    _wrap(objectstore.Lease, "acquire", "Lease.acquire")
    _wrap(objectstore.Lease, "release", "Lease.release")
    _wrap(objectstore.ObjectStore, "begin_snapshot", "begin_snapshot")
    _wrap(runfile, "open_run", "runfile.open_run")
    _wrap(runfile, "_holds_manifest", "runfile._holds_manifest")
    _wrap(runfile, "_run_id", "runfile._run_id")
    _wrap(runfile, "start_session", "runfile.start_session")
    _wrap(retention, "collect_garbage", "retention.collect_garbage")
    _wrap(retention, "run_position", "retention.run_position")
    _wrap(reader, "list_checkpoints", "reader.list_checkpoints")
    _wrap(reader, "read_manifest", lambda ckpt, *a, **k: f"reader.read_manifest {_key(ckpt)}")
    _wrap(reader, "load_tensors", "reader.load_tensors")
    _wrap(reader, "_pull_unmapped", "reader._pull_unmapped")
    _wrap(reader, "_open_checked", "reader._open_checked")
    _wrap(reader, "_check_header", "reader._check_header")
    _wrap(fetch, "pull", "fetch.pull")
    # the data read ahead of the lease (its thread), and the restore's claim of it (the wait)
    _wrap(objectstore.ObjectStore, "newest_before_lease", "ReadAhead: wait for listing+manifest")
    _wrap(fetch.ReadAhead, "_read", lambda self, f, *a: f"ReadAhead._read {_key(f.key)}")
    _wrap(fetch.ReadAhead, "claim", lambda self, key, *a: f"ReadAhead.claim {_key(key)}")
    # when the chunks are hashed (the read-ahead: in file order as bytes arrive, once the
    # manifest is in; "hash" spans, one per piece: kept out of the timeline) and each piece of
    # a data body as it arrives ("piece" spans, likewise): summarised as milestones
    if hasattr(fetch.ReadAhead, "_advance"):
        _wrap(fetch.ReadAhead, "_advance", "hash")
    else:  # (before the in-order hash: per request, once it and the manifest were in)
        _wrap(fetch.ReadAhead, "_hash_done", "hash")
    _wrap(fetch._CopySink, "take", "piece")
    _wrap(fetch._Sink, "take", "piece")
    _wrap(fetch.Staging, "new", "fetch.Staging.new")
    _wrap(staging, "copy_choice", "staging.copy_choice")
    _wrap(restoring, "restore_whole", "restoring.restore_whole")
    _wrap(restoring, "_live_destinations", "restoring._live_destinations")
    _wrap(restoring, "set_aside_damaged", "restoring.set_aside_damaged")
    _wrap(facade.Checkpointer, "__init__", "Checkpointer.__init__")
    _wrap(facade.Checkpointer, "restore", "Checkpointer.restore")
    _wrap(facade.Checkpointer, "_setup_ranks", "Checkpointer._setup_ranks")
    _wrap(facade.Checkpointer, "_end_snapshots", "Checkpointer._end_snapshots")
    _wrap(tiers.Tiers, "refs", "Tiers.refs")
    from savegame import tree as treelib
    from savegame.state import overrides

    _wrap(treelib, "decode", "tree.decode")
    _wrap(overrides, "apply", "overrides.apply")
    _wrap(overrides, "select", "overrides.select")

    # the batched copy into live tensors (staging.copy_choice("restore").copy_segments)
    real_choice = staging.copy_choice

    def choice(*a: Any, **k: Any) -> Any:
        c = real_choice(*a, **k)
        if hasattr(c, "copy_segments") and not getattr(c, "_traced", False):
            with_trace = c.copy_segments

            def copy_segments(segs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return with_trace(segs)
                finally:
                    total = sum(s[2] for s in segs)
                    _record(f"copy_segments {len(segs)} segs {total >> 20} MiB", t0,
                            time.perf_counter(), getattr(_DEPTH, "d", 0))  # fmt: skip

            try:
                c.copy_segments = copy_segments
                c._traced = True
            except AttributeError:
                pass
        return c

    staging.copy_choice = choice


def take() -> list[tuple[str, float, float, str, int]]:
    with _LOCK:
        out = list(_SPANS)
        _SPANS.clear()
    return out


def show(spans: list[tuple[str, float, float, str, int]], t0: float) -> None:
    for kind, what in (("piece", "body pieces (first .. last data byte)"),
                       ("hash", "hash calls (first .. last)")):  # fmt: skip
        got = [s for s in spans if s[0] == kind]
        if got:
            print(f"{(min(s[1] for s in got) - t0) * 1e3:8.1f} {(max(s[2] for s in got) - t0) * 1e3:8.1f}"
                  f" {sum(s[2] - s[1] for s in got) * 1e3:7.1f} ms  {len(got)} {what}")  # fmt: skip
    for label, a, b, thread, depth in sorted(spans, key=lambda s: (s[1], s[4])):
        if label in ("piece", "hash"):
            continue
        indent = "  " * depth if thread == "MainThread" else "    | "
        print(f"{(a - t0) * 1e3:8.1f} {(b - t0) * 1e3:8.1f} {(b - a) * 1e3:7.1f} ms  "
              f"{thread[:22]:22s} {indent}{label}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", action="store_true", help="restore with an empty cache folder")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="sg-trace-remote-"))
    with br.moto_server() as endpoint:
        br.s3_env(endpoint)
        br.make_bucket(endpoint, "bench")
        url = "s3://bench/runs/exp"
        model, opt = br.build_state(args.mb)
        state = sg.TrainState(model=model, optimizer=opt, rng=False)
        with sg.Checkpointer(url, handle_signals=False) as ckpt:
            ckpt.save(state, 1)
        loc = locate(f"{url}/{layout.step_dir(1)}")
        m = reader.read_manifest(loc)
        store = loc.store
        paths = [(store._p(loc.sub(n)), f.size) for n, f in m.files.items()]
        nbytes = sum(f.size for f in m.files.values())
        print(f"checkpoint: {nbytes / 2**20:.1f} MiB in {len(m.files)} file(s), "
              f"{len(m.tensors)} tensors")  # fmt: skip
        raw = br.raw_get(store._obs, paths)
        install()
        raw()  # warm-up
        runs: list[tuple[float, float, float, list[Any], float]] = []
        for rep in range(args.repeats + 1):  # the first: warm-up, not counted
            where: dict[str, Any] = {}
            if args.cache:
                where["cache"] = work / f"cache-{rep}"
            _ON[0] = True
            take()
            t0 = time.perf_counter()
            c = sg.Checkpointer(url, handle_signals=False, **where)
            assert c.restore(state) == 1
            t1 = time.perf_counter()
            c.close()
            t2 = time.perf_counter()
            spans = take()
            _ON[0] = False
            r = raw()["threads"]
            if rep:
                runs.append((t1 - t0, t2 - t1, r, spans, t0))
            print(f"  repeat {rep}{' (warm-up)' if not rep else ''}: construction+restore "
                  f"{(t1 - t0) * 1e3:.1f} ms, close {(t2 - t1) * 1e3:.1f} ms, raw threads "
                  f"{r * 1e3:.1f} ms, ratio {(t1 - t0) / r:.2f}", flush=True)  # fmt: skip
        ours = statistics.median(x[0] for x in runs)
        raws = statistics.median(x[2] for x in runs)

        def first(spans: list[Any], t0: float, what: Callable[[str], bool]) -> float:
            return min((a - t0 for label, a, *_ in spans if what(label)), default=float("nan"))

        built = statistics.median(
            first(sp, t0, lambda lb: lb == "Checkpointer.restore") for *_, sp, t0 in runs
        )
        data = statistics.median(
            first(sp, t0, lambda lb: lb.startswith("HTTP GET") and ".safetensors" in lb)
            for *_, sp, t0 in runs
        )
        small = statistics.median(
            sum(1 for label, *_ in sp if label.startswith("HTTP") and ".safetensors" not in label)
            for *_, sp, _t0 in runs
        )
        print(f"\nmedian: construction+restore {ours * 1e3:.1f} ms, raw threads "
              f"{raws * 1e3:.1f} ms, ratio {ours / raws:.2f}; constructed at {built * 1e3:.1f} ms, "
              f"first data GET at {data * 1e3:.1f} ms, {small:.0f} other requests (close "
              f"included); load average at end "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")  # fmt: skip
        mid = sorted(runs, key=lambda x: x[0])[len(runs) // 2]
        print(f"timeline of the median repeat ({mid[0] * 1e3:.1f} ms; start ms, end ms, took):")
        show(mid[3], mid[4])
        # per-label medians over the repeats (sum of a label's spans in one repeat)
        per: dict[str, list[float]] = {}
        for *_, spans, _t0 in runs:
            sums: dict[str, float] = {}
            for label, a, b, _th, _d in spans:
                key = label.split(" range=")[0].split(" @")[0]
                sums[key] = sums.get(key, 0.0) + (b - a)
            for k, v in sums.items():
                per.setdefault(k, []).append(v)

        # milestones per repeat, then their medians: what stands between the last data byte
        # and the return of restore() (the critical path the raw download does not have)
        def ends(sp: list[Any], t0: float, what: Callable[[str], bool]) -> float:
            return max((b - t0 for label, _a, b, *_ in sp if what(label)), default=float("nan"))

        marks: dict[str, list[float]] = {}
        for took, _close, _r, sp, t0 in runs:
            last = ends(sp, t0, lambda lb: lb == "piece")
            row = {
                "first data byte": first(sp, t0, lambda lb: lb == "piece"),
                "last data byte": last,
                "last hash done": ends(sp, t0, lambda lb: lb == "hash"),
                "claim returned": ends(sp, t0, lambda lb: lb.startswith("ReadAhead.claim")),
                "copy into live started": first(sp, t0, lambda lb: lb.startswith("copy_segments")),
                "copy into live done": ends(sp, t0, lambda lb: lb.startswith("copy_segments")),
                "restore() returned": took,
                "tail: return - last data byte": took - last,
            }
            for k, v in row.items():
                marks.setdefault(k, []).append(v)
        print("\nmilestones, median over the repeats (ms from construction):")
        for k, v in marks.items():
            print(f"  {statistics.median(v) * 1e3:8.1f}  {k}")
        print("\nmedian total per label over the repeats (ms; concurrent spans add up):")
        for k, v in sorted(per.items(), key=lambda kv: -statistics.median(kv[1])):
            print(f"  {statistics.median(v) * 1e3:8.1f}  x{len(v)}  {k}")


if __name__ == "__main__":
    main()
