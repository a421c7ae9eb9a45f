"""Hugging Face Accelerate's ``save_state``/``load_state`` through savegame (issue 12;
docs/integrations-hf.md).

A thin wrapper, not hooks. Accelerate's ``register_save_state_pre_hook`` runs *before*
``save_accelerator_state`` and may only edit the list of model weights; the optimizer
(``optimizer.bin``, ``torch.save``), scheduler, sampler, GradScaler, RNG
(``random_states_N.pkl``) and ``register_for_checkpointing`` objects
(``custom_checkpoint_N.pkl``) are pickled after it, unconditionally, and
``register_load_state_pre_hook`` runs before the matching ``torch.load`` calls
(tested: tests/integrations/test_accelerate_integration.py). So the hooks cannot keep pickle
out; :func:`attach` instead replaces ``accelerator.save_state``/``load_state`` on that
accelerator with savegame's, over the same objects::

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(ema)           # included, as with Accelerate
    ckpt = sg_accelerate.attach(accelerator, "runs/exp", save=sg.Every(steps=500))
    step = accelerator.load_state()                       # newest *valid* checkpoint, or 0
    for batch in loader:
        ...                                               # forward, backward, step
        step += 1
        ckpt.step(step)                                   # saves on the strategy; signals -> 75
    accelerator.save_state()                              # a final checkpoint
    ckpt.close()

What is saved: every prepared model (unwrapped), optimizer, scheduler and data loader, the
GradScaler, every ``register_for_checkpointing`` object (``state_dict``/``load_state_dict``, no
pickle), ``accelerator.step`` and the save counter, and every RNG of the process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from savegame import errors, policy
from savegame import state as statelib
from savegame.checkpointer import Checkpointer
from savegame.integrations._common import InexactResumeWarning, UnsupportedSetupError, version_tuple

__all__ = [
    "SUPPORTED_ACCELERATE",
    "AccelerateCheckpointer",
    "DirectRandomSampler",
    "InexactResumeWarning",
    "UnsupportedSetupError",
    "attach",
    "check_version",
]

#: The Accelerate versions this module is written against (tested with 1.15).
SUPPORTED_ACCELERATE = (">=1.0", "<2")


def check_version(version: str | None = None) -> str:
    """Refuse an Accelerate version outside :data:`SUPPORTED_ACCELERATE` (returns the version).

    Raises :class:`~savegame.errors.MissingDependencyError` (an ``ImportError``) naming the
    supported range when accelerate is missing or outside it.
    """
    if version is None:
        try:
            import accelerate
        except ImportError as exc:
            raise errors.MissingDependencyError(
                f"savegame.integrations.accelerate needs accelerate {','.join(SUPPORTED_ACCELERATE)}: "
                "pip install 'savegame[transformers]'"
            ) from exc
        version = str(accelerate.__version__)
    major = (*version_tuple(version), -1)[0]
    if not 1 <= major < 2:
        raise errors.MissingDependencyError(
            f"accelerate {version} is not supported by savegame.integrations.accelerate: it needs accelerate "
            f"{','.join(SUPPORTED_ACCELERATE)}; install a supported version, e.g. pip install 'accelerate>=1,<2'"
        )
    return version


# ---- a sampler whose position is restored directly ----------------------------------------------
class _DirectRandomIterator:
    """One epoch of :class:`DirectRandomSampler`: a permutation and an index into it. Its state
    is the generator's state before the permutation and the index; restoring it regenerates the
    permutation and sets the index: O(dataset) once, whatever the position (torchdata's own
    random sampler steps through every sample already yielded)."""

    def __init__(self, sampler: DirectRandomSampler) -> None:
        self.sampler = sampler
        self.generator_state = sampler.generator.get_state()
        self.perm = sampler._shard(torch.randperm(sampler.n, generator=sampler.generator).tolist())
        self.index = 0

    def __iter__(self) -> _DirectRandomIterator:
        return self

    def __next__(self) -> int:
        if self.index >= len(self.perm):
            raise StopIteration
        self.index += 1
        return self.perm[self.index - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"yielded": self.index, "generator": self.generator_state}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        yielded = int(sd["yielded"])
        if not 0 <= yielded <= len(self.sampler):
            raise ValueError(
                f"sampler position {yielded} is outside this sampler's share of the dataset "
                f"({len(self.sampler)} samples)"
            )
        self.generator_state = sd["generator"]
        self.sampler.generator.set_state(self.generator_state)
        self.perm = self.sampler._shard(
            torch.randperm(self.sampler.n, generator=self.sampler.generator).tolist()
        )
        self.index = yielded


class DirectRandomSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch from its own seeded generator, whose position in the epoch
    is restored directly (no replay of the samples already drawn). Every epoch's order depends
    on the seed only. Use it as ``StatefulDataLoader(dataset, sampler=DirectRandomSampler(dataset,
    seed=0), batch_size=...)`` in place of ``shuffle=True``.

    With ``num_replicas=W, rank=r`` (one sampler per rank, the same seed on every rank) it is
    a ``DistributedSampler`` look-alike: every rank draws the same permutation, pads it to a
    multiple of ``W`` with its first indices (as ``DistributedSampler(drop_last=False)`` does)
    and takes every ``W``-th index from ``r``; the ranks' shares are disjoint but for the
    padding. Each rank's position is its own."""

    def __init__(
        self, data_source: Any, *, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.n = len(data_source)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"DirectRandomSampler: rank {rank} is not in [0, num_replicas={num_replicas})"
            )
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        #: The epoch's iterator (the last one built): its generator state before the permutation.
        self._current: _DirectRandomIterator | None = None

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def _shard(self, perm: list[int]) -> list[int]:
        if self.num_replicas == 1 or not perm:
            return perm
        total = len(self) * self.num_replicas
        while len(perm) < total:
            perm = perm + perm[: total - len(perm)]
        return perm[self.rank : total : self.num_replicas]

    def __iter__(self) -> _DirectRandomIterator:
        self._current = _DirectRandomIterator(self)
        return self._current


