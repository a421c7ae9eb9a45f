"""One run's progress as the save schedule sees it: the sample and token counters
(``Every(samples=)``/``Every(tokens=)``) and the measured save costs (``Every(auto=True)``, the
interval advice). The :class:`~savegame.Checkpointer` holds one :class:`Progress`.

Invariants: a counter only moves by a checked count (an int >= 0), and only once the step is
accepted — a refused count changes nothing; the counters written into a checkpoint
(``info.samples_seen``/``info.tokens_seen``) are the ones :meth:`Progress.restore` sets back, so
they are right across restarts whatever the batch size. Pure: the caller passes every time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from savegame.policy import Every, advance, advice

__all__ = ["Progress"]

log = logging.getLogger("savegame")

_KEYS = {"samples": "samples_seen", "tokens": "tokens_seen"}


class Progress:
    """The counters and the advisor of one Checkpointer (see the module docstring).

    Call order: :meth:`restore` after a checkpoint was restored; :meth:`count` at every
    ``step()`` (before the save decision), then ``every.due(..., **progress.due_args(now))``;
    around a save :meth:`record` (into the manifest's info), :meth:`stalled` on the training
    thread and :meth:`committed` once committed (possibly on the persist thread).
    """

    def __init__(self, every: Every, history: advice.History | None = None) -> None:
        self.every = every
        self.samples = 0
        self.tokens = 0
        self._span = {"samples": (0, 0), "tokens": (0, 0)}
        self.advisor = advice.Advisor(mtbf=every.mtbf, history=history)
        self._run_estimates: Any = None

    def count(self, *, samples: object = None, tokens: object = None) -> None:
        """Add what one step consumed. Raises (and counts nothing) on a bad count, or when the
        schedule counts samples (tokens) and none were passed: it would never save."""
        given = {"samples": samples, "tokens": tokens}
        for unit, n in given.items():
            if n is None and getattr(self.every, unit) is not None:
                raise ValueError(
                    f"Every({unit}={getattr(self.every, unit)}) counts {unit}: pass "
                    f"ckpt.step(..., {unit}=n) with the {unit} this step consumed; without it "
                    "the schedule would never save"
                )
        after = {
            unit: self._get(unit) if n is None else advance(self._get(unit), n, f"step({unit}=...)")
            for unit, n in given.items()
        }
        for unit, value in after.items():
            self._span[unit] = (self._get(unit), value)
            setattr(self, unit, value)

    def _get(self, unit: str) -> int:
        return int(getattr(self, unit))

    def due_args(self, now: float) -> dict[str, Any]:
        """The progress arguments of :meth:`Every.due` for the step just counted, at wall-clock
        time ``now`` (the automatic interval is only computed for ``auto``)."""
        out: dict[str, Any] = {"samples": self._span["samples"], "tokens": self._span["tokens"]}
        if self.every.auto:
            out["auto_seconds"] = advice.auto_interval(self.advisor.advice(now))
        return out

    def record(self, now: float) -> dict[str, Any]:
        """What a checkpoint keeps: the counters passed so far (a counter never passed is not
        written) and the advisor's estimates (``advice``)."""
        out: dict[str, Any] = {key: self._get(u) for u, key in _KEYS.items() if self._get(u)}
        rec = self.advisor.record(now)
        if rec:
            out["advice"] = rec
        return out

    def restore(self, info: Mapping[str, Any]) -> None:
        """Set the counters back from a restored checkpoint's info; seed the cost estimates."""
        for unit, key in _KEYS.items():
            v = info.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                log.warning(
                    "checkpoint info.%s is %r, not a count: counting %s from 0", key, v, unit
                )
                v = 0
            setattr(self, unit, v)
            self._span[unit] = (v, v)
        rec = advice.most_saves(info.get("advice"), self._run_estimates)
        if rec is not None:
            self.advisor.seed(rec)

    def learn(self, sessions: Any, estimates: Any = None) -> None:
        """The run's failure history, from ``run.json``'s sessions with this process's last,
        and the cost estimates its last session ended with (used by :meth:`restore` when they
        count more saves than the restored checkpoint's)."""
        self.advisor.history = advice.history(sessions)
        self._run_estimates = estimates

    def stalled(self, seconds: float, *, at: float, now: float) -> str | None:
        """A save stalled training ``seconds`` (started at ``at``, a monotonic time). Returns
        the advice line when it is worth logging (:meth:`Advisor.news`)."""
        self.advisor.stalled(seconds, at=at)
        news = self.advisor.news(now)
        return advice.describe(news) if news is not None else None

    def committed(self, seconds: float) -> None:
        self.advisor.committed(seconds)
