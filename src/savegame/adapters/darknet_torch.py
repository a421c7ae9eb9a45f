"""Build a PyTorch ``nn.Module`` from a darknet cfg and load ``.weights`` into it.

Key invariant: the module's ``state_dict`` names are exactly the tensor names of
:class:`savegame.interop.darknet.DarknetReader` (``layers.<i>.conv.weight``, ``layers.<i>.bn.*``,
…), and ``layers[i]`` is cfg layer ``i``, so weights load by name, never by position.

Supported layers: ``[convolutional]`` (batch_normalize, groups, stride, pad/padding, dilation;
activations below), ``[maxpool]`` (including ``size=2 stride=1``, darknet's asymmetric
padding), ``[route]`` (including AlexeyAB ``groups``/``group_id``), ``[shortcut]`` (plain),
``[upsample]``, ``[connected]``, ``[batchnorm]``, ``[avgpool]``, ``[dropout]``, ``[softmax]``,
``[yolo]`` / ``[region]`` (identity; their inputs are returned as the network's outputs, not
decoded into boxes). Anything else raises :class:`savegame.errors.UnsupportedFormatError`.

Batch normalization has two conventions (FORMATS.md §5, darknet ``src/blas.c``
``normalize_cpu``), chosen with ``bn=``:

* ``"alexeyab"`` (default; AlexeyAB/darknet, the fork that trains YOLOv4 and most current
  weights): ``y = (x - mean) / sqrt(var + 1e-5) * gamma + beta`` — the same as
  ``torch.nn.BatchNorm2d(eps=1e-5)`` in eval mode.
* ``"pjreddie"`` (the original pjreddie/darknet, YOLOv1–v3):
  ``y = (x - mean) / (sqrt(var) + 1e-6) * gamma + beta``.

The difference is tiny unless a running variance is near zero. Batch norm always uses the
running statistics (inference); fine-tune with your own modules if you need training-mode BN.

Example:
    >>> from savegame.adapters import darknet_torch
    >>> model = darknet_torch.load_darknet(  # doctest: +SKIP
    ...     "yolov3-tiny.cfg", "yolov3-tiny.weights", bn="pjreddie"
    ... )
    >>> outputs = model(torch.rand(1, 3, 416, 416))  # doctest: +SKIP
    >>> [o.shape for o in outputs]  # doctest: +SKIP
    [torch.Size([1, 255, 13, 13]), torch.Size([1, 255, 26, 26])]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from savegame import errors
from savegame.interop import darknet

__all__ = [
    "BN_CONVENTIONS",
    "DarknetBatchNorm",
    "DarknetNet",
    "build_model",
    "load_darknet",
    "load_weights",
]

BNConvention = Literal["alexeyab", "pjreddie"]
BN_CONVENTIONS: tuple[str, ...] = ("alexeyab", "pjreddie")
# 1 Gi float32 parameters (4 GiB); the largest published darknet models hold < 100 M.
DEFAULT_MAX_PARAMS = 1 << 30


class DarknetBatchNorm(nn.Module):
    """Inference batch norm with darknet's epsilon convention (see the module docstring).

    Args:
        num_features: Channels.
        convention: ``"alexeyab"`` (``sqrt(var + 1e-5)``) or ``"pjreddie"``
            (``sqrt(var) + 1e-6``).
    """

    def __init__(self, num_features: int, convention: BNConvention = "alexeyab") -> None:
        super().__init__()
        if convention not in BN_CONVENTIONS:
            raise ValueError(f"bn convention must be one of {BN_CONVENTIONS}, got {convention!r}")
        self.convention = convention
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = [1, -1] + [1] * (x.dim() - 2)
        mean = self.running_mean.view(view)
        var = self.running_var.view(view)
        if self.convention == "pjreddie":
            denom = var.sqrt() + 1e-6
        else:
            denom = (var + 1e-5).sqrt()
        return (x - mean) / denom * self.weight.view(view) + self.bias.view(view)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, convention={self.convention!r}"


def _activation(name: str, layer: darknet.DarknetLayer, cfg: str) -> nn.Module:
    table: dict[str, nn.Module] = {
        "linear": nn.Identity(),
        "leaky": nn.LeakyReLU(0.1),  # darknet's leaky slope (activations.h leaky_activate)
        "relu": nn.ReLU(),
        "relu6": nn.ReLU6(),
        "logistic": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        "elu": nn.ELU(),
        "selu": nn.SELU(),
        "mish": nn.Mish(),
        "swish": nn.SiLU(),
        "gelu": nn.GELU(),
    }
    if name not in table:
        raise errors.UnsupportedFormatError(
            f"cfg {cfg} layer {layer.index}: activation {name!r} is not supported",
            path=cfg,
        )
    return table[name]


class _Conv(nn.Module):
    def __init__(self, layer: darknet.DarknetLayer, bn: BNConvention, cfg: str) -> None:
        super().__init__()
        p = layer.params
        c_in = layer.in_shape[0]
        n = p["filters"]
        if n % p["groups"]:
            raise errors.UnsupportedFormatError(
                f"cfg {cfg} layer {layer.index}: filters={n} is not divisible by "
                f"groups={p['groups']} (PyTorch requires it)",
                path=cfg,
            )
        self.conv = nn.Conv2d(
            c_in,
            n,
            p["size"],
            stride=p["stride"],
            padding=p["padding"],
            dilation=p["dilation"],
            groups=p["groups"],
            bias=not p["batch_normalize"],
        )
        self.bn = DarknetBatchNorm(n, bn) if p["batch_normalize"] else None
        self.act = _activation(p["activation"], layer, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        out: torch.Tensor = self.act(x)
        return out


class _Connected(nn.Module):
    def __init__(self, layer: darknet.DarknetLayer, bn: BNConvention, cfg: str) -> None:
        super().__init__()
        p = layer.params
        self.fc = nn.Linear(p["inputs"], p["output"], bias=not p["batch_normalize"])
        self.bn = DarknetBatchNorm(p["output"], bn) if p["batch_normalize"] else None
        self.act = _activation(p["activation"], layer, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # darknet flattens C,H,W in that order, which is NCHW's own order.
        x = self.fc(x.flatten(1))
        if self.bn is not None:
            x = self.bn(x)
        out: torch.Tensor = self.act(x)
        return out[:, :, None, None]


class _BatchNormLayer(nn.Module):
    def __init__(self, layer: darknet.DarknetLayer, bn: BNConvention) -> None:
        super().__init__()
        self.bn = DarknetBatchNorm(layer.in_shape[0], bn)
        # darknet's [batchnorm] never loads biases (they stay 0), so beta is not trainable here.
        self.bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(x)
        return out


class _MaxPool(nn.Module):
    def __init__(self, layer: darknet.DarknetLayer) -> None:
        super().__init__()
        p = layer.params
        self.size = int(p["size"])
        self.stride: tuple[int, int] = p["stride"]
        pad = int(p["padding"])
        # darknet starts windows at -padding/2 and skips out-of-range pixels
        # (maxpool_layer.c: w_offset = -pad/2), i.e. pads padding//2 before and the rest after
        # with -inf; size=2 stride=1 thus pads only right/bottom.
        self.pads = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class _Upsample(nn.Module):
    def __init__(self, layer: darknet.DarknetLayer) -> None:
        super().__init__()
        self.stride = int(layer.params["stride"])
        self.scale = float(layer.params["scale"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 0:
            x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        else:
            # darknet's reverse upsample sums each stride x stride block (upsample_cpu with
            # forward=0 accumulates into the smaller map).
            x = F.avg_pool2d(x, -self.stride) * (self.stride * self.stride)
        return x * self.scale if self.scale != 1.0 else x


class _Shortcut(nn.Module):
    def __init__(self, layer: darknet.DarknetLayer, cfg: str) -> None:
        super().__init__()
        if layer.params["weights_type"] != "none":
            raise errors.UnsupportedFormatError(
                f"cfg {cfg} layer {layer.index}: weighted shortcut is not supported", path=cfg
            )
        self.act = _activation(layer.params["activation"], layer, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(x)
        return out


class _Passthrough(nn.Module):
    """Route, yolo, region, dropout: no parameters; the network's forward does the work."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.kind


