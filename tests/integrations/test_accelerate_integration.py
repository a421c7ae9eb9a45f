"""Accelerate's save_state/load_state through savegame (issue 12).

Real accelerate on CPU, a small MLP with dropout (the RNG matters), a shuffled torchdata
``StatefulDataLoader`` prepared with ``use_stateful_dataloader=True``, an LR scheduler and an
object registered with ``register_for_checkpointing``. Bitwise: one CPU thread is deterministic,
so a run SIGKILLed at any step and resumed ends identical to the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("accelerate")

import torch  # noqa: E402

N = 48  # 12 batches of 4 per epoch
STEPS = 30

pytestmark = [
    # accelerate's own deprecation notices on CPU, outside our control:
    pytest.mark.filterwarnings("ignore::DeprecationWarning:accelerate.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:accelerate.*"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash trials fork"),
]


class Data(torch.utils.data.Dataset):
    fetched = 0

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 8, generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        Data.fetched += 1
        return self.x[i], self.y[i]


class Ema:
    """A register_for_checkpointing object (state_dict/load_state_dict, no pickle)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(0.9).add_(v.detach(), alpha=0.1)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}
        self.updates = int(sd["updates"])


def build(direct: bool = True) -> tuple[Any, ...]:
    from accelerate import Accelerator, DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    from savegame.integrations.accelerate import DirectRandomSampler

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    ds = Data()
    if direct:
        loader = StatefulDataLoader(
            ds,
            batch_size=4,
            sampler=DirectRandomSampler(ds, seed=0),
            generator=torch.Generator().manual_seed(1),
        )
    else:
        loader = StatefulDataLoader(
            ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)
    )
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    ema = Ema(model)
    acc.register_for_checkpointing(ema)
    return acc, model, opt, loader, sched, ema


