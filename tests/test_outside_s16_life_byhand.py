"""Outside review (s16, R5): a run folder that people touched by hand over its life, against the
README ("The format (v1)", "Damaged checkpoints", "Command line") and docs/incremental.md.

Unrelated files and folders next to the checkpoints; a folder of the user's own that happens to
start with ``.tmp-``; a symlinked ``.tmp-`` folder; the manifest of the base of an incremental
chain deleted; a step folder renamed; an incremental checkpoint copied in from another run;
``run.json`` deleted. ls / verify / prune / restore say something clear and lose nothing.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

import savegame as sg
from savegame.cli.main import main


class _Run:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.base = torch.nn.Linear(16, 16)  # frozen: incremental saves share it
        self.head = torch.nn.Linear(3, 2)
        self.opt = torch.optim.SGD(self.head.parameters(), lr=0.1)
        self.state = sg.TrainState(base=self.base, model=self.head, optimizer=self.opt)

    def train(self) -> None:
        self.opt.zero_grad()
        self.head(torch.randn(4, 3)).sum().backward()
        self.opt.step()

    def snap(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in (*self.base.parameters(), *self.head.parameters())]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def _train_run(
    root: Path, steps: range, seed: int = 0, **kw: object
) -> tuple[_Run, dict[int, list[torch.Tensor]]]:
    r = _Run(seed)
    snaps = {}
    kw.setdefault("keep", sg.Keep(last=10))
    with sg.Checkpointer(root, save=sg.Every(steps=1), handle_signals=False, **kw) as ck:  # type: ignore[arg-type]
        for s in steps:
            r.train()
            ck.step(r.state, s)
            snaps[s] = r.snap()
    return r, snaps


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _restore_newest(root: Path) -> tuple[int, _Run, list[str]]:
    r = _Run(seed=99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sg.Checkpointer(root, handle_signals=False) as ck:
            step = ck.restore(r.state)
    return step, r, [str(w.message) for w in caught]


def test_unrelated_files_and_look_alike_names_are_left_alone_by_every_command(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _, snaps = _train_run(root, range(1, 5), keep=sg.Keep(last=2))
    (root / "notes.md").write_text("lr sweep\n")
    (root / "events.out.tfevents.123.host").write_bytes(b"\0" * 10)
    (root / "logs").mkdir()
    (root / "logs" / "train.log").write_text("ok\n")
    (root / "step-5").mkdir()  # too few digits: not a checkpoint folder
    (root / "step-000000000099").write_text("a file, not a folder")
    (root / "step-000000000004.bak").mkdir()
    theirs = {
        "notes.md",
        "events.out.tfevents.123.host",
        "logs",
        "step-5",
        "step-000000000099",
        "step-000000000004.bak",
    }
    for argv in (
        ["ls", str(root)],
        ["verify", str(root)],
        ["prune", str(root), "--keep-last", "1"],
    ):
        code, out = _cli(*argv)
        assert code == 0, out
        assert "Traceback" not in out
    assert theirs <= set(_names(root))
    step, r, caught = _restore_newest(root)
    assert step == 4 and _same(r.snap(), snaps[4]) and not caught
    _train_run(root, range(5, 7), keep=sg.Keep(last=1))  # a writer opens, saves, prunes
    assert theirs <= set(_names(root))
    assert (root / "logs" / "train.log").read_text() == "ok\n"


def test_a_symlinked_tmp_folder_is_never_followed_by_the_writer(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _train_run(root, range(1, 3))
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_bytes(b"keep me")
    (root / ".tmp-scratch").symlink_to(elsewhere, target_is_directory=True)
    _train_run(root, range(3, 4))  # the next writer collects leftovers
    assert (elsewhere / "precious.bin").read_bytes() == b"keep me"


def test_a_users_own_dot_tmp_folder_in_the_run_is_not_deleted(tmp_path: Path) -> None:
    """README: "Saves go to `.tmp-step-…` folders …; leftovers from killed saves are removed at
    the next start." A folder savegame never made is no leftover of a killed save."""
    root = tmp_path / "run"
    _train_run(root, range(1, 3))
    mine = root / ".tmp-notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("compare with run B\n")
    _train_run(root, range(3, 4))
    assert (mine / "todo.txt").read_text() == "compare with run B\n"