class DarknetNet(nn.Module):
    """A darknet network as a module; ``layers[i]`` is cfg layer ``i``.

    ``forward(x)`` takes NCHW float input and returns a list with the input of every
    ``[yolo]``/``[region]`` layer in cfg order (raw head maps), or ``[last output]`` when the
    cfg has none.

    ``coverage`` is None until :func:`load_weights` fills the module, then says how many of the
    cfg's layers with weights came from the file (``"5 of 13 layers present"``).
    """

    def __init__(self, plan: Sequence[darknet.DarknetLayer], bn: BNConvention, cfg: str) -> None:
        super().__init__()
        self.plan = tuple(plan)
        self.coverage: darknet.Coverage | None = None
        modules: list[nn.Module] = []
        for layer in plan:
            kind = layer.type
            if kind == "convolutional":
                modules.append(_Conv(layer, bn, cfg))
            elif kind == "connected":
                modules.append(_Connected(layer, bn, cfg))
            elif kind == "batchnorm":
                modules.append(_BatchNormLayer(layer, bn))
            elif kind == "maxpool":
                modules.append(_MaxPool(layer))
            elif kind == "upsample":
                modules.append(_Upsample(layer))
            elif kind == "shortcut":
                for src in layer.params["sources"]:
                    if plan[src].out_shape != layer.in_shape:
                        # darknet resamples mismatched shortcuts; we only add equal shapes.
                        raise errors.UnsupportedFormatError(
                            f"cfg {cfg} layer {layer.index}: shortcut from layer {src} "
                            f"{plan[src].out_shape} to {layer.in_shape} needs resampling, "
                            "which is not supported",
                            path=cfg,
                        )
                modules.append(_Shortcut(layer, cfg))
            elif kind in ("route", "yolo", "region", "dropout", "avgpool", "softmax"):
                modules.append(_Passthrough(kind))
            else:
                raise errors.UnsupportedFormatError(
                    f"cfg {cfg} layer {layer.index}: [{kind}] cannot be built as a PyTorch "
                    "module by savegame",
                    path=cfg,
                )
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        heads: list[torch.Tensor] = []
        for layer, module in zip(self.plan, self.layers, strict=True):
            kind = layer.type
            if kind == "route":
                groups = int(layer.params["groups"])
                gid = int(layer.params["group_id"])
                parts = [outputs[s].chunk(groups, dim=1)[gid] for s in layer.params["sources"]]
                x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            elif kind == "shortcut":
                for s in layer.params["sources"]:
                    x = x + outputs[s]
                x = module(x)
            elif kind in ("yolo", "region"):
                heads.append(x)
            elif kind == "avgpool":
                x = F.adaptive_avg_pool2d(x, 1)
            elif kind == "softmax":
                x = torch.softmax(x.flatten(1), dim=1).view_as(x)
            else:
                x = module(x)
            outputs.append(x)
        return heads if heads else [x]


