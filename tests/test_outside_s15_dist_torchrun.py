"""Outside review (s15, R2): real ``python -m torch.distributed.run --standalone`` jobs (gloo,
CPU) with DDP, a ``DistributedSampler`` inside a ``StatefulDataLoader`` with 2 workers, and the
README loop. A job of 2 ranks saves mid-epoch; the same script is started on 3 and on 4 ranks:

- ``restore(state)`` (``per_rank="strict"``) is refused with ``RestoreError`` on every rank, naming
  both world sizes, and no rank hangs;
- ``restore(state, per_rank="fresh")`` restores the DDP weights, the Adam moments, the scheduler
  and the ``extras`` epoch on every rank (docs/distributed.md, "Restoring on a different number
  of ranks"); the sampler is rebuilt for the new world size and positioned with
  ``set_epoch(extras["epoch"])``; the job trains on and every rank ends with the same weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

TIMEOUT_S = 240

SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from torch.utils.data import Dataset, DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader
    import savegame as sg


    class Noisy(Dataset):
        def __len__(self):
            return 48

        def __getitem__(self, i):
            return torch.tensor([float(i), torch.rand(()).item()])


    def main(root, out, tag, total, per_rank):
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
            find_unused_parameters=world > 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        torch.manual_seed(100 + rank)
        sampler = DistributedSampler(Noisy(), shuffle=True, seed=5)
        loader = StatefulDataLoader(sg.data.resumable(Noisy()), batch_size=4, sampler=sampler,
                                    num_workers=2)
        extras = {"epoch": 0}
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader,
                              extras=extras)
        ckpt = sg.Checkpointer(root, save=sg.Every(steps=4), keep=sg.Keep(last=3))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = ckpt.restore(state, per_rank=per_rank)
        except sg.RestoreError as exc:
            with open(f"{out}/refused-{tag}-{rank}.txt", "w") as f:
                f.write(str(exc))
            ckpt.close()
            dist.destroy_process_group()
            return
        got = {"step": torch.tensor(step), "epoch": torch.tensor(extras["epoch"]),
               "lr": torch.tensor(sched.get_last_lr())}
        got.update({f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())})
        for i, p in enumerate(model.parameters()):
            if p in opt.state:
                got[f"m{i}"] = opt.state[p]["exp_avg"].clone()
        torch.save(got, f"{out}/restored-{tag}-{rank}.pt")
        if caught and rank == 0:
            with open(f"{out}/warned-{tag}.txt", "w") as f:
                f.write("\\n".join(str(w.message) for w in caught))
        while step < total:
            sampler.set_epoch(extras["epoch"])
            for x in loader:
                loss = (model(x / torch.tensor([48.0, 1.0])) - 0.5).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                ckpt.step(state, step)
                if step >= total:
                    break
            else:
                extras["epoch"] += 1
        ckpt.close()
        final = {"epoch": torch.tensor(extras["epoch"]), "lr": torch.tensor(sched.get_last_lr())}
        final.update({f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())})
        for i, p in enumerate(model.parameters()):
            final[f"m{i}"] = opt.state[p]["exp_avg"].clone()
        torch.save(final, f"{out}/final-{tag}-{rank}.pt")
        dist.destroy_process_group()


    if __name__ == "__main__":
        a = sys.argv[1:]
        main(a[0], a[1], a[2], int(a[3]), a[4])
    """
)


def _run(tmp: Path, world: int, tag: str, total: int, per_rank: str = "strict") -> str:
    script = tmp / "train_s15.py"
    if not script.exists():
        script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={world}", "--max-restarts=0", "--monitor-interval=0.2",
         str(script), str(tmp / "run"), str(tmp), tag, str(total), per_rank],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SAVEGAME_DIST_TIMEOUT_S": "30",
             "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{tag} on {world} ranks hung:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{tag} on {world} ranks exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.slow
def test_a_2_rank_ddp_checkpoint_on_3_and_4_ranks_refused_strictly_then_continued_fresh(
    tmp_path: Path,
) -> None:
    # 48 samples / 2 ranks / batch 4 = 6 steps per epoch: step 8 is mid-epoch 1
    _run(tmp_path, 2, "w2", total=8)
    saved = torch.load(tmp_path / "final-w2-0.pt")
    assert int(saved["epoch"]) == 1
    for world in (3, 4):
        _run(tmp_path, world, f"strict{world}", total=12)
        for r in range(world):
            msg = (tmp_path / f"refused-strict{world}-{r}.txt").read_text()
            saved_world = "2" if world == 3 else "3"  # the newest checkpoint's world size
            assert saved_world in msg and str(world) in msg and "per_rank='fresh'" in msg, msg
        _run(tmp_path, world, f"fresh{world}", total=9 + world, per_rank="fresh")
        for r in range(world):
            got = torch.load(tmp_path / f"restored-fresh{world}-{r}.pt")
            assert int(got["step"]) == (8 if world == 3 else 12), (world, r)
            if world == 3:  # the 2-rank step 8: weights, moments, schedule, epoch
                assert int(got["epoch"]) == 1 and torch.equal(got["lr"], saved["lr"])
                for k in saved:
                    if k.startswith(("p", "m")):
                        assert torch.equal(got[k], saved[k]), (world, r, k)
        warned = (tmp_path / f"warned-fresh{world}.txt").read_text()
        assert "left as constructed" in warned, warned
        finals = [torch.load(tmp_path / f"final-fresh{world}-{r}.pt") for r in range(world)]
        for f in finals[1:]:  # DDP keeps the ranks together after the reshard
            for k in finals[0]:
                assert torch.equal(f[k], finals[0][k]), (world, k)
