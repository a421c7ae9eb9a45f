"""Outside review (s13): restoring local checkpoints where a read lease cannot be had, or where
the run folder is not an ordinary writable folder of this user (docs/format.md "Restore": a file
is mapped only under a read lease, else read with ``pread``; README "One writer per run folder":
a folder this process cannot write opens read-only).

A user expects, in every case: the restore works (maybe slower), the tensors are bitwise the
saved ones, a typed error otherwise, never a SIGBUS or a hang, and no mapping of a checkpoint
file left behind. A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.storage import local

pytestmark = pytest.mark.skipif(
    not hasattr(fcntl, "F_SETLEASE"), reason="file leases are Linux-only"
)

STEP = 7
SHARD = f"step-{STEP:012d}/rank-00000.safetensors"


def _state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 48)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, {"epoch": seed, "note": "s13"}


def _digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for pid, s in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(s.items()):
            h.update(f"{pid}/{k}".encode())
            h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save(root: Path) -> str:
    model, opt, extras = _state(0)
    with sg.Checkpointer(root, handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model, optimizer=opt, extras=extras), STEP)
    return _digest(model, opt)


class _Spy:
    """Counts leases taken and maps made by local blobs, without changing what they do."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.leases: list[bool] = []
        self.maps = 0
        real_lease, real_map = local._LocalBlob.lease, local._LocalBlob.map

        def lease(blob: local._LocalBlob) -> Any:
            got = real_lease(blob)
            self.leases.append(got is not None)
            return got

        def map_(blob: local._LocalBlob) -> Any:
            self.maps += 1
            return real_map(blob)

        mp.setattr(local._LocalBlob, "lease", lease)
        mp.setattr(local._LocalBlob, "map", map_)


def _mappings_of(root: Path) -> list[str]:
    real = os.path.realpath(root)
    with open("/proc/self/maps") as f:
        return [line for line in f if real in line]


def _restore(root: Path) -> tuple[int, str, bool]:
    model, opt, extras = _state(1)
    with sg.Checkpointer(root, handle_signals=False) as ck:
        step = ck.restore(sg.TrainState(model=model, optimizer=opt, extras=extras))
        writable = ck.writable
    assert extras == {"epoch": 0, "note": "s13"}
    assert not _mappings_of(root), "a mapping of a checkpoint file outlived the restore"
    return step, _digest(model, opt), writable


# ---- where the lease can be had ---------------------------------------------------------------
@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_a_run_on_tmpfs_restores_bitwise_through_a_leased_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = Path("/dev/shm") / f"sg-s13-{os.getpid()}-{time.monotonic_ns()}"
    try:
        want = _save(root)
        spy = _Spy(monkeypatch)
        assert _restore(root) == (STEP, want, True)
        assert spy.leases == [True] and spy.maps == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_symlinked_run_folder_restores_verifies_and_keeps_saving(tmp_path: Path) -> None:
    want = _save(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert _restore(tmp_path / "link") == (STEP, want, True)
    model, opt, extras = _state(2)
    with sg.Checkpointer(tmp_path / "link", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model, optimizer=opt, extras=extras), STEP + 1)
    assert (tmp_path / "real" / f"step-{STEP + 1:012d}" / "manifest.json").is_file()
    out = subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(tmp_path / "link")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hard_linked_copy_of_a_run_restores_bitwise_both_ways(tmp_path: Path) -> None:
    want = _save(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=os.link)
    assert os.stat(tmp_path / "b" / SHARD).st_nlink == 2
    assert _restore(tmp_path / "b") == (STEP, want, True)
    assert _restore(tmp_path / "a") == (STEP, want, True)


