"""What a torch pickle may name, and the inert values it becomes (FORMATS.md §1.2, §1.3, §1.6).

Key invariant: nothing here imports or calls anything the file names. :data:`ALLOWED` is the
allow-list of ``GLOBAL`` names the pickle VM (:mod:`savegame.interop.torch_pickle.unpickler`)
accepts; each becomes a :class:`Global` marker, and storages and tensors become
:class:`Storage` and :class:`TensorSpec` records that hold only names and numbers.
:func:`check_view` bounds every tensor view inside its storage before the reader may read it.
The only real torch objects built are plain values torch's own ``weights_only`` unpickler also
accepts (``torch.Size``, ``torch.device``, dtype/qscheme constants, layouts), resolved by
attribute lookup on the ``torch`` module.

Dtypes are kept as names (str) and torch is imported only on first need (a tensor read, or one
of those torch value objects in the pickle): listing and verifying a file of plain tensors needs
numpy only (issue 9.18).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from savegame import errors
from savegame.interop import _bounds, base

__all__ = [
    "ALLOWED",
    "DTYPES",
    "ITEMSIZES",
    "LAYOUTS",
    "STORAGE_DTYPES",
    "UNSUPPORTED",
    "VALUE_CONSTANTS",
    "Global",
    "OpaqueInstance",
    "Storage",
    "TensorSpec",
    "check_view",
    "constant",
    "dtype_name",
    "is_size",
    "itemsize",
    "layout",
    "torch_dtype",
    "torch_module",
]

# FORMATS.md §1.2: storage class -> dtype name. Dtypes are kept as names (str) and torch is
# imported only by read()/load() and for the few torch value objects a pickle may hold
# (torch.Size, torch.device, dtype constants, layouts): listing and verifying a file of plain
# tensors needs numpy only (issue 9.18).
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
# Tensor dtype name -> element size in bytes (torch's element_size()).
ITEMSIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex32": 4, "complex64": 8,
    "complex128": 16, "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}  # fmt: skip
_DTYPE_NAMES = tuple(ITEMSIZES)
DTYPES = frozenset(_DTYPE_NAMES)
# Inert constants torch's weights_only unpickler also accepts as plain values (torch 2.13
# torch/_weights_only_unpickler.py `_get_allowed_globals`): every dtype it lists (quantized,
# bit and sub-byte ones included; tensors of these are still refused), and the qschemes.
# They come back as the real torch objects (resolved by constant(), which imports torch only
# when a file holds one): comparing or printing them runs no file code.
VALUE_CONSTANTS: frozenset[str] = frozenset(
    [
        *_DTYPE_NAMES,
        *(f"uint{i}" for i in range(1, 8)),
        *(f"int{i}" for i in range(1, 8)),
        *"qint8 quint8 qint32 quint4x2 quint2x4 bits1x8 bits2x4 bits4x2 bits8 bits16".split(),
        "float4_e2m1fn_x2",
        *"per_tensor_affine per_tensor_symmetric per_channel_affine per_channel_symmetric".split(),
        "per_channel_affine_float_qparams",
    ]
)
# Layouts named by torch.serialization._get_layout("torch.<name>").
LAYOUTS: frozenset[str] = frozenset(
    f"torch.{n}"
    for n in "strided sparse_coo sparse_csr sparse_csc sparse_bsr sparse_bsc _mkldnn jagged".split()
)


def torch_module() -> Any:
    """torch, imported on first need (a tensor read, or a torch value object in the pickle)."""
    import torch

    return torch


def constant(name: str) -> Any:
    """The torch dtype/qscheme constant ``torch.<name>``, or None if this torch lacks it."""
    torch = torch_module()
    c = getattr(torch, name, None)
    return c if isinstance(c, (torch.dtype, torch.qscheme)) else None


def layout(name: str) -> Any:
    """The torch layout named ``"torch.<name>"``, or None if this torch lacks it."""
    torch = torch_module()
    c = getattr(torch, name.removeprefix("torch."), None)
    return c if isinstance(c, torch.layout) else None


def torch_dtype(name: str, path: str) -> Any:
    """The torch dtype for a dtype name from the file (read time)."""
    torch = torch_module()
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise errors.UnsupportedFormatError(
            f"{path}: dtype {name!r} is not available in this torch ({torch.__version__}); "
            "upgrade torch",
            path=path,
        )
    return dt


def is_size(v: Any) -> bool:
    """Whether ``v`` is a torch.Size (only possible once torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Size)


