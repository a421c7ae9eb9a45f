"""Read ``torch.save`` files (zip and legacy formats) without ``pickle.load`` and without imports.

Key invariant: nothing named by the file is ever imported or called. ``data.pkl`` is run by a
small pickle interpreter written here on purpose — no library offers a pickle VM that cannot
import — that maps the few allowed ``GLOBAL`` names (FORMATS.md §1.3, the same idea as torch's
``weights_only`` unpickler) to inert markers. Any other global raises
:class:`~savegame.errors.UnsafeContentError`, or, in listing mode, becomes an
:class:`~savegame.interop.base.Opaque` marker that is never instantiated.

Opening reads only ``data.pkl`` (zip) or the pickles at the head of a legacy file; ``read(name)``
reads the byte slice of one storage that the tensor view covers.

Modules, one job each (callers use the names re-exported here):

* :mod:`~savegame.interop.torch_pickle.values` -- the allow-list, dtype tables and the inert
  values (storages, tensor views) the VM builds, with the view bounds check.
* :mod:`~savegame.interop.torch_pickle.unpickler` -- the pickle VM that cannot import.
* :mod:`~savegame.interop.torch_pickle.container` -- zip and legacy layouts: where the pickle
  and each storage's bytes are.
* :mod:`~savegame.interop.torch_pickle.reader` -- :class:`TorchReader`, ``open_torch``, ``load``.
"""

from __future__ import annotations

from savegame.interop.torch_pickle.container import LEGACY_MAGIC, LEGACY_PROTOCOL
from savegame.interop.torch_pickle.reader import TorchReader, load, open_torch
from savegame.interop.torch_pickle.values import dtype_name

__all__ = ["LEGACY_MAGIC", "LEGACY_PROTOCOL", "TorchReader", "dtype_name", "load", "open_torch"]
