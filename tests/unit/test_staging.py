"""HostPool: a snapshot is a copy, taken once into buffers that are reused across saves."""

from __future__ import annotations

import itertools

import pytest
import torch

from savegame.engine import staging


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g).to(torch.bfloat16),
        "mask": torch.rand(10, generator=g) > 0.5,
        "step": torch.tensor(7.0),  # 0-dim, like Adam's step
        "empty": torch.empty(0, 3),
        "ids": torch.arange(5, dtype=torch.int64),
    }


def test_stage_returns_bitwise_copy_that_later_mutation_cannot_change() -> None:
    live = _state()
    before = {k: v.clone() for k, v in live.items()}
    pool = staging.HostPool(pin=False)
    staged = pool.stage(live)
    for t in live.values():  # mutate every live tensor in place
        if t.numel():
            t.copy_(torch.zeros_like(t) if t.dtype != torch.bool else ~t)
    assert staged.keys() == before.keys()
    for k, v in before.items():
        assert staged[k].dtype == v.dtype and staged[k].shape == v.shape
        assert torch.equal(staged[k], v), k
        assert staged[k].data_ptr() != live[k].data_ptr() or v.numel() == 0


def test_buffers_are_reused_across_saves_and_nbytes_is_constant() -> None:
    live = _state()
    pool = staging.HostPool(pin=False)
    first = pool.stage(live)
    ptrs = {k: v.data_ptr() for k, v in first.items()}
    size = pool.nbytes
    assert size == sum(t.numel() * t.element_size() for t in live.values())
    for i in range(5):
        live["w"].add_(1.0)
        again = pool.stage(live)
        assert {k: v.data_ptr() for k, v in again.items()} == ptrs
        assert pool.nbytes == size
        assert torch.equal(again["w"], live["w"]), i


def test_changed_shape_reallocates_and_dropped_keys_free_their_buffer() -> None:
    pool = staging.HostPool(pin=False)
    pool.stage({"a": torch.ones(4), "b": torch.ones(8)})
    staged = pool.stage({"a": torch.full((6,), 2.0)})
    assert list(staged) == ["a"]
    assert torch.equal(staged["a"], torch.full((6,), 2.0))
    assert pool.nbytes == 6 * 4


def test_non_contiguous_sources_stage_to_contiguous_buffers() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    live = {"t": base.t(), "slice": base[:, ::2]}
    staged = staging.HostPool(pin=False).stage(live)
    for k, v in live.items():
        assert staged[k].is_contiguous()
        assert torch.equal(staged[k], v)


def test_requires_grad_parameters_stage_without_autograd() -> None:
    p = torch.nn.Parameter(torch.randn(3, 3))
    staged = staging.HostPool(pin=False).stage({"p": p})
    assert not staged["p"].requires_grad
    with torch.no_grad():
        p.mul_(0)
    assert staged["p"].abs().sum() > 0


def test_conj_and_neg_views_stage_their_values_not_their_base_bytes() -> None:
    z = torch.complex(torch.randn(8), torch.randn(8))
    live = {"conj": z.conj(), "neg": torch._neg_view(torch.randn(8))}
    staged = staging.HostPool(pin=False).stage(live)
    for k, v in live.items():
        assert torch.equal(staged[k], v.resolve_conj().resolve_neg()), k


# ---- reserve: the first snapshot's memory faulted in ahead of it ---------------------------------


def _in(buf: torch.Tensor, arena: torch.Tensor) -> bool:
    lo = arena.data_ptr()
    return lo <= buf.data_ptr() < lo + arena.numel()


def test_a_reserved_pool_carves_the_first_snapshot_from_memory_touched_ahead() -> None:
    live = _state()
    before = {k: v.clone() for k, v in live.items()}
    pool = staging.HostPool(pin=False)
    pool.reserve(1 << 20)
    staged = pool.stage(live)
    arena = pool._arena
    assert arena is not None
    assert all(_in(b, arena) for k, b in staged.items() if b.numel()), "carved from the reserve"
    ptrs = sorted((b.data_ptr(), b.numel() * b.element_size()) for b in staged.values())
    for (a, n), (b, _) in itertools.pairwise(ptrs):  # no two buffers overlap
        assert a + n <= b
    assert all(b.data_ptr() % 64 == 0 for b in staged.values() if b.numel())
    for t in live.values():  # the snapshot is a copy: later mutation cannot reach it
        if t.numel():
            t.copy_(torch.zeros_like(t) if t.dtype != torch.bool else ~t)
    for k, v in before.items():
        assert staged[k].dtype == v.dtype and staged[k].shape == v.shape
        assert torch.equal(staged[k], v), k
    again = pool.stage(live)  # the next snapshot reuses the same buffers
    assert all(again[k].data_ptr() == staged[k].data_ptr() for k in live)
    assert all(torch.equal(again[k], live[k]) for k in live)


def test_a_reserve_smaller_than_the_snapshot_carves_what_fits_and_allocates_the_rest() -> None:
    live = {"a": torch.arange(1000.0), "b": torch.arange(5000.0), "c": torch.arange(10.0)}
    pool = staging.HostPool(pin=False)
    pool.reserve(4096 + 64)  # room for "a" (4000 bytes) and "c", not for "b"
    staged = pool.stage(live)
    arena = pool._arena
    assert arena is not None
    assert _in(staged["a"], arena) and not _in(staged["b"], arena)
    assert all(torch.equal(staged[k], live[k]) for k in live)


def test_a_reserve_that_cannot_get_memory_leaves_the_first_snapshot_to_allocate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_empty = torch.empty

    def no_memory(*a: object, **kw: object) -> torch.Tensor:
        if kw.get("dtype") is torch.uint8:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")
        return real_empty(*a, **kw)  # type: ignore[arg-type]

    pool = staging.HostPool(pin=False)
    monkeypatch.setattr(torch, "empty", no_memory)
    pool.reserve(1 << 20)
    live = _state()
    staged = pool.stage(live)
    monkeypatch.undo()
    assert pool._arena is None
    assert all(torch.equal(staged[k], live[k]) for k in live)


def test_reserve_is_once_per_pool_and_ignores_nothing_to_reserve() -> None:
    pool = staging.HostPool(pin=False)
    pool.reserve(0)
    assert pool._reserving is None
    pool.reserve(4096)
    first = pool._reserving
    pool.reserve(1 << 20)
    assert pool._reserving is first
