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
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import numbers
import os
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from savegame import errors, policy
from savegame import state as statelib
from savegame import tree as treelib
from savegame.distributed import collectives, protocol
from savegame.engine import persist, reader, staging, writer
from savegame.format import layout
from savegame.storage import local

log = logging.getLogger("savegame")

__all__ = ["EXIT_PREEMPTED", "Checkpointer", "CheckpointInfo"]

#: Exit status after a preemption save (EX_TEMPFAIL, "try again"): non-zero so that schedulers
#: (Kubernetes, SLURM --requeue, torchrun --max-restarts) restart the job rather than count it
#: as finished.
EXIT_PREEMPTED = 75

PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None
)


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One checkpoint of a run, as listed by :meth:`Checkpointer.list` and ``savegame ls``."""

    step: int
    path: Path
    valid: bool
    created: float | None
    size: int
    metrics: Mapping[str, float]
    ours: bool  # written by this run family (run.json); only those are ever deleted
    kept_for: tuple[str, ...]  # retention reasons; () = would be pruned
    error: str | None
    #: "checkpoint" (a step-… folder), "damaged" (set aside after failing verification: kept for
    #: inspection, never restored or counted by retention) or "leftover" (a ``.tmp-`` folder: a
    #: save in progress, or garbage from an interrupted one that the next writer removes).
    kind: Literal["checkpoint", "damaged", "leftover"] = "checkpoint"


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
        root: str | os.PathLike[str],
        *,
        save: policy.Every | None = None,
        keep: policy.Keep | None = None,
        handle_signals: bool = True,
        exit_on_signal: bool = True,
        async_save: bool = False,
        when_busy: Literal["wait", "skip"] = "wait",
    ) -> None:
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy={when_busy!r}: use 'wait' or 'skip'")
        self.async_save = async_save
        self.when_busy = when_busy
        self._persister = persist.Persister()
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-delete")
        self._pool = staging.HostPool()
        self.root = Path(root)
        self.save_policy = save if save is not None else policy.Every(seconds=1800)
        self.keep = keep if keep is not None else policy.Keep(last=3)
        self.exit_on_signal = exit_on_signal
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.StorageError(
                f"cannot create run folder {self.root}: {exc}; pass a folder path (a run folder holds one "
                "step-… folder per checkpoint)",
                path=self.root,
            ) from exc
        # Under torchrun (an initialized process group) every rank builds its Checkpointer here;
        # rank 0 alone holds the lock, owns run.json and collects garbage (docs/distributed.md).
        # (A process group of size 1 takes this path too: its state may hold DTensors.)
        rank, _ = collectives.rank_and_world()
        self.rank = rank
        self._group = collectives.Group() if collectives.initialized() else None
        self._save_group = collectives.Group() if collectives.initialized() else None  # persist thread only
        self._lock: Any = local.RunLock(self.root, layout.LOCK) if rank == 0 else _RankLock()
        self._closed = False
        #: False when this process cannot write the run folder (a read-only mount, another user's
        #: run): restore works, a save raises StorageError (issue 9.9).
        self.writable = True
        self._suspects: list[tuple[Path, BaseException | None]] = []  # skipped by restore
        self._verified: set[str] = set()  # checkpoint folders known intact in this process
        self._old_handlers: dict[int, Any] = {}
        try:
            if self._group is None:
                self.run_id = self._open_run()
            else:
                self.run_id = self._setup_ranks(self._group)
            self._epochs_completed = 0
            self._index = self._next_index()
            self._last_save_time = time.monotonic()
            self._last_saved_step: int | None = None
            self._best: float | None = self._best_on_disk()
            self._signal: int | None = None
            self.preempted = False
            if handle_signals:
                self._install_signal_handlers()
        except BaseException:
            # A failed constructor must not keep the run folder locked: a retry in this process
            # would otherwise get LockedError naming itself.
            self._close_quietly()
            raise

    # ---- public API ---------------------------------------------------------------------------
    def restore(
        self, state: statelib.TrainState, *, step: int | None = None, per_rank: Literal["strict", "fresh"] = "strict"
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

        Returns:
            The number of completed steps to continue from; 0 on a fresh run.

        Raises:
            CheckpointNotFoundError: ``step`` was given and does not exist.
            RestoreError: a checkpoint is valid but does not fit ``state`` (different objects,
                or per-rank state on a different world size with ``per_rank="strict"``).
        """
        self._persister.wait()
        try:
            return self._restore(state, step, per_rank)
        finally:
            self._set_aside_suspects()

    def _restore(self, state: statelib.TrainState, step: int | None, per_rank: Literal["strict", "fresh"]) -> int:
        if step is not None:
            step = _check_step(step)
        refs = reader.list_checkpoints(self.root)
        # Older step folders whose manifest is damaged are never reached by the loop below and
        # never restorable either: set them aside too (listed as damaged, out of the way).
        self._suspects += [(r.path, r.error) for r in refs if isinstance(r.error, errors.FormatError)]
        if step is not None:
            refs = [r for r in refs if r.step == step]
            if not refs:
                raise errors.CheckpointNotFoundError(f"no checkpoint for step {step} in {self.root}", path=self.root, step=step)
        sharded = self._group is not None or any(r.manifest is not None and r.manifest.world_size > 1 for r in refs)
        if sharded:
            done = protocol.restore(self._group, refs, state, per_rank=per_rank, skip=self._warn_skip)
            if done is not None and done.manifest is not None:
                self._epochs_completed = int(done.manifest.info.get("epochs_completed", 0))
                self._last_save_time = time.monotonic()
                self._last_saved_step = done.step
                self._verified.add(str(done.path))
                log.info("restored step %d from %s (rank %d)", done.step, done.path, self.rank)
                return done.step
        for ref in reversed([] if sharded else refs):
            if ref.error is not None or ref.manifest is None:
                self._warn_skip(ref.path, ref.error)
                continue
            try:
                tensors = reader.load_tensors(ref.path, ref.manifest, dest=_live_destinations(state))
                tree = treelib.decode(ref.manifest.trees[0], tensors, path=ref.path / layout.MANIFEST)
            except (errors.FormatError, errors.StorageError) as exc:
                self._warn_skip(ref.path, exc)
                continue
            # A run saved through DDP before savegame unwrapped it has "module."-prefixed keys.
            tree = protocol.match_wrapper_keys(state, tree)
            statelib.apply(state, tree, where=str(ref.path))
            info = ref.manifest.info
            self._epochs_completed = int(info.get("epochs_completed", 0))
            self._last_save_time = time.monotonic()
            self._last_saved_step = ref.step
            self._verified.add(str(ref.path))
            log.info("restored step %d from %s", ref.step, ref.path)
            return ref.step
        if refs and step is not None:
            raise errors.RestoreError(f"checkpoint {refs[0].path} is corrupt; see the warning above", path=refs[0].path, step=step)
        if refs:
            warnings.warn(
                f"no valid checkpoint in {self.root} ({len(refs)} found, all corrupt or incomplete); starting from step 0",
                errors.CorruptCheckpointWarning,
                stacklevel=2,
            )
        return 0

    def step(
        self,
        state: statelib.TrainState,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        epoch_end: bool = False,
    ) -> bool:
        """Tell the checkpointer that ``step`` optimizer steps are complete; saves when due.

        Call it *after* the optimizer step, with the number of completed steps, so a checkpoint
        never holds a half-done step (ANCHORS #2). If the monitored metric is in ``metrics`` and
        improved, a checkpoint is saved now even if the schedule is not due, so the best model is
        always on disk.

        Returns:
            True if a checkpoint was saved.

        Raises:
            StorageError: a background save (``async_save``) failed since the last call; its
                checkpoint was not committed, earlier ones are intact. Also: a save is due and
                the run folder is read-only.
            TypeError: ``step`` is not an int, or a metric is not a number.
            ValueError: ``step`` is negative or ≥ 10**12.
        """
        step = _check_step(step)
        metrics = _check_metrics(metrics)
        # Every step, not only saving ones: a background failure surfaces at the very next call
        # (never only logged). Non-blocking: it only looks at a finished save.
        self._persister.raise_failure()
        if epoch_end:
            self._epochs_completed += 1
        if self._group is not None:
            return self._step_distributed(state, step, metrics, epoch_end)
        if self._signal is not None:
            signum = self._signal
            self._save(state, step, metrics, reason=f"signal {signal.Signals(signum).name}", blocking=True)
            if self.exit_on_signal:
                log.warning("saved step %d after %s; exiting with status %d", step, signal.Signals(signum).name, EXIT_PREEMPTED)
                self.close()
                raise SystemExit(EXIT_PREEMPTED)
            self.preempted = True
            self._signal = None
            return True
        due = self.save_policy.due(
            step=step,
            epoch_end=epoch_end,
            epochs_completed=self._epochs_completed,
            seconds_since_save=time.monotonic() - self._last_save_time,
        )
        better = False
        monitor = self.keep.monitor
        if monitor and metrics is not None and monitor in metrics:
            is_better = policy.improved(float(metrics[monitor]), self._best, self.keep.mode)
            better = is_better and self.keep.best > 0
            if not is_better:
                log.info("step %d: %s did not improve from %s", step, monitor, _fmt(self._best, self.keep.mode))
        if not (due or better):
            return False
        done = self._save(
            state, step, metrics, reason="best" if better and not due else "schedule", blocking=not self.async_save
        )
        return done is not None

    def save(self, state: statelib.TrainState, step: int, *, metrics: Mapping[str, float] | None = None) -> Path:
        """Save now, whatever the schedule says (e.g. at the end of training); blocks until the
        checkpoint is committed. Returns its folder."""
        path = self._save(state, step, metrics, reason="explicit", blocking=True)
        assert isinstance(path, Path)
        return path

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
        return handle

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
        from savegame import api
        from savegame.interop import base

        options: dict[str, Any] = {"cfg": cfg, "partial": True} if cfg and partial else {"cfg": cfg} if cfg else {}
        with api.open(source, **options) as r:
            tree = r.tree()

            def get(path: str) -> Any:
                node: Any = tree
                for part in path.split("/") if path else []:
                    if isinstance(node, Mapping):
                        # optimizer state dicts key by int: "state/0" means node[0]
                        key: Any = int(part) if part not in node and part.isdigit() else part
                    elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                        key = int(part)
                    else:
                        raise errors.CheckpointNotFoundError(f"{source}: no {path!r} in the file", path=source, key=path)
                    try:
                        node = node[key]
                    except (KeyError, IndexError):
                        raise errors.CheckpointNotFoundError(f"{source}: no {path!r} in the file", path=source, key=path) from None
                return _resolve(node, r)

            def _resolve(node: Any, rd: Any) -> Any:
                if isinstance(node, base.TensorRef):
                    return rd.read(node.name)
                if isinstance(node, Mapping):
                    return {k: _resolve(v, rd) for k, v in node.items()}
                if isinstance(node, list):
                    return [_resolve(v, rd) for v in node]
                if isinstance(node, tuple):
                    return tuple(_resolve(v, rd) for v in node)
                return node

            for dest, src in mapping.items():
                name, _, entry = dest.partition("/")
                if name not in state:
                    raise errors.RestoreError(f"adopt: the TrainState has no {name!r} (mapping {dest!r})", path=source)
                obj = state[name]
                value = get(src)
                try:
                    if entry:
                        obj[entry] = value
                    else:
                        obj.load_state_dict(value)
                except (TypeError, KeyError, ValueError, RuntimeError) as exc:
                    raise errors.RestoreError(
                        f"adopt {source}: loading {src!r} into {dest!r} failed: {type(exc).__name__}: {exc}",
                        path=source,
                        key=dest,
                    ) from exc
            values = {k: float(get(v)) for k, v in (metrics or {}).items()}
        path = self._save(state, step, values, reason=f"adopted from {os.fspath(source)}", blocking=True)
        assert isinstance(path, Path)
        return path

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        self._persister.wait()

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint folder of the run with its validity and why retention keeps it."""
        return list_run(self.root, self.keep, self.run_id)

    def close(self) -> None:
        """Wait for the save in flight, restore the previous signal handlers and release the
        run folder's lock. Raises the in-flight save's error, if any (after cleaning up)."""
        try:
            self._persister.wait()
        finally:
            self._closed = True
            self._deleter.shutdown(wait=True)
            self._close_quietly()

    def _close_quietly(self) -> None:
        for signum, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._old_handlers = {}
        self._lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------
    def _save(
        self,
        state: statelib.TrainState,
        step: int,
        metrics: Mapping[str, float] | None,
        *,
        reason: str,
        blocking: bool,
    ) -> Path | persist.SaveHandle[Path] | None:
        step = _check_step(step)
        metrics = _check_metrics(metrics)
        if self._closed:
            raise errors.CheckpointError(f"checkpointer for {self.root} is closed; create a new one", path=self.root)
        if not self.writable:
            raise errors.StorageError(
                f"cannot save step {step}: run folder {self.root} (or its lock file {layout.LOCK}) is not writable "
                "by this process (read-only mount or another user's run); restore works — to keep training, pass "
                "a writable folder "
                "(e.g. copy the run with `cp -r`)",
                path=self.root,
                step=step,
            )
        final = self.root / layout.step_dir(step)
        if self._last_saved_step == step:
            if blocking:
                self._persister.wait()
            if final.exists():  # already saved this step in this process (e.g. schedule + explicit)
                return final
        if self._persister.busy and not blocking and self.when_busy == "skip":
            log.info("step %d: previous save still persisting; skipped (when_busy='skip')", step)
            return None
        self._persister.wait()  # one save in flight; raises a previous background failure
        clean_metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        info = {"reason": reason, "index": self._index, "epochs_completed": self._epochs_completed}
        # Under torch.distributed the state is captured inside the save protocol (every rank
        # learns of a failure on any rank, docs/distributed.md), not here.
        skeleton, live = treelib.encode(statelib.capture(state)) if self._save_group is None else (None, {})
        improved_from: float | None | str = "n/a"
        monitor = self.keep.monitor
        if monitor and monitor in clean_metrics and policy.improved(clean_metrics[monitor], self._best, self.keep.mode):
            improved_from, self._best = self._best, clean_metrics[monitor]
        self._index += 1
        self._last_save_time = time.monotonic()
        self._last_saved_step = step
        t0 = time.perf_counter()
        if self._save_group is not None:
            return self._save_distributed(state, step, clean_metrics, info, reason, blocking, improved_from)

        def persist_job(staged: Mapping[str, Any], retention: bool = True) -> Path:
            path = writer.write_staged(self.root, step, skeleton, staged, run_id=self.run_id, metrics=clean_metrics, info=info)
            if improved_from != "n/a":
                log.info(
                    "step %d: %s improved from %s to %.4f, saved %s",
                    step, monitor, _fmt(improved_from, self.keep.mode), clean_metrics[monitor], path.name,  # type: ignore[arg-type,index]
                )  # fmt: skip
            else:
                log.info("step %d: saved %s (%s, %.2fs)", step, path.name, reason, time.perf_counter() - t0)
            if retention:
                self._apply_retention(just_saved=step)
            return path

        if blocking:
            return persist_job({k: writer.stage_cpu(t) for k, t in live.items()})
        staged = self._pool.stage(live)
        # The handle resolves at commit; retention runs right after on the same worker (still
        # "in flight" for wait()/close()/the next save), so deleting old checkpoints does not
        # delay "committed" (it was ~25% of a 0.2 GB async save on the CI VM).
        return self._persister.submit(
            lambda: persist_job(staged, retention=False), step, after=lambda: self._apply_retention(just_saved=step)
        )

    # ---- distributed (docs/distributed.md) ----------------------------------------------------
    def _setup_ranks(self, group: collectives.Group) -> str:
        """Every rank: rank 0 takes the lock, reads/creates run.json and collects garbage, then
        tells the others the run id (or the error, which every rank raises)."""
        outcome: tuple[str, Any] = ("ok", "")
        if self.rank == 0:
            try:
                outcome = ("ok", (self._open_run(), self.writable))
            except errors.CheckpointError as exc:
                self._lock.release()
                outcome = ("fail", exc)
        status, value = group.broadcast(outcome, what=f"opening run folder {self.root}")
        if status != "ok":
            raise value
        run_id, self.writable = value
        return str(run_id)

    def _step_distributed(
        self, state: statelib.TrainState, step: int, metrics: Mapping[str, float] | None, epoch_end: bool
    ) -> bool:
        """Every rank: rank 0 decides (schedule, best metric, preemption signal) and broadcasts,
        so ranks never disagree on whether to save (a time-based schedule or a signal seen by
        one rank only would otherwise deadlock)."""
        assert self._group is not None
        due = better = False
        if self.rank == 0:
            due = self.save_policy.due(
                step=step,
                epoch_end=epoch_end,
                epochs_completed=self._epochs_completed,
                seconds_since_save=time.monotonic() - self._last_save_time,
            )
            monitor = self.keep.monitor
            if monitor and metrics is not None and monitor in metrics:
                better = policy.improved(float(metrics[monitor]), self._best, self.keep.mode) and self.keep.best > 0
        signum, due_i, better_i = self._group.broadcast_ints(
            [self._signal or 0, int(due), int(better)], what=f"step {step} save decision"
        )
        if signum:
            self._save(state, step, metrics, reason=f"signal {signal.Signals(signum).name}", blocking=True)
            if self.exit_on_signal:
                if self.rank == 0:
                    log.warning("saved step %d after %s; exiting with status %d", step, signal.Signals(signum).name, EXIT_PREEMPTED)
                self.close()
                raise SystemExit(EXIT_PREEMPTED)
            self.preempted = True
            self._signal = None
            return True
        if not (due_i or better_i):
            return False
        reason = "best" if better_i and not due_i else "schedule"
        return self._save(state, step, metrics, reason=reason, blocking=not self.async_save) is not None

    def _save_distributed(
        self,
        state: statelib.TrainState,
        step: int,
        metrics: dict[str, float],
        info: dict[str, Any],
        reason: str,
        blocking: bool,
        improved_from: float | None | str,
    ) -> Path | persist.SaveHandle[Path]:
        """Every rank: stage this rank's share now; write + commit (rank 0) now or on the
        persist thread. Retention runs on rank 0 only, after the commit."""
        group = self._save_group
        assert group is not None
        stage = (lambda t: {k: writer.stage_cpu(v) for k, v in t.items()}) if blocking else self._pool.stage
        assert self._group is not None
        try:  # capture + compare + stage on the training thread; a capture failure anywhere raises here
            prepared = protocol.prepare(self._group, state, info, stage, root=self.root, step=step)
        except errors.DistributedSaveError:
            self._index -= 1  # nothing was written: this save does not count
            if improved_from != "n/a":
                self._best = improved_from  # type: ignore[assignment]
            self._last_saved_step = None
            raise
        t0 = time.perf_counter()
        monitor = self.keep.monitor

        def job() -> Path:
            path = protocol.persist(group, self.root, step, prepared, run_id=self.run_id, metrics=metrics)
            if self.rank == 0:
                if improved_from != "n/a" and monitor:
                    log.info("step %d: %s improved from %s to %.4f, saved %s", step, monitor,
                             _fmt(improved_from, self.keep.mode), metrics[monitor], path.name)  # type: ignore[arg-type]  # fmt: skip
                else:
                    log.info("step %d: saved %s on all ranks (%s, %.2fs)", step, path.name, reason, time.perf_counter() - t0)
            return path

        def retention() -> None:
            if self.rank == 0:
                self._apply_retention(just_saved=step)

        if blocking:
            path = job()
            retention()
            return path
        return self._persister.submit(job, step, after=retention)

    def _apply_retention(self, *, just_saved: int) -> None:
        self._verified.add(str(self.root / layout.step_dir(just_saved)))  # we just wrote it
        for info in self._retention_plan():
            if info.valid and info.ours and not info.kept_for and info.step != just_saved:
                try:
                    trash = local.move_to_trash(info.path, f"{layout.TMP_PREFIX}deleted-{info.path.name}-{uuid.uuid4().hex[:8]}")
                except OSError as exc:
                    log.warning("could not delete %s: %s", info.path, exc)
                    continue
                # Unlinking a multi-GB file takes 0.1-0.4 s; the checkpoint is already gone from
                # the run, so the bytes are freed off the save path (close() waits for it).
                self._deleter.submit(_free, trash)
                log.info("deleted %s (not kept by %s)", info.path.name, self.keep)

    def _open_run(self) -> str:
        """Rank 0 / one process: take the lock, read (or create) run.json, remove leftovers.

        A folder this process may read but not write (permissions, a read-only mount) opens
        read-only: restore works, saves raise :class:`StorageError`."""
        try:
            self._lock.acquire()
        except errors.StorageError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                raise
            self.writable = False
            log.info(
                "run folder %s (or its lock file) is not writable by this process (%s): opened read-only", self.root, cause
            )
            record = read_run_file(self.root)
            return str(record["run_id"]) if record else ""
        run_id = self._run_id()
        self._collect_garbage()
        return run_id

    def _retention_plan(self) -> list[CheckpointInfo]:
        return plan_retention(self.root, self.keep, self.run_id, verified=self._verified)

    def _run_id(self) -> str:
        """The run family's id from ``run.json`` (created on first use). The file also records
        the retention rule in force, so ``savegame ls``/``prune`` apply the run's own rule."""
        path = self.root / layout.RUN_FILE
        record = read_run_file(self.root)
        if record is None and path.exists():
            raise errors.FormatError(f"{path} is damaged; restore it or start a new run folder", path=path)
        run_id = str(record["run_id"]) if record else uuid.uuid4().hex
        keep = dataclasses.asdict(self.keep)
        if record is None or record.get("keep") != keep:
            created = record.get("created", time.time()) if record else time.time()
            local.atomic_write(path, json.dumps({"run_id": run_id, "created": created, "keep": keep}).encode())
        return run_id

    def _collect_garbage(self) -> None:
        # We hold the lock, so every temp folder belongs to a dead writer (kill -9, power cut)
        # or to a deletion that did not finish.
        for entry in os.scandir(self.root):
            if entry.name.startswith(layout.TMP_PREFIX) and entry.is_dir():
                log.info("removing leftover %s from an interrupted save or deletion", entry.name)
                _free(entry.path)

    def _ours(self) -> list[reader.CheckpointRef]:
        return [
            r for r in reader.list_checkpoints(self.root) if r.manifest is not None and r.manifest.run_id == self.run_id
        ]

    def _next_index(self) -> int:
        return max((int(r.manifest.info.get("index", -1)) for r in self._ours() if r.manifest), default=-1) + 1

    def _best_on_disk(self) -> float | None:
        if not self.keep.monitor:
            return None
        cands = [policy.Candidate(r.step, 0, r.manifest.metrics) for r in self._ours() if r.manifest]
        return policy.best_value(cands, self.keep.monitor, self.keep.mode)

    def _warn_skip(self, path: Path, exc: BaseException | None) -> None:
        warnings.warn(
            f"skipping checkpoint {path}: {exc}; falling back to an earlier one",
            errors.CorruptCheckpointWarning,
            stacklevel=3,
        )
        self._suspects.append((path, exc))

    def _set_aside_suspects(self) -> None:
        """Set aside the checkpoints restore skipped, once they are proven damaged (issue 9.8).

        A damaged newest checkpoint left in place would collide with the next save of its step
        and be counted by retention forever. Only the lock holder (one process / rank 0) moves
        anything, after every rank finished reading; a checkpoint skipped for a reason that is not
        damage (a newer format version, a storage error that does not recur) stays."""
        suspects, self._suspects = self._suspects, []
        if self.rank != 0 or not self.writable or self._closed:
            return
        seen: set[Path] = set()
        for path, exc in suspects:
            if path in seen:
                continue
            seen.add(path)
            if isinstance(exc, errors.UnsupportedFormatError) or not path.is_dir():
                continue
            step = layout.parse_step_dir(path.name)
            if step is None:
                continue
            problems = reader.damage(path)
            if problems:
                with contextlib.suppress(OSError):
                    writer.set_aside_damaged(path, step, problems[0])

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("Checkpointer created outside the main thread: preemption signals are not handled")
            return
        for signum in PREEMPTION_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._signal = signum
        log.warning("received %s: will save at the next step boundary", signal.Signals(signum).name)


