"""Writes foreign checkpoints with the real tools: `python make_foreign.py KIND OUT`."""

import sys

import torch


def lightning(out: str) -> None:
    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
            )

        def training_step(self, b, i):
            x, y = b
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            o = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            return [o], [torch.optim.lr_scheduler.StepLR(o, 2, 0.5)]

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    )
    tr = L.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=out + ".d",
    )
    tr.fit(Lit(), torch.utils.data.DataLoader(ds, batch_size=16))
    tr.save_checkpoint(out)


class HFNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x, labels=None):
        out = self.head(self.norm(self.lin(x)))
        return {"loss": torch.nn.functional.cross_entropy(out, labels), "logits": out}


class HFData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = torch.randint(0, 2, (64,), generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_args(out: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        max_steps=8,
        save_steps=4,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        learning_rate=1e-2,
        weight_decay=0.01,
        warmup_steps=2,
        lr_scheduler_type="linear",
    )


def hf(out: str) -> None:
    from transformers import Trainer

    torch.manual_seed(0)
    args = hf_args(out)
    Trainer(model=HFNet(), args=args, train_dataset=HFData()).train()


def whole_module(out: str) -> None:
    from _outside_s18_migrate.evil_model import EvilNet

    torch.save(EvilNet(), out)


if __name__ == "__main__":
    {"lightning": lightning, "hf": hf, "whole_module": whole_module}[sys.argv[1]](sys.argv[2])
