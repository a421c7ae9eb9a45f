"""verify() checks the slices of a partitioned TF variable for overlap box against box (no
numpy, issue 9.18); read() uses a mask of the variable. Both must agree on every layout."""

from __future__ import annotations

import random

import numpy as np

from savegame.interop import tensorflow


def _mask_overlaps(shape: tuple[int, ...], boxes: list[tuple[tuple[int, int], ...]]) -> int | None:
    seen = np.zeros(shape, dtype=np.bool_)
    for j, box in enumerate(boxes):
        region = tuple(slice(s, s + n) for s, n in box)
        if bool(seen[region].any()):
            return j
        seen[region] = True
    return None


def _pairwise_overlaps(boxes: list[tuple[tuple[int, int], ...]]) -> int | None:
    for j, box in enumerate(boxes):
        if any(tensorflow._boxes_overlap(box, other) for other in boxes[:j]):
            return j
    return None


def test_pairwise_overlap_finds_the_same_first_overlap_as_the_mask() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        rank = rng.randint(0, 3)
        shape = tuple(rng.randint(0, 5) for _ in range(rank))
        boxes = []
        for _ in range(rng.randint(1, 5)):
            box = []
            for dim in shape:
                start = rng.randint(0, dim)
                box.append((start, rng.randint(0, dim - start)))
            boxes.append(tuple(box))
        assert _pairwise_overlaps(boxes) == _mask_overlaps(shape, boxes), (shape, boxes)
