"""savegame: exact, crash-safe checkpoint and resume for deep-learning training, and safe
readers for every checkpoint format. See README.md for the tour."""

from savegame import data
from savegame.api import convert, diff, load, open, save
from savegame.checkpointer import EXIT_PREEMPTED, Checkpointer, CheckpointInfo
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
    MissingDependencyError,
    RestoreError,
    StepExistsError,
    StorageError,
    UnsafeContentError,
    UnsupportedFormatError,
)
from savegame.policy import Every, Keep, regime
from savegame.state import Stateful, TrainState

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