def fingerprint(model: Any, opt: Any, sched: Any, ema: Ema, losses: list[float]) -> dict[str, Any]:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    for i, st in sorted(opt.optimizer.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(
                f"{i}{k}".encode()
                + (v.numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
            )
    for _, v in sorted(ema.shadow.items()):
        h.update(v.numpy().tobytes())
    return {"hash": h.hexdigest(), "lr": sched.get_last_lr(), "ema": ema.updates, "losses": losses}


def train(
    run: Path,
    *,
    kill_at: int | None = None,
    every: int = 3,
    keep: Any = None,
    probe: list[int] | None = None,
    direct: bool = True,
    async_save: bool = False,
) -> tuple[dict[str, Any], int]:
    # Sync saves unless asked: the crash tests assert which steps were committed before the
    # SIGKILL. The integration's default, async, is what test_accelerate_torchrun_resume.py runs.
    import savegame as sg
    from savegame.integrations.accelerate import attach

    acc, model, opt, loader, sched, ema = build(direct)
    ckpt = attach(
        acc,
        run,
        save=sg.Every(steps=every),
        keep=keep or sg.Keep(last=2),
        extras=(extras := {"epoch": 0, "losses": []}),
        async_save=async_save,
    )
    Data.fetched = 0
    step = start = acc.load_state()
    while step < STEPS:
        for x, y in loader:
            if probe is not None and not probe:
                probe.append(Data.fetched)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            ema.update(model)
            extras["losses"].append(loss.item())
            step += 1
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt.step(step)
            if step == STEPS:
                break
        else:
            extras["epoch"] += 1
    acc.save_state()
    ckpt.close()
    return fingerprint(model, opt, sched, ema, list(extras["losses"])), start


def in_child(fn: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, _one_thread: None) -> dict[str, Any]:
    got, start = train(tmp_path_factory.mktemp("ref") / "run")
    assert start == 0
    return got


def _trials(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    # 12 and 13: the first epoch's last step and the one after it (a checkpoint at step 12)
    return [12, 13, *rnd.sample([s for s in range(2, STEPS) if s not in (12, 13)], n)][: n + 2]


@pytest.mark.parametrize("kill_at", _trials(1, seed=int(os.environ.get("SG_TRIAL_SEED", "7"))))
def test_sigkilled_run_resumes_bitwise(
    tmp_path: Path, reference: dict[str, Any], kill_at: int
) -> None:
    run = tmp_path / "run"
    assert in_child(lambda: train(run, kill_at=kill_at)) == -signal.SIGKILL
    got, start = train(run)
    assert 0 < start <= kill_at and start % 3 == 0
    assert got == reference


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", _trials(8, seed=101))
def test_sigkilled_run_resumes_bitwise_more_trials(
    tmp_path: Path, reference: dict[str, Any], kill_at: int
) -> None:
    run = tmp_path / "run"
    assert in_child(lambda: train(run, kill_at=kill_at)) == -signal.SIGKILL
    assert train(run)[0] == reference


def test_torchdatas_own_shuffle_resumes_bitwise_too(tmp_path: Path, _one_thread: None) -> None:
    """shuffle=True (torchdata's sampler, which replays the position on restore) is exact too."""
    want, _ = train(tmp_path / "ref", direct=False)
    run = tmp_path / "run"
    assert in_child(lambda: train(run, kill_at=17, direct=False)) == -signal.SIGKILL
    assert train(run, direct=False)[0] == want


def test_resume_skips_a_damaged_or_half_written_newest(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    import savegame as sg

    run = tmp_path / "run"
    assert in_child(lambda: train(run, kill_at=10)) == -signal.SIGKILL
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000000006", "step-000000000009"]
    newest = run / "step-000000000009"
    victim = max((p for p in newest.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the data: the hash check catches it
    victim.write_bytes(bytes(data))
    (run / "step-000000000010").mkdir()  # half-written: never committed
    with pytest.warns(sg.CorruptCheckpointWarning):
        got, start = train(run)
    assert start == 6
    assert got == reference


def test_retention_survives_restarts(tmp_path: Path) -> None:
    import savegame as sg

    run = tmp_path / "run"
    for kill_at in (8, 20):
        assert (
            in_child(lambda k=kill_at: train(run, kill_at=k, keep=sg.Keep(last=2, every=4)))
            == -signal.SIGKILL
        )
    train(run, keep=sg.Keep(last=2, every=4))
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*"))
    # every 4th saved checkpoint forever (indexes 0, 4, 8: steps 3, 15, 27) + the newest two
    assert steps == [3, 15, 27, 30]


def test_resume_does_not_replay_the_epoch(tmp_path: Path) -> None:
    """Resumed at step 3 or at step 21 (mid-epoch 2): the first step after the resume has fetched
    one batch plus Accelerate's one-batch look-ahead — the same count whatever the position."""
    fetched = {}
    for kill_at in (4, 22):
        run = tmp_path / f"run{kill_at}"
        assert in_child(lambda run=run, k=kill_at: train(run, kill_at=k)) == -signal.SIGKILL
        probe: list[int] = []
        _, start = train(run, probe=probe)
        fetched[start] = probe[0]
    assert fetched == {3: 8, 21: 8}


def test_preemption_signal_saves_and_exits_75(tmp_path: Path, reference: dict[str, Any]) -> None:
    run = tmp_path / "run"

    def preempted() -> None:
        import savegame as sg
        from savegame.integrations.accelerate import attach

        acc, model, opt, loader, sched, ema = build()
        extras = {"epoch": 0, "losses": []}
        ckpt = attach(acc, run, save=sg.Every(steps=100), extras=extras)
        step = 0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            ema.update(model)
            extras["losses"].append(loss.item())
            step += 1
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            ckpt.step(step)

    assert in_child(preempted) == 75
    assert [p.name for p in run.glob("step-*")] == ["step-000000000005"]
    got, start = train(run)
    assert start == 5 and got == reference


# ---- what the hooks can and cannot do ------------------------------------------------------------
def test_accelerates_hooks_cannot_keep_pickle_out(tmp_path: Path) -> None:
    """Why this integration is a wrapper: a save pre-hook that takes every weight away still
    leaves Accelerate pickling the optimizer, scheduler, sampler, RNG and registered objects."""
    acc, *_ = build()
    acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    out = tmp_path / "plain"
    acc.save_state(str(out))
    written = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith("model") for n in written)
    assert {
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",
    } <= set(written)


def test_attach_routes_save_state_and_load_state(tmp_path: Path) -> None:
    import savegame as sg
    from savegame.integrations.accelerate import attach

    acc, model, *_ = build()
    ckpt = attach(acc, tmp_path / "run")
    path = acc.save_state()
    assert Path(path).name == "step-000000000000"
    assert not list(Path(path).rglob("*.pkl")) and not list(Path(path).rglob("*.bin"))
    with pytest.raises(ValueError, match="run folder"):
        acc.save_state(str(tmp_path / "elsewhere"))
    ckpt.close()
    with sg.Checkpointer(tmp_path / "run") as c:
        assert [i.step for i in c.list()] == [0]


# ---- bad input ------------------------------------------------------------------------------------
def test_unsupported_accelerate_version_names_the_range() -> None:
    import savegame as sg
    from savegame.integrations.accelerate import check_version

    with pytest.raises(
        sg.MissingDependencyError, match=r"accelerate 0\.34\.2 is not supported.*>=1\.0,<2"
    ):
        check_version("0.34.2")
    assert check_version("1.15.0") == "1.15.0"


def test_a_plain_dataloader_warns_with_the_fix(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from savegame.integrations.accelerate import InexactResumeWarning, attach

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 3)
    loader = torch.utils.data.DataLoader(Data(), batch_size=4, shuffle=True)
    model, loader = acc.prepare(model, loader)
    ckpt = attach(acc, tmp_path / "run")
    with pytest.warns(
        InexactResumeWarning, match=r"StatefulDataLoader.*use_stateful_dataloader=True"
    ):
        acc.save_state()
    ckpt.close()


def test_a_registered_object_without_state_dict_is_refused(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from savegame.integrations.accelerate import attach

    class Opaque:
        pass

    acc = Accelerator(cpu=True)
    acc.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        acc.register_for_checkpointing(Opaque())  # Accelerate's own check
    ckpt = attach(acc, tmp_path / "run")
    acc._custom_objects.append(Opaque())  # as if registered before Accelerate checked
    with pytest.raises(TypeError, match="state_dict"):
        acc.save_state()
    ckpt.close()


def test_a_monitor_metric_never_logged_is_refused(tmp_path: Path) -> None:
    """Keep(best=, monitor=) and an evaluation's metrics without it: refused at the first one
    (best-K would otherwise silently keep nothing)."""
    import savegame as sg
    from savegame.integrations.accelerate import attach

    acc, *_ = build()
    ckpt = attach(
        acc,
        tmp_path / "run",
        save=sg.Every(steps=1),
        keep=sg.Keep(last=1, best=1, monitor="val_acc", mode="max"),
    )
    assert ckpt.step(1) is True  # no evaluation at this step: fine
    with pytest.raises(ValueError, match=r"monitor='val_acc'.*\['val_loss'\]"):
        ckpt.step(2, metrics={"val_loss": 0.5})
    assert ckpt.step(3, metrics={"val_acc": 0.5, "val_loss": 0.4}) is True
    ckpt.step(4, metrics={"val_loss": 0.5})  # seen once: a later evaluation without it is fine
    ckpt.close()
