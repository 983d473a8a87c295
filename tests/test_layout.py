"""The package layout: every module imports, and pte's import graph has no cycles (tests/test_layout.py)."""

import ast
import importlib
from pathlib import Path

PTE = Path(__file__).parents[1] / "pte"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PTE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The pte modules ``path`` imports: at module level, or anywhere (function-level imports too)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else [n for n in ast.walk(tree) if n not in _type_checking_only(tree)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pte.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("pte"):
            found.add(node.module)
            package = PTE.parent / node.module.replace(".", "/")  # ``from pte.models import toy``: a module
            found |= {f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").exists()}
    return found


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Nodes under ``if TYPE_CHECKING:``: annotations only, never run, so no runtime cycle."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    return {inner for block in blocks for stmt in block.body for inner in ast.walk(stmt)}


def import_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    """Module -> the pte modules it imports (only modules that exist as files)."""
    modules = {_module_name(p): p for p in PTE.rglob("*.py")}
    return {name: _imports(path, top_level_only) & modules.keys() - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once per back edge)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_module_level_imports_have_no_cycles():
    assert find_cycles(import_graph(top_level_only=True)) == []


def test_no_cycles_even_counting_imports_inside_functions():
    graph = import_graph(top_level_only=False)
    assert find_cycles(graph) == []
    assert "pte.models.load" not in graph["pte.models.toy"]


def test_every_module_imports():
    for path in sorted(PTE.rglob("*.py")):
        if path.name != "__main__.py":
            importlib.import_module(_module_name(path))


if __name__ == "__main__":
    for top in (True, False):
        print("module-level only" if top else "including function-level imports", find_cycles(import_graph(top)))
