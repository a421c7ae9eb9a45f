"""Incremental checkpoints (issue 14 part 2, docs/incremental.md): a tensor whose bytes equal
the previous checkpoint's is not written again, the new checkpoint refers to the stored bytes,
and everything a user relies on — exact resume, verification, retention, prune, ls, transfer,
the two-tier upload — stays correct with shared bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

import savegame as sg
from savegame import checkpointer as runs
from savegame.checkpointer import retention
from savegame.engine import reader
from savegame.format import layout, manifest

BASE = 64  # a frozen base of BASE x BASE floats, a small trainable head


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    base = torch.nn.Linear(BASE, BASE)
    head = torch.nn.Linear(BASE, 3)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, head


def _state(
    base: torch.nn.Module, head: torch.nn.Module, opt: torch.optim.Optimizer
) -> sg.TrainState:
    return sg.TrainState(base=base, head=head, optimizer=opt)


def _train_step(base: torch.nn.Module, head: torch.nn.Module, opt: Any, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, BASE, generator=g)
    loss = head(base(x)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _ckpt(root: Path, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("keep", sg.Keep(last=10))
    return sg.Checkpointer(root, save=sg.Every(steps=1), handle_signals=False, **kw)


def _manifest(root: Path, step: int) -> manifest.Manifest:
    return reader.read_manifest(root / layout.step_dir(step))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _restore(
    root: Path, step: int | None = None, *, train_base: bool = False
) -> tuple[Any, Any, Any, int]:
    base, head = _model(seed=99)  # different values: the restore must bring every byte back
    params = [*head.parameters(), *(base.parameters() if train_base else [])]
    opt = torch.optim.Adam(params, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sg.CorruptCheckpointWarning)
        with _ckpt(root) as ck:
            got = ck.restore(_state(base, head, opt), step=step)
    return base, head, opt, got


# ---- what is written -----------------------------------------------------------------------
def test_unchanged_tensors_are_referenced_not_written_and_the_files_stay_safetensors(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root) as ck:
        for step in (1, 2, 3):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    m1, m2, m3 = (_manifest(root, s) for s in (1, 2, 3))
    raw1 = json.loads((root / layout.step_dir(1) / layout.MANIFEST).read_bytes())
    raw3 = json.loads((root / layout.step_dir(3) / layout.MANIFEST).read_bytes())
    assert raw1["version"] == 1 and not m1.refs  # the first save is a full, v1 checkpoint
    assert raw3["version"] == 2
    shared = "step-000000000001/rank-00000.safetensors"
    # references always name the folder holding the bytes, never a chain through step 2
    assert set(m2.refs) == set(m3.refs) == {shared}
    assert m3.refs[shared] == m1.files["rank-00000.safetensors"]
    for key in ("base/weight", "base/bias"):
        assert m3.tensors[key].chunks[0].file == shared
        c1, c3 = m1.tensors[key].chunks[0], m3.tensors[key].chunks[0]
        assert (c3.offset, c3.length, c3.hash) == (c1.offset, c1.length, c1.hash)
    for key in ("head/weight", "head/bias"):
        assert m3.tensors[key].chunks[0].file == "rank-00000.safetensors"
    own = root / layout.step_dir(3) / "rank-00000.safetensors"
    assert own.stat().st_size < (root / layout.step_dir(1) / "rank-00000.safetensors").stat().st_size
    # the own file holds exactly the changed tensors and is still a valid safetensors file
    with safetensors.safe_open(str(own), "pt") as f:
        keys = set(f.keys())
        assert "head/weight" in keys and "base/weight" not in keys
        assert torch.equal(f.get_tensor("head/weight"), head.weight.detach())
    for s in (1, 2, 3):
        assert reader.verify(root / layout.step_dir(s)) == []


def test_incremental_false_writes_full_version_1_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root, incremental=False) as ck:
        for step in (1, 2):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    for s in (1, 2):
        raw = json.loads((root / layout.step_dir(s) / layout.MANIFEST).read_bytes())
        assert raw["version"] == 1 and all("/" not in f for f in raw["files"])
    assert _manifest(root, 2).tensors["base/weight"].chunks[0].file == "rank-00000.safetensors"


# ---- exact resume ---------------------------------------------------------------------------
def test_resume_from_an_incremental_checkpoint_is_bitwise_equal_to_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    total, cut = 8, 5
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(1, total + 1):
        _train_step(base, head, opt, step)
    want = {**{f"h{k}": v for k, v in head.state_dict().items()}}
    want_opt = opt.state_dict()

    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:
        for step in range(1, cut + 1):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    assert _manifest(root, cut).refs  # the one resumed from shares the base
    base2, head2, opt2, got = _restore(root)
    assert got == cut
    for step in range(cut + 1, total + 1):
        _train_step(base2, head2, opt2, step)
    for k, v in head2.state_dict().items():
        assert torch.equal(_bits(v), _bits(want[f"h{k}"])), k
    st = opt2.state_dict()["state"]
    for i, s in want_opt["state"].items():
        for name, v in s.items():
            assert torch.equal(_bits(st[i][name]), _bits(v)), (i, name)


def test_restore_after_the_base_checkpoint_was_retired_and_its_files_freed_once_unused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root, keep=sg.Keep(last=1)) as ck:
        for step in (1, 2, 3):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
        # step 1 was deleted by retention, but step 3 uses its base: that file is retired
        assert [r.step for r in reader.list_checkpoints(root)] == [3]
        assert not (root / layout.step_dir(1)).exists()
        assert (root / "retired-step-000000000001-rank-00000.safetensors").exists()
        assert not (root / layout.step_dir(2)).exists()  # nothing used step 2's own file
        assert not [p for p in root.iterdir() if p.name.startswith("retired-step-000000000002")]
        assert [i.step for i in ck.list()] == [3]  # retired files are no checkpoints
        infos = runs.list_run(root, aside=True)
        retired = [i for i in infos if i.kind == "retired"]
        assert [i.step for i in retired] == [1] and not retired[0].valid
        assert "step(s) 3 still use" in (retired[0].error or "")
        (info3,) = [i for i in infos if i.kind == "checkpoint"]
        assert info3.shared == (root / "retired-step-000000000001-rank-00000.safetensors").stat().st_size
        assert info3.own == (root / layout.step_dir(3) / "rank-00000.safetensors").stat().st_size
        assert info3.size == info3.own + info3.shared
    b2, h2, _, got = _restore(root)
    assert got == 3
    assert torch.equal(b2.weight, base.weight) and torch.equal(h2.weight, head.weight)
    # the base changes: the next save writes it in full, and the retired file goes
    with torch.no_grad():
        base.weight.add_(1.0)
        base.bias.add_(1.0)
    with _ckpt(root, keep=sg.Keep(last=1)) as ck:
        ck.save(_state(base, head, opt), 4)
    m4 = _manifest(root, 4)
    assert m4.tensors["base/weight"].chunks[0].file == "rank-00000.safetensors"
    # exactly the files step 4 still uses are left (step 1's only if it holds, e.g., the RNG
    # state that did not change); everything else of the deleted steps is gone
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("retired-"))
    assert left == sorted(layout.retired_file(n) for n in m4.refs)
    assert [r.step for r in reader.list_checkpoints(root)] == [4]
    assert reader.verify(root / layout.step_dir(4)) == []


def test_verify_catches_a_flipped_byte_in_a_shared_file_for_every_checkpoint_that_uses_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root) as ck:
        for step in (1, 2, 3):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    c = _manifest(root, 1).tensors["base/weight"].chunks[0]
    f = root / layout.step_dir(1) / c.file
    data = bytearray(f.read_bytes())
    data[c.offset + 5] ^= 0x01
    f.write_bytes(bytes(data))
    for s in (1, 2, 3):
        problems = reader.verify(root / layout.step_dir(s))
        assert any("base/weight" in p for p in problems), (s, problems)
    m3 = _manifest(root, 3)
    with pytest.raises(sg.IntegrityError, match="base/weight"):
        reader.load_tensors(root / layout.step_dir(3), m3)
    with pytest.warns(sg.CorruptCheckpointWarning):
        with _ckpt(root) as ck:
            b2, h2 = _model(seed=5)
            assert ck.restore(_state(b2, h2, torch.optim.Adam(h2.parameters()))) == 0


def test_a_shared_file_truncated_or_missing_is_an_integrity_error(tmp_path: Path) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root, keep=sg.Keep(last=1)) as ck:
        for step in (1, 2):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    shared = root / "retired-step-000000000001-rank-00000.safetensors"
    shared.write_bytes(shared.read_bytes()[:-3])
    assert any("bytes but the manifest says" in p for p in reader.verify(root / layout.step_dir(2)))
    shared.unlink()
    problems = reader.verify(root / layout.step_dir(2))
    assert any("missing" in p and "step-000000000001" in p for p in problems), problems


# ---- copy avoidance is never guessed: the traps -------------------------------------------
TRAPS = ["data", "view", "no_grad", "foreach", "fused", "set_"]


@pytest.mark.parametrize("trap", TRAPS)
@pytest.mark.parametrize("async_save", [False, True])
def test_in_place_writes_that_torch_does_not_track_are_never_saved_stale(
    tmp_path: Path, trap: str, async_save: bool
) -> None:
    """The decision "unchanged" is made from the hash of the bytes actually staged, so writes
    that leave torch's version counter alone (``.data``, ``set_``) or go through views,
    ``no_grad`` and the optimizers' foreach/fused kernels all reach the checkpoint."""
    root = tmp_path / "run"
    base, head = _model()
    kw: dict[str, Any] = {"foreach": True} if trap == "foreach" else {}
    if trap == "fused":
        kw = {"fused": True}
    opt = torch.optim.Adam(
        [*head.parameters(), *(base.parameters() if trap in ("foreach", "fused") else [])],
        lr=1e-2,
        **kw,
    )
    if trap in ("foreach", "fused"):
        for p in base.parameters():
            p.requires_grad_(True)
    state = _state(base, head, opt)
    with _ckpt(root, async_save=async_save) as ck:
        _train_step(base, head, opt, 1)
        ck.step(state, 1)
        ck.wait()
        before = base.weight._version
        if trap == "data":
            base.weight.data[3, 4] += 1.0  # .data: the version counter does not move
        elif trap == "view":
            with torch.no_grad():
                base.weight.view(-1)[7:9].mul_(3.0)
        elif trap == "no_grad":
            with torch.no_grad():
                base.bias.add_(0.5)
        elif trap == "set_":  # new storage behind the same Parameter
            with torch.no_grad():
                base.weight.set_(base.weight.detach().clone().fill_(0.25))
        else:  # the optimizer updates the base (its foreach / fused kernels)
            _train_step(base, head, opt, 2)
        if trap == "data":
            assert base.weight._version == before  # the trap is real
        ck.step(state, 2)
        ck.wait()
    m = _manifest(root, 2)
    changed = "base/bias" if trap == "no_grad" else "base/weight"
    assert m.tensors[changed].chunks[0].file == "rank-00000.safetensors", trap
    b2, h2, _, got = _restore(root, train_base=trap in ("foreach", "fused"))
    assert got == 2
    assert torch.equal(_bits(b2.weight), _bits(base.weight)), trap
    assert torch.equal(_bits(b2.bias), _bits(base.bias)), trap
    assert torch.equal(_bits(h2.weight), _bits(head.weight)), trap


