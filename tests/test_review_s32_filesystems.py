"""Outside review S32F: the file systems users keep their run folders on.

Written from README.md ("Use it", "One writer per run folder", "Damaged checkpoints", "Command
line", "Runs on object storage") and docs/storage.md, format.md, resume.md, incremental.md,
transfer.md, tiers.md, through the public API (``import savegame as sg``) and the CLI
(``savegame.cli.main.main``, in process: same exit codes as the command).

The file systems, each mounted fresh under /tmp/s32f/ by a fixture and always torn down:

- ``local``: the scratch folder's own disk (ext4 on the review machine), the baseline;
- ``exfat``: exFAT through FUSE on a loop device (a USB stick; like every FUSE mount of Google
  Drive, gcsfuse or s3fs: no hard links, no symlinks, no leases, case-insensitive names);
- ``tmpfs``: /dev/shm-style memory file system, also small (``size=``, ``nr_inodes=``) for a disk
  that fills up;
- ``overlay``: a docker container's overlayfs (a fresh run in the upper layer, and a run that
  came with the image in the lower layer);
- a read-only bind mount (Kaggle's /kaggle/input: "resume from it, write elsewhere").

Mounting needs root and the tools (``exfat-fuse``, ``exfatprogs``, ``losetup``); without them the
tests that need a mount skip with the reason (CI has no exfat-fuse). The ``local`` cases run
everywhere. Each test mounts at most one exFAT loop device at a time (``-n 2``: at most 2).

The training loop is tests/_review_s32f/loop.py (README's loop: Adam, a scheduler, a
shuffling StatefulDataLoader, dropout, a frozen base so incremental saves share bytes); it is
also the child process that is SIGKILLed mid-save. Exactness is judged against an uninterrupted
run of the same loop: model, optimizer moments, scheduler, loader position, extras and RNG
compared byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.cli.main import main as cli_main

HERE = Path(__file__).resolve().parent
LOOP_PY = HERE / "_review_s32f" / "loop.py"
_spec = importlib.util.spec_from_file_location("_review_s32f_loop", LOOP_PY)
assert _spec is not None and _spec.loader is not None
loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop)

SCRATCH = Path("/tmp/s32f")
FS_KINDS = ["local", "exfat", "tmpfs", "overlay"]
#: mode -> (async_save, incremental)
MODES = {
    "sync-incremental": (False, True),
    "async-incremental": (True, True),
    "sync-full": (False, False),
    "async-full": (True, False),
}


# ---- mounting ------------------------------------------------------------------------------------
def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=60, check=False, **kw
    )


def _need_root() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")


def _need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed here: {', '.join(missing)}")


def _mount_points() -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [line.split()[1].replace("\\040", " ") for line in f]


def _umount(where: Path) -> None:
    target = os.path.realpath(where)
    for _ in range(50):
        if target not in _mount_points():
            return
        if _run(["umount", target]).returncode == 0:
            return
        time.sleep(0.1)  # FUSE may still be busy for a moment after a child was killed
    _run(["umount", "-l", target])


def _detach_loop(dev: str) -> None:
    for _ in range(20):
        if _run(["losetup", "-d", dev]).returncode == 0:
            return
        time.sleep(0.1)


class Mounts:
    """File systems for one test, mounted under its scratch folder; ``close`` tears them down in
    reverse order (umount, then ``losetup -d``), whatever happened in the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        try:
            self._stack.close()
        finally:  # anything a failed step left mounted below the scratch folder
            base = os.path.realpath(self.path) + os.sep
            for mp in sorted((m for m in _mount_points() if m.startswith(base)), reverse=True):
                _run(["umount", "-l", mp])

    def _mount(self, cmd: list[Any], where: Path, what: str) -> Path:
        p = _run(cmd)
        if p.returncode != 0:
            pytest.skip(f"cannot mount {what}: {p.stderr.strip() or p.stdout.strip()}")
        self._stack.callback(_umount, where)
        return where

    def tmpfs(self, name: str = "tmpfs", size: str = "32m", nr_inodes: int | None = None) -> Path:
        _need_root()
        where = self.path / name
        where.mkdir()
        opts = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        return self._mount(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", where], where, "tmpfs")

    def exfat(self, name: str = "exfat", size_mb: int = 32) -> Path:
        _need_root()
        _need_tools("mkfs.exfat", "mount.exfat-fuse", "losetup")
        where = self.path / name
        where.mkdir()
        img = self.path / f".{name}.img"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        self._stack.callback(img.unlink, missing_ok=True)
        p = _run(["mkfs.exfat", img])
        if p.returncode != 0:
            pytest.skip(f"mkfs.exfat failed: {p.stderr.strip()}")
        dev = None
        for _ in range(20):  # two workers may race for the same free device
            p = _run(["losetup", "-f", "--show", img])
            if p.returncode == 0:
                dev = p.stdout.strip()
                break
            time.sleep(0.2)
        if dev is None:
            pytest.skip(f"no loop device: {p.stderr.strip()}")
        self._stack.callback(_detach_loop, dev)
        return self._mount(["mount.exfat-fuse", dev, where], where, "exFAT (FUSE)")

    def overlay(self, name: str = "overlay", lower: Path | None = None) -> Path:
        _need_root()
        base = self.path / f".{name}"
        upper, work, merged = base / "upper", base / "work", self.path / name
        if lower is None:
            lower = base / "lower"
            lower.mkdir(parents=True)
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        return self._mount(
            ["mount", "-t", "overlay", "overlay", "-o", opts, merged], merged, "overlay"
        )

    def read_only(self, src: Path, name: str = "ro") -> Path:
        _need_root()
        where = self.path / name
        where.mkdir()
        self._mount(["mount", "--bind", src, where], where, "a bind mount")
        p = _run(["mount", "-o", "remount,ro,bind", where])
        if p.returncode != 0:
            pytest.skip(f"cannot remount read-only: {p.stderr.strip()}")
        try:
            (where / ".probe").write_bytes(b"")
        except OSError:
            return where
        pytest.skip("the read-only bind mount is writable here")

    def fs(self, kind: str) -> Path:
        """A writable folder on a file system of ``kind`` (FS_KINDS)."""
        if kind == "local":
            where = self.path / "local"
            where.mkdir()
            return where
        return getattr(self, kind)()


@pytest.fixture
def mounts(request: pytest.FixtureRequest) -> Iterator[Mounts]:
    SCRATCH.mkdir(exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", request.node.name)[:60]
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=SCRATCH))
    except PermissionError as exc:  # another user's /tmp/s32f
        pytest.skip(f"cannot write the scratch folder: {exc}")
    m = Mounts(path)
    try:
        yield m
    finally:
        m.close()
        shutil.rmtree(path, ignore_errors=True)


