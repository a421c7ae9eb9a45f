"""Outside review (s15, R2): two tiers (docs/tiers.md) under torch.distributed, with a real S3
server (moto on loopback) as the run of record and a cache folder shared by the job's ranks.

A 2-rank job (gloo, CPU; DDP with BatchNorm, so some tensors are per rank; Adam; per-rank RNG
streams) trains 10 steps, saving every 2 into the cache, uploads in the background, keeps
``Keep(last=2)`` on the remote. The ranks are forked from one interpreter that imported torch.

- ``kill -9`` of every rank right after a save was queued for upload (so usually while the
  upload runs), then a restart on a **fresh** cache folder (another machine): the restart waits
  out the dead writer's lease, restores the newest complete remote checkpoint on both ranks,
  and ends bitwise equal to an uninterrupted job (parameters, per-rank BatchNorm statistics,
  Adam moments). The remote never holds fewer than one complete checkpoint.
- SIGTERM to rank 1 only: every rank saves at the step boundary and exits 75, and the
  preemption checkpoint is on the remote before the job ends (a preempted VM's cache disk goes
  with it), so a fresh cache resumes from that very step and ends bitwise equal.
- A single-process run whose remote refuses every upload: ``close()`` raises the typed
  ``StorageError`` on the caller's thread, naming the step and the remote URL, after releasing
  the lease; the checkpoint stays in the cache.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

pytestmark = [pytest.mark.network, pytest.mark.distributed]

LAUNCH_TIMEOUT_S = 180
TOTAL = 10
_buckets = itertools.count()

SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys, tempfile, time, traceback
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    import savegame as sg


    def job(rank, world, a):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 64))
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(100 + rank)
        state = sg.TrainState(model=model, optimizer=opt)
        deadline = time.monotonic() + 60
        while True:  # a killed writer's lease expires after SAVEGAME_LEASE_SECONDS
            try:
                ckpt = sg.Checkpointer(a["url"], cache=a["cache"], save=sg.Every(steps=2),
                                       keep=sg.Keep(last=2), async_save=a["async"])
                break
            except sg.LockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        start = ckpt.restore(state)
        prog = os.open(f"{a['out']}/progress-{a['tag']}-{rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(prog, f"start {start}\n".encode())
        try:
            for step in range(start, a["total"]):
                x = torch.randn(16, 64)
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                ckpt.step(state, step + 1)
                os.write(prog, f"{step + 1}\n".encode())
                time.sleep(a["pause"])
            ckpt.close()
        except SystemExit as exc:
            os.write(prog, f"exit {exc.code}\n".encode())
            raise
        final = {f"model/{k}": v.clone() for k, v in model.module.state_dict().items()}
        for i, s in opt.state_dict()["state"].items():
            for k, v in s.items():
                final[f"opt/{i}/{k}"] = torch.as_tensor(v).clone()
        torch.save(final, f"{a['out']}/final-{a['tag']}-{rank}.pt")
        os.write(prog, b"done\n")


    def main():
        world, a = int(sys.argv[1]), json.loads(sys.argv[2])
        store = os.path.join(tempfile.mkdtemp(prefix="s15t-"), "store")
        pids = []
        for rank in range(world):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    torch.set_num_threads(1)
                    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
                    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                            world_size=world, timeout=timedelta(seconds=60))
                    job(rank, world, a)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            pids.append(pid)
        print("PIDS " + json.dumps(pids), flush=True)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        print("EXIT-CODES " + json.dumps(codes), flush=True)


    if __name__ == "__main__":
        main()
    """
)


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
    return {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


def _client(endpoint: str) -> Any:
    e = _env(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
        region_name=e["AWS_REGION"],
    )


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in _env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    bucket = f"s15-{os.getpid()}-{next(_buckets)}"
    _client(s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/exp"


def _remote_steps(endpoint: str, url: str) -> list[int]:
    """Steps with a manifest object on the remote (committed checkpoints)."""
    bucket, prefix = url[len("s3://") :].split("/", 1)
    out = []
    for page in (
        _client(endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix + "/")
    ):
        for o in page.get("Contents", []):
            parts = o["Key"][len(prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[0].startswith("step-") and parts[1] == "manifest.json":
                out.append(int(parts[0][5:]))
    return sorted(out)


class Job:
    def __init__(self, tmp: Path, args: dict[str, Any]) -> None:
        script = tmp / "s15_tiers_job.py"
        if not script.exists():
            script.write_text(SCRIPT)
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "2", json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                 "SAVEGAME_DIST_TIMEOUT_S": "30", "SAVEGAME_LEASE_SECONDS": "2"},
        )  # fmt: skip
        self.pids: list[int] = []
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "PIDS [...]" once the ranks are forked
        if line.startswith("PIDS "):
            self.pids = json.loads(line[5:])

    def progress(self, rank: int) -> list[str]:
        p = Path(self.args["out"]) / f"progress-{self.args['tag']}-{rank}"
        return p.read_text().split() if p.exists() else []

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self) -> list[int]:
        try:
            out, _ = self.proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            pytest.fail(f"job {self.args['tag']} hung")
        self.output = out or ""
        marker = [ln for ln in self.output.splitlines() if ln.startswith("EXIT-CODES ")]
        return json.loads(marker[-1][len("EXIT-CODES ") :]) if marker else []


def _wait_for(cond: Any, what: str, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _final(tmp: Path, tag: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(tmp / f"final-{tag}-{r}.pt") for r in range(2)]


def _assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    for r in range(2):
        assert a[r].keys() == b[r].keys()
        for k in a[r]:
            assert torch.equal(a[r][k], b[r][k]), f"rank {r}: {k} differs"


def _args(tmp: Path, url: str, tag: str, cache: str, **kw: Any) -> dict[str, Any]:
    return {"url": url, "cache": str(tmp / cache), "out": str(tmp), "tag": tag,
            "total": TOTAL, "pause": 0.0, "async": True, **kw}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("restart_cache", ["fresh", "same"])
def test_kill_9_during_an_upload_then_a_restart_on_two_ranks_ends_bitwise_equal(
    tmp_path: Path, s3_url: str, s3_endpoint: str, restart_cache: str
) -> None:
    """``fresh``: another machine (an empty cache) resumes from the remote's newest complete
    checkpoint. ``same``: the cache is ahead of the remote (the killed upload): the restart
    resumes from the cache and uploads what is pending (docs/tiers.md, "Restore")."""
    ref = Job(tmp_path, _args(tmp_path, s3_url + "-ref", "ref", "cache-ref"))
    assert ref.finish() == [0, 0], ref.output[-3000:]
    want = _final(tmp_path, "ref")

    job = Job(tmp_path, _args(tmp_path, s3_url, "a", "cache-a", pause=0.3))
    _wait_for(lambda: "4" in job.progress(0), "step 4 of the first job")
    job.kill()  # right after the save of step 4 was queued for upload
    remote = _remote_steps(s3_endpoint, s3_url)
    assert remote and max(remote) <= 4, remote  # Keep(last=2): never no complete checkpoint
    cached = sorted(int(p.name[5:]) for p in (tmp_path / "cache-a").glob("step-*")
                    if (p / "manifest.json").exists())  # fmt: skip
    cache = "cache-b" if restart_cache == "fresh" else "cache-a"
    job = Job(tmp_path, _args(tmp_path, s3_url, "b", cache))
    assert job.finish() == [0, 0], job.output[-3000:]
    start = max(remote) if restart_cache == "fresh" else max(cached)
    assert job.progress(0)[:2] == ["start", str(start)], (remote, cached)
    _assert_same(_final(tmp_path, "b"), want)
    assert _remote_steps(s3_endpoint, s3_url) == [TOTAL - 2, TOTAL]


@pytest.mark.slow
def test_sigterm_to_rank_1_uploads_the_preemption_checkpoint_before_the_job_ends(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    ref = Job(tmp_path, _args(tmp_path, s3_url + "-ref", "ref", "cache-ref"))
    assert ref.finish() == [0, 0], ref.output[-3000:]
    want = _final(tmp_path, "ref")

    job = Job(tmp_path, _args(tmp_path, s3_url, "a", "cache-a", pause=0.3))
    _wait_for(lambda: "3" in job.progress(1), "step 3 on rank 1")
    os.kill(job.pids[1], signal.SIGTERM)
    assert job.finish() == [75, 75], job.output[-3000:]
    for r in range(2):  # step() saved, then raised SystemExit(75) before the step was logged
        assert job.progress(r)[-2:] == ["exit", "75"], job.progress(r)
    saved = int(job.progress(0)[-3]) + 1
    assert int(job.progress(1)[-3]) + 1 == saved
    assert saved < TOTAL
    assert saved in _remote_steps(s3_endpoint, s3_url)  # uploaded before the exit
    job = Job(tmp_path, _args(tmp_path, s3_url, "b", "cache-b"))  # a fresh machine
    assert job.finish() == [0, 0], job.output[-3000:]
    assert job.progress(0)[:2] == ["start", str(saved)]
    _assert_same(_final(tmp_path, "b"), want)


def test_close_raises_a_refused_upload_typed_on_the_callers_thread(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    bucket = s3_url[len("s3://") :].split("/", 1)[0]
    state = sg.TrainState(model=torch.nn.Linear(4, 2))
    ckpt = sg.Checkpointer(
        s3_url, cache=tmp_path / "cache", handle_signals=False,
        upload_retry=sg.UploadRetry(attempts=2, first_delay=0.05, max_delay=0.1),
    )  # fmt: skip
    # the bucket refuses writes from now on (a policy denying PutObject: a 403, not retried
    # by the HTTP client)
    _client(s3_endpoint).put_bucket_policy(
        Bucket=bucket,
        Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
            "Resource": f"arn:aws:s3:::{bucket}/runs/exp/step-*"}]}),
    )  # fmt: skip
    ckpt.save(state, 1)  # commits in the cache; the upload fails in the background
    assert (tmp_path / "cache" / "step-000000000001" / "manifest.json").exists()
    with pytest.raises(sg.StorageError) as info:
        ckpt.close()
    assert info.value.step == 1, info.value
    assert "s3://" in str(info.value.path) and bucket in str(info.value.path), info.value
    assert (tmp_path / "cache" / "step-000000000001" / "manifest.json").exists()
    # the lease was released: a new writer opens the remote run at once
    _client(s3_endpoint).delete_bucket_policy(Bucket=bucket)
    with sg.Checkpointer(s3_url, cache=tmp_path / "cache", handle_signals=False) as again:
        assert again.restore(state) == 1
    assert _remote_steps(s3_endpoint, s3_url) == [1]  # uploaded by the next writer's close()


