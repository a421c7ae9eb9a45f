"""One process runs the distributed save protocol over the no-op ``LocalGroup`` (issue 10): the
group returns its input, world size 1 computes no digests, and a failure is the process's own
error, raised as it is (never a DistributedSaveError), with nothing left on disk."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.distributed import collectives, protocol
from savegame.engine import reader, writer
from savegame.format import layout


def _state() -> sg.TrainState:
    torch.manual_seed(0)
    return sg.TrainState(model=torch.nn.Linear(3, 2), extras={"epoch": 1})


def _stage(tensors: Any) -> dict[str, torch.Tensor]:
    return {k: writer.stage_cpu(t, k) for k, t in tensors.items()}


def test_local_group_returns_what_this_rank_contributed() -> None:
    g = collectives.LocalGroup()
    assert (g.rank, g.world, g.distributed) == (0, 1, False)
    obj = object()
    assert g.broadcast(obj, what="x") is obj
    assert g.gather(obj, what="x") == [obj]
    assert g.broadcast_ints([3, True, 0], what="x") == [3, 1, 0]
    assert g.max_ints([15, True, 0], what="x") == [15, 1, 0]
    assert g.max_int(7, what="x") == 7
    g.destroy()
    for name in ("broadcast", "gather", "gather_to_root", "broadcast_ints", "max_int", "max_ints", "destroy"):
        assert callable(getattr(collectives.Group, name)), name  # the same methods as Group


def test_without_torch_distributed_the_group_is_local() -> None:
    assert not collectives.initialized()
    assert isinstance(collectives.group(), collectives.LocalGroup)


def test_a_single_process_save_goes_through_the_protocol_without_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_digests(t: torch.Tensor) -> str:
        raise AssertionError("world size 1 has nothing to compare: no digest")

    monkeypatch.setattr(protocol, "content_digest", no_digests)
    calls: list[str] = []
    real_prepare, real_persist = protocol.prepare, protocol.persist
    monkeypatch.setattr(
        protocol, "prepare", lambda *a, **k: (calls.append("prepare"), real_prepare(*a, **k))[1]
    )
    monkeypatch.setattr(
        protocol, "persist", lambda *a, **k: (calls.append("persist"), real_persist(*a, **k))[1]
    )
    state = _state()
    with sg.Checkpointer(tmp_path, handle_signals=False) as ck:
        path = ck.save(state, 1)
    assert calls == ["prepare", "persist"]
    m = reader.read_manifest(path)
    assert m.world_size == 1
    assert protocol.INFO_KEY not in m.info  # a plain process's manifest is as before
    assert not any(k.startswith("@rank") for k in m.tensors)  # every tensor written once
    assert reader.verify(path) == []


def test_capture_error_is_the_original_error_and_creates_nothing(tmp_path: Path) -> None:
    state = _state()
    state["extras"]["handle"] = object()  # an unsupported leaf
    with pytest.raises(sg.EncodeError) as info:
        protocol.prepare(collectives.LocalGroup(), state, {}, _stage, root=tmp_path, step=1)
    assert not isinstance(info.value, sg.DistributedSaveError)
    assert list(tmp_path.iterdir()) == []


def test_a_sparse_tensor_is_an_encode_error_at_capture() -> None:
    state = sg.TrainState(rng=False, extras={"s": torch.eye(3).to_sparse()})
    with pytest.raises(sg.EncodeError, match="sparse"):
        protocol.prepare(collectives.LocalGroup(), state, {}, _stage, root=Path("."), step=1)


def test_a_staging_error_is_raised_on_the_callers_thread(tmp_path: Path) -> None:
    def broken(tensors: Any) -> Any:
        raise RuntimeError("no host memory")

    with pytest.raises(RuntimeError, match="no host memory"):
        protocol.prepare(collectives.LocalGroup(), _state(), {}, broken, root=tmp_path, step=1)


def _prepared(tmp_path: Path) -> protocol.Prepared:
    return protocol.prepare(collectives.LocalGroup(), _state(), {}, _stage, root=tmp_path, step=1)


def test_a_write_error_is_the_original_error_and_no_temp_folder_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*a: Any, **k: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_rank_files", full)
    with pytest.raises(OSError, match="No space left") as info:
        protocol.persist(
            collectives.LocalGroup(), tmp_path, 1, _prepared(tmp_path), run_id="r", metrics={}
        )
    assert not isinstance(info.value, sg.CheckpointError)
    assert list(tmp_path.iterdir()) == []


def test_a_commit_error_is_the_original_error_and_no_temp_folder_stays(tmp_path: Path) -> None:
    group = collectives.LocalGroup()
    protocol.persist(group, tmp_path, 1, _prepared(tmp_path), run_id="r", metrics={})
    with pytest.raises(sg.StepExistsError):
        protocol.persist(group, tmp_path, 1, _prepared(tmp_path), run_id="r", metrics={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [layout.LATEST, layout.step_dir(1)]


def test_an_interrupt_mid_write_leaves_no_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_rank_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        protocol.persist(
            collectives.LocalGroup(), tmp_path, 1, _prepared(tmp_path), run_id="r", metrics={}
        )
    assert list(tmp_path.iterdir()) == []


def test_a_failed_capture_does_not_count_as_a_save(tmp_path: Path) -> None:
    state = _state()
    with sg.Checkpointer(
        tmp_path, keep=sg.Keep(last=5, best=1, monitor="acc", mode="max"), handle_signals=False
    ) as ck:
        ck.save(state, 1, metrics={"acc": 0.5})
        state["extras"]["handle"] = object()
        with pytest.raises(sg.EncodeError):
            ck.save(state, 2, metrics={"acc": 0.9})
        del state["extras"]["handle"]
        ck.save(state, 3, metrics={"acc": 0.7})
    m = reader.read_manifest(tmp_path / layout.step_dir(3))
    assert m.info["index"] == 1  # the failed save took no index
    assert [r.step for r in reader.list_checkpoints(tmp_path)] == [1, 3]
