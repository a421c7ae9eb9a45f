"""Write one checkpoint folder with the commit protocol (DESIGN.md §3).

Order, and why: (1) every rank writes its tensor file into ``<run>/.tmp-step-…-<id>/`` and
fsyncs it; (2) the coordinator writes ``manifest.json`` last and fsyncs it and the temp folder;
(3) the temp folder is renamed to ``step-…`` and the run folder fsynced. A crash before (3)
leaves only a ``.tmp-`` folder, which no reader lists; after (3) the checkpoint is complete.
The manifest is the commit point; ``LATEST`` is written afterwards as a hint only.

Single process = world size 1 through the same functions :func:`write_rank_files` (every rank)
and :func:`commit` (coordinator only).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from savegame import errors
from savegame.format import hashing, layout, manifest, tensors
from savegame.storage import local

__all__ = ["RankResult", "commit", "new_tmp_dir", "set_aside_damaged", "write_checkpoint", "write_rank_files"]

log = logging.getLogger("savegame")


@dataclass(frozen=True, slots=True)
class RankResult:
    """What one rank wrote: returned by :func:`write_rank_files`, gathered by the coordinator."""

    rank: int
    files: dict[str, manifest.FileEntry]
    tensors: dict[str, manifest.TensorEntry]


def new_tmp_dir(root: Path, step: int) -> Path:
    tmp = root / layout.tmp_dir(step, uuid.uuid4().hex[:12])
    tmp.mkdir()
    return tmp


def write_rank_files(
    tmp: Path,
    rank: int,
    items: Mapping[str, torch.Tensor],
    *,
    chunk_meta: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
) -> RankResult:
    """Write this rank's tensors (contiguous CPU) into one safetensors-layout file and fsync it.

    Args:
        tmp: The save's temp folder (shared by all ranks).
        rank: This process's rank.
        items: key -> tensor. Keys are unique across ranks, except chunks of one sharded tensor.
        chunk_meta: For sharded tensors, key -> (global shape, start offsets of this chunk).
    """
    name = layout.tensor_file(rank)
    path = tmp / name
    ordered = tensors.order_for_file(items.items())
    try:
        with open(path, "wb", buffering=0) as f:
            header, written = tensors.write_tensor_file(f, ordered)
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        hint = {
            errno.ENOSPC: "the disk is full; free space or save elsewhere",
            errno.EDQUOT: "the disk quota is exhausted; free space or save elsewhere",
            errno.EFBIG: "the file is over the file-size limit (ulimit -f, or the file system's maximum)",
        }.get(exc.errno or 0, "")
        raise errors.StorageError(
            f"could not write {path}: {exc}{'; ' + hint if hint else ''}; nothing was committed, "
            "earlier checkpoints are intact",
            path=path,
        ) from exc
    # The manifest will promise these bytes: make sure the file on disk holds every one of them
    # before it is written (a short write that went unnoticed must never be committed).
    expected = len(header) + sum(w.length for w in written)
    if size != expected:
        raise errors.StorageError(
            f"could not write {path}: the file has {size} bytes after writing, expected {expected}; "
            "nothing was committed, earlier checkpoints are intact",
            path=path,
        )
    entries: dict[str, manifest.TensorEntry] = {}
    for (key, t), w in zip(ordered, written, strict=True):
        shape = tuple(t.shape)
        gshape, start = (chunk_meta or {}).get(key, (shape, (0,) * len(shape)))
        chunk = manifest.Chunk(name, w.offset, w.length, w.hash, tuple(start), shape)
        entries[key] = manifest.TensorEntry(tensors.dtype_name(t.dtype), tuple(gshape), (chunk,))
    fhash = hashing.file_hash(header, [w.hash for w in written])
    fentry = manifest.FileEntry(size=size, hash=fhash, header_length=len(header), rank=rank)
    return RankResult(rank, {name: fentry}, entries)


def commit(
    root: Path,
    tmp: Path,
    step: int,
    results: Sequence[RankResult],
    *,
    trees: Sequence[Any],
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    final: Path | None = None,
) -> Path:
    """Coordinator only: write the manifest last, then rename the temp folder into place.

    ``final`` defaults to ``root/step-…``; :func:`savegame.save` passes its own folder name.

    Raises:
        StepExistsError: a valid checkpoint for ``step`` is already committed (an invalid one is
            set aside as ``damaged-step-…`` and replaced).
    """
    files: dict[str, manifest.FileEntry] = {}
    entries: dict[str, manifest.TensorEntry] = {}
    for r in sorted(results, key=lambda r: r.rank):
        files.update(r.files)
        for key, e in r.tensors.items():
            if key in entries:  # another chunk of a sharded tensor
                prev = entries[key]
                entries[key] = manifest.TensorEntry(prev.dtype, prev.shape, prev.chunks + e.chunks)
            else:
                entries[key] = e
    m = manifest.Manifest(
        step=step,
        created=time.time(),
        world_size=len(trees),
        run_id=run_id,
        trees=tuple(trees),
        tensors=entries,
        files=files,
        metrics=dict(metrics or {}),
        info=dict(info or {}),
        versions=manifest.Manifest.versions_now(),
    )
    raw = m.to_bytes()
    in_run = final is None
    final = root / layout.step_dir(step) if final is None else final
    try:
        with open(tmp / layout.MANIFEST, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        local.fsync_dir(tmp)
        if final.exists():
            if not in_run:
                raise errors.StepExistsError(f"{final} already exists; choose a new path", path=final, step=step)
            _move_aside_if_invalid(final, step)
        os.rename(tmp, final)
        local.fsync_dir(root)
    except errors.CheckpointError:
        raise
    except OSError as exc:
        raise errors.StorageError(f"could not commit step {step} in {root}: {exc}", path=final, step=step) from exc
    if in_run:
        with contextlib.suppress(errors.StorageError):
            local.atomic_write(root / layout.LATEST, f"{layout.step_dir(step)}\n".encode())
    return final


def _move_aside_if_invalid(final: Path, step: int) -> None:
    """A committed folder is in the way of a new save of ``step``: set it aside if it is damaged
    (it is kept, renamed, for inspection), refuse if it is a valid checkpoint (or one of a
    newer format version)."""
    from savegame.engine import reader  # reader imports nothing from here; avoid a cycle at import

    problems = reader.damage(final)
    if problems:
        set_aside_damaged(final, step, problems[0])
        return
    raise errors.StepExistsError(
        f"step {step} is already committed at {final}; refusing to overwrite it — delete it first "
        "or save under a new step",
        path=final,
        step=step,
    )


def set_aside_damaged(path: Path, step: int, why: object) -> Path:
    """Rename a damaged checkpoint folder to ``damaged-step-…-<id>`` in the same run folder.

    Its bytes are kept for inspection, but under that name no reader lists it, retention never
    counts it, and a new save of its step is never in its way (issue 9.8). Only the writer that
    holds the run folder's lock calls this.
    """
    dest = local.move_to_trash(path, layout.damaged_dir(step, uuid.uuid4().hex[:8]))
    log.warning(
        "set aside damaged checkpoint %s as %s (%s); it is kept for inspection — delete it when done",
        path, dest.name, why,
    )  # fmt: skip
    return dest


def write_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    tree: Any,
    *,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    final: Path | None = None,
) -> Path:
    """World-size-1 save of a state tree: encode, stage to CPU, write, commit."""
    from savegame import tree as treelib

    skeleton, tensors_by_key = treelib.encode(tree)
    staged = {k: stage_cpu(t) for k, t in tensors_by_key.items()}
    return write_staged(root, step, skeleton, staged, run_id=run_id, metrics=metrics, info=info, final=final)


def write_staged(
    root: str | os.PathLike[str],
    step: int,
    skeleton: Any,
    staged: Mapping[str, torch.Tensor],
    *,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    final: Path | None = None,
) -> Path:
    """World-size-1 write + commit of an encoded, staged state (may run on a background thread)."""
    root = Path(root)
    tmp = new_tmp_dir(root, step)
    try:
        result = write_rank_files(tmp, 0, staged)
        return commit(
            root, tmp, step, [result], trees=[skeleton], run_id=run_id, metrics=metrics, info=info, final=final
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with ``t``'s values (no copy if it already is one)."""
    t = t.detach()
    if t.is_sparse or t.layout != torch.strided:
        raise errors.EncodeError(f"sparse/non-strided tensors ({t.layout}) are not supported; densify first")
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()
