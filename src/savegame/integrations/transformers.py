"""The Hugging Face ``Trainer`` saved and resumed by savegame (issue 12; docs/integrations-hf.md).

One line on an existing ``Trainer``::

    from savegame.integrations.transformers import attach
    attach(trainer, "runs/exp", save=sg.Every(steps=500), keep=sg.Keep(last=3))
    trainer.train()          # resumes from the newest *valid* savegame checkpoint, if any

How it resumes (and why not through ``train(resume_from_checkpoint=...)``): the Trainer loads
its own checkpoint folder *before* any callback runs, from pickled files, and reaches the data
position by iterating over the batches already trained (``skip_first_batches``). Here nothing
of the Trainer's own resume path is used. ``attach``

1. gives the Trainer a torchdata ``StatefulDataLoader`` over the same dataset, collator, batch
   size and workers, shuffled by its own seeded generator (``args.data_seed`` or ``args.seed``),
   whose position (the sampler's generator and the number of samples it yielded) is restored
   directly: no batch is fetched, collated or even sampled to get there;
2. adds :class:`SavegameCallback`, which in ``on_train_begin`` — after the Trainer built the
   optimizer, scheduler and loader, before the first batch is fetched — restores the newest
   valid checkpoint of the run folder (damaged or half-written ones are skipped) into the model,
   optimizer, scheduler, GradScaler, ``TrainerState`` (global step, epoch, log history, best
   metric, stateful callbacks), the Trainer's running loss accumulators, every RNG and the
   loader;
3. keeps the Trainer's own epoch bookkeeping right: the Trainer, started "fresh", counts its
   epochs from 0; the callback keeps the true epoch and batch counters (saved with the
   checkpoint) and writes ``state.epoch`` from them.

Saves happen at the **step boundary**: after everything the Trainer does for an optimizer step
(logging, evaluation, its own save, the epoch's end) and before the next batch is fetched, so a
checkpoint holds whole steps only and the RNG state it saves is the one the next step starts
from. Preemption signals (SIGTERM, SIGUSR1, SIGINT) are saved on at that boundary and the
process exits with status 75 (``savegame.EXIT_PREEMPTED``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from savegame import errors, policy
from savegame import state as statelib
from savegame.checkpointer import Checkpointer
from savegame.checkpointer.retention import CheckpointInfo
from savegame.format import layout
from savegame.integrations._common import InexactResumeWarning, UnsupportedSetupError, version_tuple
from savegame.integrations.accelerate import DirectRandomSampler

log = logging.getLogger("savegame")

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "InexactResumeWarning",
    "UnsupportedSetupError",
    "SavegameCallback",
    "attach",
    "DirectRandomSampler",
    "check_version",
    "newest_valid_checkpoint",
    "stateful_train_dataloader",
]

#: The transformers versions this module is written against (and tested with, 5.24).
SUPPORTED_TRANSFORMERS = (">=5.0", "<6")
_RANGE = (5, 6)


def check_version(version: str | None = None) -> str:
    """Refuse a transformers version outside :data:`SUPPORTED_TRANSFORMERS`.

    Returns the version checked. Raises :class:`~savegame.errors.MissingDependencyError`
    (an ``ImportError``) naming the supported range when transformers is missing or outside it.
    """
    if version is None:
        try:
            import transformers
        except ImportError as exc:
            raise errors.MissingDependencyError(
                "savegame.integrations.transformers needs transformers "
                f"{','.join(SUPPORTED_TRANSFORMERS)}: pip install 'savegame[transformers]'"
            ) from exc
        version = str(transformers.__version__)
    major = version_tuple(version)[:1]
    if not major or not (_RANGE[0] <= major[0] < _RANGE[1]):
        raise errors.MissingDependencyError(
            f"transformers {version} is not supported by savegame.integrations.transformers: it needs "
            f"transformers {','.join(SUPPORTED_TRANSFORMERS)} (the Trainer's loop internals it relies on "
            "changed in 5.0); install a supported version, e.g. pip install 'transformers>=5,<6'"
        )
    return version


def newest_valid_checkpoint(root: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The newest checkpoint of a run folder (a path or a URL such as ``s3://b/run``) whose
    manifest verifies (None: none, or no run there yet).

    A step folder that is damaged or was half-written (no manifest, bad manifest) is passed
    over, never picked (transformers #35782). The data itself is verified by hash when it is
    restored; a checkpoint whose data then fails is skipped the same way, for the one before.
    """
    from savegame.checkpointer import retention
    from savegame.storage import as_store, urls

    if not urls.is_url(root):
        if not os.path.isdir(root):
            return None
        root = os.fspath(root)
    try:
        listed = retention.list_run(as_store(root))
    except errors.CheckpointNotFoundError:
        return None
    valid = [c for c in listed if c.valid and c.kind == "checkpoint"]
    return max(valid, key=lambda c: c.step) if valid else None


