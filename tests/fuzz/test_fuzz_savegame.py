"""Property: whatever happens to a savegame checkpoint's bytes, nothing raises a raw exception.

Seed: a real run written by :class:`savegame.Checkpointer` — a small model, AdamW (int-keyed
state, tuples), a scheduler, every RNG and extras holding every tag of the tree codec — with two
checkpoints. Only the newest (step 2) is mutated; step 1 stays valid. Mutations:

* ``bytes``: flips, overwrites, insertions, deletions and truncation of ``manifest.json``;
* ``token``: a JSON number or literal replaced by ``NaN``, ``Infinity``, ``-Infinity``, ``1e400``,
  ``10**400``, ``-1``, ``2**63``, ``2**64``, a string, ``null``, ``[]``, ``{}`` (left unsigned);
* ``edit``: a field deleted, its value swapped to another type or a boundary integer, a tag
  renamed, an arity changed or a tensor reference renamed — then re-signed, so the self-hash
  matches and the checks behind it are reached (a hand edit);
* ``tensor``: flips and truncation of the tensor file (data and header).

Checks per mutant: ``Checkpointer.restore`` returns 2 (the mutant is still valid) or falls back
to 1 with a :class:`CorruptCheckpointWarning` naming step 2 — a re-signed edit may also raise
:class:`RestoreError` (a valid checkpoint that no longer fits the state: a code change, not
damage); ``savegame.load`` returns a tree or raises a ``CheckpointError`` whose ``.path`` is set;
``reader.verify`` returns a list; ``savegame verify``, ``ls`` and ``show`` (every 8th mutant) exit
0, 1 or 2. Anything
else is a finding: its checkpoint folder is written to ``SAVEGAME_FUZZ_SAVE`` when set.

Default run: a short seeded campaign (a few seconds). ``-m slow``: ``SAVEGAME_FUZZ_SAVEGAME``
mutants (default 3000). Run as a script for a timed campaign::

    python tests/fuzz/test_fuzz_savegame.py --minutes 8 --save /tmp/findings

Findings live in tests/fuzz/regressions/savegame/ (one run folder each) and are replayed by
``test_regressions_replay``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.engine import reader
from savegame.format import layout, manifest

REGRESSIONS = Path(__file__).resolve().parent / "regressions" / "savegame"
FAST = 48
SLOW = int(os.environ.get("SAVEGAME_FUZZ_SAVEGAME", "3000"))
NEWEST = layout.step_dir(2)
TENSOR_FILE = "rank-00000.safetensors"


# ---- the seed run ---------------------------------------------------------------------------
def _state(seed: int) -> sg.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras={})


def _extras() -> dict[str, Any]:
    return {
        "epoch": 1,
        "big": 2**63 + 5,
        "nan": math.nan,
        "inf": -math.inf,
        "b": b"\x00\xff",
        "t": (1, (2.5, None)),
        "s": {1, 2},
        "fs": frozenset({"a"}),
        "ik": {0: "a", (1, 2): "b"},
        "od": collections.OrderedDict([(2, "x"), (1, "y")]),
        "dk": {"$tensor": "not a tensor"},
        "np": np.uint32(7),
        "arr": np.arange(3, dtype=np.int16),
        "dt": torch.bfloat16,
        "dev": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "empty": [[], {}, ()],
    }


def write_seed_run(root: Path) -> Path:
    """A run with valid checkpoints at steps 1 and 2; returns ``root``."""
    state = _state(0)
    state["extras"].update(_extras())
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=5), handle_signals=False) as ckpt:
        for step in (1, 2):
            loss = state["model"](torch.randn(4, 3)).square().mean()
            state["optimizer"].zero_grad()
            loss.backward()
            state["optimizer"].step()
            state["scheduler"].step()
            ckpt.step(state, step, metrics={"val_acc": 0.5 * step, "loss": math.nan})
    return root


# ---- mutations ------------------------------------------------------------------------------
TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "-1", "0", "9223372036854775808",
    "18446744073709551616", "1.5", '"x"', '""', "null", "true", "[]", "{}", '"' + "z" * 32 + '"',
]
_NUMBER_OR_LITERAL = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null")
SWAPS: list[Any] = [None, True, "x", "", 1.5, 0, -1, 2**31, 2**53 + 1, 2**63, 2**64, [], [1], {}, {"a": 1}, "0" * 32]
TAGS = ["$tensor", "$ndarray", "$tuple", "$set", "$frozenset", "$dict", "$odict", "$float", "$int", "$bytes", "$np",
        "$dtype", "$device", "$size", "$nope"]


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 4, 16])):
        if not buf:
            break
        op = rng.randrange(5)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.randrange(256)
        elif op == 2:
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del buf[i : i + rng.randint(1, 16)]
        else:
            del buf[i:]
    return bytes(buf)


def mutate_token(rng: random.Random, data: bytes) -> bytes:
    spans = [m.span() for m in _NUMBER_OR_LITERAL.finditer(data)]
    if not spans:
        return data
    for _ in range(rng.choice([1, 1, 2])):
        a, b = rng.choice(spans)
        data = data[:a] + rng.choice(TOKENS).encode() + data[b:]
        spans = [m.span() for m in _NUMBER_OR_LITERAL.finditer(data)]
    return data


def _nodes(node: Any, out: list[tuple[Any, Any]]) -> None:
    """(parent, key) of every value in a JSON body."""
    if isinstance(node, dict):
        for k in node:
            out.append((node, k))
            _nodes(node[k], out)
    elif isinstance(node, list):
        for i in range(len(node)):
            out.append((node, i))
            _nodes(node[i], out)


# A re-signed edit of the saved RNG state used to reach random.setstate / numpy set_state raw;
# savegame.state.apply now tries the snapshot first (RestoreError, nothing half-restored). The
# default campaign still leaves the RNG alone (RestoreError is "refused", not a fall-back);
# test_edited_rng_state_falls_back_or_is_restore_error and campaign(edit_rng=True) cover it.
EDIT_RNG = False


def mutate_edit(rng: random.Random, data: bytes) -> bytes:
    """A structural edit of the parsed manifest, re-signed so the self-hash matches."""
    body = json.loads(data)
    body.pop("integrity", None)
    for _ in range(rng.choice([1, 1, 2])):
        nodes: list[tuple[Any, Any]] = []
        # half the time inside the trees: that is where the tree decoder is reached
        _nodes(body["trees"] if rng.random() < 0.5 and "trees" in body else body, nodes)
        if not EDIT_RNG:
            rng_trees = [t["rng"] for t in body.get("trees", []) if isinstance(t, dict) and "rng" in t]
            inside: list[tuple[Any, Any]] = []
            for t in rng_trees:
                _nodes(t, inside)
            skip = {id(parent) for parent, _ in inside}
            roots = {id(t) for t in body.get("trees", [])}
            nodes = [(p, k) for p, k in nodes if id(p) not in skip and not (id(p) in roots and k == "rng")]
        if not nodes:
            break
        parent, key = rng.choice(nodes)
        op = rng.randrange(6)
        value = parent[key]
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(value, dict) and len(value) == 1:  # rename a tag
            ((_, inner),) = value.items()
            parent[key] = {rng.choice(TAGS): inner}
        elif op == 2 and isinstance(value, list):  # change an arity
            if value and rng.random() < 0.5:
                value.pop(rng.randrange(len(value)))
            else:
                value.append(rng.choice(SWAPS))
        elif op == 3 and isinstance(value, str) and "/" in value:  # rename a tensor reference
            parent[key] = value + rng.choice(["x", "/", ""]) if rng.random() < 0.5 else value[::-1]
        elif op == 4 and isinstance(value, int) and not isinstance(value, bool):
            parent[key] = rng.choice([-1, 0, value + 1, value - 1, 2**63, 2**64, 10**400, value * 2**32])
        else:
            parent[key] = rng.choice(SWAPS)
    try:
        body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    except (ValueError, TypeError):  # e.g. 10**400 needs no signature to be refused
        body["integrity"] = {"algorithm": "xxh3-128", "hash": "0" * 32}
    return json.dumps(body).encode()


def mutate_tensor(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.3:  # inside the header, where the JSON is
        n = int.from_bytes(data[:8], "little")
        cut = min(len(data), 8 + n)
        return mutate_bytes(rng, data[:cut]) + data[cut:]
    return mutate_bytes(rng, data)


KINDS: dict[str, tuple[str, Callable[[random.Random, bytes], bytes]]] = {
    "bytes": (layout.MANIFEST, mutate_bytes),
    "token": (layout.MANIFEST, mutate_token),
    "edit": (layout.MANIFEST, mutate_edit),
    "tensor": (TENSOR_FILE, mutate_tensor),
}


# ---- the property ---------------------------------------------------------------------------
class Finding(Exception):
    """A mutant broke the contract."""


def check_run(run: Path, *, kind: str, cli: bool) -> str:
    """Run every check on a run whose step 2 was mutated; returns the outcome, raises Finding."""
    newest = run / NEWEST
    try:
        tree = sg.load(newest)
        del tree
    except errors.CheckpointError as exc:
        if exc.path is None:
            raise Finding(f"load: {type(exc).__name__} without .path: {exc}") from exc
    except Exception as exc:
        raise Finding(f"load: raw {type(exc).__name__}: {exc}") from exc
    try:
        problems = reader.verify(newest)
        assert isinstance(problems, list)
        for ref in reader.list_checkpoints(run):
            if ref.error is not None and ref.error.path is None:
                raise Finding(f"list_checkpoints: {type(ref.error).__name__} without .path: {ref.error}")
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"verify: raw {type(exc).__name__}: {exc}") from exc
    if cli:
        from savegame.cli.main import main

        for argv in (["verify", str(run)], ["ls", str(run)], ["show", str(newest)]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    code = main(argv)
                except BaseException as exc:  # noqa: BLE001 - a SystemExit or traceback is a finding
                    raise Finding(f"savegame {argv[0]}: raw {type(exc).__name__}: {exc}") from exc
            if code not in (0, 1, 2) or "Traceback" in err.getvalue():
                raise Finding(f"savegame {argv[0]}: exit {code}: {err.getvalue()[-500:]}")
    state = _state(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sg.Checkpointer(run, handle_signals=False) as ckpt:
                step = ckpt.restore(state)
        except errors.RestoreError as exc:
            if kind != "edit":
                raise Finding(f"restore: RestoreError on damaged bytes: {exc}") from exc
            if exc.path is None:
                raise Finding(f"restore: RestoreError without .path: {exc}") from exc
            return "refused"
        except Exception as exc:
            raise Finding(f"restore: raw {type(exc).__name__}: {exc}") from exc
    others = [w for w in caught if not issubclass(w.category, errors.CorruptCheckpointWarning)]
    if others:
        raise Finding(f"restore: unexpected warning {others[0].category.__name__}: {others[0].message}")
    skipped = [w for w in caught if NEWEST in str(w.message)]
    if step == 2 and not skipped:
        return "valid"
    if step == 1 and skipped:
        return "fell back"
    raise Finding(f"restore returned {step} with warnings {[str(w.message) for w in caught]}")


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    import logging

    logger = logging.getLogger("savegame")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def campaign(
    seed: int,
    *,
    count: int | None = None,
    seconds: float | None = None,
    save: Path | None = None,
    kinds: tuple[str, ...] = tuple(KINDS),
    edit_rng: bool = False,
) -> dict[str, Any]:
    """Mutate the seed run ``count`` times (or for ``seconds``); returns counts and findings."""
    global EDIT_RNG
    EDIT_RNG = edit_rng
    rng = random.Random(seed)
    stats: dict[str, Any] = {"mutants": 0, "outcomes": collections.Counter(), "findings": []}
    with tempfile.TemporaryDirectory(prefix="sg-fuzz-") as tmp, _quiet_logs():
        seed_run = write_seed_run(Path(tmp) / "seed")
        originals = {name: (seed_run / NEWEST / name).read_bytes() for name in (layout.MANIFEST, TENSOR_FILE)}
        deadline = None if seconds is None else time.monotonic() + seconds
        i = 0
        while (count is None or i < count) and (deadline is None or time.monotonic() < deadline):
            kind = kinds[i % len(kinds)]
            name, mutate = KINDS[kind]
            i += 1
            mutant = mutate(rng, originals[name])
            if mutant == originals[name]:
                continue
            run = Path(tmp) / "run"
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(seed_run, run)
            (run / NEWEST / name).write_bytes(mutant)
            stats["mutants"] += 1
            try:
                outcome = check_run(run, kind=kind, cli=i % 8 == 0)
            except Finding as exc:
                stats["outcomes"][f"{kind}: FINDING"] += 1
                stats["findings"].append((kind, str(exc)))
                if save is not None:
                    dest = save / f"{kind}-{seed}-{i}"
                    shutil.copytree(seed_run, dest, dirs_exist_ok=True)
                    (dest / NEWEST / name).write_bytes(mutant)
                    (dest / "FINDING.txt").write_text(f"{exc}\n\n{traceback.format_exc()}")
                continue
            stats["outcomes"][f"{kind}: {outcome}"] += 1
    return stats


# ---- tests ----------------------------------------------------------------------------------
def _assert_no_findings(stats: dict[str, Any]) -> None:
    assert not stats["findings"], "\n".join(f"{k}: {m}" for k, m in stats["findings"][:10])


def test_short_seeded_campaign_finds_nothing() -> None:
    stats = campaign(0, count=FAST)
    _assert_no_findings(stats)
    assert stats["mutants"] > FAST * 3 // 4
    # every kind reached the fall-back path at least once
    for kind in KINDS:
        assert stats["outcomes"][f"{kind}: fell back"] > 0, stats["outcomes"]


@pytest.mark.slow
def test_long_campaign_finds_nothing() -> None:
    stats = campaign(1000, count=SLOW)
    _assert_no_findings(stats)


def test_edited_rng_state_falls_back_or_is_restore_error(tmp_path: Path) -> None:
    run = write_seed_run(tmp_path / "run")
    p = run / NEWEST / layout.MANIFEST
    body = json.loads(p.read_bytes())
    body.pop("integrity")
    body["trees"][0]["rng"]["python"]["$tuple"][1]["$tuple"][0] = "x"
    body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    p.write_text(json.dumps(body))
    assert check_run(run, kind="edit", cli=False) in ("fell back", "refused")


def _regressions() -> list[Path]:
    return sorted(p for p in REGRESSIONS.iterdir() if p.is_dir()) if REGRESSIONS.is_dir() else []


@pytest.mark.parametrize("case", _regressions(), ids=lambda p: p.name)
def test_regressions_replay(case: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(case, run)
    kind = "edit" if "signed" in case.name else "bytes"
    assert check_run(run, kind=kind, cli=True) == "fell back"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--edit-rng", action="store_true", help="also edit the saved RNG state (known finding)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    stats = campaign(args.seed, seconds=args.minutes * 60, save=args.save, edit_rng=args.edit_rng)
    took = time.monotonic() - t0
    print(f"{stats['mutants']} mutants in {took / 60:.1f} min (seed {args.seed})")
    for k, n in sorted(stats["outcomes"].items()):
        print(f"  {k:28s} {n}")
    for kind, msg in stats["findings"][:50]:
        print(f"FINDING {kind}: {msg[:300]}")
    return 1 if stats["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
