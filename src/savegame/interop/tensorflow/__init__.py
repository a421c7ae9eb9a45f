"""Safe, lazy reader of TensorFlow tensor-bundle checkpoints, without TensorFlow.

Reads what ``tf.compat.v1.train.Saver`` (V2 format) and ``tf.train.Checkpoint`` /
``CheckpointManager`` write: ``P.index`` (a LevelDB-style SSTable of ``BundleEntryProto``),
``P.data-SSSSS-of-NNNNN`` shards, and the folder's ``checkpoint`` pointer file (FORMATS.md §3).

Key invariant: nothing in the files is trusted before it is checked. Every block of the
``.index`` is bounds-checked against the file and its masked CRC32C verified before it is
parsed; every varint, length, offset, shape and shard id is bounded (FORMATS.md §3.6, §7);
tensor bytes are read one tensor at a time by ``(shard, offset, size)`` and their entry CRC32C
is verified before they are returned; the pointer file is parsed as data and may only name a
checkpoint inside its own folder. Malformed input raises a typed
:class:`savegame.errors.FormatError` (``IntegrityError`` for checksum mismatches,
``UnsupportedFormatError`` for valid-but-unsupported features, ``UnsafeContentError`` for a
pointer that escapes its folder) whose ``.path`` names the offending file.

Names: ``keys()`` are the raw bundle keys (``dense/kernel`` for TF1;
``model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`` for TF2). For TF2 checkpoints
the ``_CHECKPOINTABLE_OBJECT_GRAPH`` is decoded and each key is given a readable object path
(``model/layer_with_weights-0/kernel``), used by :meth:`TensorFlowReader.tree` and listed in
``metadata()["object_paths"]``.

Partitioned variables (TF1 partitioners, TF >= 2.16 ``MaxShardSizePolicy``) are listed under
their full name and reassembled from their slice entries on read; the OrderedCode-keyed slice
entries themselves are not listed. Skipped (listed in ``metadata()["skipped"]`` with the
reason): inconsistent partitions, DT_VARIANT / DT_RESOURCE / quantized / 4-bit and other dtypes
without a torch equivalent. Snappy-compressed index blocks (TF <= 1.1 era) and Saver V1 files
raise :class:`~savegame.errors.UnsupportedFormatError`.

Modules, one job each (callers use the names re-exported here):

* :mod:`~savegame.interop.tensorflow.proto` -- bounded protobuf wire/text decoding.
* :mod:`~savegame.interop.tensorflow.table` -- the ``.index`` SSTable: blocks, CRCs, rows.
* :mod:`~savegame.interop.tensorflow.bundle` -- rows -> bounded entries, dtypes, partitions.
* :mod:`~savegame.interop.tensorflow.graph` -- the TF2 object graph -> readable object paths.
* :mod:`~savegame.interop.tensorflow.locate` -- prefix / ``.index`` / pointer file, ``sniff``.
* :mod:`~savegame.interop.tensorflow.reader` -- :class:`TensorFlowReader`, ``open_tensorflow``.

Example:
    >>> with open_tensorflow("runs/ckpts") as r:  # doctest: +SKIP
    ...     kernel = r.read(r.keys()[1])
"""

from __future__ import annotations

# Kept for tests/interop/test_tensorflow_overlap.py, which checks it against numpy's mask.
from savegame.interop.tensorflow.bundle import boxes_overlap as _boxes_overlap  # noqa: F401
from savegame.interop.tensorflow.locate import sniff
from savegame.interop.tensorflow.reader import TensorFlowReader, open_tensorflow
from savegame.interop.tensorflow.table import INDEX_MAGIC, is_index_tail

__all__ = ["INDEX_MAGIC", "TensorFlowReader", "is_index_tail", "open_tensorflow", "sniff"]
