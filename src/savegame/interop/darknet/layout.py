"""Darknet layer layout: shapes propagated through the cfg, and the tensors each layer stores.

Key invariant: every tensor's size comes from the cfg through checked shape propagation: each
cfg number is bounded (:class:`~savegame.interop.darknet.cfg.Opts`) before use, every product
is capped (:data:`MAX_LAYER_PARAMS` floats per tensor), route/shortcut indices must point to an
earlier layer, and a layer type whose weight layout is not modelled is refused
(:class:`~savegame.errors.UnsupportedFormatError`), never guessed (FORMATS.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from savegame import errors
from savegame.interop.darknet import cfg

__all__ = ["DarknetLayer", "plan_layers"]

# Caps (FORMATS.md §5 traps, §7). The largest published filters/size are 4096 and 11. These
# bound every product computed from the cfg.
MAX_SPATIAL = 1 << 16  # width, height
MAX_CHANNELS = 1 << 20  # filters, channels, outputs
MAX_KERNEL = 1024  # size
MAX_STRIDE = 1024
MAX_LAYER_PARAMS = 1 << 32  # floats in one tensor (16 GiB) — filters × size² × channels/groups

# Section names that carry no weights and keep the input shape (FORMATS.md §5).
_SAME_SHAPE = frozenset(
    {
        "yolo",
        "region",
        "detection",
        "dropout",
        "softmax",
        "cost",
        "logistic",
        "l2norm",
        "normalization",
        "gaussian_yolo",
        "sam",
        "scale_channels",
        "activation",
    }
)
# Recurrent and other layers whose weight layouts we do not model: refused, not guessed.
_UNSUPPORTED = frozenset(
    {
        "rnn",
        "gru",
        "lstm",
        "crnn",
        "conv_lstm",
        "history",
        "deconvolutional",
        "deconv",
        "implicit_add",
        "implicit_mul",
        "empty",
        "silence",
        "contrastive",
    }
)


@dataclass(frozen=True, slots=True)
class DarknetLayer:
    """One layer after ``[net]``, with its shapes and the tensors it stores, in file order.

    Attributes:
        index: Position after ``[net]`` (0-based; what ``[route] layers=`` counts).
        type: Section name without brackets (``"convolutional"``, ``"maxpool"``, …).
        options: The raw cfg options.
        in_shape: ``(channels, height, width)`` of the input.
        out_shape: ``(channels, height, width)`` of the output.
        params: Parsed, bounded numbers and strings the layer needs (e.g. ``filters``,
            ``size``, ``stride``, ``padding``, ``groups``, ``batch_normalize``,
            ``activation``, ``sources`` for route/shortcut).
        tensors: ``(name, shape)`` of each stored tensor, in file order (empty for
            ``dontload=1`` or weightless layers).
    """

    index: int
    type: str
    options: Mapping[str, str]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    params: Mapping[str, Any]
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())

    @property
    def nfloats(self) -> int:
        """Float32 values this layer occupies in the ``.weights`` file."""
        return sum(math.prod(shape) for _, shape in self.tensors)


def _conv_out(size_in: int, kernel: int, stride: int, pad_total: int, opts: cfg.Opts) -> int:
    num = size_in + pad_total - kernel
    if num < 0:
        raise opts.error(
            f"kernel {kernel} does not fit input {size_in} (padding {pad_total}); output empty"
        )
    return num // stride + 1


def _check_params(n: int, opts: cfg.Opts, what: str) -> None:
    if n > MAX_LAYER_PARAMS:
        raise opts.error(f"{what} would hold {n} floats, over the {MAX_LAYER_PARAMS} cap")


def plan_layers(
    sections: Sequence[cfg.CfgSection], *, path: str | None = None
) -> list[DarknetLayer]:
    """Propagate shapes through the cfg and list each layer's stored tensors (FORMATS.md §5).

    Args:
        sections: From :func:`parse_cfg` (``[net]`` first).
        path: Reported on errors.

    Returns:
        One :class:`DarknetLayer` per section after ``[net]``.

    Raises:
        FormatError: Out-of-range numbers, route/shortcut indices out of range, groups that do
            not divide channels, empty outputs.
        UnsupportedFormatError: Layer types whose weight layout is not modelled (RNN, …).
    """
    net = cfg.Opts(sections[0], -1, path)
    h = net.get_int("height", 0, 0, MAX_SPATIAL)
    w = net.get_int("width", 0, 0, MAX_SPATIAL)
    c = net.get_int("channels", 0, 0, MAX_CHANNELS)
    if h * w * c == 0:
        inputs = net.get_int("inputs", 0, 0, MAX_CHANNELS)
        if inputs == 0:
            raise net.error("needs width, height and channels (or inputs)")
        c, h, w = inputs, 1, 1
    shape = (c, h, w)
    layers: list[DarknetLayer] = []
    for index, section in enumerate(sections[1:]):
        opts = cfg.Opts(section, index, path)
        layer = _plan_one(index, section, opts, shape, layers)
        layers.append(layer)
        shape = layer.out_shape
    if not layers:
        raise net.error("the cfg has no layers after [net]")
    return layers


def _source(index: int, ref: int, opts: cfg.Opts, what: str) -> int:
    """Resolve a route/shortcut index: negative = relative to ``index``, else absolute."""
    target = index + ref if ref < 0 else ref
    if not 0 <= target < index:
        raise opts.error(f"{what} index {ref} points to layer {target}, not an earlier layer")
    return target


def _plan_one(
    index: int,
    section: cfg.CfgSection,
    opts: cfg.Opts,
    in_shape: tuple[int, int, int],
    layers: Sequence[DarknetLayer],
) -> DarknetLayer:
    kind = section.type
    c, h, w = in_shape
    params: dict[str, Any] = {}
    tensors: list[tuple[str, tuple[int, ...]]] = []
    out = in_shape
    p = f"layers.{index}"
    dontload = opts.get_int("dontload", 0, 0, 1) == 1
    dontloadscales = opts.get_int("dontloadscales", 0, 0, 1) == 1

    if kind == "convolutional":
        n = opts.get_int("filters", 1, 1, MAX_CHANNELS)
        size = opts.get_int("size", 1, 1, MAX_KERNEL)
        stride = opts.get_int("stride", 1, 1, MAX_STRIDE)
        sx = opts.get_int("stride_x", stride, 1, MAX_STRIDE)
        sy = opts.get_int("stride_y", stride, 1, MAX_STRIDE)
        dilation = opts.get_int("dilation", 1, 1, MAX_KERNEL)
        pad = opts.get_int("pad", 0, 0, 1)
        padding = opts.get_int("padding", 0, 0, MAX_KERNEL)
        if pad:
            padding = size // 2
        groups = opts.get_int("groups", 1, 1, MAX_CHANNELS)
        bn = opts.get_int("batch_normalize", 0, 0, 1) == 1
        if c % groups:
            raise opts.error(f"groups={groups} does not divide the {c} input channels")
        if opts.has("share_index"):
            raise errors.UnsupportedFormatError(
                f"cfg layer {index}: convolutional with share_index is not supported",
                path=opts.path,
            )
        k_eff = dilation * (size - 1) + 1
        out = (
            n,
            _conv_out(h, k_eff, sy, 2 * padding, opts),
            _conv_out(w, k_eff, sx, 2 * padding, opts),
        )
        wshape = (n, c // groups, size, size)
        _check_params(math.prod(wshape), opts, "the conv weights")
        params.update(
            filters=n,
            size=size,
            stride=(sy, sx),
            padding=padding,
            dilation=dilation,
            groups=groups,
            batch_normalize=bn,
            activation=opts.get_str("activation", "logistic"),
            flipped=opts.get_int("flipped", 0, 0, 1) == 1,
        )
        if not dontload:
            tensors.append((f"{p}.bn.bias" if bn else f"{p}.conv.bias", (n,)))
            if bn and not dontloadscales:
                tensors += [
                    (f"{p}.bn.weight", (n,)),
                    (f"{p}.bn.running_mean", (n,)),
                    (f"{p}.bn.running_var", (n,)),
                ]
            tensors.append((f"{p}.conv.weight", wshape))
    elif kind == "connected":
        n = opts.get_int("output", 1, 1, MAX_CHANNELS)
        inputs = c * h * w
        bn = opts.get_int("batch_normalize", 0, 0, 1) == 1
        _check_params(n * inputs, opts, "the connected weights")
        out = (n, 1, 1)
        params.update(
            output=n,
            inputs=inputs,
            batch_normalize=bn,
            activation=opts.get_str("activation", "logistic"),
        )
        if not dontload:
            tensors.append((f"{p}.bn.bias" if bn else f"{p}.fc.bias", (n,)))
            tensors.append((f"{p}.fc.weight", (n, inputs)))
            if bn and not dontloadscales:
                tensors += [
                    (f"{p}.bn.weight", (n,)),
                    (f"{p}.bn.running_mean", (n,)),
                    (f"{p}.bn.running_var", (n,)),
                ]
    elif kind == "batchnorm":
        if not dontload:
            tensors += [
                (f"{p}.bn.weight", (c,)),
                (f"{p}.bn.running_mean", (c,)),
                (f"{p}.bn.running_var", (c,)),
            ]
    elif kind == "maxpool":
        if opts.has("maxpool_depth") and opts.get_int("maxpool_depth", 0, 0, 1):
            raise errors.UnsupportedFormatError(
                f"cfg layer {index}: maxpool_depth is not supported", path=opts.path
            )
        stride = opts.get_int("stride", 1, 1, MAX_STRIDE)
        sx = opts.get_int("stride_x", stride, 1, MAX_STRIDE)
        sy = opts.get_int("stride_y", stride, 1, MAX_STRIDE)
        size = opts.get_int("size", stride, 1, MAX_KERNEL)
        padding = opts.get_int("padding", size - 1, 0, MAX_KERNEL)
        out = (c, _conv_out(h, size, sy, padding, opts), _conv_out(w, size, sx, padding, opts))
        params.update(size=size, stride=(sy, sx), padding=padding)
    elif kind == "avgpool":
        out = (c, 1, 1)
    elif kind == "local":
        n = opts.get_int("filters", 1, 1, MAX_CHANNELS)
        size = opts.get_int("size", 1, 1, MAX_KERNEL)
        stride = opts.get_int("stride", 1, 1, MAX_STRIDE)
        pad = opts.get_int("pad", 0, 0, 1)
        # darknet's local_out_height: (h - (pad ? 1 : size)) / stride + 1
        oh = _conv_out(h, 1 if pad else size, stride, 0, opts)
        ow = _conv_out(w, 1 if pad else size, stride, 0, opts)
        out = (n, oh, ow)
        nweights = c * n * size * size * oh * ow
        _check_params(nweights, opts, "the local weights")
        params.update(filters=n, size=size, stride=stride, pad=pad)
        if not dontload:
            tensors += [(f"{p}.local.bias", (oh * ow * n,)), (f"{p}.local.weight", (nweights,))]
    elif kind == "route":
        refs = opts.get_ints("layers", -cfg.MAX_SECTIONS, cfg.MAX_SECTIONS, required=True)
        sources = [_source(index, r, opts, "route") for r in refs]
        groups = opts.get_int("groups", 1, 1, MAX_CHANNELS)
        group_id = opts.get_int("group_id", 0, 0, groups - 1)
        first = layers[sources[0]].out_shape
        total = 0
        for s in sources:
            sc, sh, sw = layers[s].out_shape
            if (sh, sw) != first[1:]:
                raise opts.error(
                    f"route joins layer {s} ({sh}x{sw}) with layer {sources[0]} "
                    f"({first[1]}x{first[2]}); spatial sizes differ"
                )
            if sc % groups:
                raise opts.error(f"groups={groups} does not divide layer {s}'s {sc} channels")
            total += sc // groups
        out = (total, first[1], first[2])
        params.update(sources=sources, groups=groups, group_id=group_id)
    elif kind == "shortcut":
        refs = opts.get_ints("from", -cfg.MAX_SECTIONS, cfg.MAX_SECTIONS, required=True)
        sources = [_source(index, r, opts, "shortcut") for r in refs]
        if index == 0:
            raise opts.error("shortcut cannot be the first layer")
        wtype = opts.get_str("weights_type", "none")
        params.update(sources=sources, activation=opts.get_str("activation", "linear"))
        params["weights_type"] = wtype
        if wtype not in ("none", "per_feature", "per_layer", "per_channel"):
            raise opts.error(f"weights_type={wtype!r} is unknown")
        nw = 0
        if wtype in ("per_feature", "per_layer"):
            nw = len(sources) + 1
        elif wtype == "per_channel":
            nw = (len(sources) + 1) * c
        if nw and not dontload:
            tensors.append((f"{p}.shortcut.weight", (nw,)))
    elif kind == "upsample":
        stride = opts.get_int("stride", 2, -MAX_STRIDE, MAX_STRIDE)
        if stride == 0:
            raise opts.error("stride=0")
        if stride > 0:
            out = (c, h * stride, w * stride)
        else:
            out = (c, h // -stride, w // -stride)
        if out[1] > MAX_SPATIAL or out[2] > MAX_SPATIAL or out[1] < 1 or out[2] < 1:
            raise opts.error(f"output {out[1]}x{out[2]} is outside [1, {MAX_SPATIAL}]")
        params.update(stride=stride, scale=opts.get_float("scale", 1.0))
    elif kind == "reorg":
        stride = opts.get_int("stride", 1, 1, MAX_STRIDE)
        reverse = opts.get_int("reverse", 0, 0, 1) == 1
        if reverse:
            out = (c // (stride * stride), h * stride, w * stride)
        else:
            out = (c * stride * stride, h // stride, w // stride)
        if min(out) < 1 or out[1] > MAX_SPATIAL or out[2] > MAX_SPATIAL:
            raise opts.error(f"reorg output {out} is empty or too large")
        params.update(stride=stride, reverse=reverse)
    elif kind == "crop":
        ch = opts.get_int("crop_height", 1, 1, MAX_SPATIAL)
        cw = opts.get_int("crop_width", 1, 1, MAX_SPATIAL)
        out = (c, ch, cw)
    elif kind in _SAME_SHAPE:
        if kind in ("sam", "scale_channels"):
            refs = opts.get_ints("from", -cfg.MAX_SECTIONS, cfg.MAX_SECTIONS, required=True)
            params["sources"] = [_source(index, r, opts, kind) for r in refs]
        if kind == "activation":
            params["activation"] = opts.get_str("activation", "linear")
    elif kind in _UNSUPPORTED:
        raise errors.UnsupportedFormatError(
            f"cfg {opts.path} layer {index} [{kind}]: this layer type's weight layout is not "
            "supported",
            path=opts.path,
        )
    elif kind == "net":
        raise opts.error("a second [net] section")
    else:
        raise errors.UnsupportedFormatError(
            f"cfg {opts.path} layer {index}: unknown layer type [{kind}]", path=opts.path
        )
    oc, oh, ow = out
    if oc < 1 or oh < 1 or ow < 1 or oc > MAX_CHANNELS * 64 or oh > MAX_SPATIAL:
        raise opts.error(f"output shape {out} is empty or too large")
    _check_params(oc * oh * ow, opts, "the output")
    params["dontload"] = dontload
    params["dontloadscales"] = dontloadscales
    return DarknetLayer(
        index=index,
        type=kind,
        options=dict(section.options),
        in_shape=in_shape,
        out_shape=out,
        params=params,
        tensors=tuple(tensors),
    )
