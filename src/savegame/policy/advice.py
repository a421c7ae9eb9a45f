"""How often to save: the interval that minimises lost work, from measured save costs and the
run's failure rate (Young/Daly). Pure: no I/O, no clock of its own — callers pass durations and
times they measured, so a fake clock and a fake save cost test it exactly.

The model (docs/policies.md): a save stalls training for ``C`` seconds, failures arrive at random
with mean time ``M`` between them (MTBF), and a failure loses the work since the last save. The
expected fraction of time lost is ``C/τ + τ/(2M)`` for a save every ``τ`` seconds — the saves'
own cost plus, on average, half an interval of redone work per failure — which is smallest at
Young's ``τ = √(2·C·M)`` (Daly's higher-order terms matter only when ``C`` is a sizable part of
``M``; they are left out).

Invariants: every value reported is computed from what was measured or given, never guessed —
with no measured save, or no MTBF (none given and no failure recorded), :func:`advise` says
nothing (None) and ``Every(auto=True)`` keeps its fallback interval; the automatic interval
always lies in ``[AUTO_MIN_SECONDS, AUTO_MAX_SECONDS]``.

The run's history (``run.json`` ``sessions``) is a list of ``{"start", "end", "failed"}``
records, one per Checkpointer that opened the run for writing: :func:`open_session` and
:func:`end_session` compute the new list, the run file writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AUTO_FALLBACK_SECONDS",
    "AUTO_MAX_SECONDS",
    "AUTO_MIN_SECONDS",
    "Advice",
    "Advisor",
    "Estimate",
    "History",
    "advise",
    "auto_interval",
    "describe",
    "duration",
    "end_session",
    "most_saves",
    "from_record",
    "history",
    "observe",
    "open_session",
    "overhead",
    "summary",
    "young_daly",
]

#: ``Every(auto=True)`` never saves more often than this (a save a minute is already a lot of
#: I/O, and a sub-minute estimate usually means a tiny measured cost early in the run) …
AUTO_MIN_SECONDS = 60.0
#: … nor less often than this, whatever the MTBF: a failure-free history says little about the
#: next failure, and six hours is the most work anyone should lose to a surprise.
AUTO_MAX_SECONDS = 6 * 3600.0
#: The interval ``Every(auto=True)`` uses until it can compute one (the default schedule's).
AUTO_FALLBACK_SECONDS = 1800.0
#: Estimates weigh the first saves equally, then follow changes (EWMA with this weight): the
#: first save of a process also allocates host buffers and is often the slowest.
_EWMA_WEIGHT = 0.2
#: Sessions kept in ``run.json`` (a record is ~60 bytes; old ones only refine the MTBF).
_MAX_SESSIONS = 1000


def _check_positive(name: str, value: float, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}={value!r}: must be a number of seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name}={value!r}: must be a finite number > {'=' if zero else ''}0")
    return float(value)


def young_daly(cost: float, mtbf: float) -> float:
    """The save interval (seconds) that minimises expected lost time: ``√(2 · cost · mtbf)``.

    Args:
        cost: Seconds one save stalls training (``C``).
        mtbf: Mean seconds between failures (``M``).

    Example:
        >>> young_daly(2.0, 3600.0)
        120.0
    """
    cost = _check_positive("cost", cost, zero=True)
    mtbf = _check_positive("mtbf", mtbf)
    return math.sqrt(2.0 * cost * mtbf)


def overhead(cost: float, interval: float, mtbf: float) -> float:
    """Expected fraction of time lost with a save every ``interval`` seconds:
    ``cost/interval + interval/(2·mtbf)`` (saving, plus redoing half an interval per failure).

    Example:
        >>> overhead(2.0, 120.0, 3600.0)  # at the Young/Daly interval both terms are equal
        0.03333333333333333
    """
    cost = _check_positive("cost", cost, zero=True)
    interval = _check_positive("interval", interval)
    mtbf = _check_positive("mtbf", mtbf)
    return cost / interval + interval / (2.0 * mtbf)


# ---- measured costs ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Estimate:
    """A running estimate of a duration: ``mean`` seconds over ``count`` observations."""

    mean: float
    count: int


def observe(est: Estimate | None, seconds: float) -> Estimate:
    """``est`` updated with one more observation: the plain mean of the first few, then an
    exponentially weighted mean, so a cost that changes (a slower disk, a bigger model after
    surgery) is followed within a few saves."""
    seconds = _check_positive("seconds", seconds, zero=True)
    if est is None:
        return Estimate(seconds, 1)
    w = max(1.0 / (est.count + 1), _EWMA_WEIGHT)
    return Estimate(est.mean + w * (seconds - est.mean), est.count + 1)


# ---- the run's failure history -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class History:
    """What the run's sessions say about failures: ``failures`` in ``exposure`` seconds of
    training before the current session (which started at ``current_start``, if any)."""

    failures: int
    exposure: float
    current_start: float | None = None

    def mtbf(self, now: float) -> float | None:
        """The maximum-likelihood MTBF for failures at a constant rate — observed time over
        failures, the current session's time so far included (it has not failed yet) — or None
        before the first failure (the data then only bound it from below)."""
        if not self.failures:
            return None
        return self.seconds(now) / self.failures

    def seconds(self, now: float) -> float:
        """Training time observed by ``now``."""
        current = max(0.0, now - self.current_start) if self.current_start is not None else 0.0
        return self.exposure + current


def _sessions(raw: Any) -> list[dict[str, Any]]:
    """The well-formed session records of ``run.json`` (others are dropped, not trusted)."""
    out: list[dict[str, Any]] = []
    for s in raw if isinstance(raw, list) else []:
        if not isinstance(s, dict):
            continue
        start, end = s.get("start"), s.get("end")
        if not _is_time(start) or not (end is None or _is_time(end)):
            continue
        out.append({"start": float(start), "end": end, "failed": s.get("failed") is True})
    return out


def _is_time(v: Any) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v) and v >= 0
    except OverflowError:  # an int beyond a double (10**400 in a hand-edited run.json)
        return False


def history(raw: Any, *, current: bool = True) -> History:
    """The failure history in ``run.json``'s ``sessions``. With ``current`` the last session is
    the one running now (this process opened it); without, an unfinished last session is
    counted as what it is to an outside reader: a run still going, or one that died unnoticed
    (``savegame ls`` cannot tell, so it is counted as neither failed nor observed)."""
    sessions = _sessions(raw)
    live = sessions[-1] if sessions and sessions[-1]["end"] is None else None
    done = [s for s in sessions if s is not live and s["end"] is not None]
    exposure = sum(max(0.0, float(s["end"]) - s["start"]) for s in done)
    return History(
        failures=sum(1 for s in done if s["failed"]),
        exposure=exposure,
        current_start=live["start"] if live is not None and current else None,
    )


def open_session(
    raw: Any, now: float, checkpoint_times: Sequence[float] = ()
) -> list[dict[str, Any]]:
    """``run.json``'s sessions once a Checkpointer opened the run at ``now``.

    A previous session still open (no ``end``) ended without ``close()``: a crash, SIGKILL, a
    lost node — a failure. It lost everything after its last checkpoint, so its end is taken as
    its newest checkpoint's creation time (``checkpoint_times``; its start when it saved none):
    the training it did after that is unknown, which underestimates the MTBF (a shorter,
    safer interval), never overestimates it.
    """
    sessions = _sessions(raw)
    for s in sessions:
        if s["end"] is None:
            mine = [t for t in checkpoint_times if s["start"] <= t <= now]
            s["end"], s["failed"] = max([s["start"], *mine]), True
    sessions.append({"start": float(now), "end": None, "failed": False})
    return sessions[-_MAX_SESSIONS:]


def end_session(raw: Any, now: float, *, failed: bool = False) -> list[dict[str, Any]]:
    """``run.json``'s sessions once the running (last) session ended at ``now``: cleanly
    (``close()``, a preemption saved on its signal) or ``failed`` (an exception left the
    ``with`` block: the work since the last save is lost)."""
    sessions = _sessions(raw)
    if sessions and sessions[-1]["end"] is None:
        sessions[-1]["end"], sessions[-1]["failed"] = float(now), failed
    return sessions


# ---- advice ------------------------------------------------------------------------------------
MtbfSource = Literal["given", "learned"]


@dataclass(frozen=True, slots=True)
class Advice:
    """The advised save interval and what it costs.

    Attributes:
        stall: Seconds one save stalls training (``C``, as the training loop sees it).
        save: Seconds one save takes until committed (equal to ``stall`` for blocking saves).
        mtbf: Mean seconds between failures used, and where it came from (``mtbf_source``;
            ``failures`` recorded when learned).
        optimum: The Young/Daly interval ``√(2·stall·mtbf)``.
        interval: ``optimum`` bounded to ``[AUTO_MIN_SECONDS, AUTO_MAX_SECONDS]``: what
            ``Every(auto=True)`` saves on.
        overhead: Expected fraction of time lost at ``interval``.
        current: The observed mean interval between saves, and its expected ``current_overhead``
            (None before two saves).
    """

    stall: float
    save: float
    mtbf: float
    mtbf_source: MtbfSource
    failures: int
    optimum: float
    interval: float
    overhead: float
    current: float | None = None
    current_overhead: float | None = None


def advise(
    stall: float,
    save: float,
    mtbf: float,
    *,
    mtbf_source: MtbfSource = "given",
    failures: int = 0,
    current: float | None = None,
) -> Advice:
    """The interval advice for a measured save cost and an MTBF (see the module docstring).

    Example:
        >>> a = advise(2.0, 5.0, 3600.0)
        >>> a.interval, round(a.overhead, 4)
        (120.0, 0.0333)
    """
    raw = young_daly(stall, mtbf)
    interval = min(max(raw, AUTO_MIN_SECONDS), AUTO_MAX_SECONDS)
    cur = current if current is not None and current > 0 else None
    return Advice(
        stall=float(stall),
        save=float(save),
        mtbf=float(mtbf),
        mtbf_source=mtbf_source,
        failures=failures,
        optimum=raw,
        interval=interval,
        overhead=overhead(stall, interval, mtbf),
        current=cur,
        current_overhead=overhead(stall, cur, mtbf) if cur is not None else None,
    )


def auto_interval(advice: Advice | None) -> float:
    """The interval ``Every(auto=True)`` saves on: the advice's, or the fallback without one."""
    return advice.interval if advice is not None else AUTO_FALLBACK_SECONDS


