"""Restore into live CUDA tensors through pinned bounce buffers (engine/staging.py
``copy_to_device``): every dtype and shape arrives bit for bit, tensors larger than a buffer and
many small ones alike, a non-contiguous destination too; a damaged file leaves every live CUDA
tensor as it was. Skipped without CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.engine import staging
from savegame.format import layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


class Bag(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.big = torch.nn.Parameter(torch.randn(1 << 20, generator=g))  # 4 MB
        self.register_buffer("fp16", torch.randn(333, 7, generator=g).half())
        self.register_buffer("bf", torch.randn(1000, generator=g).bfloat16())
        self.register_buffer("cplx", torch.randn(17, 3, generator=g, dtype=torch.complex64))
        self.register_buffer("ints", torch.randint(-(2**40), 2**40, (999,), generator=g))
        self.register_buffer("flags", torch.rand(77, generator=g) > 0.5)
        self.register_buffer("empty", torch.empty(0, 5))
        self.register_buffer("scalar", torch.tensor(float(seed)))
        self.register_buffer("strided", torch.randn(64, 48, generator=g).t())  # non-contiguous
        for i in range(40):
            self.register_buffer(f"small{i}", torch.randn(i + 1, generator=g))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if not torch.equal(sa[k].cpu(), sb[k].cpu())]


@pytest.mark.parametrize(
    ("direct", "bounce"),
    [(False, 0), (True, staging.BOUNCE_BYTES), (True, 64 << 10), (True, 4096)],
    ids=["through-host", "direct-32M", "direct-64K", "direct-4K"],
)
def test_every_tensor_arrives_on_the_gpu_bit_for_bit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    direct: bool,
    bounce: int,
) -> None:
    if direct:
        monkeypatch.setenv("SAVEGAME_GPU_DIRECT_RESTORE", "1")
        monkeypatch.setattr(staging, "BOUNCE_BYTES", bounce)
    else:
        monkeypatch.delenv("SAVEGAME_GPU_DIRECT_RESTORE", raising=False)
    caplog.set_level(logging.DEBUG, logger="savegame.reader")
    saved = Bag(1)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=saved, rng=False), 1)
    live = Bag(2).cuda()
    assert not live.strided.is_contiguous()
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=live, rng=False)) == 1
    assert live.big.device.type == "cuda"
    assert _equal(saved, live) == []
    # the path that was meant ran: "N chunks to a GPU" in the reader's phase timings
    phases = [r.getMessage() for r in caplog.records if r.name == "savegame.reader"]
    assert phases, "no restore phase timings logged"
    assert (" 0 chunks to a GPU" not in phases[-1]) == direct, phases[-1]


@pytest.mark.parametrize("direct", [False, True], ids=["through-host", "direct"])
def test_a_damaged_file_leaves_the_live_cuda_tensors_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    monkeypatch.setenv("SAVEGAME_GPU_DIRECT_RESTORE", "1" if direct else "0")
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        ck.save(sg.TrainState(model=Bag(1), rng=False), 1)
    shard = next((tmp_path / "run" / layout.step_dir(1)).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in the last tensor's bytes
    shard.write_bytes(bytes(data))
    live = Bag(2).cuda()
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        with pytest.warns(sg.errors.CorruptCheckpointWarning) as seen:
            assert ck.restore(sg.TrainState(model=live, rng=False)) == 0  # none left: fresh
    assert any("does not match its hash" in str(w.message) for w in seen)
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())
