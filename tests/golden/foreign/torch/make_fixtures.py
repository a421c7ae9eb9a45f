"""Writes the torch/safetensors/numpy golden files with the real tools. Run from this folder:
``python make_fixtures.py``; versions go to VERSIONS.txt, expected values to expected.npz.

Files: ``tutorial.pth`` (zip format, the classic tutorial checkpoint: epoch, state_dict with
BatchNorm buffers, best_accuracy, AdamW state), ``legacy.pt`` (pre-1.6 non-zip format), a
``model.safetensors``, ``arrays.npz`` and ``model.pt2`` (torch.export.save) of the same weights.
"""

from __future__ import annotations

import platform

import numpy as np
import safetensors
import torch
from safetensors.torch import save_file

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(5, 4)).sum().backward()
opt.step()
sd = model.state_dict()
torch.save({"epoch": 7, "state_dict": sd, "best_accuracy": 0.91, "optimizer": opt.state_dict()}, "tutorial.pth")
torch.save({"weight": sd["0.weight"], "bias": sd["0.bias"], "half": sd["0.weight"].half()}, "legacy.pt",
           _use_new_zipfile_serialization=False)  # fmt: skip
save_file({k: v.contiguous() for k, v in sd.items()}, "model.safetensors")
np.savez("arrays.npz", **{k.replace(".", "_"): v.numpy() for k, v in sd.items()})
expected = {f"state_dict/{k}": v.numpy() for k, v in sd.items()}
for idx, st in opt.state_dict()["state"].items():
    for name, v in st.items():
        expected[f"optimizer/state/{idx}/{name}"] = v.numpy()
np.savez("expected.npz", **{k.replace("/", "|"): v for k, v in expected.items()})
with open("VERSIONS.txt", "w") as f:
    f.write(f"torch {torch.__version__}\nsafetensors {safetensors.__version__}\nnumpy {np.__version__}\n")
    f.write(f"python {platform.python_version()} on {platform.system()} {platform.machine()}\n")
# torch.export archive of model.safetensors's weights (so it can be written on its own, beside
# the files above; eval mode: BatchNorm's buffers are read, not updated).
from safetensors.torch import load_file  # noqa: E402

model.load_state_dict(load_file("model.safetensors"))
model.eval()
torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), "model.pt2")
