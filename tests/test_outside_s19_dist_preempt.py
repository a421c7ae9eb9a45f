"""Outside review (s19, R16): preemption and upload failures of a two-tier run (docs/tiers.md,
"Failures", "Restore", "Multi-rank") under torch.distributed: 2 forked ranks (gloo, CPU), a cache
folder shared by the ranks, a real S3 server (moto on loopback) as the remote. Uploads are made
to fail with a bucket policy denying PutObject on ``step-*`` (a 403, not retried by the client);
deleting the policy makes the remote work again. Every subprocess is bounded by a timeout.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

pytestmark = [pytest.mark.network, pytest.mark.distributed]

SCRIPT = Path(__file__).parent / "_outside_s19_dist_preempt" / "job.py"
TIMEOUT_S = int(os.environ.get("S19_TIMEOUT_S", "90"))
_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}  # fmt: skip


def _client(endpoint: str) -> Any:
    e = _env(endpoint)
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
                        region_name=e["AWS_REGION"])  # fmt: skip


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in _env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    bucket = f"s19-{os.getpid()}-{next(_buckets)}"
    _client(s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/exp"


def _deny(endpoint: str, url: str) -> None:
    bucket = url[len("s3://") :].split("/", 1)[0]
    _client(endpoint).put_bucket_policy(
        Bucket=bucket,
        Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
            "Resource": f"arn:aws:s3:::{bucket}/runs/exp/step-*"}]}),
    )  # fmt: skip


def _allow(endpoint: str, url: str) -> None:
    _client(endpoint).delete_bucket_policy(Bucket=url[len("s3://") :].split("/", 1)[0])


def _remote_steps(endpoint: str, url: str) -> list[int]:
    bucket, prefix = url[len("s3://") :].split("/", 1)
    out = []
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/")  # fmt: skip
    for page in pages:
        for o in page.get("Contents", []):
            parts = o["Key"][len(prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[0].startswith("step-") and parts[1] == "manifest.json":
                out.append(int(parts[0][5:]))
    return sorted(out)


def _cached(cache: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in cache.glob("step-*") if (p / "manifest.json").exists())


class Job:
    def __init__(self, tmp: Path, url: str, tag: str, cache: str, **kw: Any) -> None:
        self.args = {"url": url, "cache": str(tmp / cache), "out": str(tmp), "tag": tag,
                     "total": 6, "pause": 0.0, "catch": False, **kw}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "2", json.dumps(self.args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                 "SAVEGAME_DIST_TIMEOUT_S": "20", "SAVEGAME_LEASE_SECONDS": "2"},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.pids: list[int] = json.loads(line[5:]) if line.startswith("PIDS ") else []
        self.output = ""

    def progress(self, rank: int) -> list[str]:
        p = Path(self.args["out"]) / f"progress-{self.args['tag']}-{rank}"
        return p.read_text().split() if p.exists() else []

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = TIMEOUT_S) -> list[int]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
            pytest.fail(f"job {self.args['tag']} hung: {(out or '')[-2000:]}")
        self.output = out or ""
        marker = [ln for ln in self.output.splitlines() if ln.startswith("EXIT-CODES ")]
        return json.loads(marker[-1][len("EXIT-CODES ") :]) if marker else []


def _wait_for(cond: Any, what: str, job: Job, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or job.proc.poll() is not None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            out, _ = job.proc.communicate()
            pytest.fail(f"timed out waiting for {what}: {(out or '')[-2000:]}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("who", ["every_rank", "rank_1"])
@pytest.mark.parametrize("async_save", [False, True])
def test_sigterm_while_uploads_fail_exits_75_on_every_rank_and_the_next_run_resumes_and_uploads(
    tmp_path: Path, s3_url: str, s3_endpoint: str, who: str, async_save: bool
) -> None:
    _deny(s3_endpoint, s3_url)
    job = Job(tmp_path, s3_url, "a", "cache", total=100, pause=0.3, catch=True,
              **{"async": async_save})  # fmt: skip
    _wait_for(lambda: "3" in job.progress(0) and "3" in job.progress(1), "step 3 on both ranks",
              job)  # fmt: skip
    for pid in job.pids if who == "every_rank" else job.pids[1:]:
        os.kill(pid, signal.SIGTERM)
    assert job.finish() == [75, 75], job.output[-3000:]
    saved = []
    for r in range(2):
        prog = job.progress(r)
        assert prog[-2:] == ["exit", "75"], prog
        nums = [int(x) for x in prog[:-2] if x.isdigit()]
        saved.append(nums[-1] + 1)  # step() saved, then exited before the step was logged
    assert saved[0] == saved[1], saved
    step = saved[0]
    assert step in _cached(tmp_path / "cache"), _cached(tmp_path / "cache")
    assert "but an upload to the remote failed" in job.output, job.output[-2000:]  # logged
    assert _remote_steps(s3_endpoint, s3_url) == []
    _allow(s3_endpoint, s3_url)
    job = Job(tmp_path, s3_url, "b", "cache", total=step)  # resumes, uploads at close()
    assert job.finish() == [0, 0], job.output[-3000:]
    assert job.progress(0)[:2] == ["start", str(step)], job.progress(0)
    assert job.progress(1)[:2] == ["start", str(step)], job.progress(1)
    assert step in _remote_steps(s3_endpoint, s3_url)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_loop_catching_upload_failures_on_two_ranks_never_hangs_and_loses_nothing(
    tmp_path: Path, s3_url: str, s3_endpoint: str, async_save: bool
) -> None:
    _deny(s3_endpoint, s3_url)
    total = 8
    job = Job(tmp_path, s3_url, "a", "cache", total=total, pause=0.15, catch=True,
              **{"async": async_save})  # fmt: skip
    assert job.finish() == [0, 0], job.output[-3000:]
    for r in range(2):
        prog = job.progress(r)
        assert prog[-1] == "done", prog
        assert [x for x in prog if x.isdigit()][-total:] == [str(s) for s in range(1, total + 1)]
        assert any(x.startswith(("err", "closeerr")) for x in prog), prog  # it was raised
    assert _cached(tmp_path / "cache") == list(range(1, total + 1))  # nothing lost
    assert _remote_steps(s3_endpoint, s3_url) == []
    _allow(s3_endpoint, s3_url)
    job = Job(tmp_path, s3_url, "b", "cache", total=total)
    assert job.finish() == [0, 0], job.output[-3000:]
    assert job.progress(0)[:2] == ["start", str(total)]
    assert total in _remote_steps(s3_endpoint, s3_url)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["sigkill", "sigterm"])
def test_a_fresh_cache_restored_from_the_remote_killed_before_its_first_upload_resumes_its_work(
    tmp_path: Path, s3_url: str, s3_endpoint: str, kill: str
) -> None:
    first = Job(tmp_path, s3_url, "a", "cache-a", total=4)
    assert first.finish() == [0, 0], first.output[-3000:]
    assert 4 in _remote_steps(s3_endpoint, s3_url)
    _deny(s3_endpoint, s3_url)  # no upload from the new machine can commit
    job = Job(tmp_path, s3_url, "b", "cache-b", total=100, pause=0.3, catch=True)
    _wait_for(lambda: "7" in job.progress(0) and "7" in job.progress(1), "step 7 on both", job)
    assert job.progress(0)[:2] == ["start", "4"]
    assert (tmp_path / "cache-b" / "remote-base.json").exists()
    if kill == "sigkill":
        job.kill()
    else:  # a preemption while the remote refuses: exit 75, the step stays in the cache
        for pid in job.pids:
            os.kill(pid, signal.SIGTERM)
        assert job.finish() == [75, 75], job.output[-3000:]
    mine = max(_cached(tmp_path / "cache-b"))
    assert mine >= 7
    assert max(_remote_steps(s3_endpoint, s3_url)) == 4
    _allow(s3_endpoint, s3_url)
    job = Job(tmp_path, s3_url, "c", "cache-b", total=mine)
    assert job.finish() == [0, 0], job.output[-3000:]
    assert job.progress(0)[:2] == ["start", str(mine)], job.progress(0)
    assert job.progress(1)[:2] == ["start", str(mine)], job.progress(1)
    assert max(_remote_steps(s3_endpoint, s3_url)) == mine
    assert not (tmp_path / "cache-b" / "remote-base.json").exists()  # dropped at the upload
