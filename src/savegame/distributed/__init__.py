"""Multi-process checkpoints on torch.distributed (DESIGN.md §4; user guide docs/distributed.md).

:class:`savegame.Checkpointer` detects an initialized process group by itself; this package
adds :func:`consolidate`, which turns a checkpoint written by N ranks into a single-rank one.
Only :mod:`savegame.distributed.collectives` imports ``torch.distributed``.
"""

from __future__ import annotations

from savegame.distributed.consolidate import consolidate

__all__ = ["consolidate"]
