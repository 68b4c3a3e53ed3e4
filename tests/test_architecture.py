"""The import rules of docs/architecture.md: lower layers never import higher ones, experiments use public names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package (module path prefix) -> the hope modules it may import (prefixes); itself is always allowed
ALLOWED = {
    "hope.memory": ["hope._checks"],
    "hope.ops": ["hope.memory"],
    "hope.optim": [],
    "hope.layers": ["hope.config", "hope.ops", "hope.memory.state", "hope.memory.bounds", "hope.memory.config",
                    "hope.layers", "hope._checks"],
    "hope.state": ["hope.layers.mlp"],
    "hope.cms": ["hope.config", "hope.layers.mlp", "hope.state", "hope.optim", "hope.memory.bounds"],
    "hope.data": ["hope._checks"],
}
EXEMPT = {"hope.memory.bench"}  # a command-line benchmark of the cores


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def hope_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `import hope…` / `from hope… import …` in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "hope":
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "hope")
    return out


def owner(module: str) -> str | None:
    return next((pkg for pkg in ALLOWED if module == pkg or module.startswith(pkg + ".")), None)


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("path", sorted((ROOT / "hope").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_only_downwards(path):
    module = module_name(path)
    pkg = owner(module)
    if pkg is None or module in EXEMPT:
        return
    for imported, names in hope_imports(path):
        targets = [imported] if imported != "hope" else [f"hope.{n}" for n in names]
        for target in targets:
            assert any(under(target, p) for p in [pkg, *ALLOWED[pkg]]), f"{module} imports {target}"


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_experiments_use_public_names(path):
    for imported, names in hope_imports(path):
        private = [n for n in names if n.startswith("_")] + [p for p in imported.split(".") if p.startswith("_")]
        assert not private, f"{path.relative_to(ROOT)} imports private {private} from {imported}"


def test_the_cms_engine_never_imports_the_model():
    for path in (ROOT / "hope" / "cms").rglob("*.py"):
        assert not any(under(m, "hope.models") for m, _ in hope_imports(path)), path


def module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported by the module's own body (not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Try):  # an optional import guarded by try/except ImportError
            out.update(n.name.split(".")[0] for stmt in node.body if isinstance(stmt, ast.Import) for n in stmt.names)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "hope").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_hope_hf_needs_transformers_and_nothing_imports_it(path):
    module = module_name(path)
    if under(module, "hope.hf"):
        return
    assert not module_level_imports(path) & {"transformers", "lm_eval"}, f"{module} imports an optional extra"
    assert not any(under(m, "hope.hf") or (m == "hope" and "hf" in names) for m, names in hope_imports(path)), module
