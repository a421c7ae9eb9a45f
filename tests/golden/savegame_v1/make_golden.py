"""Write the savegame v1 golden checkpoint (run once; the output is checked in).

    python tests/golden/savegame_v1/make_golden.py

Writes ``step-000000000007/`` (model + optimizer + scheduler + RNGs + extras holding every
tagged-JSON kind), ``expected_values.json`` (exact parameter bits, for the test) and
``expected_manifest_keys.json`` (the manifest's structure; format changes must be deliberate
diffs of this file).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import savegame as sg
from savegame.format import layout

HERE = Path(__file__).resolve().parent
STEP = 7


def extras() -> dict[str, Any]:
    """Every kind the tagged-JSON codec knows (kept in sync with test_golden_v1.EXTRAS)."""
    return {
        "epoch": 2,
        "big_int": 2**63 + 11,
        "neg_big_int": -(2**60) - 3,
        "float": 0.1,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "none": None,
        "flag": True,
        "text": "héllo / ~ $",
        "bytes": b"\x00\x01\xfe\xff",
        "tuple": (1, "a", (2.5, None)),
        "set": {3, 1, 2},
        "int_keys": {1: "one", 2: "two"},
        "dollar_keys": {"$tensor": "not a tensor", "$x": [1]},
        "np_array": np.array([1, 2**32 - 1], dtype=np.uint32),
        "np_scalar_f32": np.float32(1.5),
        "np_scalar_u32": np.uint32(4_000_000_000),
        "np_scalar_i64": np.int64(-7),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "tensor": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16),
    }


def build() -> tuple[sg.TrainState, torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    state = sg.TrainState(model=model, optimizer=opt, scheduler=sched, extras=extras())
    return state, model, opt, sched


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    for _ in range(STEP):
        loss = model(torch.randn(5, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def write(root: Path) -> Path:
    """Train STEP steps and save them as a run under ``root``; returns the step folder."""
    state, model, opt, sched = build()
    train(model, opt, sched)
    with sg.Checkpointer(root, save=sg.Every(steps=STEP), handle_signals=False) as ckpt:
        return ckpt.save(state, STEP, metrics={"val_loss": 0.25, "val_acc": math.nan})


def structure(node: Any) -> Any:
    """The shape of a JSON value: keys and tags kept, values replaced by their type."""
    if isinstance(node, dict):
        return {k: structure(v) for k, v in sorted(node.items())}
    if isinstance(node, list):
        if len(node) > 8:
            return f"list[{len(node)}]"
        return [structure(v) for v in node]
    return type(node).__name__


def manifest_structure(manifest_json: dict[str, Any]) -> dict[str, Any]:
    files = manifest_json["files"]
    tensors = manifest_json["tensors"]
    return {
        "top": sorted(manifest_json),
        "format": manifest_json["format"],
        "version": manifest_json["version"],
        "hash_algorithm": manifest_json["hash_algorithm"],
        "integrity": sorted(manifest_json["integrity"]),
        "files": {name: sorted(entry) for name, entry in sorted(files.items())},
        "tensors": {
            key: {"dtype": t["dtype"], "shape": t["shape"], "chunk": sorted(t["chunks"][0])}
            for key, t in sorted(tensors.items())
        },
        "info": sorted(manifest_json["info"]),
        "metrics": structure(manifest_json["metrics"]),
        "versions": sorted(manifest_json["versions"]),
        "trees": structure(manifest_json["trees"]),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = write(Path(tmp) / "run")
        dest = HERE / layout.step_dir(STEP)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
    tree = sg.load(dest)
    values = {
        "model": {
            k: [float(x).hex() for x in v.reshape(-1).tolist()] for k, v in tree["model"].items()
        },
        "optimizer_steps": [float(s["step"]) for s in tree["optimizer"]["state"].values()],
        "scheduler_last_epoch": tree["scheduler"]["last_epoch"],
        "lr": float(tree["optimizer"]["param_groups"][0]["lr"]).hex(),
    }
    (HERE / "expected_values.json").write_text(json.dumps(values, indent=1) + "\n")
    body = json.loads((dest / layout.MANIFEST).read_bytes())
    (HERE / "expected_manifest_keys.json").write_text(
        json.dumps(manifest_structure(body), indent=1) + "\n"
    )
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size} bytes in {HERE.name})", file=sys.stderr)


if __name__ == "__main__":
    main()
