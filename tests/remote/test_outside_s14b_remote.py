"""Outside review (s14b), as a new user with docs/integrations.md, docs/integrations-hf.md,
docs/remote.md and docs/transfer.md only: Lightning, Keras and the Hugging Face Trainer with the
run folder on S3 (moto on loopback), SIGKILLed mid-training in a process of its own and
resumed by a new process that has nothing local, compared bitwise with an uninterrupted local
run; a finished run requeued (nothing trained); then ``savegame ls / verify / pull / push`` on
what those runs left, and the pulled run continued locally.

The training scripts are the s14b integration test files themselves (run as scripts).
A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import savegame as sg

INTEGRATIONS = Path(__file__).resolve().parents[1] / "integrations"
LEASE_S = 2.0  # the killed writer's lease on the bucket (default 60 s) expires after this

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Your input ran out of data"),
]


def _driver(name: str) -> Any:
    """The s14b integration test file ``name`` as a module (its train/run_script)."""
    sys.path.insert(0, str(INTEGRATIONS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(INTEGRATIONS))


@pytest.fixture
def lit() -> Any:
    pytest.importorskip("lightning")
    return _driver("test_outside_s14b_lightning")


@pytest.fixture
def ker() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip("Keras runs on another backend in this process")
    pytest.importorskip("keras")
    return _driver("test_outside_s14b_keras")


def valid_steps(url: str) -> list[int]:
    with sg.Checkpointer(url, handle_signals=False) as ck:
        return sorted(c.step for c in ck.list() if c.valid)


def after_lease(killed_at: float) -> None:
    time.sleep(max(0.0, LEASE_S + 0.5 - (time.monotonic() - killed_at)))


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "savegame", *args, "--no-progress"]
        if args[0] in ("push", "pull")
        else [sys.executable, "-m", "savegame", *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )  # fmt: skip


# --- Lightning --------------------------------------------------------------------------------


@pytest.mark.slow  # 35-70 s under load 4 (several training processes)
def test_lightning_on_s3_killed_resumed_by_a_new_process_then_requeued(
    lit: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))
    cfg = {"save": {"steps": 3}, "max_epochs": 3, "val_check_interval": 2}
    ref = lit.train({**cfg, "root": str(tmp_path / "local-ref")})
    rc, _, err = lit.run_script({**cfg, "root": s3_url, "kill_at": 8})
    assert rc == -signal.SIGKILL, err
    killed = time.monotonic()
    after_lease(killed)  # (listing through a Checkpointer takes the writer's lease too)
    assert valid_steps(s3_url), "nothing committed on S3 before step 8"
    rc, resumed, err = lit.run_script({**cfg, "root": s3_url})  # a new process, only the URL
    assert rc == 0 and resumed is not None, err
    lit.assert_bitwise(ref, resumed)
    assert 15 in resumed["steps"]
    rc, again, err = lit.run_script({**cfg, "root": s3_url})  # requeued after it finished
    assert rc == 0 and again is not None, err
    assert again["trace"] == [] and again["restored"] == 15 and again["validations"] == 0
    assert again["fingerprint"] == ref["fingerprint"]


@pytest.mark.slow  # ~17-20 s: the same promise is in CI through faster tests
def test_lightning_on_s3_max_steps_then_larger_in_a_new_process(
    lit: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))
    cfg = {"save": {"steps": 4}}
    ref = lit.train({**cfg, "max_steps": 13, "root": str(tmp_path / "local-ref")})
    rc, first, err = lit.run_script({**cfg, "max_steps": 7, "root": s3_url})
    assert rc == 0 and first is not None and 7 in first["steps"], err
    rc, more, err = lit.run_script({**cfg, "max_steps": 13, "root": s3_url})
    assert rc == 0 and more is not None, err
    assert more["restored"] == 7
    lit.assert_bitwise(ref, more)


def test_lightning_callback_takes_a_cache_folder(lit: Any, s3_url: str, tmp_path: Path) -> None:
    from savegame.integrations.lightning import SavegameCallback

    SavegameCallback(s3_url, cache=str(tmp_path / "cache"), save=sg.Every(steps=2))  # type: ignore[call-arg]


def test_keras_callback_takes_a_cache_folder(ker: Any, s3_url: str, tmp_path: Path) -> None:
    from savegame.integrations.keras import SavegameCheckpoint

    SavegameCheckpoint(s3_url, cache=str(tmp_path / "cache"))  # type: ignore[call-arg]


# --- Keras ------------------------------------------------------------------------------------


@pytest.mark.slow  # 35-70 s under load 4 (several training processes)
def test_keras_on_s3_killed_resumed_by_a_new_process_then_requeued(
    ker: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))
    cfg = {"save": {"steps": 4}, "epochs": 3}
    ref = ker.train({**cfg, "root": str(tmp_path / "local-ref")})
    rc, _, err = ker.run_script({**cfg, "root": s3_url, "kill_at": 10})
    assert rc == -signal.SIGKILL, err
    killed = time.monotonic()
    after_lease(killed)
    rc, resumed, err = ker.run_script({**cfg, "root": s3_url})
    assert rc == 0 and resumed is not None, err
    ker.assert_bitwise(ref, resumed)
    assert 18 in resumed["steps"]
    rc, again, err = ker.run_script({**cfg, "root": s3_url})
    assert rc == 0 and again is not None, err
    assert again["trained"] == 0 and again["restored"] == 18
    assert again["fingerprint"] == ref["fingerprint"]


# --- the CLI on what the runs left ------------------------------------------------------------


@pytest.mark.slow  # 35-70 s under load 4 (several training processes)
def test_cli_ls_verify_pull_push_on_a_lightning_run_then_continue_the_pulled_run(
    lit: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train 2 epochs into S3; ls / verify the URL; pull it; continue the pulled copy locally to
    4 epochs (bitwise equal to an uninterrupted 4-epoch run); push that run to a new prefix;
    verify it there; a second pull into the same folder moves nothing new and still verifies."""
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))
    cfg = {"save": {"steps": 4}}
    ref = lit.train({**cfg, "max_epochs": 4, "root": str(tmp_path / "local-ref")})
    rc, first, err = lit.run_script({**cfg, "max_epochs": 2, "root": s3_url})
    assert rc == 0 and first is not None, err
    steps = first["steps"]
    assert steps[-1] == 10

    ls = cli("ls", s3_url)
    assert ls.returncode == 0, ls.stderr
    for s in steps:
        assert f"{s:012d}" in ls.stdout or f" {s} " in ls.stdout or str(s) in ls.stdout
    ver = cli("verify", s3_url)
    assert ver.returncode == 0, ver.stdout + ver.stderr

    local = tmp_path / "pulled"
    pull = cli("pull", s3_url, str(local))
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert valid_steps(str(local)) == steps
    assert cli("verify", str(local)).returncode == 0

    more = lit.train({**cfg, "max_epochs": 4, "root": str(local)})
    assert more["restored"] == 10
    lit.assert_bitwise(ref, more)

    dest = s3_url + "-continued"
    push = cli("push", str(local), dest)
    assert push.returncode == 0, push.stdout + push.stderr
    assert valid_steps(dest) == valid_steps(str(local))
    ver2 = cli("verify", dest)
    assert ver2.returncode == 0, ver2.stdout + ver2.stderr

    again = cli("pull", s3_url, str(local))  # the older run into the newer folder
    assert again.returncode != 0 or valid_steps(str(local)) == more["steps"], (
        "pulling the older run into a folder that went on changed its checkpoints"
    )