# ---- where no lease can be had: pread, same bytes -----------------------------------------------
def _hold_open_for_writing(path: Path) -> subprocess.Popen[str]:
    """Another process that keeps ``path`` open for writing (a backup tool, an editor) and
    never changes a byte; it prints READY once the file is open."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys,time; f=open({str(path)!r},'r+b'); print('READY',flush=True); "
            "sys.stdin.read(); f.close()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "READY"
    return holder


@pytest.mark.parametrize("staging_memory", [None, "0"])
def test_a_file_already_open_for_writing_elsewhere_is_read_not_mapped_and_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging_memory: str | None
) -> None:
    want = _save(tmp_path / "run")
    if staging_memory is not None:  # live bytes wait in a temporary file, not in memory
        monkeypatch.setenv("SAVEGAME_STAGING_MEMORY", staging_memory)
    holder = _hold_open_for_writing(tmp_path / "run" / SHARD)
    try:
        spy = _Spy(monkeypatch)
        t0 = time.monotonic()
        assert _restore(tmp_path / "run") == (STEP, want, True)
        assert time.monotonic() - t0 < 20  # never waits for a lease break
        assert spy.leases == [False] and spy.maps == 0
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0


def test_the_writer_on_a_hard_link_blocks_the_lease_for_every_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease is per inode: a writer on the other name of a hard link is a writer of this
    file too, so the restore must not map it."""
    want = _save(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=os.link)
    holder = _hold_open_for_writing(tmp_path / "b" / SHARD)
    try:
        spy = _Spy(monkeypatch)
        assert _restore(tmp_path / "a") == (STEP, want, True)
        assert spy.leases == [False] and spy.maps == 0
    finally:
        holder.communicate("", timeout=30)


def test_a_program_that_handles_sigurg_itself_restores_and_its_handler_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _save(tmp_path / "run")
    seen: list[int] = []

    def mine(signum: int, frame: object) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGURG, mine)
    try:
        spy = _Spy(monkeypatch)
        assert _restore(tmp_path / "run") == (STEP, want, True)
        assert spy.leases == [False] and spy.maps == 0
        assert signal.getsignal(signal.SIGURG) is mine
    finally:
        signal.signal(signal.SIGURG, old)
    assert seen == []


def test_no_mapping_is_left_after_a_damaged_newest_checkpoint_is_skipped(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    model, opt, extras = _state(0)
    with sg.Checkpointer(root, handle_signals=False, incremental=False) as ck:
        ck.save(sg.TrainState(model=model, optimizer=opt, extras=extras), STEP)
        want = _digest(model, opt)
        model2, opt2, extras2 = _state(3)
        ck.save(sg.TrainState(model=model2, optimizer=opt2, extras=extras2), STEP + 1)
    f = root / f"step-{STEP + 1:012d}" / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # the last tensor's bytes: found in the hash pass, after the mapping
    f.write_bytes(bytes(data))
    with pytest.warns(sg.CorruptCheckpointWarning):
        got = _restore(root)
    assert got[:2] == (STEP, want)


# ---- another user's run, read-only folders --------------------------------------------------------
_AS_OTHER = textwrap.dedent(
    """
    import hashlib, json, sys, torch, savegame as sg
    from savegame.storage import local
    sys.path.insert(0, sys.argv[2])
    from test_outside_s13_restore_leases import _state, _digest, _mappings_of
    from pathlib import Path
    leases = []
    real = local._LocalBlob.lease
    def lease(blob):
        got = real(blob); leases.append(got is not None); return got
    local._LocalBlob.lease = lease
    root = Path(sys.argv[1])
    model, opt, extras = _state(1)
    ck = sg.Checkpointer(root, handle_signals=False)
    step = ck.restore(sg.TrainState(model=model, optimizer=opt, extras=extras))
    err = None
    try:
        ck.save(sg.TrainState(model=model, optimizer=opt, extras=extras), 99)
    except sg.StorageError as exc:
        err = str(exc)
    ck.close()
    print(json.dumps({"step": step, "digest": _digest(model, opt), "writable": ck.writable,
                      "leases": leases, "maps": len(_mappings_of(root)), "save_error": err}))
    """
)

_CAPS = "-lease,-dac_override,-dac_read_search,-fowner"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as a user without CAP_LEASE",
)
def test_another_users_run_restores_read_only_and_bitwise_without_a_lease(
    tmp_path: Path,
) -> None:
    """The run belongs to another user (uid 65534); this process may read it but not write it,
    and may not take a lease on its files (neither owner nor CAP_LEASE)."""
    root = tmp_path / "run"
    want = _save(root)
    (root / ".lock").unlink(missing_ok=True)
    for p in [root, *root.rglob("*")]:
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    script = tmp_path / "child.py"
    script.write_text(_AS_OTHER)
    proc = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={_CAPS}",
            f"--inh-caps={_CAPS}",
            sys.executable,
            str(script),
            str(root),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["step"] == STEP and got["digest"] == want
    assert got["writable"] is False and got["leases"] == [False] and got["maps"] == 0
    assert got["save_error"] and str(root) in got["save_error"]
    assert not any(p.name.startswith(("tmp", ".tmp")) for p in root.iterdir())


