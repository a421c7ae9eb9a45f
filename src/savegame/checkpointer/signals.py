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


#: The instances whose handlers are installed, oldest first. Each one's ``_old_handlers`` are
#: the handlers in place when it installed, i.e. the previous instance's (or the program's). A
#: Checkpointer closed out of nesting order (open A, open B, close A, close B) must not put
#: back a handler that belongs to a closed one: that would swallow Ctrl-C and SIGTERM forever.
_chain: list[PreemptionSignals] = []
_chain_lock = threading.Lock()


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
        with _chain_lock:
            for signum in PREEMPTION_SIGNALS:
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
            _chain.append(self)

    def restore(self) -> None:
        """Give the signals back (idempotent): to the handlers in place before :meth:`install`
        when this instance's handler is the current one; when a later instance installed over
        it and is still open, that one inherits them instead (it gives them back when it is
        closed). A handler the program set over ours since is left alone."""
        with _chain_lock:
            if self not in _chain:
                self._old_handlers = {}
                return
            i = _chain.index(self)
            later = _chain[i + 1] if i + 1 < len(_chain) else None
            for signum, handler in self._old_handlers.items():
                if later is not None and later._old_handlers.get(signum) == self._on_signal:
                    later._old_handlers[signum] = handler  # unlink this one from the chain
                elif signal.getsignal(signum) == self._on_signal:
                    with contextlib.suppress(ValueError, TypeError):
                        signal.signal(signum, handler)
            del _chain[i]
            self._old_handlers = {}

    def clear(self) -> None:
        """The pending signal was acted on (saved, and the loop goes on)."""
        self.pending = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.pending == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.pending = signum
        log.warning("received %s: will save at the next step boundary", signal_name(signum))
