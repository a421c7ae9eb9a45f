"""Load weights read from other frameworks into PyTorch modules.

The job of this module is layout conversion only: Keras/TensorFlow store a Dense kernel as
``(in, out)`` and a Conv2D kernel as ``(kh, kw, in, out)``, PyTorch wants ``(out, in)`` and
``(out, in, kh, kw)`` (FORMATS.md §4.3). Readers (``open_tensorflow``, ``open_keras``, …) give
tensors by name; the layer helpers here turn "this Keras layer is that PyTorch submodule" into a
list of :class:`WeightMapping` and :func:`apply_mappings` copies them into a module.

Key invariant: :func:`apply_mappings` is all-or-nothing. Every source is read, transformed and
checked against the target's shape and dtype kind *before* the first byte of the module is
written, so a mismatch raises a typed error and leaves the module untouched.

API:

* layer helpers :func:`dense`, :func:`conv1d`, :func:`conv2d`, :func:`depthwise_conv2d`,
  :func:`batch_norm` -> ``list[WeightMapping]``;
* kernel transforms :func:`dense_kernel`, :func:`conv1d_kernel`, :func:`conv2d_kernel`,
  :func:`depthwise_conv2d_kernel`, :func:`flattened_dense_kernel` (usable on their own);
* :func:`apply_mappings` ``(module, mappings, source)``.

Two conversion traps the helpers cannot hide:

* **Flatten order.** Keras flattens NHWC activations in ``(h, w, c)`` order, PyTorch flattens
  NCHW in ``(c, h, w)`` order. The first Dense after a Flatten therefore needs its input rows
  permuted: pass ``flatten_from=(c, h, w)`` to :func:`dense`.
* **BatchNormalization hyper-parameters are not weights.** Keras defaults to ``epsilon=1e-3``
  and ``momentum=0.99``; PyTorch to ``eps=1e-5`` and ``momentum=0.1`` (PyTorch's momentum is
  ``1 - keras_momentum``). Build the PyTorch layer with the Keras values, e.g.
  ``nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)``, or outputs differ in eval mode.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from savegame.adapters import mapping
    >>> keras_like = {"d/kernel": torch.ones(3, 2), "d/bias": torch.zeros(2)}
    >>> lin = nn.Linear(3, 2)
    >>> mapping.apply_mappings(lin, mapping.dense("", kernel="d/kernel", bias="d/bias"), keras_like)
    []
    >>> tuple(lin.weight.shape)
    (2, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from savegame import errors

__all__ = [
    "TensorSource",
    "Transform",
    "WeightMapping",
    "apply_mappings",
    "batch_norm",
    "conv1d",
    "conv1d_kernel",
    "conv2d",
    "conv2d_kernel",
    "dense",
    "dense_kernel",
    "depthwise_conv2d",
    "depthwise_conv2d_kernel",
    "flattened_dense_kernel",
    "identity",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
"""A pure function from the framework's tensor to the PyTorch layout."""


class TensorSource(Protocol):
    """Anything with ``read(name)``: every :class:`savegame.interop.base.ForeignReader`."""

    def read(self, name: str) -> torch.Tensor | np.ndarray: ...


