"""Outside review S18: a run on object storage, seen by a preemptible-cloud user.

Moto S3 and nginx on loopback (tests/remote/conftest.py). Everything here uses only what
README.md ("Runs on object storage", "Command line"), docs/remote.md, docs/tiers.md and
docs/transfer.md promise.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader

from .conftest import S3Server

pytestmark = pytest.mark.network

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "_outside_s18" / "train.py"
ROOT = HERE.parents[1]
LEASE_S = 2


def _env(s3: S3Server, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(s3.env())
    env.update({"SAVEGAME_LEASE_SECONDS": str(LEASE_S), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    env.update(extra)
    return env


def _log(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _order(log: Path) -> dict[int, str]:
    """step -> sample ids of its batch, the last run's word for each step (a resumed run
    redoes the steps after its checkpoint)."""
    out: dict[int, str] = {}
    for line in _log(log):
        if line.startswith("step "):
            _, s, ids = line.split()
            out[int(s)] = ids
    return out


def _spawn(url: str, cache: Path, out: Path, log: Path, steps: int, env: dict[str, str],
           mode: str = "") -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(
        [sys.executable, str(TRAIN), url, str(cache), str(out), str(log), str(steps), mode],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        so, se = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        so, se = p.communicate()
    return p.returncode, so, se


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


class _Watcher:
    """A second reader that lists the remote run over and over and loads every checkpoint it
    lists: none may ever be partial."""

    def __init__(self, url: str) -> None:
        self.url, self.bad, self.seen = url, [], set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rows = reader.list_checkpoints(self.url)
            except Exception as e:  # noqa: BLE001 - a listing error is recorded, not fatal
                self.bad.append(("list", repr(e)))
                continue
            for r in rows:
                if not r.valid:
                    self.bad.append((r.step, "listed invalid"))
                    continue
                try:
                    sg.load(f"{self.url}/step-{r.step:012d}")
                    self.seen.add(r.step)
                except sg.CheckpointNotFoundError:
                    pass  # retention deleted it meanwhile (the manifest goes first)
                except Exception as e:  # noqa: BLE001
                    gone = r.step not in {x.step for x in reader.list_checkpoints(self.url)}
                    if not gone:
                        self.bad.append((r.step, repr(e)))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(30)


# --- 1. kill -9 at seeded random moments, each resume on a NEW empty cache ------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3])
def test_sigkill_anywhere_then_fresh_cache_resumes_bitwise_with_data_order_and_rng(
    s3_server: S3Server, s3_url: str, tmp_path: Path, seed: int
) -> None:
    steps = 24
    env = _env(s3_server)
    ref_out, ref_log = tmp_path / "ref.pt", tmp_path / "ref.log"
    ref_url = s3_url + "-ref"
    rc, so, se = _finish(_spawn(ref_url, tmp_path / "ref-cache", ref_out, ref_log, steps, env))
    assert rc == 0, se
    rng = random.Random(seed)
    out, log = tmp_path / "run.pt", tmp_path / "run.log"
    watcher = _Watcher(s3_url)
    try:
        for trial in range(3):
            p = _spawn(s3_url, tmp_path / f"cache{trial}", out, log, steps, env, mode="slow")
            n0 = len(_log(log))
            target = n0 + rng.randint(2, 7)
            _wait_for(lambda p=p, target=target: len(_log(log)) >= target or p.poll() is not None, 90,
                      f"trial {trial} to reach line {target}")  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.25))  # a save, an upload or retention in flight
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            p.stdout.close(); p.stderr.close()  # noqa: E702
        rc, so, se = _finish(_spawn(s3_url, tmp_path / "cache-last", out, log, steps, env))
        assert rc == 0, se
    finally:
        watcher.stop()
    assert not watcher.bad, watcher.bad
    assert _order(log) == _order(ref_log)
    starts = [line for line in _log(log) if line.startswith("start")]
    assert len(starts) == 4 and any(s != "start 0" for s in starts[1:]), starts
    assert not _equal(torch.load(ref_out), torch.load(out))


def _remote_steps(url: str) -> list[int]:
    return [r.step for r in reader.list_checkpoints(url) if r.valid]


def _cache_steps(cache: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in cache.glob("step-*") if (p / "manifest.json").exists())


# --- 2. SIGTERM (preemption notice) while an upload is in flight -----------------------------


@pytest.mark.slow
def test_sigterm_during_a_slow_upload_exits_75_and_the_remote_holds_the_newest_step(
    s3_server: S3Server, s3_url: str, tmp_path: Path, fault_proxy: Any
) -> None:
    proxy = fault_proxy(s3_server.endpoint)
    env = _env(s3_server, AWS_ENDPOINT_URL=proxy.url)
    out, log, cache = tmp_path / "o.pt", tmp_path / "l.log", tmp_path / "cache"
    p = _spawn(s3_url, cache, out, log, 400, env, mode="signals")
    try:
        _wait_for(lambda: len(_log(log)) >= 5 or p.poll() is not None, 60, "training to start")
        proxy.delay = 0.03  # every response from S3 slow: uploads stay in flight
        _wait_for(lambda: len(_log(log)) >= 12 or p.poll() is not None, 60, "more steps")
        p.send_signal(signal.SIGTERM)
        rc, so, se = _finish(p, timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    last = max(_order(log))
    assert rc == sg.EXIT_PREEMPTED, se[-3000:]
    proxy.clear()
    # docs/tiers.md: "close() waits for every pending upload"; the signal's save is committed.
    assert _cache_steps(cache)[-1] == last
    assert _remote_steps(s3_url)[-1] == last, (_remote_steps(s3_url), last, se[-2000:])


# --- 3. upload failures ------------------------------------------------------------------------


def _tiny_state() -> tuple[sg.TrainState, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return sg.TrainState(model=model, rng=False), model


def _bump(model: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        model.weight.fill_(float(step))


def _wait_remote(url: str, step: int, timeout: float = 20) -> None:
    _wait_for(lambda: step in _remote_steps(url), timeout, f"step {step} uploaded")


def test_remote_refusing_uploads_raises_typed_error_naming_url_on_the_next_step_then_close_uploads(
    s3_server: S3Server, s3_url: str, tmp_path: Path, fault_proxy: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    proxy = fault_proxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    cache = tmp_path / "cache"
    state, model = _tiny_state()
    retry = sg.UploadRetry(attempts=2, first_delay=0.05, max_delay=0.1)
    ckpt = sg.Checkpointer(s3_url, cache=cache, save=sg.Every(steps=1), keep=sg.Keep(last=1),
                           handle_signals=False, upload_retry=retry)  # fmt: skip
    try:
        for s in (1, 2):
            _bump(model, s)
            ckpt.step(state, s)
        _wait_remote(s3_url, 2)
        proxy.fail_next(100000, status=403)  # every request refused from now on
        err: BaseException | None = None
        s = 2
        deadline = time.monotonic() + 30
        while err is None and time.monotonic() < deadline:
            s += 1
            _bump(model, s)
            try:
                ckpt.step(state, s)
            except sg.StorageError as e:
                err = e
            time.sleep(0.1)
        assert err is not None, "no failure raised on the caller's thread"
        text = str(err)
        assert "s3://" in text and s3_url.split("/")[2] in text, text
        assert getattr(err, "path", None) and s3_url.split("/")[2] in str(err.path)
        # local checkpoints never lost: every step not uploaded is still in the cache
        assert set(range(3, s)) <= set(_cache_steps(cache)), (_cache_steps(cache), s)
        proxy.clear()
    finally:
        proxy.clear()
        ckpt.close()  # one more round of attempts: now they go through
    steps = _remote_steps(s3_url)
    assert steps and steps[-1] == max(_cache_steps(cache)), (steps, _cache_steps(cache))
    restored, m2 = _tiny_state()
    with sg.Checkpointer(s3_url, cache=tmp_path / "fresh", handle_signals=False) as c2:
        assert c2.restore(restored) == steps[-1]
    assert torch.equal(m2.weight, torch.full_like(m2.weight, float(steps[-1])))


def test_bucket_deleted_mid_run_is_a_typed_error_and_the_cache_keeps_everything(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    import boto3

    bucket = s3_url.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="k",
                      aws_secret_access_key="s", region_name="us-east-1")  # fmt: skip
    cache = tmp_path / "cache"
    state, model = _tiny_state()
    retry = sg.UploadRetry(attempts=2, first_delay=0.05, max_delay=0.1)
    ckpt = sg.Checkpointer(s3_url, cache=cache, save=sg.Every(steps=1), keep=sg.Keep(last=1),
                           handle_signals=False, upload_retry=retry)  # fmt: skip
    errs: list[BaseException] = []
    try:
        _bump(model, 1)
        ckpt.step(state, 1)
        _wait_remote(s3_url, 1)
        for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
        s3.delete_bucket(Bucket=bucket)
        deadline = time.monotonic() + 30
        s = 1
        while not errs and time.monotonic() < deadline:
            s += 1
            _bump(model, s)
            try:
                ckpt.step(state, s)
            except sg.StorageError as e:
                errs.append(e)
            time.sleep(0.1)
        assert set(range(1, s)) <= set(_cache_steps(cache)) | {1}
    finally:
        try:
            ckpt.close()
        except sg.StorageError as e:
            errs.append(e)
    assert errs, "deleting the bucket was never reported"
    assert all(bucket in str(e) for e in errs), [str(e) for e in errs]
    assert max(_cache_steps(cache)) >= 2  # nothing trained after the bucket went is lost


# --- 4. the lease ----------------------------------------------------------------------------

_HOLDER = """
import sys, time, savegame as sg
ck = sg.Checkpointer(sys.argv[1], handle_signals=False)
print("held", flush=True)
time.sleep(600)
"""

_RACER = """
import sys, time, savegame as sg
t = float(sys.argv[2])
while time.time() < t:
    time.sleep(0.001)
