"""Exact data order: make a dataset's random augmentation resumable.

``StatefulDataLoader`` restores the shuffle order exactly, but not random augmentation drawn
inside ``__getitem__``: on restore its workers are re-seeded from the saved base seed, so their
random streams restart (measured with torch 2.13 / torchdata 0.11, DESIGN.md §2). The loader
does, however, snapshot each worker's *dataset* state with every batch it yields, if the
dataset has ``state_dict()`` / ``load_state_dict()``. :func:`resumable` gives it exactly that:
the worker-local torch, numpy and python generator states.

Rule for your own datasets: if ``__getitem__`` draws random numbers, either wrap the dataset with
:func:`resumable`, or give it ``state_dict()``/``load_state_dict()`` that save and restore every
generator it draws from (including its own ``torch.Generator``/``np.random.Generator``).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from torch.utils.data import Dataset

from savegame.state import rng

__all__ = ["resumable"]

T = TypeVar("T")


class _Resumable(Dataset[T], Generic[T]):
    def __init__(self, dataset: Dataset[T]) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> T:
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: expose the wrapped dataset's.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": rng.capture()}
        inner = getattr(self.dataset, "state_dict", None)
        if callable(inner):
            state["dataset"] = inner()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng.restore(state["rng"])
        inner = getattr(self.dataset, "load_state_dict", None)
        if callable(inner) and "dataset" in state:
            inner(state["dataset"])


def resumable(dataset: Dataset[T]) -> Dataset[T]:
    """Wrap a map-style dataset so ``StatefulDataLoader`` restores its random augmentation.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = resumable(TensorDataset(torch.arange(4.0)))
        >>> len(ds), sorted(ds.state_dict())
        (4, ['rng'])
    """
    return _Resumable(dataset)
