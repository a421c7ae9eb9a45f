from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from savegame import tree as treelib
from savegame.state import rng


def draws() -> tuple[float, float, float, int]:
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(1).item(),
        int(torch.randint(0, 2**62, (1,)).item()),
    )


def test_restore_makes_every_generator_repeat_its_draws() -> None:
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    snap = rng.capture()
    first = draws()
    rng.restore(snap)
    assert draws() == first


def test_snapshot_survives_the_tagged_json_codec_exactly() -> None:
    snap = rng.capture()
    first = draws()
    skeleton, tensors = treelib.encode(snap)
    decoded = treelib.decode(json.loads(json.dumps(skeleton, allow_nan=False)), tensors)
    rng.restore(decoded)
    assert draws() == first


def test_capture_holds_no_numpy_objects_or_pickles() -> None:
    skeleton, tensors = treelib.encode(rng.capture())
    # numpy's MT19937 key is an ndarray (stored as a tensor), torch's state a uint8 tensor;
    # everything else is plain JSON.
    assert set(tensors) == {"numpy/state/key", "torch"}
    assert skeleton["numpy"]["state"]["key"] == {"$ndarray": "numpy/state/key"}
    json.dumps(skeleton, allow_nan=False)


def test_cuda_states_without_cuda_warn_and_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    snap = rng.capture()
    snap["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with pytest.warns(RuntimeWarning, match="1 CUDA devices but this process has 0"):
        rng.restore(snap)
