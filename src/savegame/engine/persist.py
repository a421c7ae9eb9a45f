"""Persist: one background save at a time, with failures that reach the caller.

:class:`Persister` runs save jobs on a single background thread. Each submission returns a
:class:`SaveHandle`. A job's exception is stored and re-raised on the caller's thread — by
``handle.result()``, by :meth:`Persister.wait`, or by the next :meth:`Persister.submit` — never
only logged (orbax#605: async failures unreported, next save crashes).

Invariant: at most one job is in flight; :meth:`submit` refuses to queue a second one
(the caller waits or skips by policy), so host memory holds at most one staged snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Generic, TypeVar

from savegame import errors

__all__ = ["Persister", "SaveHandle"]

T = TypeVar("T")


class SaveHandle(Generic[T]):
    """A save running in the background.

    ``done()`` is non-blocking; ``result(timeout=None)`` waits and returns the checkpoint path
    or raises the save's error; ``cancel()`` stops a save that has not started writing.
    """

    def __init__(self, future: Future[T], step: int) -> None:
        self._future = future
        self.step = step

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._future.result(timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"save of step {self.step} still running after {timeout}s") from exc
        except CancelledError as exc:
            raise errors.CheckpointError(f"save of step {self.step} was cancelled", step=self.step) from exc

    def cancel(self) -> bool:
        return self._future.cancel()


class Persister:
    """A single background worker for save jobs. May be used from one caller thread."""

    def __init__(self, name: str = "savegame-persist") -> None:
        self._name = name
        self._current: SaveHandle[object] | None = None
        self._failed: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._current is not None and not self._current.done()

    def submit(self, job: Callable[[], T], step: int) -> SaveHandle[T]:
        """Start ``job`` on the background thread.

        Raises:
            CheckpointError: the previous job failed (its error is chained), or one is still
                running (call :meth:`wait` first).
        """
        self.raise_failure()
        if self.busy:
            raise RuntimeError("internal: a save is already in flight; wait() first")
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(job())
            except BaseException as exc:  # thread boundary: keep it for the caller
                self._failed = exc
                future.set_exception(exc)

        handle = SaveHandle(future, step)
        self._current = handle  # type: ignore[assignment]
        threading.Thread(target=run, name=f"{self._name}-{step}", daemon=True).start()
        return handle

    def wait(self, timeout: float | None = None) -> None:
        """Block until the in-flight save (if any) finished; re-raise its failure."""
        if self._current is not None:
            try:
                self._current.result(timeout)
            except BaseException:
                pass  # re-raised below, once, with context
        self.raise_failure()

    def raise_failure(self) -> None:
        """Re-raise (once) a failure of a background save on the caller's thread."""
        exc, self._failed = self._failed, None
        if exc is None:
            return
        step = self._current.step if self._current is not None else None
        if isinstance(exc, errors.CheckpointError):
            raise exc
        raise errors.StorageError(
            f"background save of step {step} failed: {type(exc).__name__}: {exc}; earlier checkpoints are intact",
            step=step,
        ) from exc
