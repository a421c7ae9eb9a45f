"""``cache=`` on the framework integrations (docs/tiers.md): the Keras callback, the Hugging Face
Trainer (``attach``) and Accelerate (``attach``) with their run on S3 (moto on loopback) or a
``file://`` root and a local cache folder. A training interrupted mid-run leaves its checkpoint
on the remote; a new session with a *fresh* (empty) cache folder resumes from the remote alone
and ends bitwise equal to an uninterrupted run into a plain local folder."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg

INTEGRATIONS = Path(__file__).resolve().parents[1] / "integrations"

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Your input ran out of data"),
]


def _driver(name: str) -> Any:
    """A test module of tests/integrations (its model, data and fingerprint helpers)."""
    sys.path.insert(0, str(INTEGRATIONS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(INTEGRATIONS))


def valid_steps(url: str) -> list[int]:
    with sg.Checkpointer(url, handle_signals=False) as ck:
        return sorted(c.step for c in ck.list() if c.valid)


class Crash(Exception):
    """Raised by the training loop at a chosen step: the session ends by an exception."""


@pytest.fixture(params=["s3", "file"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_url"))
    return (tmp_path / "remote-run").as_uri()


@pytest.fixture
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- Keras ------------------------------------------------------------------------------------


@pytest.fixture
def ker() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip("Keras runs on another backend in this process")
    pytest.importorskip("keras")
    return _driver("test_outside_s14b_keras")


def keras_fit(
    ker: Any, root: str, cache: Path | None, stop_at: int | None = None
) -> dict[str, Any]:
    import random

    import numpy as np
    from torchdata.stateful_dataloader import StatefulDataLoader

    from savegame.integrations.keras import SavegameCheckpoint

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = ker.build()
    loader = StatefulDataLoader(ker.data(), batch_size=ker.BATCH, shuffle=True)
    cb = SavegameCheckpoint(root, loader=loader, save=sg.Every(steps=4), keep=sg.Keep(last=2),
                            cache=cache, verbose=0)  # fmt: skip
    steps = ker.Steps(None, stop_at)
    ker.fit(model, loader, cb, {"epochs": 3}, steps)
    return {"fingerprint": ker.fingerprint(model), "restored": cb.restored_step,
            "trained": steps.batches}  # fmt: skip


def test_keras_fit_with_a_cache_then_a_fresh_cache_resumes_bitwise(
    ker: Any, remote: str, tmp_path: Path, one_thread: None
) -> None:
    ref = keras_fit(ker, str(tmp_path / "local-ref"), None)
    # stopped at step 9 (mid-epoch 2, by another callback): the end of fit waits for the upload
    first = keras_fit(ker, remote, tmp_path / "cache-a", stop_at=9)
    assert first["trained"] == 9
    assert valid_steps(remote) == [8, 9]
    assert any((tmp_path / "cache-a").glob("step-*"))  # saves committed there first
    # another machine: only the URL, an empty cache folder
    second = keras_fit(ker, remote, tmp_path / "cache-b")
    assert second["restored"] == 9 and second["trained"] == 9
    assert second["fingerprint"] == ref["fingerprint"]
    assert valid_steps(remote) == [16, 18]


def test_keras_cache_folder_of_another_run_is_refused_as_by_the_checkpointer(
    ker: Any, tmp_path: Path, one_thread: None
) -> None:
    """The same errors as sg.Checkpointer(root, cache=...): here a cache folder that holds
    another run's checkpoints, at fit's start, before anything is trained."""
    cache = tmp_path / "cache"
    keras_fit(ker, (tmp_path / "run-a").as_uri(), cache, stop_at=4)
    with pytest.raises(sg.CheckpointError) as theirs:
        sg.Checkpointer((tmp_path / "run-b").as_uri(), cache=cache, handle_signals=False)
    with pytest.raises(type(theirs.value)) as ours:
        keras_fit(ker, (tmp_path / "run-b").as_uri(), cache)
    assert str(ours.value) == str(theirs.value)


# --- Hugging Face Trainer ---------------------------------------------------------------------


def hf_train(root: str, out_dir: Path, cache: Path | None, crash_at: int | None = None) -> Any:
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from savegame.integrations import transformers as sgt

    from . import test_hf_remote_resume as hfr

    real_attach = sgt.attach

    def attach(trainer: Any, root: Any, **kw: Any) -> Any:
        cb = real_attach(trainer, root, cache=cache, **kw)

        class Stop(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                if state.global_step == crash_at:
                    raise Crash(crash_at)

        trainer.add_callback(Stop())
        return cb

    sgt.attach = attach  # hfr.train imports attach from the module at each call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hfr.train(root, out_dir)
    finally:
        sgt.attach = real_attach


def test_hf_trainer_with_a_cache_then_a_fresh_cache_resumes_bitwise(
    s3_url: str, tmp_path: Path, one_thread: None
) -> None:
    from . import test_hf_remote_resume as hfr

    ref, _ = hf_train(str(tmp_path / "local-ref"), tmp_path / "out-ref", None)
    with pytest.raises(Crash):
        hf_train(s3_url, tmp_path / "out-a", tmp_path / "cache-a", crash_at=9)
    # train() raised: attach closed the run, which waited for the uploads (Keep(last=2))
    assert valid_steps(s3_url) == [6, 8]
    assert any((tmp_path / "cache-a").glob("step-*"))
    trainer, cb = hf_train(s3_url, tmp_path / "out-b", tmp_path / "cache-b")
    assert cb.resumed_step == 8
    assert hfr.fingerprint(trainer) == hfr.fingerprint(ref)
    assert valid_steps(s3_url) == [14, 16]


# --- Accelerate -------------------------------------------------------------------------------


def acc_train(root: str, cache: Path | None, crash_at: int | None = None) -> tuple[Any, int]:
    pytest.importorskip("accelerate")
    acc_tests = _driver("test_accelerate_integration")
    from savegame.integrations.accelerate import attach

    acc, model, opt, loader, sched, ema = acc_tests.build()
    extras: dict[str, Any] = {"epoch": 0, "losses": []}
    ckpt = attach(acc, root, save=sg.Every(steps=3), keep=sg.Keep(last=2), extras=extras,
                  cache=cache)  # fmt: skip
    with ckpt:
        step = start = acc.load_state()
        while step < acc_tests.STEPS:
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                ema.update(model)
                extras["losses"].append(loss.item())
                step += 1
                if step == crash_at:
                    raise Crash(step)
                ckpt.step(step)
                if step == acc_tests.STEPS:
                    break
            else:
                extras["epoch"] += 1
        acc.save_state(cache)  # the cache folder is accepted as the run's folder (None: the run)
    return acc_tests.fingerprint(model, opt, sched, ema, list(extras["losses"])), start


def test_accelerate_with_a_cache_then_a_fresh_cache_resumes_bitwise(
    remote: str, tmp_path: Path, one_thread: None
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = acc_train(str(tmp_path / "local-ref"), None)
        with pytest.raises(Crash):
            acc_train(remote, tmp_path / "cache-a", crash_at=11)
        assert valid_steps(remote) == [6, 9]  # the with-block's close waited for the uploads
        assert any((tmp_path / "cache-a").glob("step-*"))
        got, start = acc_train(remote, tmp_path / "cache-b")
    assert start == 9
    assert got == ref
