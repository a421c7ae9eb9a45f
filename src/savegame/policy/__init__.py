"""When to save and what to keep. Pure decisions over plain data: no I/O, no clocks of their own.

* :class:`Every` — save every N steps, epochs, seconds, samples or tokens (any combination), or
  on the interval that minimises lost work (``auto``; :mod:`.advice`, Young/Daly).
* :class:`Keep` — keep the last K, the best K by a monitored metric, and every Nth forever.
* :func:`regime` — presets for short, normal and long training.
* :func:`retain` — which checkpoints to keep, and why; the caller deletes the rest, and only
  those its own run family wrote (ANCHORS #12).

Invariant: :func:`retain` never drops the newest checkpoint, and ranks "best" only among
checkpoints that carry the monitored metric, so rotation cannot delete the best checkpoint when
save and evaluation intervals differ (ANCHORS #4).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Every",
    "Keep",
    "Candidate",
    "advance",
    "crossed",
    "regime",
    "retain",
    "improved",
]


@dataclass(frozen=True, slots=True)
class Every:
    """When to save. Any combination; a save happens when any of them is due.

    Args:
        steps: Save when ``step % steps == 0``.
        epochs: Save at the end of every ``epochs``-th epoch (tell the checkpointer with
            ``step(..., epoch_end=True)``).
        seconds: Save when this many seconds passed since the last save (or since restore).
        samples: Save when the run's sample counter crosses a multiple of ``samples``. The
            counter is the sum of ``step(..., samples=n)`` over the run, kept in each checkpoint
            and restored with it, so it is right across restarts and batch-size changes.
        tokens: The same with ``step(..., tokens=n)``: save every ``tokens`` tokens.
        auto: Save on the interval that minimises lost work, from the measured cost of this
            run's saves and its MTBF (Young/Daly, docs/policies.md), recomputed as the cost
            estimate changes, within 1 minute .. 6 hours; 30 minutes until it is known.
        mtbf: The expected seconds between failures, for ``auto`` and the interval advice the
            checkpointer logs; None = learned from the run's own recorded failures.
    """

    steps: int | None = None
    epochs: int | None = None
    seconds: float | None = None
    samples: int | None = None
    tokens: int | None = None
    auto: bool = False
    mtbf: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "seconds"):
            v = getattr(self, name)
            if v is None:
                continue
            kind = numbers.Real if name == "seconds" else numbers.Integral
            if isinstance(v, bool) or not isinstance(v, kind):  # "5" from a config file, 2.5 steps
                what = "a number of seconds" if name == "seconds" else f"an int count of {name}"
                raise TypeError(f"Every({name}={v!r}): must be {what}")
            if not v > 0:
                raise ValueError(f"Every({name}={v!r}): must be a positive number")
        for name in ("samples", "tokens"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"Every({name}={v!r}): must be an int count")
                if v <= 0:
                    raise ValueError(f"Every({name}={v}): must be a positive number of {name}")
        if type(self.auto) is not bool:
            raise TypeError(f"Every(auto={self.auto!r}): use True or False")
        if self.mtbf is not None:
            if isinstance(self.mtbf, bool) or not isinstance(self.mtbf, int | float):
                raise TypeError(f"Every(mtbf={self.mtbf!r}): must be a number of seconds")
            if not (math.isfinite(self.mtbf) and self.mtbf > 0):
                raise ValueError(f"Every(mtbf={self.mtbf!r}): must be a positive number of seconds")
        if all(getattr(self, n) is None for n in _UNITS) and not self.auto:
            raise ValueError(
                "Every() needs steps=, epochs=, seconds=, samples=, tokens= or auto=True"
            )

    def due(
        self,
        *,
        step: int,
        epoch_end: bool,
        epochs_completed: int,
        seconds_since_save: float,
        samples: tuple[int, int] = (0, 0),
        tokens: tuple[int, int] = (0, 0),
        auto_seconds: float | None = None,
    ) -> bool:
        """Whether a save is due now (pure).

        ``samples`` and ``tokens`` are the run's counters ``(before this step, after it)``;
        ``auto_seconds`` the automatic interval now (:func:`advice.auto_interval`).
        """
        if self.steps is not None and step % self.steps == 0:
            return True
        if self.epochs is not None and epoch_end and epochs_completed % self.epochs == 0:
            return True
        if self.samples is not None and crossed(*samples, self.samples):
            return True
        if self.tokens is not None and crossed(*tokens, self.tokens):
            return True
        if self.auto:
            from savegame.policy import advice  # (a sibling module: not imported with policy)

            interval = auto_seconds if auto_seconds is not None else advice.AUTO_FALLBACK_SECONDS
            if seconds_since_save >= interval:
                return True
        return self.seconds is not None and seconds_since_save >= self.seconds


_UNITS = ("steps", "epochs", "seconds", "samples", "tokens")


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a counter going from ``before`` to ``after`` crossed (or reached) a multiple of
    ``every``: due at the multiples themselves, so saves stay on 10k, 20k, … whatever the
    batch size, instead of drifting as "``every`` since the last save" would.

    Example:
        >>> [crossed(b, b + 300, 1000) for b in (600, 700, 900, 1000)]
        [False, True, True, False]
    """
    return after // every > before // every


