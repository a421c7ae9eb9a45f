"""Keras 3 (torch backend, ``keras`` 3.5 - 3.x): savegame as a ``model.fit`` callback.

::

    os.environ["KERAS_BACKEND"] = "torch"            # before importing keras
    loader = StatefulDataLoader(dataset, batch_size=32, shuffle=True)
    cb = SavegameCheckpoint("runs/exp1", loader=loader, save=Every(steps=200),
                            keep=Keep(last=2, best=3, monitor="val_loss", mode="min"))
    model.fit(loader, epochs=10, validation_data=val, callbacks=[cb])   # resumes by itself

ModelCheckpoint + BackupAndRestore in one callback, in one commit: every variable of the model
(weights, non-trainable state, the layers' random seed generators), every variable of the
optimizer (moments, iteration count, its own learning-rate state), the running metric
variables, every RNG of the process, the data loader's position and the epoch — written
together by savegame (temp folder, hashes, manifest last, atomic rename), so a crash never
leaves weights of one step with progress of another (Keras' BackupAndRestore writes the two as
separate files, and restores only the epoch).

Resume happens in ``on_train_begin``: the newest *valid* checkpoint of the run folder is read
and verified (a damaged or half-written one is skipped with a ``CorruptCheckpointWarning``),
the variables are assigned, and ``fit`` starts at the saved epoch. With ``loader=`` (a
torchdata ``StatefulDataLoader``, the ``x`` you pass to ``fit``) that epoch continues at the
next batch, in the same order; without it a mid-epoch checkpoint restarts its epoch (an
:class:`ExactnessWarning` says so).

Log lines are Keras' (``verbose=1``)::

    Epoch 3: val_loss improved from 0.51000 to 0.47000, saving checkpoint to runs/exp1/step-000000000090
    Epoch 4: val_loss did not improve from 0.47000
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from savegame import errors, policy
from savegame.checkpointer import Checkpointer
from savegame.integrations._common import (
    ExactnessWarning,
    MonitorWarning,
    UnsupportedSetupError,
    version_tuple,
)
from savegame.state import TrainState
from savegame.storage import urls

__all__ = [
    "SUPPORTED",
    "ExactnessWarning",
    "MonitorWarning",
    "SavegameCheckpoint",
    "UnsupportedSetupError",
    "check_version",
]

log = logging.getLogger("savegame")

SUPPORTED = ((3, 5), (4, 0))  # >= 3.5, < 4
_RANGE = "keras>=3.5,<4"


def check_version(version: str | None = None, backend: str | None = None) -> str:
    """Import Keras and check its version and backend; return the version.

    Raises:
        MissingDependencyError: Keras is missing, outside ``>=3.5,<4``, or not on the torch
            backend (the message says what to set).
    """
    if version is None:
        if os.environ.get("KERAS_BACKEND", "torch") != "torch" and backend is None:
            backend = os.environ["KERAS_BACKEND"]
        try:
            import keras
        except ImportError as exc:
            raise errors.MissingDependencyError(
                f"savegame.integrations.keras needs Keras 3 ({_RANGE}) on the torch backend: "
                "pip install 'savegame[keras3]' and set KERAS_BACKEND=torch before importing keras"
            ) from exc
        version = str(keras.__version__)
        backend = backend or keras.backend.backend()
    low, high = SUPPORTED
    if not (low <= version_tuple(version)[:2] < high):
        raise errors.MissingDependencyError(
            f"savegame.integrations.keras supports {_RANGE}; found keras {version}. "
            f"Install a supported version: pip install '{_RANGE}'"
        )
    if backend is not None and backend != "torch":
        raise errors.MissingDependencyError(
            f"savegame.integrations.keras needs the torch backend; Keras runs on {backend!r}. "
            "Set KERAS_BACKEND=torch before importing keras"
        )
    return version


check_version()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

_RAN_OUT = "Your input ran out of data"


def _tensor(variable: Any) -> torch.Tensor:
    value = getattr(variable, "value", variable)  # a Variable, or a computed tensor
    return (
        value.detach()
        if isinstance(value, torch.Tensor)
        else torch.as_tensor(keras.ops.convert_to_numpy(value))
    )


class _KerasState:
    """Model, optimizer and metric variables as one Stateful object (tensors in a fixed order;
    the paths are kept to refuse a checkpoint of another model)."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.pending_metrics: list[torch.Tensor] | None = None
        #: True while the callback saves: hand out the live values, not copies (see state_dict).
        self.saving = False

    def _groups(self) -> dict[str, list[Any]]:
        model = self.model
        groups: dict[str, list[Any]] = {"model": list(model.variables)}
        if model.optimizer is not None:
            groups["optimizer"] = list(model.optimizer.variables)
        groups["metrics"] = list(model.metrics_variables)
        from keras.src.backend.common import global_state

        seed = global_state.get_global_attribute("global_seed_generator")
        if seed is not None:
            groups["global_seed"] = [seed.state]
        return groups

    def state_dict(self) -> dict[str, Any]:
        # A save reads the live values as they are: a sync save writes them before training goes
        # on, an async one copies them into its host buffers before returning, so a copy here
        # would only double the memory traffic (and the memory) of every save. A restore also asks
        # for the tensors, to read the checkpoint into them: those must be copies, or the saved
        # metric values (applied later, at on_epoch_begin) would be read into the live metric
        # variables, which fit() then resets.
        copy = not self.saving
        out: dict[str, Any] = {}
        for name, variables in self._groups().items():
            values = [_tensor(v) for v in variables]
            out[name] = {
                "paths": [str(v.path) for v in variables],
                "values": [t.clone() for t in values] if copy else values,
            }
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = self._groups()
        for name in ("model", "optimizer"):
            if name not in state and name in groups:
                raise errors.RestoreError(f"the checkpoint holds no {name} variables", key=name)
        for name, variables in groups.items():
            saved = state.get(name)
            if saved is None:
                continue
            paths, values = list(saved["paths"]), list(saved["values"])
            here = [str(v.path) for v in variables]
            if name != "global_seed" and len(paths) != len(here):
                raise errors.RestoreError(
                    f"the checkpoint's {name} has {len(paths)} variables, this one {len(here)}: "
                    "build the same model and optimizer as the saved run",
                    key=name,
                )
            for v, value, path in zip(variables, values, paths, strict=False):
                if tuple(v.shape) != tuple(value.shape):
                    raise errors.RestoreError(
                        f"{name} variable {path!r}: shape {tuple(value.shape)} in the checkpoint, {tuple(v.shape)} here",
                        key=name,
                    )
            if name == "metrics":
                # fit() resets the metrics at the epoch's start, after on_train_begin: put them
                # back at on_epoch_begin, so the resumed epoch's running means are the same.
                self.pending_metrics = values
                continue
            for v, value in zip(variables, values, strict=True):
                v.assign(value)

    def apply_metrics(self) -> None:
        values, self.pending_metrics = self.pending_metrics, None
        if values is not None:
            for v, value in zip(self.model.metrics_variables, values, strict=False):
                v.assign(value)


