"""Convert any readable checkpoint to safetensors, a weights-only torch file, or savegame.

Key invariant: names, dtypes and values are kept exactly (bit for bit), and ``dst`` appears
atomically — written under a temporary name in the same folder, fsynced, then renamed over (by
:mod:`savegame.storage.files`) — so a crash never leaves a half-written ``dst``. An existing
``dst`` is never overwritten unless ``overwrite=True``; a failed conversion removes the folders
it created for ``dst``.

String tensors (TensorFlow ``DT_STRING``, e.g. the ``_CHECKPOINTABLE_OBJECT_GRAPH`` every TF2
checkpoint holds) are kept as ``bytes`` (nested lists of ``bytes`` for non-scalars) in torch and
savegame outputs, and left out of safetensors, which holds only numbers: a
:class:`~savegame.errors.LossyConversionWarning` names them (``.left_out``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from savegame import api, errors
from savegame.checkpointer import runfile
from savegame.format import layout, tensors
from savegame.interop import base
from savegame.storage import files
from savegame.tools._source import candidates, open_any

__all__ = ["convert"]

_STRING = "string"  # TensorInfo.dtype of string tensors (base.TensorInfo)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Literal["savegame", "safetensors", "torch"],
    cfg: str | os.PathLike[str] | None = None,
    partial: bool = False,
    overwrite: bool = False,
    isolate: bool = True,
) -> Path:
    """Convert any readable checkpoint into a savegame folder, a safetensors file or a
    weights-only torch file, keeping names, dtypes and values bit for bit.

    ``src`` may be a run folder: its newest checkpoint is used, or if that one turns out to be
    damaged, the one before it (with a :class:`CorruptCheckpointWarning`). A checkpoint written by
    several ranks is first consolidated into one rank (sharded tensors reassembled whole; see
    :func:`savegame.distributed.consolidate`), so the output is what an inference user needs.
    ``dst`` appears atomically or not at all; an existing ``dst`` is kept unless ``overwrite``.
    A Keras/HDF5 ``src`` is parsed in a child process (``isolate=False``: in this process, for
    trusted files only).
    ``partial=True`` accepts a darknet ``.weights`` file holding fewer layers than its ``cfg``.
    String tensors (TensorFlow) are kept as ``bytes`` in torch and savegame outputs and left
    out of safetensors with a :class:`LossyConversionWarning` naming them.

    Raises:
        StepExistsError: ``dst`` exists and ``overwrite`` is False.
        UnsupportedFormatError: unknown ``to``, or a tensor the target cannot hold.
        FormatError, IntegrityError: ``src`` is damaged.
    """
    found = candidates(src)
    for i, ckpt in enumerate(found):
        try:
            return _convert_one(
                ckpt,
                Path(dst),
                to=to,
                cfg=cfg,
                partial=partial,
                overwrite=overwrite,
                isolate=isolate,
            )
        except errors.FormatError as exc:  # damaged (every byte is verified while converting)
            if i + 1 == len(found):
                raise
            warnings.warn(
                f"skipping checkpoint {ckpt}: {exc}; converting the one before it",
                errors.CorruptCheckpointWarning,
                stacklevel=2,
            )
    raise AssertionError("unreachable: candidates() never returns an empty list")


def _convert_one(
    src: str | os.PathLike[str],
    out: Path,
    *,
    to: str,
    cfg: Any,
    partial: bool,
    overwrite: bool,
    isolate: bool,
) -> Path:
    from savegame.engine import reader

    if not (reader.is_checkpoint_dir(src) and reader.read_manifest(src).world_size > 1):
        return _convert_checkpoint(
            src, out, to=to, cfg=cfg, partial=partial, overwrite=overwrite, isolate=isolate
        )
    from savegame.distributed import consolidate

    _check_target(out, overwrite, to)
    created = files.make_parents(out.parent)  # removed again if the conversion fails
    try:
        with _run_held(out), files.temp_dir_beside(out) as tmp:
            single = consolidate(src, tmp / "single")
            if to == "savegame" and not out.exists():
                # consolidate committed it; the rename is the publish step
                files.publish_dir(Path(single), out)
                return out
            return _convert_checkpoint(single, out, to=to, overwrite=overwrite)
    except BaseException:
        files.remove_created(created)
        raise


def _convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    cfg: str | os.PathLike[str] | None = None,
    partial: bool = False,
    overwrite: bool = False,
    isolate: bool = False,
) -> Path:
    """Convert the one checkpoint at ``src`` (a file, or a single-rank savegame folder) into
    ``dst`` (a file for safetensors and torch, a folder for savegame).

    ``"torch"`` writes a flat ``{name: tensor}`` dict that loads with torch's weights-only
    loader (``weights_only=True``). ``"savegame"`` keeps a torch file's object structure (epoch,
    optimizer state, ...) and uses a top-level int ``step``, ``global_step`` or ``epoch`` as the
    step.

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
    _check_target(out, overwrite, to)
    created = files.make_parents(out.parent)
    left_out: dict[str, str] = {}
    try:
        with _run_held(out), open_any(src, cfg, isolate=isolate, partial=partial) as reader:
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
                _publish(out, lambda f: _write_safetensors(reader, f, skip=left_out))
            elif to == "torch":
                _publish(out, lambda f: _torch_save(_flat(reader, empty=bytearray), f))
            else:
                _write_savegame(reader, out, overwrite)
    except BaseException:
        files.remove_created(created)
        raise
    if left_out:
        warnings.warn(
            errors.LossyConversionWarning(
                f"{out}: left out {len(left_out)} string tensor(s) that safetensors cannot hold: "
                f"{', '.join(sorted(left_out))}",
                left_out,
            ),
            stacklevel=4,  # the caller of convert() (convert -> _convert_one -> here)
        )
    return out


