"""One check for tensor shapes read from a file, shared by the numpy, safetensors, torch and
Keras readers (FORMATS.md §7: "checked integer arithmetic for every shape product").

Key invariant: a shape that passes can be handed to ``numpy``/``torch`` allocation and reshape
functions without them raising (``ValueError: Maximum allowed dimension exceeded``, ``array is
too big``, ``TypeError``/``OverflowError`` converting a dimension to a C integer): every
dimension is a non-negative ``int`` no larger than ``LIMITS.max_tensor_numel``, at most
:data:`MAX_RANK` of them, and the product of the non-zero dimensions is bounded too — an empty
tensor ``(0, 2**64)`` holds nothing but still cannot be created.
"""

from __future__ import annotations

from collections.abc import Sequence

from savegame.interop import base

__all__ = ["MAX_RANK", "shape_problem"]

MAX_RANK = 64  # numpy's NPY_MAXDIMS (2.x); no checkpoint format needs more


def shape_problem(shape: Sequence[object]) -> str | None:
    """Why ``shape`` cannot be a tensor's shape, or ``None`` when it can.

    Example:
        >>> shape_problem((0, 2**64))
        'dimension 18446744073709551616 exceeds LIMITS.max_tensor_numel (1099511627776)'
        >>> shape_problem((3, 4)) is None
        True
    """
    cap = base.LIMITS.max_tensor_numel
    if len(shape) > MAX_RANK:
        return f"rank {len(shape)} exceeds {MAX_RANK}"
    product = 1
    for dim in shape:
        if type(dim) is not int:  # bool and float are not dimensions
            return f"dimension {dim!r} is not an integer"
        if dim < 0:
            return f"dimension {dim} is negative"
        if dim > cap:
            return f"dimension {dim} exceeds LIMITS.max_tensor_numel ({cap})"
        if dim:
            product *= dim
            if product > cap:
                return f"shape {tuple(shape)} exceeds LIMITS.max_tensor_numel ({cap}) elements"
    return None
