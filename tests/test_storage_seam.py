"""Issue 10: nothing outside ``storage/`` renames, fsyncs or deletes checkpoint data.

The commit protocol is only as good as the one place that implements it: a stray
``os.replace`` or ``rmtree`` elsewhere would be a second, untested commit or deletion path
(and one an object store, which has no rename, could not follow). Checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "savegame"

# module-level functions that move, make durable or delete bytes
FORBIDDEN_CALLS = {
    ("os", "rename"), ("os", "renames"), ("os", "replace"), ("os", "fsync"), ("os", "fdatasync"),
    ("os", "unlink"), ("os", "remove"), ("os", "rmdir"), ("os", "removedirs"), ("os", "link"),
    ("shutil", "rmtree"), ("shutil", "move"),
}  # fmt: skip
# methods with those effects on Path objects (str.replace and dataclasses.replace are fine)
FORBIDDEN_METHODS = {"unlink", "rmdir", "rename", "fsync", "rmtree"}


def _is_store(node: ast.expr) -> bool:
    """``store.x()`` / ``loc.store.x()`` / ``self._store.x()``: a call through the Store interface."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.lstrip("_") in ("store", "staging")


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr = node.func.attr
        owner = node.func.value
        if isinstance(owner, ast.Name) and (owner.id, attr) in FORBIDDEN_CALLS:
            out.append(f"{path.relative_to(SRC)}:{node.lineno}: {owner.id}.{attr}()")
        elif attr in FORBIDDEN_METHODS and not _is_store(owner):
            out.append(f"{path.relative_to(SRC)}:{node.lineno}: .{attr}()")
    return out


def test_only_storage_renames_fsyncs_or_deletes() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("storage/"):
            continue
        bad.extend(_violations(path))
    assert not bad, "file operations outside savegame/storage/:\n" + "\n".join(bad)


def test_the_check_sees_what_it_forbids(tmp_path: Path) -> None:
    probe = SRC / "storage" / "local.py"  # the one place that does all of it
    found = "\n".join(_violations(probe))
    for needle in (
        "os.rename()",
        "os.fsync()",
        ".unlink()" if ".unlink(" in probe.read_text() else "os.unlink()",
    ):
        assert needle in found, f"{needle} not detected in storage/local.py"
