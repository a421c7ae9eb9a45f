"""Restoring part of a checkpoint, or one that does not quite fit the state: ``only=``,
``skip=`` and ``strict=False`` of ``Checkpointer.restore`` (docs/resume.md, "Overrides").

A name is a part of the :class:`~savegame.state.TrainState` by the name it was given
(``"model"``, ``"optimizer"``, a loader's name, ``"rng"`` for the random generators), or one
entry of a plain-dict extra: ``"extras/epoch"`` (the first ``/`` splits; the rest is the key).

Invariants: every name is checked against the state and the checkpoint's manifest before a
tensor is read, so a misspelt name never restores something else; what is not selected is
never read into (no in-place read into its live tensors) and is left exactly as it was; with
``strict=False`` a part that does not fit is left exactly as it was and named in the
:class:`RestoreReport`, never half-loaded. The defaults (everything, strict) take the unchanged
path of :func:`savegame.state.apply`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame import errors
from savegame import state as statelib

__all__ = [
    "EVERYTHING",
    "RestoreOptions",
    "RestoreReport",
    "Selection",
    "apply",
    "options",
    "select",
]


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """What to restore: ``only`` these names, or all but ``skip``; ``strict`` or not."""

    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    strict: bool = True

    @property
    def default(self) -> bool:
        """Everything, strictly: the path restore always took."""
        return self.only is None and not self.skip and self.strict


#: Restore's default: every part, strictly.
EVERYTHING = RestoreOptions()


@dataclass(frozen=True)
class RestoreReport:
    """What a restore applied and what it left as it was (``Checkpointer.last_restore``).

    Names are state paths: an object (``"optimizer"``), a module key (``"model/fc.weight"``),
    a dict entry (``"extras/best"``).

    Attributes:
        step, path: The checkpoint restored.
        restored: The objects that were loaded (wholly or in part).
        skipped: Left as they were because of ``only=`` / ``skip=``.
        missing: In the state, not in the checkpoint: left as they were (``strict=False``;
            ``"rng"`` also when a checkpoint holds no random generators).
        unexpected: In the checkpoint, not in the state: ignored (``strict=False``).
        mismatched: In both but not fitting (another shape, another set of optimizer
            parameters): left as they were, with the reason (``strict=False``).
    """

    step: int | None = None
    path: str | None = None
    restored: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: Mapping[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every part of the state was restored from a checkpoint that fits it."""
        return not (self.skipped or self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"restored {list(self.restored)}"]
        for label, names in (
            ("skipped", self.skipped),
            ("missing from the checkpoint (left as they were)", self.missing),
            ("unexpected (ignored)", self.unexpected),
        ):
            if names:
                parts.append(f"{label}: {_shown(names)}")
        if self.mismatched:
            shown = [f"{k} ({why})" for k, why in list(self.mismatched.items())[:5]]
            more = len(self.mismatched) - len(shown)
            parts.append(
                "mismatched (left as they were): "
                + ", ".join(shown)
                + (f" and {more} more" if more else "")
            )
        return "; ".join(parts)


def _shown(names: Collection[str], n: int = 8) -> str:
    items = list(names)
    more = len(items) - n
    return ", ".join(items[:n]) + (f" and {more} more" if more > 0 else "")


def options(
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    strict: bool = True,
    state: Any = None,
) -> RestoreOptions:
    """Check restore's ``only=`` / ``skip=`` / ``strict=`` arguments (before anything is read);
    with ``state``, also that every ``only`` name is in it (a typo fails on a fresh run too).

    Raises:
        TypeError: ``strict`` is not a bool, a list is a bare string, or a name is not a str.
        ValueError: both ``only`` and ``skip`` were given, ``only`` is empty, or a name is
            empty or has an empty part (``"extras/"``).
        RestoreError: an ``only`` name is not in ``state``.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict={strict!r}: pass True or False")
    if only is not None and skip is not None:
        raise ValueError(
            "pass only= or skip=, not both: only=[...] restores just the named parts, "
            "skip=[...] restores everything but them"
        )
    only_t = None if only is None else _names(only, "only")
    if only_t == ():
        raise ValueError("only=[] restores nothing; name a part, e.g. only=['model']")
    skip_t = () if skip is None else _names(skip, "skip")
    live = [*state, *([statelib.RNG_KEY] if state.rng else [])] if state is not None else []
    for name in only_t if state is not None and only_t else ():
        if name.partition("/")[0] not in live:
            raise errors.RestoreError(
                f"only={name!r}: this TrainState has no {name.partition('/')[0]!r}; it has {live}",
                key=name,
            )
    return RestoreOptions(only_t, skip_t, strict)


def _names(values: Iterable[str], arg: str) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{arg}= takes a list of names, e.g. {arg}=[{values!r}], not a string")
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{arg}= takes a list of names, got {type(values).__name__}") from None
    for name in items:
        if not isinstance(name, str):
            raise TypeError(
                f"{arg}= names must be str (an object's name in the TrainState, or 'dict/key'), "
                f"got {type(name).__name__} {name!r}"
            )
        top, sep, entry = name.partition("/")
        if not top or (sep and not entry):
            raise ValueError(
                f"{arg}={name!r}: a name is an object of the TrainState ('model') or an entry "
                "of one of its dicts ('extras/epoch')"
            )
    return tuple(dict.fromkeys(items))


@dataclass(slots=True)
class Selection:
    """The parts of one checkpoint a restore applies (from :func:`select`).

    ``names`` are the objects to read and apply, in state order (``"rng"`` last);
    ``entries`` limits a dict to some of its keys: name -> (keys, True: only these / False:
    all but these).
    """

    opts: RestoreOptions
    names: list[str]
    entries: dict[str, tuple[frozenset[str], bool]]
    skipped: list[str]
    missing: list[str]
    unexpected: list[str]

    def skeleton(self, skeleton: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the checkpoint's skeleton to read."""
        if self.opts.default:
            return dict(skeleton)
        return {n: skeleton[n] for n in self.names}

    def in_place(self, name: str, obj: Any) -> bool:
        """May the reader fill ``name``'s live tensors in place? Only where all of it is
        applied for sure: a dict cut to some entries, or (``strict=False``) an object that
        may yet be found not to fit, gets fresh tensors so a skip leaves it untouched."""
        if name not in self.names or name in self.entries:
            return False
        return self.opts.strict or isinstance(obj, torch.nn.Module)

    def report(self) -> RestoreReport:
        return RestoreReport(
            restored=tuple(self.names),
            skipped=tuple(self.skipped),
            missing=tuple(self.missing),
            unexpected=tuple(self.unexpected),
        )


