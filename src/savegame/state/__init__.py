"""Adapters between live training objects and a state tree.

:class:`TrainState` names the objects that make up a training run. :func:`capture` turns them
into a state tree (nested dicts of tensors and plain values); :func:`apply` puts a tree back.
Restoring part of a tree, or one that does not quite fit, is :mod:`.overrides`.

Invariant: :func:`apply` checks that the tree names exactly the objects of the state before it
changes any of them, so a checkpoint of a different run fails with an error instead of
half-restoring.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Protocol, runtime_checkable

from savegame import errors
from savegame.state import loader as loaderlib
from savegame.state import rng

__all__ = ["Stateful", "TrainState", "apply", "capture", "check_rng", "load_object"]

RNG_KEY = "rng"


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()``: modules, optimizers, LR
    schedulers, GradScaler, ``StatefulDataLoader``, and your own objects.

    ``state_dict()`` must return tensors and plain values (numbers, strings, bytes, lists,
    tuples, dicts, numpy arrays) — savegame never pickles.
    """

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


class TrainState:
    """The objects that make up a training run, by name.

    Every value is either a :class:`Stateful` object or a plain ``dict`` of extras (epoch,
    best metric, config) that is updated in place on restore. The RNGs of the process (python,
    numpy, torch CPU, every CUDA device) are included automatically under ``"rng"``.

    Args:
        rng: Include the process's random generators (default True; needed for exact resume).
        **objects: name -> Stateful object or dict.

    Raises:
        TypeError: a value is neither Stateful nor a dict (e.g. a plain ``DataLoader``: use
            ``torchdata.stateful_dataloader.StatefulDataLoader``).

    Example:
        >>> import torch, savegame as sg
        >>> model = torch.nn.Linear(2, 2)
        >>> state = sg.TrainState(model=model, extras={"epoch": 0})
        >>> sorted(state)
        ['extras', 'model']
    """

    def __init__(self, *, rng: bool = True, **objects: Stateful | MutableMapping[str, Any]) -> None:
        if RNG_KEY in objects or not isinstance(rng, bool):
            raise TypeError(
                f"{RNG_KEY!r} is reserved for the random generators (rng=True/False); pick another name"
            )
        for name, obj in objects.items():
            if isinstance(obj, MutableMapping):
                continue
            if not isinstance(obj, Stateful):
                hint = ""
                if type(obj).__name__ == "DataLoader":
                    hint = (
                        " A plain torch DataLoader cannot save its position; use "
                        "torchdata.stateful_dataloader.StatefulDataLoader (same arguments)."
                    )
                raise TypeError(
                    f"TrainState({name}=...) got a {type(obj).__module__}.{type(obj).__qualname__}, which has no "
                    f"state_dict()/load_state_dict().{hint}"
                )
        self._objects: dict[str, Any] = dict(objects)
        self.rng = rng
        for name, obj in self._objects.items():
            # Loader workers must outlive a signal sent to the whole process group, so that the
            # main process can save first (savegame.state.loader).
            loaderlib.guard(obj, what=f"TrainState({name}=...)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._objects)

    def __getitem__(self, name: str) -> Any:
        return self._objects[name]

    def __len__(self) -> int:
        return len(self._objects)


def bare(obj: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``); anything else as it
    is. A compiled model is saved and loaded through the module it compiles, as Lightning and
    Accelerate save it: its keys carry no ``_orig_mod.``, and a checkpoint restores into the
    compiled or the plain model alike."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing is compiled
    compiled = getattr(eval_frame, "OptimizedModule", None)
    while isinstance(compiled, type) and isinstance(obj, compiled):
        obj = obj._orig_mod
    return obj


def learning_rates(optimizer: Any) -> list[Any]:
    """Each param group's ``lr``, copied: a tensor learning rate is changed in place by the
    schedulers (``fill_``), so keeping the tensor itself would keep nothing."""
    import torch

    return [
        g.get("lr").clone() if isinstance(g.get("lr"), torch.Tensor) else g.get("lr")
        for g in optimizer.param_groups
    ]


def set_learning_rates(optimizer: Any, rates: list[Any]) -> None:
    """Put back what :func:`learning_rates` copied (a tensor ``lr`` in place, as it lives)."""
    import torch

    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        live = group.get("lr")
        if isinstance(live, torch.Tensor) and isinstance(lr, torch.Tensor):
            live.copy_(lr)
        else:
            group["lr"] = lr


def host_bytes(state: TrainState) -> int:
    """About how many bytes of CPU tensors a snapshot of ``state`` holds, counted without
    calling any ``state_dict()``: the parameters and buffers of its modules, the state of its
    optimizers and the tensors of its dicts (each storage once). What else an object saves is
    not counted."""
    import torch
    from torch.nn.parameter import UninitializedTensorMixin

    seen: set[int] = set()
    total = 0

    def count(tensors: Iterable[Any]) -> None:
        nonlocal total
        for t in tensors:
            if (
                not isinstance(t, torch.Tensor)
                or isinstance(t, UninitializedTensorMixin)  # a lazy module's, not yet built
                or t.device.type != "cpu"
                or t.layout != torch.strided  # (sparse: no storage of its own to count)
            ):
                continue
            ptr = t.data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += t.numel() * t.element_size()

    for name in state:
        obj = bare(state[name])
        if isinstance(obj, torch.nn.Module):
            count(obj.parameters())
            count(  # the buffers its state_dict() holds (not the non-persistent ones)
                b
                for m in obj.modules()
                for k, b in m._buffers.items()
                if k not in m._non_persistent_buffers_set
            )
        elif isinstance(obj, torch.optim.Optimizer):
            count(v for st in obj.state.values() for v in st.values())
        elif isinstance(obj, Mapping):
            count(obj.values())
    return total


def capture(state: TrainState, *, loaders: bool = True) -> dict[str, Any]:
    """The state tree of every object (tensors still live; stage before mutating them).

    ``loaders=False`` leaves out the data loaders and the RNGs: what restore needs to find the
    live tensors a checkpoint is read into, without building a fresh loader's iterator (which
    would start its worker processes only to throw them away).
    """
    tree: dict[str, Any] = {}
    for name in state:
        obj = bare(state[name])
        if isinstance(obj, MutableMapping):
            tree[name] = dict(obj)
        elif loaders or not loaderlib.is_loader(obj):
            tree[name] = loaderlib.state_dict(obj)
    if state.rng and loaders:
        tree[RNG_KEY] = rng.capture()
    return tree


def apply(state: TrainState, tree: dict[str, Any], *, where: str = "checkpoint") -> None:
    """Load ``tree`` into the live objects of ``state``.

    Raises:
        RestoreError: the tree lacks an object the state has, or has one it does not, or an
            object refuses its state (the message names it and the checkpoint).
    """
    check_names(state, tree, where=where)
    if state.rng and RNG_KEY in tree:
        check_rng(tree[RNG_KEY], where)
    for name in state:  # every check before any object is touched: never half-restored
        check_module_fits(state[name], tree[name], name=name, where=where)
        check_optimizer_fits(state[name], tree[name], name=name, where=where)
    for name in state:
        load_object(state[name], tree[name], name=name, where=where)
    if state.rng and RNG_KEY in tree:
        rng.restore(tree[RNG_KEY])


def check_names(state: Iterable[str], tree: Mapping[str, Any], *, where: str) -> None:
    """Refuse a checkpoint (its tree or skeleton) whose objects are not the state's, by name."""
    names = set(state)
    stored = set(tree) - {RNG_KEY}
    if names != stored:
        missing, extra = sorted(names - stored), sorted(stored - names)
        raise errors.RestoreError(
            f"{where} does not match this TrainState: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}; "
            "pass the same objects by the same names as when it was saved (nothing was "
            "restored), or name what to leave out with skip=[...] (docs/resume.md)",
            path=where,
        )


def check_module_fits(obj: Any, saved: Any, *, name: str, where: str) -> None:
    """Refuse a module's saved state that a strict ``load_state_dict`` would refuse — keys
    missing or unexpected, a tensor of another shape — before anything is loaded: torch copies
    the keys that match before it raises, which would leave the objects before it and part of
    this one restored. A module tree with its own loading rules (a load pre-hook, or a class
    outside ``torch.nn.modules`` that overrides ``_load_from_state_dict``, such as torch.ao's
    quantization observers, which resize) is left to torch's check.
    """
    import torch

    from savegame.distributed.wrappers import unwrap  # saved keys carry no DDP "module."

    obj = unwrap(obj)
    if not isinstance(obj, torch.nn.Module) or not isinstance(saved, Mapping):
        return
    for sub in obj.modules():
        # torch.nn's own overrides (batch and instance norm) only bring old layouts up to date;
        # others, torch.ao's quantization observers among them, resize what they load.
        own_rules = type(sub)._load_from_state_dict is not torch.nn.Module._load_from_state_dict
        if sub._load_state_dict_pre_hooks or (
            own_rules and not type(sub).__module__.startswith("torch.nn.modules.")
        ):
            return
    live = obj.state_dict()
    missing = sorted(k for k in live if k not in saved)
    unexpected = sorted(k for k in saved if k not in live)
    # ``saved`` holds tensors, or (checked before anything is read) the manifest's entries.
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)}, live {tuple(live[k].shape)}"
        for k in live
        if k in saved
        and isinstance(live[k], torch.Tensor)
        and isinstance(getattr(saved[k], "shape", None), (tuple, list, torch.Size))
        and tuple(live[k].shape) != tuple(saved[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    said = [f"missing keys {some(missing)}"] if missing else []
    said += [f"unexpected keys {some(unexpected)}"] if unexpected else []
    said += [f"size mismatch: {some(shapes)}"] if shapes else []
    raise errors.RestoreError(
        f"{where}: {name}.load_state_dict() would refuse it ({'; '.join(said)}); nothing was "
        "restored. To load what fits and keep the rest as it is, restore with strict=False "
        "(docs/resume.md)",
        path=where,
        key=name,
    )


def check_optimizer_fits(obj: Any, saved: Any, *, name: str, where: str) -> None:
    """Refuse an optimizer's saved state that does not fit it (:func:`optimizer_misfit`)
    before anything is loaded: torch's own check comes after the objects before it are
    restored, and an optimizer of another class is half-loaded before it fails."""
    import torch

    obj = bare(obj)
    if not isinstance(obj, torch.optim.Optimizer) or not isinstance(saved, Mapping):
        return
    why = optimizer_misfit(obj, saved)
    if why is not None:
        raise errors.RestoreError(
            f"{where}: {name} ({type(obj).__name__}) does not fit its saved state: {why}; "
            "nothing was restored. To restore the rest and keep this optimizer as it is, "
            f"restore with strict=False or skip=[{name!r}] (docs/resume.md)",
            path=where,
            key=name,
        )


def optimizer_misfit(opt: Any, saved: Any) -> str | None:
    """Why an optimizer's saved state cannot go onto it, or None.

    Checks what ``load_state_dict`` would otherwise take silently or half-way: the number of
    groups and of parameters in each; that each saved group has the hyperparameters of this
    optimizer's class (an ``SGD`` state has no ``betas`` for ``Adam``; flags torch added over
    versions, ``True``/``False``/``None`` by default, are filled in by torch and not asked
    for); and that a saved moment with a parameter's number of dimensions has its shape
    (factored moments, of fewer dimensions, are not checked; ``Adafactor``'s ``row_var`` and
    ``col_var`` keep the dimensions with a 1 in the one they factor, and are checked against
    that shape). The last two for torch's own optimizers other than ``LBFGS`` only."""
    import torch

    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list):
        return "no parameter groups in the checkpoint"
    # The class and moment checks know torch's own optimizers only: LBFGS keeps flat vectors
    # over all parameters under parameter 0; others keep preconditioners of other shapes, or add
    # non-flag defaults in later versions (a false refusal of a legitimate resume).
    own = type(opt).__module__.startswith("torch.optim") and not isinstance(opt, torch.optim.LBFGS)
    if len(groups) != len(opt.param_groups):
        return f"{len(groups)} parameter group(s) in the checkpoint, {len(opt.param_groups)} here"
    for i, (g, mine) in enumerate(zip(groups, opt.param_groups, strict=True)):
        n = len(g.get("params", ())) if isinstance(g, Mapping) else -1
        if n != len(mine["params"]):
            return f"group {i} has {n} parameters in the checkpoint, {len(mine['params'])} here"
    hyper = sorted(
        k
        for k, v in (getattr(opt, "defaults", {}) if own else {}).items()
        if k != "params" and not isinstance(v, (bool, type(None)))
    )
    for i, g in enumerate(groups):
        lacking = [k for k in hyper if k not in g]
        if lacking:
            return (
                f"group {i} in the checkpoint has no {', '.join(map(repr, lacking))}, which "
                f"{type(opt).__name__} needs (saved by another optimizer class?)"
            )
    params = dict(
        zip(
            itertools.chain.from_iterable(g["params"] for g in groups),
            itertools.chain.from_iterable(g["params"] for g in opt.param_groups),
            strict=False,
        )
    )
    moments = saved.get("state", {}) if own else {}
    factored = _factored_shapes if isinstance(opt, getattr(torch.optim, "Adafactor", ())) else None
    for pid, st in moments.items() if isinstance(moments, Mapping) else ():
        p = params.get(pid)
        for key, v in st.items() if p is not None and isinstance(st, Mapping) else ():
            if not isinstance(v, torch.Tensor) or v.dim() != p.dim():
                continue
            want = list(p.shape)
            if factored is not None and key in ("row_var", "col_var") and p.dim() >= 2:
                want = factored(want)[key]
            if list(v.shape) != want:
                return (
                    f"its {key!r} of parameter {pid} is {list(v.shape)} in the checkpoint, "
                    f"{want} for the parameter of shape {list(p.shape)} here"
                )
    return None


def _factored_shapes(shape: list[int]) -> dict[str, list[int]]:
    """The shapes of ``torch.optim.Adafactor``'s factored second moments for a parameter of
    ``shape`` (two dimensions or more): the row means keep a 1 in the last dimension, the
    column means a 1 in the one before it."""
    return {"row_var": [*shape[:-1], 1], "col_var": [*shape[:-2], 1, shape[-1]]}


def load_object(obj: Any, saved: Any, *, name: str, where: str, strict: bool = True) -> None:
    """Load one object's saved state: a dict extra is replaced, anything else gets
    ``load_state_dict`` (``strict=False``: a module's, which leaves keys not given as they are).

    Raises:
        RestoreError: the object refused it (naming the object and the checkpoint).
    """
    obj = bare(obj)
    try:
        if isinstance(obj, MutableMapping):
            obj.clear()
            obj.update(saved)
        elif not strict:
            obj.load_state_dict(saved, strict=False)
        else:
            # A StatefulDataLoader's iterator is built lazily by the first iter() after this,
            # so a sampler.set_epoch() in between counts (savegame.state.loader).
            loaderlib.load(obj, saved, name=name, where=where)
    except errors.CheckpointError as exc:
        if exc.path is None:  # raised by an object's own load_state_dict: say which checkpoint
            exc.path = where
            exc.message = f"{where}: {name}: {exc.message}"
            exc.args = (exc.message,)
        raise
    except Exception as exc:  # user objects may raise anything; translate at this boundary
        raise errors.RestoreError(
            f"{where}: {name}.load_state_dict() failed: {type(exc).__name__}: {exc}",
            path=where,
            key=name,
        ) from exc


def check_rng(saved: Any, where: str) -> None:
    """Refuse a damaged RNG snapshot before any object is touched (no half-restored state).

    The generators' own setters are the only complete validators of their states (python's
    ``random.setstate``, numpy's ``set_state``, torch's ``set_rng_state``), so the snapshot is
    tried on them and the current states are put back, whatever happened.
    """
    current = rng.capture()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real restore below warns once, if at all
            if not isinstance(saved, Mapping):
                raise TypeError(f"expected a mapping, got {type(saved).__name__}")
            rng.restore(dict(saved))
    except Exception as exc:  # any setter may raise anything on a damaged state
        raise errors.RestoreError(
            f"{where}: the saved random-generator state is damaged ({type(exc).__name__}: {exc}); "
            "restore an earlier checkpoint, or pass TrainState(rng=False) to keep this process's generators",
            path=where,
            key=RNG_KEY,
        ) from exc
    finally:
        rng.restore(current)
