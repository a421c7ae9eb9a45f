"""All public exceptions and warnings of savegame.

Hierarchy::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(.., FileNotFoundError)   nothing at the path / no such step
    ├── StepExistsError(.., FileExistsError)             a committed step would be overwritten
    ├── FormatError(.., ValueError)                      corrupt, lying or out-of-bounds data
    │   ├── IntegrityError                               a hash or size does not match
    │   ├── IncompleteCheckpointError                    no manifest / interrupted save
    │   ├── UnsupportedFormatError                       unknown format or future version
    │   └── UnsafeContentError                           a pickle asks for a disallowed global
    ├── EncodeError(.., TypeError)                       a state leaf cannot be saved without pickle
    ├── StorageError(.., OSError)                        the storage backend failed
    │   ├── LockedError                                  another writer holds the run folder
    │   ├── UnsupportedURLError(.., ValueError)          a URL scheme savegame cannot reach
    │   ├── CredentialsError                             no (or invalid) credentials for a store
    │   └── AccessDeniedError(.., PermissionError)       the store refused the request
    ├── MissingDependencyError(.., ImportError)          an optional extra is not installed
    ├── DistributedSaveError                             one or more ranks failed; ``.failures``
    └── RestoreError                                     no valid checkpoint could be applied

Every error carries its facts as attributes (``.path``, ``.step``, ``.key``) so code never
parses messages; messages say what failed, where, and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = [
    "AccessDeniedError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointWarning",
    "CredentialsError",
    "DistributedSaveError",
    "EncodeError",
    "FormatError",
    "IncompleteCheckpointError",
    "IntegrityError",
    "LockedError",
    "LossyConversionWarning",
    "MissingDependencyError",
    "ReaderClosedError",
    "RestoreError",
    "StepExistsError",
    "StorageError",
    "UnsafeContentError",
    "UnsupportedFormatError",
    "UnsupportedURLError",
]


def _fmt_path(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    try:
        return os.fspath(path)
    except TypeError:  # a checkpoint in a store that is not a local folder: its description
        return str(path)


# Unicode categories shown escaped: Cc (C0, DEL, C1 controls), Cf (format: bidi overrides and
# isolates, zero-width characters), Cs (surrogates: undecodable bytes of a file name, which
# could not even be encoded for the terminal), Co (private use), Zl/Zp (line/paragraph
# separators, which break a line like "\n").
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def _visible(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape: the original byte
        return f"\\x{o - 0xDC00:02x}"
    if o <= 0xFF:
        return f"\\x{o:02x}"
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def escaped(s: str) -> str:
    """``s`` with every invisible or terminal-controlling character (escape sequences, newlines,
    NUL, bidi controls, lone surrogates) shown as its ``\\x1b``-style escape; the command
    line's literal printing (``savegame.cli._text``) and :func:`quoted` both use it."""
    if s.isprintable():  # the common case: nothing to do (space is printable, "\\t" is not)
        return s
    import unicodedata

    return "".join(_visible(c) if c != " " and unicodedata.category(c) in _HIDDEN else c for c in s)


#: The most characters of one string from a file that a message quotes (see :func:`quoted`).
QUOTED_MAX = 200


def quoted(value: object, limit: int = QUOTED_MAX) -> str:
    """``value`` as a message may quote it when it comes from a file or a remote object (a lease
    holder, a run id, a rule): at most ``limit`` characters (the rest counted), with
    :func:`escaped` applied, so that an error message can neither drive a terminal nor grow
    without bound.

    Example:
        >>> quoted("a\\x1b[2Jb")
        'a\\\\x1b[2Jb'
    """
    s = value if isinstance(value, str) else str(value)
    more = len(s) - limit
    s = escaped(s[:limit] if more > 0 else s)
    return s + (f"… ({more} more characters)" if more > 0 else "")