def duration(seconds: float) -> str:
    """``seconds`` for people: ``0.42 s``, ``4.4 min``, ``8.0 h``, ``3.5 d``."""
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def describe(a: Advice) -> str:
    """One line: the measured cost, the MTBF, the advised interval and the overheads."""
    if a.mtbf_source == "given":
        src = "given"
    else:
        src = f"learned from {a.failures} failure{'s' if a.failures != 1 else ''}"
    cost = f"a save stalls training {duration(a.stall)}"
    if abs(a.save - a.stall) > 0.05 * max(a.stall, 1e-9):
        cost += f" (committed after {duration(a.save)})"
    line = (
        f"{cost}; with an MTBF of {duration(a.mtbf)} ({src}) the interval that minimises lost "
        f"work is {duration(a.optimum)} (Young/Daly)"
    )
    if a.interval != a.optimum:
        bound = "lower" if a.interval > a.optimum else "upper"
        line += f"; Every(auto=True) saves every {duration(a.interval)} (its {bound} bound)"
    line += f", expected overhead {_percent(a.overhead)}"
    if a.current is not None and a.current_overhead is not None:
        line += f"; saving every {duration(a.current)} as now: {_percent(a.current_overhead)}"
    return line


def _percent(x: float) -> str:
    return f"{x:.2%}" if x < 0.01 else f"{x:.1%}"


