"""Staging and async save on a CUDA device: pinned buffers on a side stream, never torn, and a
GPU-saved checkpoint restores on the CPU. Skipped without CUDA (DESIGN.md §2 engine/)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import staging, writer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cuda_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(32, 256, device="cuda")).square().mean().backward()
        opt.step()
    return model, opt


def _tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"optimizer/state/{pid}/{k}"] = v
    return out


def test_pinned_staging_copies_exactly_and_reuses_buffers() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    live = {
        "w": torch.randn(1024, 1024, device="cuda", generator=g),
        "h": torch.randn(333, device="cuda", generator=g).half(),
        "t": torch.randn(64, 32, device="cuda", generator=g).t(),  # non-contiguous
        "cpu": torch.arange(10),
    }
    pool = staging.HostPool()
    staged = pool.stage(live)
    for k, v in live.items():
        assert staged[k].device.type == "cpu"
        assert staged[k].is_pinned() == (v.device.type == "cuda")
        assert torch.equal(staged[k], v.cpu()), k
    ptrs = {k: v.data_ptr() for k, v in staged.items()}
    live["w"].add_(1)
    again = pool.stage(live)
    assert {k: v.data_ptr() for k, v in again.items()} == ptrs
    assert torch.equal(again["w"], live["w"].cpu())


def test_staging_sees_work_queued_on_the_compute_stream() -> None:
    # The side stream must wait for kernels queued before the call (not yet executed).
    x = torch.zeros(4096, 4096, device="cuda")
    for _ in range(20):
        x.add_(1)  # queued asynchronously
    staged = staging.HostPool().stage({"x": x})
    assert torch.all(staged["x"] == 20)


def test_mutating_cuda_tensors_after_save_async_never_reaches_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = writer.write_rank_files
    gate = threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        gate.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "write_rank_files", gated)
    model, opt = _cuda_state()
    before = {k: v.detach().cpu().clone() for k, v in _tensors(model, opt).items()}
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(tmp_path / "run", async_save=True, handle_signals=False) as ck:
        assert ck.save_async(state, 1) is not None
        with torch.no_grad():
            for t in _tensors(model, opt).values():
                t.add_(1000.0)  # queued on the compute stream right after the call returned
        gate.set()
        ck.wait()
    tree = sg.load(tmp_path / "run" / "step-000000000001")
    saved = {f"model/{k}": v for k, v in tree["model"].items()}
    for pid, s in tree["optimizer"]["state"].items():
        saved.update(
            {f"optimizer/state/{pid}/{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
        )
    for k, v in before.items():
        assert torch.equal(saved[k], v), k


def test_gpu_saved_checkpoint_restores_on_cpu_with_cuda_rng_states(tmp_path: Path) -> None:
    model, opt = _cuda_state()
    torch.cuda.manual_seed_all(1234)
    state = sg.TrainState(model=model, optimizer=opt)
    with sg.Checkpointer(tmp_path / "run", async_save=True, handle_signals=False) as ck:
        handle = ck.save_async(state, 7)
        assert handle is not None
        handle.result(timeout=60)
    expected_cuda_draw = torch.randn(8, device="cuda")  # drawn after the save: must replay
    params = {k: v.detach().cpu() for k, v in _tensors(model, opt).items()}

    torch.manual_seed(5)
    cpu_model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)
    )
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=1e-3)
    cpu_state = sg.TrainState(model=cpu_model, optimizer=cpu_opt, rng=False)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        assert ck.restore(cpu_state) == 7  # the CPU-only restore maps every tensor to the CPU
    restored = _tensors(cpu_model, cpu_opt)
    for k, v in params.items():
        assert restored[k].device.type == "cpu" and torch.equal(restored[k], v), k

    torch.cuda.manual_seed_all(99)  # scramble, then restore the RNG states from the checkpoint
    model2, opt2 = _cuda_state()
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        assert ck.restore(sg.TrainState(model=model2, optimizer=opt2)) == 7
    assert torch.equal(torch.randn(8, device="cuda"), expected_cuda_draw)
