"""Lightning (``lightning`` 2.4 - 2.6): savegame as a ``Trainer`` callback.

::

    from savegame.integrations.lightning import SavegameCallback
    trainer = Trainer(max_epochs=5, callbacks=[SavegameCallback("runs/exp1", save=Every(steps=200))])
    trainer.fit(model, train_dataloaders=StatefulDataLoader(...))   # resumes by itself

What is saved, in one savegame commit (no pickle): Lightning's own checkpoint dictionary as
``trainer.save_checkpoint`` would build it (weights, optimizers, LR schedulers, precision plugin
state, **loop progress**, callback and datamodule states), plus every RNG of the process and the
train loaders' positions through savegame's loader layer (the batch-size translation, the
sampler epoch and the loader's own ``generator=``).

How resume is triggered, and why: the callback restores **by itself**, with no ``ckpt_path``.
In its ``setup("fit")`` hook (which Lightning calls before it restores anything) it reads and
verifies the newest valid checkpoint of the run folder (a damaged or half-written one is skipped
with a ``CorruptCheckpointWarning``) and hands the dictionary to Lightning's checkpoint connector,
which then restores model, optimizers, schedulers, loops and callbacks through the path
``fit(ckpt_path=...)`` uses. A ``ckpt_path`` cannot do this: Lightning resolves it before any
callback runs, so it would need a second object (a helper that lists the run) and a second line
in every script, and it would re-read the file through ``torch.load``. The RNGs and the loader
positions are applied at ``on_train_start``: that is after Lightning built the train loader's
iterator (which draws a seed from the global RNG), so nothing Lightning does at start-up moves
the generators away from the saved ones. Pass ``resume=False`` to start fresh in a folder that
holds checkpoints (a different run folder is the better way), or an explicit
``fit(ckpt_path=...)`` — which then wins, and the callback restores nothing.

Saves happen only at optimizer-step boundaries (after ``on_train_batch_end`` of the batch that
stepped, or at ``on_validation_end`` when a validation follows that batch, so the validation
metrics reach ``Keep(best=..., monitor=...)``), and at ``on_train_epoch_end`` for
``Every(epochs=N)``. These are the points Lightning's own ``ModelCheckpoint`` saves at, so the
loop state is one Lightning knows how to restart from. The end of a normal ``fit`` is saved too
(``save_on_train_end``), with the loop state of its last such point: a finished run requeued
restores it and trains nothing (``trainer.should_stop`` is saved too: a run EarlyStopping ended
stays ended). A state saved at an epoch's last batch restarts before that epoch's end, whose
hooks Lightning then runs again: ``trainer.callback_metrics`` are saved and put back for them,
and the callbacks' states are those from before that epoch end (see
``_restart_after_the_last_batch``).

Preemption: SIGTERM / SIGUSR1 / SIGINT are handled as everywhere in savegame: noted, then saved
at the next step boundary, and the process exits with status 75 (``EXIT_PREEMPTED``) - never a
save in the middle of a step. In one process Lightning's own SIGTERM notifier still runs (it
composes handlers). Under DDP a signal received by any one rank is acted on by every rank at the
same step boundary (the Checkpointer's per-step decision is an all-reduce), and SIGTERM is left to savegame's handler alone
(Lightning's notifier runs a collective inside the signal handler).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from savegame import errors, policy, tree
from savegame.checkpointer import Checkpointer
from savegame.checkpointer.signals import PREEMPTION_SIGNALS
from savegame.integrations._common import ExactnessWarning, version_tuple
from savegame.state import TrainState, learning_rates, set_learning_rates
from savegame.state import loader as loaderlib
from savegame.state import rng as rnglib

__all__ = ["SUPPORTED", "ExactnessWarning", "SavegameCallback", "check_version"]

log = logging.getLogger("savegame")

#: The Lightning versions this integration is built and tested for (it uses the checkpoint
#: connector and the fit loop's data fetcher, which are not public API).
SUPPORTED = ((2, 4), (2, 7))  # >= 2.4, < 2.7
_RANGE = "lightning>=2.4,<2.7"


def check_version(version: str | None = None) -> str:
    """Import Lightning and check its version; return it.

    Raises:
        MissingDependencyError: Lightning is not installed, or its version is outside
            ``>=2.4,<2.7`` (the message names the range and the pip command).
    """
    if version is None:
        try:
            import lightning
        except ImportError as exc:
            raise errors.MissingDependencyError(
                f"savegame.integrations.lightning needs Lightning ({_RANGE}): pip install 'savegame[lightning]'"
            ) from exc
        version = str(lightning.__version__)
    low, high = SUPPORTED
    if not (low <= version_tuple(version)[:2] < high):
        raise errors.MissingDependencyError(
            f"savegame.integrations.lightning supports {_RANGE}; found lightning {version}. "
            f"Install a supported version: pip install '{_RANGE}'"
        )
    return version


check_version()

import lightning.pytorch as pl  # noqa: E402  (after the version check, which names the fix)
import torch  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping  # noqa: E402
from lightning.pytorch.loops.loop import _Loop  # noqa: E402
from lightning.pytorch.loops.progress import _BaseProgress  # noqa: E402
from lightning.pytorch.trainer import call  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

#: Keys of Lightning's checkpoint that only describe how the module was built; they may hold
#: arbitrary objects (an ``argparse.Namespace``, a class) that cannot be saved without pickle.
_HPARAMS = (
    "hyper_parameters",
    "datamodule_hyper_parameters",
    "hparams_name",
    "datamodule_hparams_name",
)


class _Sink:
    """The one object of the callback's TrainState: captures Lightning's checkpoint dict, the
    RNGs and the loader positions at save time; receives them (verified) at restore time."""

    def __init__(self, callback: SavegameCallback) -> None:
        self._cb = callback
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Only a save captures: restore also asks (to read tensors straight into live ones),
        # before Lightning has built what dump_checkpoint needs.
        return self._cb._capture() if self._cb._capturing else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded = dict(state)


def _plain(obj: Any) -> Any:
    """Dict subclasses (``AttributeDict``, ``OrderedDict`` of a module) as dicts, recursively."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


