"""Where users already train: one module per framework (issue 12). Each imports its framework
only when used; the framework is an optional extra (``pip install savegame[lightning]``)."""
