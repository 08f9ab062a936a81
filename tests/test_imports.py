"""The import structure of tl_core: no cycle, a light served model, every module importable alone.

The graph (test_the_import_graph_has_no_cycle) has an edge A -> B where module A imports tl_core
module B at module level (statements that run on import: not inside a function; `if
TYPE_CHECKING:` blocks are skipped). It is read with `ast`, nothing is imported. How an import
becomes edges:

- `import a.b.c` and `from a.b import c` where `a.b.c` is a module: an edge to `a.b.c`;
  `from a.b import name` where `name` is not a module: an edge to the package `a.b` (its
  `__init__`), since the name comes from there.
- Importing `a.b.c` first runs the `__init__` of each package above it, so there are edges to
  those too, except to the packages that hold A itself: their `__init__` has already started
  when A runs (Python runs a package's `__init__` before any of its submodules), so it is no
  new work, only a partly-initialised module.

So the timm-style plug-in layout is acyclic: `models/__init__` imports `models.small_cnn`,
which imports `models._registry` (an edge to that module alone, not back to `models`). A
submodule taking a name from its own package's `__init__` (`from tl_core.models import
Classifier` inside `tl_core/models/small_cnn.py`), while that `__init__` imports it, is a
cycle: that name exists only if the `__init__` happened to define it before importing the
submodule. Those are what this test finds.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tl_core"


def module_files() -> dict[str, Path]:
    """tl_core's modules by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def top_level_imports(tree: ast.Module):
    """The Import / ImportFrom nodes that run when the module is imported (not in functions)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = module_files()

    def known(name: str) -> str | None:
        """The tl_core module `name` names, or the nearest package above it that exists."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        # The packages that hold the importer (a package's __init__: itself too).
        own_packages = {name.rsplit(".", i)[0] for i in range(0 if is_package else 1, name.count(".") + 1)}
        targets = set()
        for node in top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package, `level` - 1 packages up
                anchor = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else known(base))
        for target in filter(None, targets):
            # The packages above the target run first, unless they hold the importer (already running).
            above = [target.rsplit(".", i)[0] for i in range(1, target.count(".") + 1)]
            graph[name].update({target, *(t for t in above if t not in own_packages)} - {name})
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    """One cycle through the component, as `a -> b -> a`."""
    members, start = set(component), component[0]
    path, seen = [start], {start}
    while True:
        step = sorted(graph[path[-1]] & members)
        nxt = next((w for w in step if w == start), None) or next((w for w in step if w not in seen), step[0])
        path.append(nxt)
        if nxt in seen:
            return " -> ".join(path[path.index(nxt):])
        seen.add(nxt)


def test_the_graph_reader_sees_a_cycle_and_the_plugin_layout_as_none():
    # The reader itself: a package __init__ importing a plug-in that imports the package's _registry
    # is no cycle; the plug-in taking a name from the package's __init__ is.
    layout = {"p": {"p.plug", "p._registry"}, "p.plug": {"p._registry"}, "p._registry": set()}
    assert cycles(layout) == []
    assert cycles({**layout, "p.plug": {"p"}}) == [["p", "p.plug"]]
    graph = import_graph()
    assert "tl_core.models._registry" in graph["tl_core.models.small_cnn"]
    assert "tl_core.models" not in graph["tl_core.models.small_cnn"]
    assert "tl_core.train" in graph["tl_core.tune.trial"]  # importing train.session runs train/__init__


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in tl_core:\n" + "\n".join(describe(c, graph) for c in found)


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_served_model_loads_no_strategy_and_not_the_training_loop():
    loaded = run_python("import json, sys\nimport tl_core.pyfunc_model\n"
                        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('tl_core'))))")
    assert "tl_core.models" in loaded  # the check is real: the model code is there
    heavy = [m for m in loaded if m.startswith("tl_core.strategies") or m.startswith("tl_core.train")]
    assert not heavy, f"importing tl_core.pyfunc_model loads {heavy}"


def test_the_demo_and_the_cli_do_not_import_torchvision():
    # torchvision.models costs 1-2 s to import (and more on a cold disk): only what builds a ResNet
    # or a MobileNet, or transforms photos, should pay it; the registry still lists them.
    loaded = run_python("import json, sys\nimport tl_core.cli, tl_core.steps, tl_core.models\n"
                        "print(json.dumps([sorted(tl_core.models.MODELS), 'torchvision' in sys.modules]))")
    models, torchvision_loaded = loaded
    assert {"small_cnn", "resnet18", "mobilenet_v3_small"} <= set(models)
    assert not torchvision_loaded, "importing tl_core's CLI, steps or model registry imports torchvision"


def test_every_module_imports_alone():
    """Each module in turn, with every tl_core module forgotten before it (third-party ones such as
    torch stay loaded: one process, seconds instead of a fresh interpreter per module)."""
    names = sorted(module_files())
    failures = run_python(f"""
import importlib, json, sys, traceback
failures = {{}}
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "tl_core" or m.startswith("tl_core.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
""")
    assert not failures, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())
