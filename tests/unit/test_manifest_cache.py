"""Parsed manifests are reused only for the exact same bytes (engine/reader.py ``_parse``):
retention and listing read every kept manifest after each save, but a manifest changed on disk
is never answered from memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import reader
from savegame.format import layout, manifest


def _run(tmp_path: Path) -> Path:
    model = torch.nn.Linear(3, 3)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model), step=1)
    return tmp_path / "run" / layout.step_dir(1)


def test_the_same_bytes_are_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _run(tmp_path)
    calls = []
    real = manifest.Manifest.from_bytes
    monkeypatch.setattr(
        manifest.Manifest, "from_bytes", staticmethod(lambda raw, path: calls.append(path) or real(raw, path))
    )
    reader._parsed.clear()
    first = reader.read_manifest(ckpt)
    assert reader.read_manifest(ckpt) is first
    assert len(calls) == 1


def test_a_manifest_edited_on_disk_is_parsed_again_and_refused(tmp_path: Path) -> None:
    ckpt = _run(tmp_path)
    m = reader.read_manifest(ckpt)  # cached
    path = ckpt / layout.MANIFEST
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"step"')
    raw[at + 1] = ord("S")  # "Step": a different field name, the integrity hash no longer holds
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.FormatError):
        reader.read_manifest(ckpt)
    assert m.step == 1


def test_a_replaced_manifest_gives_its_own_content(tmp_path: Path) -> None:
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    ma, mb = reader.read_manifest(a), reader.read_manifest(b)
    assert ma.run_id != mb.run_id
    (a / layout.MANIFEST).write_bytes((b / layout.MANIFEST).read_bytes())
    assert reader.read_manifest(a).run_id == mb.run_id
