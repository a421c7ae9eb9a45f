"""One file of a checkpoint into the destination's staging area, verified on the way.

Invariants: every byte written is hashed as it passes (:class:`~.check.FileCheck`) and the
file's size checked after the write, so a file that does not match its manifest never reaches
the commit; a file a killed run already staged is kept only when it is known durable and
verifies (:func:`copy_file`).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from savegame import errors
from savegame.format import manifest
from savegame.storage import Staging, base, urls
from savegame.storage import files as storage_files
from savegame.tools import transfer
from savegame.tools.transfer import download, failures
from savegame.tools.transfer.check import FileCheck
from savegame.tools.transfer.endpoints import Endpoints


def copy_file(
    ends: Endpoints,
    key: str,
    name: str,
    m: manifest.Manifest,
    staging: Staging,
    tmp: str,
    final: str,
    parts: bool,
) -> None:
    """Stage file ``name`` of the source checkpoint ``key`` (``parts``: through resumable
    ``.part`` files, for a local destination fed from a remote source)."""
    entry = m.files[name]
    skey = base.join(key, name)
    folder = ends.dst.local_path(tmp)
    via_part = parts and folder is not None and folder.is_dir()
    # A file a killed run staged is kept when it verifies. An object store's object exists
    # once its upload completed; a local file is fsynced once it verified (read from the page
    # cache, it may not be on disk yet: a run killed before Staging.write's fsync), so what
    # was checked is what is kept. A .part beside it is an adopt cut between its link and
    # unlink (or an older run's file): the .part path below settles that. A sidecar left
    # beside a kept file (a kill after adopt) is removed with it.
    if not (via_part and os.path.lexists(folder / (name + download.PART))) and _staged(
        ends, name, m, tmp, final
    ):
        if via_part:  # (a temporary sidecar a kill left is swept before the commit)
            ends.drop(base.join(tmp, name + download.SIDECAR))
        ends.skip(entry.size)
        return
    if via_part:
        _via_part(ends, skey, name, m, staging, tmp)
    else:
        _direct(ends, skey, name, m, staging)


def _staged(ends: Endpoints, name: str, m: manifest.Manifest, tmp: str, final: str) -> bool:
    """A killed transfer already staged ``name`` whole: it verifies, so keep it (in the
    staging folder of a local store; in place under ``final`` on an object store)."""
    entry = m.files[name]
    for where in (base.join(tmp, name), base.join(final, name)):
        try:
            if not ends.dst.exists(where) or ends.dst.size(where) != entry.size:
                continue
            check = FileCheck(m, name, ends.where(ends.dst, where))
            with ends.dst.open(where) as blob:
                for view in blob.stream(0, transfer.BLOCK):
                    check.feed(view)
            check.finish()
            local = ends.dst.local_path(where)
            if local is not None:  # verified from the page cache: make that the disk's
                storage_files.sync_file(local)
            return True
        except (OSError, EOFError, errors.CheckpointError):
            continue
    return False


def _direct(ends: Endpoints, skey: str, name: str, m: manifest.Manifest, staging: Staging) -> None:
    """Stream the source file into the staging area, hashing it on the way; a cut
    connection continues from where it stopped within this call."""
    restart = fails = 0
    while True:
        blob = ends.blob(skey, m, name)
        check = FileCheck(m, name, ends.where(ends.src, skey))

        def produce(f: BinaryIO, blob: base.Blob = blob, check: FileCheck = check) -> None:
            for view in download.stream(ends, blob, skey, 0):
                check.feed(view)
                failures.write_all(f, view)
            check.finish()

        try:
            _, size = staging.write(name, produce, size=m.files[name].size)
        except failures.Restart as exc:
            restart += 1
            if restart > transfer.RESTARTS:
                raise download.unstable(ends, skey, exc) from exc
            continue
        except errors.CheckpointError:
            raise
        except OSError as exc:  # the destination failed: write the file again, or give up
            fails += 1
            if not failures.retryable(exc) or fails >= transfer.RETRIES:
                where = urls.redact(staging.describe(name))
                raise failures.storage_error("could not write", exc, where) from exc
            failures.sleep(fails - 1)
            continue
        finally:
            blob.close()
        _check_size(ends, size, m, name)
        return


def _via_part(
    ends: Endpoints, skey: str, name: str, m: manifest.Manifest, staging: Staging, tmp: str
) -> None:
    """Download into ``<staging>/<name>.part`` (a file over ``SPLIT`` bytes as parallel
    ranges, each at its own offset), resumable across runs; once every byte is hashed and the
    file verifies, it is moved into place by :meth:`Staging.adopt` — no second write of its
    bytes."""
    folder = ends.dst.local_path(tmp)
    assert folder is not None  # checked by the caller
    side = folder / (name + download.SIDECAR)
    retried_whole = False

    def new_check() -> FileCheck:
        return FileCheck(m, name, ends.where(ends.src, skey))

    while True:
        path, resumed, check = download.download(ends, skey, name, m, folder, side, new_check)
        try:
            check.finish()
            if (folder / name).exists():  # a killed adopt left it under both names
                ends.drop(base.join(tmp, name))
            size = staging.adopt(name, path)
        except errors.IntegrityError:
            if resumed and not retried_whole:
                # The kept prefix came from an earlier run; after a power cut an unsynced
                # .part may hold zeros. Fetch the file whole once before blaming the source.
                retried_whole = True
                ends.drop(base.join(tmp, side.name))
                continue
            raise
        except OSError as exc:
            where = urls.redact(staging.describe(name))
            raise failures.storage_error("could not write", exc, where) from exc
        _check_size(ends, size, m, name)
        ends.drop(base.join(tmp, side.name))
        return


def _check_size(ends: Endpoints, size: int, m: manifest.Manifest, name: str) -> None:
    if size != m.files[name].size:
        where = ends.where(ends.dst, name)
        raise errors.StorageError(
            f"{where}: the destination holds {size} bytes after writing "
            f"{m.files[name].size}; nothing was committed — run the transfer again",
            path=where,
            step=m.step,
        )
