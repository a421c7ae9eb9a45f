"""Outside review (s16, R5): retention over a run's lifetime, as a new user reads the README's
"When to save, what to keep" table, docs/incremental.md and the ``savegame prune`` help.

Eighty saves with keep-last + keep-best (ties, NaN, ±inf, saves without the metric) +
keep-every; what ``prune --dry-run`` plans against what ``prune`` does, ``prune`` run twice,
``verify`` of every kept (incremental) checkpoint afterwards; a restart with another ``Keep``;
the sizes ``ls``/``list_run`` report for retired shared files; ``prune`` flags that name only
part of a rule.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame import checkpointer as runs
from savegame.cli.main import main


class _Run:
    """A tiny trainable head over a frozen base (so incremental saves share bytes)."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.base = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(3, 2)
        self.opt = torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)
        self.state = sg.TrainState(base=self.base, model=self.head, optimizer=self.opt)

    def train(self) -> None:
        self.opt.zero_grad()
        self.head(torch.randn(4, 3)).sum().backward()
        self.opt.step()


def _metric(s: int) -> dict[str, float] | None:
    """A loss with everything a long run produces: ties, NaN, ±inf, evaluations skipped."""
    if s % 7 == 0:
        return None
    if s % 11 == 0:
        return {"loss": math.nan}
    if s % 13 == 0:
        return {"loss": math.inf}
    if s % 17 == 0:
        return {"loss": -math.inf}
    return {"loss": float((s * 37) % 10)}


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step-*"))


def _expected(n: int, keep: sg.Keep) -> set[int]:
    """What the README's table says is kept, computed by hand (saves at every step: index = s-1)."""
    last = set(range(n - keep.last + 1, n + 1))
    scored = [
        (v["loss"], s) for s in range(1, n + 1) if (v := _metric(s)) and not math.isnan(v["loss"])
    ]
    best = {s for _, s in sorted(scored)[: keep.best]}  # mode min; ties: the earlier step
    every = {s for s in range(1, n + 1) if (s - 1) % keep.every == 0} if keep.every else set()
    return last | best | every


def test_eighty_saves_keep_exactly_last_best_and_every_and_all_verify(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    keep = sg.Keep(last=2, best=3, monitor="loss", mode="min", every=25)
    r = _Run()
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=keep, handle_signals=False) as ck:
        for s in range(1, 81):
            r.train()
            ck.step(r.state, s, metrics=_metric(s))
        infos = {i.step: i for i in ck.list() if i.kind == "checkpoint"}
    want = _expected(80, keep)
    # -inf is the best loss (17, 34, 51: ties keep the earliest); NaN never ranks
    assert {17, 34, 51} <= want
    assert set(infos) == want == set(_steps(root))
    assert "best" in infos[17].kept_for and "every" in infos[51].kept_for
    assert infos[1].kept_for == ("every",) and infos[80].kept_for == ("last",)
    # every kept checkpoint, sharing the frozen base's bytes, reads back whole
    assert main(["verify", str(root)]) == 0
    # a restart ranks "best" from the manifests: a loss of -inf cannot be beaten, so a finite
    # loss saves nothing off-schedule
    r2 = _Run(seed=1)
    with sg.Checkpointer(root, save=sg.Every(steps=1000), keep=keep, handle_signals=False) as ck:
        assert ck.restore(r2.state) == 80
        assert ck.step(r2.state, 81, metrics={"loss": -1e30}) is False


def test_prune_dry_run_plans_exactly_what_prune_deletes_and_a_second_prune_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    r = _Run()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=100), handle_signals=False
    ) as ck:
        for s in range(1, 61):
            r.train()
            ck.step(r.state, s, metrics=_metric(s))
    rule = [
        "--keep-last",
        "3",
        "--keep-best",
        "4",
        "--monitor",
        "loss",
        "--mode",
        "min",
        "--keep-every",
        "20",
    ]
    capsys.readouterr()
    assert main(["prune", str(root), "--dry-run", *rule]) == 0
    plan = capsys.readouterr().out
    planned = {int(s) for s in re.findall(r"delete\s+step-(\d+)", plan)}
    assert _steps(root) == list(range(1, 61))  # the dry run deleted nothing
    assert main(["prune", str(root), *rule]) == 0
    done = capsys.readouterr().out
    assert set(range(1, 61)) - set(_steps(root)) == planned
    assert f"deleted {len(planned)} checkpoints" in done
    assert set(_steps(root)) == _expected(60, sg.Keep(last=3, best=4, monitor="loss", every=20))
    assert main(["prune", str(root), *rule]) == 0
    assert "deleted 0 checkpoints" in capsys.readouterr().out
    assert main(["verify", str(root)]) == 0
    # the retired base is still what the kept checkpoints read; the oldest and newest restore exact
    for s in (_steps(root)[0], _steps(root)[-1]):
        r2 = _Run(seed=5)
        with sg.Checkpointer(root, handle_signals=False) as ck:
            assert ck.restore(r2.state, step=s) == s
        assert torch.equal(r2.base.weight, r.base.weight)


