"""The Hugging Face Trainer with its run folder in a bucket (issue 12 with issue 11):
``attach(trainer, "s3://…")`` against a real S3 server on loopback (moto). A training process
SIGKILLed mid-run is resumed by a new process that has nothing local of the first one (a fresh
output folder), from the bucket alone, and ends bitwise equal to an uninterrupted run — which
saved into a local folder: where a run's checkpoints live changes nothing in its trajectory.

Real transformers, a tiny GPT-2 built from a config (dropout on), CPU, one thread.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import savegame as sg  # noqa: E402

SEQ, VOCAB = 16, 64

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:accelerate.*"),
]


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(root: str | Path, out_dir: Path, *, kill_at: int | None = None) -> tuple[Any, Any]:
    """One session: a fresh Trainer (output in ``out_dir``), savegame attached to ``root``."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from savegame.integrations.transformers import attach

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=16, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, learning_rate=1e-3, warmup_steps=3, logging_steps=3,
        eval_strategy="steps", eval_steps=5, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens(40, 0),
                      eval_dataset=Tokens(16, 1))  # fmt: skip
    cb = attach(trainer, root, save=sg.Every(steps=2), keep=sg.Keep(last=2))

    class Kill(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == kill_at:
                if cb.checkpointer is not None:
                    cb.checkpointer.wait()  # the last (async, the default) save commits first
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.add_callback(Kill())
    trainer.train()
    return trainer, cb


def fingerprint(trainer: Any) -> tuple[str, list[Any], list[float]]:
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for i, st in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(f"{i}{k}".encode())
            h.update(v.contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    log = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k
            and not k.startswith("train_")} for e in trainer.state.log_history
           if "train_runtime" not in e]  # fmt: skip
    return h.hexdigest(), log, trainer.lr_scheduler.get_last_lr()


def in_child(url: str, out_dir: Path, kill_at: int) -> int:
    """The run killed at ``kill_at`` in a new Python process (a process of its own, as after a
    real crash; the S3 endpoint and credentials pass through the environment). Not a fork: a
    fork of this multi-threaded test process (torch, obstore's runtime) can hang or crash."""
    proc = subprocess.run(
        [sys.executable, __file__, url, str(out_dir), str(kill_at)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if proc.returncode >= 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.returncode


LEASE_S = 3.0  # the killed writer's lease on the bucket (default 60 s) expires after this


@pytest.mark.slow  # ~17 s; CI keeps test_outside_s14b_remote's HF Trainer on S3
def test_hf_trainer_killed_resumes_from_the_bucket_bitwise(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from savegame.integrations.transformers import newest_valid_checkpoint

    monkeypatch.setenv("SAVEGAME_LEASE_SECONDS", str(LEASE_S))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_trainer, _ = train(tmp_path / "local-run", tmp_path / "out-ref")
        reference = fingerprint(ref_trainer)

        assert in_child(s3_url, tmp_path / "out-a", kill_at=9) == -signal.SIGKILL
        killed = time.monotonic()
        newest = newest_valid_checkpoint(s3_url)
        assert newest is not None and newest.step == 8
        assert str(newest.path).startswith(s3_url + "/step-")

        # The dead writer's lease must expire first (a restart within it gets LockedError
        # naming the holder and the expiry; docs/integrations-hf.md).
        time.sleep(max(0.0, LEASE_S + 0.5 - (time.monotonic() - killed)))
        # a new process on another machine would have only the URL: a fresh output folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer, cb = train(s3_url, tmp_path / "out-b")
        assert cb.resumed_step == 8
        assert fingerprint(trainer) == reference
        assert trainer.state.global_step == 16
        with sg.Checkpointer(s3_url, handle_signals=False) as ck:  # Keep(last=2) in the bucket
            assert [c.step for c in ck.list() if c.valid] == [14, 16]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # the killed run (in_child)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(sys.argv[1], Path(sys.argv[2]), kill_at=int(sys.argv[3]))
