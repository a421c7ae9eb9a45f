"""Outside review (s13): a run with shared bytes (incremental saves, docs/incremental.md) seen
through the command line while it is live — `savegame verify` after bit rot or a lost shared
file and after the next saves healed it, `savegame prune` and `savegame push` to a local folder
in the middle of a run whose retention deletes and retires files while the push reads them.
A user expects: verify names exactly the damaged checkpoints and exits 1, healed ones verify; a
live run is never pruned behind its writer's back (a typed, named refusal); a push that races
the run's retention copies only complete, verifying checkpoints and a re-run finishes it.
A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg

pytestmark = pytest.mark.filterwarnings("ignore")


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "savegame", *args], capture_output=True, text=True, timeout=timeout
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
    m[0].requires_grad_(False)  # a frozen base: shared from save to save
    return m


def _train_step(m: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        m[1].weight.add_(0.001 * step)


def _digest(m: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    return h.hexdigest()


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}"


def _flip(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _base_file(root: Path, step: int) -> Path:
    """The file that holds the frozen base's bytes for checkpoint ``step``."""
    m = json.loads((_step_dir(root, step) / "manifest.json").read_text())
    for key, t in m["tensors"].items():
        if key.endswith("0.weight"):
            ref = t["chunks"][0]["file"]
            return root / ref if "/" in ref else _step_dir(root, step) / ref
    raise AssertionError(m["tensors"].keys())


def test_verify_names_every_checkpoint_using_rotten_shared_bytes_and_the_healed_ones_pass(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    m = _model()
    with sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=10)) as ck:
        for step in (1, 2, 3):
            _train_step(m, step)
            ck.save(sg.TrainState(model=m, rng=False), step)
        shared = _base_file(root, 3)
        assert shared.parent == _step_dir(root, 1)  # 2 and 3 refer to step 1's bytes
        # flip a byte of the first tensor's data (a frozen one: tensors are in name order)
        header = 8 + int.from_bytes(shared.read_bytes()[:8], "little")
        data = bytearray(shared.read_bytes())
        data[header + 10] ^= 0x01
        shared.write_bytes(bytes(data))
        for step in (4, 5):  # a small state is scrubbed on every save: 4 heals it
            _train_step(m, step)
            ck.save(sg.TrainState(model=m, rng=False), step)
    out = _cli("verify", str(root))
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout + out.stderr
    for bad in (1, 2, 3):
        assert f"step-{bad:012d}" in text, text
    # 4 and 5 would refer to the rotten bytes had the scrub not written them again in 4
    for good in (4, 5):
        one = _cli("verify", str(_step_dir(root, good)))
        assert one.returncode == 0, one.stdout + one.stderr
    live = _model()
    with sg.Checkpointer(root, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=live, rng=False)) == 5
    assert _digest(live) == _digest(m)


def test_a_deleted_shared_file_is_named_by_verify_and_the_run_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "run"
    m = _model()
    with sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=10)) as ck:
        for step in (1, 2):
            _train_step(m, step)
            ck.save(sg.TrainState(model=m, rng=False), step)
        _base_file(root, 2).unlink()  # step 1's file, used by 1 and 2
        _train_step(m, 3)
        ck.save(sg.TrainState(model=m, rng=False), 3)  # must not refer to the lost file
    out = _cli("verify", str(root))
    assert out.returncode == 1
    assert "step-000000000002" in out.stdout + out.stderr
    assert _cli("verify", str(_step_dir(root, 3))).returncode == 0
    live = _model()
    with sg.Checkpointer(root, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=live, rng=False)) == 3
    assert _digest(live) == _digest(m)


_TRAINER = textwrap.dedent(
    """
    import sys, time, torch, savegame as sg
    root, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    with sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=2),
                         save=sg.Every(steps=1)) as ck:
        print("OPEN", flush=True)
        for step in range(1, steps + 1):
            with torch.no_grad():
                m[1].weight.add_(0.001)
            ck.step(sg.TrainState(model=m, rng=False), step)
            time.sleep(pause)
        ck.save(sg.TrainState(model=m, rng=False), steps + 1)
    h = __import__("hashlib").sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    print("DONE", h.hexdigest(), flush=True)
    """
)


def _start_trainer(tmp_path: Path, root: Path, steps: int, pause: float) -> Any:
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(steps), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "OPEN"
    return proc


