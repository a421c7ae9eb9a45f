"""Stage: copy the state's tensors into a pool of host buffers, so training can go on.

The pool is allocated once (per tensor key, sized to its first snapshot) and reused by every
later save, so host memory does not grow with the number of saves (the bug class of
pytorch/pytorch#170163). CUDA tensors are copied into *pinned* buffers on a side stream in large
chunks; contiguous CPU tensors by ``memmove`` (single-threaded, GIL released).

Why not ``copy_``: torch parallelises a large CPU copy over its intra-op threads, and on the
2-vCPU CI VM (2026-11-23, 1 GB state, 15 runs, fresh process per setting) that was *slower*:
``copy_`` 69-80 ms with 1 thread vs 123-160 ms with 2; ``memmove`` 66-87 ms either way. A copy
is memory-bound, so one thread already saturates the VM's bandwidth and the second only adds
contention — and ``memmove`` needs no process-global ``torch.set_num_threads`` change. In the
async benchmark this took the stall from ~2.5x to ~1.0x the memcpy floor (docs/benchmarks.md).
Non-contiguous sources still go through ``copy_``.

Invariant: :meth:`HostPool.stage` returns only once every byte of the snapshot is in host
memory that nothing but the persist worker touches — mutating the live tensors afterwards can
never change the checkpoint (pytorch/pytorch#144657, Lightning #20953). The caller must not
stage again until the previous snapshot has been persisted (one save in flight).
"""

from __future__ import annotations

import ctypes
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

    @property
    def nbytes(self) -> int:
        """Host memory held by the pool."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        pin = self._pin and src.device.type == "cuda"
        # Reallocate only when the tensor changed shape/dtype or moved between host and device
        # (a pageable buffer would make the CUDA copy synchronous and slow); otherwise reuse.
        if (
            buf is None
            or buf.shape != src.shape
            or buf.dtype != src.dtype
            or (pin and not buf.is_pinned())
        ):
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
                _copy_cpu(buf, src)
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
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        compute = torch.cuda.current_stream()
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            for buf, src in pairs:
                buf.copy_(src, non_blocking=True)
                src.record_stream(self._stream)
        self._stream.synchronize()


def _copy_cpu(buf: torch.Tensor, src: torch.Tensor) -> None:
    # A conj/neg view shares its base's bytes and only flags the math: bytes would be wrong.
    plain = not (src.is_conj() or src.is_neg())
    if plain and src.is_contiguous() and src.dtype == buf.dtype and src.numel() == buf.numel():
        n = src.numel() * src.element_size()
        if n:
            ctypes.memmove(buf.data_ptr(), src.data_ptr(), n)
    else:
        buf.copy_(src)
