"""The training side: :class:`Checkpointer` (saves a run on a strategy, resumes it exactly) and
the public functions on run folders that ``savegame ls``/``verify``/``prune`` are built on.

Parts: :mod:`.facade` (the :class:`Checkpointer`), :mod:`.signals` (preemption signals),
:mod:`.runfile` (the lock, ``run.json``, what a run folder is), :mod:`.retention` (what is kept,
deleting the rest: one copy for the Checkpointer and ``prune``), :mod:`.restoring` (one
process's restore), :mod:`.checks` (argument checks), :mod:`.adopt` (importing a foreign
checkpoint).

Invariant: importing this package imports nothing else; each name loads its module on first use
(PEP 562), so the CLI pays for what a command uses — the run-folder functions below import no
torch (only :class:`Checkpointer` does).

Public functions on run folders (no lock needed unless said):

* :func:`list_run` — every checkpoint with validity and retention reasons (``savegame ls``).
* :func:`plan_retention` — the same, made safe to act on (damaged kept checkpoints set aside);
  :func:`unkept` — what a plan deletes; :func:`find_damage` — damage in what it keeps instead;
  :func:`delete_unkept` — apply a plan (the caller holds the lock: :func:`run_lock`).
* :func:`read_run_file`, :func:`run_file`, :func:`run_file_problem`, :func:`run_keep` —
  ``run.json`` and the retention rule it records.
* :func:`is_run`, :func:`is_checkpoint`, :func:`looks_like_checkpoint`,
  :func:`verify_checkpoint` — what a folder is, and every problem of a checkpoint folder.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from savegame.checkpointer.facade import Checkpointer
    from savegame.checkpointer.retention import (
        CheckpointInfo,
        delete_unkept,
        find_damage,
        list_run,
        plan_retention,
        unkept,
    )
    from savegame.checkpointer.runfile import (
        is_checkpoint,
        is_run,
        looks_like_checkpoint,
        read_run_file,
        run_file,
        run_file_problem,
        run_keep,
        run_lock,
        verify_checkpoint,
    )
    from savegame.checkpointer.signals import EXIT_PREEMPTED, PREEMPTION_SIGNALS

_LAZY = {
    "Checkpointer": "facade",
    "CheckpointInfo": "retention",
    "delete_unkept": "retention",
    "find_damage": "retention",
    "list_run": "retention",
    "plan_retention": "retention",
    "unkept": "retention",
    "is_checkpoint": "runfile",
    "is_run": "runfile",
    "looks_like_checkpoint": "runfile",
    "read_run_file": "runfile",
    "run_file": "runfile",
    "run_file_problem": "runfile",
    "run_keep": "runfile",
    "run_lock": "runfile",
    "verify_checkpoint": "runfile",
    "EXIT_PREEMPTED": "signals",
    "PREEMPTION_SIGNALS": "signals",
}

__all__ = [
    "EXIT_PREEMPTED",
    "PREEMPTION_SIGNALS",
    "CheckpointInfo",
    "Checkpointer",
    "delete_unkept",
    "find_damage",
    "is_checkpoint",
    "is_run",
    "list_run",
    "looks_like_checkpoint",
    "plan_retention",
    "read_run_file",
    "run_file",
    "run_file_problem",
    "run_keep",
    "run_lock",
    "unkept",
    "verify_checkpoint",
]


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"savegame.checkpointer.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
