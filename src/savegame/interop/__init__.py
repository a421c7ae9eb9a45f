"""Safe, lazy readers of foreign checkpoint formats (torch, safetensors, TensorFlow, Keras,
darknet, numpy). Never executes code from a file. See docs/formats.md."""
