"""``Every(samples=N)`` / ``Every(tokens=N)``: saves at the multiples of N samples (tokens) the
run has consumed, counted in the checkpoint, across restarts with a changed batch size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.policy import Every, crossed


def _saved(root: Path) -> dict[int, dict[str, object]]:
    """step -> the manifest's info, for every checkpoint in the run folder."""
    out = {}
    for d in sorted(root.glob("step-*")):
        m = json.loads((d / "manifest.json").read_text())
        out[m["step"]] = m["info"]
    return out


def _session(
    root: Path, steps: range, per_step: int, *, unit: str = "samples", crash: bool = False
) -> tuple[int, list[int]]:
    """Train ``steps`` consuming ``per_step`` samples (tokens) each; returns the step restored
    from and the steps saved. ``crash``: end without close (the steps after the last save are
    lost, as after SIGKILL)."""
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    ck = sg.Checkpointer(
        root, save=Every(**{unit: 100}), keep=sg.Keep(last=100), handle_signals=False
    )
    start = ck.restore(state)
    saved = []
    for s in steps:
        if s <= start:
            continue
        if ck.step(state, s, **{unit: per_step}):
            saved.append(s)
    if crash:
        ck._lock.release()
    else:
        ck.close()
    return start, saved


@pytest.mark.parametrize("new_batch", [16, 64])
def test_every_samples_fires_at_the_multiples_across_a_restart_with_another_batch_size(
    tmp_path: Path, new_batch: int
) -> None:
    root = tmp_path / "run"
    # batch 32: 32, 64, 96, 128 (save: 100 crossed), 160, 192, 224 (save: 200), 256 — killed
    start, saved = _session(root, range(1, 9), 32, crash=True)
    assert (start, saved) == (0, [4, 7])
    info = _saved(root)
    assert (info[4]["samples_seen"], info[7]["samples_seen"]) == (128, 224)
    # resumes at step 7 with 224 samples seen (step 8's 32 are redone), in batches of new_batch
    start, saved = _session(root, range(1, 30), new_batch)
    assert start == 7
    seen = {s: 224 + (s - 7) * new_batch for s in range(7, 30)}
    # a save at the first step that reaches each multiple of 100, in the new batch size
    want = [s for s in range(8, 30) if seen[s] // 100 > seen[s - 1] // 100]
    assert saved == want
    info = _saved(root)
    assert [info[s]["samples_seen"] for s in saved] == [seen[s] for s in saved]
    if new_batch == 16:
        assert saved[:2] == [12, 18]  # 304 and 400 samples
    else:
        assert saved[:2] == [9, 10]  # 352 and 416 samples: no multiple skipped, none repeated


def test_every_tokens_counts_variable_lengths_and_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "run"
    lengths = [37, 55, 12, 80, 64, 9, 41, 70, 33, 58, 22, 91]
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    saved = []
    with sg.Checkpointer(root, save=Every(tokens=100), handle_signals=False) as ck:
        for s, n in enumerate(lengths[:6], start=1):
            if ck.step(state, s, tokens=n, samples=1):  # both counters may be passed
                saved.append(s)
        assert (ck.tokens_seen, ck.samples_seen) == (sum(lengths[:6]), 6)
    with sg.Checkpointer(root, save=Every(tokens=100), handle_signals=False) as ck:
        assert (ck.tokens_seen, ck.samples_seen) == (0, 0)  # until restore
        assert ck.restore(state) == 5  # step 6 (257 tokens) crossed no multiple: not saved
        assert (ck.tokens_seen, ck.samples_seen) == (sum(lengths[:5]), 5)
        for s in range(6, len(lengths) + 1):  # step 6 is redone
            if ck.step(state, s, tokens=lengths[s - 1]):
                saved.append(s)
    total = [sum(lengths[:s]) for s in range(len(lengths) + 1)]
    assert saved == [s for s in range(1, len(lengths) + 1) if total[s] // 100 > total[s - 1] // 100]
    assert saved == [3, 5, 8, 9, 12]  # 92→104, 184→248, 298→368, 368→401, 481→572


def test_counters_are_kept_in_every_checkpoint_whatever_the_schedule(tmp_path: Path) -> None:
    root = tmp_path / "run"
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    with sg.Checkpointer(root, save=Every(steps=2), handle_signals=False) as ck:
        for s in range(1, 5):
            ck.step(state, s, samples=10)
        ck.save(state, 5)  # an explicit save counts what was passed so far
    info = _saved(root)
    assert [info[s]["samples_seen"] for s in (2, 4, 5)] == [20, 40, 40]
    assert "tokens_seen" not in info[2]  # a counter nobody passed is not written


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"samples": -1}, ValueError),
        ({"samples": 1.5}, TypeError),
        ({"samples": True}, TypeError),
        ({"tokens": "128"}, TypeError),
        ({"tokens": -5}, ValueError),
    ],
)
def test_step_refuses_bad_counts_and_counts_nothing(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception]
) -> None:
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    with sg.Checkpointer(tmp_path / "run", save=Every(samples=100), handle_signals=False) as ck:
        ck.step(state, 1, samples=40)
        with pytest.raises(error):
            ck.step(state, 2, **{"samples": 10, **kwargs})  # type: ignore[arg-type]
        assert ck.samples_seen == 40 and ck.tokens_seen == 0


