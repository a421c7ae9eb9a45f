"""HostPool's copy of contiguous CPU tensors: every method copies the same bytes, the choice
between them is made by measuring real snapshots, and the pool's guarantees hold throughout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from savegame import errors
from savegame.engine import reader, staging, writer
from savegame.format import layout


def _big_state(mib: int = 40) -> dict[str, torch.Tensor]:
    """Over staging.SMALL_BYTES, in tensors of odd sizes and several dtypes (cuts fall inside
    tensors and between them)."""
    g = torch.Generator().manual_seed(1)
    n = (mib << 20) // 4
    return {
        "w": torch.randn(n // 2 + 3, generator=g),
        "h": torch.randn(n // 4 + 1, generator=g).to(torch.float16),
        "m": torch.rand(n // 3 + 7, generator=g) > 0.5,
        "c": torch.complex(torch.randn(1001, generator=g), torch.randn(1001, generator=g)),
        "i": torch.randint(0, 1 << 40, (n // 8 + 5,), generator=g, dtype=torch.int64),
        "step": torch.tensor(3.0),
        "empty": torch.empty(0, 4),
    }


def _assert_snapshot(staged: dict[str, torch.Tensor], expect: dict[str, torch.Tensor]) -> None:
    assert staged.keys() == expect.keys()
    for k, v in expect.items():
        assert staged[k].dtype == v.dtype and staged[k].shape == v.shape, k
        assert torch.equal(staged[k], v), k


@pytest.mark.parametrize("method", staging.METHODS)
def test_every_method_stages_a_bitwise_snapshot_that_mutation_cannot_change(method: str) -> None:
    live = _big_state()
    assert sum(t.numel() * t.element_size() for t in live.values()) > staging.SMALL_BYTES
    pool = staging.HostPool(pin=False, choice=staging.CopyChoice([method], threads=3))
    for i in range(3):  # first into fresh buffers, then reused ones
        before = {k: v.clone() for k, v in live.items()}
        staged = pool.stage(live)
        for t in live.values():
            if t.numel():
                t.copy_(~t if t.dtype == torch.bool else t + 1)
        _assert_snapshot(staged, before)
        assert pool.nbytes == sum(v.numel() * v.element_size() for v in before.values()), i


def test_while_undecided_a_snapshot_is_split_between_the_methods_and_is_still_whole() -> None:
    choice = staging.CopyChoice(trials=2, threads=2)
    pool = staging.HostPool(pin=False, choice=choice)
    live = _big_state()
    nbytes = sum(t.numel() * t.element_size() for t in live.values())
    pool.stage(live)  # into new buffers: their page faults would be measured, so it is not
    assert choice.rates(nbytes) == {} and choice.chosen(nbytes) is None
    for _ in range(2):
        assert choice.chosen(nbytes) is None
        for t in live.values():
            if t.numel():
                t.copy_(~t if t.dtype == torch.bool else t * 2)
        expect = {k: v.clone() for k, v in live.items()}
        _assert_snapshot(pool.stage(live), expect)
        assert set(choice.rates(nbytes)) == set(choice.methods)
    chosen = choice.chosen(nbytes)
    rates = choice.rates(nbytes)
    best = max(rates, key=lambda m: rates[m])  # the fastest per byte, or memmove if as fast
    assert chosen == best or (chosen == "memmove" and rates["memmove"] * 1.05 >= rates[best])


def test_memmove_is_kept_unless_another_method_is_clearly_faster() -> None:
    assert staging._pick({"memmove": 5.0, "threads": 5.2, "torch": 4.0}) == "memmove"
    assert staging._pick({"memmove": 5.0, "threads": 6.0, "torch": 5.5}) == "threads"
    assert staging._pick({"threads": 6.0, "torch": 6.1}) == "torch"


def test_the_choice_is_per_size_class_and_small_snapshots_are_one_memmove() -> None:
    choice = staging.CopyChoice(trials=1)
    assert choice.chosen(1 << 20) == "memmove"
    small = {"a": torch.randn(1000)}
    staging.HostPool(pin=False, choice=choice).stage(small)  # measures nothing
    pool = staging.HostPool(pin=False, choice=choice)
    live = _big_state()
    nbytes = sum(t.numel() * t.element_size() for t in live.values())
    pool.stage(live)  # new buffers: not measured
    assert choice.chosen(nbytes) is None
    pool.stage(live)
    assert choice.chosen(nbytes) in choice.methods
    assert choice.chosen(nbytes * 4) is None  # another size class is measured on its own


def test_a_recheck_measures_again_and_keeps_copying_correctly() -> None:
    choice = staging.CopyChoice(trials=1, recheck=2, threads=2)
    pool = staging.HostPool(pin=False, choice=choice)
    live = _big_state()
    nbytes = sum(t.numel() * t.element_size() for t in live.values())
    pool.stage(live)  # new buffers: not measured
    for i in range(6):
        live["w"].add_(1.0)
        _assert_snapshot(pool.stage(live), {k: v.clone() for k, v in live.items()})
        assert choice.chosen(nbytes) in choice.methods, i
    assert set(choice.rates(nbytes)) == set(choice.methods)


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(ValueError, match="copy methods"):
        staging.CopyChoice(["rsync"])


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_cut_covers_every_byte_once_in_order(parts: int) -> None:
    segs = [(10_000, 900_000, 10_000), (50_000, 950_000, 3), (70_000, 980_000, 3 * 8192 + 5)]
    shares = staging._cut(segs, parts, 4096)
    assert len(shares) == parts
    flat = [s for share in shares for s in share]
    covered = [(d + k, s + k) for d, s, n in flat for k in range(n)]
    expect = [(d + k, s + k) for d, s, n in segs for k in range(n)]
    assert covered == expect
    sizes = [sum(n for _, _, n in share) for share in shares]
    total = sum(n for _, _, n in segs)
    # each cut moves by at most half the alignment: shares stay near equal
    assert all(abs(size - total / parts) <= 4096 + 1 for size in sizes), sizes


def _restore_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "a": torch.randn(5 << 20, generator=g),  # 20 MiB
        "b": torch.randn(3 << 20, generator=g).to(torch.bfloat16),
        "c": torch.complex(torch.randn(1 << 20, generator=g), torch.randn(1 << 20, generator=g)),
        "m": torch.rand(3 << 20, generator=g) > 0.5,
        "z": torch.randn(4 << 20, generator=g),
    }


def test_restore_into_live_tensors_copies_every_byte_by_the_measured_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _restore_state()
    assert sum(t.numel() * t.element_size() for t in saved.values()) > staging.SMALL_BYTES
    path = writer.write_checkpoint(tmp_path, 1, saved, run_id="r")
    m = reader.read_manifest(path)
    choice = staging.CopyChoice(trials=1, threads=2)
    monkeypatch.setitem(staging._defaults, "restore", choice)
    for _ in range(3):  # measured, chosen, then by the chosen method
        live = {k: torch.zeros_like(v) for k, v in saved.items()}
        out = reader.load_tensors(path, m, dest=lambda key, entry, live=live: live[key])
        for k, v in saved.items():
            assert out[k] is live[k] and torch.equal(live[k], v), k
    assert choice.chosen(sum(t.numel() * t.element_size() for t in saved.values())) is not None


def test_a_corrupt_tensor_reaches_no_live_tensor_of_a_large_restore(tmp_path: Path) -> None:
    saved = _restore_state()
    path = writer.write_checkpoint(tmp_path, 1, saved, run_id="r")
    m = reader.read_manifest(path)
    f = path / layout.tensor_file(0)
    c = m.tensors["z"].chunks[0]
    with open(f, "r+b") as fh:  # flip one byte of the last tensor in the file
        fh.seek(c.offset + c.length - 1)
        last = fh.read(1)
        fh.seek(c.offset + c.length - 1)
        fh.write(bytes([last[0] ^ 0xFF]))
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    with pytest.raises(errors.IntegrityError, match="'z'"):
        reader.load_tensors(path, m, dest=lambda key, entry: live[key])
    for k, v in live.items():
        assert not v.any(), k  # nothing applied before every hash matched
