"""Convert any readable checkpoint to safetensors, a weights-only torch file, or savegame.

Key invariant: names, dtypes and values are kept exactly (bit for bit), and ``dst`` appears
atomically — written under a temporary name in the same folder, fsynced, then ``os.replace``d —
so a crash never leaves a half-written ``dst``. An existing ``dst`` is never overwritten unless
``overwrite=True``; a failed conversion removes the folders it created for ``dst``.

String tensors (TensorFlow ``DT_STRING``, e.g. the ``_CHECKPOINTABLE_OBJECT_GRAPH`` every TF2
checkpoint holds) are kept as ``bytes`` (nested lists of ``bytes`` for non-scalars) in torch and
savegame outputs, and left out of safetensors, which holds only numbers: a
:class:`~savegame.errors.LossyConversionWarning` names them (``.left_out``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from savegame import errors
from savegame.interop import base, detect

__all__ = ["convert", "make_parents", "remove_created"]

# torch dtype -> safetensors dtype string (FORMATS.md §2).
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
for _n, _s in (
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
):
    if isinstance(_d := getattr(torch, _n, None), torch.dtype):
        _ST_DTYPES[_d] = _s


_STRING = "string"  # TensorInfo.dtype of string tensors (base.TensorInfo)


def open_any(src: str | os.PathLike[str], cfg: str | os.PathLike[str] | None = None, **options: Any) -> Any:
    """Open ``src`` with the matching reader, savegame folders included (``options`` as for
    :func:`savegame.interop.detect.open`)."""
    p = os.fspath(src)
    if detect.detect(p) == "savegame":
        import savegame  # lazy: the top-level API imports the engine, which interop must not

        return savegame.open(p)
    if cfg is not None:
        options["cfg"] = cfg
    return detect.open(p, **options)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Literal["safetensors", "torch", "savegame"],
    cfg: str | os.PathLike[str] | None = None,
    partial: bool = False,
    overwrite: bool = False,
    isolate: bool = False,
) -> Path:
    """Convert the checkpoint at ``src`` into ``dst``.

    Args:
        src: Any readable checkpoint (see :func:`savegame.interop.detect.detect`).
        dst: Output file (safetensors, torch) or folder (savegame).
        to: Output format. ``"torch"`` writes a flat ``{name: tensor}`` dict that loads with
            torch's weights-only loader (``weights_only=True``). ``"savegame"`` keeps a torch file's object
            structure (epoch, optimizer state, ...) and uses a top-level int ``step``,
            ``global_step`` or ``epoch`` as the step.
        cfg: Darknet ``.cfg`` when ``src`` is a ``.weights`` file.
        partial: Accept a darknet ``.weights`` file that holds fewer layers than its cfg (a
            backbone such as ``darknet53.conv.74``); only the layers present are converted.
        overwrite: Replace an existing ``dst``.
        isolate: Read a Keras/HDF5 ``src`` in a child process first (untrusted files; see
            :func:`savegame.interop.keras.open_keras`).

    Returns:
        The path written.

    Warns:
        LossyConversionWarning: string tensors were left out of a safetensors ``dst``
            (``.left_out`` names them); torch and savegame outputs keep them as ``bytes``.

    Raises:
        StepExistsError: ``dst`` exists and ``overwrite`` is False.
        UnsupportedFormatError: a numeric dtype the target cannot hold, a safetensors target
            for a checkpoint that holds only strings, or an unknown ``to``.
    """
    out = Path(dst)
    if to not in ("safetensors", "torch", "savegame"):
        raise errors.UnsupportedFormatError(
            f"cannot convert to {to!r}; choose 'safetensors', 'torch' or 'savegame'", path=out
        )
    if out.exists() and not overwrite:
        raise errors.StepExistsError(
            f"{out} already exists; pass overwrite=True (--overwrite) to replace it", path=out
        )
    created = make_parents(out.parent)
    left_out: dict[str, str] = {}
    try:
        with open_any(src, cfg, isolate=isolate, partial=partial) as reader:
            if to == "safetensors":
                left_out = {
                    n: "a string tensor; safetensors holds only numeric tensors (convert to "
                    "'torch' or 'savegame' to keep it)"
                    for n in reader.keys()
                    if reader.info(n).dtype == _STRING
                }
                if left_out and len(left_out) == len(reader.keys()):
                    raise errors.UnsupportedFormatError(
                        f"{reader.path}: nothing to convert to safetensors: every tensor is a "
                        f"string ({', '.join(map(repr, sorted(left_out)))}), which safetensors "
                        "cannot hold; convert to 'torch' or 'savegame', which keep strings",
                        path=reader.path,
                    )
                _atomic_file(out, lambda f: _write_safetensors(reader, f, skip=left_out))
            elif to == "torch":
                _atomic_file(out, lambda f: torch.save(_flat(reader, empty=bytearray), f))
            else:
                _write_savegame(reader, out, overwrite)
    except BaseException:
        remove_created(created)
        raise
    if left_out:
        warnings.warn(
            errors.LossyConversionWarning(
                f"{out}: left out {len(left_out)} string tensor(s) that safetensors cannot hold: "
                f"{', '.join(sorted(left_out))}",
                left_out,
            ),
            stacklevel=2,
        )
    return out


def make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_created(created: list[Path]) -> None:
    """Undo :func:`make_parents` after a failure: only folders we created, only while empty
    (another process may have put something there meanwhile)."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return


