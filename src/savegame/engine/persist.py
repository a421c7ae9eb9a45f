"""Persist: one background save at a time, with failures that reach the caller.

:class:`Persister` runs save jobs on a single background thread. Each submission returns a
:class:`SaveHandle`. A job's exception is stored and re-raised on the caller's thread — by
``handle.result()``, by :meth:`Persister.wait`, or by the next :meth:`Persister.submit` — never
only logged (orbax#605: async failures unreported, next save crashes).

The handle resolves when the checkpoint is *committed*; optional ``after`` work (retention)
then runs on the same worker and still counts as in flight for :attr:`Persister.busy`,
:meth:`Persister.wait` and the next :meth:`Persister.submit`. Failures reach the caller as
:class:`~savegame.errors.CheckpointError` (a foreign exception becomes a ``StorageError``
with the original chained), raised once.

Invariant: at most one job is in flight; :meth:`submit` refuses to queue a second one
(the caller waits or skips by policy), so host memory holds at most one staged snapshot.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Generic, TypeVar

from savegame import errors

__all__ = ["Persister", "SaveHandle"]

T = TypeVar("T")

#: Seconds the worker thread waits for the next save before it exits (a new one starts on demand).
IDLE_EXIT_S = 30.0


class SaveHandle(Generic[T]):
    """A save running in the background.

    ``done()`` is non-blocking; ``result(timeout=None)`` waits and returns the checkpoint path
    or raises the save's error (always a :class:`~savegame.errors.CheckpointError`);
    ``cancel()`` stops a save that has not started writing. A failure delivered by
    ``result()`` counts as reported: the next save does not raise it a second time.
    """

    def __init__(
        self, future: Future[T], step: int, on_reported: Callable[[], None] | None = None
    ) -> None:
        self._future = future
        self._on_reported = on_reported
        self.step = step

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as exc:  # not the builtin one before 3.11
            raise TimeoutError(f"save of step {self.step} still running after {timeout}s") from exc
        except CancelledError as exc:
            raise errors.CheckpointError(
                f"save of step {self.step} was cancelled", step=self.step
            ) from exc
        except Exception:
            if self._on_reported is not None:
                self._on_reported()
            raise

    def cancel(self) -> bool:
        return self._future.cancel()


class Persister:
    """A single background worker for save jobs. May be used from one caller thread."""

    def __init__(self, name: str = "savegame-persist") -> None:
        self._name = name
        self._current: SaveHandle[object] | None = None
        self._failed: errors.CheckpointError | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    @property
    def in_flight(self) -> SaveHandle[object] | None:
        """The handle of the save still running (or doing its ``after`` work), else None."""
        return self._current if self.busy else None

    @property
    def busy(self) -> bool:
        """True from :meth:`submit` until the job *and* its ``after`` work finished."""
        return not self._idle.is_set()

    def submit(
        self,
        job: Callable[[], T],
        step: int,
        *,
        after: Callable[[], None] | None = None,
        path: object = None,
    ) -> SaveHandle[T]:
        """Start ``job`` on the background thread.

        Args:
            job: The save; its return value (the committed path) resolves the handle.
            step: The step being saved (for messages).
            path: The run folder (for messages).
            after: Housekeeping to run on the worker once ``job`` succeeded and the handle is
                resolved (retention: deleting a superseded 200 MB checkpoint took 60-70 ms of a
                280 ms save on the CI VM; it is not part of "committed"). :attr:`busy` and
                :meth:`wait` cover it; a failure in it is raised like a save failure.

        Raises:
            CheckpointError: the previous job failed (its error is chained), or one is still
                running (call :meth:`wait` first).
        """
        self.raise_failure()
        if self.busy:
            raise RuntimeError("internal: a save is already in flight; wait() first")
        future: Future[T] = Future()
        idle = self._idle = threading.Event()

        def run() -> None:
            try:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    result = job()
                except BaseException as exc:  # thread boundary: keep it for the caller
                    failure = as_checkpoint_error(exc, step, path=path)
                    # Store before completing the future: who sees done() also sees the failure.
                    self._failed = failure
                    future.set_exception(failure)
                    return
                future.set_result(result)
                if after is not None:
                    try:
                        after()
                    except BaseException as exc:  # thread boundary
                        self._failed = as_checkpoint_error(exc, step, committed=True, path=path)
            finally:
                idle.set()

        handle = SaveHandle(future, step, on_reported=lambda: self._reported(future))
        self._current = handle  # type: ignore[assignment]
        # One worker, kept alive between saves and fed through a queue: starting a thread per
        # save cost 1-5 ms of stall (Thread.start() waits until the new thread runs) on the
        # 2-vCPU CI VM. It exits after IDLE_EXIT_S without work, so closed checkpointers leave
        # no thread behind for long.
        with self._lock:
            self._jobs.put(run)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        return handle

    def _work(self) -> None:
        while True:
            try:
                run = self._jobs.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                run = None
            if run is None:  # idle for IDLE_EXIT_S, or told to stop
                with self._lock:  # submit() puts under the same lock: no job is left behind
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            run()
            # Not held while idle: the job refers to its Checkpointer and that to its host
            # pool (one copy of the state), which must be freed when the Checkpointer is.
            del run

    def stop(self, timeout: float = 5.0) -> None:
        """End the idle worker now rather than after ``IDLE_EXIT_S`` (``close()``: a sweep that
        opens and closes many Checkpointers must not pile up idle threads). A later
        :meth:`submit` starts a new one."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._jobs.put(None)  # type: ignore[arg-type]
        if not self.busy and thread is not threading.current_thread():
            thread.join(timeout)  # (a save still running, after a Ctrl-C: it ends after it)

    def _reported(self, future: Future[T]) -> None:
        if self._current is not None and self._current._future is future:
            self._failed = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the in-flight save (if any) finished; re-raise its failure.

        Raises:
            TimeoutError: the save is still running after ``timeout`` seconds.
            CheckpointError: the save failed (once; later calls do not raise it again).
        """
        current = self._current
        if current is not None:
            if current._future.cancelled():
                self._idle.set()  # its queued run returns at once: no need to wait for the worker
            elif not self._idle.wait(timeout):
                raise TimeoutError(f"save of step {current.step} still running after {timeout}s")
        self.raise_failure()

    def raise_failure(self) -> None:
        """Re-raise (once) a failure of a finished background save on the caller's thread.
        Never blocks; a no-op while the save runs or when nothing failed."""
        exc, self._failed = self._failed, None
        if exc is not None:
            raise exc


def as_checkpoint_error(
    exc: BaseException, step: int, *, committed: bool = False, path: object = None
) -> errors.CheckpointError:
    """A save's failure as the savegame error the caller will get (cause chained); with
    ``committed``, the save itself succeeded and only the work after it (retention) failed."""
    where = None if path is None else str(path)
    if committed:  # the save itself succeeded; its housekeeping did not
        err = errors.StorageError(
            f"step {step} was committed, but the work after it (retention) failed: "
            f"{type(exc).__name__}: {exc}; old checkpoints may not have been deleted",
            step=step,
            path=where,
        )
        err.__cause__ = exc
        return err
    if isinstance(exc, errors.CheckpointError):
        return exc
    err = errors.StorageError(
        f"background save of step {step} failed: {type(exc).__name__}: {exc}; no checkpoint was committed "
        "for it and earlier checkpoints are intact — fix the cause (disk full? permissions?) and save again",
        step=step,
        path=where,
    )
    err.__cause__ = exc
    return err