def test_a_samples_schedule_without_samples_passed_is_an_error(tmp_path: Path) -> None:
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    with sg.Checkpointer(tmp_path / "run", save=Every(tokens=100), handle_signals=False) as ck:
        with pytest.raises(ValueError, match=r"tokens=.*never"):
            ck.step(state, 1, samples=32)  # the schedule counts tokens: it would never save


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"samples": 0}, ValueError),
        ({"samples": -10}, ValueError),
        ({"tokens": 2.5e6}, TypeError),  # a float count: 2.5e6 is easy to write, use 2_500_000
        ({"samples": True}, TypeError),
        ({"tokens": "1M"}, TypeError),
    ],
)
def test_every_refuses_bad_progress_units(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Every(**kwargs)  # type: ignore[arg-type]


def test_every_samples_and_tokens_combine_with_or() -> None:
    e = Every(samples=1000, tokens=50_000)

    def due(samples: tuple[int, int], tokens: tuple[int, int]) -> bool:
        return e.due(
            step=7,
            epoch_end=False,
            epochs_completed=0,
            seconds_since_save=0.0,
            samples=samples,
            tokens=tokens,
        )

    assert due((990, 1020), (0, 100)) and due((10, 20), (49_990, 50_010))
    assert not due((10, 20), (100, 200))


def test_crossing_a_multiple_is_due_once_however_large_the_step() -> None:
    assert crossed(99, 100, 100) and not crossed(100, 199, 100) and crossed(150, 450, 100)
    assert not crossed(0, 0, 100) and not crossed(100, 100, 100)


# ---- interval advice through a real Checkpointer (docs/policies.md) ----------------------------


def test_the_checkpointer_measures_its_saves_and_logs_the_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    mtbf = 8 * 3600.0
    with caplog.at_level("INFO", logger="savegame"):
        with sg.Checkpointer(
            root, save=Every(auto=True, steps=2, mtbf=mtbf), handle_signals=False
        ) as ck:
            for s in range(1, 5):
                ck.step(state, s)
            a = ck._progress.advisor.advice(0.0)
            assert a is not None and a.stall > 0 and a.save >= a.stall
            auto = ck._progress.due_args(0.0)["auto_seconds"]
            assert auto == min(max(math.sqrt(2 * a.stall * mtbf), 60.0), 6 * 3600.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("interval advice")]
    assert len(lines) == 1 and "MTBF of 8.0 h (given)" in lines[0]
    info = _saved(root)[4]["advice"]  # the estimates of the saves before it: step 2's
    assert info["saves"] == 1 and info["mtbf_s"] == mtbf and info["stall_s"] > 0


def test_sessions_are_recorded_and_a_crash_is_learned_as_a_failure(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _session(root, range(1, 5), 50, crash=True)  # saves at 2 and 4 (100 and 200 samples)
    first = json.loads((root / "run.json").read_text())["sessions"]
    assert len(first) == 1 and first[0]["end"] is None
    _session(root, range(1, 7), 50)
    sessions = json.loads((root / "run.json").read_text())["sessions"]
    assert [s["failed"] for s in sessions] == [True, False]
    step4 = json.loads((root / "step-000000000004" / "manifest.json").read_text())["created"]
    assert sessions[0]["end"] == step4  # the crashed session is known to have run until then
    assert sessions[1]["end"] is not None
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    ck = sg.Checkpointer(root, save=Every(samples=100), handle_signals=False)
    try:
        hist = ck._progress.advisor.history
        assert hist.failures == 1 and hist.current_start is not None
        with pytest.raises(RuntimeError), ck:
            ck.restore(state)
            ck.step(state, 7, samples=50)  # training started: this session is recorded
            raise RuntimeError("out of memory")  # an exception through `with`: a failure
    finally:
        ck.close()
    assert json.loads((root / "run.json").read_text())["sessions"][-1]["failed"] is True


def test_a_checkpointer_that_only_lists_or_restores_records_no_session(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _session(root, range(1, 5), 50)
    before = json.loads((root / "run.json").read_text())["sessions"]
    state = sg.TrainState(model=torch.nn.Linear(2, 1))
    reader_only = sg.Checkpointer(root, save=Every(samples=100), handle_signals=False)
    reader_only.list()
    reader_only.restore(state)
    reader_only._lock.release()  # never closed (a notebook): as if the process went away
    with sg.Checkpointer(root, save=Every(samples=100), handle_signals=False) as ck:
        assert ck._progress.advisor.history.failures == 0  # not taken for a crash
    reader_only.close()
    with pytest.raises(RuntimeError), sg.Checkpointer(root, handle_signals=False) as ck:
        ck.restore(state)
        raise RuntimeError("out of memory before the first step: no work was lost")
    assert json.loads((root / "run.json").read_text())["sessions"] == before
