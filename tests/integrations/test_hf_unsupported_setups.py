"""The Hugging Face integrations under several processes: DDP is supported (tested in
test_hf_torchrun_resume.py and test_accelerate_torchrun_resume.py); the modes whose model or
optimizer is sharded in the engine's own layout (FSDP, DeepSpeed, Megatron, XLA, tensor
parallelism) are refused before anything is restored or written, with ``UnsupportedSetupError``
(a ``ValueError``) naming the fix. The checks run on the objects' reported modes, so they are
tested here without starting those engines.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate.utils import DistributedType  # noqa: E402

from savegame.integrations import accelerate as sga  # noqa: E402
from savegame.integrations import transformers as sgt  # noqa: E402


def _trainer(world: int, **engines: bool) -> SimpleNamespace:
    return SimpleNamespace(args=SimpleNamespace(world_size=world), **engines)


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("is_fsdp_enabled", "FSDP"),
        ("is_deepspeed_enabled", "DeepSpeed"),
        ("is_tp_enabled", "tensor parallelism"),
    ],
)
def test_trainer_sharding_engines_are_refused_naming_the_fix(flag: str, name: str) -> None:
    with pytest.raises(
        sgt.UnsupportedSetupError, match=rf"not {name} \(world size 2\).*Train with DDP"
    ):
        sgt._check_parallel_mode(_trainer(2, **{flag: True}))


def test_trainer_one_process_passes_and_ddp_needs_a_process_group() -> None:
    sgt._check_parallel_mode(_trainer(1, is_fsdp_enabled=True))  # one process: nothing sharded
    with pytest.raises(ValueError, match="no torch.distributed process group.*torchrun"):
        sgt._check_parallel_mode(_trainer(2))


@pytest.mark.parametrize(
    "kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA]
)
def test_accelerate_sharding_engines_are_refused_naming_the_fix(kind: DistributedType) -> None:
    acc = SimpleNamespace(num_processes=2, distributed_type=kind)
    with pytest.raises(
        sga.UnsupportedSetupError, match=rf"not distributed_type={kind.value}.*Use DDP"
    ):
        sga._check_distributed_type(acc)


def test_accelerate_ddp_needs_a_process_group() -> None:
    sga._check_distributed_type(
        SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    )
    acc = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        sga._check_distributed_type(acc)