def _check_count(what: str, n: object) -> int:
    """A count of samples or tokens: an int >= 0 (bool refused: ``True`` is no count)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what}: must be an int count, got {n!r}")
    if n < 0:
        raise ValueError(f"{what}: must be >= 0, got {n}")
    return n


def advance(counter: int, n: object, what: str) -> int:
    """The counter after a step that consumed ``n`` (checked: an int >= 0)."""
    return counter + _check_count(what, n)


Mode = Literal["min", "max"]


@dataclass(frozen=True, slots=True)
class Keep:
    """What to keep. A checkpoint is kept if any rule keeps it.

    Args:
        last: Keep the newest ``last`` checkpoints (>= 1).
        best: Keep the ``best`` checkpoints with the best ``monitor`` value.
        monitor: Metric name to rank by (required when ``best`` > 0).
        mode: ``"max"`` (accuracy) or ``"min"`` (loss). Not given: taken from the words of
            ``monitor``'s name as Keras' ``mode="auto"`` and the Hugging Face Trainer do — a
            loss or an error (``loss``, ``err``/``error``, ``mse``, ``rmse``, ``mae``, ``mape``,
            ``nll``, ``perplexity``/``ppl``, ``wer``, ``cer``, ``fid``, ``kl``) is "min"; an
            accuracy-like score (``acc``, ``accuracy``, ``auc``, ``auroc``, ``f1``,
            ``precision``, ``recall``, ``iou``, ``dice``, ``bleu``, ``rouge…``, ``psnr``,
            ``ssim``, ``reward``, ``map``, ``top1``, ``em``/``exact``, ``ndcg``, ``mrr``,
            ``r2``, correlations) is "max"; any other name, or one with words of both kinds,
            is refused with ``best`` > 0 (``ValueError``): ranking the wrong way would keep the
            worst checkpoints. Once resolved it is a field like the others: ``dataclasses.replace(keep,
            monitor=...)`` keeps it, so pass ``mode`` there too.
        every: Keep every ``every``-th checkpoint saved by this run forever (counted in saves,
            so it does not depend on the save interval); 0 = off.
    """

    last: int = 1
    best: int = 0
    monitor: str | None = None
    mode: Mode | None = None
    every: int = 0

    def __post_init__(self) -> None:
        for name in ("last", "best", "every"):
            v = getattr(self, name)
            # A count from a YAML/JSON config may be 2.0: refused here, not at every save.
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise TypeError(f"Keep({name}={v!r}): must be an int count")
            object.__setattr__(self, name, int(v))  # numpy integers become plain ints
        if self.monitor is not None and not isinstance(self.monitor, str):
            raise TypeError(f"Keep(monitor={self.monitor!r}): must be a metric name (str)")
        if self.last < 1:
            raise ValueError(f"Keep(last={self.last}): keep at least the newest checkpoint")
        if self.best < 0 or self.every < 0:
            raise ValueError("Keep(best=, every=) must be >= 0")
        if self.best and not self.monitor:
            raise ValueError("Keep(best=...) needs monitor='metric name'")
        if self.mode is None:
            object.__setattr__(self, "mode", _mode_of(self.monitor, self.best))
        if self.mode not in ("min", "max"):
            raise ValueError(f"Keep(mode={self.mode!r}): use 'min' or 'max'")


#: The words of a metric's name that say which way is better (Keras' ``mode="auto"`` looks for
#: "acc"; the Hugging Face Trainer for "loss"). A name is split into words at anything not a
#: letter or digit (``val/top1_acc`` -> val, top1, acc); "loss" also counts inside a word
#: (``valLoss``). A name with words of both kinds, or of neither, is not guessed.
_SMALLER_BETTER = re.compile(
    r"(err|error|errors|mse|rmse|mae|mape|nll|nlls|perplexity|ppl|wer|cer|fid|kl|kld|cost)"
)
_LARGER_BETTER = re.compile(
    r"(acc|accuracy|auc|auroc|auprc|f1|f1score|precision|recall|iou|miou|dice|bleu|rouge\w*|"
    r"psnr|ssim|reward|return|map|map\d+|top\d+|em|exact|ndcg|mrr|r2|correlation|spearman|"
    r"pearson|matthews|mcc|kappa)"
)


def _mode_of(monitor: str | None, best: int) -> Mode:
    """``Keep(mode=None)``: the direction ``monitor``'s name says, or a refusal when ``best``
    ranks by it and the name does not say (with nothing ranked, "min" is as good as any)."""
    name = (monitor or "").lower()
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    smaller = "loss" in name or any(_SMALLER_BETTER.fullmatch(w) for w in words)
    larger = any(_LARGER_BETTER.fullmatch(w) for w in words)
    if smaller != larger:
        return "min" if smaller else "max"
    if not best:
        return "min"
    raise ValueError(
        f"Keep(best={best}, monitor={monitor!r}): is a smaller or a larger {monitor} better? Pass "
        "mode='min' (a loss, an error) or mode='max' (an accuracy, a score); ranking the wrong "
        "way would keep the worst checkpoints"
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    """What retention knows about one valid checkpoint."""

    step: int
    index: int  # the run's save counter (0, 1, 2, ...)
    metrics: Mapping[str, float]


def improved(new: float, best: float | None, mode: Mode) -> bool:
    """Whether ``new`` beats ``best`` (``None`` = nothing yet). NaN never improves."""
    if math.isnan(new):
        return False
    if best is None:
        return True
    return new > best if mode == "max" else new < best


def best_value(cands: Sequence[Candidate], monitor: str, mode: Mode) -> float | None:
    vals = [
        c.metrics[monitor]
        for c in cands
        if monitor in c.metrics and not math.isnan(c.metrics[monitor])
    ]
    if not vals:
        return None
    return max(vals) if mode == "max" else min(vals)


def retain(cands: Sequence[Candidate], keep: Keep) -> dict[int, list[str]]:
    """Which checkpoints to keep: ``{step: [reasons]}``; every other candidate may be deleted.

    Example:
        >>> cs = [Candidate(s, i, {"acc": a}) for i, (s, a) in enumerate([(100, .5), (200, .9), (300, .7)])]
        >>> retain(cs, Keep(last=1, best=1, monitor="acc", mode="max"))
        {300: ['last'], 200: ['best']}
    """
    out: dict[int, list[str]] = {}
    ordered = sorted(cands, key=lambda c: c.step)
    for c in ordered[-keep.last :]:
        out.setdefault(c.step, []).append("last")
    if keep.best and keep.monitor:
        scored = [
            c
            for c in ordered
            if keep.monitor in c.metrics and not math.isnan(c.metrics[keep.monitor])
        ]
        sign = -1.0 if keep.mode == "max" else 1.0
        # Ties: the earlier checkpoint wins (it reached that value first).
        scored.sort(key=lambda c: (sign * c.metrics[keep.monitor], c.step))
        for c in scored[: keep.best]:
            out.setdefault(c.step, []).append("best")
    if keep.every:
        for c in ordered:
            if c.index % keep.every == 0:
                out.setdefault(c.step, []).append("every")
    return out


def regime(
    name: Literal["short", "normal", "long"],
    *,
    monitor: str | None = None,
    mode: Mode | None = None,
    epochs: int = 1,
) -> dict[str, Every | Keep]:
    """Presets for the three training regimes; use as ``Checkpointer(root, **regime("normal"))``.

    * ``short`` (minutes to an hour): save each epoch, keep the newest and the best.
    * ``normal`` (hours): save every ``epochs`` epochs, keep the last 10 and the best.
    * ``long`` (days to weeks): save every 30 minutes, keep the last 5, the best 3, and every
      48th save (one a day) forever.

    ``best`` is only kept when ``monitor`` is given; ``mode`` as in :class:`Keep` (from the
    metric's name when not given).
    """
    best = 1 if monitor else 0
    if name == "short":
        return {
            "save": Every(epochs=1),
            "keep": Keep(last=1, best=best, monitor=monitor, mode=mode),
        }
    if name == "normal":
        return {
            "save": Every(epochs=epochs),
            "keep": Keep(last=10, best=best, monitor=monitor, mode=mode),
        }
    if name == "long":
        return {
            "save": Every(seconds=1800),
            "keep": Keep(last=5, best=3 if monitor else 0, monitor=monitor, mode=mode, every=48),
        }
    raise ValueError(f"regime({name!r}): choose 'short', 'normal' or 'long'")