class CheckpointError(Exception):
    """Root of every savegame error.

    Args:
        message: What failed, on which object, and what to do.
        path: The file or folder concerned, if any.
        step: The checkpoint step concerned, if any.
        key: The state-tree path or tensor name concerned, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = _fmt_path(path)
        self.step = step
        self.key = key

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Errors cross process boundaries (distributed gather); keep attributes.
        return (_rebuild, (type(self), self.message, self.path, self.step, self.key))


def _rebuild(
    cls: type[CheckpointError], message: str, path: str | None, step: int | None, key: str | None
) -> CheckpointError:
    err = cls.__new__(cls)
    CheckpointError.__init__(err, message, path=path, step=step, key=key)
    return err


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path holds no checkpoint, or the requested step does not exist."""


class StepExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint for this step already exists and would be overwritten."""


class FormatError(CheckpointError, ValueError):
    """Bytes on disk are corrupt, inconsistent or outside the file's bounds."""


class IntegrityError(FormatError):
    """A stored hash or size does not match the data (bit rot, truncation, tampering)."""


class IncompleteCheckpointError(FormatError):
    """The checkpoint was never committed (no manifest: an interrupted save)."""


class UnsupportedFormatError(FormatError):
    """The file is of an unknown format, or of a savegame version newer than this library."""


class UnsafeContentError(FormatError):
    """The file asks for something savegame refuses to do: a pickle global outside the
    allow-list, an HDF5 external link or plugin filter, a zip bomb. Nothing was executed."""


class ReaderClosedError(CheckpointError, ValueError):
    """A reader was used after ``close()`` (like I/O on a closed file, a ValueError)."""


class EncodeError(CheckpointError, TypeError):
    """A leaf of the state tree cannot be stored without pickle."""


class StorageError(CheckpointError, OSError):
    """The storage backend failed (disk full, permission denied, network error)."""


class _LeaseBroken(StorageError):
    """Another process opened a file for writing (or is truncating it) while a restore read it
    through a memory mapping (storage/local.py). The reader then reads that checkpoint again
    without mapping it, every hash checked; users see it only if that read fails too."""


class LockedError(StorageError):
    """Another live process holds the writer lock on the run folder."""


class UnsupportedURLError(StorageError, ValueError):
    """A URL whose scheme savegame cannot reach (the message lists the supported ones)."""


class CredentialsError(StorageError):
    """A remote store needs credentials that are missing or invalid (the message names the
    environment variables or config to set; it never prints a secret)."""


class AccessDeniedError(StorageError, PermissionError):
    """The remote store refused the request (HTTP 403): the credentials lack a permission."""


class MissingDependencyError(CheckpointError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RestoreError(CheckpointError):
    """Checkpoints exist but none could be restored (all corrupt, or the state does not fit)."""


class DistributedSaveError(CheckpointError):
    """A distributed save failed on one or more ranks.

    The message says what is on disk: almost always nothing was committed and earlier
    checkpoints are intact; if a rank died after every rank reported and the coordinator had
    already committed, the message says that the step *is* committed (and verifies).

    Attributes:
        failures: Rank -> description of what failed on that rank.
    """

    def __init__(
        self,
        message: str,
        *,
        failures: Mapping[int, str] | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, path=path, step=step)
        self.failures: dict[int, str] = dict(failures or {})

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            _rebuild_dist,
            (self.message, self.failures, self.path, self.step),
        )


def _rebuild_dist(
    message: str, failures: dict[int, str], path: str | None, step: int | None
) -> DistributedSaveError:
    return DistributedSaveError(message, failures=failures, path=path, step=step)


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint was skipped during restore because it is corrupt or incomplete."""


class LossyConversionWarning(UserWarning):
    """A conversion wrote what the target format can hold and left the rest out.

    ``.left_out`` maps each tensor name that is not in the output to the reason (e.g. a
    TensorFlow string tensor converted to safetensors, which holds only numbers).
    """

    def __init__(self, message: str, left_out: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.left_out: dict[str, str] = dict(left_out or {})