def build_model(
    cfg: str | os.PathLike[str],
    *,
    bn: BNConvention = "alexeyab",
    max_params: int = DEFAULT_MAX_PARAMS,
) -> DarknetNet:
    """Build an eval-mode :class:`DarknetNet` with default (untrained) weights from a cfg.

    Args:
        cfg: The darknet ``.cfg``.
        bn: Batch-norm epsilon convention, ``"alexeyab"`` or ``"pjreddie"``.
        max_params: Refuse cfgs whose layers hold more floats than this (memory is allocated
            for all of them before any weight is read).

    Raises:
        FormatError: Malformed cfg (see :func:`savegame.interop.darknet.plan_layers`), or more
            than ``max_params`` parameters.
        UnsupportedFormatError: Layers or activations this builder does not support.
    """
    if bn not in BN_CONVENTIONS:
        raise ValueError(f"bn must be one of {BN_CONVENTIONS}, got {bn!r}")
    scfg = os.fspath(cfg)
    try:
        with open(scfg, "rb") as fh:
            raw = fh.read(darknet.MAX_CFG_BYTES + 1)
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no cfg file at {scfg}", path=scfg) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.FormatError(f"cfg {scfg} is not UTF-8 text", path=scfg) from exc
    plan = darknet.plan_layers(darknet.parse_cfg(text, path=scfg), path=scfg)
    total = sum(layer.nfloats for layer in plan)
    if total > max_params:
        # A cfg alone decides how much memory the module takes; check before allocating.
        raise errors.FormatError(
            f"cfg {scfg} describes {total} parameters, over max_params={max_params}; pass a "
            "larger max_params if this network is real",
            path=scfg,
        )
    return DarknetNet(plan, bn, scfg).eval()


