"""Outside review (s16, R5): ``start_from=`` forks over a project's lifetime, as docs/tiers.md
("Start from another run (fork)") describes them.

A → B (from one incremental checkpoint of A) → C (from B's run folder); A pruned and then
deleted afterwards: B and C still verify and restore exactly (no bytes shared across runs);
``start_from`` naming a pruned checkpoint (typed error, nothing created there); a source whose
only checkpoint is damaged; ``start_from`` with a run that has its own checkpoints (the run
wins); the source is never written.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.cli.main import main


class _Run:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.base = torch.nn.Linear(16, 16)  # frozen: incremental saves share it
        self.head = torch.nn.Linear(3, 2)
        self.opt = torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)
        self.extras = {"tag": "x"}
        self.state = sg.TrainState(
            base=self.base, model=self.head, optimizer=self.opt, extras=self.extras
        )

    def train(self) -> None:
        self.opt.zero_grad()
        self.head(torch.randn(4, 3)).sum().backward()
        self.opt.step()

    def snap(self) -> list[torch.Tensor]:
        out = [t.detach().clone() for t in (*self.base.parameters(), *self.head.parameters())]
        out += [
            self.opt.state[p]["momentum_buffer"].clone()
            for p in self.head.parameters()
            if p in self.opt.state
        ]
        return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _ck(root: Path, **kw: object) -> sg.Checkpointer:
    kw.setdefault("save", sg.Every(steps=1))
    kw.setdefault("keep", sg.Keep(last=10))
    return sg.Checkpointer(root, handle_signals=False, **kw)  # type: ignore[arg-type]


def test_a_fork_chain_survives_pruning_and_deleting_its_origin(tmp_path: Path) -> None:
    a_root, b_root, c_root = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    a = _Run()
    snaps: dict[str, list[torch.Tensor]] = {}
    with _ck(a_root) as ck:
        for s in range(1, 6):
            a.train()
            ck.step(a.state, s)
            if s == 3:
                snaps["A3"] = a.snap()
    a_before = _tree_digest(a_root)
    b = _Run(seed=1)
    with _ck(b_root, start_from=a_root / "step-000000000003") as ck:
        assert ck.restore(b.state) == 3  # an incremental checkpoint: its base is A's step 1
        assert _same(b.snap(), snaps["A3"])
        for s in range(4, 8):
            b.train()
            ck.step(b.state, s)
        snaps["B7"] = b.snap()
    c = _Run(seed=2)
    with _ck(c_root, start_from=b_root) as ck:
        assert ck.restore(c.state) == 7 and _same(c.snap(), snaps["B7"])
        for s in (8, 9):
            c.train()
            ck.step(c.state, s)
        snaps["C9"] = c.snap()
    assert _tree_digest(a_root) == a_before  # read-only source: not a byte changed
    # the origin is pruned to one checkpoint, then deleted altogether
    assert main(["prune", str(a_root), "--keep-last", "1"]) == 0
    assert main(["verify", str(b_root)]) == 0 and main(["verify", str(c_root)]) == 0
    shutil.rmtree(a_root)
    assert main(["verify", str(b_root)]) == 0 and main(["verify", str(c_root)]) == 0
    for root, want, key in ((b_root, 7, "B7"), (c_root, 9, "C9")):
        r = _Run(seed=3)
        # restarted with the same arguments (docs: pass the same to every attempt of the job)
        with _ck(root, start_from=a_root if root == b_root else b_root) as ck:
            assert ck.restore(r.state) == want
        assert _same(r.snap(), snaps[key])


def test_start_from_a_pruned_checkpoint_is_a_typed_error_and_creates_nothing(
    tmp_path: Path,
) -> None:
    a_root = tmp_path / "A"
    a = _Run()
    with _ck(a_root, keep=sg.Keep(last=1)) as ck:
        for s in (1, 2, 3):
            a.train()
            ck.step(a.state, s)
    gone = a_root / "step-000000000001"
    assert not gone.exists()  # pruned by retention
    b = _Run(seed=1)
    before = b.snap()
    with _ck(tmp_path / "B", start_from=gone) as ck:
        with pytest.raises(sg.CheckpointNotFoundError) as info:
            ck.restore(b.state)
        assert str(gone) in str(info.value)
        assert _same(b.snap(), before)
        # the job's own run is intact and usable after the error
        ck.save(b.state, 1)
    assert not gone.exists() and sorted(p.name for p in a_root.glob("step-*")) == [
        "step-000000000003"
    ]


def test_the_runs_own_checkpoint_wins_over_start_from(tmp_path: Path) -> None:
    a_root, b_root = tmp_path / "A", tmp_path / "B"
    a = _Run()
    with _ck(a_root, save=sg.Every(steps=10)) as ck:
        for s in range(1, 21):
            a.train()
            ck.step(a.state, s)
    b = _Run(seed=1)
    with _ck(b_root, start_from=a_root) as ck:
        assert ck.restore(b.state) == 20
        b.train()
        ck.step(b.state, 21)
        at21 = b.snap()
    # A goes on to a later step; B's restart still resumes from its own 21, not A's 40
    with _ck(a_root, save=sg.Every(steps=10)) as ck:
        ck.restore(a.state)
        for s in range(21, 41):
            a.train()
            ck.step(a.state, s)
    b2 = _Run(seed=2)
    with _ck(b_root, start_from=a_root) as ck:
        assert ck.restore(b2.state) == 21 and _same(b2.snap(), at21)
        # restore(step=N) looks only at the run itself
        with pytest.raises(sg.CheckpointNotFoundError):
            ck.restore(b2.state, step=40)


def test_start_from_whose_only_checkpoint_is_damaged_says_the_job_starts_from_scratch(
    tmp_path: Path,
) -> None:
    """The run's own folder in the same situation warns "no valid checkpoint in … starting from
    step 0" (facade.py); a fork that silently trains from random weights after being told it
    fell back to "an earlier one" wastes the job."""
    a_root = tmp_path / "A"
    a = _Run()
    with _ck(a_root, incremental=False) as ck:
        a.train()
        ck.step(a.state, 1)
    f = a_root / "step-000000000001" / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    b = _Run(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _ck(tmp_path / "B", start_from=a_root / "step-000000000001") as ck:
            try:
                got = ck.restore(b.state)
            except sg.CheckpointError:
                return  # a typed refusal is fine too
    assert got == 0
    texts = [str(w.message) for w in caught]
    assert any("step 0" in t or "from scratch" in t for t in texts), texts
    assert f.exists()  # the damaged source is left where it is either way
