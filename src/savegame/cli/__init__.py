"""The savegame command line."""
