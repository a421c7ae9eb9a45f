"""The Hugging Face Trainer saved and resumed through savegame (issue 12).

Real transformers, a tiny GPT-2 built from a config (dropout on, so the RNG matters), random
token ids, CPU. The module is also the training script the crash tests run in a child process:
``python test_hf_trainer_integration.py RUN_DIR OUT_DIR [--kill-at STEP]``.

Bitwise: on CPU, in one thread, the Trainer's step is deterministic, so a run SIGKILLed at any
step and resumed ends with parameters, optimizer moments, scheduler, RNG-dependent dropout and
log history identical to the run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

HERE = Path(__file__).resolve()
N_SAMPLES = 40  # 10 batches of 4 per epoch
SEQ = 16
VOCAB = 64

# The Trainer's own warnings we cannot avoid on a tiny CPU model (kept narrow):
FRAMEWORK_WARNINGS = [
    "ignore::FutureWarning:transformers.*",
    "ignore::DeprecationWarning:transformers.*",
    "ignore::DeprecationWarning:accelerate.*",
]


class TokenDataset(torch.utils.data.Dataset):
    """Random token ids; counts __getitem__ calls (to prove no batch is skipped over)."""

    fetched = 0

    def __init__(self, n: int = N_SAMPLES, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        TokenDataset.fetched += 1
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_trainer(
    run_dir: Path,
    out_dir: Path,
    *,
    max_steps: int = 24,
    ga: int = 1,
    eval_steps: int = 5,
    logging_steps: int = 3,
    metric: str | None = None,
    **extra: Any,
) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=ga,
        learning_rate=1e-3,
        warmup_steps=3,
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps or None,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        metric_for_best_model=metric,
        **extra,
    )
    return Trainer(
        model=model, args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(16, seed=1)
    )


def fingerprint(trainer: Any) -> dict[str, Any]:
    """Everything that must match bitwise: parameters, optimizer state, scheduler, log history."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    opt = (
        trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer
    )
    for i, st in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(f"{i}{k}".encode())
            h.update(v.contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    hist = [
        {
            k: v
            for k, v in e.items()
            if not k.startswith("train_") and "runtime" not in k and "per_second" not in k
        }
        for e in trainer.state.log_history
        if "train_runtime" not in e
    ]
    return {
        "hash": h.hexdigest(),
        "lr": trainer.lr_scheduler.get_last_lr(),
        "step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "log": hist,
        "best_metric": trainer.state.best_metric,
    }


def train(
    run_dir: Path,
    *,
    kill_at: int | None = None,
    every: int = 2,
    keep: Any = None,
    probe: list[int] | None = None,
    async_save: bool = False,
    **opts: Any,
) -> tuple[Any, Any]:
    """One training session (in this process): attach savegame, optionally SIGKILL the process at
    ``kill_at`` (call it in a forked child), return (trainer, callback). Sync saves unless asked
    (the crash tests assert which steps were committed before the SIGKILL); the integration's
    default, async, is what test_hf_torchrun_resume.py runs."""
    from transformers import TrainerCallback

    import savegame as sg
    from savegame.integrations.transformers import attach

    trainer = build_trainer(run_dir, run_dir.parent, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_strategy advice etc. are not under test here
        cb = attach(trainer, run_dir, save=sg.Every(steps=every), keep=keep or sg.Keep(last=2),
                    async_save=async_save)  # fmt: skip

    class Probe(TrainerCallback):
        """SIGKILL at ``kill_at``; record the batches fetched before the first step (resume cost)."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if probe is not None and not probe:
                probe.append(TokenDataset.fetched)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.add_callback(Probe())
    TokenDataset.fetched = 0
    trainer.train()
    return trainer, cb


def in_child(fn: Any) -> int:
    """Run ``fn`` in a forked child (imports stay warm); return its wait status's signal/exit."""
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
    """CPU determinism across processes, and a fork without a live OpenMP pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


pytestmark = [pytest.mark.filterwarnings(w) for w in FRAMEWORK_WARNINGS] + [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash trials fork"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, _one_thread: None) -> dict[str, Any]:
    """The uninterrupted run (savegame attached, saving on the same schedule)."""
    root = tmp_path_factory.mktemp("ref")
    trainer, cb = train(root / "run")
    assert cb.resumed_step == 0
    return fingerprint(trainer)


def _killed_then_resumed(tmp: Path, kill_at: int, **opts: Any) -> tuple[dict[str, Any], Any]:
    run = tmp / f"run-{kill_at}"
    assert in_child(lambda: train(run, kill_at=kill_at, **opts)) == -signal.SIGKILL
    trainer, cb = train(run, **opts)
    return fingerprint(trainer), cb


def _trial_steps(n: int, seed: int) -> list[int]:
    """Random kill steps; 10 (the first epoch's last step: an epoch-end checkpoint) and 11 (just
    after it) always come first — the boundary cases."""
    rnd = random.Random(seed)
    others = rnd.sample([s for s in range(3, 24) if s not in (10, 11)], max(0, n - 2))
    return [10, 11, *others][:n]


_SEED = int(os.environ.get("SG_TRIAL_SEED", "12"))


# 10: the first epoch's last step (its checkpoint is taken at the next epoch's start); and one
# random step (mid-epoch, SG_TRIAL_SEED to vary it). More under -m slow.
@pytest.mark.parametrize("kill_at", [10, random.Random(_SEED).randrange(12, 24)])
def test_sigkilled_run_resumes_bitwise(
    tmp_path: Path, reference: dict[str, Any], kill_at: int
) -> None:
    got, cb = _killed_then_resumed(tmp_path, kill_at)
    assert 0 < cb.resumed_step <= kill_at
    assert got == reference


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", _trial_steps(8, seed=99))
def test_sigkilled_run_resumes_bitwise_more_trials(
    tmp_path: Path, reference: dict[str, Any], kill_at: int
) -> None:
    got, _ = _killed_then_resumed(tmp_path, kill_at)
    assert got == reference


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [5, 9, 14])
def test_gradient_accumulation_resumes_bitwise(tmp_path: Path, kill_at: int) -> None:
    """Two micro-batches per step (10 batches per epoch: a whole number of steps)."""
    ref, _ = train(tmp_path / "ref", ga=2, max_steps=16)
    want = fingerprint(ref)
    got, _ = _killed_then_resumed(tmp_path, kill_at, ga=2, max_steps=16)
    assert got == want


def test_resume_skips_a_damaged_or_half_written_newest(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    """transformers #35782: the newest checkpoint is damaged (a data file truncated), and a
    half-written one (no manifest) is newer still: the resume takes the newest *valid* one and
    still ends bitwise equal."""
    import savegame as sg
    from savegame.integrations.transformers import newest_valid_checkpoint

    run = tmp_path / "run"
    assert in_child(lambda: train(run, kill_at=9)) == -signal.SIGKILL
    steps = sorted(p.name for p in run.glob("step-*"))
    assert steps == ["step-000000000006", "step-000000000008"]
    newest = run / steps[-1]
    victim = max(
        (p for p in newest.rglob("*") if p.is_file() and p.suffix == ".safetensors"),
        key=lambda p: p.stat().st_size,
    )
    with victim.open("r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    half = run / "step-000000000009"  # a copy without its manifest: "written" but never committed
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 64)
    info = newest_valid_checkpoint(run)
    assert info is not None and info.step in (6, 8)  # the manifest of 8 is intact; its data is not
    with pytest.warns(sg.CorruptCheckpointWarning):
        trainer, cb = train(run)
    assert cb.resumed_step == 6
    assert fingerprint(trainer) == reference


def test_retention_survives_restarts_and_spares_other_runs(tmp_path: Path) -> None:
    """Keep(last=2) over a kill and a resume: the killed session's checkpoints are rotated out by
    the resumed one; a checkpoint of another run in the folder is never deleted."""
    import shutil

    run = tmp_path / "run"
    other = tmp_path / "other"
    assert in_child(lambda: train(other, kill_at=3, every=2)) == -signal.SIGKILL
    assert in_child(lambda: train(run, kill_at=7)) == -signal.SIGKILL
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000000004", "step-000000000006"]
    shutil.copytree(other / "step-000000000002", run / "step-000000000002")  # another run's
    train(run)
    assert sorted(p.name for p in run.glob("step-*")) == [
        "step-000000000002",
        "step-000000000022",
        "step-000000000024",
    ]


def test_resume_does_not_fetch_the_skipped_batches(tmp_path: Path) -> None:
    """Resume cost does not grow with the step: whether resumed at step 2 or step 18 (epoch 2),
    exactly one batch (4 samples) has been fetched when the first step after the resume
    begins — nothing is read to get there — and the sampler's position is set, not replayed."""
    from savegame.integrations import accelerate as sg_hf

    fetched = {}
    for kill_at in (3, 19):
        run = tmp_path / f"run-{kill_at}"
        assert in_child(lambda run=run, k=kill_at: train(run, kill_at=k)) == -signal.SIGKILL
        probe: list[int] = []
        _, cb = train(run, probe=probe)
        fetched[cb.resumed_step] = probe[0]
    assert fetched == {2: 4, 18: 4}
    # the sampler's restore regenerates the permutation and sets the index (no replay)
    sampler = sg_hf.DirectRandomSampler(range(1000), seed=0)
    it = iter(sampler)
    want = [next(it) for _ in range(700)][-1]
    calls = []
    orig = sg_hf._DirectRandomIterator.__next__
    try:
        sg_hf._DirectRandomIterator.__next__ = lambda self: calls.append(1) or orig(self)  # type: ignore[method-assign]
        again = iter(sg_hf.DirectRandomSampler(range(1000), seed=5))
        again.load_state_dict(it.state_dict())
    finally:
        sg_hf._DirectRandomIterator.__next__ = orig  # type: ignore[method-assign]
    assert calls == [] and again.perm[again.index - 1] == want


def test_preemption_signal_saves_at_the_step_boundary_and_exits_75(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    """SIGTERM mid-run: a checkpoint of the step in progress, exit status 75; the resume ends
    bitwise equal."""
    run = tmp_path / "run"

    def preempted() -> None:
        from transformers import TrainerCallback

        trainer = build_trainer(run, tmp_path)
        import savegame as sg
        from savegame.integrations.transformers import attach

        attach(trainer, run, save=sg.Every(steps=100), keep=sg.Keep(last=2))

        class Term(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step == 13:
                    os.kill(os.getpid(), signal.SIGTERM)

        trainer.add_callback(Term())
        trainer.train()

    assert in_child(preempted) == 75
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000000014"]
    trainer, cb = train(run, every=100)
    assert cb.resumed_step == 14
    assert fingerprint(trainer) == reference


def test_a_signal_without_exit_stops_training_after_the_checkpoint(tmp_path: Path) -> None:
    from transformers import TrainerCallback

    import savegame as sg
    from savegame.integrations.transformers import attach

    trainer = build_trainer(tmp_path, tmp_path, eval_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb = attach(
            trainer,
            tmp_path / "run",
            save=sg.Every(steps=100),
            exit_on_signal=False,
            save_on_train_end=False,
        )

    class Term(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.add_callback(Term())
    trainer.train()
    assert trainer.state.global_step == 5
    assert [p.name for p in (tmp_path / "run").glob("step-*")] == ["step-000000000005"]
    assert cb.checkpointer is None  # closed by train()


# ---- bad input ----------------------------------------------------------------------------------
def test_unsupported_transformers_version_names_the_range() -> None:
    import savegame as sg
    from savegame.integrations.transformers import check_version

    with pytest.raises(
        sg.MissingDependencyError, match=r"transformers 4\.46\.0 is not supported.*>=5\.0,<6"
    ):
        check_version("4.46.0")
    with pytest.raises(sg.MissingDependencyError, match=r">=5\.0,<6"):
        check_version("6.0.0.dev0")
    assert check_version("5.24.0") == "5.24.0"


def test_a_plain_dataloader_warns_with_the_fix(tmp_path: Path) -> None:
    """The callback alone (no attach): the Trainer's accelerate-prepared DataLoader cannot save
    its position: a warning names the fix; everything else is still saved."""
    import savegame as sg
    from savegame.integrations.transformers import InexactResumeWarning, SavegameCallback

    trainer = build_trainer(tmp_path, tmp_path, max_steps=2, eval_steps=0)
    cb = SavegameCallback(tmp_path / "run", save=sg.Every(steps=1)).bind(trainer)
    trainer.add_callback(cb)
    with pytest.warns(InexactResumeWarning, match=r"attach\(trainer.*StatefulDataLoader"):
        trainer.train()
    assert (tmp_path / "run" / "step-000000000002").is_dir()


def test_a_monitor_metric_never_logged_is_refused(tmp_path: Path) -> None:
    import savegame as sg
    from savegame.integrations.transformers import attach

    trainer = build_trainer(tmp_path, tmp_path, max_steps=4, eval_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach(trainer, tmp_path / "a", keep=sg.Keep(best=1, monitor="eval_loss"))
    with pytest.raises(ValueError, match=r"monitor='eval_loss'.*eval_strategy='no'"):
        trainer.train()
    trainer = build_trainer(tmp_path, tmp_path, max_steps=4, eval_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach(trainer, tmp_path / "b", keep=sg.Keep(best=1, monitor="loss_eval"))
    with pytest.raises(ValueError, match=r"monitor='loss_eval'.*eval_loss"):
        trainer.train()


def test_best_k_by_eval_loss_survives_a_restart(tmp_path: Path) -> None:
    """Keep(best=1) by the Trainer's eval_loss: the best checkpoint is kept across a kill and
    resume, and the TrainerState's best_metric is restored with it."""
    import savegame as sg

    run = tmp_path / "run"
    keep = sg.Keep(last=1, best=1, monitor="eval_loss", mode="min")
    assert (
        in_child(lambda: train(run, kill_at=12, keep=keep, metric="eval_loss")) == -signal.SIGKILL
    )
    trainer, cb = train(run, keep=keep, metric="eval_loss")
    evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    best_step = min(evals, key=lambda se: se[1])[0]
    kept = {int(p.name.split("-")[1]) for p in run.glob("step-*")}
    assert kept == {best_step, 24}
    assert trainer.state.best_metric == min(v for _, v in evals)


def test_train_refuses_the_trainers_own_resume(tmp_path: Path) -> None:
    from savegame.integrations.transformers import attach

    trainer = build_trainer(tmp_path, tmp_path, max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach(trainer, tmp_path / "run")
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import savegame as sg
    from savegame.integrations.transformers import attach

    run_dir, out_dir = Path(argv[0]), Path(argv[1])
    opts = json.loads(argv[2]) if len(argv) > 2 else {}
    kill_at = opts.pop("kill_at", None)
    every = opts.pop("every", 2)
    async_save = opts.pop("async_save", False)  # sync: the tests assert the committed steps
    trainer = build_trainer(run_dir, out_dir, **opts)
    cb = attach(trainer, run_dir, save=sg.Every(steps=every), keep=sg.Keep(last=2),
                async_save=async_save)  # fmt: skip

    if kill_at is not None:
        from transformers import TrainerCallback

        class Killer(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        trainer.add_callback(Killer())
    TokenDataset.fetched = 0
    trainer.train()
    result = fingerprint(trainer)
    result["resumed_step"] = cb.resumed_step
    (out_dir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def test_newest_valid_checkpoint_takes_a_url(tmp_path: Path) -> None:
    """The resume helper reads a run on an object store as it reads a folder (here obstore's
    in-memory store through a memory:// URL); no run there yet is None, not an error."""
    pytest.importorskip("obstore")
    import torch

    import savegame as sg
    from savegame.integrations.transformers import newest_valid_checkpoint

    url = f"memory://hf-{os.getpid()}/runs/exp"
    assert newest_valid_checkpoint(url) is None
    model = torch.nn.Linear(2, 2)
    with sg.Checkpointer(url, save=sg.Every(steps=1), handle_signals=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(sg.TrainState(model=model), step)
    info = newest_valid_checkpoint(url)
    assert info is not None and info.step == 3
    assert newest_valid_checkpoint(tmp_path / "nothing-here") is None
