"""Safe, lazy reader of Keras checkpoints: legacy ``.h5``, Keras 3 ``.weights.h5`` and ``.keras``.

Key invariant: nothing in the file is ever followed, loaded or executed. HDF5 links other than
hard links, external raw storage, virtual datasets and non-builtin filters are refused before
any tensor byte is read (so HDF5 never searches for a filter plugin named by the file), every
declared size is checked against the bytes actually stored, and ``config.json`` /
``model_config`` are parsed as plain JSON data, never deserialized into Keras objects
(FORMATS.md §4.4).

Formats (FORMATS.md §4):

* ``"keras-h5"`` – any HDF5 file. Two layouts are recognised:

  - *legacy* (Keras 1/2, ``tf.keras``, Keras 3's ``model.save("m.h5")``): a weights group
    (``model_weights`` or the root for ``save_weights``) whose attribute ``layer_names`` (or the
    split form ``layer_names0``, ``layer_names1``, …) lists layer groups, each with attribute
    ``weight_names``. Tensors are listed in that order and named by their weight name
    (``dense_1/kernel:0``, ``sequential/d1/kernel``). A name that repeats is prefixed with its
    layer (``<layer>/<weight name>``). Optimizer weights follow as
    ``optimizer_weights/<weight name>``.
  - *keras3* (``model.save_weights("m.weights.h5")``): datasets at ``<path>/vars/<i>``, named by
    that HDF5 path (``layers/conv2d/vars/0``), listed depth-first in HDF5 name order with the
    ``<i>`` indices in numeric order. bfloat16 datasets (opaque 2-byte type plus attribute
    ``dtype="bfloat16"``) are returned as ``torch.bfloat16``.

* ``"keras3"`` – a ``.keras`` zip: ``metadata.json`` and ``config.json`` (data only) and the
  ``model.weights.h5`` member, which must be STORED; it is read in place through a bounded
  file-like view of its byte range (no extraction). Weight shapes are checked against what
  ``config.json`` implies for the layers it describes (Dense, Conv, BatchNormalization, …).

Isolation (the default, ``isolate=True``): libhdf5 is a large C library that crashes or hangs on
some malformed files, so it only ever sees the file inside a small child process
(:mod:`~savegame.interop.keras.h5index`: numpy + h5py, no torch, about 0.2 s), which sends back
the index and the bytes of the few datasets the parent cannot read directly; contiguous
datasets (what Keras writes) are then read by offset in this process without libhdf5. A crash,
a hang past ``isolate_timeout`` or a file that changes meanwhile become a :class:`FormatError`;
the child dies with its parent. ``isolate=False`` runs libhdf5 in-process: only for trusted
files.

The package, by job (each module's docstring holds its own invariant):

* :mod:`~savegame.interop.keras.h5index` – everything that touches libhdf5: walk, check and
  index the HDF5 file. Imports nothing from savegame, so it can run alone in the child.
* :mod:`~savegame.interop.keras.isolation` – the child process and its answer, and h5index's
  problems as savegame's typed errors.
* :mod:`~savegame.interop.keras.keras3` – the ``.keras`` zip around the weights and the
  shapes its ``config.json`` implies.
* :mod:`~savegame.interop.keras.reader` – :class:`KerasReader` and :func:`open_keras`.

Example:
    >>> with open_keras("model.keras") as r:  # doctest: +SKIP
    ...     print(r.keys()[:2], r.metadata()["keras_version"])
"""

from __future__ import annotations

from savegame.interop.keras.reader import DEFAULT_ISOLATE_TIMEOUT, KerasReader, open_keras

__all__ = ["DEFAULT_ISOLATE_TIMEOUT", "KerasReader", "open_keras"]
