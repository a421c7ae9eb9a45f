"""The facade: one object that saves a training run on a strategy and resumes it exactly.

Call order (one process, or every rank)::

    ckpt = Checkpointer(root, save=Every(...), keep=Keep(...))   # takes the run folder's lock
    step = ckpt.restore(state)                                   # newest valid checkpoint, or 0
    for ...:                                                     # your loop
        ckpt.step(state, step, metrics=...)                      # after the step is complete
    ckpt.close()                                                 # releases the lock

Invariants: a checkpoint is only ever listed once committed (see :mod:`savegame.engine.writer`);
retention deletes only checkpoints of this run family (``run.json``), never the newest, and
ranks "best" from the manifests on disk, so it survives restarts; a signal (SIGTERM, SIGUSR1,
SIGINT) never interrupts a save half-way — it is acted on at the next step boundary.

One process and many take one path: the save decision is made once (by rank 0, broadcast) and
every save goes through :mod:`savegame.distributed.protocol` (prepare → persist → commit); a
process without torch.distributed runs it over the no-op
:class:`~savegame.distributed.collectives.LocalGroup` and gets its own errors back unwrapped.
The parts: :mod:`.signals`, :mod:`.runfile` (lock, ``run.json``), :mod:`.retention` (shared with
``savegame prune``), :mod:`.restoring` (one process's restore), :mod:`.checks`, :mod:`.adopt`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from savegame import errors, policy
from savegame import state as statelib
from savegame.checkpointer import adopt as adoptlib
from savegame.checkpointer import checks, restoring, retention, runfile, signals, tiers
from savegame.checkpointer.retention import CheckpointInfo
from savegame.checkpointer.signals import EXIT_PREEMPTED
from savegame.distributed import collectives, protocol
from savegame.engine import fetch, persist, reader, staging, writer
from savegame.format import layout
from savegame.policy import progress
from savegame.state import overrides
from savegame.state.overrides import RestoreReport
from savegame.storage import Location, Store, as_store, objectstore, urls

log = logging.getLogger("savegame")

# Loaded with the Checkpointer, not at the reader's first read of a file it could not map:
# a process out of descriptors (where mapping failed) could not open the module's file then.
_ = fetch

__all__ = ["Checkpointer"]


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _one_call_at_a_time(method: _Method) -> _Method:
    """The public calls of one Checkpointer run one at a time (an RLock: a preemption save
    closes from inside ``step``): two threads saving into it would otherwise let one's
    retention free the bytes the other's incremental save just referred to, and a ``close()``
    from another thread would return with that thread's save still writing into the run.
    Not in a forked child, where a parent's thread may have held the lock at the fork (the
    call itself then refuses or does nothing: ``_in_owner``)."""

    @functools.wraps(method)
    def call(self: Checkpointer, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() != self._pid:
            return method(self, *args, **kwargs)
        with self._calls:
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


class Checkpointer:
    """Saves a training run on a strategy and resumes it exactly.

    Args:
        root: The run folder (created if missing). One writer per folder: a second live
            writer gets :class:`~savegame.errors.LockedError`.
        save: When to save (default ``Every(seconds=1800)``). See :func:`savegame.regime`.
        keep: What to keep (default ``Keep(last=3)``).
        handle_signals: Save at the next step boundary on SIGTERM / SIGUSR1 / SIGINT.
        exit_on_signal: After that save, exit the process with :data:`EXIT_PREEMPTED` (75).
            If False, :attr:`preempted` becomes True and your loop decides.
        async_save: Scheduled saves (``step``) snapshot the state into a reusable pool of host
            buffers (pinned, on a side CUDA stream, for GPU tensors) and persist in a background
            thread; training continues once the snapshot is taken. ``save()`` always blocks.
        when_busy: With ``async_save``, what a save does while the previous one is still
            persisting: ``"wait"`` for it, or ``"skip"`` this save (logged).
        cache: A local folder (fast disk) for a remote ``root``: saves commit there as in a
            local run and a background thread uploads each one to ``root`` (docs/tiers.md).
        start_from: Another run (or one ``step-…`` checkpoint of it), a path or URL: while
            this run has no checkpoint, ``restore`` loads its newest valid one (read-only: it
            is never written or locked). Once this run has saved, it is ignored. If it holds
            no valid checkpoint, a warning says this run starts from step 0.
        upload_retry: With ``cache``, how often a failed upload is tried before its error is
            raised (default ``UploadRetry()``).
        incremental: A tensor whose bytes equal those of the previous checkpoint is not
            written again; the new checkpoint refers to the stored bytes (docs/incremental.md).
            Restore reads and verifies exactly the same bytes either way. ``False`` writes
            every checkpoint in full (format version 1, readable by every savegame release).

    Under torch.distributed (an initialized process group, e.g. ``torchrun``) every rank
    constructs it at the same point (it creates the coordination groups: a collective) and
    calls every method; rank 0 only holds the lock, writes ``run.json``, commits and applies
    retention. See docs/distributed.md.

    A folder this process can read but not write (a read-only mount, another user's run) opens
    read-only: :attr:`writable` is False, ``restore`` works, and a save raises
    :class:`~savegame.errors.StorageError`.

    Raises:
        LockedError: another live process writes this run folder (every rank raises it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Store,
        *,
        save: policy.Every | None = None,
        keep: policy.Keep | None = None,
        handle_signals: bool = True,
        exit_on_signal: bool = True,
        async_save: bool = False,
        when_busy: Literal["wait", "skip"] = "wait",
        cache: str | os.PathLike[str] | None = None,
        start_from: str | os.PathLike[str] | Store | None = None,
        upload_retry: tiers.UploadRetry | None = None,
        incremental: bool = True,
    ) -> None:
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy={when_busy!r}: use 'wait' or 'skip'")
        checks.check_arguments(root=root, save=save, keep=keep, cache=cache, start_from=start_from)
        self._pid = os.getpid()  # the process that owns the run (not a forked child: _in_owner)
        self._calls = threading.RLock()  # public calls one at a time (_one_call_at_a_time)
        self.async_save = async_save
        self.when_busy = when_busy
        #: Incremental saves (docs/incremental.md): unchanged tensors refer to stored bytes.
        self.incremental = bool(incremental)
        self._last_committed: str | None = None  # the folder of this process's last save
        writer.forget_recent()  # another process may have replaced what this one saved before
        self._persister = persist.Persister()
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-delete")
        self._pool = staging.HostPool()
        self._reserved = False  # the pool's memory was reserved (once, _reserve_staging)
        #: Where the run lives (docs/storage.md): a path means a local folder. With ``cache``,
        #: the cache folder, which saves commit into (the remote run is ``_tiers.remote``).
        root, cache = _pinned(root), _pinned(cache)
        self.store = as_store(root if cache is None else cache)
        remote = as_store(root) if cache is not None else None
        #: The run folder (a Path for a local run, else the store's URL).
        run = remote or self.store
        self.root: Path | str = run.local_path() or run.describe()
        self._start_from = _pinned(start_from)  # (a relative one: named now, not at restore)
        self.save_policy = save if save is not None else policy.Every(seconds=1800)
        self.keep = keep if keep is not None else policy.Keep(last=3)
        self.exit_on_signal = exit_on_signal
        try:
            self.store.makedirs()
        except OSError as exc:
            raise errors.StorageError(
                f"cannot create run folder {self.root}: {exc}; pass a folder path (a run folder holds one "
                "step-… folder per checkpoint)",
                path=self.root,
            ) from exc
        # Under torchrun (an initialized process group) every rank builds its Checkpointer here;
        # rank 0 alone holds the lock, owns run.json and collects garbage (docs/distributed.md).
        # (A process group of size 1 takes this path too: its state may hold DTensors.) Without
        # one, the groups are no-op LocalGroups: the same code, with nothing to wait for.
        self._group = collectives.group()
        self._save_group = collectives.group()  # persist thread only
        self.rank = self._group.rank
        self._tiers = None if remote is None else tiers.Tiers(
            remote, self.store, keep=self.keep, rank=self.rank, retry=upload_retry
        )  # fmt: skip
        self._lock = runfile.run_lock(self.store, self.rank)
        self._closed = False
        #: False when this process cannot write the run folder (a read-only mount, another user's
        #: run): restore works, a save raises StorageError (issue 9.9).
        self.writable = True
        self._suspects: list[tuple[Path, BaseException | None]] = []  # skipped by restore
        self._verified: set[str] = set()  # checkpoint folders known intact in this process
        self._signals = signals.PreemptionSignals()
        # Sample/token counters and save-cost measurements (docs/policies.md).
        self._progress = progress.Progress(self.save_policy)
        self._session_failed = False
        self._session_open = False
        try:
            self.run_id = self._setup_ranks()
            self._epochs_completed = 0
            also = (self._tiers.remote,) if self._tiers is not None else ()
            self._index, best = retention.run_position(
                self.store, self.run_id, self.keep, also=also
            )
            self._last_save_time = time.monotonic()
            self._last_saved_step: int | None = None
            #: Steps of this run newer than an older checkpoint restore(step=) took (a rollback).
            self._newer_than_restored: list[int] = []
            self._best: float | None = best
            self.preempted = False
            if handle_signals:
                self._signals.install()
            # Garbage-collected without close() (an exception skipped it, no `with`): the run
            # folder's lock and the signals are given back, so a sweep's next trial can open the
            # folder and SIGTERM ends the process again instead of waiting for a step boundary
            # that never comes. Not at exit: the kernel drops the lock with the process, and an
            # async save may still be committing then.
            self._finalizer = weakref.finalize(
                self,
                _abandoned,
                self._signals,
                self._lock,
                self._deleter,
                self._persister,
                self._pid,
            )
            self._finalizer.atexit = False
        except PermissionError as exc:
            self._close_quietly()
            if isinstance(exc, errors.CheckpointError):
                raise
            raise errors.AccessDeniedError(
                f"cannot read run folder {self.root}: permission denied on "
                f"{exc.filename or self.root} (another user's run?); ask for read access to it, "
                "or start a run of your own from a copy",
                path=self.root,
            ) from exc
        except BaseException:
            # A failed constructor must not keep the run folder locked: a retry in this process
            # would otherwise get LockedError naming itself.
            self._close_quietly()
            raise

    # ---- public API ---------------------------------------------------------------------------
    #: What the last ``restore`` applied and left as it was (None: it restored nothing).
    last_restore: RestoreReport | None = None

    @_one_call_at_a_time
    def restore(
        self,
        state: statelib.TrainState,
        *,
        step: int | None = None,
        per_rank: Literal["strict", "fresh"] = "strict",
        only: Iterable[str] | None = None,
        skip: Iterable[str] | None = None,
        strict: bool = True,
    ) -> int:
        """Restore ``state`` from the newest valid checkpoint (or ``step``) and return its step.

        Corrupt or incomplete checkpoints are skipped with a :class:`CorruptCheckpointWarning`
        naming them. Nothing is applied to ``state`` until a checkpoint has been read and every
        hash verified, so a corrupt checkpoint never leaves the objects half-restored.

        Under torch.distributed every rank calls it; each reads only its share (its shards,
        the replicated tensors, its per-rank state) and nothing is applied until every rank
        verified its share. A checkpoint of another world size is resharded; per-rank state
        (RNG, loader positions) cannot be, and ``per_rank`` says what happens to it:
        ``"strict"`` raises :class:`RestoreError`, ``"fresh"`` leaves those objects as
        constructed (docs/distributed.md, "Resharding").

        Resuming with changes (docs/resume.md): ``only=["model"]`` restores just the named parts
        (weights only, to fine-tune), ``skip=["scheduler"]`` all but them (a ``TrainState``
        name, ``"rng"``, or a dict entry ``"extras/best"``); the rest is left exactly as it was.
        ``strict=False`` restores what fits (a model with an added layer) and names the rest in
        :attr:`last_restore` (a ``RestoreReport``) and the log. Every rank passes the same.

        Returns:
            The number of completed steps to continue from; 0 on a fresh run.

        Raises:
            CheckpointNotFoundError: ``step`` was given and does not exist.
            StorageError: a checkpoint newer than any usable one could not be read (storage
                failure, not damage): nothing restored, never an older step on a guess.
            RestoreError: a checkpoint is valid but does not fit ``state`` (different objects,
                or per-rank state on a different world size with ``per_rank="strict"``), or a
                name in ``only``/``skip`` does not exist (TypeError/ValueError: a bad argument).
        """
        self._in_owner("restore")
        checks.check_state(state, "restore")
        if per_rank not in ("strict", "fresh"):
            raise ValueError(f"per_rank={per_rank!r}: use 'strict' or 'fresh'")
        opts = overrides.options(only=only, skip=skip, strict=strict, state=state)
        self.last_restore = None
        self._persister.wait()
        try:
            got = self._restore(state, step, per_rank, opts)
        finally:
            self._set_aside_suspects()
            self._end_snapshots()
        if got:  # the state is whole now (optimizer moments too): a save may come at once
            self._reserve_staging(state)
        return got

    def _restore(
        self,
        state: statelib.TrainState,
        step: int | None,
        per_rank: Literal["strict", "fresh"],
        opts: overrides.RestoreOptions,
    ) -> int:
        if step is not None:
            step = checks.check_step(step)
        refs = self._candidates()
        # Older step folders whose manifest is damaged are never reached by the loop below and
        # never restorable either: set them aside too (listed as damaged, out of the way).
        self._suspects += [
            (r.path, r.error) for r in refs if isinstance(r.error, errors.FormatError)
        ]
        newer = sorted(
            {r.step for r in refs if step is not None and r.step > step and r.manifest is not None}
        )
        if step is not None:
            refs = [r for r in refs if r.step == step]
            if not refs:
                raise errors.CheckpointNotFoundError(
                    f"no checkpoint for step {step} in {self.root}", path=self.root, step=step
                )
        done = restoring.restore(
            self._group, refs, state, opts, per_rank=per_rank, skip=self._warn_skip
        )
        if done is None and step is None and self._start_from is not None:  # a fork, read-only
            source = restoring.source_refs(self._start_from)
            done = restoring.restore(
                self._group, source, state, opts, per_rank=per_rank, skip=restoring.warn_skip
            )
            if done is None:  # a job told to start from another's output: never silently fresh
                restoring.warn_nothing_to_start_from(self._start_from, len(source))
        if done is not None and done[0].manifest is not None:
            ref, self.last_restore = done
            self._epochs_completed = int(ref.manifest.info.get("epochs_completed", 0))
            self._progress.restore(ref.manifest.info)
            self._last_save_time = time.monotonic()
            self._last_saved_step = ref.step
            self._verified.add(str(ref.path))
            self._newer_than_restored = newer  # said at the first save, if it comes
            if self._tiers is not None and self.writable and self.rank == 0:
                self._tiers.restored(ref)
            return ref.step
        if refs and step is not None:
            raise errors.RestoreError(
                f"checkpoint {refs[0].path} is corrupt; see the warning above",
                path=refs[0].path,
                step=step,
            )
        if refs:
            warnings.warn(
                f"no valid checkpoint in {self.root} ({len(refs)} found, all corrupt or incomplete); starting from step 0",
                errors.CorruptCheckpointWarning,
                stacklevel=2,
            )
        return 0

    @_one_call_at_a_time
    def step(
        self,
        state: statelib.TrainState,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        epoch_end: bool = False,
        samples: int | None = None,
        tokens: int | None = None,
    ) -> bool:
        """Tell the checkpointer that ``step`` optimizer steps are complete; saves when due.

        Call it *after* the optimizer step, with the number of completed steps, so a checkpoint
        never holds a half-done step (ANCHORS #2). If the monitored metric is in ``metrics`` and
        improved, a checkpoint is saved now even if the schedule is not due, so the best model is
        always on disk. ``samples``/``tokens``: what this step consumed, added to the run's
        counters (:attr:`samples_seen`, kept in the checkpoint) for ``Every(samples=/tokens=)``.

        Returns:
            True if a checkpoint was saved.

        Raises:
            StorageError: a background save (``async_save``) failed since the last call; its
                checkpoint was not committed, earlier ones are intact. Also: a save is due and
                the run folder is read-only.
            TypeError: ``state`` is not a ``TrainState`` (every call that takes one refuses
                it at once), ``step`` is not an int, a metric is not a number, or a count is
                not an int.
            ValueError: ``step`` is negative or ≥ 10**12, a count is negative, or the
                schedule counts samples (tokens) and none were passed.
        """
        self._in_owner("step")
        checks.check_state(state, "step")
        step = checks.check_step(step)
        metrics = checks.check_metrics(metrics)
        self._progress.count(samples=samples, tokens=tokens)
        self._begin_session()
        # Every step, not only saving ones: a background failure surfaces at the very next call
        # (never only logged). Non-blocking: it only looks at a finished save (or upload). A
        # failed save first; a failed upload after this step's own save (below).
        self._persister.raise_failure()
        saved = self._step(state, step, metrics, epoch_end)
        self._raise_upload_failure()
        return saved

    def _step(
        self,
        state: statelib.TrainState,
        step: int,
        metrics: Mapping[str, float] | None,
        epoch_end: bool,
    ) -> bool:
        if epoch_end:
            self._epochs_completed += 1
        # One decision for every rank, so ranks never disagree on whether to save (a
        # time-based schedule or a signal seen by one rank only would otherwise deadlock): the
        # schedule and the best metric are rank 0's; a preemption signal is anyone's — a
        # scheduler or `kill` may signal one rank only, and every rank must save and exit. One
        # all-reduce (max) of [signal, due, better], where only rank 0 contributes due/better,
        # costs what the broadcast of rank 0's decision did. One process: it returns its input.
        pending = self._signals.pending
        due = better = False
        if self.rank == 0 and not pending:
            due, better = self._due(step, metrics, epoch_end)
        signum, due_i, better_i = self._group.max_ints(
            [pending or 0, int(due), int(better)], what=f"step {step} save decision"
        )
        if signum:
            name = signals.signal_name(signum)
            self._save(state, step, metrics, reason=f"signal {name}", blocking=True)
            if self.exit_on_signal:
                if self.rank == 0:
                    log.warning(
                        "saved step %d after %s; exiting with status %d", step, name, EXIT_PREEMPTED
                    )
                try:
                    self.close()
                except errors.StorageError as exc:
                    # A failed upload must not turn a preemption into a crash: the job is
                    # requeued on 75 and resumes from the cache, or the remote's newest.
                    log.error(
                        "step %d is saved in the cache %s, but an upload to the remote failed: "
                        "%s", step, self.store.describe(), exc,
                    )  # fmt: skip
                raise SystemExit(EXIT_PREEMPTED)
            self.preempted = True
            self._signals.clear()
            return True
        if not (due_i or better_i):
            self._reserve_staging(state)
            return False
        reason = "best" if better_i and not due_i else "schedule"
        return (
            self._save(state, step, metrics, reason=reason, blocking=not self.async_save)
            is not None
        )

    def _reserve_staging(self, state: statelib.TrainState) -> None:
        """After a restore that loaded a checkpoint, or at the first step that does not save,
        with ``async_save`` in one process: fault in the host memory of the first snapshot on a
        background thread (HostPool.reserve), so the first save's stall is a copy, not a copy
        plus the page faults of its buffers. (Under torch.distributed a rank stages only its
        share, not known before the first save.)"""
        if self._reserved or not self.async_save or self._save_group.distributed:
            return
        self._reserved = True
        if self._pool.nbytes == 0:
            try:
                nbytes = statelib.host_bytes(state)
            except Exception as exc:  # noqa: BLE001 - a step that does not save never fails on it
                log.debug("no memory reserved for the first snapshot: %s", exc)
                return
            # room for each buffer's alignment and what is not counted (the RNG states)
            self._pool.reserve(nbytes + nbytes // 100 + (1 << 20) if nbytes else 0)

    def _due(
        self, step: int, metrics: Mapping[str, float] | None, epoch_end: bool
    ) -> tuple[bool, bool]:
        """(the schedule is due, the monitored metric improved and best-K is on)."""
        due = self.save_policy.due(
            step=step,
            epoch_end=epoch_end,
            epochs_completed=self._epochs_completed,
            seconds_since_save=time.monotonic() - self._last_save_time,
            **self._progress.due_args(time.time()),
        )
        better = False
        monitor = self.keep.monitor
        if monitor and metrics is not None and monitor in metrics:
            is_better = policy.improved(float(metrics[monitor]), self._best, self.keep.mode)
            better = is_better and self.keep.best > 0
            if not is_better:
                log.info(
                    "step %d: %s did not improve from %s",
                    step,
                    monitor,
                    checks.fmt_metric(self._best, self.keep.mode),
                )
        return due, better

    @_one_call_at_a_time
    def save(
        self, state: statelib.TrainState, step: int, *, metrics: Mapping[str, float] | None = None
    ) -> Path | Location:
        """Save now, whatever the schedule says (e.g. at the end of training); blocks until the
        checkpoint is committed. Returns its folder (a Path in a local run folder)."""
        path = self._save(state, step, metrics, reason="explicit", blocking=True)
        assert isinstance(path, (Path, Location))
        self._raise_upload_failure()
        return path

    @_one_call_at_a_time
    def save_async(
        self, state: statelib.TrainState, step: int, *, metrics: Mapping[str, float] | None = None
    ) -> persist.SaveHandle[Path] | None:
        """Snapshot the state into host buffers and persist it in the background.

        Returns once the snapshot is consistent: mutating the model afterwards cannot change the
        checkpoint. If a save is still persisting, waits for it (``when_busy="wait"``) or skips
        this one and returns None (``when_busy="skip"``). A background failure is raised by the
        next ``save``/``save_async``/``step``/``wait``/``close`` call.
        """
        handle = self._save(state, step, metrics, reason="explicit", blocking=False)
        assert handle is None or isinstance(handle, persist.SaveHandle)
        self._raise_upload_failure()
        return handle

    @_one_call_at_a_time
    def adopt(
        self,
        source: str | os.PathLike[str],
        state: statelib.TrainState,
        *,
        step: int,
        mapping: Mapping[str, str],
        metrics: Mapping[str, str] | None = None,
        cfg: str | None = None,
        partial: bool = False,
    ) -> Path:
        """Import a checkpoint written by another tool into this run, then save it here.

        Reads ``source`` safely (any format :func:`savegame.open` reads; torch files through
        the restricted unpickler, GPU-saved files onto the CPU), loads the mapped parts into the
        live objects, and commits them as step ``step`` of this run, so training continues
        there and later restarts resume normally.

        Args:
            source: The foreign checkpoint file.
            state: The live objects to load into (and save).
            step: The step the imported state stands for (e.g. ``epoch * steps_per_epoch``).
            mapping: Destination -> source path ("/"-separated). A destination naming a
                Stateful object gets ``load_state_dict`` of that subtree; ``"dict/key"`` sets
                one entry of a dict in the state.
            metrics: Metric name -> source path, recorded so best-K knows the imported value.
            cfg: Darknet ``.cfg`` for a ``.weights`` source.
            partial: Accept a darknet ``.weights`` file that holds fewer layers than its cfg
                (a backbone-only file such as ``darknet53.conv.74``); the rest stay as built.

        Example (the classic PyTorch tutorial checkpoint)::

            ckpt.adopt("checkpoint.pth.tar", state, step=epoch * steps_per_epoch,
                       mapping={"model": "state_dict", "optimizer": "optimizer",
                                "extras/epoch": "epoch", "extras/best_acc": "best_accuracy"},
                       metrics={"val_acc": "best_accuracy"})

        Raises:
            CheckpointNotFoundError: a source path in ``mapping`` does not exist in the file.
            RestoreError: an object refuses the imported state.
        """
        self._in_owner("adopt")
        checks.check_state(state, "adopt")
        step = checks.check_step(step)
        self._refuse_existing_step(step)  # before any live object is changed
        values = adoptlib.load_foreign(
            source, state, mapping=mapping, metrics=metrics, cfg=cfg, partial=partial
        )
        path = self._save(
            state, step, values, reason=f"adopted from {os.fspath(source)}", blocking=True, new=True
        )
        assert isinstance(path, (Path, Location))
        return path

    def _refuse_existing_step(self, step: int) -> None:
        """``StepExistsError`` if this run has a committed checkpoint of ``step`` (one whose
        manifest reads; a damaged one is set aside by the save, as for any save)."""
        self._persister.wait()
        final = layout.step_dir(step)
        stores = [self.store] + ([self._tiers.remote] if self._tiers is not None else [])
        for store in stores:  # with a cache: the remote run's step counts too
            try:
                reader.read_manifest(Location(store, final))
            except errors.CheckpointError:
                continue
            break
        else:
            return
        raise errors.StepExistsError(
            f"step {step} is already committed at {store.describe(final)}; adopt commits a "
            "step per call, never into an existing one. Adopt at another step, or — for a "
            "checkpoint made of several files (a Hugging Face checkpoint-N folder) — adopt the "
            "folder once, mapping each part to its file (docs/resume.md)",
            path=store.describe(final),
            step=step,
        )

    @_one_call_at_a_time
    def wait(self) -> None:
        """Block until the save in flight (if any) is committed (in the cache, with ``cache``:
        uploads go on; ``close()`` waits for them); raise its error if it failed."""
        self._in_owner("wait")
        self._persister.wait()
        self._raise_background()

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint folder of the run (the remote one, with ``cache``) with its validity
        and why retention keeps it."""
        if self._tiers is not None:
            return self._tiers.list()
        return retention.list_run(self.store, self.keep, self.run_id)

    @_one_call_at_a_time
    def close(self) -> None:
        """Wait for the save in flight, restore the previous signal handlers and release the
        run folder's lock. Raises the in-flight save's error, if any (after cleaning up).
        In a forked child it only marks this copy closed: the run, its lock and its saves are
        the parent's."""
        if os.getpid() != self._pid:
            self._closed = True
            return
        try:
            self._persister.wait()
        finally:
            self._closed = True
            self._persister.stop()
            self._deleter.shutdown(wait=True)
            try:
                if self._tiers is not None:  # every rank: the uploads are collective
                    self._tiers.drain()
            finally:
                if self._session_open:
                    runfile.end_session(
                        self.store,
                        failed=self._session_failed,
                        estimates=self._progress.advisor.record(time.time()),
                    )
                self._close_quietly()

    def _in_owner(self, call: str) -> None:
        """A typed error in a forked child (a DataLoader worker, a ``multiprocessing`` fork
        Process, ``os.fork()``): it inherits this object but not its threads, so a save would
        wait for ever on a persist worker that does not exist there, and its writes would race
        the parent's, which owns the run and its lock."""
        if os.getpid() != self._pid:
            raise errors.CheckpointError(
                f"Checkpointer.{call}: the Checkpointer of {self.root} belongs to process "
                f"{self._pid}, not to this forked child (pid {os.getpid()}: a DataLoader worker or "
                "a multiprocessing fork Process); the parent saves the run — in a child, read "
                "checkpoints with sg.load / sg.open, or create a Checkpointer on another folder",
                path=self.root,
            )

    def _close_quietly(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        self._signals.restore()
        self._lock.release()
        if self._tiers is not None:
            self._tiers.release()

    def _raise_background(self) -> None:
        """Raise (once) what failed in the background: a save, else an upload."""
        self._persister.raise_failure()
        self._raise_upload_failure()

    def _raise_upload_failure(self) -> None:
        """Raise (once) a failed upload. ``step``/``save``/``save_async`` call it after their
        own save: it is in the cache, so a caller that catches the error and goes on has lost
        no checkpoint (stop 19, R15)."""
        if self._tiers is not None:
            self._tiers.raise_failure()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        # An exception leaving the block lost the work since the last save: a failure for the
        # learned MTBF (a SystemExit after a signal's save, or Ctrl-C, is not).
        self._session_failed = isinstance(exc[1], Exception)
        self.close()

    @property
    def samples_seen(self) -> int:
        """The run's sample counter: the sum of ``step(samples=)``, restored by ``restore``."""
        return self._progress.samples

    @property
    def tokens_seen(self) -> int:
        """The run's token counter: the sum of ``step(tokens=)``, restored by ``restore``."""
        return self._progress.tokens

    # ---- internals ----------------------------------------------------------------------------
    def _warn_rollback(self, step: int) -> None:
        """The first save after ``restore(step=)`` took a checkpoint older than the run's newest:
        say what training on in this run folder means (once)."""
        newer = [s for s in self._newer_than_restored if s > step]
        self._newer_than_restored = []
        if not newer or self.rank != 0:
            return
        shown = ", ".join(map(str, newer[:5])) + (" …" if len(newer) > 5 else "")
        warnings.warn(
            f"saving step {step} in {self.root}, which holds newer checkpoints ({shown}) from before "
            "the restore of an older one: a save of a step that exists is refused (StepExistsError), "
            "and retention keeps the newer ones as the 'last' (a restart resumes them, not this "
            "branch). To branch, start a new run folder with start_from=<the older checkpoint>; to "
            "drop the newer ones, delete their step-… folders",
            UserWarning,
            stacklevel=4,
        )
        log.warning("saving step %d below newer checkpoints of this run: %s", step, shown)

    def _save(
        self,
        state: statelib.TrainState,
        step: int,
        metrics: Mapping[str, float] | None,
        *,
        reason: str,
        blocking: bool,
        new: bool = False,
    ) -> Path | persist.SaveHandle[Path] | None:
        """Every rank: capture and stage this rank's share now (a capture failure raises here,
        on every rank, nothing written); write + commit (rank 0) now or on the persist thread.
        Retention runs on rank 0 only, after the commit. ``new``: never "the same save" as this
        process's last one of ``step`` (adopt: other content under the same step)."""
        entered = time.perf_counter()
        self._in_owner("save" if blocking else "save_async")
        checks.check_state(state, "save" if blocking else "save_async")
        step = checks.check_step(step)
        self._warn_rollback(step)
        metrics = checks.check_metrics(metrics)
        if self._closed:
            raise errors.CheckpointError(
                f"checkpointer for {self.root} is closed; create a new one", path=self.root
            )
        if not self.writable:
            raise errors.StorageError(
                f"cannot save step {step}: run folder {self.root} (or its lock file {layout.LOCK}) is not writable "
                "by this process (read-only mount or another user's run); restore works — to keep training, pass "
                "a writable folder "
                "(e.g. copy the run with `cp -r`)",
                path=self.root,
                step=step,
            )
        self._begin_session()
        final = layout.step_dir(step)
        if self._last_saved_step == step and not new:
            # already saved this step in this process (e.g. schedule + explicit): the same save,
            # still in flight (async) or committed, never a second write of it
            in_flight = self._persister.in_flight
            if not blocking and in_flight is not None and in_flight.step == step:
                return in_flight  # type: ignore[return-value]
            self._persister.wait()
            if self.store.exists(final):
                return self.store.local_path(final) or Location(self.store, final)
        if self._persister.busy and not blocking and self.when_busy == "skip":
            log.info("step %d: previous save still persisting; skipped (when_busy='skip')", step)
            return None
        self._persister.wait()  # one save in flight; raises a previous background failure
        self._persister.raise_failure()  # (an upload's: after this save, by the caller)
        clean_metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        info = {"reason": reason, "index": self._index, "epochs_completed": self._epochs_completed}
        info.update(self._progress.record(time.time()))
        t0 = time.perf_counter()
        stage = _stage_now if blocking else self._pool.stage
        # Capture + stage on the training thread, inside the protocol: a failure on any rank
        # raises here on every rank (one process: its own error), before this save counts.
        prepared = protocol.prepare(self._group, state, info, stage, root=self.root, step=step)
        improved_from: float | None | str = "n/a"
        monitor = self.keep.monitor
        if (
            monitor
            and monitor in clean_metrics
            and policy.improved(clean_metrics[monitor], self._best, self.keep.mode)
        ):
            improved_from, self._best = self._best, clean_metrics[monitor]
        self._index += 1
        self._last_save_time = time.monotonic()
        self._last_saved_step = step
        group, distributed = self._save_group, self._save_group.distributed

        def job() -> Path:
            try:
                path = protocol.persist(
                    group,
                    self.store,
                    step,
                    prepared,
                    run_id=self.run_id,
                    metrics=clean_metrics,
                    incremental=self.incremental,
                    previous=self._last_committed,
                )
            except errors.CheckpointError as exc:
                if exc.step is None:  # raised deep in the writer, which names only its file
                    exc.step = step
                raise
            self._last_committed = path.name
            self._progress.committed(time.perf_counter() - t0)
            if self.rank == 0:
                if improved_from != "n/a" and monitor:
                    log.info(
                        "step %d: %s improved from %s to %.4f, saved %s",
                        step, monitor, checks.fmt_metric(improved_from, self.keep.mode), clean_metrics[monitor], path.name,  # type: ignore[arg-type]
                    )  # fmt: skip
                else:
                    log.info(
                        "step %d: saved %s%s (%s, %.2fs)",
                        step, path.name, " on all ranks" if distributed else "", reason, time.perf_counter() - t0,
                    )  # fmt: skip
            return path

        def after() -> None:
            if self._tiers is not None:  # uploads, then retention on both tiers (every rank)
                self._tiers.committed(step)
            elif self.rank == 0:
                self._apply_retention(just_saved=step)

        if blocking:
            path = job()
            try:
                after()
            except Exception as exc:  # committed; only the housekeeping failed: say so, typed
                raise persist.as_checkpoint_error(
                    exc, step, committed=True, path=self.root
                ) from exc
            self._measured(entered)
            return path
        # The handle resolves at commit; retention runs right after on the same worker (still
        # "in flight" for wait()/close()/the next save), so deleting old checkpoints does not
        # delay "committed" (it was ~25% of a 0.2 GB async save on the CI VM).
        handle = self._persister.submit(job, step, after=after, path=self.root)
        self._measured(entered)
        return handle

    def _measured(self, entered: float) -> None:
        """A save gave the training loop back: its stall feeds the interval advice."""
        news = self._progress.stalled(time.perf_counter() - entered, at=entered, now=time.time())
        if news is not None and self.rank == 0:
            log.info("interval advice: %s", news)

    def _apply_retention(self, *, just_saved: int) -> None:
        if writer.take_scrub_damage(self.store):
            # The save found shared bytes damaged (engine/writer.py, the scrub): checkpoints
            # that refer to them were verified before; verify the kept ones again before
            # anything is deleted in their favour.
            self._verified.clear()
        self._verified.add(self.store.describe(layout.step_dir(just_saved)))  # we just wrote it
        plan = retention.plan_retention(
            self.store, self.keep, self.run_id, verified=self._verified, spare=just_saved
        )
        # Unlinking a multi-GB file takes 0.1-0.4 s; the checkpoint is already gone from the run
        # (renamed away), so the bytes are freed off the save path (close() waits for it).
        retention.delete_unkept(
            plan,
            spare=just_saved,
            keep=self.keep,
            release=lambda freer, name: self._deleter.submit(retention.free, freer, name),
            store=self.store,
        )
        # only folders still in the run stay known intact, and cached: one entry per save, for weeks
        kept = {str(i.path) for i in plan if i.kept_for or i.step == just_saved}
        self._verified.intersection_update(kept)
        for i in plan:
            if str(i.path) not in kept:
                reader.forget(i.path)

    # ---- opening the run (every rank; rank 0 holds the lock) --------------------------------------
    def _setup_ranks(self) -> str:
        """Every rank: rank 0 takes the lock, reads/creates run.json and collects garbage, then
        tells the others the run id (or the error, which every rank raises)."""
        outcome: tuple[str, Any] = ("ok", "")
        if self.rank == 0:
            try:
                run_id = self._open_run()
                pending = self._tiers.reconcile(run_id) if self._tiers and self.writable else []
                outcome = ("ok", (run_id, self.writable, pending))
            except errors.CheckpointError as exc:
                self._close_quietly()
                outcome = ("fail", exc)
        status, value = self._group.broadcast(outcome, what=f"opening run folder {self.root}")
        if status != "ok":
            raise value
        run_id, self.writable, pending = value
        if self._tiers is not None:
            self._tiers.follow(str(run_id), pending)
        return str(run_id)

    def _open_run(self) -> str:
        """Rank 0 / one process: take the lock, read (or create) run.json, remove leftovers."""
        if self._tiers is not None:  # the remote lease first, then the cache's own lock
            self._tiers.open_remote()
        run_id, self.writable = runfile.open_run(self.store, self.keep, self._lock)
        if self.writable:
            retention.collect_garbage(self.store)
            self._progress.learn(*runfile.start_session(self.store, run_id, write=False))
        return run_id

    def _end_snapshots(self) -> None:
        """The start-up is over (restored, or saving): reads ask the store again. (Taking the
        lease opened a snapshot of an object store's run: storage/objectstore.py.)"""
        objectstore.end_snapshot(self.store)
        if self._tiers is not None:
            objectstore.end_snapshot(self._tiers.remote)

    def _begin_session(self) -> None:
        """The run's session is recorded at the first step or save: one opened only to list or
        restore never is, so forgetting its close() is never taken for a crash."""
        self._end_snapshots()
        if self._tiers is not None and self.writable and not self._closed:
            self._tiers.start()  # every rank: uploads an earlier session left pending
        if not self._session_open and self.rank == 0 and self.writable and not self._closed:
            self._session_open = True
            self._progress.learn(*runfile.start_session(self.store, self.run_id))

    # ---- restore's skipped checkpoints --------------------------------------------------------
    def _candidates(self) -> list[reader.CheckpointRef]:
        """Every rank: the checkpoints restore may take. A listing or manifest read that fails
        on one rank (a 503) raises on every rank alike, instead of leaving the others waiting
        in restore's first collective until the timeout."""
        own: errors.CheckpointError | None = None
        refs: list[reader.CheckpointRef] = []
        try:
            refs = self._tiers.refs() if self._tiers else reader.list_checkpoints(self.store)
        except errors.CheckpointError as exc:
            own = exc
        group = self._group
        if not group.distributed:
            if own is not None:
                raise own
            return refs
        what = f"listing the checkpoints of {self.root}"
        if group.max_int(int(own is not None), what=what):
            said = group.gather(None if own is None else f"{type(own).__name__}: {own}", what=what)
            if own is not None:
                raise own
            r, msg = min((r, m) for r, m in enumerate(said) if m is not None)
            raise errors.StorageError(
                f"rank {r} could not list the checkpoints of {self.root}: {msg}; nothing was "
                "restored on any rank",
                path=self.root,
            )
        return refs

    def _warn_skip(self, path: Path, exc: BaseException | None) -> None:
        # (restore skips a checkpoint it could not read only for another copy of its step)
        then = (
            "reading the other copy of its step"
            if isinstance(exc, errors.StorageError)
            else "falling back to an earlier one"
        )
        warnings.warn(
            f"skipping checkpoint {path}: {exc}; {then}",
            errors.CorruptCheckpointWarning,
            stacklevel=3,
        )
        if not isinstance(exc, errors.StorageError):  # only proven damage is ever set aside
            self._suspects.append((path, exc))

    def _set_aside_suspects(self) -> None:
        """The lock holder sets aside what restore skipped, once proven damaged (issue 9.8)."""
        suspects, self._suspects = self._suspects, []
        if self.rank == 0 and self.writable and not self._closed:
            restoring.set_aside_damaged(suspects)


def _pinned(where: Any) -> Any:
    """A local run folder as the real, absolute path it names now: a relative path would
    follow a later ``os.chdir``, and a symlink re-pointed mid-run (``runs/current``) would move
    the saves into another folder, maybe another live run's, whose lock this one never took."""
    if where is None or isinstance(where, Store):
        return where
    if isinstance(where, str) and urls.is_url(where):
        return where
    try:
        return Path(os.path.realpath(where))
    except OSError as exc:  # a relative path in a working folder that was deleted
        raise errors.StorageError(
            f"cannot find run folder {os.fspath(where)!r}: {exc.strerror or exc} (the working "
            "folder is gone?); pass an absolute path",
            path=os.fspath(where),
        ) from exc


def _abandoned(
    handlers: signals.PreemptionSignals,
    lock: runfile.Lock,
    deleter: ThreadPoolExecutor,
    persister: persist.Persister,
    pid: int,
) -> None:
    """What ``close()`` gives back, for a Checkpointer collected without it (no reference to
    the Checkpointer: it is gone; this may run on any thread). The lock goes last, once the
    checkpoints retention took out of view are freed: the next writer would free them too.
    Nothing in a forked child: what it holds is the parent's."""
    if os.getpid() != pid:
        return
    handlers.abandon()
    persister.stop()
    if threading.current_thread() in getattr(deleter, "_threads", ()):
        deleter.submit(lock.release)  # after the deletions queued before it (one worker)
        deleter.shutdown(wait=False)
        return
    deleter.shutdown(wait=True)
    lock.release()


def _stage_now(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A blocking save's staging: contiguous CPU tensors (no copy for those that already are)."""
    return {k: writer.stage_cpu(t, k) for k, t in tensors.items()}
