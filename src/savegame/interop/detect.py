"""Recognise a checkpoint's format from its bytes and open it with the right reader.

Key invariant: the format is decided by magic bytes and container structure (FORMATS.md §0),
never by the file name — except Darknet ``.weights``, which has no magic and is recognised by
its suffix (or an explicit ``cfg=``). Readers are imported lazily, so a broken or missing
reader module only affects its own format.
"""

from __future__ import annotations

import builtins
import importlib
import os
import re
import struct
from typing import Any

from savegame import errors
from savegame.interop import _zip, base

__all__ = ["FORMATS", "detect", "open"]

# format -> (module, opener). Read-only to callers; keys are what detect() returns.
FORMATS: dict[str, tuple[str, str]] = {
    "torch": ("savegame.interop.torch_pickle", "open_torch"),
    "safetensors": ("savegame.interop.safetensors", "open_safetensors"),
    "numpy": ("savegame.interop.numpy", "open_numpy"),
    "tensorflow": ("savegame.interop.tensorflow", "open_tensorflow"),
    "keras-h5": ("savegame.interop.keras", "open_keras"),
    "keras3": ("savegame.interop.keras", "open_keras"),
    "darknet": ("savegame.interop.darknet", "open_darknet"),
}
_FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "cfg": ("darknet",),
    "partial": ("darknet",),
    "listing": ("torch",),
    "isolate": ("keras-h5", "keras3"),
    "isolate_timeout": ("keras-h5", "keras3"),
}
_SUPPORTED = (
    "torch (.pt/.pth/.bin, zip or legacy), safetensors, numpy (.npy/.npz), TensorFlow "
    "(prefix, .index, .data-NNNNN-of-NNNNN or folder with a 'checkpoint' file), Keras "
    "(.h5/.weights.h5/.keras), "
    "Darknet (.weights with cfg=), savegame checkpoint folders"
)
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
LEGACY_TORCH_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")
TF_INDEX_MAGIC = bytes.fromhex("57fb808b247547db")
NPY_MAGIC = b"\x93NUMPY"
# A TF data shard names its bundle: P.data-00000-of-00001 -> P (FORMATS.md §3.1).
TF_SHARD_RE = re.compile(r"\.data-\d{5,}-of-\d{5,}$")


def _unknown(path: str, why: str = "") -> errors.UnsupportedFormatError:
    return errors.UnsupportedFormatError(
        f"{path}: unrecognised checkpoint format{why}. Supported: {_SUPPORTED}", path=path
    )


def _zip_format(f: Any, path: str, size: int) -> str:
    members = _zip.read_directory(f, path, size)
    names = [m.name for m in members]
    if not names:
        raise _unknown(path, " (empty zip)")
    prefix = names[0].split("/", 1)[0] + "/"
    inner = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    if "constants.pkl" in inner or ".data/version" in inner and "data.pkl" not in inner:
        return "torchscript"
    if "data.pkl" in inner:
        return "torch"
    top = set(names)
    if "config.json" in top and ({"model.weights.h5", "model.weights.npz"} & top):
        return "keras3"
    if any(n.endswith(".npy") for n in names):
        return "numpy"
    raise _unknown(path, " (a zip holding neither torch, Keras nor .npy members)")


