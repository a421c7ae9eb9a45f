"""Incremental saves re-read the shared bytes they refer to (the scrub, engine/writer.py): bit rot
in a stored file is found, the damaged tensor is written in full, and the run heals instead of
every later checkpoint inheriting the damage (docs/incremental.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader, writer
from savegame.format import layout, manifest


class Box:
    def __init__(self) -> None:
        self.d: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.d)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.d = dict(sd)


def _ckpt(root: Path, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("keep", sg.Keep(last=10))
    return sg.Checkpointer(root, save=sg.Every(steps=1), handle_signals=False, **kw)


def _frozen(parts: int, numel: int = 4096) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"base{i}": torch.randn(numel, generator=g) for i in range(parts)}


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _chunk(root: Path, step: int, key: str) -> manifest.Chunk:
    return reader.read_manifest(root / layout.step_dir(step)).tensors[f"box/{key}"].chunks[0]


def _own(root: Path, step: int, key: str) -> bool:
    """The checkpoint of ``step`` holds ``key``'s bytes in its own file (not a reference)."""
    return not manifest.is_ref(_chunk(root, step, key).file)


def test_damage_in_the_previous_checkpoints_own_file_is_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(3)
    with _ckpt(root) as ck:
        box.d = {**base, "head": torch.zeros(4)}
        ck.save(st, 1)
        box.d = {**base, "head": torch.ones(4)}
        ck.save(st, 2)
        assert not _own(root, 2, "base1")  # shared with step 1
        c = _chunk(root, 1, "base1")
        _flip(root / layout.step_dir(1) / layout.tensor_file(0), c.offset + 5)
        box.d = {**base, "head": torch.full((4,), 2.0)}
        with caplog.at_level(logging.WARNING, logger="savegame"):
            ck.save(st, 3)
        box.d = {**base, "head": torch.full((4,), 3.0)}
        ck.save(st, 4)
    # the damaged tensor was written in full at step 3; the intact ones are still shared
    assert _own(root, 3, "base1")
    assert not _own(root, 3, "base0") and not _own(root, 3, "base2")
    assert not _own(root, 4, "base1")  # step 4 shares step 3's good copy
    assert "bit rot" in caplog.text and layout.step_dir(1) in caplog.text
    assert reader.verify(root / layout.step_dir(3)) == []
    assert reader.verify(root / layout.step_dir(4)) == []
    assert reader.verify(root / layout.step_dir(2))  # it refers to the rotten bytes: damaged
    got = sg.load(root / layout.step_dir(4))
    for k, v in base.items():
        assert torch.equal(got["box"][k], v)


def test_a_large_state_is_scrubbed_in_rounds_within_one_over_share_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-read is bounded per save (a share of the state), and damage anywhere in the
    shared bytes is still found within 1/SCRUB_SHARE saves."""
    monkeypatch.setattr(writer, "SCRUB_MIN_BYTES", 0)
    monkeypatch.setattr(writer, "SCRUB_SHARE", 1 / 4)
    read: list[int] = []
    real = writer._Scrub._intact

    def counting(
        self: Any, name: str, key: str, c: manifest.Chunk | None, size: int = -1
    ) -> bool:
        if c is not None:
            read.append(c.length)
        return real(self, name, key, c, size)

    monkeypatch.setattr(writer._Scrub, "_intact", counting)
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(8)
    state_bytes = sum(t.nbytes for t in base.values())
    with _ckpt(root) as ck:
        box.d = {**base, "head": torch.zeros(4)}
        ck.save(st, 1)
        last = "base7"  # the scrub goes in file order: the damaged piece's turn comes last
        c = _chunk(root, 1, last)
        _flip(root / layout.step_dir(1) / layout.tensor_file(0), c.offset + 9)
        healed_at = None
        for step in range(2, 8):
            read.clear()
            box.d = {**base, "head": torch.full((4,), float(step))}
            ck.save(st, step)
            assert sum(read) <= state_bytes / 4 + max(t.nbytes for t in base.values())
            if healed_at is None and _own(root, step, last):
                healed_at = step
    assert healed_at is not None and healed_at <= 1 + 4, healed_at
    assert reader.verify(root / layout.step_dir(7)) == []


def test_a_save_where_everything_changed_reads_nothing_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        writer._Scrub, "_intact", lambda self, name, key, c, size=-1: calls.append(name) or True
    )
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    with _ckpt(root) as ck:
        for step in (1, 2, 3):
            box.d = {k: v + step for k, v in _frozen(3).items()}
            ck.save(st, step)
    assert calls == []


def test_an_unreadable_shared_file_means_a_full_write_not_a_failed_save(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(2)
    with _ckpt(root) as ck:
        box.d = {**base, "head": torch.zeros(4)}
        ck.save(st, 1)
        f = root / layout.step_dir(1) / layout.tensor_file(0)
        f.write_bytes(f.read_bytes()[: _chunk(root, 1, "base1").offset + 10])  # truncated
        box.d = {**base, "head": torch.ones(4)}
        ck.save(st, 2)
    assert _own(root, 2, "base1")
    assert reader.verify(root / layout.step_dir(2)) == []


def test_after_damage_retention_checks_its_kept_checkpoints_again(tmp_path: Path) -> None:
    """Checkpoints verified earlier in the process but referring to the rotten bytes are not
    trusted once the scrub found damage: retention verifies them again and sets them aside
    instead of keeping them in place of intact ones."""
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(2)
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:
        for step in (1, 2, 3):
            box.d = {**base, "head": torch.full((4,), float(step))}
            ck.save(st, step)
        retired = root / layout.retired_file(f"{layout.step_dir(1)}/{layout.tensor_file(0)}")
        assert retired.exists()  # step 1 was deleted, its bytes are still used
        _flip(retired, _chunk(root, 3, "base0").offset + 3)
        for step in (4, 5):
            box.d = {**base, "head": torch.full((4,), float(step))}
            ck.save(st, step)
    kept = {r.step: reader.verify(r.path) for r in reader.list_checkpoints(root)}
    assert kept, "no checkpoint left"
    assert all(problems == [] for problems in kept.values()), kept
    with _ckpt(root) as ck:
        b2 = Box()
        assert ck.restore(sg.TrainState(box=b2, rng=False)) is not None
        assert torch.equal(b2.d["base0"], base["base0"])
