from __future__ import annotations

import math

import pytest

import savegame as sg
from savegame import policy
from savegame.policy import Candidate, Every, Keep, retain


def due(
    e: Every, step: int = 1, epoch_end: bool = False, epochs: int = 0, seconds: float = 0.0
) -> bool:
    return e.due(
        step=step, epoch_end=epoch_end, epochs_completed=epochs, seconds_since_save=seconds
    )


def test_every_steps_is_due_on_multiples_only() -> None:
    e = Every(steps=100)
    assert [s for s in range(1, 401) if due(e, s)] == [100, 200, 300, 400]


def test_every_epochs_is_due_at_every_nth_epoch_end() -> None:
    e = Every(epochs=2)
    assert not due(e, epoch_end=True, epochs=1)
    assert due(e, epoch_end=True, epochs=2)
    assert not due(e, epoch_end=False, epochs=2)


def test_every_seconds_is_due_after_the_interval() -> None:
    e = Every(seconds=60)
    assert not due(e, seconds=59.9)
    assert due(e, seconds=60)


def test_every_combines_rules_with_or() -> None:
    e = Every(steps=1000, seconds=10)
    assert due(e, step=7, seconds=11) and due(e, step=1000) and not due(e, step=7, seconds=1)


@pytest.mark.parametrize("kwargs", [{}, {"steps": 0}, {"epochs": -1}, {"seconds": 0}])
def test_every_rejects_empty_or_non_positive(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Every(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"steps": "500"}, {"steps": 2.5}, {"steps": True}, {"epochs": 1.0}, {"seconds": "60"}],
)
def test_every_refuses_counts_of_the_wrong_kind_naming_them(kwargs: dict[str, object]) -> None:
    """``Every(steps="500")`` read from a config file: a TypeError naming the argument and what
    it takes (before: "'>' not supported between 'str' and 'int'"); seconds may be fractional."""
    ((name, value),) = kwargs.items()
    with pytest.raises(TypeError, match=rf"Every\({name}={value!r}\): must be"):
        Every(**kwargs)  # type: ignore[arg-type]
    assert Every(seconds=0.5).seconds == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"last": 0},
        {"best": 1},
        {"best": -1, "monitor": "x"},
        {"every": -1},
        {"mode": "up", "monitor": "x"},
    ],
)
def test_keep_rejects_invalid_rules(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Keep(**kwargs)  # type: ignore[arg-type]


def cands(values: list[float | None], metric: str = "acc") -> list[Candidate]:
    return [
        Candidate(100 * (i + 1), i, {} if v is None else {metric: v}) for i, v in enumerate(values)
    ]


def test_keep_last_k_keeps_the_newest() -> None:
    kept = retain(cands([None] * 5), Keep(last=2))
    assert kept == {400: ["last"], 500: ["last"]}


def test_best_k_by_max_and_min() -> None:
    cs = cands([0.5, 0.9, 0.7, 0.8, 0.1])
    assert set(retain(cs, Keep(last=1, best=2, monitor="acc", mode="max"))) == {500, 200, 400}
    assert set(retain(cs, Keep(last=1, best=2, monitor="acc", mode="min"))) == {500, 100}


def test_best_k_ignores_nan_and_checkpoints_without_the_metric() -> None:
    cs = cands([math.nan, None, 0.3, math.nan, None])
    kept = retain(cs, Keep(last=1, best=2, monitor="acc", mode="max"))
    assert kept == {500: ["last"], 300: ["best"]}


def test_best_k_ties_keep_the_earlier_checkpoint() -> None:
    kept = retain(cands([0.9, 0.9, 0.9, 0.1]), Keep(last=1, best=1, monitor="acc", mode="max"))
    assert kept == {400: ["last"], 100: ["best"]}


def test_best_is_not_rotated_away_when_eval_is_rarer_than_saves() -> None:
    # ANCHORS #4 (transformers #39476): only one early checkpoint carries the metric.
    cs = cands([0.95] + [None] * 20)
    kept = retain(cs, Keep(last=3, best=1, monitor="acc", mode="max"))
    assert 100 in kept and kept[100] == ["best"]


def test_every_nth_is_kept_forever_by_save_index() -> None:
    kept = retain(cands([None] * 10), Keep(last=1, every=4))
    assert {s for s, r in kept.items() if "every" in r} == {100, 500, 900}
    assert kept[1000] == ["last"]


def test_retain_reports_every_reason_and_never_drops_the_newest() -> None:
    kept = retain(cands([0.1, 0.2, 0.9]), Keep(last=1, best=1, monitor="acc", mode="max", every=1))
    assert kept[300] == ["last", "best", "every"]
    assert retain([], Keep()) == {}


def test_improved_treats_nan_as_never_better() -> None:
    assert policy.improved(0.5, None, "max")
    assert not policy.improved(math.nan, None, "max")
    assert not policy.improved(math.nan, 0.1, "min")
    assert policy.improved(0.2, 0.1, "max") and not policy.improved(0.1, 0.1, "max")
    assert policy.improved(0.05, 0.1, "min")


def test_best_value_skips_nan_and_missing() -> None:
    assert policy.best_value(cands([math.nan, None, 0.3, 0.7]), "acc", "max") == 0.7
    assert policy.best_value(cands([math.nan, None]), "acc", "max") is None


def test_regimes() -> None:
    short = policy.regime("short", monitor="val_loss")
    assert short["save"] == Every(epochs=1) and short["keep"] == Keep(
        last=1, best=1, monitor="val_loss"
    )
    normal = policy.regime("normal", epochs=5)
    assert (
        normal["save"] == Every(epochs=5) and normal["keep"].last == 10 and normal["keep"].best == 0
    )  # type: ignore[union-attr]
    long = policy.regime("long", monitor="acc", mode="max")
    assert long["keep"] == Keep(last=5, best=3, monitor="acc", mode="max", every=48)
    assert long["save"].seconds == 1800  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        policy.regime("medium")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ("val_accuracy", "max"), ("val_acc", "max"), ("eval_f1", "max"), ("auc", "max"),
        ("val/top1", "max"), ("mAP", "max"), ("val_auroc", "max"), ("eval_exact_match", "max"),
        ("val_loss", "min"), ("loss_eval", "min"), ("train/mse", "min"), ("val_error", "min"),
        ("trainLoss", "min"), ("fid", "min"), ("kl_div", "min"), ("val_mape", "min"),
    ],
)  # fmt: skip
def test_keep_without_a_mode_takes_the_direction_from_the_metric_name(
    monitor: str, mode: str
) -> None:
    """Keras' ModelCheckpoint(mode="auto") users write Keep(best=1, monitor="val_accuracy"):
    ranking an accuracy as a loss kept the worst epoch."""
    assert sg.Keep(best=1, monitor=monitor).mode == mode
    assert sg.Keep(best=1, monitor=monitor, mode="min").mode == "min"  # a given mode wins
    assert sg.regime("short", monitor=monitor)["keep"].mode == mode


@pytest.mark.parametrize(
    "monitor", ["val_metric", "acc_loss", "val_lower_bound", "val_soccer_goal_rate"]
)  # words, not letters inside words: "answer" holds "wer", "soccer" "cer"
def test_keep_refuses_to_guess_a_direction_its_name_does_not_say(monitor: str) -> None:
    with pytest.raises(ValueError, match="mode='min'.*mode='max'"):
        sg.Keep(best=2, monitor=monitor)
    assert sg.Keep(best=2, monitor=monitor, mode="max").mode == "max"
    assert sg.Keep(last=2, monitor=monitor).mode == "min"  # nothing ranked by it
