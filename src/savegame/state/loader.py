"""Data loaders in a :class:`~savegame.state.TrainState`: exact data order after a restore, and
worker processes that outlive a signal sent to the whole process group.

Invariants:

- Restoring a ``StatefulDataLoader`` draws nothing from the global torch RNG and builds no
  iterator: the iterator is built lazily, by the first ``iter(loader)`` (or ``state_dict()``)
  after the restore, so a ``sampler.set_epoch()`` called in between is honoured.
- A sampler with ``set_epoch`` (``DistributedSampler`` and look-alikes) gets back the epoch it had
  when the checkpoint was saved; resuming *mid-epoch* under another epoch would draw the rest of
  the epoch from another permutation, and is refused with :class:`RestoreError`.
- A loader restored with the batch size and number of workers it was saved with gets torchdata's
  own state untouched (bit-exact); with others, the position is carried over in samples of the
  same epoch order or refused (:mod:`savegame.state.position`).
- Worker processes of a loader in a ``TrainState`` (or passed to
  :func:`savegame.data.quiet_workers`) never act on SIGTERM / SIGUSR1 / SIGINT sent by anyone but
  their own loader's process: the main process decides (it saves at the next step boundary and
  then shuts the workers down); workers still exit when it exits or dies.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Callable
from multiprocessing import resource_tracker
from typing import Any

import torch

from savegame import errors
from savegame.state import position

__all__ = [
    "BATCH_SIZE_KEY",
    "BUILD_RNG_KEY",
    "GENERATOR_KEY",
    "SAMPLER_EPOCH_KEY",
    "guard",
    "load",
    "state_dict",
]

#: Keys added to a loader's state tree: the epoch of its sampler, the state of the loader's own
#: ``generator=``, and its batch size (what its batch counts are counted in), when saved.
#: torchdata's own keys start with ``_`` too; the ``savegame`` prefix keeps them apart.
SAMPLER_EPOCH_KEY = "_savegame_sampler_epoch"
GENERATOR_KEY = "_savegame_generator"
BATCH_SIZE_KEY = "_savegame_batch_size"
#: The random state the current epoch's iterator was built from (the global torch RNG and the
#: samplers' own ``torch.Generator`` attributes), for samplers torchdata replays (below).
BUILD_RNG_KEY = "_savegame_build_rng"
_OURS = (SAMPLER_EPOCH_KEY, GENERATOR_KEY, BATCH_SIZE_KEY, BUILD_RNG_KEY)

#: The signals a scheduler sends to a whole job (``scancel``, ``kill -TERM -PGID``, torchrun's
#: forwarding, Ctrl-C): the same set the Checkpointer handles in the main process.
GROUP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s
    for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
    if s is not None
)

_CAN_MASK = hasattr(signal, "pthread_sigmask")


def _is_stateful_loader(obj: Any) -> bool:
    # The lazy restore relies on torchdata's ``next_iter_state`` / ``_get_iterator`` contract
    # (torchdata 0.8-0.11): check for both rather than trusting the type name alone.
    return (
        type(obj).__module__.startswith("torchdata.stateful_dataloader")
        and hasattr(obj, "next_iter_state")
        and callable(getattr(type(obj), "_get_iterator", None))
    )


def is_loader(obj: Any) -> bool:
    """Whether ``obj`` is a data loader (torchdata's ``StatefulDataLoader`` or any
    ``torch.utils.data.DataLoader`` subclass with a state): its state holds positions, not
    tensors a checkpoint is read into."""
    from torch.utils.data import DataLoader

    return _is_stateful_loader(obj) or isinstance(obj, DataLoader)


def _epoch_sampler(loader: Any) -> Any:
    """The sampler whose ``set_epoch`` decides the loader's order, or None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for candidate in (
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        if callable(getattr(candidate, "set_epoch", None)) and isinstance(
            getattr(candidate, "epoch", None), int
        ):
            return candidate
    return None


