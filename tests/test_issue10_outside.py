"""Outside review of issue 10 (the storage seam, the split Checkpointer, the reader registry).

Each test is one bug found by using the public API as a new user would (each failed before its
fix), plus what worked and must keep working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.storage.faulty import FaultyStore
from savegame.storage.local import LocalStore
from savegame.storage.memory import MemoryStore

GOLDEN = Path(__file__).parent / "golden"
TUTORIAL = GOLDEN / "foreign" / "torch" / "tutorial.pth"
SAFETENSORS = GOLDEN / "foreign" / "torch" / "model.safetensors"
SAVEGAME_V1 = GOLDEN / "savegame_v1" / "step-000000000007"


def _state() -> sg.TrainState:
    return sg.TrainState(rng=False, extras={"w": torch.arange(4.0)})


# ---- the Checkpointer: errors a store raises must come back typed ------------------------------


def test_a_blocking_save_whose_retention_fails_raises_a_typed_error_saying_it_committed() -> None:
    inner = MemoryStore()
    store = FaultyStore(inner, {})
    ckpt = sg.Checkpointer(store, keep=sg.Keep(last=1), handle_signals=False)
    try:
        ckpt.save(_state(), 0)  # the session is recorded at the first save (it lists the run)
        store.faults["list"] = store.calls["list"] + 1  # the first listing after the commit
        with pytest.raises(sg.StorageError, match="committed"):
            ckpt.save(_state(), 1)
        assert inner.exists("step-000000000001")
    finally:
        ckpt.close()


def test_an_async_save_whose_retention_fails_raises_a_typed_error_saying_it_committed() -> None:
    """The other half of the pair above (works today)."""
    store = FaultyStore(MemoryStore(), {})
    ckpt = sg.Checkpointer(store, keep=sg.Keep(last=1), handle_signals=False)
    ckpt.save(_state(), 0)  # the session is recorded at the first save (it lists the run)
    store.faults["list"] = store.calls["list"] + 1
    handle = ckpt.save_async(_state(), 1)
    assert handle is not None
    handle.result()
    with pytest.raises(sg.StorageError, match="committed"):
        ckpt.wait()
    ckpt.close()


@pytest.mark.parametrize(("point", "nth"), [("list", 1), ("list", 2), ("lock", 1)])
def test_opening_a_run_on_a_failing_store_raises_storage_error(point: str, nth: int) -> None:
    with pytest.raises(sg.StorageError) as info:
        sg.Checkpointer(FaultyStore(MemoryStore(), {point: nth}), handle_signals=False)
    assert info.value.path is not None


def test_restore_on_a_failing_listing_raises_storage_error() -> None:
    store = FaultyStore(MemoryStore(), {})
    ckpt = sg.Checkpointer(store, handle_signals=False)
    try:
        store.faults["list"] = store.calls["list"] + 1
        with pytest.raises(sg.StorageError):
            ckpt.restore(_state())
    finally:
        ckpt.close()


def test_an_io_error_reading_run_json_is_not_called_damage() -> None:
    inner = MemoryStore()
    sg.Checkpointer(inner, handle_signals=False).close()  # writes run.json
    with pytest.raises(sg.CheckpointError) as info:
        sg.Checkpointer(FaultyStore(inner, {"open": 1}), handle_signals=False)
    assert not isinstance(info.value, sg.FormatError)
    assert "damaged" not in str(info.value)


# ---- savegame.open on what the Checkpointer returns ---------------------------------------------


def test_open_reads_the_location_a_memory_run_returns() -> None:
    ckpt = sg.Checkpointer(MemoryStore(), handle_signals=False)
    try:
        where = ckpt.save(_state(), 1)
        assert isinstance(sg.load(where), dict)  # works
        with sg.open(where) as r:
            assert r.keys() == ["extras/w"]
    finally:
        ckpt.close()


# ---- the store contract: keys that docs/storage.md says are refused -------------------------------


@pytest.mark.parametrize("name", ["../outside", "/abs/outside"])
def test_lock_names_are_checked_like_keys(tmp_path: Path, name: str) -> None:
    (tmp_path / "run").mkdir()
    store = LocalStore(tmp_path / "run")
    with pytest.raises(ValueError):
        store.lock(name.replace("/abs", str(tmp_path)))


def test_the_store_root_cannot_be_detached_or_renamed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "run")
    store.makedirs()
    with pytest.raises(ValueError):
        store.detach("", "elsewhere")
    assert (tmp_path / "run").is_dir() and not (tmp_path / "elsewhere").exists()
    mem = MemoryStore()
    with pytest.raises(ValueError):
        mem.rename("", "sub")
    assert mem.list("") == []


# ---- savegame.open(path, format=...) --------------------------------------------------------------


def test_format_torch_on_a_folder_is_a_typed_error() -> None:
    with pytest.raises(sg.CheckpointError):
        sg.open(SAVEGAME_V1, format="torch")


def test_format_torchscript_does_not_call_a_safetensors_file_torchscript() -> None:
    with pytest.raises(sg.UnsupportedFormatError) as info:
        sg.open(SAFETENSORS, format="torchscript")
    assert "is a TorchScript archive" not in str(info.value)


def test_format_numpy_on_a_torch_zip_is_refused() -> None:
    with pytest.raises(sg.FormatError):
        r: Any = sg.open(TUTORIAL, format="numpy")
        r.close()


def test_every_golden_file_opens_through_open_and_follows_the_reader_lifecycle() -> None:
    """What worked: every golden format through savegame.open (works today)."""
    paths = [
        TUTORIAL,
        GOLDEN / "foreign" / "torch" / "legacy.pt",
        SAFETENSORS,
        GOLDEN / "foreign" / "torch" / "arrays.npz",
        GOLDEN / "foreign" / "tensorflow" / "tf1" / "model.ckpt-3",
        GOLDEN / "foreign" / "tensorflow" / "tfkeras",
        GOLDEN / "foreign" / "keras" / "cnn.h5",
        GOLDEN / "foreign" / "keras" / "cnn.keras",
        SAVEGAME_V1,
    ]
    for p in paths:
        r = sg.open(p, isolate=False)
        assert isinstance(r, sg.Reader)
        key = r.keys()[0]
        r.read(key)
        r.close()
        r.close()
        with pytest.raises(sg.ReaderClosedError):
            r.read(key)
        with pytest.raises(sg.ReaderClosedError):
            r.keys()


# ---- the CLI ------------------------------------------------------------------------------------


def test_ls_of_a_file_says_it_is_not_a_run_folder(capsys: pytest.CaptureFixture[str]) -> None:
    from savegame.cli.main import main

    assert main(["ls", os.fspath(SAFETENSORS)]) == 2
    assert "does not exist" not in capsys.readouterr().err
