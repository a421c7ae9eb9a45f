"""What a distributed save captures, and wrappers: which objects DDP replicates, which are
plain per-rank extras, and ``DistributedDataParallel`` seen through.

Invariant: a ``DistributedDataParallel`` (or ``torch.compile``d) model is saved and restored
through its inner module, so checkpoint keys are the bare module's (no ``module.`` or
``_orig_mod.`` prefix) and restore into a bare model in a plain process; checkpoints written with
a prefix (before this rule) are stripped of it on restore when the live model's keys call for it. (Split from :mod:`.protocol`, which
re-exports these names.)
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from savegame import state as statelib
from savegame.distributed import planning

__all__ = ["View", "extras_names", "match_wrapper_keys", "replicated_names", "unwrap", "unwrapped"]


def replicated_names(state: statelib.TrainState) -> list[str]:
    """Names of the objects DDP keeps identical on every rank (written once, by rank 0):
    modules, optimizers, LR schedulers and grad scalers. Their DTensors are sharded instead."""
    kinds: tuple[type, ...] = (
        torch.nn.Module,
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
    )
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if isinstance(scaler, type):
        kinds += (scaler,)
    return [name for name in state if isinstance(state[name], kinds)]


def extras_names(state: statelib.TrainState) -> list[str]:
    """Names of the plain-dict extras (per rank; restorable anywhere when equal on all ranks)."""
    return [name for name in state if isinstance(state[name], MutableMapping)]


def unwrap(obj: Any) -> Any:
    """The module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers, in any
    nesting (``DDP(compile(m))``, ``compile(DDP(m))``); anything else unchanged."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    while True:
        inner = statelib.bare(obj)
        if isinstance(ddp, type) and isinstance(inner, ddp):
            inner = inner.module
        if inner is obj:
            return obj
        obj = inner


class View:
    """Named objects as :func:`statelib.capture` / :func:`statelib.apply` read them (iteration,
    ``[name]``, ``.rng``), without building a new :class:`TrainState` (which prepares loaders)."""

    def __init__(self, objects: Mapping[str, Any], rng: bool) -> None:
        self._objects = dict(objects)
        self.rng = rng

    def __iter__(self) -> Any:
        return iter(self._objects)

    def __getitem__(self, name: str) -> Any:
        return self._objects[name]

    def __len__(self) -> int:
        return len(self._objects)


def unwrapped(state: statelib.TrainState) -> Any:
    """``state`` with DDP-wrapped modules replaced by their inner modules (same objects
    otherwise): what is captured on save and loaded on restore, so keys carry no ``module.``."""
    return View({n: unwrap(state[n]) for n in state}, state.rng)


def match_wrapper_keys(state: Any, tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` (a state tree or skeleton by object name) with DDP's ``module.`` prefix removed
    from a module's keys where the live (unwrapped) module has exactly the bare keys: a
    checkpoint saved through the wrapper before savegame unwrapped it, restored into a bare or
    wrapped model now. Other objects and matching keys are left alone."""
    out = dict(tree)
    for name in state:
        obj, sub = unwrap(state[name]), out.get(name)
        if isinstance(obj, torch.nn.Module) and isinstance(sub, dict):
            live = set(obj.state_dict())
            if set(sub) == live:
                continue
            for prefix in _WRAPPER_PREFIXES:
                bare = planning.strip_wrapper_prefix(sub, prefix)
                if set(bare) == live:
                    out[name] = bare
                    break
    return out


#: Key prefixes of a module saved through its wrappers before savegame saved the bare module:
#: DDP's, torch.compile's, and both nested either way.
_WRAPPER_PREFIXES = (
    planning.WRAPPER_PREFIX,
    "_orig_mod.",
    "_orig_mod." + planning.WRAPPER_PREFIX,
    planning.WRAPPER_PREFIX + "_orig_mod.",
)
