"""Stage: copy the state's tensors into a pool of host buffers, so training can go on.

The pool is allocated once (per tensor key, sized to its first snapshot) and reused by every
later save, so host memory does not grow with the number of saves (the bug class of
pytorch/pytorch#170163). CUDA tensors are copied into *pinned* buffers on a side stream in large
chunks; CPU tensors by a multi-threaded ``copy_`` (a memcpy).

Invariant: :meth:`HostPool.stage` returns only once every byte of the snapshot is in host
memory that nothing but the persist worker touches — mutating the live tensors afterwards can
never change the checkpoint (pytorch/pytorch#144657, Lightning #20953). The caller must not
stage again until the previous snapshot has been persisted (one save in flight).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

__all__ = ["HostPool"]


class HostPool:
    """Reusable host buffers, one per tensor key.

    Args:
        pin: Use pinned (page-locked) buffers for CUDA sources; default: when CUDA is available.
    """

    def __init__(self, *, pin: bool | None = None) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._stream: torch.cuda.Stream | None = None
        self._busy = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Host memory held by the pool."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = self._pin and src.device.type == "cuda"
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``tensors`` into the pool; returns ``{key: host buffer}`` (a consistent snapshot).

        Keys absent from ``tensors`` are dropped from the pool, so its size follows the state.
        """
        staged: dict[str, torch.Tensor] = {}
        cuda_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, t in tensors.items():
            src = t.detach()
            buf = self._buffer(key, src)
            if src.device.type == "cuda":
                cuda_pairs.append((buf, src))
            elif src.device.type == "cpu":
                buf.copy_(src)
            else:  # mps, xla, ...: synchronous copy through the framework
                buf.copy_(src.to("cpu"))
            staged[key] = buf
        if cuda_pairs:
            self._copy_from_cuda(cuda_pairs)
        for key in list(self._buffers):
            if key not in tensors:
                del self._buffers[key]
        return staged

    def _copy_from_cuda(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # Copy on a side stream that first waits for the compute stream, so we read the values
        # as of this call; then block until the copies are done (the stall floor: D2H bandwidth).
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        compute = torch.cuda.current_stream()
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            for buf, src in pairs:
                buf.copy_(src, non_blocking=True)
                src.record_stream(self._stream)
        self._stream.synchronize()
