"""savegame: exact, crash-safe checkpoint and resume for deep-learning training, and safe
readers for every checkpoint format. See README.md for the tour."""

import importlib as _importlib
import typing as _typing

from savegame.errors import (
    AccessDeniedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointWarning,
    CredentialsError,
    DistributedSaveError,
    EncodeError,
    FormatError,
    IncompleteCheckpointError,
    IntegrityError,
    LockedError,
    LossyConversionWarning,
    MissingDependencyError,
    ReaderClosedError,
    RestoreError,
    StepExistsError,
    StorageError,
    UnsafeContentError,
    UnsupportedFormatError,
    UnsupportedURLError,
)
from savegame.policy import Every, Keep, regime

if _typing.TYPE_CHECKING:
    from savegame import data
    from savegame.api import load, open, save
    from savegame.checkpointer import EXIT_PREEMPTED, Checkpointer, CheckpointInfo
    from savegame.checkpointer.tiers import UploadRetry
    from savegame.engine.persist import SaveHandle
    from savegame.interop.base import Reader, TensorInfo
    from savegame.interop.detect import register_format
    from savegame.state import Stateful, TrainState
    from savegame.state.overrides import RestoreReport
    from savegame.tools.convert import convert
    from savegame.tools.diff import DiffResult, diff
    from savegame.tools.transfer import TransferReport, pull, push

# Names whose modules import torch are loaded on first use (PEP 562), so that `import savegame`,
# `savegame --version` and the readers of foreign files (numpy only) do not pay torch's ~1 s
# import (issue 9.18). `from savegame import *` and attribute access behave as before. The
# types public calls return (Reader, TensorInfo, SaveHandle, DiffResult) and register_format
# are lazy too: their modules are cheap, but `import savegame` then reads no module it does
# not need.
_LAZY = {
    "EXIT_PREEMPTED": "savegame.checkpointer",
    "CheckpointInfo": "savegame.checkpointer",
    "Checkpointer": "savegame.checkpointer",
    "DiffResult": "savegame.tools.diff",
    "Reader": "savegame.interop.base",
    "RestoreReport": "savegame.state.overrides",
    "SaveHandle": "savegame.engine.persist",
    "Stateful": "savegame.state",
    "TensorInfo": "savegame.interop.base",
    "TrainState": "savegame.state",
    "TransferReport": "savegame.tools.transfer",
    "UploadRetry": "savegame.checkpointer.tiers",
    "convert": "savegame.tools.convert",
    "diff": "savegame.tools.diff",
    "load": "savegame.api",
    "open": "savegame.api",
    "pull": "savegame.tools.transfer",
    "push": "savegame.tools.transfer",
    "register_format": "savegame.interop.detect",
    "save": "savegame.api",
}


def __getattr__(name: str) -> _typing.Any:
    if name == "data":
        return _importlib.import_module("savegame.data")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'savegame' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "EXIT_PREEMPTED",
    "AccessDeniedError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Checkpointer",
    "CorruptCheckpointWarning",
    "CredentialsError",
    "DiffResult",
    "DistributedSaveError",
    "EncodeError",
    "Every",
    "FormatError",
    "IncompleteCheckpointError",
    "IntegrityError",
    "Keep",
    "LockedError",
    "LossyConversionWarning",
    "MissingDependencyError",
    "Reader",
    "ReaderClosedError",
    "RestoreError",
    "RestoreReport",
    "SaveHandle",
    "Stateful",
    "StepExistsError",
    "StorageError",
    "TensorInfo",
    "TrainState",
    "TransferReport",
    "UnsafeContentError",
    "UnsupportedFormatError",
    "UnsupportedURLError",
    "UploadRetry",
    "__version__",
    "convert",
    "data",
    "diff",
    "load",
    "open",
    "pull",
    "push",
    "regime",
    "register_format",
    "save",
]
