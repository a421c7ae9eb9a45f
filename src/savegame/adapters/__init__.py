"""Foreign weights into PyTorch modules: layout conversion of Keras/TensorFlow layers
(:mod:`.mapping`) and a Darknet network built from its cfg (:mod:`.darknet_torch`).

Above the readers: adapters take tensors from :mod:`savegame.interop` readers and import only
``interop``, ``format`` and ``errors`` (``tests/test_layering.py``).
"""
