"""Where bytes go. Today: the local POSIX file system (fsync + atomic rename)."""
