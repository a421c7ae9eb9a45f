"""Outside review (s14): a flipped bit in the header of a checkpoint's own tensor file, full
versus incremental. README "Incremental saves": "restore and `savegame verify` check exactly the
same bytes as for a full checkpoint"; "Damaged checkpoints": a checkpoint that fails
verification is skipped by restore() with a CorruptCheckpointWarning.

An incremental save of an unchanged state writes a tensor file that holds only its header (every
tensor refers to the previous checkpoint's bytes). A bit flipped in that header is found by
`savegame verify`; restore must find it too, as it does for a full checkpoint.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.cli.main import main


def _run(root: Path, *, incremental: bool) -> sg.TrainState:
    torch.manual_seed(0)
    state = sg.TrainState(model=torch.nn.Linear(3, 2))
    with sg.Checkpointer(root, incremental=incremental) as c:
        c.save(state, 1)
        c.save(state, 2)  # nothing changed: incremental step 2 refers to step 1's bytes
    return state


def _flip_last_header_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n - 1] ^= 1  # header padding (a space): no tensor byte changes
    path.write_bytes(bytes(raw))


def _restore(root: Path, state: sg.TrainState) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with sg.Checkpointer(root) as c:
            step = c.restore(state)
    return step, [
        str(w.message) for w in seen if issubclass(w.category, sg.CorruptCheckpointWarning)
    ]


def test_full_checkpoint_with_a_flipped_header_bit_is_skipped_by_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    state = _run(root, incremental=False)
    _flip_last_header_byte(root / "step-000000000002" / "rank-00000.safetensors")
    assert main(["verify", str(root / "step-000000000002")]) == 1
    capsys.readouterr()
    step, warned = _restore(root, state)
    assert step == 1 and any("step-000000000002" in m for m in warned), warned


def test_incremental_checkpoint_with_a_flipped_header_bit_is_skipped_like_a_full_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    state = _run(root, incremental=True)
    own = root / "step-000000000002" / "rank-00000.safetensors"
    _flip_last_header_byte(own)
    assert main(["verify", str(root / "step-000000000002")]) == 1  # verify finds it (works)
    capsys.readouterr()
    step, warned = _restore(root, state)
    assert step == 1 and any("step-000000000002" in m for m in warned), (
        f"restore() used step {step} although verify fails it; warnings: {warned}"
    )