def test_a_restart_with_another_keep_rule_records_it_and_prune_applies_the_new_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    r = _Run()
    first = sg.Keep(last=5, best=1, monitor="acc", mode="max")
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=first, handle_signals=False) as ck:
        for s, acc in enumerate([0.1, 0.9, 0.2, 0.3, 0.4, 0.5], 1):
            r.train()
            ck.step(r.state, s, metrics={"acc": acc})
    assert _steps(root) == [2, 3, 4, 5, 6]  # the last five (2 is also the best)
    second = sg.Keep(last=2)
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=second, handle_signals=False) as ck:
        assert ck.restore(r.state) == 6
        assert json.loads((root / "run.json").read_text())["keep"]["last"] == 2
        # listing alone changes nothing; the next save applies the new rule
        assert _steps(root) == [2, 3, 4, 5, 6]
        r.train()
        ck.step(r.state, 7, metrics={"acc": 0.0})
    assert _steps(root) == [6, 7]
    assert main(["prune", str(root), "--dry-run"]) == 0
    assert "dry run: 0 would be deleted" in capsys.readouterr().out


def test_ls_counts_the_bytes_of_a_retired_shared_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/incremental.md, "Listing sizes": summing ``own`` over a run (plus retired files)
    counts every byte on disk once."""
    root = tmp_path / "run"
    r = _Run()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ck:
        for s in range(1, 5):
            r.train()
            ck.step(r.state, s)
    retired = sorted(root.glob("retired-*"))
    assert retired, "the frozen base of step 1 is shared by the kept steps"
    infos = runs.list_run(root, aside=True)
    (info,) = [i for i in infos if i.kind == "retired"]
    on_disk = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    assert info.size == info.own == retired[0].stat().st_size
    assert sum(i.own for i in infos) == on_disk


def test_prune_keep_best_on_the_runs_own_monitor_keeps_the_best_not_the_worst(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``savegame prune --help``: "retention (default: the rule the run was trained with, from
    run.json)". The run was trained with mode="max" on acc; the user names the same monitor."""
    root = tmp_path / "run"
    r = _Run()
    keep = sg.Keep(last=10, best=2, monitor="acc", mode="max")
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=keep, handle_signals=False) as ck:
        for s, acc in enumerate([0.1, 0.9, 0.2, 0.95, 0.3, 0.4], 1):
            r.train()
            ck.step(r.state, s, metrics={"acc": acc})
    code = main(["prune", str(root), "--keep-last", "1", "--keep-best", "2", "--monitor", "acc"])
    # either refused (exit 2: say which --mode) or the best accuracies are what is kept
    assert code == 2 or {2, 4} <= set(_steps(root)), _steps(root)


def test_a_keep_count_given_as_a_float_is_refused_up_front_or_works(tmp_path: Path) -> None:
    """A count read from a YAML/JSON config often arrives as 2.0. ``Every(samples=2.0)`` is a
    TypeError at construction (docs/policies.md); ``Keep(last=2.0)`` should be refused the same way
    or work, not fail every save of a long run while the disk fills."""
    root = tmp_path / "run"
    try:
        keep = sg.Keep(last=2.0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    r = _Run()
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=keep, handle_signals=False) as ck:
        for s in range(1, 5):
            r.train()
            ck.step(r.state, s)
    assert _steps(root) == [3, 4]


def test_ls_and_prune_of_a_run_json_with_a_float_count_exit_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README, "Command line": exit status 2 for bad input or a savegame error, "with a message on
    stderr saying what to do". A run.json edited by hand (or written by the bug above)."""
    root = tmp_path / "run"
    r = _Run()
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ck:
        for s in range(1, 4):
            r.train()
            ck.step(r.state, s)
    record = json.loads((root / "run.json").read_text())
    record["keep"]["last"] = 2.0
    (root / "run.json").write_text(json.dumps(record))
    for argv in (["ls", str(root)], ["prune", str(root), "--dry-run"]):
        try:
            code = main(argv)
        except Exception as exc:  # what the user sees as a traceback
            pytest.fail(f"savegame {argv[0]} raised {type(exc).__name__}: {exc}")
        assert code in (0, 2)
    assert _steps(root) == [2, 3]
