"""Interval advice (savegame.policy.advice): Young/Daly from a measured save cost and an MTBF,
the run's failure history, and ``Every(auto=True)`` driven by a fake clock and a fake save cost."""

from __future__ import annotations

import math

import pytest

from savegame.policy import Every, advice


def test_young_daly_is_the_square_root_of_twice_cost_times_mtbf() -> None:
    assert advice.young_daly(2.0, 3600.0) == 120.0
    assert advice.young_daly(0.5, 8 * 3600.0) == pytest.approx(math.sqrt(2 * 0.5 * 8 * 3600))
    assert advice.young_daly(0.0, 3600.0) == 0.0


def test_the_young_daly_interval_minimises_the_expected_overhead() -> None:
    cost, mtbf = 3.0, 6 * 3600.0
    best = advice.young_daly(cost, mtbf)
    at_best = advice.overhead(cost, best, mtbf)
    assert at_best == pytest.approx(math.sqrt(2 * cost / mtbf))  # C/τ + τ/2M at τ = √(2CM)
    for factor in (0.25, 0.5, 0.9, 1.1, 2.0, 4.0):
        assert advice.overhead(cost, best * factor, mtbf) > at_best


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1.0, 3600.0), ValueError),
        ((1.0, 0.0), ValueError),
        ((1.0, float("inf")), ValueError),
        ((float("nan"), 10.0), ValueError),
        (("1", 10.0), TypeError),
        ((True, 10.0), TypeError),
    ],
)
def test_young_daly_refuses_bad_input(args: tuple[object, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        advice.young_daly(*args)  # type: ignore[arg-type]


def test_cost_estimate_is_the_mean_first_then_follows_changes() -> None:
    est = None
    for x in (4.0, 2.0, 3.0):
        est = advice.observe(est, x)
    assert est is not None and est.mean == pytest.approx(3.0) and est.count == 3
    for _ in range(30):  # the disk got slower: the estimate follows within a few saves
        est = advice.observe(est, 10.0)
    assert est.mean == pytest.approx(10.0, rel=0.01)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_a_fake_training_loop_saves_on_the_young_daly_interval() -> None:
    """Each step takes 1 s, each save stalls 5 s (fake); MTBF 10 h given: once measured, the
    checkpointer's loop (Every(auto=True).due with the advisor's interval) saves every
    √(2·5·36000) = 600 s."""
    clock, cost, mtbf = FakeClock(), 5.0, 36_000.0
    every = Every(auto=True, mtbf=mtbf)
    adv = advice.Advisor(mtbf=every.mtbf)
    start = last_save = clock()
    saves: list[float] = []
    assert advice.auto_interval(adv.advice(clock())) == advice.AUTO_FALLBACK_SECONDS
    for step in range(1, 8000):
        clock.sleep(1.0)
        interval = advice.auto_interval(adv.advice(clock()))
        if every.due(
            step=step,
            epoch_end=False,
            epochs_completed=0,
            seconds_since_save=clock() - last_save,
            auto_seconds=interval,
        ):
            started = clock()
            clock.sleep(cost)  # the save stalls training
            adv.stalled(clock() - started, at=started)
            adv.committed(clock() - started)
            last_save = clock()
            saves.append(started)
    a = adv.advice(clock())
    assert a is not None and a.stall == cost and a.mtbf_source == "given"
    assert a.interval == pytest.approx(math.sqrt(2 * cost * mtbf)) == pytest.approx(600.0)
    assert a.overhead == pytest.approx(cost / 600 + 600 / (2 * mtbf))
    assert saves[0] - start == pytest.approx(1800, abs=1.0)  # the fallback: nothing measured yet
    gaps = [b - a for a, b in zip(saves, saves[1:], strict=False)]
    assert len(gaps) > 5 and all(g == pytest.approx(600 + cost, abs=1.0) for g in gaps)


def test_the_automatic_interval_is_bounded() -> None:
    tiny = advice.advise(0.001, 0.001, 3600.0)  # √7.2 s: more saves than any disk wants
    huge = advice.advise(600.0, 600.0, 365 * 86400.0)
    assert tiny.interval == advice.AUTO_MIN_SECONDS and tiny.optimum == pytest.approx(
        math.sqrt(7.2)
    )
    assert huge.interval == advice.AUTO_MAX_SECONDS
    line = advice.describe(tiny)
    assert "is 2.7 s (Young/Daly); Every(auto=True) saves every 1.0 min (its lower bound)" in line
    assert "(its upper bound)" in advice.describe(huge)
    assert huge.overhead == pytest.approx(
        advice.overhead(600.0, advice.AUTO_MAX_SECONDS, 365 * 86400.0)
    )


def test_no_advice_without_a_measured_save_or_an_mtbf() -> None:
    adv = advice.Advisor()
    assert adv.advice(0.0) is None
    adv.stalled(1.0, at=0.0)
    assert adv.advice(10.0) is None  # no MTBF given, no failure recorded
    assert advice.Advisor(mtbf=100.0).advice(0.0) is None  # no save measured


def test_mtbf_is_learned_from_the_runs_failed_sessions() -> None:
    raw: object = []
    raw = advice.open_session(raw, 0.0)
    # died 3600 s in; its newest checkpoint was made at 3000 s: that is all we know it did
    raw = advice.open_session(raw, 4000.0, checkpoint_times=[1000.0, 3000.0])
    raw = advice.end_session(raw, 7000.0)  # closed cleanly after 3000 s
    raw = advice.open_session(raw, 8000.0, checkpoint_times=[6000.0])
    assert [s["failed"] for s in raw] == [True, False, False]
    assert raw[0]["end"] == 3000.0
    h = advice.history(raw)  # this process runs the last session
    assert h.failures == 1 and h.exposure == 6000.0
    assert h.mtbf(9000.0) == 7000.0  # (3000 + 3000 + 1000 s of this session) / 1 failure
    outside = advice.history(raw, current=False)  # `savegame ls`: the open one is not counted
    assert outside.mtbf(9000.0) == 6000.0


def test_a_crashed_session_without_checkpoints_counts_no_training_time() -> None:
    raw = advice.open_session([], 100.0)
    raw = advice.open_session(raw, 500.0, checkpoint_times=[50.0, 900.0])  # neither is its own
    assert raw[0] == {"start": 100.0, "end": 100.0, "failed": True}


def test_an_exception_ends_the_session_as_failed() -> None:
    raw = advice.end_session(advice.open_session([], 0.0), 50.0, failed=True)
    assert advice.history(raw).failures == 1


def test_malformed_session_records_are_dropped_not_trusted() -> None:
    raw = [
        {"start": 0.0, "end": 10.0, "failed": True},
        {"start": "yesterday"},
        {"start": -5.0, "end": 1.0},
        {"start": 20.0, "end": float("nan")},
        "junk",
        {"start": 30.0, "end": 40.0, "failed": "yes"},  # only True is a failure
    ]
    h = advice.history(raw)
    assert h.failures == 1 and h.exposure == 20.0
    assert advice.history({"not": "a list"}).failures == 0


def test_advisor_learns_mtbf_and_reports_it_with_the_observed_interval() -> None:
    adv = advice.Advisor(history=advice.History(failures=2, exposure=7200.0, current_start=0.0))
    adv.stalled(2.0, at=100.0)
    adv.stalled(2.0, at=400.0)
    adv.committed(8.0)
    a = adv.advice(now=3600.0)  # (7200 + 3600) / 2 failures
    assert a is not None
    assert a.mtbf == 5400.0 and a.mtbf_source == "learned" and a.failures == 2
    assert a.save == 8.0 and a.current == 300.0
    assert a.current_overhead == pytest.approx(2.0 / 300 + 300 / (2 * 5400))
    line = advice.describe(a)
    assert "learned from 2 failures" in line and "Young/Daly" in line
    assert "committed after 8.0 s" in line and "saving every 5.0 min as now" in line


def test_advisor_logs_the_first_advice_and_then_only_real_changes() -> None:
    adv = advice.Advisor(mtbf=36_000.0)
    adv.stalled(5.0, at=0.0)
    assert adv.news(1.0) is not None
    adv.stalled(5.5, at=600.0)
    assert adv.news(2.0) is None  # 5 % slower: not worth a line
    for i in range(10):
        adv.stalled(20.0, at=1200.0 + i)
    assert adv.news(3.0) is not None  # the interval doubled


def test_the_record_seeds_the_next_process_and_savegame_ls() -> None:
    adv = advice.Advisor(mtbf=3600.0)
    adv.stalled(2.0, at=0.0)
    adv.stalled(2.0, at=200.0)
    adv.committed(3.0)
    rec = adv.record(0.0)
    assert rec == {"stall_s": 2.0, "saves": 2, "save_s": 3.0, "interval_s": 200.0, "mtbf_s": 3600.0}
    nxt = advice.Advisor(mtbf=None, seed=rec)
    assert nxt.stall == advice.Estimate(2.0, 2)
    a = advice.from_record(rec, advice.History(0, 0.0), 0.0)
    assert a is not None and a.interval == 120.0 and a.current == 200.0
    assert advice.from_record(rec, advice.History(0, 0.0), 0.0, mtbf=7200.0).mtbf == 7200.0  # type: ignore[union-attr]
    assert advice.from_record({"stall_s": "x"}, advice.History(0, 0.0), 0.0) is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"auto": 1}, TypeError),
        ({"auto": True, "mtbf": 0}, ValueError),
        ({"auto": True, "mtbf": float("inf")}, ValueError),
        ({"auto": True, "mtbf": "8h"}, TypeError),
        ({"mtbf": 3600}, ValueError),  # an MTBF alone is no schedule
    ],
)
def test_every_auto_refuses_bad_input(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        Every(**kwargs)  # type: ignore[arg-type]


def test_durations_read_naturally() -> None:
    assert [advice.duration(s) for s in (0.42, 12.0, 264.0, 8 * 3600.0, 3.5 * 86400)] == [
        "0.42 s",
        "12.0 s",
        "4.4 min",
        "8.0 h",
        "3.5 d",
    ]


def test_savegame_ls_summary_uses_the_record_and_the_finished_sessions() -> None:
    rec = {"stall_s": 2.0, "saves": 3}
    assert advice.summary(None, [], 0.0) is None
    assert advice.summary({"advice": "old"}, [], 0.0) is None
    line = advice.summary(rec, [], 0.0)
    assert line is not None and "no failure recorded" in line and "--mtbf" in line
    line = advice.summary(rec, [], 0.0, mtbf=3600.0)
    assert line is not None and "2.0 min (Young/Daly)" in line and "(given)" in line
    sessions = [
        {"start": 0.0, "end": 1800.0, "failed": True},
        {"start": 2000.0, "end": 3800.0, "failed": True},
        {"start": 4000.0, "end": None, "failed": False},  # running, or died unnoticed
    ]
    line = advice.summary(rec, sessions, 10_000.0)
    assert line is not None and "MTBF of 30.0 min (learned from 2 failures)" in line
