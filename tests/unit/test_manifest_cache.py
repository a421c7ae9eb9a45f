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
        manifest.Manifest,
        "from_bytes",
        staticmethod(lambda raw, path: calls.append(path) or real(raw, path)),
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


def _opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from savegame.storage.local import LocalStore

    opened: list[str] = []
    real = LocalStore.open
    monkeypatch.setattr(LocalStore, "open", lambda self, key: opened.append(key) or real(self, key))
    return opened


def test_an_unchanged_manifest_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention lists every kept checkpoint after each save: an unchanged local manifest is
    known by its inode, size and times, without opening it."""
    ckpt = _run(tmp_path)
    first = reader.read_manifest(ckpt)
    opened = _opens(monkeypatch)
    assert reader.read_manifest(ckpt) is first
    assert [r.step for r in reader.list_checkpoints(ckpt.parent)] == [1]
    assert opened == []


def test_a_manifest_rewritten_with_its_old_times_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, same modification time set back by hand: the change time still moves."""
    import os
    import time

    ckpt = _run(tmp_path)
    path = ckpt / layout.MANIFEST
    reader.read_manifest(ckpt)
    st = path.stat()
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"step"')
    raw[at + 1] = ord("S")
    time.sleep(0.01)
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    opened = _opens(monkeypatch)
    with pytest.raises(errors.FormatError):
        reader.read_manifest(ckpt)
    assert opened  # read, not answered from memory


def test_a_checkpoint_folder_replaced_under_the_same_name_is_read_again(tmp_path: Path) -> None:
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    ma, mb = reader.read_manifest(a), reader.read_manifest(b)
    import shutil

    shutil.rmtree(a)
    shutil.copytree(b, a)
    assert reader.read_manifest(a).run_id == mb.run_id != ma.run_id


def test_stores_that_cannot_tell_a_version_are_read_every_time(tmp_path: Path) -> None:
    from savegame.storage.local import LocalStore
    from savegame.storage.memory import MemoryStore

    mem = MemoryStore()
    mem.put("x", b"1")
    assert mem.version("x") is None
    local = LocalStore(tmp_path)
    local.put("x", b"1")
    v1 = local.version("x")
    local.put("x", b"2")
    assert v1 is not None and local.version("x") != v1
    assert local.version("missing") is None
