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


# Issue 9.18: inspecting a foreign file (`savegame --version`, `show`, `verify`, `savegame.open`
# with listing and verify()) must not pay torch's start-up. These modules may import torch (and
# the savegame modules that do) only inside functions or under `if TYPE_CHECKING:`.
NO_TORCH_AT_IMPORT = {
    "savegame",
    "savegame.errors",
    "savegame.policy",
    "savegame.api",
    "savegame.cli",
    "savegame.cli.main",
    "savegame.cli.commands",
    "savegame.cli._text",
    "savegame.engine",
    "savegame.engine.reader",
    "savegame.format",
    "savegame.format.hashing",
    "savegame.format.layout",
    "savegame.format.manifest",
    "savegame.format.tensors",
    "savegame.storage",
    "savegame.storage.local",
    "savegame.interop",
    "savegame.interop.base",
    "savegame.interop.detect",
    "savegame.interop._bounds",
    "savegame.interop._zip",
    "savegame.interop._tfproto",
    "savegame.interop._h5index",
    "savegame.interop.safetensors",
    "savegame.interop.numpy",
    "savegame.interop.tensorflow",
    "savegame.interop.keras",
    "savegame.interop.darknet",
    "savegame.interop.torch_pickle",
}


def _module_path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    return SRC / rel / "__init__.py" if (SRC / rel).is_dir() else SRC / rel.with_suffix(".py")


def _import_time_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: top-level and class-body statements, not
    function bodies nor ``if TYPE_CHECKING:`` blocks."""
    out: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING", "_typing.TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return out


@pytest.mark.parametrize("module", sorted(NO_TORCH_AT_IMPORT))
def test_inspection_modules_do_not_import_torch_at_import_time(module: str) -> None:
    path = _module_path(module)
    for m in sorted(_import_time_imports(path)):
        assert m != "torch" and not m.startswith("torch."), f"{path.relative_to(SRC)} imports {m} at import time"
        if m.startswith("savegame."):
            # `from savegame.x import name`: name is a module or an attribute of savegame.x
            target = m if _module_path(m).exists() else m.rsplit(".", 1)[0]
            assert target in NO_TORCH_AT_IMPORT, (
                f"{path.relative_to(SRC)} imports {target} at import time, which may import torch; "
                "import it inside the function that needs it"
            )