@pytest.mark.slow  # 35-70 s under load 4 (several training processes)
def test_cli_verify_finds_a_damaged_object_of_a_keras_run_on_s3(
    ker: Any, s3_url: str, s3_env: Any, tmp_path: Path
) -> None:
    import boto3

    cfg = {"save": {"steps": 6}, "epochs": 2, "async_save": False}
    rc, first, err = ker.run_script({**cfg, "root": s3_url})
    assert rc == 0 and first is not None, err
    assert cli("verify", s3_url).returncode == 0
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint, aws_access_key_id=s3_env.access_key,
                      aws_secret_access_key=s3_env.secret_key, region_name=s3_env.region)  # fmt: skip
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    data_keys = [k for k in keys if "/step-000000000012/" in k and not k.endswith(".json")]
    assert data_keys, keys
    key = max(data_keys, key=lambda k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"])
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    ver = cli("verify", s3_url)
    assert ver.returncode != 0
    assert "000000000012" in ver.stdout + ver.stderr
    # and a requeued fit resumes past it (from step 6), ending where the run ended
    rc, again, err = ker.run_script({**cfg, "root": s3_url})
    assert rc == 0 and again is not None, err
    assert again["restored"] == 6 and again["fingerprint"] == first["fingerprint"]


# --- Hugging Face Trainer ---------------------------------------------------------------------


def test_hf_trainer_on_s3_finished_run_requeued_trains_nothing(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    import torch

    from . import test_hf_remote_resume as hf

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer, cb = hf.train(s3_url, tmp_path / "out-a")
        assert trainer.state.global_step == 16
        done = hf.fingerprint(trainer)
        assert 16 in valid_steps(s3_url)
        trainer2, cb2 = hf.train(s3_url, tmp_path / "out-b")  # a fresh machine, requeued
        assert cb2.resumed_step == 16
        assert trainer2.state.global_step == 16
        assert hf.fingerprint(trainer2)[0] == done[0], "the requeued finished run trained again"
    finally:
        torch.set_num_threads(threads)


# --- Accelerate (the documented example script, as a user runs it) ----------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_train.py"


def _example(run: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore", str(EXAMPLE), "--run", run, "--steps", "40", *extra],
        capture_output=True, text=True, timeout=180, env=dict(os.environ),
    )  # fmt: skip


def _finish_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("finished at step")]
    assert lines, out
    return lines[-1]


@pytest.mark.slow  # 35-70 s under load 4 (several training processes)
def test_accelerate_example_on_s3_killed_resumed_then_requeued(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("accelerate")
    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))
    ref = _example(str(tmp_path / "local-ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _example(s3_url, "--kill-at", "23")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    after_lease(time.monotonic())
    resumed = _example(s3_url)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # step 20's async save may still have been uploading at the kill (docs: lost, then step 10)
    assert "starting at step 20" in resumed.stdout or "starting at step 10" in resumed.stdout
    assert _finish_line(resumed.stdout) == _finish_line(ref.stdout)
    again = _example(s3_url)  # requeued after it finished
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting at step 40" in again.stdout
    assert valid_steps(s3_url)[-1] == 40


def _hf_train(root: str, out_dir: Path, max_steps: int) -> tuple[Any, Any, int]:
    """test_hf_remote_resume's setup with a constant LR and a given max_steps: (trainer, the
    savegame callback, optimizer steps this call trained)."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from savegame.integrations.transformers import attach

    from .test_hf_remote_resume import SEQ, VOCAB, Tokens

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=3, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens(40, 0))
    cb = attach(trainer, root, save=sg.Every(steps=3), keep=sg.Keep(last=2))
    trained = [0]

    class Count(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            trained[0] += 1

    trainer.add_callback(Count())
    trainer.train()
    return trainer, cb, trained[0]


def test_hf_trainer_on_s3_larger_max_steps_continues_and_equals_an_uninterrupted_run(
    s3_url: str, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    import torch

    from .test_hf_remote_resume import fingerprint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, _, n = _hf_train(str(tmp_path / "local-ref"), tmp_path / "o0", 14)
        assert n == 14
        first, _, n = _hf_train(s3_url, tmp_path / "o1", 8)
        assert n == 8 and first.state.global_step == 8
        same, cb, n = _hf_train(s3_url, tmp_path / "o2", 8)  # requeued: nothing
        assert n == 0 and cb.resumed_step == 8
        more, cb, n = _hf_train(s3_url, tmp_path / "o3", 14)  # a larger max_steps
        assert cb.resumed_step == 8 and n == 6 and more.state.global_step == 14
        assert fingerprint(more)[0] == fingerprint(ref)[0]
        assert valid_steps(s3_url)[-1] == 14
    finally:
        torch.set_num_threads(threads)
