"""Data loading that survives interruption: resumable augmentation, and workers that leave
preemption signals to the main process.

``StatefulDataLoader`` restores the shuffle order exactly, but not random augmentation drawn
inside ``__getitem__``: on restore its workers are re-seeded from the saved base seed, so their
random streams restart (measured with torch 2.13 / torchdata 0.11, DESIGN.md §2). The loader
does, however, snapshot each worker's *dataset* state with every batch it yields, if the
dataset has ``state_dict()`` / ``load_state_dict()``. :func:`resumable` gives it exactly that:
the worker-local torch, numpy and python generator states.

Rule for your own datasets: if ``__getitem__`` draws random numbers, either wrap the dataset with
:func:`resumable`, or give it ``state_dict()``/``load_state_dict()`` that save and restore every
generator it draws from (including its own ``torch.Generator``/``np.random.Generator``).

That state belongs to each worker process: a loader restored *mid-epoch* with another
``num_workers`` cannot split it over the new workers and is refused with ``RestoreError``
(another batch size is fine; docs/resume.md).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from torch.utils.data import DataLoader, Dataset

from savegame.state import loader as loaderlib
from savegame.state import rng

__all__ = ["quiet_workers", "resumable"]

T = TypeVar("T")
L = TypeVar("L", bound=DataLoader[Any])


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


def quiet_workers(loader: L) -> L:
    """Make ``loader``'s worker processes ignore SIGTERM / SIGUSR1 / SIGINT from anyone but the
    loader's own process, and return it.

    ``scancel``, ``kill -TERM -PGID``, Ctrl-C and torchrun signal every process of a job; a
    worker that dies of it makes the main process raise ``RuntimeError: DataLoader worker ...
    killed by signal`` before the Checkpointer can save. Loaders in a ``TrainState`` get this
    automatically; call it for the others that run workers (an evaluation loader), before their
    first iteration. Your ``worker_init_fn`` still runs; workers still exit when the main process
    exits or dies. Works with the fork, spawn and forkserver start methods.

    Warns (``UserWarning``) if the loader already runs workers: those cannot be changed.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = quiet_workers(DataLoader(TensorDataset(torch.zeros(4)), num_workers=2))
        >>> loader.worker_init_fn.__wrapped__ is None
        True
    """
    loaderlib.guard(loader, what="savegame.data.quiet_workers()")
    return loader
