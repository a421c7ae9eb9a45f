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
        if not name.startswith("_") and not (hasattr(value, "__spec__") and value is not data)
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
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False", "True"]


def test_the_types_public_calls_return_are_exported() -> None:
    """httpx's rule (STYLE §10.5): every type a public call returns can be named from savegame."""
    from savegame import api, errors
    from savegame.engine import persist
    from savegame.interop import base, detect

    for name in (
        "DiffResult",
        "Reader",
        "ReaderClosedError",
        "SaveHandle",
        "TensorInfo",
        "register_format",
    ):
        assert name in savegame.__all__, name
    assert savegame.Reader is base.Reader
    assert savegame.TensorInfo is base.TensorInfo
    assert savegame.SaveHandle is persist.SaveHandle
    assert savegame.ReaderClosedError is errors.ReaderClosedError
    assert issubclass(savegame.ReaderClosedError, ValueError)
    assert savegame.register_format is detect.register_format
    assert savegame.DiffResult is importlib.import_module("savegame.tools.diff").DiffResult
    assert (
        savegame.CheckpointInfo is importlib.import_module("savegame.checkpointer").CheckpointInfo
    )
    # savegame's own reader follows the same contract as the foreign ones
    assert issubclass(api.SavegameReader, savegame.Reader)


def test_open_is_typed_to_return_a_reader() -> None:
    import typing

    hints = typing.get_type_hints(savegame.open)
    assert hints["return"] is savegame.Reader
    assert hints["format"] == (str | None)


def test_convert_and_diff_live_in_tools() -> None:
    assert savegame.convert is importlib.import_module("savegame.tools.convert").convert
    assert savegame.diff is importlib.import_module("savegame.tools.diff").diff
    api = importlib.import_module("savegame.api")
    assert not hasattr(api, "convert") and not hasattr(api, "diff")


def test_public_types_and_open_do_not_import_torch() -> None:
    """Naming the reader types and registering a format must stay as cheap as `import savegame`."""
    import subprocess
    import sys

    code = (
        "import sys, savegame; savegame.Reader, savegame.TensorInfo, savegame.SaveHandle; "
        "savegame.ReaderClosedError, savegame.register_format, savegame.open; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False"]