def _bind_ro(src: Path, dest: Path) -> bool:
    dest.mkdir()
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(dest)], capture_output=True)
    if r.returncode:
        return False
    # older util-linux applies "ro" only on a remount
    subprocess.run(["mount", "-o", "remount,bind,ro", str(dest)], capture_output=True)
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_a_read_only_bind_mount_restores_bitwise_and_refuses_a_save_by_name(
    tmp_path: Path,
) -> None:
    want = _save(tmp_path / "run")
    ro = tmp_path / "ro"
    if not _bind_ro(tmp_path / "run", ro):
        pytest.skip("mount --bind not permitted here")
    try:
        assert _restore(ro) == (STEP, want, False)
        model, opt, extras = _state(4)
        with sg.Checkpointer(ro, handle_signals=False) as ck:
            with pytest.raises(sg.StorageError, match=str(ro)):
                ck.save(sg.TrainState(model=model, optimizer=opt, extras=extras), STEP + 1)
        out = subprocess.run(
            [sys.executable, "-m", "savegame", "verify", str(ro)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# ---- a lease broken by a harmless opener: an intact checkpoint must not be given up --------------
_BROKEN_LEASE = textwrap.dedent(
    """
    import subprocess, sys, time, warnings
    import torch
    import savegame as sg
    from savegame.engine import reader
    from savegame.format import hashing

    root = sys.argv[1]
    m = torch.nn.Linear(1024, 1024)
    with sg.Checkpointer(root, handle_signals=False) as ck:
        ck.save(sg.TrainState(model=m, rng=False), 1)
        with torch.no_grad():
            m.weight.add_(1)
        ck.save(sg.TrainState(model=m, rng=False), 2)
    f = f"{root}/step-000000000002/rank-00000.safetensors"
    real = hashing.digest
    opened = []

    def digest(view):
        if not opened and len(view) >= 1 << 20:  # mid-restore of step 2: a backup tool or an
            # editor opens the file for writing and closes it again, changing nothing
            opened.append(subprocess.Popen([sys.executable, "-c", f"open({f!r}, 'r+b').close()"]))
            time.sleep(0.5)
        return real(view)

    reader.hashing.digest = digest
    live = torch.nn.Linear(1024, 1024)
    warnings.simplefilter("ignore")
    with sg.Checkpointer(root, handle_signals=False, save=sg.Every(steps=1)) as ck:
        try:
            step = ck.restore(sg.TrainState(model=live, rng=False))
        except sg.StorageError as exc:
            print("RAISED", type(exc).__name__)
            step = None
        reader.hashing.digest = real
        if step is not None:
            print("RESTORED", step, torch.equal(live.weight, m.weight))
            try:  # the training loop goes on: the next step is step + 1
                ck.step(sg.TrainState(model=live, rng=False), step + 1)
                print("NEXT SAVE OK")
            except Exception as exc:
                print("NEXT SAVE", type(exc).__name__, exc)
    print("OPENER", opened[0].wait(timeout=60) if opened else None)
    """
)


def test_a_lease_broken_by_a_harmless_opener_still_restores_the_newest_or_raises(
    tmp_path: Path,
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_BROKEN_LEASE)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "OPENER 0" not in out:  # a SIGBUS, or the hook never fired
        raise RuntimeError(out)
    assert "RESTORED 2 True" in out or "RAISED StorageError" in out, out
    assert "StepExistsError" not in out, out


def test_a_restore_in_a_worker_thread_maps_under_a_lease_and_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server restoring weights off the main thread (signal handlers are main-thread only;
    the lease's signal setup must not need them)."""
    import threading

    want = _save(tmp_path / "run")
    spy = _Spy(monkeypatch)
    got: list[Any] = []

    def work() -> None:
        try:
            got.append(_restore(tmp_path / "run"))
        except BaseException as exc:  # reported below
            got.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert got == [(STEP, want, True)]
    assert spy.leases == [True] and spy.maps == 1
