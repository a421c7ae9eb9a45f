"""Safe, lazy reader of Darknet (YOLO) ``.weights`` files, driven by their ``.cfg``.

Key invariant: every tensor's size comes from the cfg through checked shape propagation, every
cfg number is bounded before use, and every byte range is checked against the file's length
before it is read; a malformed cfg or file becomes a typed :mod:`savegame.errors` error with
``.path`` (FORMATS.md §5, §7).

A ``.weights`` file is a 12-byte header (``major, minor, revision`` as int32 LE), a ``seen``
counter (8 bytes if ``major*10 + minor >= 2`` and both are < 1000, else 4), then raw float32 LE
values, layer after layer in cfg order, with no names (FORMATS.md §5).

Tensor names (PyTorch style, matching :mod:`savegame.interop.darknet_torch`), ``i`` = the
layer's index after ``[net]`` (the index ``[route] layers=`` uses), in file order:

=====================  =========================================================================
``[convolutional]``    ``layers.i.conv.bias`` (no BN) or ``layers.i.bn.bias`` (BN beta), then
                       ``layers.i.bn.weight`` / ``.running_mean`` / ``.running_var`` (BN), then
                       ``layers.i.conv.weight`` ``(filters, channels/groups, size, size)``
``[connected]``        ``layers.i.fc.bias`` or ``layers.i.bn.bias``, ``layers.i.fc.weight``
                       ``(output, input)``, then the BN triple (after the weights, unlike conv)
``[batchnorm]``        ``layers.i.bn.weight`` / ``.running_mean`` / ``.running_var``
``[local]``            ``layers.i.local.bias``, ``layers.i.local.weight`` (flat)
``[shortcut]``         ``layers.i.shortcut.weight`` (AlexeyAB ``weights_type`` only)
=====================  =========================================================================

``dontload=1`` layers contribute nothing; ``dontloadscales=1`` drops the BN triple. Files
written with ``major`` or ``minor`` > 1000 store ``[connected]`` weights transposed, and a conv
with ``flipped=1`` stores its weights transposed; :meth:`DarknetReader.read` undoes both.

By default a file must hold exactly the weights its cfg describes: a shorter one (a wrong cfg,
or a cut download) would otherwise leave the later layers at their initial values, silently.
Partial files are legitimate too (backbones such as ``darknet53.conv.74``), so reading one is
explicit: ``partial=True`` lists the tensors of the layers fully present,
:attr:`DarknetReader.coverage` says how many layers that is (``29 of 59 layers present``), and
:meth:`DarknetReader.verify` reports a layer cut in the middle or trailing bytes.

Example:
    >>> with open_darknet("yolov3-tiny.weights", cfg="yolov3-tiny.cfg") as r:  # doctest: +SKIP
    ...     r.info("layers.0.conv.weight").shape
    (16, 3, 3, 3)
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from savegame import errors
from savegame.interop import base

if TYPE_CHECKING:
    import torch

__all__ = [
    "CfgSection",
    "Coverage",
    "DarknetHeader",
    "DarknetLayer",
    "DarknetReader",
    "open_darknet",
    "parse_cfg",
    "plan_layers",
]

# Caps (FORMATS.md §5 traps, §7). Real cfgs are a few KB with < 200 sections; the largest
# published filters/size are 4096 and 11. These bound every product computed from the cfg.
MAX_CFG_BYTES = 4 << 20
MAX_SECTIONS = 10_000
MAX_OPTIONS_PER_SECTION = 256
MAX_SPATIAL = 1 << 16  # width, height
MAX_CHANNELS = 1 << 20  # filters, channels, outputs
MAX_KERNEL = 1024  # size
MAX_STRIDE = 1024
MAX_LAYER_PARAMS = 1 << 32  # floats in one tensor (16 GiB) — filters × size² × channels/groups

_HEADER = struct.Struct("<iii")
_FLOAT = 4

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
_ALIASES = {
    "conv": "convolutional",
    "network": "net",
    "conn": "connected",
    "max": "maxpool",
    "avg": "avgpool",
    "soft": "softmax",
    "lrn": "normalization",
}


@dataclass(frozen=True, slots=True)
class CfgSection:
    """One ``[type]`` block of a cfg: its options (first occurrence wins, as in darknet)."""

    type: str
    options: Mapping[str, str]
    line: int


@dataclass(frozen=True, slots=True)
class DarknetHeader:
    """The ``.weights`` header (FORMATS.md §5)."""

    major: int
    minor: int
    revision: int
    seen: int
    header_bytes: int  # 16 or 20
    transposed: bool  # [connected] weights stored (input, output)


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


@dataclass(frozen=True, slots=True)
class _Slot:
    offset: int
    info: base.TensorInfo
    stored_shape: tuple[int, ...]  # shape as laid out in the file (transposed variants)
    transpose: bool
    layer: int


# --------------------------------------------------------------------------------------------
# cfg parsing
# --------------------------------------------------------------------------------------------


def parse_cfg(text: str, *, path: str | None = None) -> list[CfgSection]:
    """Parse a darknet cfg (INI-like, sections repeat) into sections, in order.

    Follows darknet's ``read_cfg``: all whitespace inside a line is removed, ``#`` and ``;``
    start comment lines, every other line is ``[section]`` or ``key=value``. Unlike darknet, a
    ``#`` after a value also starts a comment, and anything else is an error.

    Args:
        text: The cfg's content.
        path: Reported on errors.

    Returns:
        The sections, the first being ``[net]``.

    Raises:
        FormatError: Malformed lines, an option before any section, too many sections or
            options, or a first section other than ``[net]``.
    """
    if len(text) > MAX_CFG_BYTES:
        raise errors.FormatError(
            f"cfg {path} is {len(text)} characters, over the {MAX_CFG_BYTES} cap", path=path
        )
    sections: list[CfgSection] = []
    current: dict[str, str] | None = None
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = "".join(raw_line.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise errors.FormatError(
                    f"cfg {path} line {lineno}: malformed section header {raw_line.strip()!r}",
                    path=path,
                )
            if len(sections) >= MAX_SECTIONS:
                raise errors.FormatError(
                    f"cfg {path} has more than {MAX_SECTIONS} sections", path=path
                )
            kind = line[1:-1].lower()
            kind = _ALIASES.get(kind, kind)
            current = {}
            sections.append(CfgSection(type=kind, options=current, line=lineno))
            continue
        key, sep, value = line.partition("=")
        value = value.split("#", 1)[0]
        if not sep or not key:
            raise errors.FormatError(
                f"cfg {path} line {lineno}: expected key=value, got {raw_line.strip()!r}",
                path=path,
            )
        if current is None:
            raise errors.FormatError(
                f"cfg {path} line {lineno}: option {key!r} before any [section]", path=path
            )
        if len(current) >= MAX_OPTIONS_PER_SECTION:
            raise errors.FormatError(
                f"cfg {path} line {lineno}: more than {MAX_OPTIONS_PER_SECTION} options",
                path=path,
            )
        current.setdefault(key.lower(), value)
    if not sections or sections[0].type != "net":
        raise errors.FormatError(
            f"cfg {path} must start with a [net] section (is it a darknet cfg?)", path=path
        )
    return sections


class _Opts:
    """Typed, bounded access to one section's options."""

    def __init__(self, section: CfgSection, index: int, path: str | None) -> None:
        self._s = section
        self._i = index
        self.path = path

    def error(self, msg: str) -> errors.FormatError:
        where = "[net]" if self._i < 0 else f"layer {self._i} [{self._s.type}]"
        return errors.FormatError(
            f"cfg {self.path} {where} (line {self._s.line}): {msg}", path=self.path
        )

    def has(self, key: str) -> bool:
        return key in self._s.options

    def get_int(self, key: str, default: int, lo: int, hi: int) -> int:
        raw = self._s.options.get(key)
        if raw is None:
            value = default
        else:
            try:
                value = int(raw, 10)
            except ValueError:
                # darknet uses atoi/atof; accept "1.0"-style integers, nothing else.
                try:
                    f = float(raw)
                except ValueError:
                    raise self.error(f"{key}={raw!r} is not a number") from None
                if not math.isfinite(f) or f != int(f):
                    raise self.error(f"{key}={raw!r} is not an integer") from None
                value = int(f)
        if not lo <= value <= hi:
            raise self.error(f"{key}={value} is outside [{lo}, {hi}]")
        return value

    def get_float(self, key: str, default: float) -> float:
        raw = self._s.options.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.error(f"{key}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise self.error(f"{key}={raw!r} is not finite")
        return value

    def get_str(self, key: str, default: str) -> str:
        return self._s.options.get(key, default).lower()

    def get_ints(self, key: str, lo: int, hi: int, *, required: bool) -> list[int]:
        raw = self._s.options.get(key)
        if raw is None or raw == "":
            if required:
                raise self.error(f"missing {key}=")
            return []
        parts = [p for p in raw.split(",") if p != ""]
        if len(parts) > 1024:
            raise self.error(f"{key}= lists more than 1024 values")
        out: list[int] = []
        for p in parts:
            try:
                v = int(p, 10)
            except ValueError:
                raise self.error(f"{key}={raw!r} is not a list of integers") from None
            if not lo <= v <= hi:
                raise self.error(f"{key} value {v} is outside [{lo}, {hi}]")
            out.append(v)
        return out


def _conv_out(size_in: int, kernel: int, stride: int, pad_total: int, opts: _Opts) -> int:
    num = size_in + pad_total - kernel
    if num < 0:
        raise opts.error(
            f"kernel {kernel} does not fit input {size_in} (padding {pad_total}); output empty"
        )
    return num // stride + 1


def _check_params(n: int, opts: _Opts, what: str) -> None:
    if n > MAX_LAYER_PARAMS:
        raise opts.error(f"{what} would hold {n} floats, over the {MAX_LAYER_PARAMS} cap")


def plan_layers(sections: Sequence[CfgSection], *, path: str | None = None) -> list[DarknetLayer]:
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
    net = _Opts(sections[0], -1, path)
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
        opts = _Opts(section, index, path)
        layer = _plan_one(index, section, opts, shape, layers)
        layers.append(layer)
        shape = layer.out_shape
    if not layers:
        raise net.error("the cfg has no layers after [net]")
    return layers


def _source(index: int, ref: int, opts: _Opts, what: str) -> int:
    """Resolve a route/shortcut index: negative = relative to ``index``, else absolute."""
    target = index + ref if ref < 0 else ref
    if not 0 <= target < index:
        raise opts.error(f"{what} index {ref} points to layer {target}, not an earlier layer")
    return target


def _plan_one(
    index: int,
    section: CfgSection,
    opts: _Opts,
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
        refs = opts.get_ints("layers", -MAX_SECTIONS, MAX_SECTIONS, required=True)
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
        refs = opts.get_ints("from", -MAX_SECTIONS, MAX_SECTIONS, required=True)
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
            refs = opts.get_ints("from", -MAX_SECTIONS, MAX_SECTIONS, required=True)
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


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Coverage:
    """How many of the cfg's layers with weights a ``.weights`` file holds in full.

    Attributes:
        present: Layers whose every tensor is in the file.
        total: Layers of the cfg that have weights.
    """

    present: int
    total: int

    @property
    def complete(self) -> bool:
        return self.present == self.total

    def __str__(self) -> str:
        return f"{self.present} of {self.total} layers present"


class DarknetReader:
    """Lazy reader of one ``.weights`` file and its cfg; create it with :func:`open_darknet`.

    Attributes:
        path: The ``.weights`` file.
        cfg_path: The ``.cfg`` file.
        format: ``"darknet"``.
        header: The parsed :class:`DarknetHeader`.
        coverage: How many of the cfg's layers with weights the file holds (:class:`Coverage`;
            short of the total only for files opened with ``partial=True``).
        layers: Every layer after ``[net]`` with shapes and tensors (:class:`DarknetLayer`).
        net: The ``[net]`` options (raw strings).
    """

    format = "darknet"

    def __init__(
        self,
        path: str,
        cfg_path: str,
        raw: io.RawIOBase,
        header: DarknetHeader,
        sections: list[CfgSection],
        layers: list[DarknetLayer],
        file_size: int,
        partial: bool,
    ) -> None:
        self.path = path
        self.cfg_path = cfg_path
        self.header = header
        self.layers: tuple[DarknetLayer, ...] = tuple(layers)
        self.net: dict[str, str] = dict(sections[0].options)
        self._raw = raw
        self._file_size = file_size
        self._slots: dict[str, _Slot] = {}
        self._problems: list[str] = []
        offset = header.header_bytes
        loaded = 0
        weighted = 0
        cut: int | None = None
        for layer in layers:
            if not layer.tensors:
                continue
            weighted += 1
            end = offset + layer.nfloats * _FLOAT
            if end <= file_size:
                loaded += 1
                self._add_slots(layer, offset)
            elif offset < file_size and cut is None:
                cut = layer.index
                self._problems.append(
                    f"layer {layer.index} [{layer.type}] needs bytes {offset}..{end} but the "
                    f"file ends at {file_size}: the file is cut inside this layer"
                )
            offset = end
        needed = offset
        self._needed = needed
        consumed = min(needed, self._last_full_end(header.header_bytes, layers, file_size))
        self._consumed = consumed
        if file_size > needed:
            self._problems.append(
                f"{file_size - needed} trailing bytes after the last layer: the file does not "
                f"match cfg {cfg_path} (wrong cfg?)"
            )
        self._meta: dict[str, Any] = {
            "major": header.major,
            "minor": header.minor,
            "revision": header.revision,
            "seen": header.seen,
            "transposed": header.transposed,
            "cfg": cfg_path,
            "width": layers[0].in_shape[2] if layers else 0,
            "height": layers[0].in_shape[1] if layers else 0,
            "channels": layers[0].in_shape[0] if layers else 0,
            "layers": len(layers),
            "weighted_layers": weighted,
            "loaded_layers": loaded,
            "bytes_needed": needed,
            "bytes_consumed": consumed,
            "file_size": file_size,
            "complete": loaded == weighted and file_size == needed,
        }
        #: How many of the cfg's layers with weights the file holds in full.
        self.coverage = Coverage(loaded, weighted)
        if not partial and file_size < needed:
            raise errors.FormatError(
                f"{path} holds {loaded} of the {weighted} layers with weights that cfg "
                f"{cfg_path} describes (the file is {needed - file_size} bytes shorter than the "
                f"{needed} it needs); if it is partial on purpose (a backbone such as "
                "darknet53.conv.74), open it with partial=True (CLI: --partial); otherwise "
                "check that the cfg matches and the file is complete",
                path=path,
            )
        if not partial and file_size > needed:
            raise errors.FormatError(
                f"{path} is {file_size - needed} bytes longer than cfg {cfg_path} needs "
                f"({needed} bytes: header + {weighted} layers with weights): the cfg does not "
                "match the file (wrong cfg?); partial=True (CLI: --partial) opens it anyway",
                path=path,
            )

    @staticmethod
    def _last_full_end(start: int, layers: Sequence[DarknetLayer], file_size: int) -> int:
        offset = start
        for layer in layers:
            end = offset + layer.nfloats * _FLOAT
            if end > file_size:
                break
            offset = end
        return offset

    def _add_slots(self, layer: DarknetLayer, offset: int) -> None:
        for name, shape in layer.tensors:
            stored = shape
            transpose = False
            if layer.type == "connected" and name.endswith(".fc.weight") and self.header.transposed:
                stored, transpose = (shape[1], shape[0]), True
            elif layer.type == "convolutional" and name.endswith("conv.weight"):
                if layer.params.get("flipped"):
                    stored, transpose = (math.prod(shape[1:]), shape[0]), True
            numel = math.prod(shape)
            info = base.TensorInfo(name=name, dtype="float32", shape=shape, nbytes=numel * _FLOAT)
            self._slots[name] = _Slot(offset, info, stored, transpose, layer.index)
            offset += numel * _FLOAT

    # -- protocol -------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Names of the tensors fully present in the file, in file order. Reads no data."""
        return list(self._slots)

    def info(self, name: str) -> base.TensorInfo:
        """Dtype (always float32), shape and size of ``name``."""
        return self._slot(name).info

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (float32, PyTorch layout) into a CPU tensor owning its memory."""
        import torch  # only here: listing and verify() need numpy alone (issue 9.18)

        return torch.from_numpy(self._read_numpy(name))

    def _read_numpy(self, name: str) -> np.ndarray:
        """One tensor as a float32 C-order numpy array owning its memory."""
        slot = self._slot(name)
        if self._raw.closed:
            raise errors.FormatError(f"reader for {self.path} is closed", path=self.path)
        data = _read_at(self._raw, slot.offset, slot.info.nbytes)
        if len(data) != slot.info.nbytes:
            raise errors.FormatError(
                f"{self.path} ended while reading {name!r} (file changed since open?)",
                path=self.path,
                key=name,
            )
        arr = np.frombuffer(data, dtype="<f4").reshape(slot.stored_shape)
        if slot.transpose:
            arr = arr.T.reshape(slot.info.shape)
        return np.array(arr, dtype=np.float32, order="C")

    def tree(self) -> dict[str, Any]:
        """``{name: TensorRef(name)}`` in file order (darknet files have no structure)."""
        return {name: base.TensorRef(name) for name in self._slots}

    def metadata(self) -> dict[str, Any]:
        """Header and coverage facts.

        Keys: ``major``, ``minor``, ``revision``, ``seen``, ``transposed``, ``cfg``, ``width``,
        ``height``, ``channels``, ``layers``, ``weighted_layers``, ``loaded_layers`` (fully
        present), ``bytes_needed`` (what the cfg implies, header included), ``bytes_consumed``
        (through the last fully present layer), ``file_size``, ``complete``.
        """
        return dict(self._meta)

    def verify(self) -> list[str]:
        """Read every present tensor; report a layer cut mid-way and trailing bytes.

        A file that simply stops at a layer boundary (a backbone) is not a problem; see
        ``metadata()["complete"]``.
        """
        problems = list(self._problems)
        for name in self._slots:
            try:
                self._read_numpy(name)
            except errors.CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        return problems

    def close(self) -> None:
        """Close the ``.weights`` file; idempotent."""
        self._raw.close()

    def __enter__(self) -> DarknetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DarknetReader({self.path!r}, cfg={self.cfg_path!r}, {len(self._slots)} tensors)"

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise errors.CheckpointNotFoundError(
                f"no tensor named {name!r} in {self.path}; see keys() (layers beyond a "
                "truncated file are not listed)",
                path=self.path,
                key=name,
            ) from None


def _read_at(raw: io.RawIOBase, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at end of file)."""
    raw.seek(offset)
    chunks: list[bytes] = []
    left = n
    while left > 0:
        chunk = raw.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_header(raw: io.RawIOBase, path: str, file_size: int) -> DarknetHeader:
    """Parse the ``.weights`` header (FORMATS.md §5).

    Raises:
        FormatError: The file is too short for a header.
    """
    if file_size == 0:
        raise errors.FormatError(
            f"{path} is empty (0 bytes): there is no darknet header or weights to read; an "
            "interrupted download or copy? Fetch the file again",
            path=path,
        )
    head = _read_at(raw, 0, _HEADER.size)
    if len(head) < _HEADER.size:
        raise errors.FormatError(
            f"{path} is {file_size} bytes, too short for a darknet .weights header", path=path
        )
    major, minor, revision = _HEADER.unpack(head)
    # pjreddie reads a size_t `seen` only when both numbers are < 1000 (AlexeyAB drops that
    # check; the two agree for every file either writes: 0.2.0 and 0.2.5).
    wide = (major * 10 + minor) >= 2 and 0 <= major < 1000 and 0 <= minor < 1000
    n = 8 if wide else 4
    seen_raw = _read_at(raw, _HEADER.size, n)
    if len(seen_raw) != n:
        raise errors.FormatError(
            f"{path} is {file_size} bytes, too short for a darknet .weights header", path=path
        )
    seen = int.from_bytes(seen_raw, "little", signed=False)
    transposed = major > 1000 or minor > 1000
    return DarknetHeader(major, minor, revision, seen, _HEADER.size + n, transposed)


def open_darknet(
    path: str | os.PathLike[str],
    cfg: str | os.PathLike[str],
    *,
    partial: bool = False,
) -> DarknetReader:
    """Open a darknet ``.weights`` file with its ``.cfg`` for safe, lazy reading.

    Args:
        path: The ``.weights`` file.
        cfg: The ``.cfg`` describing the network (sizes come only from it).
        partial: Accept a file that does not hold exactly the weights the cfg implies,
            typically one that stops early (a backbone such as ``darknet53.conv.74``): only
            the layers fully present are listed, :attr:`DarknetReader.coverage` says how many,
            and :meth:`DarknetReader.verify` reports a layer cut mid-way or trailing bytes.
            Without it such a file raises ``FormatError``, so a file shorter than its cfg
            never loads silently.

    Returns:
        A :class:`DarknetReader` (a :class:`savegame.interop.base.ForeignReader`).

    Raises:
        CheckpointNotFoundError: ``path`` or ``cfg`` does not exist.
        FormatError: Malformed cfg, out-of-range numbers, header too short, or (unless
            ``partial``) a file shorter or longer than the cfg needs.
        UnsupportedFormatError: Layer types whose weight layout is not modelled.
    """
    spath = os.fspath(path)
    scfg = os.fspath(cfg)
    try:
        cfg_size = os.path.getsize(scfg)
        if cfg_size > MAX_CFG_BYTES:
            raise errors.FormatError(
                f"cfg {scfg} is {cfg_size} bytes, over the {MAX_CFG_BYTES} cap", path=scfg
            )
        with open(scfg, "rb") as fh:
            cfg_bytes = fh.read(MAX_CFG_BYTES + 1)
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no cfg file at {scfg}", path=scfg) from exc
    except IsADirectoryError as exc:
        raise errors.FormatError(f"cfg {scfg} is a directory", path=scfg) from exc
    try:
        text = cfg_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.FormatError(f"cfg {scfg} is not UTF-8 text", path=scfg) from exc
    sections = parse_cfg(text, path=scfg)
    layers = plan_layers(sections, path=scfg)
    try:
        # Unbuffered: each read() goes to the file, so a file changed since open is noticed.
        raw = open(spath, "rb", buffering=0)  # noqa: SIM115 - closed in DarknetReader.close()
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(f"no weights file at {spath}", path=spath) from exc
    except IsADirectoryError as exc:
        raise errors.FormatError(f"{spath} is a directory", path=spath) from exc
    try:
        file_size = os.fstat(raw.fileno()).st_size
        header = read_header(raw, spath, file_size)
        return DarknetReader(spath, scfg, raw, header, sections, layers, file_size, partial)
    except BaseException:
        raw.close()
        raise