# ---- hostile references ----------------------------------------------------------------------
def _resign(body: dict[str, Any]) -> bytes:
    body = dict(body)
    body.pop("integrity", None)
    body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "bad",
    [
        "../step-000000000001/rank-00000.safetensors",
        "/etc/rank-00000.safetensors",
        "step-000000000001/../../x/rank-00000.safetensors",
        "step-000000000009/rank-00000.safetensors",  # newer than the checkpoint
        "step-000000000002/rank-00000.safetensors",  # itself
        "step-000000000001/manifest.json",
        "step-1/rank-00000.safetensors",
        "damaged-step-000000000001-ab/rank-00000.safetensors",
        "step-000000000001/rank-00000.safetensors/x",
    ],
)
def test_hostile_references_in_a_manifest_are_format_errors(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root) as ck:
        for step in (1, 2):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    path = root / layout.step_dir(2) / layout.MANIFEST
    body = json.loads(path.read_bytes())
    good = "step-000000000001/rank-00000.safetensors"
    body["files"][bad] = body["files"].pop(good)
    for t in body["tensors"].values():
        for c in t["chunks"]:
            if c["file"] == good:
                c["file"] = bad
    with pytest.raises(sg.FormatError) as info:
        manifest.Manifest.from_bytes(_resign(body), path)
    assert str(info.value.path) == str(path)


