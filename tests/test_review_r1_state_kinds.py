"""Review R1: exact resume with training-state kinds a real user has.

Each test trains a tiny model N steps uninterrupted, then again: k steps, ``Checkpointer.save``,
every global RNG scrambled, a FRESH set of objects built the same way (as after a process
restart), ``restore()``, continue to N. The per-step trace (loss bits, learning rates, ...) and
every object's final ``state_dict()`` must be bitwise equal to the uninterrupted run's.

Kinds covered here and not by tests/test_outside_s16_loops_recipes.py: Adafactor, MultiStepLR
(alone and inside SequentialLR), Muon / Adamax / Adadelta, SparseAdam over a sparse embedding next
to a dense Adam, bf16 / fp16 / complex64 parameters, a tensor learning rate (fused and not),
named param groups with per-group betas and OneCycleLR max_lr lists, channels_last conv + BN,
AveragedModel(use_buffers=True) + SWALR, a module's extra state, a torch.ao QAT model, a lazy
module restored before its dry run, identical moments of twin layers (no aliasing after the
restore), and restores into live objects that trained past the checkpoint (frozen layers later
unfrozen; a step-0 checkpoint; a GradScaler with skipped steps).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs
from torch.optim import swa_utils

import savegame as sg

Build = Callable[[], tuple[dict[str, Any], Callable[[int], Any]]]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _canon(x: Any) -> Any:
    """A bitwise-comparable form of a trace value or a state tree."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        if t.is_sparse:
            t = t.coalesce()
            return ("sparse", _canon(t.indices()), _canon(t.values()), tuple(t.shape))
        raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1)
        return (str(t.dtype), tuple(t.shape), bytes(raw.numpy().tobytes()))
    if isinstance(x, float):
        return ("f", x.hex())
    if isinstance(x, dict):
        return ("d", tuple((repr(k), _canon(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_canon(v) for v in x))
    if isinstance(x, np.ndarray):
        return ("np", str(x.dtype), x.shape, x.tobytes())
    return x


def _states(objs: dict[str, Any]) -> dict[str, Any]:
    return {n: _canon(dict(o) if isinstance(o, dict) else o.state_dict()) for n, o in objs.items()}


def _scramble() -> None:
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)


def _first_diff(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for name in a:
        if a[name] != b.get(name):
            return name
    return None


def check_resume(tmp_path: Path, build: Build, total: int = 7, k: int = 3) -> None:
    objs, fn = build()
    torch.manual_seed(1)
    ref = [_canon(fn(s)) for s in range(total)]
    ref_state = _states(objs)

    objs, fn = build()
    torch.manual_seed(1)
    for s in range(k):
        fn(s)
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(sg.TrainState(**objs), k)
    del objs, fn

    _scramble()
    objs, fn = build()
    _scramble()
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.restore(sg.TrainState(**objs)) == k
    got = [_canon(fn(s)) for s in range(k, total)]
    bad = next((s for s, (a, b) in enumerate(zip(ref[k:], got, strict=True), k) if a != b), None)
    assert bad is None, f"step {bad}: resumed trace differs from the uninterrupted run"
    state = _states(objs)
    assert _first_diff(ref_state, state) is None, f"final {_first_diff(ref_state, state)} differs"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _plain(make_opt: Callable[[nn.Module], torch.optim.Optimizer], dtype: Any = None) -> Build:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = _mlp() if dtype is None else _mlp().to(dtype)
        opt = make_opt(model)

        def fn(s: int) -> Any:
            x = torch.randn(5, 4)
            loss = model(x if dtype is None else x.to(dtype)).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        return {"model": model, "optimizer": opt}, fn

    return build


def _with_sched(make_sched: Callable[[torch.optim.Optimizer], Any]) -> Build:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = make_sched(opt)

        def fn(s: int) -> Any:
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            return loss.detach(), [g["lr"] for g in opt.param_groups]

        return {"model": model, "optimizer": opt, "scheduler": sched}, fn

    return build


# --- optimizers -----------------------------------------------------------------------------


def test_adafactor_resumes_exactly(tmp_path: Path) -> None:
    check_resume(tmp_path, _plain(lambda m: torch.optim.Adafactor(m.parameters(), lr=0.01)))


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "muon": lambda m: torch.optim.Muon([p for p in m.parameters() if p.dim() == 2], lr=0.02),
    "adamax": lambda m: torch.optim.Adamax(m.parameters(), lr=0.01, weight_decay=0.01),
    "adadelta": lambda m: torch.optim.Adadelta(m.parameters(), lr=0.5),
    "adam_maximize_amsgrad": lambda m: torch.optim.Adam(
        m.parameters(), lr=0.01, maximize=True, amsgrad=True, foreach=False
    ),
    "sgd_nesterov_wd_foreach": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_more_builtin_optimizers_resume_exactly(tmp_path: Path, name: str) -> None:
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs a newer torch")
    check_resume(tmp_path, _plain(OPTIMIZERS[name]))


def test_sparse_embedding_with_sparse_adam_next_to_a_dense_adam_resumes_exactly(
    tmp_path: Path,
) -> None:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        emb, head = nn.Embedding(20, 4, sparse=True), nn.Linear(4, 2)
        sparse = torch.optim.SparseAdam(list(emb.parameters()), lr=0.01)
        dense = torch.optim.Adam(head.parameters(), lr=0.01)

        def fn(s: int) -> Any:
            loss = head(emb(torch.randint(0, 20, (6,)))).pow(2).mean()
            sparse.zero_grad()
            dense.zero_grad()
            loss.backward()
            sparse.step()
            dense.step()
            return loss.detach()

        return {"emb": emb, "head": head, "sparse_opt": sparse, "dense_opt": dense}, fn

    check_resume(tmp_path, build)


@pytest.mark.parametrize(
    "kind",
    [
        "bf16-adamw-fused",
        "bf16-sgd-nesterov",
        "fp16-sgd",
        "complex64-adam-foreach",
        "complex64-rmsprop",
    ],
)
def test_low_precision_and_complex_parameters_resume_exactly(tmp_path: Path, kind: str) -> None:
    if kind.startswith("complex"):

        def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
            torch.manual_seed(0)
            model = nn.ParameterDict({"w": nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))})
            if kind == "complex64-adam-foreach":
                opt: torch.optim.Optimizer = torch.optim.Adam(
                    model.parameters(), lr=0.01, foreach=True
                )
            else:
                opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5, centered=True)

            def fn(s: int) -> Any:
                x = torch.randn(5, 3, dtype=torch.complex64)
                loss = (x @ model["w"]).abs().pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                return loss.detach()

            return {"model": model, "optimizer": opt}, fn

        check_resume(tmp_path, build)
        return
    dtype = torch.bfloat16 if kind.startswith("bf16") else torch.float16
    make = {
        "bf16-adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True),
        "bf16-sgd-nesterov": lambda m: torch.optim.SGD(
            m.parameters(), lr=0.05, momentum=0.9, nesterov=True
        ),
        "fp16-sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    }[kind]
    check_resume(tmp_path, _plain(make, dtype))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-off", "fused"])
def test_a_tensor_learning_rate_with_lambda_lr_resumes_exactly(tmp_path: Path, fused: bool) -> None:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.Adam(
            model.parameters(), lr=torch.tensor(0.01), fused=fused, foreach=None if fused else False
        )
        sched = lrs.LambdaLR(opt, lambda s: 0.9**s)

        def fn(s: int) -> Any:
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            return loss.detach(), opt.param_groups[0]["lr"].clone()

        return {"model": model, "optimizer": opt, "scheduler": sched}, fn

    check_resume(tmp_path, build)


def test_named_param_groups_with_own_betas_and_onecycle_per_group_max_lr_resume_exactly(
    tmp_path: Path,
) -> None:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.AdamW(
            [
                {"params": model[0].parameters(), "lr": 0.001, "weight_decay": 0.1, "name": "body"},
                {"params": model[2].parameters(), "name": "head", "betas": (0.8, 0.9)},
            ],
            lr=0.01,
            weight_decay=0.0,
        )
        sched = lrs.OneCycleLR(opt, max_lr=[0.01, 0.1], total_steps=10, three_phase=True)

        def fn(s: int) -> Any:
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            return loss.detach(), [(g["lr"], g["betas"], g["name"]) for g in opt.param_groups]

        return {"model": model, "optimizer": opt, "scheduler": sched}, fn

    check_resume(tmp_path, build)


def test_a_dict_of_optimizers_is_refused_at_save_with_a_typed_error_naming_it(
    tmp_path: Path,
) -> None:
    """README: objects that would need pickle are refused with an error naming where they are."""
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    opts = {
        "g": torch.optim.Adam(gen.parameters()),
        "d": torch.optim.SGD(disc.parameters(), lr=0.1),
    }
    with sg.Checkpointer(tmp_path / "run") as ckpt, pytest.raises(sg.EncodeError) as err:
        ckpt.save(sg.TrainState(gen=gen, disc=disc, opts=opts), 1)
    assert "opts/" in str(err.value)
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.restore(sg.TrainState(gen=gen, disc=disc, opts={})) == 0  # nothing committed


# --- schedulers -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["alone", "in-sequential", "in-chained"])
def test_multistep_lr_resumes_exactly(tmp_path: Path, where: str) -> None:
    make: Callable[[torch.optim.Optimizer], Any] = {
        "alone": lambda o: lrs.MultiStepLR(o, milestones=[4, 5, 5], gamma=0.5),
        "in-sequential": lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, 0.1, total_iters=2), lrs.MultiStepLR(o, [2, 3], 0.5)], [2]
        ),
        "in-chained": lambda o: lrs.ChainedScheduler(
            [lrs.MultiStepLR(o, [4, 5], 0.5), lrs.ExponentialLR(o, 0.9)]
        ),
    }[where]
    check_resume(tmp_path, _with_sched(make))


