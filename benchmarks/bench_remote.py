"""Remote storage (issue 11): savegame against obstore's own raw transfers of the same bytes, on
one S3-compatible server on loopback (moto, in its own process), in one run.

Run: ``python benchmarks/bench_remote.py --mb 128 --repeats 3``

Each row is a savegame operation and the raw obstore transfer of the same bytes it is compared
with; the methods of a row run ``--repeats`` times, interleaved, and the table shows medians,
the ratio savegame / raw (the issue asks ≤ 1.1 for a restore) and the peak anonymous memory a
savegame run added (``RssAnon``: the staging, bounce buffers and fresh tensors; file-backed
pages of a spooled restore are the kernel's page cache and are not counted).

Rows (add one with :func:`row`; push/pull rows come later):
  * restore, live model     ``Checkpointer(url).restore(state)`` into a live model and optimizer
    (a resume on a fresh machine): bytes wait in memory until every hash matched
  * restore, spooled        the same with ``SAVEGAME_STAGING_MEMORY=0``: they wait in a temp file
  * load, fresh tensors     ``sg.load(url)``: every tensor is new memory, read straight into
  * verify                  ``savegame.engine.reader.verify(url)``: every byte hashed, bounded memory
The raw side, into memory: ``obstore.get_ranges`` over each object in ``REQUEST_BYTES`` ranges
(obstore coalesces them: one GET per object) and a thread pool of ``REQUESTS_IN_FLIGHT`` ranged
``obstore.get`` calls (the shape of savegame's reads); the ratio is shown to both. moto answers
every ranged GET by copying the *whole* object under a lock, so on moto each request costs
O(object size) and fewer, larger requests win; on S3 itself parallel 8-16 MiB ranges are what
AWS recommends. Read the "ratio to raw threads" column as savegame's own overhead.

Prints a markdown table and appends a JSON line to ``bench-out/remote.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
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
    ``raw`` returns its timings by variant (seconds); the row compares with the fastest."""

    name: str
    ours: Callable[[], Any]
    raw: Callable[[], dict[str, float]]
    nbytes: int
    times: list[float] = field(default_factory=list)
    raw_times: dict[str, list[float]] = field(default_factory=dict)
    mem: list[int] = field(default_factory=list)


def row(rows: list[Row], *args: Any, **kw: Any) -> Row:
    r = Row(*args, **kw)
    rows.append(r)
    return r


# ---- raw obstore transfers -------------------------------------------------------------------


def raw_get(store: Any, paths: list[tuple[str, int]]) -> Callable[[], dict[str, float]]:
    """obstore's own downloads of ``paths`` into memory, two ways, timed: ``get_ranges`` over
    each object in ``REQUEST_BYTES`` ranges (it coalesces neighbouring ranges: one GET per
    object here) and a pool of ``REQUESTS_IN_FLIGHT`` threads of ranged ``get`` calls."""
    import obstore

    req, flight = reader.REQUEST_BYTES, reader.REQUESTS_IN_FLIGHT
    total = sum(size for _, size in paths)

    def ranges(size: int) -> tuple[list[int], list[int]]:
        starts = list(range(0, size, req))
        return starts, [min(s + req, size) for s in starts]

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
            t0 = time.perf_counter()
            assert fn() == total
            out[name] = time.perf_counter() - t0
        return out

    return run


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mb",
        type=int,
        default=128,
        help="checkpoint size in MiB (moto copies the whole object per request: keep it modest)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "remote.jsonl"))
    args = ap.parse_args()

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

        def restore(staging: str | None) -> Callable[[], Any]:
            def run() -> Any:
                old = os.environ.get("SAVEGAME_STAGING_MEMORY")
                if staging is not None:
                    os.environ["SAVEGAME_STAGING_MEMORY"] = staging
                try:
                    with sg.Checkpointer(url, handle_signals=False) as c:
                        assert c.restore(state) == 1
                finally:
                    if staging is not None:
                        if old is None:
                            os.environ.pop("SAVEGAME_STAGING_MEMORY")
                        else:
                            os.environ["SAVEGAME_STAGING_MEMORY"] = old

            return run

        raw = raw_get(obs, paths)
        rows: list[Row] = []
        row(rows, "restore, live model", restore(None), raw, nbytes)
        row(rows, "restore, spooled (staging 0)", restore("0"), raw, nbytes)
        row(rows, "load, fresh tensors", lambda: sg.load(ckpt_url), raw, nbytes)
        row(rows, "verify", lambda: reader.verify(ckpt_url), raw, nbytes)

        raw()  # warm-up: connections, server-side caches
        for _ in range(args.repeats):
            for r in rows:
                t, mem = measure(r.ours)
                r.times.append(t)
                r.mem.append(mem)
                for k, v in r.raw().items():
                    r.raw_times.setdefault(k, []).append(v)

    lines = [
        f"moto on loopback (its own process), {nbytes / 2**20:.0f} MiB checkpoint in "
        f"{len(m.files)} object(s), median of {args.repeats}; requests of "
        f"{reader.REQUEST_BYTES >> 20} MiB, {reader.REQUESTS_IN_FLIGHT} in flight",
        "",
        "| operation | savegame s | raw get_ranges s | raw threads s | ratio to best raw "
        "| ratio to raw threads | savegame MiB/s | peak extra anon MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    record: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "mb": args.mb,
        "repeats": args.repeats,
        "request_bytes": reader.REQUEST_BYTES,
        "in_flight": reader.REQUESTS_IN_FLIGHT,
        "rows": {},
    }
    for r in rows:
        ours = statistics.median(r.times)
        raw_med = {k: statistics.median(v) for k, v in r.raw_times.items()}
        best = min(raw_med.values())
        mib = r.nbytes / 2**20
        lines.append(
            f"| {r.name} | {ours:.2f} | {raw_med['get_ranges']:.2f} | {raw_med['threads']:.2f} "
            f"| {ours / best:.2f} | {ours / raw_med['threads']:.2f} | {mib / ours:.0f} "
            f"| {max(r.mem) / 2**20:.0f} |"
        )
        record["rows"][r.name] = {
            "ours_s": r.times,
            "raw_s": r.raw_times,
            "peak_anon_bytes": r.mem,
            "bytes": r.nbytes,
        }
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