@pytest.mark.slow  # ~13 s
def test_prune_of_a_live_run_is_refused_by_name_and_deletes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    proc = _start_trainer(tmp_path, root, steps=40, pause=0.05)
    try:
        time.sleep(0.5)
        out = _cli("prune", "--keep-last", "1", str(root))
        assert out.returncode != 0, out.stdout + out.stderr
        assert "use" in (out.stdout + out.stderr).lower() and str(root) in out.stdout + out.stderr
        assert "Traceback" not in out.stderr
    finally:
        rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _cli("verify", str(root)).returncode == 0
    assert _cli("prune", "--keep-last", "1", str(root)).returncode == 0
    assert [p.name for p in root.glob("step-*")] == ["step-000000000041"]
    assert _cli("verify", str(root)).returncode == 0


@pytest.mark.slow  # ~13 s
def test_push_to_a_local_folder_while_the_run_saves_and_retires_then_push_again(
    tmp_path: Path,
) -> None:
    """The run saves every step with Keep(last=2): it deletes and retires files while the
    push copies them. Every checkpoint the push committed must verify; a push that races a
    deletion may fail (typed, no traceback) but never commits a broken checkpoint, and a push
    after the run ends brings the newest checkpoint over, bitwise."""
    root, dest = tmp_path / "run", tmp_path / "copy"
    proc = _start_trainer(tmp_path, root, steps=60, pause=0.01)
    pushes = 0
    try:
        while proc.poll() is None:  # in-process pushes: many of them race the retention
            try:
                sg.push(root, dest, progress=False)
            except sg.CheckpointError:
                pass  # a typed refusal of a race is allowed; a broken copy is not
            pushes += 1
    finally:
        rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert pushes > 5, "the push never raced the run"
    v = _cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr
    want = rest.split("DONE", 1)[1].split()[0]
    final = _cli("push", "--no-progress", str(root), str(dest))
    assert final.returncode == 0, final.stdout + final.stderr
    v = _cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr
    torch.manual_seed(1)
    live = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    with sg.Checkpointer(dest, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=live, rng=False)) == 61
    assert _digest(live) == want


def test_a_push_whose_listed_checkpoints_were_all_retired_meanwhile_lists_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found here: `savegame push` of a live run exited 2, 'holds no committed checkpoint to
    move', when the run's retention deleted every listed checkpoint before their manifests were
    read (5 of 6 CLI pushes of a run saving every 0.3 s with Keep(last=2)); fixed in a962c23."""
    from savegame.engine import reader

    root, dest = tmp_path / "run", tmp_path / "copy"
    m = _model()
    ck = sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=2))
    for step in (1, 2):
        _train_step(m, step)
        ck.save(sg.TrainState(model=m, rng=False), step)
    real = reader.list_checkpoints

    def listing_then_the_run_goes_on(*a: Any, **k: Any) -> Any:
        refs = real(*a, **k)
        monkeypatch.setattr(reader, "list_checkpoints", real)  # once (saves list too)
        for step in (3, 4):  # the live run saves twice: its retention deletes steps 1 and 2
            _train_step(m, step)
            ck.save(sg.TrainState(model=m, rng=False), step)
        return refs

    monkeypatch.setattr(reader, "list_checkpoints", listing_then_the_run_goes_on)
    try:
        report = sg.push(root, dest, progress=False)
    finally:
        ck.close()
    assert report.copied and max(report.copied) == 4
    assert _cli("verify", str(dest)).returncode == 0


def test_prune_after_a_healed_bit_rot_keeps_a_verifying_run(tmp_path: Path) -> None:
    """Bit rot in the base file, healed by the next save; then `savegame prune --keep-last 1`:
    the kept checkpoint still uses the base file's intact tensors (now a retired file), the
    run verifies and restores bitwise."""
    root = tmp_path / "run"
    m = _model()
    with sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=10)) as ck:
        for step in (1, 2):
            _train_step(m, step)
            ck.save(sg.TrainState(model=m, rng=False), step)
        base = _step_dir(root, 1) / "rank-00000.safetensors"
        header = 8 + int.from_bytes(base.read_bytes()[:8], "little")
        data = bytearray(base.read_bytes())
        data[header + 10] ^= 0x01  # the first tensor (a frozen bias)
        base.write_bytes(bytes(data))
        for step in (3, 4):
            _train_step(m, step)
            ck.save(sg.TrainState(model=m, rng=False), step)
    out = _cli("prune", "--keep-last", "1", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000000004"]
    v = _cli("verify", str(root))
    assert v.returncode == 0, v.stdout + v.stderr
    live = _model()
    with sg.Checkpointer(root, handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=live, rng=False)) == 4
    assert _digest(live) == _digest(m)