def _publish(out: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`files.publish_file`, with a failed write (a full disk, a folder this process may
    not write) a :class:`~savegame.errors.StorageError` naming the output; nothing is left."""
    try:
        files.publish_file(out, write)
    except errors.CheckpointError:
        raise
    except OSError as exc:
        cls = errors.AccessDeniedError if isinstance(exc, PermissionError) else errors.StorageError
        reason = exc.strerror or str(exc)
        raise cls(f"could not write {out}: {reason}; nothing was written", path=out) from exc


def _torch_save(obj: object, f: BinaryIO) -> None:
    try:
        torch.save(obj, f)
    except RuntimeError as exc:
        # torch's zip writer reports a write that failed (a full disk) as a RuntimeError
        # ("unexpected pos …", "file write failed"): it is the output's, not a bug
        raise OSError(f"torch.save could not write the file ({str(exc).strip()[:200]})") from exc


def _check_target(out: Path, overwrite: bool, to: str) -> None:
    """Refuse an output that exists (unless ``overwrite``), and with ``overwrite`` one that is
    not a single file or checkpoint: a whole run folder, the folder the caller works in, or a
    folder where the output is one file (safetensors, torch)."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise errors.StepExistsError(
            f"{out} already exists; pass overwrite=True (--overwrite) to replace it", path=out
        )
    if runfile.is_run(out):
        raise errors.StepExistsError(
            f"{out} is a run folder (its checkpoints and run.json): overwrite replaces one file "
            "or one checkpoint, never a whole run. Convert into another path, or delete the run "
            "yourself first",
            path=out,
        )
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise errors.StepExistsError(
            f"{out} is the current folder (or holds it): it cannot be replaced; convert into "
            "another path",
            path=out,
        )
    if to != "savegame" and out.is_dir():
        raise errors.StepExistsError(
            f"{out} is a folder, and a {to} output is one file: overwrite replaces a file with a "
            f"file, never a folder (a checkpoint's) with a file; give a file path such as "
            f"{out.name}.{'safetensors' if to == 'safetensors' else 'pt'}",
            path=out,
        )


@contextmanager
def _run_held(out: Path) -> Iterator[None]:
    """While writing a checkpoint into a run folder (``RUN/step-…``): hold that run's lock, so a
    live training's checkpoints are never changed under it (``LockedError`` names the holder).
    Any other name (an export beside the checkpoints) leaves the run alone: no lock."""
    if layout.parse_step_dir(out.name) is None or not runfile.is_run(out.parent):
        yield
        return
    lock = runfile.run_lock(out.parent)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _tensor(reader: base.Reader, name: str) -> torch.Tensor:
    t = reader.read(name)
    if isinstance(t, np.ndarray):
        raise errors.UnsupportedFormatError(
            f"{reader.path}: tensor {name!r} has dtype {t.dtype} (strings?), which the target "
            "format cannot hold",
            path=reader.path,
            key=name,
        )
    return t.detach().contiguous()


