"""The architecture's rules, checked on the source: no import circle between the project's
modules (counting every import, lazy ones inside functions included), the trainer never imports
sweep, dashboards, optuna or mlflow, and no module imports another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "sweep", "dashboards", "spinesweep")  # lowest layer first


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, at module level) for every import of the project's modules."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for t in subs or [target]:
                out.append((t, [] if subs else names, id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], id(node) in top))
    return [(t, n, lvl) for t, n, lvl in out if t.split(".")[0] in PACKAGES and t in modules]


def test_no_import_circle():
    modules = _modules()
    graph = {m: {t for t, _, _ in _imports(m, p, modules) if t != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages are made, not a circle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_trainer_knows_nothing_of_optuna_mlflow_or_sweep():
    for path in (ROOT / "trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                assert n.split(".")[0] not in ("optuna", "mlflow", "sweep", "dashboards"), f"{path}: imports {n}"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = [f"{m} imports {n} from {t}" for m, p in modules.items() for t, names, _ in _imports(m, p, modules)
           for n in names if n.startswith("_") and t != m]
    assert not bad, bad


def test_no_layer_imports_a_higher_one():
    """trainer < sweep < dashboards < spinesweep (the command line, which writes the dashboard when
    a study ends, sits above all three): an import only ever goes down or sideways."""
    modules = _modules()
    layer = {pkg: i for i, pkg in enumerate(PACKAGES)}
    bad = [f"{m} imports {t}" for m, p in modules.items() for t, _, _ in _imports(m, p, modules)
           if layer[t.split(".")[0]] > layer[m.split(".")[0]]]
    assert not bad, bad
