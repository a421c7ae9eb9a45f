"""savegame: exact, crash-safe checkpoint and resume for deep-learning training, and safe
readers for every checkpoint format. See README.md for the tour."""

import importlib as _importlib
import typing as _typing

from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointWarning,
    DistributedSaveError,
    EncodeError,
    FormatError,
    IncompleteCheckpointError,
    IntegrityError,
    LockedError,
    LossyConversionWarning,
    MissingDependencyError,
    RestoreError,
    StepExistsError,
    StorageError,
    UnsafeContentError,
    UnsupportedFormatError,
)
from savegame.policy import Every, Keep, regime

if _typing.TYPE_CHECKING:
    from savegame import data
    from savegame.api import convert, diff, load, open, save
    from savegame.checkpointer import EXIT_PREEMPTED, Checkpointer, CheckpointInfo
    from savegame.state import Stateful, TrainState

# Names whose modules import torch are loaded on first use (PEP 562), so that `import savegame`,
# `savegame --version` and the readers of foreign files (numpy only) do not pay torch's ~1 s
# import (issue 9.18). `from savegame import *` and attribute access behave as before.
_LAZY = {
    "EXIT_PREEMPTED": "savegame.checkpointer",
    "CheckpointInfo": "savegame.checkpointer",
    "Checkpointer": "savegame.checkpointer",
    "Stateful": "savegame.state",
    "TrainState": "savegame.state",
    "convert": "savegame.api",
    "diff": "savegame.api",
    "load": "savegame.api",
    "open": "savegame.api",
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
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Checkpointer",
    "CorruptCheckpointWarning",
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
    "RestoreError",
    "Stateful",
    "StepExistsError",
    "StorageError",
    "TrainState",
    "UnsafeContentError",
    "UnsupportedFormatError",
    "__version__",
    "convert",
    "data",
    "diff",
    "load",
    "open",
    "regime",
    "save",
]