try:
    ck = sg.Checkpointer(sys.argv[1], handle_signals=False)
except sg.LockedError as e:
    print("locked", e, flush=True)
    sys.exit(3)
print("won", flush=True)
time.sleep(3)
ck.close()
"""


@pytest.mark.slow
def test_a_killed_holders_lease_names_it_then_expires_and_one_of_two_racers_wins(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(s3_server)
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))
    h = subprocess.Popen([sys.executable, "-c", _HOLDER, s3_url], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert h.stdout is not None and h.stdout.readline().strip() == "held", h.stderr.read()
        with pytest.raises(sg.LockedError) as ei:
            sg.Checkpointer(s3_url, handle_signals=False)
        assert f"pid {h.pid}" in str(ei.value), str(ei.value)
    finally:
        os.kill(h.pid, signal.SIGKILL)
        h.wait()
        h.stdout.close(); h.stderr.close()  # noqa: E702
    killed_at = time.time()
    with pytest.raises(sg.LockedError):  # still within the lease time
        sg.Checkpointer(s3_url, handle_signals=False).close()
    # two processes racing for the expired lease: start them now (imports), go together
    go = killed_at + LEASE_S + 4.0
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, s3_url, repr(go)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    results = [_finish(r, 60) for r in racers]
    assert time.time() > go, "racers started late: the race did not happen"
    words = sorted(so.split()[0] if so else f"rc={rc} {se[-500:]}" for rc, so, se in results)
    assert words == ["locked", "won"], results


# --- 5. secrets --------------------------------------------------------------------------------

KEY, SECRET, TOKEN, ENVSECRET = "AKIAURLKEY42", "UrlSecret9zq", "QueryTok7xw", "EnvSecret5kp"
SECRETS = (SECRET, TOKEN, ENVSECRET, "SessTok3vb")


def _cli(args: list[str], env: dict[str, str], timeout: float = 90) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "savegame", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    return p.returncode, p.stdout + p.stderr


def _no_secret(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"{where}: secret {s!r} shown:\n{text[-3000:]}"


def _small_run(root: Any, steps: tuple[int, ...] = (1, 2), n: int = 1000) -> None:
    holder: dict[str, Any] = {"w": torch.zeros(n)}
    state = sg.TrainState(rng=False, extras=holder)
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=5),
                         handle_signals=False) as ck:  # fmt: skip
        for s in steps:
            holder["w"] = torch.arange(n, dtype=torch.float32) * s
            ck.step(state, s)


def _secret_env(s3: S3Server) -> dict[str, str]:
    env = _env(s3, AWS_SECRET_ACCESS_KEY=ENVSECRET, AWS_SESSION_TOKEN="SessTok3vb")
    return env


@pytest.mark.slow
def test_secrets_never_shown_by_the_cli_on_success_or_error_paths(
    s3_server: S3Server, s3_url: str, tmp_path: Path, nginx_server: Any
) -> None:
    env = _secret_env(s3_server)
    local = tmp_path / "run"
    _small_run(local)
    bucket = s3_url.split("/")[2]
    url_cred = f"s3://{KEY}:{SECRET}@{bucket}/runs/exp?x-token={TOKEN}"
    plain = f"s3://{bucket}/runs/exp"
    # the same run served by nginx; the http URLs carry a user:password and a token query
    import shutil

    shutil.copytree(local, Path(nginx_server.root) / "run")
    (Path(nginx_server.root) / "page.html").write_text("<html><body>Sign in</body></html>")
    http = nginx_server.url.replace("http://", f"http://{KEY}:{SECRET}@") + "/run"
    outputs: dict[str, tuple[int, str]] = {}
    outputs["push"] = _cli(["push", str(local), plain], env)
    cmds = {
        "ls-s3": ["ls", plain], "ls-s3-cred": ["ls", url_cred], "verify-s3": ["verify", plain],
        "show-s3": ["show", plain + "/step-000000000002"],
        "pull-s3": ["pull", plain, str(tmp_path / "p1")],
        "ls-missing-bucket": ["ls", f"s3://{KEY}:{SECRET}@no-such-bkt-s18/r?t={TOKEN}"],
        "verify-missing-step": ["verify", plain + f"/step-000000000099?t={TOKEN}"],
        "pull-missing": ["pull", f"s3://{bucket}/nothing-here?t={TOKEN}", str(tmp_path / "p2")],
        "push-to-http": ["push", str(local), http],
        "ls-http": ["ls", http], "verify-http": ["verify", http],
        "pull-http": ["pull", http, str(tmp_path / "p3")],
        "show-http-404": ["show", http.replace("/run", f"/nope?sig={TOKEN}")],
        "ls-http-query": ["ls", http + f"?sig={TOKEN}"],
        "pull-html-page": ["pull", http.replace("/run", "/page.html"), str(tmp_path / "p5")],
        "verify-html-page": ["verify", http.replace("/run", "/page.html")],
        "bad-scheme": ["ls", f"ftp://{KEY}:{SECRET}@host/run?t={TOKEN}"],
        "pull-bad-step": ["pull", plain, str(tmp_path / "p4"), "--step", "77"],
    }  # fmt: skip
    for name, args in cmds.items():
        outputs[name] = _cli(args, env)
    for name, (_rc, text) in outputs.items():
        _no_secret(text, name)
        assert "Traceback" not in text, f"{name}: a traceback:\n{text[-3000:]}"
    expected_ok = ("push", "ls-s3", "ls-s3-cred", "verify-s3", "show-s3", "pull-s3", "ls-http",
                   "verify-http", "pull-http")  # fmt: skip
    for name in expected_ok:
        assert outputs[name][0] == 0, (name, outputs[name])
    for name in set(cmds) - set(expected_ok):  # README: 2 = bad input or a savegame error
        assert outputs[name][0] == 2, (name, outputs[name])
    for f in tmp_path.rglob("*"):
        if f.is_file():
            _no_secret(f.read_bytes().decode("latin-1"), str(f))


def test_cli_verify_of_a_missing_step_url_exits_2_like_show(s3_url: str, s3_env: S3Server) -> None:
    _small_run(s3_url, steps=(1,))
    env = _env(s3_env)
    missing = s3_url + "/step-000000000099"
    rc_show, _ = _cli(["show", missing], env)
    rc_verify, out = _cli(["verify", missing], env)
    assert rc_show == 2
    assert rc_verify == 2, out


# --- 6. push / pull -----------------------------------------------------------------------------


def _run_id(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_id"] if "run_id" in json.loads(
        (run / "run.json").read_text()) else (run / "run.json").read_text()  # fmt: skip


@pytest.mark.slow
def test_push_pull_step_n_another_run_a_live_held_run_and_a_lying_object(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    import boto3

    env = _env(s3_server)
    local = tmp_path / "live"
    holder: dict[str, Any] = {"w": torch.zeros(50_000)}
    state = sg.TrainState(rng=False, extras=holder)
    ck = sg.Checkpointer(local, save=sg.Every(steps=1), keep=sg.Keep(last=5), handle_signals=False)
    try:
        for s in (1, 2, 3):
            holder["w"] = torch.arange(50_000, dtype=torch.float32) * s
            ck.step(state, s)
        # push of a run a live training holds: reading it is allowed, the lock is the writer's
        rc, out = _cli(["push", str(local), s3_url, "--step", "2"], env)
        assert rc == 0, out
        assert _remote_steps(s3_url) == [2]
        rc, out = _cli(["push", str(local), s3_url], env)
        assert rc == 0, out
        assert _remote_steps(s3_url) == [1, 2, 3]
    finally:
        ck.close()
    # pull --step N into a fresh folder
    rc, out = _cli(["pull", s3_url, str(tmp_path / "one"), "--step", "3"], env)
    assert rc == 0, out
    assert _cache_steps(tmp_path / "one") == [3]
    loaded = sg.load(tmp_path / "one" / "step-000000000003")
    assert torch.equal(loaded["extras"]["w"], holder["w"])
    # pull into a folder that already holds a different run: refused, nothing written
    other = tmp_path / "other"
    _small_run(other, steps=(7,))
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    rc, out = _cli(["pull", s3_url, str(other)], env)
    assert rc == 2 and "another run" in out, out
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before
    # an object that lies (same size, other bytes): verify finds it (1), pull refuses it
    bucket = s3_url.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="k",
                      aws_secret_access_key="s", region_name="us-east-1")  # fmt: skip
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    data_key = next(k for k in keys if "step-000000000003/" in k and k.endswith(".safetensors"))
    body = bytearray(s3.get_object(Bucket=bucket, Key=data_key)["Body"].read())
    body[-10] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=data_key, Body=bytes(body))
    rc, out = _cli(["verify", s3_url], env)
    assert rc == 1 and "000000000003" in out, out
    dest = tmp_path / "pulled"
    rc, out = _cli(["pull", s3_url, str(dest)], env)
    assert rc != 0, out
    assert "step-000000000003" in out or "3" in out
    assert 3 not in _cache_steps(dest)  # nothing of the lying checkpoint committed
    assert _cache_steps(dest) == [1, 2]  # the others moved (docs/transfer.md)


@pytest.mark.parametrize("same_bytes", [True, False])
def test_pull_from_nginx_when_the_file_is_replaced_mid_download(
    nginx_server: Any, fault_proxy: Any, tmp_path: Path, same_bytes: bool
) -> None:
    src = Path(nginx_server.root) / "run"
    n = 2_000_000
    holder: dict[str, Any] = {"w": torch.arange(n, dtype=torch.float32)}
    with sg.Checkpointer(src, save=sg.Every(steps=1), handle_signals=False) as ck:
        ck.step(sg.TrainState(rng=False, extras=holder), 1)
    data = next((src / "step-000000000001").glob("*.safetensors"))
    proxy = fault_proxy(nginx_server.url)
    proxy.delay = 0.01  # slow enough to replace the file mid-download
    replaced: list[float] = []
    original = data.read_bytes()

    def replace() -> None:
        _wait_for(lambda: proxy.bytes_down > 1_000_000, 30, "the download to start")
        new = bytearray(original)
        if not same_bytes:
            new[len(new) // 2] ^= 0xFF
        tmp = data.with_suffix(".new")
        tmp.write_bytes(bytes(new))
        os.utime(tmp, (time.time() + 5, time.time() + 5))  # a new mtime: a new ETag
        os.replace(tmp, data)
        replaced.append(proxy.bytes_down)
        proxy.cut_after(1000)  # the stream in flight ends: the next GET sees the new file

    t = threading.Thread(target=replace, daemon=True)
    t.start()
    dest = tmp_path / "dest"
    try:
        if same_bytes:  # "restarts that file from byte 0" and verifies
            rep = sg.pull(f"{proxy.url}/run", dest)
            assert rep.verified and rep.copied == [1] or list(rep.copied) == [1], rep
            assert torch.equal(sg.load(dest / "step-000000000001")["extras"]["w"], holder["w"])
        else:  # the stream in flight keeps the old bytes, or the new ones fail their hash
            try:
                rep = sg.pull(f"{proxy.url}/run", dest)
            except sg.IntegrityError:
                assert _cache_steps(dest) == []
            else:  # committed: then only with bytes that verify (the original ones)
                assert rep.verified, rep
                got = sg.load(dest / "step-000000000001")["extras"]["w"]
                assert torch.equal(got, holder["w"]), (rep, proxy.cuts)
    finally:
        t.join(30)
    assert replaced and replaced[0] < len(original), "not replaced mid-download"



def test_secrets_in_the_url_and_environment_never_reach_errors_logs_or_cache_files(
    s3_server: S3Server, s3_url: str, tmp_path: Path, fault_proxy: Any,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    import traceback

    proxy = fault_proxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "SessTok3vb")
    bucket = s3_url.split("/")[2]
    url = f"s3://{KEY}:{SECRET}@{bucket}/runs/exp?x-token={TOKEN}"
    cache = tmp_path / "cache"
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    state, model = _tiny_state()
    retry = sg.UploadRetry(attempts=2, first_delay=0.05, max_delay=0.1)
    ck = sg.Checkpointer(url, cache=cache, save=sg.Every(steps=1), handle_signals=False,
                         upload_retry=retry)  # fmt: skip
    try:
        ck.step(state, 1)
        _wait_remote(f"s3://{bucket}/runs/exp", 1)
        with pytest.raises(sg.LockedError) as li:
            sg.Checkpointer(url, handle_signals=False)
        texts += traceback.format_exception(li.value)
        proxy.fail_next(100000, status=403)
        deadline = time.monotonic() + 30
        s = 1
        while time.monotonic() < deadline:
            s += 1
            try:
                ck.step(state, s)
            except sg.StorageError as e:
                texts += traceback.format_exception(e) + [repr(e), str(getattr(e, "path", ""))]
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no upload failure raised")
    finally:
        try:
            ck.close()
        except sg.StorageError as e:
            texts += traceback.format_exception(e)
        proxy.clear()
    with pytest.raises(sg.CheckpointError) as mi:  # a missing bucket with the secret URL
        reader.list_checkpoints(f"s3://{KEY}:{SECRET}@no-such-bkt-s18b/r?t={TOKEN}")
    texts += traceback.format_exception(mi.value)
    texts += [r.getMessage() + " " + str(r.args) for r in caplog.records]
    for i, t in enumerate(texts):
        _no_secret(t, f"text {i}")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            _no_secret(f.read_bytes().decode("latin-1"), str(f))
