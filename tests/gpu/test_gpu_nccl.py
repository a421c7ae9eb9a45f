"""The examples under torchrun with ``--backend nccl``, killed (SIGKILL, every rank) and resumed:
the resumed run's final checkpoint equals the uninterrupted run's, tensor for tensor (model,
optimizer, every rank's CPU and CUDA RNG, loader positions). Skipped without CUDA.

NCCL refuses two ranks on one GPU ("Duplicate GPU detected") on most versions: with one GPU the
runs use as many ranks as NCCL accepts there (probed once), and say so in the test id's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from savegame.engine import reader
from savegame.format import layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ROOT = Path(__file__).resolve().parents[2]
CRASH = Path(__file__).with_name("_crash_at.py")
PROBE = """
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
dist.init_process_group("nccl")
t = torch.ones(4, device="cuda")
dist.all_reduce(t)
assert t[0].item() == dist.get_world_size()
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    env.pop("SAVEGAME_TEST_NO_TORCHRUN", None)
    return env


def _torchrun(n: int, *args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def nprocs(tmp_path_factory: pytest.TempPathFactory) -> int:
    """2 where NCCL lets two ranks share what this machine has, else 1."""
    if torch.cuda.device_count() >= 2:
        return 2
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text(PROBE)
    try:
        out = _torchrun(2, str(probe), timeout=45)
    except subprocess.TimeoutExpired:
        return 1
    print(f"two NCCL ranks on one GPU: rc {out.returncode}\n{out.stderr[-600:]}")
    return 2 if out.returncode == 0 else 1


def _tensors(run: Path, step: int) -> dict[str, list[tuple[tuple[int, ...], str]]]:
    m = reader.read_manifest(run / layout.step_dir(step))
    return {k: sorted((c.start, c.hash) for c in e.chunks) for k, e in m.tensors.items()}


@pytest.mark.parametrize(
    ("script", "args", "crash_at", "final", "direct"),
    [
        ("examples/ddp_digits.py", ["--epochs", "3"], 40, None, "0"),
        ("examples/fsdp_toy.py", ["--steps", "60"], 40, 60, "0"),
        ("examples/ddp_digits.py", ["--epochs", "3"], 40, None, "1"),  # plain CUDA tensors
    ],
    ids=["ddp", "fsdp2", "ddp-direct"],
)
def test_nccl_example_killed_and_resumed_is_bitwise_equal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nprocs: int,
    script: str,
    args: list[str],
    crash_at: int,
    final: int | None,
    direct: str,
) -> None:
    monkeypatch.setenv("SAVEGAME_GPU_DIRECT_RESTORE", direct)  # engine/reader.py gpu_direct
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = [script, "--backend", "nccl", *args]
    ok = _torchrun(nprocs, str(CRASH), "0", *common, "--ckpt-dir", str(whole))
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    killed = _torchrun(nprocs, str(CRASH), str(crash_at), *common, "--ckpt-dir", str(cut))
    assert killed.returncode != 0, "the crash did not happen"
    assert [r.step for r in reader.list_checkpoints(cut)][-1] == crash_at
    resumed = _torchrun(nprocs, str(CRASH), "0", *common, "--ckpt-dir", str(cut))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    last = final or [r.step for r in reader.list_checkpoints(whole)][-1]
    assert [r.step for r in reader.list_checkpoints(cut)][-1] == last
    a, b = _tensors(whole, last), _tensors(cut, last)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after the resume: {differ[:8]}"
    print(f"{script}: {nprocs} NCCL rank(s), killed at step {crash_at}, {len(a)} tensors equal")
