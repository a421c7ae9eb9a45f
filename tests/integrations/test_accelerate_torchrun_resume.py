"""Accelerate's save_state/load_state through savegame under DDP (issue 12): 2 ranks, gloo,
CPU, launched as torchrun launches them (one process per rank, ``RANK``/``LOCAL_RANK``/
``WORLD_SIZE`` and the rendezvous address in the environment; the ``Accelerator`` joins the
process group, ``distributed_type=MULTI_CPU``).

One job, three launches, checked against an uninterrupted DDP run of the same loop:

1. SIGTERM to rank 1 only, in the middle of a step no schedule saves at: rank 0 never sees
   it, yet both ranks save that step (one checkpoint: rank 0 commits, each rank writes its
   share: the replicated model, optimizer and ``register_for_checkpointing`` object once, each
   rank's loader position and losses its own) and exit 75;
2. resumed mid-epoch, then SIGKILLed on rank 1 (the launcher kills rank 0, as a scheduler does);
3. resumed again, from an epoch's last step: every rank ends **bitwise equal** to the
   uninterrupted run (parameters, AdamW moments, LR, the EMA object, every loss, Accelerate's
   epoch counter) and trained on exactly the samples it trains on in that run, each rank on its
   own half of every epoch (Accelerate's ``BatchSamplerShard`` over ``DirectRandomSampler``).
   Launch 2 resumed mid-epoch; its steps are in the final state.

This file is also the job's launcher (``python THIS_FILE ROOT OUT [options]``).
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

pytest.importorskip("accelerate")
pytest.importorskip("torchdata")

import torch  # noqa: E402

import savegame as sg  # noqa: E402

pytestmark = [pytest.mark.distributed]

WORLD = 2
N, BATCH = 48, 4  # 12 batches per epoch, 6 per rank
STEPS = 15  # 2.5 epochs
HERE = Path(__file__).resolve()
LAUNCH_TIMEOUT_S = 240


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 8, generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


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


def rank_main(opts: argparse.Namespace, rank: int) -> None:
    """One rank of the loop of docs/integrations-hf.md; writes OUT/rank-R.json."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    from savegame.integrations.accelerate import DirectRandomSampler, attach

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    ds = Data()
    loader = StatefulDataLoader(ds, batch_size=BATCH, sampler=DirectRandomSampler(ds, seed=0),
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)
    )
    assert acc.num_processes == WORLD and acc.process_index == rank, acc.state
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    ema = Ema(acc.unwrap_model(model))
    acc.register_for_checkpointing(ema)
    kwargs: dict[str, Any] = {} if opts.save_mode == "default" else {
        "async_save": opts.save_mode == "async"}  # fmt: skip
    extras: dict[str, Any] = {"losses": []}
    ckpt = attach(acc, opts.root, save=sg.Every(steps=opts.every), keep=sg.Keep(last=2),
                  extras=extras, **kwargs)  # fmt: skip
    trace: list[list[int]] = []
    step = start = acc.load_state()
    mine = rank == opts.kill_rank
    while step < STEPS:
        for x, y, idx in loader:
            trace.append([int(i) for i in idx])
            if mine and opts.during and step + 1 == opts.kill_at:
                os.kill(os.getpid(), opts.how)  # in the middle of step + 1
            loss = torch.nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            ema.update(acc.unwrap_model(model))
            extras["losses"].append(loss.item())
            step += 1
            if mine and not opts.during and step == opts.kill_at:
                # Let the async save in flight commit first, so the test knows where the resume
                # starts (killed during it, the resume takes the one before: as exact).
                ckpt.checkpointer.wait()
                os.kill(os.getpid(), opts.how)
            ckpt.step(step)
            if step == STEPS:
                break
    acc.save_state()
    ckpt.close()
    h = hashlib.sha256()
    for k, v in sorted(acc.unwrap_model(model).state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    for i, st in sorted(opt.optimizer.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(
                f"{i}{k}".encode()
                + (v.numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
            )
    for _, v in sorted(ema.shadow.items()):
        h.update(v.numpy().tobytes())
    out = {"hash": h.hexdigest(), "lr": sched.get_last_lr(), "ema": ema.updates, "losses": extras["losses"],
           "epoch": loader.iteration, "trace": trace, "restored": start,
           "async_save": ckpt.checkpointer.async_save}  # fmt: skip
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
    import accelerate  # noqa: F401  (imported once, before the fork)

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
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
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
    """Rank 0 committed one checkpoint of both ranks: the replicated model, AdamW moments and
    EMA are in rank 0's file once (bare keys); each rank's own losses are its own."""
    from savegame.engine import reader

    assert sorted(p.name for p in step_dir.glob("rank-*.safetensors")) == [
        "rank-00000.safetensors", "rank-00001.safetensors"]  # fmt: skip
    m = reader.read_manifest(step_dir)
    assert m is not None and reader.verify(step_dir) == []
    assert m.world_size == WORLD and len(m.trees) == WORLD
    shared = [k for k in m.tensors if k.startswith(("model_0/", "optimizer_0/state/", "custom_0/"))]
    assert shared and not any("module." in k for k in shared)
    for key in shared:
        files = [c.file for c in m.tensors[key].chunks]
        assert len(files) == 1 and files[0].endswith("rank-00000.safetensors"), (key, files)
    losses = [tree["extras"]["losses"] for tree in m.trees]
    assert losses[0] != losses[1]  # each rank's own batches, each rank's own record


@pytest.mark.slow  # ~26 s; CI keeps the HF Trainer's torchrun test of the same sequence
def test_accelerate_under_ddp_preempt_rank_1_then_sigkill_then_resume_is_bitwise_equal(
    tmp_path: Path,
) -> None:
    """4 launches of a 15-step, 2-rank loop (the reference included)."""
    launch(tmp_path / "ref-run", tmp_path / "ref", expect=[0, 0])
    ref = results(tmp_path / "ref")
    assert ref[0]["hash"] == ref[1]["hash"] and ref[0]["losses"] != ref[1]["losses"]
    assert ref[0]["async_save"] is True  # the default path: async saves
    per_epoch = N // (BATCH * WORLD)
    first = [{i for b in r["trace"][:per_epoch] for i in b} for r in ref]
    assert not first[0] & first[1] and len(first[0] | first[1]) == N

    run = tmp_path / "run"
    # 1. SIGTERM to rank 1 only, in the middle of step 4 (Every(steps=3) does not save step 4)
    launch(run, tmp_path / "a", "--every", "3", "--kill-at", "4", "--during",
           "--how", str(int(signal.SIGTERM)), expect=[75, 75])  # fmt: skip
    assert _valid_steps(run) == [3, 4]
    _check_written_once(run / "step-000000000004")
    # 2. resumed from 4 (mid-epoch), SIGKILLed on rank 1 after step 13, before its step()
    codes = launch(run, tmp_path / "b", "--every", "3", "--kill-at", "13")
    assert codes[1] == -signal.SIGKILL
    assert max(_valid_steps(run)) == 12
    # 3. resumed from 12 (an epoch's last step): bitwise equal on every rank, so launch 2's
    #    steps 5-12 were the uninterrupted run's too
    launch(run, tmp_path / "c", "--every", "3", expect=[0, 0])
    res = results(tmp_path / "c")
    for rank in range(WORLD):
        assert res[rank]["restored"] == 12, rank
        assert res[rank]["trace"] == ref[rank]["trace"][12:], rank
        for key in ("hash", "lr", "ema", "losses", "epoch"):
            assert res[rank][key] == ref[rank][key], (rank, key)


if __name__ == "__main__":
    launcher_main(sys.argv[1:])