# Torch globals we recognise but do not rebuild (quantized, sparse, nested, meta, subclasses).
UNSUPPORTED = {
    ("torch._utils", n)
    for n in (
        "_rebuild_qtensor",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_wrapper_subclass",
        "_rebuild_nested_tensor",
        "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_xla_tensor",
        "_rebuild_mps_tensor",
    )
} | {
    (("torch", n))
    for n in (
        "QInt8Storage",
        "QUInt8Storage",
        "QInt32Storage",
        "QUInt4x2Storage",
        "QUInt2x4Storage",
    )
}


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` (or ``"float32"``) -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class Global:
    """An allow-listed global: a marker, never the real object."""

    module: str
    name: str


@dataclass(eq=False, slots=True)
class Storage:
    """A storage named by a persistent id: its record key, element type and size; no bytes."""

    key: str
    dtype: str  # torch dtype name ("float32")
    numel: int
    location: str
    elem_offset: int = 0  # legacy view_metadata: view into a root storage


@dataclass(eq=False, slots=True)
class TensorSpec:
    """A tensor as a strided view of a :class:`Storage`, bounded by :func:`check_view`."""

    storage: Storage
    dtype: str  # torch dtype name ("float32")
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    parameter: bool = False
    # torch's lazy "conjugate" / "negative" view bits (``x.conj()``, ``x.conj().imag``): the
    # storage holds the plain values, the tensor means their conjugate / negation.
    conj: bool = False
    neg: bool = False


@dataclass(eq=False, slots=True)
class OpaqueInstance:
    """An object of a class off the allow-list (listing mode): its class and BUILD state."""

    cls: base.Opaque
    state: Any = None


# (module, name) pairs a GLOBAL may name; anything else is refused (or Opaque when listing).
ALLOWED: set[tuple[str, str]] = (
    {
        ("collections", "OrderedDict"),
        ("collections", "Counter"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("_codecs", "encode"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.serialization", "_get_layout"),
        ("torch", "strided"),
    }
    | {("torch", n) for n in STORAGE_DTYPES}
    | {("torch", n) for n in DTYPES}
    | {("torch", n) for n in VALUE_CONSTANTS}
    | {
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
    }
)


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name from :data:`ITEMSIZES`."""
    return ITEMSIZES[dtype]


def check_view(spec: TensorSpec, path: str) -> None:
    """FORMATS.md §1.6: bounds of a strided view inside its storage; logical numel capped."""
    width = itemsize(spec.dtype)
    if spec.offset < 0 or any(s < 0 for s in spec.size) or any(s < 0 for s in spec.stride):
        raise errors.FormatError(f"{path}: tensor view with negative offset/size/stride", path=path)
    problem = _bounds.shape_problem(spec.size)
    if problem is not None:
        # Even an empty view: torch cannot build size (0, 2**64) (overflow converting it).
        raise errors.FormatError(f"{path}: tensor size {problem}", path=path)
    numel = 1
    for s in spec.size:
        numel *= s
    if numel > base.LIMITS.max_tensor_numel:
        raise errors.FormatError(
            f"{path}: tensor of {numel} elements exceeds LIMITS.max_tensor_numel", path=path
        )
    storage_bytes = spec.storage.numel * itemsize(spec.storage.dtype)
    if numel:
        last = spec.offset + sum(
            (s - 1) * st for s, st in zip(spec.size, spec.stride, strict=False)
        )
        if (last + 1) * width > storage_bytes:
            raise errors.FormatError(
                f"{path}: tensor view reaches byte {(last + 1) * width} of a "
                f"{storage_bytes}-byte storage {spec.storage.key!r}",
                path=path,
                key=spec.storage.key,
            )