class SavegameCheckpoint(keras.callbacks.Callback):
    """Save a Keras 3 (torch backend) run with savegame and resume it exactly.

    Args:
        root: The run folder.
        loader: The ``StatefulDataLoader`` passed to ``fit`` as ``x``: its position is saved and
            a mid-epoch resume continues at the next batch. Without it (arrays, a plain
            ``DataLoader``) a mid-epoch checkpoint restarts its epoch (a warning says so).
        save: When to save (default ``Every(epochs=1)``); steps are optimizer steps
            (``optimizer.iterations``).
        keep: What to keep, e.g. ``Keep(last=2, best=3, monitor="val_loss", mode="min")``
            (default ``Keep(last=1)``, the newest, as ``BackupAndRestore`` keeps one backup).
            The monitored metric is read from the epoch's logs (``val_*`` after validation).
        async_save, when_busy, handle_signals: as for :class:`savegame.Checkpointer`
            (signals: save at the next batch's end, committed before the exit with status 75).
            ``async_save`` defaults to True here: the end of ``fit`` waits for the last save,
            and a failed background save is raised at the next batch.
        cache: A local folder (fast disk) for a remote ``root`` (``s3://...``): saves commit
            there and upload in the background; the end of ``fit`` waits for the uploads
            (docs/tiers.md). As for :class:`savegame.Checkpointer`.
        resume: Restore the newest valid checkpoint at ``on_train_begin``.
        save_on_train_end: Save the last step when ``fit`` returns (default True), unless it
            is saved already or this ``fit`` trained nothing: with a schedule in steps
            (``Every(steps=N)``), the steps after the last scheduled save are kept, and a
            finished run started again restores its end and trains nothing. ``fit`` always ends
            with an epoch's end (``on_epoch_end``, which saves only when the schedule says so),
            or mid-epoch when ``model.stop_training`` is set in a batch (then the position in
            the epoch is saved, with ``loader=``). A ``fit`` that raises saves nothing more.
        verbose: 1 prints Keras-style lines on saves and metric changes.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        loader: Any = None,
        save: policy.Every | None = None,
        keep: policy.Keep | None = None,
        async_save: bool = True,
        when_busy: Literal["wait", "skip"] = "wait",
        handle_signals: bool = True,
        resume: bool = True,
        save_on_train_end: bool = True,
        verbose: int = 1,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.cache = cache
        self.save_policy = save if save is not None else policy.Every(epochs=1)
        self.keep = keep if keep is not None else policy.Keep(last=1)
        self.async_save = async_save
        self.when_busy = when_busy
        self.handle_signals = handle_signals
        self.resume = resume
        self.save_on_train_end = save_on_train_end
        self.verbose = verbose
        self.loader = None
        if loader is not None:
            if callable(getattr(loader, "state_dict", None)) and callable(
                getattr(loader, "load_state_dict", None)
            ):
                self.loader = loader
            else:
                warnings.warn(
                    f"SavegameCheckpoint(loader=...) got a {type(loader).__module__}.{type(loader).__qualname__}, "
                    "which cannot save its position: a resume mid-epoch restarts the epoch (batches trained twice). "
                    "Use torchdata.stateful_dataloader.StatefulDataLoader (same arguments as DataLoader), and "
                    "savegame.data.resumable(dataset) for random augmentation.",
                    ExactnessWarning,
                    stacklevel=2,
                )
        self.checkpointer: Checkpointer | None = None
        self._run_key = ""
        #: The step restored at the last ``fit`` (None: started fresh).
        self.restored_step: int | None = None
        self._extras: dict[str, Any] = {"epoch": 0, "in_epoch": False, "batch": 0}
        self._last_step = -1
        self._saved_step: int | None = None  # the newest step saved (or restored) in this fit
        self._keras_state: _KerasState | None = None
        self._state: TrainState | None = None
        self._epoch = 0
        self._monitor_checked = False
        self._filter: Any = None
        self._best: float | None = None
        self._short_epoch = False
        #: Keras' EpochIterator of the running fit (None: not found, or no ``loader=``).
        self._fit_iter: Any = None
        #: fit(steps_per_epoch=...): Keras keeps one iterator of the loader across epochs.
        self._steps_mode = False
        #: Set at a resume in steps mode: Keras' iterator position to put back at on_epoch_begin.
        self._pending_iter: tuple[int, int, int | None] | None = None
        #: What on_epoch_end puts back after the resumed epoch (steps_per_epoch; an iterator).
        self._iter_fixup: dict[str, Any] | None = None
        #: The other Keras callbacks whose state is saved (EarlyStopping, ReduceLROnPlateau),
        #: and their restored state, given back at the first epoch's begin.
        self._siblings: dict[str, Any] = {}
        self._pending_siblings: Any = None

    # ---- fit start: open the run, resume ------------------------------------------------------
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        if not model.built:
            raise ValueError(
                "SavegameCheckpoint: build the model before fit() (call it on a batch, or pass an Input), so its "
                "variables exist to be restored"
            )
        per_call = int(getattr(model, "steps_per_execution", 1) or 1)
        if per_call > 1:
            # Keras 3.5-3.15 refuse this on the torch backend before any callback runs; a Keras
            # that allows it would call on_train_batch_end once per N batches, and the position
            # counted here (one batch per call) would resume on the wrong batch.
            raise ValueError(
                f"SavegameCheckpoint: model.compile(steps_per_execution={per_call}) runs {per_call} batches per "
                "callback call, so a mid-epoch resume cannot land on the right batch; compile with "
                "steps_per_execution=1 (the only value Keras' torch backend supports)"
            )
        accumulate = getattr(model.optimizer, "gradient_accumulation_steps", None)
        if accumulate and int(accumulate) > 1:
            # Keras' optimizer.iterations then counts windows, not batches: the batches of one
            # window share a step number, and a window may span an epoch's end.
            raise UnsupportedSetupError(
                f"SavegameCheckpoint: the optimizer accumulates gradients over {int(accumulate)} "
                "batches (gradient_accumulation_steps), which this callback cannot save and "
                "resume exactly yet: fit without it (a larger batch_size gives the same update "
                "when memory allows)",
                path=str(self.root),
            )
        _check_one_device(self.root)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        self._keras_state = _KerasState(model)
        objects: dict[str, Any] = {"keras": self._keras_state, "progress": self._extras}
        if self.loader is not None:
            objects["loader"] = self.loader
        self._state = TrainState(**objects)
        self._monitor_checked = False
        self.restored_step = None
        _close_leftovers(self)
        self.checkpointer = Checkpointer(
            self.root,
            save=self.save_policy,
            keep=self.keep,
            handle_signals=self.handle_signals,
            async_save=self.async_save,
            when_busy=self.when_busy,
            cache=self.cache,
        )
        _open_fits[self._run_key] = (weakref.ref(self), threading.get_ident(), self.checkpointer)
        self._extras.update(epoch=0, in_epoch=False, batch=0)
        self._last_step = -1
        self._saved_step = None
        self._short_epoch = False
        self._pending_iter = None
        self._iter_fixup = None
        self._fit_iter = _epoch_iterator(model) if self.loader is not None else None
        self._siblings = _stateful_siblings(model, self)
        self._pending_siblings = None
        self._steps_mode = self._fit_iter is not None and self._fit_iter.steps_per_epoch is not None
        self._best = self._best_on_disk()
        if not self.resume:
            return
        step = self.checkpointer.restore(self._state)
        if self.checkpointer.last_restore is None:
            return
        self.restored_step = step
        self._saved_step = step
        # applied at the first epoch's begin: their own on_train_begin resets them
        self._pending_siblings = self._extras.pop(_SIBLINGS_KEY, None)
        epoch, in_epoch = int(self._extras["epoch"]), bool(self._extras["in_epoch"])
        if self.loader is not None and self._fit_iter is None:
            try:
                self._refuse_unknown_iterator(step)
            except UnsupportedSetupError:
                # Keras calls no callback after this: release the run folder now
                ckpt, self.checkpointer = self.checkpointer, None
                _open_fits.pop(self._run_key, None)
                if ckpt is not None:
                    ckpt.close()
                raise
        model._initial_epoch = epoch  # what BackupAndRestore sets: fit starts at this epoch
        self._epoch = epoch
        if in_epoch and self.loader is None:
            warnings.warn(
                f"SavegameCheckpoint: step {step} was saved in the middle of epoch {epoch + 1}, and without "
                "loader=StatefulDataLoader(...) its position is unknown: the epoch restarts from its first batch "
                "(those batches are trained twice)",
                ExactnessWarning,
                stacklevel=2,
            )
        self._short_epoch = in_epoch and self.loader is not None
        if not in_epoch:
            self._keras_state.pending_metrics = None  # a new epoch starts its running means at 0
        if self._steps_mode:
            self._resume_steps_mode(step, in_epoch)
        elif not in_epoch and self.loader is not None:
            # Saved at an epoch's end, after Keras had already built the next epoch's iterator
            # (it does so as the last batch's loop turn ends): that built iterator is what the
            # loader's saved state describes. Build it again from that state (drawing nothing),
            # so that fit's own build at the epoch's start is, as in the uninterrupted run, the
            # second one.
            iter(self.loader)
        if in_epoch and self.loader is not None and not self._steps_mode:
            # The resumed epoch yields only the batches left, so fit's epoch iterator runs out
            # before the count it expected and says so; that is this resume, not a data problem.
            warnings.filterwarnings("ignore", message=_RAN_OUT, category=UserWarning)
            self._filter = warnings.filters[0]
        if self.verbose:
            _print(
                f"Resuming from step {step} (epoch {epoch + 1}{', mid-epoch' if in_epoch else ''}) "
                f"of {self.checkpointer.root}"
            )

    def _resume_steps_mode(self, step: int, in_epoch: bool) -> None:
        """fit(steps_per_epoch=S): Keras draws each epoch's S batches from one iterator of the
        loader that lives across epochs (EpochIterator keeps it): an epoch ends after S batches
        or where the loader's pass ends (it "ran out of data": a short epoch), and only then is
        the next pass built. A fresh fit knows none of this: it would build a new iterator (the
        restored loader's remaining batches), count the pass from 0 and train the resumed epoch
        until S batches or the pass's end. So the iterator's position as Keras counted it is
        saved with each checkpoint ("seen"), and put back at the first epoch's start."""
        seen = self._extras.get("seen")
        if seen is None:  # written by an earlier savegame, which did not save Keras' count
            warnings.warn(
                f"SavegameCheckpoint: step {step} of {self.root} does not record where fit(steps_per_epoch=...) "
                "was in the loader's pass (written by an earlier savegame); it is taken to be the epoch's "
                "position, which is right only if each epoch starts a new pass",
                ExactnessWarning,
                stacklevel=3,
            )
            seen = int(self._extras.get("batch", 0)) if in_epoch else 0
        total = int(self._fit_iter.steps_per_epoch)
        left = total - int(self._extras.get("batch", 0)) if in_epoch else None
        self._pending_iter = (int(seen), int(self._extras.get("num_batches", -1)), left)

    def _apply_pending_iter(self) -> None:
        """Put Keras' epoch iterator where the saved run had it (see _resume_steps_mode); called
        at the resumed epoch's start, before fit draws its first batch."""
        pending, self._pending_iter = self._pending_iter, None
        it = self._fit_iter
        if pending is None or it is None:
            return
        seen, num_batches, left = pending
        if num_batches >= 0 and it._num_batches is None:
            it._num_batches = num_batches  # an unsized loader's pass length, learnt by Keras
        n = it._num_batches
        fixup: dict[str, Any] = {"num_batches": it._num_batches}
        if left is not None:
            # The resumed epoch trains the S - b batches it has left (Keras cannot be told 0:
            # it means "not given"; then one turn meets an empty iterator, see below)
            fixup["steps_per_epoch"] = it.steps_per_epoch
            it.steps_per_epoch = max(left, 1)
        self._iter_fixup = fixup
        if seen < 0:
            return  # no iterator held: Keras builds one at this epoch's start, as the run would have
        # The restored loader's pass from its saved position ("drawing nothing": the pass was
        # drawn before the save). At a pass's end it yields nothing, and only the iter() after
        # it starts the next pass, as the uninterrupted run's next iter() did.
        held = iter(it._get_iterator())
        ended = bool(n) and seen >= n
        if ended and left is None:
            # the stopped fit's last batch ended the pass: Keras builds the next one at this
            # epoch's start, as the run would have at the last epoch's end
            return
        if left is not None and left <= 0:
            # saved after the epoch's last batch (a signal): nothing is left to train in it. An
            # empty iterator ends the epoch (its "ran out" warning is this resume's, not the
            # data's); on_epoch_end puts the held pass back. At a pass's end Keras' loop stops at
            # its first check and builds the next pass itself.
            self._ignore_ran_out()
            if not ended:
                it._current_iterator = iter(())
                fixup["held"] = (held, seen)
                it._steps_seen = seen
                return
        # Keras continues the held pass; at its end (the pass ended in this epoch) its loop
        # stops at the first check, as the uninterrupted run's did (with its "ran out of data"
        # warning), and builds the next pass
        it._current_iterator = held
        it._steps_seen = seen

    def _ignore_ran_out(self) -> None:
        warnings.filterwarnings("ignore", message=_RAN_OUT, category=UserWarning)
        self._filter = warnings.filters[0]

    def _undo_iter_fixup(self) -> None:
        fixup, self._iter_fixup = self._iter_fixup, None
        it = self._fit_iter
        if fixup is None or it is None:
            return
        if "steps_per_epoch" in fixup:
            it.steps_per_epoch = fixup["steps_per_epoch"]
        if "held" in fixup:
            it._current_iterator, it._steps_seen = fixup["held"]
            it._num_batches = fixup["num_batches"]

    def _refuse_unknown_iterator(self, step: int) -> None:
        """A Keras whose fit() this callback cannot read: exact as before with one pass per
        epoch, refused when steps_per_epoch differs from the loader's length (see
        _resume_steps_mode: the resumed epochs would draw other batches)."""
        steps = self.params.get("steps") if isinstance(self.params, Mapping) else None
        try:
            length = len(self.loader)
        except TypeError:
            length = None
        if isinstance(steps, int) and steps != length:
            raise UnsupportedSetupError(
                f"SavegameCheckpoint: cannot resume step {step} of {self.root} exactly: fit(steps_per_epoch={steps}) "
                f"over a loader of {length if length is not None else 'unknown'} batches, and this Keras "
                f"({keras.__version__}) does not expose fit's epoch iterator, whose position across epochs "
                "the resumed run needs. Use the Keras savegame was tested with (3.15), or fit without steps_per_epoch",
                path=self.root,
            )

    def _best_on_disk(self) -> float | None:
        """The best monitored value of the run's valid checkpoints (best-K survives restarts)."""
        monitor, ckpt = self.keep.monitor, self.checkpointer
        if not monitor or ckpt is None:
            return None
        best: float | None = None
        for info in ckpt.list():
            value = info.metrics.get(monitor) if info.valid else None
            if value is not None and policy.improved(float(value), best, self.keep.mode):
                best = float(value)
        return best

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        pending, self._pending_siblings = self._pending_siblings, None
        if isinstance(pending, Mapping):
            _load_siblings(self._siblings, pending)
        self._epoch = epoch
        if not self._short_epoch:
            self._extras["batch"] = 0
        self._extras.update(epoch=epoch, in_epoch=True)
        if self._keras_state is not None:
            self._keras_state.apply_metrics()
        self._apply_pending_iter()

    # ---- saving -------------------------------------------------------------------------------
    def _step(
        self,
        *,
        metrics: Mapping[str, float] | None = None,
        epoch_end: bool = False,
        final: bool = False,
    ) -> bool:
        ckpt = self.checkpointer
        if ckpt is None or self._state is None:
            return False
        step = _iterations(self.model)
        if step == self._last_step and self.async_save:
            # The same step again (an epoch's end after its last batch): let the save of that
            # step in flight commit first, so the checkpointer sees it is there (an async save
            # of a step still in flight would otherwise be written twice: StepExistsError).
            ckpt.wait()
        self._last_step = step
        it = self._fit_iter
        if it is not None:
            # Keras' position in the loader's pass (a new pass is built when it reaches the
            # pass's length): what a resume with steps_per_epoch needs (_resume_steps_mode)
            held = it._current_iterator is not None
            self._extras["seen"] = int(it._steps_seen) if held else -1
            self._extras["num_batches"] = (
                int(it._num_batches) if it._num_batches is not None else -1
            )
        if self._siblings:
            self._extras[_SIBLINGS_KEY] = _siblings_state(self._siblings)
        keras_state = self._keras_state
        if keras_state is not None:
            keras_state.saving = True
        try:
            if final:  # whatever the schedule says (on_train_end)
                ckpt.save(self._state, step, metrics=metrics)
                saved = True
            else:
                saved = ckpt.step(self._state, step, metrics=metrics, epoch_end=epoch_end)
        finally:
            if keras_state is not None:
                keras_state.saving = False
        if saved:
            self._saved_step = step
        return saved

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._extras["batch"] = int(self._extras.get("batch", 0)) + 1
        steps = self.params.get("steps") if isinstance(self.params, Mapping) else None
        if isinstance(steps, int) and self._extras["batch"] >= steps and not self._signal_pending():
            return  # the epoch's last batch: on_epoch_end saves it, with the validation metrics
        self._step()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._remove_filter()
        self._undo_iter_fixup()
        steps = self.params.get("steps") if isinstance(self.params, Mapping) else None
        # stop_training set mid-epoch ends the epoch early: it is still unfinished
        finished = not isinstance(steps, int) or int(self._extras.get("batch", 0)) >= steps
        if self._steps_mode and not finished:
            # with steps_per_epoch, an epoch also ends where the loader's pass does ("ran out
            # of data"): then Keras' loop over the epoch ran to its end; a stop_training breaks
            # out of it, leaving it suspended
            loop = getattr(self._fit_iter, "_epoch_iterator", None)
            finished = loop is not None and getattr(loop, "gi_frame", True) is None
        if self._short_epoch and self.loader is not None and finished and not self._steps_mode:
            # An epoch that yields all its batches ends with Keras building the next epoch's
            # iterator at once (and again when that epoch begins); the resumed epoch ends by
            # running out instead, which builds none. Building it here keeps the draws from the
            # global RNG (the loader's seed) and so the next epochs' order those of the
            # uninterrupted run.
            iter(self.loader)
        self._short_epoch = False
        if finished:
            self._extras.update(epoch=epoch + 1, in_epoch=False)
        metrics = {k: float(v) for k, v in (logs or {}).items() if _number(v)}
        ckpt = self.checkpointer
        monitor = self.keep.monitor
        before = self._best
        if monitor and not self._monitor_checked:
            self._monitor_checked = True
            if monitor not in metrics:
                warnings.warn(
                    f"SavegameCheckpoint: Keep(monitor={monitor!r}) is not in the logs of epoch {epoch + 1} "
                    f"(logged: {sorted(metrics) or 'nothing'}); best-K keeps nothing until it is. Fix the name "
                    "(validation metrics are 'val_' + the metric's name, and need validation_data=)",
                    MonitorWarning,
                    stacklevel=2,
                )
        saved = self._step(metrics=metrics, epoch_end=True)
        if (
            monitor
            and monitor in metrics
            and policy.improved(metrics[monitor], before, self.keep.mode)
        ):
            self._best = metrics[monitor]
        if not self.verbose or ckpt is None:
            return
        step = _iterations(self.model)
        where = f"{ckpt.root}/step-{step:012d}"
        if monitor and monitor in metrics:
            value = metrics[monitor]
            if before is None or policy.improved(value, before, self.keep.mode):
                prior = "inf" if before is None else f"{before:.5f}"
                if before is None and self.keep.mode == "max":
                    prior = "-inf"
                _print(
                    f"\nEpoch {epoch + 1}: {monitor} improved from {prior} to {value:.5f}, saving checkpoint to {where}"
                )
            else:
                _print(
                    f"\nEpoch {epoch + 1}: {monitor} did not improve from {before:.5f}"
                    + (f", saving checkpoint to {where} (schedule)" if saved else "")
                )
        elif saved:
            _print(f"\nEpoch {epoch + 1}: saving checkpoint to {where}")

    def _signal_pending(self) -> bool:
        """A preemption signal waits: save at this batch's end, not the epoch's."""
        signals = getattr(self.checkpointer, "_signals", None)
        return bool(getattr(signals, "pending", None))

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._remove_filter()
        self._undo_iter_fixup()
        self._pending_iter = None
        self.model._initial_epoch = None  # a later fit() starts where it is told
        try:
            self._final_save(logs)
        finally:
            self._fit_iter = None
            ckpt, self.checkpointer = self.checkpointer, None
            ref, _, _ = _open_fits.get(self._run_key, (None, None, None))
            if ref is not None and ref() is self:
                del _open_fits[self._run_key]
            if ckpt is not None:
                ckpt.close()

    def _final_save(self, logs: Mapping[str, Any] | None) -> None:
        """fit() returned normally (Keras calls no callback when it raises): save its last step
        unless it is saved already or nothing was trained (a finished run started again). The
        epoch and the position in it are those on_epoch_end left (a mid-epoch stop keeps
        ``in_epoch``), so a later fit() to more epochs continues exactly."""
        ckpt = self.checkpointer
        if not self.save_on_train_end or ckpt is None or self._state is None:
            return
        step = _iterations(self.model)
        if step == (self.restored_step or 0) or step == self._saved_step:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items() if _number(v)}
        self._step(metrics=metrics, final=True)
        if self.verbose:
            _print(f"\nEnd of training: saving checkpoint to {ckpt.root}/step-{step:012d}")

    def _remove_filter(self) -> None:
        f, self._filter = self._filter, None
        if f is not None and f in warnings.filters:
            warnings.filters.remove(f)
            mutated = getattr(warnings, "_filters_mutated", None)
            if callable(mutated):
                mutated()

    @property
    def path(self) -> Path | str | None:
        """The run folder (None before ``fit``)."""
        return self.checkpointer.root if self.checkpointer is not None else None