@pytest.mark.parametrize(
    "name", ["polynomial", "linear", "multiplicative", "warm_restarts_fractional"]
)
def test_more_schedulers_resume_exactly(tmp_path: Path, name: str) -> None:
    if name == "warm_restarts_fractional":  # stepped with fractional epochs (T_cur a float)

        def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
            torch.manual_seed(0)
            model = _mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            sched = lrs.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2, eta_min=0.001)

            def fn(s: int) -> Any:
                loss = model(torch.randn(5, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step(s / 3)
                return loss.detach(), opt.param_groups[0]["lr"]

            return {"model": model, "optimizer": opt, "scheduler": sched}, fn

        check_resume(tmp_path, build)
        return
    make = {
        "polynomial": lambda o: lrs.PolynomialLR(o, total_iters=5, power=2.0),
        "linear": lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=4),
        "multiplicative": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.9),
    }[name]
    check_resume(tmp_path, _with_sched(make))


def test_swa_averaged_model_with_buffers_and_swalr_resume_exactly(tmp_path: Path) -> None:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        avg = swa_utils.AveragedModel(
            model, use_buffers=True, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9)
        )
        swalr = swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=3, anneal_strategy="cos")

        def fn(s: int) -> Any:
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            avg.update_parameters(model)
            swalr.step()
            with torch.no_grad():
                out = avg(torch.ones(2, 4))
            return loss.detach(), out, opt.param_groups[0]["lr"]

        return {"model": model, "optimizer": opt, "swa_model": avg, "swa_sched": swalr}, fn

    check_resume(tmp_path, build)