@pytest.mark.slow
def test_two_ranks_straight_to_s3_without_a_cache_killed_and_resumed_bitwise(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    """README ("The run folder is a path every rank can write, or an object-store URL"): a
    2-rank job saving straight into ``s3://`` (no cache), killed with SIGKILL, restarted: it
    resumes from the newest remote checkpoint and ends bitwise equal. (docs/distributed.md
    still says object-store URLs are not supported under torch.distributed.)"""
    ref = Job(tmp_path, {**_args(tmp_path, s3_url + "-ref", "ref", ""), "cache": None})
    assert ref.finish() == [0, 0], ref.output[-3000:]
    job = Job(tmp_path, {**_args(tmp_path, s3_url, "a", "", pause=0.3), "cache": None})
    _wait_for(lambda: "5" in job.progress(0), "step 5 of the first job")
    job.kill()
    remote = _remote_steps(s3_endpoint, s3_url)
    assert remote and max(remote) <= 6, remote
    job = Job(tmp_path, {**_args(tmp_path, s3_url, "b", ""), "cache": None})
    assert job.finish() == [0, 0], job.output[-3000:]
    assert job.progress(0)[:2] == ["start", str(max(remote))]
    _assert_same(_final(tmp_path, "b"), _final(tmp_path, "ref"))
    assert _remote_steps(s3_endpoint, s3_url) == [TOTAL - 2, TOTAL]


@pytest.mark.slow
def test_an_upload_failure_raised_at_step_is_raised_again_by_close_while_it_still_fails(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    """docs/tiers.md: raised once at the next ``step()``; the checkpoint is tried again at
    ``close()``, which raises if that round fails too — a program never ends quietly with a
    checkpoint missing from the run of record."""
    bucket = s3_url[len("s3://") :].split("/", 1)[0]
    state = sg.TrainState(model=torch.nn.Linear(4, 2))
    ckpt = sg.Checkpointer(
        s3_url, cache=tmp_path / "cache", handle_signals=False, save=sg.Every(steps=100),
        upload_retry=sg.UploadRetry(attempts=2, first_delay=0.05, max_delay=0.1),
    )  # fmt: skip
    _client(s3_endpoint).put_bucket_policy(
        Bucket=bucket,
        Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
            "Resource": f"arn:aws:s3:::{bucket}/runs/exp/step-*"}]}),
    )  # fmt: skip
    ckpt.save(state, 1)
    deadline = time.monotonic() + 30
    with pytest.raises(sg.StorageError, match="step 1"):  # noqa: PT012
        while time.monotonic() < deadline:  # the retries run out in the background
            ckpt.step(state, 2)
            time.sleep(0.1)
    with pytest.raises(sg.StorageError) as info:
        ckpt.close()
    assert info.value.step == 1
    assert _remote_steps(s3_endpoint, s3_url) == []