#: The fits of this process that opened a run folder and have not reached on_train_end: run
#: key -> (callback, thread, its Checkpointer). Keras callbacks have no exception hook, so a fit
#: that raised leaves its Checkpointer (and the folder's lock) open. The Checkpointer is held
#: here too: the callback of a fit that raised is often garbage by the next fit (nothing but
#: the exception's traceback referred to it), and its open Checkpointer must still be closed.
_open_fits: dict[str, tuple[weakref.ref[SavegameCheckpoint], int, Checkpointer | None]] = {}


def _run_key(root: Any) -> str:
    text = os.fspath(root)
    return text if urls.is_url(text) else os.path.realpath(text)


def _close_leftovers(cb: SavegameCheckpoint) -> None:
    """Close what an earlier fit() on the same run folder left open because it ended by an
    exception: this callback's own, or another callback's in the same thread (the notebook cell
    run again with a new callback). One thread runs one fit at a time, so such a fit is over; its
    async save in flight is committed by the close. A fit on another thread may still be running:
    it keeps its lock, and this one gets LockedError as usual."""
    cb._run_key = _run_key(cb.root)
    leftovers = [getattr(cb, "checkpointer", None)]
    ref, thread, held = _open_fits.get(cb._run_key, (None, None, None))
    if ref is not None and ref() is not cb and thread == threading.get_ident():
        leftovers.append(held)  # held here: that callback may be garbage by now
        other = ref()
        if other is not None:
            other.checkpointer = None
    for ckpt in leftovers:
        if ckpt is not None:
            with contextlib.suppress(Exception):
                ckpt.close()
    cb.checkpointer = None


