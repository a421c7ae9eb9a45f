"""Outside review S30: push / pull as a new user reads them in README.md, docs/transfer.md and
docs/remote.md — through the public API (``savegame.tools.transfer.push/pull``, ``sg.push``,
``sg.pull``) and the CLI (``python -m savegame push|pull|ls|verify|show``, run as a subprocess).

Sources and destinations: local folders, ``file://`` URLs, ``memory://`` (in-process only), the
loopback HTTP server of ``tests/remote/conftest.py`` (read-only runs) and its moto S3 server.

Written from the docs alone; nothing here contradicted them (no xfail). The whole file runs
with ``-m slow``: CI's 20 minutes are spent, and the promises it restates are each tested in CI
most of them by the issue-11 tests (tests/remote/test_push_pull.py, test_remote_runs.py, tests/tools/).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.tools.transfer import pull, push

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "savegame"]
STEP_DIR = "step-{:012d}"
DATA = "rank-00000.safetensors"


# ------------------------------------------------------------------------------------------------
# helpers


def _state(seed: int = 0, big: int = 0) -> tuple[sg.TrainState, torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    extras: dict = {"epoch": 0}
    if big:
        extras["blob"] = torch.zeros(big // 4, dtype=torch.float32)
    return sg.TrainState(model=model, optimizer=opt, extras=extras, rng=False), model, extras


def make_run(
    root: Path | str,
    steps=(1, 2, 3),
    *,
    seed: int = 0,
    big: int = 0,
    keep: sg.Keep | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """A run with a checkpoint at each of ``steps``; the weights (and the big blob, if any)
    change between steps, so every checkpoint owns its bytes. Returns the weights per step."""
    st, model, extras = _state(seed, big)
    ck = sg.Checkpointer(root, handle_signals=False, keep=keep or sg.Keep(last=50))
    out = {}
    gen = torch.Generator().manual_seed(seed + 1000)
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            if big:
                extras["blob"].copy_(torch.randn(extras["blob"].shape, generator=gen))
        extras["epoch"] = s
        ck.save(st, s)
        out[s] = {k: v.clone() for k, v in model.state_dict().items()}
    ck.close()
    return out


def add_steps(root, steps, *, seed: int = 7) -> dict[int, dict[str, torch.Tensor]]:
    """Newer saves into an existing run (the same run id)."""
    st, model, _ = _state(seed)
    ck = sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=50))
    out = {}
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(s))
        ck.save(st, s)
        out[s] = {k: v.clone() for k, v in model.state_dict().items()}
    ck.close()
    return out


def restore_weights(root, step: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    st, model, _ = _state(999)
    ck = sg.Checkpointer(root, handle_signals=False)
    try:
        got = ck.restore(st) if step is None else ck.restore(st, step=step)
    finally:
        ck.close()
    return got, {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("COLUMNS", "200")
    if env:
        e.update(env)
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
        stdin=subprocess.DEVNULL,
        errors="backslashreplace",
    )


def cli_pty(*args, env=None, timeout=60) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (so the progress bar shows)."""
    master, slave = pty.openpty()
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen(
        [*CLI, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=e,
    )
    os.close(slave)
    buf = bytearray()

    def reader() -> None:
        while True:
            try:
                d = os.read(master, 65536)
            except OSError:
                break
            if not d:
                break
            buf.extend(d)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    with p.stdout:
        out = p.stdout.read()
    p.wait(timeout=timeout)
    t.join(5)
    os.close(master)
    return (
        p.returncode,
        out.decode("utf-8", "backslashreplace"),
        buf.decode("utf-8", "backslashreplace"),
    )


def steps_in(root) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[5:])
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / "manifest.json").is_file()
    )


def snapshot(root) -> dict[str, bytes]:
    """Every regular file under ``root`` (the lock file aside) with its bytes."""
    root = Path(root)
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            rel = str(p.relative_to(root))
            if rel == ".lock":
                continue
            out[rel] = p.read_bytes()
    return out


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def run_id(root) -> str:
    return json.loads(Path(root, "run.json").read_text())["run_id"]


def verify_ok(root) -> bool:
    """`savegame verify ROOT` exits 0. Run through the `savegame` entry point in this process
    (pyproject's ``savegame.cli.main:main``) to save an interpreter start per check; the exit
    statuses themselves are tested through subprocesses."""
    import contextlib
    import io

    from savegame.cli.main import main

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            rc = main(["verify", str(root)])
        except SystemExit as e:
            rc = e.code
    return rc == 0


def staging_leftovers(root) -> list[str]:
    root = Path(root)
    return (
        [p.name for p in root.iterdir() if p.name.startswith(".tmp-step")] if root.is_dir() else []
    )


@pytest.fixture
def src(tmp_path) -> Path:
    root = tmp_path / "src-run"
    make_run(root)
    return root


@pytest.fixture
def mem_url() -> str:
    return f"memory://s30-{uuid.uuid4().hex[:8]}/runs/exp"


# ------------------------------------------------------------------------------------------------
# The whole run moves, and arrives as the same run


def test_push_into_nothing_creates_the_run_with_its_id_latest_and_every_step(src, tmp_path):
    weights = {s: restore_weights(src, s)[1] for s in (1, 2, 3)}
    dst = tmp_path / "a" / "b" / "dst"  # parents do not exist either
    report = push(src, dst)
    assert report.verified
    assert sorted(report.copied) == [1, 2, 3]
    assert report.skipped == () or list(report.skipped) == []
    assert not report.problems and not report.ignored
    assert report.bytes_moved > 0
    assert steps_in(dst) == [1, 2, 3]
    assert run_id(dst) == run_id(src)
    assert (dst / "LATEST").read_text().strip() == (src / "LATEST").read_text().strip()
    for s in (1, 2, 3):
        assert (dst / STEP_DIR.format(s) / DATA).read_bytes() == (
            src / STEP_DIR.format(s) / DATA
        ).read_bytes()
        got, w = restore_weights(dst, s)
        assert got == s and same_weights(w, weights[s])
    assert staging_leftovers(dst) == []
    assert verify_ok(dst)


def test_sg_push_and_pull_are_the_transfer_functions(src, tmp_path, mem_url):
    r1 = sg.push(src, mem_url)
    r2 = sg.pull(mem_url, tmp_path / "back")
    assert r1.verified and r2.verified
    assert sorted(r2.copied) == [1, 2, 3]
    assert snapshot(tmp_path / "back") == {k: v for k, v in snapshot(src).items()}
    assert isinstance(r1, sg.TransferReport)


def test_newest_checkpoint_is_committed_first(tmp_path):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2, 3, 4))
    dst = tmp_path / "dst"
    report = push(src, dst)
    assert list(report.copied) == [4, 3, 2, 1]
    # the manifest is the commit point: newest first means its manifest is the oldest file
    mtimes = [(dst / STEP_DIR.format(s) / "manifest.json").stat().st_mtime_ns for s in (4, 3, 2, 1)]
    assert mtimes == sorted(mtimes)


def test_report_is_frozen_and_names_source_and_dest(src, tmp_path):
    dst = tmp_path / "dst"
    report = push(src, dst)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        report.copied = ()  # type: ignore[misc]
    assert str(src) in report.source and str(dst) in report.dest
    assert report.verified is True
    for name in ("copied", "skipped", "bytes_moved", "bytes_skipped", "ignored", "problems"):
        assert hasattr(report, name)


# ------------------------------------------------------------------------------------------------
# call orders: twice, after a newer save, into an older copy, single checkpoints


@pytest.mark.parametrize("how", ["api", "cli"])
def test_push_twice_second_run_skips_everything_and_changes_nothing(src, tmp_path, how):
    dst = tmp_path / "dst"
    if how == "api":
        first = push(src, dst)
        assert sorted(first.copied) == [1, 2, 3]
        before = snapshot(dst)
        again = push(src, dst)
        assert again.verified and list(again.copied) == []
        assert sorted(again.skipped) == [1, 2, 3]
        data = sum((src / STEP_DIR.format(s) / DATA).stat().st_size for s in (1, 2, 3))
        assert again.bytes_skipped >= data
    else:
        r = cli("push", src, dst)
        assert r.returncode == 0, r.stderr
        before = snapshot(dst)
        r = cli("push", src, dst)
        assert r.returncode == 0, r.stderr
        assert "3 already there" in r.stdout
    assert snapshot(dst) == before


