"""A model class whose import or unpickling leaves a marker file (when SG18_MARK is set)."""

import os

import torch

if os.environ.get("SG18_MARK"):
    open(os.environ["SG18_MARK"], "w").write("imported")


class EvilNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def __setstate__(self, state):  # runs when pickle rebuilds the object
        if os.environ.get("SG18_MARK"):
            open(os.environ["SG18_MARK"], "w").write("setstate")
        super().__setstate__(state)
