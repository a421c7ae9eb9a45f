"""A Hugging Face run started again after its end, or with a larger ``max_steps``.

- Run to the end, then ``train()`` again (a requeued job): nothing is trained, the state is the
  final one, ``train()`` returns normally (``attach``), and no new checkpoint appears.
- Run to step 15, then with ``max_steps=30``: training continues to step 30. The restored
  ``TrainerState`` must not bring back the old ``max_steps`` (it stopped at 16 before).
- The callback without ``attach`` (``bind``): a complete run raises a typed error instead of
  training past its end.
"""

from __future__ import annotations

import hashlib
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import savegame as sg  # noqa: E402
from savegame import errors  # noqa: E402
from savegame.integrations.transformers import SavegameCallback, attach  # noqa: E402

from ._run_folders import steps as _steps  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out: Path, max_steps: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    args = TrainingArguments(
        output_dir=str(out / "hf"), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens())


def _fp(trainer: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _attach(trainer: Any, root: Path) -> Any:
    return attach(trainer, root, save=sg.Every(steps=5), keep=sg.Keep(last=20))


def test_a_finished_run_started_again_trains_nothing_and_returns(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first = _trainer(tmp_path, 15)
    _attach(first, root)
    first.train()
    done, before = _fp(first), _steps(root)
    assert before[-1] == 15

    again = _trainer(tmp_path, 15)  # the requeued job: a fresh process would build the same
    cb = _attach(again, root)
    out = again.train()
    assert cb.resumed_step == 15 and cb.complete
    assert out.global_step == 15 and again.state.global_step == 15
    assert _fp(again) == done  # the final state, restored, not trained further
    assert _steps(root) == before  # nothing saved
    sg.Checkpointer(root, handle_signals=False).close()  # the folder was released


def test_a_larger_max_steps_continues_to_the_new_end(tmp_path: Path) -> None:
    root, ref_root = tmp_path / "run", tmp_path / "ref"
    whole = _trainer(tmp_path / "w", 30)
    _attach(whole, ref_root)
    whole.train()

    short = _trainer(tmp_path, 15)
    _attach(short, root)
    short.train()
    longer = _trainer(tmp_path, 30)
    cb = _attach(longer, root)
    longer.train()
    assert cb.resumed_step == 15
    assert longer.state.global_step == 30 and longer.state.max_steps == 30
    assert _steps(root)[-1] == 30
    # constant LR: 15 + 15 steps equal 30 uninterrupted ones, bit for bit
    assert _fp(longer) == _fp(whole)


def test_the_callback_without_attach_refuses_to_train_past_the_end(tmp_path: Path) -> None:
    root = tmp_path / "run"

    def bound(trainer: Any) -> Any:
        cb = SavegameCallback(root, save=sg.Every(steps=5)).bind(trainer)
        trainer.add_callback(cb)
        return cb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plain loader: "cannot save its position"
        first = _trainer(tmp_path, 10)
        bound(first)
        first.train()
        again = _trainer(tmp_path, 10)
        cb = bound(again)
        with pytest.raises(errors.CheckpointError, match="nothing to train") as exc:
            again.train()
    assert "max_steps" in str(exc.value) and str(root) in str(exc.value)
    assert _steps(root)[-1] == 10
    # released by the refusal itself: a program that catches it keeps its own Ctrl-C handler and
    # can open the folder again without calling cb.close()
    assert cb.checkpointer is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    sg.Checkpointer(root, handle_signals=False).close()
    cb.close()  # idempotent