# ---- one run's advisor (the Checkpointer holds one) --------------------------------------------
class Advisor:
    """Collects one run's save costs and failure history and gives the current advice.

    The Checkpointer calls :meth:`stalled` on the training thread after each save returned
    control (the stall) and :meth:`committed` when it is committed (possibly on the persist
    thread); each field is written by one thread only. Times are the caller's (any clock; the
    facade uses ``time.monotonic`` for intervals and ``time.time`` for the history).

    Args:
        mtbf: The MTBF given by the user (``Every(mtbf=…)``), or None to learn it.
        history: The run's failure history (:func:`history`), for a learned MTBF.
        seed: A previous process's estimates (:meth:`record`, read from the checkpoint it
            resumed from), so advice is available from the first step after a restart.
    """

    def __init__(
        self,
        *,
        mtbf: float | None = None,
        history: History | None = None,
        seed: Mapping[str, Any] | None = None,
    ) -> None:
        self.mtbf_given = mtbf
        self.history = history or History(0, 0.0)
        self.stall: Estimate | None = None
        self.save: Estimate | None = None
        self.interval: Estimate | None = None
        self._last_save_at: float | None = None
        self._logged: float | None = None
        if seed:
            self.seed(seed)

    def seed(self, record: Mapping[str, Any]) -> None:
        """Start from a previous process's estimates (:meth:`record`) where this one has none."""
        self.stall = self.stall or _seeded(record, "stall_s")
        self.save = self.save or _seeded(record, "save_s")

    def stalled(self, seconds: float, *, at: float) -> None:
        """A save stalled training ``seconds``; it started at ``at`` (for the interval)."""
        self.stall = observe(self.stall, seconds)
        if self._last_save_at is not None and at > self._last_save_at:
            self.interval = observe(self.interval, at - self._last_save_at)
        self._last_save_at = at

    def committed(self, seconds: float) -> None:
        """A save was committed ``seconds`` after it started."""
        self.save = observe(self.save, seconds)

    def mtbf(self, now: float) -> tuple[float, MtbfSource] | None:
        if self.mtbf_given is not None:
            return self.mtbf_given, "given"
        learned = self.history.mtbf(now)
        return (learned, "learned") if learned else None

    def advice(self, now: float) -> Advice | None:
        """The advice at wall-clock time ``now``, or None while the cost or the MTBF is unknown."""
        m = self.mtbf(now)
        if self.stall is None or m is None:
            return None
        save = self.save.mean if self.save is not None else self.stall.mean
        return advise(
            self.stall.mean,
            max(save, self.stall.mean),
            m[0],
            mtbf_source=m[1],
            failures=self.history.failures,
            current=self.interval.mean if self.interval is not None else None,
        )

    def news(self, now: float, *, change: float = 0.25) -> Advice | None:
        """The advice, when it is worth a log line: the first time there is one, and whenever
        the advised interval moved by more than ``change`` (relative) since the last logged."""
        a = self.advice(now)
        if a is None:
            return None
        if self._logged is not None and abs(a.interval - self._logged) <= change * self._logged:
            return None
        self._logged = a.interval
        return a

    def record(self, now: float) -> dict[str, Any]:
        """What a manifest keeps (``info["advice"]``) for ``savegame ls`` and the next process:
        the cost estimates and the MTBF given, if any."""
        out: dict[str, Any] = {}
        if self.stall is not None:
            out["stall_s"] = round(self.stall.mean, 6)
            out["saves"] = self.stall.count
        if self.save is not None:
            out["save_s"] = round(self.save.mean, 6)
        if self.interval is not None:
            out["interval_s"] = round(self.interval.mean, 3)
        if self.mtbf_given is not None:
            out["mtbf_s"] = self.mtbf_given
        return out


