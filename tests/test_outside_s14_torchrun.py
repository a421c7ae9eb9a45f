"""Outside review (s14): a plain PyTorch DDP loop under real ``torchrun --nproc_per_node 2
--standalone`` (gloo, CPU), written from the README and docs/distributed.md only, with a
``DistributedSampler`` (``set_epoch`` after ``restore()``) inside a ``StatefulDataLoader`` with
``num_workers=2``, dropout and per-item noise drawn in the workers.

Signals a user (or a scheduler) sends to *one* process of the job, in turn: SIGTERM and SIGINT to
rank 0 only, SIGINT to rank 1 only, SIGTERM and SIGINT to the torchrun agent alone, SIGKILL to
rank 1 and to rank 0 alone. After each, the job is started again and must end with the same
sample order and the same parameters and optimizer moments on every rank as a job that was never
interrupted, bitwise. Then a 2-rank checkpoint restored on 1 rank (docs/distributed.md,
"Restoring on a different number of ranks"): refused by default, ``per_rank="fresh"`` restores the
model and optimizer.

The training script is written into tmp_path (it is this file's own, not the suite's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import savegame as sg

pytestmark = pytest.mark.distributed

TOTAL, WORKERS = 12, 2  # 40 samples / 2 ranks / batch 4: 5 steps per epoch, 12 steps = 3 epochs
PAUSE_S = 0.3
TIMEOUT_S = 180

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from datetime import timedelta
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.utils.data import Dataset, DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    import savegame as sg

    SAMPLES = 40
    BATCH = int(os.environ.get("S14_BATCH", "4"))


    class Noisy(Dataset):
        def __len__(self):
            return SAMPLES

        def __getitem__(self, i):
            return torch.tensor([float(i), torch.rand(()).item()])


    def main(root, out, tag, total, pause, workers, per_rank):
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        torch.manual_seed(100 + rank)
        ds = Noisy()
        sampler = DistributedSampler(ds, shuffle=True, seed=5)
        loader = StatefulDataLoader(
            sg.data.resumable(ds), batch_size=BATCH, sampler=sampler, num_workers=workers)
        extras = {"epoch": 0}
        state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader,
                              extras=extras)
        ckpt = sg.Checkpointer(root, save=sg.Every(steps=3), keep=sg.Keep(last=3),
                               async_save=os.environ.get("S14_ASYNC") == "1")
        step = ckpt.restore(state, per_rank=per_rank)
        restored = [p.detach().clone() for p in model.parameters()]
        torch.save(restored, out / f"restored-{tag}-{rank}.pt")
        with open(out / f"ids-{tag}-{rank}.txt", "a") as trace:
            while step < total:
                sampler.set_epoch(extras["epoch"])
                for x in loader:
                    loss = (model(x / torch.tensor([SAMPLES, 1.0])) - 0.5).square().mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    trace.write(f"{step} {[int(i) for i in x[:, 0]]}\\n")
                    trace.flush()
                    time.sleep(pause)
                    sys.stdout.write(f"rank {rank} step {step}\\n")
                    sys.stdout.flush()
                    ckpt.step(state, step)
                    if step >= total:
                        break
                else:
                    extras["epoch"] += 1
        ckpt.close()
        final = [p.detach().clone() for p in model.parameters()]
        for group in opt.param_groups:
            for p in group["params"]:
                final += [opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]
        final.append(torch.tensor(sched.get_last_lr()))
        torch.save(final, out / f"final-{tag}-{world}-{rank}.pt")
        dist.destroy_process_group()


    if __name__ == "__main__":
        a = sys.argv[1:]
        out = Path(a[1])
        try:
            main(a[0], out, a[2], int(a[3]), float(a[4]), int(a[5]), a[6])
        except SystemExit as exc:
            (out / f"exit-{a[2]}-{os.environ['RANK']}.txt").write_text(str(exc.code))
            raise
        except BaseException as exc:
            (out / f"error-{a[2]}-{os.environ['RANK']}.txt").write_text(repr(exc))
            raise
    """
)


def _script(where: Path) -> Path:
    path = where / "train_s14.py"
    if not path.exists():
        path.write_text(SCRIPT)
    return path


