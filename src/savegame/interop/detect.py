"""Recognise a checkpoint's format from its bytes and open it with the right reader.

Key invariant: the format is decided by magic bytes and container structure (FORMATS.md §0),
never by the file name — except Darknet ``.weights``, which has no magic and is recognised by
its suffix (or an explicit ``cfg=``). Readers are imported lazily, so a broken or missing
reader module only affects its own format.

The format registry (:data:`FORMATS`, read-only to callers like fsspec's
``known_implementations``) maps each format name to the ``(module, opener)`` that opens it.
:func:`register_format` adds a format (or, with ``clobber=True``, replaces one) without
importing anything; ``open(path, format=name)`` skips detection and opens with that entry.
Detection itself only ever names the built-in formats: a registered format has no magic bytes
savegame knows of, so it is opened by name.
"""

from __future__ import annotations

import builtins
import importlib
import os
import re
import stat
import struct
import types
from collections.abc import Iterable, Mapping
from typing import Any

from savegame import errors
from savegame.interop import _zip, base

__all__ = ["FORMATS", "detect", "open", "register_format"]

# format -> (module, opener); keys are what detect() returns. Mutated only by register_format.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("savegame.interop.torch_pickle", "open_torch"),
    "safetensors": ("savegame.interop.safetensors", "open_safetensors"),
    "numpy": ("savegame.interop.numpy", "open_numpy"),
    "tensorflow": ("savegame.interop.tensorflow", "open_tensorflow"),
    "keras-h5": ("savegame.interop.keras", "open_keras"),
    "keras3": ("savegame.interop.keras", "open_keras"),
    "darknet": ("savegame.interop.darknet", "open_darknet"),
    "torch-export": ("savegame.interop.torch_export", "open_torch_export"),
}
#: The registered formats, read-only: ``{format: (module, opener)}``. Add with
#: :func:`register_format`.
FORMATS: Mapping[str, tuple[str, str]] = types.MappingProxyType(_REGISTRY)
# format -> the keyword options its opener takes. An option some format takes is dropped for the
# formats that do not, so a caller (the CLI) can pass what it wants for any file.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("listing",),
    "darknet": ("cfg", "partial"),
    "keras-h5": ("isolate", "isolate_timeout"),
    "keras3": ("isolate", "isolate_timeout"),
}
_BUILTIN = frozenset(_REGISTRY)
# Names detect() returns that no reader opens (savegame.open reads its own folders; TorchScript
# holds code and is refused), so they cannot be registered.
_RESERVED = frozenset({"savegame", "torchscript"})
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_SUPPORTED = (
    "torch (.pt/.pth/.bin, zip or legacy), torch.export (.pt2), safetensors, numpy (.npy/.npz), TensorFlow "
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


def register_format(
    name: str, module: str, opener: str, *, options: Iterable[str] = (), clobber: bool = False
) -> None:
    """Register the reader of a format, to be opened with ``savegame.open(path, format=name)``.

    Nothing is imported here: ``module`` is imported, and ``module.opener(path, **options)``
    called, on the first open of a file of this format, so a registration costs nothing until
    it is used and a broken module only affects its own format. The opener must return a
    :class:`savegame.Reader`.

    Args:
        name: The format's name: lower case, starting with a letter, then letters, digits,
            ``-`` or ``_`` (at most 64). ``"savegame"`` and ``"torchscript"`` are reserved.
        module: The dotted module path holding the opener (``"mypkg.reader"``).
        opener: The name of the function in ``module`` that opens a path (``"open_mine"``).
        options: Keyword options the opener takes. Options that other formats take (``cfg=``,
            ``listing=``, ``isolate=``, ...) are dropped before calling it unless named here.
        clobber: Replace an existing registration of ``name`` (a built-in format included).

    Raises:
        TypeError: an argument is not a string.
        ValueError: ``name`` is malformed or reserved, ``module``/``opener``/an option is not
            a valid Python name, or ``name`` is registered already and ``clobber`` is False.

    Example:
        >>> register_format("myfmt", "mypkg.reader", "open_mine", options=("strict",))
        >>> FORMATS["myfmt"]
        ('mypkg.reader', 'open_mine')
    """
    opts = (options,) if isinstance(options, str) else tuple(options)
    for what, value in (("name", name), ("module", module), ("opener", opener)):
        if not isinstance(value, str):
            raise TypeError(f"register_format: {what} must be a str, not {type(value).__name__}")
    for opt in opts:
        if not isinstance(opt, str):
            raise TypeError(f"register_format: options must be str, not {type(opt).__name__}")
    if name in _RESERVED:
        raise ValueError(f"format name {name!r} is reserved (savegame's own folders / TorchScript)")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"format name {name!r} is not valid: use lower case letters, digits, '-' and '_', "
            "starting with a letter (at most 64 characters)"
        )
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"format {name!r}: module {module!r} is not a dotted Python module path")
    if not opener.isidentifier():
        raise ValueError(f"format {name!r}: opener {opener!r} is not a Python function name")
    bad = [o for o in opts if not o.isidentifier()]
    if bad:
        raise ValueError(f"format {name!r}: options {bad} are not valid keyword names")
    if name in _REGISTRY and not clobber:
        raise ValueError(
            f"format {name!r} is already registered ({_REGISTRY[name][0]}.{_REGISTRY[name][1]}); "
            "pass clobber=True to replace it"
        )
    _REGISTRY[name] = (module, opener)
    _OPTIONS[name] = opts


def _unknown(path: str, why: str = "") -> errors.UnsupportedFormatError:
    return errors.UnsupportedFormatError(
        f"{path}: unrecognised checkpoint format{why}. Supported: {_SUPPORTED}{_registered()}",
        path=path,
    )


