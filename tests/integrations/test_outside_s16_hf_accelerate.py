"""Outside review (s16): Accelerate with ``attach`` in what a new user adds to the loop of
docs/integrations-hf.md — ``Accelerator(gradient_accumulation_steps=3)`` with the
``accumulate()`` context (an epoch of 14 batches: windows of 3, 3, 3, 3, then 2 closed by the
end of the loader), a SIGTERM and a SIGKILL inside accumulation windows and two resumes,
``mixed_precision="bf16"`` on CPU, two models and optimizers, an object registered for
checkpointing *after* ``attach`` (documented as picked up), and ``save_state``/``load_state``
with a folder of Accelerate's own.

The killed sessions run in forked children; the resumed one must end bitwise equal to the
uninterrupted run: parameters, optimizer moments, scheduler, registered state, every loss and
the exact inputs of every micro-batch trained after the resume.
"""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("torchdata")

import savegame as sg  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash trials fork"),
]

N, BATCH = 28, 2  # 14 batches per epoch


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 6, generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class Counter:
    """A register_for_checkpointing object: counts the optimizer steps it saw."""

    def __init__(self) -> None:
        self.n = torch.zeros(())

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"].clone()


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    )


def run(
    root: Path,
    *,
    ga: int = 1,
    steps: int = 12,
    precision: str = "no",
    two_models: bool = False,
    register_after_attach: bool = False,
    kill: tuple[int, int, int] | None = None,
    per_micro_batch: bool = False,
) -> dict[str, Any]:
    """The docs' loop with ``accumulate()``; ``kill=(signal, optimizer step, micro-batch)``:
    that signal to this process at that micro-batch (1-based) of that optimizer step's window,
    after its backward. Returns the fingerprint."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState
    from torchdata.stateful_dataloader import StatefulDataLoader

    from savegame.integrations.accelerate import DirectRandomSampler, attach

    # Accelerate's process-wide state refuses a second Accelerator with another precision
    # (a new script would start without it)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    models = [_net() for _ in range(2 if two_models else 1)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    sched = torch.optim.lr_scheduler.StepLR(opts[0], step_size=4, gamma=0.5)
    data = Data()
    loader = StatefulDataLoader(data, batch_size=BATCH, sampler=DirectRandomSampler(data, seed=0),
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    acc = Accelerator(
        cpu=True,
        gradient_accumulation_steps=ga,
        mixed_precision=precision,
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True),
    )
    *prepared, loader, sched = acc.prepare(*models, *opts, loader, sched)
    models, opts = prepared[: len(models)], prepared[len(models) :]
    counter = Counter()
    if not register_after_attach:
        acc.register_for_checkpointing(counter)
    extras: dict[str, Any] = {"losses": [], "seen": [], "opt_steps": 0}
    dtypes: set[str] = set()  # what the first layer computed in (autocast or not)
    acc.unwrap_model(models[0])[0].register_forward_hook(
        lambda mod, inp, out: dtypes.add(str(out.dtype))
    )
    ckpt = attach(acc, root, save=sg.Every(steps=2), keep=sg.Keep(last=50), extras=extras,
                  async_save=False)  # fmt: skip
    if register_after_attach:
        acc.register_for_checkpointing(counter)
    step = start = acc.load_state()
    if per_micro_batch:  # the checkpoint's step counts micro-batches; the loop, optimizer steps
        step = extras["opt_steps"]
    micro = 0
    while step < steps:
        for x, y, idx in loader:
            with acc.accumulate(*models):
                out = sum(m(x) for m in models)
                loss = torch.nn.functional.cross_entropy(out.float(), y)
                acc.backward(loss)
                for o in opts:
                    o.step()
                sched.step()
                for o in opts:
                    o.zero_grad()
            extras["losses"].append(loss.item())
            extras["seen"].append(idx.tolist())
            micro += 1
            if kill is not None and kill[1] == step + 1 and kill[2] == micro:
                os.kill(os.getpid(), kill[0])
            if per_micro_batch:  # counting micro-batches as steps (not what the docs say)
                try:
                    ckpt.step(len(extras["losses"]))
                except BaseException:
                    ckpt.close()  # a refusal: give the signal handlers back (in-process run)
                    raise
            if acc.sync_gradients:
                micro = 0
                step += 1
                extras["opt_steps"] = step
                counter.n += 1
                if not per_micro_batch:
                    ckpt.step(step)  # the docs: after each optimizer step
                if step == steps:
                    break
    acc.save_state()
    ckpt.close()
    h = hashlib.sha256()
    for m in models:
        for k, v in sorted(acc.unwrap_model(m).state_dict().items()):
            h.update(k.encode() + v.float().numpy().tobytes())
    for o in opts:
        for i, st in sorted(o.optimizer.state_dict()["state"].items()):
            for k, v in sorted(st.items()):
                h.update(f"{i}{k}".encode() + v.float().numpy().tobytes())
    return {
        "start": start,
        "hash": h.hexdigest(),
        "lr": sched.get_last_lr(),
        "counter": float(counter.n),
        "losses": list(extras["losses"]),
        "seen": list(extras["seen"]),
        "dtypes": sorted(dtypes),
    }


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


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    skip = ("start", "dtypes")  # dtypes: what this session's forwards ran in (none on a re-run)
    assert {k: v for k, v in got.items() if k not in skip} == {
        k: v for k, v in want.items() if k not in skip
    }


def test_accumulate_sigterm_then_sigkill_inside_windows_resumes_bitwise(tmp_path: Path) -> None:
    """GA=3 over 14 batches per epoch (5 optimizer steps: 3,3,3,3,2). A SIGTERM after the first
    micro-batch of step 3 saves at step 3's end (exit 75); a SIGKILL after the second micro-batch
    of step 10 — the epoch's short last window (the end of the loader closes it) — loses it;
    the second resume (from step 8) ends bitwise equal."""
    want = run(tmp_path / "ref", ga=3, steps=12)
    assert [len(w) for w in want["seen"][:14]] == [2] * 14  # every sample once per epoch
    assert len(want["losses"]) == 14 + 14 + 6  # micro-batches: two epochs, then steps 11 and 12
    root = tmp_path / "run"
    assert in_child(lambda: run(root, ga=3, kill=(signal.SIGTERM, 3, 1))) == sg.EXIT_PREEMPTED
    assert in_child(lambda: run(root, ga=3, kill=(signal.SIGKILL, 10, 2))) == -signal.SIGKILL
    got = run(root, ga=3)
    assert got["start"] == 8
    _same(got, want)


def test_bf16_mixed_precision_on_cpu_killed_mid_epoch_resumes_bitwise(tmp_path: Path) -> None:
    want = run(tmp_path / "ref", precision="bf16", steps=10)
    assert want["dtypes"] == ["torch.bfloat16"]  # autocast did run
    root = tmp_path / "run"
    assert in_child(lambda: run(root, precision="bf16", steps=10, kill=(signal.SIGKILL, 6, 1)))
    got = run(root, precision="bf16", steps=10)
    assert got["start"] == 4
    _same(got, want)


def test_two_models_and_an_object_registered_after_attach(tmp_path: Path) -> None:
    """Two prepared models + optimizers; the Counter registered after attach (the docstring:
    "objects registered later ... are picked up at each save and restore")."""
    want = run(tmp_path / "ref", two_models=True, register_after_attach=True)
    assert want["counter"] == 12
    root = tmp_path / "run"
    kill = (signal.SIGKILL, 9, 1)
    assert in_child(lambda: run(root, two_models=True, register_after_attach=True, kill=kill))
    got = run(root, two_models=True, register_after_attach=True)
    assert got["start"] == 8
    _same(got, want)


def test_save_state_and_load_state_refuse_accelerates_own_folders(tmp_path: Path) -> None:
    """A user keeping Accelerate's habit (save_state("ckpt/step_5"), load_state(dir)) gets the
    documented ValueError naming the run folder, and nothing is written there."""
    from accelerate import Accelerator

    from savegame.integrations.accelerate import attach

    acc = Accelerator(cpu=True)
    model = acc.prepare(_net())
    ckpt = attach(acc, tmp_path / "run")
    try:
        for call in (acc.save_state, acc.load_state):
            with pytest.raises(ValueError, match="run folder") as exc:
                call(str(tmp_path / "ckpt" / "step_5"))
            assert str(tmp_path / "run") in str(exc.value)
        assert not (tmp_path / "ckpt").exists()
        assert acc.load_state(str(tmp_path / "run")) == 0  # the run folder itself is fine
        assert model is acc._models[0]
    finally:
        ckpt.close()


def test_a_save_inside_an_accumulation_window_is_refused_or_exact(tmp_path: Path) -> None:
    """A user counting micro-batches as steps (ckpt.step after every batch, GA=3): savegame knows
    the accelerator's sync_gradients; a save mid-window must either be refused with a typed
    error or restore the accumulated gradients — never resume on a different gradient."""
    root = tmp_path / "run"
    try:  # a refusal may come at the first mid-window call, in the reference run already
        want = run(tmp_path / "ref", ga=3, steps=6, per_micro_batch=True)
        # micro-batch 5 (the second of step 2's window); the last save: micro-batch 4, mid-window
        code = in_child(lambda: run(root, ga=3, steps=6, per_micro_batch=True,
                                    kill=(signal.SIGKILL, 2, 2)))  # fmt: skip
        assert code == -signal.SIGKILL
        got = run(root, ga=3, steps=6, per_micro_batch=True)
    except (sg.errors.CheckpointError, ValueError):
        return  # refused: fine
    assert got["start"] == 4
    _same(got, want)


def test_the_finished_script_run_again_restores_the_end_and_saves_nothing_new(
    tmp_path: Path,
) -> None:
    """The docs' loop ends with accelerator.save_state(); a requeued finished job runs the whole
    script again: load_state() returns the last step, the loop trains nothing, and the final
    save_state() of the same step is not an error."""
    root = tmp_path / "run"
    first = run(root, ga=3, steps=6)
    before = sorted(p.name for p in root.glob("step-*"))
    again = run(root, ga=3, steps=6)
    assert again["start"] == 6
    _same(again, first)
    assert sorted(p.name for p in root.glob("step-*")) == before


def test_resumed_twice_across_an_epoch_end_written_by_a_resumed_session(tmp_path: Path) -> None:
    """The Trainer's resume-twice bug (test_outside_s16_hf_trainer.py) checked here: GA=3, 5
    optimizer steps per epoch; SIGKILL in step 7 (resume from 6, mid-epoch 2); that session
    saves step 10 (epoch 2's end) and is SIGKILLed in step 11; the third start resumes from 10."""
    want = run(tmp_path / "ref", ga=3, steps=12)
    root = tmp_path / "run"
    assert in_child(lambda: run(root, ga=3, kill=(signal.SIGKILL, 7, 1))) == -signal.SIGKILL
    assert in_child(lambda: run(root, ga=3, kill=(signal.SIGKILL, 11, 1))) == -signal.SIGKILL
    got = run(root, ga=3)
    assert got["start"] == 10
    _same(got, want)