# --- models ---------------------------------------------------------------------------------


def test_channels_last_conv_with_batchnorm_and_adam_resumes_exactly(tmp_path: Path) -> None:
    """channels_last weights are not contiguous; Adam's moments keep their strides."""

    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
        ).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)

        def fn(s: int) -> Any:
            x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        return {"model": model, "optimizer": opt}, fn

    check_resume(tmp_path, build)


class _Counting(nn.Module):
    """A module with extra state (plain values) that changes its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = 0
        self.hist: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.hist.append(self.calls % 3)
        return self.lin(x) * (1 + self.calls % 3)

    def get_extra_state(self) -> Any:
        return {"calls": self.calls, "hist": list(self.hist)}

    def set_extra_state(self, state: Any) -> None:
        self.calls, self.hist = state["calls"], list(state["hist"])


def test_a_module_with_extra_state_resumes_exactly(tmp_path: Path) -> None:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(_Counting(), nn.Tanh())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def fn(s: int) -> Any:
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach(), model[0].calls

        return {"model": model, "optimizer": opt}, fn

    check_resume(tmp_path, build)


def _qat_build() -> tuple[dict[str, Any], Callable[[int], Any]]:
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(
        tq.QuantStub(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), tq.DeQuantStub()
    )
    model.train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def fn(s: int) -> Any:
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return {"model": model, "optimizer": opt}, fn


def test_control_torch_itself_loads_a_trained_qat_state_into_a_fresh_qat_model() -> None:
    trained, fn = _qat_build()
    for s in range(3):
        fn(s)
    fresh, _ = _qat_build()
    fresh["model"].load_state_dict(trained["model"].state_dict())  # strict, accepted
    assert _canon(fresh["model"].state_dict()) == _canon(trained["model"].state_dict())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_qat_fake_quant_model_resumes_exactly(tmp_path: Path) -> None:
    check_resume(tmp_path, _qat_build)


def _lazy() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.LazyLinear(2))


def test_control_a_lazy_model_initialized_before_restore_resumes_exactly(tmp_path: Path) -> None:
    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = _lazy()
        model(torch.zeros(1, 5))  # the dry run, before the optimizer
        opt = torch.optim.Adam(model.parameters(), lr=0.01)

        def fn(s: int) -> Any:
            loss = model(torch.randn(4, 5)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        return {"model": model, "optimizer": opt}, fn

    check_resume(tmp_path, build)


def test_a_lazy_model_restored_before_its_dry_run_loads_or_is_a_typed_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = _lazy()
    trained(torch.randn(4, 5))
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(sg.TrainState(model=trained, rng=False), 1)
    fresh = _lazy()  # an inference / EMA copy restored before any forward
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        try:
            ckpt.restore(sg.TrainState(model=fresh, rng=False))
        except sg.RestoreError:
            return  # a clear, typed refusal is acceptable
    assert _canon(fresh.state_dict()) == _canon(trained.state_dict())


class _Twin(nn.Module):
    """Two layers with identical weights that see identical inputs until step k: their
    moments are bitwise equal at the save, and differ afterwards."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.a(x1) + self.b(x2)