def detect(path: str | os.PathLike[str]) -> str:
    """Name the format at ``path``: one of :data:`FORMATS`, ``"savegame"`` or ``"torchscript"``.

    Args:
        path: A file, a TensorFlow prefix (``ckpt-1`` for ``ckpt-1.index``) or data shard
            (``ckpt-1.data-00000-of-00001``), or a folder (savegame checkpoint with
            ``manifest.json``, or TensorFlow folder with ``checkpoint``).

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsupportedFormatError: bytes match no supported format (message lists them).
        FormatError: the file is empty, a safetensors header length runs past the end of the
            file, or a container (zip) is damaged.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "manifest.json")):
            return "savegame"
        if os.path.isfile(os.path.join(p, "checkpoint")):
            return "tensorflow"
        raise _unknown(p, " (a folder without manifest.json or a TensorFlow 'checkpoint' file)")
    if not os.path.exists(p):
        if os.path.isfile(p + ".index"):
            return "tensorflow"
        raise errors.CheckpointNotFoundError(f"{p} does not exist", path=p)
    shard = TF_SHARD_RE.search(p)
    if shard and os.path.isfile(p[: shard.start()] + ".index"):
        return "tensorflow"  # the bundle's data is only readable through its index
    size = os.path.getsize(p)
    if size == 0 and os.path.isfile(p):
        raise errors.FormatError(
            f"{p} is empty (0 bytes): there is nothing to read; an interrupted download or "
            "copy? Fetch the file again",
            path=p,
        )
    truncated_safetensors = 0
    with builtins.open(p, "rb") as f:  # this module defines its own open() below
        head = f.read(16)
        # HDF5's superblock may sit at 0, 512, 1024, 2048, ... (FORMATS.md §0).
        off = 0
        while off + 8 <= size:
            f.seek(off)
            if f.read(8) == HDF5_MAGIC:
                return "keras-h5"
            off = 512 if off == 0 else off * 2
        if head.startswith(b"PK\x03\x04"):
            return _zip_format(f, p, size)
        if head.startswith(LEGACY_TORCH_MAGIC):
            return "torch"
        if head.startswith(NPY_MAGIC):
            return "numpy"
        if len(head) >= 9 and head[8:9] in (b"{", b" "):
            (n,) = struct.unpack_from("<Q", head)
            if 8 + n <= size:
                return "safetensors"
            if head[8:9] == b"{":
                truncated_safetensors = n
        if size >= 48:
            f.seek(size - 8)
            if f.read(8) == TF_INDEX_MAGIC:
                return "tensorflow"
    if p.endswith(".weights"):
        return "darknet"
    if truncated_safetensors:
        # The first 8 bytes are a header length and the header starts with '{': safetensors
        # whose header (or the file) was cut. Say so instead of "unrecognised".
        raise errors.FormatError(
            f"{p}: safetensors header length {truncated_safetensors} runs past the end of the "
            f"{size}-byte file (truncated, or not a safetensors file); fetch the file again",
            path=p,
        )
    if size < 16:
        raise _unknown(p, f" (only {size} bytes: too short for any checkpoint; truncated?)")
    raise _unknown(p)


def open(path: str | os.PathLike[str], **options: Any) -> base.ForeignReader:  # noqa: A001
    """Detect the format of ``path`` and open it with its reader.

    Args:
        path: As for :func:`detect`.
        **options: Passed to the reader's ``open_*`` function (``cfg=`` for Darknet,
            ``listing=True`` for torch files with unknown globals, ``isolate=True`` to read a
            Keras/HDF5 file in a child process first; each is ignored by other formats).

    Raises:
        UnsupportedFormatError: unknown format, TorchScript, a savegame folder (use
            ``savegame.open``), Darknet without ``cfg=``, or a reader module that is missing.
    """
    p = os.fspath(path)
    cfg = options.get("cfg")
    try:
        fmt = detect(p)
    except errors.UnsupportedFormatError:
        if cfg is None:
            raise
        fmt = "darknet"  # Darknet has no magic: an explicit cfg= is the signal
    if fmt == "savegame":
        raise errors.UnsupportedFormatError(
            f"{p} is a savegame checkpoint folder; open it with savegame.open()", path=p
        )
    if fmt == "torchscript":
        raise errors.UnsupportedFormatError(
            f"{p} is a TorchScript archive (torch.jit.save): it contains code and savegame does not "
            "read it. Save the model's state_dict() with torch.save instead",
            path=p,
        )
    if fmt == "darknet" and cfg is None:
        raise errors.UnsupportedFormatError(
            f"{p} looks like a Darknet .weights file, which has no names or shapes; pass the "
            "network's .cfg as cfg=... to open it",
            path=p,
        )
    # Options meant for one format are dropped for the others, so a caller (the CLI) can pass
    # what it wants for any file: cfg= (darknet), listing= (torch), isolate= (Keras/libhdf5).
    for option, formats in _FORMAT_OPTIONS.items():
        if fmt not in formats:
            options.pop(option, None)
    module, func = FORMATS[fmt]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise errors.MissingDependencyError(
                f"reading {fmt} files needs the package {exc.name!r}; install it (pip install "
                f"'savegame[{fmt.split('-')[0].replace('keras3', 'keras')}]')",
                path=p,
            ) from exc
        raise errors.UnsupportedFormatError(
            f"{p} is a {fmt} file but this savegame build has no {fmt} reader ({module} is missing)",
            path=p,
        ) from exc
    opener = getattr(mod, func, None)
    if opener is None:
        raise errors.UnsupportedFormatError(
            f"{p} is a {fmt} file but {module} has no {func}(); the {fmt} reader is incomplete",
            path=p,
        )
    reader: base.ForeignReader = opener(p, **options)
    return reader
