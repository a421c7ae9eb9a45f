"""Turn a checkpoint written by N ranks into a single-rank checkpoint (``savegame convert``).

Invariant: the result is an ordinary world-size-1 savegame checkpoint, committed with the same
protocol (appears complete or not at all); every sharded tensor is reassembled whole from its
chunks' global offsets, and every byte read was verified against its hash first.
"""

from __future__ import annotations

import os
from pathlib import Path

from savegame import errors
from savegame import tree as treelib
from savegame.distributed import planning
from savegame.engine import reader, writer

__all__ = ["consolidate"]


def consolidate(src_ckpt: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write the checkpoint folder ``src_ckpt`` (any world size) as one single-rank folder ``dst``.

    Replicated and sharded state (model, optimizer, scheduler) comes out whole, under the same
    keys, so ``savegame.load(dst)["model"]`` is a plain ``state_dict`` for inference (keys of a
    model saved through ``DistributedDataParallel`` lose its ``module.`` prefix). Per-rank
    state (RNG, loader position, extras) is taken from rank 0 and the source world size is
    recorded in ``info["consolidated_from"]``; to *continue training* on another number of
    ranks, restore the original checkpoint instead (it reshards, see docs/distributed.md).
    Single process, no process group needed. Memory: the whole state is held once in RAM.

    Args:
        src_ckpt: A checkpoint folder (``<run>/step-…``).
        dst: The folder to create.

    Returns:
        ``dst``.

    Raises:
        StepExistsError: ``dst`` exists.
        FormatError, IntegrityError: ``src_ckpt`` is damaged.
    """
    src, out = Path(src_ckpt), Path(dst)
    if out.exists():
        raise errors.StepExistsError(f"{out} already exists; choose a new path", path=out)
    m = reader.read_manifest(src)
    tree = dict(m.trees[0])
    keys = list(dict.fromkeys(planning.tensor_refs(tree)))
    renames = {k: planning.source_key(k) for k in keys if planning.source_key(k) != k}
    # Models saved through DDP before savegame unwrapped it have "module."-prefixed keys: give
    # the bare module's keys, which is what an inference user loads into.
    dinfo = m.info.get("distributed")
    replicated = dinfo.get("replicated", []) if isinstance(dinfo, dict) else []
    for name in replicated if isinstance(replicated, list) else []:
        sub = tree.get(name)
        bare = planning.strip_wrapper_prefix(sub)
        if bare is sub:
            continue
        tree[name] = bare
        old = treelib.join_key([name, planning.WRAPPER_PREFIX])
        for k in planning.tensor_refs(sub):
            src_key = renames.get(k, k)
            if src_key.startswith(old):
                renames[k] = treelib.join_key([name]) + "/" + src_key[len(old) :]
    loaded = reader.load_tensors(src, m, keys)
    staged = {renames.get(k, k): t for k, t in loaded.items()}
    info = {k: v for k, v in m.info.items() if k != "distributed"}
    info["consolidated_from"] = {"path": str(src), "world_size": m.world_size, "per_rank_from": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    return writer.write_staged(
        out.parent,
        m.step,
        planning.rename_tensors(tree, renames),
        staged,
        run_id=m.run_id,
        metrics=dict(m.metrics),
        info=info,
        final=out,
    )