@pytest.mark.parametrize("foreach", [False, True])
def test_equal_moments_of_twin_layers_stay_separate_tensors_after_restore(
    tmp_path: Path, foreach: bool
) -> None:
    k = 3

    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        model = _Twin()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=foreach)

        def fn(s: int) -> Any:
            x1 = torch.randn(5, 4)
            x2 = x1 if s < k else torch.randn(5, 4)
            loss = model(x1, x2).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        return {"model": model, "optimizer": opt}, fn

    check_resume(tmp_path, build, total=7, k=k)


# --- restoring into objects that already trained --------------------------------------------


def test_restore_into_trained_objects_drops_moments_of_params_unfrozen_after_the_save(
    tmp_path: Path,
) -> None:
    """The body is frozen (requires_grad=False, so Adam has no state for it) until step 5. The
    checkpoint of step 3 is restored into the same objects after they trained to step 8 with the
    body unfrozen: the body's moments must go (they are not in the checkpoint), and the rerun
    from 3 must equal the uninterrupted run."""
    total, k, unfreeze = 8, 3, 5

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _mlp()
        model[0].requires_grad_(False)
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def run(model: nn.Module, opt: torch.optim.Optimizer, a: int, b: int) -> list[Any]:
        out = []
        for s in range(a, b):
            if s == unfreeze:
                model[0].requires_grad_(True)
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(_canon(loss.detach()))
        return out

    ref_model, ref_opt = build()
    torch.manual_seed(1)
    ref = run(ref_model, ref_opt, 0, total)

    model, opt = build()
    torch.manual_seed(1)
    run(model, opt, 0, k)
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(sg.TrainState(model=model, optimizer=opt), k)
    run(model, opt, k, total)
    assert sorted(opt.state_dict()["state"]) == [0, 1, 2, 3]  # the body has moments now
    model[0].requires_grad_(False)  # as it was at step 3
    _scramble()
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.restore(sg.TrainState(model=model, optimizer=opt)) == k
    assert sorted(opt.state_dict()["state"]) == [2, 3]
    assert run(model, opt, k, total) == ref[k:]
    assert _canon(opt.state_dict()) == _canon(ref_opt.state_dict())
    assert _canon(model.state_dict()) == _canon(ref_model.state_dict())


@pytest.mark.parametrize("k", [0, 3], ids=["step-0-checkpoint", "step-3-checkpoint"])
def test_restore_into_objects_that_trained_past_the_checkpoint_matches_the_checkpoint(
    tmp_path: Path, k: int
) -> None:
    """AdamW + StepLR + BatchNorm + a CPU GradScaler under bf16 autocast, with a skipped (inf)
    step every third step. The same live objects train to step 6 and then get the checkpoint of
    step k back: the optimizer state (empty at step 0), the scaler's scale and growth tracker,
    the scheduler and the BN statistics must all be the checkpoint's."""
    total = 7

    def build() -> tuple[dict[str, Any], Callable[[int], Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = lrs.StepLR(opt, 2, 0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

        def fn(s: int) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(5, 4)).float().pow(2).mean()
            if s % 3 == 1:
                loss = loss * float("inf")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            return loss.detach(), scaler.get_scale(), opt.param_groups[0]["lr"]

        return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}, fn

    objs, fn = build()
    torch.manual_seed(1)
    ref = [_canon(fn(s)) for s in range(total)]
    ref_state = _states(objs)

    objs, fn = build()
    torch.manual_seed(1)
    for s in range(k):
        fn(s)
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(sg.TrainState(**objs), k)
    for s in range(k, 6):
        fn(s)
    _scramble()
    with sg.Checkpointer(tmp_path / "run") as ckpt:
        assert ckpt.restore(sg.TrainState(**objs)) == k
    if k == 0:
        assert len(objs["optimizer"].state) == 0
    assert [_canon(fn(s)) for s in range(k, total)] == ref[k:]
    assert _states(objs) == ref_state
