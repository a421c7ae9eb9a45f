"""The boundary between savegame and :mod:`~savegame.interop.keras.h5index`: the isolation
child process, its answer, and h5index's :class:`~savegame.interop.keras.h5index.Problem` as
savegame's typed errors.

Key invariant: libhdf5 only ever sees an untrusted Keras file inside a child Python that loads
``h5index.py`` by file path (so ``import savegame`` and torch never run there), reads the file
through the descriptor this process opened, dies with its parent and is killed past its
timeout. Whatever the child does (crash, hang, garbage on stdout) becomes a
:class:`~savegame.errors.FormatError` here; its answer is parsed as bounded data, never
trusted to be well formed.

The answer is one frame on the child's stdout: an 8-byte little-endian length, that many bytes
of JSON (the index, or ``{"error": kind, ...}``), then the bytes of each dataset the child read
through libhdf5, in entry order, each ``entry["inline"]`` bytes long.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from savegame import errors
from savegame.interop import base
from savegame.interop.keras import h5index

__all__ = [
    "PROBLEM_TYPES",
    "import_h5py",
    "isolated_index",
    "limits",
    "need_h5py",
    "parse_json",
    "typed_errors",
]

PROBLEM_TYPES: dict[str, type[errors.CheckpointError]] = {
    "format": errors.FormatError,
    "unsafe": errors.UnsafeContentError,
    "unsupported": errors.UnsupportedFormatError,
}


def _typed(exc: h5index.Problem, path: str) -> errors.CheckpointError:
    return PROBLEM_TYPES[exc.kind](exc.msg, path=path, key=exc.key)


@contextmanager
def typed_errors(path: str) -> Iterator[None]:
    """Problems from :mod:`h5index` (and stray h5py errors) become typed savegame errors."""
    try:
        with h5index.as_problem(path, "cannot read the HDF5 file"):
            yield
    except h5index.Problem as exc:
        raise _typed(exc, path) from exc.__cause__


def parse_json(raw: bytes | str, *, what: str, path: str) -> Any:
    """Parse JSON text as plain data (dicts, lists, str, numbers); never builds objects."""
    try:
        return h5index.parse_json(raw, what=what, path=path, max_depth=base.LIMITS.max_json_depth)
    except h5index.Problem as exc:
        raise _typed(exc, path) from exc.__cause__


def limits() -> dict[str, int]:
    """The caps of :data:`savegame.interop.base.LIMITS` that h5index enforces, as plain data."""
    lim = base.LIMITS
    return {
        "max_entries": lim.max_entries,
        "max_tensor_numel": lim.max_tensor_numel,
        "max_inflate_ratio": lim.max_inflate_ratio,
        "max_json_depth": lim.max_json_depth,
    }


def import_h5py() -> Any:
    """h5py for in-process reading (``isolate=False``)."""
    try:
        import h5py
    except ImportError as exc:
        raise errors.MissingDependencyError(
            "reading Keras HDF5 files needs h5py; install it with `pip install savegame[keras]`"
        ) from exc
    return h5py


def need_h5py(path: str) -> None:
    """Fail here, not in the child, when h5py is missing (cheap: finds, does not import)."""
    try:
        found = importlib.util.find_spec("h5py") is not None
    except (ValueError, ImportError):
        found = False
    if not found:
        raise errors.MissingDependencyError(
            f"reading Keras HDF5 files ({path}) needs h5py; install it with "
            "`pip install savegame[keras]`",
            path=path,
        )


# The child imports only h5index (by file path, so `import savegame` and torch never run),
# with this process's sys.path so that it finds the same numpy and h5py. -I -S: no user site,
# no environment-driven imports, no .pth processing (start-up ~10 ms).
_CHILD_CODE = (
    "import sys, json, importlib.util as u\n"
    "sys.path[:0] = json.loads(sys.argv[1])\n"
    "s = u.spec_from_file_location('_savegame_h5index', sys.argv[2])\n"
    "m = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m.child_main(sys.argv[3:])\n"
)


def isolated_index(
    path: str, raw: io.BufferedReader, start: int, size: int, what: str, timeout: float
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Index ``path`` in a child process that reads it through ``raw``'s descriptor.

    Args:
        path: The file, for messages.
        raw: The file, open; the child reads its descriptor, not the path.
        start: Where the HDF5 bytes begin (a zip member's offset, else 0).
        size: How many bytes they span.
        what: Names the HDF5 part in messages (``"the file"``, ``"model.weights.h5"``).
        timeout: Seconds before the child is killed and the file refused.

    Returns:
        The index (plain data, see ``h5index.Indexer.run``) and the bytes of the datasets the
        child read for us, by tensor name.
    """
    fd = raw.fileno()
    if fd > 2:
        return _run_child(path, fd, start, size, what, timeout)
    # A process started with stdio closed can get the file as fd 0-2, which the child's own
    # stdio would shadow: hand the child a duplicate numbered 3 or above.
    import fcntl

    dup = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    try:
        return _run_child(path, dup, start, size, what, timeout)
    finally:
        os.close(dup)