@pytest.mark.parametrize("how", ["api", "cli"])
def test_pull_twice(src, tmp_path, how):
    dst = tmp_path / "dst"
    url = src.as_uri()  # file:///abs
    for i in range(2):
        if how == "api":
            r = pull(url, dst)
            assert r.verified
            assert sorted(r.copied if i == 0 else r.skipped) == [1, 2, 3]
        else:
            r = cli("pull", url, dst)
            assert r.returncode == 0, r.stderr
    assert steps_in(dst) == [1, 2, 3] and verify_ok(dst)


@pytest.mark.parametrize("how", ["api", "cli"])
def test_push_after_a_newer_save_adds_only_the_new_step(src, tmp_path, how):
    dst = tmp_path / "dst"
    push(src, dst)
    before = snapshot(dst)
    new = add_steps(src, [4, 5])
    if how == "api":
        r = push(src, dst)
        assert r.verified
        assert sorted(r.copied) == [4, 5] and sorted(r.skipped) == [1, 2, 3]
    else:
        r = cli("push", src, dst)
        assert r.returncode == 0, r.stderr
    after = snapshot(dst)
    for k, v in before.items():
        if k not in ("LATEST", "run.json"):
            assert after[k] == v, k
    assert steps_in(dst) == [1, 2, 3, 4, 5]
    got, w = restore_weights(dst)
    assert got == 5 and same_weights(w, new[5])
    assert (dst / "LATEST").read_text().strip() == STEP_DIR.format(5)


def test_pull_into_a_folder_holding_an_older_copy_of_the_same_run(src, tmp_path, mem_url):
    push(src, mem_url, steps=[1])
    dst = tmp_path / "dst"
    r = pull(mem_url, dst)
    assert r.copied == (1,) and steps_in(dst) == [1]
    push(src, mem_url)  # the remote gains 2 and 3
    r = pull(mem_url, dst)
    assert r.verified and sorted(r.copied) == [2, 3] and list(r.skipped) == [1]
    assert steps_in(dst) == [1, 2, 3] and verify_ok(dst)


@pytest.mark.parametrize("how", ["api", "cli"])
def test_step_option_moves_only_those_steps(src, tmp_path, how):
    dst = tmp_path / "dst"
    if how == "api":
        r = push(src, dst, steps=[1, 3])
        assert sorted(r.copied) == [1, 3] and r.verified
    else:
        r = cli("push", src, dst, "--step", 1, "--step", 3, "--no-progress")
        assert r.returncode == 0, r.stderr
    assert steps_in(dst) == [1, 3]
    if how == "api":
        r = pull(dst, tmp_path / "dst2", steps=[3])
        assert list(r.copied) == [3]
    else:
        r = cli("pull", dst, tmp_path / "dst2", "--step", 3)
        assert r.returncode == 0, r.stderr
    assert steps_in(tmp_path / "dst2") == [3]
    assert run_id(tmp_path / "dst2") == run_id(src)


def test_step_that_the_source_lacks_is_an_error_not_a_silent_success(src, tmp_path):
    dst = tmp_path / "dst"
    with pytest.raises(sg.CheckpointError):
        push(src, dst, steps=[99])
    r = cli("push", src, dst, "--step", 99)
    assert r.returncode == 2
    assert "99" in r.stderr
    assert steps_in(dst) == []


@pytest.mark.parametrize("how", ["api", "cli"])
def test_one_checkpoint_into_a_fresh_folder_becomes_a_run_of_the_same_id(src, tmp_path, how):
    dst = tmp_path / "dst"
    one = src / STEP_DIR.format(2)
    if how == "api":
        r = push(one, dst)
        assert r.verified and list(r.copied) == [2]
    else:
        r = cli("push", one, dst)
        assert r.returncode == 0, r.stderr
    assert steps_in(dst) == [2]
    assert run_id(dst) == run_id(src)
    got, w = restore_weights(dst)
    assert got == 2 and same_weights(w, restore_weights(src, 2)[1])


def test_one_checkpoint_into_an_existing_run_of_the_same_id_keeps_its_run_json(
    src, tmp_path, mem_url
):
    dst = tmp_path / "dst"
    pull(src, dst, steps=[1])
    sg.Checkpointer(dst, keep=sg.Keep(last=7), handle_signals=False).close()  # dst's own rule
    before = json.loads((dst / "run.json").read_text())
    assert before["keep"]["last"] == 7
    r = push(src / STEP_DIR.format(3), dst)
    assert r.verified and list(r.copied) == [3]
    after = json.loads((dst / "run.json").read_text())
    assert after["keep"]["last"] == 7 and after["run_id"] == run_id(src)
    # the same through a URL source (a checkpoint in memory://)
    push(src, mem_url)
    r = pull(f"{mem_url}/{STEP_DIR.format(2)}", dst)
    assert list(r.copied) == [2]
    assert json.loads((dst / "run.json").read_text())["keep"]["last"] == 7
    assert steps_in(dst) == [1, 2, 3]


def test_pulled_folder_continues_the_same_run(src, tmp_path, mem_url):
    push(src, mem_url)
    dst = tmp_path / "dst"
    pull(mem_url, dst)
    st, model, _ = _state(5)
    ck = sg.Checkpointer(dst, keep=sg.Keep(last=2), handle_signals=False)
    assert ck.restore(st) == 3
    assert same_weights(model.state_dict(), restore_weights(src, 3)[1])
    ck.save(st, 4)
    ck.save(st, 5)
    ck.close()
    # retention of the same run may delete the pulled checkpoints: they are this run's
    assert steps_in(dst) == [4, 5]
    assert run_id(dst) == run_id(src)


# ------------------------------------------------------------------------------------------------
# the destination table


