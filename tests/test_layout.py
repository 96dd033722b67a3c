"""The package's layout as the README's "Layout" section states it: a small package root, layers
that import only downward, no import cycles, no private names across modules, no mocking in
library code. Read from the source (ast), so nothing is imported."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moejax"

# Lowest first; a module may import its own layer and the layers below it, never above.
LAYERS = [
    ("moejax.config",),
    ("moejax.sharding", "moejax.params", "moejax.fp8"),
    ("moejax.model",),
    ("moejax.data",),
    ("moejax.convert",),
    ("moejax.training",),
    ("moejax.generate",),
    ("moejax.tools", "moejax"),  # the package's __init__ (the public API) is the top
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS and the README"
    return best[0]


def imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported moejax module, names taken from it) for every import in `module`, at any depth
    (function-level imports count: they are dependencies all the same)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "moejax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "moejax":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, []))
                else:
                    found.append((base, [alias.name]))
    return found


def test_package_root_holds_the_library_only():
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(root) <= 8, root
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert subpackages == ["convert", "data", "model", "tools", "training"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers_and_take_no_private_names(module):
    for target, names in imports(module):
        if target == module:
            continue
        assert layer_of(target) <= layer_of(module), f"{module} imports {target}, a higher layer"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{module} imports private {private} from {target}"


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports(m) if t != m and t in MODULES} for m in MODULES}
    # the package __init__ re-exports the public API; importing `moejax.x` runs it, but no
    # library module depends on what it re-exports
    graph = {m: targets - {"moejax"} for m, targets in graph.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_mock_in_library_code():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any("mock" in n for n in names), f"{module} imports {names}"
