"""A Hugging Face Trainer that survives interruption, through savegame (seconds on a CPU).

    python examples/hf_trainer_train.py                 # trains 40 steps, saving every 5
    python examples/hf_trainer_train.py --kill-at 17    # SIGKILLs itself at step 17 ...
    python examples/hf_trainer_train.py                 # ... and this resumes at step 15, exactly

(Saves are async by default: a kill while step 15's save is still being written resumes from
step 10 instead, as exactly. ``attach(..., async_save=False)`` makes every save blocking.)

A tiny GPT-2 built from a config, random token ids (no download). The two savegame lines are
marked; everything else is a plain Trainer. ``save_strategy="no"``: the Trainer's own (pickled)
checkpoints are not needed. See docs/integrations-hf.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import savegame as sg
from savegame.integrations.transformers import attach


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 32, vocab: int = 128, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class KillAt(TrainerCallback):
    """For the demo only: a SIGKILL (no warning, no cleanup) at a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            print(f"SIGKILL at step {self.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", default="runs/hf-trainer", help="the savegame run folder")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--kill-at", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)  # bit-exact across processes on CPU

    torch.manual_seed(
        0
    )  # the same initial weights in every process (the Trainer seeds only after this)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(
        output_dir=os.path.join(a.run, "hf-output"),
        max_steps=a.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=5,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="no",  # savegame saves; the Trainer's own checkpoints are not used
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(96), eval_dataset=Tokens(32, seed=1)
    )
    # ---- savegame: one line. train() then resumes from the newest valid checkpoint, if any.
    cb = attach(
        trainer, a.run, save=sg.Every(steps=5), keep=sg.Keep(last=2, best=1, monitor="eval_loss")
    )
    if a.kill_at is not None:
        trainer.add_callback(KillAt(a.kill_at))
    trainer.train()
    h = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(model.state_dict().items())))
    print(
        f"resumed from step {cb.resumed_step}; finished at step {trainer.state.global_step}; "
        f"parameters sha256 {h.hexdigest()[:16]}"
    )


if __name__ == "__main__":
    main()
