"""Restore of many tensors into live ones: chunks are hashed in runs (one pool task each) and the
verified bytes copied in pieces taken by whichever thread is free. Every byte still arrives, a
damaged chunk in the middle of a run is named and reaches no live tensor, and the caller's
``dest`` is asked once per tensor."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from savegame import errors
from savegame.engine import reader, staging, writer
from savegame.format import layout, manifest


def _many(n: int = 600, numel: int = 16_411) -> dict[str, torch.Tensor]:
    """n tensors of ~64 KiB (odd sizes: nothing page-aligned), over staging.SMALL_BYTES in all."""
    g = torch.Generator().manual_seed(3)
    return {f"t{i:04d}": torch.randn(numel + i % 7, generator=g) for i in range(n)}


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_many_tensors_restore_into_live_ones_bit_exact_asking_dest_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _many()
    assert sum(t.numel() * t.element_size() for t in saved.values()) > staging.SMALL_BYTES
    path = writer.write_checkpoint(tmp_path, 1, saved, run_id="r")
    m = reader.read_manifest(path)
    # small runs: many tasks of several chunks each
    monkeypatch.setattr(reader, "_RUN_BYTES", 1 << 20)
    monkeypatch.setitem(staging._defaults, "restore", staging.CopyChoice(["threads"], threads=3))
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    asked: Counter[str] = Counter()

    def dest(key: str, entry: manifest.TensorEntry) -> torch.Tensor:
        asked[key] += 1
        return live[key]

    out = reader.load_tensors(path, m, dest=dest)
    for k, v in saved.items():
        assert out[k] is live[k] and torch.equal(live[k], v), k
    assert asked == Counter(saved.keys())


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_damaged_chunk_inside_a_run_is_named_and_reaches_no_live_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    saved = _many()
    path = writer.write_checkpoint(tmp_path, 1, saved, run_id="r")
    m = reader.read_manifest(path)
    monkeypatch.setattr(reader, "_RUN_BYTES", 1 << 20)
    order = sorted(saved, key=lambda k: m.tensors[k].chunks[0].offset)
    key = {"first": order[0], "middle": order[len(order) // 2 + 3], "last": order[-1]}[where]
    c = m.tensors[key].chunks[0]
    _flip(path / layout.tensor_file(0), c.offset + c.length // 2)
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    with pytest.raises(errors.IntegrityError, match="does not match its hash") as info:
        reader.load_tensors(path, m, dest=lambda k, entry: live[k])
    assert info.value.key == key
    assert all(not t.any() for t in live.values())  # not one byte copied anywhere


def test_runs_cover_the_work_once_in_order_near_the_target_size() -> None:
    def chunk(offset: int, length: int) -> manifest.Chunk:
        return manifest.Chunk(
            file="f", offset=offset, length=length, hash="0" * 32, start=(0,), shape=(length,)
        )

    sizes = [10, 300, 5, 5, 2000, 1, 1, 1, 700, 0, 40]
    work, off = [], 0
    for i, n in enumerate(sizes):
        work.append((f"k{i}", chunk(off, n)))
        off += n
    runs = reader._runs(work, 500)
    assert [w for run in runs for w in run] == work
    for run in runs:
        size = sum(c.length for _, c in run)
        # a run only goes over the target when a single chunk does
        assert size <= 500 or len(run) == 1, run
    assert reader._runs([], 500) == []


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_copy_in_pieces_moves_every_byte_once(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "_PIECE_BYTES", 1 << 16)  # many pieces, cut inside segments
    g = torch.Generator().manual_seed(4)
    srcs = [
        torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)
        for n in (3, 1 << 20, 70_001, 0, 1 << 18, 5)
    ]
    dsts = [torch.zeros_like(s) for s in srcs]
    segs = [(d.data_ptr(), s.data_ptr(), s.numel()) for d, s in zip(dsts, srcs, strict=True)]
    staging._by_threads(segs, threads)
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(d, s)
