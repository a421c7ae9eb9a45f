"""The import rules of STYLE.md §3, checked on the source (a tiny import-linter)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "savegame"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py")) if (SRC / package).is_dir() else [SRC / f"{package}.py"]


@pytest.mark.parametrize("package", ["interop"])
def test_interop_never_imports_the_save_path_or_the_cli(package: str) -> None:
    for path in _modules(package):
        bad = {
            m
            for m in _imports(path)
            if m.startswith(("savegame.engine", "savegame.checkpointer", "savegame.cli", "savegame.distributed"))
        }
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["errors", "tree", "format", "storage"])
def test_lower_layers_import_nothing_above_them(package: str) -> None:
    above = ("savegame.engine", "savegame.checkpointer", "savegame.cli", "savegame.policy", "savegame.distributed", "savegame.api")
    for path in _modules(package):
        bad = {m for m in _imports(path) if m.startswith(above)}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_only_collectives_imports_torch_distributed() -> None:
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix() == "distributed/collectives.py":
            continue
        bad = {m for m in _imports(path) if m.startswith("torch.distributed")}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}; only distributed/collectives.py may"


def test_no_module_calls_pickle_load() -> None:
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for needle in ("pickle.load(", "pickle.loads(", "torch.load(", "np.load(", "numpy.load("):
            for line in text.splitlines():
                code = line.split("#", 1)[0]
                assert needle not in code or "allow_pickle=False" in code, f"{path.relative_to(SRC)}: {line.strip()}"