class _RankLock:
    """Stands in for the run lock on ranks other than 0 (rank 0 holds the real one)."""

    held = True

    def acquire(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False


def list_run(
    root: str | os.PathLike[str],
    keep: policy.Keep | None = None,
    run_id: str | None = None,
    *,
    aside: bool = False,
) -> list[CheckpointInfo]:
    """Checkpoints of a run folder with validity (manifest level) and retention reasons.

    ``run_id`` and ``keep`` default to the folder's ``run.json`` (written by the Checkpointer).
    With ``aside=True`` (``savegame ls``), damaged checkpoints set aside and leftover temp
    folders follow, with ``kind`` "damaged" / "leftover" (never retention candidates).
    """
    root = Path(root)
    record = read_run_file(root)
    if run_id is None and record is not None:
        run_id = str(record["run_id"])
    if keep is None:
        keep = policy.Keep(**record["keep"]) if record and isinstance(record.get("keep"), dict) else policy.Keep(last=3)
    refs = reader.list_checkpoints(root)
    ours = [r for r in refs if r.manifest is not None and r.manifest.run_id == run_id]
    cands = [policy.Candidate(r.step, int(r.manifest.info.get("index", 0)), r.manifest.metrics) for r in ours if r.manifest]
    kept = policy.retain(cands, keep)
    out = []
    for r in refs:
        m = r.manifest
        size = sum(f.size for f in m.files.values()) if m else _du(r.path)
        mine = m is not None and m.run_id == run_id
        out.append(
            CheckpointInfo(
                step=r.step,
                path=r.path,
                valid=r.valid,
                created=m.created if m else None,
                size=size,
                metrics=dict(m.metrics) if m else {},
                ours=mine,
                kept_for=tuple(kept.get(r.step, ())) if mine else ("not ours",),
                error=str(r.error) if r.error else None,
            )
        )
    if aside:
        out.extend(_set_aside(root))
    return out


def _set_aside(root: Path) -> list[CheckpointInfo]:
    """Damaged checkpoints set aside and temp folders, for ``ls``: never retention candidates."""
    out = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            step = layout.parse_damaged_dir(entry.name)
            if step is not None:
                kind: Literal["damaged", "leftover"] = "damaged"
                why = "set aside: failed verification (kept for inspection; delete it when done)"
            elif entry.name.startswith(layout.TMP_PREFIX):
                kind, step = "leftover", -1
                why = "temp folder: a save in progress, or left by an interrupted save (the next writer removes it)"
            else:
                continue
            created: float | None = None
            with contextlib.suppress(OSError):
                created = entry.stat().st_mtime
            out.append(
                CheckpointInfo(
                    step=step, path=path, valid=False, created=created, size=_du(path), metrics={},
                    ours=False, kept_for=(), error=why, kind=kind,
                )  # fmt: skip
            )
    return out


def plan_retention(
    root: str | os.PathLike[str], keep: policy.Keep | None, run_id: str | None, *, verified: set[str]
) -> list[CheckpointInfo]:
    """The run's checkpoints with retention reasons, made safe to act on: nothing is deleted
    while a checkpoint kept in its place is damaged (issue 9.8). Used by the Checkpointer and
    ``savegame prune``; the caller holds the run folder's lock.

    Before a valid checkpoint may be deleted, every checkpoint retention keeps instead is
    verified once (``verified`` holds the folders already known intact, e.g. written or
    restored by this process, and is updated): a damaged one is set aside and the plan made
    again. This reads each older kept checkpoint once per process — on the save's thread, the
    persist worker for async saves.
    """
    while True:
        infos = list_run(root, keep, run_id)
        if not any(i.valid and i.ours and not i.kept_for for i in infos):
            return infos
        damaged = False
        for i in infos:
            if not (i.valid and i.ours and i.kept_for) or str(i.path) in verified:
                continue
            problems = reader.damage(i.path)
            if not problems:
                verified.add(str(i.path))
                continue
            try:
                writer.set_aside_damaged(i.path, i.step, problems[0])
            except OSError as exc:  # cannot move it: delete nothing this time
                log.warning("could not set aside damaged %s: %s; retention deletes nothing", i.path, exc)
                return [dataclasses.replace(x, kept_for=x.kept_for or ("damaged kept",)) for x in infos]
            damaged = True
        if not damaged:
            return infos


def _live_destinations(state: statelib.TrainState) -> Any:
    """Map checkpoint tensors onto the live tensors they will end up in (parameters, existing
    optimizer moments), so restore copies once instead of allocating and copying again.
    The reader only writes into them after every hash verified."""
    try:
        _, live = treelib.encode(statelib.capture(state, loaders=False))
    except errors.EncodeError:
        return None

    def dest(key: str, entry: Any) -> Any:
        t = live.get(key)
        if (
            t is not None
            and t.device.type == "cpu"
            and t.is_contiguous()
            and tuple(t.shape) == tuple(entry.shape)
            and str(t.dtype).removeprefix("torch.") == entry.dtype
            and not t.requires_grad
        ):
            return t
        return None

    return dest


def read_run_file(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run.json`` of a run folder (run id, retention rule), or None if absent or unreadable."""
    try:
        record = json.loads((Path(root) / layout.RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "run_id" in record else None


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _fmt(v: float | None, mode: str) -> str:
    if v is None:  # Keras prints the starting point as -inf / inf too
        return "-inf" if mode == "max" else "inf"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4f}"


def _free(path: str | os.PathLike[str]) -> None:
    """Delete a folder taken out of the run; warn (never fail) if bytes cannot be freed."""
    failures: list[str] = []

    def note(_func: object, where: str, exc: object) -> None:
        failures.append(f"{where}: {exc[1] if isinstance(exc, tuple) else exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=note)
    else:  # onexc is new in 3.12 (onerror is deprecated there)
        shutil.rmtree(path, onerror=note)
    if failures:
        log.warning(
            "could not delete %s (%d errors, first: %s); its disk space is not freed — delete it by hand",
            path, len(failures), failures[0],
        )  # fmt: skip


def _check_step(step: object) -> int:
    """The step as an int, or a TypeError/ValueError that says what a step is (issue 9.11)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"step must be an int (the number of completed optimizer steps), got {type(step).__name__} {step!r}"
        )
    value = int(step)
    if not 0 <= value < 10**12:
        raise ValueError(f"step must be in [0, 10**12), got {value}")
    return value


def _check_metrics(metrics: object) -> dict[str, float] | None:
    """Metrics as ``{str: float}``; numbers, 0-d tensors and numpy scalars are accepted."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {type(k).__name__} {k!r}")
        if isinstance(v, (str, bytes)):
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__} {v!r}")
        try:
            out[k] = float(v)  # type: ignore[arg-type]
        except OverflowError as exc:  # an int too large for a float (10**400)
            raise ValueError(f"metric {k!r} = {v!r} does not fit a float") from exc
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__} {v!r}") from exc
    return out