def select(
    opts: RestoreOptions,
    state: Any,
    stored: Any,
    *,
    where: str,
    ignore: Collection[str] = (),
) -> Selection:
    """Decide which parts of a checkpoint (its skeleton by object name, ``stored``) to apply
    to ``state``; ``ignore``: state names the caller leaves alone anyway (``per_rank="fresh"``).

    Raises:
        RestoreError: a name does not exist (``only``: in the state and the checkpoint;
            ``skip``: in either), names an entry of something that is not a dict, or
            (``strict``) the rest does not name the same objects on both sides.
        FormatError: the checkpoint's skeleton is not a mapping of objects (damaged).
    """
    rng_key = statelib.RNG_KEY
    live = [n for n in state if n not in ignore] + ([rng_key] if state.rng else [])
    if not isinstance(stored, Mapping):
        if opts.default:
            return Selection(opts, [n for n in state if n not in ignore], {}, [], [], [])
        raise errors.FormatError(f"{where}: the state tree is not a mapping of objects", path=where)
    # A checkpoint's generators are ignored by a state without them (rng=False), as always.
    saved = [n for n in stored if n != rng_key or state.rng]
    named: dict[str, set[str] | None] = {}  # top name -> None (whole) or the entries named
    arg = "only" if opts.only is not None else "skip"
    for name in opts.only if opts.only is not None else opts.skip:
        top, _, entry = name.partition("/")
        _check_name(name, top, entry, arg, state, live, saved, stored, where)
        if not entry:
            named[top] = None
        elif named.get(top, set()) is not None:
            named.setdefault(top, set()).add(entry)  # type: ignore[union-attr]
    if opts.only is not None:
        names = [n for n in live if n in named]
        entries = {n: (frozenset(e), True) for n, e in named.items() if e is not None}
        return Selection(opts, names, entries, [n for n in live if n not in named], [], [])
    whole = {n for n, e in named.items() if e is None}
    entries = {n: (frozenset(e), False) for n, e in named.items() if e is not None}
    missing = [n for n in live if n not in saved and n not in whole]
    unexpected = [n for n in saved if n not in live and n not in whole]
    # (The default path leaves this check to statelib.apply, with today's message.)
    if opts.strict and not opts.default and (set(missing) - {rng_key} or unexpected):
        raise errors.RestoreError(
            f"{where} does not match this TrainState: missing {sorted(set(missing) - {rng_key}) or 'nothing'}, "
            f"unexpected {unexpected or 'nothing'}; pass the same objects by the same names as when it "
            "was saved, skip=[...] the ones to leave out, or strict=False to restore what matches",
            path=where,
        )
    names = [n for n in live if n in saved and n not in whole]
    if opts.default:  # as always: a state with RNGs restores a checkpoint without, silently
        return Selection(opts, names, {}, [], [], [])
    skipped = [n for n in live if n in whole] + [
        f"{n}/{e}" for n, (keys, _) in entries.items() for e in sorted(keys)
    ]
    return Selection(opts, names, entries, skipped, missing, unexpected)