def _two_runs(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    make_run(a, seed=1)
    make_run(b, steps=(1, 2), seed=2)
    assert run_id(a) != run_id(b)
    return a, b


@pytest.mark.parametrize("what", ["run", "one-checkpoint", "no-run-json"])
def test_destination_holding_another_run_is_refused_before_anything_is_written(tmp_path, what):
    a, b = _two_runs(tmp_path)
    if what == "no-run-json":
        (b / "run.json").unlink()  # the id is still in b's manifests
    before = snapshot(b)
    source = a / STEP_DIR.format(3) if what == "one-checkpoint" else a
    with pytest.raises(sg.CheckpointError, match="holds another run"):
        push(source, b)
    assert snapshot(b) == before
    r = cli("push", source, b)
    assert r.returncode == 2
    assert "holds another run" in r.stderr
    r = cli("pull", source.as_uri(), b)
    assert r.returncode == 2
    assert snapshot(b) == before
    assert staging_leftovers(b) == []


def test_destination_memory_url_holding_another_run_is_refused(tmp_path, mem_url):
    a, b = _two_runs(tmp_path)
    push(b, mem_url)
    with pytest.raises(sg.CheckpointError, match="holds another run"):
        push(a, mem_url)
    back = tmp_path / "back"
    pull(mem_url, back)
    assert run_id(back) == run_id(b) and steps_in(back) == [1, 2]
    assert snapshot(back) == snapshot(b)  # nothing of a arrived


@pytest.mark.parametrize("how", ["api", "cli"])
def test_same_step_with_different_valid_content_is_refused_and_kept(src, tmp_path, how):
    dst = tmp_path / "dst"
    push(src, dst)
    # the source's step 3 is replaced by another save of step 3 (same run, other weights)
    shutil.rmtree(src / STEP_DIR.format(3))
    (src / "LATEST").unlink()
    add_steps(src, [3], seed=42)
    assert (src / STEP_DIR.format(3) / DATA).read_bytes() != (
        dst / STEP_DIR.format(3) / DATA
    ).read_bytes()
    before = snapshot(dst)
    if how == "api":
        with pytest.raises(sg.StepExistsError):
            push(src, dst)
    else:
        r = cli("push", src, dst)
        assert r.returncode != 0
        assert "3" in r.stderr
    # the step is not overwritten (run.json, the same run's, may be refreshed)
    assert {k: v for k, v in snapshot(dst).items() if k not in ("LATEST", "run.json")} == {
        k: v for k, v in before.items() if k not in ("LATEST", "run.json")
    }
    assert run_id(dst) == run_id(src)
    assert verify_ok(dst)


@pytest.mark.parametrize(
    "damage, how",
    [("flipped-byte", "api"), ("flipped-byte", "cli"), ("truncated", "api"),
     ("no-manifest", "cli"), ("bad-manifest", "api")],
)  # fmt: skip
def test_damaged_copy_in_destination_is_replaced_by_the_source(src, tmp_path, damage, how):
    dst = tmp_path / "dst"
    push(src, dst)
    d = dst / STEP_DIR.format(2)
    if damage == "flipped-byte":
        flip_last_byte(d / DATA)
    elif damage == "truncated":
        data = (d / DATA).read_bytes()
        (d / DATA).write_bytes(data[: len(data) // 2])
    elif damage == "no-manifest":
        (d / "manifest.json").unlink()
    else:
        (d / "manifest.json").write_text("{ not json")
    assert not verify_ok(dst)
    if how == "api":
        r = push(src, dst)
        assert r.verified
        assert 2 in r.copied and sorted(r.skipped) == [1, 3]
    else:
        r = cli("push", src, dst)
        assert r.returncode == 0, r.stderr
    assert (d / DATA).read_bytes() == (src / STEP_DIR.format(2) / DATA).read_bytes()
    assert (d / "manifest.json").read_bytes() == (
        src / STEP_DIR.format(2) / "manifest.json"
    ).read_bytes()
    assert verify_ok(dst)


def test_http_destination_is_refused_read_only(src, http_server):
    url = http_server.url_for("runs/exp")
    with pytest.raises(sg.StorageError, match="read-only"):
        push(src, url)
    r = cli("push", src, url)
    assert r.returncode == 2
    assert "read-only" in r.stderr
    assert not (http_server.root / "runs").exists()


@pytest.mark.parametrize("url", ["ftp://host/runs/x", "gopher://h/x", "s4://b/x"])
def test_unsupported_scheme_is_a_typed_error(src, url):
    with pytest.raises(sg.UnsupportedURLError) as ei:
        push(src, url)
    assert isinstance(ei.value, sg.StorageError) and isinstance(ei.value, ValueError)
    r = cli("push", src, url)
    assert r.returncode == 2
    assert "s3://" in r.stderr  # the message lists the schemes


def test_relative_file_url_is_refused(src, tmp_path):
    r = cli("push", src, "file://exp1")
    assert r.returncode == 2
    r = cli("pull", "file://exp1", tmp_path / "dst")
    assert r.returncode == 2
    assert steps_in(tmp_path / "dst") == []


def test_missing_source_is_exit_2(tmp_path):
    r = cli("pull", tmp_path / "nothing-here", tmp_path / "dst")
    assert r.returncode == 2 and r.stderr.strip()
    r = cli("push", (tmp_path / "nothing-here").as_uri(), tmp_path / "dst")
    assert r.returncode == 2


def test_local_destination_is_locked_against_a_training_run(src, tmp_path):
    dst = tmp_path / "dst"
    push(src, dst, steps=[1])
    before = snapshot(dst)
    ck = sg.Checkpointer(dst, handle_signals=False)  # a training run writing the folder
    try:
        with pytest.raises(sg.LockedError):
            push(src, dst)
        r = cli("push", src, dst)  # from another process too
        assert r.returncode == 2
        assert "pid" in r.stderr.lower() or "lock" in r.stderr.lower()
    finally:
        ck.close()
    assert steps_in(dst) == [1]
    assert {k: v for k, v in snapshot(dst).items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }
    assert push(src, dst).verified  # free once the training run closed


# ------------------------------------------------------------------------------------------------
# the source: uncommitted folders, damaged manifests, damaged data


def test_uncommitted_source_folders_are_ignored_not_moved(src, tmp_path):
    leftover = src / STEP_DIR.format(9)
    leftover.mkdir()
    (leftover / DATA).write_bytes(b"\0" * 100)  # a killed writer's leftovers: no manifest
    tmp = src / ".tmp-step-000000000010-deadbeef"
    tmp.mkdir()
    (tmp / DATA).write_bytes(b"\0" * 100)
    dst = tmp_path / "dst"
    r = push(src, dst)
    assert r.verified  # ignored folders are not problems
    assert sorted(r.copied) == [1, 2, 3]
    assert any("9" in str(x) for x in r.ignored), r.ignored
    assert not (dst / STEP_DIR.format(9)).exists()
    assert not any("000000000010" in p.name for p in dst.iterdir())
    r = cli("pull", src, tmp_path / "dst2")
    assert r.returncode == 0, r.stderr
    assert steps_in(tmp_path / "dst2") == [1, 2, 3]


@pytest.mark.parametrize("how", ["api", "cli"])
def test_source_checkpoint_whose_manifest_does_not_parse_is_a_problem(src, tmp_path, how):
    (src / STEP_DIR.format(2) / "manifest.json").write_text("{ truncated")
    before_src = snapshot(src)
    dst = tmp_path / "dst"
    if how == "api":
        r = push(src, dst)
        assert not r.verified
        assert r.problems
        assert sorted(r.copied) == [1, 3]
    else:
        r = cli("push", src, dst)
        assert r.returncode != 0  # "exit 0 only when verified"
        assert r.returncode in (1, 2)
    assert steps_in(dst) == [1, 3]
    assert not (dst / STEP_DIR.format(2) / DATA).exists()
    assert snapshot(src) == before_src  # nothing is deleted from the source
    assert verify_ok(dst)


def _damage_source_data(root: Path, step: int, kind: str) -> None:
    f = root / STEP_DIR.format(step) / DATA
    if kind == "flipped-byte":
        flip_last_byte(f)
    elif kind == "truncated":
        f.write_bytes(f.read_bytes()[:-16])
    elif kind == "longer":
        f.write_bytes(f.read_bytes() + b"\0" * 16)
    elif kind == "html":
        f.write_bytes(b"<!DOCTYPE html><html><body>Please sign in</body></html>\n")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, direction",
    [("flipped-byte", "push"), ("flipped-byte", "pull"), ("truncated", "pull"),
     ("longer", "push"), ("html", "pull")],
)  # fmt: skip
def test_damaged_source_data_raises_integrity_error_and_keeps_destination(
    tmp_path, kind, direction
):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2))
    dst = tmp_path / "dst"
    push(src, dst)  # an earlier, good transfer
    before = snapshot(dst)
    add_steps(src, [3])
    _damage_source_data(src, 3, kind)
    before_src = snapshot(src)
    fn = push if direction == "push" else pull
    source = src if direction == "push" else src.as_uri()
    with pytest.raises(sg.IntegrityError) as ei:
        fn(source, dst)
    msg = str(ei.value)
    assert DATA in msg and ("step-000000000003" in msg or "step 3" in msg), msg
    assert steps_in(dst) == [1, 2]
    assert not (dst / STEP_DIR.format(3)).exists()
    assert staging_leftovers(dst) == []
    for k, v in before.items():
        if k not in ("LATEST", "run.json"):
            assert snapshot(dst)[k] == v
    assert verify_ok(dst)
    assert snapshot(src) == before_src  # nothing deleted from the source
    # the CLI: exit 1 (a check found a damaged source checkpoint), the destination left as it was
    r = cli(direction, source, dst) if direction == "push" else cli("pull", source, dst)
    assert r.returncode != 0
    assert r.returncode == 1  # a damaged source checkpoint (cli/main.py), as a broken manifest
    assert DATA in r.stderr
    assert steps_in(dst) == [1, 2] and verify_ok(dst)


def test_damaged_older_source_step_other_checkpoints_are_moved_first(tmp_path):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2, 3))
    _damage_source_data(src, 2, "flipped-byte")
    dst = tmp_path / "dst"
    with pytest.raises(sg.IntegrityError) as ei:
        push(src, dst)
    assert steps_in(dst) == [1, 3]  # "The other checkpoints are moved first"
    assert verify_ok(dst)
    assert staging_leftovers(dst) == []
    msg = str(ei.value)
    assert "step-000000000002" in msg or "step 2" in msg
    # "… and the error says so"
    assert "other checkpoints were moved" in msg or "moved" in msg, msg


def test_damaged_source_to_memory_and_back(tmp_path, mem_url):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2))
    push(src, mem_url)
    add_steps(src, [3])
    _damage_source_data(src, 3, "flipped-byte")
    with pytest.raises(sg.IntegrityError):
        push(src, mem_url)
    back = tmp_path / "back"
    r = pull(mem_url, back)
    assert r.verified and steps_in(back) == [1, 2]
    assert verify_ok(back)


# ------------------------------------------------------------------------------------------------
# interrupted transfers and re-runs