def test_a_reference_in_a_version_1_manifest_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root) as ck:
        for step in (1, 2):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    path = root / layout.step_dir(2) / layout.MANIFEST
    body = json.loads(path.read_bytes())
    body["version"] = 1
    with pytest.raises(sg.FormatError, match="illegal file name"):
        manifest.Manifest.from_bytes(_resign(body), path)


def test_a_reader_of_version_1_refuses_an_incremental_manifest_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root) as ck:
        for step in (1, 2):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    monkeypatch.setattr(manifest, "VERSION", 1)  # what an older release reads
    with pytest.raises(sg.UnsupportedFormatError):
        reader.read_manifest(root / layout.step_dir(2))
    b2, h2 = _model(seed=3)
    with pytest.warns(sg.CorruptCheckpointWarning):
        with _ckpt(root) as ck:
            assert ck.restore(_state(b2, h2, torch.optim.Adam(h2.parameters()))) == 1


# ---- retention, prune, garbage -------------------------------------------------------------
def _frozen_run(root: Path, steps: int, keep: sg.Keep) -> None:
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root, keep=keep) as ck:
        for step in range(1, steps + 1):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)


def test_prune_never_deletes_shared_bytes_in_use(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 4, sg.Keep(last=10))
    out = subprocess.run(
        [sys.executable, "-m", "savegame", "prune", str(root), "--keep-last", "1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r.step for r in reader.list_checkpoints(root)] == [4]
    assert reader.verify(root / layout.step_dir(4)) == []
    assert (root / "retired-step-000000000001-rank-00000.safetensors").exists()
    assert sorted(p.name for p in root.glob("step-*")) == [layout.step_dir(4)]


def test_garbage_collection_keeps_referenced_files_and_frees_unreferenced_retired_ones(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 3, sg.Keep(last=1))
    retired = root / "retired-step-000000000001-rank-00000.safetensors"
    retention.collect_garbage(root)  # step 3 still uses step 1's file
    assert retired.exists()
    # once nothing refers to it any more (step 3 gone by hand) it is garbage
    import shutil

    shutil.rmtree(root / layout.step_dir(3))
    with _ckpt(root, keep=sg.Keep(last=1)):
        pass  # the writer collects garbage when it opens the run
    assert not retired.exists()
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", "retired-"))]


def test_nothing_shared_is_collected_while_a_manifest_cannot_be_read(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 3, sg.Keep(last=1))
    # step 3's manifest is of a newer format: its references are unknown
    path = root / layout.step_dir(3) / layout.MANIFEST
    body = json.loads(path.read_bytes())
    body["version"] = 99
    path.write_bytes(_resign(body))
    retention.collect_garbage(root)
    assert (root / "retired-step-000000000001-rank-00000.safetensors").exists()


def test_deleting_while_a_manifest_cannot_be_read_retires_every_file(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 3, sg.Keep(last=10))
    path = root / layout.step_dir(3) / layout.MANIFEST
    body = json.loads(path.read_bytes())
    body["version"] = 99  # refers to who knows what
    path.write_bytes(_resign(body))
    plan = runs.list_run(root, sg.Keep(last=1))
    deleted = runs.delete_unkept(plan, spare=None)
    assert [i.step for i in deleted] == [1]  # step 2 is kept (newest valid one)
    assert (root / "retired-step-000000000001-rank-00000.safetensors").exists()


def test_disk_of_ten_checkpoints_is_the_base_once_plus_what_changed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 10, sg.Keep(last=10))
    infos = [i for i in runs.list_run(root) if i.kind == "checkpoint"]
    assert len(infos) == 10
    on_disk = sum(
        f.stat().st_size for f in root.rglob("*.safetensors")
    )
    assert on_disk == sum(i.own for i in infos)  # own sizes count every byte once
    base_bytes = (root / layout.step_dir(1) / "rank-00000.safetensors").stat().st_size
    changed = max(i.own for i in infos[1:])
    assert on_disk <= base_bytes + 9 * changed
    assert changed * 5 < base_bytes


# ---- savegame ls -------------------------------------------------------------------------------
def test_savegame_ls_shows_own_and_shared_bytes_and_retired_folders(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 3, sg.Keep(last=2))
    out = subprocess.run(
        [sys.executable, "-m", "savegame", "ls", str(root)],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", **__import__("os").environ},
    )
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if "step" in line and "own" in line)
    assert "shared" in header
    assert "retired" in out.stdout
    assert "step(s) 2, 3 still use" in " ".join(out.stdout.split())