# ---- helpers -------------------------------------------------------------------------------------
@functools.cache
def _reference(n: int = 14) -> dict[int, dict[str, Any]]:
    """The uninterrupted run: the fingerprint after every step 1..n."""
    out: dict[int, dict[str, Any]] = {}
    state = loop.build()
    loop.train(state, 0, n, None, lambda s: out.__setitem__(s, loop.fingerprint(state)))
    return out


def _cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    """``savegame ARGS`` in this process: (exit status, stdout + stderr). An exception that
    escapes main() is what the interpreter would end the command with: status 1 and a
    traceback."""
    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in args])
    except Exception as exc:  # noqa: BLE001 - an escaping exception is the result under test
        rc = 1
        print(f"Traceback: {type(exc).__name__}: {exc}", file=sys.stderr)
    got = capsys.readouterr()
    return rc, got.out + got.err


def _steps(run: Path) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(run) if re.fullmatch(r"step-\d{12}", n))


def _step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:012d}"


def _temp_entries(run: Path) -> list[str]:
    return sorted(n for n in os.listdir(run) if n.startswith(".tmp-"))


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``path`` with its size and modification time: a read-only run must
    look exactly the same after being read."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirs, files in os.walk(path):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _ck(root: Path | str, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("save", sg.Every(steps=1))
    kw.setdefault("keep", sg.Keep(last=2))
    return sg.Checkpointer(root, handle_signals=False, **kw)


def _make_run(root: Path, stop: int = 5, **kw: Any) -> None:
    """An incremental run saved at every step up to ``stop`` with Keep(last=3): steps
    stop-2..stop, and the frozen base's bytes of step 1 kept as a retired file they share."""
    state = loop.build()
    kw.setdefault("keep", sg.Keep(last=3))
    with _ck(root, **kw) as ck:
        loop.train(state, 0, stop, ck)


def _leave_killed_save(run: Path, step: int) -> Path:
    """What a save killed before its manifest leaves: a temp folder with a data file."""
    tmp = run / f".tmp-step-{step:012d}-0123456789ab"
    tmp.mkdir()
    (tmp / "rank-00000.safetensors").write_bytes(b"\0" * 1000)
    return tmp


def _restore_fresh(root: Path, expect_step: int, **kw: Any) -> tuple[sg.Checkpointer, Any]:
    state = loop.build(seed=99)  # another init: everything must come from the checkpoint
    ck = _ck(root, **kw)
    assert ck.restore(state) == expect_step
    return ck, state


