"""Helpers for tests/test_outside_s18_docs.py: the minimal completions of the docs' fragments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

VENV_BIN = Path(sys.executable).parent
SAVEGAME = str(VENV_BIN / "savegame")


class Indexed(torch.utils.data.Dataset):
    """Sample i is (tensor([i.]), i): the loader's order is readable from the batches."""

    def __init__(self, n: int = 200) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))


def cli(
    *args: str, cwd=None, env=None, timeout: float = 60, input=None
) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("COLUMNS", "200")
    if env:
        e.update(env)
    return subprocess.run(
        [SAVEGAME, *map(str, args)],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def main_rc(*args: str) -> int:
    """`savegame ARGS` in this process (no interpreter start-up): its exit status."""
    from savegame.cli.main import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse
        return int(e.code or 0)