# ---- the loader ---------------------------------------------------------------------------------
def stateful_train_dataloader(trainer: Any) -> Any:
    """The training loader ``attach`` gives the Trainer: a torchdata ``StatefulDataLoader`` with
    the Trainer's dataset (unused columns removed as the Trainer does), collator, batch size,
    workers and ``drop_last``, shuffled by a generator seeded from ``args.data_seed`` (else
    ``args.seed``), so its position is restored directly (no batch is skipped over).

    Not passed through ``accelerator.prepare``: the Trainer moves each batch to its device itself
    (``_prepare_inputs``). Under DDP (``torchrun``, ``args.world_size > 1``) each rank gets its
    own share of every epoch, as ``DistributedSampler`` gives it (the same seeded permutation on
    every rank, every ``world_size``-th sample from ``args.process_index``), in place of the
    batch sharding ``accelerator.prepare`` would add; each rank's position is its own.

    Raises:
        ValueError: no training dataset, an ``IterableDataset``, or a training sampler other than
            a random or sequential one (``train_sampling_strategy="group_by_length"``...).
    """
    from torch.utils.data import IterableDataset, RandomSampler, SequentialSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    args = trainer.args
    dataset = trainer.train_dataset
    if dataset is None:
        raise ValueError("Trainer: training requires a train_dataset")
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "savegame's Trainer integration needs a map-style train_dataset (with __len__ and __getitem__) "
            "to restore the data position directly; an IterableDataset's position is its own iterator's"
        )
    collator = trainer.data_collator
    try:
        import datasets

        is_hf_dataset = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf_dataset = False
    if is_hf_dataset:
        dataset = trainer._remove_unused_columns(dataset, description="training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")
    sampler = trainer._get_train_sampler(dataset)
    if isinstance(sampler, RandomSampler):
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError(
            f"the Trainer's training sampler is a {type(sampler).__name__}, whose position savegame cannot "
            "restore directly; use train_sampling_strategy='random' (the default) or 'sequential'"
        )
    seed = int(args.data_seed if args.data_seed is not None else args.seed)
    generator = torch.Generator()  # the workers' base seed: the global RNG is left alone
    generator.manual_seed(seed)
    world, rank = int(args.world_size), int(args.process_index)
    train_sampler: Any = None
    if shuffle:
        train_sampler = DirectRandomSampler(dataset, seed=seed, num_replicas=world, rank=rank)
    elif world > 1:
        from torch.utils.data import DistributedSampler

        # Sequential: torchdata restores its position by replaying indices only (no fetch).
        train_sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    params: dict[str, Any] = {
        "batch_size": trainer._train_batch_size,
        "sampler": train_sampler,
        "collate_fn": collator,
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory,
        "drop_last": args.dataloader_drop_last,
        "generator": generator,
    }
    if args.dataloader_num_workers > 0:
        from transformers.trainer_utils import seed_worker

        params.update(
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            worker_init_fn=functools.partial(
                seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
            ),
        )
    return StatefulDataLoader(dataset, **params)


def _is_stateful_loader(loader: Any) -> bool:
    return type(loader).__module__.startswith("torchdata.stateful_dataloader")


