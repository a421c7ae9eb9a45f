"""Move runs between stores: :func:`push` and :func:`pull`, resumable and verified (断点续传).

Key invariants:

- **Nothing partial is ever visible in the destination.** Each checkpoint goes through the
  destination store's commit: ``begin`` a staging area, ``Staging.write`` every data file,
  then the manifest last with ``Staging.commit``. A transfer killed at any point leaves the
  destination's committed checkpoints as they were, plus a staging area no listing shows.
- **No byte is committed unverified.** Every byte is hashed as it streams through (the same
  per-chunk and per-file hashes as :func:`savegame.engine.reader.verify`) and its size checked
  before the manifest is written. A source whose manifest lies about sizes or hashes raises
  :class:`~savegame.errors.IntegrityError` naming the file, and nothing of that checkpoint is
  committed.
- **Re-running resumes.** A checkpoint already in the destination with the same manifest bytes
  that verifies is skipped. Inside a checkpoint, files a killed run already staged and that
  verify are kept. A pull from a remote store into a local folder downloads each file into
  ``<staging>/<file>.part`` next to a small ``<file>.part.json`` (the source's ETag and size,
  and for a file fetched as parallel ranges the bytes written of each range); a later run
  continues it with ranged GETs from where each stopped, unless the source's ETag changed
  (or it has none) — then that file starts over. Within one run, a connection cut mid-file
  keeps the bytes received and continues from there with backoff.
- **Uploads resume at file granularity.** obstore has no public API to resume one multipart
  upload from another process, so a push killed mid-file uploads that file again; files it had
  already finished (and that verify) are not uploaded again.
- **Memory is bounded**: at most ``workers`` blocks of :data:`BLOCK` bytes in flight; no file
  is ever held whole.

Which checkpoints move: every committed, valid one (newest first, so the most useful one is
safe soonest if the transfer is cut), or those named by ``steps``, or the one a source URL or
path ending in ``step-…`` names. ``run.json`` is copied so the destination keeps the run's id,
then ``LATEST`` (a hint) last. A destination that already holds *another* run (a different run
id) is refused before anything is written; a step the destination holds with *different*
valid content is refused (:class:`~savegame.errors.StepExistsError`); a destination checkpoint
that is incomplete or damaged is taken out of view and replaced by the source's bytes.

The package's parts, in the order they are used: :mod:`.runner` (one transfer: what to move,
each checkpoint through the commit, ``run.json`` and ``LATEST``), :mod:`.files` (one file into
the staging area), :mod:`.download` (a source file through cut connections, and the resumable
``.part`` files), :mod:`.check` (the hashes on the fly), :mod:`.endpoints` (the two stores, the
byte counters, small retried reads and writes), :mod:`.failures` (retry, start over or give
up), :mod:`.progress` (the bar). The knobs below are read by those parts at call time, from
this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from savegame.storage import Location, Store
from savegame.tools.transfer import runner

__all__ = ["TransferReport", "pull", "push"]

#: Bytes per streamed block (one per worker in flight: the memory bound).
BLOCK = 8 << 20
#: Files moved at once.
WORKERS = 4
#: Failed attempts in a row (no new byte between them) before a file's transfer gives up.
RETRIES = 6
#: First backoff delay in seconds; doubles per failure in a row, capped at :data:`BACKOFF_MAX`.
BACKOFF = 0.25
BACKOFF_MAX = 8.0
#: Files over this size are downloaded into a local folder as parallel ranges of this size,
#: each its own resumable part file (memory: at most WORKERS x WORKERS blocks in flight).
SPLIT = 64 << 20
#: Times one file may start over (its source changed, or the server ignored ``Range``).
RESTARTS = 3


@dataclass(frozen=True, slots=True)
class TransferReport:
    """What a :func:`push` or :func:`pull` did.

    Attributes:
        source: Where the run came from (credentials redacted).
        dest: Where it went (credentials redacted).
        copied: Steps committed in the destination by this transfer, in the order moved.
        skipped: Steps the destination already held, identical and verified.
        bytes_moved: Bytes read from the source (every attempt counted, so a cut connection's
            retries show here; manifests and ``run.json`` included).
        bytes_skipped: Bytes not moved because the destination already held them verified
            (skipped checkpoints, and staged files or ``.part`` prefixes of an earlier run).
        ignored: Source steps that were never committed (no manifest: a save in progress, or
            a killed writer's leftovers on an object store): not checkpoints, not moved.
        problems: Source checkpoints that could not be moved because they are damaged in the
            source (their manifest does not parse or verify), each with the reason.
    """

    source: str
    dest: str
    copied: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    bytes_moved: int = 0
    bytes_skipped: int = 0
    ignored: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        """True when every checkpoint of the source is in the destination and verified (the
        CLI exits 0 only then)."""
        return not self.problems


def push(
    src: str | os.PathLike[str] | Store | Location,
    dst: str | os.PathLike[str] | Store,
    *,
    steps: Iterable[int] | None = None,
    progress: bool | None = None,
) -> TransferReport:
    """Copy a run (or one checkpoint) from ``src`` to the run folder ``dst``, verified.

    Resumable by re-running: checkpoints already in ``dst`` (same manifest, verified) are
    skipped, and so are files a killed push had finished; a file cut by a kill is uploaded
    again from its start (obstore cannot resume a multipart upload across processes).

    Args:
        src: A run folder or one checkpoint (``…/step-000000001200``): a path, a URL
            (``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``) or a Store.
        dst: The destination run folder: a path, a URL or a Store. Created if absent.
        steps: Only these steps (default: every committed, valid checkpoint).
        progress: Show a progress bar (bytes, rate, ETA) on stderr; default: when stderr is a
            terminal.

    Returns:
        What was copied and skipped; ``report.verified`` is True when everything is.

    Raises:
        CheckpointNotFoundError: ``src`` does not exist, holds no committed checkpoint, or a
            requested step is not in it.
        IntegrityError: a source file does not match its manifest (named in the message;
            nothing of that checkpoint is committed, the others are moved first).
        StepExistsError: ``dst`` holds the same step with different valid content.
        CheckpointError: ``dst`` holds another run (a different run id).
        StorageError: a store failed (after retries for network errors); re-run to resume.

    Example:
        >>> report = push("runs/exp1", "s3://bucket/runs/exp1")  # doctest: +SKIP
        >>> report.verified  # doctest: +SKIP
        True
    """
    return runner.Transfer(src, dst, steps, progress).run()


def pull(
    src: str | os.PathLike[str] | Store | Location,
    dst: str | os.PathLike[str] | Store,
    *,
    steps: Iterable[int] | None = None,
    progress: bool | None = None,
) -> TransferReport:
    """Copy a run (or one checkpoint) from a remote ``src`` into the run folder ``dst``.

    The same operation as :func:`push` seen from the other side (the arguments and the result
    are the same). Into a local folder, each file is downloaded into ``<file>.part`` inside the
    checkpoint's staging area and a re-run continues it with a ranged GET (断点续传); a source
    file whose ETag changed, or a server that ignores ``Range``, makes that file start over.
    Each ``.part`` is hashed (as it arrives, or read back once after parallel ranges) and,
    once it verifies, moved into place before the manifest commits.

    Raises:
        The same errors as :func:`push`.

    Example:
        >>> report = pull("https://host/runs/exp1", "runs/exp1")  # doctest: +SKIP
    """
    return runner.Transfer(src, dst, steps, progress).run()
