"""The transfer's progress bar: bytes, rate and ETA on stderr (rich), or nothing.

Invariant: rich is imported only when a bar is shown (stderr is a terminal, or asked for).
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A rich progress bar on stderr (bytes, rate, ETA), or nothing."""

    def __init__(self, enabled: bool | None, label: str) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(label, total=None)

    def start(self, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total)
            self._bar.start()

    def advance(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