def _check_name(
    name: str,
    top: str,
    entry: str,
    arg: str,
    state: Any,
    live: list[str],
    saved: list[str],
    stored: Mapping[str, Any],
    where: str,
) -> None:
    def fail(why: str) -> errors.RestoreError:
        return errors.RestoreError(
            f"{arg}={name!r}: {why}. This TrainState has {live}, the checkpoint {where} has {saved}",
            path=where,
            key=name,
        )

    in_live, in_saved = top in live, top in saved
    if not (in_live or in_saved):
        raise fail(f"{top!r} is neither in this TrainState nor in the checkpoint")
    if arg == "only" and not in_saved:
        raise fail(f"the checkpoint has no {top!r}")
    if arg == "only" and not in_live:
        raise fail(f"this TrainState has no {top!r}")
    if not entry:
        return
    obj = state[top] if top in state else None
    if not (isinstance(obj, MutableMapping) and in_saved):
        kind = "the random generators" if top == statelib.RNG_KEY else type(obj).__name__
        raise fail(
            f"only entries of a plain dict in both the state and the checkpoint can be named, and "
            f"{top!r} is {kind if in_saved else 'not in the checkpoint'}; name {top!r} whole, or pass "
            "strict=False to restore the parts of a model that fit"
        )
    keys = _dict_keys(stored[top])
    if entry not in keys and (arg == "only" or entry not in obj):
        raise fail(f"{top!r} in the checkpoint has no entry {entry!r} (it has {sorted(keys)})")


def _dict_keys(sub: Any) -> set[str]:
    """The str keys of a dict's skeleton (a JSON object, or a ``$dict``/``$odict``/``$counter`` pair list)."""
    if not isinstance(sub, dict):
        return set()
    if len(sub) == 1:
        ((tag, pairs),) = sub.items()
        if tag in ("$dict", "$odict", "$counter") and isinstance(pairs, list):
            return {p[0] for p in pairs if isinstance(p, list) and p and isinstance(p[0], str)}
    return {k for k in sub if isinstance(k, str) and not k.startswith("$")}


def apply(state: Any, tree: Mapping[str, Any], sel: Selection, *, where: str) -> RestoreReport:
    """Load the selected parts of ``tree`` into ``state``; returns what was done.

    Raises:
        RestoreError: an object refuses its state (``strict``, or an object savegame cannot
            check beforehand), or the saved random generators are damaged.
    """
    if sel.opts.default:
        statelib.apply(state, dict(tree), where=where)
        return sel.report()
    rng_key = statelib.RNG_KEY
    if rng_key in sel.names:
        statelib.check_rng(tree[rng_key], where)
    missing, unexpected = list(sel.missing), list(sel.unexpected)
    mismatched: dict[str, str] = {}
    strict = sel.opts.strict
    for name in sel.names:
        if name == rng_key:
            continue
        obj, sub = statelib.bare(state[name]), tree[name]
        if isinstance(obj, MutableMapping) and isinstance(sub, Mapping):
            missing += _apply_dict(obj, sub, name, sel.entries.get(name), strict)
        elif not strict and isinstance(obj, torch.nn.Module) and isinstance(sub, Mapping):
            sub = _fit_module(obj, sub, name, missing, unexpected, mismatched)
            statelib.load_object(obj, sub, name=name, where=where, strict=False)
        elif (
            not strict
            and isinstance(obj, torch.optim.Optimizer)
            and (why := statelib.optimizer_misfit(obj, sub))
        ):
            mismatched[name] = why
        else:
            statelib.load_object(obj, sub, name=name, where=where)
    if rng_key in sel.names:
        statelib.rng.restore(tree[rng_key])
    restored = [n for n in sel.names if n not in mismatched]
    return RestoreReport(
        restored=tuple(restored),
        skipped=tuple(sel.skipped),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=mismatched,
    )


def _apply_dict(
    obj: MutableMapping[str, Any],
    saved: Mapping[str, Any],
    name: str,
    entries: tuple[frozenset[str], bool] | None,
    strict: bool,
) -> list[str]:
    """Update a dict extra; returns its entries missing from the checkpoint (kept)."""
    if entries is not None and entries[1]:  # only these entries
        for key in sorted(entries[0]):
            obj[key] = saved[key]
        return []
    cut = entries[0] if entries is not None else frozenset()
    kept = {k: obj[k] for k in obj if k in cut or (not strict and k not in saved)}
    obj.clear()
    obj.update({k: v for k, v in saved.items() if k not in cut})
    obj.update(kept)
    return [f"{name}/{k}" for k in kept if k not in cut]


def _fit_module(
    module: torch.nn.Module,
    saved: Mapping[str, Any],
    name: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: dict[str, str],
) -> dict[str, Any]:
    """The entries of a module's saved state that fit it; the others are reported."""
    live = module.state_dict()
    fits: dict[str, Any] = {}
    for key, value in saved.items():
        if key not in live:
            unexpected.append(f"{name}/{key}")
            continue
        have = live[key]
        if (
            isinstance(value, torch.Tensor)
            and isinstance(have, torch.Tensor)
            and tuple(value.shape) != tuple(have.shape)
        ):
            mismatched[f"{name}/{key}"] = (
                f"{list(value.shape)} in the checkpoint, {list(have.shape)} here"
            )
            continue
        fits[key] = value
    missing += [f"{name}/{k}" for k in live if k not in saved]
    return fits
