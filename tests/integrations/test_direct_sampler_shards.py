"""``DirectRandomSampler(num_replicas=W, rank=r)``: the per-rank share the Trainer integration
gives each DDP rank (a ``DistributedSampler`` look-alike whose position is restored directly)."""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

from savegame.integrations.accelerate import DirectRandomSampler  # noqa: E402


def test_shares_are_disjoint_padded_like_distributed_sampler_and_resume_directly() -> None:
    data = list(range(10))
    samplers = [DirectRandomSampler(data, seed=3, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in samplers] == [4, 4, 4]
    epochs = [[list(s) for s in samplers] for _ in range(2)]
    for shares in epochs:
        flat = [i for share in shares for i in share]
        assert (
            sorted(set(flat)) == data and len(flat) == 12
        )  # 2 padded from the permutation's start
    assert epochs[0] != epochs[1]  # a new permutation every epoch, the same on every rank
    single = DirectRandomSampler(data, seed=3)
    perm = list(single)
    assert epochs[0][1] == (perm + perm[:2])[1::3]

    # mid-epoch: a fresh sampler restored from the iterator's state continues with the same share
    s = DirectRandomSampler(data, seed=3, num_replicas=3, rank=2)
    it = iter(s)
    first = [next(it), next(it)]
    state = it.state_dict()
    rest = list(it)
    again = iter(DirectRandomSampler(data, seed=99, num_replicas=3, rank=2))
    again.load_state_dict(state)
    assert first + list(again) == epochs[0][2] and list(again) == [] and rest == epochs[0][2][2:]


def test_a_rank_outside_the_replicas_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, num_replicas=2\)"):
        DirectRandomSampler([0, 1], seed=0, num_replicas=2, rank=2)
