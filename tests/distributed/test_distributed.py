"""Multi-process save/restore on gloo (CPU): DDP and FSDP2, exact resume, resharding, failures.

Each test starts real processes (``conftest.launch``) on a free loopback port; every launch is
bounded by a wall-clock timeout and the ranks by SAVEGAME_DIST_TIMEOUT_S, so a bug fails a test
instead of hanging CI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _launch import launch

import savegame as sg
from savegame import distributed
from savegame.engine import reader

pytestmark = pytest.mark.distributed


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    ("kind", "world", "async_save"),
    [
        ("ddp", 2, False),
        ("fsdp", 2, True),
        # 4 ranks on 2 cores: 15-25 s each (CI: tests/distributed/test_campaign.py's kills and
        # the 4-rank reshard round trip)
        pytest.param("ddp", 4, True, marks=pytest.mark.slow),
        pytest.param("fsdp", 4, False, marks=pytest.mark.slow),
    ],
)
def test_exact_resume_after_all_ranks_are_killed(
    tmp_path: Path, kind: str, world: int, async_save: bool
) -> None:
    run = {"root": str(tmp_path / "run"), "out": str(tmp_path), "kind": kind, "steps": 5, "every": 3,
           "async_save": async_save}  # fmt: skip
    # Uninterrupted run (saves at step 3), then every rank dies without close().
    launch("train", world, {**run, "tag": "uninterrupted", "hard_exit": True})
    refs = reader.list_checkpoints(tmp_path / "run")
    assert [r.step for r in refs] == [3] and refs[0].valid
    m = refs[0].manifest
    assert m is not None and m.world_size == world and len(m.trees) == world
    assert reader.verify(refs[0].path) == []
    model_keys = [k for k in m.tensors if k.split("/")[0] == "model"]
    if kind == "ddp":  # replicated: written once, by rank 0, not N times
        assert all(len(m.tensors[k].chunks) == 1 for k in model_keys)
        assert all(m.tensors[k].chunks[0].file == "rank-00000.safetensors" for k in model_keys)
    else:  # sharded: the weight of the first layer has a chunk per owning rank
        weight = m.tensors["model/0.weight"]
        assert weight.shape == (13, 8) and len(weight.chunks) > 1
        assert {c.file for c in weight.chunks} >= {
            "rank-00000.safetensors",
            "rank-00001.safetensors",
        }
    per_rank = [k for k in m.tensors if k.startswith("@rank")]
    assert {k.split("/")[0] for k in per_rank} == {
        f"@rank{r:05d}" for r in range(world)
    }  # RNG per rank
    # Restart: resume from step 3 and finish; parameters must be bitwise equal.
    launch("train", world, {**run, "tag": "resumed", "expect_start": 3})
    a, b = _load(tmp_path / "params-uninterrupted.pt"), _load(tmp_path / "params-resumed.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    tree = sg.load(ckpt)
    out = {}
    for k, v in tree["model"].items():
        out[f"model/{k}"] = v
    for idx, st in tree["optimizer"]["state"].items():
        for name, v in st.items():
            out[f"optimizer/{idx}/{name}"] = v
    return out


def _plain_state() -> tuple[torch.nn.Module, sg.TrainState]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 13), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(13, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, sg.TrainState(model=model, optimizer=opt, extras={"epoch": 99})


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_reshard_4_2_1_4_round_trip_keeps_every_tensor(tmp_path: Path) -> None:
    out = str(tmp_path)
    launch("train", 4, {"root": str(tmp_path / "w4"), "out": out, "kind": "fsdp", "steps": 2, "tag": "x",
                        "save_at_end": 2})  # fmt: skip
    first_ckpt = tmp_path / "w4" / "step-000000000002"
    # Per-rank state (4 RNG streams) cannot go onto 1 rank: strict (the default) refuses.
    _, state = _plain_state()
    with sg.Checkpointer(tmp_path / "w4", handle_signals=False) as ckpt:
        with pytest.raises(sg.RestoreError, match="per_rank='fresh'"):
            ckpt.restore(state)
    src = first_ckpt
    for name, world in (("w2", 2), ("w1", 1), ("w4b", 4)):
        dst = tmp_path / name
        dst.mkdir()
        shutil.copytree(src, dst / src.name)  # the previous stage's checkpoint starts this stage
        step = int(src.name.split("-")[1])
        if world == 1:  # single process, no process group: a plain model
            model, state = _plain_state()
            with sg.Checkpointer(dst, handle_signals=False) as ckpt:
                with pytest.warns(UserWarning, match="left as constructed"):
                    assert ckpt.restore(state, per_rank="fresh") == step
                assert state["extras"] == {"epoch": 0}  # equal on every rank: restored
                ckpt.save(state, step + 1)
        else:
            launch("train", world, {"root": str(dst), "out": out, "kind": "fsdp", "steps": step, "tag": name,
                                    "per_rank": "fresh", "expect_start": step, "save_at_end": step + 1})  # fmt: skip
        src = dst / f"step-{step + 1:012d}"
        assert reader.read_manifest(src).world_size == world
        assert reader.verify(src) == []
    first, last = _tensors(first_ckpt), _tensors(src)
    assert (
        first.keys() == last.keys() and len(first) == 16
    )  # 4 params + Adam step/exp_avg/exp_avg_sq
    for k in first:
        assert torch.equal(first[k], last[k]), k
    assert sg.load(src)["extras"] == {"epoch": 0}
    # Consolidation of the 2-rank (sharded) stage: one rank, whole tensors, plain keys.
    two = tmp_path / "w2" / "step-000000000003"
    dst = distributed.consolidate(two, tmp_path / "single")
    m = reader.read_manifest(dst)
    assert m.world_size == 1 and len(m.files) == 1
    assert not any(k.startswith("@rank") for k in m.tensors)
    assert m.info["consolidated_from"]["world_size"] == 2
    assert reader.verify(dst) == []
    consolidated = _tensors(dst)
    for k in first:
        assert torch.equal(first[k], consolidated[k]), k
    model, _ = _plain_state()
    model.load_state_dict(sg.load(dst)["model"])  # loads into a plain model for inference
    with pytest.raises(sg.StepExistsError):
        distributed.consolidate(two, dst)
    # `savegame convert` does the same for inference users, from the run folder (newest valid).
    from safetensors.torch import load_file

    from savegame.cli.main import main as cli

    assert (
        cli(
            [
                "convert",
                str(tmp_path / "w2"),
                str(tmp_path / "w2.safetensors"),
                "--to",
                "safetensors",
            ]
        )
        == 0
    )
    flat = load_file(tmp_path / "w2.safetensors")
    assert not any(k.startswith("@rank") for k in flat)
    assert cli(["convert", str(two), str(tmp_path / "w2-single"), "--to", "savegame"]) == 0
    assert reader.read_manifest(tmp_path / "w2-single").world_size == 1
    converted = _tensors(tmp_path / "w2-single")
    for k in first:
        assert torch.equal(first[k], converted[k]), k
        assert torch.equal(first[k], flat[k.replace("optimizer/", "optimizer/state/")]), k
    assert cli(["diff", str(dst), str(tmp_path / "w2-single")]) == 0


def _reports(tmp_path: Path, ranks: list[int]) -> dict[int, dict[str, Any]]:
    return {r: json.loads((tmp_path / f"report-{r}.json").read_text()) for r in ranks}


def test_failed_rank_means_no_commit_and_every_rank_raises(tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch("failures", 2, {"root": str(run), "out": str(tmp_path), "mode": "raise", "bad_rank": 1})
    reports = _reports(tmp_path, [0, 1])
    for rep in reports.values():
        assert rep["error"] == "DistributedSaveError"
        assert list(rep["failures"]) == ["1"] and "No space left" in rep["failures"]["1"]
    steps = [r.step for r in reader.list_checkpoints(run)]
    assert steps == [1, 3]  # step 2 never committed; the next save worked
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("mode", ["kill"])
def test_killed_rank_mid_save_no_commit_others_name_it(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    codes = launch("failures", 4, {"root": str(run), "out": str(tmp_path), "mode": mode, "bad_rank": 2},
                   expect_ok=False)  # fmt: skip
    assert codes[2] != 0 and [c for r, c in enumerate(codes) if r != 2] == [0, 0, 0]
    reports = _reports(tmp_path, [0, 1, 3])
    for rep in reports.values():
        assert rep["error"] == "DistributedSaveError"
        assert "2" in rep["failures"], rep
    assert "2" in reports[0]["failures"] and "did not report" in reports[0]["failures"]["2"]
    refs = reader.list_checkpoints(run)
    assert [r.step for r in refs] == [1] and refs[0].valid  # the previous checkpoint stands
    assert reader.verify(refs[0].path) == []
    assert sg.load(refs[0].path)["extras"] == {"epoch": 0}


def test_share_corrupt_on_one_rank_leaves_no_rank_half_restored(tmp_path: Path) -> None:
    run = {"root": str(tmp_path / "run"), "out": str(tmp_path), "kind": "fsdp", "steps": 2}
    launch("train", 2, {**run, "every": 2, "tag": "fresh"})
    ckpt = tmp_path / "run" / "step-000000000002"
    m = reader.read_manifest(ckpt)
    # Flip a byte of a parameter chunk only rank 1 reads (rank 0 verifies its own share fine).
    chunk = next(
        c for c in m.tensors["model/0.weight"].chunks if c.file == "rank-00001.safetensors"
    )
    path = ckpt / chunk.file
    data = bytearray(path.read_bytes())
    data[chunk.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    # The only checkpoint is unusable on rank 1: every rank starts from scratch, and rank 0 must
    # not keep the shard it had already verified (it would diverge from the scratch run).
    launch("train", 2, {**run, "every": 1000, "tag": "again", "expect_start": 0})
    a, b = _load(tmp_path / "params-fresh.pt"), _load(tmp_path / "params-again.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