def test_the_manifest_of_a_shared_base_deleted_by_hand_loses_no_kept_checkpoint(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _, snaps = _train_run(root, range(1, 4))
    base = root / "step-000000000001"
    assert (
        "step-000000000001/rank-00000.safetensors"
        in json.loads((root / "step-000000000003" / "manifest.json").read_text())["files"]
    )
    (base / "manifest.json").unlink()
    code, out = _cli("verify", str(root))
    assert code == 1 and "step-000000000001 has no manifest.json" in out
    assert out.count("ok   ") == 2  # steps 2 and 3 still read every byte they use
    step, r, caught = _restore_newest(root)
    assert step == 3 and _same(r.snap(), snaps[3])
    names = _names(root)
    # set aside (kept for inspection), its shared file retired so steps 2 and 3 still resolve
    assert any(n.startswith("damaged-step-000000000001-") for n in names), names
    assert "retired-step-000000000001-rank-00000.safetensors" in names
    code, out = _cli("verify", str(root))
    assert code == 0, out
    code, out = _cli("prune", str(root), "--keep-last", "1")
    assert code == 0 and _cli("verify", str(root))[0] == 0
    step, r, _ = _restore_newest(root)
    assert step == 3 and _same(r.snap(), snaps[3])


def test_a_renamed_step_folder_is_flagged_set_aside_and_kept(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _, snaps = _train_run(root, range(1, 4), incremental=False)
    (root / "step-000000000003").rename(root / "step-000000000009")
    code, out = _cli("verify", str(root))
    assert code == 1 and "folder name says step 9 but the manifest says 3" in out
    code, out = _cli("prune", str(root), "--keep-last", "1")
    assert (root / "step-000000000009" / "manifest.json").exists()  # never deleted by prune
    step, r, caught = _restore_newest(root)
    assert step == 2 and _same(r.snap(), snaps[2])
    assert any("step-000000000009" in c for c in caught), caught
    (aside,) = [p for p in root.iterdir() if p.name.startswith("damaged-step-000000000009-")]
    assert (aside / "manifest.json").exists() and (aside / "rank-00000.safetensors").exists()
    code, out = _cli("ls", str(root))
    assert code == 0 and "damaged-step-000000000009-" in out.replace("\n", "")


def _copied_in(tmp_path: Path) -> tuple[Path, dict[int, list[torch.Tensor]]]:
    """Run R (incremental: step 15 refers to step 12's file) and run Q with its own step 12;
    R's step 15 is copied into Q by hand."""
    r_root, q_root = tmp_path / "R", tmp_path / "Q"
    _train_run(r_root, range(12, 16))
    _, snaps = _train_run(q_root, range(12, 15), seed=3)
    shutil.copytree(r_root / "step-000000000015", q_root / "step-000000000015")
    return q_root, snaps


def test_an_incremental_checkpoint_copied_from_another_run_loses_nothing_of_this_run(
    tmp_path: Path,
) -> None:
    q_root, snaps = _copied_in(tmp_path)
    code, out = _cli("verify", str(q_root))
    assert code == 1 and "FAIL " + str(q_root / "step-000000000015") in out
    code, out = _cli("prune", str(q_root), "--keep-last", "1", "--dry-run")
    assert code == 0 and "not ours" in out
    step, r, caught = _restore_newest(q_root)
    assert step == 14 and _same(r.snap(), snaps[14])  # this run's newest, exact
    code, out = _cli("verify", str(q_root))
    assert code == 0, out
    for s in (12, 13):
        r = _Run(seed=8)
        with sg.Checkpointer(q_root, handle_signals=False) as ck:
            assert ck.restore(r.state, step=s) == s
        assert _same(r.snap(), snaps[s])


def test_verify_of_a_copied_in_checkpoint_does_not_call_this_runs_intact_file_corrupted(
    tmp_path: Path,
) -> None:
    """docs/incremental.md: "A checkpoint folder copied alone (without its run) misses the files
    it refers to: restore and verify report … (… shares it with step-… of its run …). Use
    `savegame push` to copy a checkpoint with its shared files." Here the file is not missing but
    belongs to this run (another run id), and verify says step 12's (intact) file is corrupted."""
    q_root, _ = _copied_in(tmp_path)
    code, out = _cli("verify", str(q_root))
    block = out.split("FAIL " + str(q_root / "step-000000000015"), 1)[1]
    assert "corrupted" not in block, block
    assert "another run" in block or "push" in block or "run id" in block, block


def test_run_json_deleted_by_hand_restores_and_never_deletes_the_old_checkpoints(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    r, snaps = _train_run(root, range(1, 4))
    (root / "run.json").unlink()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=1), handle_signals=False
    ) as ck:
        assert ck.restore(r.state) == 3 and _same(r.snap(), snaps[3])
        for s in (4, 5, 6):
            r.train()
            ck.step(r.state, s)
        kept = {i.step: i.kept_for for i in ck.list() if i.kind == "checkpoint"}
    # a new run id: the old checkpoints are another family's now, listed as such and left alone
    assert kept == {1: ("not ours",), 2: ("not ours",), 3: ("not ours",), 6: ("last",)}
    assert _cli("verify", str(root))[0] == 0
