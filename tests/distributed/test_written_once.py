""" "Written once" is decided by content (issue 9, item 3) and wrapped models restore without
their wrapper (item 4): DDP with BatchNorm, whose running statistics differ between ranks.

Every rank's final state is compared, not rank 0's alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _launch import launch

import savegame as sg
from savegame import distributed
from savegame import tree as treelib
from savegame.distributed import planning
from savegame.engine import reader

pytestmark = pytest.mark.distributed

SCENARIOS = Path(__file__).with_name("_scenarios.py")
BN_BUFFERS = ("model/1.running_mean", "model/1.running_var")


def _final(tmp_path: Path, tag: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / f"final-{tag}-{rank}.pt", weights_only=True)


def _bare_bn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


# ---- pure rules ------------------------------------------------------------------------------
def test_shared_keys_are_equal_on_every_rank_and_present_everywhere() -> None:
    digests = [{"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "X", "c": "3"}, {"a": "1", "b": "2"}]
    assert planning.shared_keys(digests) == {"a"}
    assert planning.shared_keys([{"a": "1"}]) == {"a"}
    assert planning.shared_keys([]) == set()


def _trees(world: int) -> list[object]:
    """What DDP with BatchNorm saves: weights equal everywhere, running stats per rank."""
    trees = []
    for rank in range(world):
        skel, live = treelib.encode(
            {"model": {"w": torch.ones(2), "bn.running_mean": torch.full((2,), float(rank))},
             "extras": {"epoch": 3, "t": torch.zeros(1)}}
        )  # fmt: skip
        shared = {"model/w", "extras/t"}
        trees.append(planning.plan_save(rank, skel, list(live), shared=shared, shards={}).skeleton)
    return trees


def test_per_rank_tensors_inside_a_model_go_back_to_their_rank() -> None:
    trees = _trees(2)
    plan = planning.plan_restore(trees, rank=1, world=2, replicated={"model"}, extras={"extras"},
                                 per_rank="strict", where="x")  # fmt: skip
    assert set(plan.keys) == {"model/w", "@rank00001/model/bn.running_mean", "extras/t"}
    assert plan.fresh == () and plan.from_rank0 == ()


def test_world_size_change_follows_the_per_rank_rule_for_tensors() -> None:
    trees = _trees(2)
    with pytest.raises(sg.RestoreError, match=r"model/bn\.running_mean.*per_rank='fresh'"):
        planning.plan_restore(trees, rank=0, world=1, replicated={"model"}, extras={"extras"},
                              per_rank="strict", where="x")  # fmt: skip
    fresh = planning.plan_restore(trees, rank=0, world=3, replicated={"model"}, extras={"extras"},
                                  per_rank="fresh", where="x")  # fmt: skip
    assert fresh.from_rank0 == ("model/bn.running_mean",) and fresh.fresh == ()
    assert "@rank00000/model/bn.running_mean" in fresh.keys
    # equal extras holding a tensor equal on every rank restore on any world size
    assert "extras" in fresh.skeleton and "extras/t" in fresh.keys


def test_strip_wrapper_prefix_only_when_every_key_has_it() -> None:
    assert planning.strip_wrapper_prefix({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    mixed = {"module.a": 1, "b": 2}
    assert planning.strip_wrapper_prefix(mixed) is mixed
    opt = {"state": {}, "param_groups": []}
    assert planning.strip_wrapper_prefix(opt) is opt


def test_match_wrapper_keys_strips_module_prefix_only_when_the_live_model_needs_it() -> None:
    from savegame.distributed import protocol

    bare = _bare_bn()
    saved = {f"module.{k}": v for k, v in bare.state_dict().items()}
    state = sg.TrainState(model=bare, extras={}, rng=False)
    out = protocol.match_wrapper_keys(state, {"model": saved, "extras": {"module.x": 1}})
    assert set(out["model"]) == set(bare.state_dict())
    assert out["extras"] == {"module.x": 1}  # not a module: untouched

    class Holder(torch.nn.Module):  # a model whose own keys start with "module."
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(2, 2)

    holder = Holder()
    own = dict(holder.state_dict())
    state = sg.TrainState(model=holder, rng=False)
    assert protocol.match_wrapper_keys(state, {"model": own})["model"] is own


# ---- processes -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("broadcast_buffers", "async_save"),
    [pytest.param(False, False, marks=pytest.mark.slow), (True, True)],  # CI < 20 min
    ids=["bb-off-sync", "bb-on-async"],
)
def test_ddp_batchnorm_buffers_are_kept_per_rank_and_resume_exactly(
    tmp_path: Path, broadcast_buffers: bool, async_save: bool
) -> None:
    run = {"root": str(tmp_path / "run"), "out": str(tmp_path), "steps": 6, "every": 4,
           "async_save": async_save, "broadcast_buffers": broadcast_buffers}  # fmt: skip
    launch("bn", 2, {**run, "tag": "straight", "hard_exit": True}, worker=SCENARIOS)
    ref = reader.list_checkpoints(tmp_path / "run")[-1]
    m = ref.manifest
    assert m is not None and ref.step == 4 and reader.verify(ref.path) == []
    # Parameters and Adam moments are equal on both ranks: written once, by rank 0, bare keys.
    for key in ("model/0.weight", "model/3.bias", "optimizer/state/0/exp_avg"):
        assert [c.file for c in m.tensors[key].chunks] == ["rank-00000.safetensors"], key
    assert not any("module." in k for k in m.tensors)  # DDP's wrapper prefix is not saved
    # BatchNorm running statistics differ between the ranks: one copy per rank, each its own.
    for key in BN_BUFFERS:
        assert key not in m.tensors
        for rank in range(2):
            assert planning.rank_key(rank, key) in m.tensors
    saved = [sg.load(ref.path, rank=r)["model"] for r in range(2)]
    assert not torch.equal(saved[0]["1.running_mean"], saved[1]["1.running_mean"])
    # Restart from step 4 (all ranks were killed after it): every rank ends bitwise equal.
    launch("bn", 2, {**run, "tag": "resumed", "expect_start": 4}, worker=SCENARIOS)
    for rank in range(2):
        a, b = _final(tmp_path, "straight", rank), _final(tmp_path, "resumed", rank)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rank, k)
    assert not torch.equal(_final(tmp_path, "resumed", 0)["model/1.running_mean"],
                           _final(tmp_path, "resumed", 1)["model/1.running_mean"])  # fmt: skip


@pytest.mark.parametrize("old_format", [False, True], ids=["bare-keys", "module-prefix"])
def test_ddp_run_restores_into_the_bare_module_in_a_plain_process(
    tmp_path: Path, old_format: bool
) -> None:
    run = {"root": str(tmp_path / "run"), "out": str(tmp_path), "steps": 3, "every": 3,
           "old_format": old_format}  # fmt: skip
    launch("bn", 2, {**run, "tag": "ddp"}, worker=SCENARIOS)
    ckpt_dir = tmp_path / "run" / "step-000000000003"
    m = reader.read_manifest(ckpt_dir)
    assert any("module." in k for k in m.tensors) == old_format
    # A plain process with the bare module: 2 ranks -> 1 is a world-size change; the per-rank
    # BatchNorm statistics follow the per-rank rule (strict refuses and says how) ...
    model = _bare_bn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0}, rng=False)
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        with pytest.raises(sg.RestoreError, match=r"1\.running_mean.*per_rank='fresh'"):
            ckpt.restore(state)
        # ... and fresh takes rank 0's, with a warning naming them.
        with pytest.warns(UserWarning, match=r"taken from rank 0.*running_mean"):
            assert ckpt.restore(state, per_rank="fresh") == 3
    rank0 = _final(tmp_path, "ddp", 0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, rank0[f"model/{k}"]), k
    # Consolidation and `savegame convert` give the bare module's keys too.
    single = distributed.consolidate(ckpt_dir, tmp_path / "single")
    bare = _bare_bn()
    bare.load_state_dict(sg.load(single)["model"])
    for k, v in bare.state_dict().items():
        assert torch.equal(v, rank0[f"model/{k}"]), k
    from safetensors.torch import load_file

    from savegame.cli.main import main as cli

    assert (
        cli(
            [
                "convert",
                str(tmp_path / "run"),
                str(tmp_path / "m.safetensors"),
                "--to",
                "safetensors",
            ]
        )
        == 0
    )
    flat = load_file(tmp_path / "m.safetensors")
    assert {k.removeprefix("model/") for k in flat if k.startswith("model/")} == set(
        bare.state_dict()
    )


def test_one_rank_ddp_run_restores_into_the_bare_module(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 1 with DDP: a world-size-1 checkpoint; the bare module in a
    plain process restores it as it is (strict, RNG included)."""
    run = {
        "root": str(tmp_path / "run"),
        "out": str(tmp_path),
        "steps": 3,
        "every": 3,
        "force_pg": True,
    }
    launch("bn", 1, {**run, "tag": "one"}, worker=SCENARIOS)
    m = reader.read_manifest(tmp_path / "run" / "step-000000000003")
    assert m.world_size == 1 and not any("module." in k for k in m.tensors)
    model = _bare_bn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = sg.TrainState(model=model, optimizer=opt, extras={"epoch": 0})
    with sg.Checkpointer(tmp_path / "run", handle_signals=False) as ckpt:
        assert ckpt.restore(state) == 3
    ref = _final(tmp_path, "one", 0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[f"model/{k}"]), k