def _strings(reader: base.Reader, name: str, empty: Callable[[], Any]) -> Any:
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


def _flat(reader: base.Reader, empty: Callable[[], Any] = bytes) -> dict[str, Any]:
    """``{name: tensor}`` of every tensor; string tensors as :func:`_strings`."""
    return {
        name: _strings(reader, name, empty)
        if reader.info(name).dtype == _STRING
        else _tensor(reader, name)
        for name in reader.keys()
    }


def _write_safetensors(reader: base.Reader, f: BinaryIO, skip: Mapping[str, str]) -> None:
    """Stream tensors into a safetensors file: memory holds one tensor at a time.

    Keeps the reader's tensor order and pads the header to 8 bytes, as the reference writer
    does (FORMATS.md §2)."""
    specs = []
    for name in reader.keys():
        if name in skip:
            continue
        info = reader.info(name)
        if info.dtype not in tensors.TO_SAFETENSORS:
            raise errors.UnsupportedFormatError(
                f"{reader.path}: tensor {name!r} has dtype {info.dtype}, which safetensors cannot hold",
                path=reader.path,
                key=name,
            )
        specs.append(tensors.TensorSpec(name, info.dtype, tuple(info.shape)))

    def stream() -> Iterator[torch.Tensor]:
        for spec in specs:
            t = _tensor(reader, spec.key)
            if tuple(t.shape) != spec.shape or tensors.dtype_name(t.dtype) != spec.dtype:
                raise errors.FormatError(
                    f"{reader.path}: tensor {spec.key!r} read back differently from its info()",
                    path=reader.path,
                    key=spec.key,
                )
            yield t
            del t  # one tensor in memory: drop it before reading the next

    tensors.write_tensor_stream(f, specs, stream(), align=8)


def _step_of(tree: Any, path: str) -> int:
    if isinstance(tree, dict):
        for k in ("step", "global_step", "epoch"):
            v = tree.get(k)
            if type(v) is int and v >= 0:
                if v >= 10**12:  # layout.step_name's bound: a token count, not a step?
                    raise errors.EncodeError(
                        f"{path}: its top-level {k!r} is {v}, beyond the steps a savegame "
                        "checkpoint records ([0, 10**12)); convert it --to safetensors or "
                        "--to torch instead, or save the state with sg.save(..., step=N)"
                    )
                return v
    return 0


def _write_savegame(reader: base.Reader, out: Path, overwrite: bool) -> None:
    if reader.format in ("torch", "savegame"):  # formats with an object structure keep it
        tree = base.materialize(reader.tree(), reader, read=lambda name: _tensor(reader, name))
    else:
        tree = _flat(reader)
    if isinstance(tree, list | tuple):  # a savegame state is a dict: keep the reader's names
        tree = {str(i): v for i, v in enumerate(tree)}  # ("0", "1/0", ...)
    elif not isinstance(tree, dict):  # a bare tensor: the reader calls it "tensor"
        tree = {"tensor" if hasattr(tree, "shape") else "value": tree}
    # api.save itself appears atomically; for overwrite we save beside dst and swap.
    tmp = files.temp_path_beside(out)
    meta = reader.metadata() if reader.format == "savegame" else {}
    step = meta["step"] if "step" in meta else _step_of(tree, reader.path)
    named = layout.parse_step_dir(out.name)
    if named is not None and named != step:  # readers would refuse it as damaged
        raise errors.EncodeError(
            f"{out} is named for step {named}, but {reader.path} holds step {step}: name the "
            f"output {layout.step_dir(step)}, or anything not named step-…",
            path=out,
            step=step,
        )
    api.save(tmp, tree, step=step, metrics=meta.get("metrics"))
    try:
        files.publish_dir(tmp, out, replace=overwrite)
    except BaseException:
        files.discard(tmp)  # never left beside the output (a failed conversion leaves nothing)
        raise
