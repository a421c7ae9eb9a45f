"""Compare the tensors of two checkpoints of any formats, one tensor pair at a time.

Key invariant: at most one tensor of each side is in memory at once, so diffing two 50 GB
checkpoints needs memory for the largest tensor pair, not for the checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from savegame import errors
from savegame.interop import base
from savegame.tools._source import candidates, open_any

__all__ = ["DiffResult", "diff"]


@dataclass(frozen=True, slots=True)
class DiffResult:
    """What differs between checkpoints ``a`` and ``b`` (tensor names as each reader reports).

    Attributes:
        added: Names only in ``b``.
        removed: Names only in ``a``.
        changed: Names in both whose dtype or shape differ -> (info in a, info in b).
        max_abs_diff: For names in both with equal dtype and shape: the largest absolute
            element difference (0.0 when bitwise identical; NaN if a NaN meets a number; an
            exact ``int`` for integer dtypes).
        identical: Names in both whose bytes are identical (NaNs with equal bits included).
    """

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, tuple[base.TensorInfo, base.TensorInfo]] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    identical: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """True when both hold the same names, dtypes, shapes and bytes."""
        return not (self.added or self.removed or self.changed) and len(self.identical) == len(
            self.max_abs_diff
        )


def _max_abs(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> tuple[float, bool]:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        same = bool(np.array_equal(np.asarray(x), np.asarray(y)))
        return (0.0 if same else float("inf")), same
    if x.numel() == 0:
        return 0.0, True
    same = bool(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))
    if same:
        return 0.0, True
    if x.dtype == torch.bool:
        return 1.0, False
    if x.dtype.is_complex:
        d = (x.to(torch.complex128) - y.to(torch.complex128)).abs()
    elif x.dtype.is_floating_point:
        d = (x.to(torch.float64) - y.to(torch.float64)).abs()
    elif x.element_size() <= 4:
        return int((x.to(torch.int64) - y.to(torch.int64)).abs().max()), False  # exact
    else:
        # 64-bit ints: Python ints cannot overflow where int64 subtraction would.
        xs, ys = x.reshape(-1).tolist(), y.reshape(-1).tolist()
        return max(abs(int(p) - int(q)) for p, q in zip(xs, ys, strict=True)), False  # exact
    # Elements with equal bits differ by 0 (a NaN both files hold at the same place included);
    # a NaN against anything else is a difference of NaN.
    xb = x.reshape(-1).view(torch.uint8).reshape(x.numel(), -1)
    yb = y.reshape(-1).view(torch.uint8).reshape(y.numel(), -1)
    d = d.reshape(-1).masked_fill((xb == yb).all(dim=1), 0)
    if torch.isnan(d).any():
        return float("nan"), False
    return float(d.max()), False


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    cfg_a: str | os.PathLike[str] | None = None,
    cfg_b: str | os.PathLike[str] | None = None,
    partial: bool = False,
    isolate: bool = True,
) -> DiffResult:
    """Compare the tensors of two checkpoints of any formats (run folders: newest valid manifest).

    Returns a :class:`DiffResult`: names added and removed, dtype/shape changes, the max
    absolute difference per common tensor, and which are bitwise identical; names are sorted
    within each list. Memory holds one tensor pair at a time.

    Args:
        a: The reference checkpoint.
        b: The checkpoint compared against it.
        cfg_a: Darknet ``.cfg`` for ``a`` when it is a ``.weights`` file.
        cfg_b: Same for ``b``.
        partial: Accept darknet ``.weights`` files that hold fewer layers than their cfg
            (backbones); only the layers present are compared.
        isolate: Read Keras/HDF5 files in a child process first (untrusted files; ``False``
            for trusted files only).

    Raises:
        The errors of the readers involved (FormatError, UnsupportedFormatError, ...).
    """
    a, b = candidates(a)[0], candidates(b)[0]
    with (
        open_any(a, cfg_a, isolate=isolate, partial=partial) as ra,
        open_any(b, cfg_b, isolate=isolate, partial=partial) as rb,
    ):
        ka, kb = ra.keys(), rb.keys()
        sa, sb = set(ka), set(kb)
        res = DiffResult(added=sorted(sb - sa), removed=sorted(sa - sb))
        for name in ka:
            if name not in sb:
                continue
            ia, ib = ra.info(name), rb.info(name)
            if ia.dtype != ib.dtype or tuple(ia.shape) != tuple(ib.shape):
                res.changed[name] = (ia, ib)
                continue
            x, y = ra.read(name), rb.read(name)
            if tuple(x.shape) != tuple(y.shape):
                raise errors.FormatError(
                    f"{a} / {b}: tensor {name!r} read with a shape different from its info()",
                    key=name,
                )
            m, same = _max_abs(x, y)
            res.max_abs_diff[name] = m
            if same:
                res.identical.append(name)
            del x, y  # memory bound: one pair at a time
        res.identical.sort()
        return res
