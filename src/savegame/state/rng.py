"""Every random number generator a training process draws from: python ``random``, numpy's
global generator, torch CPU, and each CUDA device.

Invariant: :func:`capture` returns plain values and tensors only (no pickled numpy objects —
ANCHORS #6), and :func:`restore` makes the next draw of every generator equal to the draw the
uninterrupted process would have made.
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture() -> dict[str, Any]:
    """Snapshot all generators of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    # Only touch CUDA if the process already initialized it: querying device state must not
    # create a context on every GPU of a CPU-only job.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore(state: dict[str, Any]) -> None:
    """Set every generator from :func:`capture`'s snapshot.

    CUDA generator states saved on a GPU machine are skipped, with a warning, where this
    process has no CUDA (a GPU checkpoint restores on a CPU-only machine) or fewer devices.
    """
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np_state = state["numpy"]
        if isinstance(np_state, dict):
            np_state = dict(np_state)
            np_state["state"] = dict(np_state["state"])
        np.random.set_state(np_state)
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < len(cuda_states):
            warnings.warn(
                f"checkpoint holds RNG states of {len(cuda_states)} CUDA devices but this process has {have}; "
                "restoring those that exist (GPU random streams will differ from the saved run)",
                RuntimeWarning,
                stacklevel=3,
            )
        for i, s in enumerate(cuda_states[:have]):
            torch.cuda.set_rng_state(s.cpu(), i)
