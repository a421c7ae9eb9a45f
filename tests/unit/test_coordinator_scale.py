"""The coordinator's commit at many ranks (docs/scale.md): the fixes for its superlinear parts
keep their answers, and a manifest no reader would open is never committed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import reader
from savegame.format import manifest


class _C:
    def error(self, msg: str, key: str | None = None) -> errors.FormatError:
        return errors.FormatError(msg)


def _chunk(start: tuple[int, ...], shape: tuple[int, ...]) -> manifest.Chunk:
    n = 1
    for s in shape:
        n *= s
    return manifest.Chunk(file="rank-00000.safetensors", offset=0, length=4 * n, hash="0" * 32,
                          start=start, shape=shape)  # fmt: skip


def test_column_shards_are_checked_for_overlap() -> None:
    # Shard(1): every chunk starts at row 0, so a sweep on rows alone compares all pairs.
    cols = [_chunk((0, 4 * i), (8, 4)) for i in range(2048)]
    manifest._check_disjoint("w", cols, _C())  # a tiling: accepted
    cols[1000] = _chunk((0, 4 * 1000 - 1), (8, 4))  # overlaps its left neighbour by one column
    with pytest.raises(errors.FormatError, match="overlap"):
        manifest._check_disjoint("w", cols, _C())


def test_a_grid_tiling_is_accepted_and_an_overlap_in_it_refused() -> None:
    grid = [_chunk((4 * r, 4 * c), (4, 4)) for r in range(16) for c in range(16)]
    manifest._check_disjoint("w", grid, _C())
    grid[-1] = _chunk((4 * 15 - 1, 4 * 15), (4, 4))  # one row into the chunk above
    with pytest.raises(errors.FormatError, match="overlap"):
        manifest._check_disjoint("w", grid, _C())


def test_two_chunks_of_a_zero_dimensional_tensor_overlap() -> None:
    with pytest.raises(errors.FormatError, match="overlap"):
        manifest._check_disjoint("s", [_chunk((), ()), _chunk((), ())], _C())
    manifest._check_disjoint("s", [_chunk((), ())], _C())


def test_a_manifest_over_the_readers_limit_is_refused_before_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(4, 4)
    run = tmp_path / "run"
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model), step=1)
        monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 512)
        with torch.no_grad():
            model.weight.add_(1.0)
        with pytest.raises(errors.EncodeError, match="over the 512-byte limit"):
            ck.save(sg.TrainState(model=model), step=2)
    monkeypatch.undo()
    refs = reader.list_checkpoints(run)
    assert [r.step for r in refs if r.valid] == [1]
    assert not any(p.name.startswith(".tmp-") for p in run.iterdir())
