"""The save path: stage, write, commit; and the read path: read, verify."""
