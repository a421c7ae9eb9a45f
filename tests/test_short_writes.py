"""Every byte the manifest promises is on disk: short writes, EFBIG and tensors over 2 GiB.

Issue 9.1: the writer ignored the count ``write(2)`` returns. Linux writes at most 0x7ffff000
bytes per call, and a file-size limit or a full disk end in a short count, so a tensor over
2 GiB was silently truncated and every checkpoint of such a state was unrestorable while
``save`` reported success.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.engine import reader
from savegame.format import tensors


class _Trickle(io.RawIOBase):
    """A raw file that accepts at most ``most`` bytes per ``write`` (like write(2) may)."""

    def __init__(self, most: int) -> None:
        self.buf = bytearray()
        self.most = most
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:  # type: ignore[override]
        self.calls += 1
        chunk = bytes(memoryview(b))[: self.most]  # type: ignore[arg-type]
        self.buf += chunk
        return len(chunk)


def test_write_all_completes_after_short_writes() -> None:
    f = _Trickle(most=7)
    data = bytes(range(256)) * 4
    tensors.write_all(f, memoryview(data))  # type: ignore[arg-type]
    assert bytes(f.buf) == data
    assert f.calls == -(-len(data) // 7)


def test_write_all_raises_when_no_progress_is_made() -> None:
    f = _Trickle(most=0)
    with pytest.raises(OSError) as info:
        tensors.write_all(f, memoryview(b"abc"))  # type: ignore[arg-type]
    assert info.value.errno == errno.EIO


def test_tensor_file_written_through_short_writes_reads_back_bitwise() -> None:
    items = [("a", torch.arange(1000, dtype=torch.float64)), ("b", torch.arange(77, dtype=torch.int8))]
    f = _Trickle(most=100)
    header, written = tensors.write_tensor_file(f, tensors.order_for_file(items))  # type: ignore[arg-type]
    raw = bytes(f.buf)
    assert len(raw) == len(header) + sum(w.length for w in written)
    for (key, t), w in zip(tensors.order_for_file(items), written, strict=True):
        back = torch.frombuffer(bytearray(raw[w.offset : w.offset + w.length]), dtype=t.dtype)
        assert torch.equal(back, t), key


# A child process with a file-size limit (RLIMIT_FSIZE): write(2) then returns a short count at
# the limit and EFBIG after it (CPython ignores SIGXFSZ, so the process is not killed). The
# limit falls inside the *last* tensor of the second save: the old writer reported success.
_FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, savegame as sg
    root = sys.argv[1]
    holder = {"w": torch.full((1 << 18,), 1.0)}           # 1 MiB of float32
    state = sg.TrainState(rng=False, extras=holder)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=3), handle_signals=False)
    ckpt.save(state, 1)                                    # fits
    limit = 3 << 19                                        # 1.5 MiB: the next file crosses it
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    holder["w"] = torch.full((1 << 19,), 2.0)              # 2 MiB
    try:
        ckpt.save(state, 2)
    except sg.StorageError as exc:
        print("STORAGE_ERROR", exc)
        ckpt.close()
        sys.exit(0)
    print("SAVED")
    sys.exit(1)
    """
)


def test_file_size_limit_fails_the_save_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(root)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "STORAGE_ERROR" in out.stdout
    assert "file-size limit" in out.stdout or "File too large" in out.stdout
    refs = reader.list_checkpoints(root)
    assert [r.step for r in refs] == [1]  # step 2 never committed
    assert reader.verify(refs[0].path) == []
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # no half-written folder
    holder = {"w": torch.zeros(1 << 18)}
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        assert ckpt.restore(sg.TrainState(rng=False, extras=holder)) == 1
    assert torch.equal(holder["w"], torch.full((1 << 18,), 1.0))


def test_file_shorter_than_written_is_never_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write path that loses bytes without an error (the old bug's shape) fails the save."""
    real = tensors.write_all

    def lossy(f: object, data: memoryview) -> None:
        real(f, data[: max(0, len(data) - 1)])  # type: ignore[arg-type]

    monkeypatch.setattr(tensors, "write_all", lossy)
    holder = {"w": torch.ones(1000)}
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        with pytest.raises(sg.StorageError, match="expected"):
            ckpt.save(sg.TrainState(rng=False, extras=holder), 1)
    assert reader.list_checkpoints(tmp_path / "run") == []


@pytest.mark.slow
def test_tensor_over_2_gib_saves_and_restores_bitwise(tmp_path: Path) -> None:
    numel = (2 << 30) + (1 << 20)  # 2 GiB + 1 MiB of uint8: one write(2) cannot take it
    big = torch.empty(numel, dtype=torch.uint8)
    big[: 1 << 20] = 7
    big[-(1 << 20) :] = 9  # the tail is what a truncation loses
    holder = {"emb": big}
    root = tmp_path / "run"
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        ckpt.save(sg.TrainState(rng=False, extras=holder), 1)
    (ref,) = reader.list_checkpoints(root)
    assert ref.manifest is not None
    assert os.path.getsize(ref.path / "rank-00000.safetensors") == ref.manifest.files["rank-00000.safetensors"].size
    del holder["emb"]
    back = {"emb": torch.zeros(1)}
    with sg.Checkpointer(root, handle_signals=False) as ckpt:
        assert ckpt.restore(sg.TrainState(rng=False, extras=back)) == 1
    assert back["emb"].numel() == numel
    assert torch.equal(back["emb"], big)