def _run_child(
    path: str, fd: int, start: int, size: int, what: str, timeout: float
) -> tuple[dict[str, Any], dict[str, bytes]]:
    opts = json.dumps({"limits": limits(), "what": what})
    cmd = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _CHILD_CODE,
        json.dumps([p for p in sys.path if p]),
        h5index.__file__,
        str(os.getpid()),
        str(fd),
        str(start),
        str(size),
        path,
        opts,
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
        )
    except (OSError, ValueError) as exc:  # ValueError: no pass_fds (Windows)
        raise errors.FormatError(
            f"{path}: cannot start the isolated HDF5 reader ({exc}); open it with isolate=False "
            "only if you trust the file",
            path=path,
        ) from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise errors.FormatError(
            f"{path}: reading it in an isolated process took more than {timeout} s; refusing "
            "(a hang inside libhdf5 on a malformed file?). Raise isolate_timeout for huge files",
            path=path,
        ) from exc
    except BaseException:
        proc.kill()  # KeyboardInterrupt and the like: never leave the child behind
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        if proc.returncode < 0:
            why = f"libhdf5 crashed (signal {-proc.returncode})"
        else:
            why = f"the isolated reader failed (exit status {proc.returncode})"
        raise errors.FormatError(
            f"{path}: {why} while parsing the file; it is corrupt or malicious, refusing it. "
            f"Child said: {' | '.join(tail) or '(nothing)'}",
            path=path,
        )
    return _decode_frame(path, out)


def _decode_frame(path: str, out: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    def broken(why: str) -> errors.FormatError:
        return errors.FormatError(
            f"{path}: the isolated HDF5 reader sent a malformed answer ({why})", path=path
        )

    if len(out) < 8:
        raise broken("too short")
    (n,) = struct.unpack_from("<Q", out)
    if 8 + n > len(out):
        raise broken("truncated")
    try:
        doc = json.loads(out[8 : 8 + n])
    except ValueError as exc:
        raise broken("not JSON") from exc
    if "error" in doc:
        kind = doc["error"]
        if kind == "import":
            raise errors.MissingDependencyError(
                f"the isolated reader for {path} could not import h5py ({sys.executable}); "
                "install savegame[keras] into that interpreter",
                path=path,
            )
        cls = PROBLEM_TYPES.get(kind, errors.FormatError)
        raise cls(str(doc.get("msg")), path=path, key=doc.get("key"))
    blobs: dict[str, bytes] = {}
    pos = 8 + n
    for name, entry in doc["entries"].items():
        length = entry.pop("inline", None)
        if length is None:
            if entry["raw"] is None and entry["nbytes"] and "inline_error" not in entry:
                raise broken(f"no bytes for {name!r}")
            continue
        if length != entry["nbytes"] or pos + length > len(out):
            raise broken(f"bytes of {name!r}")
        blobs[name] = out[pos : pos + length]
        pos += length
    if pos != len(out):
        raise broken("trailing bytes")
    return doc, blobs