def _epoch_iterator(model: keras.Model) -> Any:
    """The EpochIterator of the ``model.fit`` that is calling this callback, or None.

    fit() hands callbacks no handle on it, and with ``steps_per_epoch`` it is the state a resume
    must put back (where in the loader's pass Keras is, and the iterator it holds across
    epochs). It is the local ``epoch_iterator`` of fit (checked on Keras 3.15, torch backend), found
    by walking up the calling frames; a Keras that names or builds it otherwise gives None,
    and a resume that needs it is refused (``_refuse_unknown_iterator``)."""
    try:
        from keras.src.trainers.epoch_iterator import EpochIterator
    except ImportError:  # pragma: no cover - a Keras without the module
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            found = frame.f_locals.get("epoch_iterator")
            needed = (
                "steps_per_epoch",
                "_current_iterator",
                "_steps_seen",
                "_num_batches",
                "_get_iterator",
            )
            if isinstance(found, EpochIterator) and all(hasattr(found, a) for a in needed):
                return found
            return None
        frame = frame.f_back
    return None


#: Where the other Keras callbacks' state is kept (in the "progress" dict of the checkpoint, so
#: a checkpoint written before it existed still restores).
_SIBLINGS_KEY = "callbacks"
#: The state of Keras' own callbacks that decides what they do next (their documented
#: attributes; ``on_train_begin`` resets them, so a resumed fit would start them afresh).
_SIBLING_ATTRS = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch", "best_weights"),
    "ReduceLROnPlateau": ("wait", "cooldown_counter", "best"),
}