def test_leftover_staging_folder_in_destination_does_not_block_the_rerun(src, tmp_path):
    dst = tmp_path / "dst"
    push(src, dst, steps=[3])
    # what a killed pull leaves: a staging folder with a partial file (and its sidecar)
    tmp = dst / ".tmp-step-000000000002-0123abcd"
    tmp.mkdir()
    good = (src / STEP_DIR.format(2) / DATA).read_bytes()
    (tmp / f"{DATA}.part").write_bytes(good[:100])
    (tmp / f"{DATA}.part.json").write_text(json.dumps({"etag": None, "size": len(good)}))
    r = cli("ls", dst)
    assert r.returncode == 0
    assert verify_ok(dst)  # a leftover is not a failure
    r = pull(src, dst)
    assert r.verified and sorted(r.copied) == [1, 2]
    assert steps_in(dst) == [1, 2, 3] and verify_ok(dst)


def test_killed_push_leaves_only_verifiable_checkpoints_and_rerun_completes(tmp_path):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2, 3, 4), big=6 << 20)
    dst = tmp_path / "dst"
    p = subprocess.Popen([*CLI, "push", src, dst, "--no-progress"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and p.poll() is None:
        if dst.exists() and (steps_in(dst) or staging_leftovers(dst)):
            break
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    p.wait()
    for s in steps_in(dst):  # nothing partial is ever visible
        assert verify_ok(dst / STEP_DIR.format(s)), s
    r = cli("push", src, dst)
    assert r.returncode == 0, r.stderr
    assert steps_in(dst) == [1, 2, 3, 4] and verify_ok(dst)


# ------------------------------------------------------------------------------------------------
# file:// and memory:// URLs, ls / verify / show on URLs


def test_file_urls_everywhere_in_the_cli(src, tmp_path):
    dst = tmp_path / "dst"
    url = dst.as_uri()
    r = cli("push", src.as_uri(), url)
    assert r.returncode == 0, r.stderr
    for cmd in (["ls", url], ["ls", url, "--verify"], ["verify", url],
                ["show", f"{url}/{STEP_DIR.format(2)}"], ["verify", f"{url}/{STEP_DIR.format(3)}"]):  # fmt: skip
        r = cli(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    r = cli("pull", url, tmp_path / "back")
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "back") == snapshot(src)
    flip_last_byte(dst / STEP_DIR.format(1) / DATA)
    assert cli("verify", url).returncode == 1
    assert cli("ls", url, "--verify").returncode == 1


def test_memory_url_is_a_run_for_the_checkpointer_too(src, tmp_path, mem_url):
    push(src, mem_url)
    got, w = restore_weights(mem_url)
    assert got == 3 and same_weights(w, restore_weights(src, 3)[1])
    # a checkpoint of the memory run, located by URL
    r = pull(f"{mem_url}/{STEP_DIR.format(1)}", tmp_path / "one")
    assert list(r.copied) == [1] and verify_ok(tmp_path / "one")


def test_start_from_another_run_by_url(src, tmp_path, mem_url):
    push(src, mem_url)
    before = pull(mem_url, tmp_path / "before")
    assert before.verified
    new = tmp_path / "new-run"
    st, model, _ = _state(77)
    ck = sg.Checkpointer(new, start_from=mem_url, handle_signals=False)
    assert ck.restore(st) == 3
    assert same_weights(model.state_dict(), restore_weights(src, 3)[1])
    with torch.no_grad():
        model.weight.add_(1.0)
    ck.save(st, 4)
    ck.close()
    assert steps_in(new) == [4]
    # read-only: the source run did not change
    again = pull(mem_url, tmp_path / "before")
    assert list(again.copied) == [] and sorted(again.skipped) == [1, 2, 3]
    # ignored once the new run has its own checkpoint
    st2, model2, _ = _state(78)
    ck = sg.Checkpointer(new, start_from=mem_url, handle_signals=False)
    assert ck.restore(st2) == 4
    ck.close()
    assert same_weights(model2.state_dict(), model.state_dict())


def test_start_from_a_file_url_and_from_http(src, tmp_path, http_server):
    shutil.copytree(src, http_server.root / "runs" / "exp", ignore=shutil.ignore_patterns(".lock"))
    for i, url in enumerate([src.as_uri(), http_server.url_for("runs/exp")]):
        new = tmp_path / f"new-{i}"
        st, model, _ = _state(10 + i)
        ck = sg.Checkpointer(new, start_from=url, handle_signals=False)
        assert ck.restore(st) == 3
        ck.close()
        assert same_weights(model.state_dict(), restore_weights(src, 3)[1])


# ------------------------------------------------------------------------------------------------
# HTTP(S) read-only runs


@pytest.fixture
def http_run(http_server, tmp_path):
    """A run of 3 small checkpoints served over HTTP at ``runs/exp``."""
    root = http_server.root / "runs" / "exp"
    make_run(root)
    (root / ".lock").unlink(missing_ok=True)
    return http_server, root, http_server.url_for("runs/exp")


@pytest.mark.parametrize("listing", ["json", "html"])
def test_pull_from_http_both_listing_kinds(http_run, tmp_path, listing):
    server, root, url = http_run
    server.listing = listing
    dst = tmp_path / "dst"
    r = pull(url, dst)
    assert r.verified and sorted(r.copied) == [1, 2, 3]
    assert snapshot(dst) == snapshot(root)
    one = tmp_path / "one"
    r = cli("pull", f"{url}/{STEP_DIR.format(2)}", one)
    assert r.returncode == 0, r.stderr
    assert steps_in(one) == [2]


def test_http_run_ls_verify_show_and_a_flipped_byte(http_run):
    server, root, url = http_run
    for cmd in (["ls", url], ["verify", url], ["show", f"{url}/{STEP_DIR.format(1)}"]):
        r = cli(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    flip_last_byte(root / STEP_DIR.format(2) / DATA)
    assert cli("verify", url).returncode == 1
    assert cli("ls", url, "--verify").returncode == 1


def test_http_run_restores_but_refuses_to_save(http_run):
    server, root, url = http_run
    st, model, _ = _state(3)
    try:
        ck = sg.Checkpointer(url, handle_signals=False)
    except sg.StorageError as e:  # taking the lease is a read-only StorageError
        assert "read-only" in str(e)
        return
    try:
        assert ck.restore(st) == 3
        assert same_weights(model.state_dict(), restore_weights(root, 3)[1])
        with pytest.raises(sg.StorageError, match="read-only"):
            ck.save(st, 4)
    finally:
        ck.close()


def test_pull_from_http_with_a_damaged_file_keeps_the_earlier_pull(http_run, tmp_path):
    server, root, url = http_run
    dst = tmp_path / "dst"
    assert pull(url, dst).verified
    before = snapshot(dst)
    add_steps(root, [4])
    (root / ".lock").unlink(missing_ok=True)
    flip_last_byte(root / STEP_DIR.format(4) / DATA)
    with pytest.raises(sg.IntegrityError):
        pull(url, dst)
    r = cli("pull", url, dst)
    assert r.returncode == 1  # a damaged source checkpoint (cli/main.py)
    assert steps_in(dst) == [1, 2, 3]
    now = snapshot(dst)
    assert {k: now[k] for k in before if k not in ("LATEST", "run.json")} == {
        k: v for k, v in before.items() if k not in ("LATEST", "run.json")
    }
    assert verify_ok(dst) and staging_leftovers(dst) == []


def test_pull_from_http_served_html_instead_of_bytes(http_run, tmp_path):
    server, root, url = http_run
    server.html_for.add(f"runs/exp/{STEP_DIR.format(3)}/{DATA}")
    with pytest.raises(sg.IntegrityError) as ei:
        pull(url, tmp_path / "dst")
    assert DATA in str(ei.value)
    assert steps_in(tmp_path / "dst") == [1, 2]


# -- resuming over HTTP (断点续传)


@pytest.fixture
def big_http_run(http_server):
    """A run of one checkpoint whose data file is ~24 MB, served over HTTP."""
    root = http_server.root / "runs" / "big"
    make_run(root, steps=(1,), big=24 << 20)
    (root / ".lock").unlink(missing_ok=True)
    rel = f"runs/big/{STEP_DIR.format(1)}/{DATA}"
    return http_server, root, http_server.url_for("runs/big"), rel


def _ranges_for(server, rel: str) -> list[str]:
    return [
        r.headers.get("range", "") for r in server.requests if r.path == rel and r.method == "GET"
    ]


def _kill_pull_midway(server, url: str, rel: str, dst: Path, at: int) -> None:
    """Start `savegame pull` in a subprocess and SIGKILL it once the server sent ``at`` bytes of
    ``rel`` (the server holds the response there until the client wrote a block of it)."""
    p = subprocess.Popen([*CLI, "pull", url, dst, "--no-progress"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip

    def kill() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            parts = _parts(dst) if dst.exists() else []
            if parts and parts[0].stat().st_size >= 8 << 20:
                break
            time.sleep(0.02)
        time.sleep(0.1)
        p.send_signal(signal.SIGKILL)

    server.after_bytes(rel, at, kill)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


def _parts(dst: Path) -> list[Path]:
    return [p for t in dst.glob(".tmp-step-*") for p in t.rglob("*.part")]


def test_killed_pull_continues_its_part_file_with_a_range(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    size = (root / STEP_DIR.format(1) / DATA).stat().st_size
    dst = tmp_path / "dst"
    _kill_pull_midway(server, url, rel, dst, at=20 << 20)
    assert steps_in(dst) == []  # nothing partial visible
    parts = _parts(dst)
    assert parts, list(dst.rglob("*"))
    assert Path(str(parts[0]) + ".json").is_file()
    kept = parts[0].stat().st_size
    assert 0 < kept < size
    n_before = len(server.requests)
    sent_before = server.sent.get(rel, 0)
    r = pull(url, dst)
    assert r.verified and list(r.copied) == [1]
    new = [q for q in server.requests[n_before:] if q.path == rel and q.method == "GET"]
    assert new and all(q.headers.get("range", "").startswith(f"bytes={kept}-") for q in new), [
        q.headers for q in new
    ]
    assert server.sent[rel] - sent_before <= size - kept + 1
    assert verify_ok(dst)
    assert same_weights(restore_weights(dst)[1], restore_weights(root)[1])


def test_killed_pull_starts_the_file_over_when_the_source_changed(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    dst = tmp_path / "dst"
    _kill_pull_midway(server, url, rel, dst, at=20 << 20)
    assert _parts(dst)
    f = root / STEP_DIR.format(1) / DATA
    st = f.stat()
    os.utime(f, ns=(st.st_mtime_ns + 5_000_000_000,) * 2)  # a new ETag, same bytes
    n_before = len(server.requests)
    r = pull(url, dst)
    assert r.verified
    new = [q for q in server.requests[n_before:] if q.path == rel and q.method == "GET"]
    assert new
    for q in new:  # started over: no continuation from the old .part's size
        rng = q.headers.get("range", "")
        assert rng in ("", "bytes=0-") or rng.startswith("bytes=0-"), rng
    assert verify_ok(dst)


def test_killed_pull_whose_part_holds_zeros_is_fetched_whole_again(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    dst = tmp_path / "dst"
    _kill_pull_midway(server, url, rel, dst, at=20 << 20)
    parts = _parts(dst)
    assert parts
    n = parts[0].stat().st_size
    parts[0].write_bytes(b"\0" * n)  # unsynced pages lost in a power cut
    r = pull(url, dst)
    assert r.verified and list(r.copied) == [1]
    assert verify_ok(dst)


def test_connection_cut_mid_file_continues_within_the_run(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    size = (root / STEP_DIR.format(1) / DATA).stat().st_size
    server.cut_after(rel, 9 << 20, times=2)
    r = pull(url, tmp_path / "dst")
    assert r.verified
    assert server.sent[rel] <= 1.1 * size
    assert r.bytes_moved >= size
    assert verify_ok(tmp_path / "dst")


def test_source_replaced_by_same_bytes_mid_download_restarts_the_file(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    f = root / STEP_DIR.format(1) / DATA
    server.change_after(rel, 10 << 20, data=f.read_bytes())  # new ETag, same content
    server.cut_after(rel, 12 << 20, times=1)  # the continuation then meets the new ETag
    r = pull(url, tmp_path / "dst")
    assert r.verified
    size = len(f.read_bytes())
    assert r.bytes_moved >= size + (10 << 20)  # every attempt counted
    gets = [q for q in server.requests if q.path == rel and q.method == "GET"]
    assert any(q.status == 412 for q in gets), [(q.headers, q.status) for q in gets]
    # the file restarted from byte 0 after the change was seen
    last412 = max(i for i, q in enumerate(gets) if q.status == 412)
    after = gets[last412 + 1 :]
    assert after and after[0].headers.get("range", "bytes=0-").startswith("bytes=0-")
    assert verify_ok(tmp_path / "dst")


def test_source_content_changed_mid_download_is_an_integrity_error(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    server.change_after(rel, 10 << 20, inplace=True)  # every byte flipped, new ETag
    dst = tmp_path / "dst"
    with pytest.raises(sg.IntegrityError):
        pull(url, dst)
    assert steps_in(dst) == []


def test_server_ignoring_range_with_a_cut_still_arrives_whole(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    server.ignore_range = True
    server.cut_after(rel, 5 << 20, times=1)
    r = pull(url, tmp_path / "dst")
    assert r.verified and verify_ok(tmp_path / "dst")


# ------------------------------------------------------------------------------------------------
# credentials are never printed


SECRET = "Sup3rS3cretPw"


def _with_creds(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://alice:{SECRET}@{rest}"


def test_http_credentials_never_in_report_progress_logs_or_errors(http_run, tmp_path, capfd):
    server, root, url = http_run
    curl = _with_creds(url)
    r = pull(curl, tmp_path / "api", progress=True)
    assert r.verified
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err
    assert SECRET not in r.source and SECRET not in r.dest and SECRET not in repr(r)
    # CLI: with the progress bar on a terminal, and with -v logging
    rc, stdout, stderr = cli_pty("pull", curl, tmp_path / "cli")
    assert rc == 0, stderr
    assert SECRET not in stdout + stderr
    assert "kB" in stderr or "KB" in stderr or "B/s" in stderr  # the progress bar did show
    r2 = cli("-v", "pull", curl, tmp_path / "cli-v")
    assert r2.returncode == 0, r2.stderr
    assert SECRET not in r2.stdout + r2.stderr
    for cmd in (["ls", curl], ["verify", curl]):
        r3 = cli(*cmd)
        assert r3.returncode == 0 and SECRET not in r3.stdout + r3.stderr
    # errors: a missing source, a damaged file, a read-only destination
    missing = _with_creds(server.url_for("runs/none"))
    r4 = cli("pull", missing, tmp_path / "x")
    assert r4.returncode == 2 and SECRET not in r4.stdout + r4.stderr
    with pytest.raises(sg.StorageError) as ei:
        push(tmp_path / "api", curl + "-copy")
    assert SECRET not in str(ei.value)
    r5 = cli("push", tmp_path / "api", curl + "-copy")
    assert r5.returncode == 2 and SECRET not in r5.stdout + r5.stderr
    flip_last_byte(root / STEP_DIR.format(3) / DATA)
    with pytest.raises(sg.IntegrityError) as ei2:
        pull(curl, tmp_path / "dmg")
    assert SECRET not in str(ei2.value)
    r6 = cli_pty("pull", curl, tmp_path / "dmg2")
    assert r6[0] == 1 and SECRET not in r6[1] + r6[2]  # a damaged source checkpoint


def test_query_values_are_redacted_too(http_run, tmp_path):
    server, root, url = http_run
    # a signed-URL-like query on a checkpoint URL
    curl = f"{url}/{STEP_DIR.format(2)}?X-Sig={SECRET}"
    r = cli("-v", "pull", curl, tmp_path / "dst")
    assert SECRET not in r.stdout + r.stderr
    try:
        rep = pull(curl, tmp_path / "dst-api")
    except sg.CheckpointError as e:
        assert SECRET not in str(e)
    else:
        assert SECRET not in rep.source and SECRET not in repr(rep)
    missing = f"{url}/{STEP_DIR.format(9)}?X-Sig={SECRET}"
    with pytest.raises(sg.CheckpointError) as ei:
        pull(missing, tmp_path / "dst-missing")
    assert SECRET not in str(ei.value)
    r = cli("pull", missing, tmp_path / "dst-missing")
    assert r.returncode == 2 and SECRET not in r.stdout + r.stderr


def test_output_encoding_that_cannot_show_a_name_is_escaped(src, tmp_path):
    dst = tmp_path / "düst … ‮"
    r = cli("push", src, dst, env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    assert "UnicodeEncodeError" not in r.stderr
    assert "\\u2026" in r.stdout or "\\xfc" in r.stdout or "\\u00fc" in r.stdout, r.stdout
    assert steps_in(dst) == [1, 2, 3]


def test_s3_url_credentials_never_printed(src, s3_url, tmp_path, capfd):
    curl = s3_url.replace("s3://", f"s3://AKIAS30EXAMPLE:{SECRET}@", 1)
    r = push(src, curl, progress=True)
    assert r.verified and sorted(r.copied) == [1, 2, 3]
    assert SECRET not in r.dest and SECRET not in repr(r)
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    rc, stdout, stderr = cli_pty("pull", curl, tmp_path / "back", env=env)
    assert rc == 0, stderr
    assert SECRET not in stdout + stderr
    for cmd in (["ls", curl], ["verify", curl], ["-v", "push", src, curl]):
        p = cli(*cmd, env=env)
        assert p.returncode == 0, (cmd, p.stderr)
        assert SECRET not in p.stdout + p.stderr
    assert snapshot(tmp_path / "back") == snapshot(src)


# ------------------------------------------------------------------------------------------------
# S3: the same promises on an object store


def test_s3_push_twice_pull_twice_and_a_newer_save(src, s3_url, tmp_path):
    r = push(src, s3_url)
    assert r.verified and sorted(r.copied) == [1, 2, 3]
    r = push(src, s3_url)
    assert list(r.copied) == [] and sorted(r.skipped) == [1, 2, 3]
    add_steps(src, [4])
    r = push(src, s3_url)
    assert list(r.copied) == [4]
    dst = tmp_path / "dst"
    assert sorted(pull(s3_url, dst).copied) == [1, 2, 3, 4]
    assert sorted(pull(s3_url, dst).skipped) == [1, 2, 3, 4]
    assert run_id(dst) == run_id(src) and verify_ok(dst)
    assert cli("verify", s3_url).returncode == 0


def test_s3_damaged_source_keeps_the_remote_earlier_checkpoints(tmp_path, s3_url):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2))
    push(src, s3_url)
    add_steps(src, [3])
    _damage_source_data(src, 3, "flipped-byte")
    with pytest.raises(sg.IntegrityError):
        push(src, s3_url)
    r = cli("push", src, s3_url)
    assert r.returncode == 1  # main.py: a damaged source checkpoint not moved
    assert "step-000000000003" in r.stderr
    assert cli("verify", s3_url).returncode == 0
    back = tmp_path / "back"
    r = pull(s3_url, back)
    assert r.verified and steps_in(back) == [1, 2]


def test_s3_destination_holding_another_run_is_refused(tmp_path, s3_url):
    a, b = _two_runs(tmp_path)
    push(b, s3_url)
    with pytest.raises(sg.CheckpointError, match="holds another run"):
        push(a, s3_url)
    r = cli("push", a, s3_url)
    assert r.returncode == 2
    back = tmp_path / "back"
    pull(s3_url, back)
    assert run_id(back) == run_id(b) and steps_in(back) == [1, 2]


# ------------------------------------------------------------------------------------------------
# hostile names


HOSTILE = "[bold]x[/bold] \x1b[31mred \u202eevil ü"


def test_hostile_destination_and_source_names(src, tmp_path):
    dst = tmp_path / HOSTILE
    r = cli("push", src, dst)
    assert r.returncode == 0, r.stderr
    assert steps_in(dst) == [1, 2, 3] and run_id(dst) == run_id(src)
    out = r.stdout + r.stderr
    assert "\x1b" not in out and "\u202e" not in out  # shown as escapes
    assert "[bold]" in out  # rich markup shown as typed
    # and back, from the hostile-named folder as a source
    back = tmp_path / "back"
    r = cli("pull", dst, back)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "\u202e" not in r.stdout + r.stderr
    assert snapshot(back) == snapshot(src)
    # a failure message about such a folder is escaped too
    other = tmp_path / "other"
    make_run(other, steps=(1,), seed=9)
    r = cli("push", dst, other)
    assert r.returncode == 2
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr


def test_hostile_names_in_memory_and_file_urls(src, tmp_path):
    url = f"memory://s30-{uuid.uuid4().hex[:6]}/runs/sp ace/ü/[x]"
    r = push(src, url)
    assert r.verified
    back = tmp_path / "back"
    assert pull(url, back).verified
    assert snapshot(back) == snapshot(src)
    d = tmp_path / "with space"
    r = cli("push", src, d.as_uri())  # as_uri() percent-encodes the space
    assert r.returncode == 0, r.stderr
    assert steps_in(d) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# more call orders: onto itself, from a run being trained, set-aside folders, older into newer


def test_push_a_run_onto_itself_changes_nothing(src):
    before = snapshot(src)
    r = push(src, src)
    assert r.verified and list(r.copied) == [] and sorted(r.skipped) == [1, 2, 3]
    assert cli("push", src, src).returncode == 0
    assert snapshot(src) == before
    assert verify_ok(src)


def test_push_from_a_run_a_training_process_holds(src, tmp_path):
    st, model, _ = _state(3)
    ck = sg.Checkpointer(src, handle_signals=False, keep=sg.Keep(last=50))  # holds src's lock
    try:
        ck.restore(st)
        r = push(src, tmp_path / "dst")
        assert r.verified and sorted(r.copied) == [1, 2, 3]
        p = cli("push", src, tmp_path / "dst2")
        assert p.returncode == 0, p.stderr
    finally:
        ck.close()


def test_pull_from_a_memory_run_whose_writer_holds_the_lease(src, tmp_path, mem_url):
    push(src, mem_url)
    st, model, _ = _state(3)
    ck = sg.Checkpointer(mem_url, handle_signals=False, keep=sg.Keep(last=50))
    try:
        assert ck.restore(st) == 3
        ck.save(st, 4)
        r = pull(mem_url, tmp_path / "dst")
        assert r.verified and sorted(r.copied) == [1, 2, 3, 4]
    finally:
        ck.close()


def test_set_aside_damaged_checkpoint_in_the_source_is_not_moved(src, tmp_path):
    flip_last_byte(src / STEP_DIR.format(3) / DATA)
    st, _, _ = _state(1)
    ck = sg.Checkpointer(src, handle_signals=False, keep=sg.Keep(last=50))
    with pytest.warns(sg.CorruptCheckpointWarning):
        assert ck.restore(st) == 2
    ck.close()
    assert any(p.name.startswith("damaged-step-000000000003") for p in src.iterdir())
    dst = tmp_path / "dst"
    r = push(src, dst)
    assert sorted(r.copied) == [1, 2]
    assert not any("damaged" in p.name for p in dst.iterdir())
    assert steps_in(dst) == [1, 2] and verify_ok(dst)


def test_older_steps_pulled_into_a_newer_copy_do_not_hide_its_newest(src, tmp_path, mem_url):
    dst = tmp_path / "dst"
    push(src, dst)
    new = add_steps(dst, [4])  # the destination trained on
    push(src, mem_url, steps=[1, 2])
    r = pull(mem_url, dst)
    assert r.verified and sorted(r.skipped) == [1, 2]
    got, w = restore_weights(dst)  # LATEST is a hint: the newest valid checkpoint wins
    assert got == 4 and same_weights(w, new[4])


def test_duplicate_and_empty_step_lists(src, tmp_path):
    r = push(src, tmp_path / "d1", steps=[2, 2])
    assert list(r.copied) == [2]
    p = cli("push", src, tmp_path / "d2", "--step", 2, "--step", 2)
    assert p.returncode == 0, p.stderr
    assert steps_in(tmp_path / "d2") == [2]


def test_progress_bar_only_on_a_terminal_or_when_asked(src, tmp_path, capfd):
    r = cli("push", src, tmp_path / "d1")  # stderr is a pipe: no bar
    assert r.returncode == 0
    assert "\u2501" not in r.stderr and "kB" not in r.stderr
    rc, out, err = cli_pty("push", src, tmp_path / "d2", "--no-progress")
    assert rc == 0 and "\u2501" not in err and "kB" not in err
    rc, out, err = cli_pty("push", src, tmp_path / "d3")
    assert rc == 0 and ("\u2501" in err or "kB" in err)
    capfd.readouterr()
    push(src, tmp_path / "d4", progress=False)
    assert capfd.readouterr().err == ""


def test_http_source_with_an_uncommitted_folder(http_run, tmp_path):
    server, root, url = http_run
    left = root / STEP_DIR.format(7)
    left.mkdir()
    (left / DATA).write_bytes(b"\0" * 64)
    r = pull(url, tmp_path / "dst")
    assert r.verified and sorted(r.copied) == [1, 2, 3]
    assert any("7" in str(x) for x in r.ignored)
    assert not (tmp_path / "dst" / STEP_DIR.format(7)).exists()


# ------------------------------------------------------------------------------------------------
# incremental runs: shared bytes move with the checkpoints that use them


def make_frozen_run(root, steps=(1, 2, 3)) -> None:
    """An incremental run whose model does not change: later steps share the first's bytes."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    extras = {"t": torch.zeros(4)}
    st = sg.TrainState(model=model, extras=extras, rng=False)
    ck = sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=50))
    for s in steps:
        extras["t"].fill_(float(s))
        ck.save(st, s)
    ck.close()


def _frozen_restore(root) -> tuple[int, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    model = torch.nn.Linear(8, 8)
    extras = {"t": torch.zeros(4)}
    ck = sg.Checkpointer(root, handle_signals=False)
    try:
        got = ck.restore(sg.TrainState(model=model, extras=extras, rng=False))
    finally:
        ck.close()
    return got, model.weight.detach().clone(), extras["t"].clone()


@pytest.mark.parametrize("how", ["api", "cli"])
def test_incremental_newest_step_alone_arrives_whole(tmp_path, how, mem_url):
    src = tmp_path / "src"
    make_frozen_run(src)
    assert (src / STEP_DIR.format(3) / DATA).stat().st_size < (
        src / STEP_DIR.format(1) / DATA
    ).stat().st_size
    dst = tmp_path / "dst"
    if how == "api":
        push(src, mem_url, steps=[3])
        assert pull(mem_url, dst).verified
    else:
        assert cli("push", src, dst, "--step", 3).returncode == 0
    assert verify_ok(dst)
    got, w, t = _frozen_restore(dst)
    g2, w2, t2 = _frozen_restore(src)
    assert got == 3 and torch.equal(w, w2) and torch.equal(t, t2)
    # then the rest, and retention in the destination keeps what step 3 uses
    assert push(src, dst).verified
    st = sg.TrainState(model=torch.nn.Linear(8, 8), extras={"t": torch.zeros(4)}, rng=False)
    ck = sg.Checkpointer(dst, handle_signals=False, keep=sg.Keep(last=1))
    assert ck.restore(st) == 3
    ck.save(st, 4)
    ck.close()
    assert steps_in(dst) == [4] and verify_ok(dst)


def test_incremental_damaged_shared_bytes_in_the_source(tmp_path):
    src = tmp_path / "src"
    make_frozen_run(src)
    dst = tmp_path / "dst"
    flip_last_byte(src / STEP_DIR.format(1) / DATA)  # bytes steps 2 and 3 share
    with pytest.raises(sg.IntegrityError):
        push(src, dst, steps=[3])
    assert steps_in(dst) == [] and staging_leftovers(dst) == []
    r = cli("push", src, tmp_path / "dst2", "--step", 3)
    assert r.returncode == 1  # a damaged source checkpoint (cli/main.py)


# ------------------------------------------------------------------------------------------------
# more on the source and the object-store destination


def test_source_manifest_edited_but_still_json_is_not_moved(src, tmp_path):
    m = src / STEP_DIR.format(2) / "manifest.json"
    text = m.read_text()
    doc = json.loads(text)
    doc["edited_by_hand"] = True  # valid JSON, but no longer the manifest that was hashed
    m.write_text(json.dumps(doc))
    dst = tmp_path / "dst"
    try:
        r = push(src, dst)
    except sg.CheckpointError:
        pass
    else:
        assert not r.verified and r.problems
    assert 2 not in steps_in(dst)
    assert cli("push", src, tmp_path / "dst2").returncode != 0
    assert 2 not in steps_in(tmp_path / "dst2")


def _s3(s3_env):
    import boto3

    return boto3.client(
        "s3", endpoint_url=s3_env.endpoint, aws_access_key_id=s3_env.access_key,
        aws_secret_access_key=s3_env.secret_key, region_name=s3_env.region,
    )  # fmt: skip


def _bucket_key(url: str, rel: str) -> tuple[str, str]:
    bucket, prefix = url[len("s3://") :].split("/", 1)
    return bucket, f"{prefix}/{rel}"


@pytest.mark.parametrize("damage", ["bad-manifest", "no-manifest", "truncated-data"])
def test_s3_damaged_destination_copy_is_replaced(src, s3_url, s3_env, damage):
    push(src, s3_url)
    c = _s3(s3_env)
    b, mkey = _bucket_key(s3_url, f"{STEP_DIR.format(2)}/manifest.json")
    _, dkey = _bucket_key(s3_url, f"{STEP_DIR.format(2)}/{DATA}")
    if damage == "bad-manifest":
        c.put_object(Bucket=b, Key=mkey, Body=b"{ not json")
    elif damage == "no-manifest":
        c.delete_object(Bucket=b, Key=mkey)
    else:
        body = c.get_object(Bucket=b, Key=dkey)["Body"].read()
        c.put_object(Bucket=b, Key=dkey, Body=body[:-8])
    r = push(src, s3_url)
    assert r.verified and 2 in r.copied, r
    assert cli("verify", s3_url).returncode == 0
    good = (src / STEP_DIR.format(2) / DATA).read_bytes()
    assert c.get_object(Bucket=b, Key=dkey)["Body"].read() == good


def test_s3_flipped_tensor_byte_in_destination_is_found_by_verify_url(src, s3_url, s3_env):
    push(src, s3_url)
    c = _s3(s3_env)
    b, dkey = _bucket_key(s3_url, f"{STEP_DIR.format(2)}/{DATA}")
    body = bytearray(c.get_object(Bucket=b, Key=dkey)["Body"].read())
    body[-1] ^= 0xFF
    c.put_object(Bucket=b, Key=dkey, Body=bytes(body))
    # documented limit: a re-run checks sizes and header hashes only ...
    r = push(src, s3_url)
    assert r.verified
    # ... and `savegame verify URL` is the deep check
    assert cli("verify", s3_url).returncode == 1


def test_s3_leftover_objects_without_manifest_are_replaced(src, s3_url, s3_env):
    push(src, s3_url, steps=[1])
    c = _s3(s3_env)
    b, dkey = _bucket_key(s3_url, f"{STEP_DIR.format(2)}/{DATA}")
    c.put_object(Bucket=b, Key=dkey, Body=b"garbage from a killed writer")
    r = cli("ls", s3_url)
    assert r.returncode == 0
    r = push(src, s3_url)
    assert r.verified and sorted(r.copied) == [2, 3]
    assert (
        c.get_object(Bucket=b, Key=dkey)["Body"].read()
        == (src / STEP_DIR.format(2) / DATA).read_bytes()
    )
    assert cli("verify", s3_url).returncode == 0


def test_s3_missing_bucket_is_typed_and_secret_free(src, s3_env, tmp_path):
    url = f"s3://AKIAS30EXAMPLE:{SECRET}@no-such-bucket-s30/runs/x"
    with pytest.raises(sg.CheckpointError) as ei:
        pull(url, tmp_path / "dst")
    assert SECRET not in str(ei.value)
    r = cli("pull", url, tmp_path / "dst")
    assert r.returncode == 2
    assert SECRET not in r.stdout + r.stderr
    assert "no-such-bucket-s30" in r.stderr
    r = cli("push", src, url)
    assert r.returncode == 2
    assert SECRET not in r.stdout + r.stderr


def test_ctrl_c_during_a_pull_exits_non_zero_and_the_rerun_continues(big_http_run, tmp_path):
    server, root, url, rel = big_http_run
    dst = tmp_path / "dst"
    p = subprocess.Popen([*CLI, "pull", url, dst, "--no-progress"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip

    def interrupt() -> None:
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)

    server.after_bytes(rel, 20 << 20, interrupt)
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0  # exit 0 only when all is verified
    assert steps_in(dst) == []
    assert "Traceback" not in err
    parts = _parts(dst)
    assert parts
    kept = parts[0].stat().st_size
    n = len(server.requests)
    r = pull(url, dst)
    assert r.verified and list(r.copied) == [1]
    new = [q for q in server.requests[n:] if q.path == rel and q.method == "GET"]
    assert new and all(q.headers.get("range", "").startswith(f"bytes={kept}-") for q in new)
    assert verify_ok(dst)


def test_non_canonical_folder_names_in_the_source(src, tmp_path):
    one = src / STEP_DIR.format(1)
    for name in ("step-1", "step-000000000001 ", "step-0000000000009", "step-00000000000x"):
        shutil.copytree(one, src / name)
    shutil.copytree(one, src / STEP_DIR.format(7))  # a relabelled copy: the manifest says 1
    dst = tmp_path / "dst"
    r = push(src, dst)
    assert sorted(r.copied) == [1, 2, 3]
    assert not r.verified and r.problems  # step 7's manifest says step 1
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith("step")) == [
        STEP_DIR.format(s) for s in (1, 2, 3)
    ]
    c = cli("push", src, tmp_path / "dst2")
    assert c.returncode == 1
    assert verify_ok(dst)


@pytest.mark.parametrize("how", ["api", "cli", "one-checkpoint"])
def test_valid_checkpoint_of_another_run_at_the_same_step_is_never_overwritten(tmp_path, how):
    a, b = _two_runs(tmp_path)  # a: steps 1-3, b: steps 1-2 (another run id)
    dst = tmp_path / "dst"
    push(a, dst)
    # the destination's step 2 is a valid checkpoint written by run b ("not ours" for `ls`)
    shutil.rmtree(dst / STEP_DIR.format(2))
    shutil.copytree(b / STEP_DIR.format(2), dst / STEP_DIR.format(2))
    assert verify_ok(dst / STEP_DIR.format(2))
    theirs = snapshot(dst / STEP_DIR.format(2))
    # "the same step with different valid content: refused, StepExistsError, nothing
    # overwritten" / "another run (… in its manifests): refused before anything is written"
    if how == "api":
        with pytest.raises(sg.CheckpointError):
            push(a, dst)
    elif how == "cli":
        r = cli("push", a, dst)
        assert r.returncode != 0, r.stdout
    else:
        with pytest.raises(sg.CheckpointError):
            push(a / STEP_DIR.format(2), dst)
    assert snapshot(dst / STEP_DIR.format(2)) == theirs


@pytest.mark.parametrize("moved", ["part-only", "under-both-names"])
def test_killed_pull_with_a_finished_part_asks_for_none_of_its_bytes(big_http_run, tmp_path, moved):
    server, root, url, rel = big_http_run
    dst = tmp_path / "dst"
    _kill_pull_midway(server, url, rel, dst, at=20 << 20)
    parts = _parts(dst)
    assert parts
    good = (root / STEP_DIR.format(1) / DATA).read_bytes()
    parts[0].write_bytes(good)  # as if the kill came after the last byte was written
    if moved == "under-both-names":  # killed during the move into place
        os.link(parts[0], parts[0].with_name(DATA))
    n, sent = len(server.requests), server.sent.get(rel, 0)
    r = pull(url, dst)
    assert r.verified and list(r.copied) == [1]
    gets = [q for q in server.requests[n:] if q.path == rel and q.method == "GET"]
    assert not any(q.headers.get("range", "") == f"bytes={len(good)}-" for q in gets)
    assert server.sent.get(rel, 0) == sent, "bytes of a finished .part were asked for again"
    assert verify_ok(dst)


def test_killed_split_pull_continues_each_range_from_its_count(big_http_run, tmp_path, monkeypatch):
    import savegame.tools.transfer as transfer

    server, root, url, rel = big_http_run
    size = (root / STEP_DIR.format(1) / DATA).stat().st_size
    dst = tmp_path / "dst"
    split = 4 << 20  # `SPLIT`, made small so a 24 MB file comes as parallel ranges
    code = (f"import savegame.tools.transfer as T; T.SPLIT = {split}; "
            f"T.pull({url!r}, {str(dst)!r}, progress=False)")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)

    def kill() -> None:
        time.sleep(0.7)
        p.send_signal(signal.SIGKILL)

    server.after_bytes(rel, 14 << 20, kill)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    parts = _parts(dst)
    assert parts and steps_in(dst) == []
    sidecar = json.loads(Path(str(parts[0]) + ".json").read_text())
    counted = sum(sidecar.get("done", []))  # the bytes written of each range, as the docs say
    n, sent = len(server.requests), server.sent[rel]
    monkeypatch.setattr(transfer, "SPLIT", split)
    r = pull(url, dst)
    assert r.verified and list(r.copied) == [1]
    fetched = server.sent[rel] - sent
    assert fetched < size  # continued, not started over
    assert fetched <= size - counted, (fetched, counted)  # each range continued from its count
    gets = [q for q in server.requests[n:] if q.path == rel and q.method == "GET"]
    assert gets and all(q.headers.get("range") for q in gets)
    assert verify_ok(dst)
    assert r.bytes_skipped >= counted


def test_a_second_transfer_into_a_folder_being_pulled_is_locked_out(big_http_run, src, tmp_path):
    server, root, url, rel = big_http_run
    dst = tmp_path / "dst"
    release = threading.Event()
    server.after_bytes(rel, 8 << 20, lambda: release.wait(10))  # hold the first pull mid-file
    p = subprocess.Popen([*CLI, "pull", url, dst, "--no-progress"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not staging_leftovers(dst) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert staging_leftovers(dst), "the first pull never started"
        with pytest.raises(sg.LockedError):
            pull(url, dst)
        r = cli("pull", url, dst)
        assert r.returncode == 2
    finally:
        release.set()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert steps_in(dst) == [1] and verify_ok(dst)


def test_checkpoint_deleted_from_the_source_while_moving_is_ignored(http_run, tmp_path):
    server, root, url = http_run
    # the source run's retention deletes step 1 while step 3 is being moved
    server.after_bytes(f"runs/exp/{STEP_DIR.format(3)}/{DATA}", 1,
                       lambda: shutil.rmtree(root / STEP_DIR.format(1)))  # fmt: skip
    dst = tmp_path / "dst"
    r = pull(url, dst)
    assert 1 not in r.copied
    assert any("1" in str(x) for x in r.ignored), r
    assert r.verified  # "listed in report.ignored, not reported as an error"
    assert steps_in(dst) == [2, 3] and staging_leftovers(dst) == []


def test_push_accepts_a_read_only_http_source(http_run, tmp_path, capfd):
    server, root, url = http_run
    capfd.readouterr()
    r = push(url, tmp_path / "dst")  # default progress: stderr is not a terminal here
    assert r.verified and sorted(r.copied) == [1, 2, 3]
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    "case, error",
    [
        ("dst-is-a-file", sg.StorageError),
        ("src-missing", sg.CheckpointNotFoundError),
        ("src-is-a-file", sg.CheckpointNotFoundError),
        ("src-step-missing", sg.CheckpointNotFoundError),
        ("src-empty-memory", sg.CheckpointNotFoundError),
        ("dst-is-a-checkpoint", sg.CheckpointError),
    ],
)
def test_bad_input_is_a_typed_error_and_exit_2(src, tmp_path, case, error):
    (tmp_path / "a-file").write_text("hi\n")
    a, b = {
        "dst-is-a-file": (src, tmp_path / "a-file"),
        "src-missing": (tmp_path / "nothing", tmp_path / "d"),
        "src-is-a-file": (tmp_path / "a-file", tmp_path / "d"),
        "src-step-missing": (src / STEP_DIR.format(9), tmp_path / "d"),
        "src-empty-memory": (f"memory://s30-empty-{uuid.uuid4().hex[:6]}/x", tmp_path / "d"),
        "dst-is-a-checkpoint": (src, src / STEP_DIR.format(1)),
    }[case]
    before = snapshot(src)
    with pytest.raises(error):
        push(a, b)
    if case != "src-empty-memory":  # a memory:// store lives in one process only
        r = cli("push", a, b)
        assert r.returncode == 2
        assert r.stderr.startswith("error") or "error" in r.stderr.lower()
        assert "Traceback" not in r.stderr
    assert snapshot(src) == before


def test_push_never_deletes_destination_steps_the_source_has_pruned(tmp_path):
    src = tmp_path / "src"
    make_run(src, steps=(1, 2, 3), keep=sg.Keep(last=3))
    dst = tmp_path / "dst"
    push(src, dst)
    st, model, _ = _state(1)
    ck = sg.Checkpointer(src, handle_signals=False, keep=sg.Keep(last=3))
    ck.restore(st)
    ck.save(st, 4)  # the source's retention deletes its step 1
    ck.close()
    assert steps_in(src) == [2, 3, 4]
    r = push(src, dst)
    assert r.verified and list(r.copied) == [4] and sorted(r.skipped) == [2, 3]
    assert steps_in(dst) == [1, 2, 3, 4]  # "the missing steps are added"; nothing taken away
    assert verify_ok(dst)
