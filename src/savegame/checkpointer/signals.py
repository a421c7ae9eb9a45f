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
import os
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
        #: Set when the Checkpointer was garbage-collected without ``close()`` (:meth:`abandon`).
        self.abandoned = False
        self._old_handlers: dict[int, Any] = {}
        #: Handlers that could not be given back (closed off the main thread): ours passes on.
        self._left: dict[int, Any] = {}
        self._pid = os.getpid()  # a forked child inherits the handler, never the step boundary

    def install(self) -> None:
        """Handle :data:`PREEMPTION_SIGNALS` (main thread only: Python delivers signals there;
        elsewhere this logs a warning and handles nothing)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "Checkpointer created outside the main thread: preemption signals are not handled"
            )
            return
        with _chain_lock:
            _purge_abandoned()
            for signum in PREEMPTION_SIGNALS:
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
            _chain.append(self)

    def restore(self) -> None:
        """Give the signals back (idempotent): to the handlers in place before :meth:`install`
        when this instance's handler is the current one; when a later instance installed over
        it and is still open, that one inherits them instead (it gives them back when it is
        closed). A handler the program set over ours since is left alone."""
        with _chain_lock:
            self._unlink()
            if threading.current_thread() is threading.main_thread():
                _purge_abandoned()

    def _unlink(self) -> None:
        """:meth:`restore`, with ``_chain_lock`` held."""
        if self not in _chain:
            self._old_handlers = {}
            return
        i = _chain.index(self)
        later = _chain[i + 1] if i + 1 < len(_chain) else None
        for signum, handler in self._old_handlers.items():
            if later is not None and later._old_handlers.get(signum) == self._on_signal:
                later._old_handlers[signum] = handler  # unlink this one from the chain
            elif signal.getsignal(signum) == self._on_signal:
                try:
                    signal.signal(signum, handler)
                except (ValueError, TypeError):  # not the main thread: ours stays installed
                    self._left[signum] = handler  # and passes the signal on (_pass_on)
        del _chain[i]
        self._old_handlers = {}

    def abandon(self) -> None:
        """The Checkpointer is gone without ``close()`` (garbage-collected after an exception
        skipped it): from now on a signal goes where it would have gone without this instance
        (the process's own handler, or the default: SIGTERM ends the process), instead of
        waiting for a step boundary that never comes. The handlers are given back at once when
        this runs on the main thread; elsewhere (the garbage collector may run on any thread,
        where ``signal.signal`` is refused) at the next signal."""
        self.abandoned = True
        if threading.current_thread() is threading.main_thread():
            _try_purge()

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """Deliver ``signum`` as if this (abandoned) instance had never installed a handler:
        to the first handler under it that is not an abandoned instance's."""
        handler = _past_abandoned(self._under(signum), signum)
        _try_purge()  # (a handler runs on the main thread)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_IGN:
            return
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:  # the default action (SIGTERM, SIGUSR1: end the process)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _under(self, signum: int) -> Any:
        """The handler this instance installed over (or could not give back)."""
        return self._old_handlers.get(signum, self._left.get(signum, signal.SIG_DFL))

    def clear(self) -> None:
        """The pending signal was acted on (saved, and the loop goes on)."""
        self.pending = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # not in the chain: unlinked, handler not given back; another pid: a forked child where
        # _forget_in_child could not give the handlers back
        if self.abandoned or self not in _chain or os.getpid() != self._pid:
            self._pass_on(signum, frame)
            return
        if signum == signal.SIGINT and self.pending == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.pending = signum
        log.warning("received %s: will save at the next step boundary", signal_name(signum))


def _abandoned_owner(handler: Any) -> PreemptionSignals | None:
    """The abandoned instance whose handler ``handler`` is, else None."""
    owner = getattr(handler, "__self__", None)
    if (
        isinstance(owner, PreemptionSignals)
        and getattr(handler, "__func__", None) is (PreemptionSignals._on_signal)
        and (owner.abandoned or owner not in _chain)
    ):
        return owner
    return None


def _purge_abandoned() -> None:
    """Unlink every abandoned instance (``_chain_lock`` held, on the main thread): their
    handlers go back to what was under them, so the chain never grows with Checkpointers that
    were collected without ``close()`` on another thread (the persist worker, when a save was
    in flight)."""
    for inst in reversed([i for i in _chain if i.abandoned]):
        inst._unlink()
    # what instances closed off the main thread left installed, or under a live one
    for inst in _chain:
        for signum, handler in inst._old_handlers.items():
            inst._old_handlers[signum] = _past_abandoned(handler, signum)
    for signum in PREEMPTION_SIGNALS:
        current = signal.getsignal(signum)
        if _abandoned_owner(current) is not None:
            signal.signal(signum, _past_abandoned(current, signum))


def _try_purge() -> None:
    """:func:`_purge_abandoned` if the chain's lock is free (never waits: the collector, or a
    signal handler, may run on the main thread inside :meth:`PreemptionSignals.restore`)."""
    if _chain_lock.acquire(blocking=False):
        try:
            _purge_abandoned()
        finally:
            _chain_lock.release()


def _past_abandoned(handler: Any, signum: int) -> Any:
    """The first handler at or under ``handler`` that is not an abandoned instance's (a loop,
    not a chain of calls: hundreds of abandoned instances must not overflow the stack); the
    default action if the walk goes round in a circle."""
    seen: set[int] = set()
    while (owner := _abandoned_owner(handler)) is not None and id(owner) not in seen:
        seen.add(id(owner))
        handler = owner._under(signum)
    return handler if _abandoned_owner(handler) is None else signal.SIG_DFL


def _forget_in_child() -> None:
    """In a forked child (a DataLoader worker, a ``multiprocessing`` fork Process, a user's
    ``os.fork()``): the program's own handlers again. The child inherits ours, but no step
    boundary ever comes there, so SIGTERM (``kill -TERM -PGID``, ``scancel``,
    ``Process.terminate()``) would only be noted and never end it."""
    global _chain_lock
    _chain_lock = threading.Lock()  # a parent's thread may have held it at the fork
    for inst in reversed(_chain):
        for signum, handler in inst._old_handlers.items():
            if signal.getsignal(signum) == inst._on_signal:
                with contextlib.suppress(ValueError, TypeError, OSError):
                    signal.signal(signum, _past_abandoned(handler, signum))
    for inst in _chain:
        inst._old_handlers = {}
    _chain.clear()


os.register_at_fork(after_in_child=_forget_in_child)
