"""The plan of ``staging.copy_to_device`` (a restore's copy to a GPU through pinned buffers),
executed here with host buffers: every byte lands once, in order, and no round overfills its
buffer. The CUDA execution itself is tested in tests/gpu/test_gpu_restore.py."""

from __future__ import annotations

import ctypes

import pytest
import torch

from savegame.engine import staging


def _run(sizes: list[int], size: int, nbuf: int) -> None:
    g = torch.Generator().manual_seed(len(sizes) * 7919 + size)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    dests = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    bufs = [torch.full((size,), 0xAA, dtype=torch.uint8) for _ in range(nbuf)]
    addresses = [b.data_ptr() for b in bufs]
    copies = [(d, s.data_ptr(), s.numel()) for d, s in zip(dests, sources, strict=True)]
    plan = staging.bounce_plan(copies, size, addresses)
    assert len(plan) == -(-sum(sizes) // size)  # every round but the last is full
    for k, (segments, sends) in enumerate(plan):
        buf, base = bufs[k % nbuf], addresses[k % nbuf]
        assert sum(n for _, _, n in segments) == sum(n for _, _, n in sends) <= size
        for dst, src, n in segments:
            assert base <= dst and dst + n <= base + size
            ctypes.memmove(dst, src, n)
        for view, off, n in sends:
            assert view.numel() == n
            view.copy_(buf[off : off + n])
    for d, s in zip(dests, sources, strict=True):
        assert torch.equal(d, s)


@pytest.mark.parametrize(
    "sizes",
    [[1], [4096], [100, 200, 300], [5000], [4096 * 3 + 1, 7, 4096, 1], [1] * 50, [12345, 1, 9999]],
)
@pytest.mark.parametrize("nbuf", [1, 2, 4])
def test_every_byte_lands_once_through_the_bounce_buffers(sizes: list[int], nbuf: int) -> None:
    _run(sizes, 4096, nbuf)


def test_views_of_a_larger_tensor_are_filled_in_place() -> None:
    whole = torch.zeros(10_000, dtype=torch.uint8)
    src = torch.arange(10_000, dtype=torch.int64).to(torch.uint8)
    halves = [(whole[:3000], src.data_ptr(), 3000), (whole[3000:], src.data_ptr() + 3000, 7000)]
    bufs = [torch.empty(1024, dtype=torch.uint8) for _ in range(2)]
    for k, (segments, sends) in enumerate(
        staging.bounce_plan(halves, 1024, [b.data_ptr() for b in bufs])
    ):
        for dst, s, n in segments:
            ctypes.memmove(dst, s, n)
        for view, off, n in sends:
            view.copy_(bufs[k % 2][off : off + n])
    assert torch.equal(whole, src)
