"""Which files make a TensorFlow checkpoint: prefix, ``.index``, ``.data-*`` and the pointer file.

A bundle is ``P.index`` plus ``P.data-SSSSS-of-NNNNN`` shards; a folder written by
``tf.train.CheckpointManager`` or ``Saver`` names its latest prefix in a ``checkpoint`` file
(``CheckpointState`` in protobuf text format, FORMATS.md §3.1). :func:`resolve` turns any of
these paths into the prefix; :func:`sniff` is detection's cheap look.

Key invariant: the pointer file is parsed as data, capped at ``_MAX_POINTER_BYTES``, and may
only name a checkpoint inside its own folder (symlinks and ``..`` resolved first, FORMATS.md
§3.6); a pointer that escapes raises :class:`savegame.errors.UnsafeContentError`.
"""

from __future__ import annotations

import os
import re

from savegame import errors
from savegame.interop.tensorflow import proto, table

__all__ = ["resolve", "sniff"]

_POINTER_FILE = "checkpoint"
_MAX_POINTER_BYTES = 1 << 20
_SHARD_RE = re.compile(r"\.data-\d{5,}-of-\d{5,}$")


def sniff(path: str | os.PathLike[str]) -> bool:
    """Cheap detection: is ``path`` a TF checkpoint this module can try to open?

    True for a ``.index`` file (or any file) whose last 8 bytes are the SSTable magic, a prefix
    whose ``<prefix>.index`` has it, and a folder holding a ``checkpoint`` pointer file. Never
    raises for I/O problems (returns False); reads at most 8 bytes.
    """
    p = os.fspath(path)
    try:
        if os.path.isdir(p):
            return os.path.isfile(os.path.join(p, _POINTER_FILE))
        for cand in (p, p + ".index"):
            if os.path.isfile(cand) and os.path.getsize(cand) >= table.FOOTER_BYTES:
                with open(cand, "rb") as f:
                    f.seek(-8, os.SEEK_END)
                    if table.is_index_tail(f.read(8)):
                        return True
    except OSError:
        return False
    return False


def _inside(root: str, target: str) -> bool:
    return os.path.commonpath([root, target]) == root and target != root


def _prefix_from_folder(folder: str) -> tuple[str, proto.CheckpointState]:
    pointer = os.path.join(folder, _POINTER_FILE)
    try:
        with open(pointer, "rb") as f:
            raw = f.read(min(os.fstat(f.fileno()).st_size, _MAX_POINTER_BYTES + 1))
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(
            f"{folder} has no '{_POINTER_FILE}' file; pass the checkpoint prefix "
            "(e.g. .../ckpt-1) or its .index file instead",
            path=folder,
        ) from exc
    except OSError as exc:
        raise errors.StorageError(f"cannot read {pointer}: {exc}", path=pointer) from exc
    if len(raw) > _MAX_POINTER_BYTES:
        raise errors.FormatError(
            f"{pointer} is larger than {_MAX_POINTER_BYTES} bytes", path=pointer
        )
    if not raw:
        raise errors.FormatError(
            f"{pointer} is empty (0 bytes): it names no checkpoint; pass the checkpoint prefix "
            "(e.g. .../ckpt-1) or its .index file instead",
            path=pointer,
        )
    try:
        state = proto.parse_checkpoint_state(raw.decode("utf-8"))
    except (UnicodeDecodeError, proto.ProtoError) as exc:
        raise errors.FormatError(
            f"{pointer} is not a valid CheckpointState text file: {exc}", path=pointer
        ) from exc
    target = state.model_checkpoint_path
    if not target or "\x00" in target:
        raise errors.FormatError(f"{pointer}: model_checkpoint_path is empty", path=pointer)
    root = os.path.realpath(folder)
    # Resolve symlinks and '..' before comparing: the pointer may only name a checkpoint in its
    # own folder (FORMATS.md §3.6). TF1 writes absolute paths by default; those are accepted
    # only when they still point inside this folder.
    resolved = os.path.realpath(target if os.path.isabs(target) else os.path.join(root, target))
    if not _inside(root, resolved):
        raise errors.UnsafeContentError(
            f"{pointer} points to {target!r}, outside {root}; savegame only follows pointers "
            f"inside the folder. Open the checkpoint prefix directly (e.g. "
            f"{os.path.join(folder, os.path.basename(target))!r}) if that is what you want",
            path=pointer,
        )
    return resolved, state


def resolve(p: str) -> tuple[str, proto.CheckpointState | None]:
    """The bundle prefix that ``p`` names, and the pointer file's state if one was followed.

    ``p`` is a prefix, its ``.index`` or a ``.data-*`` file, a folder holding a ``checkpoint``
    pointer file, or that pointer file. Only the pointer file is read here; whether the
    ``.index`` exists is for the reader to find out.

    Raises:
        savegame.errors.CheckpointNotFoundError: A folder without a pointer file.
        savegame.errors.FormatError: A corrupt pointer file (``UnsafeContentError`` when it
            leaves its folder); ``UnsupportedFormatError`` for a Saver V1 file.
    """
    state: proto.CheckpointState | None = None
    if os.path.isdir(p):
        prefix, state = _prefix_from_folder(p)
    elif os.path.basename(p) == _POINTER_FILE and os.path.isfile(p):
        prefix, state = _prefix_from_folder(os.path.dirname(p) or ".")
    elif p.endswith(".index"):
        prefix = p[: -len(".index")]
    elif _SHARD_RE.search(p):
        prefix = _SHARD_RE.sub("", p)
    else:
        prefix = p
        if not os.path.exists(p + ".index") and os.path.isfile(p) and sniff(p):
            # A single SSTable file that is not a bundle index: the pre-2017 Saver V1 format
            # (SavedTensorSlices), which has a different entry layout.
            raise errors.UnsupportedFormatError(
                f"{p} is a TensorFlow Saver V1 checkpoint (one SSTable file, no .index); "
                "savegame reads only the V2 tensor-bundle format: re-save it with "
                "tf.compat.v1.train.Saver() in TF >= 1.2 (the default writes V2)",
                path=p,
            )
    return prefix, state