class SavegameCallback(pl.Callback):
    """Save a Lightning run with savegame, and resume it exactly.

    Args:
        root: The run folder or object-store URL (one writer at a time; see
            :class:`savegame.Checkpointer`).
        save: When to save (``Every(steps=/epochs=/seconds=/samples=)``, default every 30 min).
            Steps are Lightning's ``global_step`` (optimizer steps).
        keep: What to keep (``Keep(last=, best=, monitor=, mode=, every=)``); ``monitor`` names a
            metric you ``self.log(...)`` (e.g. ``"val_loss"``).
        async_save: Persist in the background (default True; training pauses only for the copy
            to host). A preemption signal's save, ``on_train_end`` and teardown still wait for
            the commit, and a failed background save is raised on the training thread at the
            next step. ``False``: every save blocks until committed (no host copy of the state).
        when_busy: With ``async_save``: ``"wait"`` or ``"skip"`` while a save persists.
        handle_signals: Save at the next step boundary on SIGTERM/SIGUSR1/SIGINT, then exit 75.
        resume: Restore the newest valid checkpoint of ``root`` at the start of ``fit``.
        save_on_train_end: Save the last step when ``fit`` ends normally (default True), unless
            it is saved already or this ``fit`` trained nothing (Lightning's
            ``ModelCheckpoint(save_last=True)``): a finished run requeued restores its end and
            trains nothing, instead of retraining the steps after the last scheduled save. Not
            on an exception (a preemption signal saves on its own), nor after a mid-epoch stop
            that a hook running after this callback's decided (``max_time``'s timer).

        cache: A local folder (fast disk) for a remote ``root`` (an object-store URL): saves
            commit there and upload in the background, a restore takes the newest valid
            checkpoint of both (docs/tiers.md; passed to :class:`savegame.Checkpointer` as is).

    Raises (at ``fit``):
        LockedError: another live process writes ``root``.
        RestoreError: a valid checkpoint does not fit this model/optimizer.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save: policy.Every | None = None,
        keep: policy.Keep | None = None,
        async_save: bool = True,
        when_busy: Literal["wait", "skip"] = "wait",
        handle_signals: bool = True,
        resume: bool = True,
        save_on_train_end: bool = True,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy={when_busy!r}: use 'wait' or 'skip'")
        self.root = root
        self.save_policy = save
        self.keep = keep
        self.async_save = async_save
        self.when_busy = when_busy
        self.handle_signals = handle_signals
        self.resume = resume
        self.save_on_train_end = save_on_train_end
        self.cache = cache
        self.checkpointer: Checkpointer | None = None
        #: The step restored at the last ``fit`` (None: started fresh).
        self.restored_step: int | None = None
        self._trainer: pl.Trainer | None = None
        self._sink = _Sink(self)
        self._state = TrainState(lightning=self._sink, rng=False)
        self._pending: dict[str, Any] | None = None  # RNG + loaders to apply at on_train_start
        self._loaders: list[Any] = []
        self._last_step = -1
        self._saved_step: int | None = None  # the newest step saved (or restored) in this fit
        #: (step, the fit loop's progress) at the last batch or validation end: the loop state
        #: of saves at an epoch's end and at the end of fit (see _step)
        self._boundary: tuple[int, dict[str, Any], dict[str, Any] | None] | None = None
        #: what _capture saves as the fit loop's progress and the callbacks' states (see _step)
        self._loops: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._monitor_seen = False
        self._hparams_note = False
        self._capturing = False
        self._plateau_due = False  # see _step
        self._handlers_before: dict[int, Any] = {}
        self._savegame_handlers: dict[int, Any] = {}
        self._prev_metrics: dict[str, Any] = {}
        #: the step whose epoch end the Checkpointer counted (Every(epochs=))
        self._counted_epoch_end: int | None = None

    # ---- setup: open the run, restore -------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        _after_early_stopping(trainer, self)
        self._last_step = -1
        self._saved_step = None
        self._boundary = None
        self._monitor_seen = False
        self._prev_metrics = {}
        self._counted_epoch_end = None
        if self.checkpointer is None:
            self._handlers_before = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}
            self.checkpointer = Checkpointer(
                self.root,
                save=self.save_policy,
                keep=self.keep,
                handle_signals=self.handle_signals,
                async_save=self.async_save,
                when_busy=self.when_busy,
                cache=self.cache,
            )
            # savegame's own handlers, as just installed (put back alone under DDP, see
            # _own_signals)
            self._savegame_handlers = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}
        self.restored_step = None
        connector = trainer._checkpoint_connector
        explicit = _explicit_ckpt_path(trainer)
        if explicit is not None:
            # fit(ckpt_path=...) wins: restore nothing. But savegame never overwrites a committed
            # checkpoint, and the run from that .ckpt would save the steps this folder already
            # holds (a second trajectory mixed into one run): refuse before training.
            newest = max((c.step for c in self.checkpointer.list() if c.valid), default=None)
            if newest is not None:
                raise ValueError(
                    f"fit(ckpt_path={explicit!r}) with a SavegameCallback whose run folder "
                    f"{self.checkpointer.root} already holds checkpoints (up to step {newest}): "
                    "the run from that .ckpt would have to overwrite them. Use a new run folder for "
                    "it, or drop ckpt_path to resume from savegame's newest valid checkpoint"
                )
            return
        if not self.resume:
            return
        self._sink.loaded = None
        step = self.checkpointer.restore(self._state)
        loaded = self._sink.loaded
        if loaded is None:
            return
        self._sink.loaded = None
        checkpoint = dict(loaded["lightning"])
        _restart_after_the_last_batch(checkpoint)
        self._pending = {
            "rng": loaded.get("rng"),
            "loaders": list(loaded.get("loaders", [])),
            "metrics": loaded.get("metrics"),
            "should_stop": loaded.get("should_stop"),
        }
        # Lightning restores model, callbacks, optimizers, schedulers and loops from this dict
        # through the same calls fit(ckpt_path=...) makes (resume_start with no path keeps it).
        connector._loaded_checkpoint = checkpoint
        self.restored_step = step
        self._last_step = step
        self._saved_step = step
        if loaded.get("epoch_end_counted") is True:
            self._counted_epoch_end = step
        log.info("lightning: resuming from step %d of %s", step, self.checkpointer.root)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _distributed(trainer) and self.handle_signals:
            self._own_signals()
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        fetcher = fit_loop._data_fetcher
        self._loaders = list(combined.flattened) if combined is not None else []
        for i, dl in enumerate(self._loaders):
            if not _stateful(dl):
                warnings.warn(
                    f"SavegameCallback: train loader {i} is a {type(dl).__module__}.{type(dl).__qualname__}, which "
                    "cannot save its position: a resume mid-epoch restarts the epoch's data from its start (batches "
                    "trained twice, a different order). Use torchdata.stateful_dataloader.StatefulDataLoader (same "
                    "arguments as DataLoader), and savegame.data.resumable(dataset) for random augmentation.",
                    ExactnessWarning,
                    stacklevel=2,
                )
            elif _distributed(trainer) and _redrawn_each_epoch(dl):
                warnings.warn(
                    f"SavegameCallback: under DDP Lightning replaced train loader {i}'s shuffling sampler by a "
                    "DistributedSamplerWrapper, which draws a new permutation from the global RNG at every epoch's "
                    "start: a resume mid-epoch continues on another permutation (samples repeated and skipped). Give "
                    "the loader its DistributedSampler yourself: StatefulDataLoader(ds, sampler=DistributedSampler("
                    "ds, shuffle=True, seed=0), ...) and Trainer(use_distributed_sampler=False).",
                    ExactnessWarning,
                    stacklevel=2,
                )
            elif not _has_len(dl):
                warnings.warn(
                    f"SavegameCallback: train loader {i} has no length (an IterableDataset): Lightning reads "
                    "one batch ahead of such a loader to find its last batch, so a checkpoint taken mid-epoch "
                    "holds the loader one batch past the step, and the resumed fit skips that batch. Epoch-end "
                    "checkpoints (Every(epochs=N)) resume exactly; or give the dataset a __len__.",
                    ExactnessWarning,
                    stacklevel=2,
                )
        pending, self._pending = self._pending, None
        if pending is not None:
            self._restore_trainer_state(trainer, pending)
        if fetcher is None or combined is None:
            if pending and pending.get("rng") is not None:
                rnglib.restore(pending["rng"])
            return
        if pending is None and not any(getattr(dl, "num_workers", 0) for dl in self._loaders):
            # A fresh run without worker processes: the iterator Lightning built has nothing to
            # guard, and building it again would draw a second shuffle seed from the global RNG
            # (the run would take another course than the same script without this callback).
            for dl in self._loaders:
                loaderlib.guard(dl, what="SavegameCallback")
            return
        # Stop the iterator Lightning built (its workers started without savegame's signal guard),
        # guard the loaders, put the saved positions in, and build it again: a restored loader's
        # build draws nothing from the RNGs (savegame.state.loader).
        fetcher.teardown()
        for dl in self._loaders:
            loaderlib.guard(dl, what="SavegameCallback")
        if pending is not None:
            saved = pending["loaders"]
            stateful = [dl for dl in self._loaders if _stateful(dl)]
            if len(saved) != len(stateful):
                raise errors.RestoreError(
                    f"the checkpoint holds {len(saved)} train loader position(s), this fit has {len(stateful)} "
                    "stateful train loader(s): pass the loaders it was saved with",
                    path=str(self.checkpointer.root if self.checkpointer else self.root),
                )
            for i, (dl, sd) in enumerate(zip(stateful, saved, strict=True)):
                loaderlib.load(dl, sd, name=f"train_loader{i}", where="lightning checkpoint")
            if pending.get("rng") is not None:
                rnglib.restore(pending["rng"])
        iter(fetcher)  # the epoch loop's on_run_start then counts the batches already done

    def _restore_trainer_state(self, trainer: pl.Trainer, pending: Mapping[str, Any]) -> None:
        """What Lightning's checkpoint does not hold: the metrics the hooks read and the stop.

        ``trainer.callback_metrics`` as saved: a save at an epoch's last batch restarts before
        the epoch's end (see _restart_after_the_last_batch), and Lightning then runs the
        epoch-end hooks again, which read them (EarlyStopping's default check raised "conditioned
        on metric `val_loss` which is not available", a ``ModelCheckpoint(monitor=)`` skipped
        its save). They are not counted as newly logged (_metrics).
        ``trainer.should_stop`` as saved: a fit that EarlyStopping (or anything setting
        ``should_stop``) ended is ended when requeued, as the uninterrupted run is; with
        ``min_epochs``/``min_steps`` not met Lightning trains on, as it did then."""
        metrics = pending.get("metrics")
        if isinstance(metrics, Mapping):
            current = trainer._logger_connector._callback_metrics
            for name, value in metrics.items():
                if isinstance(name, str) and name not in current:
                    current[name] = value
            self._prev_metrics = dict(trainer.callback_metrics)
        if pending.get("should_stop") is True:
            trainer.should_stop = True

    def _own_signals(self) -> None:
        """Under DDP, SIGTERM goes to savegame's handler alone. Lightning's own SIGTERM notifier
        (composed with it by ``register_signal_handlers``, which runs after ``setup``) calls
        ``torch.distributed.broadcast`` inside the signal handler: on a rank other than 0 that
        is a collective the other ranks never join, which desynchronises the process group (the
        next gradient all-reduce hangs or pairs with the wrong call), and Lightning acts on rank
        0's flag only. savegame's handler only notes the signal; the Checkpointer's per-step
        decision (an all-reduce) makes every rank act on it at the next step boundary."""
        for signum, handler in self._savegame_handlers.items():
            if callable(handler) and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)

    # ---- saving ------------------------------------------------------------------------------
    def _capture(self) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None
        if self._plateau_due:  # only when a save is made: the step is taken, then undone
            with _as_after_plateau_step(trainer):
                return self._capture_now(trainer)
        return self._capture_now(trainer)

    def _capture_now(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        loops = checkpoint.get("loops", {})
        fit = loops.get("fit_loop", {}) if isinstance(loops, Mapping) else {}
        if isinstance(fit, Mapping) and isinstance(fit.get("state_dict"), dict):
            # the loaders' positions go through savegame's loader layer (below) instead
            fit["state_dict"].pop("combined_loader", None)
        if self._loops is not None and isinstance(fit, dict):  # see _step
            progress, callbacks = self._loops
            fit.update(progress)
            if callbacks is not None:
                checkpoint["callbacks"] = callbacks
        for key in _HPARAMS:
            if key in checkpoint:
                try:
                    tree.encode(_plain(checkpoint[key]))
                except errors.EncodeError as exc:
                    if not self._hparams_note:
                        log.info(
                            "lightning: %s not saved (not needed to resume: your code builds the module): %s",
                            key,
                            exc,
                        )
                        self._hparams_note = True
                    del checkpoint[key]
        loaders = [loaderlib.state_dict(dl) for dl in self._loaders if _stateful(dl)]
        return {
            "lightning": _plain(checkpoint),
            "rng": rnglib.capture(),
            "loaders": loaders,
            "metrics": _callback_metrics(trainer),
            "should_stop": bool(trainer.should_stop),
            # the Checkpointer counted this step's epoch end (see on_train_epoch_end)
            "epoch_end_counted": self._counted_epoch_end == int(trainer.global_step),
        }

    def _metrics(self, trainer: pl.Trainer, *, fresh: bool = True) -> dict[str, float]:
        """The numbers logged since the last call (``fresh``) or all of them. Lightning keeps a
        validation metric in ``callback_metrics`` until the next validation: passing it again
        with every later step would rank those steps by a stale value."""
        out: dict[str, float] = {}
        current = dict(trainer.callback_metrics)
        for name, value in current.items():
            if fresh and self._prev_metrics.get(name) is value:
                continue
            try:
                number = float(value.item() if isinstance(value, torch.Tensor) else value)
            except (TypeError, ValueError, RuntimeError):
                continue
            if math.isfinite(number):
                out[str(name)] = number
        if fresh:
            self._prev_metrics = current
        return out

    def _step(
        self,
        trainer: pl.Trainer,
        *,
        epoch_end: bool = False,
        force: bool = False,
        final: bool = False,
        plateau_due: bool = False,
    ) -> None:
        """Offer this step to the schedule. ``plateau_due``: called from the step's batch end
        or validation end, before Lightning steps the ``interval="step"`` plateau schedulers
        (a save then holds that step: :func:`_as_after_plateau_step`, in :meth:`_capture`)."""
        ckpt = self.checkpointer
        if ckpt is None or trainer.sanity_checking:
            return
        step = int(trainer.global_step)
        if step == self._last_step and not (epoch_end or force or final):
            return
        again, self._last_step = step == self._last_step, step
        loops = None
        if not again:  # the step's batch end, or its validation's end when one follows it
            # (~0.1-0.2 ms, so only where an epoch's end or fit's end can follow)
            self._boundary = (
                (step, _loop_progress(trainer), _callback_states(trainer))
                if _may_end(trainer)
                else None
            )
        elif self._boundary is not None and self._boundary[0] == step:
            # The same step again, at on_train_epoch_end, on_train_end or on_exception: by then
            # Lightning has counted the epoch as processed (or completed), and restored from
            # such a state its loop runs the next epoch with no batches (the resume trains one
            # epoch less, tested) or, when max_steps stopped fit mid-epoch, starts a new epoch
            # where the uninterrupted run continues this one. Save the loop state of the step's
            # batch (or validation) end, the point Lightning restarts from ("saved
            # on_train_batch_end and epoch is at end"), and the callbacks' states of that point:
            # restarted there, Lightning runs the epoch-end hooks again, and EarlyStopping's
            # check (or a ModelCheckpoint's) made since would count twice. The rest of the
            # state is that of now.
            loops = self._boundary[1:]
        metrics = self._metrics(trainer)
        monitor = ckpt.keep.monitor
        if monitor and monitor in metrics:
            self._monitor_seen = True
        if again and self.async_save:
            # The same step again (an epoch's end after its last batch): let the save of that
            # step in flight commit first, so the checkpointer sees it is there (an async save
            # of a step still in flight would otherwise be written twice: StepExistsError).
            ckpt.wait()
        self._capturing, self._loops = True, loops
        self._plateau_due = plateau_due
        try:
            if final:
                # Every rank is here at the same step (the loop ended on all of them): the same
                # collective save a due step makes, only not asked of the schedule.
                ckpt.save(self._state, step, metrics=metrics)
                saved = True
            else:
                if epoch_end:  # the save below, if any, holds the epoch counted (see _capture)
                    self._counted_epoch_end = step
                saved = ckpt.step(self._state, step, metrics=metrics, epoch_end=epoch_end)
        finally:
            self._capturing, self._loops, self._plateau_due = False, None, False
        if saved:  # the same answer on every rank (the save decision is all-reduced)
            self._saved_step = step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if int(trainer.global_step) == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        loop = trainer.fit_loop.epoch_loop
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None and loop._should_check_val_fx(fetcher):
            return  # validation follows this batch: save at on_validation_end, with its metrics
        self._step(trainer, plateau_due=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.training and trainer.state.fn != "fit":
            return
        self._step(trainer, force=int(trainer.global_step) != self._last_step, plateau_due=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counted_epoch_end == int(trainer.global_step) and self.restored_step is not None:
            # Restored from a save made at (or after) this very epoch end, whose checkpoint
            # counted it (Every(epochs=)): Lightning restarts before the epoch end and runs the
            # hooks again; counting it twice would move every later epoch save by one.
            self._counted_epoch_end = None
            return
        if self.save_on_train_end and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # max_steps (or should_stop) ended fit in the middle of the epoch: Lightning still
            # runs the epoch-end hooks and counts the epoch as done, but no epoch ended here.
            # on_train_end saves this step with the loop state of its batch's end, the one a
            # run to a larger limit continues from.
            return
        self._step(trainer, epoch_end=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        monitor = ckpt.keep.monitor
        step = int(trainer.global_step)
        trained = step != (self.restored_step or 0)  # a finished run requeued: nothing
        if self.save_on_train_end and trained and step != self._saved_step:
            # fit ended normally (an exception or a signal goes to on_exception instead) between
            # two scheduled saves: save its end, so that a requeued job restores it and trains
            # nothing (Lightning's loop sees max_steps/max_epochs reached) instead of training
            # the steps after the last scheduled save again.
            # Its loop state is the one of the last batch's (or validation's) end (_step): when
            # max_steps (or should_stop) ends fit mid-epoch, Lightning still runs the epoch-end
            # hooks and counts the epoch as completed, and a resume with a larger limit would
            # start a new epoch where the uninterrupted run continues this one.
            boundary = self._boundary
            if boundary is not None and boundary[0] == step:
                self._step(trainer, final=True)
            else:
                # should_stop was set mid-epoch after this callback's hook had run (by
                # Trainer(max_time=)'s timer, or a callback later in the list), so that loop
                # state was not kept: saving now would make the epoch look complete. No final
                # save then; a requeued job resumes from the last scheduled one, exactly.
                log.info(
                    "lightning: step %d not saved at the end of fit (stopped mid-epoch by "
                    "should_stop after SavegameCallback's hook); the newest checkpoint is step %s",
                    step,
                    self._saved_step,
                )
        if monitor and ckpt.keep.best > 0 and not self._monitor_seen and trained:
            warnings.warn(
                f"SavegameCallback: Keep(monitor={monitor!r}) was never logged during this fit (logged: "
                f"{sorted(self._metrics(trainer, fresh=False)) or 'nothing'}); best-K kept nothing. Log it with "
                f"self.log({monitor!r}, ...) or fix the name.",
                ExactnessWarning,
                stacklevel=2,
            )
        ckpt.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.checkpointer is None:
            return
        ckpt, self.checkpointer = self.checkpointer, None
        ckpt.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        try:
            if isinstance(exception, SIGTERMException):
                # Lightning's own SIGTERM notifier stops the loop at the end of the step in which
                # the signal arrived (after this callback's on_train_batch_end): a step boundary,
                # the point Lightning's OnExceptionCheckpoint saves at. Save there and exit 75,
                # savegame's rule, instead of Lightning's exit status 0.
                try:
                    self._step(trainer, force=True)
                except SystemExit as exc:  # saved on the pending signal; the checkpointer closed
                    exception.code = exc.code
                    return
            if not isinstance(exception, SystemExit) or isinstance(exception, SIGTERMException):
                try:
                    ckpt.close()
                except errors.CheckpointError as exc:  # the in-flight save failed too: say so
                    log.error(
                        "lightning: closing the checkpointer after %r failed: %s", exception, exc
                    )
        finally:
            self.checkpointer = None
            self._forget_handlers(trainer)

    def _forget_handlers(self, trainer: pl.Trainer) -> None:
        """Lightning's teardown puts back the signal handlers it found when it registered its own
        (after this callback's checkpointer installed savegame's): make it put back the ones from
        before, now that the checkpointer is closed."""
        original = getattr(trainer._signal_connector, "_original_handlers", None)
        if isinstance(original, dict):
            for signum, handler in self._handlers_before.items():
                if signum in original:
                    original[signum] = handler

    def state_dict(self) -> dict[str, Any]:
        return {}


def _may_end(trainer: pl.Trainer) -> bool:
    """Whether the epoch or fit can end after this step: its last batch, max_steps reached, or
    ``should_stop`` set (by a callback that ran before this one; when one that runs later sets
    it, on_train_end finds no loop state of the step and does not save)."""
    fit_loop = trainer.fit_loop
    return bool(
        fit_loop.epoch_loop.batch_progress.is_last_batch
        or trainer.should_stop
        or (fit_loop.max_steps != -1 and trainer.global_step >= fit_loop.max_steps)
    )


def _after_early_stopping(trainer: pl.Trainer, callback: SavegameCallback) -> None:
    """Move ``callback`` after the ``EarlyStopping`` callbacks listed after it.

    A save at a validation's end (on_validation_end) must hold what EarlyStopping made of that
    validation when it checks there (``check_on_train_epoch_end=False``, or validation
    mid-epoch): its counters and the ``should_stop`` it set. Restarted from that point,
    Lightning does not run the validation again, so a check made after the save was lost: the
    resumed run stopped later than the uninterrupted one, and a requeued run EarlyStopping had
    ended trained on (tested). A new list: Lightning is iterating the old one (this is called
    from the ``setup`` hook)."""
    callbacks = list(trainer.callbacks)
    mine = next((i for i, c in enumerate(callbacks) if c is callback), None)
    if mine is None:
        return
    later = [i for i, c in enumerate(callbacks) if i > mine and isinstance(c, EarlyStopping)]
    if not later:
        return
    del callbacks[mine]
    callbacks.insert(later[-1], callback)  # right after the last one (its index moved down)
    trainer.callbacks = callbacks


def _restart_after_the_last_batch(checkpoint: dict[str, Any]) -> None:
    """Make a loop state saved in ``on_train_batch_end`` of an epoch's last batch (no validation
    after it) restart where it was saved: before the epoch's end.

    Lightning restarts such a state (its "saved on_train_batch_end and epoch is at end") on the
    *next* epoch, with the train loader where the save left it: at the end of its data, which
    it has not noticed yet (Lightning knows the length and does not ask it for more), so that
    epoch gets no batches and the run trains one epoch less (tested). It would also skip the
    epoch-end hooks of the finished epoch (EarlyStopping's check, ``ModelCheckpoint``) and the
    epoch-start hooks of the next, and build the next epoch's loader iterator at another point
    than the uninterrupted run (its draw from the global RNG moves).
    The same counters with the batch counted as completed (as Lightning has them right after
    ``on_train_batch_end``) are a state it restarts "on last": it ends the epoch with no batch,
    runs the epoch-end hooks, then starts the next epoch as the uninterrupted run did. The
    batch's ``_batches_that_stepped`` increment, which Lightning adds only on the path it no
    longer takes, is added here. Done at restore, so checkpoints saved before the fix resume
    right too."""
    loops = checkpoint.get("loops")
    fit = loops.get("fit_loop") if isinstance(loops, Mapping) else None
    if not isinstance(fit, dict):
        return
    batch, epoch = fit.get("epoch_loop.batch_progress"), fit.get("epoch_progress")
    if not (isinstance(batch, dict) and isinstance(epoch, dict) and batch.get("is_last_batch")):
        return
    try:
        total, current, epochs = batch["total"], batch["current"], epoch["total"]
        at_batch_end = (
            total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
            and current["processed"] == current["completed"] + 1
        )
        mid_epoch = epochs["started"] == epochs["processed"] + 1
    except (KeyError, TypeError):
        return  # another Lightning's layout: leave it to Lightning
    if not (at_batch_end and mid_epoch):
        return
    fit["epoch_loop.batch_progress"] = {
        **batch,
        "total": {**total, "completed": total["processed"]},
        "current": {**current, "completed": current["processed"]},
    }
    state = fit.get("epoch_loop.state_dict")
    if isinstance(state, dict) and isinstance(state.get("_batches_that_stepped"), int):
        fit["epoch_loop.state_dict"] = {
            **state,
            "_batches_that_stepped": state["_batches_that_stepped"] + 1,
        }


def _callback_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """``trainer.callback_metrics`` as numbers a checkpoint holds (0-d CPU tensors, the type
    Lightning's hooks compare; non-numbers are left out)."""
    out: dict[str, Any] = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[str(name)] = value.detach().to("cpu", copy=True).reshape(())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = torch.tensor(value)
    return out


def _callback_states(trainer: pl.Trainer) -> dict[str, Any] | None:
    """Every callback's ``state_dict`` now, as Lightning's checkpoint holds them, copied (a
    callback may change them in place later); None when one cannot be copied (the states at
    save time are then saved, as before)."""
    try:
        return copy.deepcopy(call._call_callbacks_state_dict(trainer))
    except Exception as exc:  # a callback's own objects: not ours to judge
        log.debug("lightning: callback states not copied at the step boundary: %r", exc)
        return None


def _loop_progress(trainer: pl.Trainer) -> dict[str, Any]:
    """The fit loop's progress counters (its child loops' included), keyed as in its
    ``state_dict``, without the loop's own ``state_dict`` entry: that one holds the train
    loaders' states (``combined_loader``), which savegame saves through its loader layer and
    which would cost a loader ``state_dict`` per step here. Lightning's progress objects hand
    out fresh dicts (``dataclasses.asdict``), so later steps cannot change what is kept."""
    fit_loop = trainer.fit_loop
    out: dict[str, Any] = {}
    for key, value in fit_loop.__dict__.items():
        if isinstance(value, _BaseProgress):
            out[key] = value.state_dict()
        elif isinstance(value, _Loop):
            value.state_dict(out, key + ".")
    return out


def _distributed(trainer: pl.Trainer) -> bool:
    return (
        trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def _redrawn_each_epoch(dl: Any) -> bool:
    """The loader's sampler is Lightning's ``DistributedSamplerWrapper`` (``use_distributed_sampler``)
    around a sampler that is not sequential: the wrapper lists its inner sampler anew at every
    epoch's start (a fresh draw), which no saved position can reproduce."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    batch_sampler = getattr(dl, "batch_sampler", None)
    for candidate in (getattr(dl, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(candidate, DistributedSamplerWrapper):
            inner = getattr(getattr(candidate, "dataset", None), "_sampler", None)
            return not isinstance(inner, torch.utils.data.SequentialSampler)
    return False


@contextlib.contextmanager
def _as_after_plateau_step(trainer: pl.Trainer) -> Iterator[None]:
    """Inside: the plateau schedulers with ``interval="step"`` (and the optimizers' learning
    rates and the scheduler progress) as Lightning leaves them once this step's hooks are done.

    Lightning steps those schedulers after the step's ``on_train_batch_end`` and validation
    (``update_lr_schedulers("step", update_plateau_schedulers=True)``), where every checkpoint
    is taken, and a resume restarts at the next batch: without this, the saved step's plateau
    step would never be taken. Lightning's own method takes it here (its frequency, monitor and
    accumulation rules), on the values the hooks have just logged; everything it changed is put
    back on the way out, and Lightning then takes the same step for real. Entered only for a
    save: on such a step a ``LightningModule.lr_scheduler_step`` of yours runs twice for those
    schedulers (the first one undone)."""
    loop = trainer.fit_loop.epoch_loop
    configs = [
        c
        for c in trainer.lr_scheduler_configs
        if c.reduce_on_plateau
        and c.interval == "step"
        and callable(getattr(c.scheduler, "state_dict", None))
        and callable(getattr(c.scheduler, "load_state_dict", None))
    ]
    if not configs or trainer.state.fn != "fit" or trainer.sanity_checking:
        yield
        return
    saved = [copy.deepcopy(c.scheduler.state_dict()) for c in configs]
    lrs = [learning_rates(opt) for opt in trainer.optimizers]
    progress = copy.deepcopy(loop.scheduler_progress.state_dict())
    loop.update_lr_schedulers("step", update_plateau_schedulers=True)
    try:
        yield
    finally:
        for c, sd in zip(configs, saved, strict=True):
            c.scheduler.load_state_dict(sd)
        for opt, rates in zip(trainer.optimizers, lrs, strict=True):
            set_learning_rates(opt, rates)
        loop.scheduler_progress.load_state_dict(progress)


def _has_len(dl: Any) -> bool:
    """Whether ``len(dl)`` works (Lightning prefetches a batch of a loader without one)."""
    try:
        len(dl)
    except (TypeError, NotImplementedError):  # as Lightning's own sized_len
        return False
    return True


def _stateful(dl: Any) -> bool:
    return callable(getattr(dl, "state_dict", None)) and callable(
        getattr(dl, "load_state_dict", None)
    )


def _explicit_ckpt_path(trainer: pl.Trainer) -> Any:
    """The ``ckpt_path`` the running ``fit`` was given, or None. Lightning passes it as an
    argument of ``Trainer._run`` and records it (``trainer.ckpt_path``) only after the setup
    hooks ran, so it is read from that call's frame (private, pinned with the version range)."""
    if trainer.ckpt_path is not None:
        return trainer.ckpt_path
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            return frame.f_locals.get("ckpt_path")
        frame = frame.f_back
    return None
