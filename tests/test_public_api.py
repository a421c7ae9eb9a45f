from __future__ import annotations

import importlib

import savegame


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 / isort style: CONSTANTS, then Classes, then everything else.
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted_and_unique() -> None:
    assert list(savegame.__all__) == sorted(savegame.__all__, key=_isort_key)
    assert len(set(savegame.__all__)) == len(savegame.__all__)


def test_every_name_in_all_is_importable() -> None:
    for name in savegame.__all__:
        assert getattr(savegame, name) is not None
    ns: dict[str, object] = {}
    exec("from savegame import *", ns)  # noqa: S102 - the star-import contract itself
    assert set(savegame.__all__) <= set(ns)


def test_all_is_complete() -> None:
    data = savegame.data  # loaded on first use (PEP 562): load it before looking at the namespace
    public = {
        name
        for name, value in vars(savegame).items()
        if not name.startswith("_")
        and not (hasattr(value, "__spec__") and value is not data)
    }
    # everything public at the top level (except submodules other than data) is exported
    assert public <= set(savegame.__all__), sorted(public - set(savegame.__all__))


def test_every_public_error_is_exported_and_derives_from_the_root() -> None:
    errors = importlib.import_module("savegame.errors")
    for name in errors.__all__:
        assert name in savegame.__all__
        obj = getattr(savegame, name)
        if issubclass(obj, Warning):  # CorruptCheckpointWarning, LossyConversionWarning
            assert issubclass(obj, UserWarning)
        else:
            assert issubclass(obj, savegame.CheckpointError) and issubclass(obj, Exception)


def test_exit_preempted_is_75() -> None:
    assert savegame.EXIT_PREEMPTED == 75


def test_import_savegame_does_not_import_torch() -> None:
    """`savegame --version` and the foreign-file readers must not pay torch's import (issue 9.18)."""
    import subprocess
    import sys

    code = "import sys, savegame; print('torch' in sys.modules); savegame.Checkpointer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]