def _fill_space(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte with one file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
        while True:  # the last partial page
            try:
                if not f.write(b"\0" * 512):
                    break
            except OSError:
                break
    return filler


def _fill_inodes(folder: Path) -> Path:
    d = folder / "inodes"
    d.mkdir()
    i = 0
    while True:
        try:
            (d / str(i)).touch()
        except OSError:
            return d
        i += 1


def _free(filler: Path) -> None:
    if filler.is_dir():
        shutil.rmtree(filler)
    else:
        filler.unlink()


def _leave_free(folder: Path, nbytes: int) -> Path:
    """A filler that leaves exactly ``nbytes`` (a multiple of the page size) free on a tmpfs."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    assert free >= nbytes, (free, nbytes)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - nbytes))
    st = os.statvfs(folder)
    assert st.f_bavail * st.f_frsize == nbytes
    return filler


def _big_run(root: Path, steps: int = 3) -> None:
    """A run whose checkpoints are ~70 KB each (a 64 KB tensor in extras), written in full."""
    state = loop.build()
    state["extras"]["table"] = torch.zeros(16384)
    with _ck(root, keep=sg.Keep(last=5), incremental=False) as ck:
        for s in range(1, steps + 1):
            state["extras"]["table"].add_(1.0)
            loop.train(state, s - 1, s)
            ck.save(state, s)


# ---- 1. README's loop on each file system --------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", FS_KINDS)
def test_readme_loop_resumes_exactly_and_cli_works(
    mounts: Mounts, kind: str, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Save, step, restore and close over two sessions; the resumed run equals the
    uninterrupted one bit for bit; retention (Keep(last=2, every=3)) never breaks a newer
    checkpoint, also where bytes are shared and there are no hard links (verified after every
    save); then ls/show/diff/convert/prune, a third session after the prune, and push/pull to
    and from this file system."""
    async_save, incremental = MODES[mode]
    ref = _reference()
    fs = mounts.fs(kind)
    root = fs / "runs" / "exp1"
    kw: dict[str, Any] = dict(
        save=sg.Every(steps=2),
        keep=sg.Keep(last=2, every=3),
        async_save=async_save,
        incremental=incremental,
    )

    def verify_after_saves(ck: sg.Checkpointer) -> Callable[[int], None]:
        def on_step(step: int) -> None:
            if step % 2 == 0:
                ck.wait()
                rc, out = _cli(capsys, "verify", root)
                assert rc == 0, out

        return on_step

    # session 1: steps 1-7, then the job ends without a final save
    state = loop.build()
    ck = _ck(root, **kw)
    assert ck.restore(state) == 0
    loop.train(state, 0, 7, ck, verify_after_saves(ck))
    ck.close()

    # session 2: resumes at 6, exactly
    ck, state = _restore_fresh(root, 6, **kw)
    assert loop.fingerprint(state) == ref[6]
    loop.train(state, 6, 11, ck, verify_after_saves(ck))
    ck.save(state, 11)
    ck.close()
    assert loop.fingerprint(state) == ref[11]
    # saves 2,4,6 | 8,10,11 (indices 0-5): every 3rd -> 2, 8; the last two -> 10, 11
    assert _steps(root) == [2, 8, 10, 11]
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out

    # the command line, on this file system
    s10, s11 = _step_dir(root, 10), _step_dir(root, 11)
    for args, want in (
        (("ls", root), 0),
        (("ls", "--verify", root), 0),
        (("show", root), 0),
        (("show", s10), 0),
        (("diff", s10, s11), 1),
        (("diff", s11, s11), 0),
    ):
        rc, out = _cli(capsys, *args)
        assert rc == want, (args, out)
    flat = fs / "exp1-11.safetensors"
    rc, out = _cli(capsys, "convert", s11, flat, "--to", "safetensors")
    assert rc == 0, out
    from safetensors.torch import load_file

    tensors = load_file(str(flat))
    for name, t in state["model"].state_dict().items():
        assert _bits(tensors[f"model/{name}"]) == _bits(t), name
    as_sg = fs / "exp1-11-copy"
    rc, out = _cli(capsys, "convert", s11, as_sg, "--to", "savegame")
    assert rc == 0, out
    rc, out = _cli(capsys, "verify", as_sg)
    assert rc == 0, out

    # prune to the newest: what step 11 shares with deleted checkpoints stays (retired)
    rc, out = _cli(capsys, "prune", root, "--keep-last", "1")
    assert rc == 0, out
    assert _steps(root) == [11]
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out
    retired = [n for n in os.listdir(root) if n.startswith("retired-")]
    assert bool(retired) == incremental, os.listdir(root)

    # session 3 after the prune: exact, and a new save + retention still verifies
    ck, state = _restore_fresh(root, 11, **kw)
    assert loop.fingerprint(state) == ref[11]
    loop.train(state, 11, 12, ck, verify_after_saves(ck))
    ck.close()
    assert loop.fingerprint(state) == ref[12]
    assert _steps(root) == [11, 12]
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out

    # push out of this file system to another folder, and pull it back in
    away = mounts.path / "away" / "exp1"
    rc, out = _cli(capsys, "push", root, f"file://{away}")
    assert rc == 0, out
    rc, out = _cli(capsys, "verify", away)
    assert rc == 0, out
    back = fs / "runs" / "exp1-pulled"
    rc, out = _cli(capsys, "pull", f"file://{away}", back)
    assert rc == 0, out
    rc, out = _cli(capsys, "verify", back)
    assert rc == 0, out
    assert _steps(back) == [11, 12]
    ck, state = _restore_fresh(back, 12, **kw)
    ck.close()
    assert loop.fingerprint(state) == ref[12]


# ---- 2. SIGKILL mid-save on exFAT (FUSE) ---------------------------------------------------------
#: (mode, os function, n-th call after step 3 committed): where the process dies in step 4's
#: save. sync: fsync 1 = the tensor file written, not yet durable; fsync 2 = the manifest
#: written, not durable; rename 1 = before the publishing rename; replace 1 = published, LATEST
#: not yet rewritten; rename 2 = retention, before it takes step 2 out; unlink 1 = retention,
#: in the middle of freeing a deleted checkpoint.
KILL_POINTS = [
    ("sync", "fsync", 1),
    ("sync", "fsync", 2),
    ("sync", "rename", 1),
    ("sync", "replace", 1),
    ("sync", "rename", 2),
    ("sync", "unlink", 1),
    ("async", "fsync", 1),
    ("async-full", "rename", 1),
]


@pytest.mark.parametrize(
    ("mode", "point", "n"), KILL_POINTS, ids=[f"{m}-{p}{n}" for m, p, n in KILL_POINTS]
)
def test_sigkill_mid_save_on_exfat(
    mounts: Mounts, mode: str, point: str, n: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A training process SIGKILLed inside a save on a FUSE file system: nothing partial is
    visible, verify passes (a killed save's temp folder is reported as a leftover, not a
    failure), the next session removes the leftovers, restores the newest complete checkpoint
    exactly and saves on."""
    fs = mounts.exfat()
    root = fs / "run"
    p = subprocess.run(
        [sys.executable, str(LOOP_PY), str(root), "8", mode, point, str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    committed = [
        int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("committed")
    ]
    assert committed == [1, 2, 3], p.stdout

    steps = _steps(root)
    assert steps and max(steps) >= 3, os.listdir(root)
    for s in steps:  # a step-… folder exists only complete
        assert (_step_dir(root, s) / "manifest.json").is_file(), os.listdir(_step_dir(root, s))
    leftovers = _temp_entries(root)
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out
    for name in leftovers:
        assert name in out, out  # reported as documented ("leftover …")

    ref = _reference()
    newest = max(steps)
    ck, state = _restore_fresh(root, newest)
    assert _temp_entries(root) == [], "the next writer removes a killed save's leftovers"
    assert loop.fingerprint(state) == ref[newest]
    loop.train(state, newest, newest + 2, ck)
    ck.close()
    assert loop.fingerprint(state) == ref[newest + 2]
    assert _steps(root)[-2:] == [newest + 1, newest + 2]
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out


# ---- 3. a disk that fills up ---------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["space", "inodes"])
@pytest.mark.parametrize("mode", list(MODES))
def test_full_disk_save_raises_storage_error_and_keeps_earlier(
    mounts: Mounts, mode: str, limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: a full disk fails the save with sg.StorageError (async: raised at the next
    step()/save()/close()); the live training state is untouched, earlier checkpoints stay
    intact and restorable, nothing partial stays behind, and once space is freed the next save
    works."""
    async_save, incremental = MODES[mode]
    fs = mounts.tmpfs(size="2m", nr_inodes=300)
    root = fs / "run"
    state = loop.build()
    ck = _ck(root, keep=sg.Keep(last=3), async_save=async_save, incremental=incremental)
    loop.train(state, 0, 2, ck)
    ck.wait()
    fp2 = loop.fingerprint(state)
    filler = _fill_space(fs) if limit == "space" else _fill_inodes(fs)

    loop.train(state, 2, 3)
    before = loop.fingerprint(state)
    try:
        ck.step(state, 3)
    except sg.StorageError as exc:
        err: sg.StorageError = exc
    else:
        assert async_save, "a blocking save that does not fit must raise at the call"
        loop.train(state, 3, 4)
        before = loop.fingerprint(state)
        with pytest.raises(sg.StorageError) as info:
            ck.step(state, 4)
        err = info.value
    assert err.step == 3, err
    assert str(root) in str(err), err
    assert loop.fingerprint(state) == before, "a failed save must not touch the live state"
    assert _steps(root) == [1, 2]
    assert _temp_entries(root) == [], "a failed save leaves no temp folder behind"
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out

    _free(filler)
    fp5 = loop.fingerprint(state)
    ck.save(state, 5)
    ck.close()
    assert _steps(root) == [1, 2, 5]
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out
    ck = _ck(root, keep=sg.Keep(last=3))
    st = loop.build(seed=3)
    assert ck.restore(st, step=2) == 2
    assert loop.fingerprint(st) == fp2
    st = loop.build(seed=4)
    assert ck.restore(st) == 5
    assert loop.fingerprint(st) == fp5
    ck.close()


def test_run_on_a_full_disk_still_opens_and_resumes(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """No byte and no inode left: a new session still opens the run and restores it exactly
    (the lock's note and run.json's session record must not stop it); a save is a StorageError;
    close() does not raise."""
    fs = mounts.tmpfs(size="1m", nr_inodes=200)
    root = fs / "run"
    _make_run(root, stop=4)
    space, inodes = _fill_space(fs), _fill_inodes(fs)
    ck, state = _restore_fresh(root, 4, keep=sg.Keep(last=3))  # the rule it was saved with
    assert loop.fingerprint(state) == _reference()[4]
    loop.train(state, 4, 5)
    with pytest.raises(sg.StorageError):
        ck.save(state, 5)
    ck.close()
    _free(space)
    _free(inodes)
    assert _steps(root) == [2, 3, 4]
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out


def test_pull_into_a_full_disk_exit_2_then_rerun_completes(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """transfer.md: a pull that cannot write is a failure (exit 2, typed through the API),
    leaves no checkpoint half-written under a real name, and re-running the same command once
    there is room completes it."""
    fs = mounts.tmpfs(size="1m")
    src = mounts.path / "src" / "run"
    _big_run(src)
    dest = fs / "run"
    filler = _leave_free(fs, 16 * 4096)  # room for run.json, not for a checkpoint
    rc, out = _cli(capsys, "pull", f"file://{src}", dest)
    assert rc == 2, out
    assert "No space left" in out or "full" in out, out
    with pytest.raises(sg.StorageError):
        sg.pull(f"file://{src}", dest)
    if dest.exists():
        for s in _steps(dest):
            rc, out = _cli(capsys, "verify", _step_dir(dest, s))
            assert rc == 0, out
    _free(filler)
    rc, out = _cli(capsys, "pull", f"file://{src}", dest)
    assert rc == 0, out
    assert _steps(dest) == [1, 2, 3]
    rc, out = _cli(capsys, "verify", dest)
    assert rc == 0, out


def test_pull_rerun_after_the_disk_filled_during_the_manifest(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """transfer.md "Resuming": re-run the same command. Here the disk has room for step 2's
    data file but not for its manifest."""
    fs = mounts.tmpfs(size="512k")
    src = mounts.path / "src" / "run"
    _big_run(src, steps=2)
    dest = fs / "run"
    rc, out = _cli(capsys, "pull", f"file://{src}", dest, "--step", "1")
    assert rc == 0, out
    data = _step_dir(src, 2) / "rank-00000.safetensors"
    # room for the lock's note (one page) and the data file, and one page of the manifest
    filler = _leave_free(fs, (math.ceil(data.stat().st_size / 4096) + 2) * 4096)
    rc, out = _cli(capsys, "pull", f"file://{src}", dest, "--step", "2")
    assert rc == 2, out
    assert _steps(dest) == [1]
    staged = [n for n in _temp_entries(dest) if n.startswith(".tmp-step-000000000002-")]
    assert staged and (dest / staged[0] / data.name).exists(), "setup: the cut fell after the data"
    # no partial manifest stays behind the full disk ...
    manifest = dest / staged[0] / "manifest.json"
    assert not manifest.exists() or manifest.read_bytes() == (
        _step_dir(src, 2) / "manifest.json"
    ).read_bytes()
    # ... and one that a kill cut short (a write the process never finished) is written again
    _free(filler)
    whole = (_step_dir(src, 2) / "manifest.json").read_bytes()
    manifest.write_bytes(whole[: len(whole) // 2])
    rc, out = _cli(capsys, "pull", f"file://{src}", dest, "--step", "2")
    assert rc == 0, out
    assert _steps(dest) == [1, 2]
    rc, out = _cli(capsys, "verify", dest)
    assert rc == 0, out


_CONVERT_OUT = {"safetensors": "out.safetensors", "torch": "out.pt", "savegame": "out-sg"}


@pytest.mark.parametrize(
    "to",
    [
        "safetensors",
        "torch",
        "savegame",
    ],
)
def test_convert_into_a_full_disk_cli_exit_2_nothing_left(
    mounts: Mounts, to: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: exit 2 for a savegame error, with a message; "a failed conversion removes the
    folders it created for the output" and the output appears atomically: nothing is left."""
    fs = mounts.tmpfs(size="256k")
    src = mounts.path / "src" / "run"
    _big_run(src, steps=1)
    filler = _leave_free(fs, 4 * 4096)
    out_path = fs / "sub" / _CONVERT_OUT[to]
    rc, out = _cli(capsys, "convert", _step_dir(src, 1), out_path, "--to", to)
    assert rc == 2, out
    assert out.startswith("error:") or "\nerror:" in out, out
    assert sorted(os.listdir(fs)) == ["filler"], "nothing of the failed conversion is left"
    _free(filler)
    rc, out = _cli(capsys, "convert", _step_dir(src, 1), out_path, "--to", to)
    assert rc == 0, out


@pytest.mark.parametrize(
    "to",
    [
        "safetensors",
        "torch",
        "savegame",
    ],
)
def test_convert_into_a_full_disk_raises_storage_error(mounts: Mounts, to: str) -> None:
    fs = mounts.tmpfs(size="256k")
    src = mounts.path / "src" / "run"
    _big_run(src, steps=1)
    _leave_free(fs, 4 * 4096)
    out_path = fs / _CONVERT_OUT[to]
    with pytest.raises(sg.StorageError) as info:
        sg.convert(_step_dir(src, 1), out_path, to=to)
    assert str(fs) in str(info.value), info.value
    assert sorted(os.listdir(fs)) == ["filler"]


# ---- 4. a read-only run folder (Kaggle's /kaggle/input) ------------------------------------------
@pytest.fixture
def ro_run(mounts: Mounts) -> tuple[Path, Path]:
    """(read-only run folder, its writable original): steps 3-5 of an incremental run, a
    retired shared file, and a killed save's leftover."""
    _need_root()
    src = mounts.path / "input"
    _make_run(src / "run", stop=5)
    _leave_killed_save(src / "run", 6)
    assert any(n.startswith("retired-") for n in os.listdir(src / "run"))
    ro = mounts.read_only(src)
    return ro / "run", src / "run"


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "newest-damaged"])
def test_read_only_run_restores_and_refuses_saves(ro_run: tuple[Path, Path], damaged: bool) -> None:
    """README "One writer per run folder": a folder this process can read but not write opens
    read-only: writable is False, restore() works as usual (a damaged newest checkpoint is
    skipped with a warning, and cannot be set aside), a save raises StorageError saying so;
    nothing in the folder changes."""
    run, orig = ro_run
    if damaged:
        f = _step_dir(orig, 5) / "rank-00000.safetensors"
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0x01
        f.write_bytes(bytes(raw))
    before = _tree(run)
    expect = 4 if damaged else 5
    state = loop.build(seed=9)
    ck = _ck(run)
    assert ck.writable is False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ck.restore(state) == expect
    skipped = [w for w in seen if issubclass(w.category, sg.CorruptCheckpointWarning)]
    assert bool(skipped) == damaged, [str(w.message) for w in seen]
    assert loop.fingerprint(state) == _reference()[expect]
    loop.train(state, expect, expect + 1)
    with pytest.raises(sg.StorageError) as info:
        ck.save(state, 6)
    msg = str(info.value)
    assert str(run) in msg and "writable" in msg, msg
    ck.close()
    assert _tree(run) == before


def test_read_only_run_start_from_into_a_writable_folder(
    mounts: Mounts, ro_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """tiers.md "Start from another run": Checkpointer(new, start_from=ro_run) restores the
    read-only run's newest checkpoint, saves into the new folder, and resumes from its own
    checkpoints afterwards; the read-only run is only read."""
    run, _ = ro_run
    before = _tree(run)
    new = mounts.path / "working" / "run"
    ref = _reference()
    state = loop.build(seed=2)
    ck = _ck(new, start_from=run)
    assert ck.restore(state) == 5
    assert loop.fingerprint(state) == ref[5]
    loop.train(state, 5, 7, ck)
    ck.close()
    assert _steps(new) == [6, 7]
    ck, state = _restore_fresh(new, 7, start_from=run)
    ck.close()
    assert loop.fingerprint(state) == ref[7]
    rc, out = _cli(capsys, "verify", new)
    assert rc == 0, out
    assert _tree(run) == before


def test_read_only_run_load_open_and_cli_write_nothing(
    mounts: Mounts, ro_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """sg.load / sg.open of a read-only checkpoint, and ls/verify/show/diff/convert/push of a
    read-only run: all work (convert and push write elsewhere) and nothing in the run changes."""
    run, _ = ro_run
    before = _tree(run)
    s4, s5 = _step_dir(run, 4), _step_dir(run, 5)
    ref5 = _reference()[5]
    tree = sg.load(s5)
    weight = tree["model"]["2.weight"]
    assert (str(weight.dtype), tuple(weight.shape), _bits(weight)) == ref5["model"]["2.weight"]
    with sg.open(s5) as r:
        frozen = r.read("model/0.weight")  # shared bytes: in the retired file
    assert (str(frozen.dtype), tuple(frozen.shape), _bits(frozen)) == ref5["model"]["0.weight"]
    out_dir = mounts.path / "out"
    for args, want in (
        (("ls", run), 0),
        (("ls", "--verify", run), 0),
        (("verify", run), 0),
        (("verify", s5), 0),
        (("show", run), 0),
        (("diff", s4, s5), 1),
        (("diff", s5, s5), 0),
        (("convert", s5, out_dir / "m.safetensors", "--to", "safetensors"), 0),
        (("convert", run, out_dir / "copy", "--to", "savegame"), 0),
        (("push", run, f"file://{out_dir}/pushed"), 0),
        (("verify", out_dir / "pushed"), 0),
    ):
        rc, out = _cli(capsys, *args)
        assert rc == want, (args, out)
    assert _steps(out_dir / "pushed") == [3, 4, 5]
    assert _tree(run) == before


def test_read_only_run_prune_exit_2_names_the_folder(
    ro_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = ro_run
    before = _tree(run)
    rc, out = _cli(capsys, "prune", run, "--keep-last", "1")
    assert rc == 2, out
    assert str(run) in out and "Traceback" not in out, out
    assert _tree(run) == before


# ---- 5. case-insensitive names (exFAT) -----------------------------------------------------------
_OPEN_CHILD = (
    "import sys, savegame as sg\n"
    "try:\n"
    "    sg.Checkpointer(sys.argv[1], handle_signals=False)\n"
    "except sg.LockedError as e:\n"
    "    print('locked:', e); sys.exit(3)\n"
    "print('opened for writing'); sys.exit(0)\n"
)


def test_exfat_second_writer_of_the_same_folder_gets_locked_error(mounts: Mounts) -> None:
    """README "One writer per run folder" on a FUSE file system: another process, and another
    Checkpointer in this process, get LockedError."""
    fs = mounts.exfat()
    with _ck(fs / "runs" / "Exp"):
        with pytest.raises(sg.LockedError):
            _ck(fs / "runs" / "Exp")
        p = _run([sys.executable, "-c", _OPEN_CHILD, fs / "runs" / "Exp"])
        assert p.returncode == 3, p.stdout + p.stderr


def test_exfat_second_writer_through_another_case_gets_locked_error(mounts: Mounts) -> None:
    """On exFAT ``Exp`` and ``exp`` are one folder (one run.json, one .lock): a second writer
    that spells it differently must still get LockedError, in another process and in this one."""
    fs = mounts.exfat()
    with _ck(fs / "runs" / "Exp"):
        p = _run([sys.executable, "-c", _OPEN_CHILD, fs / "runs" / "exp"])
        assert p.returncode == 3, p.stdout + p.stderr
        with pytest.raises(sg.LockedError):
            _ck(fs / "runs" / "EXP").close()


def test_exfat_keys_and_metrics_differing_only_by_case(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tensor keys, dict keys and metric names that differ only by case live inside files, so
    they must all come back distinct on a case-insensitive file system."""
    fs = mounts.exfat()
    root = fs / "run"
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"Head": torch.nn.Linear(3, 3), "head": torch.nn.Linear(3, 3)})
    extras: dict[str, Any] = {"W": torch.ones(4), "w": torch.zeros(4), "Note": "A", "note": "a"}
    state = sg.TrainState(model=model, extras=extras)
    keep = sg.Keep(last=1, best=1, monitor="loss", mode="min")
    with _ck(root, keep=keep) as ck:
        ck.step(state, 1, metrics={"Loss": 0.1, "loss": 5.0})
        ck.step(state, 2, metrics={"Loss": 9.0, "loss": 1.0})
        ck.step(state, 3, metrics={"Loss": 0.0, "loss": 3.0})
        infos = {i.step: i.metrics for i in ck.list()}
    # best by "loss" (not "Loss") is step 2; last is 3
    assert _steps(root) == [2, 3]
    assert infos[2] == {"Loss": 9.0, "loss": 1.0}
    with sg.open(_step_dir(root, 3)) as r:
        keys = set(r.keys())
    assert {"model/Head.weight", "model/head.weight", "extras/W", "extras/w"} <= keys
    model2 = torch.nn.ModuleDict({"Head": torch.nn.Linear(3, 3), "head": torch.nn.Linear(3, 3)})
    extras2: dict[str, Any] = {}
    with _ck(root, keep=keep) as ck:
        assert ck.restore(sg.TrainState(model=model2, extras=extras2)) == 3
    for k, v in model.state_dict().items():
        assert _bits(model2.state_dict()[k]) == _bits(v), k
    assert _bits(extras2["W"]) == _bits(torch.ones(4)) and _bits(extras2["w"]) == _bits(
        torch.zeros(4)
    )
    assert (extras2["Note"], extras2["note"]) == ("A", "a")
    flat = fs / "flat.safetensors"
    rc, out = _cli(capsys, "convert", _step_dir(root, 3), flat, "--to", "safetensors")
    assert rc == 0, out
    from safetensors.torch import load_file

    assert {"model/Head.weight", "model/head.weight", "extras/W", "extras/w"} <= set(
        load_file(str(flat))
    )
    rc, out = _cli(capsys, "verify", root)
    assert rc == 0, out


def test_exfat_outputs_differing_only_by_case_never_replace(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a user names differently only by case is the same file here: convert must refuse
    it as existing (README: an existing output is kept unless --overwrite) and push must see
    the other run (transfer.md: another run is refused before anything is written)."""
    fs = mounts.exfat()
    a, b = fs / "a" / "run", fs / "b" / "run"
    _make_run(a, stop=3)
    _make_run(b, stop=2)
    first = fs / "model.safetensors"
    rc, out = _cli(capsys, "convert", _step_dir(a, 3), first, "--to", "safetensors")
    assert rc == 0, out
    kept = first.read_bytes()
    rc, out = _cli(
        capsys, "convert", _step_dir(a, 2), fs / "Model.safetensors", "--to", "safetensors"
    )
    assert rc == 2, out
    assert first.read_bytes() == kept
    before = _tree(fs / "b")
    rc, out = _cli(capsys, "push", a, f"file://{fs}/B/RUN")
    assert rc == 2, out
    assert "another run" in out, out
    assert _tree(fs / "b") == before


# ---- 6. moving a run between file systems --------------------------------------------------------
MOVERS = ["cp -r", "cp -a", "rsync -a", "tar", "mv"]


def _move(tool: str, src: Path, dest_parent: Path) -> Path:
    dest_parent.mkdir(parents=True, exist_ok=True)
    if tool == "tar":
        cmd = f"tar -C '{src.parent}' -cf - '{src.name}' | tar -C '{dest_parent}' -xf -"
        p = subprocess.run(
            ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, check=False
        )
    elif tool == "rsync -a":
        p = _run(["rsync", "-a", src, f"{dest_parent}/"])
    else:
        p = _run([*tool.split(), src, f"{dest_parent}/"])
    assert p.returncode == 0, (tool, p.stderr)
    return dest_parent / src.name


@pytest.mark.parametrize("tool", MOVERS)
def test_move_an_incremental_run_ext4_to_exfat_to_tmpfs(
    mounts: Mounts, tool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An incremental run with shared bytes, a retired file and a killed save's leftover,
    moved with the tools users use from the local disk to exFAT and on to tmpfs: after each hop
    it verifies, resumes exactly, saves, and retention plus `savegame prune` still leave a run
    that verifies."""
    if tool.startswith("rsync"):
        _need_tools("rsync")
    ex = mounts.exfat()
    tm = mounts.tmpfs()
    ref = _reference()
    run = mounts.path / "home" / "run"
    _make_run(run, stop=5)
    _leave_killed_save(run, 6)
    assert any(n.startswith("retired-") for n in os.listdir(run))
    step = 5
    for target in (ex, tm):
        run = _move(tool, run, target / "runs")
        rc, out = _cli(capsys, "verify", run)
        assert rc == 0, (target, out)
        ck, state = _restore_fresh(run, step)
        assert loop.fingerprint(state) == ref[step]
        loop.train(state, step, step + 2, ck)
        ck.close()
        step += 2
        assert loop.fingerprint(state) == ref[step]
        assert _steps(run)[-2:] == [step - 1, step]
        rc, out = _cli(capsys, "verify", run)
        assert rc == 0, (target, out)
        rc, out = _cli(capsys, "prune", run, "--keep-last", "1")
        assert rc == 0, out
        assert _steps(run) == [step]
        rc, out = _cli(capsys, "verify", run)
        assert rc == 0, (target, out)
    ck, state = _restore_fresh(run, step)
    ck.close()
    assert loop.fingerprint(state) == ref[step]


# ---- 7. a run that came with a docker image (overlayfs lower layer) ------------------------------
def _image_run(mounts: Mounts, stop: int = 3) -> tuple[Path, Path]:
    """A run saved into what becomes the image (the lower layer), then the container's view."""
    _need_root()
    lower = mounts.path / "image"
    _make_run(lower / "run", stop=stop, keep=sg.Keep(last=10))
    merged = mounts.overlay("container", lower=lower)
    return lower / "run", merged / "run"


def test_overlay_retention_deletes_checkpoints_from_the_image_layer(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = _image_run(mounts)
    ck, state = _restore_fresh(run, 3)
    assert loop.fingerprint(state) == _reference()[3]
    loop.train(state, 3, 6, ck)
    ck.close()
    rc, out = _cli(capsys, "verify", run)
    assert rc == 0, out
    assert _steps(run) == [5, 6]


def test_overlay_prune_of_checkpoints_from_the_image_layer(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = _image_run(mounts)
    rc, out = _cli(capsys, "prune", run, "--keep-last", "1")
    assert rc == 0, out
    assert _steps(run) == [3]
    rc, out = _cli(capsys, "verify", run)
    assert rc == 0, out


def test_overlay_damaged_checkpoint_from_the_image_layer(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """README "Damaged checkpoints": a damaged checkpoint is skipped by restore, set aside,
    and never in the way of the next save of its step."""
    _need_root()
    lower = mounts.path / "image"
    _make_run(lower / "run", stop=4, keep=sg.Keep(last=10))
    f = _step_dir(lower / "run", 4) / "rank-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01
    f.write_bytes(bytes(raw))
    run = mounts.overlay("container", lower=lower) / "run"
    state = loop.build(seed=5)
    ck = _ck(run, keep=sg.Keep(last=10))
    with pytest.warns(sg.CorruptCheckpointWarning):
        assert ck.restore(state) == 3
    assert loop.fingerprint(state) == _reference()[3]
    try:
        loop.train(state, 3, 5, ck)
    finally:
        ck.close()
    assert loop.fingerprint(state) == _reference()[5]
    ck, state = _restore_fresh(run, 5, keep=sg.Keep(last=10))
    ck.close()
    rc, out = _cli(capsys, "verify", _step_dir(run, 4))
    assert rc == 0, out


def test_overlay_image_run_resumes_and_saves_in_the_container(
    mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same image run with a Keep that deletes nothing: it resumes exactly and saves into
    the container's layer; the image's files are untouched."""
    lower, run = _image_run(mounts)
    before = _tree(lower)
    ck, state = _restore_fresh(run, 3, keep=sg.Keep(last=10))
    loop.train(state, 3, 5, ck)
    ck.close()
    assert loop.fingerprint(state) == _reference()[5]
    assert _steps(run) == [1, 2, 3, 4, 5]
    rc, out = _cli(capsys, "verify", run)
    assert rc == 0, out
    assert {k: v for k, v in _tree(lower).items() if k != "run/.lock"} == {
        k: v for k, v in before.items() if k != "run/.lock"
    }
    assert json.loads((run / "run.json").read_text())["run_id"]