def state_dict(obj: Any) -> Any:
    """``obj.state_dict()``; for a ``StatefulDataLoader`` plus its batch size, the sampler
    epoch when its sampler has one, and its ``generator=``'s state when given one."""
    sd = obj.state_dict()
    if _is_stateful_loader(obj) and isinstance(sd, dict):
        # None (a custom batch_sampler without a batch_size) is kept too: "not known" is what
        # lets a change to or from one be refused instead of resumed at the wrong sample.
        sd = {**sd, BATCH_SIZE_KEY: position.batch_size_of(obj)}
        sampler = _epoch_sampler(obj)
        if sampler is not None:
            sd = {**sd, SAMPLER_EPOCH_KEY: int(sampler.epoch)}
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator):
            sd = {**sd, GENERATOR_KEY: generator.get_state()}
        guard_ = vars(obj).get("_get_iterator")
        if isinstance(guard_, _IteratorGuard):
            built = guard_.built_for_state()
            if built is not None:
                sd = {**sd, BUILD_RNG_KEY: built}
    return sd


def _sampler_generators(loader: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` attributes of the loader's samplers (``RandomSampler(ds,
    generator=g)``, ``WeightedRandomSampler``, a user's sampler holding ``self.g``), by path;
    the loader's own ``generator=`` is saved apart (:data:`GENERATOR_KEY`)."""
    own = getattr(loader, "generator", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: dict[str, torch.Generator] = {}
    for where, obj in (
        ("sampler", getattr(loader, "sampler", None)),
        ("batch_sampler", batch_sampler),
        ("batch_sampler.sampler", getattr(batch_sampler, "sampler", None)),
    ):
        attrs = getattr(obj, "__dict__", None)
        if not isinstance(attrs, dict):
            continue
        for attr, value in attrs.items():
            if (
                isinstance(value, torch.Generator)
                and value is not own
                and value.device.type == "cpu"
            ):
                found.setdefault(f"{where}.{attr}", value)
    return found


def load(obj: Any, sd: Any, *, name: str, where: str) -> None:
    """``obj.load_state_dict(sd)``; for a ``StatefulDataLoader`` also set the saved sampler epoch
    and arm the lazy, RNG-neutral build of the restored iterator (see :class:`_IteratorGuard`)."""
    epoch: int | None = None
    generator_state: torch.Tensor | None = None
    batch_size: int | None | position.Unsaved = position.UNSAVED
    built: Any = None
    if isinstance(sd, dict) and any(k in sd for k in _OURS):
        sd = dict(sd)
        built = sd.pop(BUILD_RNG_KEY, None)
        saved = sd.pop(SAMPLER_EPOCH_KEY, None)
        epoch = saved if isinstance(saved, int) and not isinstance(saved, bool) else None
        saved = sd.pop(GENERATOR_KEY, None)
        generator_state = saved if isinstance(saved, torch.Tensor) else None
        if BATCH_SIZE_KEY in sd:  # absent: saved by an older savegame, batch size unknown
            saved = sd.pop(BATCH_SIZE_KEY)
            batch_size = saved if isinstance(saved, int) and not isinstance(saved, bool) else None
    obj.load_state_dict(sd)
    if not _is_stateful_loader(obj):
        return
    sampler = _epoch_sampler(obj)
    if epoch is not None and sampler is not None:
        # The sampler is part of the loader's position: give it back the epoch the saved
        # iterator was drawn from, so restore -> iterate (no set_epoch) is exact too.
        sampler.set_epoch(epoch)
    if obj.next_iter_state is not None:
        _guard_of(obj).arm(
            name, where, obj.next_iter_state, epoch, generator_state, batch_size, built
        )


# ---- the iterator guard (main process) -----------------------------------------------------


class _IteratorGuard:
    """Stands in for a loader's ``_get_iterator`` (an instance attribute, so only loaders in a
    TrainState are affected) and wraps every iterator build of that loader.

    1. The first build after a restore — the one that resumes from ``next_iter_state`` — runs
       between ``torch.get_rng_state()`` and ``torch.set_rng_state()``. Building an iterator
       draws a worker base seed from the global torch RNG, which a resumed iterator then
       replaces with the saved one; the uninterrupted run made no such draw mid-epoch, so
       without the guard dropout etc. diverged right after resume (tests/test_exact_resume.py).
       Building it lazily, not inside ``restore()``, is what lets a ``set_epoch`` called after
       ``restore()`` decide the permutation, as with plain torchdata. Only that one build is
       guarded: a fresh epoch's iterator draws as it did in the uninterrupted run. Before it,
       the saved state is re-expressed for the loader's batch size and number of workers now
       (:func:`savegame.state.position.translate`: the same object when neither changed), here
       and not in ``restore()`` because ``num_workers`` may still be set in between.
       For a sampler without a ``state_dict`` (``sampler=RandomSampler(ds)``,
       ``WeightedRandomSampler``, ``SubsetRandomSampler``, a user's sampler with its own
       generator), torchdata resumes by drawing the epoch again and skipping what was consumed:
       that draw comes from the global torch RNG or the sampler's generator, which by then are
       past the epoch's start. So every build records the random state it starts from
       (:data:`BUILD_RNG_KEY`), and the resuming build starts from that recorded state: the
       redraw is the epoch's own permutation. (With ``persistent_workers`` the iterator is
       built once and reset for later epochs without a build: nothing is recorded there.)
    2. Every build that starts worker processes runs with the group signals blocked in the
       calling thread. Children inherit the mask through fork *and* exec, so a worker (or the
       forkserver / resource tracker that multiprocessing starts on the way) cannot die of a
       group signal in the window before its ``worker_init_fn`` sets up ``_QuietWorker``;
       pending signals reach the main process's handler when the mask is restored.
    """

    def __init__(self, loader: Any) -> None:
        self._loader = weakref.ref(loader)
        self._pending: Any = None
        self._name = self._where = ""
        self._epoch: int | None = None
        self._generator_state: torch.Tensor | None = None
        self._batch_size: int | None | position.Unsaved = position.UNSAVED
        self._translated = False
        self._built_from: Any = None
        #: The random state the loader's current iterator was built from (BUILD_RNG_KEY).
        self.built: Any = None

    def arm(
        self,
        name: str,
        where: str,
        pending: Any,
        epoch: int | None,
        generator_state: torch.Tensor | None,
        batch_size: int | None | position.Unsaved = position.UNSAVED,
        built: Any = None,
    ) -> None:
        self._name, self._where, self._pending, self._epoch = name, where, pending, epoch
        self._generator_state, self._batch_size = generator_state, batch_size
        self._translated = False
        self._built_from = built

    def built_for_state(self) -> Any:
        """What the loader's state records as its iterator's starting random state: the
        record of the current iterator, or, restored and not yet built, the record restored."""
        loader = self._loader()
        if loader is None:
            return None
        if self._pending is not None and loader.next_iter_state is self._pending:
            return self._built_from
        return self.built if getattr(loader, "_iterator", None) is not None else None

    def _mid_epoch(self, loader: Any) -> bool:
        """Whether the saved epoch is not finished: its order must be redrawn as it was, and
        torchdata's fast-forward over what was consumed must happen inside the guarded build.
        That includes a save after the epoch's last batch but before its end was seen (the
        README loop's ``epoch_end=True`` save): the fast-forward of a ``batch_sampler=``
        draws the epoch again, which moved the global RNG and every later epoch."""
        pos = position.read(self._pending)
        return pos is not None and not pos.finished

    def _record(self, loader: Any) -> Any:
        if getattr(loader, "persistent_workers", False):
            return None  # later epochs reuse the iterator: a record would be the first epoch's
        return {
            "torch": torch.get_rng_state(),
            "generators": {k: g.get_state() for k, g in _sampler_generators(loader).items()},
        }

    def _start_from(self, loader: Any, built: Any) -> None:
        """Put the global RNG and the samplers' generators where the saved epoch's build
        started (a record from a file: anything that does not fit is left alone)."""
        if not isinstance(built, dict):
            return
        state = built.get("torch")
        saved = built.get("generators")
        # torch's setters are the validators of a state (a wrong size or dtype raises): a record
        # they refuse is skipped, as an older checkpoint without one would be.
        with contextlib.suppress(RuntimeError, TypeError, ValueError):
            if isinstance(state, torch.Tensor):
                torch.set_rng_state(state)
        if isinstance(saved, dict):
            for key, g in _sampler_generators(loader).items():
                if isinstance(saved.get(key), torch.Tensor):
                    with contextlib.suppress(RuntimeError, TypeError, ValueError):
                        g.set_state(saved[key])

    def __call__(self) -> Any:
        loader = self._loader()
        if loader is None:  # pragma: no cover - the loader calls us, so it is alive
            raise RuntimeError("data loader was garbage collected")
        build = type(loader)._get_iterator
        restoring = self._pending is not None and loader.next_iter_state is self._pending
        if restoring:
            if not self._translated:  # once: a refused set_epoch below may be fixed and retried
                self._pending = loader.next_iter_state = position.translate(
                    self._pending,
                    self._batch_size,
                    position.batching(loader),
                    name=self._name,
                    where=self._where,
                    draw_seed=self._draw_seed,
                )
                self._translated = True
            self._check_epoch(loader)
        block = _CAN_MASK and getattr(loader, "num_workers", 0) > 0
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS) if block else None
        if block and _start_method(loader) != "fork":
            # multiprocessing's resource tracker (used by spawn and forkserver) *unblocks*
            # SIGINT/SIGTERM in the calling thread after it launches itself (ensure_running:
            # block, spawn, unblock), so the workers spawned after it had them unblocked in the
            # threads their interpreter starts before worker_init_fn (measured: killed by a
            # SIGTERM from another process). Launch it first, then block again.
            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
        try:
            if not restoring:
                self.built = self._record(loader)
                return build(loader)
            rng = torch.get_rng_state()
            try:
                mid_epoch = self._mid_epoch(loader)
                if mid_epoch:  # the epoch redrawn must be the saved one
                    self._start_from(loader, self._built_from)
                self.built = self._record(loader)
                it = build(loader)
                if mid_epoch:
                    _skip_now(it)
            finally:
                torch.set_rng_state(rng)
            _undo_double_count(it, self._pending)
            generator = getattr(loader, "generator", None)
            if self._generator_state is not None and isinstance(generator, torch.Generator):
                # The loader's own generator (``generator=``, the PyTorch reproducibility
                # recipe) feeds its shuffle and worker seeds: that build drew a seed from it,
                # and torchdata rewinds it to the epoch's start. Put it where the saved run
                # had it, or the next epoch's order differs (measured).
                generator.set_state(self._generator_state)
            self._pending, self._generator_state, self._built_from = None, None, None
            return it
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _draw_seed(self) -> int:
        """The workers' base seed for a single-process state resumed with workers: drawn as
        torch draws a fresh iterator's, from the saved ``generator=`` state or the global RNG,
        and without moving either (restoring draws nothing)."""
        generator = None
        if self._generator_state is not None:
            generator = torch.Generator()
            generator.set_state(self._generator_state)
        rng = torch.get_rng_state()
        try:
            return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        finally:
            torch.set_rng_state(rng)

    def _check_epoch(self, loader: Any) -> None:
        sampler = _epoch_sampler(loader)
        if self._epoch is None or sampler is None or sampler.epoch == self._epoch:
            return
        pos = position.read(self._pending)
        done, finished = (None, False) if pos is None else (pos.batches, pos.finished)
        try:
            total: int | None = len(loader)
        except TypeError:
            total = None
        if finished or done is None or (total is not None and done >= total):
            return  # at the epoch's end: the next batch comes from a new iterator anyway
        of = f" of {total}" if total is not None else ""
        raise errors.RestoreError(
            f"{self._where}: loader {self._name!r} resumes mid-epoch ({done}{of} batches of sampler epoch "
            f"{self._epoch} done), but its sampler was set to epoch {sampler.epoch} after restore(): the rest "
            "of the epoch would come from another permutation (samples repeated and skipped). restore() "
            f"already sets the saved epoch; call sampler.set_epoch({self._epoch}) or nothing before iterating "
            "the restored loader, i.e. ckpt.restore(state), then sampler.set_epoch(extras['epoch']) with the "
            "epoch counter kept in the TrainState, then `for batch in loader` (docs/distributed.md, "
            "'Data order')",
            path=self._where,
            key=self._name,
        )


def _skip_now(it: Any) -> None:
    """Make torchdata's skip of the consumed samples happen now, inside the guarded build.

    Resuming a sampler without a state in one process, torchdata (0.8-0.11) sets
    ``_sampler_iter = islice(index_sampler, n, None)``: the sampler is iterated, and draws its
    epoch (``RandomSampler`` draws its seed from the global RNG at its first ``next``), only at
    the first batch after the restore — from the RNG as the checkpoint left it, moving it too.
    Taking the first index now draws from the epoch's recorded start instead; it is put back in
    front, so the indices come out as before."""
    sampler_iter = getattr(it, "_sampler_iter", None)
    if not isinstance(sampler_iter, itertools.islice):
        return
    end = object()
    first = next(sampler_iter, end)
    it._sampler_iter = iter(()) if first is end else itertools.chain([first], sampler_iter)


def _undo_double_count(it: Any, state: Any) -> None:
    """Correct torchdata's count of batches after its naive fast-forward (torchdata 0.10-0.11,
    an ``IterableDataset`` with no ``state_dict``): ``load_state_dict`` sets the count to the
    saved N, then calls ``next()`` N times, each of which counts again, so the iterator says
    2N and the next checkpoint's position skips N batches (silently, with no workers; with
    workers the resume after it fails on the worker order). The fast-forward is recognised by
    the doubled count itself (a stateful dataset's resume leaves it at N), so a torchdata that
    fixes this is left alone. Written here because torchdata offers no hook for it."""
    if not isinstance(state, dict):
        return
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, dict):  # the multiprocess iterator's state
        snap, since = snapshot.get("_snapshot_step"), state.get("_steps_since_snapshot")
        if not (type(snap) is int and type(since) is int and snap > 0):
            return
        if getattr(it, "_num_yielded", None) != 2 * snap + since:
            return
        it._num_yielded -= snap
        taken = getattr(it, "_snapshot", None)  # snapshots taken during the fast-forward
        if isinstance(taken, dict) and type(taken.get("_snapshot_step")) is int:
            if taken["_snapshot_step"] > snap:
                taken["_snapshot_step"] -= snap
        return
    n = state.get("_num_yielded")
    if type(n) is int and n > 0 and getattr(it, "_num_yielded", None) == 2 * n:
        it._num_yielded = n
        if type(getattr(it, "_sampler_iter_yielded", None)) is int:
            it._sampler_iter_yielded -= n


def _start_method(loader: Any) -> str:
    ctx = getattr(loader, "multiprocessing_context", None)
    if ctx is not None:
        return str(ctx.get_start_method())
    # Not fixed yet: the platform's default is the first of all start methods (Python docs),
    # found without fixing it the way get_start_method() would.
    return (
        multiprocessing.get_start_method(allow_none=True)
        or multiprocessing.get_all_start_methods()[0]
    )


def _guard_of(loader: Any) -> _IteratorGuard:
    current = vars(loader).get("_get_iterator")
    if isinstance(current, _IteratorGuard):
        return current
    g = _IteratorGuard(loader)
    loader._get_iterator = g
    return g


# ---- worker processes ------------------------------------------------------------------------


class _QuietWorker:
    """``worker_init_fn`` wrapper: the worker ignores group signals, then the user's function
    runs. Module-level and holding only the user's function, so it pickles for the spawn and
    forkserver start methods."""

    def __init__(self, user_fn: Callable[[int], Any] | None) -> None:
        self.__wrapped__ = user_fn

    def __call__(self, worker_id: int) -> None:
        ignore_group_signals()
        if self.__wrapped__ is not None:
            self.__wrapped__(worker_id)

    def __repr__(self) -> str:
        return f"savegame.state.loader._QuietWorker({self.__wrapped__!r})"


def ignore_group_signals() -> None:
    """In a DataLoader worker: never act on SIGTERM/SIGUSR1/SIGINT, except a SIGTERM from the
    loader's own process (``Process.terminate()`` of a worker that did not stop in time, which
    torch's own worker handler also honours).

    The signals stay blocked and one daemon thread takes them with ``sigwaitinfo``, which tells
    who sent each; a Python handler cannot, and ``SIG_IGN`` would also ignore the loader's
    ``terminate()`` — then a hung worker would hang the interpreter's exit (multiprocessing joins
    daemonic children after terminating them). Where ``sigwaitinfo`` does not exist (macOS) the
    signals are ignored outright.
    """
    if not _CAN_MASK:  # Windows: no process groups to signal
        return
    if not hasattr(signal, "sigwaitinfo"):
        for s in GROUP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
        return
    # Block first (already blocked when the guard started this worker; not if the loader's
    # iterator was built by another path), in the main thread, before any other thread starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    owners = {os.getppid()}
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        owners.add(parent.pid)  # spawn/forkserver: the loader's process, not the forkserver
    threading.Thread(
        target=_take_signals, args=(owners,), name="savegame-worker-signals", daemon=True
    ).start()


def _take_signals(owners: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo(GROUP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid in owners:
            os._exit(0)  # the loader is shutting this worker down: torch's worker does the same


def guard(obj: Any, *, what: str) -> None:
    """Quiet a loader's workers and guard its iterator builds; for every loader in a TrainState
    and for :func:`savegame.data.quiet_workers`. Idempotent; anything but a torch
    ``DataLoader`` (``StatefulDataLoader`` is one) is left alone.

    ``what`` names the call in the warning given when the loader already runs workers started
    without the guard (iterated before): those die of a group signal, and persistent ones are
    never replaced.
    """
    if not isinstance(obj, torch.utils.data.DataLoader) or not callable(
        getattr(type(obj), "_get_iterator", None)
    ):
        return
    _guard_of(obj)
    fn = obj.worker_init_fn
    if not isinstance(fn, _QuietWorker):
        obj.worker_init_fn = _QuietWorker(fn)
    running = _unguarded_workers(obj)
    if running:
        persistent = bool(getattr(obj, "persistent_workers", False))
        warnings.warn(
            f"{what}: the loader already runs {running} worker process(es), started before this call; a "
            "SIGTERM/SIGUSR1/SIGINT sent to the whole process group (scancel, torchrun, Ctrl-C) kills them and "
            "the preemption save is lost"
            + (
                " (persistent_workers=True: they are never restarted)"
                if persistent
                else " until the next epoch"
            )
            + ". Call it before iterating the loader.",
            UserWarning,
            stacklevel=3,
        )


def _unguarded_workers(loader: Any) -> int:
    it = getattr(loader, "_iterator", None)
    workers = getattr(it, "_workers", None)
    if it is None or not workers or getattr(it, "_shutdown", True):
        return 0
    init = getattr(it, "_worker_init_fn", None)
    args = getattr(init, "args", ())  # a functools.partial (DataPipes) wraps ours
    if isinstance(init, _QuietWorker) or (
        isinstance(args, tuple) and args and isinstance(args[0], _QuietWorker)
    ):
        return 0
    return sum(1 for w in workers if w.is_alive())