# ---- what the Trainer keeps outside the model/optimizer/scheduler ------------------------------
class _TrainerProgress:
    """The Trainer's own state as a savegame Stateful: ``TrainerState`` (JSON, no pickle), the
    running loss accumulators, the stateful callbacks, and the callback's true epoch/batch
    counters (the Trainer restarts its own at 0)."""

    def __init__(self, trainer: Any, callback: SavegameCallback) -> None:
        self.trainer = trainer
        self.callback = callback
        #: A best-metric update the Trainer applies right after on_evaluate (see _pending_best).
        self.best_patch: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        tr = self.trainer
        fields = {
            f.name: getattr(tr.state, f.name)
            for f in dataclasses.fields(tr.state)
            if f.name != "stateful_callbacks"
        }
        if self.best_patch:
            fields.update(self.best_patch)
        callbacks: dict[str, list[Any]] = {}
        for cb in tr.callback_handler.callbacks:
            if callable(getattr(cb, "state", None)) and not isinstance(cb, SavegameCallback):
                callbacks.setdefault(type(cb).__name__, []).append(cb.state())
        cb = self.callback
        return {
            "trainer_state": json.dumps(fields, sort_keys=True),
            "callbacks": json.dumps(callbacks, sort_keys=True),
            "tr_loss": tr._tr_loss.detach().clone(),
            "globalstep_last_logged": int(tr._globalstep_last_logged),
            "current_flos": float(tr.current_flos),
            "epoch_index": cb._epoch,
            "batches_in_epoch": cb._batches,
            "epoch_done": cb._epoch_done,
            # Stopped before max_steps (EarlyStoppingCallback, a callback's own stop): a requeued
            # job must end there too, not train on (the flag lives in the TrainerControl).
            "stopped_early": bool(getattr(cb._control, "should_training_stop", False))
            and 0 < tr.state.max_steps
            and tr.state.global_step < tr.state.max_steps,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        tr = self.trainer
        for name, value in json.loads(sd["trainer_state"]).items():
            if name not in _THIS_RUNS_SETTINGS:
                setattr(tr.state, name, value)
        saved_cbs = json.loads(sd["callbacks"])
        for name, states in saved_cbs.items():
            live = [c for c in tr.callback_handler.callbacks if type(c).__name__ == name]
            for cb, st in zip(live, states, strict=False):
                for attr, value in (st.get("attributes") or {}).items():
                    setattr(cb, attr, value)
        with torch.no_grad():
            tr._tr_loss.copy_(sd["tr_loss"].to(tr._tr_loss.device))
        tr._globalstep_last_logged = int(sd["globalstep_last_logged"])
        tr.current_flos = float(sd["current_flos"])
        # this train() call's share starts here (as the Trainer's own resume does)
        tr._initial_global_step = tr.state.global_step
        tr._initial_num_input_tokens_seen = tr.state.num_input_tokens_seen
        cb = self.callback
        cb._epoch = int(sd["epoch_index"])
        cb._batches = int(sd["batches_in_epoch"])
        cb._epoch_done = bool(sd["epoch_done"])
        cb._stopped_early = bool(sd.get("stopped_early", False))  # absent: an older savegame


#: ``TrainerState`` fields the Trainer derives from this ``train()`` call's arguments before
#: ``on_train_begin`` (``compute_steps``, ``init_training_references``): a resume keeps them, as
#: the Trainer's own resume does for ``max_steps`` and ``num_train_epochs``. Restoring the saved
#: ones would make a run resumed with a larger ``max_steps`` stop one step after the old end.
_THIS_RUNS_SETTINGS = frozenset({
    "max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps",
    "train_batch_size", "is_hyper_param_search", "trial_name", "trial_params",
    "is_local_process_zero", "is_world_process_zero",
})  # fmt: skip


class _RunComplete(errors.CheckpointError):
    """The newest checkpoint is at or past this ``train()`` call's last step: there is nothing
    to train. ``attach``'s ``train()`` returns normally on it; a callback used without
    ``attach`` raises it (the Trainer's loop has no way to run zero steps)."""


@dataclasses.dataclass
class _Boundary:
    """An optimizer step whose after-step work (log, evaluate, epoch end) is still running."""

    step: int
    until: str  # "log", "evaluate" or "epoch": the event that ends it
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    epoch_end: bool = False


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # checked (with a clear error) when the callback is built

        class TrainerCallback:  # type: ignore[no-redef]
            pass

    return TrainerCallback


class SavegameCallback(_trainer_callback_base()):  # type: ignore[misc]
    """A ``TrainerCallback`` that saves the whole training state with savegame and resumes it.

    Use :func:`attach` (it adds this callback *and* the stateful loader, and closes the run
    folder when ``train()`` returns or raises). Alone, in ``Trainer(callbacks=[...])``, it still
    saves and restores everything but the data position — a warning says so.

    Args:
        root: The run folder (savegame's ``Checkpointer`` root).
        save, keep, async_save, handle_signals, exit_on_signal: as for
            :class:`savegame.Checkpointer`, except that ``async_save`` defaults to True (a
            signal's save and the end of ``train()`` still wait for the commit; a failed
            background save is raised at the next step; ``False``: every save blocks). ``keep=Keep(best=K, monitor=...)`` takes any metric
            the Trainer logs (``"eval_loss"``, ``"loss"``...).
        resume: Restore the newest valid checkpoint in ``on_train_begin`` (default True).
        save_on_train_end: Save once more when training ends (default True).
        cache: A local folder (fast disk) for a remote ``root`` (``s3://...``): saves commit
            there and upload in the background; the end of ``train()`` waits for the uploads
            (docs/tiers.md). As for :class:`savegame.Checkpointer`.

    Raises:
        MissingDependencyError: transformers is missing or not a supported version.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save: policy.Every | None = None,
        keep: policy.Keep | None = None,
        async_save: bool = True,
        handle_signals: bool = True,
        exit_on_signal: bool = True,
        resume: bool = True,
        save_on_train_end: bool = True,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        check_version()
        self.root = root
        self.cache = cache
        self.save_policy = save
        self.keep = keep if keep is not None else policy.Keep(last=3)
        self.async_save = async_save
        self.handle_signals = handle_signals
        self.exit_on_signal = exit_on_signal
        self.resume = resume
        self.save_on_train_end = save_on_train_end
        self.trainer: Any = None
        #: The Checkpointer while training runs (None before on_train_begin and after the end).
        self.checkpointer: Checkpointer | None = None
        #: The step restored by the last on_train_begin (0: a fresh run).
        self.resumed_step = 0
        #: True when that restore found the run already complete (``train()`` trained nothing).
        self.complete = False
        #: ckpt.last_restore of that restore.
        self.last_restore: Any = None
        self._state: statelib.TrainState | None = None
        self._progress: _TrainerProgress | None = None
        self._boundary: _Boundary | None = None
        self._epoch = 0
        self._batches = 0
        self._epoch_done = False
        self._steps_in_epoch = 0
        self._monitor_seen = False
        self._control: Any = None

    # ---- wiring -------------------------------------------------------------------------------
    def bind(self, trainer: Any) -> SavegameCallback:
        """Give the callback its Trainer (``attach`` does it): the loss accumulators and the
        callbacks' states live on the Trainer, not in what callbacks are passed."""
        self.trainer = trainer
        return self

    # ---- events -------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        trainer = self.trainer
        if trainer is None:
            raise errors.CheckpointError(
                "SavegameCallback has no Trainer: use savegame.integrations.transformers.attach(trainer, root, ...) "
                "(or callback.bind(trainer)) before trainer.train()"
            )
        _check_parallel_mode(trainer)
        monitor = self.keep.monitor
        if monitor and self.keep.best > 0 and _never_logged(args, monitor):
            raise ValueError(
                f"Keep(monitor={monitor!r}) will never see that metric: the Trainer neither evaluates "
                f"(eval_strategy={_strategy(args.eval_strategy)!r}) nor logs (logging_strategy="
                f"{_strategy(args.logging_strategy)!r}); set eval_strategy/eval_steps, or drop best= from Keep"
            )
        self._monitor_seen = False
        loader = kw.get("train_dataloader")
        optimizer = kw.get("optimizer") or trainer.optimizer
        objects: dict[str, Any] = {
            "model": kw.get("model") or trainer.model,
            "optimizer": getattr(optimizer, "optimizer", optimizer),
            "scheduler": kw.get("lr_scheduler") or trainer.lr_scheduler,
        }
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            objects["scaler"] = scaler
        self._steps_in_epoch = (
            len(loader) if loader is not None and hasattr(loader, "__len__") else 0
        )
        if loader is not None and _is_stateful_loader(loader):
            objects["loader"] = loader
        else:
            warnings.warn(
                f"the Trainer's training loader is a {type(loader).__module__}.{type(loader).__qualname__}, which "
                "cannot save its position: savegame saves everything else, but a resume restarts the "
                "interrupted epoch's data order from its beginning. Fix: savegame.integrations.transformers."
                "attach(trainer, ...) gives the Trainer a torchdata StatefulDataLoader",
                InexactResumeWarning,
                stacklevel=2,
            )
        self._progress = _TrainerProgress(trainer, self)
        objects["trainer"] = self._progress
        self._state = statelib.TrainState(**objects)
        self._epoch, self._batches, self._epoch_done, self._boundary = 0, 0, False, None
        self._stopped_early = False
        self.checkpointer = Checkpointer(
            self.root,
            save=self.save_policy,
            keep=self.keep,
            handle_signals=self.handle_signals,
            exit_on_signal=self.exit_on_signal,
            async_save=self.async_save,
            cache=self.cache,
        )
        self.resumed_step, self.complete = 0, False
        if not self.resume:
            self._refuse_a_used_folder()
        if self.resume:
            self.resumed_step = self.checkpointer.restore(self._state)
            self.last_restore = self.checkpointer.last_restore
        if self.resumed_step:
            self._after_restore(args, loader)
            if self._stopped_early:
                self.complete = True
                self.close()  # nothing to save: a caller that catches this keeps its Ctrl-C
                raise _RunComplete(
                    f"{self.root}: the run was stopped at step {self.resumed_step} before its last step "
                    "(EarlyStoppingCallback or another callback set should_training_stop): nothing to "
                    "train, as when it stopped. Start a new run folder (start_from=) to train further",
                    path=str(self.root),
                    step=self.resumed_step,
                )
            if 0 < state.max_steps <= self.resumed_step:
                # The Trainer's loop runs at least one step before it looks at its stop flag:
                # a finished job started again (a requeue) would train past its end.
                self.complete = True
                self.close()
                raise _RunComplete(
                    f"{self.root}: the newest checkpoint is at step {self.resumed_step}, at or past this run's "
                    f"last step ({state.max_steps}): nothing to train. Raise max_steps / num_train_epochs to "
                    "train further (attach(trainer, ...) makes train() return here instead of raising)",
                    path=str(self.root),
                    step=self.resumed_step,
                )

    def _refuse_a_used_folder(self) -> None:
        """``resume=False`` starts at step 0: in a folder that holds checkpoints its saves would
        collide with them (``StepExistsError``) only after training up to the first one."""
        assert self.checkpointer is not None
        try:
            steps = [i.step for i in self.checkpointer.list() if i.kind == "checkpoint"]
        except BaseException:
            self.close()
            raise
        if not steps:
            return
        self.close()
        raise errors.StepExistsError(
            f"{self.root} already holds checkpoints ({layout.step_dir(min(steps))} to "
            f"{layout.step_dir(max(steps))}) and resume=False starts training at step 0: its "
            "saves would collide with them. Give this run a new folder, resume from them "
            "(resume=True), or start a new folder from them (Checkpointer start_from=)",
            path=str(self.root),
            step=min(steps),
        )

    def _after_restore(self, args: Any, loader: Any) -> None:
        ga = args.gradient_accumulation_steps
        if self._batches and ga > 1 and self._steps_in_epoch % ga:
            raise errors.RestoreError(
                f"{self.root} step {self.resumed_step}: cannot resume mid-epoch with "
                f"gradient_accumulation_steps={ga} when an epoch has "
                f"{self._steps_in_epoch} batches (not a multiple): the Trainer's own loop would skip the "
                "epoch's last partial optimizer step. Resume from an epoch-end checkpoint, or make the batches "
                "per epoch a multiple of the accumulation steps",
                path=str(self.root),
                step=self.resumed_step,
            )
        if (
            self._epoch_done
            and loader is not None
            and "loader" in self._state  # type: ignore[operator]
            and not _finished(loader)
        ):
            # Saved after the epoch's last batch (at the next epoch's start): the restored
            # iterator holds nothing more; finish it so the Trainer's iter() starts the next epoch.
            # O(1): it yields nothing. (A state saved as finished — a session resumed mid-epoch
            # pulls the end of its iterator — starts the next epoch at the next iter() as it is.)
            for _ in loader:
                raise errors.RestoreError(
                    f"{self.root} step {self.resumed_step}: the restored loader yielded a batch "
                    "where the checkpoint says its epoch had ended",
                    path=str(self.root),
                    step=self.resumed_step,
                )
        self._epoch_done = False
        log.info(
            "resumed step %d (epoch %d, batch %d of %d) from %s",
            self.resumed_step,
            self._epoch,
            self._batches,
            self._steps_in_epoch,
            getattr(self.last_restore, "path", self.root),
        )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._control = control
        self._flush(state)  # an epoch-end boundary ends here, before the next iter(loader)
        self._epoch_done = False

    def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._batches += 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._control = control
        self._batches += 1
        if self._steps_in_epoch:
            # The Trainer counts epochs from 0 after a resume; the true epoch is ours.
            state.epoch = self._epoch + self._batches / self._steps_in_epoch
        # The boundary ends after the last of this step's events the Trainer will run
        # (DefaultFlowCallback, which runs first, has set the flags).
        at_epoch_end = bool(self._steps_in_epoch) and self._batches >= self._steps_in_epoch
        if at_epoch_end or control.should_training_stop or control.should_epoch_stop:
            until = "epoch"
        elif control.should_evaluate:
            until = "evaluate"
        elif control.should_log:
            until = "log"
        else:
            until = ""
        self._boundary = _Boundary(step=int(state.global_step), until=until)
        if not until:
            self._flush(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self._control = control
        b = self._boundary
        if b is None:
            return
        b.metrics.update(_numbers(logs))
        self._check_monitor(b.metrics, final=False, evaluated=False)
        if b.until == "log":
            self._flush(state)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
    ) -> None:
        self._control = control
        b = self._boundary
        if b is None:
            return
        b.metrics.update(_numbers(metrics))
        self._check_monitor(b.metrics, final=False, evaluated=True)
        if b.until == "evaluate":
            # The Trainer updates state.best_metric right after this event: save it as it will be.
            assert self._progress is not None
            self._progress.best_patch = _pending_best(self.trainer, b.metrics)
            try:
                with _as_after_plateau_step(self.trainer, metrics):
                    self._flush(state)
            finally:
                self._progress.best_patch = None

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._steps_in_epoch and self._batches >= self._steps_in_epoch:
            self._epoch += 1
            self._batches = 0
            self._epoch_done = True
            if self._boundary is not None:
                self._boundary.epoch_end = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if self.complete:  # nothing was trained in this call: nothing to save or check
            self.close()
            return
        try:
            self._flush(state)
            if self.save_on_train_end and self._state is not None:
                ckpt.save(self._state, int(state.global_step))
            if self.keep.monitor and self.keep.best > 0 and not self._monitor_seen:
                warnings.warn(
                    f"Keep(monitor={self.keep.monitor!r}): the Trainer never logged that metric; no checkpoint "
                    "was kept as best",
                    UserWarning,
                    stacklevel=2,
                )
        finally:
            self.close()

    def close(self) -> None:
        """Close the run folder (waits for an async save). Idempotent; ``attach`` calls it when
        ``train()`` ends, also by an exception."""
        ckpt, self.checkpointer = self.checkpointer, None
        if ckpt is not None:
            ckpt.close()

    # ---- internals ----------------------------------------------------------------------------
    def _flush(self, state: Any) -> None:
        b, self._boundary = self._boundary, None
        if b is None or self.checkpointer is None or self._state is None:
            return
        self.checkpointer.step(
            self._state, b.step, metrics=b.metrics or None, epoch_end=b.epoch_end
        )
        if self.checkpointer.preempted and self._control is not None:
            # exit_on_signal=False: saved on the signal; end training here, the loop's own way.
            self._control.should_training_stop = True

    def _check_monitor(self, metrics: Mapping[str, float], *, final: bool, evaluated: bool) -> None:
        monitor = self.keep.monitor
        if not monitor or self.keep.best <= 0 or self._monitor_seen:
            return
        if monitor in metrics:
            self._monitor_seen = True
            return
        if evaluated:
            hint = ""
            if f"eval_{monitor}" in metrics:
                hint = f"; did you mean {'eval_' + monitor!r}? (the Trainer prefixes evaluation metrics)"
            raise ValueError(
                f"Keep(monitor={monitor!r}) is not among the metrics the Trainer logged at step "
                f"{self._boundary.step if self._boundary else '?'}: {sorted(metrics)}{hint}"
            )


def _nothing_trained(trainer: Any) -> Any:
    """What ``train()`` returns for a run that was already complete: the restored state, zero
    steps trained in this call. The other callbacks saw ``on_train_begin``; they see the end."""
    from transformers.trainer_utils import TrainOutput

    trainer.control = trainer.callback_handler.on_train_end(
        trainer.args, trainer.state, trainer.control
    )
    metrics = {"train_runtime": 0.0, "train_loss": 0.0, "epoch": trainer.state.epoch}
    return TrainOutput(int(trainer.state.global_step), 0.0, metrics)


def _check_parallel_mode(trainer: Any) -> None:
    """One process, or DDP under torchrun (every rank runs the callback; the Checkpointer runs
    savegame's multi-rank protocol). Refuse what the callback cannot restore exactly: FSDP,
    DeepSpeed and tensor parallelism shard the model and optimizer in their own formats, which
    the callback does not gather."""
    args = trainer.args
    if args.world_size <= 1:
        return
    engine = (
        "FSDP" if getattr(trainer, "is_fsdp_enabled", False)
        else "DeepSpeed" if getattr(trainer, "is_deepspeed_enabled", False)
        else "tensor parallelism" if getattr(trainer, "is_tp_enabled", False)
        else None
    )  # fmt: skip
    if engine is not None:
        raise UnsupportedSetupError(
            f"savegame's Trainer integration supports one process or DDP under torchrun, not {engine} "
            f"(world size {args.world_size}): it would save each rank's {engine} shards without their layout. "
            "Train with DDP (no fsdp=/deepspeed= in TrainingArguments), or use savegame.Checkpointer with FSDP2 "
            "in your own loop (docs/distributed.md)"
        )
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UnsupportedSetupError(
            f"TrainingArguments report world size {args.world_size} but no torch.distributed process group "
            "is initialized: launch with torchrun (every rank runs the same script)"
        )


def _numbers(values: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (values or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def _never_logged(args: Any, monitor: str) -> bool:
    evaluates = _strategy(args.eval_strategy) != "no"
    logs = _strategy(args.logging_strategy) != "no"
    if monitor.startswith("eval_"):
        return not evaluates
    return not (evaluates or logs)


def _plateau_key(trainer: Any) -> str | None:
    """The metric the Trainer steps a plateau scheduler with after each evaluation (its
    ``_evaluate``), or None when its scheduler is not one."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    sched = getattr(trainer, "lr_scheduler", None)
    plateau = isinstance(sched, ReduceLROnPlateau) or type(sched).__name__ == "GreedyLR"
    name = trainer.args.metric_for_best_model
    if not plateau or not name:
        return None
    return name if name.startswith("eval_") else f"eval_{name}"


@contextlib.contextmanager
def _as_after_plateau_step(trainer: Any, metrics: Any) -> Iterator[None]:
    """Inside: the scheduler and the optimizer's learning rates as the Trainer leaves them right
    after ``on_evaluate``, when it steps ``ReduceLROnPlateau`` (or ``GreedyLR``) with that
    evaluation's metric. A checkpoint taken in ``on_evaluate`` must hold that step, or the resumed
    scheduler never sees the evaluation. The step is taken on the live scheduler and undone on the
    way out (both are deterministic given the metric), so the Trainer's own step is unchanged."""
    key = _plateau_key(trainer)
    if key is None or not isinstance(metrics, Mapping) or key not in metrics:
        yield  # the Trainer raises its own KeyError for a missing metric
        return
    sched = trainer.lr_scheduler
    before = copy.deepcopy(sched.state_dict())
    lrs = statelib.learning_rates(sched.optimizer)
    sched.step(metrics[key])
    try:
        yield
    finally:
        sched.load_state_dict(before)
        statelib.set_learning_rates(sched.optimizer, lrs)


def _pending_best(trainer: Any, metrics: Mapping[str, float]) -> dict[str, Any] | None:
    """The ``best_metric``/``best_global_step`` the Trainer's ``_determine_best_metric`` sets
    right after ``on_evaluate`` (its logic, applied to a copy)."""
    args = trainer.args
    name = args.metric_for_best_model
    if name is None:
        return None
    if not name.startswith("eval_"):
        name = f"eval_{name}"
    if name not in metrics:
        return None
    value = metrics[name]
    best = trainer.state.best_metric
    if best is None:
        best = float("-inf") if args.greater_is_better else float("inf")
    better = value > best if args.greater_is_better else value < best
    patch: dict[str, Any] = {"best_metric": best}
    if better:
        patch["best_metric"] = value
        if _strategy(args.save_strategy) in ("steps", "epoch", "best"):
            patch["best_global_step"] = trainer.state.global_step
    return patch


def attach(
    trainer: Any,
    root: str | os.PathLike[str],
    *,
    save: policy.Every | None = None,
    keep: policy.Keep | None = None,
    async_save: bool = True,
    handle_signals: bool = True,
    exit_on_signal: bool = True,
    resume: bool = True,
    save_on_train_end: bool = True,
    cache: str | os.PathLike[str] | None = None,
) -> SavegameCallback:
    """Save ``trainer``'s whole training state with savegame, and resume it on ``train()``.

    Adds a :class:`SavegameCallback`, gives the Trainer a position-restorable training loader
    (:func:`stateful_train_dataloader`) and makes ``trainer.train()`` close the run folder when
    it returns or raises. ``trainer.train()`` then restores the newest valid checkpoint of
    ``root`` (nothing on a fresh run). Arguments as for :class:`SavegameCallback`.

    The Trainer's own checkpoints (``save_strategy``) are neither needed nor used: set
    ``save_strategy="no"`` (a warning says so otherwise).

    Raises:
        MissingDependencyError: transformers is missing or not a supported version.
        TypeError: ``trainer`` is no ``transformers.Trainer``.

    Under DDP (torchrun) every rank calls ``attach`` and ``train()``; FSDP, DeepSpeed and tensor
    parallelism are refused at ``train()`` with :class:`UnsupportedSetupError`.
    """
    check_version()
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"attach() takes a transformers.Trainer, got {type(trainer).__qualname__}")
    callback = SavegameCallback(
        root,
        save=save,
        keep=keep,
        async_save=async_save,
        handle_signals=handle_signals,
        exit_on_signal=exit_on_signal,
        resume=resume,
        save_on_train_end=save_on_train_end,
        cache=cache,
    ).bind(trainer)
    trainer.add_callback(callback)
    if _strategy(trainer.args.save_strategy) != "no":
        warnings.warn(
            f"TrainingArguments(save_strategy={_strategy(trainer.args.save_strategy)!r}): the Trainer will also write "
            "its own (pickled) checkpoints, which savegame neither needs nor resumes from; set save_strategy='no' "
            "to save only through savegame",
            UserWarning,
            stacklevel=2,
        )
    trainer.get_train_dataloader = functools.partial(stateful_train_dataloader, trainer)
    train = trainer.train

    @functools.wraps(train)
    def train_through_savegame(
        resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        if resume_from_checkpoint not in (None, False):
            raise ValueError(
                "train(resume_from_checkpoint=...) loads the Trainer's own checkpoint; with savegame attached, "
                f"call train() alone: it resumes from the newest valid checkpoint in {os.fspath(root)}"
            )
        # Last among the callbacks, also those added after attach(): a step's checkpoint then
        # holds what every other callback did in that step's events (EarlyStoppingCallback's
        # patience counter of an evaluation, an EMA updated in on_step_end), as an
        # uninterrupted run has it when the next step starts.
        callbacks = trainer.callback_handler.callbacks
        if callback in callbacks and callbacks[-1] is not callback:
            callbacks.remove(callback)
            callbacks.append(callback)
        try:
            return train(None, *args, **kwargs)
        except _RunComplete as done:
            log.info("%s", done)
            return _nothing_trained(trainer)
        finally:
            callback.close()

    trainer.train = train_through_savegame
    return callback


def _finished(loader: Any) -> bool:
    """Whether a restored loader's state is an iterator that already ended (torchdata builds
    the next epoch's at the next ``iter()``)."""
    from savegame.state import position

    pos = position.read(getattr(loader, "next_iter_state", None))
    return pos is not None and pos.finished
