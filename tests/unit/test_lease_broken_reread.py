"""A read lease broken during a restore (another process opened a checkpoint file for writing
or is truncating it): the mapped read stops, and the checkpoint is read again without mapping
it, every hash checked. An intact checkpoint is restored, not skipped; a changed one fails with
a typed error and reaches no live tensor; the distributed ``before_copy`` agreement runs once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from savegame import errors
from savegame.engine import reader, writer
from savegame.storage import local


def _saved() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f"t{i}": torch.randn(70_000 + i, generator=g) for i in range(6)}


def _breaking(monkeypatch: pytest.MonkeyPatch, now: Any, leases: list[int]) -> None:
    """Every lease's check reports the lease broken once ``now()`` is true."""
    real = local._LocalBlob.lease

    def lease(self: local._LocalBlob) -> Any:
        check = real(self)
        if check is None:
            return None
        leases.append(1)

        def broken() -> None:
            if now():
                raise errors._LeaseBroken(
                    f"{self._path}: another process is truncating or writing this file"
                )
            check()

        return broken

    monkeypatch.setattr(local._LocalBlob, "lease", lease)


def _restore(
    path: Path, live: dict[str, torch.Tensor], agreed: list[int]
) -> dict[str, torch.Tensor]:
    m = reader.read_manifest(path)
    return reader.load_tensors(
        path, m, dest=lambda k, e: live[k], before_copy=lambda: agreed.append(1)
    )


@pytest.mark.parametrize("when", ["while-hashing", "after-the-agreement"])
def test_an_intact_checkpoint_is_read_again_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    saved = _saved()
    path = writer.write_checkpoint(tmp_path, 1, saved, run_id="r")
    leases: list[int] = []
    agreed: list[int] = []
    _breaking(
        monkeypatch, (lambda: True) if when == "while-hashing" else (lambda: bool(agreed)), leases
    )
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    out = _restore(path, live, agreed)
    assert leases, "the first read was not mapped under a lease"
    assert agreed == [1]  # the other ranks are told once, never twice
    for k, v in saved.items():
        assert torch.equal(out[k], v) and out[k] is live[k]


def test_a_changed_file_fails_the_second_read_and_reaches_no_live_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _saved()
    path = writer.write_checkpoint(tmp_path, 1, saved, run_id="r")
    data = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF  # what the process that broke the lease wrote
    data.write_bytes(bytes(raw))
    _breaking(monkeypatch, lambda: True, [])
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    with pytest.raises(errors.StorageError, match="Read again without mapping it") as exc:
        _restore(path, live, [])
    assert "another process is truncating or writing" in str(exc.value)
    assert isinstance(exc.value.__cause__, errors.IntegrityError)
    assert all(not v.any() for v in live.values())
