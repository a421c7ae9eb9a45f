"""Exact resume of a training loop on CUDA: dropout draws from the CUDA generator, fused and
foreach Adam keep their moments on the GPU, a shuffled loader is mid-epoch at the save; the
resumed run must equal the uninterrupted one bit for bit (deterministic kernels on). Skipped
without CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame as sg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

STEPS, SAVE_AT = 30, 13


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _build(seed: int, impl: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(128, 4)
    ).cuda()
    kw = {"fused": True} if impl == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)
    g = torch.Generator().manual_seed(7)
    data = TensorDataset(
        torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)
    )
    loader = StatefulDataLoader(data, batch_size=32, shuffle=True)
    return model, opt, loader


def _train(model: Any, opt: Any, loader: Any, state: sg.TrainState, ck: Any, start: int) -> None:
    it = iter(loader)
    for step in range(start + 1, STEPS + 1):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        loss = torch.nn.functional.cross_entropy(model(xb.cuda()), yb.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ck is not None and step == SAVE_AT:
            handle = ck.save_async(state, step)  # pinned staging on the side stream
            assert handle is not None
            handle.result(timeout=60)


def _snapshot(model: Any, opt: Any) -> dict[str, torch.Tensor]:
    out = {f"m/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        out.update({f"o/{pid}/{k}": v.detach().cpu().clone() for k, v in s.items()})
    out["cuda_rng"] = torch.cuda.get_rng_state()
    out["cpu_rng"] = torch.get_rng_state()
    out["next_cuda_draw"] = torch.rand(8, device="cuda").cpu()
    return out


@pytest.mark.parametrize("direct", ["0", "1"], ids=["through-host", "direct"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_cuda_training_resumes_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str, direct: str
) -> None:
    monkeypatch.setenv("SAVEGAME_GPU_DIRECT_RESTORE", direct)  # engine/reader.py gpu_direct
    model, opt, loader = _build(0, impl)
    state = sg.TrainState(model=model, optimizer=opt, loader=loader)
    with sg.Checkpointer(tmp_path / "run", async_save=True, handle_signals=False) as ck:
        torch.manual_seed(1)
        torch.cuda.manual_seed(1)
        _train(model, opt, loader, state, ck, 0)
    whole = _snapshot(model, opt)

    model2, opt2, loader2 = _build(99, impl)  # other weights, other generators: all restored
    torch.cuda.manual_seed(12345)
    state2 = sg.TrainState(model=model2, optimizer=opt2, loader=loader2)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ck:
        assert ck.restore(state2) == SAVE_AT
    assert next(model2.parameters()).device.type == "cuda"
    assert opt2.state_dict()["state"][0]["exp_avg"].device.type == "cuda"
    _train(model2, opt2, loader2, state2, None, SAVE_AT)
    resumed = _snapshot(model2, opt2)
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, differ