def identity(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` unchanged (biases, BatchNorm vectors)."""
    return t


def _need_rank(t: torch.Tensor, rank: int, what: str) -> None:
    if t.dim() != rank:
        raise errors.RestoreError(
            f"{what} must have rank {rank}, got shape {tuple(t.shape)}; "
            "check that the mapping names the right source tensor"
        )


def dense_kernel(t: torch.Tensor) -> torch.Tensor:
    """Keras/TF Dense kernel ``(in, out)`` -> ``nn.Linear.weight`` ``(out, in)``."""
    _need_rank(t, 2, "a Dense kernel")
    return t.t().contiguous()


def flattened_dense_kernel(t: torch.Tensor, *, chw: tuple[int, int, int]) -> torch.Tensor:
    """Dense kernel that follows a Flatten of NHWC activations -> ``nn.Linear.weight``.

    Keras' input row ``h*W*C + w*C + c`` becomes PyTorch column ``c*H*W + h*W + w``, matching
    ``torch.flatten`` of an NCHW tensor.

    Args:
        t: Kernel of shape ``(H*W*C, out)``.
        chw: ``(C, H, W)`` of the activation that was flattened.

    Returns:
        The ``(out, C*H*W)`` weight.
    """
    _need_rank(t, 2, "a Dense kernel")
    c, h, w = chw
    if c <= 0 or h <= 0 or w <= 0 or t.shape[0] != c * h * w:
        raise errors.RestoreError(
            f"Dense kernel has {t.shape[0]} input rows but flatten_from={chw} gives {c * h * w}; "
            "pass the (channels, height, width) of the tensor entering Flatten"
        )
    out = t.shape[1]
    return t.reshape(h, w, c, out).permute(3, 2, 0, 1).reshape(out, c * h * w).contiguous()


def conv1d_kernel(t: torch.Tensor) -> torch.Tensor:
    """Keras Conv1D kernel ``(k, in, out)`` -> ``nn.Conv1d.weight`` ``(out, in, k)``."""
    _need_rank(t, 3, "a Conv1D kernel")
    return t.permute(2, 1, 0).contiguous()


def conv2d_kernel(t: torch.Tensor) -> torch.Tensor:
    """Keras Conv2D kernel ``(kh, kw, in, out)`` -> ``nn.Conv2d.weight`` ``(out, in, kh, kw)``."""
    _need_rank(t, 4, "a Conv2D kernel")
    return t.permute(3, 2, 0, 1).contiguous()


def depthwise_conv2d_kernel(t: torch.Tensor) -> torch.Tensor:
    """Keras DepthwiseConv2D kernel ``(kh, kw, in, mult)`` -> ``(in*mult, 1, kh, kw)``.

    The target is ``nn.Conv2d(in, in*mult, (kh, kw), groups=in)``; PyTorch output channel
    ``i*mult + m`` is Keras' input channel ``i``, multiplier ``m``.
    """
    _need_rank(t, 4, "a DepthwiseConv2D kernel")
    kh, kw, cin, mult = t.shape
    return t.permute(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw).contiguous()


@dataclass(frozen=True, slots=True)
class WeightMapping:
    """Copy one source tensor, transformed, into one entry of a module's ``state_dict``.

    Attributes:
        target: Key in ``module.state_dict()`` (``"fc.weight"``, ``"bn.running_var"``).
        source: Tensor name in the source (reader key or mapping key); ``None`` means "no
            source, write ``fill``" (a Keras BatchNormalization with ``scale=False`` has no
            gamma, PyTorch's affine BatchNorm still has a weight).
        transform: Layout conversion applied to the source tensor.
        fill: Constant written when ``source`` is ``None``.
        optional: Skip silently when ``target`` is not in the module (instead of raising).
    """

    target: str
    source: str | None
    transform: Transform = identity
    fill: float = 0.0
    optional: bool = False


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def dense(
    target: str,
    *,
    kernel: str,
    bias: str | None = None,
    flatten_from: tuple[int, int, int] | None = None,
) -> list[WeightMapping]:
    """Keras ``Dense`` -> ``nn.Linear`` at ``target``.

    Args:
        target: The Linear's name in the module (``"fc"``; ``""`` for the module itself).
        kernel: Source name of the kernel ``(in, out)``.
        bias: Source name of the bias, or ``None`` when ``use_bias=False``.
        flatten_from: ``(C, H, W)`` when this Dense follows a Flatten of an image tensor, so
            rows are reordered from Keras' NHWC to PyTorch's NCHW flatten order.

    Returns:
        The mappings for ``weight`` (and ``bias``).
    """
    transform: Transform = (
        dense_kernel
        if flatten_from is None
        else functools.partial(flattened_dense_kernel, chw=flatten_from)
    )
    out = [WeightMapping(_join(target, "weight"), kernel, transform)]
    if bias is not None:
        out.append(WeightMapping(_join(target, "bias"), bias))
    return out


def conv1d(target: str, *, kernel: str, bias: str | None = None) -> list[WeightMapping]:
    """Keras ``Conv1D`` -> ``nn.Conv1d`` at ``target`` (see :func:`dense` for the arguments)."""
    out = [WeightMapping(_join(target, "weight"), kernel, conv1d_kernel)]
    if bias is not None:
        out.append(WeightMapping(_join(target, "bias"), bias))
    return out


def conv2d(target: str, *, kernel: str, bias: str | None = None) -> list[WeightMapping]:
    """Keras ``Conv2D`` -> ``nn.Conv2d`` at ``target`` (see :func:`dense` for the arguments).

    Padding is not a weight: Keras ``padding="same"`` with an odd kernel and stride 1 is
    ``nn.Conv2d(padding=k // 2)``; with stride > 1 Keras pads asymmetrically (more at the
    bottom/right), which needs an explicit ``F.pad`` in PyTorch.
    """
    out = [WeightMapping(_join(target, "weight"), kernel, conv2d_kernel)]
    if bias is not None:
        out.append(WeightMapping(_join(target, "bias"), bias))
    return out


def depthwise_conv2d(target: str, *, kernel: str, bias: str | None = None) -> list[WeightMapping]:
    """Keras ``DepthwiseConv2D`` -> grouped ``nn.Conv2d`` (``groups=in``) at ``target``."""
    out = [WeightMapping(_join(target, "weight"), kernel, depthwise_conv2d_kernel)]
    if bias is not None:
        out.append(WeightMapping(_join(target, "bias"), bias))
    return out


def batch_norm(
    target: str,
    *,
    gamma: str | None,
    beta: str | None,
    moving_mean: str,
    moving_variance: str,
) -> list[WeightMapping]:
    """Keras ``BatchNormalization`` -> ``nn.BatchNorm1d/2d`` at ``target``.

    gamma, beta, moving_mean, moving_variance become weight, bias, running_mean, running_var.
    Remember the hyper-parameters (module docstring): ``eps=keras_epsilon`` (Keras default
    1e-3) and ``momentum=1 - keras_momentum``.

    Args:
        target: The BatchNorm's name in the module.
        gamma: Source of gamma, or ``None`` when ``scale=False`` (weight is set to 1 if the
            PyTorch layer is affine).
        beta: Source of beta, or ``None`` when ``center=False`` (bias is set to 0 if affine).
        moving_mean: Source of the moving mean.
        moving_variance: Source of the moving variance.

    Returns:
        The mappings for weight, bias, running_mean and running_var.
    """
    w = _join(target, "weight")
    b = _join(target, "bias")
    return [
        WeightMapping(w, gamma)
        if gamma is not None
        else WeightMapping(w, None, fill=1.0, optional=True),
        WeightMapping(b, beta)
        if beta is not None
        else WeightMapping(b, None, fill=0.0, optional=True),
        WeightMapping(_join(target, "running_mean"), moving_mean),
        WeightMapping(_join(target, "running_var"), moving_variance),
    ]


def _read(source: TensorSource | Mapping[str, torch.Tensor | np.ndarray], name: str) -> object:
    if isinstance(source, Mapping):
        if name not in source:
            raise errors.CheckpointNotFoundError(
                f"source tensor {name!r} is not in the given mapping; check the name "
                "against the reader's keys()",
                key=name,
            )
        return source[name]
    return source.read(name)


def _as_tensor(value: object, name: str, path: str | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        # Copy: np arrays from readers may be read-only views; torch wants writable memory.
        return torch.from_numpy(np.array(value, copy=True))
    raise errors.FormatError(
        f"source tensor {name!r} is not numeric (got {type(value).__name__}"
        f"{' of dtype ' + str(value.dtype) if isinstance(value, np.ndarray) else ''}); "
        "only numeric tensors can be loaded into a module",
        key=name,
        path=path,
    )


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


def apply_mappings(
    module: torch.nn.Module,
    mappings: Sequence[WeightMapping],
    source: TensorSource | Mapping[str, torch.Tensor | np.ndarray],
) -> list[str]:
    """Copy mapped source tensors into ``module``'s parameters and buffers, all or nothing.

    Float sources are cast to the target's float dtype (e.g. bfloat16 -> float32); a change of
    dtype kind (int -> float, float -> int) is refused because it is almost always a wrong
    mapping. Values are copied in place, so existing references to parameters (an optimizer)
    stay valid.

    Args:
        module: The PyTorch module to fill.
        mappings: What goes where, e.g. ``dense("fc", kernel=..., bias=...) + conv2d(...)``.
        source: A reader (anything with ``read(name)``) or a plain ``{name: tensor}`` mapping.

    Returns:
        ``state_dict`` keys of the module that no mapping wrote, in module order (for instance
        ``bn.num_batches_tracked``), so the caller can decide whether that is acceptable.

    Raises:
        savegame.errors.CheckpointNotFoundError: A source name does not exist (``.key``).
        savegame.errors.RestoreError: A target is missing from the module, is written twice,
            or its shape or dtype kind does not match the transformed source (``.key``).
        savegame.errors.FormatError: A source tensor is not numeric (a string tensor).
    """
    state = module.state_dict(keep_vars=True)
    path = getattr(source, "path", None)
    path = path if isinstance(path, str) else None
    planned: list[tuple[torch.Tensor, torch.Tensor]] = []
    written: set[str] = set()
    for m in mappings:
        if m.target not in state:
            if m.optional:
                continue
            raise errors.RestoreError(
                f"module has no parameter or buffer {m.target!r} (mapping from "
                f"{m.source!r}); names in the module start with "
                f"{sorted(state)[:5]!r}",
                key=m.target,
            )
        if m.target in written:
            raise errors.RestoreError(f"{m.target!r} is written by two mappings", key=m.target)
        written.add(m.target)
        dest = state[m.target]
        if m.source is None:
            value = torch.full_like(dest.detach(), m.fill)
        else:
            raw = _as_tensor(_read(source, m.source), m.source, path)
            value = m.transform(raw)
            if _kind(value.dtype) != _kind(dest.dtype):
                raise errors.RestoreError(
                    f"{m.source!r} ({value.dtype}) cannot be loaded into {m.target!r} "
                    f"({dest.dtype}): different dtype kind; check the mapping",
                    key=m.target,
                    path=path,
                )
        if tuple(value.shape) != tuple(dest.shape):
            raise errors.RestoreError(
                f"{m.source!r} has shape {tuple(value.shape)} after conversion but "
                f"{m.target!r} has shape {tuple(dest.shape)}; check the layer sizes and the "
                "mapping (flatten_from for a Dense after Flatten)",
                key=m.target,
                path=path,
            )
        planned.append((dest, value))
    # Everything checked: only now touch the module (the all-or-nothing invariant).
    with torch.no_grad():
        for dest, value in planned:
            dest.copy_(value.to(dtype=dest.dtype))
    return [k for k in state if k not in written]