# ---- the objects Accelerate holds, as savegame Statefuls ----------------------------------------
def _sharded_direct_sampler(loader: Any) -> DirectRandomSampler | None:
    """The ``DirectRandomSampler`` under Accelerate's ``BatchSamplerShard`` (a prepared loader
    on several processes), or None. torchdata cannot save that chain's position (the shard's
    iterator is a generator): it restores it by replaying the batch indices of the epoch
    (indices only, no sample is fetched), which draws the epoch's permutation again from the
    sampler's generator — so the generator must be put back where it stood at the epoch's start."""
    base = getattr(loader, "base_dataloader", None)
    shard = getattr(base, "batch_sampler", None)
    if type(shard).__name__ != "BatchSamplerShard":
        return None
    sampler = getattr(getattr(shard, "batch_sampler", None), "sampler", None)
    return sampler if isinstance(sampler, DirectRandomSampler) else None


class _PreparedLoader:
    """A prepared loader (``DataLoaderShard`` over a torchdata ``StatefulDataLoader``): its
    position as Accelerate reports it (the batches yielded to you, not its one-batch look-ahead)
    and its epoch counter (``iteration``, which Accelerate itself does not save)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        position = self.loader.state_dict()
        # Saved after the epoch's last batch (the loop has not asked for the next one yet): the
        # epoch is over, and Accelerate counts it (iteration + 1) only when the loop asks.
        finished = isinstance(position, Mapping) and bool(position.get("_iterator_finished"))
        sd: dict[str, Any] = {
            "position": position,
            "iteration": int(self.loader.iteration) + int(finished),
        }
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            sd["generator"] = generator.get_state()
        sampler = _sharded_direct_sampler(self.loader)
        if sampler is not None:
            current = sampler._current
            sd["sampler_generator"] = sampler.generator.get_state()
            sd["sampler_epoch_start"] = (
                current.generator_state if current is not None else sampler.generator.get_state()
            )
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        position = dict(sd["position"])
        sampler = _sharded_direct_sampler(self.loader)
        if sampler is not None and "sampler_epoch_start" in sd:
            # A finished epoch is not replayed (the next iter() draws the next permutation from
            # the generator as it is now); an unfinished one is replayed from its start.
            finished = bool(position.get("_iterator_finished"))
            sampler.generator.set_state(
                sd["sampler_generator" if finished else "sampler_epoch_start"]
            )
        self.loader.load_state_dict(position)
        self.loader.iteration = int(sd["iteration"])
        base = getattr(self.loader, "base_dataloader", None)
        if base is not None and callable(getattr(base, "state_dict", None)):
            # Build the restored iterator now (torchdata keeps it for the next iter()): what it
            # draws from the global RNG is overwritten by the RNG restore that follows, and the
            # loader's generator= (shared by torchdata's shuffle and the workers' base seed) is
            # set back to its saved state below, so the next epochs draw as they would have.
            base.state_dict()
        generator = getattr(self.loader, "generator", None)
        if "generator" in sd and isinstance(generator, torch.Generator):
            generator.set_state(sd["generator"])


class _Counters:
    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        return {"step": int(acc.step), "iteration": int(acc.project_configuration.iteration)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.accelerator.step = int(sd["step"])
        self.accelerator.project_configuration.iteration = int(sd["iteration"])


def _has_position(loader: Any) -> bool:
    if "base_dataloader" in vars(loader):  # Accelerate's adapter has state_dict() either way
        return bool(getattr(loader, "use_stateful_dataloader", False))
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


#: Accelerate's multi-process modes in which every rank holds the whole model and optimizer
#: (DDP): savegame's multi-rank protocol writes them once and each rank's own state per rank.
_DDP_TYPES = ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
              "MULTI_NPU", "MULTI_HPU", "MULTI_NEURON")  # fmt: skip


def _check_distributed_type(accelerator: Any) -> None:
    """One process, or DDP under torchrun/``accelerate launch``; refuse the modes whose model
    or optimizer is sharded in the engine's own format (FSDP, DeepSpeed, Megatron, XLA), which
    this wrapper does not gather."""
    if accelerator.num_processes <= 1:
        return
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind not in _DDP_TYPES:
        raise UnsupportedSetupError(
            f"savegame's Accelerate integration supports one process or DDP ({', '.join(_DDP_TYPES[:2])}, ...), "
            f"not distributed_type={kind} on {accelerator.num_processes} processes: the model and optimizer "
            "would be saved as each rank's shards without their layout. Use DDP, or savegame.Checkpointer with "
            "FSDP2 (fully_shard) in your own loop (docs/distributed.md)"
        )
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UnsupportedSetupError(
            f"the Accelerator reports {accelerator.num_processes} processes but no torch.distributed process "
            "group is initialized: launch with torchrun or accelerate launch"
        )


class AccelerateCheckpointer:
    """savegame's ``Checkpointer`` over everything an ``Accelerator`` prepared and registered.

    Args:
        accelerator: The ``Accelerator`` (after ``prepare``; objects registered later with
            ``register_for_checkpointing`` are picked up at each save and restore).
        root: The run folder.
        extras: A dict of your own values, saved and updated in place on restore.
        save, keep, async_save, handle_signals, exit_on_signal: as for
            :class:`savegame.Checkpointer`, except that ``async_save`` defaults to True:
            :meth:`step` returns once the state is copied to host memory; a signal's save,
            :meth:`save_state` and :meth:`close` wait for the commit, and a failed background
            save is raised by the next call. ``False``: every save blocks.
        cache: A local folder (fast disk) for a remote ``root`` (``s3://...``): saves commit
            there and upload in the background; :meth:`close` waits for the uploads
            (docs/tiers.md). As for :class:`savegame.Checkpointer`.

    Raises:
        MissingDependencyError: accelerate is missing or not a supported version.
        UnsupportedSetupError: several processes in a mode other than DDP (FSDP, DeepSpeed,
            Megatron, XLA), or no process group. Under DDP (torchrun) every rank builds it and
            calls every method, as for :class:`savegame.Checkpointer`.
    """

    def __init__(
        self,
        accelerator: Any,
        root: str | os.PathLike[str],
        *,
        extras: MutableMapping[str, Any] | None = None,
        save: policy.Every | None = None,
        keep: policy.Keep | None = None,
        async_save: bool = True,
        handle_signals: bool = True,
        exit_on_signal: bool = True,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        check_version()
        _check_distributed_type(accelerator)
        self.accelerator = accelerator
        self.extras = extras
        self.checkpointer = Checkpointer(
            root,
            save=save,
            keep=keep,
            async_save=async_save,
            handle_signals=handle_signals,
            exit_on_signal=exit_on_signal,
            cache=cache,
        )
        self.root = self.checkpointer.root
        self._cache = cache
        #: The last step passed to :meth:`step` or restored (what ``save_state()`` saves as).
        self.last_step = 0
        self._warned: set[int] = set()
        self._monitor_seen = False

    # ---- the state --------------------------------------------------------------------------
    def train_state(self) -> statelib.TrainState:
        """The ``TrainState`` of what the accelerator holds now (built at each save/restore)."""
        acc = self.accelerator
        objects: dict[str, Any] = {}
        for i, model in enumerate(acc._models):
            objects[f"model_{i}"] = acc.unwrap_model(model)
        for i, opt in enumerate(acc._optimizers):
            objects[f"optimizer_{i}"] = getattr(opt, "optimizer", opt)
        for i, sched in enumerate(acc._schedulers):
            objects[f"scheduler_{i}"] = getattr(sched, "scheduler", sched)
        for i, loader in enumerate(acc._dataloaders):
            if _has_position(loader):
                objects[f"dataloader_{i}"] = _PreparedLoader(loader)
            elif id(loader) not in self._warned:
                self._warned.add(id(loader))
                warnings.warn(
                    f"prepared data loader {i} ({type(loader).__qualname__}) cannot save its position: a resume "
                    "restarts its epoch from the beginning. Fix: build it as a torchdata StatefulDataLoader and "
                    "create the Accelerator with dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)",
                    InexactResumeWarning,
                    stacklevel=3,
                )
        if acc.scaler is not None:
            objects["scaler"] = acc.scaler
        for i, obj in enumerate(acc._custom_objects):
            if not isinstance(obj, statelib.Stateful):
                raise TypeError(
                    f"register_for_checkpointing object {i} ({type(obj).__qualname__}) has no state_dict()/"
                    "load_state_dict(); savegame saves only those (never pickle)"
                )
            objects[f"custom_{i}"] = obj
        objects["accelerator"] = _Counters(acc)
        if self.extras is not None:
            objects["extras"] = self.extras
        return statelib.TrainState(**objects)

    # ---- the loop ---------------------------------------------------------------------------
    def step(
        self, step: int, *, metrics: Mapping[str, float] | None = None, epoch_end: bool = False
    ) -> bool:
        """``step`` optimizer steps are complete: save if the strategy says so (or a signal came:
        save, then exit 75). Call it after the optimizer step. Returns True if it saved.

        Raises:
            ValueError: ``metrics`` were passed (an evaluation) without the metric
                ``Keep(monitor=...)`` ranks by, and no earlier call had it: best-K would never
                keep anything.
            UnsupportedSetupError: called inside a gradient accumulation window
                (``accelerator.sync_gradients`` is False): no optimizer step was taken, and a
                checkpoint there would hold half a step (the accumulated gradients are not
                state); call it only ``if accelerator.sync_gradients``.
        """
        if getattr(self.accelerator, "sync_gradients", True) is False:
            raise UnsupportedSetupError(
                f"{self.checkpointer.root}: step({step}) was called inside a gradient accumulation "
                "window (accelerator.sync_gradients is False): no optimizer step was taken, and a "
                "checkpoint here would hold half a step. Call it after the optimizer step only: "
                "`if accelerator.sync_gradients: ckpt.step(...)`, counting optimizer steps"
            )
        self._check_monitor(metrics)
        self.last_step = step
        return self.checkpointer.step(
            self.train_state(), step, metrics=metrics, epoch_end=epoch_end
        )

    def save_state(
        self, output_dir: str | os.PathLike[str] | None = None, *, step: int | None = None, **_: Any
    ) -> Any:
        """Save now (blocking) as ``step`` (default: the last step given to :meth:`step`).
        ``output_dir`` must be None or the run folder: checkpoints live in the run folder."""
        self._check_dir(output_dir)
        step = self.last_step if step is None else step
        self.last_step = step
        return self.checkpointer.save(self.train_state(), step)

    def load_state(
        self, input_dir: str | os.PathLike[str] | None = None, *, step: int | None = None, **_: Any
    ) -> int:
        """Restore the newest valid checkpoint (or ``step``) and return its step; 0 (nothing
        touched) on a fresh run. Damaged or half-written checkpoints are skipped with a
        ``CorruptCheckpointWarning``."""
        self._check_dir(input_dir)
        self.last_step = self.checkpointer.restore(self.train_state(), step=step)
        return self.last_step

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> AccelerateCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.checkpointer.__exit__(*exc)

    def _check_monitor(self, metrics: Mapping[str, float] | None) -> None:
        keep = self.checkpointer.keep
        if not metrics or not keep.monitor or keep.best <= 0 or self._monitor_seen:
            return
        if keep.monitor in metrics:
            self._monitor_seen = True
            return
        raise ValueError(
            f"Keep(monitor={keep.monitor!r}) is not among the metrics passed to step(): {sorted(metrics)}; "
            "pass it with the evaluation's metrics, or monitor one of these"
        )

    def _check_dir(self, path: str | os.PathLike[str] | None) -> None:
        if path is None:
            return
        here = os.path.abspath(os.fspath(path))
        folders = [self.root] + ([self._cache] if self._cache is not None else [])
        if all(here != os.path.abspath(os.fspath(f)) for f in folders):
            raise ValueError(
                f"savegame saves into its run folder {self.root}, not {os.fspath(path)}: call "
                "save_state()/load_state() without a folder (checkpoints are step-… folders in the run folder)"
            )


def attach(
    accelerator: Any,
    root: str | os.PathLike[str],
    *,
    extras: MutableMapping[str, Any] | None = None,
    save: policy.Every | None = None,
    keep: policy.Keep | None = None,
    async_save: bool = True,
    handle_signals: bool = True,
    exit_on_signal: bool = True,
    cache: str | os.PathLike[str] | None = None,
) -> AccelerateCheckpointer:
    """Route ``accelerator.save_state()``/``load_state()`` through savegame (see the module
    docstring) and return the :class:`AccelerateCheckpointer` (call its ``step`` in your loop).
    """
    ckpt = AccelerateCheckpointer(
        accelerator,
        root,
        extras=extras,
        save=save,
        keep=keep,
        async_save=async_save,
        handle_signals=handle_signals,
        exit_on_signal=exit_on_signal,
        cache=cache,
    )
    accelerator.save_state = ckpt.save_state
    accelerator.load_state = ckpt.load_state
    return ckpt
