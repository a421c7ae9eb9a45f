"""savegame format v1: manifest, tensor-file layout, hashing, naming. Pure: bytes and files,
no training objects."""
