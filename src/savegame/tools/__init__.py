"""Operations over whole checkpoints of any format: :mod:`.convert` and :mod:`.diff`.

The layer above the checkpointer: it opens checkpoints through the readers (``savegame.open``,
:mod:`savegame.interop`), writes through the one safetensors writer
(:mod:`savegame.format.tensors`) and ``savegame.save``, and publishes files through
:mod:`savegame.storage.files`. Nothing below this package imports it (``tests/test_layering.py``).
"""
