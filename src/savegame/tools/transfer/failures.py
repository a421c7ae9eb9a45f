"""What a failed transfer step means: retry it (with backoff), start the file over, or give up
with a typed error naming the object (credentials redacted).

Invariant: only network and server hiccups are retried; a missing object, a refusal, a full
disk or a change of the source never is (:func:`retryable`).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import BinaryIO

from savegame import errors
from savegame.storage import base, urls
from savegame.tools import transfer


class Restart(Exception):
    """A file must be transferred again from its first byte (the source changed, or the
    server answered a ranged GET with the whole object)."""


class NoRanges(Exception):
    """The server answered a ranged GET with the whole object: fetch the file as one stream."""


# A full disk, a quota, a read-only or forbidden destination: retrying cannot help.
_FINAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def retryable(exc: BaseException) -> bool:
    """A failure worth another attempt: a network or server hiccup, not a missing object, a
    refusal, a change of the source, or a bug."""
    if isinstance(
        exc,
        (
            FileNotFoundError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            errors.CredentialsError,
            errors.AccessDeniedError,
            errors.UnsupportedURLError,
            errors.LockedError,
            base.ChangedError,
            base.RangeNotSupportedError,
        ),
    ):
        return False
    if isinstance(exc, OSError) and exc.errno in _FINAL_ERRNOS:
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def unsatisfiable(exc: BaseException) -> bool:
    """An HTTP 416 (the range starts past the end): the server's file is shorter than the
    one opened (a server without ETags can change it unseen). Matched on the message: the
    store reports it as a plain I/O error."""
    text = str(exc).lower()
    return "416" in text or "not satisfiable" in text


def sleep(failures: int) -> None:
    """Back off after ``failures + 1`` failures in a row (the package's ``BACKOFF`` doubled per
    failure, capped at ``BACKOFF_MAX``; both read at call time)."""
    time.sleep(min(transfer.BACKOFF * (2**failures), transfer.BACKOFF_MAX))


def storage_error(what: str, exc: BaseException, where: str) -> errors.StorageError:
    """A typed error naming ``where`` (credentials redacted), of the same kind as ``exc``
    where that is already a savegame storage error (missing credentials, access denied)."""
    cls: Callable[..., errors.StorageError] = errors.StorageError
    if isinstance(exc, errors.StorageError):
        cls = type(exc)
    elif isinstance(exc, PermissionError):
        cls = errors.AccessDeniedError
    detail = urls.redact_text(str(exc))
    # A store's own errors usually name the object already: say it once.
    return cls(f"{what}: {detail}" if where in detail else f"{what} {where}: {detail}", path=where)


def write_all(f: BinaryIO, view: memoryview) -> None:
    """Write all of ``view`` to ``f``; a write that makes no progress is an OSError."""
    while view:
        n = f.write(view)
        if n is None or n <= 0:
            raise OSError(f"write to {getattr(f, 'name', 'the destination')} made no progress")
        view = view[n:]
