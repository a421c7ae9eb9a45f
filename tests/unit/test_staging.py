"""HostPool: a snapshot is a copy, taken once into buffers that are reused across saves."""

from __future__ import annotations

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
