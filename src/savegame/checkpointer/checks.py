"""Argument checks of the Checkpointer's public calls (issue 9.11), and metric formatting.

Invariant: a bad ``step`` or metric is refused with a ``TypeError``/``ValueError`` that says what
was expected, before anything is saved or any state changes.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping

from savegame import errors, policy
from savegame.state import TrainState
from savegame.storage import Store

__all__ = ["check_arguments", "check_metrics", "check_state", "check_step", "fmt_metric"]


class _MetricRangeError(errors.EncodeError, ValueError):
    """A metric that is a number too large for a float: an EncodeError (caught with every
    savegame error) that is also the ValueError Python raises for it."""


def check_arguments(*, save: object, keep: object, **places: object) -> None:
    """The Checkpointer's arguments of the wrong kind as a TypeError/ValueError naming the
    argument and what it takes, before anything is created: ``save=500`` (an AttributeError
    deep inside before), ``keep=3``, a root that is not a path, or an empty one (an unset
    environment variable, which would make the working directory the run folder)."""
    if save is not None and not isinstance(save, policy.Every):
        raise TypeError(
            f"save={save!r}: pass a schedule, e.g. save=sg.Every(steps=500) (or epochs=, seconds=)"
        )
    if keep is not None and not isinstance(keep, policy.Keep):
        raise TypeError(f"keep={keep!r}: pass a rule, e.g. keep=sg.Keep(last=3)")
    for name, where in places.items():
        if where is None and name != "root":
            continue
        if not isinstance(where, (str, os.PathLike, Store)):
            raise TypeError(
                f"{name}={where!r}: pass a folder path or a URL (s3://…, file://…), got "
                f"{type(where).__name__}"
            )
        if isinstance(where, str) and not where.strip():
            raise ValueError(
                f"{name}={where!r} is empty: pass the run folder's path or URL (an empty string, "
                "e.g. an unset environment variable, would make the working directory the run)"
            )


def check_state(state: object, call: str) -> None:
    """A TypeError naming what to pass when ``state`` is not a ``TrainState`` (a plain dict
    of objects, a ``model.state_dict()``): refused at the first call, not when a save falls due
    hours into the run."""
    if not isinstance(state, TrainState):
        raise TypeError(
            f"Checkpointer.{call} takes a savegame.TrainState, got {type(state).__name__}; wrap "
            "the live objects: sg.TrainState(model=model, optimizer=opt, extras={...}) (not "
            "their state_dict(): restore loads into the objects in place)"
        )


def check_step(step: object) -> int:
    """The step as an int, or a TypeError/ValueError that says what a step is (issue 9.11)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"step must be an int (the number of completed optimizer steps), got {type(step).__name__} {step!r}"
        )
    value = int(step)
    if not 0 <= value < 10**12:
        raise ValueError(f"step must be in [0, 10**12), got {value}")
    return value


def check_metrics(metrics: object) -> dict[str, float] | None:
    """Metrics as ``{str: float}``; numbers, 0-d tensors and numpy scalars are accepted."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise errors.EncodeError(
            f"metrics must be a mapping of name -> number, got {type(metrics).__name__}"
        )
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise errors.EncodeError(f"metric names must be str, got {type(k).__name__} {k!r}")
        if isinstance(v, (str, bytes)):
            raise errors.EncodeError(
                f"metric {k!r} must be a number, got {type(v).__name__} {v!r}", key=k
            )
        try:
            out[k] = float(v)  # type: ignore[arg-type]
        except OverflowError as exc:  # an int too large for a float (10**400)
            raise _MetricRangeError(f"metric {k!r} = {v!r} does not fit a float", key=k) from exc
        except (TypeError, ValueError, RuntimeError) as exc:
            raise errors.EncodeError(
                f"metric {k!r} must be a number, got {type(v).__name__} {v!r}", key=k
            ) from exc
    return out


def fmt_metric(v: float | None, mode: str) -> str:
    """A monitored value for the log; None (nothing yet) prints as the starting point."""
    if v is None:  # Keras prints the starting point as -inf / inf too
        return "-inf" if mode == "max" else "inf"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4f}"
