"""Regression tests for bugs found by an outside QA pass on issue 11 (runs on object storage,
push/pull). Each is ``xfail(strict=True)``: it flips to a failure (XPASS) once the bug is fixed,
so the marker must then be removed.

Real servers on loopback only (moto S3 and the fault proxy of ``tests/remote/servers.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import savegame as sg
from savegame import errors

pytestmark = pytest.mark.network

torch = pytest.importorskip("torch")


def _local_run(root: Path, *, width: int = 8, steps: tuple[int, ...] = (1, 2)) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    state = sg.TrainState(model=model, extras={"n": 0})
    ckpt = sg.Checkpointer(root)
    for s in steps:
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(state, s)
    ckpt.close()
    return root


def _boto(s3) -> object:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
    )


def _split(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return bucket, prefix


# 1 ------------------------------------------------------------------------------------------
def test_writer_that_lost_its_lease_cannot_destroy_the_new_owners_save(s3_url: str) -> None:
    from savegame.storage import urls
    from savegame.storage.objectstore import ObjectStore

    a = ObjectStore(urls.connect(s3_url), lease_seconds=0.6)
    b = ObjectStore(urls.connect(s3_url), lease_seconds=30)
    la = a.lock(".lock")
    la.acquire()
    la._stop.set()  # A stalls (GC pause, SIGSTOP, partition): no more renewals
    time.sleep(1.0)
    lb = b.lock(".lock")
    lb.acquire()  # B takes the expired lease over
    try:
        final = "step-000000000006"
        sb = b.begin(".tmp-step-000000000006-bbbbbbbb", final)
        sb.write("rank-00000.safetensors", lambda f: f.write(b"B" * 1000))
        # The stale writer A wakes up and starts its own save of the same step.
        with pytest.raises(errors.LockedError):
            sa = a.begin(".tmp-step-000000000006-aaaaaaaa", final)
            sa.write("rank-00000.safetensors", lambda f: f.write(b"A" * 1000))
            sa.abort()
        sb.seal("manifest.json", b"{}")
        sb.publish(final)
        blob = b.open(f"{final}/rank-00000.safetensors")
        buf = bytearray(1000)
        blob.readinto(0, memoryview(buf))
        assert bytes(buf) == b"B" * 1000
    finally:
        lb.release()


# 2 ------------------------------------------------------------------------------------------
_NO_CLOSE = textwrap.dedent(
    """
    import sys, torch, savegame as sg
    st = sg.TrainState(model=torch.nn.Linear(4, 4))
    c = sg.Checkpointer(sys.argv[1], save=sg.Every(steps=1))
    c.restore(st)
    c.step(st, 1)
    raise RuntimeError("CUDA out of memory (simulated)")   # the script dies; close() never runs
    """
)


def test_lease_is_released_when_the_process_exits_without_close(s3_url: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _NO_CLOSE, s3_url], capture_output=True, text=True, timeout=120
    )
    assert "simulated" in r.stderr, r.stderr[-2000:]
    ckpt = sg.Checkpointer(s3_url)  # the re-run after fixing the bug
    try:
        assert ckpt.restore(sg.TrainState(model=torch.nn.Linear(4, 4))) == 1
    finally:
        ckpt.close()


# 4 ------------------------------------------------------------------------------------------
def test_dotdot_in_a_url_is_refused_or_shown_as_where_it_goes(s3_url: str, tmp_path: Path) -> None:
    from savegame.tools.transfer import push

    run = _local_run(tmp_path / "run")
    bucket, _ = _split(s3_url)
    try:
        report = push(run, f"s3://{bucket}/runs/../evil")
    except (ValueError, errors.StorageError):
        return  # refused: fine
    assert ".." not in report.dest


# 5 ------------------------------------------------------------------------------------------
def test_noop_rerun_of_pull_does_not_report_more_bytes_moved(s3_url: str, tmp_path: Path) -> None:
    from savegame.tools.transfer import pull, push

    run = _local_run(tmp_path / "run")
    push(run, s3_url)
    first = pull(s3_url, tmp_path / "pulled")
    again = pull(s3_url, tmp_path / "pulled")
    assert first.verified and again.verified and not again.copied
    assert again.bytes_moved < first.bytes_moved, (first.bytes_moved, again.bytes_moved)


# 6 ------------------------------------------------------------------------------------------
_RESTORE_RSS = textwrap.dedent(
    """
    import sys, torch, savegame as sg

    def hwm():  # peak RSS of this process (VmHWM: ru_maxrss would include the parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    import savegame.engine.reader as R
    R.REQUESTS_IN_FLIGHT, R.REQUEST_BYTES = 2, 4 << 20     # at most ~24 MiB of reads in flight
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(int(sys.argv[2]))])
    before = hwm()
    c = sg.Checkpointer(sys.argv[1])
    assert c.restore(sg.TrainState(model=model)) == 1
    c.close()
    print(hwm() - before)
    """
)


def test_restore_from_s3_peak_memory_does_not_grow_with_checkpoint_size(s3_env) -> None:
    def extra(layers: int) -> int:
        bucket = f"sg-mem-{os.getpid()}-{layers}"
        s3_env.make_bucket(bucket)
        url = f"s3://{bucket}/run"
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
        c = sg.Checkpointer(url)
        c.save(sg.TrainState(model=model), 1)
        c.close()
        env = dict(os.environ, SAVEGAME_STAGING_MEMORY="8M")
        r = subprocess.run(
            [sys.executable, "-c", _RESTORE_RSS, url, str(layers)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    small, big = extra(1), extra(4)  # 16 MiB vs 64 MiB of tensors
    # 48 MiB more checkpoint may cost a little more memory, not another 48 MiB
    assert big - small < 20 << 20, (small >> 20, big >> 20)
