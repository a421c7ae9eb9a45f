"""The contract every foreign-format reader fulfils.

A reader is lazy: opening a file and listing names, dtypes and shapes reads no tensor data;
``read(name)`` reads one tensor alone. Readers never execute code from the file, bound every
size and offset by the file's length, and turn malformed input into a typed
:class:`savegame.errors.FormatError` (or subclass) carrying the path.

Call order: ``open_*`` -> ``keys``/``info``/``tree``/``metadata`` (cheap) -> ``read`` (one
tensor) or ``verify`` (everything) -> ``close``. Readers are context managers.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from savegame import errors

if TYPE_CHECKING:  # readers list and verify with numpy/bytes; only read() imports torch
    import numpy as np
    import torch

__all__ = [
    "ForeignReader",
    "Reader",
    "Opaque",
    "TensorInfo",
    "TensorRef",
    "LIMITS",
    "json_depth_ok",
    "materialize",
]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What is known about one tensor without reading its data.

    Attributes:
        name: The tensor's name in the file (format-specific; nested containers joined by "/").
        dtype: torch dtype name without the ``torch.`` prefix ("float32", "bfloat16", ...), or
            "string" for TensorFlow string tensors.
        shape: The logical shape.
        nbytes: Bytes of data the tensor occupies in the file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Placeholder for a tensor inside :meth:`ForeignReader.tree`; resolve with ``read(name)``."""

    name: str


@dataclass(frozen=True, slots=True)
class Opaque:
    """An object the file names but that savegame will not instantiate (e.g. a pickled class).

    Shown by ``savegame show`` as ``<opaque module.qualname>``; never imported or called.
    """

    module: str
    qualname: str


class ForeignReader(Protocol):
    """Read-only, lazy access to one checkpoint file (or file set) of any supported format."""

    path: str
    format: str  # "torch", "safetensors", "numpy", "tensorflow", "keras-h5", "keras3", "darknet"

    def keys(self) -> list[str]:
        """Tensor names in file order. Reads no tensor data."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and size of one tensor. Reads no tensor data.

        Raises CheckpointNotFoundError (a FileNotFoundError) for an unknown name."""
        ...

    def read(self, name: str) -> torch.Tensor | np.ndarray:
        """One tensor as a CPU torch tensor owning its memory (numpy bytes array for strings)."""
        ...

    def tree(self) -> Any:
        """The file's object structure with tensors as :class:`TensorRef` and unknown objects
        as :class:`Opaque`. Formats without structure return ``{name: TensorRef(name)}``."""
        ...

    def metadata(self) -> dict[str, Any]:
        """JSON-compatible facts about the file (framework version, configs as plain data)."""
        ...

    def verify(self) -> list[str]:
        """Read everything and check every checksum and bound; returns problems (empty = OK)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> ForeignReader: ...

    def __exit__(self, *exc: object) -> None: ...


class Reader(abc.ABC):
    """Base class of every reader (foreign formats and savegame's own): the shared lifecycle.

    Subclasses set ``path`` and ``format`` in ``__init__``, call :meth:`_check_open` first in
    every public method, and free what they hold in :meth:`_release`. ``close()`` may be called
    any number of times; any use after it raises :class:`~savegame.errors.ReaderClosedError`
    (a ``ValueError``, like I/O on a closed file). The reader conformance suite
    (``tests/conformance/test_readers.py``) holds every format to this.
    """

    path: str
    format: str
    _closed: bool = False

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Tensor names in file order. Reads no tensor data."""

    @abc.abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and size of one tensor; ``CheckpointNotFoundError`` for an unknown name."""

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor | np.ndarray:
        """One tensor as a CPU torch tensor owning its memory (numpy bytes array for strings)."""

    @abc.abstractmethod
    def tree(self) -> Any:
        """The object structure with tensors as :class:`TensorRef`, unknown objects as :class:`Opaque`."""

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """JSON-compatible facts about the file."""

    @abc.abstractmethod
    def verify(self) -> list[str]:
        """Read everything and check every checksum and bound; returns problems (empty = OK)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the file(s); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:  # noqa: B027 - an optional hook
        """Free held resources (open files, maps, child processes). Called once by close()."""

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ReaderClosedError(
                f"reader for {self.path} is closed; open the file again",
                path=getattr(self, "path", None),
            )

    def __enter__(self) -> Reader:  # -> Self (3.11)
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.format} {getattr(self, 'path', '?')!r} ({state})>"


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps every reader enforces (DESIGN.md §6). Documented in docs/formats.md."""

    max_header_bytes: int = 100_000_000  # safetensors' own MAX_HEADER_SIZE
    max_json_depth: int = 64
    max_entries: int = 1_000_000  # tensors / zip members / index entries per file
    max_pickle_ops: int = 50_000_000
    max_pickle_depth: int = 1_000  # stack/MARK nesting
    max_tensor_numel: int = 1 << 40
    max_inflate_bytes: int = 1 << 34  # compressed members (.npz) may expand to at most this
    max_inflate_ratio: int = 200


LIMITS = Limits()


def json_depth_ok(text: str, max_depth: int = LIMITS.max_json_depth) -> bool:
    """Whether brackets in the JSON ``text`` nest at most ``max_depth`` deep (strings skipped).

    Checked before ``json.loads`` of a header from a file, so a hostile header cannot make the
    parser recurse into a RecursionError (or worse) — the stdlib parser has no depth limit.
    """
    depth = 0
    in_str = escape = False
    for ch in text:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def iter_tensors(reader: ForeignReader) -> Iterator[tuple[str, torch.Tensor | np.ndarray]]:
    """Yield ``(name, tensor)`` one at a time, so memory stays at one tensor."""
    for name in reader.keys():
        yield name, reader.read(name)


def materialize(
    tree: Any, reader: ForeignReader, *, read: Callable[[str], Any] | None = None
) -> Any:
    """``tree`` (from ``reader.tree()``) with every :class:`TensorRef` replaced by its tensor.

    The one place that turns references into data (``convert`` to savegame, ``adopt``):
    mappings (rebuilt as dicts), lists and tuples are walked; every other leaf, :class:`Opaque`
    included, is kept as it is. Tensors are read one at a time, in tree order, with
    ``read(name)`` — ``reader.read`` unless given (e.g. to refuse strings or make tensors
    contiguous) — so the result holds every tensor the tree names.
    """
    get = reader.read if read is None else read

    def walk(v: Any) -> Any:
        if isinstance(v, TensorRef):
            return get(v.name)
        if isinstance(v, Mapping):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, tuple):
            return tuple(walk(x) for x in v)
        return v

    return walk(tree)