def _tensor(reader: Any, name: str) -> torch.Tensor:
    t = reader.read(name)
    if isinstance(t, np.ndarray):
        raise errors.UnsupportedFormatError(
            f"{reader.path}: tensor {name!r} has dtype {t.dtype} (strings?), which the target "
            "format cannot hold",
            path=reader.path,
            key=name,
        )
    return t.detach().contiguous()


def _strings(reader: Any, name: str, empty: Callable[[], Any]) -> Any:
    """A string tensor as ``bytes`` (scalar) or nested lists of ``bytes``, losslessly.

    ``empty`` makes the value of an empty string: ``bytearray`` for torch files, whose
    weights-only loader refuses ``bytes()`` (pickled as a call to ``builtins.bytes``) but
    accepts ``bytearray()``, which compares equal to ``b""``."""
    read_strings = getattr(reader, "read_strings", None)
    # read_strings keeps trailing NULs that numpy's fixed-width arrays (read()) strip.
    value = read_strings(name) if read_strings is not None else reader.read(name).tolist()

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        return bytes(v) if v else empty()

    return fix(value)


def _flat(reader: Any, empty: Callable[[], Any] = bytes) -> dict[str, Any]:
    """``{name: tensor}`` of every tensor; string tensors as :func:`_strings`."""
    return {
        name: _strings(reader, name, empty) if reader.info(name).dtype == _STRING else _tensor(reader, name)
        for name in reader.keys()
    }


def _write_safetensors(reader: Any, f: BinaryIO, skip: Mapping[str, str]) -> None:
    """Stream tensors into a safetensors file: memory holds one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    names = [n for n in reader.keys() if n not in skip]
    for name in names:
        info: base.TensorInfo = reader.info(name)
        dt = getattr(torch, info.dtype, None)
        if not isinstance(dt, torch.dtype) or dt not in _ST_DTYPES:
            raise errors.UnsupportedFormatError(
                f"{reader.path}: tensor {name!r} has dtype {info.dtype}, which safetensors cannot hold",
                path=reader.path,
                key=name,
            )
        n = 1
        for d in info.shape:
            n *= d
        nbytes = n * dt.itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dt],
            "shape": list(info.shape),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer pads to 8 (FORMATS.md §2)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name in names:
        t = _tensor(reader, name)
        want = header[name]
        if list(t.shape) != want["shape"] or _ST_DTYPES.get(t.dtype) != want["dtype"]:
            raise errors.FormatError(
                f"{reader.path}: tensor {name!r} read back differently from its info()",
                path=reader.path,
                key=name,
            )
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _step_of(tree: Any) -> int:
    if isinstance(tree, dict):
        for k in ("step", "global_step", "epoch"):
            v = tree.get(k)
            if type(v) is int and v >= 0:
                return v
    return 0


def _materialize(v: Any, reader: Any) -> Any:
    if isinstance(v, base.TensorRef):
        return _tensor(reader, v.name)
    if isinstance(v, dict):
        return {k: _materialize(x, reader) for k, x in v.items()}
    if isinstance(v, list):
        return [_materialize(x, reader) for x in v]
    if isinstance(v, tuple):
        return tuple(_materialize(x, reader) for x in v)
    return v


def _write_savegame(reader: Any, out: Path, overwrite: bool) -> None:
    import savegame  # lazy: savegame.save is the core writer (owned by the API layer)

    if reader.format in ("torch", "savegame"):  # formats with an object structure keep it
        tree = _materialize(reader.tree(), reader)
    else:
        tree = _flat(reader)
    if not isinstance(tree, dict):
        tree = {"value": tree}
    # savegame.save itself appears atomically; for overwrite we save beside dst and swap.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    meta = reader.metadata() if reader.format == "savegame" else {}
    savegame.save(tmp, tree, step=meta.get("step", _step_of(tree)), metrics=meta.get("metrics"))
    if out.exists() and overwrite:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


@contextmanager
def _temp_beside(out: Path) -> Iterator[tuple[BinaryIO, str]]:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the output is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


def _atomic_file(out: Path, write: Callable[[BinaryIO], None]) -> None:
    with _temp_beside(out) as (f, tmp):
        write(f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds (Windows)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
