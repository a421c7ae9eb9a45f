"""Pure naming of things inside a run folder. No I/O.

    <run>/step-000000001200/manifest.json      the commit point
    <run>/step-000000001200/rank-00000.safetensors
    <run>/.tmp-step-000000001200-<id>/          a save in progress (garbage if it outlives its writer)
    <run>/damaged-step-000000001200-<id>/       a checkpoint that failed verification, set aside
                                                (kept for inspection; never restored, never counted
                                                by retention, never in the way of a new save)
    <run>/retired-step-000000001100-rank-00000.safetensors
                                                a tensor file of a deleted checkpoint that later
                                                checkpoints still refer to (incremental saves):
                                                references to step-000000001100/rank-00000…
                                                resolve here once that folder is gone; removed
                                                once no manifest refers to it
    <run>/run.json                              the run family's id (retention only deletes our own)
    <run>/LATEST                                a hint, never the truth
    <run>/.lock                                 the writer lock
"""

from __future__ import annotations

import numbers
import re

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
LATEST = "LATEST"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
RETIRED_PREFIX = "retired-"

# Names come from listings: matched whole (``fullmatch``: ``$`` would also take a name that ends
# in a newline, a second "step 3") and with ASCII digits only (``\d`` takes every script's digits,
# which ``int`` reads: "step-٠٠٠٠٠٠٠٠٠٠٠٣" would be step 3 too).
_STEP_RE = re.compile(r"step-([0-9]{12})")
_DAMAGED_RE = re.compile(r"damaged-step-([0-9]{12})-[0-9a-f]+")
_RETIRED_RE = re.compile(r"retired-(step-[0-9]{12})-(rank-[0-9]{5}(?:-[0-9]{3})?\.safetensors)")


def step_dir(step: int) -> str:
    """Folder name of a step: zero-padded so names sort in step order."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"step must be an int (the number of completed optimizer steps), got {type(step).__name__} {step!r}"
        )
    if step < 0 or step >= 10**12:
        raise ValueError(f"step must be in [0, 10**12), got {step}")
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a checkpoint folder name, or None if the name is not one."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def damaged_dir(step: int, token: str) -> str:
    """Name a checkpoint folder gets when it is set aside as damaged (``token``: hex)."""
    return f"{DAMAGED_PREFIX}{step_dir(step)}-{token}"


def parse_damaged_dir(name: str) -> int | None:
    """The step of a set-aside damaged checkpoint folder name, or None if the name is not one."""
    m = _DAMAGED_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def tmp_dir(step: int, token: str) -> str:
    return f"{TMP_PREFIX}{step_dir(step)}-{token}"


# What savegame itself names with TMP_PREFIX: a save in progress (tmp_dir) and a deletion's
# trash (``.tmp-deleted-<name>-<hex>``). Only these are ever removed as leftovers: a user's
# own ``.tmp-notes`` folder in a run is not ours to delete.
_TMP_RE = re.compile(r"\.tmp-(?:step-[0-9]{12}-.+|deleted-.+)")


def is_tmp(name: str) -> bool:
    """Whether ``name`` is a temp folder or file savegame made (a save or a deletion)."""
    return _TMP_RE.fullmatch(name) is not None


def tensor_file(rank: int, part: int = 0) -> str:
    """Tensor file of one rank; ``part`` > 0 when a rank's tensors are split over files."""
    if part == 0:
        return f"rank-{rank:05d}.safetensors"
    return f"rank-{rank:05d}-{part:03d}.safetensors"


def retired_file(ref: str) -> str:
    """Where the shared file ``step-…/rank-….safetensors`` (a reference, relative to the run)
    lives once its checkpoint folder was deleted: ``retired-step-…-rank-….safetensors`` in the
    run folder (a file beside the step folders, so a deleted checkpoint leaves no folder)."""
    folder, _, name = ref.partition("/")
    return f"{RETIRED_PREFIX}{folder}-{name}"


def parse_retired_file(name: str) -> str | None:
    """The reference (``step-…/rank-….safetensors``) a retired file stands for, or None."""
    m = _RETIRED_RE.fullmatch(name)
    return f"{m.group(1)}/{m.group(2)}" if m else None