def _launch(
    root: Path,
    out: Path,
    tag: str,
    *,
    pause: float,
    world: int = 2,
    per_rank: str = "strict",
    total: int = TOTAL,
    async_save: bool = False,
    batch: int = 4,
    workers: int = WORKERS,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={world}", "--max-restarts=0", "--monitor-interval=0.2",
         str(_script(out)), str(root), str(out), tag, str(total), str(pause), str(workers),
         per_rank],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SAVEGAME_DIST_TIMEOUT_S": "30",
             "PYTHONWARNINGS": "ignore", "S14_ASYNC": "1" if async_save else "0",
             "S14_BATCH": str(batch)},
    )  # fmt: skip


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(pid: int) -> None:
    for p in _tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rank_pid(agent: int, rank: int) -> int:
    for pid in _tree(agent):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent and f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under torchrun pid {agent}")


def _lines(proc: subprocess.Popen[str], seen: list[str]) -> Iterator[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        yield line.strip()


def _wait_for(proc: subprocess.Popen[str], marker: str, seen: list[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    for line in _lines(proc, seen):
        if line == marker:
            return
        if time.monotonic() > deadline:
            break
    _kill_tree(proc.pid)
    proc.communicate(timeout=30)
    pytest.fail(f"the job never printed {marker!r}:\n{''.join(seen)[-5000:]}")


def _finish(proc: subprocess.Popen[str], seen: list[str]) -> int:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"the job did not end in {TIMEOUT_S}s:\n{(''.join(seen) + out)[-5000:]}")
    seen.append(out)
    return proc.returncode


def _trace(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, ids = line.split(" ", 1)
        out[int(step)] = ids
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    seen: list[str] = []
    code = _finish(_launch(out / "run", out, "ref", pause=0), seen)
    assert code == 0, "".join(seen)[-5000:]
    return out


def _resume_and_compare(root: Path, out: Path, reference: Path, *, async_save: bool = False) -> str:
    seen: list[str] = []
    code = _finish(_launch(root, out, "run", pause=0, async_save=async_save), seen)
    log = "".join(seen)
    assert code == 0, log[-5000:]
    for rank in range(2):
        got, want = _trace(out / f"ids-run-{rank}.txt"), _trace(reference / f"ids-ref-{rank}.txt")
        assert sorted(want) == list(range(1, TOTAL + 1))
        assert got == want, f"rank {rank}: the samples differ from the uninterrupted job"
        mine = torch.load(out / f"final-run-2-{rank}.pt", weights_only=True)
        ref = torch.load(reference / f"final-ref-2-{rank}.pt", weights_only=True)
        assert len(mine) == len(ref)
        for i, (p, q) in enumerate(zip(mine, ref, strict=True)):
            assert torch.equal(p.view(torch.uint8), q.view(torch.uint8)), (
                f"rank {rank}: tensor {i} of params/moments/lr differs from the uninterrupted job"
            )
    assert not list(root.glob(".tmp-*")), "a leftover temp folder survived the restart"
    return log


def _run_and_signal(
    tmp_path: Path, who: str, signum: int, *, async_save: bool = False
) -> tuple[Path, str, int]:
    """Start the job, wait until rank 0 finished step 6 (mid-epoch 1, a save at 6 committed),
    send ``signum`` to ``who`` ("agent", "rank0", "rank1"), wait for the job to end."""
    root, seen = tmp_path / "run", []
    proc = _launch(root, tmp_path, "run", pause=PAUSE_S, async_save=async_save)
    try:
        _wait_for(proc, "rank 0 step 7", seen)
        pid = proc.pid if who == "agent" else _rank_pid(proc.pid, int(who[-1]))
        os.kill(pid, signum)
        code = _finish(proc, seen)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.communicate(timeout=30)
    return root, "".join(seen), code


def _valid_steps(root: Path) -> list[int]:
    """Committed checkpoints, read without opening a writer (which would tidy the folder)."""
    steps = []
    for d in sorted(root.glob("step-*")):
        if (d / "manifest.json").exists():
            sg.open(d).metadata()  # validates the manifest
            steps.append(int(d.name.split("-")[1]))
    return steps


def _assert_every_rank_saved_and_exited_75(root: Path, out: Path, log: str) -> int:
    for rank in range(2):
        exit_file = out / f"exit-run-{rank}.txt"
        assert exit_file.exists() and exit_file.read_text() == "75", (
            f"rank {rank} did not exit 75 (EXIT_PREEMPTED):\n{log[-5000:]}"
        )
    steps = _valid_steps(root)
    saved = steps[-1]
    assert 7 <= saved < TOTAL, (steps, log[-3000:])
    assert max(_trace(out / "ids-run-0.txt")) == saved, "the save is not at the step boundary"
    return saved


@pytest.mark.slow  # ~25 s each on the shared 2-core machine
@pytest.mark.parametrize(
    ("who", "signum"),
    [("rank0", signal.SIGTERM), ("rank0", signal.SIGINT), ("rank1", signal.SIGINT),
     ("agent", signal.SIGTERM)],
    ids=["SIGTERM-rank0", "SIGINT-rank0", "SIGINT-rank1", "SIGTERM-agent"],
)  # fmt: skip
def test_a_preemption_signal_to_one_process_saves_on_every_rank_exits_75_and_resumes_bitwise(
    tmp_path: Path, reference: Path, who: str, signum: int
) -> None:
    """README "Preemption": SIGTERM, SIGUSR1 or SIGINT -> save at the next step boundary, exit 75;
    docs/distributed.md: a signal delivered to one rank only makes every rank save and exit 75;
    README: torchrun forwards SIGTERM to the ranks, which save and exit 75 (torchrun exits 1)."""
    root, log, code = _run_and_signal(tmp_path, who, signum)
    saved = _assert_every_rank_saved_and_exited_75(root, tmp_path, log)
    if who == "agent":
        assert code != 0, "torchrun reported success for a signalled job"
    assert saved < TOTAL
    _resume_and_compare(root, tmp_path, reference)


@pytest.mark.slow  # CI under 20 minutes (SIGTERM to the tree: tests/distributed/test_torchrun_resume.py)
def test_ctrl_c_to_torchrun_is_forwarded_and_the_job_saves_and_resumes_bitwise(
    tmp_path: Path, reference: Path
) -> None:
    """Ctrl-C in the terminal running torchrun reaches torchrun only (each rank has its own
    session); torchrun forwards it to the ranks, which (README) save at the next step boundary
    and exit 75."""
    root, log, _ = _run_and_signal(tmp_path, "agent", signal.SIGINT)
    _assert_every_rank_saved_and_exited_75(root, tmp_path, log)
    _resume_and_compare(root, tmp_path, reference)


@pytest.mark.slow
def test_sigterm_to_rank_1_with_async_saves_saves_on_every_rank_and_resumes_bitwise(
    tmp_path: Path, reference: Path
) -> None:
    """README "Async saves" under torchrun: a signal's save still waits for the commit, so
    both ranks exit 75 with a whole checkpoint of the step they stopped at."""
    root, log, _ = _run_and_signal(tmp_path, "rank1", signal.SIGTERM, async_save=True)
    _assert_every_rank_saved_and_exited_75(root, tmp_path, log)
    _resume_and_compare(root, tmp_path, reference, async_save=True)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(p)
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_sigkill_of_the_torchrun_agent_leaves_no_rank_hanging_and_the_restart_is_bitwise(
    tmp_path: Path, reference: Path
) -> None:
    """``kill -9`` of torchrun alone: its ranks (own sessions) are orphaned. Whatever they do,
    they must end on their own (not hold the run folder's lock forever), and starting the job
    again must give the uninterrupted job's result."""
    root, seen = tmp_path / "run", []
    proc = _launch(root, tmp_path, "run", pause=PAUSE_S)
    try:
        _wait_for(proc, "rank 0 step 7", seen)
        tree = _tree(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 90
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(tree)
    finally:
        for p in _alive(_tree(proc.pid)) + _alive(locals().get("tree", [])):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"orphaned ranks/workers still running 90 s after torchrun died: {left}"
    _resume_and_compare(root, tmp_path, reference)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_sigkill_of_one_rank_commits_nothing_partial_and_the_restart_is_bitwise(
    tmp_path: Path, reference: Path, rank: int
) -> None:
    """The OOM killer takes one rank. torchrun tears the other down; whatever that rank does
    (it may be inside a save's collectives), the run folder holds only whole checkpoints and the
    restarted job ends bitwise equal to the uninterrupted one. Bounded: no rank hangs."""
    root, log, code = _run_and_signal(tmp_path, f"rank{rank}", signal.SIGKILL)
    assert code != 0
    steps = _valid_steps(root)
    assert steps and steps[-1] >= 6, (steps, log[-3000:])
    for s in steps:
        assert sg.open(root / f"step-{s:012d}").metadata()["world_size"] == 2
    _resume_and_compare(root, tmp_path, reference)


def _finals(out: Path, tag: str, world: int) -> list[list[torch.Tensor]]:
    return [
        torch.load(out / f"final-{tag}-{world}-{r}.pt", weights_only=True) for r in range(world)
    ]


@pytest.mark.slow  # five torchrun jobs, ~50 s
def test_world_size_2_to_1_and_back_refused_strictly_and_continued_with_fresh(
    tmp_path: Path,
) -> None:
    """docs/distributed.md "Restoring on a different number of ranks": ``restore(state)`` raises
    ``RestoreError`` naming the two world sizes, nothing applied; ``per_rank="fresh"`` restores
    model / optimizer / scheduler and equal extras and the run continues. 2 ranks save step 6
    (mid-epoch 1), 1 rank continues to 9, 2 ranks again to 12. The same checkpoint restores into
    the bare model in a plain process (``per_rank="fresh"``), and ``savegame convert`` gives
    bare keys."""
    root = tmp_path / "run"
    seen: list[str] = []
    assert _finish(_launch(root, tmp_path, "w2", pause=0, total=6), seen) == 0, "".join(seen)
    at6 = _finals(tmp_path, "w2", 2)[0]

    for tag, world, total in (("w1strict", 1, 9), ("w2strict", 2, 12)):
        seen = []
        if tag == "w2strict":  # first give the run a 1-rank checkpoint (step 9)
            code = _finish(
                _launch(root, tmp_path, "w1", pause=0, world=1, per_rank="fresh", total=9), seen
            )
            assert code == 0, "".join(seen)[-5000:]
            restored = torch.load(tmp_path / "restored-w1-0.pt", weights_only=True)
            assert all(torch.equal(p, q) for p, q in zip(restored, at6, strict=False)), (
                "per_rank='fresh' on 1 rank did not restore the 2-rank step 6 weights"
            )
            man = sg.open(root / "step-000000000009").metadata()
            assert man["world_size"] == 1
            seen = []
        code = _finish(_launch(root, tmp_path, tag, pause=0, world=world, total=total), seen)
        assert code != 0, f"{tag}: a checkpoint of another world size was restored strictly"
        for r in range(world):
            err = (tmp_path / f"error-{tag}-{r}.txt").read_text()
            assert "RestoreError" in err and "1" in err and "2" in err, err
            assert not (tmp_path / f"restored-{tag}-{r}.pt").exists()

    seen = []
    code = _finish(_launch(root, tmp_path, "w2b", pause=0, per_rank="fresh", total=12), seen)
    assert code == 0, "".join(seen)[-5000:]
    w2b = _finals(tmp_path, "w2b", 2)
    for i, (p, q) in enumerate(zip(w2b[0], w2b[1], strict=True)):
        assert torch.equal(p, q), f"the two ranks disagree on tensor {i} after 1 -> 2 ranks"

    # the 2-rank step 6 checkpoint, into a bare model in this process
    torch.manual_seed(1)
    bare = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    with sg.Checkpointer(root) as c, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the documented warning, if any
        assert c.restore(sg.TrainState(model=bare), step=6, per_rank="fresh", only=["model"]) == 6
    assert all(torch.equal(p, q) for p, q in zip(bare.parameters(), at6, strict=False))
    out = tmp_path / "model.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "savegame", "convert", str(root / "step-000000000006"), str(out),
         "--to", "safetensors"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with sg.open(out) as r:
        keys = r.keys()
        assert not any(k.startswith("module.") or "/module." in k for k in keys), keys
        assert torch.equal(r.read(next(k for k in keys if k.endswith("0.weight"))), at6[0])


@pytest.mark.slow  # two torchrun jobs, ~25 s
def test_a_two_rank_checkpoint_restored_on_one_rank_is_refused_then_fresh_restores_weights(
    tmp_path: Path, reference: Path
) -> None:
    """docs/distributed.md: on a world-size change ``restore(state)`` raises ``RestoreError``
    (nothing applied); ``per_rank="fresh"`` restores model/optimizer/scheduler and equal extras,
    and the run continues. Here under ``torchrun --nproc_per_node 1``, from the reference run's
    folder copied (its newest checkpoint is step 12, the end: restore and finish at once)."""
    import shutil

    root = tmp_path / "run"
    shutil.copytree(reference / "run", root)
    seen: list[str] = []
    code = _finish(_launch(root, tmp_path, "strict", pause=0, world=1), seen)
    log = "".join(seen)
    assert code != 0, "a 2-rank checkpoint restored strictly on 1 rank was not refused"
    err = (tmp_path / "error-strict-0.txt").read_text()
    assert "RestoreError" in err, err
    assert "2" in err and "1" in err, err
    assert not (tmp_path / "restored-strict-0.pt").exists(), "restore applied something"

    seen = []
    code = _finish(_launch(root, tmp_path, "fresh", pause=0, world=1, per_rank="fresh"), seen)
    log = "".join(seen)
    assert code == 0, log[-5000:]
    restored = torch.load(tmp_path / "restored-fresh-0.pt", weights_only=True)
    ref = torch.load(reference / "final-ref-2-0.pt", weights_only=True)
    for p, q in zip(restored, ref[: len(restored)], strict=True):
        assert torch.equal(p, q), "per_rank='fresh' did not restore the model's weights"


def _flat(trace: dict[int, str], after: int) -> list[int]:
    return [i for step in sorted(trace) if step > after for i in json.loads(trace[step])]


@pytest.mark.slow  # three torchrun jobs, ~35 s
def test_after_an_oom_each_rank_resumes_with_half_the_batch_at_the_same_sample(
    tmp_path: Path, reference: Path
) -> None:
    """README "Resuming with changes" + docs/resume.md "Limits": under torchrun each rank's
    position is translated on its rank. Saved at step 6 with batch 4 (mid-epoch 1), resumed
    with batch 2: every rank's samples from there on are the uninterrupted job's, in order."""
    root, seen = tmp_path / "run", []
    assert _finish(_launch(root, tmp_path, "b4", pause=0, total=6), seen) == 0, "".join(seen)
    seen = []
    code = _finish(_launch(root, tmp_path, "b2", pause=0, total=24 - 6, batch=2), seen)
    assert code == 0, "".join(seen)[-5000:]
    for rank in range(2):
        want = _flat(_trace(reference / f"ids-ref-{rank}.txt"), 6)
        got = _flat(_trace(tmp_path / f"ids-b2-{rank}.txt"), 6)
        assert len(want) == 24 and got == want, f"rank {rank}: {got} != {want}"


@pytest.mark.slow  # two torchrun jobs, ~25 s
def test_fewer_workers_mid_epoch_is_refused_on_every_rank_without_hanging(
    tmp_path: Path,
) -> None:
    """docs/resume.md: another number of workers mid-epoch, while ``sg.data.resumable`` keeps
    state in them, raises ``RestoreError`` at the first ``iter(loader)`` naming the worker
    counts. Under torchrun every rank must raise it, and the job must end (no rank left
    waiting in a collective for the others)."""
    root, seen = tmp_path / "run", []
    assert _finish(_launch(root, tmp_path, "w2", pause=0, total=6), seen) == 0, "".join(seen)
    seen = []
    start = time.monotonic()
    code = _finish(_launch(root, tmp_path, "w0", pause=0, total=12, workers=0), seen)
    assert code != 0
    assert time.monotonic() - start < 60, "the refused job took as long as a collective timeout"
    for rank in range(2):
        err = (tmp_path / f"error-w0-{rank}.txt").read_text()
        assert "RestoreError" in err and "2" in err and "0" in err, err
        trace = tmp_path / f"ids-w0-{rank}.txt"
        assert not trace.exists() or not trace.read_text(), "it trained after a refused restore"
