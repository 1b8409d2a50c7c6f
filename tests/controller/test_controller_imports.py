"""The controller package's import structure: no cycles, nobody imports the server module,
no function-local imports, no flags or environment read inside the package."""

from __future__ import annotations

import ast

from tests.conftest import REPO

PACKAGE = REPO / "controller"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _controller_imports(tree: ast.AST) -> set[str]:
    """Names of controller modules imported anywhere in ``tree``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "controller":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("controller."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("controller.")}
    return out


def test_only_the_server_module_imports_the_server_module():
    importers = [name for name, tree in _modules().items()
                 if name != "server" and "server" in _controller_imports(tree)]
    assert importers == []


def test_the_controller_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _controller_imports(tree) & set(modules) for name, tree in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + (name,))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, path + (name,))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_no_function_local_or_type_checking_imports_and_no_flags_or_environment():
    problems = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems += [f"{name}.{node.name}: {ast.unparse(sub)}" for sub in ast.walk(node)
                             if isinstance(sub, (ast.Import, ast.ImportFrom))]
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                problems.append(f"{name}: TYPE_CHECKING import")
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                problems.append(f"{name}: imports argparse")
            if isinstance(node, ast.Attribute) and ast.unparse(node) in ("os.environ", "os.getenv"):
                problems.append(f"{name}: reads {ast.unparse(node)}")
    assert problems == []
