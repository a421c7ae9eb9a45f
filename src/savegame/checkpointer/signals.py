"""Preemption signals: noted when they arrive, acted on at the next step boundary.

Invariant: a handler only records the signal (SIGTERM, SIGUSR1, SIGINT); it never saves, so a
signal never interrupts a save half-way. The :class:`~savegame.Checkpointer` reads
:attr:`PreemptionSignals.pending` at its next ``step()``, saves there and exits with
:data:`EXIT_PREEMPTED`. The one exception is a second Ctrl-C while the first is still pending:
it raises ``KeyboardInterrupt`` at once (the user means "stop now").
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("savegame")

__all__ = ["EXIT_PREEMPTED", "PREEMPTION_SIGNALS", "PreemptionSignals", "signal_name"]

#: Exit status after a preemption save (EX_TEMPFAIL, "try again"): non-zero so that schedulers
#: (Kubernetes, SLURM --requeue, torchrun --max-restarts) restart the job rather than count it
#: as finished.
EXIT_PREEMPTED = 75

PREEMPTION_SIGNALS = tuple(
    s
    for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
    if s is not None
)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class PreemptionSignals:
    """The handlers a Checkpointer installs, and the signal waiting for the next step."""

    def __init__(self) -> None:
        #: The signal received and not yet acted on (None: none).
        self.pending: int | None = None
        self._old_handlers: dict[int, Any] = {}

    def install(self) -> None:
        """Handle :data:`PREEMPTION_SIGNALS` (main thread only: Python delivers signals there;
        elsewhere this logs a warning and handles nothing)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "Checkpointer created outside the main thread: preemption signals are not handled"
            )
            return
        for signum in PREEMPTION_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers that were in place before :meth:`install` (idempotent)."""
        for signum, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._old_handlers = {}

    def clear(self) -> None:
        """The pending signal was acted on (saved, and the loop goes on)."""
        self.pending = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.pending == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.pending = signum
        log.warning("received %s: will save at the next step boundary", signal_name(signum))
