"""Read and verify checkpoints: manifests, tensors into destinations, full verification.

Invariant: no byte reaches the caller unverified. Each tensor chunk is read straight into its
destination buffer and its hash checked in the same pass; each file's size and header hash are
checked before any of its chunks is trusted. Any mismatch is an :class:`IntegrityError` naming
the file, tensor and step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from savegame import errors
from savegame.format import hashing, layout, manifest, tensors

__all__ = ["CheckpointRef", "list_checkpoints", "load_tensors", "read_manifest", "verify"]


@dataclass(slots=True)
class CheckpointRef:
    """A step folder in a run, with its manifest if it parsed (``error`` says why not)."""

    step: int
    path: Path
    manifest: manifest.Manifest | None = None
    error: errors.CheckpointError | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.manifest is not None and self.error is None


def read_manifest(ckpt: str | os.PathLike[str]) -> manifest.Manifest:
    """Parse and validate ``<ckpt>/manifest.json``.

    Raises:
        CheckpointNotFoundError: ``ckpt`` is not a folder.
        IncompleteCheckpointError: the folder has no manifest (an interrupted save).
        FormatError: the manifest is damaged, lies, or is of an unsupported version.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise errors.CheckpointNotFoundError(
            f"{ckpt} is not a checkpoint folder (expected a folder like step-000000001200 holding manifest.json)",
            path=ckpt,
        )
    mpath = ckpt / layout.MANIFEST
    try:
        with open(mpath, "rb") as f:
            raw = f.read(manifest.MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as exc:
        raise errors.IncompleteCheckpointError(
            f"{ckpt} has no manifest.json (interrupted save?); it was never committed — restore an earlier step",
            path=ckpt,
        ) from exc
    except OSError as exc:
        raise errors.StorageError(f"could not read {mpath}: {exc}", path=mpath) from exc
    m = manifest.Manifest.from_bytes(raw, mpath)
    step = layout.parse_step_dir(ckpt.name)
    if step is not None and step != m.step:
        raise errors.FormatError(
            f"{ckpt}: folder name says step {step} but the manifest says {m.step}", path=ckpt, step=step
        )
    return m


def list_checkpoints(root: str | os.PathLike[str]) -> list[CheckpointRef]:
    """Every ``step-*`` folder under ``root``, oldest first, each with its parsed manifest or error.

    Only manifests are read (cheap); tensor data is checked by :func:`verify` / on load.
    """
    root = Path(root)
    if not root.is_dir():
        raise errors.CheckpointNotFoundError(f"run folder {root} does not exist", path=root)
    refs = []
    for entry in os.scandir(root):
        step = layout.parse_step_dir(entry.name)
        if step is None or not entry.is_dir():
            continue
        ref = CheckpointRef(step, Path(entry.path))
        try:
            ref.manifest = read_manifest(entry.path)
        except errors.CheckpointError as exc:
            ref.error = exc
        refs.append(ref)
    refs.sort(key=lambda r: r.step)
    return refs


def _check_file(ckpt: Path, name: str, entry: manifest.FileEntry, m: manifest.Manifest, fd: int) -> None:
    path = ckpt / name
    size = os.fstat(fd).st_size
    if size != entry.size:
        raise errors.IntegrityError(
            f"{path}: file is {size} bytes but the manifest says {entry.size} (truncated or replaced)",
            path=path,
            step=m.step,
        )
    header = os.pread(fd, entry.header_length, 0)
    digests = sorted(
        (c.offset, c.hash) for t in m.tensors.values() for c in t.chunks if c.file == name
    )
    if hashing.file_hash(header, [h for _, h in digests]) != entry.hash:
        raise errors.IntegrityError(f"{path}: header or tensor list does not match its hash", path=path, step=m.step)


def _open(ckpt: Path, name: str, step: int) -> int:
    try:
        return os.open(ckpt / name, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise errors.IntegrityError(f"{ckpt / name}: tensor file is missing", path=ckpt / name, step=step) from exc
    except OSError as exc:
        raise errors.StorageError(f"could not open {ckpt / name}: {exc}", path=ckpt / name, step=step) from exc


def load_tensors(
    ckpt: str | os.PathLike[str],
    m: manifest.Manifest,
    keys: Iterable[str] | None = None,
    *,
    dest: Callable[[str, manifest.TensorEntry], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``keys``) as CPU tensors, verifying every hash.

    Args:
        ckpt: The checkpoint folder.
        m: Its manifest (from :func:`read_manifest`).
        keys: Tensor keys to read; default all.
        dest: Optional ``(key, entry) -> tensor`` giving a contiguous CPU tensor of the right
            dtype and shape to read into (e.g. a live parameter), or None to allocate.

    Raises:
        IntegrityError: a file is missing, has the wrong size, or a hash does not match.
    """
    ckpt = Path(ckpt)
    wanted = list(m.tensors) if keys is None else list(keys)
    by_file: dict[str, list[tuple[str, manifest.Chunk, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key in wanted:
        entry = m.tensors.get(key)
        if entry is None:
            raise errors.CheckpointNotFoundError(f"{ckpt}: no tensor {key!r} in step {m.step}", path=ckpt, key=key)
        target = dest(key, entry) if dest is not None else None
        if target is None:
            target = torch.empty(entry.shape, dtype=tensors.dtype_from_name(entry.dtype))
        out[key] = target
        for c in entry.chunks:
            by_file.setdefault(c.file, []).append((key, c, target))
    for name, work in by_file.items():
        fd = _open(ckpt, name, m.step)
        try:
            _check_file(ckpt, name, m.files[name], m, fd)
            work.sort(key=lambda w: w[1].offset)  # sequential reads
            for key, c, target in work:
                buf = _chunk_view(target, m.tensors[key], c)
                tensors.read_into(fd, c.offset, buf.view, ckpt / name)
                if hashing.digest(buf.view) != c.hash:
                    raise errors.IntegrityError(
                        f"{ckpt / name}: tensor {key!r} does not match its hash (corrupted data) in step {m.step}",
                        path=ckpt / name,
                        step=m.step,
                        key=key,
                    )
                buf.flush()
        finally:
            os.close(fd)
    return out


@dataclass(slots=True)
class _ChunkBuffer:
    view: memoryview
    target: torch.Tensor | None = None
    region: torch.Tensor | None = None

    def flush(self) -> None:
        if self.target is not None and self.region is not None:
            self.region.copy_(self.target)


def _chunk_view(target: torch.Tensor, entry: manifest.TensorEntry, c: manifest.Chunk) -> _ChunkBuffer:
    """A writable byte view for chunk ``c`` of ``target``: the target itself when the chunk is
    the whole tensor, else a temp buffer copied into the chunk's region after verification."""
    if c.shape == entry.shape:
        return _ChunkBuffer(tensors.byte_view(target))
    tmp = torch.empty(c.shape, dtype=target.dtype)
    region = target
    for dim, (s, n) in enumerate(zip(c.start, c.shape, strict=True)):
        region = region.narrow(dim, s, n)
    return _ChunkBuffer(tensors.byte_view(tmp), tmp, region)


def verify(ckpt: str | os.PathLike[str], *, chunk_bytes: int = 64 << 20) -> list[str]:
    """Check everything about one checkpoint; returns problems (empty = valid).

    Reads every byte once with bounded memory (``chunk_bytes`` at a time).
    """
    ckpt = Path(ckpt)
    try:
        m = read_manifest(ckpt)
    except errors.CheckpointError as exc:
        return [str(exc)]
    problems = []
    for name, fentry in m.files.items():
        try:
            fd = _open(ckpt, name, m.step)
        except errors.CheckpointError as exc:
            problems.append(str(exc))
            continue
        try:
            _check_file(ckpt, name, fentry, m, fd)
            for key, t in m.tensors.items():
                for c in t.chunks:
                    if c.file != name:
                        continue
                    h = hashing.new()
                    buf = bytearray(min(chunk_bytes, max(c.length, 1)))
                    done = 0
                    while done < c.length:
                        n = min(len(buf), c.length - done)
                        view = memoryview(buf)[:n]
                        tensors.read_into(fd, c.offset + done, view, ckpt / name)
                        h.update(view)
                        done += n
                    if h.hexdigest() != c.hash:
                        problems.append(f"{ckpt / name}: tensor {key!r} does not match its hash (corrupted data)")
        except errors.CheckpointError as exc:
            problems.append(str(exc))
        finally:
            os.close(fd)
    listed = set(m.files) | {layout.MANIFEST}
    for extra in sorted(p.name for p in ckpt.iterdir() if p.name not in listed):
        problems.append(f"{ckpt / extra}: file not listed in the manifest")
    return problems


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / layout.MANIFEST).is_file()


def total_bytes(m: manifest.Manifest) -> int:
    return sum(f.size for f in m.files.values())