# ---- transfer and the two tiers --------------------------------------------------------------
def test_push_and_pull_a_run_with_shared_bytes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 4, sg.Keep(last=2))  # step 1 retired, 3 and 4 refer to it
    dst = tmp_path / "copy"
    report = sg.push(root, dst)
    assert sorted(report.copied) == [3, 4]
    for s in (3, 4):
        assert reader.verify(dst / layout.step_dir(s)) == []
    assert (dst / "retired-step-000000000001-rank-00000.safetensors").exists()
    assert not (dst / layout.step_dir(1)).exists()
    again = sg.push(root, dst)  # resumable / idempotent
    assert sorted(again.skipped) == [3, 4]
    back = tmp_path / "back"
    sg.pull(dst, back)
    b2, h2, _, got = _restore(back)
    assert got == 4
    b1, h1, _, _ = _restore(root)
    assert torch.equal(b2.weight, b1.weight) and torch.equal(h2.weight, h1.weight)


def test_push_of_one_incremental_checkpoint_brings_the_files_it_shares(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _frozen_run(root, 3, sg.Keep(last=10))
    dst = tmp_path / "copy"
    sg.push(root / layout.step_dir(3), dst)
    assert reader.verify(dst / layout.step_dir(3)) == []
    assert [r.step for r in reader.list_checkpoints(dst)] == [3]
    _, _, _, got = _restore(dst)
    assert got == 3


def test_the_two_tier_upload_with_shared_bytes(tmp_path: Path) -> None:
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with sg.Checkpointer(
        remote, cache=cache, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ck:
        for step in range(1, 5):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    steps = [r.step for r in reader.list_checkpoints(remote)]
    assert steps == [3, 4]
    for s in steps:
        assert reader.verify(remote / layout.step_dir(s)) == []
        assert _manifest(remote, s).refs
    import shutil

    shutil.rmtree(cache)  # restore from the remote tier alone
    b2, h2 = _model(seed=4)
    opt2 = torch.optim.Adam(h2.parameters(), lr=1e-2)
    with sg.Checkpointer(remote, cache=tmp_path / "cache2", handle_signals=False) as ck:
        assert ck.restore(_state(b2, h2, opt2)) == 4
    assert torch.equal(b2.weight, base.weight) and torch.equal(h2.weight, head.weight)


def test_a_shared_file_retired_while_the_next_save_checks_it_is_read_from_its_new_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The two-tier cache's retention runs on the upload thread, beside the next save: it may
    # retire (move) a shared file after the save resolved its name and before it re-reads it.
    # That file was moved, not lost: the save still shares it, and nothing is called damaged.
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    real = reader.resolve
    moved: list[str] = []

    def resolve_then_retire(loc: Any, name: str) -> str:
        key = real(loc, name)
        path = loc.store.local_path(key)
        alt = reader.retired_key(key)
        if path is not None and alt is not None and path.exists() and not moved:
            path.rename(loc.store.local_path(alt))  # what retention's retire does
            moved.append(key)
        return key

    with _ckpt(root, keep=sg.Keep(last=10)) as ck:
        for step in range(1, 4):
            _train_step(base, head, opt, step)
            if step == 3:
                monkeypatch.setattr(reader, "resolve", resolve_then_retire)
            with caplog.at_level("WARNING", logger="savegame"):
                ck.save(_state(base, head, opt), step)
    assert moved, "the save did not re-read a shared file"
    assert "damaged" not in caplog.text
    assert "step-000000000001/rank-00000.safetensors" in _manifest(root, 3).refs
    monkeypatch.setattr(reader, "resolve", real)
    assert reader.verify(root / layout.step_dir(3)) == []


# ---- reading one checkpoint by path: open, load, convert ---------------------------------------
def test_open_load_and_convert_an_incremental_checkpoint_whose_base_was_retired(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    base, head = _model()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with _ckpt(root, keep=sg.Keep(last=1)) as ck:
        for step in (1, 2, 3):
            _train_step(base, head, opt, step)
            ck.save(_state(base, head, opt), step)
    ckpt = root / layout.step_dir(3)
    with sg.open(ckpt) as r:
        assert torch.equal(r.read("base/weight"), base.weight.detach())
        assert torch.equal(r.read("head/weight"), head.weight.detach())
    loaded = sg.load(ckpt)
    assert torch.equal(loaded["base"]["weight"], base.weight.detach())
    out = sg.convert(ckpt, tmp_path / "flat.safetensors", to="safetensors")
    import safetensors.torch

    flat = safetensors.torch.load_file(str(out))
    assert torch.equal(flat["base/weight"], base.weight.detach())
    full = sg.convert(ckpt, tmp_path / "full" / "step-000000000003", to="savegame")
    assert not reader.read_manifest(full).refs  # a converted copy stands alone
    assert reader.verify(full) == []


@pytest.mark.parametrize("seekable", [True, False])
def test_the_changed_tensor_file_is_valid_safetensors_whether_or_not_it_can_seek(
    tmp_path: Path, seekable: bool
) -> None:
    import io

    import safetensors.torch

    from savegame.format import hashing, tensors

    items = tensors.order_for_file(
        [
            ("a", torch.arange(10, dtype=torch.float64)),
            ("b", torch.arange(7, dtype=torch.int32)),
            ("c", torch.ones(3, 5)),
            ("d", torch.zeros(0)),
            ("e", torch.arange(9, dtype=torch.uint8)),
        ]
    )
    stored = {"c": hashing.digest(tensors.byte_view(torch.ones(3, 5))), "b": "0" * 32}

    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.buf += bytes(b)
            return len(b)

    if seekable:
        path = tmp_path / "f.safetensors"
        with open(path, "wb", buffering=0) as f:
            header, written, digests = tensors.write_changed_tensor_file(f, items, stored)
        data = path.read_bytes()
    else:
        s = Stream()
        header, written, digests = tensors.write_changed_tensor_file(s, items, stored)  # type: ignore[arg-type]
        data = bytes(s.buf)
    assert [w.key for w in written] == [k for k, _ in items if k != "c"]  # "c" is stored already
    assert len(data) == len(header) + sum(w.length for w in written)
    assert len(header) % 64 == 0
    loaded = safetensors.torch.load(data)
    assert set(loaded) == {"a", "b", "d", "e"}
    for k, t in items:
        assert digests[k] == hashing.digest(tensors.byte_view(t))
        if k != "c":
            assert torch.equal(loaded[k], t)
    for w in written:
        assert hashing.digest(data[w.offset : w.offset + w.length]) == w.hash
