"""Safe, lazy reader of Darknet (YOLO) ``.weights`` files, driven by their ``.cfg``.

Key invariant: every tensor's size comes from the cfg through checked shape propagation, every
cfg number is bounded before use, and every byte range is checked against the file's length
before it is read; a malformed cfg or file becomes a typed :mod:`savegame.errors` error with
``.path`` (FORMATS.md §5, §7).

A ``.weights`` file is a 12-byte header (``major, minor, revision`` as int32 LE), a ``seen``
counter (8 bytes if ``major*10 + minor >= 2`` and both are < 1000, else 4), then raw float32 LE
values, layer after layer in cfg order, with no names (FORMATS.md §5).

Tensor names (PyTorch style, matching :mod:`savegame.adapters.darknet_torch`), ``i`` = the
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

The package, by job (each module's docstring holds its own invariant):

* :mod:`~savegame.interop.darknet.cfg` – the cfg text: sections, bounded option access.
* :mod:`~savegame.interop.darknet.layout` – shapes through the layers, each layer's tensors.
* :mod:`~savegame.interop.darknet.reader` – the ``.weights`` header, :class:`DarknetReader`
  and :func:`open_darknet`.

Example:
    >>> with open_darknet("yolov3-tiny.weights", cfg="yolov3-tiny.cfg") as r:  # doctest: +SKIP
    ...     r.info("layers.0.conv.weight").shape
    (16, 3, 3, 3)
"""

from __future__ import annotations

from savegame.interop.darknet.cfg import MAX_CFG_BYTES, CfgSection, parse_cfg
from savegame.interop.darknet.layout import DarknetLayer, plan_layers
from savegame.interop.darknet.reader import (
    Coverage,
    DarknetHeader,
    DarknetReader,
    open_darknet,
    read_header,
)

__all__ = [
    "MAX_CFG_BYTES",
    "CfgSection",
    "Coverage",
    "DarknetHeader",
    "DarknetLayer",
    "DarknetReader",
    "open_darknet",
    "parse_cfg",
    "plan_layers",
    "read_header",
]