def most_saves(*records: Any) -> Mapping[str, Any] | None:
    """Of several ``advice`` records (a checkpoint's, ``run.json``'s), the one with a measured
    stall that counts the most saves (the first of equals); None without one."""
    best: Mapping[str, Any] | None = None
    for rec in records:
        if not isinstance(rec, Mapping) or not _is_time(rec.get("stall_s")):
            continue
        if best is None or _saves(rec) > _saves(best):
            best = rec
    return best


def _saves(record: Mapping[str, Any]) -> int:
    n = record.get("saves")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _seeded(seed: Mapping[str, Any], key: str) -> Estimate | None:
    v = seed.get(key)
    if not _is_time(v):
        return None
    n = seed.get("saves")
    count = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return Estimate(float(v), count)


def from_record(
    record: Mapping[str, Any], hist: History, now: float, *, mtbf: float | None = None
) -> Advice | None:
    """The advice from a manifest's ``info["advice"]`` (``savegame ls``): its costs, the MTBF
    given (``mtbf`` here, else the one the run was given), else learned from ``hist``."""
    a = Advisor(mtbf=mtbf if mtbf is not None else _mtbf_of(record), history=hist, seed=record)
    iv = record.get("interval_s")
    if _is_time(iv) and iv > 0:
        a.interval = Estimate(float(iv), 1)
    return a.advice(now)


def _mtbf_of(record: Mapping[str, Any]) -> float | None:
    v = record.get("mtbf_s")
    return float(v) if _is_time(v) and v > 0 else None


def summary(record: Any, sessions: Any, now: float, *, mtbf: float | None = None) -> str | None:
    """``savegame ls``'s advice line, from the newest checkpoint's ``info["advice"]`` and
    ``run.json``'s ``sessions`` (the last, unfinished session is not counted: from outside, a
    run still going and one that died unnoticed look alike). None without a measured save."""
    if not isinstance(record, Mapping) or not _is_time(record.get("stall_s")):
        return None
    hist = history(sessions, current=False)
    a = from_record(record, hist, now, mtbf=mtbf)
    if a is not None:
        return "interval advice: " + describe(a)
    return (
        f"interval advice: a save stalls training {duration(float(record['stall_s']))}; no "
        "failure recorded, so no MTBF to advise with: pass --mtbf SECONDS (or train with "
        "Every(mtbf=...))"
    )
