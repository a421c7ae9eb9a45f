"""Outside review (s13): the Hugging Face ``Trainer`` with ``attach`` (async by default) in the
call orders docs/integrations-hf.md allows — train then evaluate/predict, ``train()`` again, an
exception or a KeyboardInterrupt inside training and the next ``train()`` in the same process
(with a new Trainer and ``attach``), a run folder with spaces and non-ASCII characters. Every
committed checkpoint must verify and the resume must be bitwise equal to the uninterrupted run.
A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import savegame as sg  # noqa: E402
from savegame.integrations.transformers import attach  # noqa: E402

from ._run_folders import steps as _steps  # noqa: E402
from ._run_folders import verify as _verify  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out: Path, max_steps: int = 15, callbacks: list[Any] | None = None) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=2,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return Trainer(
        model=GPT2LMHeadModel(cfg),
        args=args,
        train_dataset=Tokens(),
        eval_dataset=Tokens(8, seed=1),
        callbacks=callbacks or [],
    )


def _fp(trainer: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for _i, st in sorted(opt.state_dict()["state"].items()):
        for _k, v in sorted(st.items()):
            h.update(v.contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    h.update(repr(trainer.lr_scheduler.get_last_lr()).encode())
    return h.hexdigest()


class Boom:
    """A TrainerCallback that raises at the end of step ``at`` (after savegame's hook)."""

    def __new__(cls, at: int, exc: type[BaseException]) -> Any:
        from transformers import TrainerCallback

        class _Boom(TrainerCallback):
            armed = True

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.armed and state.global_step == at:
                    self.armed = False
                    raise exc("boom inside train()")

        return _Boom()


def _run(tmp: Path, root: Path, **kw: Any) -> tuple[Any, Any]:
    trainer = _trainer(tmp, **kw)
    cb = attach(trainer, root, save=sg.Every(steps=2), keep=sg.Keep(last=20))
    trainer.train()
    return trainer, cb


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("ref")
    trainer, _ = _run(tmp, tmp / "run")
    assert trainer.state.global_step == 15
    return _fp(trainer)


def test_train_then_evaluate_and_predict_save_nothing_and_free_the_folder(
    reference: str, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    trainer, cb = _run(tmp_path, root)
    assert _fp(trainer) == reference
    before = _steps(root)
    assert before[-1] == 15  # the final save of train()
    trainer.evaluate()
    trainer.predict(Tokens(4, seed=3))
    assert _steps(root) == before
    _verify(root)
    sg.Checkpointer(root, handle_signals=False).close()  # the folder is free


# Found here: a finished run resumed by train() trained one step past max_steps (or
# num_train_epochs) and saved it, one more on every re-run; fixed in bf8373e.


def test_the_script_run_again_after_the_end_trains_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    trainer, _ = _run(tmp_path, root)
    before, fp = _steps(root), _fp(trainer)
    trainer, cb = _run(tmp_path, root)  # a new Trainer + attach: the same script again
    assert cb.resumed_step == 15
    assert trainer.state.global_step == 15
    assert _steps(root) == before and _fp(trainer) == fp


def test_train_again_on_the_same_trainer_after_the_end_trains_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    trainer, _ = _run(tmp_path, root)
    before = _steps(root)
    trainer.train()
    assert trainer.state.global_step == 15 and _steps(root) == before


@pytest.mark.parametrize(
    "exc", [RuntimeError, pytest.param(KeyboardInterrupt, marks=pytest.mark.slow)]  # CI < 20 min
)
def test_an_exception_in_train_then_a_new_trainer_in_the_same_process_resumes_bitwise(
    reference: str, tmp_path: Path, exc: type[BaseException]
) -> None:
    root = tmp_path / "run"
    trainer = _trainer(tmp_path, callbacks=[Boom(7, exc)])
    attach(trainer, root, save=sg.Every(steps=2), keep=sg.Keep(last=20))
    with pytest.raises(exc):
        trainer.train()
    assert _steps(root)[-1] == 6  # the async save of step 6 committed before train() raised
    _verify(root)
    trainer, cb = _run(tmp_path, root)
    assert cb.resumed_step == 6
    assert _fp(trainer) == reference
    _verify(root)


@pytest.mark.parametrize(
    "name", [pytest.param("run with spaces", marks=pytest.mark.slow), "运行 ünïcode ✓"]
)  # CI runs the second (it has a space too)
def test_a_run_folder_with_spaces_and_unicode(reference: str, tmp_path: Path, name: str) -> None:
    root = tmp_path / name / "exp 1"
    trainer = _trainer(tmp_path, callbacks=[Boom(9, RuntimeError)])
    attach(trainer, root, save=sg.Every(steps=2), keep=sg.Keep(last=20))
    with pytest.raises(RuntimeError):
        trainer.train()
    trainer, cb = _run(tmp_path, root)
    assert cb.resumed_step == 8 and _fp(trainer) == reference
    _verify(root)


def test_an_epoch_bounded_run_run_again_after_the_end_trains_nothing(tmp_path: Path) -> None:
    """num_train_epochs=2 (max_steps unset, the Trainer's default way to bound a run)."""
    root = tmp_path / "run"
    for _ in range(2):
        trainer = _trainer(tmp_path, max_steps=-1)
        trainer.args.num_train_epochs = 2
        cb = attach(trainer, root, save=sg.Every(steps=2), keep=sg.Keep(last=20))
        trainer.train()
    assert cb.resumed_step == 12
    assert trainer.state.global_step == 12 and trainer.state.epoch == 2.0
    assert _steps(root) == [2, 4, 6, 8, 10, 12]
