"""Remote storage (issue 11): savegame against obstore's own raw transfers of the same bytes, on
one S3-compatible server on loopback (moto, in its own process), in one run.

Run: ``python benchmarks/bench_remote.py --mb 128 --repeats 3``

Each row is a savegame operation and the raw obstore transfer of the same bytes it is compared
with; the methods of a row run ``--repeats`` times, interleaved, and the table shows medians,
the ratio savegame / raw (the issue asks ≤ 1.1 for a restore) and the peak anonymous memory a
savegame run added (``RssAnon``: the staging, bounce buffers and fresh tensors; file-backed
pages of a spooled restore are the kernel's page cache and are not counted).

Rows (add one with :func:`row`):
  * restore, live model     ``Checkpointer(url).restore(state)`` into a live model and optimizer
    (a resume on a fresh machine): bytes wait in memory until every hash matched. Timed: the
    construction and the restore (what a resume waits for before its first step); the
    ``close()`` that ends the session (the lease's DELETE: at the end of training) is timed
    on its own, right after, and shown in the "close() s" column — never hidden.
  * restore, no read-ahead  the same with ``engine.fetch.READ_AHEAD = False``: the data GETs wait
    for the lease and the holder's listing (the path before the read-ahead; paired with it)
  * restore, fresh cache    ``Checkpointer(url, cache=empty_folder).restore(state)``: the same
    resume of a run with a local cache tier, on a machine whose cache is empty
  * restore, spooled        the same with ``SAVEGAME_STAGING_MEMORY=0``: they wait in a temp file
  * load, fresh tensors     ``sg.load(url)``: every tensor is new memory, read straight into
  * verify                  ``savegame.engine.reader.verify(url)``: every byte hashed, bounded memory
The raw side, into memory: ``obstore.get_ranges`` over each object in ``REQUEST_BYTES`` ranges
(obstore coalesces them: one GET per object) and a thread pool of ``REQUESTS_IN_FLIGHT`` ranged
``obstore.get`` calls cut as savegame's restore cuts them (the same number of equal ranges,
``engine.fetch._parts``: the shape of savegame's reads); the ratio is shown to both. moto answers
every ranged GET by copying the *whole* object under a lock, so on moto each request costs
O(object size) and fewer, larger requests win; on S3 itself parallel 8-16 MiB ranges are what
AWS recommends. Read the "ratio to raw threads" column as savegame's own overhead.

Push and pull rows (issue 11 asks savegame's throughput >= 0.9x the raw transfer's):
  * push                    ``transfer.push(local_run, s3://…/fresh-prefix)`` of a local run (one
    checkpoint) against ``obstore.put`` of every file of that run from its path, all files at
    once in threads (obstore picks multipart and its part concurrency itself)
  * pull                    ``transfer.pull(s3://…/run, fresh_local_folder)`` against one
    ``obstore.get`` per object, all objects at once in threads, each streamed into a local
    file (``get→file``) and the same with an fsync of each file (``get→file+fsync``: the
    durability a pull gives: the manifest commits only after the data is synced)
Each repeat writes to a fresh destination, deleted after (outside the timing).

Then the training stall (issue 11: a remote root with a local cache must not stall training
more than 1.05x a local-only run): four Checkpointers open at once on the same state, saving on
the same schedule — ``Checkpointer(s3_url, cache=folder)`` and ``Checkpointer(folder)``, each
with ``async_save`` True and False. In each round every one of them (rotating order) trains for
``--gap`` seconds (real optimizer steps on the state) and then calls ``step()`` (``Every(steps=1)``:
every call saves); the stall is the time ``step()`` takes on the training thread. The upload of
a remote save runs in the background during the next gap; the gap is chosen longer than one
push so an upload does not spill into another configuration's save. The table shows the median
stall per configuration and the median of the per-round ratios remote / local of the same mode
(paired: same round), plus the training steps per second in the gaps (the background persist
and upload share the machine's CPUs with training).

Prints a markdown table and appends a JSON line to ``bench-out/remote.jsonl``.

``--sweep 16 64 256``: only the fresh-machine restore against the same-shape raw download, at
each size, paired, with a fit ``time = a + b·bytes`` for each side (see :func:`sweep`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


import savegame as sg  # noqa: E402
from savegame.engine import reader  # noqa: E402
from savegame.format import layout  # noqa: E402
from savegame.storage import locate  # noqa: E402
from savegame.tools import transfer  # noqa: E402

KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"


# ---- the server ------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a child process on 127.0.0.1 (its own GIL); yields the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def s3_env(endpoint: str) -> None:
    os.environ.update(
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_REGION=REGION,
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
    )


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    ).create_bucket(Bucket=name)


# ---- the state -------------------------------------------------------------------------------


def build_state(mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers + Adam moments: 1/3 weights, 2/3 optimizer state, ``mb`` MiB in all."""
    width = 2048
    n_params = max(width * width, (mb << 20) // 12)
    layers = max(1, n_params // (width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


# ---- measuring -------------------------------------------------------------------------------


def _rss_anon() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """Seconds ``fn`` took and the peak anonymous memory it added (sampled every 2 ms)."""
    base, peak, done = _rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        t.join()
    del out
    return elapsed, max(0, peak[0] - base)


@dataclass
class Row:
    """One line of the table: a savegame operation and the raw transfer it is compared with.
    ``raw`` returns its timings by variant (seconds); the row compares with the fastest, and
    with ``shape`` (the raw variant closest to what savegame does). ``bar`` is the issue's bar:
    ``("time", x)`` savegame's time <= x times the raw's, ``("throughput", x)`` savegame's
    throughput >= x times the raw's. ``after`` runs after each repeat, untimed (clean-up)."""

    name: str
    ours: Callable[[], Any]
    raw: Callable[[], dict[str, float]]
    nbytes: int
    shape: str = "threads"
    bar: tuple[str, float] = ("time", 1.1)
    after: Callable[[], None] | None = None
    #: Run right after ``ours`` is timed, timed on its own (a restore's ``close()``).
    finish: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    finish_times: list[float] = field(default_factory=list)
    raw_times: dict[str, list[float]] = field(default_factory=dict)
    mem: list[int] = field(default_factory=list)


def row(rows: list[Row], *args: Any, **kw: Any) -> Row:
    r = Row(*args, **kw)
    rows.append(r)
    return r


# ---- raw obstore transfers -------------------------------------------------------------------


def raw_get(
    store: Any, paths: list[tuple[str, int]], only: tuple[str, ...] = ("get_ranges", "threads")
) -> Callable[[], dict[str, float]]:
    """obstore's own downloads of ``paths`` into memory, two ways, timed: ``get_ranges`` over
    each object in ``REQUEST_BYTES`` ranges (it coalesces neighbouring ranges: one GET per
    object here) and a pool of ``REQUESTS_IN_FLIGHT`` threads of ranged ``get`` calls
    (``only``: those of the two named)."""
    import obstore

    from savegame.engine import fetch

    req, flight = reader.REQUEST_BYTES, reader.REQUESTS_IN_FLIGHT
    total = sum(size for _, size in paths)

    def ranges(size: int) -> tuple[list[int], list[int]]:
        # the plan savegame's restore makes (engine/fetch.py): the nearest whole number of
        # equal requests of about ``req`` bytes, no small tail (on moto each request copies
        # the whole object, so the same count of requests is what makes the shapes equal)
        parts = fetch._parts(size, req, stretch=True)
        step = -(-size // parts)
        starts = list(range(0, size, step))
        return starts, [min(s + step, size) for s in starts]

    def with_get_ranges() -> int:
        n = 0
        for path, size in paths:
            starts, ends = ranges(size)
            n += sum(len(b) for b in obstore.get_ranges(store, path, starts=starts, ends=ends))
        return n

    def with_threads() -> int:
        def one(job: tuple[str, int, int]) -> int:
            path, s, e = job
            return len(obstore.get(store, path, options={"range": (s, e)}).bytes())

        jobs = [(p, s, e) for p, size in paths for s, e in zip(*ranges(size), strict=True)]
        with ThreadPoolExecutor(flight) as pool:
            return sum(pool.map(one, jobs))

    def run() -> dict[str, float]:
        out = {}
        for name, fn in (("get_ranges", with_get_ranges), ("threads", with_threads)):
            if name not in only:
                continue
            t0 = time.perf_counter()
            assert fn() == total
            out[name] = time.perf_counter() - t0
        return out

    return run


def raw_put(store: Any, files: list[tuple[Path, str]]) -> Callable[[str], float]:
    """obstore's own upload of local ``files`` (path, key under ``prefix``): one ``obstore.put``
    per file from its path (multipart and part concurrency as obstore chooses), all at once in
    threads. Returns a function of the prefix that returns the seconds it took."""
    import obstore

    def run(prefix: str) -> float:
        def one(job: tuple[Path, str]) -> None:
            path, key = job
            obstore.put(store, f"{prefix}/{key}", path)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(files)) as pool:
            list(pool.map(one, files))
        return time.perf_counter() - t0

    return run


def raw_pull(store: Any, objects: list[tuple[str, int]]) -> Callable[[Path], dict[str, float]]:
    """obstore's own download of ``objects`` (key, size) into local files under a folder: one
    ``obstore.get`` per object, all at once in threads, streamed into the file; without and
    with an fsync of each file (the durability a pull gives)."""
    import obstore

    total = sum(size for _, size in objects)

    def once(dest: Path, sync: bool) -> float:
        def one(job: tuple[str, int]) -> int:
            key, _ = job
            path = dest / key.replace("/", "__")
            n = 0
            with open(path, "wb") as f:
                for chunk in obstore.get(store, key).stream(min_chunk_size=8 << 20):
                    n += f.write(chunk)
                if sync:
                    os.fsync(f.fileno())
            return n

        dest.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(objects)) as pool:
            n = sum(pool.map(one, objects))
        elapsed = time.perf_counter() - t0
        assert n == total, (n, total)
        shutil.rmtree(dest)
        return elapsed

    def run(dest: Path) -> dict[str, float]:
        return {"get→file": once(dest, False), "get→file+fsync": once(dest, True)}

    return run


def delete_prefix(store: Any, prefix: str) -> None:
    import obstore

    keys = [o["path"] for batch in obstore.list(store, prefix) for o in batch]
    if keys:
        obstore.delete(store, keys)


def local_files(run: Path) -> list[tuple[Path, str]]:
    """The files a push of the local run moves (run.json, the checkpoints' files, LATEST)."""
    out = []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if path.is_file() and not rel.startswith(".") and "/." not in rel:
            out.append((path, rel))
    return out


# ---- training stall with a remote root + local cache vs a local-only run ----------------------


def train_for(model: torch.nn.Module, opt: torch.optim.Optimizer, seconds: float) -> int:
    """Real optimizer steps on the state (every parameter and moment is mutated) for
    ``seconds``; returns how many."""
    x = torch.randn(32, model[0].in_features)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
        n += 1
    return n


def stall_phase(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    remote: str,
    work: Path,
    rounds: int,
    gap: float,
) -> dict[str, Any]:
    """Four Checkpointers at once, interleaved round by round (rotating order)."""
    state = sg.TrainState(model=model, optimizer=opt, rng=False)
    common = dict(save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False)
    configs: dict[str, sg.Checkpointer] = {}
    for mode, flag in (("async", True), ("sync", False)):
        configs[f"remote+cache {mode}"] = sg.Checkpointer(
            f"{remote}/{mode}", cache=work / f"cache-{mode}", async_save=flag, **common
        )
        configs[f"local-only {mode}"] = sg.Checkpointer(
            work / f"local-{mode}", async_save=flag, **common
        )
    names = list(configs)
    stalls: dict[str, list[float]] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    steps = dict.fromkeys(names, 0)
    try:
        for r in range(rounds + 1):  # round 0 warms up (first-save allocations, connections)
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                done = train_for(model, opt, gap)
                rate = done / (time.perf_counter() - t0)
                steps[name] += 1
                t0 = time.perf_counter()
                assert configs[name].step(state, steps[name])
                stall = time.perf_counter() - t0
                if r:
                    stalls[name].append(stall)
                    rates[name].append(rate)
            print(f"  stall round {r}: "
                  + ", ".join(f"{n} {stalls[n][-1] if r else 0:.3f}s" for n in names), flush=True)  # fmt: skip
    finally:
        closes = {}
        for name, c in configs.items():
            t0 = time.perf_counter()
            c.close()
            closes[name] = time.perf_counter() - t0
    return {"stall_s": stalls, "steps_per_s": rates, "close_s": closes, "gap_s": gap}


# ---- main ------------------------------------------------------------------------------------


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b·x``: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


def sweep(sizes: list[int], repeats: int, out: Path) -> None:
    """``--sweep``: the fresh-machine restore (``Checkpointer(url).restore(state)`` into a live
    model, read-ahead on; construction + restore timed, ``close()`` not) against the
    same-shape raw download (a pool of ranged ``obstore.get``, cut as the restore cuts them),
    for each checkpoint size, every size in each repeat, interleaved and paired, on one moto
    server. Prints per size the medians and the median of the paired ratios, then a least
    squares fit of ``time = a + b·bytes`` over the per-size medians, for savegame and raw: ``a``
    the fixed latency, ``b`` the cost per byte; and the same fit of the paired differences
    (savegame − raw): on moto each ranged GET copies the whole object, so both sides grow
    faster than linearly and only the difference separates savegame's own fixed latency (the
    lease, the listings) from its per-byte work (hashing, the copy into live tensors).
    ``build_state`` rounds to whole 48 MiB layers: use sizes such as 64 128 256."""
    load_start = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    cases: list[tuple[int, str, Any, int, Callable[[], dict[str, float]]]] = []
    with moto_server() as endpoint:
        s3_env(endpoint)
        make_bucket(endpoint, "bench")
        for mb in sizes:
            url = f"s3://bench/runs/sweep-{mb}"
            model, opt = build_state(mb)
            state = sg.TrainState(model=model, optimizer=opt, rng=False)
            with sg.Checkpointer(url, handle_signals=False) as ckpt:
                ckpt.save(state, 1)
            loc = locate(f"{url}/{layout.step_dir(1)}")
            m = reader.read_manifest(loc)
            store = loc.store
            paths = [(store._p(loc.sub(n)), f.size) for n, f in m.files.items()]  # type: ignore[attr-defined]
            nbytes = sum(f.size for f in m.files.values())
            if any(n == nbytes for *_, n, _r in cases):  # build_state rounds to whole layers
                print(f"  --sweep {mb}: {nbytes / 2**20:.0f} MiB again (whole 2048² layers): "
                      "skipped", flush=True)  # fmt: skip
                continue
            raw = raw_get(store._obs, paths, only=("threads",))  # type: ignore[attr-defined]
            cases.append((mb, url, state, nbytes, raw))

        def ours(url: str, state: Any) -> float:
            t0 = time.perf_counter()
            c = sg.Checkpointer(url, handle_signals=False)
            try:
                assert c.restore(state) == 1
                return time.perf_counter() - t0
            finally:
                c.close()

        for _mb, url, state, _n, raw in cases:  # warm-up: connections, server-side caches
            raw()
            ours(url, state)
        times: dict[int, tuple[list[float], list[float]]] = {c[0]: ([], []) for c in cases}
        for rep in range(repeats):
            for mb, url, state, _n, raw in cases:
                times[mb][0].append(ours(url, state))
                times[mb][1].append(raw()["threads"])
            print(f"  repeat {rep + 1}/{repeats} done", flush=True)
    load_end = os.getloadavg()
    lines = [
        f"{started:%Y-%m-%d %H:%M} UTC · {platform.machine()} {os.cpu_count()} cpus · moto on "
        f"loopback · size sweep, median of {repeats} interleaved, paired · restore requests of "
        f"{reader.REQUEST_BYTES >> 20} MiB, {reader.REQUESTS_IN_FLIGHT} in flight · load "
        f"average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, at end "
        f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}",
        "",
        "| checkpoint MiB | savegame s | same-shape raw s | ratio of medians "
        "| paired ratio (median) |",
        "|---:|---:|---:|---:|---:|",
    ]
    xs, ys_ours, ys_raw, ys_diff = [], [], [], []
    for mb, _url, _state, nbytes, _raw in cases:
        o, r = times[mb]
        ys_diff.append(statistics.median(a - b for a, b in zip(o, r, strict=True)))
        paired = statistics.median(a / b for a, b in zip(o, r, strict=True))
        lines.append(f"| {nbytes / 2**20:.0f} | {statistics.median(o):.3f} "
                     f"| {statistics.median(r):.3f} | {statistics.median(o) / statistics.median(r):.2f} "
                     f"| {paired:.2f} |")  # fmt: skip
        xs.append(nbytes / 2**20)
        ys_ours.append(statistics.median(o))
        ys_raw.append(statistics.median(r))
    lines.append("")
    fits = {}
    for name, ys in (("savegame", ys_ours), ("raw", ys_raw)):
        a, b = _fit(xs, ys)
        fits[name] = (a, b)
        lines.append(f"fit {name}: time = {a * 1e3:.1f} ms + {b * 1e3:.3f} ms/MiB · bytes "
                     f"({1 / b:.0f} MiB/s at the margin)" if b > 0 else f"fit {name}: a={a}, b={b}")  # fmt: skip
    # On moto each ranged GET copies the whole object, so both sides grow faster than
    # linearly with the size and their own intercepts mean little; their paired difference
    # (savegame - raw, same repeat) is savegame's own cost: fixed latency + per-byte work.
    ad, bd = fits["savegame - raw (paired)"] = _fit(xs, ys_diff)
    lines.append(f"fit savegame - raw (paired differences): {ad * 1e3:+.1f} ms fixed "
                 f"{bd * 1e3:+.3f} ms/MiB · bytes (per size: "
                 + ", ".join(f"{x:.0f} MiB {d * 1e3:+.0f} ms" for x, d in zip(xs, ys_diff, strict=True))
                 + ")")  # fmt: skip
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({
            "when": started.isoformat(timespec="seconds"), "kind": "sweep",
            "loadavg_start": load_start, "loadavg_end": load_end, "repeats": repeats,
            "sizes": {str(mb): {"bytes": n, "ours_s": times[mb][0], "raw_threads_s": times[mb][1]}
                      for mb, _u, _s, n, _r in cases},
            "fit": {k: {"a_s": a, "b_s_per_mib": b} for k, (a, b) in fits.items()},
        }) + "\n")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mb",
        type=int,
        default=128,
        help="checkpoint size in MiB (moto copies the whole object per request: keep it modest)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stall-rounds", type=int, default=5, help="measured saves per configuration")
    ap.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds of training between saves (default: 1.5x the slower of one push and one "
        "raw put, at least 2 s)",
    )
    ap.add_argument("--no-stall", action="store_true", help="skip the training-stall phase")
    ap.add_argument(
        "--sweep",
        type=int,
        nargs="+",
        metavar="MB",
        help="instead of the table: the fresh-machine restore against the same-shape raw "
        "download at each of these sizes (MiB of state, e.g. 16 64 256), with a fit "
        "time = a + b·bytes for each (fixed latency and per-byte cost apart)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "remote.jsonl"))
    args = ap.parse_args()
    if args.sweep:
        sweep(args.sweep, args.repeats, Path(args.out))
        return
    load_start = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="sg-bench-remote-"))

    with moto_server() as endpoint:
        s3_env(endpoint)
        make_bucket(endpoint, "bench")
        url = "s3://bench/runs/exp"
        model, opt = build_state(args.mb)
        state = sg.TrainState(model=model, optimizer=opt, rng=False)
        t0 = time.perf_counter()
        with sg.Checkpointer(url, handle_signals=False) as ckpt:
            ckpt.save(state, 1)
        save_s = time.perf_counter() - t0
        ckpt_url = f"{url}/{layout.step_dir(1)}"
        loc = locate(ckpt_url)
        m = reader.read_manifest(loc)
        nbytes = sum(f.size for f in m.files.values())
        from savegame.storage.objectstore import ObjectStore

        store = loc.store
        assert isinstance(store, ObjectStore)
        paths = [(store._p(loc.sub(name)), f.size) for name, f in m.files.items()]
        obs = store._obs
        print(f"checkpoint: {nbytes / 2**20:.0f} MiB in {len(m.files)} file(s), "
              f"{len(m.tensors)} tensors; saved in {save_s:.2f} s", flush=True)  # fmt: skip

        # the same state as a local run (the push source), and the remote run's objects (the
        # pull source: everything under the run's prefix, as a pull reads it)
        local_run = work / "local-run"
        with sg.Checkpointer(local_run, handle_signals=False) as c:
            c.save(state, 1)
        push_files = local_files(local_run)
        push_bytes = sum(p.stat().st_size for p, _ in push_files)
        import obstore
        from obstore.store import S3Store

        # obstore on the bucket's root (credentials and endpoint from the environment)
        bucket = S3Store(
            "bench", endpoint=endpoint, region=REGION, client_options={"allow_http": True}
        )
        pull_objects = [
            (o["path"], o["size"]) for batch in obstore.list(bucket, "runs/exp") for o in batch
        ]
        pull_bytes = sum(size for _, size in pull_objects)
        print(f"push: {len(push_files)} local files, {push_bytes / 2**20:.1f} MiB; "
              f"pull: {len(pull_objects)} objects, {pull_bytes / 2**20:.1f} MiB", flush=True)  # fmt: skip

        caches: list[Path] = []

        def restore(
            staging: str | None, cache: bool = False, read_ahead: bool = True
        ) -> Callable[[], Any]:
            def run() -> Any:
                from savegame.engine import fetch

                fetch.READ_AHEAD = read_ahead
                old = os.environ.get("SAVEGAME_STAGING_MEMORY")
                if staging is not None:
                    os.environ["SAVEGAME_STAGING_MEMORY"] = staging
                where: dict[str, Any] = {}
                if cache:  # a fresh machine: an empty cache folder each time
                    caches.append(work / f"cache-{len(caches)}")
                    where["cache"] = caches[-1]
                try:
                    c = sg.Checkpointer(url, handle_signals=False, **where)
                    try:
                        assert c.restore(state) == 1
                    except BaseException:
                        c.close()
                        raise
                    opened.append(c)  # closed by ``close_restored``, timed on its own
                finally:
                    fetch.READ_AHEAD = True
                    if staging is not None:
                        if old is None:
                            os.environ.pop("SAVEGAME_STAGING_MEMORY")
                        else:
                            os.environ["SAVEGAME_STAGING_MEMORY"] = old

            return run

        opened: list[sg.Checkpointer] = []

        def close_restored() -> None:
            while opened:
                opened.pop().close()

        counter = [0]

        def fresh(kind: str) -> str:
            counter[0] += 1
            return f"{kind}-{counter[0]}"

        put = raw_put(bucket, push_files)
        push_dest: list[str] = []

        def ours_push() -> None:
            prefix = fresh("push")
            push_dest.append(prefix)
            report = transfer.push(local_run, f"s3://bench/{prefix}", progress=False)
            assert report.verified and report.copied == (1,), report

        def raw_push() -> dict[str, float]:
            prefix = fresh("rawput")
            push_dest.append(prefix)
            return {"put (concurrent)": put(prefix)}

        def clean_push() -> None:
            while push_dest:
                delete_prefix(bucket, push_dest.pop())

        get = raw_pull(bucket, pull_objects)
        pull_dest: list[Path] = []

        def ours_pull() -> None:
            dest = work / fresh("pull")
            pull_dest.append(dest)
            report = transfer.pull(url, dest, progress=False)
            assert report.verified and report.copied == (1,), report

        def clean_pull() -> None:
            while pull_dest:
                shutil.rmtree(pull_dest.pop(), ignore_errors=True)

        def clean_caches() -> None:
            while caches:
                shutil.rmtree(caches.pop(), ignore_errors=True)

        raw = raw_get(obs, paths)
        rows: list[Row] = []
        row(rows, "restore, live model", restore(None), raw, nbytes, finish=close_restored)
        row(rows, "restore, live model, no read-ahead of the lease", restore(None, read_ahead=False),
            raw, nbytes, finish=close_restored)  # fmt: skip
        row(rows, "restore, live model, fresh cache folder", restore(None, cache=True), raw,
            nbytes, after=clean_caches, finish=close_restored)  # fmt: skip
        row(rows, "restore, spooled (staging 0)", restore("0"), raw, nbytes,
            finish=close_restored)  # fmt: skip
        row(rows, "load, fresh tensors", lambda: sg.load(ckpt_url), raw, nbytes)
        row(rows, "verify", lambda: reader.verify(ckpt_url), raw, nbytes)
        row(rows, "push (local run → s3)", ours_push, raw_push, push_bytes,
            shape="put (concurrent)", bar=("throughput", 0.9), after=clean_push)  # fmt: skip
        row(rows, "pull (s3 run → local)", ours_pull, lambda: get(work / fresh("rawget")),
            pull_bytes, shape="get→file+fsync", bar=("throughput", 0.9), after=clean_pull)  # fmt: skip

        raw()  # warm-up: connections, server-side caches
        ours_push(), raw_push(), clean_push(), ours_pull(), clean_pull()
        for rep in range(args.repeats):
            for r in rows:
                t, mem = measure(r.ours)
                r.times.append(t)
                r.mem.append(mem)
                if r.finish is not None:
                    t0 = time.perf_counter()
                    r.finish()
                    r.finish_times.append(time.perf_counter() - t0)
                for k, v in r.raw().items():
                    r.raw_times.setdefault(k, []).append(v)
                if r.after is not None:
                    r.after()
            print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)

        stall: dict[str, Any] | None = None
        if not args.no_stall:
            one_push = max(statistics.median(rows[-2].times),
                           statistics.median(rows[-2].raw_times["put (concurrent)"]))  # fmt: skip
            gap = args.gap or max(2.0, 1.5 * one_push)
            print(f"stall phase: {args.stall_rounds} rounds, {gap:.1f} s of training between "
                  "saves", flush=True)  # fmt: skip
            stall = stall_phase(model, opt, "s3://bench/stall", work, args.stall_rounds, gap)

    shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    lines = [
        f"{started:%Y-%m-%d %H:%M} UTC · {platform.machine()} {os.cpu_count()} cpus · "
        f"torch {torch.__version__} · moto on loopback (its own process) · "
        f"{nbytes / 2**20:.0f} MiB checkpoint in {len(m.files)} object(s) · median of "
        f"{args.repeats} interleaved · restore requests of {reader.REQUEST_BYTES >> 20} MiB, "
        f"{reader.REQUESTS_IN_FLIGHT} in flight · load average (1, 5, 15 min) at start "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, at end "
        f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}",
        "",
        "| operation | savegame s | raw s (each variant) | savegame / best raw (time) "
        "| savegame / same-shape raw (time) | savegame MiB/s | best raw MiB/s | bar | "
        "peak extra anon MiB | close() s, not in the time (with it: / same-shape raw) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---|",
    ]
    record: dict[str, Any] = {
        "when": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "mb": args.mb,
        "repeats": args.repeats,
        "request_bytes": reader.REQUEST_BYTES,
        "in_flight": reader.REQUESTS_IN_FLIGHT,
        "rows": {},
        "stall": stall,
    }
    for r in rows:
        ours = statistics.median(r.times)
        raw_med = {k: statistics.median(v) for k, v in r.raw_times.items()}
        best = min(raw_med.values())
        mib = r.nbytes / 2**20
        kind, limit = r.bar
        if kind == "time":
            ok = ours / best <= limit
            bar = f"time ≤ {limit}× raw: {'met' if ok else 'missed'} (best raw)"
            if not ok and ours / raw_med[r.shape] <= limit:
                bar += "; met vs same-shape raw"
        else:
            ok = best / ours >= limit
            bar = (f"throughput ≥ {limit}× raw: {best / ours:.2f}× best raw, "
                   f"{raw_med[r.shape] / ours:.2f}× same-shape raw: "
                   f"{'met' if ok else ('met vs same-shape raw only' if raw_med[r.shape] / ours >= limit else 'missed')}")  # fmt: skip
        variants = ", ".join(f"{k} {v:.2f}" for k, v in raw_med.items())
        closing = ""
        if r.finish_times:
            with_close = statistics.median(a + b for a, b in zip(r.times, r.finish_times, strict=True))  # fmt: skip
            closing = (f"{statistics.median(r.finish_times):.3f} "
                       f"({with_close / raw_med[r.shape]:.2f})")  # fmt: skip
        lines.append(
            f"| {r.name} | {ours:.2f} | {variants} | {ours / best:.2f} "
            f"| {ours / raw_med[r.shape]:.2f} ({r.shape}) | {mib / ours:.0f} | {mib / best:.0f} "
            f"| {bar} | {max(r.mem) / 2**20:.0f} | {closing} |"
        )
        record["rows"][r.name] = {
            "close_s": r.finish_times,
            "ours_s": r.times,
            "raw_s": r.raw_times,
            "peak_anon_bytes": r.mem,
            "bytes": r.nbytes,
        }
    if stall is not None:
        s_med = {k: statistics.median(v) for k, v in stall["stall_s"].items()}
        lines += [
            "",
            f"Training stall per save, {stall['gap_s']:.1f} s of training between saves, "
            f"{args.stall_rounds} saves per configuration after a warm-up save, interleaved "
            "(rotating order):",
            "",
            "| configuration | stall median s (min-max) | remote / local, paired per round (median) "
            "| ratio of medians | bar (≤ 1.05) | training steps/s in the gaps | close() s |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for mode in ("async", "sync"):
            loc_s = stall["stall_s"][f"local-only {mode}"]
            rem_s = stall["stall_s"][f"remote+cache {mode}"]
            paired = statistics.median(a / b for a, b in zip(rem_s, loc_s, strict=True))
            for name in (f"local-only {mode}", f"remote+cache {mode}"):
                v = stall["stall_s"][name]
                remote = name.startswith("remote")
                of_medians = s_med[name] / s_med[f"local-only {mode}"]
                lines.append(
                    f"| {name} | {s_med[name]:.3f} ({min(v):.3f}-{max(v):.3f}) "
                    f"| {f'{paired:.2f}' if remote else ''} "
                    f"| {f'{of_medians:.2f}' if remote else ''} "
                    f"| {('met' if paired <= 1.05 else 'missed') if remote else ''} "
                    f"| {statistics.median(stall['steps_per_s'][name]):.1f} "
                    f"| {stall['close_s'][name]:.2f} |"
                )
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
