"""Preemption signal handling apart from the Checkpointer (issue 10): handlers installed and put
back, the pending signal, and a second Ctrl-C that stops at once."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from savegame.checkpointer import EXIT_PREEMPTED, PREEMPTION_SIGNALS
from savegame.checkpointer.signals import PreemptionSignals


def test_exit_status_and_signals() -> None:
    assert EXIT_PREEMPTED == 75
    assert signal.SIGINT in PREEMPTION_SIGNALS and signal.SIGTERM in PREEMPTION_SIGNALS


def test_install_notes_the_signal_and_restore_puts_the_old_handlers_back() -> None:
    before = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}
    sigs = PreemptionSignals()
    sigs.install()
    try:
        assert sigs.pending is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert sigs.pending == signal.SIGTERM  # noted, nothing else happens
        sigs.clear()
        assert sigs.pending is None
    finally:
        sigs.restore()
        sigs.restore()  # idempotent
    assert {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS} == before


def test_a_second_ctrl_c_while_the_first_is_pending_stops_at_once() -> None:
    sigs = PreemptionSignals()
    sigs.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert sigs.pending == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        sigs.restore()


def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}
    sigs = PreemptionSignals()
    t = threading.Thread(target=sigs.install)
    t.start()
    t.join()
    assert {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS} == before
    sigs.restore()


def test_handlers_given_back_in_any_closing_order() -> None:
    """Three instances installed in turn and given back in every order: at the end the
    program's handlers are back, and while some are open the newest open one handles."""
    import itertools

    before = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}
    try:
        for order in itertools.permutations(range(3)):
            sigs = [PreemptionSignals() for _ in range(3)]
            for s in sigs:
                s.install()
            open_ = [0, 1, 2]
            for i in order:
                sigs[i].restore()
                open_.remove(i)
                for signum in PREEMPTION_SIGNALS:
                    want = sigs[open_[-1]]._on_signal if open_ else before[signum]
                    assert signal.getsignal(signum) == want, (order, i)
            sigs[order[0]].restore()  # idempotent
            assert {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS} == before
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_handler_the_program_set_later_is_left_alone() -> None:
    before = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}

    def mine(signum: int, frame: object) -> None:
        pass

    try:
        s = PreemptionSignals()
        s.install()
        signal.signal(signal.SIGTERM, mine)
        s.restore()
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        for sn, h in before.items():
            signal.signal(sn, h)


# ---- a Checkpointer collected without close() (stop 32) -----------------------------------


def _program_handler(seen: list[int]) -> object:
    def handler(signum: int, frame: object) -> None:
        seen.append(signum)

    return handler


def _abandoned_off_the_main_thread() -> PreemptionSignals:
    """Installed, then abandoned on another thread (as the garbage collector may do it)."""
    sigs = PreemptionSignals()
    sigs.install()
    t = threading.Thread(target=sigs.abandon)
    t.start()
    t.join()
    return sigs


def test_an_abandoned_instance_passes_signals_on_when_given_back_on_the_main_thread() -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, _program_handler(seen))  # type: ignore[arg-type]
    try:
        sigs = PreemptionSignals()
        sigs.install()
        sigs.abandon()  # main thread: the handlers go back at once
        assert signal.getsignal(signal.SIGTERM) is not None
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and sigs.pending is None
    finally:
        signal.signal(signal.SIGTERM, old)


def test_abandoned_on_another_thread_the_next_signal_goes_to_the_programs_handler() -> None:
    # The garbage collector may finalize a Checkpointer on any thread, where signal.signal()
    # is refused: the handler stays until the next signal, which it passes on (and then it
    # gives the handlers back, on the main thread where handlers run).
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, _program_handler(seen))  # type: ignore[arg-type]
    try:
        sigs = _abandoned_off_the_main_thread()
        assert signal.getsignal(signal.SIGTERM) == sigs._on_signal  # not given back yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and sigs.pending is None
        assert signal.getsignal(signal.SIGTERM) != sigs._on_signal  # given back now
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_abandoned_with_default_handlers_ctrl_c_raises_at_once() -> None:
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sigs = _abandoned_off_the_main_thread()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        assert sigs.pending is None
    finally:
        signal.signal(signal.SIGINT, old)
