"""What every framework integration shares: the warnings a user filters on, and how a
framework's version string is compared with the range an integration supports."""

from __future__ import annotations

from savegame.errors import CheckpointError

__all__ = [
    "ExactnessWarning",
    "InexactResumeWarning",
    "MonitorWarning",
    "UnsupportedSetupError",
    "version_tuple",
]


class ExactnessWarning(UserWarning):
    """The run will resume, but not exactly (the message says why and what to change: e.g. a
    plain ``DataLoader`` whose position cannot be saved)."""


#: The Hugging Face modules' name for :class:`ExactnessWarning` (one class: filter either).
InexactResumeWarning = ExactnessWarning


class MonitorWarning(UserWarning):
    """The monitored metric is not among the logged ones: best-K keeps nothing."""


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.6.6"`` → ``(2, 6, 6)``; stops at the first part that is not a plain number
    (``"5.0.0rc1"`` → ``(5, 0, 0)``, ``"3.15.dev0"`` → ``(3, 15)``); ``()`` if there is none."""
    out: list[int] = []
    for part in text.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


class UnsupportedSetupError(CheckpointError, ValueError):
    """The training setup is one the integration cannot save and resume exactly (a Keras
    distribution on the torch backend, FSDP or DeepSpeed under the Hugging Face integrations);
    raised before anything is trained or written, the message naming the fix. A ``ValueError``
    (and a ``savegame.CheckpointError``)."""