def load_weights(model: DarknetNet, reader: darknet.DarknetReader) -> list[str]:
    """Copy every tensor of ``reader`` into ``model`` by name.

    Args:
        model: Built from the same cfg as the reader.
        reader: An open :class:`savegame.interop.darknet.DarknetReader` (a file shorter than
            its cfg opens only with ``partial=True``).

    Returns:
        Names of the model's tensors the file did not hold (a backbone file opened with
        ``partial=True`` leaves the later layers at their defaults). Empty for a complete
        file. ``model.coverage`` is set to ``reader.coverage`` (``"5 of 13 layers present"``).

    Raises:
        FormatError: A tensor's shape differs from the model's (cfg mismatch).
    """
    state = model.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        for name in reader.keys():
            if name not in state:
                raise errors.FormatError(
                    f"{reader.path} holds {name!r}, which the model built from the cfg lacks",
                    path=reader.path,
                    key=name,
                )
            value = reader.read(name)
            if tuple(state[name].shape) != tuple(value.shape):
                raise errors.FormatError(
                    f"{reader.path}: {name!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(state[name].shape)}",
                    path=reader.path,
                    key=name,
                )
            state[name].copy_(value)
            loaded.add(name)
    model.coverage = reader.coverage
    return [name for name in state if name not in loaded]


def load_darknet(
    cfg: str | os.PathLike[str],
    weights: str | os.PathLike[str],
    *,
    bn: BNConvention = "alexeyab",
    partial: bool = False,
    max_params: int = DEFAULT_MAX_PARAMS,
) -> DarknetNet:
    """Build the network of ``cfg`` and load ``weights`` into it (eval mode).

    Args:
        cfg: The darknet ``.cfg``.
        weights: The ``.weights`` file.
        bn: Batch-norm epsilon convention, ``"alexeyab"`` (default) or ``"pjreddie"``.
        partial: Accept a file holding fewer layers than the cfg (a backbone such as
            ``darknet53.conv.74``); the later layers keep their initial values and
            ``model.coverage`` says how many were filled. Without it such a file raises
            ``FormatError``.
        max_params: See :func:`build_model`.

    Returns:
        The model; ``model.coverage`` is e.g. ``"13 of 13 layers present"``.

    Raises:
        FormatError, UnsupportedFormatError: See :func:`build_model` and
            :func:`savegame.interop.darknet.open_darknet`.
    """
    model = build_model(cfg, bn=bn, max_params=max_params)
    with darknet.open_darknet(weights, cfg=cfg, partial=partial) as reader:
        load_weights(model, reader)
    return model
