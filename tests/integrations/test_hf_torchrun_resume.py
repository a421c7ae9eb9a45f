"""The Hugging Face Trainer + savegame under DDP (issue 12): 2 ranks, gloo, CPU, launched as
torchrun launches them (one process per rank, ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and the
rendezvous address in the environment; the Trainer's Accelerate state joins the process group).

One job, three launches, checked against an uninterrupted DDP run:

1. SIGTERM to rank 1 only, during a step no schedule saves at: rank 0 never sees it, yet both
   ranks save that step at its boundary (one checkpoint: rank 0 commits, each rank writes its
   share) and exit 75;
2. resumed, then SIGKILLed on rank 1 mid-epoch (the launcher kills rank 0, as a scheduler does);
3. resumed again: every rank ends **bitwise equal** to the uninterrupted run (parameters, Adam
   moments, scheduler, log history with every gathered loss, ``eval_loss`` and epoch value) and
   trained on exactly the samples it trains on in that run.

DDP on 2 gloo ranks in one thread each is deterministic on CPU (a sum of two gradients does not
depend on the order). This file is also the job's launcher (``python THIS_FILE ROOT OUT
[options]``): one interpreter imports transformers once and forks the ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402

import savegame as sg  # noqa: E402

pytestmark = [pytest.mark.distributed]

WORLD = 2
N_SAMPLES, SEQ, VOCAB, BATCH = 40, 16, 64, 4  # 20 samples per rank: 5 steps per epoch
MAX_STEPS = 12  # 2.4 epochs
HERE = Path(__file__).resolve()
LAUNCH_TIMEOUT_S = 240


class TokenDataset(torch.utils.data.Dataset):
    """Random token ids; records which samples this process fetched, in order."""

    def __init__(self, n: int, seed: int, trace: list[int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.trace = trace

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.trace is not None:
            self.trace.append(int(i))
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_trainer(out_dir: Path, trace: list[int]) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=3,
        logging_steps=3,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        disable_tqdm=True,
    )
    return Trainer(
        model=GPT2LMHeadModel(cfg),
        args=args,
        train_dataset=TokenDataset(N_SAMPLES, seed=0, trace=trace),
        eval_dataset=TokenDataset(16, seed=1),
    )


def fingerprint(trainer: Any) -> dict[str, Any]:
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for i, st in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(f"{i}{k}".encode())
            h.update(v.contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    log = [
        {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
        for e in trainer.state.log_history
        if "train_runtime" not in e
    ]
    return {"hash": h.hexdigest(), "lr": trainer.lr_scheduler.get_last_lr(), "log": log,
            "step": trainer.state.global_step, "epoch": trainer.state.epoch}  # fmt: skip


def rank_main(opts: argparse.Namespace, rank: int) -> None:
    """One rank: ``train()`` (fresh or resumed by savegame); writes OUT/rank-R.json."""
    from transformers import TrainerCallback

    from savegame.integrations import transformers as sgt

    torch.set_num_threads(1)
    trace: list[int] = []
    trainer = build_trainer(Path(opts.out), trace)
    assert trainer.args.world_size == WORLD and trainer.args.process_index == rank

    class Killer(TrainerCallback):  # attach() keeps savegame's callback last
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if rank == opts.kill_rank and opts.during and state.global_step + 1 == opts.kill_at:
                os.kill(os.getpid(), opts.how)
            # After step kill_at's events, savegame's save of it included: at the next step.
            if rank == opts.kill_rank and not opts.during and state.global_step == opts.kill_at:
                # Let the async save of this step commit first, so the test knows where the
                # resume starts (killed during it, the resume takes the one before: as exact).
                if cb.checkpointer is not None:
                    cb.checkpointer.wait()
                os.kill(os.getpid(), opts.how)

    kwargs: dict[str, Any] = {} if opts.save_mode == "default" else {
        "async_save": opts.save_mode == "async"}  # fmt: skip
    cb = sgt.attach(trainer, opts.root, save=sg.Every(steps=opts.every), keep=sg.Keep(last=2),
                    **kwargs)  # fmt: skip
    if opts.kill_at is not None:
        trainer.add_callback(Killer())
    trainer.train()
    out = {**fingerprint(trainer), "trace": trace, "restored": cb.resumed_step,
           "async_save": cb.async_save}  # fmt: skip
    Path(opts.out, f"rank-{rank}.json").write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_main(argv: list[str]) -> None:
    """Fork the ranks; when one dies by a signal, SIGKILL the others (the job is gone, as when
    a node or a scheduler kills it); print their exit statuses (negative: the signal)."""
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--how", type=int, default=int(signal.SIGKILL))
    p.add_argument("--during", action="store_true")
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--save-mode", choices=["default", "sync", "async"], default="default")
    opts = p.parse_args(argv)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    import transformers  # noqa: F401  (imported once, before the fork)
    import transformers.trainer  # noqa: F401

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), GROUP_RANK="0",
                      GLOO_SOCKET_IFNAME="lo", SAVEGAME_DIST_TIMEOUT_S="60")  # fmt: skip
    pids: dict[int, int] = {}
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a rank
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
            code = 0
            try:
                rank_main(opts, rank)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids[pid] = rank
    codes: dict[int, int] = {}
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S - 10
    while len(codes) < WORLD:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                for other, r in pids.items():
                    if r not in codes:
                        os.kill(other, signal.SIGKILL)
                print("LAUNCH-TIMEOUT", flush=True)
            time.sleep(0.05)
            continue
        rank = pids[pid]
        codes[rank] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            for other, r in pids.items():
                if r not in codes:
                    os.kill(other, signal.SIGKILL)
    print("EXIT-CODES " + json.dumps([codes[r] for r in range(WORLD)]), flush=True)


# ---- the test -----------------------------------------------------------------------------------
def launch(root: Path, out: Path, *args: str, expect: list[int] | None = None) -> list[int]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    proc = subprocess.run([sys.executable, str(HERE), str(root), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)  # fmt: skip
    log = (proc.stdout + proc.stderr)[-6000:]
    marker = [line for line in proc.stdout.splitlines() if line.startswith("EXIT-CODES ")]
    assert proc.returncode == 0 and marker, log
    codes: list[int] = json.loads(marker[-1].removeprefix("EXIT-CODES "))
    if expect is not None:
        assert codes == expect, log
    return codes


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(WORLD)]


def _valid_steps(root: Path) -> list[int]:
    with sg.Checkpointer(root, handle_signals=False) as ck:
        return sorted(c.step for c in ck.list() if c.valid)


def _check_written_once(step_dir: Path) -> None:
    """Rank 0 committed one checkpoint of both ranks; the replicated model and Adam moments are
    in rank 0's file once, under their bare keys; each rank's tree (its loader position) is its
    own. (Here every tensor is equal on both ranks, RNGs included: the Trainer seeds every rank
    alike and DDP keeps the replicas equal, so rank 1's file holds no tensor.)"""
    from savegame.engine import reader

    assert sorted(p.name for p in step_dir.glob("rank-*.safetensors")) == [
        "rank-00000.safetensors", "rank-00001.safetensors"]  # fmt: skip
    m = reader.read_manifest(step_dir)
    assert m is not None and reader.verify(step_dir) == []
    model_keys = [k for k in m.tensors if k.startswith("model/")]
    assert model_keys and not any("module." in k for k in model_keys)
    for key in model_keys + [k for k in m.tensors if k.startswith("optimizer/state/")]:
        files = [c.file for c in m.tensors[key].chunks]
        assert len(files) == 1 and files[0].endswith("rank-00000.safetensors"), (key, files)
    assert m.world_size == WORLD and len(m.trees) == WORLD
    assert all("loader" in tree and "trainer" in tree for tree in m.trees)


def test_trainer_under_ddp_preempt_rank_1_then_sigkill_then_resume_is_bitwise_equal(
    tmp_path: Path,
) -> None:
    """~4 launches of a 12-step, 2-rank job (the reference included)."""
    launch(tmp_path / "ref-run", tmp_path / "ref", expect=[0, 0])
    ref = results(tmp_path / "ref")
    assert ref[0]["hash"] == ref[1]["hash"] and ref[0]["step"] == MAX_STEPS
    assert ref[0]["async_save"] is True  # the default path: async saves
    # the ranks trained on disjoint halves of each epoch
    per_epoch = N_SAMPLES // WORLD
    assert not set(ref[0]["trace"][:per_epoch]) & set(ref[1]["trace"][:per_epoch])

    run = tmp_path / "run"
    # 1. SIGTERM to rank 1 only, during step 3 (Every(steps=2) does not save step 3)
    launch(run, tmp_path / "a", "--kill-at", "3", "--during", "--how", str(int(signal.SIGTERM)),
           expect=[75, 75])  # fmt: skip
    assert _valid_steps(run) == [2, 3]
    _check_written_once(run / "step-000000000003")
    # 2. resumed from 3, SIGKILLed on rank 1 after step 8 (mid-epoch 2)
    codes = launch(run, tmp_path / "b", "--kill-at", "8")
    assert codes[1] == -signal.SIGKILL
    assert max(_valid_steps(run)) == 8
    # 3. resumed from 8: bitwise equal on every rank
    launch(run, tmp_path / "c", expect=[0, 0])
    res = results(tmp_path / "c")
    for rank in range(WORLD):
        assert res[rank]["restored"] == 8, rank
        assert res[rank]["trace"] == ref[rank]["trace"][8 * BATCH :], rank
        for key in ("hash", "lr", "log", "step", "epoch"):
            assert res[rank][key] == ref[rank][key], (rank, key)


if __name__ == "__main__":
    launcher_main(sys.argv[1:])