def _stateful_siblings(model: keras.Model, me: Any) -> dict[str, Any]:
    """The ``EarlyStopping`` / ``ReduceLROnPlateau`` callbacks of the ``fit`` calling ``me``,
    by ``"<class>/<n>"`` (their order among their kind). Found like :func:`_epoch_iterator`
    (fit's ``callbacks`` local; Keras hands a callback no handle on the others): none found,
    nothing of theirs is saved, as with ``BackupAndRestore``. One placed after this callback
    runs its ``on_epoch_end`` after the epoch's checkpoint: warned, as that checkpoint misses
    its update."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            listed = getattr(frame.f_locals.get("callbacks"), "callbacks", None)
            break
        frame = frame.f_back
    else:
        return {}
    if not isinstance(listed, list) or me not in listed:
        return {}
    found: dict[str, Any] = {}
    late: list[str] = []
    for i, cb in enumerate(listed):
        kind = next(
            (k for k in _SIBLING_ATTRS if isinstance(cb, getattr(keras.callbacks, k))), None
        )
        if kind is None:
            continue
        key = f"{kind}/{sum(1 for k in found if k.startswith(kind + '/'))}"
        found[key] = cb
        if i > listed.index(me):
            late.append(kind)
    if late:
        warnings.warn(
            f"SavegameCheckpoint: {', '.join(late)} comes after it in fit's callbacks: an epoch's "
            "checkpoint is taken before that callback's on_epoch_end, so a fit resumed from it misses "
            "that epoch's update. Put SavegameCheckpoint after them in the list.",
            ExactnessWarning,
            stacklevel=3,
        )
    return found


def _siblings_state(siblings: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, cb in siblings.items():
        state: dict[str, Any] = {}
        for attr in _SIBLING_ATTRS[key.split("/")[0]]:
            value = getattr(cb, attr, None)
            if attr == "best_weights":
                state[attr] = None if value is None else [np.asarray(w) for w in value]
            elif value is None or isinstance(value, int):
                state[attr] = value
            else:
                state[attr] = float(value)
        out[key] = state
    return out


def _load_siblings(siblings: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    for key, state in saved.items():
        cb = siblings.get(key)
        if cb is None or not isinstance(state, Mapping):
            continue  # a callback the resumed fit does not have: nothing to give it
        for attr, value in state.items():
            if attr in _SIBLING_ATTRS[key.split("/")[0]]:
                setattr(cb, attr, list(value) if isinstance(value, list | tuple) else value)


def _check_one_device(root: Any) -> None:
    """Refuse, before anything is trained or written, the multi-device setups Keras' torch
    backend does not run and this callback could not resume exactly.

    Keras 3's distribution API (``keras.distribution``) has a backend only for JAX: on torch
    (3.5-3.15) ``keras.src.backend.distribution_lib`` is None, ``list_devices()`` raises
    ``AttributeError``, and ``set_distribution(DataParallel(...))`` is accepted but ignored —
    ``fit`` trains on one device (tested with 3.15.1). Several processes (``torchrun``) each
    run their own ``fit`` with no gradient exchange: independent models, not data parallelism,
    whose checkpoints one run folder cannot hold as one run."""
    try:
        from keras import distribution as keras_distribution

        active = keras_distribution.distribution()
    except (ImportError, AttributeError):  # pragma: no cover - a Keras without the API
        active = None
    if active is not None:
        raise UnsupportedSetupError(
            f"SavegameCheckpoint: keras.distribution.set_distribution({type(active).__name__}(...)) is set, but "
            "Keras' torch backend has no distribution support: it ignores it and fit() trains on one device. "
            "Remove the set_distribution call (one device is what runs), or, for several devices, train the "
            "model as a torch module under DistributedDataParallel with savegame.Checkpointer "
            "(docs/distributed.md)",
            path=root,
        )
    world = _world_size()
    if world > 1:
        raise UnsupportedSetupError(
            f"SavegameCheckpoint runs in one process; this is one of {world} (torchrun/WORLD_SIZE): Keras' torch "
            "backend does not exchange gradients between processes, so each would train and save its own model. "
            "Run fit() in one process, or train the model as a torch module under DistributedDataParallel with "
            "savegame.Checkpointer (docs/distributed.md)",
            path=root,
        )


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _print(message: str) -> None:
    """Print as Keras' own callbacks do (stdout, or absl logging when interactive logging is off)."""
    try:
        from keras.src.utils import io_utils
    except ImportError:  # pragma: no cover - a Keras without it
        print(message)
    else:
        io_utils.print_msg(message)


def _iterations(model: keras.Model) -> int:
    """The optimizer steps taken (``optimizer.iterations``, saved with the optimizer)."""
    return int(_tensor(model.optimizer.iterations).item())


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
