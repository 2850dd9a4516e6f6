"""The package's modules import each other without a cycle, late (in-function) imports counted too."""

import ast
from pathlib import Path

import kvevict

PACKAGE = Path(kvevict.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """kvevict modules that `path` imports anywhere in its code (type-checking-only imports left out)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                     for node in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycle():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    # a package's __init__ re-exports its modules; importing a sibling through it is not a cycle of the code
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and paths[t].name == "__init__.py")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_benchmark_script_imports():
    """A renamed or removed library name breaks a benchmark only when it runs: import each script to catch it."""
    import subprocess
    import sys

    benchmarks = PACKAGE.parents[1] / "benchmarks"
    scripts = sorted(p.stem for p in benchmarks.glob("*.py"))
    assert scripts
    code = "import importlib, sys; sys.path.insert(0, sys.argv[1])\nfor name in sys.argv[2:]: importlib.import_module(name)"
    done = subprocess.run([sys.executable, "-c", code, str(benchmarks), *scripts], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