def _registered() -> str:
    """The formats registered beyond the built-in ones, for error messages."""
    extra = sorted(set(_REGISTRY) - _BUILTIN)
    if not extra:
        return ""
    return f"; registered (open with format=...): {', '.join(extra)}"


def _zip_format(f: Any, path: str, size: int) -> str:
    members = _zip.read_directory(f, path, size)
    names = [m.name for m in members]
    if not names:
        raise _unknown(path, " (empty zip)")
    prefix = names[0].split("/", 1)[0] + "/"
    inner = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    if "archive_format" in inner and "data.pkl" not in inner:
        from savegame.interop import torch_export

        if torch_export.is_torch_export(inner):
            return "torch-export"
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


def _is_file(path: str, *, exists: bool = False) -> bool:
    """``os.path.isfile`` (with ``exists``: ``os.path.exists``), except that a folder on the
    way that this user may not enter is an AccessDeniedError, not "does not exist"."""
    try:
        st = os.stat(path)
    except PermissionError as exc:
        raise errors.AccessDeniedError(
            f"{path}: permission denied (a folder on the way is not readable by this user); ask "
            "for read access or copy the checkpoint",
            path=path,
        ) from exc
    except (OSError, ValueError):
        return False
    return exists or stat.S_ISREG(st.st_mode)


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
        if _is_file(os.path.join(p, "manifest.json")):
            return "savegame"
        if _is_file(os.path.join(p, "checkpoint")):
            return "tensorflow"
        raise _unknown(p, " (a folder without manifest.json or a TensorFlow 'checkpoint' file)")
    if not _is_file(p, exists=True):
        if os.path.isfile(p + ".index"):
            return "tensorflow"
        raise errors.CheckpointNotFoundError(f"{p} does not exist", path=p)
    shard = TF_SHARD_RE.search(p)
    if shard and os.path.isfile(p[: shard.start()] + ".index"):
        return "tensorflow"  # the bundle's data is only readable through its index
    if not stat.S_ISREG(os.stat(p).st_mode):
        # A named pipe would block open() until a writer comes, and a pipe's size (0) would make
        # a good file look truncated: refuse both, saying what the file is.
        raise errors.FormatError(
            f"{p} is not a regular file (a pipe, socket or device): savegame reads files it can "
            "seek in; save the bytes to a file first (e.g. `cat > model.pt`) and pass that",
            path=p,
        )
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
        if head.startswith(HDF5_MAGIC):
            return "keras-h5"
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
        # HDF5's superblock may also sit at 512, 1024, 2048, ... after a user block (FORMATS.md
        # §0); looked for only after the magics at offset 0, since a tensor's bytes in a valid
        # .npy or safetensors file may hold the signature there.
        off = 512
        while off + 8 <= size:
            f.seek(off)
            if f.read(8) == HDF5_MAGIC:
                return "keras-h5"
            off *= 2
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


def open(  # noqa: A001 - the module's verb, like savegame.open
    path: str | os.PathLike[str], *, format: str | None = None, **options: Any
) -> base.Reader:
    """Detect the format of ``path`` (or take ``format``) and open it with its reader.

    Args:
        path: As for :func:`detect`.
        format: A name in :data:`FORMATS`: open ``path`` as that format and skip detection
            (how a format added with :func:`register_format` is opened).
        **options: Passed to the reader's ``open_*`` function (``cfg=`` for Darknet,
            ``listing=True`` for torch files with unknown globals, ``isolate=True`` to read a
            Keras/HDF5 file in a child process first; each is ignored by other formats).

    Raises:
        UnsupportedFormatError: unknown format (detected or named), TorchScript, a savegame
            folder (use ``savegame.open``), Darknet without ``cfg=``, or a reader module that
            is missing.
    """
    p = os.fspath(path)
    cfg = options.get("cfg")
    if format is not None:
        fmt = format
        if fmt == "torchscript":  # a verdict of detect(), never a reader to open a file with
            raise errors.UnsupportedFormatError(
                f"{p}: format='torchscript' cannot be read: TorchScript archives (torch.jit.save) "
                "contain code and savegame never reads them",
                path=p,
            )
        if fmt not in _REGISTRY and fmt != "savegame":
            raise errors.UnsupportedFormatError(
                f"{p}: no reader is registered for format {fmt!r}; registered: "
                f"{', '.join(sorted(_REGISTRY))} (and 'savegame' through savegame.open)",
                path=p,
            )
    else:
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
    own = _OPTIONS.get(fmt, ())
    for option in {o for opts in _OPTIONS.values() for o in opts} - set(own):
        options.pop(option, None)
    module, func = _REGISTRY[fmt]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            extra = fmt.split("-")[0].replace("keras3", "keras")
            how = (
                f"pip install 'savegame[{extra}]'"
                if module.startswith("savegame.")
                else "pip install it"
            )
            raise errors.MissingDependencyError(
                f"reading {fmt} files needs the package {exc.name!r}; install it ({how})",
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
    # (A TensorFlow checkpoint is a prefix or a folder: its reader resolves the files itself.)
    if fmt != "tensorflow" and os.path.isdir(p):  # a file reader would raise IsADirectoryError
        raise errors.CheckpointNotFoundError(f"{p} is a folder, not a {fmt} file", path=p)
    reader = opener(p, **options)
    if not isinstance(reader, base.Reader):  # a registered opener broke the contract
        raise TypeError(
            f"the {fmt} opener {module}.{func}() returned {type(reader).__name__}, not a "
            "savegame.Reader; see savegame.register_format"
        )
    return reader
